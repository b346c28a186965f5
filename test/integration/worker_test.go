package integration

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats.go/jetstream"
	"libvirt.org/go/libvirtxml"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// lifecycleStates is the life of a job with runner kind none: it is ready
// once the guest agent answers.
var lifecycleStates = []messages.State{
	messages.StateAccepted, messages.StateCloning, messages.StateCloned, messages.StateBooting,
	messages.StateRunning, messages.StateAgentReady, messages.StateTearingDown, messages.StateTornDown,
}

const bootWait = 90 * time.Second

// domainXML returns the parsed definition of a domain.
func domainXML(t *testing.T, l *libvirt.Libvirt, name string) *libvirtxml.Domain {
	t.Helper()
	d, err := l.DomainLookupByName(name)
	if err != nil {
		t.Fatalf("look up %s: %v", name, err)
	}
	doc, err := l.DomainGetXMLDesc(d, 0)
	if err != nil {
		t.Fatal(err)
	}
	var x libvirtxml.Domain
	if err := x.Unmarshal(doc); err != nil {
		t.Fatal(err)
	}
	return &x
}

func firstDiskPath(t *testing.T, d *libvirtxml.Domain) string {
	t.Helper()
	for _, disk := range d.Devices.Disks {
		if disk.Device == "disk" && disk.Source != nil && disk.Source.File != nil {
			return disk.Source.File.File
		}
	}
	t.Fatalf("domain %s has no file disk", d.Name)
	return ""
}

func TestProvisionBootTeardown(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 4})

	job := uniqueJob(t, "boot")
	submitProvision(t, js, job)
	ready := events.waitState(t, job, messages.StateAgentReady, bootWait)
	if ready.Domain != "stretchy-"+job || ready.Host != testHost || ready.Image != testImage() || ready.OS != "linux" {
		t.Fatalf("agent_ready event %+v", ready)
	}

	// The machine runs, and its disk is a copy-on-write overlay of the
	// image's disk.
	dom, err := l.DomainLookupByName("stretchy-" + job)
	if err != nil {
		t.Fatal(err)
	}
	state, _, err := l.DomainGetState(dom, 0)
	if err != nil || libvirt.DomainState(state) != libvirt.DomainRunning {
		t.Fatalf("domain state %d, %v", state, err)
	}
	imagePath := firstDiskPath(t, domainXML(t, l, testImage()))
	clonePath := firstDiskPath(t, domainXML(t, l, "stretchy-"+job))
	vol, err := l.StorageVolLookupByPath(clonePath)
	if err != nil {
		t.Fatal(err)
	}
	volDoc, err := l.StorageVolGetXMLDesc(vol, 0)
	if err != nil {
		t.Fatal(err)
	}
	var vx libvirtxml.StorageVolume
	if err := vx.Unmarshal(volDoc); err != nil {
		t.Fatal(err)
	}
	if vx.BackingStore == nil || vx.BackingStore.Path != imagePath {
		t.Fatalf("clone %s: backing store %+v, want %s", clonePath, vx.BackingStore, imagePath)
	}
	if vx.Target == nil || vx.Target.Format == nil || vx.Target.Format.Type != "qcow2" {
		t.Fatalf("clone format %+v, want qcow2", vx.Target)
	}
	_, _, alloc, err := l.StorageVolGetInfo(vol)
	if err != nil {
		t.Fatal(err)
	}
	if alloc > 4<<20 {
		t.Fatalf("clone allocates %d bytes; a linked clone starts at a few hundred KiB", alloc)
	}
	t.Logf("clone %s allocates %d KiB over %s", clonePath, alloc>>10, imagePath)

	submitTeardown(t, js, job)
	events.waitState(t, job, messages.StateTornDown, bootWait)
	if got := events.states(job); !slices.Equal(got, lifecycleStates) {
		t.Fatalf("events %v, want %v", got, lifecycleStates)
	}
	for i, ev := range events.of(job) {
		if ev.Seq != uint64(i+1) {
			t.Errorf("event %d has seq %d", i, ev.Seq)
		}
	}
	if _, err := l.DomainLookupByName("stretchy-" + job); err == nil {
		t.Fatal("domain still defined after torn_down")
	}
	if _, err := l.StorageVolLookupByPath(clonePath); err == nil {
		t.Fatal("cloned volume still exists after torn_down")
	}
	if _, err := l.StorageVolLookupByPath(imagePath); err != nil {
		t.Fatalf("image volume gone: %v", err)
	}
	waitQueueEmpty(t, js)
}

