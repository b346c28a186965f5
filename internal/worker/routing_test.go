package worker

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// fakeInventory is a host's images and pools; libvirt's are exercised by
// pkg/provision and the integration tests.
type fakeInventory struct {
	mu     sync.Mutex
	images []string
	free   uint64
}

func (fi *fakeInventory) set(images ...string) {
	fi.mu.Lock()
	fi.images = images
	fi.mu.Unlock()
}

func (fi *fakeInventory) ListImages(_ context.Context, keep func(string) bool) ([]provision.ImageReport, error) {
	fi.mu.Lock()
	defer fi.mu.Unlock()
	var out []provision.ImageReport
	for _, name := range fi.images {
		if keep(name) {
			out = append(out, provision.ImageReport{Name: name, Defined: true, CloneMode: provision.CloneLinked,
				Firmware: "bios", Generation: "g-" + name, Disks: []provision.ImageDisk{{Target: "vda", Pool: "pool"}}})
		}
	}
	return out, nil
}

func (fi *fakeInventory) RefreshPools(context.Context) error { return nil }

func (fi *fakeInventory) InspectPools(context.Context) ([]provision.PoolReport, error) {
	fi.mu.Lock()
	defer fi.mu.Unlock()
	return []provision.PoolReport{{Name: "pool", Active: true, Available: fi.free}}, nil
}

// fleetHost is one host of a fleet: a worker over fakes, on a shared
// in-process JetStream, with a real registry.
type fleetHost struct {
	host     *fakeHost
	inv      *fakeInventory
	w        *Worker
	stop     func()
	mu       sync.Mutex
	seen     []Change
	settl    []Settlement
	controls []error // the outcome of each control request, as OnControl told it
}

func (fh *fleetHost) changes(kind string) []Change {
	fh.mu.Lock()
	defer fh.mu.Unlock()
	var out []Change
	for _, c := range fh.seen {
		if c.Kind == kind {
			out = append(out, c)
		}
	}
	return out
}

func startFleetHost(t *testing.T, env advisoryEnv, id string, minFree uint64, images ...string) *fleetHost {
	t.Helper()
	return startFleetHostPulling(t, env, id, minFree, 200*time.Millisecond, images...)
}

// startFleetHostPulling is startFleetHost with the worker's PullWait.
func startFleetHostPulling(t *testing.T, env advisoryEnv, id string, minFree uint64, pullWait time.Duration, images ...string) *fleetHost {
	t.Helper()
	return startFleetHostServing(t, env, id, minFree, pullWait, nil, images...)
}

// startFleetHostServing is startFleetHostPulling with the host's --images
// patterns.
func startFleetHostServing(t *testing.T, env advisoryEnv, id string, minFree uint64, pullWait time.Duration, patterns []string, images ...string) *fleetHost {
	t.Helper()
	return startFleetHostWith(t, env, id, minFree, pullWait, patterns, nil, images...)
}

// startFleetHostWith is startFleetHostServing with changes to the worker's
// configuration.
func startFleetHostWith(t *testing.T, env advisoryEnv, id string, minFree uint64, pullWait time.Duration, patterns []string, change func(*Config), images ...string) *fleetHost {
	t.Helper()
	js := connect(t, env.url)
	topo := bus.Topology{Host: id, AckWait: 3 * time.Second, MaxDeliver: 3}
	cons, err := bus.Ensure(context.Background(), js, topo)
	if err != nil {
		t.Fatal(err)
	}
	reg, err := bus.OpenFleet(context.Background(), js, topo)
	if err != nil {
		t.Fatal(err)
	}
	fh := &fleetHost{host: newFakeHost(), inv: &fakeInventory{images: images, free: 100 << 30}}
	pub := bus.NewPublisher(js)
	life := lifecycle.New(lifecycle.Config{Host: id, Machines: fh.host, Agent: agent{fh.host}, Events: pub, History: pub})
	cfg := Config{Parallelism: 2, MaxVMs: 20, AckWait: 3 * time.Second, MaxDeliver: 3, PullWait: pullWait,
		WatchInterval: 100 * time.Millisecond, NATS: js.Conn(),
		OnSettle: func(s Settlement) {
			fh.mu.Lock()
			fh.settl = append(fh.settl, s)
			fh.mu.Unlock()
		},
		OnControl: func(_ messages.Control, err error) {
			fh.mu.Lock()
			fh.controls = append(fh.controls, err)
			fh.mu.Unlock()
		},
		Fleet: &FleetConfig{Host: id, Version: "test", Inventory: fh.inv, Registry: reg, MinFreeSpace: minFree, Images: patterns,
			ImagesInterval: 200 * time.Millisecond, HeartbeatInterval: 200 * time.Millisecond,
			OnChange: func(c Change) {
				fh.mu.Lock()
				fh.seen = append(fh.seen, c)
				fh.mu.Unlock()
			}},
	}
	if change != nil {
		change(&cfg)
	}
	fh.w = New(cfg, cons, life)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fh.w.Run(ctx) }()
	var once sync.Once
	fh.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run of %s: %v", id, err)
			}
		})
	}
	t.Cleanup(fh.stop)
	return fh
}

