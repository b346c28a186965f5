package qga

import (
	"context"
	"encoding/json"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// stuckConn answers like a guest whose agent runs a long program, except
// for the first call of one kind, which blocks until release is closed and
// then answers successfully: an answer that comes after the Caller gave up, which no
// real connection produces on demand (a Link's reset fails the call).
type stuckConn struct {
	dom libvirt.Domain
	// stuck is "lookup" or the agent command that blocks.
	stuck   string
	release chan struct{}
	// entered and finished are closed when the blocking call begins and
	// when it has answered.
	entered, finished chan struct{}
	blocked           atomic.Bool

	subscribed atomic.Bool
}

func (c *stuckConn) DomainLookupByName(name string) (libvirt.Domain, error) {
	if c.stuck == "lookup" && c.first() {
		defer c.block()()
	}
	return c.dom, nil
}

func (c *stuckConn) QEMUDomainAgentCommand(dom libvirt.Domain, cmd string, timeout int32, flags uint32) (libvirt.OptString, error) {
	var r struct {
		Execute string `json:"execute"`
	}
	if err := json.Unmarshal([]byte(cmd), &r); err != nil {
		return nil, err
	}
	if r.Execute == c.stuck && c.first() {
		defer c.block()()
	}
	switch r.Execute {
	case "guest-exec":
		return libvirt.OptString{`{"return":{"pid":42}}`}, nil
	case "guest-exec-status":
		return libvirt.OptString{`{"return":{"exited":false}}`}, nil
	}
	return libvirt.OptString{`{"return":{}}`}, nil
}

func (c *stuckConn) SubscribeEvents(ctx context.Context, id libvirt.DomainEventID, dom libvirt.OptDomain) (<-chan any, error) {
	c.subscribed.Store(true)
	return nil, errors.New("not expected with a Caller")
}

// first reports whether this is the first call of the stuck kind: only
// that one blocks.
func (c *stuckConn) first() bool { return c.blocked.CompareAndSwap(false, true) }

// block waits for release and returns the function that reports the
// answer given, for the call to defer.
func (c *stuckConn) block() func() {
	close(c.entered)
	<-c.release
	return func() { close(c.finished) }
}

// TestCallsGiveUpWhenTheCallerDoes checks that every method returns the
// Caller's timeout once a call takes longer than its bound, without
// waiting for the call, and that its late answer changes nothing (go test
// -race watches the results it stores). The Caller is provision's own
// bounded caller, a Link without a connection.
func TestCallsGiveUpWhenTheCallerDoes(t *testing.T) {
	const margin = 100 * time.Millisecond
	agentBound := time.Second + margin // libvirt's agent timeout is whole seconds
	run := ExecRequest{Path: "/bin/sleep", Args: []string{"60"}}
	tests := []struct {
		name  string
		stuck string
		bound time.Duration
		call  func(ctx context.Context, a *Agent) error
	}{
		{"WaitReady, guest-ping", "guest-ping", agentBound, func(ctx context.Context, a *Agent) error { return a.WaitReady(ctx, "stretchy-fake") }},
		{"WaitReady, lookup", "lookup", margin, func(ctx context.Context, a *Agent) error { return a.WaitReady(ctx, "stretchy-fake") }},
		{"Info, guest-info", "guest-info", agentBound, func(ctx context.Context, a *Agent) error { _, err := a.Info(ctx, "stretchy-fake"); return err }},
		{"Start, guest-exec", "guest-exec", agentBound, func(ctx context.Context, a *Agent) error { _, err := a.Start(ctx, "stretchy-fake", run); return err }},
		{"Run, guest-exec-status", "guest-exec-status", agentBound, func(ctx context.Context, a *Agent) error { _, err := a.Run(ctx, "stretchy-fake", run); return err }},
		{"Status, guest-exec-status", "guest-exec-status", agentBound, func(ctx context.Context, a *Agent) error { _, err := a.Status(ctx, "stretchy-fake", 42); return err }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := &stuckConn{dom: libvirt.Domain{Name: "stretchy-fake", UUID: libvirt.UUID{1}}, stuck: tt.stuck,
				release: make(chan struct{}), entered: make(chan struct{}), finished: make(chan struct{})}
			var link *provision.Link // bounded calls, nothing to reset
			a := New(c, Options{Caller: link, PingTimeout: time.Second, CallTimeout: time.Second, Margin: margin})
			ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
			defer cancel()

			begin := time.Now()
			done := make(chan error, 1)
			go func() { done <- tt.call(ctx, a) }()
			var err error
			select {
			case err = <-done:
			case <-time.After(tt.bound + 30*time.Second):
				close(c.release)
				t.Fatalf("no return within %v; once the call answered: %v", time.Since(begin), <-done)
			}
			took := time.Since(begin)
			// The blocked call answers now, after the method returned.
			<-c.entered
			close(c.release)
			<-c.finished

			if !errors.Is(err, provision.ErrTimeout) || !provision.IsUnavailable(err) {
				t.Errorf("error %v; want provision.ErrTimeout, which provision.IsUnavailable reports", err)
			}
			if errors.Is(err, ErrAgentTimeout) || errors.Is(err, ErrRunTimeout) {
				t.Errorf("error %v blames the guest; the call hung", err)
			}
			if took < tt.bound || took > tt.bound+30*time.Second {
				t.Errorf("returned after %v, want the bound of %v", took, tt.bound)
			}
			if c.subscribed.Load() {
				t.Error("subscribed to events through a Caller; WaitReady polls then")
			}
		})
	}
}
