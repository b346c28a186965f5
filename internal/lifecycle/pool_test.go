package lifecycle

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// poolFixture is a host with warm pools over fakes: Ready machines of
// image debian, MaxVMs in all.
func poolFixture(t *testing.T, ready, maxVMs int) (fixture, *fakeAgent) {
	t.Helper()
	fx, ag := newAgentFixture()
	fx.m.cfg.Pool = &PoolConfig{Machines: fx.fm, Ready: map[string]int{"debian": ready}, MaxReadyAge: time.Hour, MaxVMs: maxVMs}
	t.Cleanup(fx.m.Close)
	return fx, ag
}

// poolTick refills the pools and waits until every machine is idle again.
func poolTick(t *testing.T, m *Manager) {
	t.Helper()
	m.refill()
	tickAll(t, m)
}

// warmKeys returns the keys of the warm machines on the fake host, sorted.
func warmKeys(fm *fakeMachines, bound bool) []string {
	fm.mu.Lock()
	defer fm.mu.Unlock()
	var keys []string
	for key, m := range fm.machines {
		if m.Warm && (m.JobID != "") == bound {
			keys = append(keys, key)
		}
	}
	slices.Sort(keys)
	return keys
}

// machineEvents returns the states of a warm machine's own events.
func machineEvents(rec *recorder, key string) []messages.State {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var out []messages.State
	for _, ev := range rec.events {
		if ev.JobID == "" && ev.Machine == key {
			out = append(out, ev.State)
		}
	}
	return out
}

// TestWarmPoolBindsAndRefills: a pool of 2 fills up to 2 idle machines,
// whose preparation is published as the machines' events, without a job
// id; of three jobs at once two bind a warm machine and one builds cold;
// the pool refills to 2; --max-vms counts the pool's machines.
func TestWarmPoolBindsAndRefills(t *testing.T) {
	fx, ag := poolFixture(t, 2, 5)
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
	}

	jobs := []string{"w1", "w2", "w3"}
	var wg sync.WaitGroup
	errs := make([]error, len(jobs))
	for i, job := range jobs {
		wg.Go(func() { errs[i] = fx.m.Provision(context.Background(), forgejoRequest(fx, job), first) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("provision %s: %v", jobs[i], err)
		}
	}
	warm := 0
	for _, job := range jobs {
		evs := eventsOfJob(fx.rec, job)
		var states []messages.State
		for _, ev := range evs {
			states = append(states, ev.State)
		}
		if !slices.Equal(states, runnerHappy) {
			t.Fatalf("job %s: %v, want %v", job, states, runnerHappy)
		}
		if evs[0].Warm {
			warm++
			if !messages.ValidWarmKey(evs[0].Machine) || evs[0].Domain != messages.DomainName(evs[0].Machine) {
				t.Fatalf("warm job %s's accepted %+v: machine or domain wrong", job, evs[0])
			}
		}
		for i, ev := range evs {
			if ev.Warm != evs[0].Warm || ev.Seq != uint64(i+1) {
				t.Fatalf("job %s event %d %+v: warm or seq inconsistent", job, i, ev)
			}
		}
	}
	if warm != 2 {
		t.Fatalf("%d jobs bound warm machines, want 2", warm)
	}
	if bound := warmKeys(fx.fm, true); len(bound) != 2 {
		t.Fatalf("bound warm machines %v, want 2", bound)
	}
	// The secret reached the guest once per job, each through its own
	// machine's commands only.
	ag.mu.Lock()
	n := len(ag.commands)
	ag.mu.Unlock()
	if n != 3*2 {
		t.Fatalf("%d guest commands for three jobs, want 6 (a preparation and a launch each)", n)
	}

	poolTick(t, fx.m)
	if idle := warmKeys(fx.fm, false); len(idle) != 2 {
		t.Fatalf("after the bindings the pool holds %v, want 2 again", idle)
	}
	if fx.m.Active() != 5 {
		t.Fatalf("%d machines counted, want 5 (3 jobs, 2 warm)", fx.m.Active())
	}
	// At --max-vms (5) nothing more is warmed, and a warm-bound job ends
	// like any other: its machine is removed.
	if err := fx.m.Teardown(context.Background(), "w1", messages.ReasonRequested, nil, first); err != nil {
		t.Fatal(err)
	}
	if last := fx.rec.last("w1"); last.State != messages.StateTornDown {
		t.Fatalf("w1 ended with %+v", last)
	}
	poolTick(t, fx.m)
	if got := fx.m.Active(); got != 4 {
		t.Fatalf("%d machines after w1 went with 2 warm; want 4 (the pool is full)", got)
	}
}

func eventsOfJob(rec *recorder, job string) []messages.Event {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var out []messages.Event
	for _, ev := range rec.events {
		if ev.JobID == job {
			out = append(out, ev)
		}
	}
	return out
}

