package provision

import (
	"crypto/rand"
	"errors"
	"testing"

	"libvirt.org/go/libvirtxml"
)

func uintp(v uint) *uint { return &v }

// sized returns the tiny-like test image with changes.
func sized(change func(d *libvirtxml.Domain)) *libvirtxml.Domain {
	img := image([]libvirtxml.DomainDisk{fileDisk("disk", "/pool/tiny.qcow2", "vda", false)})
	img.Memory = &libvirtxml.DomainMemory{Value: 128, Unit: "MiB"}
	img.VCPU = &libvirtxml.DomainVCPU{Value: 1}
	if change != nil {
		change(img)
	}
	return img
}

func numaCells(n int, mib uint) *libvirtxml.DomainCPU {
	cpu := &libvirtxml.DomainCPU{Mode: "host-model", Numa: &libvirtxml.DomainNuma{}}
	for i := range n {
		cpu.Numa.Cell = append(cpu.Numa.Cell, libvirtxml.DomainCell{ID: uintp(uint(i)), CPUs: cpuRange(i, i), Memory: mib, Unit: "MiB", MemAccess: "shared"})
	}
	return cpu
}

// TestCloneXMLSize checks what the clone's definition says about its size
// for images of various shapes.
func TestCloneXMLSize(t *testing.T) {
	tests := []struct {
		name             string
		image            *libvirtxml.Domain
		vcpus, memoryMiB int
		// unchanged says the size part of the definition must be the
		// image's, byte for byte.
		unchanged bool
		check     func(t *testing.T, got *libvirtxml.Domain)
		wantErr   error
	}{
		{name: "no size keeps the image's", image: sized(func(d *libvirtxml.Domain) {
			d.VCPU.Current = 1
			d.VCPU.Value = 2
			d.MemoryTune = &libvirtxml.DomainMemoryTune{HardLimit: &libvirtxml.DomainMemoryTuneLimit{Value: 200, Unit: "MiB"}}
			d.CPU = &libvirtxml.DomainCPU{Topology: &libvirtxml.DomainCPUTopology{Sockets: 1, Cores: 2, Threads: 1}}
		}), unchanged: true},
		{name: "the image's own size changes nothing", image: sized(func(d *libvirtxml.Domain) {
			d.MemoryTune = &libvirtxml.DomainMemoryTune{HardLimit: &libvirtxml.DomainMemoryTuneLimit{Value: 200, Unit: "MiB"}}
		}), vcpus: 1, memoryMiB: 128, unchanged: true},
		{name: "the tiny guest at 2 vCPUs and 256 MiB", image: sized(nil), vcpus: 2, memoryMiB: 256,
			check: func(t *testing.T, got *libvirtxml.Domain) {
				if *got.VCPU != (libvirtxml.DomainVCPU{Value: 2}) {
					t.Errorf("vcpu = %+v", got.VCPU)
				}
				if *got.Memory != (libvirtxml.DomainMemory{Value: 256 << 10, Unit: "KiB"}) ||
					got.CurrentMemory == nil || *got.CurrentMemory != (libvirtxml.DomainCurrentMemory{Value: 256 << 10, Unit: "KiB"}) {
					t.Errorf("memory %+v, current %+v; want 262144 KiB both", got.Memory, got.CurrentMemory)
				}
			}},
		{name: "offline vCPUs, placement and per-vCPU settings", image: sized(func(d *libvirtxml.Domain) {
			d.VCPU = &libvirtxml.DomainVCPU{Value: 4, Current: 2, Placement: "static", CPUSet: "0-7"}
			d.VCPUs = &libvirtxml.DomainVCPUs{VCPU: []libvirtxml.DomainVCPUsVCPU{{Id: uintp(0), Enabled: "yes"}, {Id: uintp(1), Enabled: "no"}}}
		}), vcpus: 8, check: func(t *testing.T, got *libvirtxml.Domain) {
			if *got.VCPU != (libvirtxml.DomainVCPU{Value: 8, Placement: "static", CPUSet: "0-7"}) || got.VCPUs != nil {
				t.Errorf("vcpu %+v, vcpus %+v; want 8 online, placement kept, no per-vCPU list", got.VCPU, got.VCPUs)
			}
		}},
		{name: "one socket stays one socket", image: sized(func(d *libvirtxml.Domain) {
			d.VCPU.Value = 4
			d.CPU = &libvirtxml.DomainCPU{Mode: "host-passthrough", Topology: &libvirtxml.DomainCPUTopology{Sockets: 1, Dies: 1, Cores: 2, Threads: 2}}
		}), vcpus: 8, check: func(t *testing.T, got *libvirtxml.Domain) {
			want := libvirtxml.DomainCPUTopology{Sockets: 1, Dies: 1, Cores: 4, Threads: 2}
			if *got.CPU.Topology != want || got.CPU.Mode != "host-passthrough" {
				t.Errorf("topology %+v, mode %q; want %+v", got.CPU.Topology, got.CPU.Mode, want)
			}
		}},
		{name: "sockets that do not divide give one socket", image: sized(func(d *libvirtxml.Domain) {
			d.VCPU.Value = 4
			d.CPU = &libvirtxml.DomainCPU{Topology: &libvirtxml.DomainCPUTopology{Sockets: 2, Clusters: 1, Cores: 1, Threads: 2}}
		}), vcpus: 6, check: func(t *testing.T, got *libvirtxml.Domain) {
			if want := (libvirtxml.DomainCPUTopology{Sockets: 1, Clusters: 1, Cores: 3, Threads: 2}); *got.CPU.Topology != want {
				t.Errorf("topology %+v, want %+v", got.CPU.Topology, want)
			}
		}},
		{name: "threads that do not divide give single-threaded cores", image: sized(func(d *libvirtxml.Domain) {
			d.VCPU.Value = 4
			d.CPU = &libvirtxml.DomainCPU{Topology: &libvirtxml.DomainCPUTopology{Sockets: 1, Cores: 2, Threads: 2}}
		}), vcpus: 3, check: func(t *testing.T, got *libvirtxml.Domain) {
			if want := (libvirtxml.DomainCPUTopology{Sockets: 1, Cores: 3, Threads: 1}); *got.CPU.Topology != want {
				t.Errorf("topology %+v, want %+v", got.CPU.Topology, want)
			}
		}},
		{name: "NUMA cells share vCPUs and memory", image: sized(func(d *libvirtxml.Domain) {
			d.VCPU.Value = 2
			d.Memory = &libvirtxml.DomainMemory{Value: 1 << 20, Unit: "KiB"}
			d.CPU = numaCells(2, 512)
			d.NUMATune = &libvirtxml.DomainNUMATune{MemNodes: []libvirtxml.DomainNUMATuneMemNode{{CellID: 1, Mode: "strict", Nodeset: "0"}}}
		}), vcpus: 5, memoryMiB: 3001, check: func(t *testing.T, got *libvirtxml.Domain) {
			cells := got.CPU.Numa.Cell
			if len(cells) != 2 || cells[0].CPUs != "0-2" || cells[1].CPUs != "3-4" ||
				cells[0].Memory != 1501 || cells[1].Memory != 1500 || cells[0].Unit != "MiB" || cells[1].MemAccess != "shared" {
				t.Errorf("cells %+v; want 0-2 with 1501 MiB, 3-4 with 1500 MiB, memAccess kept", cells)
			}
			if got.Memory.Value != 3001<<10 || got.NUMATune == nil || len(got.NUMATune.MemNodes) != 1 {
				t.Errorf("memory %+v, numatune %+v", got.Memory, got.NUMATune)
			}
		}},
		{name: "fewer vCPUs than NUMA cells", image: sized(func(d *libvirtxml.Domain) {
			d.VCPU.Value = 2
			d.CPU = numaCells(2, 64)
		}), vcpus: 1, wantErr: ErrImageInvalid},
		{name: "pins and tuning of vCPUs that go are dropped", image: sized(func(d *libvirtxml.Domain) {
			d.VCPU.Value = 4
			d.CPUTune = &libvirtxml.DomainCPUTune{
				VCPUPin:     []libvirtxml.DomainCPUTuneVCPUPin{{VCPU: 0, CPUSet: "2"}, {VCPU: 1, CPUSet: "3"}, {VCPU: 3, CPUSet: "5"}},
				EmulatorPin: &libvirtxml.DomainCPUTuneEmulatorPin{CPUSet: "0-1"},
				VCPUSched:   []libvirtxml.DomainCPUTuneVCPUSched{{VCPUs: "0-1,^1", Scheduler: "fifo"}, {VCPUs: "0-3", Scheduler: "rr"}},
				CacheTune:   []libvirtxml.DomainCPUCacheTune{{VCPUs: "2-3"}, {VCPUs: "1"}},
			}
		}), vcpus: 2, check: func(t *testing.T, got *libvirtxml.Domain) {
			tune := got.CPUTune
			if len(tune.VCPUPin) != 2 || tune.VCPUPin[1].VCPU != 1 || tune.EmulatorPin.CPUSet != "0-1" ||
				len(tune.VCPUSched) != 1 || tune.VCPUSched[0].Scheduler != "fifo" || len(tune.CacheTune) != 1 || tune.CacheTune[0].VCPUs != "1" {
				t.Errorf("cputune %+v; want the entries of vCPUs 0 and 1 only, the emulator's kept", tune)
			}
		}},
		{name: "memory replaces hot-plugged RAM, limits and the balloon", image: sized(func(d *libvirtxml.Domain) {
			d.MaximumMemory = &libvirtxml.DomainMaxMemory{Value: 16, Unit: "GiB", Slots: 4}
			d.Memory = &libvirtxml.DomainMemory{Value: 2, Unit: "GiB", DumpCore: "off"}
			d.CurrentMemory = &libvirtxml.DomainCurrentMemory{Value: 1, Unit: "GiB"}
			d.MemoryTune = &libvirtxml.DomainMemoryTune{HardLimit: &libvirtxml.DomainMemoryTuneLimit{Value: 3, Unit: "GiB"}}
			d.CPU = numaCells(1, 1024)
			d.Devices.Memorydevs = []libvirtxml.DomainMemorydev{
				{Model: "dimm", Target: &libvirtxml.DomainMemorydevTarget{Size: &libvirtxml.DomainMemorydevTargetSize{Value: 512, Unit: "MiB"}}},
				{Model: "virtio-mem", Target: &libvirtxml.DomainMemorydevTarget{Size: &libvirtxml.DomainMemorydevTargetSize{Value: 512, Unit: "MiB"}}},
			}
		}), memoryMiB: 4096, check: func(t *testing.T, got *libvirtxml.Domain) {
			if got.MaximumMemory != nil || len(got.Devices.Memorydevs) != 0 || got.MemoryTune != nil {
				t.Errorf("maxMemory %+v, memory devices %+v, memtune %+v; want all gone", got.MaximumMemory, got.Devices.Memorydevs, got.MemoryTune)
			}
			if *got.Memory != (libvirtxml.DomainMemory{Value: 4 << 20, Unit: "KiB", DumpCore: "off"}) || got.CurrentMemory.Value != 4<<20 {
				t.Errorf("memory %+v, current %+v; want 4 GiB, dumpCore kept", got.Memory, got.CurrentMemory)
			}
			if c := got.CPU.Numa.Cell[0]; c.Memory != 4096 || c.Unit != "MiB" || c.CPUs != "0" {
				t.Errorf("cell %+v; want 4096 MiB, its CPUs", c)
			}
		}},
		{name: "persistent memory stays, with room for it", image: sized(func(d *libvirtxml.Domain) {
			d.MaximumMemory = &libvirtxml.DomainMaxMemory{Value: 1, Unit: "GiB", Slots: 2}
			d.CPU = numaCells(1, 128)
			d.Devices.Memorydevs = []libvirtxml.DomainMemorydev{
				{Model: "nvdimm", Source: &libvirtxml.DomainMemorydevSource{Path: "/srv/pmem0"},
					Target: &libvirtxml.DomainMemorydevTarget{Size: &libvirtxml.DomainMemorydevTargetSize{Value: 256, Unit: "MiB"}}},
			}
		}), memoryMiB: 2048, check: func(t *testing.T, got *libvirtxml.Domain) {
			if len(got.Devices.Memorydevs) != 1 || got.Devices.Memorydevs[0].Model != "nvdimm" {
				t.Errorf("memory devices %+v; want the nvdimm", got.Devices.Memorydevs)
			}
			total := uint(2048+256) << 10
			if got.Memory.Value != total || got.MaximumMemory == nil || got.MaximumMemory.Value != total || got.MaximumMemory.Slots != 2 {
				t.Errorf("memory %+v, maxMemory %+v; want %d KiB both, the slots kept", got.Memory, got.MaximumMemory, total)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := transform(tt.image, CloneLinked, nil, rand.Reader, func(p *clonePlan) {
				p.VCPUs, p.MemoryMiB = tt.vcpus, tt.memoryMiB
			})
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tt.unchanged {
				if got, want := sizeParts(got), sizeParts(tt.image); got != want {
					t.Errorf("size parts changed:\n got %s\nwant %s", got, want)
				}
			}
			if tt.check != nil {
				tt.check(t, got)
			}
			vcpus, mib, err := domainSize(got)
			if err != nil {
				t.Fatal(err)
			}
			if (tt.vcpus > 0 && vcpus != tt.vcpus) || (tt.memoryMiB > 0 && mib < tt.memoryMiB) {
				t.Errorf("domainSize = %d vCPUs, %d MiB; want %d, at least %d", vcpus, mib, tt.vcpus, tt.memoryMiB)
			}
		})
	}
}

// sizeParts is what a definition says about its size, as XML.
func sizeParts(d *libvirtxml.Domain) string {
	parts := libvirtxml.Domain{
		VCPU: d.VCPU, VCPUs: d.VCPUs, Memory: d.Memory, CurrentMemory: d.CurrentMemory, MaximumMemory: d.MaximumMemory,
		MemoryTune: d.MemoryTune, CPU: d.CPU, CPUTune: d.CPUTune, NUMATune: d.NUMATune,
	}
	doc, err := parts.Marshal()
	if err != nil {
		panic(err)
	}
	return doc
}

func TestDomainSize(t *testing.T) {
	tests := []struct {
		name       string
		vcpu       *libvirtxml.DomainVCPU
		memory     *libvirtxml.DomainMemory
		wantVCPUs  int
		wantMiB    int
		wantErrNil bool
	}{
		{"KiB by default", &libvirtxml.DomainVCPU{Value: 2}, &libvirtxml.DomainMemory{Value: 131072}, 2, 128, true},
		{"GiB", &libvirtxml.DomainVCPU{Value: 4, Current: 1}, &libvirtxml.DomainMemory{Value: 2, Unit: "GiB"}, 4, 2048, true},
		{"decimal units round up", nil, &libvirtxml.DomainMemory{Value: 1, Unit: "GB"}, 1, 954, true},
		{"bytes", nil, &libvirtxml.DomainMemory{Value: 1 << 20, Unit: "b"}, 1, 1, true},
		{"no memory", nil, nil, 1, 0, false},
		{"unknown unit", nil, &libvirtxml.DomainMemory{Value: 1, Unit: "parsecs"}, 0, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vcpus, mib, err := domainSize(&libvirtxml.Domain{VCPU: tt.vcpu, Memory: tt.memory})
			if (err == nil) != tt.wantErrNil {
				t.Fatalf("err = %v", err)
			}
			if err == nil && (vcpus != tt.wantVCPUs || mib != tt.wantMiB) {
				t.Errorf("domainSize = %d, %d; want %d, %d", vcpus, mib, tt.wantVCPUs, tt.wantMiB)
			}
		})
	}
}

