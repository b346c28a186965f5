package provision

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// defineTestDomain defines def on the test node, started if running.
func defineTestDomain(t *testing.T, l *libvirt.Libvirt, def *libvirtxml.Domain, running bool) {
	t.Helper()
	def.Type, def.UUID, def.GenID, def.SysInfo = "test", "", nil, nil
	doc, err := def.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	dom, err := l.DomainDefineXMLFlags(doc, 0)
	if err != nil {
		t.Fatalf("define %s: %v", def.Name, err)
	}
	if running {
		if err := l.DomainCreate(dom); err != nil {
			t.Fatalf("start %s: %v", def.Name, err)
		}
	}
}

func problemParts(r ImageReport) []ImagePart {
	var parts []ImagePart
	for _, p := range r.Problems {
		parts = append(parts, p.Part)
	}
	return parts
}

func TestInspectImage(t *testing.T) {
	tests := []struct {
		name  string
		image string
		// prepare defines extra domains on the node; dir is its directory.
		prepare   func(t *testing.T, l *libvirt.Libvirt, dir string)
		wantErr   error
		wantParts []ImagePart
		// wantMsg is in the error, in this order for several problems.
		wantMsg []string
		check   func(t *testing.T, r ImageReport, dir string)
	}{
		{
			name:  "clonable image",
			image: "image",
			check: func(t *testing.T, r ImageReport, dir string) {
				if len(r.Generation) != 16 {
					t.Errorf("generation %q, want 16 hex digits", r.Generation)
				}
				want := ImageReport{
					Name: "image", Defined: true, State: "shut off", CloneMode: CloneLinked, Firmware: "bios", VCPUs: 1, MemoryMiB: 256,
					Generation: r.Generation,
					Disks: []ImageDisk{
						// Allocations as the test node's volumes give them.
						{Target: "vda", Source: filepath.Join(dir, "pool", "image.qcow2"), Pool: "images", Format: "qcow2", Allocation: 1 << 20},
						{Target: "vdb", Source: filepath.Join(dir, "pool", "data.raw"), Pool: "images", Format: "raw", Allocation: 1 << 30},
					},
				}
				if !reflect.DeepEqual(r, want) {
					t.Errorf("report = %+v\nwant %+v", r, want)
				}
			},
		},
		{
			name:    "missing image",
			image:   "nope",
			wantErr: ErrImageNotFound,
			wantMsg: []string{"inspect image nope: no such image"},
			check: func(t *testing.T, r ImageReport, _ string) {
				if r.Defined {
					t.Error("Defined = true for a missing image")
				}
			},
		},
		{
			name:      "named like a machine",
			image:     "stretchy-x",
			wantErr:   ErrImageInvalid,
			wantParts: []ImagePart{PartName},
			wantMsg:   []string{`image names must not start with "stretchy-"`},
		},
		{
			name:      "running",
			image:     "busy",
			wantErr:   ErrImageInvalid,
			wantParts: []ImagePart{PartState},
			wantMsg:   []string{"image busy is running; images must be shut off"},
			check: func(t *testing.T, r ImageReport, _ string) {
				if r.State != "running" {
					t.Errorf("State = %q, want running", r.State)
				}
			},
		},
		{
			name:      "disk outside every pool",
			image:     "unpooled",
			wantErr:   ErrImageInvalid,
			wantParts: []ImagePart{PartStorage},
			wantMsg:   []string{"disk vda: ", "loose.qcow2 is outside every storage pool"},
			check: func(t *testing.T, r ImageReport, dir string) {
				want := []ImageDisk{{Target: "vda", Source: filepath.Join(dir, "loose.qcow2")}}
				if !reflect.DeepEqual(r.Disks, want) {
					t.Errorf("Disks = %+v, want %+v", r.Disks, want)
				}
			},
		},
		{
			name:  "invalid settings",
			image: "badsettings",
			prepare: func(t *testing.T, l *libvirt.Libvirt, dir string) {
				def := image([]libvirtxml.DomainDisk{fileDisk("disk", filepath.Join(dir, "pool", "other.qcow2"), "vda", false)})
				def.Name = "badsettings"
				def.Metadata = &libvirtxml.DomainMetadata{XML: `<stretchy:image xmlns:stretchy="` + metadataNS + `" clone-mode="fast"/>`}
				defineTestDomain(t, l, def, false)
			},
			wantErr:   ErrInvalidCloneMode,
			wantParts: []ImagePart{PartSettings},
			wantMsg:   []string{`clone-mode "fast"`},
		},
		{
			name:  "declared settings",
			image: "declared",
			prepare: func(t *testing.T, l *libvirt.Libvirt, dir string) {
				def := image([]libvirtxml.DomainDisk{fileDisk("disk", filepath.Join(dir, "pool", "other.qcow2"), "vda", false)})
				def.Name = "declared"
				def.Metadata = &libvirtxml.DomainMetadata{XML: `<stretchy:image xmlns:stretchy="` + metadataNS + `" clone-mode="copy" os="windows"/>`}
				defineTestDomain(t, l, def, false)
			},
			check: func(t *testing.T, r ImageReport, _ string) {
				if r.CloneMode != CloneCopy || r.OS != "windows" {
					t.Errorf("CloneMode, OS = %q, %q; want copy, windows", r.CloneMode, r.OS)
				}
			},
		},
		{
			// Every problem is reported, not only the first.
			name:  "several problems",
			image: "stretchy-many",
			prepare: func(t *testing.T, l *libvirt.Libvirt, dir string) {
				def := image([]libvirtxml.DomainDisk{
					fileDisk("disk", filepath.Join(dir, "loose.qcow2"), "vda", false),
					fileDisk("disk", filepath.Join(dir, "pool", "other.qcow2"), "vdb", false),
					fileDisk("disk", filepath.Join(dir, "gone.qcow2"), "vdc", false),
				})
				def.Name = "stretchy-many"
				defineTestDomain(t, l, def, true)
			},
			wantErr:   ErrImageInvalid,
			wantParts: []ImagePart{PartName, PartState, PartStorage, PartStorage},
			wantMsg:   []string{"must not start with", "is running", "disk vda: ", "disk vdc: ", "gone.qcow2 does not exist"},
			check: func(t *testing.T, r ImageReport, _ string) {
				if len(r.Disks) != 3 || r.Disks[1].Pool != "images" {
					t.Errorf("Disks = %+v; want all three, vdb in pool images", r.Disks)
				}
			},
		},
		{
			name:  "NVRAM outside every pool",
			image: "uefi",
			prepare: func(t *testing.T, l *libvirt.Libvirt, dir string) {
				if err := os.WriteFile(filepath.Join(dir, "uefi_VARS.fd"), []byte("vars"), 0o600); err != nil {
					t.Fatal(err)
				}
				def := image([]libvirtxml.DomainDisk{fileDisk("disk", filepath.Join(dir, "pool", "other.qcow2"), "vda", false)})
				def.Name = "uefi"
				def.OS.Loader = &libvirtxml.DomainLoader{Path: "/usr/share/OVMF/OVMF_CODE.fd", Readonly: "yes", Type: "pflash"}
				def.OS.NVRam = &libvirtxml.DomainNVRam{NVRam: filepath.Join(dir, "uefi_VARS.fd")}
				defineTestDomain(t, l, def, false)
			},
			// Clone uploads a copy into the disk's pool: not a problem.
			check: func(t *testing.T, r ImageReport, dir string) {
				if r.NVRAM != filepath.Join(dir, "uefi_VARS.fd") || r.NVRAMPool != "" {
					t.Errorf("NVRAM, NVRAMPool = %q, %q; want the file, no pool", r.NVRAM, r.NVRAMPool)
				}
			},
		},
		{
			name:  "NVRAM outside every pool without a pool disk",
			image: "uefi-diskless",
			prepare: func(t *testing.T, l *libvirt.Libvirt, dir string) {
				if err := os.WriteFile(filepath.Join(dir, "diskless_VARS.fd"), []byte("vars"), 0o600); err != nil {
					t.Fatal(err)
				}
				def := image(nil)
				def.Name = "uefi-diskless"
				def.OS.Loader = &libvirtxml.DomainLoader{Path: "/usr/share/OVMF/OVMF_CODE.fd", Readonly: "yes", Type: "pflash"}
				def.OS.NVRam = &libvirtxml.DomainNVRam{NVRam: filepath.Join(dir, "diskless_VARS.fd")}
				defineTestDomain(t, l, def, false)
			},
			wantErr:   ErrImageInvalid,
			wantParts: []ImagePart{PartStorage},
			wantMsg:   []string{"diskless_VARS.fd is in no pool"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, dir := testNode(t)
			if tt.prepare != nil {
				tt.prepare(t, l, dir)
			}
			vols, doms := volumeNames(t, l), domainStates(t, l)
			r, err := New(l, Options{}).InspectImage(t.Context(), tt.image)
			if tt.wantErr == nil && err != nil {
				t.Fatalf("InspectImage = %v, want no error", err)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("InspectImage = %v, want %v", err, tt.wantErr)
			}
			if got := problemParts(r); !reflect.DeepEqual(got, tt.wantParts) {
				t.Errorf("problems %v, want %v (error %v)", got, tt.wantParts, err)
			}
			for _, p := range r.Problems {
				if !errors.Is(p, ErrImageInvalid) {
					t.Errorf("problem %q does not wrap ErrImageInvalid", p)
				}
			}
			rest := ""
			if err != nil {
				rest = err.Error()
			}
			for _, m := range tt.wantMsg {
				i := strings.Index(rest, m)
				if i < 0 {
					t.Errorf("error %q does not mention %q (after the earlier ones)", err, m)
					break
				}
				rest = rest[i+len(m):]
			}
			if tt.check != nil {
				tt.check(t, r, dir)
			}
			if got := volumeNames(t, l); !reflect.DeepEqual(got, vols) {
				t.Errorf("volumes after InspectImage = %q, were %q", got, vols)
			}
			if got := domainStates(t, l); !reflect.DeepEqual(got, doms) {
				t.Errorf("domains after InspectImage = %v, were %v", got, doms)
			}
		})
	}
}

