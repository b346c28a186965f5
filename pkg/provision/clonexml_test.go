package provision

import (
	"bytes"
	"crypto/rand"
	"errors"
	"net"
	"reflect"
	"regexp"
	"testing"

	"libvirt.org/go/libvirtxml"
)

func fileDisk(device, path, target string, readonly bool) libvirtxml.DomainDisk {
	d := libvirtxml.DomainDisk{
		Device: device,
		Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"},
		Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: path}},
		Target: &libvirtxml.DomainDiskTarget{Dev: target, Bus: "virtio"},
	}
	if readonly {
		d.ReadOnly = &libvirtxml.DomainDiskReadOnly{}
	}
	return d
}

func nic(mac string) libvirtxml.DomainInterface {
	i := libvirtxml.DomainInterface{
		Source: &libvirtxml.DomainInterfaceSource{Network: &libvirtxml.DomainInterfaceSourceNetwork{Network: "default"}},
		Target: &libvirtxml.DomainInterfaceTarget{Dev: "vnet7"},
	}
	if mac != "" {
		i.MAC = &libvirtxml.DomainInterfaceMAC{Address: mac, Type: "static"}
	}
	return i
}

func image(disks []libvirtxml.DomainDisk, nics ...libvirtxml.DomainInterface) *libvirtxml.Domain {
	return &libvirtxml.Domain{
		Type:     "kvm",
		Name:     "tiny",
		UUID:     "2a8d4c1e-5f6b-4a7c-8d9e-0f1a2b3c4d5e",
		GenID:    &libvirtxml.DomainGenID{Value: "43dc0cf8-809b-4adb-9bea-a9abb5f3d90e"},
		Metadata: &libvirtxml.DomainMetadata{XML: `<app:x xmlns:app="urn:other">1</app:x>`},
		Memory:   &libvirtxml.DomainMemory{Value: 256, Unit: "MiB"},
		OS:       &libvirtxml.DomainOS{Type: &libvirtxml.DomainOSType{Type: "hvm"}},
		SysInfo: []libvirtxml.DomainSysInfo{{SMBIOS: &libvirtxml.DomainSysInfoSMBIOS{
			System: &libvirtxml.DomainSysInfoSystem{Entry: []libvirtxml.DomainSysInfoEntry{
				{Name: "uuid", Value: "2a8d4c1e-5f6b-4a7c-8d9e-0f1a2b3c4d5e"},
				{Name: "serial", Value: "42"},
			}},
		}}},
		Devices: &libvirtxml.DomainDeviceList{Disks: disks, Interfaces: nics},
	}
}