// waitQueueEmpty waits until every request was settled and removed.
func waitQueueEmpty(t *testing.T, js jetstream.JetStream) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for requestsLeft(t, js) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d requests still in the work queue", requestsLeft(t, js))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestParallelismBoundsOperations(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	// Consoles captured: a machine that dies while booting says why.
	rw := startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 20, ConsoleDir: t.TempDir()})

	const n = 20
	jobs := make([]string, n)
	for i := range jobs {
		jobs[i] = uniqueJob(t, "par")
		submitProvision(t, js, jobs[i])
	}
	// Tear each machine down as soon as it runs, so that few guests burn
	// the CPU at once.
	ours := map[string]bool{}
	for _, job := range jobs {
		ours[job] = true
	}
	tornDown := map[string]bool{}
	requested := map[string]bool{}
	events.wait(t, 5*time.Minute, "all 20 jobs torn down", func(evs []messages.Event) bool {
		for _, ev := range evs {
			if !ours[ev.JobID] {
				continue
			}
			switch ev.State {
			case messages.StateAgentReady:
				if !requested[ev.JobID] {
					requested[ev.JobID] = true
					submitTeardown(t, js, ev.JobID)
				}
			case messages.StateTornDown:
				tornDown[ev.JobID] = true
			}
		}
		return len(tornDown) == n
	})
	st := rw.w.Stats()
	t.Logf("max operations in flight: %d (parallelism 3)", st.MaxInFlight)
	if st.MaxInFlight > 3 {
		t.Fatalf("%d operations ran at once with parallelism 3", st.MaxInFlight)
	}
	if st.MaxInFlight < 2 {
		t.Fatalf("operations never overlapped (max %d): parallelism is not used", st.MaxInFlight)
	}
	for _, job := range jobs {
		if got := events.states(job); !slices.Equal(got, lifecycleStates) {
			t.Errorf("job %s: events %v", job, got)
		}
	}
	waitQueueEmpty(t, js)
	if left := managedLeftovers(t, l); len(left) != 0 {
		t.Fatalf("left behind: %v", left)
	}
}

func TestMaxVMsHoldsProvisionsButNotTeardowns(t *testing.T) {
	dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 2})

	a, b, c := uniqueJob(t, "cap-a"), uniqueJob(t, "cap-b"), uniqueJob(t, "cap-c")
	submitProvision(t, js, a)
	submitProvision(t, js, b)
	events.waitState(t, a, messages.StateAgentReady, bootWait)
	events.waitState(t, b, messages.StateAgentReady, bootWait)
	submitProvision(t, js, c)

	// At capacity the third request stays in the queue, untouched.
	time.Sleep(3 * time.Second)
	if got := events.states(c); len(got) != 0 {
		t.Fatalf("job %s started at capacity: %v", c, got)
	}
	if n := requestsLeft(t, js); n != 1 {
		t.Fatalf("%d requests queued, want the third provision", n)
	}
	// A teardown is still served, and frees room for the third machine.
	submitTeardown(t, js, a)
	events.waitState(t, a, messages.StateTornDown, bootWait)
	events.waitState(t, c, messages.StateAgentReady, bootWait)

	submitTeardown(t, js, b)
	submitTeardown(t, js, c)
	events.waitState(t, b, messages.StateTornDown, bootWait)
	events.waitState(t, c, messages.StateTornDown, bootWait)
	waitQueueEmpty(t, js)
}

func TestDuplicateDeliveryMakesOneMachine(t *testing.T) {
	dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	rw := startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 4})

	job := uniqueJob(t, "dup")
	data, err := messages.Marshal(provisionRequest(job))
	if err != nil {
		t.Fatal(err)
	}
	// Published twice without a message id: the server stores both.
	publish(t, js, messages.ProvisionSubject(), data)
	publish(t, js, messages.ProvisionSubject(), data)
	events.waitState(t, job, messages.StateAgentReady, bootWait)
	waitQueueEmpty(t, js)
	waitUntil(t, 10*time.Second, "both deliveries acked", func() bool {
		return countSettled(rw, "provision", job, "ack") == 2
	})
	submitTeardown(t, js, job)
	events.waitState(t, job, messages.StateTornDown, bootWait)
	if got := events.states(job); !slices.Equal(got, lifecycleStates) {
		t.Fatalf("events %v, want one per state %v", got, lifecycleStates)
	}
}

