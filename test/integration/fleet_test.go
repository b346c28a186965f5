package integration

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// fleetHosts returns the registry as an operator reads it.
func fleetHosts(t *testing.T, js jetstream.JetStream) map[string]messages.Host {
	t.Helper()
	recs, err := client.New(js, client.WithRole(client.Operator)).Hosts(context.Background())
	if errors.Is(err, client.ErrNotSetUp) {
		return nil // no worker created the buckets yet
	}
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]messages.Host{}
	for _, r := range recs {
		out[r.Host] = r
	}
	return out
}

// waitHosts waits until cond holds over the registry.
func waitHosts(t *testing.T, js jetstream.JetStream, what string, cond func(map[string]messages.Host) bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond(fleetHosts(t, js)) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; registry %+v", what, fleetHosts(t, js))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func carries(h messages.Host, image string) bool {
	for _, i := range h.Images {
		if i.Name == image {
			return true
		}
	}
	return false
}

// heartbeatsPass waits until host has rewritten its record n more times:
// the host ran that long, idle or not.
func heartbeatsPass(t *testing.T, js jetstream.JetStream, host string, n int) {
	t.Helper()
	last := fleetHosts(t, js)[host].Heartbeat
	for range n {
		waitHosts(t, js, "a heartbeat of "+host, func(hs map[string]messages.Host) bool {
			return hs[host].Heartbeat.After(last)
		})
		last = fleetHosts(t, js)[host].Heartbeat
	}
}

// TestFleetTwoHosts: the image is on host a only. Ten shared provisions
// are all served by a, none fails, and b builds none of them (the ones b
// pulls it forwards to the image's subject).
func TestFleetTwoHosts(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	a := startWorker(t, js, workerOptions{Host: "fleet-a", Images: []string{testImage()}, Parallelism: 2, MaxVMs: 3})
	b := startWorker(t, js, workerOptions{Host: "fleet-b", Images: []string{"no-such-image-*"}, Parallelism: 2, MaxVMs: 3})
	waitHosts(t, js, "both hosts registered", func(hs map[string]messages.Host) bool {
		return carries(hs["fleet-a"], testImage()) && len(hs["fleet-b"].Images) == 0 && hs["fleet-b"].Host != ""
	})
	var jobs []string
	for range 10 {
		job := uniqueJob(t, "two-hosts")
		jobs = append(jobs, job)
		submitTo(t, js, stubRunnerRequest(job, 1))
	}
	events.wait(t, 10*time.Minute, "every job torn down", func(evs []messages.Event) bool {
		ended := map[string]bool{}
		for _, ev := range evs {
			if ev.State.Terminal() {
				ended[ev.JobID] = true
			}
		}
		for _, j := range jobs {
			if !ended[j] {
				return false
			}
		}
		return true
	})
	served := map[string]int{}
	for _, j := range jobs {
		var terminal []messages.Event
		for _, ev := range events.of(j) {
			served[ev.Host]++
			if ev.State.Terminal() {
				terminal = append(terminal, ev)
			}
			if ev.Host != "fleet-a" {
				t.Errorf("job %s: event of %s: %s", j, ev.Host, ev.State)
			}
		}
		if len(terminal) != 1 || terminal[0].State != messages.StateTornDown {
			t.Errorf("job %s ended with %+v", j, terminal)
		}
		// The watch loop's teardown after the runner's exit, as the
		// headers say (docs/protocol.md 5.6, 8).
		for _, st := range []messages.State{messages.StateRunnerExited, messages.StateTearingDown, messages.StateTornDown} {
			if got, want := eventMsgID(t, js, j, st), fmt.Sprintf("%s:%s:%s", j, st, messages.ReasonRunnerExited); got != want {
				t.Errorf("job %s: %s stored with Nats-Msg-Id %q, want %q", j, st, got, want)
			}
		}
	}
	var forwardedByB, settledByB int
	for _, s := range b.settlements() {
		if s.Op == "provision" {
			settledByB++
			if s.Outcome == "ack" {
				forwardedByB++
			}
		}
	}
	t.Logf("events by host: %v; b settled %d shared requests (%d forwarded), a settled %d provisions; max in flight a %d, b %d",
		served, settledByB, forwardedByB, a.w.Stats().Provisions, a.w.Stats().MaxInFlight, b.w.Stats().MaxInFlight)
	if got := b.life.Active(); got != 0 {
		t.Fatalf("b has %d machines", got)
	}
	if left := managedLeftovers(t, l); len(left) > 0 {
		t.Fatalf("left on the host: %v", left)
	}
	if n := requestsLeft(t, js); n != 0 {
		t.Fatalf("%d requests left in the stream", n)
	}
}

