package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// A build's outcome (failure, rollback, success) is decided only while the
// host holds the job's claim: a host that stalled inside a step, after its
// last confirmation, and lost the job meanwhile ends the build with
// dropped, whatever the step's error, never with a terminal event of its
// own (docs/protocol.md 2.4, 5.2 R).
func TestStalledStepEndsInDropped(t *testing.T) {
	for _, c := range []struct {
		name string
		// stall makes h1's build stop inside a step until the returned
		// function is called, which lets the step fail as it would after
		// the stall.
		stall func(h1 fixture, ag *fakeAgent) (resume func())
		// h1 is what h1 publishes of the job.
		h1 []messages.State
	}{{
		// The other host removed h1's machine (two workers on one
		// libvirtd): h1's start finds no domain to start.
		name: "machine removed by the other host",
		stall: func(h1 fixture, _ *fakeAgent) func() {
			h1.fm.startGate = make(chan struct{})
			return func() {
				h1.fm.mu.Lock()
				h1.fm.startErr = fmt.Errorf("start %s: %w", messages.DomainName("j1"), provision.ErrNotFound)
				h1.fm.mu.Unlock()
				close(h1.fm.startGate)
			}
		},
		h1: []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateCloned, messages.StateBooting,
			messages.StateDropped},
	}, {
		// h1's own step times out: its guest agent wait ran past the boot
		// timeout while h1 was stopped.
		name: "own step timed out",
		stall: func(_ fixture, ag *fakeAgent) func() {
			ag.readyGate = make(chan struct{})
			return func() {
				ag.mu.Lock()
				ag.readyErr = fmt.Errorf("wait for guest agent: %w: %w", qga.ErrAgentTimeout, context.DeadlineExceeded)
				ag.mu.Unlock()
				close(ag.readyGate)
			}
		},
		h1: []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateCloned, messages.StateBooting,
			messages.StateRunning, messages.StateDropped},
	}} {
		t.Run(c.name, func(t *testing.T) {
			h1, h2, store := twoHosts()
			ag := newFakeAgent()
			h1.m.cfg.Agent, h2.m.cfg.Agent = ag, newFakeAgent()
			resume := c.stall(h1, ag)
			ctx := context.Background()
			req := h1.request("j1", "debian")
			errc := make(chan error, 1)
			go func() { errc <- h1.m.Provision(ctx, req, Delivery{Attempt: 1, Request: 4}) }()
			// h1 stalls inside the step, after the claim was confirmed.
			waitFor(t, func() bool { return h1.fm.waitingStart() || ag.waitingReady() })

			h1.clk.Advance(testClaimTTL + time.Second)
			if err := h2.m.Provision(ctx, h2.request("j1", "debian"), Delivery{Attempt: 2, Request: 4}); err != nil {
				t.Fatalf("h2 after h1's claim lapsed: %v", err)
			}
			resume()
			err := <-errc
			var dropped *Dropped
			if !errors.As(err, &dropped) || !dropped.Leave || dropped.Holder != "h2" || dropped.Reason != messages.ReasonClaimLost {
				t.Fatalf("h1: %v (%+v), want a dropped claim_lost left to h2", err, dropped)
			}
			if got := eventsOf(h1.rec, "j1", "h1"); !slices.Equal(got, c.h1) {
				t.Fatalf("h1 published %v, want %v", got, c.h1)
			}
			if last := h1.rec.last("j1"); last.State != messages.StateDropped || last.Holder != "h2" {
				t.Fatalf("the job's last event is %+v, want h1's dropped naming h2", last)
			}
			if h1.fm.count() != 0 || h1.m.Active() != 0 {
				t.Fatalf("h1 kept %d machines, tracks %d", h1.fm.count(), h1.m.Active())
			}
			if store.holder("j1") != "h2" || h2.fm.count() != 1 {
				t.Fatalf("claim held by %q, h2 has %d machines", store.holder("j1"), h2.fm.count())
			}
		})
	}
}

// A build that fails while the claim cannot be confirmed (the claims
// bucket does not answer) publishes no outcome: the job may be another
// host's by now. What it built is removed and the request comes again.
func TestFailureWithUnconfirmedClaimIsTransient(t *testing.T) {
	h1, _, _ := twoHosts()
	claims := &failingClaims{Claims: h1.m.cfg.Claims}
	h1.m.cfg.Claims = claims
	h1.fm.startGate = make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		errc <- h1.m.Provision(context.Background(), h1.request("j1", "debian"), Delivery{Attempt: 1, Request: 4, Final: true})
	}()
	waitFor(t, h1.fm.waitingStart)
	h1.clk.Advance(testClaimTTL / 2) // the claim needs a renewal before anything is decided
	claims.fail(errors.New("nats: timeout"))
	h1.fm.mu.Lock()
	h1.fm.startErr = errors.New("qemu died")
	h1.fm.mu.Unlock()
	close(h1.fm.startGate)
	err := <-errc
	var f *Failure
	if err == nil || errors.As(err, &f) {
		t.Fatalf("Provision = %v, want a transient error", err)
	}
	want := []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateCloned, messages.StateBooting}
	if got := h1.rec.states("j1"); !slices.Equal(got, want) {
		t.Fatalf("events %v, want %v (no outcome)", got, want)
	}
	if h1.fm.count() != 0 || h1.m.Active() != 0 {
		t.Fatalf("kept %d machines, tracks %d", h1.fm.count(), h1.m.Active())
	}
}

// failingClaims is a Claims whose renewals fail once fail was called.
type failingClaims struct {
	Claims
	mu  sync.Mutex
	err error
}

func (c *failingClaims) fail(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.err = err
}

func (c *failingClaims) Keep(ctx context.Context, jobID string, request, rev uint64) (uint64, messages.Claim, error) {
	c.mu.Lock()
	err := c.err
	c.mu.Unlock()
	if err != nil {
		return 0, messages.Claim{}, err
	}
	return c.Claims.Keep(ctx, jobID, request, rev)
}

// TestActorSleepsAfterCallerLeft: once a build's caller is gone (the
// worker stops), the actor cancels the build once and then waits for it
// to end, instead of taking the closed channel again and again.
func TestActorSleepsAfterCallerLeft(t *testing.T) {
	fx := newFixture()
	fx.fm.startGate = make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- fx.m.Provision(ctx, fx.request("j1", "debian"), first) }()
	waitFor(t, fx.fm.waitingStart)
	a, _, _, _ := fx.m.lookup("j1", spawnNever)
	before := a.wakeups.Load()
	cancel()
	waitFor(t, func() bool { return a.wakeups.Load() > before })
	// The build ignores its context while Start waits: the actor has
	// nothing to do until it returns.
	settled := a.wakeups.Load()
	time.Sleep(100 * time.Millisecond)
	if n := a.wakeups.Load() - settled; n > 3 {
		t.Fatalf("the actor woke %d times in 100ms while its build could not end", n)
	}
	close(fx.fm.startGate)
	if err := <-errc; err == nil {
		t.Fatal("a build whose caller left returned nil")
	}
}
