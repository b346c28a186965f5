package integration

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// The library of orchestrators (pkg/client) against real workers and real
// guests: each test drives its jobs through it alone, as an orchestrator
// would, and reads their outcomes from it.

func clientFor(t *testing.T, url string, opts ...client.Option) *client.Client {
	t.Helper()
	c, err := client.Connect(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// followTo follows job until its status is in state, and fails the test
// when the job ends first.
func followTo(ctx context.Context, t *testing.T, job *client.Job, state messages.State) client.Status {
	t.Helper()
	for st, err := range job.Follow(ctx) {
		if err != nil {
			t.Fatalf("follow %s to %s: %v", job.ID, state, err)
		}
		if st.State == state {
			return st
		}
	}
	t.Fatalf("job %s ended before %s", job.ID, state)
	return client.Status{}
}

// TestClientRunnerKinds submits one job per runner kind through the
// library, follows each through the states of a runner's life in seq
// order, and waits for its outcome: torn down, with the exit code its stub
// runner exited with.
func TestClientRunnerKinds(t *testing.T) {
	dialLibvirt(t)
	url, js := startNATS(t)
	startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 4})
	c := clientFor(t, url)
	// The subtests run in parallel, after this function returned.
	ctx, cancel := context.WithTimeout(context.Background(), 3*bootWait)
	t.Cleanup(cancel)

	for _, tt := range []struct {
		kind   messages.RunnerKind
		runner func(job string) messages.Runner
		exit   int
	}{
		{messages.RunnerForgejo, func(job string) messages.Runner {
			return messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{URL: "https://code.example.org/",
				UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: "token-" + job, Labels: []string{"debian-12", "stub-exit=3"}}}
		}, 3},
		{messages.RunnerGitHub, func(job string) messages.Runner {
			return messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{JITConfig: "jit-" + job}}
		}, 0},
		{messages.RunnerJenkins, func(job string) messages.Runner {
			return messages.Runner{Kind: messages.RunnerJenkins, Jenkins: &messages.JenkinsAgent{URL: "https://jenkins.example.org/",
				AgentName: "agent " + job, Secret: "secret-" + job}}
		}, 0},
	} {
		t.Run(string(tt.kind), func(t *testing.T) {
			t.Parallel()
			id := uniqueJob(t, "cl-"+string(tt.kind))
			req := provisionRequest(id)
			req.Runner = tt.runner(id)
			job, err := c.Submit(ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			var seen []messages.State
			var last client.Status
			for st, err := range job.Follow(ctx) {
				if err != nil {
					t.Fatal(err)
				}
				if st.Event.Seq != last.Event.Seq+1 {
					t.Fatalf("%s (seq %d) followed seq %d", st.Event.State, st.Event.Seq, last.Event.Seq)
				}
				seen, last = append(seen, st.Event.State), st
			}
			if !slices.Equal(seen, runnerStates) {
				t.Fatalf("followed %v, want %v", seen, runnerStates)
			}
			out, err := c.Job(id).Wait(ctx)
			if err != nil || out.State != messages.StateTornDown || out.Reason != messages.ReasonRunnerExited ||
				out.ExitCode == nil || *out.ExitCode != tt.exit || out.Host != testHost || out.Error != nil {
				t.Fatalf("Wait = %+v (exit %v), %v; want torn_down on %s after the runner exited with %d", out, out.ExitCode, err, testHost, tt.exit)
			}
			if !sameOutcome(*last.Outcome, out) {
				t.Fatalf("Follow's outcome %+v, Wait's %+v", *last.Outcome, out)
			}
		})
	}
}

