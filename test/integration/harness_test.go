package integration

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/internal/worker"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

const libvirtSocket = "/var/run/libvirt/libvirt-sock"

// testHost is the host id of this suite run's workers: a suite running at
// the same time on the same libvirtd has another, so neither's workers
// adopt or remove the other's machines.
var testHost = "itest-" + runID

func testImage() string {
	if v := os.Getenv("STRETCHY_TEST_IMAGE"); v != "" {
		return v
	}
	return "tiny-linux"
}

// requireLibvirt skips the test when libvirtd is not there, or fails it when
// the environment says it must be (CI).
func requireLibvirt(tb testing.TB) {
	tb.Helper()
	if _, err := os.Stat(libvirtSocket); err != nil {
		if os.Getenv("STRETCHY_REQUIRE_LIBVIRT") == "1" {
			tb.Fatalf("libvirtd socket %s: %v (run: go tool task libvirt:up image)", libvirtSocket, err)
		}
		tb.Skipf("no libvirtd (%v); run: go tool task libvirt:up image", err)
	}
}

// dialLibvirt connects to the system libvirtd for the test's duration.
func dialLibvirt(tb testing.TB) *libvirt.Libvirt {
	tb.Helper()
	requireLibvirt(tb)
	l, err := provision.Dial(context.Background(), "qemu:///system")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = l.Disconnect() })
	if _, err := l.DomainLookupByName(testImage()); err != nil {
		tb.Fatalf("test image %q is not defined (run: go tool task image): %v", testImage(), err)
	}
	return l
}

// startNATS runs an in-process JetStream server for one test.
// It returns the server's URL, for worker processes, and a client.
func startNATS(tb testing.TB) (string, jetstream.JetStream) {
	tb.Helper()
	srv, err := embedded.Start(embedded.Options{StoreDir: tb.TempDir(), Port: -1})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		tb.Fatal(err)
	}
	return srv.ClientURL(), js
}

// runID marks the job ids of this test process, so that its leftover
// check is not confused by other packages' tests running at the same time.
var runID = func() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return "it" + hex.EncodeToString(b)
}()

// uniqueJob returns a job id that no earlier run used. Whatever the test
// leaves of the job's machine is removed when it ends, so that one failing
// test does not fail the next ones' leftover checks.
func uniqueJob(tb testing.TB, prefix string) string {
	return jobIn(tb, runID, prefix)
}

// jobIn is uniqueJob for job ids under another run marker than runID.
func jobIn(tb testing.TB, run, prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	job := run + "-" + prefix + "-" + hex.EncodeToString(b)
	tb.Cleanup(func() {
		l, err := provision.Dial(context.Background(), "qemu:///system")
		if err != nil {
			return
		}
		defer l.Disconnect()
		if existed, err := provision.New(l, provision.Options{}).Remove(context.Background(), job); existed || err != nil {
			tb.Errorf("job %s: the test left a machine behind (removed: %v)", job, err)
		}
	})
	return job
}

type workerOptions struct {
	Parallelism   int
	MaxVMs        int
	AckWait       time.Duration
	ShutdownGrace time.Duration
	// Host is the worker's host id; default testHost.
	Host string
	// Socket, when set, is the libvirt socket to dial instead of the
	// system one (a proxy in front of it), redialled within a second.
	Socket string
	// WrapAgent, when set, wraps the real guest agent the worker uses, so
	// that a test can act in the guest at a given step of the job.
	WrapAgent func(lifecycle.Agent) lifecycle.Agent
	// Images, when set, makes the worker a host of a fleet serving the
	// images these patterns match (worker run --images), with its record
	// in the registry rewritten every half second.
	Images []string
	// Resources bounds machine sizes (worker run --max-vcpus-per-machine
	// and the others); ConsoleDir is --console-dir (default: none);
	// MaxHold is --max-hold (default: no holds).
	Resources  lifecycle.Resources
	ConsoleDir string
	MaxHold    time.Duration
	// NATS, when set with Images, makes the worker answer control
	// requests on it (worker hold, release, console).
	NATS *nats.Conn
}

// runningWorker is a worker serving in the test process.
type runningWorker struct {
	w    *worker.Worker
	life *lifecycle.Manager
	stop func() error

	mu      sync.Mutex
	settled []worker.Settlement
}

