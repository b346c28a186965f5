package bus

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

func startJetStream(tb testing.TB) jetstream.JetStream {
	tb.Helper()
	srv, err := embedded.Start(embedded.Options{StoreDir: tb.TempDir(), Port: -1})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := Ensure(context.Background(), js, Topology{Host: "h0"}); err != nil {
		tb.Fatal(err)
	}
	return js
}

// jobEvents replays the stored events of job, as an orchestrator reads
// them.
func jobEvents(tb testing.TB, js jetstream.JetStream, job string) []messages.Event {
	tb.Helper()
	var evs []messages.Event
	for ev, err := range client.New(js).Events(context.Background(), client.Query{Job: job}) {
		if err != nil {
			tb.Fatal(err)
		}
		evs = append(evs, ev)
	}
	return evs
}

// TestEnsureLeavesUnchangedStreamsAlone: a worker start updates a stream
// only when its configuration differs (the server announces every update).
func TestEnsureLeavesUnchangedStreamsAlone(t *testing.T) {
	js := startJetStream(t) // ensured once for h0
	ctx := context.Background()
	sub, err := js.Conn().SubscribeSync("$JS.EVENT.ADVISORY.STREAM.UPDATED.>")
	if err != nil {
		t.Fatal(err)
	}
	for _, host := range []string{"h0", "h1", "h0"} {
		if _, err := Ensure(ctx, js, Topology{Host: host}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := Ensure(ctx, js, Topology{Host: "h1", EventsMaxAge: time.Hour}); err != nil {
		t.Fatal(err)
	}
	if err := js.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	var updated []string
	for {
		msg, err := sub.NextMsg(500 * time.Millisecond)
		if err != nil {
			break
		}
		updated = append(updated, msg.Subject)
	}
	want := []string{"$JS.EVENT.ADVISORY.STREAM.UPDATED." + messages.EventsStream}
	if fmt.Sprint(updated) != fmt.Sprint(want) {
		t.Fatalf("stream updates %v, want %v", updated, want)
	}
	s, err := js.Stream(ctx, messages.EventsStream)
	if err != nil {
		t.Fatal(err)
	}
	if got := s.CachedInfo().Config.MaxAge; got != time.Hour {
		t.Fatalf("events max age %s after the change, want 1h", got)
	}
}

// TestAppendNumbersAcrossHosts: two hosts append events of one job, each
// knowing only its own last position, as a host that stalled and lost the
// job does: every event still gets the next seq in stream order, and a
// retried publish of a stored event is not stored again.
func TestAppendNumbersAcrossHosts(t *testing.T) {
	js := startJetStream(t)
	ctx := context.Background()
	a, b := NewPublisher(js), NewPublisher(js)
	ev := func(host string, st messages.State, seq uint64) messages.Event {
		return messages.Event{V: 1, JobID: "job-1", Host: host, State: st, Time: time.Now().UTC(), Seq: seq}
	}
	// A accepts the job, then stalls.
	seq, posA, err := a.Append(ctx, ev("a", messages.StateAccepted, 1), "job-1:accepted:1", 0)
	if err != nil || seq != 1 {
		t.Fatalf("A's accepted: seq %d, %v", seq, err)
	}
	// B serves the job from the redelivery; it first knows nothing.
	var seqB, posB uint64
	for i, st := range []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateCloned} {
		seqB, posB, err = b.Append(ctx, ev("b", st, seqB+1), fmt.Sprintf("job-1:%s:2", st), posB)
		if want := uint64(i + 2); err != nil || seqB != want {
			t.Fatalf("B's %s: seq %d, %v; want %d", st, seqB, err, want)
		}
	}
	// A resumes and drops the job, numbering as if nothing happened.
	if seq, _, err = a.Append(ctx, ev("a", messages.StateDropped, 2), "job-1:dropped:1:a:7", posA); err != nil || seq != 5 {
		t.Fatalf("A's dropped: seq %d, %v; want 5", seq, err)
	}
	// B goes on after its own last event: renumbered after A's dropped.
	seq, posB, err = b.Append(ctx, ev("b", messages.StateBooting, seqB+1), "job-1:booting:2", posB)
	if err != nil || seq != 6 {
		t.Fatalf("B's booting: seq %d, %v; want 6", seq, err)
	}
	// A retried publish of B's booting (its ack lost) is stored once.
	if seq2, pos2, err := b.Append(ctx, ev("b", messages.StateBooting, 6), "job-1:booting:2", 0); err != nil || seq2 != 6 || pos2 != posB {
		t.Fatalf("retried booting: seq %d at %d, %v; want 6 at %d", seq2, pos2, err, posB)
	}
	events := jobEvents(t, js, "job-1")
	if len(events) != 6 {
		t.Fatalf("%d events stored, want 6", len(events))
	}
	for i, e := range events {
		if e.Seq != uint64(i+1) {
			t.Fatalf("event %d in stream order (%s of %s) has seq %d", i+1, e.State, e.Host, e.Seq)
		}
	}
}

// TestAppendRefusesAnotherHostsEvent: an event whose Nats-Msg-Id another
// host's event holds (two hosts served the same step of a job with the
// same delivery count, one through a repeated request) is not taken for
// stored: the server drops it as a duplicate, and Append says so. Before,
// Append returned the other host's event as this one's, and a host built
// and ran a job with none of its events stored (soak, seeds 4 and 5).
func TestAppendRefusesAnotherHostsEvent(t *testing.T) {
	js := startJetStream(t)
	ctx := context.Background()
	a, b := NewPublisher(js), NewPublisher(js)
	ev := func(host string, st messages.State, seq uint64) messages.Event {
		return messages.Event{V: 1, JobID: "job-1", Host: host, State: st, Time: time.Now().UTC(), Seq: seq, Attempt: 1}
	}
	if _, _, err := a.Append(ctx, ev("a", messages.StateAccepted, 1), "job-1:accepted:1", 0); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.Append(ctx, ev("b", messages.StateAccepted, 1), "job-1:accepted:1", 0); !errors.Is(err, ErrOthersEvent) {
		t.Fatalf("b's accepted under a's Nats-Msg-Id: %v, want ErrOthersEvent", err)
	}
	// The same when a went on: the server finds the duplicate after b
	// follows a's newest event.
	if _, _, err := a.Append(ctx, ev("a", messages.StateCloning, 2), "job-1:cloning:1", 0); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.Append(ctx, ev("b", messages.StateAccepted, 1), "job-1:accepted:1", 0); !errors.Is(err, ErrOthersEvent) {
		t.Fatalf("b's accepted under a's older Nats-Msg-Id: %v, want ErrOthersEvent", err)
	}
	// The failed event of a request out of deliveries is the fleet's:
	// any host finds it stored (6.2).
	md := func(host string) messages.Event {
		e := ev(host, messages.StateFailed, 3)
		e.Error = &messages.Error{Code: messages.CodeMaxDeliveries}
		return e
	}
	if _, _, err := a.Append(ctx, md("a"), "job-1:failed:max_deliveries:9", 0); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.Append(ctx, md("b"), "job-1:failed:max_deliveries:9", 0); err != nil {
		t.Fatalf("b's max_deliveries after a's: %v, want it stored once", err)
	}
	// A's own retry is still stored once and returned as stored.
	if seq, _, err := a.Append(ctx, ev("a", messages.StateAccepted, 1), "job-1:accepted:1", 0); err != nil || seq != 1 {
		t.Fatalf("a's retried accepted: seq %d, %v", seq, err)
	}
}

// TestAppendStaleBuildStep: a host that stalled in a build, while another
// host took the job and ran it to its end, publishes its step when it
// resumes; it must not be stored after the other host's events: the
// host lost the job (5.2 R). Its dropped still is, and a new attempt's
// accepted follows another host's unfinished events, as a redelivery
// does. Before, the stale step was renumbered and stored after the other
// host's torn_down (soak, seed 8).
func TestAppendStaleBuildStep(t *testing.T) {
	js := startJetStream(t)
	ctx := context.Background()
	a, b := NewPublisher(js), NewPublisher(js)
	ev := func(host string, st messages.State, attempt int) messages.Event {
		return messages.Event{V: 1, JobID: "job-1", Host: host, State: st, Time: time.Now().UTC(), Attempt: attempt}
	}
	var posA, posB uint64
	var err error
	for _, st := range []messages.State{messages.StateAccepted, messages.StateCloning} {
		if _, posA, err = a.Append(ctx, ev("a", st, 1), fmt.Sprintf("job-1:%s:1", st), posA); err != nil {
			t.Fatal(err)
		}
	}
	// a stalls; the redelivery's accepted on b follows a's cloning.
	for _, st := range []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateRunnerStarted} {
		if _, posB, err = b.Append(ctx, ev("b", st, 2), fmt.Sprintf("job-1:%s:2", st), posB); err != nil {
			t.Fatalf("b's %s after a's events: %v", st, err)
		}
	}
	if _, _, err := a.Append(ctx, ev("a", messages.StateCloned, 1), "job-1:cloned:1", posA); !errors.Is(err, ErrJobMovedOn) {
		t.Fatalf("a's stale cloned after b's runner_started: %v, want ErrJobMovedOn", err)
	}
	for _, st := range []messages.State{messages.StateTearingDown, messages.StateTornDown} {
		if _, posB, err = b.Append(ctx, ev("b", st, 0), fmt.Sprintf("job-1:%s:runner_exited", st), posB); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := a.Append(ctx, ev("a", messages.StateAccepted, 3), "job-1:accepted:3", posA); !errors.Is(err, ErrJobMovedOn) {
		t.Fatalf("a's accepted after b's torn_down: %v, want ErrJobMovedOn", err)
	}
	if _, _, err := a.Append(ctx, ev("a", messages.StateDropped, 1), "job-1:dropped:1:a:7", posA); err != nil {
		t.Fatalf("a's dropped: %v", err)
	}
}
