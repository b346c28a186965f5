package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/daemon"
	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// The worker processes of these tests run with startProcess's settings.
const processAckWait = 5 * time.Second

// dialJetStream connects like the worker does: reconnecting for ever, so
// that the test's own view survives a server restart.
func dialJetStream(t *testing.T, url string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url, nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// ensureTopology creates the streams and the host's consumers with the
// settings the worker processes use, so requests can be submitted first.
func ensureTopology(t *testing.T, js jetstream.JetStream, host string) {
	t.Helper()
	if _, err := bus.Ensure(context.Background(), js, bus.Topology{Host: host, AckWait: processAckWait, MaxDeliver: 5}); err != nil {
		t.Fatal(err)
	}
}

// hostEvents reads every stored event of host, by job. It reads afresh
// each time rather than following, so a server restart cannot cut it off.
func hostEvents(t *testing.T, js jetstream.JetStream, host string) map[string][]messages.Event {
	t.Helper()
	out := map[string][]messages.Event{}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	for ev, rerr := range client.New(js).Events(ctx, client.Query{Host: host}) {
		if rerr != nil {
			err = rerr
			break
		}
		out[ev.JobID] = append(out[ev.JobID], ev)
	}
	if err != nil {
		t.Logf("read events (will retry): %v", err)
		return nil
	}
	return out
}

// pollEvents waits until cond holds over host's events.
func pollEvents(t *testing.T, js jetstream.JetStream, host string, timeout time.Duration, what string,
	cond func(map[string][]messages.Event) bool) map[string][]messages.Event {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(300 * time.Millisecond)
	defer tick.Stop()
	for {
		evs := hostEvents(t, js, host)
		if evs != nil && cond(evs) {
			return evs
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s; events:\n%s", timeout, what, dumpJobs(evs))
		}
		<-tick.C
	}
}

func dumpJobs(evs map[string][]messages.Event) string {
	var b strings.Builder
	for job, list := range evs {
		var st []string
		for _, ev := range list {
			s := fmt.Sprintf("%s/%d", ev.State, ev.Attempt)
			if ev.Error != nil {
				s += "(" + string(ev.Error.Code) + ")"
			}
			st = append(st, s)
		}
		fmt.Fprintf(&b, "  %s: %s\n", job, strings.Join(st, " "))
	}
	return b.String()
}

func anyInState(state messages.State) func(map[string][]messages.Event) bool {
	return func(evs map[string][]messages.Event) bool {
		for _, list := range evs {
			for _, ev := range list {
				if ev.State == state {
					return true
				}
			}
		}
		return false
	}
}

func allEndedIn(jobs []string) func(map[string][]messages.Event) bool {
	return func(evs map[string][]messages.Event) bool {
		for _, job := range jobs {
			if len(unended(evs[job], []string{job})) != 0 {
				return false
			}
		}
		return true
	}
}

// checkEndedOnce asserts that every job ran its runner once and ended
// once, in a plain torn_down, and that nothing of them is left on the host;
// it returns a one-line account for the test log.
func checkEndedOnce(t *testing.T, js jetstream.JetStream, host string, jobs []string) string {
	t.Helper()
	evs := pollEvents(t, js, host, 10*time.Second, "the events", func(map[string][]messages.Event) bool { return true })
	var maxAttempt, terminal int
	for _, job := range jobs {
		jt := tally(evs[job], messages.RunnerForgejo)
		terminal += len(jt.terminal)
		maxAttempt = max(maxAttempt, jt.maxAtt)
		if jt.duplicated() || jt.ready != 1 {
			t.Errorf("job %s: runner started %d times, clones per attempt %v", job, jt.ready, jt.cloned)
		}
		if len(jt.terminal) != 1 {
			t.Errorf("job %s has %d terminal events", job, len(jt.terminal))
			continue
		}
		if ev := jt.terminal[0]; ev.State != messages.StateTornDown || ev.Error != nil {
			t.Errorf("job %s ended in %s (reason %q, error %+v), want a plain torn_down", job, ev.State, ev.Reason, ev.Error)
		}
	}
	if t.Failed() {
		t.Logf("events:\n%s", dumpJobs(evs))
	}
	l := dialLibvirt(t)
	for _, left := range managedLeftovers(t, l) {
		for _, job := range jobs {
			if strings.Contains(left, job) {
				t.Errorf("left behind: %s", left)
			}
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	for requestsLeft(t, js) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d requests still in the work queue", requestsLeft(t, js))
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Sprintf("%d jobs, %d terminal events, highest attempt %d", len(jobs), terminal, maxAttempt)
}

func submitStubJobs(t *testing.T, js jetstream.JetStream, n, sleep int) []string {
	t.Helper()
	var jobs []string
	for range n {
		job := uniqueJob(t, "rs")
		submitTo(t, js, stubRunnerRequest(job, sleep))
		jobs = append(jobs, job)
	}
	return jobs
}

// settled is a worker process's JSON log line about a settled request.
type settled struct {
	Time    time.Time `json:"time"`
	Op      string    `json:"op"`
	JobID   string    `json:"job_id"`
	Attempt int       `json:"attempt"`
	Outcome string    `json:"outcome"`
}

// settlements returns the provisions a worker process settled, from its
// log, and how many of them were deliveries after the first.
func settlements(log string) (out []settled, again int) {
	for _, line := range strings.Split(log, "\n") {
		var s settled
		if json.Unmarshal([]byte(line), &s) != nil || s.Op != "provision" || s.Outcome == "" {
			continue
		}
		out = append(out, s)
		if s.Attempt > 1 {
			again++
		}
	}
	return out, again
}

// stopForLog stops a worker process and returns its log.
func stopForLog(t *testing.T, p *process) string {
	t.Helper()
	p.stop(t)
	return p.log.String()
}

// TestRestartNATSServer restarts the NATS server (file storage, same port
// and directory) while jobs are being built: the worker reconnects, and
// every job runs once and ends once.
func TestRestartNATSServer(t *testing.T) {
	requireLibvirt(t)
	const host = "rs-nats-restart"
	dir, port := t.TempDir(), freePort(t)
	start := func() *server.Server {
		srv, err := embedded.Start(embedded.Options{StoreDir: dir, Port: port})
		if err != nil {
			t.Fatal(err)
		}
		return srv
	}
	srv := start()
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	url := srv.ClientURL()
	js := dialJetStream(t, url)
	ensureTopology(t, js, host)
	p := startProcess(t, url, "--host", host)
	jobs := submitStubJobs(t, js, 3, 3)

	pollEvents(t, js, host, bootWait, "a machine booting", anyInState(messages.StateBooting))
	began := time.Now()
	srv.Shutdown()
	srv.WaitForShutdown()
	time.Sleep(3 * time.Second)
	srv = start()
	t.Logf("NATS was down for %s", time.Since(began).Round(time.Millisecond))

	pollEvents(t, js, host, 2*bootWait, "every job ended", allEndedIn(jobs))
	summary := checkEndedOnce(t, js, host, jobs)
	_, again := settlements(stopForLog(t, p))
	t.Logf("%s; provision deliveries settled after the first: %d", summary, again)
}

// TestRestartNATSPause stalls the worker's NATS connection (a proxy stops
// forwarding, the TCP connection stays up) for longer than AckWait while a
// provision is in flight, so the server delivers that request again. The
// redelivery must not build a second machine.
func TestRestartNATSPause(t *testing.T) {
	requireLibvirt(t)
	const host = "rs-nats-pause"
	url, js := startNATS(t)
	ensureTopology(t, js, host)
	proxy := startPausingProxy(t, strings.TrimPrefix(url, "nats://"))
	p := startProcess(t, "nats://"+proxy.addr(), "--host", host)
	jobs := submitStubJobs(t, js, 2, 3)

	pollEvents(t, js, host, bootWait, "a machine running", anyInState(messages.StateRunning))
	pause := processAckWait + 3*time.Second
	proxy.pause()
	time.Sleep(pause)
	proxy.resume()
	t.Logf("paused the worker's NATS traffic for %s (ack wait %s)", pause, processAckWait)

	pollEvents(t, js, host, 2*bootWait, "every job ended", allEndedIn(jobs))
	summary := checkEndedOnce(t, js, host, jobs)
	settles, again := settlements(stopForLog(t, p))
	t.Logf("%s; provision deliveries settled after the first: %d", summary, again)
	if again == 0 {
		t.Logf("no provision was delivered again: the pause fell where no request was unacknowledged")
	}
	// A repeated delivery is acknowledged only once the job's runner runs:
	// acking it earlier would lose the request if the build then failed.
	evs := hostEvents(t, js, host)
	for _, s := range settles {
		t.Logf("  provision %s delivery %d: %s at %s", s.JobID, s.Attempt, s.Outcome, s.Time.Format("15:04:05.000"))
		if s.Attempt < 2 || s.Outcome != "ack" {
			continue
		}
		for _, ev := range evs[s.JobID] {
			if ev.State == messages.StateRunnerStarted && s.Time.Before(ev.Time) {
				t.Errorf("job %s: delivery %d was acked at %s, before its runner started at %s",
					s.JobID, s.Attempt, s.Time.Format("15:04:05.000"), ev.Time.Format("15:04:05.000"))
			}
		}
	}
}

// TestRestartLibvirtConnection cuts the worker's libvirt connection (a
// proxy in front of libvirtd's socket drops every connection and refuses
// new ones for a while) as jobs boot, like a libvirtd restart looks to the
// worker, without disturbing the shared libvirtd: the worker reconnects
// and every job runs once and ends once.
func TestRestartLibvirtConnection(t *testing.T) {
	requireLibvirt(t)
	const host = "rs-libvirt-link"
	_, js := startNATS(t)
	proxy := startSocketProxy(t, libvirtSocket)
	startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 6, AckWait: processAckWait, Host: host, Socket: proxy.path})
	jobs := submitStubJobs(t, js, 3, 3)

	pollEvents(t, js, host, bootWait, "a machine booting", anyInState(messages.StateBooting))
	proxy.cut(t, 5*time.Second)

	pollEvents(t, js, host, 2*bootWait, "every job ended", allEndedIn(jobs))
	t.Log(checkEndedOnce(t, js, host, jobs))
}

// TestRestartLibvirtd kills the real libvirtd (SIGTERM, as pkill does) while
// jobs boot and starts it again. Other tests on the machine share that
// libvirtd, so it runs only with STRETCHY_DISRUPTIVE_TESTS=1.
func TestRestartLibvirtd(t *testing.T) {
	if os.Getenv("STRETCHY_DISRUPTIVE_TESTS") != "1" {
		t.Skip("restarts the shared libvirtd; set STRETCHY_DISRUPTIVE_TESTS=1 to run it")
	}
	requireLibvirt(t)
	const host = "rs-libvirtd"
	t.Cleanup(func() {
		if err := ensureLibvirtd(); err != nil {
			t.Errorf("libvirtd is not running after the test: %v", err)
		}
	})
	url, js := startNATS(t)
	ensureTopology(t, js, host)
	p := startProcess(t, url, "--host", host)
	jobs := submitStubJobs(t, js, 3, 5)

	pollEvents(t, js, host, bootWait, "a machine booting", anyInState(messages.StateBooting))
	pid, err := libvirtdPID()
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatalf("stop libvirtd %d: %v", pid, err)
	}
	waitUntil(t, 30*time.Second, "libvirtd to exit", func() bool { return syscall.Kill(pid, 0) != nil })
	time.Sleep(2 * time.Second)
	if err := ensureLibvirtd(); err != nil {
		t.Fatal(err)
	}

	pollEvents(t, js, host, 2*bootWait, "every job ended", allEndedIn(jobs))
	summary := checkEndedOnce(t, js, host, jobs)
	_, again := settlements(stopForLog(t, p))
	t.Logf("%s; provision deliveries settled after the first: %d", summary, again)
}