// TestWarmPoolRetires: idle machines are replaced when their image
// changes, when they reach max_ready_age and when the host drains; a
// machine a job bound is never touched by it.
func TestWarmPoolRetires(t *testing.T) {
	fx, _ := poolFixture(t, 2, 6)
	poolTick(t, fx.m)
	busy := forgejoRequest(fx, "busy")
	busy.MaxLifetimeS = 6 * 3600
	if err := fx.m.Provision(context.Background(), busy, first); err != nil {
		t.Fatal(err)
	}
	busyKey := eventsOfJob(fx.rec, "busy")[0].Machine
	poolTick(t, fx.m)
	old := warmKeys(fx.fm, false)

	fx.fm.mu.Lock()
	fx.fm.generations["debian"] = "g2"
	fx.fm.mu.Unlock()
	fx.clk.Advance(generationEvery)
	poolTick(t, fx.m) // notices the change
	poolTick(t, fx.m) // retires and refills
	now := warmKeys(fx.fm, false)
	if len(now) != 2 || slices.ContainsFunc(now, func(k string) bool { return slices.Contains(old, k) }) {
		t.Fatalf("after the image changed idle machines are %v, were %v; want two new ones", now, old)
	}
	for _, key := range old {
		got := machineEvents(fx.rec, key)
		if got[len(got)-1] != messages.StateTornDown {
			t.Fatalf("retired machine %s published %v", key, got)
		}
		if last := lastMachineEvent(fx.rec, key); last.Reason != messages.ReasonImageChanged {
			t.Fatalf("retired machine %s: reason %q", key, last.Reason)
		}
	}
	if fx.fm.machines[busyKey] == nil {
		t.Fatal("the image change removed a machine a job had bound")
	}

	fx.clk.Advance(time.Hour)
	poolTick(t, fx.m)
	aged := warmKeys(fx.fm, false)
	for _, key := range now {
		if slices.Contains(aged, key) {
			t.Fatalf("machine %s outlived max_ready_age", key)
		}
		if last := lastMachineEvent(fx.rec, key); last.Reason != messages.ReasonMaxReadyAge {
			t.Fatalf("aged machine %s: reason %q", key, last.Reason)
		}
	}

	fx.m.SetDraining(true)
	poolTick(t, fx.m)
	if idle := warmKeys(fx.fm, false); len(idle) != 0 {
		t.Fatalf("a draining host keeps idle warm machines %v", idle)
	}
	if fx.fm.machines[busyKey] == nil || fx.m.Active() != 1 {
		t.Fatalf("draining: %d machines, the busy one there: %v", fx.m.Active(), fx.fm.machines[busyKey] != nil)
	}
}

func lastMachineEvent(rec *recorder, key string) messages.Event {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var last messages.Event
	for _, ev := range rec.events {
		if ev.JobID == "" && ev.Machine == key {
			last = ev
		}
	}
	return last
}

// TestWarmPoolGivesWayToColdBuild: at --max-vms with idle warm machines, a
// job of an image without a pool retires one (reason capacity) and builds.
func TestWarmPoolGivesWayToColdBuild(t *testing.T) {
	fx, _ := poolFixture(t, 2, 2)
	fx.fm.images["ubuntu"] = true
	poolTick(t, fx.m)
	if fx.m.Active() != 2 {
		t.Fatalf("%d machines, want the full pool of 2", fx.m.Active())
	}
	release, ok := fx.m.TryReserve(2)
	if !ok {
		t.Fatal("idle warm machines keep a request out")
	}
	release()
	req := forgejoRequest(fx, "cold")
	req.Image = "ubuntu"
	if err := fx.m.Provision(context.Background(), req, first); err != nil {
		t.Fatal(err)
	}
	if fx.m.Active() != 2 || len(warmKeys(fx.fm, false)) != 1 {
		t.Fatalf("%d machines, %d idle; want 2 and 1", fx.m.Active(), len(warmKeys(fx.fm, false)))
	}
	var capacity int
	fx.rec.mu.Lock()
	for _, ev := range fx.rec.events {
		if ev.JobID == "" && ev.State == messages.StateTornDown && ev.Reason == messages.ReasonCapacity {
			capacity++
		}
	}
	fx.rec.mu.Unlock()
	if capacity != 1 {
		t.Fatalf("%d warm machines retired for capacity, want 1", capacity)
	}
}

// TestReconcileWarmMachines: after a restart an idle warm machine is
// retired (its readiness is not known) and a bound one is adopted as its
// job's; the pool is built anew.
func TestReconcileWarmMachines(t *testing.T) {
	fx, ag := poolFixture(t, 2, 6)
	poolTick(t, fx.m)
	if err := fx.m.Provision(context.Background(), forgejoRequest(fx, "bound"), first); err != nil {
		t.Fatal(err)
	}
	boundKey := eventsOfJob(fx.rec, "bound")[0].Machine
	idle := warmKeys(fx.fm, false)

	m2 := New(Config{Host: "h1", Machines: fx.fm, Events: fx.rec, History: fx.rec, Agent: ag, Now: fx.clk.Now,
		Pool: &PoolConfig{Machines: fx.fm, Ready: map[string]int{"debian": 2}, MaxVMs: 6}})
	defer m2.Close()
	if err := m2.Reconcile(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, key := range idle {
		if fx.fm.machines[key] != nil || lastMachineEvent(fx.rec, key).Reason != messages.ReasonReconcile {
			t.Fatalf("idle machine %s after the restart: still there or not retired for reconcile", key)
		}
	}
	if fx.fm.machines[boundKey] == nil || m2.Active() != 1 {
		t.Fatalf("the bound machine went, or %d machines are tracked", m2.Active())
	}
	ag.exit(0, "")
	tickAll(t, m2)
	if last := fx.rec.last("bound"); last.State != messages.StateTornDown || !last.Warm {
		t.Fatalf("the adopted warm job ended with %+v", last)
	}
	poolTick(t, m2)
	if got := warmKeys(fx.fm, false); len(got) != 2 {
		t.Fatalf("the new process's pool holds %v, want 2", got)
	}
	_ = fmt.Sprint
	_ = provision.Machine{}
}
