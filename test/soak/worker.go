package soak

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/stretchy-ci/libvirt-worker/test/soak/check"
)

// WorkerOptions configure one host's worker process.
type WorkerOptions struct {
	// Bin is the worker binary; a soak build (tag soak) when Fake.
	Bin         string
	Dir         string
	Host        string
	NATSURLs    string
	LibvirtURI  string
	Images      string
	Parallelism int
	MaxVMs      int
	AckWait     time.Duration
	MaxDeliver  int
	Replicas    int
	// Fake turns on the soak build's fake guest agent.
	Fake bool
	// DomainType is --domain-type (qemu for real guests under TCG).
	DomainType string
}

// Worker is one host's worker process.
type Worker struct {
	Host     string
	HTTPPort int
	opts     WorkerOptions
	proc     *proc
}

// NewWorker prepares a worker process; Start starts it.
func NewWorker(o WorkerOptions) (*Worker, error) {
	ports, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	w := &Worker{Host: o.Host, HTTPPort: ports[0], opts: o}
	w.proc = &proc{name: "worker " + o.Host, log: w.LogPath(), command: func() *exec.Cmd {
		args := []string{"run", "--host", o.Host, "--nats-url", o.NATSURLs, "--replicas", strconv.Itoa(o.Replicas),
			"--libvirt-uri", o.LibvirtURI, "--images", o.Images,
			"--parallelism", strconv.Itoa(o.Parallelism), "--max-vms", strconv.Itoa(o.MaxVMs),
			"--ack-wait", o.AckWait.String(), "--max-deliver", strconv.Itoa(o.MaxDeliver),
			"--console-dir", "", "--http-addr", fmt.Sprintf("127.0.0.1:%d", w.HTTPPort),
			"--shutdown-grace", "5s", "--log-format", "json", "--log-level", "info"}
		if o.DomainType != "" {
			args = append(args, "--domain-type", o.DomainType)
		}
		cmd := exec.Command(o.Bin, args...)
		var env []string
		for _, kv := range os.Environ() {
			if !strings.HasPrefix(kv, "STRETCHY_") {
				env = append(env, kv)
			}
		}
		if o.Fake {
			env = append(env, "STRETCHY_SOAK_AGENT=fake")
		}
		cmd.Env = env
		return cmd
	}}
	return w, nil
}

// LogPath is the file every start of the worker logs to.
func (w *Worker) LogPath() string { return filepath.Join(w.opts.Dir, "worker-"+w.Host+".log") }

// Start starts the worker.
func (w *Worker) Start() error { return w.proc.start() }

// Kill kills the worker with SIGKILL: a crash, a power cut.
func (w *Worker) Kill() error { return w.proc.kill() }

// Freeze stops the worker with SIGSTOP: a stalled host.
func (w *Worker) Freeze() error { return w.proc.signal(syscall.SIGSTOP) }

// Thaw lets a frozen worker go on.
func (w *Worker) Thaw() error { return w.proc.signal(syscall.SIGCONT) }

// Stop stops the worker as systemd would.
func (w *Worker) Stop() error { return w.proc.terminate(30 * time.Second) }

// Running reports whether the worker process runs.
func (w *Worker) Running() bool { return w.proc.running() }

// Gauges reads the worker's operations in flight and machines from its
// /metrics; -1 each when it does not answer.
func (w *Worker) Gauges(ctx context.Context) (ops, machines int) {
	ops, machines = -1, -1
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/metrics", w.HTTPPort), nil)
	if err != nil {
		return
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	sum := 0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		name, value, ok := strings.Cut(line, " ")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			continue
		}
		switch {
		case name == "stretchy_worker_operations_in_flight":
			ops = int(v)
		case strings.HasPrefix(name, "stretchy_worker_machines_running"):
			sum += int(v)
			machines = sum
		}
	}
	if machines < 0 && ops >= 0 {
		machines = 0
	}
	return ops, machines
}

// logLine is what the soak reads of a worker's JSON log line.
type logLine struct {
	Time    time.Time `json:"time"`
	Msg     string    `json:"msg"`
	Op      string    `json:"op"`
	JobID   string    `json:"job_id"`
	Attempt int       `json:"attempt"`
	Outcome string    `json:"outcome"`
	Error   string    `json:"error"`
	Reason  string    `json:"reason"`
}

// Settlements reads how the worker settled requests, from its log (every
// start's).
func (w *Worker) Settlements() ([]check.Settlement, error) {
	f, err := os.Open(w.LogPath())
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []check.Settlement
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		b := sc.Bytes()
		if len(b) == 0 || b[0] != '{' {
			continue
		}
		var l logLine
		if json.Unmarshal(b, &l) != nil || l.Outcome == "" || (l.Op != "provision" && l.Op != "teardown") {
			continue
		}
		msg := l.Error
		if msg == "" {
			msg = l.Reason
		}
		out = append(out, check.Settlement{Time: l.Time, Host: w.Host, Op: l.Op, JobID: l.JobID, Attempt: l.Attempt, Outcome: l.Outcome, Err: msg})
	}
	return out, sc.Err()
}