func (rw *runningWorker) settlements() []worker.Settlement {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	return append([]worker.Settlement(nil), rw.settled...)
}

// startWorker runs a worker like "worker run" does, against js and the
// system libvirtd, until the test ends or stop is called.
func startWorker(tb testing.TB, js jetstream.JetStream, o workerOptions) *runningWorker {
	tb.Helper()
	if o.AckWait == 0 {
		o.AckWait = 10 * time.Second
	}
	if o.Host == "" {
		o.Host = testHost
	}
	ctx := context.Background()
	cons, err := bus.Ensure(ctx, js, bus.Topology{Host: o.Host, AckWait: o.AckWait, MaxDeliver: 5})
	if err != nil {
		tb.Fatal(err)
	}
	claims, err := bus.OpenClaims(ctx, js, bus.Topology{Host: o.Host, AckWait: o.AckWait})
	if err != nil {
		tb.Fatal(err)
	}
	pub := bus.NewPublisher(js)
	lopts := provision.LinkOptions{}
	if o.Socket != "" {
		lopts = provision.LinkOptions{Socket: o.Socket, MaxBackoff: time.Second}
	}
	link := provision.NewLink("qemu:///system", lopts)
	if err := link.Connect(ctx); err != nil {
		tb.Fatal(err)
	}
	linkCtx, stopLink := context.WithCancel(ctx)
	linkDone := make(chan struct{})
	go func() {
		defer close(linkDone)
		_ = link.Run(linkCtx)
	}()
	l := link.Libvirt()
	rw := &runningWorker{}
	qopts := qga.Options{Caller: link}
	if o.Socket == "" {
		events := qga.NewAgentEvents(func(ctx context.Context) (*libvirt.Libvirt, error) { return provision.Dial(ctx, "qemu:///system") })
		go func() { _ = events.Run(linkCtx) }()
		qopts.Events = events
	}
	var agent lifecycle.Agent = qga.New(l, qopts)
	if o.WrapAgent != nil {
		agent = o.WrapAgent(agent)
	}
	parallelism := o.Parallelism
	if parallelism <= 0 {
		parallelism = 3
	}
	slots := worker.NewSlots(parallelism)
	machines := provision.New(l, provision.Options{DomainType: "qemu", Link: link})
	rw.life = lifecycle.New(lifecycle.Config{
		Host: o.Host, Machines: machines,
		Agent: agent, Events: pub, History: pub, Journal: pub,
		Claims: claims, ClaimTTL: bus.ClaimTTL(o.AckWait), Slots: slots,
		Resources: o.Resources, Sizes: machines, ConsoleDir: o.ConsoleDir, Holds: machines, MaxHold: o.MaxHold,
	})
	var fleet *worker.FleetConfig
	if len(o.Images) > 0 {
		reg, err := bus.OpenFleet(ctx, js, bus.Topology{Host: o.Host, AckWait: o.AckWait, MaxDeliver: 5})
		if err != nil {
			tb.Fatal(err)
		}
		fleet = &worker.FleetConfig{Host: o.Host, Version: "itest", Images: o.Images, Registry: reg,
			Inventory:      provision.New(l, provision.Options{Link: link}),
			ImagesInterval: 2 * time.Second, HeartbeatInterval: 500 * time.Millisecond}
	}
	rw.w = worker.New(worker.Config{
		Fleet: fleet, NATS: o.NATS,
		Parallelism: parallelism, MaxVMs: o.MaxVMs, AckWait: o.AckWait, MaxDeliver: 5, Slots: slots,
		ShutdownGrace: o.ShutdownGrace, PullWait: time.Second, WatchInterval: 200 * time.Millisecond,
		OnSettle: func(s worker.Settlement) {
			rw.mu.Lock()
			rw.settled = append(rw.settled, s)
			rw.mu.Unlock()
		},
	}, cons, rw.life)
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- rw.w.Run(runCtx) }()
	var once sync.Once
	var runErr error
	rw.stop = func() error {
		once.Do(func() {
			cancel()
			runErr = <-done
			rw.life.Close()
			stopLink()
			<-linkDone
			_ = link.Close()
		})
		return runErr
	}
	tb.Cleanup(func() {
		if err := rw.stop(); err != nil {
			tb.Errorf("worker.Run: %v", err)
		}
	})
	return rw
}

