package worker

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// TestClaimedRequestIsLeftOrAcked: a worker that pulls a provision whose
// job another host holds builds nothing and publishes dropped; it leaves
// the message unsettled when the holder serves that very message, and acks
// a repeated request. Real JetStream, real claims bucket.
func TestClaimedRequestIsLeftOrAcked(t *testing.T) {
	env := startServer(t)
	ctx := context.Background()
	const ackWait = 3 * time.Second
	holder, err := bus.OpenClaims(ctx, env.js, bus.Topology{Host: "holder", AckWait: ackWait})
	if err != nil {
		t.Fatal(err)
	}

	js := connect(t, env.url)
	cons, err := bus.Ensure(ctx, js, bus.Topology{Host: "h1", AckWait: ackWait, MaxDeliver: 2})
	if err != nil {
		t.Fatal(err)
	}
	claims, err := bus.OpenClaims(ctx, js, bus.Topology{Host: "h1", AckWait: ackWait})
	if err != nil {
		t.Fatal(err)
	}
	pub := bus.NewPublisher(js)
	life := lifecycle.New(lifecycle.Config{Host: "h1", Machines: noMachines{}, Events: pub, History: pub,
		Claims: claims, ClaimTTL: bus.ClaimTTL(ackWait)})
	var mu sync.Mutex
	var settled []Settlement
	w := New(Config{AckWait: ackWait, MaxDeliver: 2, PullWait: 200 * time.Millisecond,
		OnSettle: func(s Settlement) {
			mu.Lock()
			settled = append(settled, s)
			mu.Unlock()
		}}, cons, life)

	// The holder serves request "same"; "repeat" is a second request for
	// the job it serves under another message.
	sameSeq, err := submitProvision(ctx, env.js, provisionRequest("same"), "")
	if err != nil {
		t.Fatal(err)
	}
	if rev, _, err := holder.Take(ctx, "same", sameSeq); err != nil || rev == 0 {
		t.Fatalf("holder's take: %d, %v", rev, err)
	}
	if rev, _, err := holder.Take(ctx, "repeat", 1); err != nil || rev == 0 {
		t.Fatalf("holder's take: %d, %v", rev, err)
	}
	if _, err := submitProvision(ctx, env.js, provisionRequest("repeat"), ""); err != nil {
		t.Fatal(err)
	}

	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- w.Run(runCtx) }()
	deadline := time.Now().Add(10 * time.Second)
	outcomes := map[string]string{}
	for len(outcomes) < 2 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		mu.Lock()
		for _, s := range settled {
			outcomes[s.JobID] = s.Outcome
		}
		mu.Unlock()
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if outcomes["same"] != "left" || outcomes["repeat"] != "ack" {
		t.Fatalf("outcomes %v, want same: left, repeat: ack", outcomes)
	}
	// The left message is still the holder's to settle; the repeat is gone.
	c, err := env.js.Consumer(ctx, messages.RequestsStream, bus.SharedProvisionConsumer)
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.NumAckPending != 1 || info.NumPending != 0 {
		t.Fatalf("consumer: %d awaiting ack, %d pending; want 1 and 0", info.NumAckPending, info.NumPending)
	}
	for _, job := range []string{"same", "repeat"} {
		ev, found, err := pub.LastEvent(ctx, job, "h1")
		if err != nil || !found || ev.State != messages.StateDropped || ev.Holder != "holder" || ev.Reason != messages.ReasonClaimedElsewhere {
			t.Fatalf("h1's last event of %s: %+v (found %v, %v), want dropped naming holder", job, ev, found, err)
		}
	}
}

func provisionRequest(jobID string) messages.Provision {
	return messages.Provision{V: 1, JobID: jobID, Image: "debian-12", Runner: messages.Runner{Kind: messages.RunnerNone},
		RequestedAt: time.Now().UTC()}
}
