package check

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

var t0 = time.Date(2026, 12, 8, 10, 0, 0, 0, time.UTC)

// builder makes a history by hand, numbering seq and stream positions as
// the event stream would.
type builder struct {
	h      History
	stream uint64
	seq    map[string]uint64
	at     time.Time
}

func newBuilder() *builder {
	b := &builder{seq: map[string]uint64{}, at: t0}
	b.h.Seed, b.h.Start = 42, t0
	b.h.Fleet = Fleet{AckWait: 6 * time.Second, MaxDeliver: 5, Hosts: []Host{
		{ID: "a", Parallelism: 4, MaxVMs: 8}, {ID: "b", Parallelism: 4, MaxVMs: 8}, {ID: "c", Parallelism: 4, MaxVMs: 8},
	}}
	b.h.Final.Leftovers = map[string][]string{"a": nil, "b": nil, "c": nil}
	return b
}

func (b *builder) tick() time.Time {
	b.at = b.at.Add(100 * time.Millisecond)
	return b.at
}

func (b *builder) job(j Job) {
	j.Submitted = b.tick()
	b.h.Jobs = append(b.h.Jobs, j)
	subject := messages.ProvisionSubject()
	switch j.Route {
	case RouteImage:
		subject = messages.ImageProvisionSubject(j.Image)
	case RoutePinned:
		subject = messages.HostProvisionSubject(j.Host)
	}
	b.stream++
	b.h.Requests = append(b.h.Requests, Request{Time: j.Submitted, JobID: j.ID, Op: "provision", Subject: subject, MsgID: "provision:" + j.ID, Stream: b.stream})
}

func (b *builder) teardown(job, host string) {
	b.stream++
	b.h.Requests = append(b.h.Requests, Request{Time: b.tick(), JobID: job, Op: "teardown", Subject: messages.TeardownSubject(host), MsgID: "teardown:" + host + ":" + job, Stream: b.stream})
}

// ev appends an event of job from host; origin, when not empty, is the
// Nats-Msg-Id's last part instead of the attempt.
func (b *builder) ev(job, host string, state messages.State, attempt int, origin string, mod ...func(*messages.Event)) {
	b.seq[job]++
	b.stream++
	e := messages.Event{V: 1, JobID: job, Host: host, State: state, Seq: b.seq[job], Attempt: attempt, Time: b.tick()}
	for _, m := range mod {
		m(&e)
	}
	id := fmt.Sprintf("%s:%s:%d", job, state, attempt)
	if origin != "" {
		id = fmt.Sprintf("%s:%s:%s", job, state, origin)
	}
	b.h.Events = append(b.h.Events, Event{Stream: b.stream, Subject: messages.EventSubject(host, job, state), MsgID: id, Stored: e.Time, Event: e})
}

func (b *builder) build(job, host string, attempt int, upTo messages.State) {
	for _, s := range []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateCloned, messages.StateBooting,
		messages.StateRunning, messages.StateAgentReady, messages.StateRunnerStarted} {
		b.ev(job, host, s, attempt, "")
		if s == upTo {
			return
		}
	}
}

func (b *builder) exit(job, host string, code int) {
	b.ev(job, host, messages.StateRunnerExited, 0, "runner_exited", func(e *messages.Event) { e.ExitCode = &code })
	b.ev(job, host, messages.StateTearingDown, 0, "runner_exited", reason(messages.ReasonRunnerExited))
	b.ev(job, host, messages.StateTornDown, 0, "runner_exited", reason(messages.ReasonRunnerExited))
}

func reason(r string) func(*messages.Event) { return func(e *messages.Event) { e.Reason = r } }

func failure(c messages.ErrorCode) func(*messages.Event) {
	return func(e *messages.Event) { e.Error = &messages.Error{Code: c, Message: string(c)} }
}

