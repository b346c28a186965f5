package provision

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Tests of Clone and Remove on the real libvirtd (qemu:///system) with
// real QEMU guests under TCG. Each defines its own images where it needs
// another shape than the tiny guest's, and leaves nothing behind.

// TestSystemLinkedCloneBoots boots linked clones of a type='file' and a
// type='volume' image, writes inside them through the guest agent, and
// checks that nothing reached the image.
func TestSystemLinkedCloneBoots(t *testing.T) {
	l := systemConn(t)
	tests := []struct {
		name  string
		image func(t *testing.T) (string, map[string]string)
	}{
		{"file disk", func(t *testing.T) (string, map[string]string) {
			return testImage(), map[string]string{"vda": "/var/lib/libvirt/ci-images/" + testImage() + ".qcow2"}
		}},
		{"volume disks", func(t *testing.T) (string, map[string]string) {
			img := defineTestImage(t, l, imageShape{rootVolume: true, extraDisks: true})
			return img.Name, img.Disks
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := t.Context()
			imageName, disks := tt.image(t)
			type stamp struct {
				sum   string
				mtime time.Time
			}
			before := map[string]stamp{}
			for _, path := range disks {
				sum, mtime := fileSum(t, path)
				before[path] = stamp{sum, mtime}
			}
			p := New(l, Options{DomainType: "qemu"})
			job := testJobID(t)
			m := clone(t, p, Spec{Host: testHost, JobID: job, Image: imageName, RunnerKind: "none"})
			if m.CloneMode != CloneLinked || len(m.Volumes) != len(disks) {
				t.Fatalf("machine %+v; want a linked clone with %d volumes", m, len(disks))
			}
			def := domainXML(t, l, m.Name)
			for i, path := range m.Volumes {
				vx := volumeXML(t, l, path)
				target := def.Devices.Disks[i].Target.Dev
				if vx.BackingStore == nil || vx.BackingStore.Path != disks[target] || vx.Target.Format.Type != "qcow2" {
					t.Errorf("volume %s: format %+v backing %+v; want a qcow2 overlay of %s", path, vx.Target.Format, vx.BackingStore, disks[target])
				}
				if d := def.Devices.Disks[i]; d.Source.File == nil || d.Source.File.File != path {
					t.Errorf("disk %s: source %+v, want type='file' %s", target, d.Source, path)
				}
			}
			if err := p.Start(ctx, job); err != nil {
				t.Fatalf("Start: %v", err)
			}
			if s := domainState(t, l, m.Name); s != libvirt.DomainRunning {
				t.Fatalf("state %v, want running", s)
			}
			dom := waitAgent(t, l, m.Name, 60*time.Second)
			if code, out := guestExec(t, l, dom, "/bin/sh", "-c", "echo x > /root/marker; sync; cat /root/marker"); code != 0 || out != "x\n" {
				t.Fatalf("writing in the guest: exit %d, output %q", code, out)
			}
			if existed, err := p.Remove(ctx, job); err != nil || !existed {
				t.Fatalf("Remove = %v, %v", existed, err)
			}
			for path, was := range before {
				sum, mtime := fileSum(t, path)
				if sum != was.sum || !mtime.Equal(was.mtime) {
					t.Errorf("image disk %s changed: sha256 %s -> %s, mtime %v -> %v", path, was.sum, sum, was.mtime, mtime)
				}
			}
			for _, path := range m.Volumes {
				if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("volume %s after Remove: %v", path, err)
				}
			}
		})
	}
}

