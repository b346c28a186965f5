package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// claimStore is a compare-and-set store with a TTL on the fixture's clock,
// shared by the hosts of a test like the claims bucket is. bus/claims_test
// runs the real bucket.
type claimStore struct {
	mu   sync.Mutex
	now  func() time.Time
	ttl  time.Duration
	rev  uint64
	keys map[string]storedClaim
}

type storedClaim struct {
	claim messages.Claim
	rev   uint64
	at    time.Time
}

func newClaimStore(now func() time.Time, ttl time.Duration) *claimStore {
	return &claimStore{now: now, ttl: ttl, keys: map[string]storedClaim{}}
}

// get returns the live claim on job.
func (s *claimStore) get(job string) (storedClaim, bool) {
	c, ok := s.keys[job]
	if ok && s.now().Sub(c.at) >= s.ttl {
		delete(s.keys, job)
		return storedClaim{}, false
	}
	return c, ok
}

func (s *claimStore) put(job, host string, request uint64) uint64 {
	s.rev++
	s.keys[job] = storedClaim{messages.Claim{V: 1, Host: host, Request: request, Since: s.now()}, s.rev, s.now()}
	return s.rev
}

func (s *claimStore) holder(job string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, _ := s.get(job)
	return c.claim.Host
}

// claimsOf is the store as seen by host.
type claimsOf struct {
	s    *claimStore
	host string
}

func (c claimsOf) Take(_ context.Context, job string, request uint64) (uint64, messages.Claim, error) {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	if cur, ok := c.s.get(job); ok && cur.claim.Host != c.host {
		return 0, cur.claim, nil
	}
	return c.s.put(job, c.host, request), messages.Claim{}, nil
}

func (c claimsOf) Keep(_ context.Context, job string, request, rev uint64) (uint64, messages.Claim, error) {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	cur, ok := c.s.get(job)
	if !ok || cur.rev != rev {
		return 0, cur.claim, nil
	}
	return c.s.put(job, c.host, request), messages.Claim{}, nil
}

func (c claimsOf) Release(_ context.Context, job string, rev uint64) error {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	if cur, ok := c.s.get(job); ok && cur.rev == rev {
		delete(c.s.keys, job)
	}
	return nil
}

const testClaimTTL = 15 * time.Second

// twoHosts returns fixtures for hosts h1 and h2 with their own machines,
// one event stream, one clock and one claims store.
func twoHosts() (h1, h2 fixture, store *claimStore) {
	h1 = newFixture()
	store = newClaimStore(h1.clk.Now, testClaimTTL)
	mk := func(host string, fm *fakeMachines) *Manager {
		return New(Config{Host: host, Machines: fm, Events: h1.rec, History: h1.rec, Now: h1.clk.Now,
			Claims: claimsOf{store, host}, ClaimTTL: testClaimTTL})
	}
	h1.m = mk("h1", h1.fm)
	h2 = fixture{m: nil, fm: newFakeMachines(), rec: h1.rec, clk: h1.clk}
	h2.m = mk("h2", h2.fm)
	return h1, h2, store
}

func eventsOf(rec *recorder, job, host string) []messages.State {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var out []messages.State
	for _, ev := range rec.events {
		if ev.JobID == job && ev.Host == host {
			out = append(out, ev.State)
		}
	}
	return out
}

// TestClaimedJobIsDroppedByOtherHost: a delivery of a job that another
// host holds builds nothing and publishes dropped; the same request is left
// to the holder, a repeated request is acknowledged.
func TestClaimedJobIsDroppedByOtherHost(t *testing.T) {
	h1, h2, store := twoHosts()
	ctx := context.Background()
	if err := h1.m.Provision(ctx, h1.request("j1", "debian"), Delivery{Attempt: 1, Request: 7}); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		request uint64
		leave   bool
	}{{7, true}, {8, false}} {
		err := h2.m.Provision(ctx, h2.request("j1", "debian"), Delivery{Attempt: 2, Request: c.request})
		var dropped *Dropped
		if !errors.As(err, &dropped) || dropped.Holder != "h1" || dropped.Leave != c.leave || dropped.Reason != messages.ReasonClaimedElsewhere {
			t.Fatalf("request %d on h2: %v (%+v), want dropped for h1 with leave %v", c.request, err, dropped, c.leave)
		}
	}
	if h2.fm.clones != 0 || h2.m.Active() != 0 {
		t.Fatalf("h2 cloned %d machines, tracks %d jobs", h2.fm.clones, h2.m.Active())
	}
	if got := eventsOf(h1.rec, "j1", "h2"); !slices.Equal(got, []messages.State{messages.StateDropped, messages.StateDropped}) {
		t.Fatalf("h2's events %v, want two dropped", got)
	}
	if ev := h1.rec.last("j1"); ev.Holder != "h1" || ev.Reason != messages.ReasonClaimedElsewhere {
		t.Fatalf("dropped event %+v, want holder h1 and reason %s", ev, messages.ReasonClaimedElsewhere)
	}
	// The holder ends the job and lets the claim go.
	if err := h1.m.Teardown(ctx, "j1", messages.ReasonRequested, nil, first); err != nil {
		t.Fatal(err)
	}
	if h := store.holder("j1"); h != "" {
		t.Fatalf("claim still held by %q after the teardown", h)
	}
}

