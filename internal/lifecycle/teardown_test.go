package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// TestFinishTeardowns: a restarted worker ends the jobs whose machine a
// teardown of its own had removed when the previous process died, with
// the end that teardown would have published, and only those.
func TestFinishTeardowns(t *testing.T) {
	fx := newFixture()
	ctx := context.Background()
	m := New(Config{Host: "h1", Machines: fx.fm, Events: fx.rec, History: fx.rec, Journal: fx.rec, Now: fx.clk.Now})
	ev := func(job, host string, state messages.State, seq uint64, reason string) {
		if err := fx.rec.Publish(ctx, messages.Event{V: 1, JobID: job, Host: host, Domain: "stretchy-" + job,
			State: state, Time: fx.clk.Now(), Seq: seq, Reason: reason}, job+string(state)+reason); err != nil {
			t.Fatal(err)
		}
	}
	// Cut off after the removal, one per reason the worker starts itself.
	ev("exited", "h1", messages.StateTearingDown, 9, messages.ReasonRunnerExited)
	ev("late", "h1", messages.StateTearingDown, 7, messages.ReasonDeadline)
	ev("stopped", "h1", messages.StateTearingDown, 7, messages.ReasonStopped)
	// Left alone: a requested teardown (its request comes again), one that
	// ended, one whose machine still exists, another host's, one an
	// earlier day began, and one another host went on with.
	ev("requested", "h1", messages.StateTearingDown, 7, messages.ReasonRequested)
	ev("ended", "h1", messages.StateTearingDown, 9, messages.ReasonRunnerExited)
	ev("ended", "h1", messages.StateTornDown, 10, messages.ReasonRunnerExited)
	ev("present", "h1", messages.StateTearingDown, 9, messages.ReasonRunnerExited)
	fx.fm.machines["present"] = &provision.Machine{Name: "stretchy-present", JobID: "present", Host: "h1"}
	ev("theirs", "h2", messages.StateTearingDown, 9, messages.ReasonRunnerExited)
	ev("moved", "h1", messages.StateTearingDown, 9, messages.ReasonDeadline)
	ev("moved", "h2", messages.StateAccepted, 10, "")
	old := fx.clk.Now().Add(-25 * time.Hour)
	ev("yesterday", "h1", messages.StateTearingDown, 9, messages.ReasonRunnerExited)
	fx.rec.mu.Lock()
	fx.rec.events[len(fx.rec.events)-1].Time = old
	fx.rec.mu.Unlock()
	before := len(fx.rec.events)

	if err := m.FinishTeardowns(ctx); err != nil {
		t.Fatal(err)
	}
	want := map[string]messages.Event{
		"exited":  {State: messages.StateTornDown, Seq: 10, Reason: messages.ReasonRunnerExited},
		"late":    {State: messages.StateFailed, Seq: 8, Reason: messages.ReasonDeadline, Error: &messages.Error{Code: messages.CodeDeadlineExceeded}},
		"stopped": {State: messages.StateFailed, Seq: 8, Reason: messages.ReasonStopped, Error: &messages.Error{Code: messages.CodeMachineStopped}},
	}
	added := fx.rec.events[before:]
	if len(added) != len(want) {
		t.Fatalf("published %d events, want %d: %+v", len(added), len(want), added)
	}
	for _, got := range added {
		w, ok := want[got.JobID]
		if !ok || got.State != w.State || got.Seq != w.Seq || got.Reason != w.Reason || got.Host != "h1" || got.Attempt != 0 ||
			(w.Error == nil) != (got.Error == nil) || (w.Error != nil && got.Error.Code != w.Error.Code) {
			t.Fatalf("published %+v, want %+v", got, w)
		}
	}
	// Once is enough: a second run finds them ended.
	if err := m.FinishTeardowns(ctx); err != nil {
		t.Fatal(err)
	}
	if n := len(fx.rec.events); n != before+len(want) {
		t.Fatalf("a second run published %d more events", n-before-len(want))
	}
	if got := fx.rec.states("exited"); !slices.Equal(got, []messages.State{messages.StateTearingDown, messages.StateTornDown}) {
		t.Fatalf("exited: %v", got)
	}
}

