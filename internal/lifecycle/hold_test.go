package lifecycle

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// SetHold and PowerOff make fakeMachines the holds' HoldMachines.
func (f *fakeMachines) SetHold(_ context.Context, key string, h provision.Hold) (provision.Machine, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.holdErr != nil {
		return provision.Machine{}, f.holdErr
	}
	m, ok := f.machines[key]
	if !ok {
		return provision.Machine{}, provision.ErrNotFound
	}
	m.HeldUntil, m.HoldFor = h.Until, h.For
	return *m, nil
}

func (f *fakeMachines) PowerOff(_ context.Context, key string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.machines[key]
	if !ok {
		return provision.ErrNotFound
	}
	m.Running = false
	return nil
}

func (f *fakeMachines) machine(key string) (provision.Machine, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.machines[key]
	if !ok {
		return provision.Machine{}, false
	}
	return *m, true
}

// holdFixture is a fixture whose host holds machines up to maxHold.
func holdFixture(maxHold time.Duration) fixture {
	fx := newFixture()
	fx.m.cfg.Holds, fx.m.cfg.MaxHold = fx.fm, maxHold
	return fx
}

// TestHoldOnFailure: a job whose boot fails, asking for a hold of 30 s,
// ends failed with held_until 30 s on; its machine stays, shut off and
// listed, counted, and its hold recorded; a teardown request changes
// nothing; once the hold is up the machine is removed and released
// published.
func TestHoldOnFailure(t *testing.T) {
	fx := holdFixture(time.Hour)
	ctx := context.Background()
	fx.fm.startErr = errors.New("no memory for the guest")
	req := fx.request("j1", "debian")
	req.HoldOnFailureS = 30
	var f *Failure
	if err := fx.m.Provision(ctx, req, first); !errors.As(err, &f) || f.Code != messages.CodeBootFailed {
		t.Fatalf("Provision = %v, want boot_failed", err)
	}
	last := fx.rec.last("j1")
	want := fx.clk.Now().Add(30 * time.Second)
	if last.State != messages.StateFailed || !last.HeldUntil.Equal(want) {
		t.Fatalf("last event %s held until %v, want failed held until %v", last.State, last.HeldUntil, want)
	}
	mach, ok := fx.fm.machine("j1")
	if !ok || mach.Running || !mach.HeldUntil.Equal(want) {
		t.Fatalf("held machine %+v, present %v", mach, ok)
	}
	if held := fx.m.Held(); len(held) != 1 || held[0].JobID != "j1" || !held[0].Until.Equal(want) {
		t.Fatalf("Held = %+v", held)
	}
	if fx.m.Active() != 1 {
		t.Fatalf("Active = %d, want the held machine counted", fx.m.Active())
	}
	if err := fx.m.Teardown(ctx, "j1", messages.ReasonRequested, nil, first); err != nil {
		t.Fatal(err)
	}
	if err := fx.m.Provision(ctx, req, Delivery{Attempt: 2}); err != nil {
		t.Fatalf("a repeated provision of the held job: %v", err)
	}
	fx.clk.Advance(29 * time.Second)
	tickAll(t, fx.m)
	if _, ok := fx.fm.machine("j1"); !ok {
		t.Fatal("removed before its hold ended")
	}
	fx.clk.Advance(2 * time.Second)
	tickAll(t, fx.m)
	waitFor(t, func() bool { return fx.rec.last("j1").State == messages.StateReleased })
	if _, ok := fx.fm.machine("j1"); ok {
		t.Fatal("the machine is still there after its hold")
	}
	if ev := fx.rec.last("j1"); ev.Reason != messages.ReasonHoldExpired {
		t.Fatalf("released with reason %q", ev.Reason)
	}
	waitFor(t, func() bool { return fx.m.Active() == 0 && len(fx.m.Held()) == 0 })
	wantStates := []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateCloned, messages.StateBooting,
		messages.StateFailed, messages.StateReleased}
	if got := fx.rec.states("j1"); !slices.Equal(got, wantStates) {
		t.Fatalf("events %v, want %v", got, wantStates)
	}
}

// TestHoldCappedAndOff: the host's --max-hold caps a request's hold, and a
// host that holds nothing removes the machine at once.
func TestHoldCappedAndOff(t *testing.T) {
	for _, tt := range []struct {
		name    string
		maxHold time.Duration
		want    time.Duration
	}{
		{"capped", 10 * time.Second, 10 * time.Second},
		{"off", 0, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			fx := holdFixture(tt.maxHold)
			fx.fm.startErr = errors.New("refused")
			req := fx.request("j1", "debian")
			req.HoldOnFailureS = 600
			_ = fx.m.Provision(context.Background(), req, first)
			last := fx.rec.last("j1")
			_, kept := fx.fm.machine("j1")
			if tt.want == 0 {
				if kept || !last.HeldUntil.IsZero() {
					t.Fatalf("kept %v, held until %v", kept, last.HeldUntil)
				}
				return
			}
			if !kept || !last.HeldUntil.Equal(fx.clk.Now().Add(tt.want)) {
				t.Fatalf("kept %v, held until %v, want %v", kept, last.HeldUntil, tt.want)
			}
		})
	}
}