const libvirtdPIDFile = "/run/libvirtd.pid"

func libvirtdPID() (int, error) {
	b, err := os.ReadFile(libvirtdPIDFile)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// ensureLibvirtd starts libvirtd unless it runs, and waits for its socket.
// libvirtd outlives the test: it gets a session of its own and none of the
// test process's descriptors (internal/daemon).
func ensureLibvirtd() error {
	if pid, err := libvirtdPID(); err != nil || syscall.Kill(pid, 0) != nil {
		cmd := exec.Command("libvirtd", "-d")
		if err := daemon.Detach(cmd); err != nil {
			return err
		}
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("libvirtd -d: %v: %s", err, out)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		l, err := provision.Dial(ctx, "qemu:///system")
		cancel()
		if err == nil {
			return l.Disconnect()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("libvirtd does not answer: %w", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// pausingProxy forwards TCP connections to a server and can stop
// forwarding in both directions without closing anything, like a network
// that drops packets for a while.
type pausingProxy struct {
	ln     net.Listener
	target string

	mu    sync.Mutex
	open  chan struct{} // closed while forwarding
	conns []net.Conn
	wg    sync.WaitGroup
}

func startPausingProxy(t *testing.T, target string) *pausingProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &pausingProxy{ln: ln, target: target, open: make(chan struct{})}
	close(p.open)
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		_ = ln.Close()
		p.resume()
		p.mu.Lock()
		for _, c := range p.conns {
			_ = c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

func (p *pausingProxy) addr() string { return p.ln.Addr().String() }

func (p *pausingProxy) accept() {
	defer p.wg.Done()
	relay(p.ln, "tcp", p.target, &p.mu, &p.conns, &p.wg, p.forward)
}

// relay accepts connections on ln until it is closed, dials target for
// each, records both ends in conns and runs forward in both directions,
// each counted in wg.
func relay(ln net.Listener, network, target string, mu *sync.Mutex, conns *[]net.Conn, wg *sync.WaitGroup, forward func(dst, src net.Conn)) {
	for {
		in, err := ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial(network, target)
		if err != nil {
			_ = in.Close()
			continue
		}
		mu.Lock()
		*conns = append(*conns, in, out)
		mu.Unlock()
		wg.Add(2)
		go forward(out, in)
		go forward(in, out)
	}
}

func (p *pausingProxy) gate() chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.open
}

func (p *pausingProxy) forward(dst, src net.Conn) {
	defer p.wg.Done()
	defer dst.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			<-p.gate()
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *pausingProxy) pause() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.open:
		p.open = make(chan struct{})
	default:
	}
}

func (p *pausingProxy) resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	select {
	case <-p.open:
	default:
		close(p.open)
	}
}

// socketProxy forwards a unix socket and can go away for a while, closing
// every connection and refusing new ones, as a restarting daemon does.
type socketProxy struct {
	path, target string

	mu    sync.Mutex
	ln    net.Listener
	conns []net.Conn
	wg    sync.WaitGroup
}

func startSocketProxy(t *testing.T, target string) *socketProxy {
	t.Helper()
	p := &socketProxy{path: filepath.Join(t.TempDir(), "libvirt-sock"), target: target}
	if err := p.listen(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.down()
		p.wg.Wait()
	})
	return p
}

func (p *socketProxy) listen() error {
	ln, err := net.Listen("unix", p.path)
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.ln = ln
	p.mu.Unlock()
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		relay(ln, "unix", p.target, &p.mu, &p.conns, &p.wg, p.copy)
	}()
	return nil
}

func (p *socketProxy) copy(dst, src net.Conn) {
	defer p.wg.Done()
	defer dst.Close()
	_, _ = io.Copy(dst, src)
}

// down closes the listener (removing the socket file) and every
// connection.
func (p *socketProxy) down() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		_ = p.ln.Close()
		p.ln = nil
	}
	for _, c := range p.conns {
		_ = c.Close()
	}
	p.conns = nil
}

// cut takes the proxy down for d and brings it back.
func (p *socketProxy) cut(t *testing.T, d time.Duration) {
	t.Helper()
	p.down()
	time.Sleep(d)
	if err := p.listen(); err != nil {
		t.Fatal(err)
	}
}
