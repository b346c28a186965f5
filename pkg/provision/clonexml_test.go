package provision

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"
)

func fileDisk(device, path, target string, readonly bool) libvirtxml.DomainDisk {
	d := libvirtxml.DomainDisk{
		Device: device,
		Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw", Cache: "none", Discard: "unmap"},
		Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: path}},
		Target: &libvirtxml.DomainDiskTarget{Dev: target, Bus: "virtio"},
	}
	if strings.HasSuffix(path, ".qcow2") {
		d.Driver.Type = "qcow2"
	}
	if readonly {
		d.ReadOnly = &libvirtxml.DomainDiskReadOnly{}
	}
	return d
}

func volumeDisk(pool, vol, target string) libvirtxml.DomainDisk {
	return libvirtxml.DomainDisk{
		Device: "disk",
		Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "qcow2"},
		Source: &libvirtxml.DomainDiskSource{Volume: &libvirtxml.DomainDiskSourceVolume{Pool: pool, Volume: vol}},
		Target: &libvirtxml.DomainDiskTarget{Dev: target, Bus: "scsi"},
		Serial: "data-1",
	}
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
		Title:    "Tiny image",
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

// fakePools is the storage the table tests pretend libvirt reports: pool
// name -> type and directory; every file in a pool's directory is a volume.
var fakePools = map[string]struct{ typ, dir string }{
	"images": {"dir", "/pool"},
	"nfs":    {"netfs", "/mnt/nfs"},
	"lvm":    {"logical", "/dev/vg"},
}

func fakeRef(pool, name string) *volumeRef {
	fp := fakePools[pool]
	format := "raw"
	if strings.HasSuffix(name, ".qcow2") {
		format = "qcow2"
	}
	return &volumeRef{Pool: pool, PoolType: fp.typ, Name: name, Path: filepath.Join(fp.dir, name), Format: format, Capacity: 8 << 30}
}

// fakeLookup resolves a disk as the Provisioner does through libvirt.
func fakeLookup(d imageDisk) *volumeRef {
	if d.Path == "" {
		return fakeRef(d.Pool, d.Volume)
	}
	for name, fp := range fakePools {
		if filepath.Dir(d.Path) == fp.dir {
			return fakeRef(name, filepath.Base(d.Path))
		}
	}
	return nil
}

const (
	testUUID  = "0b6f2a51-9c3e-4d7a-8b1f-2e3d4c5b6a79"
	testNVRAM = "/pool/stretchy-j-nvram.fd"
)

// transform runs the pure half of Clone on img: plan the disks against
// fakePools, pretend the volumes were created at their planned names, and
// build the clone's XML. Each of more changes the plan first.
func transform(img *libvirtxml.Domain, mode CloneMode, taken map[string]bool, r io.Reader, more ...func(*clonePlan)) (*libvirtxml.Domain, error) {
	disks, err := writableDisks(img)
	if err != nil {
		return nil, err
	}
	refs := make([]*volumeRef, len(disks))
	for i, d := range disks {
		refs[i] = fakeLookup(d)
	}
	plans, err := planDisks("j", disks, refs, mode)
	if err != nil {
		return nil, err
	}
	plan := clonePlan{
		Image: img.Name, Name: "stretchy-j", UUID: testUUID, Metadata: "<m/>",
		Linked: mode == CloneLinked, Disks: map[string]diskOut{}, TakenMACs: taken, Rand: r,
	}
	for _, p := range plans {
		plan.Disks[p.Disk.Target] = diskOut{Path: filepath.Join(fakePools[p.Src.Pool].dir, p.Name), Format: p.Format}
	}
	if imageNVRAM(img) != "" {
		plan.NVRAM = testNVRAM
	}
	for _, f := range more {
		f(&plan)
	}
	d, _, err := cloneXML(img, plan)
	return d, err
}

func uefi(img *libvirtxml.Domain, nvram string) *libvirtxml.Domain {
	img.OS.Loader = &libvirtxml.DomainLoader{Path: "/usr/share/OVMF/OVMF_CODE.fd", Readonly: "yes", Type: "pflash"}
	img.OS.NVRam = &libvirtxml.DomainNVRam{NVRam: nvram, Template: "/usr/share/OVMF/OVMF_VARS.fd"}
	return img
}

