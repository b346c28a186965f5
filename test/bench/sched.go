package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats.go"
	"github.com/sourcegraph/conc/pool"
	"libvirt.org/go/libvirtxml"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/worker"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// SchedConfig configures the scheduling benchmark.
type SchedConfig struct {
	// Self is the bench binary, which serves NATS (StartNATS).
	Self string
	// Dir holds the test driver's node files, NATS and profiles.
	Dir string
	// Jobs is how many jobs each run serves.
	Jobs int
	// Parallelisms are the worker's --parallelism values to run.
	Parallelisms []int
	// BareRounds is how often the bare calls run per parallelism;
	// ProvisionerJobs how many jobs the provisioner's loop does (its rate
	// does not depend on how many).
	BareRounds, ProvisionerJobs int
	// Present are the numbers of other machines on the host with which
	// the provisioner's loop runs ScalingJobs jobs at ScalingParallelism,
	// to show how a job's cost grows with the host's machines.
	Present                         []int
	ScalingJobs, ScalingParallelism int
	// Profile, when set, makes one extra run of ProfileJobs jobs at that
	// parallelism with CPU and allocation profiles written into Dir
	// (sched-cpu.pprof, sched-allocs.pprof against
	// sched-allocs-base.pprof).
	Profile, ProfileJobs int
	Log                  func(format string, args ...any)
}

// SchedRun is one run of one of the three ways of doing the jobs.
type SchedRun struct {
	Wall time.Duration
	// JobsPerSecond is Jobs / Wall.
	JobsPerSecond float64
	// Utilisation is busy slot time / (slots x Wall), for the worker only;
	// UtilisationQueued the same up to the moment the last provision was
	// served (its runner_started), while requests were still waiting.
	Utilisation, UtilisationQueued float64
	// Windows are the jobs/s of each 100 jobs in a row to end, for the
	// worker only.
	Windows []float64
	// MaxInFlight is the most operations that held a slot at once;
	// MaxMachines the most machines that existed or were being built.
	MaxInFlight int64
	MaxMachines int
}

// SchedResult is the scheduling benchmark's runs by parallelism.
type SchedResult struct {
	Jobs int
	// Worker, Bare and Provisioner hold the runs per parallelism: the
	// in-process worker's, the loop's of bare libvirt calls and the
	// loop's of provision.Clone, Start and Remove.
	Worker, Bare, Provisioner map[int][]SchedRun
	ProvisionerJobs           int
	// Scaling is the provisioner loop's jobs/s by the number of other
	// machines on the host.
	Scaling                         map[int]float64
	ScalingJobs, ScalingParallelism int
	// Profiled tells the parallelism of the profiled run; 0 for none.
	Profiled int
}

