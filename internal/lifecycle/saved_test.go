package lifecycle

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// Save and Restore make fakeMachines a host that can save warm machines.
// As libvirt does, a restored machine runs with the definition it was
// saved with: a binding made while it was saved is not in it.
func (f *fakeMachines) Save(_ context.Context, key string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.machines[key]
	switch {
	case !ok:
		return provision.ErrNotFound
	case !m.Warm || m.JobID != "":
		return provision.ErrExists
	case !m.Running:
		return errors.New("it is not running")
	}
	m.Running = false
	if f.saved == nil {
		f.saved = map[string]bool{}
	}
	f.saved[key] = true
	f.saves++
	return nil
}

func (f *fakeMachines) Restore(_ context.Context, key string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.machines[key]
	if !ok {
		return false, provision.ErrNotFound
	}
	if f.restoreErr != nil {
		return false, f.restoreErr
	}
	if m.Running {
		return false, nil
	}
	m.Running, m.JobID = true, "" // the saved definition's
	delete(f.saved, key)
	f.restores++
	return false, nil
}

// fakeClock is a GuestClock that records the times it set.
type fakeClock struct {
	mu   sync.Mutex
	set  map[string][]time.Time
	fail error
}

func (c *fakeClock) SetTime(_ context.Context, domain string, t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fail != nil {
		return c.fail
	}
	if c.set == nil {
		c.set = map[string][]time.Time{}
	}
	c.set[domain] = append(c.set[domain], t)
	return nil
}

func (c *fakeClock) times(domain string) []time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.set[domain])
}

// savedPoolFixture is poolFixture with the pool of debian saved.
func savedPoolFixture(t *testing.T, ready, maxVMs int) (fixture, *fakeAgent, *fakeClock) {
	t.Helper()
	fx, ag := poolFixture(t, ready, maxVMs)
	clk := &fakeClock{}
	fx.m.cfg.Pool.Saved = map[string]bool{"debian": true}
	fx.m.cfg.Pool.Clock = clk
	return fx, ag, clk
}

// TestSavedWarmPool: a saved pool's machines are prepared as a memory
// pool's (the same events), their clock set once, and saved: idle, none
// runs. A job binds one: it is bound while saved, restored, bound again
// as it runs (libvirt restores the definition it was saved with), its
// clock set to the host's, and its runner started with the job's secret
// only then; its events are a warm job's. The pool refills with a saved
// machine, and retires idle saved machines as a memory pool does.
func TestSavedWarmPool(t *testing.T) {
	fx, ag, clk := savedPoolFixture(t, 2, 5)
	poolTick(t, fx.m)
	idle := warmKeys(fx.fm, false)
	if len(idle) != 2 || fx.m.Active() != 2 {
		t.Fatalf("idle warm machines %v, %d counted; want 2", idle, fx.m.Active())
	}
	prep := []messages.State{messages.StateCloning, messages.StateCloned, messages.StateBooting, messages.StateRunning, messages.StateAgentReady}
	for _, key := range idle {
		if got := machineEvents(fx.rec, key); !slices.Equal(got, prep) {
			t.Fatalf("machine %s published %v, want %v", key, got, prep)
		}
		m, _ := fx.fm.machine(key)
		if m.Running || !fx.fm.saved[key] {
			t.Fatalf("idle machine %s of a saved pool: running %v, saved %v", key, m.Running, fx.fm.saved[key])
		}
		if got := clk.times(messages.DomainName(key)); len(got) != 1 {
			t.Fatalf("machine %s's clock was set %d times in its preparation, want once", key, len(got))
		}
	}
	ag.mu.Lock()
	before := len(ag.commands)
	ag.mu.Unlock()
	if before != 0 {
		t.Fatalf("%d guest commands before any job, want none", before)
	}

	fx.clk.Advance(time.Minute)
	if err := fx.m.Provision(context.Background(), forgejoRequest(fx, "s1"), first); err != nil {
		t.Fatal(err)
	}
	evs := eventsOfJob(fx.rec, "s1")
	var states []messages.State
	for _, ev := range evs {
		states = append(states, ev.State)
		if !ev.Warm || !slices.Contains(idle, ev.Machine) {
			t.Fatalf("s1's %s: warm %v machine %q, want a warm machine of %v", ev.State, ev.Warm, ev.Machine, idle)
		}
	}
	if !slices.Equal(states, runnerHappy) {
		t.Fatalf("s1: %v, want %v", states, runnerHappy)
	}
	key := evs[0].Machine
	m, _ := fx.fm.machine(key)
	if !m.Running || m.JobID != "s1" || fx.fm.restores != 1 {
		t.Fatalf("s1's machine %+v after %d restores: want it restored, running and bound", m, fx.fm.restores)
	}
	if got := clk.times(messages.DomainName(key)); len(got) != 2 || !got[1].Equal(fx.clk.Now()) {
		t.Fatalf("s1's machine's clock was set at %v, want at its preparation and at %v", got, fx.clk.Now())
	}
	ag.mu.Lock()
	n := len(ag.commands)
	ag.mu.Unlock()
	if n != 2 {
		t.Fatalf("%d guest commands for a job, want 2 (a preparation and a launch)", n)
	}

	poolTick(t, fx.m)
	now := warmKeys(fx.fm, false)
	if len(now) != 2 || fx.fm.saves != 3 {
		t.Fatalf("after the binding the pool holds %v after %d saves, want 2 after 3", now, fx.fm.saves)
	}
	fx.clk.Advance(time.Hour)
	poolTick(t, fx.m)
	for _, k := range now {
		if _, ok := fx.fm.machine(k); ok {
			t.Fatalf("saved machine %s outlived max_ready_age", k)
		}
		if last := lastMachineEvent(fx.rec, k); last.State != messages.StateTornDown || last.Reason != messages.ReasonMaxReadyAge {
			t.Fatalf("aged saved machine %s ended with %+v", k, last)
		}
	}
}

