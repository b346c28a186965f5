package integration

import (
	"context"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// Tests of issue 13: machines sized per job within the host's bounds,
// consoles captured, failed machines held.

// panicImage is the variant of the test image whose init fails at once
// (test/guest/README.md).
func panicImage() string { return testImage() + "-panic" }

func noneRequest(jobID, image string) messages.Provision {
	return messages.Provision{
		V: 1, JobID: jobID, Image: image, Runner: messages.Runner{Kind: messages.RunnerNone},
		BootTimeoutS: 240, MaxLifetimeS: 1800, RequestedAt: time.Now().UTC(),
	}
}

func guestOutput(t *testing.T, l *libvirt.Libvirt, domain, script string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	st, err := qga.New(l, qga.Options{}).Run(ctx, domain, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", script}, Capture: true})
	if err != nil {
		t.Fatalf("%s in %s: %v", script, domain, err)
	}
	return string(st.Stdout)
}

func teardownAndWait(t *testing.T, js jetstream.JetStream, events *eventLog, jobID string) {
	t.Helper()
	if err := teardownReq(context.Background(), js, jobID, testHost); err != nil {
		t.Fatal(err)
	}
	events.waitState(t, jobID, messages.StateTornDown, 2*time.Minute)
}

// TestSizedMachine: a clone of the tiny guest (1 vCPU, 128 MiB) asked
// for with 2 vCPUs and 256 MiB runs with those, as the guest sees them.
func TestSizedMachine(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	startWorker(t, js, workerOptions{Resources: lifecycle.Resources{MaxVCPUs: 2, MaxMemoryMiB: 512}})
	job := uniqueJob(t, "sized")
	req := noneRequest(job, testImage())
	req.VCPUs, req.MemoryMiB = 2, 256
	submitOn(t, js, testHost, req)
	events.waitState(t, job, messages.StateAgentReady, 2*bootWait)

	domain := messages.DomainName(job)
	if n := strings.TrimSpace(guestOutput(t, l, domain, "grep -c ^processor /proc/cpuinfo")); n != "2" {
		t.Errorf("the guest has %s processors, want 2", n)
	}
	mem := guestOutput(t, l, domain, "grep ^MemTotal: /proc/meminfo")
	m := regexp.MustCompile(`MemTotal:\s+(\d+) kB`).FindStringSubmatch(mem)
	if m == nil {
		t.Fatalf("meminfo: %q", mem)
	}
	kib, _ := strconv.Atoi(m[1])
	// The kernel keeps some for itself: MemTotal is the memory less what
	// it reserved at boot, more than the image's 128 MiB and at most 256.
	if kib > 256<<10 || kib <= 128<<10 {
		t.Errorf("MemTotal %d KiB, want above 128 MiB and at most 256 MiB", kib)
	}
	mach, _, err := provision.New(l, provision.Options{}).Lookup(context.Background(), job)
	if err != nil || mach.VCPUs != 2 || mach.MemoryMiB != 256 {
		t.Errorf("machine %+v, %v", mach, err)
	}
	teardownAndWait(t, js, events, job)
}

// TestSizeBeyondBounds: requests beyond the host's bound on one machine
// (vCPUs, memory, scratch disk) fail with resources_exceeded and nothing
// is built, pinned at once, and shared at once too when no other host
// could serve them.
func TestSizeBeyondBounds(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	defs := watchDefinitions(t)
	startWorker(t, js, workerOptions{Images: []string{testImage()},
		Resources: lifecycle.Resources{MaxVCPUs: 2, MaxMemoryMiB: 512, HostVCPUs: 4, HostMemoryMiB: 1024, MaxScratchGiB: 1}})
	waitHosts(t, js, "the worker's record", func(h map[string]messages.Host) bool { return carries(h[testHost], testImage()) })
	cases := []struct {
		prefix   string
		vcpus    int
		mib      int
		scratch  int
		shared   bool
		inReason string
	}{
		{"cpus", 3, 0, 0, false, "--max-vcpus-per-machine 2"},
		{"mem", 0, 600, 0, false, "--max-memory-per-machine 512"},
		{"shared", 4, 0, 0, true, "--max-vcpus-per-machine 2"},
		{"scratch", 0, 0, 2, false, "--max-scratch-gib 1"},
		{"scratch-shared", 0, 0, 2, true, "--max-scratch-gib 1"},
	}
	var jobs []string
	for _, c := range cases {
		job := uniqueJob(t, "big-"+c.prefix)
		jobs = append(jobs, job)
		req := noneRequest(job, testImage())
		req.VCPUs, req.MemoryMiB, req.ScratchDiskGiB = c.vcpus, c.mib, c.scratch
		host := testHost
		if c.shared {
			host = ""
		}
		submitOn(t, js, host, req)
	}
	for i, job := range jobs {
		ev := events.waitState(t, job, messages.StateFailed, time.Minute)
		if ev.Error == nil || ev.Error.Code != messages.CodeResourcesExceeded || !strings.Contains(ev.Error.Message, cases[i].inReason) {
			t.Errorf("%s: failed with %+v, want resources_exceeded naming %s", job, ev.Error, cases[i].inReason)
		}
		if got := events.states(job); len(got) != 1 {
			t.Errorf("%s: events %v, want only failed", job, got)
		}
		if ev.Attempt != 1 {
			t.Errorf("%s: refused on delivery %d, want the first", job, ev.Attempt)
		}
	}
	for _, d := range defs() {
		for _, job := range jobs {
			if strings.Contains(d, job) {
				t.Errorf("%s was defined for a refused request", d)
			}
		}
	}
	if _, found, _ := provision.New(l, provision.Options{}).Lookup(context.Background(), jobs[0]); found {
		t.Error("a machine exists for a refused request")
	}
}

// TestScratchBeyondPoolSpace: a scratch disk larger than its image's pool
// could ever hold, sparse as it is, is refused with insufficient_storage
// naming the pool, and nothing is built.
func TestScratchBeyondPoolSpace(t *testing.T) {
	_, js := startNATS(t)
	events := followEvents(t, js)
	defs := watchDefinitions(t)
	startWorker(t, js, workerOptions{Images: []string{testImage()}})
	waitHosts(t, js, "the worker's record", func(h map[string]messages.Host) bool { return carries(h[testHost], testImage()) })
	job := uniqueJob(t, "scratch-huge")
	req := noneRequest(job, testImage())
	req.ScratchDiskGiB = messages.MaxScratchDiskGiB
	submitOn(t, js, testHost, req)
	ev := events.waitState(t, job, messages.StateFailed, time.Minute)
	if ev.Error == nil || ev.Error.Code != messages.CodeInsufficientStorage || !strings.Contains(ev.Error.Message, "storage pool") {
		t.Errorf("failed with %+v, want insufficient_storage naming the pool", ev.Error)
	}
	if got := events.states(job); len(got) != 1 || ev.Attempt != 1 {
		t.Errorf("events %v, attempt %d; want only failed, on the first delivery", got, ev.Attempt)
	}
	for _, d := range defs() {
		if strings.Contains(d, job) {
			t.Errorf("%s was defined for a refused request", d)
		}
	}
}

// TestHostTotalWaits: with --host-vcpus 2 and two requests of 2 vCPUs
// each, the second is not accepted until the first machine is gone, and
// then it is served.
func TestHostTotalWaits(t *testing.T) {
	_, js := startNATS(t)
	events := followEvents(t, js)
	rw := startWorker(t, js, workerOptions{Resources: lifecycle.Resources{HostVCPUs: 2}})
	first, second := uniqueJob(t, "total-a"), uniqueJob(t, "total-b")
	for _, job := range []string{first, second} {
		req := noneRequest(job, testImage())
		req.VCPUs = 2
		submitOn(t, js, testHost, req)
	}
	events.waitState(t, first, messages.StateAgentReady, 2*bootWait)
	// The second is pulled and waits for room, holding no slot.
	if used, _ := rw.life.Usage(); used.VCPUs != 2 {
		t.Errorf("machines hold %d vCPUs, want 2", used.VCPUs)
	}
	if got := events.states(second); len(got) != 0 {
		t.Fatalf("the second job has events %v while the first holds all vCPUs", got)
	}
	teardownAndWait(t, js, events, first)
	events.waitState(t, second, messages.StateAgentReady, 2*bootWait)
	a := events.of(first)
	b := events.of(second)
	if b[0].State != messages.StateAccepted || b[0].Time.Before(a[len(a)-1].Time) {
		t.Errorf("the second job's first event %s at %v, before the first's end at %v", b[0].State, b[0].Time, a[len(a)-1].Time)
	}
	teardownAndWait(t, js, events, second)
}

// TestPanicConsole: a guest whose init fails ends failed, its machine
// removed, with the end of its serial console in the event.
func TestPanicConsole(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	dir := t.TempDir()
	startWorker(t, js, workerOptions{ConsoleDir: dir})
	job := uniqueJob(t, "panic")
	req := noneRequest(job, panicImage())
	req.BootTimeoutS = 60
	submitOn(t, js, testHost, req)
	ev := events.waitState(t, job, messages.StateFailed, 3*time.Minute)
	if ev.Error == nil || (ev.Error.Code != messages.CodeBootTimeout && ev.Error.Code != messages.CodeAgentFailed) {
		t.Errorf("failed with %+v", ev.Error)
	}
	for _, want := range []string{"STRETCHY-TEST-PANIC", "Kernel panic"} {
		if !strings.Contains(ev.Console, want) {
			t.Errorf("console lacks %q:\n%s", want, ev.Console)
		}
	}
	if n := strings.Count(ev.Console, "\n"); n > messages.MaxConsoleLines || len(ev.Console) > messages.MaxConsoleBytes {
		t.Errorf("console of %d lines, %d bytes", n, len(ev.Console))
	}
	if _, found, _ := provision.New(l, provision.Options{}).Lookup(context.Background(), job); found {
		t.Error("the failed machine is still there")
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("console logs left: %v", left)
	}
}

// TestConsoleSecretScrubbed: a runner that prints its token on the serial
// console: the log on the host has it, but neither the failed event's
// console nor worker console shows it.
func TestConsoleSecretScrubbed(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	dir := t.TempDir()
	rw := startWorker(t, js, workerOptions{ConsoleDir: dir})
	job := uniqueJob(t, "consec")
	token := "console-secret-" + strings.TrimPrefix(job, runID)
	req := stubRunnerRequest(job, 600)
	req.Runner.Forgejo.Token = token
	req.Runner.Forgejo.Labels = append(req.Runner.Forgejo.Labels, "stub-console-secret")
	submitOn(t, js, testHost, req)
	events.waitState(t, job, messages.StateRunnerStarted, 2*bootWait)

	path, _ := provision.ConsoleLogPath(dir, job)
	deadline := time.Now().Add(time.Minute)
	for {
		raw, _ := os.ReadFile(path)
		if strings.Contains(string(raw), token) {
			break // the test means something: the console has the token
		}
		if time.Now().After(deadline) {
			t.Fatalf("the console log never showed the token; it has:\n%s", raw)
		}
		time.Sleep(200 * time.Millisecond)
	}
	text, withheld, err := rw.life.Console(context.Background(), job, 1<<16)
	if err != nil || withheld {
		t.Fatalf("Console: %v, withheld %v", err, withheld)
	}
	if strings.Contains(text, token) || !strings.Contains(text, "[REDACTED]") {
		t.Errorf("worker console shows:\n%s", text)
	}
	// Pull the plug: the machine stops, and the job fails with its console.
	dom, err := l.DomainLookupByName(messages.DomainName(job))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.DomainDestroy(dom); err != nil {
		t.Fatal(err)
	}
	ev := events.waitState(t, job, messages.StateFailed, 2*time.Minute)
	if ev.Error == nil || ev.Error.Code != messages.CodeMachineStopped {
		t.Errorf("failed with %+v", ev.Error)
	}
	if strings.Contains(ev.Console, token) || !strings.Contains(ev.Console, "[REDACTED]") {
		t.Errorf("failed event console:\n%s", ev.Console)
	}
	for _, e := range events.of(job) {
		if strings.Contains(e.Console+e.Output+errorText(e), token) {
			t.Errorf("%s event shows the token", e.State)
		}
	}
}

// waitHeld waits until the machine of job is held until until, powered
// off: the worker records the hold right after the job's end.
func waitHeld(t *testing.T, p *provision.Provisioner, job string, until time.Time) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		mach, found, err := p.Lookup(context.Background(), job)
		if err == nil && found && !mach.Running && mach.HeldUntil.Equal(until) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("machine of %s not held until %v: %+v, found %v, %v", job, until, mach, found, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func errorText(ev messages.Event) string {
	if ev.Error == nil {
		return ""
	}
	return ev.Error.Message
}

// TestHoldOnFailure: a failed job asking for a 30 s hold keeps its
// machine, shut off, listed by the host registry and worker events
// --summary; worker console reads it; 30 s after the failure it is
// removed and released published.
func TestHoldOnFailure(t *testing.T) {
	l := dialLibvirt(t)
	url, js := startNATS(t)
	events := followEvents(t, js)
	startWorker(t, js, workerOptions{Images: []string{testImage() + "*"}, MaxHold: 10 * time.Minute,
		ConsoleDir: t.TempDir(), NATS: js.Conn()})
	waitHosts(t, js, "the worker's record", func(h map[string]messages.Host) bool { return carries(h[testHost], panicImage()) })
	job := uniqueJob(t, "hold")
	req := noneRequest(job, panicImage())
	req.BootTimeoutS, req.HoldOnFailureS = 60, 30
	submitOn(t, js, testHost, req)
	ev := events.waitState(t, job, messages.StateFailed, 3*time.Minute)
	if ev.HeldUntil.IsZero() || ev.HeldUntil.Sub(ev.Time) > 31*time.Second || ev.HeldUntil.Sub(ev.Time) < 29*time.Second {
		t.Fatalf("failed at %v held until %v, want 30 s on", ev.Time, ev.HeldUntil)
	}
	if !strings.Contains(ev.Console, "STRETCHY-TEST-PANIC") {
		t.Errorf("console of the held machine's failure:\n%s", ev.Console)
	}
	p := provision.New(l, provision.Options{})
	waitHeld(t, p, job, ev.HeldUntil)
	waitHosts(t, js, "the held machine listed", func(h map[string]messages.Host) bool {
		for _, held := range h[testHost].Held {
			if held.JobID == job {
				return true
			}
		}
		return false
	})
	summary, err := exec.Command(workerBinary(t), "events", "--nats-url", url, "--job", job, "--summary").CombinedOutput()
	if err != nil || !strings.Contains(string(summary), "held until") {
		t.Errorf("worker events --summary: %v\n%s", err, summary)
	}
	console, err := exec.Command(workerBinary(t), "console", job, "--nats-url", url).CombinedOutput()
	if err != nil || !strings.Contains(string(console), "STRETCHY-TEST-PANIC") {
		t.Errorf("worker console: %v\n%s", err, console)
	}
	released := events.waitState(t, job, messages.StateReleased, 2*time.Minute)
	if released.Time.Before(ev.HeldUntil) || released.Reason != messages.ReasonHoldExpired {
		t.Errorf("released at %v (%s), hold until %v", released.Time, released.Reason, ev.HeldUntil)
	}
	if _, found, _ := p.Lookup(context.Background(), job); found {
		t.Error("the machine is still there after its hold")
	}
}

// TestHoldSurvivesKill: the worker is killed by SIGKILL while a failed
// job's machine is held; the next process keeps the machine and removes
// it when the hold ends, not before. worker hold and release drive a
// second machine from outside.
func TestHoldSurvivesKill(t *testing.T) {
	l := dialLibvirt(t)
	url, js := startNATS(t)
	events := followEvents(t, js)
	flags := []string{"--max-hold", "10m", "--console-dir", t.TempDir()}
	w := startProcess(t, url, flags...)
	held, other := uniqueJob(t, "killhold"), uniqueJob(t, "ophold")
	req := noneRequest(held, panicImage())
	req.BootTimeoutS, req.HoldOnFailureS = 60, 45
	submitOn(t, js, testHost, req)
	submitOn(t, js, testHost, noneRequest(other, testImage()))
	ev := events.waitState(t, held, messages.StateFailed, 3*time.Minute)
	if ev.HeldUntil.IsZero() {
		t.Fatal("not held")
	}
	events.waitState(t, other, messages.StateAgentReady, 2*bootWait)
	// An operator holds the other job's machine while it runs.
	out, err := exec.Command(workerBinary(t), "hold", other, "--for", "5m", "--nats-url", url).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "will be held") {
		t.Fatalf("worker hold: %v\n%s", err, out)
	}
	w.kill(t)

	p := provision.New(l, provision.Options{})
	if m, found, _ := p.Lookup(context.Background(), held); !found || m.Running {
		t.Fatalf("after the kill: %+v, found %v", m, found)
	}
	startProcess(t, url, flags...)
	// The restarted worker keeps the operator's hold: a teardown keeps the
	// machine, shut off.
	teardownOn(t, js, testHost, other)
	end := events.waitState(t, other, messages.StateTornDown, 2*time.Minute)
	if end.HeldUntil.IsZero() {
		t.Errorf("the operator's hold was lost across the restart: %+v", end)
	}
	waitHeld(t, p, other, end.HeldUntil)
	out, err = exec.Command(workerBinary(t), "release", other, "--nats-url", url).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "removed") {
		t.Errorf("worker release: %v\n%s", err, out)
	}
	if r := events.waitState(t, other, messages.StateReleased, time.Minute); r.Reason != messages.ReasonReleased {
		t.Errorf("released with reason %s", r.Reason)
	}

	released := events.waitState(t, held, messages.StateReleased, 3*time.Minute)
	if released.Time.Before(ev.HeldUntil) {
		t.Errorf("released at %v, before its hold's end at %v", released.Time, ev.HeldUntil)
	}
	if _, found, _ := p.Lookup(context.Background(), held); found {
		t.Error("the held machine is still there")
	}
}