func provisionFor(job, image string) messages.Provision {
	return messages.Provision{V: 1, JobID: job, Image: image, RequestedAt: time.Now().UTC(),
		Runner: messages.Runner{Kind: messages.RunnerNone}}
}

// waitRegistered waits until every host's record lists its images.
func waitRegistered(t *testing.T, js interface {
	Hosts(context.Context) ([]messages.Host, error)
}, want map[string]int) {
	t.Helper()
	waitFor(t, "the hosts' records", func() bool {
		recs, err := js.Hosts(context.Background())
		if err != nil {
			return false
		}
		got := map[string]int{}
		for _, r := range recs {
			got[r.Host] = len(r.Images)
		}
		for h, n := range want {
			if got[h] != n {
				return false
			}
		}
		return true
	})
}

// TestSharedRequestsGoToTheImage: of two hosts, only a carries img. Shared
// requests for img are all built on a, those that b pulls forwarded to
// img's subject; a request for an image nobody carries ends failed with
// image_not_found after its deliveries, naming the hosts that tried.
func TestSharedRequestsGoToTheImage(t *testing.T) {
	env := startServer(t)
	log := watchEvents(t, env.url)
	a := startFleetHost(t, env, "a", 0, "img")
	b := startFleetHost(t, env, "b", 0, "other")
	op := client.New(env.js)
	waitRegistered(t, op, map[string]int{"a": 1, "b": 1})

	var jobs []string
	for i := range 10 {
		job := "share-" + string(rune('a'+i))
		jobs = append(jobs, job)
		if _, err := submitProvision(context.Background(), env.js, provisionFor(job, "img"), ""); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := submitProvision(context.Background(), env.js, provisionFor("lost", "nowhere"), ""); err != nil {
		t.Fatal(err)
	}
	for _, job := range jobs {
		waitFor(t, "agent_ready of "+job, func() bool { return log.has(job, messages.StateAgentReady) })
	}
	waitFor(t, "failed of lost", func() bool { return log.has("lost", messages.StateFailed) })
	for _, job := range jobs {
		for _, ev := range log.of(job) {
			if ev.Host != "a" {
				t.Fatalf("job %s has an event of host %s: %+v", job, ev.Host, ev)
			}
		}
	}
	if n := b.host.count(); n != 0 {
		t.Fatalf("b built %d machines", n)
	}
	if n := a.host.count(); n != 10 {
		t.Fatalf("a built %d machines, want 10", n)
	}
	evs := log.of("lost")
	if len(evs) != 1 || evs[0].Error == nil || evs[0].Error.Code != messages.CodeImageNotFound || evs[0].Attempt != 3 {
		t.Fatalf("events of lost: %+v", evs)
	}
	msg := evs[0].Error.Message
	for _, h := range triedBy(msg) {
		if h != "a" && h != "b" {
			t.Fatalf("message %q names host %q", msg, h)
		}
	}
	if !strings.Contains(msg, `image "nowhere" is carried by no active host; tried by `) {
		t.Fatalf("message %q", msg)
	}
	t.Logf("forwarded by b: %d, by a: %d; lost: %s", len(b.changes("forwarded")), len(a.changes("forwarded")), msg)
}

func triedBy(msg string) []string {
	_, list, _ := strings.Cut(msg, "tried by ")
	return strings.Split(list, ", ")
}

// TestImagesComeAndGo: an image defined while the worker runs is pulled
// from, one that goes is not, and a pool short of space keeps the host
// from an image's requests (they wait) without failing them.
func TestImagesComeAndGo(t *testing.T) {
	env := startServer(t)
	log := watchEvents(t, env.url)
	a := startFleetHost(t, env, "a", 10<<30)
	submit := func(job, image string) {
		t.Helper()
		if err := submitImageProvision(context.Background(), env.js, provisionFor(job, image)); err != nil {
			t.Fatal(err)
		}
	}
	submit("late-1", "late")
	a.inv.set("late")
	waitFor(t, "late-1 served", func() bool { return log.has("late-1", messages.StateAgentReady) })

	// Short of space: the request waits; with space again it is served.
	a.inv.mu.Lock()
	a.inv.free = 1 << 30
	a.inv.mu.Unlock()
	waitFor(t, "image refused", func() bool { return len(a.changes("image_refused")) == 1 })
	submit("late-2", "late")
	// A causal check: the worker has sampled the queue with the request
	// in it, and has not taken it.
	waitFor(t, "late-2 waiting", func() bool { return a.w.Snapshot().Pending[messages.ImageConsumer("late")] == 1 })
	if log.has("late-2", messages.StateAccepted) {
		t.Fatal("a took a request while short of space")
	}
	a.inv.mu.Lock()
	a.inv.free = 100 << 30
	a.inv.mu.Unlock()
	waitFor(t, "late-2 served", func() bool { return log.has("late-2", messages.StateAgentReady) })

	a.inv.set()
	waitFor(t, "image removed", func() bool { return len(a.changes("image_removed")) == 1 })
	submit("late-3", "late")
	// The idle host goes on pulling (pinned, shared) and writing its
	// record; after a few of its heartbeats the request is still there.
	beats := len(a.changes("beat"))
	waitFor(t, "three more heartbeats", func() bool { return len(a.changes("beat")) >= beats+3 })
	cons, err := env.js.Consumer(context.Background(), messages.RequestsStream, messages.ImageConsumer("late"))
	if err != nil {
		t.Fatal(err)
	}
	if info, err := cons.Info(context.Background()); err != nil || info.NumPending != 1 || log.has("late-3", messages.StateAccepted) {
		t.Fatalf("late-3: pending %v, %v; accepted %v", info, err, log.has("late-3", messages.StateAccepted))
	}
}

// namedConsumer stands in for an image's consumer in the round robin.
type namedConsumer struct {
	jetstream.Consumer
	name string
}

// TestImagesTakeTurns: with requests of several images waiting, each free
// slot asks the image after the one served last first, so no image
// starves another; an image short of space is not asked.
func TestImagesTakeTurns(t *testing.T) {
	f := newFleet(&FleetConfig{})
	f.order = []string{"a", "b", "c", "d"}
	for _, n := range f.order {
		f.images[n] = &carried{admitted: n != "c", consumer: namedConsumer{name: n}}
	}
	order := func() string {
		var names []string
		for _, c := range f.imageConsumers() {
			names = append(names, c.(namedConsumer).name)
		}
		return strings.Join(names, "")
	}
	tests := []struct{ served, want string }{
		{"", "abd"}, {"a", "bda"}, {"b", "dab"}, {"d", "abd"}, {"c", "dab"}, {"gone", "abd"},
	}
	for _, tt := range tests {
		if tt.served != "" {
			f.served(tt.served)
		}
		if got := order(); got != tt.want {
			t.Errorf("after %q was served: asks %q, want %q", tt.served, got, tt.want)
		}
	}
}

// TestPinnedRequestForImageNotServed: a request pinned to a host for an
// image its --images leave out (a domain the host has, but does not serve
// as an image) is refused with image_not_found before anything is looked
// up or cloned; a pinned request for an image the host serves is built.
func TestPinnedRequestForImageNotServed(t *testing.T) {
	env := startServer(t)
	log := watchEvents(t, env.url)
	a := startFleetHostServing(t, env, "a", 0, 200*time.Millisecond, []string{"ci-*"}, "ci-debian", "accounting-vm")
	op := client.New(env.js)
	waitRegistered(t, op, map[string]int{"a": 1})
	if _, err := submitProvision(context.Background(), env.js, provisionFor("pinned-other", "accounting-vm"), "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := submitProvision(context.Background(), env.js, provisionFor("pinned-ci", "ci-debian"), "a"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "failed of pinned-other", func() bool { return log.has("pinned-other", messages.StateFailed) })
	waitFor(t, "agent_ready of pinned-ci", func() bool { return log.has("pinned-ci", messages.StateAgentReady) })
	evs := log.of("pinned-other")
	if len(evs) != 1 || evs[0].Error == nil || evs[0].Error.Code != messages.CodeImageNotFound {
		t.Fatalf("events of pinned-other: %+v, want only failed with image_not_found", evs)
	}
	if msg := evs[0].Error.Message; !strings.Contains(msg, "accounting-vm") || !strings.Contains(msg, "--images") {
		t.Fatalf("message %q does not say that the host does not serve the image", msg)
	}
	a.host.mu.Lock()
	_, cloned := a.host.machines["pinned-other"]
	a.host.mu.Unlock()
	if cloned {
		t.Fatal("the domain accounting-vm was cloned for a job")
	}
}

// unreadableRegistry is a registry whose host records cannot be read,
// as while the NATS nodes that hold them are down.
type unreadableRegistry struct{ Registry }

func (unreadableRegistry) Carriers(context.Context, string) ([]string, error) {
	return nil, errors.New("read the host registry: nats unreachable")
}

// TestSharedRequestFailsOnItsFinalDelivery: a shared request whose final
// delivery cannot read the host registry fails there (internal), rather
// than being handed back with no delivery left: the job would then end
// only by the server's max_deliveries advisory, which an outage of the
// NATS nodes can lose, and otherwise never.
func TestSharedRequestFailsOnItsFinalDelivery(t *testing.T) {
	env := startServer(t)
	log := watchEvents(t, env.url)
	startFleetHostWith(t, env, "a", 0, 0, nil, func(c *Config) {
		c.Fleet.Registry = unreadableRegistry{c.Fleet.Registry}
	}, "img")
	if _, err := submitProvision(context.Background(), env.js, provisionFor("unread", "nowhere"), ""); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "failed of unread", func() bool { return log.has("unread", messages.StateFailed) })
	evs := log.of("unread")
	if len(evs) != 1 || evs[0].Error == nil || evs[0].Error.Code != messages.CodeInternal || evs[0].Attempt != 3 {
		t.Fatalf("events of unread: %+v; want one failed, internal, on the final delivery (3)", evs)
	}
}
