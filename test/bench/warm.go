package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// WarmConfig configures the benchmark of warm pools against cold builds.
type WarmConfig struct {
	// Worker is the worker binary, Image the image both workers clone.
	Worker, Image string
	// Sleep is how long each job's stub runner runs, in seconds; Jobs
	// how many jobs of each kind run, in turn (warm, cold, warm, …).
	Sleep, Jobs int
	// Dir holds the workers' logs.
	Dir  string
	NATS *NATS
	Log  func(format string, args ...any)
}

// WarmResult is what the warm pool benchmark measured, in turn: for
// each triple, request published -> runner_started of a job on the host
// with a memory pool of one, of a job on the host with a saved pool of
// one and of a job on a host without a pool.
type WarmResult struct {
	Warm, Saved, Cold []float64 // ms
	// Bound says, per warm-host job, whether it bound a warm machine;
	// SavedBound the same of the saved pool's host.
	Bound, SavedBound []bool
	// SavedRSS is the resident memory of the QEMU processes of the idle
	// saved machine, sampled before each saved job once it was saved, in
	// MiB (0: no process); SaveFile the size of its save file, in MiB.
	SavedRSS, SaveFile []float64
	// SavedPhases are, per saved job, the phase_ms of its events that
	// tell where its time went: running (the restore), agent_ready (the
	// agent, the clock) and runner_started (the runner's preparation and
	// launch), by state.
	SavedPhases map[messages.State][]float64
	// Refill is, per warm job, from its accepted event to agent_ready of
	// the machine that took its place in the pool, in ms.
	Refill []float64
	// RSS is the resident memory of the idle warm machine's QEMU process,
	// sampled before each warm job, in MiB; MemoryMiB the memory the
	// image defines.
	RSS       []float64
	MemoryMiB int
}

