package metrics

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/internal/worker"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

const namespace = "stretchy_worker"

// otherImage is the image label of every image the host does not carry
// (a request may name any image). No image is named so: a valid image
// name begins with a letter or a digit.
const otherImage = "_other"

// Publisher is the lifecycle's event publisher (lifecycle.Publisher).
type Publisher interface {
	Append(ctx context.Context, ev messages.Event, msgID string, after uint64) (seq, pos uint64, err error)
}

// Source is what is read from the worker: its state at each scrape, and
// the images it carries as events are observed.
type Source interface {
	Snapshot() worker.Snapshot
	// Carries reports whether the host carries image now.
	Carries(image string) bool
}

// Probes tell whether the worker's connections answer.
type Probes struct {
	// NATSConnected and LibvirtConnected report the connection states
	// for /metrics, without a round trip; AgentEvents whether the guest
	// agent client is woken by libvirt's agent lifecycle events now.
	NATSConnected, LibvirtConnected, AgentEvents func() bool
	// NATS and Libvirt make a round trip each, for /readyz.
	NATS, Libvirt func(ctx context.Context) error
	// Timeout bounds each round trip of /readyz; default 5s.
	Timeout time.Duration
}

// Metrics holds the worker's instruments in their own registry.
type Metrics struct {
	reg          *prometheus.Registry
	phase        *prometheus.HistogramVec
	failures     *prometheus.CounterVec
	claimsLost   prometheus.Counter
	redeliveries *prometheus.CounterVec
	agentReady   *prometheus.CounterVec
	src          Source
	probes       Probes
}

// phases are the events whose phase_ms ends a phase worth timing
// (docs/protocol.md 5.1).
var phases = map[messages.State]bool{
	messages.StateAccepted: true, messages.StateCloned: true, messages.StateRunning: true,
	messages.StateAgentReady: true, messages.StateRunnerStarted: true, messages.StateRunnerExited: true,
	messages.StateTornDown: true,
}

// New returns the metrics of a worker read through src and probes.
func New(src Source, probes Probes) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(), src: src, probes: probes,
		phase: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "phase_duration_seconds",
			Help: "Duration of each phase of a job, by the event that ends it (accepted: time in the queue; cloned, running, agent_ready, runner_started, runner_exited, torn_down) and image (_other: images the host does not carry).",
			// 10 ms to about 3 hours: clones take milliseconds, runs hours.
			Buckets: prometheus.ExponentialBuckets(0.01, 2.5, 16),
		}, []string{"phase", "image"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "failures_total", Help: "Jobs this host reported failed, by error code.",
		}, []string{"code"}),
		claimsLost: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "claims_lost_total",
			Help: "Jobs this host let go of because another host took their claim (dropped, claim_lost).",
		}),
		redeliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "redeliveries_total",
			Help: "Requests settled by this host that had been delivered before (delivery count above 1), by op.",
		}, []string{"op"}),
		agentReady: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "agent_ready_total",
			Help: "Guest agents found ready, by what made the guest-ping that found them: event (libvirt said the agent connected), poll (the polling interval), first (the first ping).",
		}, []string{"wake"}),
	}
	m.reg.MustRegister(m.phase, m.failures, m.claimsLost, m.redeliveries, m.agentReady, &snapshot{m: m},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Events wraps the lifecycle's publisher: every event stored is observed.
func (m *Metrics) Events(p Publisher) Publisher { return observed{p: p, m: m} }

type observed struct {
	p Publisher
	m *Metrics
}

func (o observed) Append(ctx context.Context, ev messages.Event, msgID string, after uint64) (uint64, uint64, error) {
	seq, pos, err := o.p.Append(ctx, ev, msgID, after)
	if err == nil {
		o.m.Observe(ev)
	}
	return seq, pos, err
}

// Observe counts one stored event.
func (m *Metrics) Observe(ev messages.Event) {
	switch {
	case ev.State == messages.StateFailed && ev.Error != nil:
		m.failures.WithLabelValues(string(ev.Error.Code)).Inc()
	case ev.State == messages.StateDropped && ev.Reason == messages.ReasonClaimLost:
		m.claimsLost.Inc()
	}
	if phases[ev.State] && (ev.State != messages.StateTornDown || ev.Error == nil) {
		m.phase.WithLabelValues(string(ev.State), m.image(ev.Image)).Observe(float64(ev.PhaseMS) / 1000)
	}
}

// image is the label of an image: its name if the host carries it,
// otherImage if not, so that requests for made-up images add no series.
func (m *Metrics) image(name string) string {
	if m.src.Carries(name) {
		return name
	}
	return otherImage
}

// AgentReady counts a guest agent found ready, by what woke the ping that
// found it (qga.Wake).
func (m *Metrics) AgentReady(wake string) { m.agentReady.WithLabelValues(wake).Inc() }

// Settled counts a settled request; pass it the worker's settlements.
func (m *Metrics) Settled(s worker.Settlement) {
	if (s.Op == "provision" || s.Op == "teardown") && s.Attempt > 1 {
		m.redeliveries.WithLabelValues(s.Op).Inc()
	}
}

// snapshot turns the worker's state into gauges at each scrape.
type snapshot struct{ m *Metrics }

var (
	descInFlight = prometheus.NewDesc(namespace+"_operations_in_flight", "Operations (provisions until ready, teardowns) running now.", nil, nil)
	descSlots    = prometheus.NewDesc(namespace+"_operation_slots", "Operation slots (--parallelism).", nil, nil)
	descMachines = prometheus.NewDesc(namespace+"_machines_running", "Machines that exist or are being built, by image (_other: images the host does not carry).", []string{"image"}, nil)
	descMaxVMs   = prometheus.NewDesc(namespace+"_machines_max", "Machines this host runs at most (--max-vms).", nil, nil)
	descPending  = prometheus.NewDesc(namespace+"_requests_waiting", "Requests waiting on each consumer this host pulls from (queue depth), as last sampled.", []string{"consumer"}, nil)
	descState    = prometheus.NewDesc(namespace+"_host_state", "1 for the host's state: active, draining or drained.", []string{"state"}, nil)
	descImage    = prometheus.NewDesc(namespace+"_image_admitted", "Images this host carries: 1 when it takes their requests, 0 while a pool is short of space.", []string{"image"}, nil)
	descPoolFree = prometheus.NewDesc(namespace+"_pool_free_bytes", "Free space of the pools of this host's images.", []string{"pool"}, nil)
	descPoolLow  = prometheus.NewDesc(namespace+"_pool_low", "1 while a pool has less free space than --min-free-space.", []string{"pool"}, nil)
	descNATS     = prometheus.NewDesc(namespace+"_nats_connected", "1 while the NATS connection is up.", nil, nil)
	descLibvirt  = prometheus.NewDesc(namespace+"_libvirt_connected", "1 while the libvirt connection is up.", nil, nil)
	descAgentEvt = prometheus.NewDesc(namespace+"_agent_events", "1 while the guest agent client is woken by libvirt's agent lifecycle events; 0 while it polls.", nil, nil)
)

func (s *snapshot) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descInFlight, descSlots, descMachines, descMaxVMs, descPending,
		descState, descImage, descPoolFree, descPoolLow, descNATS, descLibvirt, descAgentEvt} {
		ch <- d
	}
}

