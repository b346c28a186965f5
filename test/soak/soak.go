package soak

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/test/soak/check"
)

// Config configures a soak.
type Config struct {
	Seed int64
	// Duration is how long jobs are submitted; the soak then drains.
	Duration time.Duration
	// Rate is how many jobs are submitted per second.
	Rate float64
	// FaultEvery is the mean time between two faults; 0 injects none.
	// Faults come only in the first FaultShare of Duration, so that the
	// end of the soak shows the fleet recovering.
	FaultEvery time.Duration
	FaultShare float64
	Faults     []check.FaultKind
	// Dir holds the soak's logs and NATS stores.
	Dir string
	// WorkerBin is the worker (a soak build unless Real); NATSBin a
	// nats-server.
	WorkerBin, NATSBin string
	// Corpus is pkg/messages/testdata/bad.
	Corpus string
	// Sync is the NATS nodes' jetstream sync_interval.
	Sync string
	// AckWait, MaxDeliver, Parallelism and MaxVMs are every worker's.
	AckWait     time.Duration
	MaxDeliver  int
	Parallelism int
	MaxVMs      int
	// DrainTimeout bounds the wait for the last jobs to end while none
	// ends: a long run's backlog drains for as long as jobs keep ending.
	DrainTimeout time.Duration
	// Real runs real guests of the image Real names on the machine's
	// libvirtd (qemu:///system), with the real guest agent, instead of
	// libvirt's test driver and the fake agent.
	Real string
	// Mix weighs the kinds of jobs; DefaultMix when zero.
	Mix  Mix
	Logf func(string, ...any)
}

// hostImages are the images of the soak's hosts on the test driver:
// every job can run on soak-all; soak-ab only on a and b, soak-c only on
// c; soak-nobody nowhere.
var hostImages = []struct {
	id     string
	images []string
}{
	{"soak-a", []string{"soak-ab", "soak-all"}},
	{"soak-b", []string{"soak-ab", "soak-all"}},
	{"soak-c", []string{"soak-all", "soak-c"}},
}

func (c *Config) defaults() {
	if c.Rate <= 0 {
		c.Rate = 3
	}
	if c.AckWait == 0 {
		c.AckWait = 6 * time.Second
	}
	if c.MaxDeliver == 0 {
		c.MaxDeliver = 5
	}
	if c.Parallelism == 0 {
		c.Parallelism = 3
	}
	if c.MaxVMs == 0 {
		c.MaxVMs = 8
	}
	if c.FaultShare == 0 {
		c.FaultShare = 0.8
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = 4 * time.Minute
	}
	if c.Mix == (Mix{}) {
		c.Mix = DefaultMix
	}
	if c.Logf == nil {
		c.Logf = func(string, ...any) {}
	}
}

