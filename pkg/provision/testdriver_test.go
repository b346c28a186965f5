package provision

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// These tests run against libvirt's test driver served by the real libvirtd
// (see testNode): real RPCs, real XML parsing and real error codes, with
// in-memory domains and pools private to each test.

func volumeNames(t *testing.T, l *libvirt.Libvirt) []string {
	t.Helper()
	pool, err := l.StoragePoolLookupByName("images")
	if err != nil {
		t.Fatal(err)
	}
	vols, _, err := l.StoragePoolListAllVolumes(pool, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, v := range vols {
		names = append(names, v.Name)
	}
	slices.Sort(names)
	return names
}

func domainStates(t *testing.T, l *libvirt.Libvirt) map[string]libvirt.DomainState {
	t.Helper()
	doms, _, err := l.ConnectListAllDomains(1, 0)
	if err != nil {
		t.Fatal(err)
	}
	states := make(map[string]libvirt.DomainState)
	for _, d := range doms {
		s, _, err := l.DomainGetState(d, 0)
		if err != nil {
			t.Fatal(err)
		}
		states[d.Name] = libvirt.DomainState(s)
	}
	return states
}

func domainXML(t testing.TB, l *libvirt.Libvirt, name string) *libvirtxml.Domain {
	t.Helper()
	dom, err := l.DomainLookupByName(name)
	if err != nil {
		t.Fatal(err)
	}
	doc, err := l.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	if err != nil {
		t.Fatal(err)
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(doc); err != nil {
		t.Fatal(err)
	}
	return &def
}

func volumeXML(t testing.TB, l *libvirt.Libvirt, path string) *libvirtxml.StorageVolume {
	t.Helper()
	vol, err := l.StorageVolLookupByPath(path)
	if err != nil {
		t.Fatal(err)
	}
	doc, err := l.StorageVolGetXMLDesc(vol, 0)
	if err != nil {
		t.Fatal(err)
	}
	var vx libvirtxml.StorageVolume
	if err := vx.Unmarshal(doc); err != nil {
		t.Fatal(err)
	}
	return &vx
}

func testSpec(job string) Spec {
	return Spec{
		JobID: job, Image: "image", Host: "host-a", RunnerKind: "none",
		RequestedAt: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
		Deadline:    time.Date(2026, 1, 2, 4, 4, 5, 0, time.UTC),
	}
}

func TestCloneDefinesMachine(t *testing.T) {
	l, dir := testNode(t)
	p := New(l, Options{})
	ctx := t.Context()
	pool := filepath.Join(dir, "pool")

	m := clone(t, p, testSpec("j1"))
	// TestCloneTellsImageGeneration checks its value; it is not recorded.
	if m.ImageGeneration == "" {
		t.Error("Clone returned no image generation")
	}
	m.ImageGeneration = ""
	wantVols := []string{filepath.Join(pool, "stretchy-j1-vda.qcow2"), filepath.Join(pool, "stretchy-j1-vdb.qcow2")}
	want := Machine{
		Name: "stretchy-j1", Key: "j1", JobID: "j1", Image: "image", Host: "host-a", RunnerKind: "none",
		RequestedAt: testSpec("").RequestedAt, Deadline: testSpec("").Deadline, CloneMode: CloneLinked, Volumes: wantVols,
		// The image's size, recorded.
		VCPUs: 1, MemoryMiB: 256,
	}
	if !reflect.DeepEqual(m, want) {
		t.Errorf("Clone = %+v\nwant %+v", m, want)
	}

	// The metadata libvirt stored reads back into the same machine.
	got, ok, err := p.Lookup(ctx, "j1")
	if err != nil || !ok {
		t.Fatalf("Lookup = %v, %v", ok, err)
	}
	if !got.RequestedAt.Equal(want.RequestedAt) || !got.Deadline.Equal(want.Deadline) {
		t.Errorf("Lookup times = %v, %v", got.RequestedAt, got.Deadline)
	}
	got.RequestedAt, got.Deadline = want.RequestedAt, want.Deadline
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Lookup = %+v\nwant %+v", got, want)
	}

	def := domainXML(t, l, "stretchy-j1")
	img := domainXML(t, l, "image")
	if def.UUID == img.UUID || def.Type != "test" {
		t.Errorf("clone uuid %s (image %s), type %s", def.UUID, img.UUID, def.Type)
	}
	var sources []string
	for _, d := range def.Devices.Disks {
		sources = append(sources, d.Source.File.File)
	}
	wantSources := append(slices.Clone(wantVols), filepath.Join(dir, "shared-ro.img"), filepath.Join(dir, "seed.iso"))
	if !reflect.DeepEqual(sources, wantSources) {
		t.Errorf("clone disks = %q\nwant %q", sources, wantSources)
	}
	for i, iface := range def.Devices.Interfaces {
		if old := img.Devices.Interfaces[i].MAC.Address; iface.MAC.Address == old || iface.MAC.Address[:8] != old[:8] {
			t.Errorf("nic %d: MAC %s, image has %s", i, iface.MAC.Address, old)
		}
	}

	// Each volume is a qcow2 overlay on the image's volume, in its format.
	for i, backing := range []struct{ path, format string }{
		{filepath.Join(pool, "image.qcow2"), "qcow2"},
		{filepath.Join(pool, "data.raw"), "raw"},
	} {
		vx := volumeXML(t, l, wantVols[i])
		if vx.Target.Format.Type != "qcow2" || vx.BackingStore == nil ||
			vx.BackingStore.Path != backing.path || vx.BackingStore.Format.Type != backing.format {
			t.Errorf("volume %s: format %+v, backing %+v; want qcow2 on %+v", wantVols[i], vx.Target.Format, vx.BackingStore, backing)
		}
		orig := volumeXML(t, l, backing.path)
		if vx.Capacity.Value < orig.Capacity.Value {
			t.Errorf("volume %s: capacity %d < image's %d", wantVols[i], vx.Capacity.Value, orig.Capacity.Value)
		}
	}
}

func TestCloneSameJobTwice(t *testing.T) {
	l, _ := testNode(t)
	p := New(l, Options{})
	clone(t, p, testSpec("twice"))
	vols := volumeNames(t, l)
	_, err := p.Clone(t.Context(), testSpec("twice"))
	if !errors.Is(err, ErrExists) {
		t.Fatalf("second Clone = %v, want ErrExists", err)
	}
	if got := volumeNames(t, l); !reflect.DeepEqual(got, vols) {
		t.Errorf("second Clone changed volumes: %q, was %q", got, vols)
	}
}

func TestCloneRefuses(t *testing.T) {
	tests := []struct {
		name    string
		spec    Spec
		wantErr error
		wantMsg string
	}{
		{"missing image", Spec{JobID: "r1", Image: "nope"}, ErrImageNotFound, "image nope"},
		{"image named like a machine", Spec{JobID: "r2", Image: "stretchy-x"}, ErrImageInvalid, `must not start with "stretchy-"`},
		{"running image", Spec{JobID: "r3", Image: "busy"}, ErrImageInvalid, "image busy is running; images must be shut off"},
		{"disk outside any pool", Spec{JobID: "r4", Image: "unpooled"}, ErrImageInvalid, "image unpooled: disk vda: "},
		{"bad job id", Spec{JobID: "../r5", Image: "image"}, ErrInvalidJobID, "../r5"},
		{"empty job id", Spec{Image: "image"}, ErrInvalidJobID, "job id"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, _ := testNode(t)
			p := New(l, Options{})
			vols, doms := volumeNames(t, l), domainStates(t, l)
			_, err := p.Clone(t.Context(), tt.spec)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Clone = %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %q does not mention %q", err, tt.wantMsg)
			}
			if got := volumeNames(t, l); !reflect.DeepEqual(got, vols) {
				t.Errorf("volumes after failed Clone = %q, was %q", got, vols)
			}
			if got := domainStates(t, l); !reflect.DeepEqual(got, doms) {
				t.Errorf("domains after failed Clone = %v, were %v", got, doms)
			}
		})
	}
}

