package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// TestUnremovedWarmBindStaysTracked: a job binds a warm machine, the runner
// starts, and both runner_started's publish and the rollback's removal
// fail. The machine (which has the job's secret) is not forgotten: it
// still counts against the host's capacity, a redelivery of the job builds
// no second machine while it exists, and it is removed at a later tick;
// then the job is built anew.
func TestUnremovedWarmBindStaysTracked(t *testing.T) {
	fx, _ := poolFixture(t, 1, 4)
	poolTick(t, fx.m)
	warm := warmKeys(fx.fm, false)
	if len(warm) != 1 {
		t.Fatalf("idle warm machines %v, want 1", warm)
	}
	fx.m.cfg.Pool.Ready = map[string]int{} // no refills: one machine to follow
	fx.rec.failOn(messages.StateRunnerStarted, errors.New("nats: timeout"))
	fx.fm.failRemoves(errors.New("libvirt: connection reset"))

	ctx := context.Background()
	req := forgejoRequest(fx, "j1")
	if err := fx.m.Provision(ctx, req, first); err == nil || errors.As(err, new(*Failure)) {
		t.Fatalf("Provision = %v, want a transient error", err)
	}
	if _, ok := fx.fm.machine(warm[0]); !ok {
		t.Fatal("the fake removed the machine")
	}
	if fx.m.Active() != 1 {
		t.Fatalf("Active = %d while the bound machine %s still runs, want 1", fx.m.Active(), warm[0])
	}
	fx.rec.failOn("", nil)
	if err := fx.m.Provision(ctx, req, Delivery{Attempt: 2}); err == nil {
		t.Fatal("a redelivery was served while the earlier delivery's machine still exists")
	}
	if n := fx.fm.count(); n != 1 || fx.fm.clones != 1 {
		t.Fatalf("%d machines, %d clones: a second machine was built for the job", n, fx.fm.clones)
	}

	fx.fm.failRemoves(nil)
	fx.clk.Advance(removingRetry)
	tickAll(t, fx.m)
	waitFor(t, func() bool { return fx.fm.count() == 0 && fx.m.Active() == 0 })
	if err := fx.m.Provision(ctx, req, Delivery{Attempt: 3}); err != nil {
		t.Fatalf("delivery 3 after the removal: %v", err)
	}
	if last := fx.rec.last("j1"); last.State != messages.StateRunnerStarted || last.Warm {
		t.Fatalf("delivery 3 ended with %+v, want a cold runner_started", last)
	}
}

// TestWarmBindClaimedElsewhereReturnsMachine: a job another host holds
// takes an idle warm machine from the pool, finds the claim held and is
// dropped; the machine, to which nothing of the job reached, goes back to
// the pool and serves the next job.
func TestWarmBindClaimedElsewhereReturnsMachine(t *testing.T) {
	h1, h2, _ := twoHosts()
	ag := newFakeAgent()
	h1.m.cfg.Agent, h2.m.cfg.Agent = ag, newFakeAgent()
	h1.m.cfg.Pool = &PoolConfig{Machines: h1.fm, Ready: map[string]int{"debian": 1}, MaxReadyAge: time.Hour, MaxVMs: 4}
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
	var dropped *Dropped
	if !errors.As(err, &dropped) || dropped.Holder != "h2" {
		t.Fatalf("h1: %v, want dropped for h2", err)
	}
	if idle, _ := h1.m.Pools(); idle["debian"] != 1 {
		t.Fatalf("h1's pool has %v idle, want the machine back", idle)
	}
	if got := warmKeys(h1.fm, false); !slices.Equal(got, warm) || h1.m.Active() != 1 {
		t.Fatalf("idle warm machines %v (%d counted), want %v", got, h1.m.Active(), warm)
	}
	if err := h1.m.Provision(ctx, forgejoRequest(h1, "j2"), first); err != nil {
		t.Fatal(err)
	}
	if ev := h1.rec.last("j2"); ev.State != messages.StateRunnerStarted || ev.Machine != warm[0] {
		t.Fatalf("j2 ended with %+v, want runner_started on %s", ev, warm[0])
	}
	if h1.fm.clones != 1 {
		t.Fatalf("h1 cloned %d machines, want the warm one only", h1.fm.clones)
	}
}

