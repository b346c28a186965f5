package client

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

func replay(tb testing.TB, js jetstream.JetStream, q Query) []messages.Event {
	tb.Helper()
	var evs []messages.Event
	for ev, err := range New(js).Events(context.Background(), q) {
		if err != nil {
			tb.Fatal(err)
		}
		evs = append(evs, ev)
	}
	return evs
}

// TestReplayFilters: a replay yields exactly the stored events its query
// selects, by job, host, state and time.
func TestReplayFilters(t *testing.T) {
	js := startJetStream(t)
	publishEvents(t, js, "old", 10000)
	time.Sleep(1100 * time.Millisecond)
	since := time.Now()
	publishEvents(t, js, "new", 500)

	tests := []struct {
		name  string
		q     Query
		want  int
		check func(messages.Event) bool
	}{
		{"all", Query{}, 10500, nil},
		{"one job", Query{Job: "old-42"}, 10, func(e messages.Event) bool { return e.JobID == "old-42" }},
		{"one host", Query{Host: "h1"}, 2500 + 130, func(e messages.Event) bool { return e.Host == "h1" }},
		{"one state", Query{State: messages.StateTornDown}, 1050, func(e messages.Event) bool { return e.State == messages.StateTornDown }},
		{"host and state", Query{Host: "h2", State: messages.StateAccepted}, 250 + 12,
			func(e messages.Event) bool { return e.Host == "h2" && e.State == messages.StateAccepted }},
		{"since", Query{Since: since}, 500, func(e messages.Event) bool { return e.JobID[:4] == "new-" }},
		{"since and job", Query{Job: "new-3", Since: since}, 10, nil},
		{"until", Query{Job: "old-7", Until: since}, 10, nil},
		{"nothing", Query{Job: "absent"}, 0, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			evs := replay(t, js, tt.q)
			if len(evs) != tt.want {
				t.Fatalf("got %d events, want %d", len(evs), tt.want)
			}
			for _, ev := range evs {
				if tt.check != nil && !tt.check(ev) {
					t.Fatalf("unexpected event %+v", ev)
				}
			}
		})
	}
}

// TestReplayUntil: events after Until are passed over in a replay, and
// end a followed one.
func TestReplayUntil(t *testing.T) {
	js := startJetStream(t)
	publishEvents(t, js, "u", 20)
	all := replay(t, js, Query{})
	cut := all[4].Time
	if got := replay(t, js, Query{Until: cut}); len(got) == 0 || len(got) >= len(all) || got[len(got)-1].Time.After(cut) {
		t.Fatalf("Until %s: %d of %d events, the last at %s", cut, len(got), len(all), got[len(got)-1].Time)
	}
	n := 0
	for _, err := range New(js).Events(context.Background(), Query{Until: cut, Follow: true}) {
		if err != nil {
			t.Fatal(err)
		}
		n++
	}
	if n == 0 || n >= len(all) {
		t.Fatalf("a followed replay until %s yielded %d events of %d; it must end at the first later one", cut, n, len(all))
	}
}

// TestReplayGoesOnAfterUndecodable: an event that does not decode is
// yielded as a *DecodeError with its stream sequence, and the replay goes
// on.
func TestReplayGoesOnAfterUndecodable(t *testing.T) {
	js := startJetStream(t)
	publishEvents(t, js, "d", 2)
	if _, err := js.Publish(context.Background(), messages.EventSubject("h0", "bad", messages.StateAccepted), []byte("not msgpack")); err != nil {
		t.Fatal(err)
	}
	publishEvents(t, js, "e", 2)
	var got []string
	for ev, err := range New(js).Events(context.Background(), Query{}) {
		var de *DecodeError
		switch {
		case errors.As(err, &de):
			got = append(got, fmt.Sprintf("undecodable %d", de.StreamSeq))
		case err != nil:
			t.Fatal(err)
		default:
			got = append(got, ev.JobID)
		}
	}
	if want := "d-0 d-0 undecodable 3 e-0 e-0"; strings.Join(got, " ") != want {
		t.Fatalf("yielded %q, want %q", strings.Join(got, " "), want)
	}
}

// TestFollowSeesNewEvents: a reader that follows only new events gets an
// event published after it started and none of the stored ones. The
// reader's start is not observable from outside, so late events are
// published until one arrives; how fast that is, is BenchmarkReplay's
// and the integration tests' business, not a timed assertion here.
func TestFollowSeesNewEvents(t *testing.T) {
	js := startJetStream(t)
	publishEvents(t, js, "old", 100)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	type first struct {
		ev  messages.Event
		err error
	}
	got := make(chan first, 1)
	go func() {
		for ev, err := range New(js).Events(ctx, Query{New: true}) {
			got <- first{ev, err}
			return
		}
		got <- first{err: errors.New("the replay ended without an event")}
	}()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for i := 0; ; i++ {
		publishEvents(t, js, fmt.Sprintf("late%d", i), 1)
		select {
		case f := <-got:
			if f.err != nil {
				t.Fatal(f.err)
			}
			if !strings.HasPrefix(f.ev.JobID, "late") {
				t.Fatalf("the reader of new events got %s, a stored event", f.ev.JobID)
			}
			return
		case <-ctx.Done():
			t.Fatal("no new event arrived")
		case <-tick.C:
		}
	}
}

// TestFollowEndsWithTheContext: a follower whose context ends yields the
// context's own error.
func TestFollowEndsWithTheContext(t *testing.T) {
	js := startJetStream(t)
	publishEvents(t, js, "f", 10)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var err error
	n := 0
	for _, e := range New(js).Events(ctx, Query{Follow: true}) {
		if e != nil {
			err = e
			break
		}
		if n++; n == 10 {
			cancel()
		}
	}
	if err != context.Canceled {
		t.Fatalf("after %d events: %v, want context.Canceled itself", n, err)
	}
}
