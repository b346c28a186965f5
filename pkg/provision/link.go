package provision

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
)

// Link is one *libvirt.Libvirt that stays usable across libvirtd restarts:
// Run watches the connection and reconnects the same object, so every
// holder of Libvirt() keeps working once libvirtd is back.
//
// go-libvirt supports this: NewWithDialer documents that the object may
// reconnect many times, ConnectToURI re-dials through the dialer whenever
// the socket is down, and a lost connection fails calls in flight with
// libvirt.ErrInterrupted and later ones with EINVAL. Three gaps are closed
// here. ConnectToURI replaces connection state without synchronisation, so
// calls made through Call (and by a Provisioner given the Link) hold a read
// lock that reconnecting takes for writing. Disconnect first sends an RPC
// and so hangs with libvirtd, so Reset closes the socket underneath
// instead. And a connection lost right as ConnectToURI returns is never
// reported by Disconnected, so the Link also watches its own socket.
// Event subscriptions are lost with the connection; LinkOptions.OnState
// tells their owners when to subscribe again.
type Link struct {
	uri    libvirt.ConnectURI
	opts   LinkOptions
	dialer *trackingDialer
	l      *libvirt.Libvirt
	// gate is held for reading by calls and for writing while connecting.
	gate   sync.RWMutex
	closed atomic.Bool
}

// LinkOptions configure a Link. Zero values mean the defaults.
type LinkOptions struct {
	// Socket is libvirtd's unix socket; default /var/run/libvirt/libvirt-sock.
	Socket string
	// ConnectTimeout bounds one connection attempt; default 10s.
	ConnectTimeout time.Duration
	// MinBackoff and MaxBackoff bound the wait between failed attempts,
	// which doubles from MinBackoff up to MaxBackoff; default 100ms and 10s.
	MinBackoff, MaxBackoff time.Duration
	// OnState, if set, is called from Run when the connection is lost
	// (connected false, err nil), when an attempt to reconnect fails
	// (connected false, err says why) and when it is back (connected
	// true). Owners log it and subscribe to events again.
	OnState func(connected bool, err error)
}

// DefaultSocket is where libvirtd listens on the host.
const DefaultSocket = "/var/run/libvirt/libvirt-sock"

// NewLink returns an unconnected Link to uri (empty means qemu:///system).
func NewLink(uri string, opts LinkOptions) *Link {
	if uri == "" {
		uri = string(libvirt.QEMUSystem)
	}
	if opts.Socket == "" {
		opts.Socket = DefaultSocket
	}
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = 10 * time.Second
	}
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 100 * time.Millisecond
	}
	if opts.MaxBackoff <= 0 {
		opts.MaxBackoff = 10 * time.Second
	}
	opts.MaxBackoff = max(opts.MaxBackoff, opts.MinBackoff)
	inner, open, err := transport(uri, opts.Socket, opts.ConnectTimeout)
	d := &trackingDialer{inner: inner, err: err}
	return &Link{uri: open, opts: opts, dialer: d, l: libvirt.NewWithDialer(d)}
}

// Libvirt returns the connection. It stays the same object for the life of
// the Link. Calls made on it directly work, but may race with a reconnect
// in go-libvirt's bookkeeping; Call avoids that.
func (k *Link) Libvirt() *libvirt.Libvirt { return k.l }

// Connect makes the first connection, bounded by ctx and ConnectTimeout.
// Run does the same with retries; Connect is for callers that want to fail
// fast at start-up. It must not run concurrently with Run.
func (k *Link) Connect(ctx context.Context) error {
	if err := k.connect(ctx); err != nil {
		return fmt.Errorf("connect to libvirt %s: %w", k.uri, err)
	}
	return nil
}

// Connected reports whether the connection is up.
func (k *Link) Connected() bool {
	k.gate.RLock()
	defer k.gate.RUnlock()
	return k.l.IsConnected()
}

// Run keeps the connection up until ctx is done: it connects if needed,
// waits for the connection to drop, and reconnects with capped exponential
// backoff. It returns ctx's error, or nil once Close was called.
func (k *Link) Run(ctx context.Context) error {
	delay := k.opts.MinBackoff
	for {
		if k.closed.Load() {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		// Only Run and Connect write go-libvirt's connection state, so
		// reading it here needs no lock.
		if k.l.IsConnected() {
			k.waitDown(ctx)
			if ctx.Err() == nil && !k.closed.Load() {
				k.notify(false, nil)
			}
			delay = k.opts.MinBackoff
			continue
		}
		err := k.connect(ctx)
		if err == nil {
			k.notify(true, nil)
			continue
		}
		if ctx.Err() != nil || k.closed.Load() {
			continue
		}
		k.notify(false, err)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
		delay = min(2*delay, k.opts.MaxBackoff)
	}
}

// waitDown returns when the connection is lost or ctx is done.
func (k *Link) waitDown(ctx context.Context) {
	select {
	case <-ctx.Done():
	case <-k.l.Disconnected():
	case <-k.dialer.dead():
		// go-libvirt reports this itself right after its cleanup, except
		// in the window described on Link; do not wait for it forever.
		t := time.NewTimer(time.Second)
		defer t.Stop()
		select {
		case <-ctx.Done():
		case <-k.l.Disconnected():
		case <-t.C:
		}
	}
}

func (k *Link) notify(connected bool, err error) {
	if k.opts.OnState != nil {
		k.opts.OnState(connected, err)
	}
}

// connect makes one connection attempt. If it does not finish within
// ConnectTimeout or ctx, the socket it dialled is closed until the attempt
// gives up, so that no half-made connection survives.
func (k *Link) connect(ctx context.Context) error {
	k.gate.Lock()
	defer k.gate.Unlock()
	if k.closed.Load() {
		return net.ErrClosed
	}
	done := make(chan error, 1)
	go func() { done <- k.l.ConnectToURI(k.uri) }()
	t := time.NewTimer(k.opts.ConnectTimeout)
	defer t.Stop()
	var cause error
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		cause = ctx.Err()
	case <-t.C:
		cause = fmt.Errorf("no answer within %v: %w", k.opts.ConnectTimeout, ErrTimeout)
	}
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		k.dialer.closeCurrent()
		select {
		case <-done:
			return cause
		case <-tick.C:
		}
	}
}