// RunSched measures the worker's scheduling without boot cost: for each
// parallelism, cfg.Jobs provision requests for a runner wait in the
// request stream when an in-process worker starts against libvirt's test
// driver (through libvirtd) with fakeAgent; the run ends when every job is
// torn down. Its slot utilisation comes from sampling the slots in flight
// every millisecond. In turn with it, the same jobs' libvirt operations
// run as bare calls and through the provisioner, at the same parallelism
// on one connection.
func RunSched(ctx context.Context, cfg SchedConfig) (*SchedResult, error) {
	res := &SchedResult{Jobs: cfg.Jobs, ProvisionerJobs: cfg.ProvisionerJobs,
		Worker: map[int][]SchedRun{}, Bare: map[int][]SchedRun{}, Provisioner: map[int][]SchedRun{}}
	for i, p := range cfg.Parallelisms {
		dir := filepath.Join(cfg.Dir, fmt.Sprintf("sched-%d", i))
		w, err := schedWorker(ctx, cfg.Self, dir, cfg.Jobs, p, nil)
		if err != nil {
			return nil, fmt.Errorf("worker at parallelism %d: %w", p, err)
		}
		res.Worker[p] = append(res.Worker[p], w)
		for range cfg.BareRounds {
			b, err := schedBare(ctx, dir, cfg.Jobs, p)
			if err != nil {
				return nil, fmt.Errorf("bare calls at parallelism %d: %w", p, err)
			}
			res.Bare[p] = append(res.Bare[p], b)
		}
		v, err := schedProvisioner(ctx, dir, cfg.ProvisionerJobs, p)
		if err != nil {
			return nil, fmt.Errorf("provisioner at parallelism %d: %w", p, err)
		}
		res.Provisioner[p] = append(res.Provisioner[p], v)
		cfg.Log("scheduling, parallelism %d: worker %.1f jobs/s (slots %.1f%% busy, %.1f%% while queued; %d machines at most), bare %.0f, provisioner %.1f",
			p, w.JobsPerSecond, 100*w.Utilisation, 100*w.UtilisationQueued, w.MaxMachines, res.Bare[p][0].JobsPerSecond, v.JobsPerSecond)
		_ = os.RemoveAll(dir)
	}
	res.Scaling, res.ScalingJobs, res.ScalingParallelism = map[int]float64{}, cfg.ScalingJobs, cfg.ScalingParallelism
	for _, present := range cfg.Present {
		dir := filepath.Join(cfg.Dir, fmt.Sprintf("sched-present-%d", present))
		v, err := schedProvisionerAmong(ctx, dir, present, cfg.ScalingJobs, cfg.ScalingParallelism)
		if err != nil {
			return nil, fmt.Errorf("provisioner among %d machines: %w", present, err)
		}
		res.Scaling[present] = v.JobsPerSecond
		cfg.Log("scheduling, provisioner among %d other machines: %.1f jobs/s", present, v.JobsPerSecond)
		_ = os.RemoveAll(dir)
	}
	if cfg.Profile > 0 {
		dir := filepath.Join(cfg.Dir, "sched-profiled")
		if _, err := schedWorker(ctx, cfg.Self, dir, cfg.ProfileJobs, cfg.Profile, &profileFiles{dir: cfg.Dir, name: "sched"}); err != nil {
			return nil, fmt.Errorf("profiled worker run: %w", err)
		}
		res.Profiled = cfg.Profile
		_ = os.RemoveAll(dir)
	}
	return res, nil
}

// profileFiles names the profiles of one measurement.
type profileFiles struct{ dir, name string }

// start begins a CPU profile and records the allocations so far; stop
// ends the one and writes the allocations made since.
func (pf *profileFiles) start() (stop func() error, err error) {
	if err := writeAllocs(filepath.Join(pf.dir, pf.name+"-allocs-base.pprof")); err != nil {
		return nil, err
	}
	f, err := os.Create(filepath.Join(pf.dir, pf.name+"-cpu.pprof"))
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() error {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			return err
		}
		return writeAllocs(filepath.Join(pf.dir, pf.name+"-allocs.pprof"))
	}, nil
}

func writeAllocs(path string) error {
	runtime.GC()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// forgejoRequest is a provision request of a Forgejo runner job for the
// test driver's image.
func forgejoRequest(job, image string) messages.Provision {
	return messages.Provision{
		V: messages.SchemaVersion, JobID: job, Image: image,
		Runner: messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
			URL: "https://forgejo.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: "bench-token", Labels: []string{"bench"},
		}},
		MaxLifetimeS: 3600, RequestedAt: time.Now().UTC(),
	}
}