// TestStalledHostLosesClaim: a host stalls mid-clone for longer than the
// claim's TTL, another host takes the job and builds it; the stalled host
// notices before it boots, removes what it built, publishes dropped and
// leaves the request alone.
func TestStalledHostLosesClaim(t *testing.T) {
	h1, h2, store := twoHosts()
	ctx := context.Background()
	h1.fm.cloneGate = make(chan struct{})
	errc := make(chan error, 1)
	go func() { errc <- h1.m.Provision(ctx, h1.request("j2", "debian"), Delivery{Attempt: 1, Request: 3}) }()
	waitFor(t, func() bool {
		return store.holder("j2") == "h1" && slices.Contains(eventsOf(h1.rec, "j2", "h1"), messages.StateCloning)
	})

	h1.clk.Advance(testClaimTTL + time.Second) // h1 stalls
	if err := h2.m.Provision(ctx, h2.request("j2", "debian"), Delivery{Attempt: 2, Request: 3}); err != nil {
		t.Fatalf("h2 after h1's claim lapsed: %v", err)
	}
	close(h1.fm.cloneGate) // h1 resumes
	err := <-errc
	var dropped *Dropped
	if !errors.As(err, &dropped) || !dropped.Leave || dropped.Holder != "h2" || dropped.Reason != messages.ReasonClaimLost {
		t.Fatalf("h1: %v (%+v), want a dropped claim_lost left to h2", err, dropped)
	}
	if h1.fm.count() != 0 || h1.m.Active() != 0 || h1.fm.machines["j2"] != nil {
		t.Fatalf("h1 kept %d machines, tracks %d jobs", h1.fm.count(), h1.m.Active())
	}
	if h2.fm.count() != 1 || store.holder("j2") != "h2" {
		t.Fatalf("h2 has %d machines, the claim is %q's", h2.fm.count(), store.holder("j2"))
	}
	want := []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateDropped}
	if got := eventsOf(h1.rec, "j2", "h1"); !slices.Equal(got, want) {
		t.Fatalf("h1's events %v, want %v", got, want)
	}
}

// TestLapsedClaimIsTakenAgain: a claim that lapsed during a build while
// nobody took the job is taken again and the build goes on; one that
// lapsed while another host served the job and let it go is lost, though
// nobody holds it any more.
func TestLapsedClaimIsTakenAgain(t *testing.T) {
	h1, h2, store := twoHosts()
	ctx := context.Background()
	h1.fm.cloneGate = make(chan struct{})
	errc := make(chan error, 1)
	go func() { errc <- h1.m.Provision(ctx, h1.request("j3", "debian"), Delivery{Attempt: 1, Request: 4}) }()
	waitFor(t, func() bool { return store.holder("j3") == "h1" })
	h1.clk.Advance(testClaimTTL)
	close(h1.fm.cloneGate)
	if err := <-errc; err != nil {
		t.Fatalf("h1 after a lapse nobody used: %v", err)
	}
	if h1.fm.count() != 1 || store.holder("j3") != "h1" {
		t.Fatalf("%d machines, claim %q", h1.fm.count(), store.holder("j3"))
	}

	// h1 stalls in a build; h2 serves the job meanwhile and ends it.
	h1.fm.cloneGate = make(chan struct{})
	go func() { errc <- h1.m.Provision(ctx, h1.request("j7", "debian"), Delivery{Attempt: 1, Request: 5}) }()
	waitFor(t, func() bool { return store.holder("j7") == "h1" })
	h1.clk.Advance(testClaimTTL)
	if err := h2.m.Provision(ctx, h2.request("j7", "debian"), Delivery{Attempt: 2, Request: 5}); err != nil {
		t.Fatal(err)
	}
	if err := h2.m.Teardown(ctx, "j7", messages.ReasonRequested, nil, first); err != nil {
		t.Fatal(err)
	}
	if h := store.holder("j7"); h != "" {
		t.Fatalf("claim held by %q after h2's teardown", h)
	}
	close(h1.fm.cloneGate)
	var dropped *Dropped
	if err := <-errc; !errors.As(err, &dropped) || dropped.Holder != "h2" || !dropped.Leave {
		t.Fatalf("h1: %v, want dropped naming h2", err)
	}
	if h1.fm.machines["j7"] != nil || store.holder("j7") != "" {
		t.Fatalf("h1 kept j7's machine, or the claim (%q)", store.holder("j7"))
	}
}