// TestFleetNobodyCarries: hosts that carry no image a request names leave
// it alone, idle as they are: a request on the image's subject waits; a
// shared one is handed back until its last delivery, then ends failed
// with image_not_found naming the hosts that tried.
func TestFleetNobodyCarries(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	startWorker(t, js, workerOptions{Host: "none-a", Images: []string{"nothing-a-*"}})
	startWorker(t, js, workerOptions{Host: "none-b", Images: []string{"nothing-b-*"}})
	waitHosts(t, js, "both hosts registered", func(hs map[string]messages.Host) bool {
		return hs["none-a"].Host != "" && hs["none-b"].Host != ""
	})
	waiting := uniqueJob(t, "by-image")
	if err := submitReqByImage(context.Background(), js, provisionRequest(waiting)); err != nil {
		t.Fatal(err)
	}
	lost := uniqueJob(t, "shared")
	submitProvision(t, js, lost)
	failed := events.waitState(t, lost, messages.StateFailed, 3*time.Minute)
	if failed.Error == nil || failed.Error.Code != messages.CodeImageNotFound || failed.Attempt != 5 || failed.Image != testImage() {
		t.Fatalf("failed event %+v", failed)
	}
	if !regexp.MustCompile(`^image "` + regexp.QuoteMeta(testImage()) + `" is carried by no active host; tried by (none-a|none-b)(, (none-a|none-b))?$`).MatchString(failed.Error.Message) {
		t.Fatalf("message %q", failed.Error.Message)
	}
	if got := events.states(lost); len(got) != 1 {
		t.Fatalf("events of the shared job: %v", got)
	}
	heartbeatsPass(t, js, "none-a", 3)
	heartbeatsPass(t, js, "none-b", 3)
	if got := events.of(waiting); len(got) != 0 {
		t.Fatalf("the request for an image nobody carries got events: %+v", got)
	}
	if n := requestsLeft(t, js); n != 1 {
		t.Fatalf("%d requests in the stream, want the waiting one", n)
	}
	t.Logf("shared request: %s after %d deliveries", failed.Error.Message, failed.Attempt)
	if left := managedLeftovers(t, l); len(left) > 0 {
		t.Fatalf("left on the host: %v", left)
	}
}

// TestFleetDrain: a draining host with a running machine takes no
// provision, serves the machine's teardown, and reports drained once
// empty.
func TestFleetDrain(t *testing.T) {
	dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	w := startWorker(t, js, workerOptions{Host: testHost, Images: []string{testImage()}})
	waitHosts(t, js, "registered", func(hs map[string]messages.Host) bool { return carries(hs[testHost], testImage()) })
	running := uniqueJob(t, "drain-running")
	submitProvision(t, js, running)
	events.waitState(t, running, messages.StateAgentReady, bootWait)

	if err := w.w.Drain(context.Background(), true, "test"); err != nil {
		t.Fatal(err)
	}
	waitHosts(t, js, "draining", func(hs map[string]messages.Host) bool { return hs[testHost].State == messages.HostDraining })
	shared, byImage, pinned := uniqueJob(t, "drain-shared"), uniqueJob(t, "drain-image"), uniqueJob(t, "drain-pinned")
	submitProvision(t, js, shared)
	if err := submitReqByImage(context.Background(), js, provisionRequest(byImage)); err != nil {
		t.Fatal(err)
	}
	if _, err := submitReq(context.Background(), js, provisionRequest(pinned), testHost); err != nil {
		t.Fatal(err)
	}
	submitTeardown(t, js, running)
	events.waitState(t, running, messages.StateTornDown, bootWait)
	waitHosts(t, js, "drained", func(hs map[string]messages.Host) bool { return hs[testHost].State == messages.HostDrained })
	heartbeatsPass(t, js, testHost, 3)
	for _, j := range []string{shared, byImage, pinned} {
		if got := events.states(j); len(got) != 0 {
			t.Fatalf("drained host served %s: %v", j, got)
		}
	}
	if n := requestsLeft(t, js); n != 3 {
		t.Fatalf("%d requests in the stream, want the 3 provisions", n)
	}
}

