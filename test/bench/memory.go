package bench

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// MemoryConfig configures the memory benchmark.
type MemoryConfig struct {
	Self, Worker string
	// Dir holds logs, node files and NATS data.
	Dir string
	// Image is the real image the idle worker serves (tiny-linux).
	Image string
	// Machines is how many managed machines the loaded case has.
	Machines int
	// Settle is how long the worker runs before the samples that count,
	// Window how long those samples are taken.
	Settle, Window time.Duration
	Log            func(format string, args ...any)
}

// MemoryCase is the resident memory of one worker process.
type MemoryCase struct {
	Name, How string
	// RSS sums the samples of VmRSS during the window; HWM is VmHWM (the
	// peak) at its end; both in MiB.
	RSS Summary
	HWM float64
	// Machines is how many machines the worker reported managing.
	Machines int
}

// RunMemory measures the resident memory of the worker binary: idle on
// qemu:///system, with NATS in another process and with its embedded
// server, and on the test driver with no managed machine and with
// cfg.Machines of them, which it adopts at start from the test driver's
// state and their runner_started events, as it adopts a host's machines
// after a restart.
func RunMemory(ctx context.Context, cfg MemoryConfig) ([]MemoryCase, error) {
	n, err := StartNATS(ctx, cfg.Self, filepath.Join(cfg.Dir, "nats-memory"))
	if err != nil {
		return nil, err
	}
	defer n.Stop()
	run := randomHex(3)
	var out []MemoryCase

	idle, err := cfg.measure(ctx, "idle-"+run, 0, "--nats-url", n.URL, "--images", cfg.Image)
	if err != nil {
		return nil, fmt.Errorf("idle: %w", err)
	}
	idle.Name, idle.How = "idle", fmt.Sprintf("qemu:///system with the image %s, NATS in another process", cfg.Image)
	out = append(out, idle)

	port, err := freePort()
	if err != nil {
		return nil, err
	}
	emb, err := cfg.measure(ctx, "embedded-"+run, 0, "--nats-url", "", "--nats-data-dir", filepath.Join(cfg.Dir, "nats-embedded-"+run),
		"--nats-port", strconv.Itoa(port), "--images", cfg.Image)
	if err != nil {
		return nil, fmt.Errorf("idle with embedded NATS: %w", err)
	}
	emb.Name, emb.How = "idle, embedded NATS", "as above, with the worker's own embedded NATS server (the single-host default)"
	out = append(out, emb)

	for _, machines := range []int{0, cfg.Machines} {
		host := fmt.Sprintf("bench-mem%d-%s", machines, run)
		dir := filepath.Join(cfg.Dir, "memory-"+host)
		uri, err := managedNode(ctx, n, dir, host, run, machines)
		if err != nil {
			return nil, fmt.Errorf("%d managed machines: %w", machines, err)
		}
		c, err := cfg.measure(ctx, host, machines, "--nats-url", n.URL, "--libvirt-uri", uri, "--images", testImage)
		if err != nil {
			return nil, fmt.Errorf("%d managed machines: %w", machines, err)
		}
		c.Name = fmt.Sprintf("%d managed machines", machines)
		c.How = "libvirt's test driver through libvirtd, NATS in another process; the machines adopted at start and watched every 2 s"
		out = append(out, c)
		_ = os.RemoveAll(dir)
	}
	return out, nil
}

