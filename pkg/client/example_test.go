package client_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Example submits a Forgejo job to any host that has its image and waits
// for its end.
func Example() {
	url, stop := exampleNATS()
	defer stop()

	c, err := client.Connect(url) // plus client.WithCredsFile(...) and the like
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()

	job, err := c.Submit(ctx, messages.Provision{
		JobID: "fj-1", Image: "debian-12",
		Runner: messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
			URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f",
			Token: "s3cr3t-token", Labels: []string{"debian-12"},
		}},
	})
	if err != nil {
		log.Fatal(err)
	}
	out, err := job.Wait(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("job %s: %s on %s, the runner exited with %d\n", job.ID, out.State, out.Host, *out.ExitCode)
	// Output: job fj-1: torn_down on host-a, the runner exited with 0
}

// ExampleJob_Follow prints a job's steps as its events come.
func ExampleJob_Follow() {
	url, stop := exampleNATS()
	defer stop()
	c, err := client.Connect(url)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()

	job, err := c.Submit(ctx, messages.Provision{JobID: "ex-follow", Image: "debian-12",
		Runner: messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
			URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: "t", Labels: []string{"exit=2"}}}},
		client.OnImage(), client.CheckCarriers())
	if err != nil {
		log.Fatal(err)
	}
	for st, err := range job.Follow(ctx) {
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(st.Event.Seq, st.Host, st.State)
		if st.Outcome != nil {
			fmt.Println("outcome:", st.Outcome.State, "exit code", *st.Outcome.ExitCode)
		}
	}
	// Output:
	// 1 host-a accepted
	// 2 host-a cloning
	// 3 host-a cloned
	// 4 host-a booting
	// 5 host-a running
	// 6 host-a agent_ready
	// 7 host-a runner_started
	// 8 host-a runner_exited
	// 9 host-a tearing_down
	// 10 host-a torn_down
	// outcome: torn_down exit code 2
}

// ExampleJob_Teardown tears a machine down once it is ready; the teardown
// goes to the host that serves the job, found from its events.
func ExampleJob_Teardown() {
	url, stop := exampleNATS()
	defer stop()
	c, err := client.Connect(url)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()

	// Kind none: the machine boots and waits for its teardown.
	job, err := c.Submit(ctx, messages.Provision{JobID: "ex-none", Image: "debian-12", Runner: messages.Runner{Kind: messages.RunnerNone}})
	if err != nil {
		log.Fatal(err)
	}
	for st, err := range job.Follow(ctx) {
		if err != nil {
			log.Fatal(err)
		}
		if st.State == messages.StateAgentReady {
			break
		}
	}
	// Any handle will do, such as one an orchestrator makes after a restart.
	rc, err := c.Job("ex-none").Teardown(ctx, "done with it")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("teardown on", rc.Subject)
	out, err := job.Wait(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(out.State, out.Reason)
	// Output:
	// teardown on stretchy.LIBVIRT.req.host.host-a.teardown
	// torn_down requested
}

// ExampleJob_Wait_failed tells a failed job's error code from other
// errors.
func ExampleJob_Wait_failed() {
	url, stop := exampleNATS()
	defer stop()
	c, err := client.Connect(url)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()

	job, err := c.Submit(ctx, messages.Provision{JobID: "ex-missing", Image: "no-such-image", Runner: messages.Runner{Kind: messages.RunnerNone}})
	if err != nil {
		log.Fatal(err)
	}
	_, err = job.Wait(ctx)
	var je *client.JobError
	switch {
	case errors.As(err, &je):
		fmt.Println("failed:", je.Code)
	case errors.Is(err, client.ErrUnreachable):
		fmt.Println("NATS does not answer; try again")
	case err != nil:
		log.Fatal(err)
	}
	// Output: failed: image_not_found
}

// ExampleClient_Submit_notCarried checks the host registry before
// publishing a request that would wait for an image no host carries.
func ExampleClient_Submit_notCarried() {
	url, stop := exampleNATS()
	defer stop()
	c, err := client.Connect(url)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	_, err = c.Submit(context.Background(), messages.Provision{JobID: "ex-mac", Image: "macos-14", Runner: messages.Runner{Kind: messages.RunnerNone}},
		client.OnImage(), client.CheckCarriers())
	fmt.Println(errors.Is(err, client.ErrImageNotCarried))
	// Output: true
}

// ExampleClient_Events audits the jobs of the last hour: one line per
// job, its events folded into a Status.
func ExampleClient_Events() {
	url, stop := exampleNATS()
	defer stop()
	c, err := client.Connect(url)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	for _, id := range []string{"audit-1", "audit-2"} {
		job, err := c.Submit(ctx, messages.Provision{JobID: id, Image: "debian-12",
			Runner: messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
				URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: "t", Labels: []string{"debian-12"}}}})
		if err != nil {
			log.Fatal(err)
		}
		if _, err := job.Wait(ctx); err != nil {
			log.Fatal(err)
		}
	}

	jobs := map[string]*client.Status{}
	var order []string
	for ev, err := range c.Events(ctx, client.Query{Since: time.Now().Add(-time.Hour)}) {
		if err != nil {
			log.Fatal(err)
		}
		st := jobs[ev.JobID]
		if st == nil {
			st = &client.Status{}
			jobs[ev.JobID] = st
			order = append(order, ev.JobID)
		}
		st.Apply(ev)
	}
	for _, id := range order {
		st := jobs[id]
		fmt.Printf("%s %s %s, %d events\n", id, st.Host, st.Outcome.State, st.Events)
	}
	// Output:
	// audit-1 host-a torn_down, 10 events
	// audit-2 host-a torn_down, 10 events
}

