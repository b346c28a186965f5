package worker

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// TestControlRepliesOnlyToInboxes: a control request whose reply subject is
// not an inbox is not answered, so a client that may send control requests
// cannot make the worker publish where it may and the client may not: the
// claims bucket (overwriting another host's claim would make that host
// drop its running job) or an event subject (an undecodable event). A
// request with an inbox is answered as always.
func TestControlRepliesOnlyToInboxes(t *testing.T) {
	env := startServer(t)
	a := startFleetHost(t, env, "a", 0, "img")
	ctx := context.Background()
	claims, err := bus.OpenClaims(ctx, env.js, bus.Topology{Host: "b", AckWait: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	if rev, _, err := claims.Take(ctx, "victim", 9); err != nil || rev == 0 {
		t.Fatalf("b's claim: %d, %v", rev, err)
	}
	kv, err := env.js.KeyValue(ctx, messages.ClaimsBucket)
	if err != nil {
		t.Fatal(err)
	}
	before, err := kv.Get(ctx, "victim")
	if err != nil {
		t.Fatal(err)
	}
	nc := env.js.Conn()
	data, err := messages.Marshal(messages.Control{V: messages.SchemaVersion, Op: messages.ControlConsole, JobID: "victim"})
	if err != nil {
		t.Fatal(err)
	}
	// The worker answers control requests once it runs.
	waitFor(t, "the worker answers control requests", func() bool {
		_, err := nc.Request(messages.ControlSubject("a"), data, time.Second)
		return err == nil
	})
	a.mu.Lock()
	a.controls = nil
	a.mu.Unlock()
	bad := []string{
		"$KV." + messages.ClaimsBucket + ".victim",
		"stretchy." + messages.ProvisionerID + ".evt.a.victim.failed",
	}
	for _, reply := range bad {
		if err := nc.PublishMsg(&nats.Msg{Subject: messages.ControlSubject("a"), Reply: reply, Data: data}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "both requests handled", func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return len(a.controls) == len(bad)
	})
	// A request with an inbox is answered; by then the worker has sent
	// whatever it sent for the two before it, on its one connection.
	msg, err := nc.Request(messages.ControlSubject("a"), data, 10*time.Second)
	if err != nil {
		t.Fatalf("a request with an inbox: %v", err)
	}
	if _, err := messages.DecodeControlReply(msg.Data); err != nil {
		t.Fatalf("reply: %v", err)
	}
	a.mu.Lock()
	for i, err := range a.controls[:len(bad)] {
		if err == nil || !strings.Contains(err.Error(), "not an inbox") {
			t.Errorf("control request %d with reply subject %s: outcome %v, want a refusal naming the reply subject", i, bad[i], err)
		}
	}
	a.mu.Unlock()

	after, err := kv.Get(ctx, "victim")
	if err != nil {
		t.Fatal(err)
	}
	if after.Revision() != before.Revision() {
		c, _ := messages.DecodeClaim(after.Value())
		t.Fatalf("b's claim was overwritten: revision %d -> %d, value %+v", before.Revision(), after.Revision(), c)
	}
	events, err := env.js.Stream(ctx, messages.EventsStream)
	if err != nil {
		t.Fatal(err)
	}
	if raw, err := events.GetLastMsgForSubject(ctx, bad[1]); !errors.Is(err, jetstream.ErrMsgNotFound) {
		t.Fatalf("the events stream has %v (%v) on %s", raw, err, bad[1])
	}
}

func TestIsInbox(t *testing.T) {
	for _, tt := range []struct {
		subject string
		want    bool
	}{
		{"_INBOX.abc.def", true},
		{"_INBOX.x", true},
		{"_INBOX.", false},
		{"_INBOX", false},
		{"_INBOX.*", false},
		{"_INBOX.a.>", false},
		{"_INBOX..a", false},
		{"_INBOX.a b", false},
		{"$KV.STRETCHY_LIBVIRT_CLAIMS.j1", false},
		{"stretchy.LIBVIRT.evt.a.j1.failed", false},
		{"x._INBOX.a", false},
	} {
		t.Run(tt.subject, func(t *testing.T) {
			if got := isInbox(tt.subject, DefaultReplyPrefixes); got != tt.want {
				t.Fatalf("isInbox(%q) = %v, want %v", tt.subject, got, tt.want)
			}
		})
	}
}
