package lifecycle

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// fakeMachines is a stateful stand-in for the provisioner, for cases a real
// libvirtd cannot produce on demand.
type fakeMachines struct {
	mu       sync.Mutex
	images   map[string]bool
	machines map[string]*provision.Machine
	cloneErr error
	startErr error
	// afterList, when set, runs after List has read the machines, as
	// another worker of the same libvirtd would act meanwhile.
	afterList func()
	// holdErr, when set, fails SetHold; bindErr Bind; removeErr Remove.
	holdErr, bindErr, removeErr error
	// cloneGate, when set, blocks Clone until closed or ctx ends.
	cloneGate chan struct{}
	// startGate, when set, blocks Start until closed, whatever its ctx
	// does (a stalled host notices nothing); startWaiting says Start
	// waits there.
	startGate    chan struct{}
	startWaiting bool
	clones       int
	removes      int
	orphans      []string
	removed      []string
	// generations are the images' generations for InspectImage.
	generations map[string]string
	// saved are the warm machines Save saved (saved_test.go), saves and
	// restores count the calls, restoreErr fails Restore.
	saved           map[string]bool
	saves, restores int
	restoreErr      error
}

func newFakeMachines() *fakeMachines {
	return &fakeMachines{images: map[string]bool{"debian": true}, machines: map[string]*provision.Machine{},
		generations: map[string]string{"debian": "g1"}}
}

func (f *fakeMachines) Clone(ctx context.Context, s provision.Spec) (provision.Machine, error) {
	if f.cloneGate != nil {
		select {
		case <-f.cloneGate:
		case <-ctx.Done():
			return provision.Machine{}, ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.clones++
	if f.cloneErr != nil {
		return provision.Machine{}, f.cloneErr
	}
	if !f.images[s.Image] {
		return provision.Machine{}, fmt.Errorf("image %s: %w", s.Image, provision.ErrImageNotFound)
	}
	key := s.Key
	if key == "" {
		key = s.JobID
	}
	name := provision.DomainName(key)
	if _, ok := f.machines[key]; ok {
		return provision.Machine{}, provision.ErrExists
	}
	m := &provision.Machine{Name: name, Key: key, JobID: s.JobID, Warm: s.Key != "", Generation: s.Generation,
		Image: s.Image, Host: s.Host, Deadline: s.Deadline, Volumes: []string{"/pool/" + name + "-vda.qcow2"},
		VCPUs: cmp.Or(s.VCPUs, 2), MemoryMiB: cmp.Or(s.MemoryMiB, 512), ScratchGiB: s.ScratchGiB, HoldOnFailure: s.HoldOnFailure,
		ImageGeneration: f.generations[s.Image]}
	f.machines[key] = m
	return *m, nil
}

// Bind and InspectImage make fakeMachines the warm pools' WarmMachines.
func (f *fakeMachines) Bind(_ context.Context, key string, b provision.Binding) (provision.Machine, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.bindErr != nil {
		return provision.Machine{}, f.bindErr
	}
	m, ok := f.machines[key]
	if !ok {
		return provision.Machine{}, provision.ErrNotFound
	}
	if !m.Warm || m.JobID != "" {
		return provision.Machine{}, provision.ErrExists
	}
	m.JobID, m.RunnerKind, m.RequestedAt, m.Deadline = b.JobID, b.RunnerKind, b.RequestedAt, b.Deadline
	return *m, nil
}

func (f *fakeMachines) InspectImage(_ context.Context, image string) (provision.ImageReport, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.images[image] {
		return provision.ImageReport{Name: image}, provision.ErrImageNotFound
	}
	return provision.ImageReport{Name: image, Defined: true, Generation: f.generations[image]}, nil
}

func (f *fakeMachines) Start(_ context.Context, jobID string) error {
	f.mu.Lock()
	gate := f.startGate
	f.startWaiting = gate != nil
	f.mu.Unlock()
	if gate != nil {
		<-gate
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.startWaiting = false
	if f.startErr != nil {
		return f.startErr
	}
	m, ok := f.machines[jobID]
	if !ok {
		return provision.ErrNotFound
	}
	m.Running = true
	return nil
}

func (f *fakeMachines) Remove(_ context.Context, jobID string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.removeErr != nil {
		return false, f.removeErr
	}
	f.removes++
	f.removed = append(f.removed, jobID)
	_, ok := f.machines[jobID]
	delete(f.machines, jobID)
	return ok, nil
}

func (f *fakeMachines) Lookup(_ context.Context, jobID string) (provision.Machine, bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.machines[jobID]
	if !ok {
		return provision.Machine{}, false, nil
	}
	return keyed(*m), true, nil
}

// keyed fills in a cold machine's key, as provision does from its name.
func keyed(m provision.Machine) provision.Machine {
	if m.Key == "" {
		m.Key = m.JobID
	}
	return m
}

func (f *fakeMachines) List(context.Context) ([]provision.Machine, error) {
	f.mu.Lock()
	var out []provision.Machine
	for _, m := range f.machines {
		out = append(out, keyed(*m))
	}
	after := f.afterList
	f.mu.Unlock()
	if after != nil {
		after()
	}
	return out, nil
}

func (f *fakeMachines) ListOrphanVolumes(context.Context) ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.orphans...), nil
}

// failRemoves makes Remove fail with err, or succeed again with nil.
func (f *fakeMachines) failRemoves(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.removeErr = err
}

// waitingStart reports whether Start waits at its gate.
func (f *fakeMachines) waitingStart() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.startWaiting
}