// RunWarm runs three workers side by side on this host, one keeping a
// pool of one warm machine of cfg.Image running, one keeping it saved
// and one without a pool, and has each serve cfg.Jobs jobs in turn
// (after one unmeasured job of each).
func RunWarm(ctx context.Context, cfg WarmConfig) (*WarmResult, error) {
	run := randomHex(3)
	warmHost, savedHost, coldHost := "benchwarm-"+run, "benchsaved-"+run, "benchcold-"+run
	common := []string{"--nats-url", cfg.NATS.URL, "--domain-type", "qemu", "--parallelism", "3", "--max-vms", "3",
		"--images", cfg.Image, "--log-format", "json"}
	warmW, err := startWorkerProcess(ctx, cfg.Worker, filepath.Join(cfg.Dir, "worker-warm.log"),
		append([]string{"run", "--host", warmHost, "--warm", cfg.Image + "=1", "--warm-retire-on-stop"}, common...)...)
	if err != nil {
		return nil, err
	}
	defer stopWorkerProcess(warmW)
	savedW, err := startWorkerProcess(ctx, cfg.Worker, filepath.Join(cfg.Dir, "worker-saved.log"),
		append([]string{"run", "--host", savedHost, "--warm", cfg.Image + "=1:saved", "--warm-retire-on-stop"}, common...)...)
	if err != nil {
		return nil, err
	}
	defer stopWorkerProcess(savedW)
	coldW, err := startWorkerProcess(ctx, cfg.Worker, filepath.Join(cfg.Dir, "worker-cold.log"),
		append([]string{"run", "--host", coldHost}, common...)...)
	if err != nil {
		return nil, err
	}
	defer stopWorkerProcess(coldW)

	book := newEventBook()
	follow := conc.NewWaitGroup()
	fctx, stopFollowing := context.WithCancel(ctx)
	for _, h := range []string{warmHost, savedHost, coldHost} {
		follow.Go(func() {
			// From the stream's start, which the workers made: nothing
			// published before this is missed.
			for ev, err := range client.New(cfg.NATS.JS).Events(fctx, client.Query{Host: h, Follow: true}) {
				var derr *client.DecodeError
				switch {
				case errors.As(err, &derr):
				case err != nil:
					if fctx.Err() == nil {
						cfg.Log("following the events of %s: %v", h, err)
					}
				default:
					book.add(ev)
				}
			}
		})
	}
	defer func() {
		stopFollowing()
		follow.Wait()
	}()

	l, err := provision.Dial(ctx, "qemu:///system")
	if err != nil {
		return nil, err
	}
	defer func() { _ = l.Disconnect() }()
	var jobs []string
	defer func() {
		// Whatever a failed or interrupted run left: the jobs' machines
		// and the pool's.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		stopWorkerProcess(warmW)
		stopWorkerProcess(savedW)
		stopWorkerProcess(coldW)
		p := provision.New(l, provision.Options{})
		keys := jobs
		if all, err := p.List(cctx); err == nil {
			for _, m := range all {
				if m.Warm && (m.Host == warmHost || m.Host == savedHost) {
					keys = append(keys, m.Key)
				}
			}
		}
		for _, k := range keys {
			if existed, err := p.Remove(cctx, k); existed || err != nil {
				cfg.Log("removed machine %s left by a worker (%v)", k, err)
			}
		}
	}()
	res := &WarmResult{}

	job := func(host, name string) (time.Duration, messages.Event, error) {
		id := fmt.Sprintf("%s-%s", host, name)
		jobs = append(jobs, id)
		req := stubJob(id, cfg.Image, cfg.Sleep)
		submitted := time.Now()
		req.RequestedAt = submitted.UTC()
		if _, err := client.New(cfg.NATS.JS).Submit(ctx, req, client.OnHost(host), client.WithSealing(client.SealNever)); err != nil {
			return 0, messages.Event{}, err
		}
		started, err := book.wait(ctx, 5*time.Minute, "runner_started of "+id, func(evs []messages.Event) (messages.Event, bool) {
			return lastOf(evs, id, messages.StateRunnerStarted, messages.StateFailed)
		})
		if err != nil {
			return 0, messages.Event{}, err
		}
		if started.State == messages.StateFailed {
			return 0, messages.Event{}, fmt.Errorf("job %s failed: %v", id, started.Error)
		}
		if _, err := book.wait(ctx, 5*time.Minute, "torn_down of "+id, func(evs []messages.Event) (messages.Event, bool) {
			return lastOf(evs, id, messages.StateTornDown)
		}); err != nil {
			return 0, messages.Event{}, err
		}
		return started.Time.Sub(submitted), started, nil
	}
	idleOf := func(host string) (string, error) {
		ev, err := book.wait(ctx, 5*time.Minute, "an idle warm machine of "+host, func(evs []messages.Event) (messages.Event, bool) {
			for _, ev := range idleMachines(evs, host) {
				return ev, true
			}
			return messages.Event{}, false
		})
		return ev.Machine, err
	}
	idle := func() (string, error) { return idleOf(warmHost) }
	// savedIdle waits for the saved pool's idle machine to be saved: its
	// agent_ready comes before the save.
	savedIdle := func() (string, error) {
		p := provision.New(l, provision.Options{})
		missing := 0
		for deadline := time.Now().Add(5 * time.Minute); ; {
			// Picked again each time: the events may name a machine that
			// is gone by now.
			key, err := idleOf(savedHost)
			if err != nil {
				return "", err
			}
			m, found, err := p.Lookup(ctx, key)
			if err != nil {
				return "", err
			}
			if found && !m.Running {
				return key, nil
			}
			if !found {
				if missing++; missing == 1 {
					cfg.Log("saved pool: the idle machine %s the events name is not on the host; looking again", key)
				}
			}
			if time.Now().After(deadline) {
				return "", fmt.Errorf("saved pool machine %s: found %v, not saved within 5 minutes", key, found)
			}
			select {
			case <-ctx.Done():
				return "", ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	refilledAfter := func(host string, accepted messages.Event) (messages.Event, error) {
		return book.wait(ctx, 5*time.Minute, "the pool of "+host+" refilled", func(evs []messages.Event) (messages.Event, bool) {
			for _, ev := range evs {
				if ev.Host == host && ev.JobID == "" && ev.State == messages.StateAgentReady && ev.Time.After(accepted.Time) {
					return ev, true
				}
			}
			return messages.Event{}, false
		})
	}

	cfg.Log("warm pools: one unmeasured job of each, then %d of each in turn", cfg.Jobs)
	if _, err := idle(); err != nil {
		return nil, err
	}
	if _, _, err := job(warmHost, "warmup"); err != nil {
		return nil, err
	}
	if _, err := savedIdle(); err != nil {
		return nil, err
	}
	if _, _, err := job(savedHost, "warmup"); err != nil {
		return nil, err
	}
	if _, _, err := job(coldHost, "warmup"); err != nil {
		return nil, err
	}
	for i := range cfg.Jobs {
		key, err := idle()
		if err != nil {
			return nil, err
		}
		rss, err := qemuRSS(messages.DomainName(key))
		if err != nil {
			return nil, err
		}
		res.RSS = append(res.RSS, rss)
		if m, found, err := provision.New(l, provision.Options{}).Lookup(ctx, key); err == nil && found {
			res.MemoryMiB = m.MemoryMiB
		}
		w, started, err := job(warmHost, strconv.Itoa(i))
		if err != nil {
			return nil, err
		}
		res.Warm, res.Bound = append(res.Warm, ms(w)), append(res.Bound, started.Warm)
		// The pool refills as the job binds its machine; the cold job
		// starts only once it has, so that no boot of the pool's shares
		// the cores with the cold job's.
		accepted, _ := lastOf(book.all(), started.JobID, messages.StateAccepted)
		refilled, err := refilledAfter(warmHost, accepted)
		if err != nil {
			return nil, err
		}
		res.Refill = append(res.Refill, ms(refilled.Time.Sub(accepted.Time)))

		skey, err := savedIdle()
		if err != nil {
			return nil, err
		}
		srss, err := domainRSS(messages.DomainName(skey))
		if err != nil {
			return nil, err
		}
		res.SavedRSS = append(res.SavedRSS, srss)
		if fi, err := os.Stat(filepath.Join("/var/lib/libvirt/qemu/save", messages.DomainName(skey)+".save")); err == nil {
			res.SaveFile = append(res.SaveFile, float64(fi.Size())/(1<<20))
		}
		sv, sstarted, err := job(savedHost, strconv.Itoa(i))
		if err != nil {
			return nil, err
		}
		res.Saved, res.SavedBound = append(res.Saved, ms(sv)), append(res.SavedBound, sstarted.Warm)
		if res.SavedPhases == nil {
			res.SavedPhases = map[messages.State][]float64{}
		}
		for _, st := range savedPhaseStates {
			if ev, ok := lastOf(book.all(), sstarted.JobID, st); ok {
				res.SavedPhases[st] = append(res.SavedPhases[st], float64(ev.PhaseMS))
			}
		}
		saccepted, _ := lastOf(book.all(), sstarted.JobID, messages.StateAccepted)
		if _, err := refilledAfter(savedHost, saccepted); err != nil {
			return nil, err
		}
		if _, err := savedIdle(); err != nil {
			return nil, err
		}
		c, _, err := job(coldHost, strconv.Itoa(i))
		if err != nil {
			return nil, err
		}
		res.Cold = append(res.Cold, ms(c))
		cfg.Log("warm pools %d/%d: warm %.0f ms (bound %v), saved %.0f ms (bound %v; restore %v ms), cold %.0f ms, refill %.1f s, idle QEMU %.0f MiB, idle saved %.1f MiB",
			i+1, cfg.Jobs, ms(w), started.Warm, ms(sv), sstarted.Warm, res.SavedPhases[messages.StateRunning], ms(c), res.Refill[i]/1000, rss, srss)
	}
	return res, nil
}

// savedPhaseStates are the events whose phase_ms tell a saved job's
// parts.
var savedPhaseStates = []messages.State{messages.StateAccepted, messages.StateRunning, messages.StateAgentReady, messages.StateRunnerStarted}

// lastOf returns the newest event of job in one of states.
func lastOf(evs []messages.Event, job string, states ...messages.State) (messages.Event, bool) {
	for i := len(evs) - 1; i >= 0; i-- {
		if evs[i].JobID == job {
			for _, s := range states {
				if evs[i].State == s {
					return evs[i], true
				}
			}
		}
	}
	return messages.Event{}, false
}

// idleMachines returns host's warm machines whose last event says they
// are ready (agent_ready without a job) and that no job has bound since,
// by key, with that event.
func idleMachines(evs []messages.Event, host string) map[string]messages.Event {
	last := map[string]messages.Event{}
	bound := map[string]bool{}
	for _, ev := range evs {
		switch {
		case ev.Host != host || ev.Machine == "":
		case ev.JobID == "":
			last[ev.Machine] = ev
		case ev.Warm:
			bound[ev.Machine] = true
		}
	}
	idle := map[string]messages.Event{}
	for key, ev := range last {
		if ev.State == messages.StateAgentReady && !bound[key] {
			idle[key] = ev
		}
	}
	return idle
}

// qemuRSS returns the resident memory of domain's QEMU process, in MiB,
// from libvirt's pid file and /proc.
func qemuRSS(domain string) (float64, error) {
	b, err := os.ReadFile(filepath.Join("/run/libvirt/qemu", domain+".pid"))
	if err != nil {
		return 0, err
	}
	status, err := os.ReadFile(filepath.Join("/proc", strings.TrimSpace(string(b)), "status"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024, err
		}
	}
	return 0, errors.New("no VmRSS in " + domain + "'s QEMU status")
}

// domainRSS returns the resident memory of all processes of domain's
// QEMU, found by their command lines ("-name guest=<domain>,"), in MiB: 0
// when none runs, as for a saved machine.
func domainRSS(domain string) (float64, error) {
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	total := 0.0
	for _, d := range dirs {
		cmdline, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(cmdline), "guest="+domain+",") {
			continue
		}
		status, err := os.ReadFile(filepath.Join("/proc", d.Name(), "status"))
		if err != nil {
			continue // gone meanwhile
		}
		for _, line := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
				if err != nil {
					return 0, err
				}
				total += kb / 1024
			}
		}
	}
	return total, nil
}