// eventLog follows the event stream for the test's duration.
type eventLog struct {
	mu     sync.Mutex
	events []messages.Event
	bad    int
	notify chan struct{}
}

func followEvents(tb testing.TB, js jetstream.JetStream) *eventLog {
	tb.Helper()
	if _, err := bus.Ensure(context.Background(), js, bus.Topology{Host: testHost}); err != nil {
		tb.Fatal(err)
	}
	el := &eventLog{notify: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		var derr *client.DecodeError
		for ev, err := range client.New(js).Events(ctx, client.Query{Follow: true}) {
			if err != nil && !errors.As(err, &derr) {
				return
			}
			el.mu.Lock()
			if err != nil {
				el.bad++
			} else {
				el.events = append(el.events, ev)
			}
			close(el.notify)
			el.notify = make(chan struct{})
			el.mu.Unlock()
		}
	}()
	tb.Cleanup(func() {
		cancel()
		<-done
		if el.bad > 0 {
			tb.Errorf("%d undecodable events", el.bad)
		}
	})
	return el
}

// eventMsgID returns the Nats-Msg-Id header of jobID's newest event in
// state, as the event stream stored it.
func eventMsgID(tb testing.TB, js jetstream.JetStream, jobID string, state messages.State) string {
	tb.Helper()
	s, err := js.Stream(context.Background(), messages.EventsStream)
	if err != nil {
		tb.Fatal(err)
	}
	raw, err := s.GetLastMsgForSubject(context.Background(), messages.EventFilter("", jobID, state))
	if err != nil {
		tb.Fatalf("%s event of %s: %v", state, jobID, err)
	}
	return raw.Header.Get(jetstream.MsgIDHeader)
}

func (el *eventLog) of(jobID string) []messages.Event {
	el.mu.Lock()
	defer el.mu.Unlock()
	var out []messages.Event
	for _, ev := range el.events {
		if ev.JobID == jobID {
			out = append(out, ev)
		}
	}
	return out
}

func (el *eventLog) states(jobID string) []messages.State {
	var out []messages.State
	for _, ev := range el.of(jobID) {
		out = append(out, ev.State)
	}
	return out
}

// wait blocks until cond holds over the events or the timeout passes.
func (el *eventLog) wait(tb testing.TB, timeout time.Duration, what string, cond func([]messages.Event) bool) {
	tb.Helper()
	if !waitFor(el, timeout, cond) {
		tb.Fatalf("timed out after %s waiting for %s; events:\n%s", timeout, what, el.dump())
	}
}

// waitState waits for an event of jobID in state.
func (el *eventLog) waitState(tb testing.TB, jobID string, state messages.State, timeout time.Duration) messages.Event {
	tb.Helper()
	var got messages.Event
	el.wait(tb, timeout, fmt.Sprintf("%s of job %s", state, jobID), func(evs []messages.Event) bool {
		for _, ev := range evs {
			if ev.JobID == jobID && ev.State == state {
				got = ev
				return true
			}
		}
		return false
	})
	return got
}

func (el *eventLog) dump() string {
	el.mu.Lock()
	defer el.mu.Unlock()
	var b strings.Builder
	for _, ev := range el.events {
		fmt.Fprintf(&b, "  %s seq=%d %s attempt=%d reason=%s", ev.JobID, ev.Seq, ev.State, ev.Attempt, ev.Reason)
		if ev.Error != nil {
			fmt.Fprintf(&b, " error=%s: %s", ev.Error.Code, ev.Error.Message)
		}
		if ev.Console != "" {
			// The end of a failed machine's console says why it died.
			fmt.Fprintf(&b, "\n    console: %s", strings.ReplaceAll(strings.TrimSpace(ev.Console), "\n", "\n    console: "))
		}
		b.WriteByte('\n')
	}
	return b.String()
}

func provisionRequest(jobID string) messages.Provision {
	return messages.Provision{
		V: messages.SchemaVersion, JobID: jobID, Image: testImage(),
		Runner:       messages.Runner{Kind: messages.RunnerNone},
		BootTimeoutS: 60, MaxLifetimeS: 600, RequestedAt: time.Now().UTC(),
	}
}

