package lifecycle

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// fakeAgent stands in for the guest agent, which libvirt's test driver
// does not have. It records every command, to check what reached the guest.
type fakeAgent struct {
	mu       sync.Mutex
	never    bool // the agent never answers
	osID     string
	uname    string
	startErr error
	runErr   error
	procs    map[int]*qga.Status
	nextPID  int
	commands []qga.ExecRequest
	osInfos  int // guest-get-osinfo calls
	// readyGate, when set, blocks WaitReady until closed, whatever its
	// ctx does, and then returns readyErr; readyWaiting says it waits.
	readyGate    chan struct{}
	readyErr     error
	readyWaiting bool
}

func newFakeAgent() *fakeAgent {
	return &fakeAgent{osID: "debian", procs: map[int]*qga.Status{}, nextPID: 100}
}

func (a *fakeAgent) WaitReady(ctx context.Context, _ string) error {
	a.mu.Lock()
	gate := a.readyGate
	a.readyWaiting = gate != nil
	a.mu.Unlock()
	if gate != nil {
		<-gate
		a.mu.Lock()
		defer a.mu.Unlock()
		a.readyWaiting = false
		return a.readyErr
	}
	if a.never {
		<-ctx.Done()
		return fmt.Errorf("%w: %w", qga.ErrAgentTimeout, ctx.Err())
	}
	return nil
}

// waitingReady reports whether WaitReady waits at its gate.
func (a *fakeAgent) waitingReady() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.readyWaiting
}

func (a *fakeAgent) OSInfo(context.Context, string) (qga.OSInfo, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.osInfos++
	return qga.OSInfo{ID: a.osID}, nil
}

func (a *fakeAgent) Run(_ context.Context, _ string, req qga.ExecRequest) (qga.Status, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.commands = append(a.commands, req)
	if a.runErr != nil {
		return qga.Status{}, a.runErr
	}
	return qga.Status{Exited: true, Stdout: []byte(a.uname)}, nil
}

func (a *fakeAgent) Start(_ context.Context, _ string, req qga.ExecRequest) (int, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.commands = append(a.commands, req)
	if a.startErr != nil {
		return 0, a.startErr
	}
	a.nextPID++
	a.procs[a.nextPID] = &qga.Status{ExitCode: -1}
	return a.nextPID, nil
}

func (a *fakeAgent) Status(_ context.Context, _ string, pid int) (qga.Status, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	st, ok := a.procs[pid]
	if !ok {
		return qga.Status{}, qga.ErrCommandFailed
	}
	if st.Exited {
		delete(a.procs, pid) // qemu-ga reports an exit once
	}
	return *st, nil
}

// exit makes every running process exit with code and output.
func (a *fakeAgent) exit(code int, output string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, st := range a.procs {
		st.Exited, st.ExitCode, st.Stdout = true, code, []byte(output)
	}
}

func newAgentFixture() (fixture, *fakeAgent) {
	fx := newFixture()
	ag := newFakeAgent()
	fx.m.cfg.Agent = ag
	return fx, ag
}

const planted = "PLANTED-SECRET-7f3a"

func forgejoRequest(fx fixture, jobID string) messages.Provision {
	req := fx.request(jobID, "debian")
	req.BootTimeoutS = 1
	req.Runner = messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
		URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: planted, Labels: []string{"debian"},
	}}
	return req
}

var runnerHappy = []messages.State{
	messages.StateAccepted, messages.StateCloning, messages.StateCloned, messages.StateBooting,
	messages.StateRunning, messages.StateAgentReady, messages.StateRunnerStarted,
}

