package embedded

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
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

// TestStartRequiresCredentials: a server with a user nkey refuses every
// client that cannot sign with its seed, whatever else it presents, and
// serves JetStream to one that can. Without NKey (tests only) the same
// client without credentials is served: the refusal is the key's doing.
func TestStartRequiresCredentials(t *testing.T) {
	creds, err := EnsureCredentials(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	srv := startTest(t, Options{StoreDir: t.TempDir(), Port: -1, NKey: creds.PublicKey()})
	open := startTest(t, Options{StoreDir: t.TempDir(), Port: -1})
	stranger, _ := nkeys.CreateUser()
	strangerPub, _ := stranger.PublicKey()
	tests := []struct {
		name    string
		srv     *server.Server
		opts    []nats.Option
		refused bool
	}{
		{"no credentials", srv, nil, true},
		{"another user nkey", srv, []nats.Option{nats.Nkey(strangerPub, stranger.Sign)}, true},
		{"the public key without its seed", srv, []nats.Option{nats.Nkey(creds.PublicKey(), stranger.Sign)}, true},
		{"a token", srv, []nats.Option{nats.Token("token")}, true},
		{"a user and password", srv, []nats.Option{nats.UserInfo("stretchy", "stretchy")}, true},
		{"the credentials", srv, []nats.Option{nats.Nkey(creds.PublicKey(), creds.Sign)}, false},
		{"no credentials, a server without NKey", open, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			nc, err := nats.Connect(tt.srv.ClientURL(), append(tt.opts, nats.MaxReconnects(0))...)
			if tt.refused {
				if err == nil {
					nc.Close()
					t.Fatal("connected")
				}
				if !errors.Is(err, nats.ErrAuthorization) {
					t.Fatalf("refused with %v, want an authorization violation", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer nc.Close()
			js, err := jetstream.New(nc)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if _, err := js.AccountInfo(ctx); err != nil {
				t.Fatalf("JetStream: %v", err)
			}
		})
	}

	// What any process on the host, or a guest through user-mode
	// networking, sees before it authenticates.
	conn, err := net.Dial("tcp", srv.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	var info struct {
		AuthRequired bool   `json:"auth_required"`
		Nonce        string `json:"nonce"`
	}
	if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "INFO ")), &info); err != nil {
		t.Fatalf("INFO %q: %v", line, err)
	}
	if !info.AuthRequired || info.Nonce == "" {
		t.Fatalf("INFO %s: want auth_required and a nonce", line)
	}
}

func TestStartRefusesABadKey(t *testing.T) {
	kp, _ := nkeys.CreateAccount()
	pub, _ := kp.PublicKey()
	srv, err := Start(Options{StoreDir: t.TempDir(), Port: -1, NKey: pub})
	if err == nil {
		srv.Shutdown()
		t.Fatal("started with an account key as its user's")
	}
}

func startTest(t *testing.T, opts Options) *server.Server {
	t.Helper()
	srv, err := Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	return srv
}
