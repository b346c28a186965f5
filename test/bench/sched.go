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
	"github.com/sourcegraph/conc"
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
	// with its host view and scanning the host per job as it did before
	// it had one, to show how a job's cost depends on the host's
	// machines; and the worker WorkerAmongJobs jobs, in turn with the
	// provisioner's loop with its view.
	Present                         []int
	ScalingJobs, ScalingParallelism int
	// ScalingRounds is how often each number of machines is measured.
	ScalingRounds   int
	WorkerAmongJobs int
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
	// machines on the host, one per round, with its view and scanning
	// (ScalingScan); WorkerAmong the worker's, each in turn with a run
	// of the first.
	Scaling, ScalingScan, WorkerAmong map[int][]float64
	ScalingJobs, ScalingParallelism   int
	ScalingRounds, WorkerAmongJobs    int
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
		uri, err := testNode(dir, nil)
		if err != nil {
			return nil, err
		}
		w, err := schedWorker(ctx, cfg.Self, dir, uri, cfg.Jobs, p, nil)
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
		v, err := schedProvisioner(ctx, uri, cfg.ProvisionerJobs, p, true)
		if err != nil {
			return nil, fmt.Errorf("provisioner at parallelism %d: %w", p, err)
		}
		res.Provisioner[p] = append(res.Provisioner[p], v)
		cfg.Log("scheduling, parallelism %d: worker %.1f jobs/s (slots %.1f%% busy, %.1f%% while queued; %d machines at most), bare %.0f, provisioner %.1f",
			p, w.JobsPerSecond, 100*w.Utilisation, 100*w.UtilisationQueued, w.MaxMachines, res.Bare[p][0].JobsPerSecond, v.JobsPerSecond)
		_ = os.RemoveAll(dir)
	}
	res.Scaling, res.ScalingScan, res.WorkerAmong = map[int][]float64{}, map[int][]float64{}, map[int][]float64{}
	res.ScalingJobs, res.ScalingParallelism, res.WorkerAmongJobs = cfg.ScalingJobs, cfg.ScalingParallelism, cfg.WorkerAmongJobs
	res.ScalingRounds = max(1, cfg.ScalingRounds)
	// One node per number of other machines, made once: each connection
	// to it starts from the same state.
	nodes := map[int]string{}
	for _, present := range cfg.Present {
		dir := filepath.Join(cfg.Dir, fmt.Sprintf("sched-present-%d", present))
		defer func() { _ = os.RemoveAll(dir) }()
		uri, err := otherNode(ctx, dir, present)
		if err != nil {
			return nil, fmt.Errorf("node with %d other machines: %w", present, err)
		}
		nodes[present] = uri
	}
	// The numbers of machines in turn, round after round, so that the
	// machine's load falls on all alike.
	for round := range res.ScalingRounds {
		for _, present := range cfg.Present {
			uri := nodes[present]
			v, err := schedProvisioner(ctx, uri, cfg.ScalingJobs, cfg.ScalingParallelism, true)
			if err != nil {
				return nil, fmt.Errorf("provisioner among %d machines: %w", present, err)
			}
			res.Scaling[present] = append(res.Scaling[present], v.JobsPerSecond)
			line := fmt.Sprintf("scheduling, round %d, provisioner among %d other machines: %.1f jobs/s with its view", round+1, present, v.JobsPerSecond)
			if round == 0 {
				// Scanning, as before the view, is the reference: slow
				// among many machines, and measured once.
				sc, err := schedProvisioner(ctx, uri, cfg.ScalingJobs, cfg.ScalingParallelism, false)
				if err != nil {
					return nil, fmt.Errorf("provisioner scanning among %d machines: %w", present, err)
				}
				res.ScalingScan[present] = append(res.ScalingScan[present], sc.JobsPerSecond)
				line += fmt.Sprintf(", %.1f scanning", sc.JobsPerSecond)
			}
			if cfg.WorkerAmongJobs > 0 {
				dir := filepath.Join(cfg.Dir, fmt.Sprintf("sched-present-%d", present), fmt.Sprintf("worker-%d", round))
				w, err := schedWorker(ctx, cfg.Self, dir, uri, cfg.WorkerAmongJobs, cfg.ScalingParallelism, nil)
				if err != nil {
					return nil, fmt.Errorf("worker among %d machines: %w", present, err)
				}
				res.WorkerAmong[present] = append(res.WorkerAmong[present], w.JobsPerSecond)
				line += fmt.Sprintf(", worker %.1f", w.JobsPerSecond)
			}
			cfg.Log("%s", line)
		}
	}
	if cfg.Profile > 0 {
		dir := filepath.Join(cfg.Dir, "sched-profiled")
		uri, err := testNode(dir, nil)
		if err != nil {
			return nil, err
		}
		if _, err := schedWorker(ctx, cfg.Self, dir, uri, cfg.ProfileJobs, cfg.Profile, &profileFiles{dir: cfg.Dir, name: "sched"}); err != nil {
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

// schedWorker is one run of the in-process worker against the test
// driver node at uri (testNode, otherNode), with NATS in dir.
func schedWorker(ctx context.Context, self, dir, uri string, jobs, parallelism int, prof *profileFiles) (SchedRun, error) {
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
// one connection, parallelism at a time: Clone, Start, Remove, against
// the test driver node at uri (testNode, otherNode). With view, the
// provisioner keeps its host view as the worker runs it; without, it
// scans the host on every Clone and Remove.
func schedProvisioner(ctx context.Context, uri string, jobs, parallelism int, view bool) (SchedRun, error) {
	l, err := provision.Dial(ctx, uri)
	if err != nil {
		return SchedRun{}, err
	}
	defer func() { _ = l.Disconnect() }()
	p := provision.New(l, provision.Options{})
	if view {
		wctx, stop := context.WithCancel(ctx)
		var wg conc.WaitGroup
		defer func() {
			stop()
			wg.Wait()
		}()
		checked := make(chan error, 1)
		wg.Go(func() {
			_ = p.Watch(wctx, provision.WatchOptions{
				Events:  func(ctx context.Context) (provision.EventConn, error) { return provision.Dial(ctx, uri) },
				OnCheck: firstCheck(checked),
			})
		})
		if err := waitCheck(ctx, checked); err != nil {
			return SchedRun{}, err
		}
	}
	start := time.Now()
	machine := func(ctx context.Context, job string) error {
		if _, err := p.Clone(ctx, provision.Spec{JobID: job, Image: testImage, Host: "bench", RunnerKind: "forgejo",
			RequestedAt: start, Deadline: start.Add(time.Hour)}); err != nil {
			return err
		}
		return p.Start(ctx, job)
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

// otherHost is the host id of otherNode's machines.
const otherHost = "bench-other"

// otherNode makes a test driver node in dir holding the image and present
// running machines of another host (otherHost), each with its own disk
// volume in the pool, cloned by the provisioner so that they are what a
// worker makes; a worker of another host id leaves them alone, but
// Clone and Remove must take their MAC addresses and disks into account.
// It returns the node's URI.
func otherNode(ctx context.Context, dir string, present int) (string, error) {
	uri, err := testNode(dir, nil)
	if err != nil || present == 0 {
		return uri, err
	}
	l, err := provision.Dial(ctx, uri)
	if err != nil {
		return "", err
	}
	defer func() { _ = l.Disconnect() }()
	p := provision.New(l, provision.Options{})
	now := time.Now().UTC()
	var domains, volumes []string
	for i := range present {
		m, err := p.Clone(ctx, provision.Spec{JobID: fmt.Sprintf("other-%d", i), Image: testImage, Host: otherHost,
			RunnerKind: string(messages.RunnerForgejo), RequestedAt: now, Deadline: now.Add(6 * time.Hour)})
		if err != nil {
			return "", err
		}
		dom, err := l.DomainLookupByName(m.Name)
		if err != nil {
			return "", err
		}
		doc, err := l.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive|libvirt.DomainXMLSecure)
		if err != nil {
			return "", err
		}
		domains = append(domains, doc)
		for _, path := range m.Volumes {
			vol, err := l.StorageVolLookupByPath(path)
			if err != nil {
				return "", err
			}
			vdoc, err := l.StorageVolGetXMLDesc(vol, 0)
			if err != nil {
				return "", err
			}
			volumes = append(volumes, vdoc)
		}
	}
	// Domains in a test driver node run unless they say otherwise.
	return testNodeWith(dir, domains, volumes)
}
