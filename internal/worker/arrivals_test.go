package worker

import (
	"context"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// TestRequestsArePulledOnArrival: with a PullWait far longer than the
// test waits, a provision published to any of the worker's consumers
// (pinned, an image's, shared) is still pulled at once, after the worker
// has gone back to waiting. Before arrivals, only the consumer its long
// poll waited on (the shared one) was: the others waited out PullWait.
func TestRequestsArePulledOnArrival(t *testing.T) {
	env := startServer(t)
	log := watchEvents(t, env.url)
	startFleetHostPulling(t, env, "a", 0, 10*time.Minute, "img")
	op := client.New(env.js)
	waitRegistered(t, op, map[string]int{"a": 1})
	ctx := context.Background()
	for i, to := range []string{"pinned", "image", "shared", "pinned", "image"} {
		job := "arrive-" + to + "-" + string(rune('a'+i))
		req := provisionFor(job, "img")
		var err error
		switch to {
		case "pinned":
			_, err = submitProvision(ctx, env.js, req, "a")
		case "shared":
			_, err = submitProvision(ctx, env.js, req, "")
		case "image":
			var data []byte
			if data, err = messages.Marshal(&req); err == nil {
				_, err = env.js.Publish(ctx, messages.ImageProvisionSubject("img"), data)
			}
		}
		if err != nil {
			t.Fatal(err)
		}
		// waitFor gives up long before PullWait would pass.
		waitFor(t, "agent_ready of "+job, func() bool { return log.has(job, messages.StateAgentReady) })
	}
}
