package integration

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// stepAgent is the worker's real guest agent with two hooks around the
// runner's preparation commands (the root-run writes into stretchy's home,
// recognised by the home directory in their arguments): before runs once,
// before the first of them; failed runs when one of them fails, with its
// request, while the machine still exists. Both run in the worker's
// goroutine.
type stepAgent struct {
	lifecycle.Agent
	before func(ctx context.Context, domain string)
	failed func(ctx context.Context, domain string, req qga.ExecRequest)

	once sync.Once
}

func (a *stepAgent) Run(ctx context.Context, domain string, req qga.ExecRequest) (qga.Status, error) {
	prepare := req.Path == "/bin/sh" && strings.Contains(strings.Join(req.Args, "\n"), "/home/stretchy/")
	if prepare {
		a.once.Do(func() { a.before(ctx, domain) })
	}
	st, err := a.Agent.Run(ctx, domain, req)
	if prepare && err != nil {
		a.failed(ctx, domain, req)
	}
	return st, err
}

// guestShell runs script with /bin/sh as root in domain and returns its
// standard output; a failure is returned, not reported, since it runs in
// the worker's goroutine.
func guestShell(ctx context.Context, agent lifecycle.Agent, domain, script string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	st, err := agent.Run(ctx, domain, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", script}, Capture: true})
	return string(st.Stdout), err
}

// trapState describes /tmp/trap: owner, mode and content of the directory
// and of the file in it.
const trapState = `cd /tmp/trap && stat -c '%u:%g %a %n' . token && ls -A . && cat token`

// TestSecretWriteRefusesSymlinks plants a symbolic link, as stretchy, at
// each path the root-run write of the runner's secret goes through: the
// base directory <home>/.stretchy, the job directory, the secret file. The
// link points into /tmp/trap, owned by root. The job must fail with
// runner_start_failed before the runner starts, and /tmp/trap must keep its
// owner, mode and content. The worker does not capture the output of
// preparation commands, so the refused command is run once more, capturing
// it, to check what it says on stderr.
func TestSecretWriteRefusesSymlinks(t *testing.T) {
	dialLibvirt(t)
	tests := []struct {
		name string
		// plant runs as stretchy; $B is <home>/.stretchy, $J the job
		// directory.
		plant string
		// link is where the link is, below <home>.
		link string
	}{
		{"base directory", `ln -s /tmp/trap "$B"`, ".stretchy"},
		{"job directory", `mkdir -m 700 "$B" && ln -s /tmp/trap "$J"`, ".stretchy/$J"},
		{"secret file", `mkdir -m 700 "$B" "$J" && ln -s /tmp/trap/token "$J/token"`, ".stretchy/$J/token"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, js := startNATS(t)
			events := followEvents(t, js)
			job := uniqueJob(t, "symlink")
			// What the hooks saw, in the worker's goroutine.
			var (
				mu   sync.Mutex
				seen struct {
					before, after, stderr string
					plantErr, inspectErr  error
					inspected             bool
				}
			)
			wrap := func(real lifecycle.Agent) lifecycle.Agent {
				return &stepAgent{Agent: real,
					before: func(ctx context.Context, domain string) {
						script := `set -e
mkdir /tmp/trap
echo keep >/tmp/trap/token
chmod 755 /tmp/trap
chmod 644 /tmp/trap/token
B=/home/stretchy/.stretchy J=/home/stretchy/.stretchy/` + job + ` su -s /bin/sh stretchy -c '` + tt.plant + `'
` + trapState
						out, err := guestShell(ctx, real, domain, script)
						mu.Lock()
						seen.before, seen.plantErr = out, err
						mu.Unlock()
					},
					failed: func(ctx context.Context, domain string, req qga.ExecRequest) {
						req.Capture = true
						rctx, cancel := context.WithTimeout(ctx, 20*time.Second)
						st, _ := real.Run(rctx, domain, req)
						cancel()
						out, err := guestShell(ctx, real, domain, trapState)
						mu.Lock()
						seen.after, seen.inspectErr, seen.inspected, seen.stderr = out, err, true, string(st.Stderr)
						mu.Unlock()
					},
				}
			}
			startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 4, WrapAgent: wrap})

			req := provisionRequest(job)
			req.Runner = messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
				URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: "PLANTED-" + job, Labels: []string{"debian-12"},
			}}
			if _, err := submitReq(context.Background(), js, req, ""); err != nil {
				t.Fatal(err)
			}
			ev, ok := waitEvent(events, job, bootWait, messages.StateFailed, messages.StateRunnerStarted)
			if !ok {
				t.Fatalf("no failed or runner_started event; events:\n%s", events.dump())
			}
			if ev.State == messages.StateFailed && (ev.Error == nil || ev.Error.Code != messages.CodeRunnerStartFailed) {
				t.Fatalf("failed event %+v, want %s", ev.Error, messages.CodeRunnerStartFailed)
			}
			mu.Lock()
			got := seen
			mu.Unlock()
			if got.plantErr != nil {
				t.Fatalf("plant the link: %v\n%s", got.plantErr, got.before)
			}
			if want := "0:0 755 .\n0:0 644 token\ntoken\nkeep\n"; got.before != want {
				t.Fatalf("trap before the job:\n%s\nwant:\n%s", got.before, want)
			}
			if ev.State == messages.StateRunnerStarted {
				events.waitState(t, job, messages.StateTornDown, time.Minute)
				t.Fatal("the secret was written through the link and the runner started")
			}
			if !strings.Contains(ev.Error.Message, "write Forgejo Runner secret") || !strings.Contains(ev.Error.Message, "exit code 1") {
				t.Errorf("error %q, want the secret's write failing with exit code 1", ev.Error.Message)
			}
			if !got.inspected || got.inspectErr != nil {
				t.Fatalf("trap not inspected after the failed write (inspected %v): %v", got.inspected, got.inspectErr)
			}
			want := "stretchy: refusing to write /home/stretchy/.stretchy/" + job + "/token: /home/stretchy/" + strings.ReplaceAll(tt.link, "$J", job) + " is a symbolic link\n"
			if got.stderr != want {
				t.Errorf("the refused write says %q on stderr, want %q", got.stderr, want)
			}
			if got.after != got.before {
				t.Errorf("trap changed by the write:\nbefore:\n%s\nafter:\n%s", got.before, got.after)
			}
		})
	}
}
