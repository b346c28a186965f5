package soak

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Cluster is a JetStream cluster of nats-server processes on loopback,
// each with its own store, so that the soak can kill any of them.
type Cluster struct {
	Nodes []*Node
	// Sync is the nodes' jetstream sync_interval: "" for the server's
	// default (2 minutes), "always", or a duration.
	Sync string
}

// Node is one nats-server of a Cluster.
type Node struct {
	Name       string
	ClientPort int
	RoutePort  int
	proc       *proc
}

// URL is the node's client URL.
func (n *Node) URL() string { return fmt.Sprintf("nats://127.0.0.1:%d", n.ClientPort) }

// freePorts returns n ports nothing listens on now.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// StartCluster writes the configuration of size nodes under dir and
// starts them with the nats-server binary bin.
func StartCluster(ctx context.Context, bin, dir string, size int, sync string) (*Cluster, error) {
	ports, err := freePorts(2 * size)
	if err != nil {
		return nil, err
	}
	c := &Cluster{Sync: sync}
	var routes []string
	for i := range size {
		n := &Node{Name: fmt.Sprintf("n%d", i+1), ClientPort: ports[2*i], RoutePort: ports[2*i+1]}
		c.Nodes = append(c.Nodes, n)
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", n.RoutePort))
	}
	for _, n := range c.Nodes {
		store := filepath.Join(dir, n.Name)
		if err := os.MkdirAll(store, 0o755); err != nil {
			return nil, err
		}
		js := fmt.Sprintf("store_dir: %q, max_file_store: 8G, max_memory_store: 256M", store)
		if sync != "" {
			js += ", sync_interval: " + sync
		}
		conf := fmt.Sprintf(`server_name: %s
listen: 127.0.0.1:%d
max_payload: 1MB
jetstream { %s }
cluster {
  name: soak
  listen: 127.0.0.1:%d
  routes: [%s]
}
`, n.Name, n.ClientPort, js, n.RoutePort, strings.Join(routes, ", "))
		path := filepath.Join(dir, n.Name+".conf")
		if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
			return nil, err
		}
		n.proc = &proc{name: "nats " + n.Name, log: filepath.Join(dir, n.Name+".log"),
			command: func() *exec.Cmd { return exec.Command(bin, "-c", path) }}
		if err := n.proc.start(); err != nil {
			c.Stop()
			return nil, err
		}
	}
	if err := c.WaitReady(ctx, 2*time.Minute); err != nil {
		c.Stop()
		return nil, err
	}
	return c, nil
}

// URLs are the client URLs of every node, comma separated.
func (c *Cluster) URLs() string {
	var us []string
	for _, n := range c.Nodes {
		us = append(us, n.URL())
	}
	return strings.Join(us, ",")
}

// Kill kills the nodes with SIGKILL: what they had not written is lost.
func (c *Cluster) Kill(nodes ...*Node) error {
	for _, n := range nodes {
		if err := n.proc.kill(); err != nil {
			return err
		}
	}
	return nil
}

// Restart starts killed nodes again.
func (c *Cluster) Restart(nodes ...*Node) error {
	for _, n := range nodes {
		if err := n.proc.start(); err != nil {
			return err
		}
	}
	return nil
}

// Stop ends every node.
func (c *Cluster) Stop() {
	for _, n := range c.Nodes {
		_ = n.proc.terminate(10 * time.Second)
	}
}

// WaitReady waits until the cluster has a JetStream meta leader and every
// node is up, so that streams can be created and read.
func (c *Cluster) WaitReady(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		if last = c.ready(ctx); last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("nats cluster not ready after %s: %w", timeout, last)
		case <-t.C:
		}
	}
}

func (c *Cluster) ready(ctx context.Context) error {
	for _, n := range c.Nodes {
		nc, err := nats.Connect(n.URL(), nats.Timeout(time.Second), nats.NoReconnect())
		if err != nil {
			return fmt.Errorf("node %s: %w", n.Name, err)
		}
		js, err := jetstream.New(nc)
		if err == nil {
			actx, cancel := context.WithTimeout(ctx, 2*time.Second)
			_, err = js.AccountInfo(actx)
			cancel()
		}
		nc.Close()
		if err != nil {
			return fmt.Errorf("node %s: jetstream: %w", n.Name, err)
		}
	}
	return nil
}