// diskRow is what the tests check of each clone disk.
type diskRow struct {
	Type, Source, Format, Target, Bus string
}

func diskRows(d *libvirtxml.Domain) []diskRow {
	var rows []diskRow
	for _, disk := range d.Devices.Disks {
		r := diskRow{Type: diskType(disk.Source), Target: disk.Target.Dev, Bus: disk.Target.Bus}
		switch {
		case disk.Source.File != nil:
			r.Source = disk.Source.File.File
		case disk.Source.Volume != nil:
			r.Source = disk.Source.Volume.Pool + "/" + disk.Source.Volume.Volume
		}
		if disk.Driver != nil {
			r.Format = disk.Driver.Type
		}
		rows = append(rows, r)
	}
	return rows
}

func TestCloneXML(t *testing.T) {
	tests := []struct {
		name  string
		image *libvirtxml.Domain
		mode  CloneMode
		taken map[string]bool
		// rand, if set, replaces crypto/rand.
		rand      io.Reader
		wantDisks []diskRow
		check     func(t *testing.T, img, got *libvirtxml.Domain)
	}{
		{
			name:      "BIOS one disk",
			image:     image([]libvirtxml.DomainDisk{fileDisk("disk", "/pool/tiny.qcow2", "vda", false)}),
			wantDisks: []diskRow{{"file", "/pool/stretchy-j-vda.qcow2", "qcow2", "vda", "virtio"}},
			check: func(t *testing.T, img, got *libvirtxml.Domain) {
				if got.OS.NVRam != nil || got.OS.Loader != nil {
					t.Errorf("BIOS clone got firmware %+v, %+v", got.OS.Loader, got.OS.NVRam)
				}
				d := got.Devices.Disks[0]
				if d.Driver.Cache != "none" || d.Driver.Discard != "unmap" || d.Driver.Name != "qemu" {
					t.Errorf("driver options not kept: %+v", d.Driver)
				}
			},
		},
		{
			name:      "UEFI with NVRAM",
			image:     uefi(image([]libvirtxml.DomainDisk{fileDisk("disk", "/pool/win.qcow2", "sda", false)}), "/var/lib/libvirt/qemu/nvram/tiny_VARS.fd"),
			wantDisks: []diskRow{{"file", "/pool/stretchy-j-sda.qcow2", "qcow2", "sda", "virtio"}},
			check: func(t *testing.T, img, got *libvirtxml.Domain) {
				want := libvirtxml.DomainNVRam{NVRam: testNVRAM, Template: "/usr/share/OVMF/OVMF_VARS.fd"}
				if got.OS.NVRam == nil || *got.OS.NVRam != want {
					t.Errorf("nvram = %+v, want %+v", got.OS.NVRam, want)
				}
				if !reflect.DeepEqual(got.OS.Loader, img.OS.Loader) {
					t.Errorf("loader = %+v, want the image's %+v", got.OS.Loader, img.OS.Loader)
				}
			},
		},
		{
			name:      "UEFI NVRAM not created yet",
			image:     uefi(image([]libvirtxml.DomainDisk{fileDisk("disk", "/pool/win.qcow2", "sda", false)}), ""),
			wantDisks: []diskRow{{"file", "/pool/stretchy-j-sda.qcow2", "qcow2", "sda", "virtio"}},
			check: func(t *testing.T, img, got *libvirtxml.Domain) {
				// No path: libvirt creates the clone's own from the template.
				want := libvirtxml.DomainNVRam{Template: "/usr/share/OVMF/OVMF_VARS.fd"}
				if got.OS.NVRam == nil || *got.OS.NVRam != want {
					t.Errorf("nvram = %+v, want %+v", got.OS.NVRam, want)
				}
			},
		},
		{
			name: "two disks, one read-only",
			image: image([]libvirtxml.DomainDisk{
				fileDisk("disk", "/pool/tiny.qcow2", "vda", false),
				fileDisk("disk", "/shared/tools.img", "vdb", true),
				fileDisk("cdrom", "/shared/seed.iso", "sda", true),
				fileDisk("cdrom", "/shared/writable-looking.iso", "sdb", false),
			}),
			wantDisks: []diskRow{
				{"file", "/pool/stretchy-j-vda.qcow2", "qcow2", "vda", "virtio"},
				{"file", "/shared/tools.img", "raw", "vdb", "virtio"},
				{"file", "/shared/seed.iso", "raw", "sda", "virtio"},
				{"file", "/shared/writable-looking.iso", "raw", "sdb", "virtio"},
			},
		},
		{
			name: "volume disk becomes a file disk",
			image: image([]libvirtxml.DomainDisk{
				fileDisk("disk", "/pool/tiny.qcow2", "vda", false),
				volumeDisk("images", "data.qcow2", "sdb"),
			}),
			wantDisks: []diskRow{
				{"file", "/pool/stretchy-j-vda.qcow2", "qcow2", "vda", "virtio"},
				{"file", "/pool/stretchy-j-sdb.qcow2", "qcow2", "sdb", "scsi"},
			},
			check: func(t *testing.T, img, got *libvirtxml.Domain) {
				if s := got.Devices.Disks[1].Serial; s != "data-1" {
					t.Errorf("disk serial = %q, want data-1", s)
				}
			},
		},
		{
			name: "copy keeps each disk's format",
			mode: CloneCopy,
			image: image([]libvirtxml.DomainDisk{
				fileDisk("disk", "/pool/tiny.qcow2", "vda", false),
				fileDisk("disk", "/mnt/nfs/data.raw", "vdb", false),
			}),
			wantDisks: []diskRow{
				{"file", "/pool/stretchy-j-vda.qcow2", "qcow2", "vda", "virtio"},
				{"file", "/mnt/nfs/stretchy-j-vdb.img", "raw", "vdb", "virtio"},
			},
		},
		{
			name:  "two NICs get new MACs keeping the OUI, avoiding taken ones",
			image: image(nil, nic("AA:BB:CC:00:00:01"), nic("52:54:00:12:34:56"), nic(""), nic("01:00:5e:00:00:01")),
			// The first draw collides with an address in use on the host.
			taken: map[string]bool{"aa:bb:cc:01:02:03": true},
			rand:  io.MultiReader(bytes.NewReader([]byte{1, 2, 3}), rand.Reader),
			check: func(t *testing.T, img, got *libvirtxml.Domain) {
				wantOUI := []string{"aa:bb:cc", "52:54:00", "52:54:00", "52:54:00"}
				seen := map[string]bool{"aa:bb:cc:00:00:01": true, "52:54:00:12:34:56": true, "aa:bb:cc:01:02:03": true}
				for i, iface := range got.Devices.Interfaces {
					hw, err := net.ParseMAC(iface.MAC.Address)
					if err != nil {
						t.Fatalf("nic %d: %v", i, err)
					}
					if oui := hw[:3].String(); oui != wantOUI[i] {
						t.Errorf("nic %d: OUI %s, want %s", i, oui, wantOUI[i])
					}
					if seen[hw.String()] {
						t.Errorf("nic %d: MAC %s taken", i, hw)
					}
					seen[hw.String()] = true
					if iface.MAC.Type != "" || iface.Target != nil {
						t.Errorf("nic %d: kept MAC type %q or target %+v", i, iface.MAC.Type, iface.Target)
					}
				}
			},
		},
		{
			name: "VNC and SPICE graphics get their own ports and sockets",
			image: func() *libvirtxml.Domain {
				img := image(nil)
				img.Devices.Graphics = []libvirtxml.DomainGraphic{
					{VNC: &libvirtxml.DomainGraphicVNC{Port: 5901, AutoPort: "no", WebSocket: 5701, Listen: "0.0.0.0", Passwd: "secret",
						Listeners: []libvirtxml.DomainGraphicListener{{Address: &libvirtxml.DomainGraphicListenerAddress{Address: "0.0.0.0"}}}}},
					{Spice: &libvirtxml.DomainGraphicSpice{Port: 5930, TLSPort: 5931, AutoPort: "no",
						Listeners: []libvirtxml.DomainGraphicListener{{Socket: &libvirtxml.DomainGraphicListenerSocket{Socket: "/run/tiny/spice.sock"}}}}},
					{VNC: &libvirtxml.DomainGraphicVNC{Socket: "/run/tiny/vnc.sock"}},
				}
				return img
			}(),
			check: func(t *testing.T, img, got *libvirtxml.Domain) {
				vnc, spice, vncSock := got.Devices.Graphics[0].VNC, got.Devices.Graphics[1].Spice, got.Devices.Graphics[2].VNC
				if vnc.Port != -1 || vnc.AutoPort != "yes" || vnc.WebSocket != -1 {
					t.Errorf("vnc port %d autoport %q websocket %d; want -1, yes, -1", vnc.Port, vnc.AutoPort, vnc.WebSocket)
				}
				if vnc.Listen != "0.0.0.0" || vnc.Passwd != "secret" || vnc.Listeners[0].Address.Address != "0.0.0.0" {
					t.Errorf("vnc listen address or password not kept: %+v", vnc)
				}
				if spice.Port != -1 || spice.TLSPort != -1 || spice.AutoPort != "yes" {
					t.Errorf("spice port %d tlsPort %d autoport %q; want -1, -1, yes", spice.Port, spice.TLSPort, spice.AutoPort)
				}
				if s := spice.Listeners[0].Socket; s == nil || s.Socket != "" {
					t.Errorf("spice socket listener %+v, want one without a path", s)
				}
				if vncSock.Socket != "" || len(vncSock.Listeners) != 1 || vncSock.Listeners[0].Socket == nil || vncSock.Listeners[0].Socket.Socket != "" {
					t.Errorf("vnc socket %q listeners %+v; want a socket listener without a path", vncSock.Socket, vncSock.Listeners)
				}
			},
		},
		{
			name: "serial file logs and sockets are the clone's own",
			image: func() *libvirtxml.Domain {
				img := image(nil)
				fileSrc := func(p string) *libvirtxml.DomainChardevSource {
					return &libvirtxml.DomainChardevSource{File: &libvirtxml.DomainChardevSourceFile{Path: p}}
				}
				unix := func(mode, p string) *libvirtxml.DomainChardevSource {
					return &libvirtxml.DomainChardevSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{Mode: mode, Path: p}}
				}
				img.Devices.Serials = []libvirtxml.DomainSerial{
					{Source: fileSrc("/var/log/ci/tiny-serial0.log")},
					{Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}},
						Log: &libvirtxml.DomainChardevLog{File: "/var/log/libvirt/qemu/console.log", Append: "on"}},
					{Source: unix("bind", "/run/ci/tiny.serial")},
				}
				img.Devices.Consoles = []libvirtxml.DomainConsole{{Source: fileSrc("/var/log/ci/tiny-serial0.log"), TTY: "/dev/pts/3"}}
				img.Devices.Parallels = []libvirtxml.DomainParallel{{Source: fileSrc("/var/log/ci/lpt.out")}}
				img.Devices.Channels = []libvirtxml.DomainChannel{
					{Source: unix("bind", "/var/lib/libvirt/qemu/channel/target/tiny.org.qemu.guest_agent.0"),
						Target: &libvirtxml.DomainChannelTarget{VirtIO: &libvirtxml.DomainChannelTargetVirtIO{Name: "org.qemu.guest_agent.0", State: "connected"}}},
					{Source: unix("connect", "/run/host-service.sock"),
						Target: &libvirtxml.DomainChannelTarget{VirtIO: &libvirtxml.DomainChannelTargetVirtIO{Name: "org.example.service"}}},
				}
				return img
			}(),
			check: func(t *testing.T, img, got *libvirtxml.Domain) {
				d := got.Devices
				paths := []string{
					d.Serials[0].Source.File.Path, d.Serials[1].Log.File, d.Serials[2].Source.UNIX.Path,
					d.Consoles[0].Source.File.Path, d.Parallels[0].Source.File.Path,
					d.Channels[0].Source.UNIX.Path, d.Channels[1].Source.UNIX.Path,
				}
				want := []string{
					"/var/log/ci/stretchy-j-serial0.log", "/var/log/libvirt/qemu/stretchy-j-console.log", "/run/ci/stretchy-j.serial",
					"/var/log/ci/stretchy-j-serial0.log", "/var/log/ci/stretchy-j-lpt.out",
					"", "/run/host-service.sock",
				}
				if !reflect.DeepEqual(paths, want) {
					t.Errorf("chardev paths\n got %q\nwant %q", paths, want)
				}
				if d.Consoles[0].TTY != "" || d.Channels[0].Target.VirtIO.State != "" || d.Serials[1].Log.Append != "on" {
					t.Errorf("console tty %q, channel state %q, log append %q", d.Consoles[0].TTY, d.Channels[0].Target.VirtIO.State, d.Serials[1].Log.Append)
				}
			},
		},
		{
			name: "identity is new",
			image: func() *libvirtxml.Domain {
				img := image(nil)
				img.SecLabel = []libvirtxml.DomainSecLabel{
					{Type: "dynamic", Model: "selinux", Relabel: "yes", Label: "system_u:system_r:svirt_t:s0:c1,c2", ImageLabel: "system_u:object_r:svirt_image_t:s0:c1,c2"},
					{Type: "static", Model: "dac", Label: "107:107"},
				}
				return img
			}(),
			check: func(t *testing.T, img, got *libvirtxml.Domain) {
				if got.Name != "stretchy-j" || got.UUID != testUUID || got.Title != "" {
					t.Errorf("name, uuid, title = %s, %s, %q", got.Name, got.UUID, got.Title)
				}
				if got.Type != "kvm" {
					t.Errorf("type = %q, want the image's kvm", got.Type)
				}
				if got.GenID == nil || got.GenID.Value != "" {
					t.Errorf("genid = %+v, want empty (regenerated)", got.GenID)
				}
				entries := got.SysInfo[0].SMBIOS.System.Entry
				if len(entries) != 2 || entries[0].Value != testUUID || entries[1].Value != "42" {
					t.Errorf("sysinfo = %+v, want uuid %s and the serial", entries, testUUID)
				}
				if got.Metadata == nil || got.Metadata.XML != "<m/>" {
					t.Errorf("metadata = %+v, want only ours", got.Metadata)
				}
				want := []libvirtxml.DomainSecLabel{
					{Type: "dynamic", Model: "selinux", Relabel: "yes"},
					{Type: "static", Model: "dac", Label: "107:107"},
				}
				if !reflect.DeepEqual(got.SecLabel, want) {
					t.Errorf("seclabels = %+v, want %+v", got.SecLabel, want)
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
			mode := tt.mode
			if mode == "" {
				mode = CloneLinked
			}
			r := tt.rand
			if r == nil {
				r = rand.Reader
			}
			got, err := transform(tt.image, mode, tt.taken, r)
			if err != nil {
				t.Fatalf("transform: %v", err)
			}
			if after, _ := tt.image.Marshal(); after != before {
				t.Errorf("cloneXML modified the image")
			}
			if rows := diskRows(got); tt.wantDisks != nil && !reflect.DeepEqual(rows, tt.wantDisks) {
				t.Errorf("disks\n got %+v\nwant %+v", rows, tt.wantDisks)
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
	encrypted := fileDisk("disk", "/pool/secret.qcow2", "vda", false)
	encrypted.Source.Encryption = &libvirtxml.DomainDiskEncryption{Format: "luks"}
	mismatch := fileDisk("disk", "/pool/tiny.qcow2", "vda", false)
	mismatch.Driver.Type = "raw"
	tests := []struct {
		name  string
		image *libvirtxml.Domain
		mode  CloneMode
		// want are errors the result must wrap; msg parts it must contain.
		want []error
		msg  []string
	}{
		{"disk outside any pool", image([]libvirtxml.DomainDisk{fileDisk("disk", "/home/op/loose.qcow2", "vdb", false)}), CloneLinked,
			[]error{ErrImageInvalid}, []string{"disk vdb", "/home/op/loose.qcow2", "outside every storage pool"}},
		{"writable block disk", image([]libvirtxml.DomainDisk{blockDisk}), CloneLinked, []error{ErrImageInvalid}, []string{"disk vda", "block"}},
		{"disk without target", image([]libvirtxml.DomainDisk{fileDisk("disk", "/pool/a.qcow2", "", false)}), CloneLinked, []error{ErrImageInvalid}, nil},
		{"duplicate target", image([]libvirtxml.DomainDisk{
			fileDisk("disk", "/pool/a.qcow2", "vda", false), fileDisk("disk", "/pool/b.qcow2", "vda", false),
		}), CloneLinked, []error{ErrImageInvalid}, nil},
		{"pool that is not file-based", image([]libvirtxml.DomainDisk{volumeDisk("lvm", "root", "vda")}), CloneCopy,
			[]error{ErrImageInvalid}, []string{"pool lvm", "logical"}},
		{"reflink on a network file system", image([]libvirtxml.DomainDisk{fileDisk("disk", "/mnt/nfs/a.qcow2", "vda", false)}), CloneReflink,
			[]error{ErrReflinkUnsupported, ErrImageInvalid}, []string{"pool nfs", "netfs"}},
		{"encrypted disk linked", image([]libvirtxml.DomainDisk{encrypted}), CloneLinked, []error{ErrImageInvalid}, []string{"encrypted"}},
		{"driver type disagrees with the volume", image([]libvirtxml.DomainDisk{mismatch}), CloneLinked,
			[]error{ErrImageInvalid}, []string{"driver type raw", "is qcow2"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := transform(tt.image, tt.mode, nil, rand.Reader)
			if err == nil {
				t.Fatal("transform succeeded")
			}
			for _, want := range tt.want {
				if !errors.Is(err, want) {
					t.Errorf("error %v does not wrap %v", err, want)
				}
			}
			for _, part := range tt.msg {
				if !strings.Contains(err.Error(), part) {
					t.Errorf("error %q does not mention %q", err, part)
				}
			}
		})
	}
}

func TestCloneXMLChecksPlan(t *testing.T) {
	tests := []struct {
		name  string
		image *libvirtxml.Domain
		disks map[string]diskOut
	}{
		{"disk missing from plan", image([]libvirtxml.DomainDisk{fileDisk("disk", "/pool/a.qcow2", "vda", false)}), nil},
		{"plan has extra disk", image(nil), map[string]diskOut{"vda": {"/x", "qcow2"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			plan := clonePlan{Name: "stretchy-j", UUID: testUUID, Disks: tt.disks, Rand: rand.Reader}
			if _, _, err := cloneXML(tt.image, plan); err == nil {
				t.Fatal("cloneXML succeeded")
			}
		})
	}
}

func TestWritableDisks(t *testing.T) {
	shareable := fileDisk("disk", "/pool/cluster.img", "vdd", false)
	shareable.Shareable = &libvirtxml.DomainDiskShareable{}
	transient := fileDisk("disk", "/pool/scratch.img", "vde", false)
	transient.Transient = &libvirtxml.DomainDiskTransient{ShareBacking: "yes"}
	empty := libvirtxml.DomainDisk{Device: "floppy", Target: &libvirtxml.DomainDiskTarget{Dev: "fda"}}
	img := image([]libvirtxml.DomainDisk{
		fileDisk("disk", "/pool/tiny.qcow2", "vda", false),
		fileDisk("", "/pool/data.img", "vdb", false), // device defaults to disk
		fileDisk("disk", "/shared/ro.img", "vdc", true),
		shareable,
		transient,
		empty,
		volumeDisk("images", "extra.qcow2", "sdf"),
	})
	got, err := writableDisks(img)
	if err != nil {
		t.Fatal(err)
	}
	want := []imageDisk{
		{Index: 0, Target: "vda", Path: "/pool/tiny.qcow2", Format: "qcow2"},
		{Index: 1, Target: "vdb", Path: "/pool/data.img", Format: "raw"},
		{Index: 6, Target: "sdf", Pool: "images", Volume: "extra.qcow2", Format: "qcow2"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("writableDisks = %+v, want %+v", got, want)
	}
}

func TestClonePath(t *testing.T) {
	tests := []struct{ path, want string }{
		{"/var/log/tiny-serial.log", "/var/log/stretchy-j-serial.log"},
		{"/var/log/serial.log", "/var/log/stretchy-j-serial.log"},
		{"/var/log/tiny/out.log", "/var/log/tiny/stretchy-j-out.log"},
		{"", ""},
	}
	for _, tt := range tests {
		if got := clonePath("tiny", "stretchy-j", tt.path); got != tt.want {
			t.Errorf("clonePath(%q) = %q, want %q", tt.path, got, tt.want)
		}
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
