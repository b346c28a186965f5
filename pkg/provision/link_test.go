package provision

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/internal/daemon"
)

// socketProxy forwards a unix socket to libvirtd's, so that tests can cut
// or stall the connection without disturbing libvirtd and its other users.
type socketProxy struct {
	path string
	ln   net.Listener
	wg   sync.WaitGroup

	mu     sync.Mutex
	conns  map[net.Conn]bool
	resume chan struct{} // non-nil while stalled
}

func newSocketProxy(t *testing.T) *socketProxy {
	t.Helper()
	requireLibvirt(t)
	path := filepath.Join(t.TempDir(), "libvirt-sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	p := &socketProxy{path: path, ln: ln, conns: map[net.Conn]bool{}}
	p.wg.Go(p.serve)
	t.Cleanup(func() {
		p.stall(false)
		_ = ln.Close()
		p.cut()
		p.wg.Wait()
	})
	return p
}

func (p *socketProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("unix", libvirtSocket)
		if err != nil {
			_ = c.Close()
			continue
		}
		p.mu.Lock()
		p.conns[c], p.conns[up] = true, true
		p.mu.Unlock()
		done := make(chan struct{})
		var once sync.Once
		closeBoth := func() {
			once.Do(func() {
				close(done)
				_ = c.Close()
				_ = up.Close()
				p.mu.Lock()
				delete(p.conns, c)
				delete(p.conns, up)
				p.mu.Unlock()
			})
		}
		p.wg.Go(func() { p.pipe(up, c, done); closeBoth() })
		p.wg.Go(func() { _, _ = io.Copy(c, up); closeBoth() })
	}
}

// pipe copies client bytes to libvirtd, holding them back while stalled.
func (p *socketProxy) pipe(dst, src net.Conn, done <-chan struct{}) {
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			for {
				p.mu.Lock()
				resume := p.resume
				p.mu.Unlock()
				if resume == nil {
					break
				}
				select {
				case <-resume:
				case <-done:
					return
				}
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// cut closes every proxied connection, as a libvirtd restart does.
func (p *socketProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		_ = c.Close()
	}
}

// stall makes libvirtd seem hung (no request reaches it) or lets requests
// through again.
func (p *socketProxy) stall(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case on && p.resume == nil:
		p.resume = make(chan struct{})
	case !on && p.resume != nil:
		close(p.resume)
		p.resume = nil
	}
}

// linkStates records what a Link reports.
type linkStates struct {
	downs, ups, failures atomic.Int32
}

func (s *linkStates) onState(up bool, err error) {
	switch {
	case up:
		s.ups.Add(1)
	case err == nil:
		s.downs.Add(1)
	default:
		s.failures.Add(1)
	}
}

// runLink connects a Link and runs it until the test ends.
func runLink(t *testing.T, uri string, opts LinkOptions) *Link {
	t.Helper()
	k := NewLink(uri, opts)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := k.Connect(ctx); err != nil {
		t.Fatalf("Connect: %v", err)
	}
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- k.Run(runCtx) }()
	t.Cleanup(func() {
		stop()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run = %v, want context.Canceled", err)
		}
		if err := k.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return k
}

// eventually polls f until it succeeds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(20 * time.Millisecond)
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

