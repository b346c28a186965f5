package bench

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sourcegraph/conc/pool"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// GuestConfig configures the benchmark of real jobs on real guests.
type GuestConfig struct {
	// Worker is the worker binary (bin/worker), Script the process-per-step
	// baseline (scripts/bench/virsh-job.sh).
	Worker, Script string
	// Image is the image domain both clone (tiny-linux).
	Image string
	// Sleep is how long the stub runner of each job runs, in seconds.
	Sleep int
	// Pairs is how many times one worker job and one virsh job run in
	// turn; Triples how many times three of each run at once.
	Pairs, Triples int
	// Dir holds the worker's log.
	Dir  string
	NATS *NATS
	// Log reports progress.
	Log func(format string, args ...any)
}

// Phase is one row of the phase table: how long something took for a
// job done by the worker (A) and by the virsh script (B), in ms, and how
// each figure is obtained.
type Phase struct {
	Key, Name string
	// Worker and Virsh say where the figure comes from.
	Worker, Virsh string
}

// GuestPhases are the rows of the phase table, in the order of a job.
var GuestPhases = []Phase{
	{"clone", "clone + define",
		"`phase_ms` of `cloned`", "`vol-create-as` with a backing volume, then `define`"},
	{"start", "libvirt start",
		"`phase_ms` of `running`", "`virsh start`"},
	{"boot", "guest boot to agent",
		"`running`'s event time to libvirt's agent-connected event", "`virsh start` returned to libvirt's agent-connected event"},
	{"agent", "agent connected → agent_ready",
		"libvirt's agent-connected event to `agent_ready`'s event time", "agent-connected event to the first `guest-ping` that answered (100 ms loop)"},
	{"agent_ready", "start done → agent ready (boot + agent)",
		"`phase_ms` of `agent_ready`", "`virsh start` returned to the first answered `guest-ping`"},
	{"runner", "runner start (secret files + launch)",
		"`phase_ms` of `runner_started`", "`guest-exec` writing the secret, `guest-exec-status` until it exited (10 ms loop), `guest-exec` of the runner"},
	{"noticed", "runner exit → noticed",
		"the runner's exit (exit watcher) to `runner_exited`'s event time", "the runner's exit to the `guest-exec-status` that saw it (100 ms loop)"},
	{"teardown", "teardown",
		"`phase_ms` of `torn_down` (removing domain and volumes)", "`destroy`, `undefine`, `vol-delete`"},
	{"gone", "runner exit noticed → torn_down",
		"`runner_exited`'s to `torn_down`'s event time", "the same as teardown"},
	{"e2e", "end to end: submit → torn_down",
		"before publishing the request to `torn_down`'s event time", "first step begun to last step ended (preparing the definition, untimed, left out)"},
}

// GuestResult is what the guest benchmark measured: per pair, the phases
// of the worker's job and of the virsh job, in ms, and the makespans of
// three jobs at once.
type GuestResult struct {
	Worker, Virsh                   []map[string]float64
	Makespan3Worker, Makespan3Virsh []float64
	// ExitHalfWidth is the largest half width of the interval an exit
	// time was placed in (observer.watchExit).
	ExitHalfWidth time.Duration
	// Parallelism is the worker's --parallelism.
	Parallelism int
}

