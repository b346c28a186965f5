package soak

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/test/soak/check"
)

// host is one host of the soak: its libvirtd and its worker.
type host struct {
	id       string
	libvirtd *Libvirtd
	worker   *Worker
}

// Injector injects the soak's faults at random moments, one after
// another, each healed before the next: every kind once per round, the
// rounds shuffled by the seed, so that even a short soak has each kind.
type Injector struct {
	rng     *rand.Rand
	hosts   []*host
	cluster *Cluster
	orch    *Orchestrator
	fleet   *client.Client
	ackWait time.Duration
	// Every is the mean time between two faults.
	Every time.Duration
	// Kinds are the faults to inject; all by default.
	Kinds []check.FaultKind
	logf  func(string, ...any)

	mu     sync.Mutex
	faults []check.Fault
}

// AllFaults are every fault the soak knows, in the order of a round
// before it is shuffled.
var AllFaults = []check.FaultKind{
	check.FaultWorkerKill, check.FaultWorkerStop, check.FaultNATSKill, check.FaultNATSKillTwo,
	check.FaultLibvirtRestart, check.FaultGuestStop, check.FaultTeardownStorm, check.FaultDrain,
	// Half again of the faults a host meets most.
	check.FaultWorkerKill, check.FaultWorkerStop, check.FaultGuestStop,
}

// plan is one fault as the injector's random source decided it, so that
// faults can run at once without sharing the source.
type plan struct {
	kind  check.FaultKind
	host  *host
	nodes []*Node
	// hold is how long the fault lasts; seed picks a guest to stop.
	hold time.Duration
	seed uint64
	// busy is the resource the fault holds: a host's worker and
	// libvirtd, its drain, or the NATS cluster.
	busy string
}

// Run injects faults until ctx ends, then waits for those under way to
// be healed. Faults on different resources overlap (a host stalls while
// a NATS node is down); one resource has one fault at a time.
func (in *Injector) Run(ctx context.Context) {
	kinds := in.Kinds
	if len(kinds) == 0 {
		kinds = AllFaults
	}
	var running conc.WaitGroup
	defer running.Wait()
	busy := map[string]bool{}
	var round []check.FaultKind
	for {
		wait := time.Duration(in.rng.ExpFloat64() * float64(in.Every))
		wait = min(max(wait, in.Every/4), 3*in.Every)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if len(round) == 0 {
			round = append([]check.FaultKind(nil), kinds...)
			in.rng.Shuffle(len(round), func(i, j int) { round[i], round[j] = round[j], round[i] })
		}
		p := in.plan(round[0])
		in.mu.Lock()
		free := p.busy == "" || !busy[p.busy]
		if free && p.busy != "" {
			busy[p.busy] = true
		}
		in.mu.Unlock()
		if !free {
			continue // the same kind is tried again at the next moment
		}
		round = round[1:]
		running.Go(func() {
			f, err := in.inject(ctx, p)
			in.mu.Lock()
			delete(busy, p.busy)
			if f.Kind != "" {
				in.faults = append(in.faults, f)
			}
			in.mu.Unlock()
			if err != nil {
				in.logf("soak: fault %s: %v", p.kind, err)
			}
			if f.Kind != "" {
				in.logf("soak: fault %s on %s (%s) %s", f.Kind, f.Target, f.End.Sub(f.Start).Round(time.Millisecond), f.Note)
			}
		})
	}
}

// Faults returns the faults injected so far.
func (in *Injector) Faults() []check.Fault {
	in.mu.Lock()
	defer in.mu.Unlock()
	return append([]check.Fault(nil), in.faults...)
}

// between returns a random duration in [lo, hi).
func (in *Injector) between(lo, hi time.Duration) time.Duration {
	return lo + time.Duration(in.rng.Int64N(int64(hi-lo)))
}

