package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// Machines creates, starts and removes job machines. *provision.Provisioner
// implements it.
type Machines interface {
	Clone(ctx context.Context, s provision.Spec) (provision.Machine, error)
	Start(ctx context.Context, jobID string) error
	Remove(ctx context.Context, jobID string) (existed bool, err error)
	Lookup(ctx context.Context, jobID string) (provision.Machine, bool, error)
	List(ctx context.Context) ([]provision.Machine, error)
	ListOrphanVolumes(ctx context.Context) ([]string, error)
}

// Publisher makes an event durable as the next event of its job.
// *bus.Publisher implements it.
type Publisher interface {
	// Append stores ev after the job's event at stream position after
	// (0: none known). When other events of the job were stored since
	// (another host's), ev is renumbered to follow the newest, so seq
	// goes up by one per stored event of the job across hosts. It
	// returns the seq and stream position ev was stored with; publishing
	// twice with the same msgID stores the event once.
	Append(ctx context.Context, ev messages.Event, msgID string, after uint64) (seq, pos uint64, err error)
}

// History tells the newest event already published for a job, so that a job
// picked up again after a restart continues its numbering and the worker
// knows how far it got.
type History interface {
	// LastEvent returns the job's newest event, from host only unless
	// host is empty.
	LastEvent(ctx context.Context, jobID, host string) (ev messages.Event, found bool, err error)
}

// Journal reads a host's recent events, so that a restarted worker can end
// the teardowns its predecessor began (FinishTeardowns). *bus.Publisher
// implements it.
type Journal interface {
	Recent(ctx context.Context, host string, since time.Time) ([]messages.Event, error)
}

// Config wires a Manager.
type Config struct {
	// Host is this worker's host id, carried in every event.
	Host     string
	Machines Machines
	// Agent starts runners in machines; nil means no runner is ever
	// started and machines are ready once they run (for tests of the
	// provisioning steps alone).
	Agent  Agent
	Events Publisher
	// History is optional; without it a job's numbering starts at 1
	// whenever this process first sees the job.
	History History
	// Journal is optional; without it FinishTeardowns does nothing.
	Journal Journal
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Remember is how long finished jobs are remembered so that a repeated
	// provision request does not create a second machine; 0 means 24h.
	Remember time.Duration
	// Faults, when set, is called at the fault points (fault.go); only
	// tests set it.
	Faults Faults
	// Claims, when set, claims every job across hosts before its machine
	// is built and keeps the claim while the machine exists (claim.go).
	Claims Claims
	// ClaimTTL is how long a claim lives unrenewed; it must be below the
	// requests' AckWait. Default 15s.
	ClaimTTL time.Duration
}

// Delivery describes the request message being handled.
type Delivery struct {
	// Attempt is the message's delivery count, from 1.
	Attempt int
	// Final is true when the message will not be delivered again, so a
	// transient failure must be reported as final.
	Final bool
	// Origin names what started a step that no request caused (deadline,
	// reconcile); Attempt is 0 then.
	Origin string
	// Request is the stream sequence of the request message; it ties a
	// job's claim to the request it serves.
	Request uint64
}

// msgID is the event's Nats-Msg-Id: retried publishes of the same step
// are stored once.
func (d Delivery) msgID(jobID string, state messages.State) string {
	if d.Origin != "" {
		return fmt.Sprintf("%s:%s:%s", jobID, state, d.Origin)
	}
	return fmt.Sprintf("%s:%s:%d", jobID, state, d.Attempt)
}

// ErrSuperseded is returned by Provision when a teardown request for the
// same job arrived while the machine was being built; the teardown reports
// the job's end.
var ErrSuperseded = errors.New("provision superseded by teardown")

// Failure is a permanent failure that has been reported with a failed event.
// The request that caused it must not be retried.
type Failure struct {
	Code messages.ErrorCode
	Err  error
}

func (f *Failure) Error() string { return fmt.Sprintf("%s: %v", f.Code, f.Err) }
func (f *Failure) Unwrap() error { return f.Err }

// Manager runs job lifecycles for one host. It is safe for concurrent use.
type Manager struct {
	cfg Config

	mu       sync.Mutex
	jobs     map[string]*job
	reserved int                  // machines promised to requests not yet read
	done     map[string]time.Time // finished jobs, for idempotency
	// roomed is closed and replaced whenever room for a machine may have
	// been freed (CapacityChanged).
	roomed chan struct{}
	// orphans are the volume paths the last reconciliation found without a
	// domain; only the Reconcile goroutine touches it.
	orphans map[string]bool
}

type job struct {
	id     string
	image  string
	domain string
	seq    uint64
	// pos is the stream position of the job's newest event as this host
	// knows it (0: unknown), the condition of its next Append.
	pos      uint64
	deadline time.Time
	running  bool
	// cancel stops an in-flight provision; nil once its build ended.
	cancel context.CancelCauseFunc
	// built is closed when the provision operation has returned.
	built   chan struct{}
	tearing bool
	// endedBy is the teardown that superseded the build in flight; the
	// build ends the job in its own operation slot (TeardownBuild).
	endedBy *supersession
	// retryAt delays the next deadline teardown after a failed one.
	retryAt time.Time

	// The runner: the guest OS family, the runner's guest-agent pid (0
	// when none was started) and what is known of its end. secrets are
	// the job's secret values, scrubbed from the runner's output; an
	// adopted job's are not known (secretsKnown false), so its runner's
	// output is withheld.
	os             string
	pid            int
	runnerSince    time.Time
	secrets        []string
	secretsKnown   bool
	exited         bool
	exitCode       *int
	exitOutput     string
	outputWithheld bool
	// endReason is why an adopted job whose end had begun ends.
	endReason string
	// statusFailures counts consecutive failed runner status checks.
	statusFailures int
	// exitReported is set once runner_exited is published.
	exitReported bool
	// claim is the job's claim across hosts (claim.go).
	claim claim
}