func TestCPUSetBelow(t *testing.T) {
	tests := []struct {
		set  string
		n    int
		want bool
	}{
		{"0-3", 4, true},
		{"0-3", 3, false},
		{"0,2,^3", 3, true},
		{"1", 1, false},
		{"", 1, true},
		{"0-x", 8, false},
		{"3-1", 8, false},
	}
	for _, tt := range tests {
		if got := cpusetBelow(tt.set, tt.n); got != tt.want {
			t.Errorf("cpusetBelow(%q, %d) = %v, want %v", tt.set, tt.n, got, tt.want)
		}
	}
}

func TestCloneXMLScratchDisk(t *testing.T) {
	cdrom := fileDisk("cdrom", "/shared/seed.iso", "sda", true)
	cdrom.Target.Bus = "sata"
	scsi := volumeDisk("images", "root.qcow2", "sda")
	tests := []struct {
		name  string
		image *libvirtxml.Domain
		want  diskRow
	}{
		{"after vda on virtio", image([]libvirtxml.DomainDisk{cdrom, fileDisk("disk", "/pool/tiny.qcow2", "vda", false),
			fileDisk("disk", "/shared/tools.img", "vdb", true)}),
			diskRow{"file", "/pool/stretchy-j-scratch.qcow2", "qcow2", "vdc", "virtio"}},
		{"on the root disk's SCSI bus", image([]libvirtxml.DomainDisk{cdrom, scsi}),
			diskRow{"file", "/pool/stretchy-j-scratch.qcow2", "qcow2", "sdb", "scsi"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := transform(tt.image, CloneLinked, nil, rand.Reader, func(p *clonePlan) { p.Scratch = "/pool/" + scratchVolumeName("j") })
			if err != nil {
				t.Fatal(err)
			}
			rows := diskRows(got)
			if len(rows) != len(tt.image.Devices.Disks)+1 || rows[len(rows)-1] != tt.want {
				t.Fatalf("disks %+v; want the image's and then %+v", rows, tt.want)
			}
			last := got.Devices.Disks[len(got.Devices.Disks)-1]
			if last.Serial != scratchSerial || last.Driver.Discard != "unmap" || last.ReadOnly != nil {
				t.Errorf("scratch disk %+v", last)
			}
		})
	}
	full := image(nil)
	for c := 'a'; c <= 'z'; c++ {
		full.Devices.Disks = append(full.Devices.Disks, fileDisk("disk", "/shared/"+string(c)+".img", "vd"+string(c), true))
	}
	if _, _, err := scratchTarget(full); !errors.Is(err, ErrImageInvalid) {
		t.Errorf("scratchTarget with vda to vdz taken = %v, want ErrImageInvalid", err)
	}
}
