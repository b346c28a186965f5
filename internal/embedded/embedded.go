// Package embedded runs a NATS server with JetStream inside the worker's
// process, for a zero-setup single host and for tests. Production fleets
// point every worker at a shared NATS cluster instead.
package embedded

import (
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Options configure the embedded server.
type Options struct {
	// StoreDir holds JetStream's files.
	StoreDir string
	// Host is the listen address; default 127.0.0.1 (loopback only).
	Host string
	// Port is the client port; 0 means 4222, -1 a random free port.
	Port int
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
	so := &server.Options{
		ServerName: "stretchy-embedded",
		Host:       opts.Host,
		Port:       opts.Port,
		JetStream:  true,
		StoreDir:   opts.StoreDir,
		NoSigs:     true,
		MaxPayload: 1 << 20,
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
	s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		return nil, fmt.Errorf("start embedded nats on %s:%d: not ready after 10s", opts.Host, opts.Port)
	}
	return s, nil
}
