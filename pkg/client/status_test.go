package client

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// history builds a job's events in stream order: each step is (host,
// state, attempt) with optional changes.
type step struct {
	host    string
	state   messages.State
	attempt int
	with    func(*messages.Event)
}

var t0 = time.Date(2026, 11, 27, 5, 0, 0, 0, time.UTC)

func history(steps ...step) []messages.Event {
	var out []messages.Event
	for i, s := range steps {
		ev := messages.Event{V: 1, JobID: "j1", Host: s.host, Image: "debian-12", State: s.state, Attempt: s.attempt,
			Seq: uint64(i + 1), Time: t0.Add(time.Duration(i) * time.Second)}
		if s.with != nil {
			s.with(&ev)
		}
		out = append(out, ev)
	}
	return out
}

func code(n int) func(*messages.Event) { return func(ev *messages.Event) { ev.ExitCode = &n } }

func reason(r string) func(*messages.Event) { return func(ev *messages.Event) { ev.Reason = r } }

func failure(c messages.ErrorCode) func(*messages.Event) {
	return func(ev *messages.Event) { ev.Error = &messages.Error{Code: c, Message: string(c)} }
}

func held(until time.Time) func(*messages.Event) {
	return func(ev *messages.Event) {
		ev.HeldUntil = until
		ev.Error = &messages.Error{Code: messages.CodeBootTimeout, Message: "x"}
	}
}

func dropped(holder string) func(*messages.Event) {
	return func(ev *messages.Event) { ev.Holder = holder; ev.Reason = messages.ReasonClaimLost }
}