func TestRunnerLifecycle(t *testing.T) {
	fx, ag := newAgentFixture()
	ctx := context.Background()
	if err := fx.m.Provision(ctx, forgejoRequest(fx, "j1"), first); err != nil {
		t.Fatal(err)
	}
	if got := fx.rec.states("j1"); !slices.Equal(got, runnerHappy) {
		t.Fatalf("events %v, want %v", got, runnerHappy)
	}
	started := fx.rec.last("j1")
	if started.RunnerPID == 0 || started.OS != "linux" {
		t.Fatalf("runner_started %+v", started)
	}
	tickAll(t, fx.m)
	if got := fx.rec.states("j1"); !slices.Equal(got, runnerHappy) {
		t.Fatalf("a running runner ended the job: %v", got)
	}
	ag.exit(3, "step 1 ok\ntoken is "+planted+"\nbye\n")
	tickAll(t, fx.m)
	want := append(slices.Clone(runnerHappy), messages.StateRunnerExited, messages.StateTearingDown, messages.StateTornDown)
	if got := fx.rec.states("j1"); !slices.Equal(got, want) {
		t.Fatalf("events %v, want %v", got, want)
	}
	exited := fx.rec.events[len(runnerHappy)]
	if exited.State != messages.StateRunnerExited || exited.ExitCode == nil || *exited.ExitCode != 3 {
		t.Fatalf("runner_exited %+v", exited)
	}
	if strings.Contains(exited.Output, planted) || !strings.Contains(exited.Output, "[REDACTED]") {
		t.Fatalf("output not scrubbed: %q", exited.Output)
	}
	if got := fx.rec.last("j1"); got.State != messages.StateTornDown || got.Reason != messages.ReasonRunnerExited {
		t.Fatalf("last event %+v", got)
	}
	// The secret reached the guest only as the stdin of a command.
	for _, c := range ag.commands {
		for _, s := range append(append([]string{c.Path}, c.Args...), c.Env...) {
			if strings.Contains(s, planted) {
				t.Fatalf("secret in a guest command line: %q", s)
			}
		}
	}
	for _, ev := range fx.rec.events {
		if strings.Contains(fmt.Sprintf("%+v %v", ev, ev.Error), planted) {
			t.Fatalf("secret in event %+v", ev)
		}
	}
}

// TestForgejoJobTimeoutFollowsLifetime: Forgejo Runner cancels a job
// after its runner.timeout, 3 h unless configured, which is below the
// default max_lifetime_s of 6 h. The worker writes a configuration whose
// timeout is the request's lifetime, by the root-run command that writes
// the secret and the launch script, and points the runner at it.
func TestForgejoJobTimeoutFollowsLifetime(t *testing.T) {
	tests := []struct {
		name     string
		lifetime int64 // max_lifetime_s
		want     string
	}{
		{"default lifetime", 0, "timeout: 21600s"},
		{"two hours", 7200, "timeout: 7200s"},
		{"a week", 604800, "timeout: 604800s"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fx, ag := newAgentFixture()
			req := forgejoRequest(fx, "j1")
			req.MaxLifetimeS = tt.lifetime
			if err := fx.m.Provision(context.Background(), req, first); err != nil {
				t.Fatal(err)
			}
			if len(ag.commands) < 2 {
				t.Fatalf("%d guest commands, want the preparation and the launch", len(ag.commands))
			}
			const config = "/home/stretchy/.stretchy/j1/forgejo-runner.yaml"
			prep := ag.commands[len(ag.commands)-2]
			var wrote, points bool
			for i, a := range prep.Args {
				if a == config && i+1 < len(prep.Args) && strings.Contains(prep.Args[i+1], "\nrunner:\n  "+tt.want+"\n") {
					wrote = true
				}
				if strings.Contains(a, "'--config="+config+"'") {
					points = true
				}
			}
			if !wrote || !points {
				t.Errorf("the preparation writes %s with %q: %v; the launch script passes --config=%s: %v\n%q",
					config, tt.want, wrote, config, points, prep.Args)
			}
		})
	}
}

func TestRunnerFailures(t *testing.T) {
	tests := []struct {
		name     string
		setup    func(*fakeAgent)
		osID     string
		kind     messages.RunnerKind
		wantCode messages.ErrorCode
		last     messages.State // the last state before failed
	}{
		{"agent never answers", func(a *fakeAgent) { a.never = true }, "debian", messages.RunnerForgejo, messages.CodeBootTimeout, messages.StateRunning},
		{"preparation fails", func(a *fakeAgent) { a.runErr = errors.New("sh: not found") }, "debian", messages.RunnerForgejo, messages.CodeRunnerStartFailed, messages.StateAgentReady},
		{"runner program missing", func(a *fakeAgent) { a.startErr = &qga.ExecError{Path: "/bin/sh", Err: qga.ErrCommandFailed} }, "debian", messages.RunnerForgejo, messages.CodeRunnerStartFailed, messages.StateAgentReady},
		{"github on freebsd", func(*fakeAgent) {}, "freebsd", messages.RunnerGitHub, messages.CodeRunnerUnsupported, messages.StateAgentReady},
		{"unknown guest os", func(a *fakeAgent) { a.uname = "Plan9" }, "plan9", messages.RunnerForgejo, messages.CodeAgentFailed, messages.StateRunning},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fx, ag := newAgentFixture()
			ag.osID = tt.osID
			tt.setup(ag)
			req := forgejoRequest(fx, "j1")
			if tt.kind == messages.RunnerGitHub {
				req.Runner = messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{JITConfig: planted}}
			}
			err := fx.m.Provision(context.Background(), req, first)
			var f *Failure
			if !errors.As(err, &f) || f.Code != tt.wantCode {
				t.Fatalf("got %v, want Failure %s", err, tt.wantCode)
			}
			states := fx.rec.states("j1")
			if n := len(states); n < 2 || states[n-1] != messages.StateFailed || states[n-2] != tt.last {
				t.Fatalf("events %v, want ... %s, failed", states, tt.last)
			}
			if fx.fm.count() != 0 || fx.m.Active() != 0 {
				t.Fatal("the machine was left behind")
			}
			if strings.Contains(fx.rec.last("j1").Error.Message, planted) {
				t.Fatal("secret in the failed event")
			}
		})
	}
}

