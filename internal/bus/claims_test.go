package bus

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

func openClaims(t *testing.T, js jetstream.JetStream, host string, ackWait time.Duration) *Claims {
	t.Helper()
	c, err := OpenClaims(context.Background(), js, Topology{Host: host, AckWait: ackWait})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestClaimsCompareAndSet(t *testing.T) {
	js := startJetStream(t)
	ctx := context.Background()
	a, b := openClaims(t, js, "host-a", time.Minute), openClaims(t, js, "host-b", time.Minute)

	rev, holder, err := a.Take(ctx, "job-1", 11)
	if err != nil || rev == 0 {
		t.Fatalf("first take: rev %d, holder %+v, %v", rev, holder, err)
	}
	got, holder, err := b.Take(ctx, "job-1", 11)
	if err != nil || got != 0 || holder.Host != "host-a" || holder.Request != 11 {
		t.Fatalf("second host's take: rev %d, holder %+v, %v; want 0 and host-a's claim on request 11", got, holder, err)
	}

	next, _, err := a.Keep(ctx, "job-1", 11, rev)
	if err != nil || next <= rev {
		t.Fatalf("keep: rev %d after %d, %v", next, rev, err)
	}
	// The old revision is stale now: renewing with it says who holds it.
	stale, holder, err := a.Keep(ctx, "job-1", 11, rev)
	if err != nil || stale != 0 || holder.Host != "host-a" {
		t.Fatalf("keep with a stale revision: rev %d, holder %+v, %v", stale, holder, err)
	}

	// A restarted process of the same host takes its claim over.
	again, _, err := a.Take(ctx, "job-1", 12)
	if err != nil || again <= next {
		t.Fatalf("take over own claim: rev %d, %v", again, err)
	}

	// Releasing with a stale revision leaves the claim alone.
	if err := a.Release(ctx, "job-1", next); err != nil {
		t.Fatal(err)
	}
	if got, holder, _ := b.Take(ctx, "job-1", 12); got != 0 || holder.Host != "host-a" {
		t.Fatalf("after a stale release host-b got rev %d (holder %+v)", got, holder)
	}
	if err := a.Release(ctx, "job-1", again); err != nil {
		t.Fatal(err)
	}
	if got, _, err := b.Take(ctx, "job-1", 12); err != nil || got == 0 {
		t.Fatalf("after the release host-b could not take the job: rev %d, %v", got, err)
	}
}

// TestClaimsLapse: a claim that is not renewed is gone after half the
// AckWait, and its holder finds out when it tries to renew it.
func TestClaimsLapse(t *testing.T) {
	js := startJetStream(t)
	ctx := context.Background()
	const ackWait = 2 * time.Second
	a, b := openClaims(t, js, "host-a", ackWait), openClaims(t, js, "host-b", ackWait)
	rev, _, err := a.Take(ctx, "job-2", 5)
	if err != nil || rev == 0 {
		t.Fatalf("take: %d, %v", rev, err)
	}
	var taken uint64
	deadline := time.Now().Add(10 * ackWait)
	for taken == 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		if taken, _, err = b.Take(ctx, "job-2", 5); err != nil {
			t.Fatal(err)
		}
	}
	if taken == 0 {
		t.Fatalf("host-a's claim did not lapse within %s", 10*ackWait)
	}
	got, holder, err := a.Keep(ctx, "job-2", 5, rev)
	if err != nil || got != 0 || holder.Host != "host-b" {
		t.Fatalf("renewing the lapsed claim: rev %d, holder %+v, %v; want 0 and host-b", got, holder, err)
	}
}

// TestClaimsRace: of many hosts taking one job at once, exactly one wins,
// and every loser is told the winner.
func TestClaimsRace(t *testing.T) {
	js := startJetStream(t)
	ctx := context.Background()
	for round := range 20 {
		job := fmt.Sprintf("race-%d", round)
		var wg sync.WaitGroup
		type result struct {
			host   string
			rev    uint64
			holder messages.Claim
			err    error
		}
		results := make([]result, 8)
		for i := range results {
			c := openClaims(t, js, fmt.Sprintf("h%d", i), time.Minute)
			wg.Go(func() {
				rev, holder, err := c.Take(ctx, job, 1)
				results[i] = result{c.host, rev, holder, err}
			})
		}
		wg.Wait()
		var winners []string
		for _, r := range results {
			if r.err != nil {
				t.Fatal(r.err)
			}
			if r.rev != 0 {
				winners = append(winners, r.host)
			}
		}
		if len(winners) != 1 {
			t.Fatalf("round %d: winners %v, want exactly one", round, winners)
		}
		for _, r := range results {
			if r.rev == 0 && r.holder.Host != winners[0] {
				t.Fatalf("round %d: %s was told the holder is %q, not %s", round, r.host, r.holder.Host, winners[0])
			}
		}
	}
}
