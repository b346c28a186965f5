package lifecycle

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// msgIDs returns the Nats-Msg-Ids of jobID's events, in the order they were
// stored.
func (r *recorder) msgIDs(jobID string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, len(r.events))
	for id, pos := range r.ids {
		out[pos-1] = id
	}
	var ids []string
	for i, ev := range r.events {
		if ev.JobID == jobID {
			ids = append(ids, out[i])
		}
	}
	return ids
}

// TestSelfStartedEndsHaveDocumentedIDs pins the Nats-Msg-Ids of the events
// of a teardown the machine began by itself (docs/protocol.md 5.6):
// <job_id>:<state>:<reason>, so that two such teardowns of one job for
// different reasons are not taken for duplicates of each other.
func TestSelfStartedEndsHaveDocumentedIDs(t *testing.T) {
	for _, c := range []struct {
		reason string
		end    func(fx fixture, ag *fakeAgent)
		// tail is the Nats-Msg-Ids of the job's last events.
		tail []string
	}{
		{messages.ReasonRunnerExited, func(_ fixture, ag *fakeAgent) { ag.exit(0, "") },
			[]string{"j1:runner_exited:runner_exited", "j1:tearing_down:runner_exited", "j1:torn_down:runner_exited"}},
		{messages.ReasonDeadline, func(fx fixture, _ *fakeAgent) { fx.clk.Advance(time.Hour) },
			[]string{"j1:tearing_down:deadline", "j1:failed:deadline"}},
		{messages.ReasonStopped, func(fx fixture, _ *fakeAgent) {
			fx.fm.mu.Lock()
			fx.fm.machines["j1"].Running = false
			fx.fm.mu.Unlock()
		}, []string{"j1:tearing_down:machine_stopped", "j1:failed:machine_stopped"}},
	} {
		t.Run(c.reason, func(t *testing.T) {
			fx, ag := newAgentFixture()
			if err := fx.m.Provision(context.Background(), forgejoRequest(fx, "j1"), first); err != nil {
				t.Fatal(err)
			}
			c.end(fx, ag)
			tickAll(t, fx.m)
			waitFor(t, func() bool { return fx.rec.last("j1").State.Terminal() })
			ids := fx.rec.msgIDs("j1")
			if len(ids) < len(c.tail) || !slices.Equal(ids[len(ids)-len(c.tail):], c.tail) {
				t.Fatalf("Nats-Msg-Ids %v, want them to end with %v", ids, c.tail)
			}
		})
	}
}
