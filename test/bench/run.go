package bench

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Config is what the bench command is told.
type Config struct {
	// Out is the report to write (docs/benchmarks.md); empty writes none.
	Out string
	// Root is the repository's root directory.
	Root string
	// Worker is the worker binary.
	Worker string
	// Work holds logs, profiles and scratch files.
	Work string
	// Only lists the parts to run (guests, warm, sched, memory, events); empty
	// runs them all.
	Only string
	// The guest benchmark.
	Image                 string
	Sleep, Pairs, Triples int
	// The scheduling benchmark.
	Jobs                            int
	Parallelisms                    string
	ProfileParallelism, ProfileJobs int
	// The event benchmarks' go test -count.
	EventCount int
	// WarmJobs is how many jobs of each kind the warm pool benchmark runs.
	WarmJobs int
	// AmongJobs is how many jobs the worker does on a host with other
	// machines (section 3); 0 for none.
	AmongJobs int
	// ScalingRounds is how often each number of other machines is
	// measured (section 3).
	ScalingRounds int
}

// Register adds the flags of the bench command to fs.
func (c *Config) Register(fs *flag.FlagSet) {
	fs.StringVar(&c.Out, "out", "docs/benchmarks.md", "report to write; empty writes none")
	fs.StringVar(&c.Root, "root", ".", "the repository's root directory")
	fs.StringVar(&c.Worker, "worker", "bin/worker", "the worker binary")
	fs.StringVar(&c.Work, "work", ".cache/bench", "directory for logs, profiles and scratch files")
	fs.StringVar(&c.Only, "only", "", "comma-separated parts to run: guests, warm, sched, memory, events (default all)")
	fs.StringVar(&c.Image, "image", "tiny-linux", "image domain the guest jobs clone")
	fs.IntVar(&c.Sleep, "sleep", 2, "seconds each guest job's stub runner runs")
	fs.IntVar(&c.Pairs, "pairs", 6, "pairs of single guest jobs (worker, virsh), run in turn")
	fs.IntVar(&c.Triples, "triples", 3, "pairs of three guest jobs at once")
	fs.IntVar(&c.Jobs, "jobs", 1000, "jobs per run of the scheduling benchmark")
	fs.StringVar(&c.Parallelisms, "parallelisms", "1,4,16,64", "parallelisms of the scheduling benchmark")
	fs.IntVar(&c.ProfileParallelism, "profile-parallelism", 16, "parallelism of the profiled scheduling run; 0 for none")
	fs.IntVar(&c.ProfileJobs, "profile-jobs", 200, "jobs of the profiled scheduling run")
	fs.IntVar(&c.EventCount, "event-count", 3, "go test -count of the event benchmarks")
	fs.IntVar(&c.WarmJobs, "warm-jobs", 10, "jobs of each kind (warm, cold) of the warm pool benchmark")
	fs.IntVar(&c.ScalingRounds, "scaling-rounds", 3, "rounds of the runs among other machines (scheduling)")
	fs.IntVar(&c.AmongJobs, "among-jobs", 200, "jobs of the worker's runs on a host with other machines (scheduling); 0 for none")
}

// How long a worker settles before its memory is sampled, and for how
// long it is sampled.
const (
	memorySettle = 5 * time.Second
	memoryWindow = 8 * time.Second
)

func (c Config) runs(part string) bool {
	if c.Only == "" {
		return true
	}
	for _, p := range strings.Split(c.Only, ",") {
		if strings.TrimSpace(p) == part {
			return true
		}
	}
	return false
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
}