func (f *fakeMachines) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.machines)
}

// recorder keeps published events and deduplicates by msgID like JetStream;
// an event's stream position is its index in events plus one.
type recorder struct {
	mu     sync.Mutex
	events []messages.Event
	ids    map[string]int // msgID -> position
	fail   error
	// failState and failErr fail the Appends of events in that state.
	failState messages.State
	failErr   error
}

// failOn makes Appends of events in state fail with err; "" and nil undo.
func (r *recorder) failOn(state messages.State, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failState, r.failErr = state, err
}

// Publish stores ev unconditionally, as another host or an earlier process
// would have.
func (r *recorder) Publish(_ context.Context, ev messages.Event, msgID string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail != nil {
		return r.fail
	}
	r.storeLocked(ev, msgID)
	return nil
}

func (r *recorder) storeLocked(ev messages.Event, msgID string) (seq, pos uint64) {
	if r.ids == nil {
		r.ids = map[string]int{}
	}
	if p, ok := r.ids[msgID]; ok {
		return r.events[p-1].Seq, uint64(p)
	}
	r.events = append(r.events, ev)
	r.ids[msgID] = len(r.events)
	return ev.Seq, uint64(len(r.events))
}

// Append follows bus.Publisher.Append: the condition on the job's newest
// event first, then the duplicate check, renumbering after the newest.
func (r *recorder) Append(_ context.Context, ev messages.Event, msgID string, after uint64) (uint64, uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail != nil {
		return 0, 0, r.fail
	}
	if r.failErr != nil && ev.State == r.failState {
		return 0, 0, r.failErr
	}
	var newest uint64
	for i, e := range r.events {
		if e.JobID == ev.JobID {
			newest = uint64(i + 1)
		}
	}
	if newest != after {
		if p, ok := r.ids[msgID]; ok && uint64(p) == newest {
			return r.events[p-1].Seq, newest, nil
		}
		if newest == 0 {
			ev.Seq = 1
		} else {
			ev.Seq = r.events[newest-1].Seq + 1
		}
	}
	seq, pos := r.storeLocked(ev, msgID)
	return seq, pos, nil
}

func (r *recorder) LastEvent(_ context.Context, jobID, host string) (messages.Event, bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var last messages.Event
	found := false
	for _, ev := range r.events {
		if ev.JobID == jobID && (host == "" || ev.Host == host) {
			last, found = ev, true
		}
	}
	return last, found, nil
}

func (r *recorder) states(jobID string) []messages.State {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []messages.State
	for _, ev := range r.events {
		if ev.JobID == jobID {
			out = append(out, ev.State)
		}
	}
	return out
}