func gauge(d *prometheus.Desc, v float64, labels ...string) prometheus.Metric {
	return prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
}

func bit(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (s *snapshot) Collect(ch chan<- prometheus.Metric) {
	snap := s.m.src.Snapshot()
	ch <- gauge(descInFlight, float64(snap.SlotsInUse))
	ch <- gauge(descSlots, float64(snap.SlotsTotal))
	ch <- gauge(descMaxVMs, float64(snap.MachinesMax))
	carried := make(map[string]bool, len(snap.Images))
	for _, img := range snap.Images {
		carried[img.Name] = true
	}
	// Machines are counted from the moment a request is accepted, for
	// whatever image it names.
	other := 0
	for image, n := range snap.Machines {
		if !carried[image] {
			other += n
			continue
		}
		ch <- gauge(descMachines, float64(n), image)
	}
	if other > 0 {
		ch <- gauge(descMachines, float64(other), otherImage)
	}
	for _, img := range snap.Images {
		if _, ok := snap.Machines[img.Name]; !ok {
			ch <- gauge(descMachines, 0, img.Name)
		}
		ch <- gauge(descImage, bit(img.Admitted), img.Name)
	}
	for consumer, n := range snap.Pending {
		ch <- gauge(descPending, float64(n), consumer)
	}
	for _, st := range []messages.HostState{messages.HostActive, messages.HostDraining, messages.HostDrained} {
		ch <- gauge(descState, bit(snap.State == st), string(st))
	}
	for _, p := range snap.Pools {
		ch <- gauge(descPoolFree, float64(p.FreeBytes), p.Name)
		ch <- gauge(descPoolLow, bit(p.Low), p.Name)
	}
	if f := s.m.probes.NATSConnected; f != nil {
		ch <- gauge(descNATS, bit(f()))
	}
	if f := s.m.probes.LibvirtConnected; f != nil {
		ch <- gauge(descLibvirt, bit(f()))
	}
	if f := s.m.probes.AgentEvents; f != nil {
		ch <- gauge(descAgentEvt, bit(f()))
	}
}

// Handler serves /metrics, /healthz (the process answers) and /readyz
// (NATS and libvirt answer a round trip, and the host is not drained;
// 503 with the reasons otherwise).
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		problems := m.check(r.Context())
		if st := m.src.Snapshot().State; st == messages.HostDrained {
			problems = append(problems, "host drained")
		}
		if len(problems) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			for _, p := range problems {
				fmt.Fprintln(w, p)
			}
			return
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

// check makes the round trips of /readyz at once, each within its own
// deadline, so that a connection that hangs neither delays the answer
// past one timeout nor makes the other check fail. It returns the failed
// checks, in a fixed order.
func (m *Metrics) check(ctx context.Context) []string {
	timeout := m.probes.Timeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	checks := []struct {
		name string
		f    func(context.Context) error
	}{{"nats", m.probes.NATS}, {"libvirt", m.probes.Libvirt}}
	errs := make([]error, len(checks))
	var wg conc.WaitGroup
	for i, c := range checks {
		if c.f == nil {
			continue
		}
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			errs[i] = c.f(ctx)
		})
	}
	wg.Wait()
	var problems []string
	for i, err := range errs {
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", checks[i].name, err))
		}
	}
	return problems
}