func pause(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func (in *Injector) plan(kind check.FaultKind) plan {
	p := plan{kind: kind, host: in.hosts[in.rng.IntN(len(in.hosts))], seed: in.rng.Uint64()}
	switch kind {
	case check.FaultWorkerKill:
		p.hold, p.busy = in.between(200*time.Millisecond, 3*time.Second), "host "+p.host.id
	case check.FaultWorkerStop:
		// Longer than the claim's TTL, sometimes longer than ack_wait
		// too (the request is then delivered again elsewhere).
		ttl := bus.ClaimTTL(in.ackWait)
		p.hold, p.busy = in.between(ttl+500*time.Millisecond, 2*in.ackWait), "host "+p.host.id
	case check.FaultLibvirtRestart:
		p.hold, p.busy = in.between(100*time.Millisecond, 2*time.Second), "host "+p.host.id
	case check.FaultDrain:
		p.hold, p.busy = in.between(3*time.Second, 12*time.Second), "drain "+p.host.id
	case check.FaultNATSKill, check.FaultNATSKillTwo:
		nodes := append([]*Node(nil), in.cluster.Nodes...)
		in.rng.Shuffle(len(nodes), func(i, j int) { nodes[i], nodes[j] = nodes[j], nodes[i] })
		n := 1
		if kind == check.FaultNATSKillTwo {
			n = 2
		}
		p.nodes, p.hold, p.busy = nodes[:n], in.between(time.Second, 6*time.Second), "nats"
	}
	return p
}

func (in *Injector) inject(ctx context.Context, p plan) (check.Fault, error) {
	h := p.host
	f := check.Fault{Kind: p.kind, Target: h.id, Start: time.Now()}
	// A fault is healed even when the soak ends meanwhile.
	heal := context.WithoutCancel(ctx)
	switch p.kind {
	case check.FaultWorkerKill:
		if err := h.worker.Kill(); err != nil {
			return check.Fault{}, err
		}
		pause(ctx, p.hold)
		f.End = time.Now()
		return f, h.worker.Start()
	case check.FaultWorkerStop:
		if err := h.worker.Freeze(); err != nil {
			return check.Fault{}, err
		}
		pause(ctx, p.hold)
		f.End = time.Now()
		f.Note = fmt.Sprintf("(claim TTL %s, ack wait %s)", bus.ClaimTTL(in.ackWait), in.ackWait)
		return f, h.worker.Thaw()
	case check.FaultNATSKill, check.FaultNATSKillTwo:
		f.Target = p.nodes[0].Name
		if len(p.nodes) == 2 {
			f.Target += "+" + p.nodes[1].Name
		}
		if err := in.cluster.Kill(p.nodes...); err != nil {
			return check.Fault{}, err
		}
		pause(ctx, p.hold)
		if err := in.cluster.Restart(p.nodes...); err != nil {
			return check.Fault{}, err
		}
		f.End = time.Now()
		// The cluster is one resource: its next fault waits until it
		// answers again.
		if err := in.cluster.WaitReady(heal, 2*time.Minute); err != nil {
			return f, err
		}
		return f, nil
	case check.FaultLibvirtRestart:
		if err := h.libvirtd.Restart(ctx, p.hold); err != nil {
			return check.Fault{}, err
		}
		f.End = time.Now()
		return f, nil
	case check.FaultGuestStop:
		rng := rand.New(rand.NewPCG(p.seed, 1))
		for _, i := range rng.Perm(len(in.hosts)) {
			h := in.hosts[i]
			if h.libvirtd == nil {
				continue
			}
			job, err := h.libvirtd.StopGuest(rng)
			if err != nil || job == "" {
				continue
			}
			f.Target, f.End, f.Note = job, time.Now(), "on "+h.id
			return f, nil
		}
		return check.Fault{}, nil
	case check.FaultTeardownStorm:
		n := in.orch.Storm(h.id)
		f.End, f.Note = time.Now(), fmt.Sprintf("(%d teardowns)", n)
		return f, nil
	case check.FaultDrain:
		if err := in.fleet.Drain(heal, h.id, "soak"); err != nil {
			return check.Fault{}, err
		}
		pause(ctx, p.hold)
		f.End = time.Now()
		return f, retry(heal, 2*time.Minute, func(ctx context.Context) error { return in.fleet.Undrain(ctx, h.id) })
	}
	return check.Fault{}, fmt.Errorf("unknown fault %s", p.kind)
}

// retry calls fn until it succeeds or timeout passes, for what must be
// undone even while the cluster elects a leader.
func retry(ctx context.Context, timeout time.Duration, fn func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
		err := fn(cctx)
		ccancel()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-t.C:
		}
	}
}
