package qga_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// libvirt RPC program and procedure numbers (remote_protocol.x and
// qemu_protocol.x), as the requests a hangingRelay swallows carry them.
const (
	remoteProgram                = 0x20008086
	procDomainLookupByName       = 23
	procEventCallbackRegisterAny = 316
	qemuProgram                  = 0x20008087
	procQEMUAgentCommand         = 3
)

// request is one libvirt RPC call as the client sent it.
type request struct {
	program, procedure uint32
	payload            []byte
}

// hangingRelay forwards a unix socket to libvirtd's and, while hang is
// set, swallows the requests it matches: libvirtd never sees them, so the
// client never gets an answer, while every other call on the connection
// works. That is what a call stuck in libvirtd looks like to the worker.
type hangingRelay struct {
	path string
	ln   net.Listener
	wg   sync.WaitGroup

	mu       sync.Mutex
	hang     func(request) bool
	conns    map[net.Conn]bool
	swallows atomic.Int32
}

func newHangingRelay(t *testing.T) *hangingRelay {
	t.Helper()
	r := &hangingRelay{path: filepath.Join(t.TempDir(), "libvirt-sock"), conns: map[net.Conn]bool{}}
	ln, err := net.Listen("unix", r.path)
	if err != nil {
		t.Fatal(err)
	}
	r.ln = ln
	r.wg.Go(r.serve)
	t.Cleanup(func() {
		_ = ln.Close()
		r.mu.Lock()
		for c := range r.conns {
			_ = c.Close()
		}
		r.mu.Unlock()
		r.wg.Wait()
	})
	return r
}

// swallow makes the relay swallow the requests match reports, or none.
func (r *hangingRelay) swallow(match func(request) bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.hang = match
}

func (r *hangingRelay) serve() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("unix", libvirtSocket)
		if err != nil {
			_ = c.Close()
			continue
		}
		r.mu.Lock()
		r.conns[c], r.conns[up] = true, true
		r.mu.Unlock()
		var once sync.Once
		closeBoth := func() {
			once.Do(func() {
				_ = c.Close()
				_ = up.Close()
				r.mu.Lock()
				delete(r.conns, c)
				delete(r.conns, up)
				r.mu.Unlock()
			})
		}
		r.wg.Go(func() { r.requests(up, c); closeBoth() })
		r.wg.Go(func() { _, _ = io.Copy(c, up); closeBoth() })
	}
}

// requests copies the client's packets to libvirtd, one whole packet at a
// time, leaving out those to swallow.
func (r *hangingRelay) requests(dst, src net.Conn) {
	var size [4]byte
	for {
		if _, err := io.ReadFull(src, size[:]); err != nil {
			return
		}
		// The length counts itself; the header holds program, version,
		// procedure, type, serial and status, 4 bytes each.
		n := binary.BigEndian.Uint32(size[:])
		if n < 28 || n > 64<<20 {
			return
		}
		pkt := make([]byte, n)
		copy(pkt, size[:])
		if _, err := io.ReadFull(src, pkt[4:]); err != nil {
			return
		}
		req := request{
			program:   binary.BigEndian.Uint32(pkt[4:]),
			procedure: binary.BigEndian.Uint32(pkt[12:]),
			payload:   pkt[28:],
		}
		r.mu.Lock()
		hang := r.hang
		r.mu.Unlock()
		if hang != nil && hang(req) {
			r.swallows.Add(1)
			continue
		}
		if _, err := dst.Write(pkt); err != nil {
			return
		}
	}
}

// isAgentCommand matches the guest agent command name.
func isAgentCommand(name string) func(request) bool {
	want := []byte(`"execute":"` + name + `"`)
	return func(r request) bool {
		return r.program == qemuProgram && r.procedure == procQEMUAgentCommand && bytes.Contains(r.payload, want)
	}
}

// isRemoteCall matches a call of libvirt's remote program.
func isRemoteCall(procedure uint32) func(request) bool {
	return func(r request) bool { return r.program == remoteProgram && r.procedure == procedure }
}

// Short agent timeouts keep the test quick; the margin leaves a loaded
// machine time for the calls that do get answers.
const (
	hangTimeout = time.Second
	hangMargin  = 5 * time.Second
	// hangSlack is how late a call may give up beyond its bound on a
	// loaded machine; what it guards against is a call that never ends.
	hangSlack = 30 * time.Second
)