// TestSavedWarmBindClaimedElsewhereStaysSaved: a job whose claim another
// host holds takes a saved machine and gives it back as it was: not
// restored, still saved, serving the next job.
func TestSavedWarmBindClaimedElsewhereStaysSaved(t *testing.T) {
	h1, h2, _ := twoHosts()
	h1.m.cfg.Agent, h2.m.cfg.Agent = newFakeAgent(), newFakeAgent()
	h1.m.cfg.Pool = &PoolConfig{Machines: h1.fm, Ready: map[string]int{"debian": 1}, Saved: map[string]bool{"debian": true},
		Clock: &fakeClock{}, MaxReadyAge: time.Hour, MaxVMs: 4}
	t.Cleanup(h1.m.Close)
	poolTick(t, h1.m)
	warm := warmKeys(h1.fm, false)
	if len(warm) != 1 {
		t.Fatalf("idle warm machines %v, want 1", warm)
	}
	ctx := context.Background()
	if err := h2.m.Provision(ctx, forgejoRequest(h2, "j1"), Delivery{Attempt: 1, Request: 5}); err != nil {
		t.Fatal(err)
	}
	err := h1.m.Provision(ctx, forgejoRequest(h1, "j1"), Delivery{Attempt: 1, Request: 6})
	if !errors.As(err, new(*Dropped)) {
		t.Fatalf("h1: %v, want dropped", err)
	}
	if m, _ := h1.fm.machine(warm[0]); m.Running || !h1.fm.saved[warm[0]] || h1.fm.restores != 0 {
		t.Fatalf("the machine given back: running %v, saved %v, %d restores; want it saved as it was", m.Running, h1.fm.saved[warm[0]], h1.fm.restores)
	}
	if err := h1.m.Provision(ctx, forgejoRequest(h1, "j2"), first); err != nil {
		t.Fatal(err)
	}
	if ev := h1.rec.last("j2"); ev.State != messages.StateRunnerStarted || ev.Machine != warm[0] {
		t.Fatalf("j2 ended with %+v, want runner_started on %s", ev, warm[0])
	}
}

