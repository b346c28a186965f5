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
// each pair, request published -> runner_started of a job on the host
// with a pool of one and of a job on a host without one.
type WarmResult struct {
	Warm, Cold []float64 // ms
	// Bound says, per warm-host job, whether it bound a warm machine.
	Bound []bool
	// Refill is, per warm job, from its accepted event to agent_ready of
	// the machine that took its place in the pool, in ms.
	Refill []float64
	// RSS is the resident memory of the idle warm machine's QEMU process,
	// sampled before each warm job, in MiB; MemoryMiB the memory the
	// image defines.
	RSS       []float64
	MemoryMiB int
}

// RunWarm runs two workers side by side on this host, one keeping a pool
// of one warm machine of cfg.Image and one without a pool, and has each
// serve cfg.Jobs jobs in turn (after one unmeasured job of each).
func RunWarm(ctx context.Context, cfg WarmConfig) (*WarmResult, error) {
	run := randomHex(3)
	warmHost, coldHost := "benchwarm-"+run, "benchcold-"+run
	common := []string{"--nats-url", cfg.NATS.URL, "--domain-type", "qemu", "--parallelism", "3", "--max-vms", "3",
		"--images", cfg.Image, "--log-format", "json"}
	warmW, err := startWorkerProcess(ctx, cfg.Worker, filepath.Join(cfg.Dir, "worker-warm.log"),
		append([]string{"run", "--host", warmHost, "--warm", cfg.Image + "=1", "--warm-retire-on-stop"}, common...)...)
	if err != nil {
		return nil, err
	}
	defer stopWorkerProcess(warmW)
	coldW, err := startWorkerProcess(ctx, cfg.Worker, filepath.Join(cfg.Dir, "worker-cold.log"),
		append([]string{"run", "--host", coldHost}, common...)...)
	if err != nil {
		return nil, err
	}
	defer stopWorkerProcess(coldW)

	book := newEventBook()
	follow := conc.NewWaitGroup()
	fctx, stopFollowing := context.WithCancel(ctx)
	for _, h := range []string{warmHost, coldHost} {
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
		stopWorkerProcess(coldW)
		p := provision.New(l, provision.Options{})
		keys := jobs
		if all, err := p.List(cctx); err == nil {
			for _, m := range all {
				if m.Warm && m.Host == warmHost {
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
	idle := func() (string, error) {
		ev, err := book.wait(ctx, 5*time.Minute, "an idle warm machine", func(evs []messages.Event) (messages.Event, bool) {
			for _, ev := range idleMachines(evs, warmHost) {
				return ev, true
			}
			return messages.Event{}, false
		})
		return ev.Machine, err
	}

	cfg.Log("warm pools: one unmeasured job of each, then %d of each in turn", cfg.Jobs)
	if _, err := idle(); err != nil {
		return nil, err
	}
	if _, _, err := job(warmHost, "warmup"); err != nil {
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
		refilled, err := book.wait(ctx, 5*time.Minute, "the pool refilled", func(evs []messages.Event) (messages.Event, bool) {
			for _, ev := range evs {
				if ev.Host == warmHost && ev.JobID == "" && ev.State == messages.StateAgentReady && ev.Time.After(accepted.Time) {
					return ev, true
				}
			}
			return messages.Event{}, false
		})
		if err != nil {
			return nil, err
		}
		res.Refill = append(res.Refill, ms(refilled.Time.Sub(accepted.Time)))
		c, _, err := job(coldHost, strconv.Itoa(i))
		if err != nil {
			return nil, err
		}
		res.Cold = append(res.Cold, ms(c))
		cfg.Log("warm pools %d/%d: warm %.0f ms (bound %v), cold %.0f ms, refill %.1f s, idle QEMU %.0f MiB",
			i+1, cfg.Jobs, ms(w), started.Warm, ms(c), res.Refill[i]/1000, rss)
	}
	return res, nil
}

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