// TestSystemUEFIClone clones UEFI images whose NVRAM is a pool volume or a
// file outside any pool; each clone boots with its own copy.
func TestSystemUEFIClone(t *testing.T) {
	l := systemConn(t)
	for _, where := range []string{"volume", "file"} {
		t.Run("nvram "+where, func(t *testing.T) {
			ctx := t.Context()
			img := defineTestImage(t, l, imageShape{uefi: where})
			imageVars, err := os.ReadFile(img.NVRAM)
			if err != nil {
				t.Fatal(err)
			}
			p := New(l, Options{DomainType: "qemu"})
			job := testJobID(t)
			m := clone(t, p, Spec{Host: testHost, JobID: job, Image: img.Name})
			def := domainXML(t, l, m.Name)
			nvram := imageNVRAM(def)
			want := filepath.Join("/var/lib/libvirt/ci-images", nvramVolumeName(job))
			if nvram != want || !slices.Contains(m.Volumes, nvram) {
				t.Fatalf("clone NVRAM %s (volumes %q); want %s, recorded", nvram, m.Volumes, want)
			}
			if def.OS.NVRam.Template != "/usr/share/OVMF/OVMF_VARS.fd" || def.OS.Loader.Path != "/usr/share/OVMF/OVMF_CODE.fd" {
				t.Errorf("firmware = %+v, %+v", def.OS.Loader, def.OS.NVRam)
			}
			if _, err := l.StorageVolLookupByPath(nvram); err != nil {
				t.Errorf("clone NVRAM is not a pool volume: %v", err)
			}
			cloneVars, err := os.ReadFile(nvram)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(cloneVars, imageVars) {
				t.Errorf("clone NVRAM (%d bytes) differs from the image's (%d bytes)", len(cloneVars), len(imageVars))
			}
			if err := p.Start(ctx, job); err != nil {
				t.Fatalf("Start: %v", err)
			}
			if s := domainState(t, l, m.Name); s != libvirt.DomainRunning {
				t.Fatalf("state %v, want running", s)
			}
			// OVMF records its boot entries in the variable store early on.
			deadline := time.Now().Add(60 * time.Second)
			for time.Now().Before(deadline) {
				if now, _ := os.ReadFile(nvram); !bytes.Equal(now, imageVars) {
					break
				}
				time.Sleep(500 * time.Millisecond)
			}
			if now, _ := os.ReadFile(nvram); bytes.Equal(now, imageVars) {
				t.Log("the firmware did not write its variables within 60s")
			}
			if after, _ := os.ReadFile(img.NVRAM); !bytes.Equal(after, imageVars) {
				t.Errorf("the image's NVRAM %s changed while the clone ran", img.NVRAM)
			}
			if existed, err := p.Remove(ctx, job); err != nil || !existed {
				t.Fatalf("Remove = %v, %v", existed, err)
			}
			if _, err := os.Stat(nvram); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("clone NVRAM after Remove: %v", err)
			}
			if _, err := l.StorageVolLookupByPath(nvram); !isNoStorageVol(err) {
				t.Errorf("clone NVRAM volume after Remove: %v", err)
			}
			if _, err := os.Stat(img.NVRAM); err != nil {
				t.Errorf("image NVRAM after Remove: %v", err)
			}
		})
	}
}

// TestSystemCopyMode clones an image whose metadata asks for copies.
func TestSystemCopyMode(t *testing.T) {
	l := systemConn(t)
	img := defineTestImage(t, l, imageShape{extraDisks: true,
		metadata: `<stretchy:image xmlns:stretchy="https://stretchy-ci.dev/xmlns/libvirt-worker/1" clone-mode="copy" os="linux"/>`})
	p := New(l, Options{DomainType: "qemu"})
	job := testJobID(t)
	m := clone(t, p, Spec{Host: testHost, JobID: job, Image: img.Name})
	if m.CloneMode != CloneCopy || m.OS != "linux" {
		t.Errorf("clone mode %q, os %q; want the image's copy, linux", m.CloneMode, m.OS)
	}
	wantFormats := []string{"qcow2", "raw"}
	for i, path := range m.Volumes {
		vx := volumeXML(t, l, path)
		src := volumeXML(t, l, img.Disks[[]string{"vda", "vdb"}[i]])
		if vx.BackingStore != nil || vx.Target.Format.Type != wantFormats[i] || vx.Capacity.Value != src.Capacity.Value {
			t.Errorf("volume %s: backing %+v format %s capacity %d; want an independent %s of %d bytes",
				path, vx.BackingStore, vx.Target.Format.Type, vx.Capacity.Value, wantFormats[i], src.Capacity.Value)
		}
		if out, err := exec.Command("qemu-img", "info", "--output=json", path).Output(); err == nil {
			var info qemuImgInfo
			if json.Unmarshal(out, &info) == nil && info.BackingFilename != "" {
				t.Errorf("qemu-img: %s has backing file %s", path, info.BackingFilename)
			}
		}
	}
	got, ok, err := p.Lookup(t.Context(), job)
	if err != nil || !ok || got.CloneMode != CloneCopy || got.OS != "linux" {
		t.Errorf("Lookup = %+v, %v, %v", got, ok, err)
	}
	// The request's mode beats the image's.
	job2 := testJobID(t)
	m2 := clone(t, p, Spec{Host: testHost, JobID: job2, Image: img.Name, CloneMode: CloneLinked})
	if vx := volumeXML(t, l, m2.Volumes[0]); m2.CloneMode != CloneLinked || vx.BackingStore == nil {
		t.Errorf("Spec.CloneMode linked gave %q with backing %+v", m2.CloneMode, vx.BackingStore)
	}
}