func TestInspectPools(t *testing.T) {
	l, dir := testNode(t)
	px := libvirtxml.StoragePool{Type: "dir", Name: "idle", Target: &libvirtxml.StoragePoolTarget{Path: filepath.Join(dir, "idle")}}
	doc, err := px.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.StoragePoolDefineXML(doc, 0); err != nil {
		t.Fatal(err)
	}
	got, err := New(l, Options{}).InspectPools(t.Context())
	if err != nil {
		t.Fatalf("InspectPools: %v", err)
	}
	if len(got) != 2 {
		t.Fatalf("InspectPools = %+v, want idle and images", got)
	}
	idle, images := got[0], got[1]
	if idle.Name != "idle" || idle.Active || idle.Type != "dir" {
		t.Errorf("idle = %+v, want an inactive dir pool", idle)
	}
	// The test driver subtracts its volumes' allocation from the space.
	if images.Available == 0 || images.Available >= images.Capacity {
		t.Errorf("images has %d of %d bytes available; want a little less than all", images.Available, images.Capacity)
	}
	images.Available = 0
	want := PoolReport{Name: "images", Type: "dir", Path: filepath.Join(dir, "pool"), Active: true, Capacity: 100 << 30}
	if images != want {
		t.Errorf("images = %+v\nwant %+v", images, want)
	}
}

