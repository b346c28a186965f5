package provision

import (
	"context"
	"errors"
	"testing"
	"time"
)

// TestSystemHoldKeepsMachine: a hold recorded on a running machine is in
// its live and persistent metadata; PowerOff stops it and the hold, with
// the disks, survives; a second PowerOff is fine; a changed hold replaces
// the first, and the zero Hold clears it.
func TestSystemHoldKeepsMachine(t *testing.T) {
	l := systemConn(t)
	p := New(l, Options{DomainType: "qemu"})
	ctx := context.Background()
	job := testJobID(t)
	t.Cleanup(func() {
		if _, err := p.Remove(context.Background(), job); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	m, err := p.Clone(ctx, Spec{Host: testHost, JobID: job, Image: testImage()})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(ctx, job); err != nil {
		t.Fatal(err)
	}
	if _, err := p.SetHold(ctx, job, Hold{For: 90 * time.Second}); err != nil {
		t.Fatal(err)
	}
	got, _, err := p.Lookup(ctx, job)
	if err != nil || got.HoldFor != 90*time.Second || !got.HeldUntil.IsZero() || !got.Running {
		t.Fatalf("pending hold: %+v, %v", got, err)
	}
	until := time.Now().Add(time.Minute).UTC().Truncate(time.Second)
	if _, err := p.SetHold(ctx, job, Hold{Until: until}); err != nil {
		t.Fatal(err)
	}
	if err := p.PowerOff(ctx, job); err != nil {
		t.Fatal(err)
	}
	if err := p.PowerOff(ctx, job); err != nil {
		t.Fatalf("second PowerOff: %v", err)
	}
	got, found, err := p.Lookup(ctx, job)
	if err != nil || !found {
		t.Fatalf("Lookup: %v, %v", found, err)
	}
	if got.Running || !got.HeldUntil.Equal(until) || got.HoldFor != 0 || len(got.Volumes) != len(m.Volumes) {
		t.Fatalf("held machine %+v", got)
	}
	for _, v := range m.Volumes {
		if _, err := l.StorageVolLookupByPath(v); err != nil {
			t.Errorf("volume %s of the held machine: %v", v, err)
		}
	}
	if _, err := p.SetHold(ctx, job, Hold{}); err != nil {
		t.Fatalf("SetHold on a shut-off machine: %v", err)
	}
	if got, _, _ := p.Lookup(ctx, job); !got.HeldUntil.IsZero() {
		t.Fatalf("cleared hold: %+v", got)
	}
	if _, err := p.SetHold(ctx, "no-such-job-"+job, Hold{}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("SetHold of no machine: %v", err)
	}
}

// TestSystemImageSize reports the test image's own size, and an image
// that does not exist as ErrImageNotFound.
func TestSystemImageSize(t *testing.T) {
	l := systemConn(t)
	p := New(l, Options{DomainType: "qemu"})
	vcpus, mib, err := p.ImageSize(context.Background(), testImage())
	if err != nil || vcpus < 1 || mib < 32 {
		t.Fatalf("ImageSize = %d, %d, %v", vcpus, mib, err)
	}
	if _, _, err := p.ImageSize(context.Background(), "no-such-image-here"); !errors.Is(err, ErrImageNotFound) {
		t.Fatalf("ImageSize of no image: %v", err)
	}
}
