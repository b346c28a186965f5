package client

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// The tests of this package's internals run against an in-process
// JetStream server with the event stream alone; the tests of its API
// (client_test) run against the worker's own streams and consumers.

// createEventStream creates the event stream as a worker does, with the
// settings a replay depends on (its subjects and duplicate window).
func createEventStream(tb testing.TB, js jetstream.JetStream) {
	tb.Helper()
	_, err := js.CreateOrUpdateStream(context.Background(), jetstream.StreamConfig{
		Name: messages.EventsStream, Subjects: []string{messages.EventSubjects},
		Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute,
	})
	if err != nil {
		tb.Fatal(err)
	}
}

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
	createEventStream(tb, js)
	return js
}

var hosts = []string{"h0", "h1", "h2", "h3"}

// publishEvents stores n events over n/10 jobs on four hosts, each job
// passing the states of a successful life in order, in batches whose acks
// it waits for.
func publishEvents(tb testing.TB, js jetstream.JetStream, prefix string, n int) {
	tb.Helper()
	const batch = 256
	states := messages.States[:10]
	for start := 0; start < n; start += batch {
		var acks []jetstream.PubAckFuture
		for i := start; i < min(start+batch, n); i++ {
			job := fmt.Sprintf("%s-%d", prefix, i/10)
			ev := messages.Event{
				V: 1, JobID: job, Host: hosts[(i/10)%len(hosts)], Image: "img", State: states[i%10],
				Time: time.Now().UTC(), Seq: uint64(i%10 + 1), Attempt: 1,
			}
			data, err := messages.Marshal(&ev)
			if err != nil {
				tb.Fatal(err)
			}
			ack, err := js.PublishAsync(messages.EventSubject(ev.Host, ev.JobID, ev.State), data, jetstream.WithMsgID(fmt.Sprintf("%s:%d", prefix, i)))
			if err != nil {
				tb.Fatal(err)
			}
			acks = append(acks, ack)
		}
		for _, ack := range acks {
			t := time.NewTimer(2 * time.Minute)
			select {
			case <-ack.Ok():
			case err := <-ack.Err():
				tb.Fatalf("store event: %v", err)
			case <-t.C:
				tb.Fatal("store event: no ack")
			}
			t.Stop()
		}
	}
}