// TestSystemReflinkMode clones through FICLONE where the pool's file
// system can share extents, and otherwise expects ErrReflinkUnsupported.
func TestSystemReflinkMode(t *testing.T) {
	l := systemConn(t)
	p := New(l, Options{DomainType: "qemu"})
	job := testJobID(t)
	t.Cleanup(func() { _, _ = p.Remove(context.Background(), job) })
	m, err := p.Clone(t.Context(), Spec{Host: testHost, JobID: job, Image: testImage(), CloneMode: CloneReflink})
	fsys := fsName("/var/lib/libvirt/ci-images")
	if err != nil {
		if !errors.Is(err, ErrReflinkUnsupported) || !errors.Is(err, ErrImageInvalid) {
			t.Fatalf("Clone = %v; want ErrReflinkUnsupported and ErrImageInvalid", err)
		}
		for _, part := range []string{"pool " + testPool, fsys} {
			if !strings.Contains(err.Error(), part) {
				t.Errorf("error %q does not name %q", err, part)
			}
		}
		t.Logf("on %s: %v", fsys, err)
		if left := poolVolumeNames(t, l, DomainName(job)); len(left) > 0 {
			t.Errorf("failed reflink Clone left %q", left)
		}
		return
	}
	t.Logf("reflink works on %s", fsys)
	vx := volumeXML(t, l, m.Volumes[0])
	if vx.BackingStore != nil || vx.Target.Format.Type != "qcow2" {
		t.Errorf("reflink volume: backing %+v, format %+v", vx.BackingStore, vx.Target.Format)
	}
}

// TestSystemMACsUnique makes 50 clones, five at a time, and checks that
// their addresses are distinct, keep the image's OUI and clash with no
// domain on the host.
func TestSystemMACsUnique(t *testing.T) {
	l := systemConn(t)
	p := New(l, Options{DomainType: "qemu"})
	imgDef := domainXML(t, l, testImage())
	imgMAC := strings.ToLower(imgDef.Devices.Interfaces[0].MAC.Address)
	jobs := make(chan string)
	var mu sync.Mutex
	var machines []Machine
	var wg sync.WaitGroup
	for range 5 {
		wg.Go(func() {
			for job := range jobs {
				m, err := p.Clone(t.Context(), Spec{Host: testHost, JobID: job, Image: testImage()})
				if err != nil {
					t.Errorf("Clone %s: %v", job, err)
					continue
				}
				mu.Lock()
				machines = append(machines, m)
				mu.Unlock()
			}
		})
	}
	for range 50 {
		job := testJobID(t)
		t.Cleanup(func() {
			if _, err := p.Remove(context.Background(), job); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		})
		jobs <- job
	}
	close(jobs)
	wg.Wait()
	if len(machines) != 50 {
		t.Fatalf("%d clones", len(machines))
	}
	owners := map[string]string{}
	doms, _, err := l.ConnectListAllDomains(1, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range doms {
		for _, mac := range domainMACs(domainXML(t, l, d.Name)) {
			if other, dup := owners[mac]; dup {
				t.Errorf("MAC %s used by %s and %s", mac, other, d.Name)
			}
			owners[mac] = d.Name
		}
	}
	for _, m := range machines {
		macs := domainMACs(domainXML(t, l, m.Name))
		if len(macs) != 1 {
			t.Fatalf("%s has MACs %q", m.Name, macs)
		}
		hw, _ := net.ParseMAC(macs[0])
		if macs[0] == imgMAC || hw[:3].String() != imgMAC[:8] {
			t.Errorf("%s: MAC %s, image has %s", m.Name, macs[0], imgMAC)
		}
	}
}

// cancelAfterVolume is the real connection, except that the context of
// the Clone is canceled as soon as its first volume exists.
type cancelAfterVolume struct {
	Conn
	cancel context.CancelFunc
}

func (c cancelAfterVolume) StorageVolCreateXML(pool libvirt.StoragePool, xml string, flags libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error) {
	vol, err := c.Conn.StorageVolCreateXML(pool, xml, flags)
	c.cancel()
	return vol, err
}

// TestSystemCloneFailureLeavesNothing injects failures after volumes (disk
// overlays and the NVRAM copy) were created.
func TestSystemCloneFailureLeavesNothing(t *testing.T) {
	l := systemConn(t)
	img := defineTestImage(t, l, imageShape{extraDisks: true, uefi: "file"})
	tests := []struct {
		name string
		conn func(cancel context.CancelFunc) Conn
	}{
		{"define fails", func(context.CancelFunc) Conn { return failingDefine{l} }},
		{"canceled after first volume", func(cancel context.CancelFunc) Conn { return cancelAfterVolume{l, cancel} }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			job := testJobID(t)
			p := New(tt.conn(cancel), Options{DomainType: "qemu"})
			_, err := p.Clone(ctx, Spec{Host: testHost, JobID: job, Image: img.Name})
			if err == nil {
				_, _ = New(l, Options{}).Remove(context.Background(), job)
				t.Fatal("Clone succeeded")
			}
			t.Logf("Clone: %v", err)
			if left := poolVolumeNames(t, l, DomainName(job)); len(left) > 0 {
				t.Errorf("failed Clone left volumes %q", left)
			}
			if _, err := l.DomainLookupByName(DomainName(job)); !isNoDomain(err) {
				t.Errorf("failed Clone left domain: %v", err)
			}
		})
	}
}