// eventBook keeps the events followed so far and wakes those waiting.
type eventBook struct {
	mu     sync.Mutex
	events []messages.Event
	added  chan struct{}
}

func newEventBook() *eventBook { return &eventBook{added: make(chan struct{})} }

func (b *eventBook) add(ev messages.Event) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.events = append(b.events, ev)
	close(b.added)
	b.added = make(chan struct{})
}

func (b *eventBook) all() []messages.Event {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]messages.Event(nil), b.events...)
}

// wait waits up to timeout for find to find an event among those seen.
func (b *eventBook) wait(ctx context.Context, timeout time.Duration, what string, find func([]messages.Event) (messages.Event, bool)) (messages.Event, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		b.mu.Lock()
		ev, ok := find(b.events)
		added := b.added
		b.mu.Unlock()
		if ok {
			return ev, nil
		}
		select {
		case <-ctx.Done():
			return messages.Event{}, ctx.Err()
		case <-deadline.C:
			return messages.Event{}, fmt.Errorf("no %s within %s", what, timeout)
		case <-added:
		}
	}
}

// startWorkerProcess starts the worker binary with args, its output in
// logPath, and waits until it serves.
func startWorkerProcess(ctx context.Context, bin, logPath string, args ...string) (*exec.Cmd, error) {
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start worker: %w", err)
	}
	if err := waitForLog(ctx, cmd, logPath, `"msg":"worker started"`, 60*time.Second); err != nil {
		stopWorkerProcess(cmd)
		return nil, err
	}
	return cmd, nil
}

// stopWorkerProcess stops a worker started by startWorkerProcess, once.
func stopWorkerProcess(cmd *exec.Cmd) {
	if cmd.ProcessState != nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	_ = cmd.Wait()
}