// Reset drops the connection by closing its socket, failing every call in
// flight with libvirt.ErrInterrupted; Run then reconnects. It is for calls
// that got no answer in time: unlike Disconnect it needs no answer itself.
func (k *Link) Reset() {
	if k != nil {
		k.dialer.closeCurrent()
	}
}

// Close stops Run from reconnecting and disconnects.
func (k *Link) Close() error {
	k.closed.Store(true)
	// Disconnect sends an RPC first; bound it like any call.
	_, err := bounded(context.Background(), k, 5*time.Second, func() (struct{}, error) {
		return struct{}{}, k.l.Disconnect()
	})
	k.dialer.closeCurrent()
	if err != nil && !IsUnavailable(err) {
		return fmt.Errorf("disconnect from libvirt %s: %w", k.uri, err)
	}
	return nil
}

// Call runs fn, which makes go-libvirt calls on Libvirt(), like the
// Provisioner runs its own: it waits while the Link reconnects, returns as
// soon as ctx is done or timeout has passed, and in the latter case resets
// the connection and returns an error wrapping ErrTimeout. fn keeps running
// in the background until its call returns, which the reset makes prompt.
func (k *Link) Call(ctx context.Context, timeout time.Duration, fn func() error) error {
	_, err := bounded(ctx, k, timeout, func() (struct{}, error) { return struct{}{}, fn() })
	return err
}

// acquire takes the gate for one call and returns its release; a nil Link
// has no gate.
func (k *Link) acquire() func() {
	if k == nil {
		return func() {}
	}
	k.gate.RLock()
	return k.gate.RUnlock
}

// errCallTimeout is the cancellation cause of a call's own deadline.
var errCallTimeout = errors.New("libvirt call deadline")

// bounded runs fn, one or a few libvirt calls, in its own goroutine and
// returns its result, or an error as soon as ctx is done or timeout has
// passed. go-libvirt calls take no context (go-libvirt#182), so a call that
// is given up on still runs to its end in the background; on timeout the
// Link, if any, is reset so that it ends promptly. k may be nil.
func bounded[T any](ctx context.Context, k *Link, timeout time.Duration, fn func() (T, error)) (T, error) {
	var zero T
	if err := ctx.Err(); err != nil {
		return zero, err
	}
	cctx, cancel := context.WithTimeoutCause(ctx, timeout, errCallTimeout)
	defer cancel()
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		release := k.acquire()
		defer release()
		// Waiting for a reconnect may outlast the caller's patience; a
		// call it gave up on must not run afterwards.
		if cctx.Err() != nil {
			done <- result{err: cctx.Err()}
			return
		}
		v, err := fn()
		if err == syscall.EINVAL {
			// go-libvirt's answer for a call on a lost connection; libvirt's
			// own refusals come as libvirt.Error.
			err = fmt.Errorf("%w: %w", ErrDisconnected, err)
		}
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-cctx.Done():
		if err := ctx.Err(); err != nil {
			return zero, err
		}
		k.Reset()
		return zero, fmt.Errorf("no answer within %v: %w", timeout, ErrTimeout)
	}
}

// trackingDialer dials libvirtd through the URI's transport and keeps the
// connection it made last, so that it can be closed from outside go-libvirt.
type trackingDialer struct {
	inner socket.Dialer
	err   error // why the URI has no transport; every Dial returns it

	mu   sync.Mutex
	conn *trackedConn
}

// Dial implements socket.Dialer.
func (d *trackingDialer) Dial() (net.Conn, error) {
	if d.err != nil {
		return nil, d.err
	}
	c, err := d.inner.Dial()
	if err != nil {
		return nil, err
	}
	tc := &trackedConn{Conn: c, gone: make(chan struct{})}
	d.mu.Lock()
	d.conn = tc
	d.mu.Unlock()
	return tc, nil
}

func (d *trackingDialer) current() *trackedConn {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.conn
}

func (d *trackingDialer) closeCurrent() {
	if c := d.current(); c != nil {
		_ = c.Close()
	}
}

// dead returns a channel closed once the current connection failed; nil
// (blocking forever) before the first dial.
func (d *trackingDialer) dead() <-chan struct{} {
	if c := d.current(); c != nil {
		return c.gone
	}
	return nil
}

// trackedConn notes when its connection fails or is closed.
type trackedConn struct {
	net.Conn
	once sync.Once
	gone chan struct{}
}

func (c *trackedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err != nil {
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			c.markGone()
		}
	}
	return n, err
}

func (c *trackedConn) Close() error {
	c.markGone()
	return c.Conn.Close()
}

func (c *trackedConn) markGone() { c.once.Do(func() { close(c.gone) }) }