// Run runs a soak and returns its history. It fails only when the soak
// could not be run; what the history shows is check.Check's business.
func Run(ctx context.Context, cfg Config) (*check.History, error) {
	cfg.defaults()
	logf := cfg.Logf
	h := &check.History{Seed: cfg.Seed, Start: time.Now(), Commit: Revision()}
	runID := runIDFor(cfg.Seed)
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, err
	}
	// Unix socket paths are short: libvirtd's live under /tmp.
	removeStaleSockDirs()
	sockDir, err := os.MkdirTemp("", "stretchy-soak-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(sockDir)
	if err := os.Chmod(sockDir, 0o755); err != nil {
		return nil, err
	}

	logf("soak: starting a 3-node NATS cluster (sync_interval %s)", syncName(cfg.Sync))
	cluster, err := StartCluster(ctx, cfg.NATSBin, filepath.Join(cfg.Dir, "nats"), 3, cfg.Sync)
	if err != nil {
		return nil, err
	}
	defer cluster.Stop()
	h.Fleet = check.Fleet{AckWait: cfg.AckWait, MaxDeliver: cfg.MaxDeliver, SyncSetting: syncName(cfg.Sync)}

	// The streams, consumers and buckets are made once, as an
	// orchestrator may (docs/protocol.md 2.2), rather than by three
	// workers racing on a cluster that just formed.
	if err := ensureTopology(ctx, cluster.URLs(), cfg); err != nil {
		return nil, err
	}

	if cfg.Real != "" {
		// Deferred before the workers' stop, so that it runs after it.
		cleanup, err := markRealRun(ctx, filepath.Dir(cfg.Dir), runID, logf)
		if err != nil {
			return nil, err
		}
		defer cleanup()
	}
	var hosts []*host
	defer func() {
		for _, hs := range hosts {
			if hs.worker == nil {
				// Its worker did not start.
			} else if err := hs.worker.Stop(); err != nil {
				logf("soak: stop the worker of %s: %v", hs.id, err)
			}
			if hs.libvirtd != nil {
				hs.libvirtd.Stop()
			}
		}
	}()
	specs := hostImages
	if cfg.Real != "" {
		specs = nil
		for _, id := range realHostIDs(runID) {
			specs = append(specs, struct {
				id     string
				images []string
			}{id, []string{cfg.Real}})
		}
	}
	for _, spec := range specs {
		hs := &host{id: spec.id}
		wo := WorkerOptions{Bin: cfg.WorkerBin, Dir: cfg.Dir, Host: spec.id, NATSURLs: cluster.URLs(),
			Parallelism: cfg.Parallelism, MaxVMs: cfg.MaxVMs, AckWait: cfg.AckWait, MaxDeliver: cfg.MaxDeliver, Replicas: 3}
		if cfg.Real == "" {
			if hs.libvirtd, err = StartLibvirtd(ctx, filepath.Join(sockDir, spec.id), spec.id, spec.images); err != nil {
				return nil, err
			}
			hosts = append(hosts, hs) // stopped on the way out from here on
			wo.LibvirtURI, wo.Images, wo.Fake = hs.libvirtd.URI(), "soak-*", true
		} else {
			wo.LibvirtURI, wo.Images, wo.DomainType = "qemu:///system", cfg.Real, "qemu"
		}
		w, err := NewWorker(wo)
		if err != nil {
			return nil, err
		}
		if err := w.Start(); err != nil {
			return nil, err
		}
		hs.worker = w
		if hs.libvirtd == nil {
			hosts = append(hosts, hs)
		}
		h.Fleet.Hosts = append(h.Fleet.Hosts, check.Host{ID: spec.id, Images: spec.images, Parallelism: cfg.Parallelism, MaxVMs: cfg.MaxVMs})
	}
	var real *realHosts
	if cfg.Real != "" {
		if real, err = newRealHosts(ctx, runID); err != nil {
			return nil, err
		}
		defer real.close()
	}

	nc, err := nats.Connect(cluster.URLs(), nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond), nats.Name("soak"))
	if err != nil {
		return nil, fmt.Errorf("connect to nats: %w", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	fleet, err := waitFleet(ctx, js, h.Fleet.Hosts)
	if err != nil {
		return nil, err
	}
	logf("soak: %d hosts serve: %s", len(hosts), hostList(h.Fleet.Hosts))
	terms, err := watchTerminations(nc)
	if err != nil {
		return nil, err
	}
	defer terms.sub.Unsubscribe()
	var corpus []corpusEntry
	if cfg.Corpus != "" {
		if corpus, err = loadCorpus(cfg.Corpus); err != nil {
			return nil, err
		}
	}
	orch := NewOrchestrator(js, cfg.Seed, runID, h.Fleet.Hosts, cfg.Mix, corpus, logf)
	orch.real = cfg.Real != ""

	var wg conc.WaitGroup
	orchCtx, stopOrch := context.WithCancel(context.WithoutCancel(ctx))
	defer stopOrch()
	orch.ctx = orchCtx
	followCtx, stopFollow := context.WithCancel(context.WithoutCancel(ctx))
	defer stopFollow()
	wg.Go(func() {
		if err := follow(followCtx, js, func(e check.Event) { orch.OnEvent(orchCtx, e) }); err != nil {
			logf("soak: %v", err)
		}
	})
	sampleCtx, stopSample := context.WithCancel(context.WithoutCancel(ctx))
	defer stopSample()
	var samplesMu sync.Mutex
	wg.Go(func() {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-sampleCtx.Done():
				return
			case <-t.C:
			}
			for _, hs := range hosts {
				s := check.Sample{Time: time.Now(), Host: hs.id}
				s.OpsInFlight, s.Machines = hs.worker.Gauges(sampleCtx)
				switch {
				case hs.libvirtd != nil:
					s.Domains = hs.libvirtd.Domains()
				default:
					s.Domains = real.domains(hs.id)
				}
				samplesMu.Lock()
				h.Samples = append(h.Samples, s)
				samplesMu.Unlock()
			}
		}
	})

	faultCtx, stopFaults := context.WithTimeout(ctx, time.Duration(float64(cfg.Duration)*cfg.FaultShare))
	defer stopFaults()
	inj := &Injector{rng: rand.New(rand.NewPCG(uint64(cfg.Seed), 0xfa17)), hosts: hosts, cluster: cluster, orch: orch,
		fleet: fleet, ackWait: cfg.AckWait, Every: cfg.FaultEvery, Kinds: cfg.Faults, logf: logf}
	var faultWG conc.WaitGroup
	if cfg.FaultEvery > 0 {
		faultWG.Go(func() { inj.Run(faultCtx) })
	}

	start := time.Now()
	logf("soak: submitting %.1f jobs/s for %s, a fault every %s on average in the first %s", cfg.Rate, cfg.Duration, cfg.FaultEvery, time.Duration(float64(cfg.Duration)*cfg.FaultShare).Round(time.Second))
	progress := time.NewTicker(10 * time.Second)
	defer progress.Stop()
	for n := 0; ctx.Err() == nil; n++ {
		due := start.Add(time.Duration(float64(n) / cfg.Rate * float64(time.Second)))
		if due.Sub(start) >= cfg.Duration {
			break
		}
		if d := time.Until(due); d > 0 {
			pause(ctx, d)
		}
		select {
		case <-progress.C:
			logf("soak: %s: %d jobs submitted, %d open, %d faults", time.Since(start).Round(time.Second), n, orch.Open(), len(inj.Faults()))
		default:
		}
		orch.Submit(orchCtx, n)
	}
	stopFaults()
	faultWG.Wait()
	logf("soak: %d jobs submitted; healing every fault and draining", len(orch.Jobs()))
	heal(ctx, hosts, cluster, fleet, logf)
	if err := cluster.WaitReady(ctx, 2*time.Minute); err != nil {
		logf("soak: %v", err)
	}
	if open := orch.Finish(orchCtx, cfg.DrainTimeout); len(open) > 0 {
		logf("soak: %d jobs did not end, none for %s: %s", len(open), cfg.DrainTimeout, strings.Join(first(open, 10), ", "))
	}
	logf("soak: waiting for the hosts to be clean (reconciliation runs every minute)")
	h.Final.Leftovers = waitClean(ctx, hosts, real, 3*time.Minute)
	stopSample()

	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	if err := retry(fctx, time.Minute, func(ctx context.Context) error {
		evs, err := readAllEvents(ctx, js)
		h.Events = evs
		return err
	}); err != nil {
		h.Final.Err = err.Error()
	}
	if err := retry(fctx, time.Minute, func(ctx context.Context) error {
		left, err := leftRequests(ctx, js)
		h.Final.Requests = left
		return err
	}); err != nil {
		h.Final.Err = errors.Join(errors.New(h.Final.Err), err).Error()
	}
	stopOrch()
	orch.Wait()
	stopFollow()
	wg.Wait()

	h.Jobs, h.Requests, h.Faults, h.Terminations = orch.Jobs(), orch.Requests(), inj.Faults(), terms.list()
	for _, hs := range hosts {
		s, err := hs.worker.Settlements()
		if err != nil {
			logf("soak: settlements of %s: %v", hs.id, err)
		}
		h.Settlements = append(h.Settlements, s...)
	}
	h.End = time.Now()
	return h, nil
}