// schedWorker is one run of the in-process worker.
func schedWorker(ctx context.Context, self, dir string, jobs, parallelism int, prof *profileFiles) (SchedRun, error) {
	uri, err := testNode(dir, nil)
	if err != nil {
		return SchedRun{}, err
	}
	n, err := StartNATS(ctx, self, filepath.Join(dir, "nats"))
	if err != nil {
		return SchedRun{}, err
	}
	defer n.Stop()
	host := "bench-sched"
	if _, err := bus.Ensure(ctx, n.JS, bus.Topology{Host: host}); err != nil {
		return SchedRun{}, err
	}
	for i := range jobs {
		if _, err := client.New(n.JS).Submit(ctx, forgejoRequest(fmt.Sprintf("sched-%d", i), testImage), client.OnHost(host), client.WithSealing(client.SealNever)); err != nil {
			return SchedRun{}, err
		}
	}

	// Each job's runner_started and torn_down (or failed), by job.
	var mu sync.Mutex
	started, ended := map[string]bool{}, map[string]bool{}
	var endTimes []time.Time
	var lastStarted, lastEnded time.Time
	var failures []string
	all := make(chan struct{})
	sub, err := n.NC.Subscribe(messages.EventFilter("", "", ""), func(m *nats.Msg) {
		at := time.Now()
		tok := strings.Split(m.Subject, ".")
		if len(tok) != 6 {
			return
		}
		job, state := tok[4], messages.State(tok[5])
		mu.Lock()
		defer mu.Unlock()
		switch state {
		case messages.StateRunnerStarted:
			if !started[job] {
				started[job], lastStarted = true, at
			}
		case messages.StateFailed:
			failures = append(failures, job)
			fallthrough
		case messages.StateTornDown:
			if !ended[job] {
				ended[job], lastEnded = true, at
				endTimes = append(endTimes, at)
				if len(ended) == jobs {
					close(all)
				}
			}
		}
	})
	if err != nil {
		return SchedRun{}, err
	}
	defer func() { _ = sub.Unsubscribe() }()

	var stopProfile func() error
	if prof != nil {
		if stopProfile, err = prof.start(); err != nil {
			return SchedRun{}, err
		}
	}
	var settleErrs atomic.Value
	ip, err := startInProcess(ctx, inProcessOptions{
		Host: host, LibvirtURI: uri, Parallelism: parallelism, MaxVMs: jobs, Agent: &fakeAgent{},
		NATS: n, Images: []string{testImage},
		OnSettle: func(s worker.Settlement) {
			if s.Err != nil && s.Op != "reconcile" {
				settleErrs.Store(fmt.Errorf("%s %s: %s: %w", s.Op, s.JobID, s.Outcome, s.Err))
			}
		},
	})
	if err != nil {
		return SchedRun{}, err
	}
	samples := sampleSlots(ip, all)
	timeout := time.NewTimer(time.Minute + time.Duration(jobs)*200*time.Millisecond)
	defer timeout.Stop()
	select {
	case <-all:
	case <-ctx.Done():
		err = ctx.Err()
	case <-timeout.C:
		err = errors.New("the jobs did not all end in time")
	}
	s := <-samples
	if stopProfile != nil {
		if perr := stopProfile(); perr != nil && err == nil {
			err = perr
		}
	}
	if serr := ip.stop(); serr != nil && err == nil {
		err = serr
	}
	mu.Lock()
	defer mu.Unlock()
	if err != nil {
		return SchedRun{}, fmt.Errorf("%w: %d of %d jobs ended (settlement error: %v)", err, len(ended), jobs, settleErrs.Load())
	}
	if len(failures) > 0 {
		return SchedRun{}, fmt.Errorf("%d jobs failed, such as %s (settlement error: %v)", len(failures), failures[0], settleErrs.Load())
	}
	run := s.summary(parallelism, lastEnded, lastStarted)
	run.JobsPerSecond = float64(jobs) / run.Wall.Seconds()
	const window = 100
	for i := window; i < len(endTimes); i += window {
		run.Windows = append(run.Windows, window/endTimes[i].Sub(endTimes[i-window]).Seconds())
	}
	run.MaxInFlight, run.MaxMachines = ip.w.Stats().MaxInFlight, s.maxMachines
	return run, nil
}

// slotSamples are the operations in flight over time, and the most
// machines seen.
type slotSamples struct {
	at          []time.Time
	n           []int64
	maxMachines int
}

