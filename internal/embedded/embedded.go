// Package embedded runs a NATS server with JetStream inside the worker's
// process, for a zero-setup single host and for tests, and keeps the
// credentials of its one user (credentials.go). Production fleets point
// every worker at a shared NATS cluster instead.
package embedded

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
)

// Options configure the embedded server.
type Options struct {
	// StoreDir holds JetStream's files.
	StoreDir string
	// Host is the listen address; default 127.0.0.1 (loopback only).
	Host string
	// Port is the client port; 0 means 4222, -1 a random free port.
	Port int
	// NKey is the public key of the server's only user
	// (Credentials.PublicKey): every client must sign the server's nonce
	// with its seed, and one that cannot is refused; there is no user
	// without credentials. worker run always sets it, as anything that
	// can open a TCP connection to the host's loopback can reach the
	// server, its guests through user-mode networking included. Empty
	// starts a server without authentication, for tests.
	NKey string
	// Cluster, when set, makes the server a node of a JetStream cluster,
	// for tests of a fleet on one machine.
	Cluster *Cluster
}

// Cluster places a server in a cluster of servers on loopback.
type Cluster struct {
	// Name is the cluster's name, the same for every node.
	Name string
	// Node names this server; it must be unique in the cluster.
	Node string
	// Port is this node's route port.
	Port int
	// Routes are the route URLs of every node (nats-route://host:port),
	// this one's included.
	Routes []string
}

// Start starts a JetStream-enabled server and waits until it accepts
// connections. The caller shuts it down with Shutdown and WaitForShutdown.
func Start(opts Options) (*server.Server, error) {
	if opts.StoreDir == "" {
		return nil, errors.New("start embedded nats: no store directory")
	}
	if opts.Host == "" {
		opts.Host = "127.0.0.1"
	}
	if opts.Port == 0 {
		opts.Port = 4222
	}
	if opts.NKey != "" && !nkeys.IsValidPublicUserKey(opts.NKey) {
		return nil, errors.New("start embedded nats: the user's key is not a public user nkey (U...)")
	}
	so := &server.Options{
		ServerName: "stretchy-embedded",
		Host:       opts.Host,
		Port:       opts.Port,
		JetStream:  true,
		StoreDir:   opts.StoreDir,
		NoSigs:     true,
		MaxPayload: 1 << 20,
	}
	if opts.NKey != "" {
		// No NoAuthUser: a client without credentials is refused.
		so.Nkeys = []*server.NkeyUser{{Nkey: opts.NKey}}
	}
	if c := opts.Cluster; c != nil {
		so.ServerName = c.Node
		so.Cluster = server.ClusterOpts{Name: c.Name, Host: opts.Host, Port: c.Port}
		for _, r := range c.Routes {
			u, err := url.Parse(r)
			if err != nil {
				return nil, fmt.Errorf("start embedded nats: route %q: %w", r, err)
			}
			so.Routes = append(so.Routes, u)
		}
	}
	s, err := server.NewServer(so)
	if err != nil {
		return nil, fmt.Errorf("start embedded nats: %w", err)
	}
	var fatal fatals
	s.SetLogger(&fatal, false, false)
	// Start listens for clients before it returns, so a port in use is
	// known now; a route's listener may fail later.
	s.Start()
	if err := fatal.first(); err != nil {
		s.Shutdown()
		return nil, fmt.Errorf("start embedded nats: %w", err)
	}
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		if err := fatal.first(); err != nil {
			return nil, fmt.Errorf("start embedded nats: %w", err)
		}
		return nil, fmt.Errorf("start embedded nats on %s:%d: not ready after 10s", opts.Host, opts.Port)
	}
	return s, nil
}

// fatals is the server's logger: it keeps the first fatal error and drops
// the rest, as the embedded server always has. A nats-server's own logger
// exits the process on a fatal error (a port in use, JetStream that
// cannot start); embedded, it is Start's error.
type fatals struct {
	mu  sync.Mutex
	err error
}

func (f *fatals) Fatalf(format string, v ...any) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err != nil {
		return
	}
	// A listener's error names the address and keeps its cause
	// (errors.Is(err, syscall.EADDRINUSE)).
	for _, a := range v {
		var op *net.OpError
		if err, ok := a.(error); ok && errors.As(err, &op) {
			f.err = err
			return
		}
	}
	f.err = fmt.Errorf(format, v...)
}

func (f *fatals) first() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

func (*fatals) Noticef(string, ...any) {}
func (*fatals) Warnf(string, ...any)   {}
func (*fatals) Errorf(string, ...any)  {}
func (*fatals) Debugf(string, ...any)  {}
func (*fatals) Tracef(string, ...any)  {}