func syncName(s string) string {
	if s == "" {
		return "default (2m)"
	}
	return s
}

func hostList(hs []check.Host) string {
	var parts []string
	for _, h := range hs {
		parts = append(parts, h.ID+" ("+strings.Join(h.Images, ", ")+")")
	}
	return strings.Join(parts, ", ")
}

func first(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], "...")
	}
	return s
}

// waitFleet waits until the workers made the streams and buckets and
// every host's record lists its images, so that routing works from the
// first job, and returns an orchestrator's client of the fleet.
func waitFleet(ctx context.Context, js jetstream.JetStream, want []check.Host) (*client.Client, error) {
	fleet := client.New(js, client.WithIdentity("soak"))
	err := retry(ctx, 3*time.Minute, func(ctx context.Context) error {
		recs, err := fleet.Hosts(ctx)
		if err != nil {
			return err
		}
		for _, w := range want {
			ok := slices.ContainsFunc(recs, func(r messages.Host) bool {
				return r.Host == w.ID && len(r.Images) == len(w.Images) && r.State == messages.HostActive
			})
			if !ok {
				return fmt.Errorf("host %s is not in the registry with its images yet", w.ID)
			}
		}
		if _, err := js.Stream(ctx, messages.EventsStream); err != nil {
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("wait for the fleet: %w", err)
	}
	return fleet, nil
}

// heal undoes whatever a fault left: it starts stopped workers and NATS
// nodes, lets frozen workers go on and undrains every host.
func heal(ctx context.Context, hosts []*host, cluster *Cluster, fleet *client.Client, logf func(string, ...any)) {
	for _, n := range cluster.Nodes {
		if !n.proc.running() {
			if err := n.proc.start(); err != nil {
				logf("soak: heal: %v", err)
			}
		}
	}
	for _, hs := range hosts {
		if !hs.worker.Running() {
			if err := hs.worker.Start(); err != nil {
				logf("soak: heal: %v", err)
			}
		} else {
			_ = hs.worker.Thaw()
		}
		if err := retry(context.WithoutCancel(ctx), 2*time.Minute, func(ctx context.Context) error { return fleet.Undrain(ctx, hs.id) }); err != nil {
			logf("soak: heal: undrain %s: %v", hs.id, err)
		}
	}
}

// waitClean waits until no host holds a stretchy- domain or volume, or
// timeout passes, and returns what is left.
func waitClean(ctx context.Context, hosts []*host, real *realHosts, timeout time.Duration) map[string][]string {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		left := map[string][]string{}
		clean := true
		for _, hs := range hosts {
			var l []string
			var err error
			if hs.libvirtd != nil {
				l, err = hs.libvirtd.Leftovers()
			} else {
				l, err = real.leftovers(hs.id)
			}
			if err != nil {
				l = []string{"(libvirtd did not answer: " + err.Error() + ")"}
			}
			slices.Sort(l)
			left[hs.id] = l
			clean = clean && len(l) == 0
		}
		if clean {
			return left
		}
		select {
		case <-ctx.Done():
			return left
		case <-t.C:
		}
	}
}

// ensureTopology creates the fleet's streams, consumers and buckets with
// the workers' settings.
func ensureTopology(ctx context.Context, urls string, cfg Config) error {
	nc, err := nats.Connect(urls, nats.MaxReconnects(-1))
	if err != nil {
		return fmt.Errorf("connect to nats: %w", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	return retry(ctx, 3*time.Minute, func(ctx context.Context) error {
		t := bus.Topology{Host: hostImages[0].id, AckWait: cfg.AckWait, MaxDeliver: cfg.MaxDeliver, Replicas: 3}
		if _, err := bus.Ensure(ctx, js, t); err != nil {
			return err
		}
		if _, err := bus.OpenClaims(ctx, js, t); err != nil {
			return err
		}
		_, err := bus.OpenFleet(ctx, js, t)
		return err
	})
}

// removeStaleSockDirs removes the libvirtd directories under /tmp of
// earlier soaks that were killed (their libvirtds died with them), and
// keeps those whose libvirtds run, or that were just made: another
// soak's.
func removeStaleSockDirs() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "stretchy-soak-*"))
	for _, dir := range dirs {
		if fi, err := os.Stat(dir); err != nil || time.Since(fi.ModTime()) < 2*time.Minute {
			continue // a soak starting now, whose libvirtds have no pid file yet
		}
		pids, _ := filepath.Glob(filepath.Join(dir, "*", "run", "libvirtd.pid"))
		live := false
		for _, f := range pids {
			b, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			cmdline, err := os.ReadFile(filepath.Join("/proc", strings.TrimSpace(string(b)), "cmdline"))
			if err == nil && strings.Contains(string(cmdline), dir) {
				live = true
			}
		}
		if !live {
			_ = os.RemoveAll(dir)
		}
	}
}