// TestClientTeardownFindsTheHost: two hosts serve one NATS; a job pinned
// to one and a job taken from the shared subject by either are torn down
// through the library, each at the host that serves it, which it finds
// from the job's events. A teardown sent to the other host would be
// answered unknown_job and leave the machine (docs/protocol.md 2.5): no
// job gets that answer, each ends once, torn down as requested.
func TestClientTeardownFindsTheHost(t *testing.T) {
	dialLibvirt(t)
	url, js := startNATS(t)
	run := strings.TrimPrefix(runID, "it")
	hostA, hostB := "cl-a-"+run, "cl-b-"+run
	startWorker(t, js, workerOptions{Host: hostA, Parallelism: 2, MaxVMs: 2})
	startWorker(t, js, workerOptions{Host: hostB, Parallelism: 2, MaxVMs: 2})
	c := clientFor(t, url)
	ctx, cancel := context.WithTimeout(context.Background(), 3*bootWait)
	defer cancel()

	pinned, err := c.Submit(ctx, provisionRequest(uniqueJob(t, "cl-pinned")), client.OnHost(hostB))
	if err != nil {
		t.Fatal(err)
	}
	shared, err := c.Submit(ctx, provisionRequest(uniqueJob(t, "cl-shared")))
	if err != nil {
		t.Fatal(err)
	}
	for _, job := range []*client.Job{pinned, shared} {
		st := followTo(ctx, t, job, messages.StateAgentReady)
		// A handle of its own, as an orchestrator restarted since the
		// submit has: the host comes from the job's events alone.
		rc, err := c.Job(job.ID).Teardown(ctx, "test")
		if err != nil {
			t.Fatalf("teardown of %s: %v", job.ID, err)
		}
		if want := messages.TeardownSubject(st.Host); rc.Subject != want {
			t.Fatalf("teardown of %s on %s, want %s (its events are %s's)", job.ID, rc.Subject, want, st.Host)
		}
		t.Logf("job %s: served by %s, teardown on %s", job.ID, st.Host, rc.Subject)
		// Again: idempotent.
		if again, err := job.Teardown(ctx, "test"); err != nil || !again.Duplicate {
			t.Fatalf("second teardown of %s: %+v, %v; want a duplicate", job.ID, again, err)
		}
	}
	if pinned.Receipt.Subject != messages.HostProvisionSubject(hostB) {
		t.Fatalf("the pinned job was published on %s", pinned.Receipt.Subject)
	}
	for _, job := range []*client.Job{pinned, shared} {
		out, err := job.Wait(ctx)
		if err != nil || out.State != messages.StateTornDown || out.Reason != messages.ReasonRequested || out.Error != nil {
			t.Fatalf("Wait for %s = %+v, %v; want torn_down, requested", job.ID, out, err)
		}
		var terminal int
		for ev, err := range c.Events(ctx, client.Query{Job: job.ID}) {
			if err != nil {
				t.Fatal(err)
			}
			if ev.State.Terminal() {
				terminal++
			}
			if ev.Error != nil && ev.Error.Code == messages.CodeUnknownJob {
				t.Fatalf("job %s: %s answered a teardown unknown_job", job.ID, ev.Host)
			}
		}
		if terminal != 1 {
			t.Fatalf("job %s has %d terminal events", job.ID, terminal)
		}
		if job == pinned && out.Host != hostB {
			t.Fatalf("the pinned job ended on %s, want %s", out.Host, hostB)
		}
	}
}

// startEmbeddedWorker runs worker run with its embedded NATS server on
// port, its data in dataDir, as a single host runs it.
func startEmbeddedWorker(t *testing.T, host, dataDir string, port int) *process {
	t.Helper()
	cmd := exec.Command(workerBinary(t), "run", "--host", host, "--domain-type", "qemu",
		"--nats-data-dir", dataDir, "--nats-port", strconv.Itoa(port), "--log-format", "json", "--log-level", "debug",
		"--parallelism", "2", "--max-vms", "2", "--keys-dir", filepath.Join(t.TempDir(), "no-keys"))
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &process{cmd: cmd, log: &out.Buffer}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			_ = cmd.Wait()
		}
		if t.Failed() {
			out.mu.Lock()
			t.Logf("worker log:\n%s", out.String())
			out.mu.Unlock()
		}
	})
	return p
}

