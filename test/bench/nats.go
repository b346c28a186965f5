package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
)

// ServeNATSCommand is the argument that makes the bench binary serve
// NATS (ServeNATS) instead of measuring.
const ServeNATSCommand = "serve-nats"

// ServeNATS runs the worker's embedded NATS server with JetStream, storing
// into dir on a free loopback port, prints its URL on a line of its own
// and serves until SIGTERM or SIGINT. The harness runs it in a process of
// its own (StartNATS), so that the server's CPU and memory are neither in
// the profiles of an in-process worker nor in a worker's RSS.
func ServeNATS(dir string) error {
	srv, err := embedded.Start(embedded.Options{StoreDir: dir, Port: -1})
	if err != nil {
		return err
	}
	fmt.Println(srv.ClientURL())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	<-sigs
	srv.Shutdown()
	srv.WaitForShutdown()
	return nil
}

// NATS is a NATS server process of the harness and a client of it.
type NATS struct {
	URL string
	NC  *nats.Conn
	JS  jetstream.JetStream
	cmd *exec.Cmd
}

// StartNATS starts the bench binary (self) as a NATS server storing into
// dir, which it empties first, and connects to it.
func StartNATS(ctx context.Context, self, dir string) (*NATS, error) {
	if err := os.RemoveAll(dir); err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, self, ServeNATSCommand, dir)
	cmd.Stderr = os.Stderr
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 10 * time.Second
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start nats server: %w", err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("start nats server: %w", err)
	}
	n := &NATS{URL: strings.TrimSpace(line), cmd: cmd}
	if n.NC, err = nats.Connect(n.URL, nats.Name("stretchy bench")); err != nil {
		n.Stop()
		return nil, fmt.Errorf("connect to nats: %w", err)
	}
	if n.JS, err = jetstream.New(n.NC); err != nil {
		n.Stop()
		return nil, err
	}
	return n, nil
}

// Pid is the server process's id.
func (n *NATS) Pid() int { return n.cmd.Process.Pid }

// Stop closes the client and stops the server.
func (n *NATS) Stop() {
	if n.NC != nil {
		n.NC.Close()
	}
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	if err := n.cmd.Wait(); err != nil && !errors.Is(err, context.Canceled) {
		var exit *exec.ExitError
		if !errors.As(err, &exit) {
			fmt.Fprintf(os.Stderr, "nats server: %v\n", err)
		}
	}
}