// TestRunningMachineKeepsItsClaim: the watch renews the claims of running
// machines, takes a lapsed one back, and gives up a machine whose job
// another host took meanwhile, without ending the job.
func TestRunningMachineKeepsItsClaim(t *testing.T) {
	h1, h2, store := twoHosts()
	ctx := context.Background()
	if err := h1.m.Provision(ctx, h1.request("j4", "debian"), Delivery{Attempt: 1, Request: 9}); err != nil {
		t.Fatal(err)
	}
	for range 5 {
		h1.clk.Advance(testClaimTTL / 2)
		tickAll(t, h1.m)
		if h1.m.Active() != 1 {
			t.Fatal("the machine went")
		}
	}
	if store.holder("j4") != "h1" {
		t.Fatal("the renewed claim is gone")
	}
	// Lapsed, nobody took it: taken back.
	h1.clk.Advance(2 * testClaimTTL)
	tickAll(t, h1.m)
	if h1.m.Active() != 1 || store.holder("j4") != "h1" {
		t.Fatalf("after a lapse: %d machines, holder %q", h1.m.Active(), store.holder("j4"))
	}
	// Lapsed, and a repeated request came to h2: h1's events say that
	// it serves the job, so h2 builds nothing, and h1 takes its claim
	// back.
	h1.clk.Advance(2 * testClaimTTL)
	var dropped *Dropped
	if err := h2.m.Provision(ctx, h2.request("j4", "debian"), Delivery{Attempt: 1, Request: 12}); !errors.As(err, &dropped) ||
		dropped.Holder != "h1" || dropped.Reason != messages.ReasonClaimedElsewhere || dropped.Leave {
		t.Fatalf("repeated request on h2: %v, want dropped for h1, acknowledged", err)
	}
	tickAll(t, h1.m)
	if h1.fm.count() != 1 || h2.fm.count() != 0 || store.holder("j4") != "h1" {
		t.Fatalf("h1 %d machines, h2 %d, claim %q", h1.fm.count(), h2.fm.count(), store.holder("j4"))
	}
	// Lapsed, and another host holds the claim now: h1 lets go.
	h1.clk.Advance(2 * testClaimTTL)
	store.mu.Lock()
	store.put("j4", "h2", 12)
	store.mu.Unlock()
	h2.fm.machines["j4"] = &provision.Machine{Name: "stretchy-j4", JobID: "j4", Host: "h2"}
	tickAll(t, h1.m)
	if h1.fm.count() != 0 || h2.fm.count() != 1 || store.holder("j4") != "h2" {
		t.Fatalf("h1 %d machines, h2 %d, claim %q", h1.fm.count(), h2.fm.count(), store.holder("j4"))
	}
	got := eventsOf(h1.rec, "j4", "h1")
	if got[len(got)-1] != messages.StateDropped || slices.Contains(got, messages.StateTornDown) {
		t.Fatalf("h1's events %v, want dropped last and no torn_down", got)
	}
}

// TestFailedProvisionReleasesClaim: a permanent failure and a transient
// one both let the claim go, so the next delivery can be served anywhere.
func TestFailedProvisionReleasesClaim(t *testing.T) {
	h1, _, store := twoHosts()
	ctx := context.Background()
	var f *Failure
	if err := h1.m.Provision(ctx, h1.request("j5", "nope"), Delivery{Attempt: 1, Request: 1}); !errors.As(err, &f) {
		t.Fatalf("unknown image: %v", err)
	}
	if h := store.holder("j5"); h != "" {
		t.Fatalf("claim held by %q after a permanent failure", h)
	}
	h1.fm.startErr = fmt.Errorf("start: %w", provision.ErrDisconnected)
	h1.fm.cloneErr = nil
	err := h1.m.Provision(ctx, h1.request("j6", "debian"), Delivery{Attempt: 1, Request: 2})
	if err == nil || errors.As(err, &f) {
		t.Fatalf("start failure: %v, want a transient error", err)
	}
	if h := store.holder("j6"); h != "" {
		t.Fatalf("claim held by %q after a transient failure", h)
	}
}