// failingDefine is the real connection except that defining fails, which the
// test driver cannot be made to do for valid XML.
type failingDefine struct{ Conn }

func (failingDefine) DomainDefineXMLFlags(string, libvirt.DomainDefineFlags) (libvirt.Domain, error) {
	return libvirt.Domain{}, libvirt.Error{Code: uint32(libvirt.ErrXMLError), Message: "injected failure"}
}

// failingSecondVolume is the real connection except that creating a second
// volume fails.
type failingSecondVolume struct {
	Conn
	n int
}

func (f *failingSecondVolume) StorageVolCreateXML(pool libvirt.StoragePool, xml string, flags libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error) {
	if f.n++; f.n == 2 {
		return libvirt.StorageVol{}, libvirt.Error{Code: uint32(libvirt.ErrStorageVolExist), Message: "injected failure"}
	}
	return f.Conn.StorageVolCreateXML(pool, xml, flags)
}

func TestCloneRollsBack(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, l *libvirt.Libvirt) Conn
		// extra are volumes that existed before Clone and must survive.
		extra []string
	}{
		{
			name:    "second volume fails",
			prepare: func(t *testing.T, l *libvirt.Libvirt) Conn { return &failingSecondVolume{Conn: l} },
		},
		{
			name:    "define fails",
			prepare: func(t *testing.T, l *libvirt.Libvirt) Conn { return failingDefine{l} },
		},
		{
			// A volume named for the job that an unmanaged domain uses is
			// not an orphan to sweep: Clone stops before creating anything.
			name: "volume named for the job in use",
			prepare: func(t *testing.T, l *libvirt.Libvirt) Conn {
				pool, err := l.StoragePoolLookupByName("images")
				if err != nil {
					t.Fatal(err)
				}
				vx := libvirtxml.StorageVolume{Name: "stretchy-rb-vdb.qcow2", Capacity: &libvirtxml.StorageVolumeSize{Value: 1}}
				doc, _ := vx.Marshal()
				vol, err := l.StorageVolCreateXML(pool, doc, 0)
				if err != nil {
					t.Fatal(err)
				}
				path, err := l.StorageVolGetPath(vol)
				if err != nil {
					t.Fatal(err)
				}
				user := image([]libvirtxml.DomainDisk{fileDisk("disk", path, "vda", false)})
				user.Type, user.Name, user.UUID, user.GenID, user.SysInfo = "test", "user", "", nil, nil
				udoc, _ := user.Marshal()
				if _, err := l.DomainDefineXMLFlags(udoc, 0); err != nil {
					t.Fatal(err)
				}
				return l
			},
			extra: []string{"stretchy-rb-vdb.qcow2"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, _ := testNode(t)
			before := volumeNames(t, l)
			conn := tt.prepare(t, l)
			doms := domainStates(t, l)
			_, err := New(conn, Options{}).Clone(t.Context(), testSpec("rb"))
			if err == nil {
				t.Fatal("Clone succeeded")
			}
			want := append(slices.Clone(before), tt.extra...)
			slices.Sort(want)
			if got := volumeNames(t, l); !reflect.DeepEqual(got, want) {
				t.Errorf("volumes after failed Clone = %q, want %q", got, want)
			}
			if got := domainStates(t, l); !reflect.DeepEqual(got, doms) {
				t.Errorf("domains after failed Clone = %v, were %v", got, doms)
			}
		})
	}
}