// TestOperatorHold: an operator's hold of a ready machine keeps it when
// its job ends, even by a teardown request (torn_down with held_until);
// released by the operator, it is removed at once; a second release says
// there is nothing held.
func TestOperatorHold(t *testing.T) {
	fx := holdFixture(time.Hour)
	ctx := context.Background()
	if err := fx.m.Provision(ctx, fx.request("j1", "debian"), first); err != nil {
		t.Fatal(err)
	}
	info, err := fx.m.Hold(ctx, "j1", 5*time.Minute)
	if err != nil || info.Phase != PhaseReady || info.HoldFor != 5*time.Minute {
		t.Fatalf("Hold = %+v, %v", info, err)
	}
	if mach, _ := fx.fm.machine("j1"); mach.HoldFor != 5*time.Minute {
		t.Fatalf("the pending hold is not recorded: %+v", mach)
	}
	if err := fx.m.Teardown(ctx, "j1", messages.ReasonRequested, nil, first); err != nil {
		t.Fatal(err)
	}
	last := fx.rec.last("j1")
	if last.State != messages.StateTornDown || !last.HeldUntil.Equal(fx.clk.Now().Add(5*time.Minute)) {
		t.Fatalf("end %s held until %v", last.State, last.HeldUntil)
	}
	if mach, ok := fx.fm.machine("j1"); !ok || mach.Running {
		t.Fatalf("held machine %+v, present %v", mach, ok)
	}
	// Holding a held machine again sets its end from now.
	fx.clk.Advance(time.Minute)
	if info, err := fx.m.Hold(ctx, "j1", 2*time.Hour); err != nil || !info.HeldUntil.Equal(fx.clk.Now().Add(time.Hour)) {
		t.Fatalf("Hold of the held machine = %+v, %v; want capped at an hour from now", info, err)
	}
	if _, err := fx.m.Release(ctx, "j1"); err != nil {
		t.Fatal(err)
	}
	if _, ok := fx.fm.machine("j1"); ok {
		t.Fatal("released machine still there")
	}
	if ev := fx.rec.last("j1"); ev.State != messages.StateReleased || ev.Reason != messages.ReasonReleased {
		t.Fatalf("last event %s %s", ev.State, ev.Reason)
	}
	if _, err := fx.m.Release(ctx, "j1"); !errors.Is(err, ErrNoMachine) {
		t.Fatalf("second Release = %v", err)
	}
	if _, err := fx.m.Hold(ctx, "nope", 0); !errors.Is(err, ErrNoMachine) {
		t.Fatalf("Hold of an unknown job = %v", err)
	}
}

// TestHoldSurvivesRestart: a new process adopts a held machine by its
// metadata, and one held by a process that died before it recorded the
// hold by the job's failed event; both end when their holds do.
func TestHoldSurvivesRestart(t *testing.T) {
	fx := holdFixture(time.Hour)
	ctx := context.Background()
	fx.fm.startErr = errors.New("refused")
	req := fx.request("j1", "debian")
	req.HoldOnFailureS = 60
	_ = fx.m.Provision(ctx, req, first)
	fx.fm.startErr = nil
	if err := fx.m.Provision(ctx, fx.request("j2", "debian"), first); err != nil {
		t.Fatal(err)
	}
	// j2 failed too, in a process that died after publishing its hold.
	until := fx.clk.Now().Add(90 * time.Second)
	fx.rec.Publish(ctx, messages.Event{V: 1, JobID: "j2", Host: "h1", State: messages.StateFailed, Seq: 99, HeldUntil: until}, "j2:dead")
	fx.m.Close()

	m2 := New(Config{Host: "h1", Machines: fx.fm, Events: fx.rec, History: fx.rec, Now: fx.clk.Now, Holds: fx.fm, MaxHold: time.Hour})
	defer m2.Close()
	if err := m2.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	held := m2.Held()
	if len(held) != 2 || held[0].JobID != "j1" || held[1].JobID != "j2" || !held[1].Until.Equal(until) {
		t.Fatalf("Held after restart = %+v", held)
	}
	tickAll(t, m2) // records j2's hold
	if mach, _ := fx.fm.machine("j2"); mach.Running || !mach.HeldUntil.Equal(until) {
		t.Fatalf("j2 after the tick: %+v", mach)
	}
	fx.clk.Advance(61 * time.Second)
	tickAll(t, m2)
	waitFor(t, func() bool { _, ok := fx.fm.machine("j1"); return !ok })
	if _, ok := fx.fm.machine("j2"); !ok {
		t.Fatal("j2 removed before its hold ended")
	}
	fx.clk.Advance(30 * time.Second)
	tickAll(t, m2)
	waitFor(t, func() bool { _, ok := fx.fm.machine("j2"); return !ok })
	waitFor(t, func() bool { return fx.rec.last("j2").State == messages.StateReleased })
}

// TestUnrecordedHoldExpires: a hold whose recording keeps failing (libvirt
// refuses the metadata) still ends at its time: the machine is removed and
// released published, as for a recorded hold.
func TestUnrecordedHoldExpires(t *testing.T) {
	fx := holdFixture(time.Hour)
	ctx := context.Background()
	fx.fm.startErr = errors.New("no memory for the guest")
	fx.fm.holdErr = errors.New("metadata: operation failed")
	req := fx.request("j1", "debian")
	req.HoldOnFailureS = 30
	var f *Failure
	if err := fx.m.Provision(ctx, req, first); !errors.As(err, &f) || f.Code != messages.CodeBootFailed {
		t.Fatalf("Provision = %v, want boot_failed", err)
	}
	if held := fx.m.Held(); len(held) != 1 {
		t.Fatalf("Held = %+v, want the machine held though its hold is not recorded", held)
	}
	tickAll(t, fx.m) // tries to record the hold again, and fails
	fx.clk.Advance(31 * time.Second)
	tickAll(t, fx.m)
	waitFor(t, func() bool { return fx.rec.last("j1").State == messages.StateReleased })
	if _, ok := fx.fm.machine("j1"); ok {
		t.Fatal("the machine is still there after its hold")
	}
	if ev := fx.rec.last("j1"); ev.Reason != messages.ReasonHoldExpired {
		t.Fatalf("released with reason %q", ev.Reason)
	}
	waitFor(t, func() bool { return fx.m.Active() == 0 && len(fx.m.Held()) == 0 })
}