// TestSystemOrphanVolumes simulates a worker killed between creating
// volumes and defining the domain.
func TestSystemOrphanVolumes(t *testing.T) {
	l := systemConn(t)
	p := New(l, Options{DomainType: "qemu"})
	ctx := t.Context()

	t.Run("Clone sweeps them", func(t *testing.T) {
		job := testJobID(t)
		orphan := createVolume(t, l, volumeName(job, "vda", "qcow2"), 1<<20)
		orphans, err := p.ListOrphanVolumes(ctx)
		if err != nil || !slices.Contains(orphans, orphan) {
			t.Fatalf("ListOrphanVolumes = %q, %v; want %s among them", orphans, err, orphan)
		}
		m := clone(t, p, Spec{Host: testHost, JobID: job, Image: testImage()})
		if m.Volumes[0] != orphan {
			t.Fatalf("clone volume %s, want %s", m.Volumes[0], orphan)
		}
		// The raw orphan was replaced by a fresh overlay.
		if vx := volumeXML(t, l, orphan); vx.BackingStore == nil || vx.Target.Format.Type != "qcow2" {
			t.Errorf("volume %s after Clone: format %+v, backing %+v", orphan, vx.Target.Format, vx.BackingStore)
		}
		if orphans, _ := p.ListOrphanVolumes(ctx); slices.Contains(orphans, orphan) {
			t.Errorf("volume of a defined machine listed as orphan")
		}
	})

	t.Run("Remove deletes them", func(t *testing.T) {
		job := testJobID(t)
		disk := createVolume(t, l, volumeName(job, "vda", "qcow2"), 1<<20)
		nvram := createVolume(t, l, nvramVolumeName(job), 1<<17)
		other := createVolume(t, l, volumeName(job+"-x", "vda", "qcow2"), 1<<20) // job "<job>-x"
		existed, err := p.Remove(ctx, job)
		if err != nil || !existed {
			t.Fatalf("Remove = %v, %v; want true, nil", existed, err)
		}
		for _, path := range []string{disk, nvram} {
			if _, err := l.StorageVolLookupByPath(path); !isNoStorageVol(err) {
				t.Errorf("orphan %s after Remove: %v", path, err)
			}
		}
		if _, err := l.StorageVolLookupByPath(other); err != nil {
			t.Errorf("another job's orphan was deleted: %v", err)
		}
		if existed, err := p.Remove(ctx, job); err != nil || existed {
			t.Errorf("second Remove = %v, %v; want false, nil", existed, err)
		}
	})
}