// TestClientWaitAcrossWorkerKill: an orchestrator waits, through the
// library, for a job served by a worker whose embedded NATS server holds
// the streams. The worker is killed with SIGKILL while the job's runner
// runs, taking the NATS server with it, and started again on the same
// data: the client reconnects, its Wait goes on and returns the job's one
// outcome (the new worker adopts the machine and ends the job once), and a
// new Wait returns the same.
func TestClientWaitAcrossWorkerKill(t *testing.T) {
	dialLibvirt(t)
	host := "cl-kill-" + strings.TrimPrefix(runID, "it")
	dataDir := filepath.Join(t.TempDir(), "nats")
	port := freePort(t)
	p := startEmbeddedWorker(t, host, dataDir, port)
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)

	// The credentials the worker made, as its commands on the host use
	// them; reconnecting for as long as the test runs.
	var c *client.Client
	var reconnects atomic.Int32
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		if creds, err := embedded.LoadCredentials(dataDir); err == nil {
			if c, err = client.Connect(url, client.WithNATSOptions(nats.Nkey(creds.PublicKey(), creds.Sign),
				nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond),
				nats.ReconnectHandler(func(*nats.Conn) { reconnects.Add(1) }))); err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("the worker's embedded NATS did not come up at %s", url)
		}
	}
	t.Cleanup(c.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 4*bootWait)
	defer cancel()
	for {
		if _, err := c.Hosts(ctx); err == nil {
			break // the worker made its streams and buckets
		}
		select {
		case <-ctx.Done():
			t.Fatal("the worker did not set up its streams")
		case <-time.After(200 * time.Millisecond):
		}
	}

	id := uniqueJob(t, "cl-kill")
	job, err := c.Submit(ctx, stubRunnerRequest(id, 20))
	if err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	var out client.Outcome
	go func() {
		var err error
		out, err = job.Wait(ctx)
		waited <- err
	}()
	followTo(ctx, t, job, messages.StateRunnerStarted)
	p.kill(t)
	killed := time.Now()
	startEmbeddedWorker(t, host, dataDir, port)
	if err := <-waited; err != nil {
		t.Fatalf("Wait across the kill: %v", err)
	}
	t.Logf("the outcome came %s after the kill", time.Since(killed).Round(time.Millisecond))
	if reconnects.Load() == 0 {
		t.Fatal("the client never reconnected: the kill did not take its NATS server down")
	}
	if out.State != messages.StateTornDown || out.ExitCode == nil || *out.ExitCode != 0 || out.Host != host || out.Error != nil {
		t.Fatalf("Wait = %+v (exit %v); want torn_down on %s after the runner exited with 0", out, out.ExitCode, host)
	}
	again, err := c.Job(id).Wait(ctx)
	if err != nil || !sameOutcome(again, out) {
		t.Fatalf("a new Wait = %+v, %v; want %+v", again, err, out)
	}
	var terminal []messages.Event
	var started int
	for ev, err := range c.Events(ctx, client.Query{Job: id}) {
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case ev.State.Terminal():
			terminal = append(terminal, ev)
		case ev.State == messages.StateRunnerStarted:
			started++
		}
	}
	if len(terminal) != 1 || started != 1 {
		t.Fatalf("%d terminal events and %d runner starts, want one each: %+v", len(terminal), started, terminal)
	}
	if !terminal[0].Time.Equal(out.Time) {
		t.Fatalf("the outcome is not the job's terminal event: %+v, %+v", out, terminal[0])
	}
}

// sameOutcome compares two outcomes by value.
func sameOutcome(a, b client.Outcome) bool {
	code := func(p *int) string {
		if p == nil {
			return "-"
		}
		return strconv.Itoa(*p)
	}
	e := func(p *messages.Error) string {
		if p == nil {
			return "-"
		}
		return string(p.Code) + ": " + p.Message
	}
	return a.JobID == b.JobID && a.State == b.State && a.Host == b.Host && a.Time.Equal(b.Time) && a.Reason == b.Reason &&
		code(a.ExitCode) == code(b.ExitCode) && e(a.Error) == e(b.Error) && a.HeldUntil.Equal(b.HeldUntil)
}