func TestCloneXML(t *testing.T) {
	const newUUID = "0b6f2a51-9c3e-4d7a-8b1f-2e3d4c5b6a79"
	tests := []struct {
		name  string
		image *libvirtxml.Domain
		plan  clonePlan
		// wantSources are the disk sources of the clone, in order.
		wantSources []string
		// wantCopied are the targets whose driver must become qcow2.
		wantCopied []string
		check      func(t *testing.T, img, got *libvirtxml.Domain)
	}{
		{
			name:        "one file disk",
			image:       image([]libvirtxml.DomainDisk{fileDisk("disk", "/pool/tiny.qcow2", "vda", false)}),
			plan:        clonePlan{Disks: map[string]string{"vda": "/pool/stretchy-j-vda.qcow2"}},
			wantSources: []string{"/pool/stretchy-j-vda.qcow2"},
			wantCopied:  []string{"vda"},
		},
		{
			name: "readonly disk and cdrom stay shared",
			image: image([]libvirtxml.DomainDisk{
				fileDisk("disk", "/pool/tiny.qcow2", "vda", false),
				fileDisk("disk", "/shared/tools.img", "vdb", true),
				fileDisk("cdrom", "/shared/seed.iso", "sda", true),
				fileDisk("cdrom", "/shared/writable-looking.iso", "sdb", false),
			}),
			plan:        clonePlan{Disks: map[string]string{"vda": "/pool/stretchy-j-vda.qcow2"}},
			wantSources: []string{"/pool/stretchy-j-vda.qcow2", "/shared/tools.img", "/shared/seed.iso", "/shared/writable-looking.iso"},
			wantCopied:  []string{"vda"},
		},
		{
			name:  "two NICs get distinct MACs keeping the OUI",
			image: image(nil, nic("aa:bb:cc:00:00:01"), nic("52:54:00:12:34:56"), nic(""), nic("01:00:5e:00:00:01")),
			check: func(t *testing.T, img, got *libvirtxml.Domain) {
				wantOUI := []string{"aa:bb:cc", "52:54:00", "52:54:00", "52:54:00"}
				seen := map[string]bool{"aa:bb:cc:00:00:01": true, "52:54:00:12:34:56": true}
				for i, iface := range got.Devices.Interfaces {
					hw, err := net.ParseMAC(iface.MAC.Address)
					if err != nil {
						t.Fatalf("nic %d: %v", i, err)
					}
					if oui := hw[:3].String(); oui != wantOUI[i] {
						t.Errorf("nic %d: OUI %s, want %s", i, oui, wantOUI[i])
					}
					if seen[hw.String()] {
						t.Errorf("nic %d: MAC %s reused", i, hw)
					}
					seen[hw.String()] = true
					if iface.MAC.Type != "" || iface.Target != nil {
						t.Errorf("nic %d: kept MAC type %q or target %+v", i, iface.MAC.Type, iface.Target)
					}
				}
			},
		},
		{
			name:  "identity is new",
			image: image(nil),
			plan:  clonePlan{Type: "qemu"},
			check: func(t *testing.T, img, got *libvirtxml.Domain) {
				if got.Name != "stretchy-j" || got.UUID != newUUID || got.UUID == img.UUID {
					t.Errorf("name, uuid = %s, %s", got.Name, got.UUID)
				}
				if got.Type != "qemu" {
					t.Errorf("type = %q, want qemu", got.Type)
				}
				if got.GenID == nil || got.GenID.Value != "" {
					t.Errorf("genid = %+v, want empty (regenerated)", got.GenID)
				}
				for _, e := range got.SysInfo[0].SMBIOS.System.Entry {
					if e.Name == "uuid" {
						t.Errorf("sysinfo kept uuid %s", e.Value)
					}
				}
				if n := len(got.SysInfo[0].SMBIOS.System.Entry); n != 1 {
					t.Errorf("sysinfo has %d entries, want serial only", n)
				}
				if got.Metadata == nil || got.Metadata.XML != "<m/>" {
					t.Errorf("metadata = %+v, want only ours", got.Metadata)
				}
			},
		},
		{
			name:  "empty type keeps the image's",
			image: image(nil),
			check: func(t *testing.T, img, got *libvirtxml.Domain) {
				if got.Type != "kvm" {
					t.Errorf("type = %q, want kvm", got.Type)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before, err := tt.image.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			plan := tt.plan
			plan.Name, plan.UUID, plan.Metadata, plan.Rand = "stretchy-j", newUUID, "<m/>", rand.Reader
			got, err := cloneXML(tt.image, plan)
			if err != nil {
				t.Fatalf("cloneXML: %v", err)
			}
			if after, _ := tt.image.Marshal(); after != before {
				t.Errorf("cloneXML modified the image")
			}
			var sources []string
			for _, d := range got.Devices.Disks {
				sources = append(sources, d.Source.File.File)
				copied := false
				for _, c := range tt.wantCopied {
					copied = copied || c == d.Target.Dev
				}
				if gotType := d.Driver.Type; copied != (gotType == "qcow2") {
					t.Errorf("disk %s: driver type %s (copied: %v)", d.Target.Dev, gotType, copied)
				}
			}
			if !reflect.DeepEqual(sources, tt.wantSources) {
				t.Errorf("disk sources = %q, want %q", sources, tt.wantSources)
			}
			if tt.check != nil {
				tt.check(t, tt.image, got)
			}
			// What libvirt gets must be valid XML that parses back.
			doc, err := got.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			var back libvirtxml.Domain
			if err := back.Unmarshal(doc); err != nil {
				t.Fatalf("clone XML does not parse: %v", err)
			}
		})
	}
}

func TestCloneXMLRejects(t *testing.T) {
	blockDisk := libvirtxml.DomainDisk{
		Device: "disk",
		Source: &libvirtxml.DomainDiskSource{Block: &libvirtxml.DomainDiskSourceBlock{Dev: "/dev/sdz"}},
		Target: &libvirtxml.DomainDiskTarget{Dev: "vda"},
	}
	noTarget := fileDisk("disk", "/pool/a.qcow2", "", false)
	tests := []struct {
		name      string
		image     *libvirtxml.Domain
		disks     map[string]string
		wantImage bool // error wraps ErrImageInvalid
	}{
		{"writable block disk", image([]libvirtxml.DomainDisk{blockDisk}), nil, true},
		{"disk without target", image([]libvirtxml.DomainDisk{noTarget}), nil, true},
		{"duplicate target", image([]libvirtxml.DomainDisk{
			fileDisk("disk", "/pool/a.qcow2", "vda", false), fileDisk("disk", "/pool/b.qcow2", "vda", false),
		}), map[string]string{"vda": "/x"}, true},
		{"disk missing from plan", image([]libvirtxml.DomainDisk{fileDisk("disk", "/pool/a.qcow2", "vda", false)}), nil, false},
		{"plan has extra disk", image(nil), map[string]string{"vda": "/x"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			plan := clonePlan{Name: "stretchy-j", UUID: "0b6f2a51-9c3e-4d7a-8b1f-2e3d4c5b6a79", Disks: tt.disks, Rand: rand.Reader}
			_, err := cloneXML(tt.image, plan)
			if err == nil {
				t.Fatal("cloneXML succeeded")
			}
			if got := errors.Is(err, ErrImageInvalid); got != tt.wantImage {
				t.Errorf("errors.Is(%v, ErrImageInvalid) = %v, want %v", err, got, tt.wantImage)
			}
		})
	}
}

func TestWritableDisks(t *testing.T) {
	shareable := fileDisk("disk", "/pool/cluster.img", "vdd", false)
	shareable.Shareable = &libvirtxml.DomainDiskShareable{}
	empty := libvirtxml.DomainDisk{Device: "floppy", Target: &libvirtxml.DomainDiskTarget{Dev: "fda"}}
	img := image([]libvirtxml.DomainDisk{
		fileDisk("disk", "/pool/tiny.qcow2", "vda", false),
		fileDisk("", "/pool/data.img", "vdb", false), // device defaults to disk
		fileDisk("disk", "/shared/ro.img", "vdc", true),
		shareable,
		empty,
	})
	got, err := writableDisks(img)
	if err != nil {
		t.Fatal(err)
	}
	want := []imageDisk{{"vda", "/pool/tiny.qcow2"}, {"vdb", "/pool/data.img"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("writableDisks = %+v, want %+v", got, want)
	}
}

func TestNewUUID(t *testing.T) {
	v4 := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	a, err := newUUID(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := newUUID(rand.Reader)
	if !v4.MatchString(a) || a == b {
		t.Errorf("newUUID = %s, %s; want distinct version 4 UUIDs", a, b)
	}
	if _, err := newUUID(bytes.NewReader(nil)); err == nil {
		t.Error("newUUID with an empty random source succeeded")
	}
}
