package integration

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// idleWarm returns the warm machines of host whose last event in evs says
// they are ready and idle (agent_ready, no job), by key.
func idleWarm(evs []messages.Event, host string) map[string]bool {
	state := map[string]messages.State{}
	for _, ev := range evs {
		if ev.Host == host && ev.JobID == "" && ev.Machine != "" {
			state[ev.Machine] = ev.State
		}
	}
	bound := map[string]bool{}
	for _, ev := range evs {
		if ev.Host == host && ev.JobID != "" && ev.Warm {
			bound[ev.Machine] = true
		}
	}
	idle := map[string]bool{}
	for key, s := range state {
		if s == messages.StateAgentReady && !bound[key] {
			idle[key] = true
		}
	}
	return idle
}

// idleWarm is idleWarm over every event seen so far.
func (el *eventLog) idleWarm(host string) map[string]bool {
	el.mu.Lock()
	defer el.mu.Unlock()
	return idleWarm(el.events, host)
}

// machineReasons returns the reasons of the torn_down events of host's
// warm machines no job bound.
func (el *eventLog) machineReasons(host string) []string {
	el.mu.Lock()
	defer el.mu.Unlock()
	var out []string
	for _, ev := range el.events {
		if ev.Host == host && ev.JobID == "" && ev.State == messages.StateTornDown {
			out = append(out, ev.Reason)
		}
	}
	sort.Strings(out)
	return out
}

// warmDomains lists the warm machines of host on the libvirtd.
func warmDomains(t *testing.T, l *libvirt.Libvirt, host string) []provision.Machine {
	t.Helper()
	all, err := provision.New(l, provision.Options{}).List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out []provision.Machine
	for _, m := range all {
		if m.Warm && m.Host == host {
			out = append(out, m)
		}
	}
	return out
}

// removeWarmOf removes, when the test ends, every warm machine of host a
// failing test may leave.
func removeWarmOf(t *testing.T, l *libvirt.Libvirt, host string) {
	t.Cleanup(func() {
		p := provision.New(l, provision.Options{})
		for _, m := range warmDomains(t, l, host) {
			if _, err := p.Remove(context.Background(), m.Key); err != nil {
				t.Errorf("remove warm machine %s: %v", m.Name, err)
			}
		}
	})
}

func warmHost(name string) string { return name + "-" + strings.TrimPrefix(runID, "it") }

func submitOn(t *testing.T, js jetstream.JetStream, host string, req messages.Provision) {
	t.Helper()
	if _, err := submitReq(context.Background(), js, req, host); err != nil {
		t.Fatal(err)
	}
}

// TestWarmPoolServesJobs: a pool of 2 on the tiny guest; three requests at
// once: two bind the warm machines (their events say warm and name the
// machine), one builds cold; --max-vms 4 counts the pool, so with three
// jobs running the pool refills to one machine only, and to two once the
// jobs are gone. The pool's own events carry no job id and no secret.
func TestWarmPoolServesJobs(t *testing.T) {
	l := dialLibvirt(t)
	url, js := startNATS(t)
	events := followEvents(t, js)
	host := warmHost("itest-warm")
	removeWarmOf(t, l, host)
	w := startProcess(t, url, "--host", host, "--warm", testImage()+"=2", "--max-vms", "4", "--warm-retire-on-stop")

	events.wait(t, 2*bootWait, "two warm machines ready", func(evs []messages.Event) bool { return len(idleWarm(evs, host)) == 2 })

	secrets := map[string]string{}
	submitted := map[string]time.Time{}
	var jobs []string
	for i := range 3 {
		job := uniqueJob(t, fmt.Sprintf("warm-%d", i))
		// The runners outlive the checks below, however long the
		// refill takes; teardowns end them.
		req := stubRunnerRequest(job, 600)
		secrets[job] = plantedSecret("warm")
		req.Runner.Forgejo.Token = secrets[job]
		submitted[job] = time.Now()
		submitOn(t, js, host, req)
		jobs = append(jobs, job)
	}
	warm := 0
	for _, job := range jobs {
		ev := events.waitState(t, job, messages.StateRunnerStarted, 2*bootWait)
		// For the reader of -v, not a timing assertion.
		t.Logf("job %s: request → runner_started %v (warm %v)", job, ev.Time.Sub(submitted[job]).Round(time.Millisecond), ev.Warm)
		if ev.Warm {
			warm++
			if !messages.ValidWarmKey(ev.Machine) || ev.Domain != messages.DomainName(ev.Machine) {
				t.Fatalf("warm job %s: machine %q, domain %q", job, ev.Machine, ev.Domain)
			}
		}
		for i, e := range events.of(job) {
			if e.Seq != uint64(i+1) || e.Warm != ev.Warm {
				t.Fatalf("job %s: event %d %+v: seq or warm inconsistent", job, i, e)
			}
		}
	}
	if warm != 2 {
		t.Fatalf("%d of 3 jobs bound a warm machine, want 2; events:\n%s", warm, events.dump())
	}
	// Three jobs run; --max-vms 4 leaves room for one warm machine.
	events.wait(t, 2*bootWait, "the pool refilled to one", func(evs []messages.Event) bool { return len(idleWarm(evs, host)) == 1 })
	if n := len(warmDomains(t, l, host)); n != 3 {
		t.Fatalf("%d warm machines on the host (2 bound, 1 idle expected)", n)
	}
	for _, job := range jobs {
		teardownOn(t, js, host, job)
	}
	for _, job := range jobs {
		events.waitState(t, job, messages.StateTornDown, 2*bootWait)
	}
	events.wait(t, 2*bootWait, "the pool refilled to two", func(evs []messages.Event) bool { return len(idleWarm(evs, host)) == 2 })
	w.stop(t)
	if left := warmDomains(t, l, host); len(left) != 0 {
		t.Fatalf("--warm-retire-on-stop left %d warm machines", len(left))
	}
	var all []string
	for _, s := range secrets {
		all = append(all, s)
	}
	for _, raw := range storedEvents(t, js) {
		if got := leaks(raw, all); len(got) > 0 {
			t.Errorf("a stored event carries secrets %v", got)
		}
	}
	if reasons := events.machineReasons(host); len(reasons) != 2 || reasons[0] != messages.ReasonShutdown {
		t.Errorf("idle machines were retired for %v, want shutdown twice", reasons)
	}
}