// TestRepeatedRequestWhileHolderStalls: a repeated request for a job whose
// host stalled past the claim's TTL, its machine ready, builds nothing on
// another host: the job's events say who serves it. Before, the other host
// took the lapsed claim and built a second machine, which ran a second
// runner beside the first, and whose events the event stream dropped as
// duplicates of the first host's (same Nats-Msg-Ids): found by the soak
// (seed 5), a job torn down on one host while another ran it unseen.
func TestRepeatedRequestWhileHolderStalls(t *testing.T) {
	for _, tc := range []struct {
		name string
		// dropBy, when set, is a third host whose dropped (holder h1) is
		// the job's newest event.
		dropBy string
	}{
		{name: "its own events newest"},
		{name: "another host's dropped newest", dropBy: "h3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h1, h2, store := twoHosts()
			ctx := context.Background()
			if err := h1.m.Provision(ctx, h1.request("j1", "debian"), Delivery{Attempt: 1, Request: 7}); err != nil {
				t.Fatal(err)
			}
			if tc.dropBy != "" {
				last := h1.rec.last("j1")
				if err := h1.rec.Publish(ctx, messages.Event{V: 1, JobID: "j1", Host: tc.dropBy, State: messages.StateDropped,
					Seq: last.Seq + 1, Holder: "h1", Reason: messages.ReasonClaimedElsewhere}, "j1:dropped:1:h3:9"); err != nil {
					t.Fatal(err)
				}
			}
			h1.clk.Advance(2 * testClaimTTL) // h1 stalls; its claim lapses
			err := h2.m.Provision(ctx, h2.request("j1", "debian"), Delivery{Attempt: 1, Request: 8})
			var dropped *Dropped
			if !errors.As(err, &dropped) || dropped.Holder != "h1" || dropped.Reason != messages.ReasonClaimedElsewhere || dropped.Leave {
				t.Fatalf("repeated request on h2: %v, want dropped for h1, acknowledged", err)
			}
			if h2.fm.count() != 0 || store.holder("j1") == "h2" {
				t.Fatalf("h2 built %d machines, claim %q", h2.fm.count(), store.holder("j1"))
			}
			if got := eventsOf(h2.rec, "j1", "h2"); !slices.Equal(got, []messages.State{messages.StateDropped}) {
				t.Fatalf("h2's events %v, want only dropped", got)
			}
			tickAll(t, h1.m)
			if h1.fm.count() != 1 || store.holder("j1") != "h1" {
				t.Fatalf("h1 resumed with %d machines, claim %q", h1.fm.count(), store.holder("j1"))
			}
		})
	}
}

// TestProvisionOfEndedJobBuildsNothing: a provision for a job that has
// ended (its newest event is terminal, on any host) is acknowledged
// without building anything or publishing anything, also by a host that
// never served it and by a restarted one, which has no memory of it.
// Before, such a host built the job again, and its events, numbered as
// the first host's (attempt 1), were dropped as duplicates: a machine
// nobody saw (soak, seed 4).
func TestProvisionOfEndedJobBuildsNothing(t *testing.T) {
	for _, tc := range []struct {
		name string
		end  func(t *testing.T, h1 fixture)
	}{
		{"torn down", func(t *testing.T, h1 fixture) {
			if err := h1.m.Teardown(context.Background(), "j1", messages.ReasonRequested, nil, first); err != nil {
				t.Fatal(err)
			}
		}},
		{"failed elsewhere", func(t *testing.T, h1 fixture) {
			if err := h1.m.Teardown(context.Background(), "j1", messages.ReasonRequested, nil, first); err != nil {
				t.Fatal(err)
			}
			last := h1.rec.last("j1")
			if err := h1.rec.Publish(context.Background(), messages.Event{V: 1, JobID: "j1", Host: "h3", State: messages.StateFailed,
				Seq: last.Seq + 1, Error: &messages.Error{Code: messages.CodeMaxDeliveries}}, "j1:failed:max_deliveries:3"); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h1, h2, store := twoHosts()
			ctx := context.Background()
			if err := h1.m.Provision(ctx, h1.request("j1", "debian"), Delivery{Attempt: 1, Request: 7}); err != nil {
				t.Fatal(err)
			}
			tc.end(t, h1)
			before := len(h1.rec.events)
			restarted := New(Config{Host: "h1", Machines: h1.fm, Events: h1.rec, History: h1.rec, Now: h1.clk.Now,
				Claims: claimsOf{store, "h1"}, ClaimTTL: testClaimTTL})
			defer restarted.Close()
			for _, m := range []*Manager{h2.m, restarted} {
				if err := m.Provision(ctx, h2.request("j1", "debian"), Delivery{Attempt: 1, Request: 8}); err != nil {
					t.Fatalf("provision of an ended job: %v, want it acknowledged", err)
				}
			}
			if h1.fm.count() != 0 || h2.fm.count() != 0 || store.holder("j1") != "" {
				t.Fatalf("machines h1 %d, h2 %d, claim %q", h1.fm.count(), h2.fm.count(), store.holder("j1"))
			}
			if n := len(h1.rec.events); n != before {
				t.Fatalf("%d events published for an ended job: %+v", n-before, h1.rec.events[before:])
			}
		})
	}
}