// TestFinishTeardownsEndsVanishedMachines: a job that was ready on this
// host, whose machine went while no worker ran (its libvirtd restarted
// and lost it), is ended by the restarted worker: as a stopped machine
// found at start (5.2 M), or after its runner's exit as that teardown
// (5.2 L). Before, nothing ended it: the job stayed at runner_started for
// good (found by the soak, seed 4).
func TestFinishTeardownsEndsVanishedMachines(t *testing.T) {
	fx := newFixture()
	ctx := context.Background()
	m := New(Config{Host: "h1", Machines: fx.fm, Events: fx.rec, History: fx.rec, Journal: fx.rec, Now: fx.clk.Now})
	ev := func(job, host string, state messages.State, seq uint64) {
		if err := fx.rec.Publish(ctx, messages.Event{V: 1, JobID: job, Host: host, Domain: "stretchy-" + job,
			State: state, Time: fx.clk.Now(), Seq: seq, Attempt: 1}, job+":"+string(state)); err != nil {
			t.Fatal(err)
		}
	}
	ev("gone", "h1", messages.StateRunnerStarted, 7)
	ev("exited", "h1", messages.StateRunnerExited, 8)
	// Left alone: a machine that exists (reconciliation adopts it), one
	// another host serves, one not acknowledged yet (its request comes
	// again), and one that ended.
	ev("present", "h1", messages.StateRunnerStarted, 7)
	fx.fm.machines["present"] = &provision.Machine{Name: "stretchy-present", JobID: "present", Host: "h1"}
	ev("theirs", "h2", messages.StateRunnerStarted, 7)
	ev("booting", "h1", messages.StateRunning, 5)
	ev("ended", "h1", messages.StateRunnerStarted, 7)
	ev("ended", "h2", messages.StateFailed, 8)
	before := len(fx.rec.events)

	if err := m.FinishTeardowns(ctx); err != nil {
		t.Fatal(err)
	}
	type want struct {
		state  messages.State
		seq    uint64
		reason string
		code   messages.ErrorCode
		msgID  string
	}
	wants := map[string][]want{
		"gone": {
			{messages.StateTearingDown, 8, messages.ReasonReconcile, "", "gone:tearing_down:reconcile"},
			{messages.StateFailed, 9, messages.ReasonReconcile, messages.CodeMachineStopped, "gone:failed:reconcile"},
		},
		"exited": {
			{messages.StateTearingDown, 9, messages.ReasonRunnerExited, "", "exited:tearing_down:runner_exited"},
			{messages.StateTornDown, 10, messages.ReasonRunnerExited, "", "exited:torn_down:runner_exited"},
		},
	}
	added := fx.rec.events[before:]
	if len(added) != 4 {
		t.Fatalf("published %d events, want 4: %+v", len(added), added)
	}
	for job, ws := range wants {
		var got []messages.Event
		for _, e := range added {
			if e.JobID == job {
				got = append(got, e)
			}
		}
		if len(got) != len(ws) {
			t.Fatalf("%s: published %+v", job, got)
		}
		for i, w := range ws {
			g := got[i]
			code := messages.ErrorCode("")
			if g.Error != nil {
				code = g.Error.Code
			}
			if g.State != w.state || g.Seq != w.seq || g.Reason != w.reason || code != w.code || g.Attempt != 0 || g.Host != "h1" {
				t.Errorf("%s event %d = %+v, want %+v", job, i, g, w)
			}
			if _, ok := fx.rec.ids[w.msgID]; !ok {
				t.Errorf("%s: no event with Nats-Msg-Id %s", job, w.msgID)
			}
		}
	}
	if err := m.FinishTeardowns(ctx); err != nil {
		t.Fatal(err)
	}
	if n := len(fx.rec.events); n != before+4 {
		t.Fatalf("a second run published %d more events", n-before-4)
	}
}

// TestReconcileFinishesHalfRemovedMachine: a worker killed inside a
// removal (the domain destroyed, not yet undefined) leaves a shut-off
// machine whose job's newest event is its tearing_down. The restarted
// worker does that teardown again with its reason, and the job ends as
// it would have. Before, reconciliation took it for a machine that
// stopped by itself and ended a job whose runner had exited with failed
// machine_stopped (soak, seed 4).
func TestReconcileFinishesHalfRemovedMachine(t *testing.T) {
	for _, tc := range []struct {
		reason string
		state  messages.State
		code   messages.ErrorCode
	}{
		{messages.ReasonRunnerExited, messages.StateTornDown, ""},
		{messages.ReasonRequested, messages.StateTornDown, ""},
		{messages.ReasonStopped, messages.StateFailed, messages.CodeMachineStopped},
	} {
		t.Run(tc.reason, func(t *testing.T) {
			fx := newFixture()
			ctx := context.Background()
			for i, st := range []messages.State{messages.StateRunning, messages.StateTearingDown} {
				ev := messages.Event{V: 1, JobID: "j", Host: "h1", Domain: "stretchy-j", State: st, Seq: uint64(5 + i), Time: fx.clk.Now()}
				id := "j:running:1"
				if st == messages.StateTearingDown {
					ev.Reason, id = tc.reason, "j:tearing_down:"+tc.reason
				}
				if err := fx.rec.Publish(ctx, ev, id); err != nil {
					t.Fatal(err)
				}
			}
			fx.fm.machines["j"] = &provision.Machine{Name: "stretchy-j", JobID: "j", Image: "debian", Host: "h1", Running: false}
			if err := fx.m.Reconcile(ctx); err != nil {
				t.Fatal(err)
			}
			tickAll(t, fx.m)
			waitFor(t, func() bool { return fx.rec.last("j").State.Terminal() })
			last := fx.rec.last("j")
			code := messages.ErrorCode("")
			if last.Error != nil {
				code = last.Error.Code
			}
			if last.State != tc.state || last.Reason != tc.reason || code != tc.code {
				t.Fatalf("the job ended %s (%s) %s, want %s (%s) %s; events %v", last.State, last.Reason, code, tc.state, tc.reason, tc.code, fx.rec.states("j"))
			}
			if _, ok := fx.fm.machines["j"]; ok {
				t.Fatal("the machine is still there")
			}
		})
	}
}