// clean is a history that keeps every promise: a runner that exits, a
// pinned machine torn down by request, a request by image for an image
// nobody carries, a bad request, a job that a stalled host dropped and
// another served, a machine that stopped by itself, and a teardown for a
// job never provisioned.
func clean() *builder {
	b := newBuilder()
	b.job(Job{ID: "j1", Kind: KindRun, Route: RouteImage, Image: "soak-all", Runner: "forgejo"})
	b.build("j1", "a", 1, messages.StateRunnerStarted)
	b.exit("j1", "a", 0)

	b.job(Job{ID: "j2", Kind: KindTeardown, Route: RoutePinned, Host: "b", Image: "soak-all", Runner: "none"})
	b.build("j2", "b", 1, messages.StateAgentReady)
	b.teardown("j2", "b")
	b.ev("j2", "b", messages.StateTearingDown, 1, "", reason(messages.ReasonRequested))
	b.ev("j2", "b", messages.StateTornDown, 1, "", reason(messages.ReasonRequested))

	b.job(Job{ID: "j3", Kind: KindNoImage, Route: RouteImage, Image: "soak-nobody", Runner: "none"})
	j3 := b.h.Requests[len(b.h.Requests)-1]
	b.h.Final.Requests = append(b.h.Final.Requests, LeftRequest{Stream: j3.Stream, Subject: j3.Subject, JobID: "j3"})

	b.job(Job{ID: "j4", Kind: KindBad, Route: RouteShared, Bad: &Bad{File: "177-everything-wrong.msgpack", Subject: "provision", Code: messages.CodeInvalidRequest, FailedEvent: true}})
	b.ev("j4", "c", messages.StateFailed, 1, "", failure(messages.CodeInvalidRequest))
	b.h.Terminations = append(b.h.Terminations, Termination{Time: b.tick(), Stream: b.h.Requests[len(b.h.Requests)-1].Stream, Consumer: "provision", Reason: "invalid_request"})

	b.job(Job{ID: "j5", Kind: KindRun, Route: RouteShared, Image: "soak-all", Runner: "forgejo", ExitCode: 3})
	stop := Fault{Kind: FaultWorkerStop, Target: "a", Start: b.tick()}
	b.build("j5", "a", 1, messages.StateCloning)
	b.build("j5", "b", 2, messages.StateRunnerStarted)
	stop.End = b.tick()
	b.h.Faults = append(b.h.Faults, stop)
	b.ev("j5", "a", messages.StateDropped, 1, "", reason(messages.ReasonClaimLost), func(e *messages.Event) { e.Holder = "b" })
	b.exit("j5", "b", 3)

	b.job(Job{ID: "j6", Kind: KindRun, Route: RouteImage, Image: "soak-all", Runner: "forgejo"})
	b.build("j6", "c", 1, messages.StateRunnerStarted)
	b.h.Faults = append(b.h.Faults, Fault{Kind: FaultGuestStop, Target: "j6", Start: b.tick(), End: b.tick()})
	b.ev("j6", "c", messages.StateTearingDown, 0, "machine_stopped", reason(messages.ReasonStopped))
	b.ev("j6", "c", messages.StateFailed, 0, "machine_stopped", reason(messages.ReasonStopped), failure(messages.CodeMachineStopped))

	// c claimed j20 while a stalled, and was killed before its first
	// event: the redelivery came back to a once c's claim lapsed.
	b.job(Job{ID: "j20", Kind: KindRun, Route: RouteShared, Image: "soak-all", Runner: "forgejo"})
	kill := Fault{Kind: FaultWorkerKill, Target: "c", Start: b.tick()}
	b.ev("j20", "a", messages.StateDropped, 1, "", reason(messages.ReasonClaimLost), func(e *messages.Event) { e.Holder = "c" })
	kill.End = b.tick()
	b.h.Faults = append(b.h.Faults, kill)
	b.build("j20", "a", 3, messages.StateRunnerStarted)
	b.exit("j20", "a", 0)

	b.job(Job{ID: "j12", Kind: KindBad, Route: RouteShared, Bad: &Bad{File: "178-image-not-found.msgpack", Subject: "provision", Code: messages.CodeImageNotFound, FailedEvent: true}})
	b.ev("j12", "b", messages.StateFailed, 5, "", failure(messages.CodeImageNotFound), func(e *messages.Event) { e.Image = "corpus-no-such-image" })

	b.teardown("nobody-1", "a")
	b.ev("nobody-1", "a", messages.StateTornDown, 1, "", reason(messages.ReasonRequested), failure(messages.CodeUnknownJob))

	for _, h := range []string{"a", "b", "c"} {
		b.h.Samples = append(b.h.Samples, Sample{Time: b.tick(), Host: h, OpsInFlight: 4, Machines: 8, Domains: 8})
	}
	b.h.End = b.tick()
	return b
}

