package worker

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// fakeHost is a stateful stand-in for libvirt and the guest agents of its
// machines: the scheduling tests need builds that stay in flight until the
// test lets them go on, and runners, guests and deadlines that end on
// demand, which a real guest cannot do at an exact moment.
type fakeHost struct {
	mu       sync.Mutex
	machines map[string]*fakeMachine // by job id
	// gates hold WaitReady of a job's machine until closed.
	gates   map[string]chan struct{}
	nextPID int
	// stdin is what the commands run in each job's guest read, in order.
	stdin map[string][]string
}

type fakeMachine struct {
	provision.Machine
	exited bool // the runner's launcher exited
}

func newFakeHost() *fakeHost {
	return &fakeHost{machines: map[string]*fakeMachine{}, gates: map[string]chan struct{}{}}
}

// hold makes the build of jobID wait for its guest agent until the
// returned function is called.
func (h *fakeHost) hold(jobID string) (release func()) {
	ch := make(chan struct{})
	h.mu.Lock()
	h.gates[jobID] = ch
	h.mu.Unlock()
	var once sync.Once
	return func() { once.Do(func() { close(ch) }) }
}

func (h *fakeHost) exitRunner(jobID string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.machines[jobID].exited = true
}

func (h *fakeHost) stopGuest(jobID string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.machines[jobID].Running = false
}

func (h *fakeHost) count() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.machines)
}

func (h *fakeHost) Clone(_ context.Context, s provision.Spec) (provision.Machine, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.machines[s.JobID]; ok {
		return provision.Machine{}, provision.ErrExists
	}
	m := provision.Machine{Name: provision.DomainName(s.JobID), Key: s.JobID, JobID: s.JobID, Image: s.Image,
		Host: s.Host, Deadline: s.Deadline, RunnerKind: s.RunnerKind, OS: "linux", ScratchGiB: s.ScratchGiB}
	h.machines[s.JobID] = &fakeMachine{Machine: m}
	return m, nil
}

func (h *fakeHost) Start(_ context.Context, jobID string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	m, ok := h.machines[jobID]
	if !ok {
		return provision.ErrNotFound
	}
	m.Running = true
	return nil
}

func (h *fakeHost) Remove(_ context.Context, jobID string) (bool, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.machines[jobID]
	delete(h.machines, jobID)
	return ok, nil
}

func (h *fakeHost) Lookup(_ context.Context, jobID string) (provision.Machine, bool, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	m, ok := h.machines[jobID]
	if !ok {
		return provision.Machine{}, false, nil
	}
	return m.Machine, true, nil
}

func (h *fakeHost) List(context.Context) ([]provision.Machine, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []provision.Machine
	for _, m := range h.machines {
		out = append(out, m.Machine)
	}
	return out, nil
}

func (h *fakeHost) ListOrphanVolumes(context.Context) ([]string, error) { return nil, nil }

// The guest agent side of fakeHost (lifecycle.Agent).

func (h *fakeHost) jobOf(domain string) string { return domain[len("stretchy-"):] }

func (h *fakeHost) WaitReady(ctx context.Context, domain string) error {
	h.mu.Lock()
	gate := h.gates[h.jobOf(domain)]
	h.mu.Unlock()
	if gate == nil {
		return nil
	}
	select {
	case <-gate:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wait for the agent of %s: %w", domain, ctx.Err())
	}
}

func (h *fakeHost) OSInfo(context.Context, string) (qga.OSInfo, error) {
	return qga.OSInfo{ID: "debian"}, nil
}

func (h *fakeHost) Run(_ context.Context, domain string, req qga.ExecRequest) (qga.Status, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stdin == nil {
		h.stdin = map[string][]string{}
	}
	h.stdin[h.jobOf(domain)] = append(h.stdin[h.jobOf(domain)], string(req.Stdin))
	return qga.Status{Exited: true}, nil
}

// stdinOf returns what the commands run in jobID's guest read.
func (h *fakeHost) stdinOf(jobID string) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.stdin[jobID]...)
}

func (h *fakeHost) Status(_ context.Context, domain string, _ int) (qga.Status, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	m, ok := h.machines[h.jobOf(domain)]
	if !ok || !m.exited {
		return qga.Status{ExitCode: -1}, nil
	}
	return qga.Status{Exited: true}, nil
}

// agent adapts fakeHost to lifecycle.Agent, whose Start would clash with
// the Machines method of the same name.
type agent struct{ *fakeHost }