func TestRemove(t *testing.T) {
	l, dir := testNode(t)
	p := New(l, Options{})
	ctx := t.Context()
	before := volumeNames(t, l)
	states := domainStates(t, l)

	m := clone(t, p, testSpec("rm"))
	if err := p.Start(ctx, "rm"); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if got, _, _ := p.Lookup(ctx, "rm"); !got.Running {
		t.Errorf("Lookup after Start: Running = false")
	}

	existed, err := p.Remove(ctx, "rm")
	if err != nil || !existed {
		t.Fatalf("Remove = %v, %v; want true, nil", existed, err)
	}
	if _, ok, err := p.Lookup(ctx, "rm"); ok || err != nil {
		t.Errorf("Lookup after Remove = %v, %v", ok, err)
	}
	for _, v := range m.Volumes {
		if _, err := l.StorageVolLookupByPath(v); !isNoStorageVol(err) {
			t.Errorf("volume %s after Remove: %v", v, err)
		}
	}
	if got := volumeNames(t, l); !reflect.DeepEqual(got, before) {
		t.Errorf("volumes after Remove = %q, want %q", got, before)
	}
	if got := domainStates(t, l); !reflect.DeepEqual(got, states) {
		t.Errorf("domains after Remove = %v, want %v", got, states)
	}
	volumeXML(t, l, filepath.Join(dir, "pool", "image.qcow2"))

	existed, err = p.Remove(ctx, "rm")
	if err != nil || existed {
		t.Errorf("second Remove = %v, %v; want false, nil", existed, err)
	}
	if err := p.Start(ctx, "rm"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Start after Remove = %v, want ErrNotFound", err)
	}
}