func (r *recorder) last(jobID string) messages.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	var ev messages.Event
	for _, e := range r.events {
		if e.JobID == jobID {
			ev = e
		}
	}
	return ev
}

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

type fixture struct {
	m   *Manager
	fm  *fakeMachines
	rec *recorder
	clk *clock
}

func newFixture() fixture {
	fm, rec := newFakeMachines(), &recorder{}
	clk := &clock{t: time.Date(2026, 11, 27, 6, 0, 0, 0, time.UTC)}
	m := New(Config{Host: "h1", Machines: fm, Events: rec, History: rec, Now: clk.Now})
	return fixture{m, fm, rec, clk}
}

func (fx fixture) request(jobID, image string) messages.Provision {
	return messages.Provision{
		V: 1, JobID: jobID, Image: image, Runner: messages.Runner{Kind: messages.RunnerNone},
		MaxLifetimeS: 600, RequestedAt: fx.clk.Now(),
	}
}

var first = Delivery{Attempt: 1}

var happy = []messages.State{
	messages.StateAccepted, messages.StateCloning, messages.StateCloned,
	messages.StateBooting, messages.StateRunning,
}

func TestProvisionAndTeardown(t *testing.T) {
	fx := newFixture()
	ctx := context.Background()
	if err := fx.m.Provision(ctx, fx.request("j1", "debian"), first); err != nil {
		t.Fatal(err)
	}
	if got := fx.rec.states("j1"); !slices.Equal(got, happy) {
		t.Fatalf("events %v, want %v", got, happy)
	}
	if fx.m.Active() != 1 {
		t.Fatalf("Active = %d", fx.m.Active())
	}
	if err := fx.m.Teardown(ctx, "j1", messages.ReasonRequested, nil, first); err != nil {
		t.Fatal(err)
	}
	want := append(slices.Clone(happy), messages.StateTearingDown, messages.StateTornDown)
	if got := fx.rec.states("j1"); !slices.Equal(got, want) {
		t.Fatalf("events %v, want %v", got, want)
	}
	for i, ev := range fx.rec.events {
		if ev.Seq != uint64(i+1) || ev.Host != "h1" || ev.Image != "debian" || ev.Domain != "stretchy-j1" {
			t.Errorf("event %d = %+v", i, ev)
		}
	}
	if fx.fm.count() != 0 || fx.m.Active() != 0 {
		t.Fatalf("left %d machines, %d active", fx.fm.count(), fx.m.Active())
	}
}

func TestProvisionIsIdempotent(t *testing.T) {
	fx := newFixture()
	ctx := context.Background()
	for range 2 {
		if err := fx.m.Provision(ctx, fx.request("j1", "debian"), first); err != nil {
			t.Fatal(err)
		}
	}
	if fx.fm.clones != 1 || len(fx.rec.events) != len(happy) {
		t.Fatalf("clones=%d events=%d", fx.fm.clones, len(fx.rec.events))
	}
	// A finished job is remembered too.
	if err := fx.m.Teardown(ctx, "j1", messages.ReasonRequested, nil, first); err != nil {
		t.Fatal(err)
	}
	if err := fx.m.Provision(ctx, fx.request("j1", "debian"), Delivery{Attempt: 2}); err != nil {
		t.Fatal(err)
	}
	if fx.fm.clones != 1 || fx.fm.count() != 0 {
		t.Fatalf("a finished job was provisioned again: clones=%d machines=%d", fx.fm.clones, fx.fm.count())
	}
}