func (a agent) Start(context.Context, string, qga.ExecRequest) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.nextPID++
	return a.nextPID, nil
}

// eventLog records every event published, in order, as a subscriber of
// the event subjects sees them.
type eventLog struct {
	mu     sync.Mutex
	events []messages.Event
}

func watchEvents(t *testing.T, url string) *eventLog {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	l := &eventLog{}
	if _, err := nc.Subscribe(messages.EventSubjects, func(m *nats.Msg) {
		ev, err := messages.DecodeEvent(m.Data)
		if err != nil {
			return
		}
		l.mu.Lock()
		l.events = append(l.events, ev)
		l.mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return l
}

// has reports whether jobID has published an event in state.
func (l *eventLog) has(jobID string, state messages.State) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, ev := range l.events {
		if ev.JobID == jobID && ev.State == state {
			return true
		}
	}
	return false
}

func (l *eventLog) of(jobID string) []messages.Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []messages.Event
	for _, ev := range l.events {
		if ev.JobID == jobID {
			out = append(out, ev)
		}
	}
	return out
}

// terminal returns the terminal events of jobID.
func (l *eventLog) terminal(jobID string) []messages.Event {
	var out []messages.Event
	for _, ev := range l.of(jobID) {
		if ev.State.Terminal() {
			out = append(out, ev)
		}
	}
	return out
}

// scheduleEnv is one host's worker over fakes, against a real in-process
// JetStream, with the production pull wait.
type scheduleEnv struct {
	env  advisoryEnv
	host *fakeHost
	log  *eventLog
	w    *Worker
}

func startScheduleWorker(t *testing.T, parallelism int) *scheduleEnv {
	t.Helper()
	env := startServer(t)
	se := &scheduleEnv{env: env, host: newFakeHost(), log: watchEvents(t, env.url)}
	js := connect(t, env.url)
	const hostID = "sched"
	cons, err := bus.Ensure(context.Background(), js, bus.Topology{Host: hostID, AckWait: 3 * time.Second, MaxDeliver: 2})
	if err != nil {
		t.Fatal(err)
	}
	pub := bus.NewPublisher(js)
	slots := NewSlots(parallelism)
	life := lifecycle.New(lifecycle.Config{Host: hostID, Machines: se.host, Agent: agent{se.host},
		Events: pub, History: pub, Slots: slots})
	// PullWait is left at its production default (2s): a pull that held
	// a slot while it waited starved the worker's own teardowns.
	se.w = New(Config{Parallelism: parallelism, MaxVMs: 8, AckWait: 3 * time.Second, MaxDeliver: 2,
		WatchInterval: 100 * time.Millisecond, NATS: js.Conn(), Slots: slots}, cons, life)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- se.w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		life.Close()
	})
	return se
}

func (se *scheduleEnv) submit(t *testing.T, jobID string, lifetime time.Duration) {
	t.Helper()
	req := messages.Provision{V: 1, JobID: jobID, Image: "debian-12", RequestedAt: time.Now().UTC(),
		MaxLifetimeS: int64(lifetime / time.Second),
		Runner: messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
			URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: "token-" + jobID, Labels: []string{"debian"},
		}}}
	if _, err := submitProvision(context.Background(), se.env.js, req, ""); err != nil {
		t.Fatal(err)
	}
}

func (se *scheduleEnv) teardown(t *testing.T, jobID string) {
	t.Helper()
	if err := submitTeardown(context.Background(), se.env.js, jobID, "sched"); err != nil {
		t.Fatal(err)
	}
}

func (se *scheduleEnv) await(t *testing.T, jobID string, state messages.State) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%s of %s", state, jobID), func() bool { return se.log.has(jobID, state) })
}

