package integration

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

var runnerStates = []messages.State{
	messages.StateAccepted, messages.StateCloning, messages.StateCloned, messages.StateBooting,
	messages.StateRunning, messages.StateAgentReady, messages.StateRunnerStarted,
	messages.StateRunnerExited, messages.StateTearingDown, messages.StateTornDown,
}

func digest(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// readGuestFile reads a file in a running machine through its guest agent,
// retrying until it exists or the timeout passes.
func readGuestFile(t *testing.T, agent *qga.Agent, domain, path string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		st, err := agent.Run(ctx, domain, qga.ExecRequest{Path: "/bin/cat", Args: []string{path}, Capture: true})
		cancel()
		if err == nil {
			return string(st.Stdout)
		}
		if time.Now().After(deadline) {
			t.Fatalf("read %s in %s: %v", path, domain, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// guestCommandLines returns the command lines of every process in the guest.
func guestCommandLines(t *testing.T, agent *qga.Agent, domain string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := agent.Run(ctx, domain, qga.ExecRequest{
		Path: "/bin/sh", Args: []string{"-c", `for f in /proc/[0-9]*/cmdline; do tr '\0' ' ' <"$f"; echo; done`}, Capture: true,
	})
	if err != nil {
		t.Fatalf("list guest processes: %v", err)
	}
	return string(st.Stdout)
}

func TestRunnersStartAsStretchyWithSecretsInFiles(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	rw := startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 4})
	agent := qga.New(l, qga.Options{})

	tests := []struct {
		name     string
		report   string // report name of the stub
		runner   func(secret string) messages.Runner
		wantExit int
		argv     []string // arguments the runner must get, besides others
	}{
		{
			name: "forgejo", report: "forgejo-runner", wantExit: 3,
			runner: func(secret string) messages.Runner {
				return messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
					URL: "https://code.example.org/a&b=$x'y/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: secret,
					Labels: []string{"debian 12", "it's", "日本語", "stub-exit=3"}, Handle: "h-77",
				}}
			},
			argv: []string{"'one-job'", `'--url=https://code.example.org/a&b=$x'\''y/'`, "'--uuid=0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f'",
				"'--label=debian 12:host'", `'--label=it'\''s:host'`, "'--label=日本語:host'", "'--handle=h-77'", "'--wait'"},
		},
		{
			name: "github", report: "actions-runner", wantExit: 0,
			runner: func(secret string) messages.Runner {
				return messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{JITConfig: secret}}
			},
		},
		{
			name: "jenkins", report: "java", wantExit: 0,
			runner: func(secret string) messages.Runner {
				return messages.Runner{Kind: messages.RunnerJenkins, Jenkins: &messages.JenkinsAgent{
					URL: "https://jenkins.example.org/", AgentName: "agent one", Secret: secret,
				}}
			},
			argv: []string{"'-jar'", "'/home/stretchy/agent.jar'", "'-url'", "'https://jenkins.example.org/'",
				"'-name'", "'agent one'", "'-webSocket'", "'-noReconnect'"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			job := uniqueJob(t, "run-"+tt.name)
			secret := "PLANTED-" + tt.name + "-" + job
			req := provisionRequest(job)
			req.Runner = tt.runner(secret)
			if _, err := submitReq(context.Background(), js, req, ""); err != nil {
				t.Fatal(err)
			}
			started := events.waitState(t, job, messages.StateRunnerStarted, bootWait)
			if started.RunnerPID == 0 || started.OS != "linux" {
				t.Fatalf("runner_started %+v", started)
			}
			domain := messages.DomainName(job)
			report := readGuestFile(t, agent, domain, "/tmp/runner-report-"+tt.report+".txt", 5*time.Second)
			procs := guestCommandLines(t, agent, domain)
			t.Logf("report:\n%s", report)

			for _, want := range []string{"uid=1000\n", "home=/home/stretchy\n", "pwd=/home/stretchy\n"} {
				if !strings.Contains(report, want) {
					t.Errorf("report lacks %q", want)
				}
			}
			argv := report[strings.Index(report, "argv:\n")+6 : strings.Index(report, "\nuid=")]
			for _, want := range tt.argv {
				if !slices.Contains(strings.Split(argv, "\n"), want) {
					t.Errorf("argv lacks %s:\n%s", want, argv)
				}
			}
			if tt.name == "forgejo" {
				// The job timeout follows the request's lifetime
				// (provisionRequest: max_lifetime_s 600), in a file
				// private to stretchy that the runner is pointed at.
				config := "/home/stretchy/.stretchy/" + job + "/forgejo-runner.yaml"
				if !slices.Contains(strings.Split(argv, "\n"), "'--config="+config+"'") {
					t.Errorf("argv lacks --config=%s:\n%s", config, argv)
				}
				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				st, err := agent.Run(ctx, domain, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", `stat -c '%a %u:%g' "$1" && cat "$1"`, "sh", config}, Capture: true})
				cancel()
				want := "600 1000:1000\n# Forgejo Runner configuration for one CI job. Written by the stretchy libvirt worker.\nrunner:\n  timeout: 600s\n"
				if err != nil || string(st.Stdout) != want {
					t.Errorf("%s: %q, %v; want %q", config, st.Stdout, err, want)
				}
			}
			switch tt.name {
			case "github":
				if !strings.Contains(report, "jitconfig-sha256="+digest(secret)) {
					t.Error("the runner did not get the JIT config in ACTIONS_RUNNER_INPUT_JITCONFIG")
				}
			default:
				for _, want := range []string{"secret-mode=600", "secret-owner=1000:1000", "secret-sha256=" + digest(secret)} {
					if !strings.Contains(report, want) {
						t.Errorf("report lacks %q: the secret file is not private to stretchy or has the wrong content", want)
					}
				}
			}
			if strings.Contains(report, secret) || strings.Contains(procs, secret) {
				t.Fatal("the secret appears in the runner's argv or environment, or in a guest command line")
			}

			exited := events.waitState(t, job, messages.StateRunnerExited, 60*time.Second)
			if exited.ExitCode == nil || *exited.ExitCode != tt.wantExit {
				t.Fatalf("runner_exited %+v, want exit code %d", exited, tt.wantExit)
			}
			if want := fmt.Sprintf("stub %s finished with %d", tt.report, tt.wantExit); !strings.Contains(exited.Output, want) {
				t.Errorf("output %q lacks %q", exited.Output, want)
			}
			down := events.waitState(t, job, messages.StateTornDown, 60*time.Second)
			if down.Reason != messages.ReasonRunnerExited {
				t.Errorf("torn_down reason %q", down.Reason)
			}
			if got := events.states(job); !slices.Equal(got, runnerStates) {
				t.Fatalf("events %v, want %v", got, runnerStates)
			}
			for _, ev := range events.of(job) {
				if strings.Contains(fmt.Sprintf("%+v %+v", ev, ev.Error), secret) {
					t.Fatalf("event %s carries the secret", ev.State)
				}
			}
			for _, s := range rw.settlements() {
				if s.Err != nil && strings.Contains(s.Err.Error(), secret) {
					t.Fatalf("an error carries the secret: %v", s.Err)
				}
			}
			if _, err := l.DomainLookupByName(domain); err == nil {
				t.Fatal("the machine still exists after torn_down")
			}
		})
	}
}

func TestBootTimeoutFailsAndLeavesNothing(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 4})

	// No TCG guest gets its agent up within a second.
	job := uniqueJob(t, "slowboot")
	req := provisionRequest(job)
	req.BootTimeoutS = 1
	if _, err := submitReq(context.Background(), js, req, ""); err != nil {
		t.Fatal(err)
	}
	failed := events.waitState(t, job, messages.StateFailed, bootWait)
	if failed.Error == nil || failed.Error.Code != messages.CodeBootTimeout {
		t.Fatalf("failed event %+v", failed)
	}
	want := []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateCloned,
		messages.StateBooting, messages.StateRunning, messages.StateFailed}
	if got := events.states(job); !slices.Equal(got, want) {
		t.Fatalf("events %v, want %v", got, want)
	}
	if _, err := l.DomainLookupByName(messages.DomainName(job)); err == nil {
		t.Fatal("the machine was left behind")
	}
	waitQueueEmpty(t, js)
}
