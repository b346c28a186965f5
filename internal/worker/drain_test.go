package worker

import (
	"context"
	"testing"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// TestDrain: a draining host with a running machine takes no provision,
// pinned or by image, serves the machine's teardown, reports drained once
// empty, stays drained across a restart, and takes the waiting requests
// once undrained.
func TestDrain(t *testing.T) {
	env := startServer(t)
	log := watchEvents(t, env.url)
	ctx := context.Background()
	a := startFleetHost(t, env, "a", 0, "img")
	op := client.New(env.js)
	state := func() messages.HostState {
		recs, err := op.Hosts(ctx)
		if err != nil || len(recs) != 1 {
			return ""
		}
		return recs[0].State
	}
	waitRegistered(t, op, map[string]int{"a": 1})
	if err := submitImageProvision(ctx, env.js, provisionFor("running", "img")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "running ready", func() bool { return log.has("running", messages.StateAgentReady) })

	if err := op.Drain(ctx, "a", "test"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "draining", func() bool { return state() == messages.HostDraining })
	if err := submitImageProvision(ctx, env.js, provisionFor("by-image", "img")); err != nil {
		t.Fatal(err)
	}
	if _, err := submitProvision(ctx, env.js, provisionFor("pinned", "img"), "a"); err != nil {
		t.Fatal(err)
	}
	if err := submitTeardown(ctx, env.js, "running", "a"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "running torn down", func() bool { return log.has("running", messages.StateTornDown) })
	waitFor(t, "drained", func() bool { return state() == messages.HostDrained })
	if got := a.changes("state"); len(got) < 2 || got[len(got)-1].State != messages.HostDrained {
		t.Fatalf("state changes %+v", got)
	}
	beats := len(a.changes("beat"))
	waitFor(t, "three more heartbeats", func() bool { return len(a.changes("beat")) >= beats+3 })
	if log.has("by-image", messages.StateAccepted) || log.has("pinned", messages.StateAccepted) {
		t.Fatal("a drained host took a provision")
	}

	// A restart keeps the drain.
	a.stop()
	a2 := startFleetHost(t, env, "a", 0, "img")
	waitFor(t, "drained after restart", func() bool { return state() == messages.HostDrained })
	beats = len(a2.changes("beat"))
	waitFor(t, "three more heartbeats", func() bool { return len(a2.changes("beat")) >= beats+3 })
	if log.has("by-image", messages.StateAccepted) || log.has("pinned", messages.StateAccepted) {
		t.Fatal("a restarted drained host took a provision")
	}

	if err := a2.w.Drain(ctx, false, ""); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "active", func() bool { return state() == messages.HostActive })
	waitFor(t, "by-image served", func() bool { return log.has("by-image", messages.StateAgentReady) })
	waitFor(t, "pinned served", func() bool { return log.has("pinned", messages.StateAgentReady) })
}
