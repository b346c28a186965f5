package main

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// TestHoldGoesToTheServingHost: worker hold, release and console, and
// worker submit teardown without --host, address the host that serves
// the job. When the job's newest event is another host's dropped (a stale
// delivery that host let go of, naming the holder), that is the holder,
// not the host of the newest event.
func TestHoldGoesToTheServingHost(t *testing.T) {
	srv := startNATS(t, &server.Options{})
	url := "nats://" + hostPort(srv)
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := bus.Ensure(ctx, js, bus.Topology{Host: "host-a"}); err != nil {
		t.Fatal(err)
	}
	pub := bus.NewPublisher(js)
	now := time.Now().UTC()
	for i, ev := range []messages.Event{
		{JobID: "held-x", Host: "host-a", State: messages.StateAccepted, Attempt: 1},
		{JobID: "held-x", Host: "host-a", State: messages.StateAgentReady, Attempt: 1, OS: "linux"},
		{JobID: "held-x", Host: "host-b", State: messages.StateDropped, Attempt: 2, Reason: messages.ReasonClaimedElsewhere, Holder: "host-a"},
	} {
		ev.V, ev.Time, ev.Seq = messages.SchemaVersion, now, uint64(i+1)
		if err := pub.Publish(ctx, ev, "held-x:"+string(ev.State)); err != nil {
			t.Fatal(err)
		}
	}
	var mu sync.Mutex
	var asked []string
	for _, host := range []string{"host-a", "host-b"} {
		sub, err := nc.Subscribe(messages.ControlSubject(host), func(m *nats.Msg) {
			mu.Lock()
			asked = append(asked, host)
			mu.Unlock()
			data, _ := messages.Marshal(messages.ControlReply{V: messages.SchemaVersion, OK: true, Host: host, HoldForS: 60})
			_ = m.Respond(data)
		})
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = sub.Unsubscribe() }()
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := controlCommand(ctx, messages.ControlHold, []string{"held-x", "--for", "1m", "--nats-url", url, "--nats-data-dir", t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(asked, []string{"host-a"}) {
		t.Fatalf("the hold went to %q, want the holder host-a", asked)
	}

	// So does a teardown without --host.
	if err := submitCommand(ctx, []string{"teardown", "--job", "held-x", "--nats-url", url, "--nats-data-dir", t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	requests, err := js.Stream(ctx, messages.RequestsStream)
	if err != nil {
		t.Fatal(err)
	}
	if m, err := requests.GetLastMsgForSubject(ctx, messages.RequestSubjects); err != nil || m.Subject != messages.TeardownSubject("host-a") {
		t.Fatalf("the teardown went to %v (%v), want %s", m, err, messages.TeardownSubject("host-a"))
	}
}