// Run runs the benchmarks cfg asks for and writes the report.
func Run(ctx context.Context, cfg Config) error {
	start := time.Now()
	for _, p := range []*string{&cfg.Root, &cfg.Worker, &cfg.Work} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return err
		}
		*p = abs
	}
	if err := os.MkdirAll(cfg.Work, 0o755); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	var ps []int
	for _, f := range strings.Split(cfg.Parallelisms, ",") {
		var p int
		if _, err := fmt.Sscan(strings.TrimSpace(f), &p); err != nil || p < 1 {
			return fmt.Errorf("-parallelisms: %q", f)
		}
		ps = append(ps, p)
	}
	r := &Report{Config: cfg, Machine: describeMachine(ctx, cfg.Root), Took: map[string]time.Duration{}}
	part := func(name string, fn func() error) error {
		if !cfg.runs(name) {
			return nil
		}
		t := time.Now()
		if err := fn(); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		r.Took[name] = time.Since(t)
		logf("%s took %s", name, r.Took[name].Round(time.Second))
		return nil
	}
	err = part("guests", func() error {
		n, err := StartNATS(ctx, self, filepath.Join(cfg.Work, "nats-guests"))
		if err != nil {
			return err
		}
		defer n.Stop()
		r.Guests, err = RunGuests(ctx, GuestConfig{
			Worker: cfg.Worker, Script: filepath.Join(cfg.Root, "scripts/bench/virsh-job.sh"), Image: cfg.Image,
			Sleep: cfg.Sleep, Pairs: cfg.Pairs, Triples: cfg.Triples, Dir: cfg.Work, NATS: n, Log: logf,
		})
		return err
	})
	if err != nil {
		return err
	}
	err = part("warm", func() error {
		n, err := StartNATS(ctx, self, filepath.Join(cfg.Work, "nats-warm"))
		if err != nil {
			return err
		}
		defer n.Stop()
		r.Warm, err = RunWarm(ctx, WarmConfig{Worker: cfg.Worker, Image: cfg.Image, Sleep: 1, Jobs: cfg.WarmJobs,
			Dir: cfg.Work, NATS: n, Log: logf})
		return err
	})
	if err != nil {
		return err
	}
	err = part("sched", func() error {
		r.Sched, err = RunSched(ctx, SchedConfig{
			Self: self, Dir: cfg.Work, Jobs: cfg.Jobs, Parallelisms: ps, BareRounds: 3, ProvisionerJobs: 250,
			Present: []int{0, 50, 100, 150}, ScalingJobs: 100, ScalingParallelism: 4, ScalingRounds: cfg.ScalingRounds, WorkerAmongJobs: cfg.AmongJobs,
			Profile: cfg.ProfileParallelism, ProfileJobs: cfg.ProfileJobs, Log: logf,
		})
		if err != nil || cfg.ProfileParallelism == 0 {
			return err
		}
		if r.SchedCPU, err = pprofTop(ctx, filepath.Join(cfg.Work, "sched-cpu.pprof"),
			"-cum", "-nodecount=25", "-focus=stretchy-ci/libvirt-worker"); err != nil {
			return err
		}
		r.SchedAllocs, err = pprofTop(ctx, filepath.Join(cfg.Work, "sched-allocs.pprof"), "-cum", "-nodecount=20",
			"-sample_index=alloc_space", "-base="+filepath.Join(cfg.Work, "sched-allocs-base.pprof"), "-focus=stretchy-ci/libvirt-worker")
		return err
	})
	if err != nil {
		return err
	}
	err = part("memory", func() error {
		r.Memory, err = RunMemory(ctx, MemoryConfig{Self: self, Worker: cfg.Worker, Dir: cfg.Work, Image: cfg.Image,
			Machines: 100, Settle: memorySettle, Window: memoryWindow, Log: logf})
		return err
	})
	if err != nil {
		return err
	}
	err = part("events", func() error {
		profiles := filepath.Join(cfg.Work, "replay")
		r.Events, err = RunEvents(ctx, EventsConfig{Root: cfg.Root, Profiles: profiles, Count: cfg.EventCount, Log: logf})
		if err != nil {
			return err
		}
		if r.ReplayCPU, err = pprofTop(ctx, filepath.Join(profiles, "replay-cpu.pprof"), "-cum", "-nodecount=20"); err != nil {
			return err
		}
		r.ReplayAllocs, err = pprofTop(ctx, filepath.Join(profiles, "replay-allocs.pprof"), "-nodecount=15",
			"-sample_index=alloc_space", "-base="+filepath.Join(profiles, "replay-allocs-base.pprof"))
		return err
	})
	if err != nil {
		return err
	}
	r.Machine.finish(ctx)
	r.Total = time.Since(start)
	if cfg.Out == "" {
		fmt.Print(r.Markdown())
		return nil
	}
	out := cfg.Out
	if !filepath.IsAbs(out) {
		out = filepath.Join(cfg.Root, out)
	}
	logf("writing %s", out)
	return os.WriteFile(out, []byte(r.Markdown()), 0o644)
}