// TestSystemForeignDomainUntouched defines an unmanaged domain that uses a
// volume named like a job's, and checks that nothing here touches either.
func TestSystemForeignDomainUntouched(t *testing.T) {
	l := systemConn(t)
	p := New(l, Options{DomainType: "qemu"})
	ctx := t.Context()
	img := defineTestImage(t, l, imageShape{})
	job := testJobID(t)
	borrowed := createVolume(t, l, volumeName(job, "vdb", "img"), 1<<20)
	def := domainXML(t, l, img.Name)
	def.Devices.Disks = append(def.Devices.Disks, libvirtxml.DomainDisk{
		Device: "disk",
		Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"},
		Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: borrowed}},
		Target: &libvirtxml.DomainDiskTarget{Dev: "vdb", Bus: "virtio"},
	})
	doc, err := def.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.DomainDefineXMLFlags(doc, 0); err != nil {
		t.Fatal(err)
	}
	before, err := l.DomainGetXMLDesc(must[libvirt.Domain](t)(l.DomainLookupByName(img.Name)), libvirt.DomainXMLInactive)
	if err != nil {
		t.Fatal(err)
	}

	machines, err := p.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range machines {
		if m.Name == img.Name || !strings.HasPrefix(m.Name, Prefix) {
			t.Errorf("List returned unmanaged domain %s", m.Name)
		}
	}
	if orphans, err := p.ListOrphanVolumes(ctx); err != nil || slices.Contains(orphans, borrowed) {
		t.Errorf("ListOrphanVolumes = %q, %v; must not list %s, which %s uses", orphans, err, borrowed, img.Name)
	}
	if existed, err := p.Remove(ctx, job); existed || err == nil || !strings.Contains(err.Error(), borrowed) {
		t.Errorf("Remove(%s) = %v, %v; want false and an error naming %s", job, existed, err, borrowed)
	}
	if _, err := p.Clone(ctx, Spec{Host: testHost, JobID: job, Image: testImage()}); err == nil {
		_, _ = p.Remove(context.Background(), job)
		t.Error("Clone over a volume in use succeeded")
	}
	if existed, err := p.Remove(ctx, img.Name); existed || err != nil {
		t.Errorf("Remove(%s) = %v, %v; want nothing to do", img.Name, existed, err)
	}
	if _, err := p.Clone(ctx, Spec{Host: testHost, JobID: job, Image: "stretchy-" + job}); !errors.Is(err, ErrImageInvalid) {
		t.Errorf("Clone of a managed name as image = %v", err)
	}

	after, err := l.DomainGetXMLDesc(must[libvirt.Domain](t)(l.DomainLookupByName(img.Name)), libvirt.DomainXMLInactive)
	if err != nil {
		t.Fatal(err)
	}
	if after != before {
		t.Errorf("unmanaged domain %s changed:\n%s\n->\n%s", img.Name, before, after)
	}
	if s := domainState(t, l, img.Name); s != libvirt.DomainShutoff {
		t.Errorf("unmanaged domain state %v", s)
	}
	if _, err := l.StorageVolLookupByPath(borrowed); err != nil {
		t.Errorf("borrowed volume deleted: %v", err)
	}
}

// TestSystemRefusesDiskOutsidePools defines an image with a writable disk
// outside every pool: Clone refuses it, naming image, disk and path.
func TestSystemRefusesDiskOutsidePools(t *testing.T) {
	l := systemConn(t)
	img := defineTestImage(t, l, imageShape{})
	loose := filepath.Join(t.TempDir(), "loose.img")
	if err := os.WriteFile(loose, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	def := domainXML(t, l, img.Name)
	def.Devices.Disks = append(def.Devices.Disks, libvirtxml.DomainDisk{
		Device: "disk",
		Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"},
		Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: loose}},
		Target: &libvirtxml.DomainDiskTarget{Dev: "vdb", Bus: "virtio"},
	})
	doc, err := def.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.DomainDefineXMLFlags(doc, 0); err != nil {
		t.Fatal(err)
	}
	job := testJobID(t)
	_, err = New(l, Options{}).Clone(t.Context(), Spec{Host: testHost, JobID: job, Image: img.Name})
	if !errors.Is(err, ErrImageInvalid) {
		t.Fatalf("Clone = %v, want ErrImageInvalid", err)
	}
	for _, part := range []string{"image " + img.Name, "disk vdb", loose, "outside every storage pool"} {
		if !strings.Contains(err.Error(), part) {
			t.Errorf("error %q does not mention %q", err, part)
		}
	}
	if left := poolVolumeNames(t, l, DomainName(job)); len(left) > 0 {
		t.Errorf("refused Clone left %q", left)
	}
}