// scrape returns the body of GET url.
func scrape(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// metricValue reads one sample from a Prometheus text exposition.
func metricValue(body, series string) (float64, bool) {
	for _, line := range strings.Split(body, "\n") {
		if rest, ok := strings.CutPrefix(line, series+" "); ok {
			v, err := strconv.ParseFloat(strings.TrimSpace(rest), 64)
			return v, err == nil
		}
	}
	return 0, false
}

// TestMetricsDuringJob scrapes a worker process while it runs a job:
// health, readiness, the machine counted under its image, and, once the
// job ended, its agent_ready phase in the histogram.
func TestMetricsDuringJob(t *testing.T) {
	dialLibvirt(t)
	url, js := startNATS(t)
	events := followEvents(t, js)
	port := freePort(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	p := startProcess(t, url, "--images", testImage(), "--http-addr", fmt.Sprintf("127.0.0.1:%d", port))
	deadline := time.Now().Add(time.Minute)
	for {
		resp, err := http.Get(base + "/healthz")
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no /healthz: %v\n%s", err, p.log.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	waitHosts(t, js, "registered", func(hs map[string]messages.Host) bool { return carries(hs[testHost], testImage()) })
	// worker run gives its guest agent client libvirt's agent lifecycle
	// events, so that agent_ready follows the agent's start at once.
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		_, body := scrape(t, base+"/metrics")
		if got, _ := metricValue(body, `stretchy_worker_agent_events`); got == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest agent client is not woken by agent events:\n%s", body)
		}
	}
	job := uniqueJob(t, "metrics")
	submitTo(t, js, stubRunnerRequest(job, 5))
	events.waitState(t, job, messages.StateRunnerStarted, bootWait)

	code, body := scrape(t, base+"/metrics")
	var ready float64
	for _, wake := range []string{"event", "poll", "first"} {
		n, _ := metricValue(body, `stretchy_worker_agent_ready_total{wake="`+wake+`"}`)
		ready += n
		if n > 0 {
			t.Logf("the guest agent was found ready by a ping of kind %s", wake)
		}
	}
	if ready != 1 {
		t.Errorf("agents found ready: %v, want 1", ready)
	}
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	image := `image="` + testImage() + `"`
	for series, want := range map[string]float64{
		`stretchy_worker_machines_running{` + image + `}`:                                 1,
		`stretchy_worker_operation_slots`:                                                 3,
		`stretchy_worker_nats_connected`:                                                  1,
		`stretchy_worker_libvirt_connected`:                                               1,
		`stretchy_worker_host_state{state="active"}`:                                      1,
		`stretchy_worker_image_admitted{` + image + `}`:                                   1,
		`stretchy_worker_phase_duration_seconds_count{` + image + `,phase="agent_ready"}`: 1,
	} {
		if got, ok := metricValue(body, series); !ok || got != want {
			t.Errorf("%s = %v (found %v), want %v", series, got, ok, want)
		}
	}
	if code, body := scrape(t, base+"/readyz"); code != 200 {
		t.Errorf("/readyz during the job: %d %s", code, body)
	}
	if code, _ := scrape(t, base+"/healthz"); code != 200 {
		t.Errorf("/healthz: %d", code)
	}
	for _, bad := range []string{job, "job_id"} {
		if strings.Contains(body, bad) {
			t.Errorf("/metrics mentions %q", bad)
		}
	}

	events.waitState(t, job, messages.StateTornDown, bootWait)
	_, body = scrape(t, base+"/metrics")
	if got, _ := metricValue(body, `stretchy_worker_phase_duration_seconds_count{`+image+`,phase="torn_down"}`); got != 1 {
		t.Errorf("torn_down phases counted: %v", got)
	}
	// The machine is forgotten just after its torn_down event is stored.
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		_, body = scrape(t, base+"/metrics")
		if got, _ := metricValue(body, `stretchy_worker_machines_running{`+image+`}`); got == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("machines still counted a minute after the job:\n%s", body)
		}
	}
	p.stop(t)
}