func TestProvisionFailures(t *testing.T) {
	unavailable := fmt.Errorf("libvirt: %w", io.EOF)
	tests := []struct {
		name      string
		image     string
		cloneErr  error
		startErr  error
		delivery  Delivery
		wantCode  messages.ErrorCode // "" means transient: no failed event
		wantState []messages.State
	}{
		{"unknown image", "nope", nil, nil, first, messages.CodeImageNotFound,
			[]messages.State{messages.StateAccepted, messages.StateCloning, messages.StateFailed}},
		{"invalid image", "debian", fmt.Errorf("x: %w", provision.ErrImageInvalid), nil, first, messages.CodeImageInvalid,
			[]messages.State{messages.StateAccepted, messages.StateCloning, messages.StateFailed}},
		{"start refused", "debian", nil, errors.New("qemu died"), first, messages.CodeBootFailed,
			append(slices.Clone(happy[:4]), messages.StateFailed)},
		{"libvirt gone", "debian", unavailable, nil, first, "",
			[]messages.State{messages.StateAccepted, messages.StateCloning}},
		{"libvirt gone on final delivery", "debian", unavailable, nil, Delivery{Attempt: 5, Final: true}, messages.CodeCloneFailed,
			[]messages.State{messages.StateAccepted, messages.StateCloning, messages.StateFailed}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fx := newFixture()
			fx.fm.cloneErr, fx.fm.startErr = tt.cloneErr, tt.startErr
			err := fx.m.Provision(context.Background(), fx.request("j1", tt.image), tt.delivery)
			var f *Failure
			if tt.wantCode == "" {
				if err == nil || errors.As(err, &f) {
					t.Fatalf("want a transient error, got %v", err)
				}
			} else {
				if !errors.As(err, &f) || f.Code != tt.wantCode {
					t.Fatalf("want Failure %s, got %v", tt.wantCode, err)
				}
				if ev := fx.rec.last("j1"); ev.Error == nil || ev.Error.Code != tt.wantCode || ev.Error.Message == "" {
					t.Fatalf("failed event %+v", ev)
				}
			}
			if got := fx.rec.states("j1"); !slices.Equal(got, tt.wantState) {
				t.Fatalf("events %v, want %v", got, tt.wantState)
			}
			if fx.fm.count() != 0 || fx.m.Active() != 0 {
				t.Fatalf("left %d machines, %d active", fx.fm.count(), fx.m.Active())
			}
		})
	}
}

func TestTransientFailureRetriesCleanly(t *testing.T) {
	fx := newFixture()
	fx.fm.startErr = fmt.Errorf("libvirt: %w", io.EOF)
	if err := fx.m.Provision(context.Background(), fx.request("j1", "debian"), first); err == nil {
		t.Fatal("want an error")
	}
	fx.fm.startErr = nil
	if err := fx.m.Provision(context.Background(), fx.request("j1", "debian"), Delivery{Attempt: 2}); err != nil {
		t.Fatalf("retry: %v", err)
	}
	ev := fx.rec.last("j1")
	if ev.State != messages.StateRunning || ev.Attempt != 2 {
		t.Fatalf("last event %+v", ev)
	}
	// Numbering continues over attempts.
	if ev.Seq != uint64(len(fx.rec.events)) {
		t.Fatalf("seq %d after %d events", ev.Seq, len(fx.rec.events))
	}
}

func TestTeardownUnknownJob(t *testing.T) {
	fx := newFixture()
	ctx := context.Background()
	if err := fx.m.Teardown(ctx, "ghost", messages.ReasonRequested, nil, first); err != nil {
		t.Fatal(err)
	}
	ev := fx.rec.last("ghost")
	if ev.State != messages.StateTornDown || ev.Error == nil || ev.Error.Code != messages.CodeUnknownJob {
		t.Fatalf("event %+v", ev)
	}
	if fx.fm.removes != 0 {
		t.Fatal("nothing should have been removed")
	}
}

func TestTeardownDuringProvision(t *testing.T) {
	fx := newFixture()
	fx.fm.cloneGate = make(chan struct{}) // Clone blocks until cancelled
	ctx := context.Background()
	provErr := make(chan error, 1)
	go func() { provErr <- fx.m.Provision(ctx, fx.request("j1", "debian"), first) }()
	waitFor(t, func() bool { return len(fx.rec.states("j1")) == 2 }) // accepted, cloning
	if err := fx.m.Teardown(ctx, "j1", messages.ReasonRequested, nil, first); err != nil {
		t.Fatal(err)
	}
	if err := <-provErr; !errors.Is(err, ErrSuperseded) {
		t.Fatalf("provision returned %v", err)
	}
	want := []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateTearingDown, messages.StateTornDown}
	if got := fx.rec.states("j1"); !slices.Equal(got, want) {
		t.Fatalf("events %v, want %v", got, want)
	}
	if fx.fm.count() != 0 || fx.m.Active() != 0 {
		t.Fatal("leftovers")
	}
}

