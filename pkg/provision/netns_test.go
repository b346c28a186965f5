package provision

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Test networks for the isolation tests: a bridge in the root namespace
// without an address of its own, and a network namespace made by the test
// whose veth is a port of that bridge. Addresses are in 198.18.0.0/15
// (RFC 2544, benchmarking), never anything a real network uses, and all
// test traffic stays between the guests on the bridge, the namespace, and
// the host's loopback.

// requireNetns skips the test unless it may make bridges and network
// namespaces (root, iproute2 with netns support), or fails it when
// STRETCHY_REQUIRE_LIBVIRT=1 says the host must be able to.
func requireNetns(t *testing.T) {
	t.Helper()
	why := ""
	switch {
	case os.Geteuid() != 0:
		why = "not root"
	default:
		if out, err := exec.Command("ip", "netns", "list").CombinedOutput(); err != nil {
			why = fmt.Sprintf("ip netns list: %v: %s", err, strings.TrimSpace(string(out)))
		}
	}
	if why == "" {
		return
	}
	if os.Getenv("STRETCHY_REQUIRE_LIBVIRT") == "1" {
		t.Fatalf("cannot make test networks (%s), and STRETCHY_REQUIRE_LIBVIRT=1", why)
	}
	t.Skipf("cannot make test networks: %s; run as root with iproute2 (ip netns), or set STRETCHY_REQUIRE_LIBVIRT=1 to fail instead", why)
}

// ipCmd runs ip with args and fails the test if it fails.
func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
}

// testBridge is a bridge with one port into a network namespace.
type testBridge struct {
	Bridge string
	NS     string
	// Addr is the namespace's address on the bridge's segment.
	Addr string
}

// newTestBridge makes bridge pvbr<id> (no address, STP off) and namespace
// provtest-<id> whose interface eth0, the peer of the bridge port pvv<id>,
// has addr/24. Everything goes when the test ends, also on failure.
func newTestBridge(t *testing.T, addr string) testBridge {
	t.Helper()
	requireNetns(t)
	id := randHex(t)[:6]
	b := testBridge{Bridge: "pvbr" + id, NS: "provtest-" + id, Addr: addr}
	port := "pvv" + id
	t.Cleanup(func() {
		// Deleting the namespace deletes its end of the veth, and with it
		// the bridge's port.
		for _, args := range [][]string{{"netns", "del", b.NS}, {"link", "del", port}, {"link", "del", b.Bridge}} {
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil && !gone(out) {
				t.Errorf("cleanup: ip %s: %v: %s", strings.Join(args, " "), err, out)
			}
		}
	})
	ipCmd(t, "netns", "add", b.NS)
	ipCmd(t, "link", "add", b.Bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
	ipCmd(t, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", b.NS)
	ipCmd(t, "link", "set", port, "master", b.Bridge)
	ipCmd(t, "link", "set", port, "up")
	ipCmd(t, "link", "set", b.Bridge, "up")
	ipCmd(t, "-n", b.NS, "addr", "add", addr+"/24", "dev", "eth0")
	ipCmd(t, "-n", b.NS, "link", "set", "eth0", "up")
	ipCmd(t, "-n", b.NS, "link", "set", "lo", "up")
	return b
}

// newTestRoute makes namespace provtest-<id> reachable from the host
// through a veth pair: the host's end has host/24, the namespace's end
// (eth0) addr/24 on the same segment. Nothing else is routed there.
func newTestRoute(t *testing.T, host, addr string) testBridge {
	t.Helper()
	requireNetns(t)
	id := randHex(t)[:6]
	b := testBridge{NS: "provtest-" + id, Addr: addr}
	port := "pvr" + id
	t.Cleanup(func() {
		for _, args := range [][]string{{"netns", "del", b.NS}, {"link", "del", port}} {
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil && !gone(out) {
				t.Errorf("cleanup: ip %s: %v: %s", strings.Join(args, " "), err, out)
			}
		}
	})
	ipCmd(t, "netns", "add", b.NS)
	ipCmd(t, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", b.NS)
	ipCmd(t, "addr", "add", host+"/24", "dev", port)
	ipCmd(t, "link", "set", port, "up")
	ipCmd(t, "-n", b.NS, "addr", "add", addr+"/24", "dev", "eth0")
	ipCmd(t, "-n", b.NS, "link", "set", "eth0", "up")
	ipCmd(t, "-n", b.NS, "link", "set", "lo", "up")
	return b
}

// gone reports whether ip said that what it was to delete does not exist.
func gone(out []byte) bool {
	s := string(out)
	return strings.Contains(s, "No such file") || strings.Contains(s, "Cannot find device") || strings.Contains(s, "does not exist")
}

// inNetns runs fn on a thread in namespace ns. Sockets made there stay in
// it afterwards.
func inNetns(ns string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread is not unlocked: it ends with this goroutine instead
		// of going back to Go's pool in another namespace.
		runtime.LockOSThread()
		target, err := os.Open("/run/netns/" + ns)
		if err != nil {
			errc <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("setns %s: %w", ns, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// bannerListener stands for a service: it accepts TCP connections, writes
// its banner line and closes them, and counts them.
type bannerListener struct {
	Addr     string
	accepted atomic.Int64
}

// listenBanner listens on addr (host:port; port 0 picks one) in namespace
// ns ("" for the test's own) until the test ends.
func listenBanner(t *testing.T, ns, addr, banner string) *bannerListener {
	t.Helper()
	var ln net.Listener
	listen := func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	}
	var err error
	if ns == "" {
		err = listen()
	} else {
		err = inNetns(ns, listen)
	}
	if err != nil {
		t.Fatalf("listen on %s in %q: %v", addr, ns, err)
	}
	bl := &bannerListener{Addr: ln.Addr().String()}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			bl.accepted.Add(1)
			_, _ = fmt.Fprintf(c, "%s\r\n", banner)
			_ = c.Close()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	return bl
}

// dialBanner connects from namespace ns to addr and returns the first
// line it reads.
func dialBanner(ns, addr string) (string, error) {
	var line string
	err := inNetns(ns, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		line, err = bufio.NewReader(c).ReadString('\n')
		if errors.Is(err, net.ErrClosed) {
			err = nil
		}
		return err
	})
	return strings.TrimSpace(line), err
}