// waitUntil polls cond until it holds or the timeout passes.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func countSettled(rw *runningWorker, op, job, outcome string) int {
	n := 0
	for _, s := range rw.settlements() {
		if s.Op == op && s.JobID == job && s.Outcome == outcome {
			n++
		}
	}
	return n
}

func TestBadRequestsAreTerminated(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	rw := startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 4, AckWait: 3 * time.Second})

	invalid := uniqueJob(t, "invalid")
	req := provisionRequest(invalid)
	req.Image = "stretchy-sneaky"
	invalidData, err := messages.Marshal(&req)
	if err != nil {
		t.Fatal(err)
	}
	unknownImage := uniqueJob(t, "noimage")
	req = provisionRequest(unknownImage)
	req.Image = "no-such-image-here"
	unknownData, err := messages.Marshal(&req)
	if err != nil {
		t.Fatal(err)
	}
	publish(t, js, messages.ProvisionSubject(), []byte("this is not msgpack"))
	publish(t, js, messages.ProvisionSubject(), invalidData)
	publish(t, js, messages.ProvisionSubject(), unknownData)
	publish(t, js, messages.TeardownSubject(testHost), []byte{0x92, 0x01})

	ev := events.waitState(t, invalid, messages.StateFailed, bootWait)
	if ev.Error == nil || ev.Error.Code != messages.CodeInvalidRequest {
		t.Fatalf("failed event %+v", ev)
	}
	ev = events.waitState(t, unknownImage, messages.StateFailed, bootWait)
	if ev.Error == nil || ev.Error.Code != messages.CodeImageNotFound {
		t.Fatalf("failed event %+v", ev)
	}

	// The worker keeps serving.
	good := uniqueJob(t, "good")
	submitProvision(t, js, good)
	events.waitState(t, good, messages.StateAgentReady, bootWait)
	submitTeardown(t, js, good)
	events.waitState(t, good, messages.StateTornDown, bootWait)

	// Wait past AckWait: nothing was redelivered.
	time.Sleep(4 * time.Second)
	terms := 0
	for _, s := range rw.settlements() {
		if s.Outcome == "term" {
			terms++
		}
		if s.Attempt != 1 {
			t.Errorf("a request was delivered again: %+v", s)
		}
	}
	if terms != 4 {
		t.Fatalf("%d requests terminated, want 4: %+v", terms, rw.settlements())
	}
	waitQueueEmpty(t, js)
	for _, job := range []string{invalid, unknownImage} {
		if _, err := l.DomainLookupByName("stretchy-" + job); err == nil {
			t.Errorf("a domain was created for bad job %s", job)
		}
	}
}

func TestTeardownOfUnknownJob(t *testing.T) {
	dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	rw := startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 4})

	ghost := uniqueJob(t, "ghost")
	submitTeardown(t, js, ghost)
	ev := events.waitState(t, ghost, messages.StateTornDown, 30*time.Second)
	if ev.Error == nil || ev.Error.Code != messages.CodeUnknownJob {
		t.Fatalf("event %+v", ev)
	}
	waitQueueEmpty(t, js)
	time.Sleep(time.Second)
	if n := len(events.of(ghost)); n != 1 {
		t.Fatalf("%d events for the unknown job, want 1", n)
	}
	if n := countSettled(rw, "teardown", ghost, "ack"); n != 1 {
		t.Fatalf("teardown settled %d times", n)
	}
}

