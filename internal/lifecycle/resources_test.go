package lifecycle

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// ImageSize makes fakeMachines an ImageSizer: every image has 2 vCPUs
// and 512 MiB.
func (f *fakeMachines) ImageSize(_ context.Context, image string) (int, int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.images[image] {
		return 0, 0, provision.ErrImageNotFound
	}
	return 2, 512, nil
}

// TestSizesAndBounds: a request's size is its own where it gives one and
// its image's elsewhere; bounds on one machine and on the host's totals
// refuse what could never fit, naming the bound.
func TestSizesAndBounds(t *testing.T) {
	fx := newFixture()
	fx.m.cfg.Sizes = fx.fm
	fx.m.cfg.Resources = Resources{MaxVCPUs: 4, MaxMemoryMiB: 4096, HostVCPUs: 6, HostMemoryMiB: 8192, MaxScratchGiB: 100}
	req := fx.request("j1", "debian")
	if sz, err := fx.m.SizeOf(context.Background(), req); err != nil || sz != (Size{VCPUs: 2, MemoryMiB: 512}) {
		t.Fatalf("SizeOf(image's) = %v, %v", sz, err)
	}
	req.VCPUs = 3
	if sz, _ := fx.m.SizeOf(context.Background(), req); sz != (Size{VCPUs: 3, MemoryMiB: 512}) {
		t.Fatalf("SizeOf(3 vCPUs) = %v", sz)
	}
	req.Image = "nope"
	if _, err := fx.m.SizeOf(context.Background(), req); !errors.Is(err, provision.ErrImageNotFound) {
		t.Fatalf("SizeOf(no image) = %v", err)
	}
	for _, tt := range []struct {
		sz   Size
		flag string
	}{
		{Size{VCPUs: 4, MemoryMiB: 4096, ScratchGiB: 100}, ""},
		{Size{VCPUs: 5, MemoryMiB: 1024}, "--max-vcpus-per-machine 4"},
		{Size{VCPUs: 1, MemoryMiB: 5000}, "--max-memory-per-machine 4096"},
		{Size{VCPUs: 1, MemoryMiB: 1, ScratchGiB: 101}, "--max-scratch-gib 100"},
	} {
		err := fx.m.CheckBounds(tt.sz)
		if tt.flag == "" {
			if err != nil {
				t.Errorf("CheckBounds(%v) = %v", tt.sz, err)
			}
			continue
		}
		if !errors.Is(err, ErrBeyondBounds) || !strings.Contains(err.Error(), tt.flag) {
			t.Errorf("CheckBounds(%v) = %v, want %s named", tt.sz, err, tt.flag)
		}
	}
	fx.m.cfg.Resources = Resources{HostVCPUs: 6}
	if err := fx.m.CheckBounds(Size{VCPUs: 7, MemoryMiB: 1}); !errors.Is(err, ErrBeyondBounds) || !strings.Contains(err.Error(), "--host-vcpus 6") {
		t.Errorf("CheckBounds beyond the host total = %v", err)
	}
}

// TestReserveSize: reservations and machines share the host's totals; a
// size that does not fit waits for CapacityChanged, which a machine's end
// closes.
func TestReserveSize(t *testing.T) {
	fx := newFixture()
	fx.m.cfg.Sizes = fx.fm
	fx.m.cfg.Resources = Resources{HostVCPUs: 4, HostMemoryMiB: 2048}
	ctx := context.Background()
	req := fx.request("j1", "debian")
	req.VCPUs, req.MemoryMiB = 2, 1024
	release, ok := fx.m.ReserveSize("debian", Size{VCPUs: 2, MemoryMiB: 1024})
	if !ok {
		t.Fatal("the first machine does not fit")
	}
	if err := fx.m.Provision(ctx, req, first); err != nil {
		t.Fatal(err)
	}
	release()
	if used, _ := fx.m.Usage(); used != (Size{VCPUs: 2, MemoryMiB: 1024}) {
		t.Fatalf("Usage = %v", used)
	}
	release2, ok := fx.m.ReserveSize("debian", Size{VCPUs: 2, MemoryMiB: 1024})
	if !ok {
		t.Fatal("the second machine does not fit")
	}
	roomed := fx.m.CapacityChanged()
	if _, ok := fx.m.ReserveSize("debian", Size{VCPUs: 1, MemoryMiB: 1}); ok {
		t.Fatal("a third fits beyond the totals")
	}
	release2()
	<-roomed // the reservation went back
	if _, ok := fx.m.ReserveSize("debian", Size{VCPUs: 2, MemoryMiB: 1025}); ok {
		t.Fatal("more memory than is left fits")
	}
	roomed = fx.m.CapacityChanged()
	if err := fx.m.Teardown(ctx, "j1", "requested", nil, first); err != nil {
		t.Fatal(err)
	}
	<-roomed
	if _, ok := fx.m.ReserveSize("debian", Size{VCPUs: 4, MemoryMiB: 2048}); !ok {
		t.Fatal("all of the host does not fit an empty host")
	}
}