// TestStatusFolds pins how Status.Apply reads a job's history, path by
// path of docs/protocol.md 5.2.
func TestStatusFolds(t *testing.T) {
	const a, b = "host-a", "host-b"
	until := t0.Add(time.Hour)
	tests := []struct {
		name    string
		events  []messages.Event
		host    string
		state   messages.State
		attempt int
		outcome messages.State // "" for none
		exit    *int
		code    messages.ErrorCode
		held    bool
		release bool
	}{
		{"A: success, the runner's exit code", history(
			step{a, messages.StateAccepted, 1, nil}, step{a, messages.StateAgentReady, 1, nil},
			step{a, messages.StateRunnerStarted, 1, nil}, step{a, messages.StateRunnerExited, 0, code(3)},
			step{a, messages.StateTearingDown, 0, reason(messages.ReasonRunnerExited)},
			step{a, messages.StateTornDown, 0, reason(messages.ReasonRunnerExited)},
		), a, messages.StateTornDown, 0, messages.StateTornDown, new(3), "", false, false},
		{"in progress", history(
			step{a, messages.StateAccepted, 1, nil}, step{a, messages.StateCloning, 1, nil},
		), a, messages.StateCloning, 1, "", nil, "", false, false},
		{"F: a redelivery starts again at accepted", history(
			step{a, messages.StateAccepted, 1, nil}, step{a, messages.StateCloning, 1, nil}, step{a, messages.StateCloned, 1, nil},
			step{b, messages.StateAccepted, 2, nil},
		), b, messages.StateAccepted, 2, "", nil, "", false, false},
		{"Q: another host's dropped names the holder and changes nothing else", history(
			step{a, messages.StateAccepted, 1, nil}, step{a, messages.StateAgentReady, 1, nil},
			step{b, messages.StateDropped, 2, dropped(a)},
		), a, messages.StateAgentReady, 1, "", nil, "", false, false},
		{"R: the stalled host's dropped, then the holder's events", history(
			step{a, messages.StateAccepted, 1, nil}, step{a, messages.StateCloning, 1, nil},
			step{a, messages.StateDropped, 1, dropped(b)},
			step{b, messages.StateAccepted, 2, nil}, step{b, messages.StateAgentReady, 2, nil},
		), b, messages.StateAgentReady, 2, "", nil, "", false, false},
		{"R: the holder named before its first event", history(
			step{a, messages.StateAccepted, 1, nil}, step{a, messages.StateDropped, 1, dropped(b)},
		), b, messages.StateAccepted, 1, "", nil, "", false, false},
		{"a dropped after the outcome changes nothing", history(
			step{b, messages.StateAccepted, 2, nil}, step{b, messages.StateTornDown, 0, nil},
			step{a, messages.StateDropped, 1, dropped(b)},
		), b, messages.StateTornDown, 0, messages.StateTornDown, nil, "", false, false},
		{"C: failed, its code", history(
			step{a, messages.StateAccepted, 1, nil}, step{a, messages.StateCloning, 1, nil},
			step{a, messages.StateFailed, 1, failure(messages.CodeImageNotFound)},
		), a, messages.StateFailed, 1, messages.StateFailed, nil, messages.CodeImageNotFound, false, false},
		{"S: held, then released", history(
			step{a, messages.StateAccepted, 1, nil}, step{a, messages.StateRunning, 1, nil},
			step{a, messages.StateFailed, 1, held(until)}, step{a, messages.StateReleased, 0, reason(messages.ReasonHoldExpired)},
		), a, messages.StateFailed, 1, messages.StateFailed, nil, messages.CodeBootTimeout, true, true},
		{"a teardown sent to another host is passed over", history(
			step{a, messages.StateAccepted, 1, nil}, step{a, messages.StateAgentReady, 1, nil},
			step{b, messages.StateTornDown, 1, failure(messages.CodeUnknownJob)},
		), a, messages.StateAgentReady, 1, "", nil, "", false, false},
		{"H: a teardown before any event ends the job", history(
			step{a, messages.StateTornDown, 1, failure(messages.CodeUnknownJob)},
		), a, messages.StateTornDown, 1, messages.StateTornDown, nil, messages.CodeUnknownJob, false, false},
		{"O: a later teardown of what a failed teardown left keeps the outcome", history(
			step{a, messages.StateAgentReady, 1, nil}, step{a, messages.StateTearingDown, 1, nil},
			step{a, messages.StateFailed, 5, failure(messages.CodeTeardownFailed)},
			step{a, messages.StateTearingDown, 1, nil}, step{a, messages.StateTornDown, 1, nil},
		), a, messages.StateFailed, 5, messages.StateFailed, nil, messages.CodeTeardownFailed, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var st Status
			for _, ev := range tt.events {
				st.Apply(ev)
			}
			if st.JobID != "j1" || st.Host != tt.host || st.State != tt.state || st.Attempt != tt.attempt || st.Events != len(tt.events) {
				t.Fatalf("status %s %s attempt %d (%d events), want %s %s attempt %d", st.Host, st.State, st.Attempt, st.Events, tt.host, tt.state, tt.attempt)
			}
			if !st.Start.Equal(t0) || st.Event.Seq != uint64(len(tt.events)) {
				t.Fatalf("start %s, newest event %d", st.Start, st.Event.Seq)
			}
			if tt.outcome == "" {
				if st.Ended() {
					t.Fatalf("outcome %+v, want none", *st.Outcome)
				}
				return
			}
			if !st.Ended() || st.Outcome.State != tt.outcome || st.Outcome.Host != tt.host || st.Outcome.Held() != tt.held {
				t.Fatalf("outcome %+v, want %s on %s, held %v", st.Outcome, tt.outcome, tt.host, tt.held)
			}
			if (tt.exit == nil) != (st.Outcome.ExitCode == nil) || tt.exit != nil && *tt.exit != *st.Outcome.ExitCode {
				t.Fatalf("exit code %v, want %v", st.Outcome.ExitCode, tt.exit)
			}
			if tt.code == "" && st.Outcome.Error != nil || tt.code != "" && (st.Outcome.Error == nil || st.Outcome.Error.Code != tt.code) {
				t.Fatalf("error %+v, want %q", st.Outcome.Error, tt.code)
			}
			var je *JobError
			if failed := tt.outcome == messages.StateFailed; failed != errors.As(st.Outcome.Err(), &je) || failed && je.Code != tt.code {
				t.Fatalf("Err() = %v, want a *JobError %v", st.Outcome.Err(), failed)
			}
			if tt.release != !st.Released.IsZero() {
				t.Fatalf("released %s, want %v", st.Released, tt.release)
			}
		})
	}
}