func TestRunnerKindNoneIsReadyWithTheAgent(t *testing.T) {
	fx, ag := newAgentFixture()
	if err := fx.m.Provision(context.Background(), fx.request("j1", "debian"), first); err != nil {
		t.Fatal(err)
	}
	if got := fx.rec.states("j1"); !slices.Equal(got, runnerHappy[:6]) {
		t.Fatalf("events %v", got)
	}
	if len(ag.commands) != 0 {
		t.Fatalf("commands ran for kind none: %d", len(ag.commands))
	}
}

func TestGuestPowerOffEndsJob(t *testing.T) {
	fx, _ := newAgentFixture()
	ctx := context.Background()
	if err := fx.m.Provision(ctx, forgejoRequest(fx, "j1"), first); err != nil {
		t.Fatal(err)
	}
	fx.fm.mu.Lock()
	fx.fm.machines["j1"].Running = false
	fx.fm.mu.Unlock()
	tickAll(t, fx.m)
	if last := fx.rec.last("j1"); last.State != messages.StateFailed || last.Error.Code != messages.CodeMachineStopped {
		t.Fatalf("last event %+v", last)
	}
	if fx.fm.count() != 0 {
		t.Fatal("machine left")
	}
}

func TestReconcileWatchesAdoptedRunner(t *testing.T) {
	fx, ag := newAgentFixture()
	ctx := context.Background()
	if err := fx.m.Provision(ctx, forgejoRequest(fx, "j1"), first); err != nil {
		t.Fatal(err)
	}
	// A new worker process on the same host: same machines, same events.
	m2 := New(Config{Host: "h1", Machines: fx.fm, Events: fx.rec, History: fx.rec, Agent: ag, Now: fx.clk.Now})
	if err := m2.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if m2.Active() != 1 {
		t.Fatal("the running job was not adopted")
	}
	ag.exit(0, "")
	tickAll(t, m2)
	if ev := fx.rec.events[len(runnerHappy)]; ev.State != messages.StateRunnerExited || ev.Seq != uint64(len(runnerHappy)+1) {
		t.Fatalf("event after runner_started %+v", ev)
	}
	if last := fx.rec.last("j1"); last.State != messages.StateTornDown || last.Reason != messages.ReasonRunnerExited {
		t.Fatalf("last event %+v", last)
	}
}

var _ = time.Second

// TestAdoptedRunnerOutputIsWithheld: a worker that adopted a running
// machine after a restart does not know the job's secrets, so it publishes
// the runner's exit without its output (output_withheld) rather than
// output it cannot scrub. Before, the output went out as the runner
// printed it, secret and all.
func TestAdoptedRunnerOutputIsWithheld(t *testing.T) {
	fx, ag := newAgentFixture()
	ctx := context.Background()
	if err := fx.m.Provision(ctx, forgejoRequest(fx, "j1"), first); err != nil {
		t.Fatal(err)
	}
	m2 := New(Config{Host: "h1", Machines: fx.fm, Events: fx.rec, History: fx.rec, Agent: ag, Now: fx.clk.Now})
	if err := m2.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	ag.exit(3, "token is "+planted+"\n")
	tickAll(t, m2)
	last := fx.rec.events[len(runnerHappy)]
	if last.State != messages.StateRunnerExited || last.Output != "" || !last.OutputWithheld ||
		last.ExitCode == nil || *last.ExitCode != 3 {
		t.Fatalf("runner_exited of the adopted job: %+v, want exit code 3, no output, output_withheld", last)
	}
}

