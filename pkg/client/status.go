package client

import (
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Status is what a job's events so far say about it. The zero value is a
// job without events; Apply folds in its events in stream order (which
// Events and Job.Follow yield), so that it never has to be worked out from
// docs/protocol.md:
//
//   - A redelivered provision (a higher Attempt) starts again at accepted;
//     State follows the newest event, whatever attempt it belongs to.
//   - A dropped event is not a step of the job: the host that published it
//     let go of the job, whose claim another host holds (its Holder), and
//     that host's events carry the job on. It changes neither State nor
//     the outcome, and names the serving Host.
//   - The outcome is the first terminal event, torn_down or failed
//     (messages.State.Terminal), with held_until when the machine is kept
//     after the job; a released event that follows says the held machine
//     is gone. Events after the outcome (a later teardown of a machine a
//     failed teardown left, docs/protocol.md 5.2 O) do not change it.
//   - A torn_down with error unknown_job from a host other than the one
//     serving the job is a teardown sent to the wrong host, which leaves
//     the machine alone (docs/protocol.md 2.5): it is passed over. From
//     the serving host, or before any host served the job, it is the
//     outcome: the job ended before it began (5.2 H).
type Status struct {
	JobID string
	// Host is the host that serves the job, to which teardowns and
	// control requests go: the host of its newest event, except that a
	// dropped event names the holder of the job's claim instead. Empty
	// until the job has an event.
	Host string
	// State, Attempt and Seq are those of the job's newest event other
	// than dropped and released (and than those a teardown sent to the
	// wrong host answered, and than any after the outcome); State is
	// empty until the job has such an event.
	State   messages.State
	Attempt int
	Seq     uint64
	// Image and OS are the job's, once an event named them.
	Image, OS string
	// ExitCode is the runner's exit status, once it exited
	// (runner_exited).
	ExitCode *int
	// Error is the newest error an event of the job carried.
	Error *messages.Error
	// Start is the time of the job's first event, Last that of the
	// newest event that changed the job.
	Start, Last time.Time
	// Outcome is set once the job ended.
	Outcome *Outcome
	// Released is when a held machine of the ended job was removed.
	Released time.Time
	// Events counts the events applied; Dropped the dropped events among
	// them.
	Events, Dropped int
	// Event is the newest event applied.
	Event messages.Event
}

// Outcome is how a job ended: its terminal event.
type Outcome struct {
	JobID string
	// State is messages.StateTornDown or messages.StateFailed.
	State messages.State
	// Host is the host that reported the end.
	Host string
	Time time.Time
	// Reason says why the machine was removed: runner_exited, requested,
	// deadline, ... (docs/protocol.md 5.4).
	Reason string
	// ExitCode is the runner's exit status when the runner exited;
	// nil when the job was torn down before (or has no runner). A job
	// whose runner exited ends torn_down whatever the code: the job's
	// result is at the forge or controller.
	ExitCode *int
	// Error is set on failed, and on a torn_down of a job its host did
	// not know (unknown_job).
	Error *messages.Error
	// HeldUntil, when set, is how long the job's machine is kept, shut
	// off, for debugging (docs/protocol.md 6.8).
	HeldUntil time.Time
}

// Held reports whether the job's machine is kept after its end.
func (o Outcome) Held() bool { return !o.HeldUntil.IsZero() }

// Err is nil for a job torn down, and a *JobError for a job that failed.
func (o Outcome) Err() error {
	if o.State != messages.StateFailed {
		return nil
	}
	e := &JobError{JobID: o.JobID, Host: o.Host, Code: messages.CodeInternal, Message: "failed without an error"}
	if o.Error != nil {
		e.Code, e.Message = o.Error.Code, o.Error.Message
	}
	return e
}

// Ended reports whether the job has its outcome.
func (s *Status) Ended() bool { return s.Outcome != nil }

// Apply folds ev, the job's next event in stream order, into s.
func (s *Status) Apply(ev messages.Event) {
	if s.JobID == "" {
		s.JobID = ev.JobID
	}
	s.Events++
	s.Event = ev
	if s.Start.IsZero() {
		s.Start = ev.Time
	}
	switch {
	case ev.State == messages.StateDropped:
		s.Dropped++
		if ev.Holder != "" && s.Outcome == nil {
			s.Host = ev.Holder
		}
		return
	case ev.State == messages.StateReleased:
		s.Released = ev.Time
		return
	case s.Outcome != nil:
		return
	case ev.State == messages.StateTornDown && ev.Error != nil && ev.Error.Code == messages.CodeUnknownJob &&
		s.Host != "" && s.Host != ev.Host:
		return // a teardown sent to another host
	}
	s.Host, s.State, s.Attempt, s.Seq, s.Last = ev.Host, ev.State, ev.Attempt, ev.Seq, ev.Time
	if ev.Image != "" {
		s.Image = ev.Image
	}
	if ev.OS != "" {
		s.OS = ev.OS
	}
	if ev.ExitCode != nil {
		code := *ev.ExitCode
		s.ExitCode = &code
	}
	if ev.Error != nil {
		e := *ev.Error
		s.Error = &e
	}
	if ev.State.Terminal() {
		s.Outcome = &Outcome{JobID: s.JobID, State: ev.State, Host: ev.Host, Time: ev.Time, Reason: ev.Reason,
			ExitCode: s.ExitCode, HeldUntil: ev.HeldUntil}
		if ev.Error != nil {
			s.Outcome.Error = s.Error
		}
	}
}