func TestShutdownLosesNothing(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	// A grace of a millisecond cancels whatever is in flight at shutdown.
	first := startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 6, ShutdownGrace: time.Millisecond})

	jobs := []string{uniqueJob(t, "stop"), uniqueJob(t, "stop"), uniqueJob(t, "stop"), uniqueJob(t, "stop")}
	for _, job := range jobs {
		submitProvision(t, js, job)
	}
	events.wait(t, bootWait, "an operation in flight", func(evs []messages.Event) bool {
		for _, ev := range evs {
			if ev.State == messages.StateCloning {
				return true
			}
		}
		return false
	})
	if err := first.stop(); err != nil {
		t.Fatal(err)
	}
	// Every provision is either acked with its machine running, or handed
	// back with nothing left of it.
	acked := map[string]bool{}
	for _, s := range first.settlements() {
		if s.Op == "provision" && s.Outcome == "ack" {
			acked[s.JobID] = true
		}
	}
	for _, job := range jobs {
		_, err := l.DomainLookupByName("stretchy-" + job)
		if acked[job] && err != nil {
			t.Errorf("job %s was acked but has no machine: %v", job, err)
		}
		if !acked[job] && err == nil {
			t.Errorf("job %s was not acked but left a domain behind", job)
		}
	}
	t.Logf("%d of %d provisions finished before shutdown", len(acked), len(jobs))

	// A new worker adopts the running machines and serves the rest.
	startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 6})
	for _, job := range jobs {
		events.waitState(t, job, messages.StateAgentReady, bootWait)
	}
	for _, job := range jobs {
		submitTeardown(t, js, job)
	}
	for _, job := range jobs {
		events.waitState(t, job, messages.StateTornDown, bootWait)
		running := 0
		for _, st := range events.states(job) {
			if st == messages.StateRunning {
				running++
			}
		}
		if running != 1 {
			t.Errorf("job %s ran %d times", job, running)
		}
	}
	waitQueueEmpty(t, js)
	if left := managedLeftovers(t, l); len(left) != 0 {
		t.Fatalf("left behind: %v", left)
	}
}

// TestParallelismOneEndsMachines is the setting a new user tries first:
// `worker run --parallelism 1 --max-vms 1`. Each job's runner exits and
// its machine goes, which lets the next job in; a job past its lifetime is
// torn down by its deadline. Before the fix the single slot was held by the
// pull loop's idle long-poll, so no machine ever ended by itself and the
// second job never started.
func TestParallelismOneEndsMachines(t *testing.T) {
	dialLibvirt(t)
	url, js := startNATS(t)
	events := followEvents(t, js)
	const host = "itest-parallel-one"
	startProcess(t, url, "--host", host, "--parallelism", "1", "--max-vms", "1")

	forgejo := func(job string) {
		req := provisionRequest(job)
		req.Runner = messages.Runner{Kind: messages.RunnerForgejo, Forgejo: &messages.ForgejoRunner{
			URL: "https://code.example.org/", UUID: "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", Token: plantedSecret("p1"), Labels: []string{"debian stub-sleep=1"},
		}}
		if _, err := submitReq(context.Background(), js, req, host); err != nil {
			t.Fatal(err)
		}
	}
	first, second, late := uniqueJob(t, "p1-first"), uniqueJob(t, "p1-second"), uniqueJob(t, "p1-late")
	forgejo(first)
	forgejo(second)
	req := provisionRequest(late)
	req.MaxLifetimeS = 1
	if _, err := submitReq(context.Background(), js, req, host); err != nil {
		t.Fatal(err)
	}

	for _, job := range []string{first, second} {
		ev := events.waitState(t, job, messages.StateTornDown, 3*bootWait)
		if ev.Reason != messages.ReasonRunnerExited {
			t.Fatalf("%s ended with reason %q, want %s", job, ev.Reason, messages.ReasonRunnerExited)
		}
	}
	ev := events.waitState(t, late, messages.StateFailed, 3*bootWait)
	if ev.Reason != messages.ReasonDeadline || ev.Error == nil || ev.Error.Code != messages.CodeDeadlineExceeded {
		t.Fatalf("%s ended with %+v, want its deadline", late, ev)
	}
	// One machine at a time: each job was accepted only after the one
	// before it ended.
	ended := func(job string) time.Time {
		for _, e := range events.of(job) {
			if e.State.Terminal() {
				return e.Time
			}
		}
		return time.Time{}
	}
	accepted := func(job string) time.Time { return events.waitState(t, job, messages.StateAccepted, bootWait).Time }
	if !accepted(second).After(ended(first)) || !accepted(late).After(ended(second)) {
		t.Fatalf("jobs overlapped at --max-vms 1; events:\n%s", events.dump())
	}
}