// TestOutputScrubbing: secrets are removed from each stream in whole
// before the output is cut to its end, and the end of a stream the agent
// truncated is redacted when it begins a secret.
func TestOutputScrubbing(t *testing.T) {
	const secret = "SECRET-0123456789abcdef"
	j := runnerState{secrets: []string{secret, "other-secret-value", "a b/" + secret}, secretsKnown: true}
	filler := strings.Repeat("x", maxOutput-10) + "\n"
	tests := []struct {
		name string
		st   qga.Status
		want func(out string) bool
	}{
		{"secret across the cut", qga.Status{Stdout: []byte("a\n" + secret + filler)},
			func(out string) bool { return !strings.Contains(out, "0123") && !strings.Contains(out, "cdef") }},
		{"secret at the start of stderr", qga.Status{Stdout: []byte("out\n"), Stderr: []byte(secret + " err\n")},
			func(out string) bool { return out == "out\n[REDACTED] err\n" }},
		{"stdout truncated inside a secret", qga.Status{Stdout: []byte("log " + secret[:9]), StdoutTruncated: true, Stderr: []byte("e\n")},
			func(out string) bool { return out == "log [REDACTED]e\n" }},
		{"truncated without a secret at its end", qga.Status{Stdout: []byte("log SEC ret"), StdoutTruncated: true},
			func(out string) bool { return out == "log SEC ret" }},
		{"complete output ending like a secret is kept", qga.Status{Stdout: []byte("say SECRET-0")},
			func(out string) bool { return out == "say SECRET-0" }},
		{"base64 of a secret", qga.Status{Stdout: []byte("auth " + base64.StdEncoding.EncodeToString([]byte(secret)) + "\n")},
			func(out string) bool { return out == "auth [REDACTED]\n" }},
		{"percent-encoded secret", qga.Status{Stderr: []byte("GET /x?token=" + url.QueryEscape("a b/"+secret) + "\n")},
			func(out string) bool { return out == "GET /x?token=[REDACTED]\n" }},
		{"stdout truncated inside the base64 of a secret", qga.Status{Stdout: []byte("log " + base64.StdEncoding.EncodeToString([]byte(secret))[:12]), StdoutTruncated: true},
			func(out string) bool { return out == "log [REDACTED]" }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, withheld := output(j, tt.st)
			if withheld || !tt.want(out) {
				t.Fatalf("output = %q (withheld %v)", out, withheld)
			}
		})
	}
}

// TestRunnerExitNoticedBetweenTicks: a runner's exit is noticed by the
// runner poll, with no tick at all; a host that polls only at ticks does
// not notice it.
func TestRunnerExitNoticedBetweenTicks(t *testing.T) {
	for _, poll := range []time.Duration{5 * time.Millisecond, -1} {
		t.Run(fmt.Sprint(poll), func(t *testing.T) {
			fx, ag := newAgentFixture()
			fx.m.cfg.RunnerPoll = poll
			if err := fx.m.Provision(context.Background(), forgejoRequest(fx, "j1"), first); err != nil {
				t.Fatal(err)
			}
			ag.exit(0, "")
			if poll < 0 {
				time.Sleep(50 * time.Millisecond) // any poll would have run by now
				if got := fx.rec.last("j1").State; got != messages.StateRunnerStarted {
					t.Fatalf("without polls or ticks the job went on to %s", got)
				}
				return
			}
			waitFor(t, func() bool { return fx.rec.last("j1").State == messages.StateTornDown })
		})
	}
}

// TestGuestOSIsAskedOncePerImageGeneration runs jobs of one image: the
// first guest is asked what it runs, later clones of the same generation
// are not, and a new generation of the image is asked again.
func TestGuestOSIsAskedOncePerImageGeneration(t *testing.T) {
	fx, ag := newAgentFixture()
	ctx := context.Background()
	provision := func(job string) {
		t.Helper()
		if err := fx.m.Provision(ctx, forgejoRequest(fx, job), first); err != nil {
			t.Fatal(err)
		}
		if ev := fx.rec.last(job); ev.State != messages.StateRunnerStarted || ev.OS != "linux" {
			t.Fatalf("%s: last event %s, OS %q; want runner_started on linux", job, ev.State, ev.OS)
		}
	}
	asked := func() int {
		ag.mu.Lock()
		defer ag.mu.Unlock()
		return ag.osInfos
	}
	provision("j1")
	provision("j2")
	if n := asked(); n != 1 {
		t.Fatalf("guest-get-osinfo %d times for two clones of one generation, want 1", n)
	}
	fx.fm.mu.Lock()
	fx.fm.generations["debian"] = "g2"
	fx.fm.mu.Unlock()
	provision("j3")
	if n := asked(); n != 2 {
		t.Fatalf("guest-get-osinfo %d times after the image changed, want 2", n)
	}
}