// RunGuests runs a worker and, in turn with it, the virsh script: one
// warm-up job of each, cfg.Pairs jobs of each one at a time (A B A B),
// then cfg.Triples times three jobs of each at once.
func RunGuests(ctx context.Context, cfg GuestConfig) (*GuestResult, error) {
	obs, err := newObserver(ctx)
	if err != nil {
		return nil, err
	}
	defer obs.close()
	run := randomHex(3)
	g := &guests{cfg: cfg, obs: obs, host: "bench-" + run, run: run}
	w, err := g.startWorker(ctx)
	if err != nil {
		return nil, err
	}
	defer g.stopWorker(w)
	res := &GuestResult{Parallelism: 3}

	// Remove whatever a job of the worker left, also when the benchmark
	// fails or is interrupted: the worker leaves running machines up when
	// it stops.
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		p := provision.New(obs.l, provision.Options{})
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, job := range g.jobs {
			if existed, err := p.Remove(cctx, job); existed || err != nil {
				cfg.Log("removed machine of job %s left by the worker (%v)", job, err)
			}
		}
	}()

	cfg.Log("guest phases: one warm-up job of each, unmeasured")
	if _, err := g.workerJob(ctx, "warm"); err != nil {
		return nil, err
	}
	if _, err := g.virshJob(ctx, "warm"); err != nil {
		return nil, err
	}
	for i := range cfg.Pairs {
		a, err := g.workerJob(ctx, strconv.Itoa(i))
		if err != nil {
			return nil, err
		}
		b, err := g.virshJob(ctx, strconv.Itoa(i))
		if err != nil {
			return nil, err
		}
		res.Worker, res.Virsh = append(res.Worker, a.phases), append(res.Virsh, b.phases)
		res.ExitHalfWidth = max(res.ExitHalfWidth, a.halfWidth, b.halfWidth)
		cfg.Log("pair %d/%d: worker %.1f s, virsh %.1f s end to end", i+1, cfg.Pairs, a.phases["e2e"]/1000, b.phases["e2e"]/1000)
	}
	for i := range cfg.Triples {
		a, err := g.three(ctx, fmt.Sprintf("t%d", i), g.workerJob)
		if err != nil {
			return nil, err
		}
		b, err := g.three(ctx, fmt.Sprintf("t%d", i), g.virshJob)
		if err != nil {
			return nil, err
		}
		res.Makespan3Worker, res.Makespan3Virsh = append(res.Makespan3Worker, a), append(res.Makespan3Virsh, b)
		cfg.Log("three at once %d/%d: worker %.1f s, virsh %.1f s", i+1, cfg.Triples, a/1000, b/1000)
	}
	return res, nil
}

// guests runs the jobs of one guest benchmark.
type guests struct {
	cfg       GuestConfig
	obs       *observer
	host, run string
	// jobs are the worker's jobs submitted so far.
	mu   sync.Mutex
	jobs []string
}

// job is one measured job.
type job struct {
	phases     map[string]float64
	start, end time.Time
	halfWidth  time.Duration
}

// startWorker starts the worker binary against the benchmark's NATS and
// qemu:///system, with TCG guests, and waits until it serves.
func (g *guests) startWorker(ctx context.Context) (*exec.Cmd, error) {
	return startWorkerProcess(ctx, g.cfg.Worker, filepath.Join(g.cfg.Dir, "worker-guests.log"),
		"run", "--host", g.host, "--nats-url", g.cfg.NATS.URL,
		"--domain-type", "qemu", "--parallelism", "3", "--max-vms", "4", "--images", g.cfg.Image,
		"--log-format", "json")
}

func (g *guests) stopWorker(cmd *exec.Cmd) { stopWorkerProcess(cmd) }