// TestWarmBindFailureRetiresMachine: a warm machine whose binding libvirt
// refused (its metadata is not known) is retired, with its own events
// naming why, not handed to another job; the job's request comes again.
func TestWarmBindFailureRetiresMachine(t *testing.T) {
	fx, _ := poolFixture(t, 1, 4)
	poolTick(t, fx.m)
	warm := warmKeys(fx.fm, false)
	fx.m.cfg.Pool.Ready = map[string]int{}
	fx.fm.bindErr = fmt.Errorf("set metadata: %w", errors.New("libvirt: operation failed"))
	err := fx.m.Provision(context.Background(), forgejoRequest(fx, "j1"), first)
	if err == nil || errors.As(err, new(*Failure)) {
		t.Fatalf("Provision = %v, want a transient error", err)
	}
	waitFor(t, func() bool { return fx.fm.count() == 0 && fx.m.Active() == 0 })
	last := lastMachineEvent(fx.rec, warm[0])
	if last.State != messages.StateTornDown || last.Reason != messages.ReasonBindFailed {
		t.Fatalf("the machine's last event %+v, want torn_down with reason %s", last, messages.ReasonBindFailed)
	}
	if got := fx.rec.states("j1"); len(got) != 0 {
		t.Fatalf("job j1 has events %v before anything of it was built", got)
	}
}

// bindWarm puts a warm machine bound to jobID on the fake host, as an
// earlier process of host h1 left it, with the job's events up to
// runner_started naming it.
func bindWarm(fx fixture, key, jobID string) {
	fx.fm.mu.Lock()
	fx.fm.machines[key] = &provision.Machine{Name: messages.DomainName(key), Key: key, JobID: jobID, Warm: true,
		Image: "debian", Host: "h1", Running: true, RunnerKind: string(messages.RunnerForgejo), VCPUs: 2, MemoryMiB: 512}
	fx.fm.mu.Unlock()
	for i, st := range runnerHappy {
		_ = fx.rec.Publish(context.Background(), messages.Event{V: 1, JobID: jobID, Host: "h1", Image: "debian",
			Domain: messages.DomainName(key), Machine: key, Warm: true, State: st, Seq: uint64(i + 1), Attempt: 1, RunnerPID: 7},
			fmt.Sprintf("%s:%s:1", jobID, st))
	}
}

// TestReconcileRemovesSecondMachineOfJob: a warm machine bound to a job
// whose actor tracks another machine (the job was built again after an
// earlier process lost track of the warm one) is removed by
// reconciliation, and the tracked machine is left alone.
func TestReconcileRemovesSecondMachineOfJob(t *testing.T) {
	fx, _ := newAgentFixture()
	ctx := context.Background()
	if err := fx.m.Provision(ctx, forgejoRequest(fx, "j1"), first); err != nil {
		t.Fatal(err)
	}
	const key = "_warm-0123456789ab"
	bindWarm(fx, key, "j1")
	if err := fx.m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := fx.fm.machine(key); ok {
		t.Fatalf("the second machine %s of job j1 is still there", key)
	}
	if m, ok := fx.fm.machine("j1"); !ok || !m.Running {
		t.Fatal("the tracked machine of j1 was touched")
	}
	if fx.m.Active() != 1 {
		t.Fatalf("Active = %d, want 1", fx.m.Active())
	}
}

