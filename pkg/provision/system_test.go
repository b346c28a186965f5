package provision

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// testImage names the real image the system test clones.
func testImage() string {
	if name := os.Getenv("STRETCHY_TEST_IMAGE"); name != "" {
		return name
	}
	return "tiny-linux"
}

// qemuImgInfo is the part of `qemu-img info --output=json` the test reads.
type qemuImgInfo struct {
	Format                string `json:"format"`
	VirtualSize           uint64 `json:"virtual-size"`
	BackingFilename       string `json:"backing-filename"`
	BackingFilenameFormat string `json:"backing-filename-format"`
}

// TestSystemCloneStartRemove clones the real image on qemu:///system, boots
// the clone under TCG and removes it again.
func TestSystemCloneStartRemove(t *testing.T) {
	l := dial(t, string(libvirt.QEMUSystem))
	ctx := t.Context()
	imageName := testImage()
	img, err := l.DomainLookupByName(imageName)
	if isNoDomain(err) {
		if os.Getenv("STRETCHY_REQUIRE_LIBVIRT") == "1" {
			t.Fatalf("image %s not defined on %s", imageName, libvirt.QEMUSystem)
		}
		t.Skipf("image %s not defined on %s; set STRETCHY_TEST_IMAGE", imageName, libvirt.QEMUSystem)
	}
	if err != nil {
		t.Fatal(err)
	}
	doc, err := l.DomainGetXMLDesc(img, libvirt.DomainXMLInactive)
	if err != nil {
		t.Fatal(err)
	}
	var imgDef libvirtxml.Domain
	if err := imgDef.Unmarshal(doc); err != nil {
		t.Fatal(err)
	}
	disks, err := writableDisks(&imgDef)
	if err != nil || len(disks) == 0 {
		t.Fatalf("image %s: writable disks %v, %v", imageName, disks, err)
	}
	before := make(map[string]fs.FileInfo)
	for _, d := range disks {
		fi, err := os.Stat(d.Path)
		if err != nil {
			t.Fatal(err)
		}
		before[d.Path] = fi
	}

	p := New(l, Options{DomainType: "qemu"})
	job := testJobID(t)
	begin := time.Now()
	m := clone(t, p, Spec{Host: testHost, JobID: job, Image: imageName, RunnerKind: "none", RequestedAt: begin})
	cloned := time.Since(begin)
	// Allocation before the guest writes anything: the qcow2 header only.
	allocs := make([]uint64, len(m.Volumes))
	for i, path := range m.Volumes {
		vx := volumeXML(t, l, path)
		allocs[i] = vx.Allocation.Value
		if vx.Allocation.Value > 1<<20 {
			t.Errorf("volume %s allocates %d bytes, want a thin overlay (< 1 MiB)", path, vx.Allocation.Value)
		}
	}
	if err := p.Start(ctx, job); err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Logf("clone+define %v, +start %v (image %s, volume allocations %v bytes)", cloned, time.Since(begin), imageName, allocs)

	got, ok, err := p.Lookup(ctx, job)
	if err != nil || !ok || !got.Running || got.Image != imageName {
		t.Fatalf("Lookup = %+v, %v, %v; want a running clone of %s", got, ok, err, imageName)
	}
	dom, err := l.DomainLookupByName(DomainName(job))
	if err != nil {
		t.Fatal(err)
	}
	if state, _, err := l.DomainGetState(dom, 0); err != nil || libvirt.DomainState(state) != libvirt.DomainRunning {
		t.Errorf("domain state = %d, %v; want running", state, err)
	}
	if def := domainXML(t, l, DomainName(job)); def.Type != "qemu" {
		t.Errorf("domain type = %s, want qemu", def.Type)
	}
	if len(m.Volumes) != len(disks) {
		t.Fatalf("volumes %q for disks %+v", m.Volumes, disks)
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Logf("no qemu-img, backing files checked through libvirt only: %v", err)
	}
	for i, path := range m.Volumes {
		vx := volumeXML(t, l, path)
		if vx.BackingStore == nil || vx.BackingStore.Path != disks[i].Path {
			t.Errorf("volume %s: backing store %+v, want %s", path, vx.BackingStore, disks[i].Path)
		}
		if _, err := exec.LookPath("qemu-img"); err != nil {
			continue
		}
		// -U: the running guest holds the write lock.
		out, err := exec.CommandContext(ctx, "qemu-img", "info", "-U", "--output=json", path).Output()
		if err != nil {
			t.Fatalf("qemu-img info %s: %v", path, err)
		}
		var info qemuImgInfo
		if err := json.Unmarshal(out, &info); err != nil {
			t.Fatal(err)
		}
		if info.Format != "qcow2" || info.BackingFilename != disks[i].Path || info.BackingFilenameFormat == "" {
			t.Errorf("qemu-img info %s = %+v; want qcow2 backed by %s with its format recorded", path, info, disks[i].Path)
		}
	}

	existed, err := p.Remove(ctx, job)
	if err != nil || !existed {
		t.Fatalf("Remove = %v, %v; want true, nil", existed, err)
	}
	if _, err := l.DomainLookupByName(DomainName(job)); !isNoDomain(err) {
		t.Errorf("domain after Remove: %v", err)
	}
	for _, path := range m.Volumes {
		if _, err := l.StorageVolLookupByPath(path); !isNoStorageVol(err) {
			t.Errorf("volume %s after Remove: %v", path, err)
		}
		if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("file %s after Remove: %v", path, err)
		}
	}
	for path, fi := range before {
		now, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if now.Size() != fi.Size() || !now.ModTime().Equal(fi.ModTime()) {
			t.Errorf("image disk %s changed: size %d -> %d, mtime %v -> %v", path, fi.Size(), now.Size(), fi.ModTime(), now.ModTime())
		}
	}
	if state, _, err := l.DomainGetState(img, 0); err != nil || libvirt.DomainState(state) != libvirt.DomainShutoff {
		t.Errorf("image state = %d, %v; want shut off", state, err)
	}
}