func TestCleanHistoryPasses(t *testing.T) {
	b := clean()
	r := Check(&b.h)
	if len(r.Violations) != 0 {
		var out bytes.Buffer
		r.Print(&out, &b.h)
		t.Fatalf("a clean history has violations:\n%s", out.String())
	}
	if r.Summary.Jobs != 8 || r.Summary.Outcomes["torn_down (runner_exited)"] != 3 {
		t.Errorf("summary = %+v", r.Summary)
	}
}

// index returns the position in b's events of job's event in state on
// host (the first one).
func index(t *testing.T, b *builder, job, host string, state messages.State) int {
	t.Helper()
	for i, e := range b.h.Events {
		if e.Event.JobID == job && e.Event.Host == host && e.Event.State == state {
			return i
		}
	}
	t.Fatalf("no %s of %s on %s", state, job, host)
	return -1
}

func TestViolations(t *testing.T) {
	for _, tc := range []struct {
		name string
		// break makes the clean history break a promise.
		breakIt func(t *testing.T, b *builder)
		want    string
		job     string
	}{
		{"no terminal event", func(t *testing.T, b *builder) {
			i := index(t, b, "j1", "a", messages.StateTornDown)
			b.h.Events = append(b.h.Events[:i], b.h.Events[i+1:]...)
		}, "terminal", "j1"},
		{"two terminal events from two hosts", func(t *testing.T, b *builder) {
			b.ev("j2", "c", messages.StateTornDown, 1, "unknown", reason(messages.ReasonRequested), failure(messages.CodeUnknownJob))
		}, "terminal", "j2"},
		{"an event of a job whose publish failed", func(t *testing.T, b *builder) {
			b.job(Job{ID: "j11", Kind: KindRun, Route: RouteShared, Image: "soak-all", Runner: "forgejo"})
			b.h.Requests[len(b.h.Requests)-1].Err = "message size exceeds maximum allowed"
			b.h.Requests[len(b.h.Requests)-1].Stream = 0
			b.ev("j11", "a", messages.StateAccepted, 1, "")
		}, "terminal", "j11"},
		{"a refused bad request naming an image", func(t *testing.T, b *builder) {
			b.h.Events[index(t, b, "j4", "c", messages.StateFailed)].Event.Image = "soak-all"
		}, "outcome", "j4"},
		{"an event of a job that must have none", func(t *testing.T, b *builder) {
			b.ev("j3", "a", messages.StateAccepted, 1, "")
		}, "terminal", "j3"},
		{"events of a job nobody submitted", func(t *testing.T, b *builder) {
			b.ev("ghost", "a", messages.StateAccepted, 1, "")
		}, "terminal", "ghost"},
		{"an outcome nothing explains", func(t *testing.T, b *builder) {
			i := index(t, b, "j1", "a", messages.StateTornDown)
			b.h.Events[i].Event.State = messages.StateFailed
			b.h.Events[i].Subject = messages.EventSubject("a", "j1", messages.StateFailed)
			b.h.Events[i].MsgID = "j1:failed:runner_exited"
			b.h.Events[i].Event.Error = &messages.Error{Code: messages.CodeBootFailed}
		}, "outcome", "j1"},
		{"machine_stopped without a fault", func(t *testing.T, b *builder) {
			b.h.Faults = b.h.Faults[:1] // the guest stop of j6 goes
		}, "outcome", "j6"},
		{"machine_stopped with a guest stop of another job", func(t *testing.T, b *builder) {
			b.h.Faults[1].Target = "j1"
		}, "outcome", "j6"},
		{"a wrong bad-request code", func(t *testing.T, b *builder) {
			b.h.Events[index(t, b, "j4", "c", messages.StateFailed)].Event.Error.Code = messages.CodeBadMessage
		}, "outcome", "j4"},
		{"a teardown for an unknown job torn down as if known", func(t *testing.T, b *builder) {
			b.h.Events[index(t, b, "nobody-1", "a", messages.StateTornDown)].Event.Error = nil
		}, "outcome", "nobody-1"},
		{"a wrong exit code", func(t *testing.T, b *builder) {
			*b.h.Events[index(t, b, "j5", "b", messages.StateRunnerExited)].Event.ExitCode = 0
		}, "exit_code", "j5"},
		{"served after the end", func(t *testing.T, b *builder) {
			b.ev("j1", "c", messages.StateAccepted, 2, "")
		}, "after_terminal", "j1"},
		{"two runners at once", func(t *testing.T, b *builder) {
			i := index(t, b, "j5", "a", messages.StateCloning)
			// a reached runner_started before b's, then dropped after it.
			extra := []Event{}
			for _, s := range []messages.State{messages.StateCloned, messages.StateBooting, messages.StateRunning, messages.StateAgentReady, messages.StateRunnerStarted} {
				e := b.h.Events[i]
				e.Event.State = s
				e.Subject = messages.EventSubject("a", "j5", s)
				e.MsgID = fmt.Sprintf("j5:%s:1", s)
				extra = append(extra, e)
			}
			b.h.Events = append(b.h.Events[:i+1], append(extra, b.h.Events[i+1:]...)...)
			renumber(b)
		}, "one_host", "j5"},
		{"a runner never ended while another host started one", func(t *testing.T, b *builder) {
			b.job(Job{ID: "j7", Kind: KindRun, Route: RouteShared, Image: "soak-all", Runner: "forgejo"})
			b.build("j7", "a", 1, messages.StateRunnerStarted)
			b.build("j7", "b", 2, messages.StateRunnerStarted)
			b.exit("j7", "b", 0)
		}, "one_host", "j7"},
		{"dropped with no other host", func(t *testing.T, b *builder) {
			b.job(Job{ID: "j8", Kind: KindRun, Route: RouteShared, Image: "soak-all", Runner: "forgejo"})
			b.ev("j8", "a", messages.StateDropped, 1, "", reason(messages.ReasonClaimedElsewhere))
		}, "dropped", "j8"},
		{"dropped after its own host's events only", func(t *testing.T, b *builder) {
			b.job(Job{ID: "j21", Kind: KindRun, Route: RouteShared, Image: "soak-all", Runner: "forgejo"})
			b.build("j21", "a", 1, messages.StateCloning)
			b.ev("j21", "a", messages.StateDropped, 1, "", reason(messages.ReasonClaimLost), func(e *messages.Event) { e.Holder = "b" })
		}, "dropped", "j21"},
		{"dropped naming its own host", func(t *testing.T, b *builder) {
			b.h.Events[index(t, b, "j5", "a", messages.StateDropped)].Event.Holder = "a"
		}, "dropped", "j5"},
		{"a repeated seq", func(t *testing.T, b *builder) {
			b.h.Events[index(t, b, "j1", "a", messages.StateCloned)].Event.Seq = 2
		}, "seq", "j1"},
		{"a gap in seq", func(t *testing.T, b *builder) {
			i := index(t, b, "j2", "b", messages.StateTornDown)
			b.h.Events[i].Event.Seq += 2
		}, "seq", "j2"},
		{"a step skipped", func(t *testing.T, b *builder) {
			i := index(t, b, "j1", "a", messages.StateCloning)
			b.h.Events = append(b.h.Events[:i], b.h.Events[i+1:]...)
			renumber(b)
		}, "transitions", "j1"},
		{"a build step of another attempt", func(t *testing.T, b *builder) {
			b.h.Events[index(t, b, "j1", "a", messages.StateBooting)].Event.Attempt = 2
		}, "transitions", "j1"},
		{"a new attempt that is not higher", func(t *testing.T, b *builder) {
			b.job(Job{ID: "j9", Kind: KindTeardown, Route: RoutePinned, Host: "a", Image: "soak-all", Runner: "none"})
			b.build("j9", "a", 2, messages.StateCloning)
			b.build("j9", "a", 2, messages.StateAgentReady)
			b.teardown("j9", "a")
			b.ev("j9", "a", messages.StateTearingDown, 1, "", reason(messages.ReasonRequested))
			b.ev("j9", "a", messages.StateTornDown, 1, "", reason(messages.ReasonRequested))
		}, "transitions", "j9"},
		{"a Nats-Msg-Id of another form", func(t *testing.T, b *builder) {
			b.h.Events[index(t, b, "j1", "a", messages.StateCloned)].MsgID = "j1-cloned-1"
		}, "msg_id", "j1"},
		{"an event on another job's subject", func(t *testing.T, b *builder) {
			b.h.Events[index(t, b, "j1", "a", messages.StateCloned)].Subject = messages.EventSubject("a", "j2", messages.StateCloned)
		}, "undecodable", "j1"},
		{"an undecodable event", func(t *testing.T, b *builder) {
			b.stream++
			b.h.Events = append(b.h.Events, Event{Stream: b.stream, Subject: "stretchy.LIBVIRT.evt.a.x.failed", Err: "msgpack: invalid code"})
		}, "undecodable", ""},
		{"a machine left", func(t *testing.T, b *builder) {
			b.h.Final.Leftovers["b"] = []string{"domain stretchy-j2"}
		}, "leftovers", "j2"},
		{"a volume left", func(t *testing.T, b *builder) {
			b.h.Final.Leftovers["c"] = []string{"volume /pool/stretchy-j6-vda.qcow2"}
		}, "leftovers", "j6"},
		{"the final state unread", func(t *testing.T, b *builder) {
			b.h.Final.Err = "libvirtd did not answer"
		}, "leftovers", ""},
		{"a request left in the stream", func(t *testing.T, b *builder) {
			b.h.Final.Requests = append(b.h.Final.Requests, LeftRequest{Stream: 1, Subject: messages.ImageProvisionSubject("soak-all"), JobID: "j1"})
		}, "requests_left", "j1"},
		{"a waiting request lost", func(t *testing.T, b *builder) {
			b.h.Final.Requests = nil
		}, "requests_left", "j3"},
		{"a bad request terminated with another code", func(t *testing.T, b *builder) {
			b.h.Terminations[0].Reason = "bad_message"
		}, "bad_code", "j4"},
		{"too many operations", func(t *testing.T, b *builder) {
			b.h.Samples = append(b.h.Samples, Sample{Time: b.tick(), Host: "a", OpsInFlight: 5})
		}, "capacity", ""},
		{"too many machines counted", func(t *testing.T, b *builder) {
			b.h.Samples = append(b.h.Samples, Sample{Time: b.tick(), Host: "b", Machines: 9})
		}, "capacity", ""},
		{"too many domains", func(t *testing.T, b *builder) {
			b.h.Samples = append(b.h.Samples, Sample{Time: b.tick(), Host: "c", Domains: 9})
		}, "capacity", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := clean()
			tc.breakIt(t, b)
			r := Check(&b.h)
			found := false
			for _, v := range r.Violations {
				if v.Invariant == tc.want && v.JobID == tc.job {
					found = true
				}
			}
			if !found {
				var out bytes.Buffer
				r.Print(&out, &b.h)
				t.Fatalf("want a %s violation of job %q, got:\n%s", tc.want, tc.job, out.String())
			}
			var out bytes.Buffer
			r.Print(&out, &b.h)
			if tc.job != "" && !strings.Contains(out.String(), "history of job "+tc.job) {
				t.Errorf("the report does not print the history of job %s:\n%s", tc.job, out.String())
			}
		})
	}
}