// TestWarmPoolImageChange: a pool of 1 of an image of the test's own; a job
// binds the warm machine and runs; the pool refills; then the image's
// definition changes: the idle machine is replaced (reason image_changed)
// and the running job is untouched.
func TestWarmPoolImageChange(t *testing.T) {
	l := dialLibvirt(t)
	url, js := startNATS(t)
	events := followEvents(t, js)
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	image := "warm-img-" + hex.EncodeToString(b)
	defineOverlayImage(t, l, image)
	host := warmHost("itest-warmimg")
	removeWarmOf(t, l, host)
	startProcess(t, url, "--host", host, "--warm", image+"=1", "--images", image, "--warm-retire-on-stop")

	events.wait(t, 2*bootWait, "a warm machine ready", func(evs []messages.Event) bool { return len(idleWarm(evs, host)) == 1 })
	job := uniqueJob(t, "warm-img")
	req := stubRunnerRequest(job, 120)
	req.Image = image
	submitOn(t, js, host, req)
	if ev := events.waitState(t, job, messages.StateRunnerStarted, 2*bootWait); !ev.Warm {
		t.Fatalf("the job did not bind the warm machine: %+v", ev)
	}
	events.wait(t, 2*bootWait, "the pool refilled", func(evs []messages.Event) bool { return len(idleWarm(evs, host)) == 1 })
	var before string
	for key := range events.idleWarm(host) {
		before = key
	}

	// Change the image's definition: its generation changes.
	dom, err := l.DomainLookupByName(image)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.DomainSetMetadata(dom, int32(libvirt.DomainMetadataDescription), libvirt.OptString{"changed by the test"},
		nil, nil, libvirt.DomainAffectConfig); err != nil {
		t.Fatal(err)
	}
	events.wait(t, 2*bootWait, "the idle machine replaced", func(evs []messages.Event) bool {
		idle := idleWarm(evs, host)
		return len(idle) == 1 && !idle[before]
	})
	if reasons := events.machineReasons(host); len(reasons) != 1 || reasons[0] != messages.ReasonImageChanged {
		t.Fatalf("retired for %v, want image_changed", reasons)
	}
	for _, ev := range events.of(job) {
		if ev.State == messages.StateTearingDown || ev.State.Terminal() {
			t.Fatalf("the image change touched the running job: %+v", ev)
		}
	}
	teardownOn(t, js, host, job)
	events.waitState(t, job, messages.StateTornDown, bootWait)
}

// TestWarmPoolAfterSIGKILL: a full pool of 2 and a job bound to a warm
// machine; the worker is killed with SIGKILL and started again: the bound
// job goes on and ends with one terminal event, the idle machines of the
// dead process are retired (reason reconcile) and the pool is rebuilt;
// nothing is left.
func TestWarmPoolAfterSIGKILL(t *testing.T) {
	l := dialLibvirt(t)
	url, js := startNATS(t)
	events := followEvents(t, js)
	host := warmHost("itest-warmkill")
	removeWarmOf(t, l, host)
	args := []string{"--host", host, "--warm", testImage() + "=2", "--warm-retire-on-stop"}
	first := startProcess(t, url, args...)
	events.wait(t, 2*bootWait, "two warm machines ready", func(evs []messages.Event) bool { return len(idleWarm(evs, host)) == 2 })
	job := uniqueJob(t, "warm-kill")
	submitOn(t, js, host, stubRunnerRequest(job, 30))
	if ev := events.waitState(t, job, messages.StateRunnerStarted, 2*bootWait); !ev.Warm {
		t.Fatalf("the job did not bind a warm machine: %+v", ev)
	}
	events.wait(t, 2*bootWait, "the pool refilled", func(evs []messages.Event) bool { return len(idleWarm(evs, host)) == 2 })
	old := events.idleWarm(host)
	first.kill(t)

	second := startProcess(t, url, args...)
	events.waitState(t, job, messages.StateTornDown, 2*bootWait)
	events.wait(t, 2*bootWait, "a new pool of two", func(evs []messages.Event) bool {
		idle := idleWarm(evs, host)
		for key := range old {
			if idle[key] {
				return false
			}
		}
		return len(idle) == 2
	})
	terminal := 0
	for _, ev := range events.of(job) {
		if ev.State.Terminal() {
			terminal++
		}
	}
	if terminal != 1 {
		t.Fatalf("job %s has %d terminal events; events:\n%s", job, terminal, events.dump())
	}
	if reasons := events.machineReasons(host); len(reasons) != 2 || reasons[0] != messages.ReasonReconcile {
		t.Fatalf("the dead process's idle machines were retired for %v, want reconcile twice", reasons)
	}
	second.stop(t)
	if left := warmDomains(t, l, host); len(left) != 0 {
		t.Fatalf("%d warm machines left", len(left))
	}
	waitQueueEmpty(t, js)
	_ = time.Second
}