func TestDeadline(t *testing.T) {
	fx := newFixture()
	ctx := context.Background()
	if err := fx.m.Provision(ctx, fx.request("j1", "debian"), first); err != nil {
		t.Fatal(err)
	}
	tickAll(t, fx.m)
	if got := fx.rec.states("j1"); !slices.Equal(got, happy) {
		t.Fatalf("ended too early: %v", got)
	}
	fx.clk.Advance(601 * time.Second)
	tickAll(t, fx.m)
	ev := fx.rec.last("j1")
	if ev.State != messages.StateFailed || ev.Error.Code != messages.CodeDeadlineExceeded || ev.Reason != messages.ReasonDeadline || ev.Attempt != 0 {
		t.Fatalf("last event %+v", ev)
	}
	n := len(fx.rec.events)
	tickAll(t, fx.m)
	if len(fx.rec.events) != n || fx.m.Active() != 0 || fx.fm.count() != 0 {
		t.Fatalf("a torn-down job is still looked after: %d events, %d active", len(fx.rec.events)-n, fx.m.Active())
	}
}

func TestTryReserve(t *testing.T) {
	fx := newFixture()
	ctx := context.Background()
	if err := fx.m.Provision(ctx, fx.request("j1", "debian"), first); err != nil {
		t.Fatal(err)
	}
	release, ok := fx.m.TryReserve(2)
	if !ok {
		t.Fatal("a second machine did not fit under max 2")
	}
	if _, ok := fx.m.TryReserve(2); ok {
		t.Fatal("a third machine fit under max 2")
	}
	release()
	release() // idempotent
	r, ok := fx.m.TryReserve(2)
	if !ok {
		t.Fatal("released room was not reusable")
	}
	r()
}

func TestReconcile(t *testing.T) {
	ev := func(job string, seq uint64, state messages.State) messages.Event {
		return messages.Event{V: 1, JobID: job, Host: "h1", State: state, Seq: seq}
	}
	tests := []struct {
		name     string
		running  bool
		history  []messages.Event
		kept     bool
		want     []messages.State // events published by Reconcile
		wantCode messages.ErrorCode
	}{
		{"running, running published", true,
			[]messages.Event{ev("j", 4, messages.StateBooting), ev("j", 5, messages.StateRunning)},
			true, nil, ""},
		{"running, stopped before publishing running", true,
			[]messages.Event{ev("j", 4, messages.StateBooting)},
			false, nil, ""},
		{"stopped after running", false,
			[]messages.Event{ev("j", 5, messages.StateRunning)},
			false, []messages.State{messages.StateTearingDown, messages.StateFailed}, messages.CodeMachineStopped},
		{"half built", false,
			[]messages.Event{ev("j", 3, messages.StateCloned)},
			false, nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fx := newFixture()
			fx.rec.events = append(fx.rec.events, tt.history...)
			fx.fm.machines["j"] = &provision.Machine{Name: "stretchy-j", JobID: "j", Image: "debian", Running: tt.running}
			// Not the worker's: the name carries no valid job id.
			fx.fm.machines["x.y"] = &provision.Machine{Name: "stretchy-x.y", JobID: "x.y"}
			if err := fx.m.Reconcile(context.Background()); err != nil {
				t.Fatal(err)
			}
			if _, ok := fx.fm.machines["x.y"]; !ok {
				t.Fatal("a domain with an invalid job id was removed")
			}
			if _, ok := fx.fm.machines["j"]; ok != tt.kept {
				t.Fatalf("machine kept = %v, want %v", ok, tt.kept)
			}
			got := fx.rec.states("j")[len(tt.history):]
			if !slices.Equal(got, tt.want) {
				t.Fatalf("published %v, want %v", got, tt.want)
			}
			for i, e := range fx.rec.events[len(tt.history):] {
				if want := tt.history[len(tt.history)-1].Seq + uint64(i) + 1; e.Seq != want {
					t.Errorf("event %s has seq %d, want %d (numbering continues)", e.State, e.Seq, want)
				}
			}
			if tt.wantCode != "" {
				if last := fx.rec.last("j"); last.Error == nil || last.Error.Code != tt.wantCode {
					t.Fatalf("last event %+v", last)
				}
			}
			if tt.kept != (fx.m.Active() == 1) {
				t.Fatalf("Active = %d", fx.m.Active())
			}
			if !tt.kept && len(tt.want) == 0 {
				// The request was never acknowledged: its redelivery builds anew.
				if err := fx.m.Provision(context.Background(), fx.request("j", "debian"), Delivery{Attempt: 2}); err != nil {
					t.Fatal(err)
				}
				if fx.rec.last("j").State != messages.StateRunning {
					t.Fatalf("the redelivered provision did not run: %v", fx.rec.states("j"))
				}
			}
		})
	}
}