// renumber gives every job's events seq 1, 2, ... in stream order and the
// events consecutive stream positions, as after an edit.
func renumber(b *builder) {
	seq := map[string]uint64{}
	for i := range b.h.Events {
		b.h.Events[i].Stream = uint64(1000 + i)
		j := b.h.Events[i].Event.JobID
		seq[j]++
		b.h.Events[i].Event.Seq = seq[j]
	}
}

func TestFaultsExplainOnlyTheirHost(t *testing.T) {
	b := clean()
	b.job(Job{ID: "j10", Kind: KindRun, Route: RouteShared, Image: "soak-all", Runner: "forgejo"})
	b.build("j10", "a", 1, messages.StateRunnerStarted)
	b.h.Faults = append(b.h.Faults, Fault{Kind: FaultLibvirtRestart, Target: "b", Start: b.tick(), End: b.tick()})
	b.ev("j10", "a", messages.StateTearingDown, 0, "machine_stopped", reason(messages.ReasonStopped))
	b.ev("j10", "a", messages.StateFailed, 0, "machine_stopped", reason(messages.ReasonStopped), failure(messages.CodeMachineStopped))
	if r := Check(&b.h); len(r.Violations) != 1 || r.Violations[0].Invariant != "outcome" {
		t.Fatalf("a libvirtd restart on b explains a stopped machine on a: %+v", r.Violations)
	}
	b.h.Faults[len(b.h.Faults)-1].Target = "a"
	if r := Check(&b.h); len(r.Violations) != 0 {
		t.Fatalf("a libvirtd restart on a does not explain a stopped machine there: %+v", r.Violations)
	}
}