// TestSystemInspectImage inspects test images on qemu:///system, where
// disks and NVRAM are real files.
func TestSystemInspectImage(t *testing.T) {
	l := systemConn(t)
	p := New(l, Options{})
	tests := []struct {
		name      string
		shape     imageShape
		nvramPool string
	}{
		{name: "file and volume disks", shape: imageShape{rootVolume: true, extraDisks: true}},
		{name: "NVRAM in a pool", shape: imageShape{uefi: "volume"}, nvramPool: testPool},
		{name: "NVRAM outside every pool", shape: imageShape{uefi: "file"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img := defineTestImage(t, l, tt.shape)
			r, err := p.InspectImage(t.Context(), img.Name)
			if err != nil {
				t.Fatalf("InspectImage: %v", err)
			}
			if len(r.Disks) != len(img.Disks) {
				t.Fatalf("Disks = %+v, want %d", r.Disks, len(img.Disks))
			}
			for _, d := range r.Disks {
				if d.Pool != testPool || d.Format == "" || d.Allocation == 0 {
					t.Errorf("disk %+v: want it in pool %s with a format and the space it takes there", d, testPool)
				}
			}
			if r.NVRAM != img.NVRAM || r.NVRAMPool != tt.nvramPool {
				t.Errorf("NVRAM %q in pool %q, want %q in pool %q", r.NVRAM, r.NVRAMPool, img.NVRAM, tt.nvramPool)
			}
		})
	}
}