func TestRemoveWithoutMetadata(t *testing.T) {
	l, _ := testNode(t)
	p := New(l, Options{})
	// stretchy-x in the node has no metadata: still managed, still removable.
	if m, ok, err := p.Lookup(t.Context(), "x"); err != nil || !ok || !m.MetadataUnreadable {
		t.Errorf("Lookup = %+v, %v, %v; want a machine flagged MetadataUnreadable", m, ok, err)
	}
	existed, err := p.Remove(t.Context(), "x")
	if err != nil || !existed {
		t.Fatalf("Remove = %v, %v; want true, nil", existed, err)
	}
	if _, ok := domainStates(t, l)["stretchy-x"]; ok {
		t.Error("stretchy-x still defined")
	}
}

// TestRemoveKeepsForeignVolumes defines a managed domain whose metadata
// claims volumes it must not delete: the image's, an unmanaged domain's, one
// named for another job, and one named for it that an unmanaged domain uses.
func TestRemoveKeepsForeignVolumes(t *testing.T) {
	l, dir := testNode(t)
	p := New(l, Options{})
	ctx := t.Context()
	pool := filepath.Join(dir, "pool")
	poolRef, err := l.StoragePoolLookupByName("images")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"stretchy-evil-vda.qcow2", "stretchy-evil-vdz.qcow2", "stretchy-evil-2-vda.qcow2", "stretchy-evil-vdy.qcow2"} {
		vx := libvirtxml.StorageVolume{Name: name, Capacity: &libvirtxml.StorageVolumeSize{Value: 1}}
		doc, _ := vx.Marshal()
		if _, err := l.StorageVolCreateXML(poolRef, doc, 0); err != nil {
			t.Fatal(err)
		}
	}
	// Someone made an overlay on vdy, in no domain.
	overlay := libvirtxml.StorageVolume{
		Name: "overlay.qcow2", Capacity: &libvirtxml.StorageVolumeSize{Value: 1},
		Target:       &libvirtxml.StorageVolumeTarget{Format: &libvirtxml.StorageVolumeTargetFormat{Type: "qcow2"}},
		BackingStore: &libvirtxml.StorageVolumeBackingStore{Path: filepath.Join(pool, "stretchy-evil-vdy.qcow2")},
	}
	overlayDoc, err := overlay.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.StorageVolCreateXML(poolRef, overlayDoc, 0); err != nil {
		t.Fatal(err)
	}
	defineXML := func(def *libvirtxml.Domain) {
		t.Helper()
		doc, err := def.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := l.DomainDefineXMLFlags(doc, 0); err != nil {
			t.Fatal(err)
		}
	}
	borrower := image([]libvirtxml.DomainDisk{fileDisk("disk", filepath.Join(pool, "stretchy-evil-vdz.qcow2"), "vda", false)})
	borrower.Type, borrower.Name, borrower.UUID, borrower.GenID, borrower.SysInfo = "test", "borrower", "", nil, nil
	defineXML(borrower)

	claimed := []string{
		filepath.Join(pool, "stretchy-evil-vda.qcow2"),   // its own: deleted
		filepath.Join(pool, "image.qcow2"),               // the image's
		filepath.Join(pool, "other.qcow2"),               // bystander's
		filepath.Join(pool, "stretchy-evil-2-vda.qcow2"), // job evil-2's
		filepath.Join(pool, "stretchy-evil-vdz.qcow2"),   // used by borrower
		filepath.Join(pool, "stretchy-evil-vdy.qcow2"),   // backing store of overlay
	}
	meta, err := encodeMetadata(Machine{JobID: "evil", Image: "image", Volumes: claimed})
	if err != nil {
		t.Fatal(err)
	}
	evil := image(nil)
	evil.Type, evil.Name, evil.UUID, evil.GenID, evil.SysInfo = "test", "stretchy-evil", "", nil, nil
	evil.Metadata = &libvirtxml.DomainMetadata{XML: meta}
	defineXML(evil)

	existed, err := p.Remove(ctx, "evil")
	if !existed || err == nil {
		t.Fatalf("Remove = %v, %v; want true and an error naming the kept volumes", existed, err)
	}
	for _, kept := range claimed[1:] {
		if !strings.Contains(err.Error(), kept) {
			t.Errorf("error %q does not name kept volume %s", err, kept)
		}
		if _, lerr := l.StorageVolLookupByPath(kept); lerr != nil {
			t.Errorf("volume %s was deleted: %v", kept, lerr)
		}
	}
	if _, lerr := l.StorageVolLookupByPath(claimed[0]); !isNoStorageVol(lerr) {
		t.Errorf("own volume %s survived: %v", claimed[0], lerr)
	}
	states := domainStates(t, l)
	if _, ok := states["stretchy-evil"]; ok {
		t.Error("stretchy-evil still defined")
	}
	for _, name := range []string{"image", "borrower", "bystander", "busy", "unpooled"} {
		if _, ok := states[name]; !ok {
			t.Errorf("unmanaged domain %s is gone", name)
		}
	}
	if states["bystander"] != libvirt.DomainRunning {
		t.Errorf("bystander state = %v, want running", states["bystander"])
	}
}