// TestTeardownOfJobThatWentElsewhere: a teardown sent to the host of a
// job's newest event reaches it after the job went on on another host
// (this one died or stalled mid-build; its redelivery went there). This
// host has no machine of the job and publishes nothing: the job's end is
// the other host's. Before, it published torn_down with unknown_job, a
// second terminal event of a job another host ran (soak, seed 7, in a
// teardown storm).
func TestTeardownOfJobThatWentElsewhere(t *testing.T) {
	for _, tc := range []struct {
		name  string
		other []messages.State // the other host's events, after this host's
		drop  bool             // a third host's dropped (holder h2) comes last
	}{
		{"building there", []messages.State{messages.StateAccepted, messages.StateCloning}, false},
		{"ended there", []messages.State{messages.StateAccepted, messages.StateRunnerStarted, messages.StateTearingDown, messages.StateTornDown}, false},
		{"dropped by a third host", []messages.State{messages.StateAccepted, messages.StateRunnerStarted}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx := newFixture()
			ctx := context.Background()
			seq := uint64(0)
			pub := func(host string, st messages.State, attempt int, mod ...func(*messages.Event)) {
				seq++
				ev := messages.Event{V: 1, JobID: "j", Host: host, State: st, Seq: seq, Attempt: attempt, Time: fx.clk.Now()}
				for _, m := range mod {
					m(&ev)
				}
				if err := fx.rec.Publish(ctx, ev, fmt.Sprintf("j:%s:%d:%s", st, attempt, host)); err != nil {
					t.Fatal(err)
				}
			}
			pub("h1", messages.StateAccepted, 1)
			pub("h1", messages.StateCloning, 1)
			for _, st := range tc.other {
				pub("h2", st, 2)
			}
			if tc.drop {
				pub("h3", messages.StateDropped, 3, func(e *messages.Event) { e.Holder = "h2" })
			}
			before := len(fx.rec.events)
			if err := fx.m.Teardown(ctx, "j", messages.ReasonRequested, nil, first); err != nil {
				t.Fatalf("teardown: %v, want it acknowledged", err)
			}
			if got := fx.rec.events[before:]; len(got) != 0 {
				t.Fatalf("h1 published %+v for a job h2 serves or ended", got)
			}
		})
	}
	// A job nobody else has events of still gets its unknown_job.
	fx := newFixture()
	if err := fx.m.Teardown(context.Background(), "solo", messages.ReasonRequested, nil, first); err != nil {
		t.Fatal(err)
	}
	if last := fx.rec.last("solo"); last.State != messages.StateTornDown || last.Error == nil || last.Error.Code != messages.CodeUnknownJob {
		t.Fatalf("teardown of an unknown job: %+v, want torn_down unknown_job", last)
	}
}

// flakyHistory fails every read while down is set, as a NATS cluster that
// lost its quorum does.
type flakyHistory struct {
	History
	down *atomic.Bool
}

func (f flakyHistory) LastEvent(ctx context.Context, jobID, host string) (messages.Event, bool, error) {
	if f.down.Load() {
		return messages.Event{}, false, errors.New("nats: no response from stream")
	}
	return f.History.LastEvent(ctx, jobID, host)
}

// unlistable fails List while down is set, as a libvirtd that does not
// answer.
type unlistable struct {
	*fakeMachines
	down *atomic.Bool
}

func (u unlistable) List(ctx context.Context) ([]provision.Machine, error) {
	if u.down.Load() {
		return nil, errors.New("not connected to libvirt")
	}
	return u.fakeMachines.List(ctx)
}