// TestSavedPoolNeedsGuestSetTime: an image whose guest agent may not set
// the clock cannot serve a saved pool: its machine fails in its
// preparation, saying why, and is removed; no job gets it.
func TestSavedPoolNeedsGuestSetTime(t *testing.T) {
	fx, _, clk := savedPoolFixture(t, 1, 4)
	clk.fail = errors.New("guest-set-time on stretchy-x: the command has been disabled for this instance")
	poolTick(t, fx.m)
	waitFor(t, func() bool { return fx.fm.count() == 0 && fx.m.Active() == 0 })
	var failed *messages.Event
	fx.rec.mu.Lock()
	for _, ev := range fx.rec.events {
		if ev.JobID == "" && ev.State == messages.StateFailed {
			failed = &ev
		}
	}
	fx.rec.mu.Unlock()
	if failed == nil || failed.Error == nil || failed.Error.Code != messages.CodeAgentFailed {
		t.Fatalf("the preparation's failed event %+v, want agent_failed", failed)
	}
	if fx.fm.saves != 0 {
		t.Fatalf("%d saves of a machine whose clock could not be set", fx.fm.saves)
	}
}

// TestSavedMachineRestoreFailure: a saved machine libvirt can neither
// restore nor boot fails its job like a machine that does not boot, and
// is removed with it.
func TestSavedMachineRestoreFailure(t *testing.T) {
	fx, _, _ := savedPoolFixture(t, 1, 4)
	poolTick(t, fx.m)
	fx.m.cfg.Pool.Ready = map[string]int{}
	fx.fm.restoreErr = errors.New("restore stretchy-_warm-x: internal error: process exited while connecting to monitor")
	err := fx.m.Provision(context.Background(), forgejoRequest(fx, "r1"), Delivery{Attempt: 5})
	var f *Failure
	if !errors.As(err, &f) || f.Code != messages.CodeBootFailed {
		t.Fatalf("Provision = %v, want a boot_failed failure", err)
	}
	waitFor(t, func() bool { return fx.fm.count() == 0 && fx.m.Active() == 0 })
}

// TestReconcileSavedWarmMachines: after a restart an idle saved machine
// is retired like an idle running one, and one a job bound while it was
// saved, whose job published nothing yet, is removed as half-built (the
// request comes again); the new process's saved pool is built anew.
func TestReconcileSavedWarmMachines(t *testing.T) {
	fx, ag, clk := savedPoolFixture(t, 2, 6)
	poolTick(t, fx.m)
	idle := warmKeys(fx.fm, false)
	if len(idle) != 2 {
		t.Fatalf("idle saved machines %v, want 2", idle)
	}
	// A binding recorded while saved, by a process that died then.
	if _, err := fx.fm.Bind(context.Background(), idle[1], provision.Binding{JobID: "cut"}); err != nil {
		t.Fatal(err)
	}
	m2 := New(Config{Host: "h1", Machines: fx.fm, Events: fx.rec, History: fx.rec, Agent: ag, Now: fx.clk.Now,
		Pool: &PoolConfig{Machines: fx.fm, Ready: map[string]int{"debian": 2}, Saved: map[string]bool{"debian": true}, Clock: clk, MaxVMs: 6}})
	defer m2.Close()
	if err := m2.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	tickAll(t, m2)
	for _, key := range idle {
		if _, ok := fx.fm.machine(key); ok {
			t.Fatalf("saved machine %s is still there after the restart", key)
		}
	}
	if last := lastMachineEvent(fx.rec, idle[0]); last.Reason != messages.ReasonReconcile {
		t.Fatalf("the idle saved machine ended with %+v, want retired for reconcile", last)
	}
	if evs := eventsOfJob(fx.rec, "cut"); len(evs) != 0 {
		t.Fatalf("the half-bound job has events %v", evs)
	}
	poolTick(t, m2)
	if got := warmKeys(fx.fm, false); len(got) != 2 {
		t.Fatalf("the new process's pool holds %v, want 2", got)
	}
	for _, key := range warmKeys(fx.fm, false) {
		if m, _ := fx.fm.machine(key); m.Running {
			t.Fatalf("the new pool's machine %s runs, want it saved", key)
		}
	}
}