func TestList(t *testing.T) {
	l, _ := testNode(t)
	p := New(l, Options{})
	ctx := t.Context()
	for _, job := range []string{"list-b", "list-a"} {
		clone(t, p, testSpec(job))
	}
	if err := p.Start(ctx, "list-b"); err != nil {
		t.Fatal(err)
	}
	got, err := p.List(ctx)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	type row struct {
		name, job, image string
		volumes          int
		running          bool
	}
	var rows []row
	for _, m := range got {
		rows = append(rows, row{m.Name, m.JobID, m.Image, len(m.Volumes), m.Running})
	}
	want := []row{
		{"stretchy-list-a", "list-a", "image", 2, false},
		{"stretchy-list-b", "list-b", "image", 2, true},
		{"stretchy-x", "x", "", 0, false}, // no metadata, still listed
	}
	if !reflect.DeepEqual(rows, want) {
		t.Errorf("List = %+v\nwant %+v", rows, want)
	}
}

// TestCloneSizedMachine clones with a size, a scratch disk and a console
// directory, and checks the definition, the recorded machine, and what
// Remove deletes.
func TestCloneSizedMachine(t *testing.T) {
	l, dir := testNode(t)
	img := domainXML(t, l, "image")
	img.Name, img.UUID = "serial-image", ""
	port := uint(0)
	img.Devices.Serials = []libvirtxml.DomainSerial{{
		Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}},
		Target: &libvirtxml.DomainSerialTarget{Port: &port},
	}}
	img.Devices.Consoles = []libvirtxml.DomainConsole{{
		Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}},
		Target: &libvirtxml.DomainConsoleTarget{Type: "serial", Port: &port},
	}}
	defineTestDomain(t, l, img, false)
	consoles := filepath.Join(dir, "console")
	if err := os.Mkdir(consoles, 0o700); err != nil {
		t.Fatal(err)
	}
	p := New(l, Options{})
	ctx := t.Context()
	spec := func(job string) Spec {
		s := testSpec(job)
		s.Image, s.VCPUs, s.MemoryMiB, s.ScratchGiB, s.ConsoleDir = "serial-image", 2, 512, 3, consoles
		return s
	}

	m := clone(t, p, spec("sized"))
	scratch := filepath.Join(dir, "pool", "stretchy-sized-scratch.qcow2")
	mainLog := filepath.Join(consoles, "stretchy-sized.log")
	if m.VCPUs != 2 || m.MemoryMiB != 512 || m.ScratchGiB != 3 || !slices.Equal(m.ConsoleLogs, []string{mainLog}) ||
		len(m.Volumes) != 3 || m.Volumes[2] != scratch {
		t.Fatalf("machine %+v; want 2 vCPUs, 512 MiB, the scratch volume %s last, the log %s", m, scratch, mainLog)
	}
	got, ok, err := p.Lookup(ctx, "sized")
	if err != nil || !ok || got.VCPUs != 2 || got.MemoryMiB != 512 || got.ScratchGiB != 3 || !slices.Equal(got.ConsoleLogs, m.ConsoleLogs) {
		t.Fatalf("Lookup = %+v, %v, %v; want what Clone returned", got, ok, err)
	}
	def := domainXML(t, l, "stretchy-sized")
	if vcpus, mib, err := domainSize(def); err != nil || vcpus != 2 || mib != 512 {
		t.Errorf("definition's size %d vCPUs, %d MiB, %v", vcpus, mib, err)
	}
	// libvirt orders disks by bus and name.
	i := slices.IndexFunc(def.Devices.Disks, func(d libvirtxml.DomainDisk) bool {
		return d.Source.File != nil && d.Source.File.File == scratch
	})
	if i < 0 {
		t.Fatalf("no disk is the scratch volume %s", scratch)
	}
	if d := def.Devices.Disks[i]; d.Serial != scratchSerial || d.Driver.Type != "qcow2" || d.Target.Dev != "vdd" || d.Target.Bus != "virtio" {
		t.Errorf("scratch disk %+v, target %+v; want vdd (after the shared vdc) on virtio, qcow2, serial %s", d, d.Target, scratchSerial)
	}
	if l := def.Devices.Serials[0].Log; l == nil || l.File != mainLog || l.Append != "off" {
		t.Errorf("serial log %+v; want %s, append off", l, mainLog)
	}
	if vx := volumeXML(t, l, scratch); vx.Capacity.Value != 3<<30 || vx.BackingStore != nil || vx.Target.Format.Type != "qcow2" {
		t.Errorf("scratch volume: capacity %d, backing %+v, format %+v; want an empty 3 GiB qcow2", vx.Capacity.Value, vx.BackingStore, vx.Target.Format)
	}

	// virtlogd's files (the test driver writes none), another job's log,
	// and a second machine whose log Remove is told to keep.
	other := filepath.Join(consoles, "stretchy-sized-2.log")
	for _, f := range []string{mainLog, mainLog + ".0", other} {
		if err := os.WriteFile(f, []byte("boot\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if existed, err := p.Remove(ctx, "sized"); err != nil || !existed {
		t.Fatalf("Remove = %v, %v", existed, err)
	}
	for _, f := range []string{mainLog, mainLog + ".0"} {
		if _, err := os.Stat(f); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s after Remove: %v", f, err)
		}
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("another job's log: %v", err)
	}
	if slices.Contains(volumeNames(t, l), "stretchy-sized-scratch.qcow2") {
		t.Error("scratch volume left after Remove")
	}

	clone(t, p, spec("sized-2"))
	if existed, err := p.RemoveWith(ctx, "sized-2", RemoveOptions{KeepConsole: true}); err != nil || !existed {
		t.Fatalf("RemoveWith = %v, %v", existed, err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("log kept by RemoveWith: %v", err)
	}
}

// TestLookupSizeFromDefinition: a machine whose metadata predates sizes
// gets its size from its definition.
func TestLookupSizeFromDefinition(t *testing.T) {
	l, _ := testNode(t)
	def := domainXML(t, l, "image")
	def.Name, def.UUID = "stretchy-legacy", ""
	def.VCPU = &libvirtxml.DomainVCPU{Value: 3}
	def.Metadata = &libvirtxml.DomainMetadata{XML: `<stretchy:machine xmlns:stretchy="` + metadataNS + `"><job_id>legacy</job_id><image>image</image></stretchy:machine>`}
	defineTestDomain(t, l, def, false)
	m, ok, err := New(l, Options{}).Lookup(t.Context(), "legacy")
	if err != nil || !ok || m.VCPUs != 3 || m.MemoryMiB != 256 || m.MetadataUnreadable {
		t.Errorf("Lookup = %+v, %v, %v; want 3 vCPUs and 256 MiB from the definition", m, ok, err)
	}
}

func TestCloneRefusesSpec(t *testing.T) {
	l, _ := testNode(t)
	p := New(l, Options{})
	for _, s := range []Spec{
		{JobID: "s1", Image: "image", VCPUs: -1},
		{JobID: "s2", Image: "image", ScratchGiB: -1},
		{JobID: "s3", Image: "image", ConsoleDir: "relative/dir"},
	} {
		if _, err := p.Clone(t.Context(), s); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("Clone(%+v) = %v, want ErrInvalidSpec", s, err)
		}
	}
	if names := volumeNames(t, l); slices.ContainsFunc(names, func(n string) bool { return strings.HasPrefix(n, Prefix) }) {
		t.Errorf("refused Clones left %q", names)
	}
}
