// Package embedded runs a NATS server with JetStream inside the worker's
// process, for a zero-setup single host and for tests. Production fleets
// point every worker at a shared NATS cluster instead.
package embedded

import (
	"errors"
	"fmt"
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
	s, err := server.NewServer(&server.Options{
		ServerName: "stretchy-embedded",
		Host:       opts.Host,
		Port:       opts.Port,
		JetStream:  true,
		StoreDir:   opts.StoreDir,
		NoSigs:     true,
		MaxPayload: 1 << 20,
	})
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