func TestLinkReconnects(t *testing.T) {
	proxy := newSocketProxy(t)
	var states linkStates
	k := runLink(t, "test:///default", LinkOptions{Socket: proxy.path, MinBackoff: 10 * time.Millisecond, MaxBackoff: 200 * time.Millisecond, OnState: states.onState})
	l := k.Libvirt()
	p := New(l, Options{Link: k, CallTimeout: 5 * time.Second})
	ctx := t.Context()
	if _, err := p.List(ctx); err != nil {
		t.Fatalf("List: %v", err)
	}

	// Calls keep coming while the connection is cut three times; each
	// either works or fails as unavailable, and the race detector watches
	// go-libvirt's state being replaced under them.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var okCalls, unavailable atomic.Int32
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				_, err := p.List(ctx)
				switch {
				case err == nil:
					okCalls.Add(1)
				case IsUnavailable(err):
					unavailable.Add(1)
				default:
					t.Errorf("List during reconnects: %v (not IsUnavailable)", err)
				}
			}
		})
	}
	for i := range 3 {
		time.Sleep(100 * time.Millisecond)
		proxy.cut()
		eventually(t, 5*time.Second, "reconnect", func() error {
			if states.ups.Load() < int32(i+1) {
				return errors.New("not reconnected yet")
			}
			return nil
		})
	}
	time.Sleep(100 * time.Millisecond)
	close(stop)
	wg.Wait()
	t.Logf("during cuts: %d calls worked, %d failed as unavailable; link down %d, up %d, failed attempts %d",
		okCalls.Load(), unavailable.Load(), states.downs.Load(), states.ups.Load(), states.failures.Load())

	if states.downs.Load() < 3 || states.ups.Load() < 3 {
		t.Errorf("link reported %d losses and %d reconnects, want 3 each", states.downs.Load(), states.ups.Load())
	}
	// The same object works for every holder, through the Link or not.
	if k.Libvirt() != l {
		t.Error("Libvirt() changed")
	}
	if err := k.Call(ctx, 5*time.Second, func() error { _, err := l.ConnectGetLibVersion(); return err }); err != nil {
		t.Errorf("call after reconnects: %v", err)
	}
	if _, err := p.List(ctx); err != nil {
		t.Errorf("List after reconnects: %v", err)
	}
}

func TestLinkResetsHungConnection(t *testing.T) {
	proxy := newSocketProxy(t)
	var states linkStates
	k := runLink(t, "test:///default", LinkOptions{Socket: proxy.path, MinBackoff: 10 * time.Millisecond, MaxBackoff: 100 * time.Millisecond, OnState: states.onState})
	p := New(k.Libvirt(), Options{Link: k, CallTimeout: 300 * time.Millisecond})
	ctx := t.Context()
	if _, err := p.List(ctx); err != nil {
		t.Fatalf("List: %v", err)
	}

	proxy.stall(true)
	begin := time.Now()
	_, err := p.List(ctx)
	took := time.Since(begin)
	if !errors.Is(err, ErrTimeout) || !IsUnavailable(err) {
		t.Errorf("List against a hung libvirtd = %v; want ErrTimeout, IsUnavailable", err)
	}
	if took > 30*time.Second {
		t.Errorf("List took %v to give up, want about the 300ms call timeout, not a hang", took)
	}
	// While the Link reconnects to the hung libvirtd, calls fail fast or
	// end with the caller's context.
	cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	begin = time.Now()
	if _, _, err := p.Lookup(cctx, "j"); !errors.Is(err, context.DeadlineExceeded) && !IsUnavailable(err) {
		t.Errorf("Lookup with an expiring context = %v, want context.DeadlineExceeded or unavailable", err)
	}
	if took := time.Since(begin); took > 30*time.Second {
		t.Errorf("Lookup took %v, as if it waited for the hung libvirtd", took)
	}
	proxy.stall(false)

	eventually(t, 5*time.Second, "List after the hang", func() error { _, err := p.List(ctx); return err })
	if states.downs.Load() < 1 || states.ups.Load() < 1 {
		t.Errorf("link reported %d losses and %d reconnects; the timeout should have reset it", states.downs.Load(), states.ups.Load())
	}
}