// sampleSlots records the worker's operations in flight every millisecond
// until done is closed, and then sends what it recorded.
func sampleSlots(ip *inProcess, done <-chan struct{}) <-chan slotSamples {
	out := make(chan slotSamples, 1)
	w := ip.w
	go func() {
		var s slotSamples
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			s.at, s.n = append(s.at, time.Now()), append(s.n, w.Stats().InFlight)
			if i%10 == 0 {
				s.maxMachines = max(s.maxMachines, ip.life.Active())
			}
			select {
			case <-done:
				s.at, s.n = append(s.at, time.Now()), append(s.n, w.Stats().InFlight)
				out <- s
				return
			case <-tick.C:
			}
		}
	}()
	return out
}

// summary integrates the samples from the first one with a slot taken to
// end, and to queued, into busy slot time, each sample's count holding
// until the next sample.
func (s slotSamples) summary(slots int, end, queued time.Time) SchedRun {
	first := -1
	for i, n := range s.n {
		if n > 0 {
			first = i
			break
		}
	}
	if first < 0 || !end.After(s.at[first]) {
		return SchedRun{}
	}
	t0 := s.at[first]
	busyUntil := func(limit time.Time) float64 {
		var busy float64
		for i := first; i < len(s.at)-1 && s.at[i].Before(limit); i++ {
			next := s.at[i+1]
			if next.After(limit) {
				next = limit
			}
			busy += float64(s.n[i]) * next.Sub(s.at[i]).Seconds()
		}
		return busy
	}
	wall := end.Sub(t0)
	run := SchedRun{Wall: wall, Utilisation: busyUntil(end) / (float64(slots) * wall.Seconds())}
	if q := queued.Sub(t0); q > 0 {
		run.UtilisationQueued = busyUntil(queued) / (float64(slots) * q.Seconds())
	}
	return run
}

// bareJob is one job's libvirt calls, prepared beforehand.
type bareJob struct {
	volXML, domXML string
}

// schedBare does the libvirt operations of the jobs as bare calls, on one
// connection, parallelism at a time: create the overlay volume, define,
// start, destroy, undefine, delete the volume. The definitions are made
// before the clock starts.
func schedBare(ctx context.Context, dir string, jobs, parallelism int) (SchedRun, error) {
	uri, err := testNode(dir, nil)
	if err != nil {
		return SchedRun{}, err
	}
	l, err := provision.Dial(ctx, uri)
	if err != nil {
		return SchedRun{}, err
	}
	defer func() { _ = l.Disconnect() }()
	pool0, err := l.StoragePoolLookupByName("images")
	if err != nil {
		return SchedRun{}, err
	}
	img, err := l.DomainLookupByName(testImage)
	if err != nil {
		return SchedRun{}, err
	}
	doc, err := l.DomainGetXMLDesc(img, libvirt.DomainXMLInactive)
	if err != nil {
		return SchedRun{}, err
	}
	work := make([]bareJob, jobs)
	for i := range work {
		if work[i], err = bareDefinitions(doc, dir, i); err != nil {
			return SchedRun{}, err
		}
	}
	var next atomic.Int64
	start := time.Now()
	p := pool.New().WithErrors().WithContext(ctx)
	for range parallelism {
		p.Go(func(ctx context.Context) error {
			for i := next.Add(1) - 1; i < int64(jobs); i = next.Add(1) - 1 {
				if err := ctx.Err(); err != nil {
					return err
				}
				j := work[i]
				vol, err := l.StorageVolCreateXML(pool0, j.volXML, 0)
				if err != nil {
					return fmt.Errorf("create volume: %w", err)
				}
				dom, err := l.DomainDefineXMLFlags(j.domXML, 0)
				if err != nil {
					return fmt.Errorf("define: %w", err)
				}
				if err := l.DomainCreate(dom); err != nil {
					return fmt.Errorf("start: %w", err)
				}
				if err := l.DomainDestroy(dom); err != nil {
					return fmt.Errorf("destroy: %w", err)
				}
				if err := l.DomainUndefineFlags(dom, 0); err != nil {
					return fmt.Errorf("undefine: %w", err)
				}
				if err := l.StorageVolDelete(vol, 0); err != nil {
					return fmt.Errorf("delete volume: %w", err)
				}
			}
			return nil
		})
	}
	if err := p.Wait(); err != nil {
		return SchedRun{}, err
	}
	wall := time.Since(start)
	return SchedRun{Wall: wall, JobsPerSecond: float64(jobs) / wall.Seconds()}, nil
}