// TestTeardownFindsUntrackedWarmMachine: a teardown of a warm-bound job
// whose machine this process does not track (its adoption failed) must not
// end the job as unknown while the machine runs: it is handed back until
// reconciliation adopts the machine, which the next delivery then tears
// down.
func TestTeardownFindsUntrackedWarmMachine(t *testing.T) {
	fx, _ := newAgentFixture()
	ctx := context.Background()
	const key = "_warm-0123456789ab"
	bindWarm(fx, key, "j1")
	err := fx.m.Teardown(ctx, "j1", messages.ReasonRequested, nil, first)
	if err == nil || errors.As(err, new(*Failure)) {
		t.Fatalf("Teardown = %v, want a transient error", err)
	}
	if last := fx.rec.last("j1"); last.State != messages.StateRunnerStarted {
		t.Fatalf("the job's last event is %s (%v), want nothing after runner_started", last.State, last.Error)
	}
	if _, ok := fx.fm.machine(key); !ok {
		t.Fatal("the machine is gone")
	}
	if err := fx.m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if err := fx.m.Teardown(ctx, "j1", messages.ReasonRequested, nil, Delivery{Attempt: 2}); err != nil {
		t.Fatal(err)
	}
	if last := fx.rec.last("j1"); last.State != messages.StateTornDown || last.Error != nil || last.Machine != key {
		t.Fatalf("the job's last event %+v, want torn_down of %s", last, key)
	}
	if _, ok := fx.fm.machine(key); ok {
		t.Fatal("the machine is still there")
	}
}

// TestRedeliveryRemovesLeftoverFirst: a delivery of a job whose earlier
// delivery's machine could not be removed removes it itself, in its own
// slot, and then builds the job anew, without waiting for a tick.
func TestRedeliveryRemovesLeftoverFirst(t *testing.T) {
	fx, _ := newAgentFixture()
	fx.rec.failOn(messages.StateRunnerStarted, errors.New("nats: timeout"))
	fx.fm.failRemoves(errors.New("libvirt: connection reset"))
	ctx := context.Background()
	req := forgejoRequest(fx, "j1")
	if err := fx.m.Provision(ctx, req, first); err == nil {
		t.Fatal("Provision = nil, want a transient error")
	}
	if fx.fm.count() != 1 || fx.m.Active() != 1 {
		t.Fatalf("%d machines, %d counted after the failed rollback, want 1 and 1", fx.fm.count(), fx.m.Active())
	}
	fx.rec.failOn("", nil)
	fx.fm.failRemoves(nil)
	if err := fx.m.Provision(ctx, req, Delivery{Attempt: 2}); err != nil {
		t.Fatalf("delivery 2: %v", err)
	}
	if last := fx.rec.last("j1"); last.State != messages.StateRunnerStarted || last.Attempt != 2 {
		t.Fatalf("the job's last event %+v, want runner_started of delivery 2", last)
	}
	if fx.fm.clones != 2 || fx.fm.count() != 1 || fx.m.Active() != 1 {
		t.Fatalf("clones %d, machines %d, counted %d; want 2, 1, 1", fx.fm.clones, fx.fm.count(), fx.m.Active())
	}
}

// TestReconcileLeavesAReplacedMachine: reconciliation finds a half-built
// machine of this host, and before it removes it another host that took
// the job (two workers on one libvirtd) has replaced it by its own of the
// same name: that one is left alone.
func TestReconcileLeavesAReplacedMachine(t *testing.T) {
	fx := newFixture()
	fx.fm.mu.Lock()
	fx.fm.machines["j1"] = &provision.Machine{Name: "stretchy-j1", Key: "j1", JobID: "j1", Image: "debian", Host: "h1", Running: true}
	fx.fm.afterList = func() {
		fx.fm.mu.Lock()
		defer fx.fm.mu.Unlock()
		fx.fm.machines["j1"] = &provision.Machine{Name: "stretchy-j1", Key: "j1", JobID: "j1", Image: "debian", Host: "h2", Running: true}
		fx.fm.afterList = nil
	}
	fx.fm.mu.Unlock()
	if err := fx.m.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	if m, ok := fx.fm.machine("j1"); !ok || m.Host != "h2" {
		t.Fatalf("the other host's machine of j1: present %v, %+v", ok, m)
	}
}