// waitForLog waits until the log of cmd holds want.
func waitForLog(ctx context.Context, cmd *exec.Cmd, path, want string, timeout time.Duration) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) {
			return nil
		}
		if cmd.ProcessState != nil || syscall.Kill(cmd.Process.Pid, 0) != nil {
			return fmt.Errorf("%s exited: %s", cmd.Path, tail(string(b), 2000))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not log %s within %s: %s", cmd.Path, want, timeout, tail(string(b), 2000))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// workerJob has the worker run one Forgejo job whose stub runner sleeps
// cfg.Sleep seconds, and measures it from its events and the observer.
func (g *guests) workerJob(ctx context.Context, name string) (job, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	id := fmt.Sprintf("bench-%s-%s", g.run, name)
	g.mu.Lock()
	g.jobs = append(g.jobs, id)
	g.mu.Unlock()
	domain := messages.DomainName(id)
	js := g.cfg.NATS.JS

	events := make(chan messages.Event, 32)
	follow := pool.New().WithErrors().WithContext(ctx)
	follow.Go(func(ctx context.Context) error {
		for ev, err := range client.New(js).Events(ctx, client.Query{Job: id, Follow: true}) {
			if err != nil {
				return err
			}
			select {
			case events <- ev:
			case <-ctx.Done():
			}
			if ev.State == messages.StateTornDown || ev.State == messages.StateFailed {
				return errFollowed
			}
		}
		return ctx.Err()
	})
	defer func() {
		cancel()
		_ = follow.Wait()
	}()

	req := stubJob(id, g.cfg.Image, g.cfg.Sleep)
	submitted := time.Now()
	req.RequestedAt = submitted.UTC()
	if _, err := client.New(js).Submit(ctx, req, client.OnHost(g.host), client.WithSealing(client.SealNever)); err != nil {
		return job{}, err
	}

	seen := map[messages.State]messages.Event{}
	watch := pool.NewWithResults[exitTime]().WithErrors().WithContext(ctx)
	watching := false
	for {
		var ev messages.Event
		select {
		case <-ctx.Done():
			return job{}, fmt.Errorf("job %s: %w (events so far: %v)", id, ctx.Err(), states(seen))
		case ev = <-events:
		}
		seen[ev.State] = ev
		if ev.State == messages.StateRunnerStarted && !watching {
			watching = true
			expect := ev.Time.Add(time.Duration(g.cfg.Sleep) * time.Second)
			watch.Go(func(ctx context.Context) (exitTime, error) {
				at, half, err := g.obs.watchExit(ctx, domain, ev.RunnerPID, expect)
				return exitTime{at, half}, err
			})
		}
		if ev.State == messages.StateFailed {
			return job{}, fmt.Errorf("job %s failed: %v", id, ev.Error)
		}
		if ev.State == messages.StateTornDown {
			break
		}
	}
	exits, err := watch.Wait()
	if err != nil {
		return job{}, err
	}
	for _, s := range []messages.State{messages.StateCloned, messages.StateRunning, messages.StateAgentReady,
		messages.StateRunnerStarted, messages.StateRunnerExited, messages.StateTornDown} {
		if _, ok := seen[s]; !ok {
			return job{}, fmt.Errorf("job %s: no %s event (got %v)", id, s, states(seen))
		}
	}
	if ex := seen[messages.StateRunnerExited]; ex.ExitCode == nil || *ex.ExitCode != 0 {
		return job{}, fmt.Errorf("job %s: runner exited with %v: %s", id, ex.ExitCode, ex.Output)
	}
	connected, ok := g.obs.agentConnected(domain)
	if !ok {
		return job{}, fmt.Errorf("job %s: libvirt reported no agent connection of %s", id, domain)
	}
	ph := func(s messages.State) float64 { return float64(seen[s].PhaseMS) }
	at := func(s messages.State) time.Time { return seen[s].Time }
	j := job{start: submitted, end: at(messages.StateTornDown), phases: map[string]float64{
		"clone":       ph(messages.StateCloned),
		"start":       ph(messages.StateRunning),
		"boot":        ms(connected.Sub(at(messages.StateRunning))),
		"agent":       ms(at(messages.StateAgentReady).Sub(connected)),
		"agent_ready": ph(messages.StateAgentReady),
		"runner":      ph(messages.StateRunnerStarted),
		"teardown":    ph(messages.StateTornDown),
		"gone":        ms(at(messages.StateTornDown).Sub(at(messages.StateRunnerExited))),
		"e2e":         ms(at(messages.StateTornDown).Sub(submitted)),
	}}
	if len(exits) == 1 {
		j.phases["noticed"] = ms(at(messages.StateRunnerExited).Sub(exits[0].at))
		j.halfWidth = exits[0].half
	}
	if err := g.gone(domain); err != nil {
		return job{}, err
	}
	return j, nil
}

// stubJob is a Forgejo job of image whose stub runner runs sleep seconds.
func stubJob(id, image string, sleep int) messages.Provision {
	return messages.Provision{
		V: messages.SchemaVersion, JobID: id, Image: image,
		Runner: messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
			URL: "https://forgejo.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: "bench-token-" + randomHex(8),
			Labels: []string{fmt.Sprintf("stub-sleep=%d", sleep)},
		}},
		BootTimeoutS: 180, MaxLifetimeS: 600,
	}
}

// errFollowed ends following a job's events at its end.
var errFollowed = errors.New("the job ended")

type exitTime struct {
	at   time.Time
	half time.Duration
}

func states(seen map[messages.State]messages.Event) []messages.State {
	var out []messages.State
	for _, s := range messages.States {
		if _, ok := seen[s]; ok {
			out = append(out, s)
		}
	}
	return out
}

// gone fails if domain still exists.
func (g *guests) gone(domain string) error {
	if _, err := g.obs.l.DomainLookupByName(domain); err == nil {
		return fmt.Errorf("domain %s still exists after its job ended", domain)
	}
	return nil
}

