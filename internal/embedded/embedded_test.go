package embedded

import (
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"
)

// TestStartPortInUse: a client port another process listens on is
// reported at once, naming the address, not as a server that is slow to
// become ready.
func TestStartPortInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	addr := ln.Addr().(*net.TCPAddr)
	srv, err := Start(Options{StoreDir: t.TempDir(), Port: addr.Port})
	if err == nil {
		srv.Shutdown()
		t.Fatal("started on a port in use")
	}
	if !errors.Is(err, syscall.EADDRINUSE) || !strings.Contains(err.Error(), addr.String()) {
		t.Errorf("error %q does not say that %s is in use", err, addr)
	}
}

// TestStart: the server accepts connections once Start returns.
func TestStart(t *testing.T) {
	srv, err := Start(Options{StoreDir: t.TempDir(), Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	conn, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
}