// TestMachinesNotTakenOverCount: machines that a worker's first
// reconciliation finds but cannot take over (the job's history does not
// answer) or cannot even list still count against --max-vms, and the
// reconciliation is tried again. Before, a worker restarted while its
// NATS cluster recovered counted 0 of its 8 machines and built 5 more on
// a host with --max-vms 8 (soak, seed 8).
func TestMachinesNotTakenOverCount(t *testing.T) {
	fx := newFixture()
	ctx := context.Background()
	var historyDown, libvirtDown atomic.Bool
	machines := unlistable{fx.fm, &libvirtDown}
	m := New(Config{Host: "h1", Machines: machines, Events: fx.rec, History: flakyHistory{fx.rec, &historyDown}, Now: fx.clk.Now})
	defer m.Close()
	for _, j := range []string{"j1", "j2"} {
		if err := fx.rec.Publish(ctx, messages.Event{V: 1, JobID: j, Host: "h1", State: messages.StateRunning, Seq: 5}, j+":running:1"); err != nil {
			t.Fatal(err)
		}
		fx.fm.machines[j] = &provision.Machine{Name: "stretchy-" + j, JobID: j, Host: "h1", Image: "debian", Running: true}
	}
	libvirtDown.Store(true)
	if err := m.Reconcile(ctx); err == nil {
		t.Fatal("a reconciliation that could not list the machines succeeded")
	}
	if _, ok := m.TryReserve(8); ok || !m.Unreconciled() {
		t.Fatalf("room reserved with the host's machines not listed (unreconciled %v)", m.Unreconciled())
	}
	libvirtDown.Store(false)
	historyDown.Store(true)
	if err := m.Reconcile(ctx); err == nil {
		t.Fatal("a reconciliation without the history succeeded")
	}
	if got := m.Active(); got != 2 || !m.Unreconciled() {
		t.Fatalf("Active = %d, unreconciled %v; want the 2 machines left alone counted", got, m.Unreconciled())
	}
	if _, ok := m.TryReserve(2); ok {
		t.Fatal("room reserved beyond --max-vms 2 beside 2 machines not taken over")
	}
	release, ok := m.TryReserve(3)
	if !ok {
		t.Fatal("no room under --max-vms 3")
	}
	release()
	historyDown.Store(false)
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if got := m.Active(); got != 2 || m.Unreconciled() {
		t.Fatalf("after a reconciliation that took them over: Active = %d, unreconciled %v", got, m.Unreconciled())
	}
}

// TestTeardownAfterOwnEndAndAnotherHostsDrop: this host ended a job
// (failed, its machine stopped), then another host's late delivery of the
// request dropped it, naming this host as the holder; a teardown reaches a
// restarted process of this host, which remembers nothing. The job ended
// here already: the teardown is acked without a second terminal event.
// Before, the other host's dropped hid this host's end, and a torn_down
// with unknown_job followed the failed (soak, seed 231082382223670582).
func TestTeardownAfterOwnEndAndAnotherHostsDrop(t *testing.T) {
	fx := newFixture()
	ctx := context.Background()
	seq := uint64(0)
	pub := func(host string, st messages.State, attempt int, mod ...func(*messages.Event)) {
		seq++
		ev := messages.Event{V: 1, JobID: "j", Host: host, State: st, Seq: seq, Attempt: attempt, Time: fx.clk.Now()}
		for _, m := range mod {
			m(&ev)
		}
		if err := fx.rec.Publish(ctx, ev, fmt.Sprintf("j:%s:%d:%s", st, attempt, host)); err != nil {
			t.Fatal(err)
		}
	}
	pub("h1", messages.StateAccepted, 1)
	pub("h1", messages.StateAgentReady, 1)
	pub("h1", messages.StateTearingDown, 0, func(e *messages.Event) { e.Reason = messages.ReasonStopped })
	pub("h1", messages.StateFailed, 0, func(e *messages.Event) {
		e.Reason, e.Error = messages.ReasonStopped, &messages.Error{Code: messages.CodeMachineStopped, Message: "stopped by itself"}
	})
	pub("h2", messages.StateDropped, 2, func(e *messages.Event) { e.Reason, e.Holder = messages.ReasonClaimedElsewhere, "h1" })
	before := len(fx.rec.events)
	if err := fx.m.Teardown(ctx, "j", messages.ReasonRequested, nil, first); err != nil {
		t.Fatalf("teardown: %v, want it acknowledged", err)
	}
	if got := fx.rec.events[before:]; len(got) != 0 {
		t.Fatalf("h1 published %+v after its own failed", got)
	}
}
