package lifecycle

import (
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// TestEndsRaceToOneEnd races the four ways a running machine can end
// against each other on one machine, 1,000 times: a teardown request (as
// the worker serves it: through the build first, then in a slot), the
// runner's exit, the deadline and the loss of the job's claim to another
// host, each noticed at a tick of its own. Whatever wins, the job gets
// exactly one end from this host: one terminal event (torn_down or failed),
// or dropped when another host took the job, never two and never both; and
// the machine and its record are gone.
func TestEndsRaceToOneEnd(t *testing.T) {
	rounds := 1000
	if testing.Short() {
		rounds = 100
	}
	seen := map[string]int{}
	for round := range rounds {
		end := raceRound(t, round)
		seen[end]++
	}
	t.Logf("ends over %d rounds: %v", rounds, seen)
	if len(seen) < 3 {
		t.Errorf("only %d kinds of end won in %d rounds (%v): the race hardly races", len(seen), rounds, seen)
	}
}

// raceRound runs one race and returns how the job ended.
func raceRound(t *testing.T, round int) string {
	t.Helper()
	h1, _, store := twoHosts()
	ag := newFakeAgent()
	h1.m.cfg.Agent = ag
	defer h1.m.Close()
	ctx := context.Background()
	job := fmt.Sprintf("race-%d", round)
	req := forgejoRequest(h1, job)
	req.MaxLifetimeS = 600
	if err := h1.m.Provision(ctx, req, Delivery{Attempt: 1, Request: uint64(round + 1)}); err != nil {
		t.Fatalf("round %d: provision: %v", round, err)
	}

	r := rand.New(rand.NewPCG(uint64(round), 7))
	delays := []int{r.IntN(4), r.IntN(4), r.IntN(4), r.IntN(4)}
	jitter := func(i int) {
		for range delays[i] {
			runtime.Gosched()
		}
	}
	causes := []func(){
		func() { // a teardown request, as the worker serves it
			jitter(0)
			if served, err := h1.m.TeardownBuild(ctx, job, messages.ReasonRequested, nil, first); !served && err == nil {
				_ = h1.m.Teardown(ctx, job, messages.ReasonRequested, nil, first)
			}
		},
		func() { // the runner exits
			jitter(1)
			ag.exit(0, "done\n")
			h1.m.Tick()
		},
		func() { // the deadline passes
			jitter(2)
			h1.clk.Advance(700 * time.Second)
			h1.m.Tick()
		},
		func() { // another host takes the job's claim
			jitter(3)
			store.mu.Lock()
			store.put(job, "h2", 99)
			store.mu.Unlock()
			h1.clk.Advance(testClaimTTL / 2)
			h1.m.Tick()
		},
	}
	r.Shuffle(len(causes), func(i, j int) { causes[i], causes[j] = causes[j], causes[i] })
	var wg sync.WaitGroup
	for _, c := range causes {
		wg.Go(c)
	}
	wg.Wait()
	// Let whatever is still due happen.
	for range 10 {
		if h1.m.Active() == 0 {
			break
		}
		h1.clk.Advance(time.Minute)
		tickAll(t, h1.m)
	}

	var ends []messages.Event
	for _, ev := range eventsOfHost(h1.rec, job, "h1") {
		if ev.State.Terminal() || ev.State == messages.StateDropped {
			ends = append(ends, ev)
		}
	}
	if len(ends) != 1 {
		t.Fatalf("round %d: %d ends from h1, want 1: %v", round, len(ends), h1.rec.states(job))
	}
	if h1.m.Active() != 0 || h1.fm.count() != 0 {
		t.Fatalf("round %d: %d machines tracked, %d on the host after the end %s", round, h1.m.Active(), h1.fm.count(), ends[0].State)
	}
	return string(ends[0].State) + "/" + ends[0].Reason
}

func eventsOfHost(rec *recorder, job, host string) []messages.Event {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var out []messages.Event
	for _, ev := range rec.events {
		if ev.JobID == job && ev.Host == host {
			out = append(out, ev)
		}
	}
	return out
}