// publish sends raw bytes as a request, without a message id, so that
// the same payload can be delivered twice.
func publish(tb testing.TB, js jetstream.JetStream, subject string, data []byte) {
	tb.Helper()
	if _, err := js.Publish(context.Background(), subject, data); err != nil {
		tb.Fatal(err)
	}
}

// submitReq publishes req as an orchestrator does, through pkg/client:
// pinned to host unless it is empty, the runner secret as the test wrote
// it (sealed or in the clear). It returns the request stream sequence.
func submitReq(ctx context.Context, js jetstream.JetStream, req messages.Provision, host string) (uint64, error) {
	opts := []client.SubmitOption{client.WithSealing(client.SealNever)}
	if host != "" {
		opts = append(opts, client.OnHost(host))
	}
	job, err := client.New(js).Submit(ctx, req, opts...)
	if err != nil {
		return 0, err
	}
	return job.Receipt.Sequence, nil
}

// submitReqByImage publishes req on its image's subject, as submitReq.
func submitReqByImage(ctx context.Context, js jetstream.JetStream, req messages.Provision) error {
	_, err := client.New(js).Submit(ctx, req, client.OnImage(), client.WithSealing(client.SealNever))
	return err
}

// teardownReq publishes a teardown of jobID to host, as an orchestrator
// does through pkg/client.
func teardownReq(ctx context.Context, js jetstream.JetStream, jobID, host string) error {
	_, err := client.New(js).Job(jobID, client.AtHost(host)).Teardown(ctx, "test")
	return err
}

func submitProvision(tb testing.TB, js jetstream.JetStream, jobID string) {
	tb.Helper()
	if _, err := submitReq(context.Background(), js, provisionRequest(jobID), ""); err != nil {
		tb.Fatal(err)
	}
}

func submitTeardown(tb testing.TB, js jetstream.JetStream, jobID string) {
	tb.Helper()
	if err := teardownReq(context.Background(), js, jobID, testHost); err != nil {
		tb.Fatal(err)
	}
}

// managedLeftovers lists the stretchy- domains and volumes of this test
// process's jobs on the host.
func managedLeftovers(tb testing.TB, l *libvirt.Libvirt) []string {
	tb.Helper()
	left, err := leftovers(l)
	if err != nil {
		tb.Fatal(err)
	}
	return left
}

// staleRun matches the domains of this suite's runs; group 1 is the job
// id, group 2 the run's marker.
var staleRun = regexp.MustCompile(`^stretchy-((it[0-9a-f]{6})-.*)$`)

// runsDir holds a file per suite run in progress on this host, named by
// its runID and holding its process id and start time, so that a run
// removes the machines of earlier runs that died, but not those of a run
// going on at the same time.
const runsDir = "/run/stretchy-integration-runs"

// processStart returns the start time of process pid in clock ticks since
// boot (/proc/<pid>/stat field 22), which tells a live process from a
// later one that got its pid.
func processStart(pid int) (string, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", false
	}
	s := string(b)
	i := strings.LastIndex(s, ") ")
	if i < 0 {
		return "", false
	}
	fields := strings.Fields(s[i+2:])
	if len(fields) < 20 {
		return "", false
	}
	return fields[19], true
}

// markRun records this run as going on; the returned function ends that.
func markRun() (func(), error) {
	if err := os.MkdirAll(runsDir, 0o755); err != nil {
		return nil, err
	}
	start, _ := processStart(os.Getpid())
	path := filepath.Join(runsDir, runID)
	if err := os.WriteFile(path, []byte(fmt.Sprintf("%d %s\n", os.Getpid(), start)), 0o644); err != nil {
		return nil, err
	}
	return func() { _ = os.Remove(path) }, nil
}

// runAlive reports whether the suite run with marker run is going on.
func runAlive(run string) bool {
	b, err := os.ReadFile(filepath.Join(runsDir, run))
	if err != nil {
		return false
	}
	var pid int
	var start string
	if _, err := fmt.Sscanf(string(b), "%d %s", &pid, &start); err != nil {
		return false
	}
	now, ok := processStart(pid)
	return ok && now == start
}

