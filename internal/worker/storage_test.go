package worker

import (
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// TestScratchDisksCountAgainstPoolSpace: a host whose image's pool has
// 20 GiB free and keeps --min-free-space 2 GiB has room for one 10 GiB
// scratch disk. A 30 GiB one can never fit and is refused with
// insufficient_storage, nothing built; a second 10 GiB one waits until
// the first machine is gone, although its sparse disk takes no space yet.
func TestScratchDisksCountAgainstPoolSpace(t *testing.T) {
	env := startServer(t)
	log := watchEvents(t, env.url)
	h := startFleetHost(t, env, "h", 2<<30, "img")
	h.inv.mu.Lock()
	h.inv.free = 20 << 30
	h.inv.mu.Unlock()
	op := client.New(env.js)
	waitFor(t, "the record showing 20 GiB free", func() bool {
		hosts, err := op.Hosts(context.Background())
		return err == nil && len(hosts) == 1 && len(hosts[0].Pools) == 1 && hosts[0].Pools[0].FreeBytes == 20<<30
	})
	submit := func(job string, scratchGiB int) {
		t.Helper()
		req := provisionFor(job, "img")
		req.ScratchDiskGiB = scratchGiB
		if _, err := submitProvision(context.Background(), env.js, req, "h"); err != nil {
			t.Fatal(err)
		}
	}

	submit("huge", 30)
	waitFor(t, "failed of huge", func() bool { return log.has("huge", messages.StateFailed) })
	if evs := log.of("huge"); len(evs) != 1 || evs[0].Error == nil || evs[0].Error.Code != messages.CodeInsufficientStorage {
		t.Fatalf("events of huge %+v, want one failed with insufficient_storage", evs)
	}

	submit("s1", 10)
	waitFor(t, "agent_ready of s1", func() bool { return log.has("s1", messages.StateAgentReady) })
	submit("s2", 10)
	waitFor(t, "s2 pulled", func() bool {
		info, err := h.w.cons.Pinned.Info(context.Background())
		return err == nil && info.NumPending == 0 && (info.NumAckPending == 1 || log.has("s2", messages.StateAccepted))
	})
	if err := submitTeardown(context.Background(), env.js, "s1", "h"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "agent_ready of s2", func() bool { return log.has("s2", messages.StateAgentReady) })
	var down, accepted time.Time
	for _, ev := range log.of("s1") {
		if ev.State == messages.StateTearingDown {
			down = ev.Time
		}
	}
	for _, ev := range log.of("s2") {
		if ev.State == messages.StateAccepted {
			accepted = ev.Time
		}
	}
	if down.IsZero() || accepted.Before(down) {
		t.Fatalf("s2 accepted at %v, s1 tearing down at %v: s2 was built while s1 held the pool's room", accepted, down)
	}
	if h.host.count() != 1 {
		t.Fatalf("%d machines, want s2's alone", h.host.count())
	}
}

// TestStorageOf: the room of a pool is its free space less
// --min-free-space; a scratch disk goes into the pool of the image's
// first disk; a copy clone claims its image's disks' allocation, a
// linked one nothing.
func TestStorageOf(t *testing.T) {
	images := map[string]provision.ImageReport{
		"linked": {CloneMode: provision.CloneLinked, Disks: []provision.ImageDisk{{Pool: "a", Allocation: 5 << 30}, {Pool: "b", Allocation: 1 << 30}}},
		"copy": {CloneMode: provision.CloneCopy, Disks: []provision.ImageDisk{
			{Pool: "b", Allocation: 5 << 30}, {Pool: "a", Allocation: 1 << 30}, {Pool: "b", Allocation: 2 << 30}}},
		"diskless": {CloneMode: provision.CloneLinked},
	}
	got := storageOf(images, map[string]uint64{"a": 10 << 30, "b": 1 << 30}, 2<<30)
	want := lifecycle.Storage{
		Room: map[string]int64{"a": 8 << 30, "b": -1 << 30},
		Images: map[string]lifecycle.ImageStorage{
			"linked":   {ScratchPool: "a"},
			"copy":     {ScratchPool: "b", Clone: map[string]int64{"a": 1 << 30, "b": 7 << 30}},
			"diskless": {},
		},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("storageOf =\n %+v\nwant\n %+v", got, want)
	}
}

// TestScratchBoundInRecord: the host's record carries --max-scratch-gib,
// and a request handed back for another host goes only to one whose
// bounds admit its scratch disk.
func TestScratchBoundInRecord(t *testing.T) {
	life := lifecycle.New(lifecycle.Config{Host: "h", Resources: lifecycle.Resources{MaxScratchGiB: 50}})
	defer life.Close()
	w := New(Config{Fleet: &FleetConfig{Host: "h"}}, bus.Consumers{}, life)
	if rec := w.record(); rec.MaxScratchGiB != 50 {
		t.Errorf("record's max_scratch_gib = %d, want 50", rec.MaxScratchGiB)
	}
	req := provisionFor("j", "img")
	for _, tt := range []struct {
		name    string
		bound   int
		scratch int
		want    bool
	}{
		{"within", 50, 50, true},
		{"beyond", 50, 51, false},
		{"no bound", 0, 65536, true},
		{"no scratch disk", 1, 0, true},
	} {
		req.ScratchDiskGiB = tt.scratch
		if got := admits(messages.Host{MaxScratchGiB: tt.bound}, req); got != tt.want {
			t.Errorf("%s: admits = %v, want %v", tt.name, got, tt.want)
		}
	}
}