func TestReconcileLeavesOtherHostsAndYoungOrphansAlone(t *testing.T) {
	fx := newFixture()
	ctx := context.Background()
	fx.fm.machines["theirs"] = &provision.Machine{Name: "stretchy-theirs", JobID: "theirs", Host: "other-host"}
	fx.fm.orphans = []string{"/pool/stretchy-gone-vda.qcow2"}
	if err := fx.m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if _, ok := fx.fm.machines["theirs"]; !ok {
		t.Fatal("a machine of another host id was removed")
	}
	if len(fx.fm.removed) != 0 {
		t.Fatalf("removed %v on the first sighting", fx.fm.removed)
	}
	if err := fx.m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(fx.fm.removed, []string{"gone"}) {
		t.Fatalf("removed %v, want the orphan's job on the second sighting", fx.fm.removed)
	}
}

func TestTeardownBeforeProvisionPreventsMachine(t *testing.T) {
	fx := newFixture()
	ctx := context.Background()
	if err := fx.m.Teardown(ctx, "early", messages.ReasonRequested, nil, first); err != nil {
		t.Fatal(err)
	}
	if err := fx.m.Provision(ctx, fx.request("early", "debian"), first); err != nil {
		t.Fatal(err)
	}
	if fx.fm.clones != 0 {
		t.Fatal("a machine was built for a job already torn down")
	}
}

func TestFinalTeardownFailureIsReported(t *testing.T) {
	fx := newFixture()
	ctx := context.Background()
	if err := fx.m.Provision(ctx, fx.request("j1", "debian"), first); err != nil {
		t.Fatal(err)
	}
	fm := &failingRemove{fakeMachines: fx.fm}
	fx.m.cfg.Machines = fm
	if err := fx.m.Teardown(ctx, "j1", messages.ReasonRequested, nil, first); err == nil {
		t.Fatal("want an error")
	}
	if last := fx.rec.last("j1"); last.State != messages.StateTearingDown {
		t.Fatalf("a non-final failure published %s", last.State)
	}
	err := fx.m.Teardown(ctx, "j1", messages.ReasonRequested, nil, Delivery{Attempt: 5, Final: true})
	var f *Failure
	if !errors.As(err, &f) || f.Code != messages.CodeTeardownFailed {
		t.Fatalf("got %v", err)
	}
	if last := fx.rec.last("j1"); last.State != messages.StateFailed || last.Error.Code != messages.CodeTeardownFailed {
		t.Fatalf("last event %+v", last)
	}
}

type failingRemove struct{ *fakeMachines }

func (f *failingRemove) Remove(context.Context, string) (bool, error) {
	return false, errors.New("libvirt refused")
}