// New returns a Manager.
func New(cfg Config) *Manager {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Remember == 0 {
		cfg.Remember = 24 * time.Hour
	}
	if cfg.ClaimTTL <= 0 {
		cfg.ClaimTTL = 15 * time.Second
	}
	return &Manager{
		cfg:    cfg,
		jobs:   make(map[string]*job),
		done:   make(map[string]time.Time),
		roomed: make(chan struct{}),
	}
}

// CapacityChanged returns a channel that is closed the next time room for a
// machine may have been freed: a job ended or a reservation was given
// back. Take it before TryReserve, so that a change in between is not
// missed.
func (m *Manager) CapacityChanged() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.roomed
}

// roomedLocked wakes the waiters of CapacityChanged.
func (m *Manager) roomedLocked() {
	close(m.roomed)
	m.roomed = make(chan struct{})
}

// Active returns the number of jobs that have, or are building, a machine.
func (m *Manager) Active() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.jobs)
}

// TryReserve reserves room for one more machine under max, counting the
// jobs that have a machine and earlier reservations; ok is false when
// none fits. The caller reads a provision request only then, and calls
// release once that request was handled (its job, if any, then counts on
// its own).
func (m *Manager) TryReserve(max int) (release func(), ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.jobs)+m.reserved >= max {
		return func() {}, false
	}
	m.reserved++
	var once sync.Once
	return func() {
		once.Do(func() {
			m.mu.Lock()
			m.reserved--
			m.roomedLocked()
			m.mu.Unlock()
		})
	}, true
}

// known reports whether this host serves jobID now (active) or finished
// it recently.
func (m *Manager) known(jobID string) (active, finished bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, active = m.jobs[jobID]
	_, finished = m.done[jobID]
	return active, finished
}

// track registers a new job record unless the job is known; it reports
// whether the record is new.
func (m *Manager) track(j *job) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.forgetOldLocked()
	if _, ok := m.jobs[j.id]; ok {
		return false
	}
	if _, ok := m.done[j.id]; ok {
		return false
	}
	m.jobs[j.id] = j
	return true
}

// untrack drops a job record; finished marks the job as done for good.
func (m *Manager) untrack(id string, finished bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.jobs[id]; ok {
		delete(m.jobs, id)
		m.roomedLocked()
	}
	if finished {
		m.done[id] = m.cfg.Now()
	}
}

func (m *Manager) forgetOldLocked() {
	cutoff := m.cfg.Now().Add(-m.cfg.Remember)
	for id, t := range m.done {
		if t.Before(cutoff) {
			delete(m.done, id)
		}
	}
}

// startSeq continues a new record's event numbering from the job's newest
// published event, which it returns (State is empty when there is none or
// the history cannot be read).
func (m *Manager) startSeq(ctx context.Context, j *job) messages.Event {
	last, _ := m.history(ctx, j)
	return last
}

// history is startSeq for callers that must know the history was read.
func (m *Manager) history(ctx context.Context, j *job) (messages.Event, error) {
	if m.cfg.History == nil {
		return messages.Event{}, nil
	}
	last, found, err := m.cfg.History.LastEvent(ctx, j.id, "")
	if err != nil {
		return messages.Event{}, fmt.Errorf("read the events of job %s: %w", j.id, err)
	}
	if !found {
		return messages.Event{}, nil
	}
	j.seq = last.Seq
	return last, nil
}

// emit publishes the next event of j, numbered after the job's newest
// event on the stream, whichever host published it. Events of one job are
// emitted by one goroutine at a time, so j.seq and j.pos need no lock
// beyond the call order.
func (m *Manager) emit(ctx context.Context, j *job, state messages.State, d Delivery, phase time.Duration, reason string, e *messages.Error) error {
	ev := messages.Event{
		V: messages.SchemaVersion, JobID: j.id, Host: m.cfg.Host, Image: j.image, Domain: j.domain,
		State: state, Time: m.cfg.Now().UTC(), Seq: j.seq + 1, Attempt: d.Attempt,
		PhaseMS: phase.Milliseconds(), Reason: reason, Error: e, OS: j.os,
	}
	switch state {
	case messages.StateRunnerStarted:
		ev.RunnerPID = j.pid
	case messages.StateRunnerExited:
		ev.ExitCode, ev.Output, ev.OutputWithheld = j.exitCode, j.exitOutput, j.outputWithheld
	case messages.StateDropped:
		j.claim.mu.Lock()
		ev.Holder = j.claim.lostTo
		j.claim.mu.Unlock()
	}
	msgID := d.msgID(j.id, state)
	switch {
	case e != nil && e.Code == messages.CodeUnknownJob:
		msgID += ":unknown"
	case state == messages.StateDropped:
		// Several hosts may drop deliveries of one job, of one request
		// or of repeated ones.
		msgID += fmt.Sprintf(":%s:%d", m.cfg.Host, d.Request)
	}
	seq, pos, err := m.cfg.Events.Append(ctx, ev, msgID, j.pos)
	if err != nil {
		return fmt.Errorf("publish %s event of job %s: %w", state, j.id, err)
	}
	j.seq, j.pos = seq, pos
	return nil
}