func TestBoundedWithoutLink(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	begin := time.Now()
	_, err := bounded(t.Context(), nil, 50*time.Millisecond, func() (int, error) { <-block; return 1, nil })
	if !errors.Is(err, ErrTimeout) || time.Since(begin) > 30*time.Second {
		t.Errorf("bounded = %v after %v; want ErrTimeout after 50ms", err, time.Since(begin))
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	ran := false
	if _, err := bounded(ctx, nil, time.Second, func() (int, error) { ran = true; return 1, nil }); !errors.Is(err, context.Canceled) || ran {
		t.Errorf("bounded with a canceled context = %v, ran %v", err, ran)
	}
	if v, err := bounded(t.Context(), nil, time.Second, func() (int, error) { return 7, nil }); v != 7 || err != nil {
		t.Errorf("bounded = %d, %v", v, err)
	}
	ctx, cancel = context.WithTimeout(t.Context(), 50*time.Millisecond)
	defer cancel()
	begin = time.Now()
	if _, err := bounded(ctx, nil, time.Minute, func() (int, error) { <-block; return 1, nil }); !errors.Is(err, context.DeadlineExceeded) || time.Since(begin) > 30*time.Second {
		t.Errorf("bounded = %v after %v; want the caller's deadline after 50ms", err, time.Since(begin))
	}
	if _, err := bounded(t.Context(), nil, time.Second, func() (int, error) { return 0, syscall.EINVAL }); !errors.Is(err, ErrDisconnected) || !IsUnavailable(err) {
		t.Errorf("bounded = %v; want go-libvirt's EINVAL reported as ErrDisconnected", err)
	}
}

// TestDisruptiveLibvirtdRestart kills the real libvirtd and starts it
// again, and checks that the Link's connection works again, for the
// Provisioner and for direct users of the same *libvirt.Libvirt. Other
// tests on this machine lose their connections meanwhile, so it only runs
// with STRETCHY_DISRUPTIVE_TESTS=1.
func TestDisruptiveLibvirtdRestart(t *testing.T) {
	if os.Getenv("STRETCHY_DISRUPTIVE_TESTS") != "1" {
		t.Skip("kills libvirtd; set STRETCHY_DISRUPTIVE_TESTS=1")
	}
	requireLibvirt(t)
	for _, tool := range []string{"pkill", "pgrep", "libvirtd"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("no %s: %v", tool, err)
		}
	}
	// Whatever happens, libvirtd runs again when the test ends.
	t.Cleanup(func() {
		if exec.Command("pgrep", "-x", "libvirtd").Run() != nil {
			if out, err := startLibvirtd(); err != nil {
				t.Errorf("restart libvirtd: %v: %s", err, out)
			}
		}
		waitLibvirtd(t, 60*time.Second)
	})

	var states linkStates
	k := runLink(t, string(libvirt.QEMUSystem), LinkOptions{OnState: states.onState})
	l := k.Libvirt()
	p := New(l, Options{Link: k})
	ctx := t.Context()
	before, err := p.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}

	if out, err := exec.Command("pkill", "-x", "libvirtd").CombinedOutput(); err != nil {
		t.Fatalf("pkill libvirtd: %v: %s", err, out)
	}
	eventually(t, 10*time.Second, "noticing libvirtd is gone", func() error {
		if states.downs.Load() == 0 {
			return errors.New("link still up")
		}
		return nil
	})
	eventually(t, 15*time.Second, "libvirtd exit", func() error {
		if exec.Command("pgrep", "-x", "libvirtd").Run() == nil {
			return errors.New("libvirtd still running")
		}
		return nil
	})
	if _, err := p.List(ctx); !IsUnavailable(err) {
		t.Errorf("List without libvirtd = %v, want an IsUnavailable error", err)
	}
	restarted := time.Now()
	if out, err := startLibvirtd(); err != nil {
		t.Fatalf("libvirtd -d: %v: %s", err, out)
	}
	eventually(t, 60*time.Second, "List after restart", func() error { _, err := p.List(ctx); return err })
	t.Logf("back %v after restart; link down %d, up %d, failed attempts %d",
		time.Since(restarted).Round(time.Millisecond), states.downs.Load(), states.ups.Load(), states.failures.Load())
	after, err := p.List(ctx)
	if err != nil || len(after) < len(before)-5 {
		t.Errorf("List after restart = %d machines, %v; had %d", len(after), err, len(before))
	}
	// Another holder of the same pointer, as pkg/qga is.
	if err := k.Call(ctx, 10*time.Second, func() error { _, err := l.ConnectGetLibVersion(); return err }); err != nil {
		t.Errorf("direct call on the same connection: %v", err)
	}
}

// startLibvirtd runs libvirtd -d, which outlives the test: in a session of
// its own and with none of the test process's descriptors (internal/daemon).
func startLibvirtd() ([]byte, error) {
	cmd := exec.Command("libvirtd", "-d")
	if err := daemon.Detach(cmd); err != nil {
		return nil, err
	}
	return cmd.CombinedOutput()
}

// waitLibvirtd waits until a fresh connection to libvirtd works.
func waitLibvirtd(t *testing.T, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		l, err := Dial(ctx, string(libvirt.QEMUSystem))
		cancel()
		if err == nil {
			_, err = l.ConnectGetLibVersion()
			_ = l.Disconnect()
			if err == nil {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Errorf("libvirtd not answering after %v: %v", timeout, err)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}