// TestSelfStartedTeardownsDoNotWaitForIdlePulls: at parallelism 1, 2 and
// 3, with every slot but one held by a build that waits for its guest
// agent (so the pull loop idles on the only free slot), a runner exit, a
// deadline and a guest that stopped each end their machine while those
// builds are still held; the teardown never waits for the idle pull. At
// parallelism 1 a next job then starts. Before the fix the pull held the
// free slot for all but an instant of every 2 s, so none of these
// teardowns began (parallelism 1) or began only when a build finished.
func TestSelfStartedTeardownsDoNotWaitForIdlePulls(t *testing.T) {
	causes := []struct {
		name     string
		lifetime time.Duration
		cause    func(h *fakeHost, jobID string)
		reason   string
		end      messages.State
	}{
		{"runner exit", time.Hour, (*fakeHost).exitRunner, messages.ReasonRunnerExited, messages.StateTornDown},
		{"deadline", 3 * time.Second, func(*fakeHost, string) {}, messages.ReasonDeadline, messages.StateFailed},
		{"stopped guest", time.Hour, (*fakeHost).stopGuest, messages.ReasonStopped, messages.StateFailed},
	}
	for _, parallelism := range []int{1, 2, 3} {
		for _, c := range causes {
			t.Run(fmt.Sprintf("parallelism %d/%s", parallelism, c.name), func(t *testing.T) {
				t.Parallel()
				se := startScheduleWorker(t, parallelism)
				se.submit(t, "victim", c.lifetime)
				se.await(t, "victim", messages.StateRunnerStarted)

				// Every other slot: a build held at its guest agent.
				var held []string
				for i := range parallelism - 1 {
					job := fmt.Sprintf("held-%d", i)
					release := se.host.hold(job)
					t.Cleanup(release)
					se.submit(t, job, time.Hour)
					se.await(t, job, messages.StateRunning)
					held = append(held, job)
				}

				c.cause(se.host, "victim")
				se.await(t, "victim", c.end)
				ev := se.log.terminal("victim")
				if len(ev) != 1 || ev[0].Reason != c.reason {
					t.Fatalf("victim's terminal events %+v, want one %s with reason %s", ev, c.end, c.reason)
				}
				for _, job := range held {
					if se.log.has(job, messages.StateAgentReady) {
						t.Fatalf("%s passed its held guest agent", job)
					}
				}

				if parallelism == 1 {
					// The slot is free again: the next job starts and ends.
					se.submit(t, "next", time.Hour)
					se.await(t, "next", messages.StateRunnerStarted)
					se.host.exitRunner("next")
					se.await(t, "next", messages.StateTornDown)
				}
				for _, job := range held {
					se.teardown(t, job)
					se.await(t, job, messages.StateTornDown)
				}
				waitFor(t, "every machine removed", func() bool { return se.host.count() == 0 })
				if st := se.w.Stats(); st.MaxInFlight > int64(parallelism) {
					t.Fatalf("%d operations ran at once at parallelism %d", st.MaxInFlight, parallelism)
				}
			})
		}
	}
}

// TestTeardownOfBuildUsesTheBuildsSlot: with every slot held by a build
// waiting for its guest agent, a teardown request for one of them ends
// that build in the build's own slot, at once, while the others stay held;
// before, the teardown waited for a free slot, that is for a whole boot.
func TestTeardownOfBuildUsesTheBuildsSlot(t *testing.T) {
	se := startScheduleWorker(t, 3)
	jobs := []string{"b-0", "b-1", "b-2"}
	for _, job := range jobs {
		t.Cleanup(se.host.hold(job))
		se.submit(t, job, time.Hour)
		se.await(t, job, messages.StateRunning)
	}
	se.teardown(t, "b-1")
	se.await(t, "b-1", messages.StateTornDown)
	evs := se.log.of("b-1")
	var states []messages.State
	for _, ev := range evs {
		states = append(states, ev.State)
	}
	want := []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateCloned,
		messages.StateBooting, messages.StateRunning, messages.StateTearingDown, messages.StateTornDown}
	if fmt.Sprint(states) != fmt.Sprint(want) {
		t.Fatalf("b-1's events %v, want %v", states, want)
	}
	if last := evs[len(evs)-1]; last.Reason != messages.ReasonRequested || last.Attempt != 1 {
		t.Fatalf("torn_down %+v, want reason requested and the teardown's attempt 1", last)
	}
	for _, job := range []string{"b-0", "b-2"} {
		if se.log.has(job, messages.StateAgentReady) || se.log.has(job, messages.StateTearingDown) {
			t.Fatalf("%s moved on while the teardown of b-1 ran", job)
		}
	}
	if _, found, _ := se.host.Lookup(context.Background(), "b-1"); found {
		t.Fatal("b-1's machine is still there")
	}
	for _, job := range []string{"b-0", "b-2"} {
		se.teardown(t, job)
		se.await(t, job, messages.StateTornDown)
	}
	if st := se.w.Stats(); st.MaxInFlight > 3 {
		t.Fatalf("%d operations ran at once at parallelism 3", st.MaxInFlight)
	}
}