// virshJob runs the process-per-step baseline for one job whose stub
// runner sleeps cfg.Sleep seconds, and measures it from the script's
// timestamps and the observer.
func (g *guests) virshJob(ctx context.Context, name string) (job, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	domain := fmt.Sprintf("bench-virsh-%s-%s", g.run, name)
	cmd := exec.CommandContext(ctx, "bash", g.cfg.Script, domain, strconv.Itoa(g.cfg.Sleep))
	cmd.Env = append(os.Environ(), "IMAGE="+g.cfg.Image)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = time.Minute
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return job{}, err
	}
	if err := cmd.Start(); err != nil {
		return job{}, err
	}
	steps := map[string][2]time.Time{}
	watch := pool.NewWithResults[exitTime]().WithErrors().WithContext(ctx)
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 4 && f[0] == "step":
			steps[f[1]] = [2]time.Time{epoch(f[2]), epoch(f[3])}
		case len(f) == 2 && f[0] == "runner_pid":
			pid, err := strconv.Atoi(f[1])
			if err != nil {
				return job{}, fmt.Errorf("virsh job %s: %q", domain, sc.Text())
			}
			expect := time.Now().Add(time.Duration(g.cfg.Sleep) * time.Second)
			watch.Go(func(ctx context.Context) (exitTime, error) {
				at, half, err := g.obs.watchExit(ctx, domain, pid, expect)
				return exitTime{at, half}, err
			})
		}
	}
	werr := cmd.Wait()
	exits, err := watch.Wait()
	if werr != nil {
		return job{}, fmt.Errorf("virsh job %s: %w: %s", domain, werr, stderr.String())
	}
	if err != nil {
		return job{}, err
	}
	for _, s := range []string{"clone", "start", "agent", "runner", "exit", "destroy", "teardown"} {
		if _, ok := steps[s]; !ok {
			return job{}, fmt.Errorf("virsh job %s: no step %s", domain, s)
		}
	}
	connected, ok := g.obs.agentConnected(domain)
	if !ok {
		return job{}, fmt.Errorf("virsh job %s: libvirt reported no agent connection", domain)
	}
	dur := func(s string) float64 { return ms(steps[s][1].Sub(steps[s][0])) }
	j := job{start: steps["clone"][0], end: steps["teardown"][1], phases: map[string]float64{
		"clone":       dur("clone"),
		"start":       dur("start"),
		"boot":        ms(connected.Sub(steps["start"][1])),
		"agent":       ms(steps["agent"][1].Sub(connected)),
		"agent_ready": dur("agent"),
		"runner":      dur("runner"),
		"teardown":    dur("teardown"),
		"gone":        ms(steps["teardown"][1].Sub(steps["exit"][1])),
		"e2e":         ms(steps["teardown"][1].Sub(steps["clone"][0])),
		"destroy":     dur("destroy"),
	}}
	if len(exits) == 1 {
		j.phases["noticed"] = ms(steps["exit"][1].Sub(exits[0].at))
		j.halfWidth = exits[0].half
	}
	return j, g.gone(domain)
}

// three runs three jobs at once and returns their makespan in ms: from
// the first begun to the last ended.
func (g *guests) three(ctx context.Context, name string, run func(context.Context, string) (job, error)) (float64, error) {
	p := pool.NewWithResults[job]().WithErrors().WithContext(ctx)
	for i := range 3 {
		p.Go(func(ctx context.Context) (job, error) { return run(ctx, fmt.Sprintf("%s-%d", name, i)) })
	}
	jobs, err := p.Wait()
	if err != nil {
		return math.NaN(), err
	}
	first, last := jobs[0].start, jobs[0].end
	for _, j := range jobs[1:] {
		if j.start.Before(first) {
			first = j.start
		}
		if j.end.After(last) {
			last = j.end
		}
	}
	return ms(last.Sub(first)), nil
}

// epoch parses seconds since the epoch with a fraction, as bash's
// EPOCHREALTIME writes them.
func epoch(s string) time.Time {
	sec, frac, _ := strings.Cut(s, ".")
	n, _ := strconv.ParseInt(sec, 10, 64)
	frac = (frac + "000000000")[:9]
	ns, _ := strconv.ParseInt(frac, 10, 64)
	return time.Unix(n, ns)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
