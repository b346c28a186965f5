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
	fx.m.cfg.Resources = Resources{MaxVCPUs: 4, MaxMemoryMiB: 4096, HostVCPUs: 6, HostMemoryMiB: 8192}
	req := fx.request("j1", "debian")
	if sz, err := fx.m.SizeOf(context.Background(), req); err != nil || sz != (Size{2, 512}) {
		t.Fatalf("SizeOf(image's) = %v, %v", sz, err)
	}
	req.VCPUs = 3
	if sz, _ := fx.m.SizeOf(context.Background(), req); sz != (Size{3, 512}) {
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
		{Size{4, 4096}, ""},
		{Size{5, 1024}, "--max-vcpus-per-machine 4"},
		{Size{1, 5000}, "--max-memory-per-machine 4096"},
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
	if err := fx.m.CheckBounds(Size{7, 1}); !errors.Is(err, ErrBeyondBounds) || !strings.Contains(err.Error(), "--host-vcpus 6") {
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
	release, ok := fx.m.ReserveSize(Size{2, 1024})
	if !ok {
		t.Fatal("the first machine does not fit")
	}
	if err := fx.m.Provision(ctx, req, first); err != nil {
		t.Fatal(err)
	}
	release()
	if used, _ := fx.m.Usage(); used != (Size{2, 1024}) {
		t.Fatalf("Usage = %v", used)
	}
	release2, ok := fx.m.ReserveSize(Size{2, 1024})
	if !ok {
		t.Fatal("the second machine does not fit")
	}
	roomed := fx.m.CapacityChanged()
	if _, ok := fx.m.ReserveSize(Size{1, 1}); ok {
		t.Fatal("a third fits beyond the totals")
	}
	release2()
	<-roomed // the reservation went back
	if _, ok := fx.m.ReserveSize(Size{2, 1025}); ok {
		t.Fatal("more memory than is left fits")
	}
	roomed = fx.m.CapacityChanged()
	if err := fx.m.Teardown(ctx, "j1", "requested", nil, first); err != nil {
		t.Fatal(err)
	}
	<-roomed
	if _, ok := fx.m.ReserveSize(Size{4, 2048}); !ok {
		t.Fatal("all of the host does not fit an empty host")
	}
}