func TestIsAccessDenied(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"socket permissions", &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.EACCES)}, true},
		{"polkit", libvirt.Error{Code: uint32(libvirt.ErrAuthUnavailable), Message: "authentication unavailable"}, true},
		{"access control", libvirt.Error{Code: uint32(libvirt.ErrAccessDenied)}, true},
		{"no such domain", libvirt.Error{Code: uint32(libvirt.ErrNoDomain)}, false},
		{"other", errors.New("boom"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := IsAccessDenied(tt.err); got != tt.want {
				t.Errorf("IsAccessDenied(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

// TestListImages lists the image candidates of the test node: every domain
// but the managed one, filtered, each with its problems; the generation
// stays as long as the image does and changes with its definition.
func TestListImages(t *testing.T) {
	l, _ := testNode(t)
	p := New(l, Options{})
	list := func(keep func(string) bool) map[string]ImageReport {
		t.Helper()
		reports, err := p.ListImages(t.Context(), keep)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]ImageReport{}
		for _, r := range reports {
			out[r.Name] = r
		}
		return out
	}
	all := list(nil)
	if _, ok := all["stretchy-x"]; ok {
		t.Fatal("a managed domain was listed as an image")
	}
	for _, name := range []string{"image", "unpooled", "busy", "bystander"} {
		if _, ok := all[name]; !ok {
			t.Fatalf("%s not listed: %v", name, all)
		}
	}
	if len(all["image"].Problems) != 0 || len(all["busy"].Problems) == 0 {
		t.Fatalf("problems: image %v, busy %v", all["image"].Problems, all["busy"].Problems)
	}
	if got := all["image"].Pools(); !reflect.DeepEqual(got, []string{"images"}) {
		t.Fatalf("pools of image: %q", got)
	}
	only := list(func(name string) bool { return name == "image" })
	if len(only) != 1 || only["image"].Generation != all["image"].Generation {
		t.Fatalf("filtered: %v; generation %q then %q", only, all["image"].Generation, only["image"].Generation)
	}

	// A changed definition is a new generation.
	redefineImage(t, l)
	if again := list(nil)["image"]; again.Generation == all["image"].Generation || again.Generation == "" {
		t.Fatalf("generation %q after a change, %q before", again.Generation, all["image"].Generation)
	}
}

// TestCloneTellsImageGeneration checks that a clone reports the
// generation InspectImage gives the image it was made from, before and
// after the image's definition changes.
func TestCloneTellsImageGeneration(t *testing.T) {
	l, _ := testNode(t)
	p := New(l, Options{})
	ctx := t.Context()
	check := func(job string) string {
		t.Helper()
		r, err := p.InspectImage(ctx, "image")
		if err != nil {
			t.Fatal(err)
		}
		m, err := p.Clone(ctx, Spec{JobID: job, Image: "image", Host: "h"})
		if err != nil {
			t.Fatal(err)
		}
		if m.ImageGeneration != r.Generation || r.Generation == "" {
			t.Fatalf("clone %s: image generation %q, InspectImage's %q", job, m.ImageGeneration, r.Generation)
		}
		return m.ImageGeneration
	}
	before := check("gen-a")
	redefineImage(t, l)
	if after := check("gen-b"); after == before {
		t.Fatalf("generation %q unchanged after the image changed", after)
	}
}

// redefineImage changes the test node's image's definition (its memory).
func redefineImage(t *testing.T, l *libvirt.Libvirt) {
	t.Helper()
	def := domainXML(t, l, "image")
	def.Memory = &libvirtxml.DomainMemory{Value: 2, Unit: "GiB"}
	doc, err := def.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.DomainDefineXMLFlags(doc, 0); err != nil {
		t.Fatal(err)
	}
}