// removeStaleRuns removes the machines of this suite's earlier runs that
// did not end cleanly, and only theirs: a run still going on (another
// package's test binary, or a second suite on the same host) keeps its.
func removeStaleRuns() error {
	if _, err := os.Stat(libvirtSocket); err != nil {
		return nil
	}
	l, err := provision.Dial(context.Background(), "qemu:///system")
	if err != nil {
		return err
	}
	defer l.Disconnect()
	doms, _, err := l.ConnectListAllDomains(1, 0)
	if err != nil {
		return err
	}
	p := provision.New(l, provision.Options{})
	for _, d := range doms {
		if m := staleRun.FindStringSubmatch(d.Name); m != nil && m[2] != runID && !runAlive(m[2]) {
			if _, err := p.Remove(context.Background(), m[1]); err != nil {
				return err
			}
			fmt.Fprintf(os.Stderr, "removed %s, left by an earlier run\n", d.Name)
		}
	}
	// Warm machines carry no job id; their host id ends in the run's.
	machines, err := p.List(context.Background())
	if err != nil {
		return err
	}
	for _, m := range machines {
		run := warmRun.FindStringSubmatch(m.Host)
		if !m.Warm || run == nil || "it"+run[1] == runID || runAlive("it"+run[1]) {
			continue
		}
		if _, err := p.Remove(context.Background(), m.Key); err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "removed %s, left by an earlier run\n", m.Name)
	}
	return nil
}

// warmRun matches the host ids of warm-pool tests (warmHost); group 1 is
// the run's marker without its "it".
var warmRun = regexp.MustCompile(`-([0-9a-f]{6})$`)

func leftovers(l *libvirt.Libvirt) ([]string, error) {
	return resources(l, messages.DomainName(runID))
}

// resources lists the domains ("domain <name>") and storage volumes
// ("volume <path>") on the host whose names start with prefix; an empty
// prefix lists them all.
func resources(l *libvirt.Libvirt, prefix string) ([]string, error) {
	var out []string
	doms, _, err := l.ConnectListAllDomains(1, 0)
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	for _, d := range doms {
		if strings.HasPrefix(d.Name, prefix) {
			out = append(out, "domain "+d.Name)
		}
	}
	pools, _, err := l.ConnectListAllStoragePools(1, 0)
	if err != nil {
		return nil, fmt.Errorf("list pools: %w", err)
	}
	for _, p := range pools {
		_ = l.StoragePoolRefresh(p, 0)
		vols, _, err := l.StoragePoolListAllVolumes(p, 1, 0)
		if err != nil {
			continue // an inactive pool
		}
		for _, v := range vols {
			if strings.HasPrefix(v.Name, prefix) {
				out = append(out, "volume "+v.Key)
			}
		}
	}
	return out, nil
}

// requestsLeft returns how many requests are still in the work queue.
func requestsLeft(tb testing.TB, js jetstream.JetStream) uint64 {
	tb.Helper()
	s, err := js.Stream(context.Background(), messages.RequestsStream)
	if err != nil {
		tb.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	return info.State.Msgs
}

// TestMain fails the suite when anything of its jobs is left on the host
// after all tests ran.
func TestMain(m *testing.M) {
	// The workers under test take over every managed domain on the host;
	// machines an interrupted earlier run of this suite left would skew
	// their capacity, so they go first.
	unmark, err := markRun()
	if err != nil {
		fmt.Fprintf(os.Stderr, "mark this run: %v\n", err)
		os.Exit(1)
	}
	if err := removeStaleRuns(); err != nil {
		fmt.Fprintf(os.Stderr, "remove machines of earlier runs: %v\n", err)
		os.Exit(1)
	}
	code := m.Run()
	unmark()
	if _, err := os.Stat(libvirtSocket); code == 0 && err == nil {
		l, err := provision.Dial(context.Background(), "qemu:///system")
		if err != nil {
			fmt.Fprintf(os.Stderr, "FAIL: check for leftovers: %v\n", err)
			os.Exit(1)
		}
		left, err := leftovers(l)
		_ = l.Disconnect()
		if err != nil || len(left) > 0 {
			fmt.Fprintf(os.Stderr, "FAIL: managed resources left after the suite: %v %v\n", left, err)
			code = 1
		}
	}
	os.Exit(code)
}
