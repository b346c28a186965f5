package integration

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

var buildOnce = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "stretchy-worker-bin")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "worker")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/stretchy-ci/libvirt-worker/cmd/worker").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go build: %v\n%s", err, out)
	}
	return bin, nil
})

// workerBinary builds cmd/worker once per test process.
func workerBinary(t *testing.T) string {
	t.Helper()
	bin, err := buildOnce()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// process is a worker running as a separate process, as on a host.
type process struct {
	cmd *exec.Cmd
	log *bytes.Buffer
}

// syncBuffer lets the child write while the test reads.
type syncBuffer struct {
	mu sync.Mutex
	bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.Buffer.Write(p)
}

func startProcess(t *testing.T, natsURL string, extra ...string) *process {
	t.Helper()
	args := append([]string{"run", "--nats-url", natsURL, "--host", testHost, "--domain-type", "qemu",
		"--ack-wait", "5s", "--parallelism", "3", "--max-vms", "6", "--log-format", "json", "--log-level", "debug"}, extra...)
	cmd := exec.Command(workerBinary(t), args...)
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &process{cmd: cmd, log: &out.Buffer}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			_ = cmd.Wait()
		}
		if t.Failed() {
			out.mu.Lock()
			t.Logf("worker log:\n%s", out.String())
			out.mu.Unlock()
		}
	})
	return p
}

func (p *process) kill(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = p.cmd.Wait()
}

func (p *process) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("worker exited with %v after SIGTERM", err)
	}
}

// TestReconcileAfterSIGKILL kills a worker process hard while one job's
// machine runs and another's is half-built, starts a new one, and checks
// that exactly the right machines survive: the running one is adopted, the
// half-built one is removed and built again from the redelivered request,
// and the image is not touched.
func TestReconcileAfterSIGKILL(t *testing.T) {
	l := dialLibvirt(t)
	url, js := startNATS(t)
	imageBefore := domainXML(t, l, testImage())
	first := startProcess(t, url)
	events := followEvents(t, js)

	running, half := uniqueJob(t, "kill-run"), uniqueJob(t, "kill-half")
	submitProvision(t, js, running)
	events.waitState(t, running, messages.StateAgentReady, bootWait)
	submitProvision(t, js, half)
	// Kill while the second machine boots: after it started, before its
	// guest agent answered, so its request is not acknowledged.
	events.waitState(t, half, messages.StateRunning, bootWait)
	first.kill(t)

	for _, job := range []string{running, half} {
		if _, err := l.DomainLookupByName(messages.DomainName(job)); err != nil {
			t.Fatalf("machine of %s should exist after the kill: %v", job, err)
		}
	}
	before := len(events.of(running))

	second := startProcess(t, url)
	// The half-built machine is removed and built anew once the killed
	// worker's delivery times out (ack wait 5s).
	events.wait(t, bootWait, "the half-built job ready again", func(evs []messages.Event) bool {
		for _, ev := range evs {
			if ev.JobID == half && ev.State == messages.StateAgentReady && ev.Attempt == 2 {
				return true
			}
		}
		return false
	})
	if got := len(events.of(running)); got != before {
		t.Fatalf("the adopted job got %d new events: %v", got-before, events.states(running))
	}
	submitTeardown(t, js, running)
	submitTeardown(t, js, half)
	for _, job := range []string{running, half} {
		events.waitState(t, job, messages.StateTornDown, bootWait)
		terminal := 0
		for _, st := range events.states(job) {
			if st.Terminal() {
				terminal++
			}
		}
		if terminal != 1 {
			t.Errorf("job %s has %d terminal events: %v", job, terminal, events.states(job))
		}
	}
	ready := 0
	for _, st := range events.states(half) {
		if st == messages.StateAgentReady {
			ready++
		}
	}
	if ready != 1 {
		t.Errorf("the half-built job became ready %d times: %v", ready, events.states(half))
	}
	second.stop(t)
	waitQueueEmpty(t, js)
	if left := managedLeftovers(t, l); len(left) != 0 {
		t.Fatalf("left behind: %v", left)
	}
	imageAfter := domainXML(t, l, testImage())
	if imageBefore.UUID != imageAfter.UUID || !slices.Equal(macs(imageBefore), macs(imageAfter)) {
		t.Fatal("the image domain changed")
	}
}

func macs(d *libvirtxml.Domain) []string {
	var out []string
	for _, i := range d.Devices.Interfaces {
		if i.MAC != nil {
			out = append(out, i.MAC.Address)
		}
	}
	return out
}