func TestRunnerLostOnlyAfterAKillOfItsHost(t *testing.T) {
	b := clean()
	b.job(Job{ID: "j13", Kind: KindRun, Route: RouteShared, Image: "soak-all", Runner: "forgejo"})
	b.build("j13", "b", 1, messages.StateRunnerStarted)
	b.h.Faults = append(b.h.Faults, Fault{Kind: FaultWorkerKill, Target: "a", Start: b.tick(), End: b.tick()})
	b.ev("j13", "b", messages.StateTearingDown, 0, "runner_lost", reason(messages.ReasonRunnerLost))
	b.ev("j13", "b", messages.StateFailed, 0, "runner_lost", reason(messages.ReasonRunnerLost), failure(messages.CodeAgentFailed))
	if r := Check(&b.h); len(r.Violations) != 1 || r.Violations[0].Invariant != "outcome" {
		t.Fatalf("a kill of host a explains a lost runner on b: %+v", r.Violations)
	}
	b.h.Faults[len(b.h.Faults)-1].Target = "b"
	if r := Check(&b.h); len(r.Violations) != 0 {
		t.Fatalf("a kill of host b does not explain its lost runner: %+v", r.Violations)
	}
	b.h.Terminations = append(b.h.Terminations, Termination{Stream: b.h.Terminations[0].Stream, Reason: serverDeleted})
	if r := Check(&b.h); len(r.Violations) != 0 {
		t.Fatalf("the server's advisory of a deleted message counts as a code: %+v", r.Violations)
	}
}

func TestHistoryRoundTrip(t *testing.T) {
	b := clean()
	var buf bytes.Buffer
	if err := b.h.Write(&buf); err != nil {
		t.Fatal(err)
	}
	h, err := Read(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if r := Check(h); len(r.Violations) != 0 || len(h.Events) != len(b.h.Events) {
		t.Fatalf("read back: %d events, violations %+v", len(h.Events), r.Violations)
	}
}