// TestHungCallsAreBounded makes one call of each Agent method never get an
// answer from libvirtd, through a relay in front of its socket, with the
// Agent's calls going through a provision.Link: the method returns within
// the call's bound with an error that provision.IsUnavailable reports, the
// Link drops the connection and makes it again, and the method works once
// libvirtd answers again.
func TestHungCallsAreBounded(t *testing.T) {
	g := sharedGuest(t)
	relay, link, ups := relayedLink(t)
	a := qga.New(link.Libvirt(), qga.Options{Caller: link, PingTimeout: hangTimeout, CallTimeout: hangTimeout, Margin: hangMargin})

	// A program that runs while the test does, for Status to ask about,
	// and one that Run sees end.
	sleeper := qga.ExecRequest{Path: "/bin/sleep", Args: []string{"600"}}
	short := qga.ExecRequest{Path: "/bin/sleep", Args: []string{"1"}}
	pid, err := a.Start(ctxFor(t, 10*time.Second), g.name, sleeper)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	agentBound := hangTimeout + hangMargin
	tests := []struct {
		name  string
		hang  func(request) bool
		bound time.Duration
		call  func(ctx context.Context) error
	}{
		{"WaitReady, guest-ping", isAgentCommand("guest-ping"), agentBound,
			func(ctx context.Context) error { return a.WaitReady(ctx, g.name) }},
		{"WaitReady, domain lookup", isRemoteCall(procDomainLookupByName), hangMargin,
			func(ctx context.Context) error { return a.WaitReady(ctx, g.name) }},
		{"Start, guest-exec", isAgentCommand("guest-exec"), agentBound,
			func(ctx context.Context) error { _, err := a.Start(ctx, g.name, short); return err }},
		{"Run, guest-exec-status", isAgentCommand("guest-exec-status"), agentBound,
			func(ctx context.Context) error { _, err := a.Run(ctx, g.name, short); return err }},
		{"Status, guest-exec-status", isAgentCommand("guest-exec-status"), agentBound,
			func(ctx context.Context) error { _, err := a.Status(ctx, g.name, pid); return err }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Every case begins on a working connection.
			eventually(t, 10*time.Second, "Ping before the hang", func() error { return a.Ping(t.Context(), g.name) })
			call := tt.call
			before, swallowed := ups.Load(), relay.swallows.Load()

			relay.swallow(tt.hang)
			// The context is far longer than the bound: what ends the
			// call must be the Caller's deadline.
			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			defer cancel()
			done := make(chan error, 1)
			begin := time.Now()
			go func() { done <- call(ctx) }()
			var err error
			select {
			case err = <-done:
			case <-time.After(tt.bound + hangSlack):
				// Let the call end, so the test does not hang with it.
				relay.swallow(nil)
				link.Reset()
				err = <-done
				t.Fatalf("no return within %v, %v after its bound; after a reset: %v", time.Since(begin), hangSlack, err)
			}
			took := time.Since(begin)
			relay.swallow(nil)
			t.Logf("gave up after %v (bound %v): %v", took.Round(time.Millisecond), tt.bound, err)

			if relay.swallows.Load() == swallowed {
				t.Fatalf("the relay swallowed no request; the case tests nothing (error: %v)", err)
			}
			if !errors.Is(err, provision.ErrTimeout) || !provision.IsUnavailable(err) {
				t.Errorf("error %v; want provision.ErrTimeout, which provision.IsUnavailable reports", err)
			}
			if errors.Is(err, qga.ErrAgentTimeout) || errors.Is(err, qga.ErrRunTimeout) || errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("error %v says the guest or the caller's context took too long; it was the connection", err)
			}
			if !strings.Contains(err.Error(), g.name) {
				t.Errorf("error %q does not name the domain", err)
			}
			if took < tt.bound {
				t.Errorf("gave up after %v, before the bound of %v", took, tt.bound)
			}
			// The Link dropped the hung connection and made a new one, on
			// which the same call works.
			eventually(t, 10*time.Second, "a reconnect", func() error {
				if ups.Load() == before {
					return errors.New("the Link did not reconnect")
				}
				return nil
			})
			eventually(t, 10*time.Second, "the call after the hang", func() error { return call(ctxFor(t, 10*time.Second)) })
		})
	}
}

// TestHungCallEndsWithTheContext makes guest-ping hang with a boot timeout
// shorter than the call's bound: WaitReady returns when the boot timeout
// ends, as ErrAgentTimeout, which the lifecycle reports as a boot timeout.
func TestHungCallEndsWithTheContext(t *testing.T) {
	g := sharedGuest(t)
	relay, link, _ := relayedLink(t)
	a := qga.New(link.Libvirt(), qga.Options{Caller: link, PingTimeout: hangTimeout, CallTimeout: hangTimeout, Margin: hangMargin})
	eventually(t, 10*time.Second, "Ping before the hang", func() error { return a.Ping(t.Context(), g.name) })

	relay.swallow(isAgentCommand("guest-ping"))
	defer relay.swallow(nil)
	const boot = time.Second
	begin := time.Now()
	err := a.WaitReady(ctxFor(t, boot), g.name)
	took := time.Since(begin)
	if !errors.Is(err, qga.ErrAgentTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitReady = %v, want ErrAgentTimeout wrapping context.DeadlineExceeded", err)
	}
	if took > boot+hangSlack {
		t.Errorf("WaitReady returned %v after its context ended, want promptly", took-boot)
	}
	if relay.swallows.Load() == 0 {
		t.Error("the relay swallowed no request; the test tests nothing")
	}
}

// relayedLink returns a hanging relay in front of libvirtd's socket and a
// running Link through it, which counts its reconnects, until the test
// ends.
func relayedLink(t *testing.T) (*hangingRelay, *provision.Link, *atomic.Int32) {
	t.Helper()
	relay := newHangingRelay(t)
	ups := new(atomic.Int32)
	link := provision.NewLink("qemu:///system", provision.LinkOptions{
		Socket: relay.path, MinBackoff: 10 * time.Millisecond, MaxBackoff: 100 * time.Millisecond,
		OnState: func(connected bool, err error) {
			if connected {
				ups.Add(1)
			}
		},
	})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := link.Connect(ctx); err != nil {
		t.Fatal(err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = link.Run(runCtx) })
	t.Cleanup(func() {
		stop()
		wg.Wait()
		_ = link.Close()
	})
	return relay, link, ups
}

// eventually polls f until it succeeds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %v: %v", what, timeout, err)
		}
		<-tick.C
	}
}