func TestRejectReportsFailedOnce(t *testing.T) {
	fx := newFixture()
	err := fx.m.Reject(context.Background(), "bad", "", messages.CodeInvalidRequest, errors.New("image: missing"), first)
	var f *Failure
	if !errors.As(err, &f) || f.Code != messages.CodeInvalidRequest {
		t.Fatalf("got %v", err)
	}
	if got := fx.rec.states("bad"); !slices.Equal(got, []messages.State{messages.StateFailed}) {
		t.Fatalf("events %v", got)
	}
	// Without a readable job id there is nobody to report to.
	if err := fx.m.Reject(context.Background(), "", "", messages.CodeBadMessage, errors.New("x"), first); !errors.As(err, &f) {
		t.Fatalf("got %v", err)
	}
	if len(fx.rec.events) != 1 {
		t.Fatalf("%d events", len(fx.rec.events))
	}
}

// TestRejectAfterAnotherHostsRefusal: a bad request that two hosts got
// at once (a NATS node's consumer state lost in a restart delivered it
// twice as attempt 1) is refused by the second without a second terminal
// event: the job ended with the first host's failed (5.1).
func TestRejectAfterAnotherHostsRefusal(t *testing.T) {
	fx := newFixture()
	if err := fx.rec.Publish(context.Background(), messages.Event{V: 1, JobID: "bad", Host: "h2", State: messages.StateFailed, Seq: 1, Attempt: 1,
		Time: fx.clk.Now(), Error: &messages.Error{Code: messages.CodeUnsupportedVersion, Message: "v=0"}}, "bad:failed:1"); err != nil {
		t.Fatal(err)
	}
	err := fx.m.Reject(context.Background(), "bad", "", messages.CodeUnsupportedVersion, errors.New("v=0"), Delivery{Attempt: 2})
	var f *Failure
	if !errors.As(err, &f) || f.Code != messages.CodeUnsupportedVersion {
		t.Fatalf("got %v, want the refusal (term) without an event", err)
	}
	if got := fx.rec.states("bad"); !slices.Equal(got, []messages.State{messages.StateFailed}) {
		t.Fatalf("events %v, want h2's failed alone", got)
	}
}