// measure runs the worker with args and the host id host, waits until it
// serves and manages want machines, lets it settle and samples its RSS.
func (cfg MemoryConfig) measure(ctx context.Context, host string, want int, args ...string) (MemoryCase, error) {
	port, err := freePort()
	if err != nil {
		return MemoryCase{}, err
	}
	metrics := fmt.Sprintf("127.0.0.1:%d", port)
	logPath := filepath.Join(cfg.Dir, "worker-memory-"+host+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		return MemoryCase{}, err
	}
	defer logf.Close()
	args = append([]string{"run", "--host", host, "--log-format", "json", "--http-addr", metrics}, args...)
	cmd := exec.Command(cfg.Worker, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return MemoryCase{}, err
	}
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}()
	if err := waitForLog(ctx, cmd, logPath, `"msg":"worker started"`, time.Minute); err != nil {
		return MemoryCase{}, err
	}
	deadline := time.Now().Add(time.Minute)
	machines := 0
	for {
		if machines, err = managedMachines(metrics); err == nil && machines == want {
			break
		}
		if time.Now().After(deadline) {
			return MemoryCase{}, fmt.Errorf("the worker manages %d machines, want %d (%v)", machines, want, err)
		}
		if err := sleep(ctx, 200*time.Millisecond); err != nil {
			return MemoryCase{}, err
		}
	}
	if err := sleep(ctx, cfg.Settle); err != nil {
		return MemoryCase{}, err
	}
	var rss []float64
	end := time.Now().Add(cfg.Window)
	for time.Now().Before(end) {
		st, err := procStatus(cmd.Process.Pid)
		if err != nil {
			return MemoryCase{}, err
		}
		rss = append(rss, st["VmRSS"])
		if err := sleep(ctx, 250*time.Millisecond); err != nil {
			return MemoryCase{}, err
		}
	}
	st, err := procStatus(cmd.Process.Pid)
	if err != nil {
		return MemoryCase{}, err
	}
	if machines, err = managedMachines(metrics); err != nil {
		return MemoryCase{}, err
	}
	c := MemoryCase{RSS: Summarize(rss), HWM: st["VmHWM"], Machines: machines}
	cfg.Log("memory, %s: RSS %s MiB, peak %.1f MiB, %d machines", host, c.RSS.Cell(1), c.HWM, machines)
	return c, nil
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// procStatus returns the memory figures of /proc/<pid>/status, in MiB.
func procStatus(pid int) (map[string]float64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || !strings.HasSuffix(v, " kB") {
			continue
		}
		kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(v, " kB")), 64)
		if err == nil {
			out[k] = kb / 1024
		}
	}
	return out, sc.Err()
}

// managedMachines sums the worker's stretchy_worker_machines_running.
func managedMachines(addr string) (int, error) {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, "stretchy_worker_machines_running{") {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metrics: %q", line)
		}
		n += int(v)
	}
	return n, nil
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// managedNode makes a test driver node in dir holding the image and
// machines running managed machines of host, cloned by the provisioner so
// that their definitions and metadata are what the worker makes, and
// publishes for each the runner_started event that makes a starting
// worker adopt it as a machine whose runner runs. It returns the node's
// URI.
func managedNode(ctx context.Context, n *NATS, dir, host, run string, machines int) (string, error) {
	uri, err := testNode(dir, nil)
	if err != nil || machines == 0 {
		return uri, err
	}
	l, err := provision.Dial(ctx, uri)
	if err != nil {
		return "", err
	}
	defer func() { _ = l.Disconnect() }()
	p := provision.New(l, provision.Options{})
	if _, err := bus.Ensure(ctx, n.JS, bus.Topology{Host: host}); err != nil {
		return "", err
	}
	pub := bus.NewPublisher(n.JS)
	now := time.Now().UTC()
	var domains []string
	for i := range machines {
		job := fmt.Sprintf("mem-%s-%d", run, i)
		m, err := p.Clone(ctx, provision.Spec{JobID: job, Image: testImage, Host: host, RunnerKind: string(messages.RunnerForgejo),
			RequestedAt: now, Deadline: now.Add(6 * time.Hour)})
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
		ev := messages.Event{
			V: messages.SchemaVersion, JobID: job, Host: host, Image: testImage, Domain: m.Name,
			State: messages.StateRunnerStarted, Time: now, Seq: 7, Attempt: 1, OS: "linux", RunnerPID: 1000 + i,
		}
		if _, _, err := pub.Append(ctx, ev, fmt.Sprintf("%s:%s:1", job, ev.State), 0); err != nil {
			return "", err
		}
	}
	// Domains in a test driver node run unless they say otherwise.
	return testNode(dir, domains)
}