// bareDefinitions makes the overlay volume and the domain definition of
// job i from the image's definition doc.
func bareDefinitions(doc, dir string, i int) (bareJob, error) {
	name := fmt.Sprintf("bare-%d", i)
	path := filepath.Join(dir, "pool", name+"-vda.qcow2")
	vol := libvirtxml.StorageVolume{
		Name:     name + "-vda.qcow2",
		Capacity: &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: 64 << 20},
		Target:   &libvirtxml.StorageVolumeTarget{Format: &libvirtxml.StorageVolumeTargetFormat{Type: "qcow2"}},
		BackingStore: &libvirtxml.StorageVolumeBackingStore{
			Path:   filepath.Join(dir, "pool", "image.qcow2"),
			Format: &libvirtxml.StorageVolumeTargetFormat{Type: "qcow2"},
		},
	}
	volXML, err := vol.Marshal()
	if err != nil {
		return bareJob{}, err
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(doc); err != nil {
		return bareJob{}, err
	}
	def.Name, def.UUID = name, ""
	def.Devices.Disks[0].Source.File.File = path
	def.Devices.Interfaces[0].MAC.Address = fmt.Sprintf("52:54:00:%02x:%02x:%02x", (i>>16)&0xff, (i>>8)&0xff, i&0xff)
	domXML, err := def.Marshal()
	if err != nil {
		return bareJob{}, err
	}
	return bareJob{volXML: volXML, domXML: domXML}, nil
}

// schedProvisioner does the jobs' machines through the provisioner, on
// one connection, parallelism at a time: Clone, Start, Remove.
func schedProvisioner(ctx context.Context, dir string, jobs, parallelism int) (SchedRun, error) {
	return schedProvisionerAmong(ctx, dir, 0, jobs, parallelism)
}

// schedProvisionerAmong is schedProvisioner on a host that has present
// other running machines of the worker's, made before the clock starts.
func schedProvisionerAmong(ctx context.Context, dir string, present, jobs, parallelism int) (SchedRun, error) {
	uri, err := testNode(dir, nil)
	if err != nil {
		return SchedRun{}, err
	}
	l, err := provision.Dial(ctx, uri)
	if err != nil {
		return SchedRun{}, err
	}
	defer func() { _ = l.Disconnect() }()
	p := provision.New(l, provision.Options{})
	start := time.Now()
	machine := func(ctx context.Context, job string) error {
		if _, err := p.Clone(ctx, provision.Spec{JobID: job, Image: testImage, Host: "bench", RunnerKind: "forgejo",
			RequestedAt: start, Deadline: start.Add(time.Hour)}); err != nil {
			return err
		}
		return p.Start(ctx, job)
	}
	for i := range present {
		if err := machine(ctx, fmt.Sprintf("other-%d", i)); err != nil {
			return SchedRun{}, err
		}
	}
	var next atomic.Int64
	start = time.Now()
	g := pool.New().WithErrors().WithContext(ctx)
	for range parallelism {
		g.Go(func(ctx context.Context) error {
			for i := next.Add(1) - 1; i < int64(jobs); i = next.Add(1) - 1 {
				job := fmt.Sprintf("prov-%d", i)
				if err := machine(ctx, job); err != nil {
					return err
				}
				if _, err := p.Remove(ctx, job); err != nil {
					return err
				}
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return SchedRun{}, err
	}
	wall := time.Since(start)
	return SchedRun{Wall: wall, JobsPerSecond: float64(jobs) / wall.Seconds()}, nil
}