// tickAll ticks every machine of m once and waits until each is idle
// again, with what its tick began (a look at the runner, a teardown) done.
func tickAll(t *testing.T, m *Manager) {
	t.Helper()
	m.mu.Lock()
	var actors []*actor
	for _, a := range m.byKey {
		actors = append(actors, a)
	}
	m.mu.Unlock()
	for _, a := range actors {
		if _, err := m.send(context.Background(), a, &tickCmd{}); err != nil {
			t.Fatal(err)
		}
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestTeardownRedeliveredAfterCrash is a teardown request delivered again
// to a new worker process after the previous one died before settling it
// (the crash matrix's before_ack and after_remove points): the new process
// has no memory of the job, only its history and the host.
func TestTeardownRedeliveredAfterCrash(t *testing.T) {
	tests := []struct {
		name string
		// host and states of the job's history, written by the dead process
		host   string
		states []messages.State
		reason string // of the last event
		want   []messages.State
		code   messages.ErrorCode // of the new terminal event, if any
	}{
		{name: "ended and not acked", host: "h1", reason: messages.ReasonRequested,
			states: []messages.State{messages.StateAgentReady, messages.StateTearingDown, messages.StateTornDown},
			want:   []messages.State{messages.StateAgentReady, messages.StateTearingDown, messages.StateTornDown}},
		{name: "removed, end not published", host: "h1", reason: messages.ReasonRequested,
			states: []messages.State{messages.StateAgentReady, messages.StateTearingDown},
			want:   []messages.State{messages.StateAgentReady, messages.StateTearingDown, messages.StateTornDown}},
		{name: "another teardown was removing it", host: "h1", reason: messages.ReasonDeadline,
			states: []messages.State{messages.StateAgentReady, messages.StateTearingDown},
			want:   []messages.State{messages.StateAgentReady, messages.StateTearingDown, messages.StateTornDown},
			code:   messages.CodeUnknownJob},
		// Its end is another host's: no second terminal event here.
		{name: "another host ended it", host: "h2", reason: messages.ReasonRequested,
			states: []messages.State{messages.StateAgentReady, messages.StateTearingDown, messages.StateTornDown},
			want:   []messages.State{messages.StateAgentReady, messages.StateTearingDown, messages.StateTornDown}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fx := newFixture()
			ctx := context.Background()
			for i, st := range tt.states {
				ev := messages.Event{V: 1, JobID: "j1", Host: tt.host, State: st, Seq: uint64(i + 1), Attempt: 1}
				if st == messages.StateTearingDown || st.Terminal() {
					ev.Reason = tt.reason
				}
				if err := fx.rec.Publish(ctx, ev, fmt.Sprintf("old:%d", i)); err != nil {
					t.Fatal(err)
				}
			}
			err := fx.m.Teardown(ctx, "j1", messages.ReasonRequested, nil, Delivery{Attempt: 2})
			if err != nil {
				t.Fatal(err)
			}
			if got := fx.rec.states("j1"); !slices.Equal(got, tt.want) {
				t.Fatalf("events %v, want %v", got, tt.want)
			}
			last := fx.rec.last("j1")
			if len(tt.want) > len(tt.states) {
				if last.Seq != uint64(len(tt.want)) || last.Host != "h1" || last.Reason != messages.ReasonRequested {
					t.Errorf("new event %+v", last)
				}
				if (last.Error == nil) != (tt.code == "") || (last.Error != nil && last.Error.Code != tt.code) {
					t.Errorf("new event's error %+v, want code %q", last.Error, tt.code)
				}
			}
			// Either way the job is over here: a late provision builds nothing.
			if err := fx.m.Provision(ctx, fx.request("j1", "debian"), Delivery{Attempt: 3}); err != nil {
				t.Fatal(err)
			}
			if fx.fm.clones != 0 {
				t.Fatal("a provision after the end built a machine")
			}
		})
	}
}

// TestRedeliveryDuringBuildWaitsForIt is a provision delivered again while
// its first delivery is still building (the worker's heartbeats were held
// up for longer than AckWait): the second delivery must not be settled
// before the first has an outcome, and must not build anything itself.
func TestRedeliveryDuringBuildWaitsForIt(t *testing.T) {
	tests := []struct {
		name     string
		cloneErr error
		wantErr  bool // the second delivery is handed back
	}{
		{name: "first succeeds"},
		{name: "first fails transiently", cloneErr: fmt.Errorf("libvirt: %w", io.EOF), wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fx := newFixture()
			fx.fm.cloneGate = make(chan struct{})
			fx.fm.cloneErr = tt.cloneErr
			ctx := context.Background()
			firstErr, secondErr := make(chan error, 1), make(chan error, 1)
			go func() { firstErr <- fx.m.Provision(ctx, fx.request("j1", "debian"), first) }()
			waitFor(t, func() bool { return len(fx.rec.states("j1")) == 2 }) // accepted, cloning
			go func() { secondErr <- fx.m.Provision(ctx, fx.request("j1", "debian"), Delivery{Attempt: 2}) }()
			time.Sleep(50 * time.Millisecond)
			select {
			case err := <-secondErr:
				t.Fatalf("the second delivery returned %v while the first was still building", err)
			default:
			}
			close(fx.fm.cloneGate)
			if err := <-firstErr; (err != nil) != tt.wantErr {
				t.Fatalf("first delivery: %v", err)
			}
			err := <-secondErr
			var f *Failure
			if (err != nil) != tt.wantErr || errors.As(err, &f) {
				t.Fatalf("second delivery: %v, want a transient error: %v", err, tt.wantErr)
			}
			if fx.fm.clones != 1 {
				t.Fatalf("%d clones, want 1", fx.fm.clones)
			}
		})
	}
}

func (r *recorder) Recent(_ context.Context, host string, since time.Time) ([]messages.Event, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []messages.Event
	for _, ev := range r.events {
		if ev.Host == host && !ev.Time.Before(since) {
			out = append(out, ev)
		}
	}
	return out, nil
}