// TestStorageAdmission: what a machine may take of its pools counts
// against their room from its admission until it is gone, whether or not
// it wrote anything yet: a scratch disk its full size in the pool of the
// image's first disk, a copy clone the allocation of the image's disks.
// A machine that does not fit waits for room (a machine's end, or more
// found free); one that would not fit even with none of the host's
// machines left is beyond the host's storage.
func TestStorageAdmission(t *testing.T) {
	const gib = 1 << 30
	fx := newFixture()
	fx.fm.images["win"] = true
	ctx := context.Background()
	fx.m.SetStorage(Storage{
		Room: map[string]int64{"fast": 30 * gib, "big": 100 * gib},
		Images: map[string]ImageStorage{
			"debian": {ScratchPool: "fast"},
			"win":    {ScratchPool: "big", Clone: map[string]int64{"big": 40 * gib}},
		},
	})
	for _, tt := range []struct {
		image string
		sz    Size
		want  string // in the error; "" none
	}{
		{"debian", Size{ScratchGiB: 30}, ""},
		{"debian", Size{ScratchGiB: 31}, "pool fast"},
		{"win", Size{ScratchGiB: 60}, ""},
		{"win", Size{ScratchGiB: 61}, "pool big"},
		{"unknown", Size{ScratchGiB: 1000}, ""},
	} {
		err := fx.m.CheckStorage(tt.image, tt.sz)
		if (tt.want == "") != (err == nil) || err != nil && (!errors.Is(err, ErrBeyondStorage) || !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("CheckStorage(%s, %v) = %v, want %q", tt.image, tt.sz, err, tt.want)
		}
	}

	req := fx.request("j1", "debian")
	req.ScratchDiskGiB = 20
	release, ok := fx.m.ReserveSize("debian", Size{ScratchGiB: 20})
	if !ok {
		t.Fatal("20 GiB of scratch disk do not fit 30 GiB of room")
	}
	if err := fx.m.Provision(ctx, req, first); err != nil {
		t.Fatal(err)
	}
	release() // j1's machine holds the 20 GiB now
	if _, ok := fx.m.ReserveSize("debian", Size{ScratchGiB: 11}); ok {
		t.Fatal("11 GiB fit beside a machine holding 20 of 30")
	}
	release2, ok := fx.m.ReserveSize("debian", Size{ScratchGiB: 10})
	if !ok {
		t.Fatal("10 GiB do not fit beside a machine holding 20 of 30")
	}
	if _, ok := fx.m.ReserveSize("debian", Size{ScratchGiB: 1}); ok {
		t.Fatal("a reservation does not count")
	}
	release2()
	if err := fx.m.CheckStorage("debian", Size{ScratchGiB: 50}); err != nil {
		t.Errorf("50 GiB, which fit once j1 is gone: %v", err)
	}

	// Copy clones of win take 40 GiB each of big, scratch disk or not.
	var releases []func()
	for i := range 2 {
		r, ok := fx.m.ReserveSize("win", Size{})
		if !ok {
			t.Fatalf("copy clone %d of win does not fit", i+1)
		}
		releases = append(releases, r)
	}
	roomed := fx.m.CapacityChanged()
	if _, ok := fx.m.ReserveSize("win", Size{}); ok {
		t.Fatal("a third copy clone of win fits 100 GiB")
	}
	fx.m.SetStorage(Storage{
		Room: map[string]int64{"fast": 30 * gib, "big": 120 * gib},
		Images: map[string]ImageStorage{
			"debian": {ScratchPool: "fast"},
			"win":    {ScratchPool: "big", Clone: map[string]int64{"big": 40 * gib}},
		},
	})
	<-roomed // more room found
	if r, ok := fx.m.ReserveSize("win", Size{}); !ok {
		t.Fatal("a third copy clone of win does not fit 120 GiB")
	} else {
		releases = append(releases, r)
	}
	for _, r := range releases {
		r()
	}

	roomed = fx.m.CapacityChanged()
	if err := fx.m.Teardown(ctx, "j1", "requested", nil, first); err != nil {
		t.Fatal(err)
	}
	<-roomed
	if _, ok := fx.m.ReserveSize("debian", Size{ScratchGiB: 30}); !ok {
		t.Fatal("30 GiB do not fit an empty pool of 30 GiB room")
	}
}

