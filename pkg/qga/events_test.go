package qga_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// callerFunc is a Caller that makes each call directly.
type callerFunc struct{}

func (callerFunc) Call(_ context.Context, _ time.Duration, fn func() error) error { return fn() }

// TestWaitReadyWithAgentEvents: with a Caller, which keeps WaitReady from
// subscribing on its connection, the AgentEvents' connection of its own
// wakes it when the agent connects: it pings far less often than polling
// would, and two guests booting at once each get theirs.
func TestWaitReadyWithAgentEvents(t *testing.T) {
	requireLibvirt(t)
	events := qga.NewAgentEvents(func(ctx context.Context) (*libvirt.Libvirt, error) {
		return provision.Dial(ctx, "qemu:///system")
	})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = events.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	deadline := time.Now().Add(time.Minute)
	for !events.Live() {
		if time.Now().After(deadline) {
			t.Fatal("the events connection did not come up")
		}
		time.Sleep(10 * time.Millisecond)
	}
	var guests []*guestWait
	for range 2 {
		rec := &recordingConn{Conn: connect(t)}
		gw := &guestWait{rec: rec}
		gw.a = qga.New(rec, qga.Options{Caller: callerFunc{}, Events: events, Ready: func(w qga.Wake) {
			gw.mu.Lock()
			gw.wakes = append(gw.wakes, w)
			gw.mu.Unlock()
		}})
		if !gw.a.EventsLive() {
			t.Fatal("EventsLive is false with live events")
		}
		gw.g = newGuest(t, guestSpec{boot: true, agent: true})
		guests = append(guests, gw)
	}
	var waits sync.WaitGroup
	for _, gw := range guests {
		waits.Add(1)
		go func() {
			defer waits.Done()
			gw.err = gw.a.WaitReady(ctxFor(t, bootTimeout), gw.g.name)
			gw.took = time.Since(gw.g.started)
		}()
	}
	waits.Wait()
	for _, gw := range guests {
		if gw.err != nil {
			t.Fatalf("WaitReady %s: %v", gw.g.name, gw.err)
		}
		commands, _ := gw.rec.record()
		// Polling would ping every 250 ms; the safety net pings once a
		// second, and the event adds one or a few.
		if limit := int(gw.took/time.Second) + 4; len(commands) > limit {
			t.Errorf("%s: %d pings in %v, want at most %d: woken by polling, not the event", gw.g.name, len(commands), gw.took, limit)
		}
		gw.mu.Lock()
		wakes := gw.wakes
		gw.mu.Unlock()
		if len(wakes) != 1 {
			t.Errorf("%s: Ready was told %v, want one wake", gw.g.name, wakes)
		}
		t.Logf("%s: ready %v after its start, %d pings, woken by %v", gw.g.name, gw.took.Round(time.Millisecond), len(commands), wakes)
	}
}

type guestWait struct {
	mu    sync.Mutex
	wakes []qga.Wake
	g     *guest
	rec   *recordingConn
	a     *qga.Agent
	err   error
	took  time.Duration
}