// ExampleClient_Hosts lists the fleet, as an operator.
func ExampleClient_Hosts() {
	url, stop := exampleNATS()
	defer stop()
	c, err := client.Connect(url, client.WithRole(client.Operator))
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	hosts, err := c.Hosts(context.Background())
	if err != nil {
		log.Fatal(err)
	}
	for _, h := range hosts {
		var images []string
		for _, im := range h.Images {
			images = append(images, im.Name)
		}
		fmt.Println(h.Host, h.State, strings.Join(images, ","))
	}
	// Output: host-a active debian-12
}

// ExampleJob_Hold keeps a job's machine after its end, as an operator.
func ExampleJob_Hold() {
	url, stop := exampleNATS()
	defer stop()
	orch, err := client.Connect(url)
	if err != nil {
		log.Fatal(err)
	}
	defer orch.Close()
	op, err := client.Connect(url, client.WithRole(client.Operator), client.WithIdentity("alice@ops"))
	if err != nil {
		log.Fatal(err)
	}
	defer op.Close()
	ctx := context.Background()
	job, err := orch.Submit(ctx, messages.Provision{JobID: "ex-hold", Image: "debian-12", Runner: messages.Runner{Kind: messages.RunnerNone}})
	if err != nil {
		log.Fatal(err)
	}
	for st, err := range job.Follow(ctx) {
		if err != nil {
			log.Fatal(err)
		}
		if st.State == messages.StateAgentReady {
			break
		}
	}
	reply, err := op.Job("ex-hold").Hold(ctx, time.Hour)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("held on %s for %s once its job ends\n", reply.Host, time.Duration(reply.HoldForS)*time.Second)
	if _, err := job.Teardown(ctx, "example done"); err != nil {
		log.Fatal(err)
	}
	// Output: held on host-a for 1h0m0s once its job ends
}

// exampleNATS starts what the examples run against: an in-process NATS
// server and a worker of host-a that carries debian-12 and pretends to
// build machines (fakeworker_test.go). In real use the URL is that of
// your NATS deployment, where the workers run.
func exampleNATS() (url string, stop func()) {
	dir, err := os.MkdirTemp("", "client-example")
	if err != nil {
		log.Fatal(err)
	}
	srv, err := embedded.Start(embedded.Options{StoreDir: dir, Port: -1})
	if err != nil {
		log.Fatal(err)
	}
	stopWorker, _, err := runFakeWorker(srv.ClientURL(), "host-a", "debian-12")
	if err != nil {
		log.Fatal(err)
	}
	return srv.ClientURL(), func() {
		stopWorker()
		srv.Shutdown()
		srv.WaitForShutdown()
		_ = os.RemoveAll(dir)
	}
}