// TestWarmPoolWithinStorage: a warm pool fills only as far as its copy
// clones fit the room of their pool.
func TestWarmPoolWithinStorage(t *testing.T) {
	fx, _ := poolFixture(t, 3, 5)
	fx.m.SetStorage(Storage{
		Room:   map[string]int64{"p": 100 << 30},
		Images: map[string]ImageStorage{"debian": {ScratchPool: "p", Clone: map[string]int64{"p": 40 << 30}}},
	})
	poolTick(t, fx.m)
	poolTick(t, fx.m)
	if idle := warmKeys(fx.fm, false); len(idle) != 2 {
		t.Fatalf("idle warm machines %v; want the 2 whose copies fit 100 GiB", idle)
	}
}

// TestIdleWarmMachinesAreStorageRoom: idle warm machines' claims are room
// for a provision, as their vCPUs and memory are: one of their image
// binds one and needs no new copy; a cold build that needs their room
// retires as many of them as it needs, and only those in its pool.
func TestIdleWarmMachinesAreStorageRoom(t *testing.T) {
	fx, _ := poolFixture(t, 2, 5)
	fx.fm.images["other"], fx.fm.images["elsewhere"] = true, true
	storage := Storage{
		Room: map[string]int64{"p": 100 << 30, "q": 100 << 30},
		Images: map[string]ImageStorage{
			"debian":    {ScratchPool: "p", Clone: map[string]int64{"p": 40 << 30}},
			"other":     {ScratchPool: "p"},
			"elsewhere": {ScratchPool: "q"},
		},
	}
	fx.m.SetStorage(storage)
	poolTick(t, fx.m)
	if idle := warmKeys(fx.fm, false); len(idle) != 2 {
		t.Fatalf("idle warm machines %v, want 2", idle)
	}
	ctx := context.Background()

	release, ok := fx.m.ReserveSize("debian", Size{VCPUs: 2, MemoryMiB: 512})
	if !ok {
		t.Fatal("a provision of debian, which binds an idle copy, does not fit")
	}
	release()
	release, ok = fx.m.ReserveSize("elsewhere", Size{ScratchGiB: 90})
	if !ok {
		t.Fatal("90 GiB of pool q do not fit")
	}
	req := fx.request("e1", "elsewhere")
	req.ScratchDiskGiB = 90
	if err := fx.m.Provision(ctx, req, first); err != nil {
		t.Fatal(err)
	}
	release()
	if idle := warmKeys(fx.fm, false); len(idle) != 2 {
		t.Fatalf("a build in pool q retired warm machines of pool p: %v left", idle)
	}
	release, ok = fx.m.ReserveSize("other", Size{ScratchGiB: 50})
	if !ok {
		t.Fatal("50 GiB of pool p do not fit beside two idle warm copies")
	}
	req = fx.request("o1", "other")
	req.ScratchDiskGiB = 50
	if err := fx.m.Provision(ctx, req, first); err != nil {
		t.Fatal(err)
	}
	release()
	if idle := warmKeys(fx.fm, false); len(idle) != 1 {
		t.Fatalf("idle warm machines %v, want 1: one retired for o1's room", idle)
	}
}
