package provision

import (
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// The pure half of cloning: which image disks get copies and how, and the
// clone's domain definition. Everything here works on libvirtxml structs
// and on facts gathered from libvirt beforehand, so it is table-tested
// without libvirt.

// imageDisk is a disk of an image whose storage a clone must not share.
type imageDisk struct {
	// Index is the disk's position in the image's <devices>.
	Index int
	// Target is the guest device name, e.g. "vda"; it names the volume.
	Target string
	// Path is the file of a type='file' disk.
	Path string
	// Pool and Volume name the volume of a type='volume' disk.
	Pool, Volume string
	// Format is the disk's driver type, "" if the image leaves it to
	// libvirt.
	Format string
	// Encrypted says the image's volume is encrypted (LUKS).
	Encrypted bool
}

// source describes the disk's storage for messages.
func (d imageDisk) source() string {
	if d.Path != "" {
		return d.Path
	}
	return d.Pool + "/" + d.Volume
}

// volumeRef is a storage volume as libvirt reports it.
type volumeRef struct {
	Pool     string
	PoolType string
	Name     string
	Path     string
	Format   string
	Capacity uint64
}

// diskPlan says how one image disk is copied.
type diskPlan struct {
	Disk imageDisk
	Src  volumeRef
	// Name is the new volume's name, in the pool of Src.
	Name string
	// Format is the new volume's format.
	Format string
}

// diskOut is what replaces an image disk in the clone's definition.
type diskOut struct {
	Path   string
	Format string
}

// clonePlan is everything cloneXML needs besides the image definition.
// Its fields are decided (and its volumes created) before the XML is built,
// so cloneXML stays a pure function.
type clonePlan struct {
	// Image is the image's name, replaced by Name in per-machine file
	// names (serial logs and the like).
	Image string
	Name  string
	UUID  string
	// Type replaces the domain type unless empty.
	Type string
	// Linked says the new volumes are overlays: disks lose the image's
	// slices and encryption, which describe the image's files.
	Linked bool
	// Disks maps the target of every disk returned by writableDisks to
	// what replaces it.
	Disks map[string]diskOut
	// NVRAM is the path of the clone's copy of the image's NVRAM; empty
	// lets libvirt create one from the template at the clone's own path.
	NVRAM string
	// Metadata is the element placed inside <metadata>.
	Metadata string
	// TakenMACs are addresses in use on the host (lower case); new ones
	// avoid them.
	TakenMACs map[string]bool
	// Rand supplies the new MAC addresses.
	Rand io.Reader
	// VCPUs and MemoryMiB, when above 0, replace the image's size.
	VCPUs, MemoryMiB int
	// Scratch, when set, is the path of an empty qcow2 volume attached
	// as an extra disk (scratchTarget says where).
	Scratch string
	// ConsoleLog, when set, is the file the main console logs to; the
	// other serial ports and consoles log next to it (consoleLogs).
	ConsoleLog string
	// Isolation, when set, attaches the guest filter to the clone's
	// bridge-based interfaces, which get managed MAC addresses
	// (isolation.go).
	Isolation *isolationPlan
}

// scratchSerial is the disk serial of a machine's scratch disk, by which a
// guest finds it (/dev/disk/by-id/virtio-stretchy-scratch on Linux).
const scratchSerial = "stretchy-scratch"

// scratchVolumeName is the name of the scratch disk volume of the machine
// with key.
func scratchVolumeName(key string) string { return DomainName(key) + "-scratch.qcow2" }

// diskPrefixes are the device name prefixes of the disk buses.
var diskPrefixes = map[string]string{"virtio": "vd", "scsi": "sd", "sata": "sd", "usb": "sd", "ide": "hd", "xen": "xvd"}

// scratchTarget returns the bus and device name of a scratch disk added to
// d: the bus of the first disk that is not a CD-ROM or floppy (virtio if
// there is none, or its bus has no device names), and the first free name
// on it, such as vdb after vda.
func scratchTarget(d *libvirtxml.Domain) (bus, dev string, err error) {
	bus = "virtio"
	used := map[string]bool{}
	if d.Devices != nil {
		found := false
		for _, disk := range d.Devices.Disks {
			if disk.Target == nil {
				continue
			}
			used[disk.Target.Dev] = true
			if !found && disk.Device != "cdrom" && disk.Device != "floppy" {
				found = true
				if _, ok := diskPrefixes[disk.Target.Bus]; ok {
					bus = disk.Target.Bus
				}
			}
		}
	}
	for c := 'a'; c <= 'z'; c++ {
		if dev := diskPrefixes[bus] + string(c); !used[dev] {
			return bus, dev, nil
		}
	}
	return "", "", fmt.Errorf("no free device name on bus %s for a scratch disk: %w", bus, ErrImageInvalid)
}

// fallbackOUI is QEMU's locally administered prefix, used when the image's
// MAC is missing or unusable.
var fallbackOUI = [3]byte{0x52, 0x54, 0x00}

// copiesDisk reports whether a clone needs its own copy of disk d. Read-only
// disks and CD-ROMs are shared as they are, as are disks the image marks
// shareable, which are meant to be attached to several domains at once, and
// transient disks whose backing is shared by design.
func copiesDisk(d *libvirtxml.DomainDisk) bool {
	if d.ReadOnly != nil || d.Shareable != nil || d.Device == "cdrom" {
		return false
	}
	if d.Transient != nil && d.Transient.ShareBacking == "yes" {
		return false
	}
	return d.Source != nil && diskType(d.Source) != "unknown"
}

// writableDisks returns the disks of image that need a copy. Only file and
// volume disks can be copied; other writable disks are refused rather than
// shared between machines.
func writableDisks(image *libvirtxml.Domain) ([]imageDisk, error) {
	if image.Devices == nil {
		return nil, nil
	}
	var disks []imageDisk
	seen := make(map[string]bool)
	for i := range image.Devices.Disks {
		d := &image.Devices.Disks[i]
		if !copiesDisk(d) {
			continue
		}
		if d.Target == nil || d.Target.Dev == "" {
			return nil, fmt.Errorf("writable disk %d has no target device: %w", i, ErrImageInvalid)
		}
		target := d.Target.Dev
		if strings.ContainsAny(target, "-/.") || seen[target] {
			return nil, fmt.Errorf("disk %s: unusable or duplicate target name: %w", target, ErrImageInvalid)
		}
		seen[target] = true
		if d.Source.DataStore != nil {
			return nil, fmt.Errorf("disk %s: disks with an external data file cannot be cloned: %w", target, ErrImageInvalid)
		}
		disk := imageDisk{Index: i, Target: target, Encrypted: d.Encryption != nil || d.Source.Encryption != nil}
		if d.Driver != nil {
			disk.Format = d.Driver.Type
		}
		switch {
		case d.Source.File != nil && d.Source.File.File != "":
			disk.Path = d.Source.File.File
		case d.Source.Volume != nil && d.Source.Volume.Pool != "" && d.Source.Volume.Volume != "":
			disk.Pool, disk.Volume = d.Source.Volume.Pool, d.Source.Volume.Volume
		default:
			return nil, fmt.Errorf("disk %s: writable disks of type %s are not supported: %w", target, diskType(d.Source), ErrImageInvalid)
		}
		disks = append(disks, disk)
	}
	return disks, nil
}

func diskType(s *libvirtxml.DomainDiskSource) string {
	switch {
	case s.File != nil:
		return "file"
	case s.Block != nil:
		return "block"
	case s.Dir != nil:
		return "dir"
	case s.Network != nil:
		return "network"
	case s.Volume != nil:
		return "volume"
	case s.NVME != nil:
		return "nvme"
	case s.VHostUser != nil:
		return "vhostuser"
	case s.VHostVDPA != nil:
		return "vhostvdpa"
	}
	return "unknown"
}

// fileBackedPools are the pool types whose volumes are plain files, which
// is what overlays and the clone's type='file' disks need.
var fileBackedPools = map[string]bool{"dir": true, "fs": true, "netfs": true}

// reflinkPools are the pool types whose files the worker can reach on the
// local file system.
var reflinkPools = map[string]bool{"dir": true, "fs": true}

// planDisks decides how each disk is copied. refs[i] is the volume behind
// disks[i], nil if it lies outside every pool. Errors name the disk and its
// storage; the caller adds the image.
func planDisks(jobID string, disks []imageDisk, refs []*volumeRef, mode CloneMode) ([]diskPlan, error) {
	if len(refs) != len(disks) {
		return nil, fmt.Errorf("%d volumes for %d disks", len(refs), len(disks))
	}
	plans := make([]diskPlan, 0, len(disks))
	for i, d := range disks {
		ref := refs[i]
		if ref == nil {
			return nil, fmt.Errorf("disk %s: %s is outside every storage pool; writable disks must be pool volumes to be cloned: %w",
				d.Target, d.source(), ErrImageInvalid)
		}
		if !fileBackedPools[ref.PoolType] {
			return nil, fmt.Errorf("disk %s: pool %s is of type %s; only dir, fs and netfs pools can be cloned from: %w",
				d.Target, ref.Pool, ref.PoolType, ErrImageInvalid)
		}
		if mode == CloneLinked && d.Encrypted {
			return nil, fmt.Errorf("disk %s: encrypted disks cannot be linked clones; use clone mode copy: %w",
				d.Target, ErrImageInvalid)
		}
		if mode == CloneReflink && !reflinkPools[ref.PoolType] {
			return nil, fmt.Errorf("disk %s: pool %s is of type %s, not a local directory: %w: %w",
				d.Target, ref.Pool, ref.PoolType, ErrReflinkUnsupported, ErrImageInvalid)
		}
		// The driver type is what the guest sees; libvirt's probed volume
		// format only fills in when the image gives none.
		format := d.Format
		if format == "" {
			format = ref.Format
		}
		if format == "" {
			format = "raw"
		}
		if d.Format != "" && ref.Format != "" && d.Format != ref.Format {
			return nil, fmt.Errorf("disk %s: driver type %s but volume %s is %s: %w",
				d.Target, d.Format, ref.Path, ref.Format, ErrImageInvalid)
		}
		plan := diskPlan{Disk: d, Src: *ref, Format: format}
		plan.Src.Format = format
		if mode == CloneLinked {
			plan.Format = "qcow2"
		}
		plan.Name = volumeName(jobID, d.Target, plan.Format)
		plans = append(plans, plan)
	}
	return plans, nil
}

// volumeName returns the name of the volume that replaces the image disk
// with the given target in the job's machine. ownedVolumePath accepts it.
func volumeName(jobID, target, format string) string {
	ext := format
	if format == "raw" {
		ext = "img"
	}
	return DomainName(jobID) + "-" + target + "." + ext
}

// nvramVolumeName is the name of the job's copy of the image's NVRAM.
func nvramVolumeName(jobID string) string { return DomainName(jobID) + "-nvram.fd" }

// imageNVRAM returns the path of the image's NVRAM file, "" if it has none.
func imageNVRAM(image *libvirtxml.Domain) string {
	if image.OS == nil || image.OS.NVRam == nil {
		return ""
	}
	n := image.OS.NVRam
	if n.NVRam != "" {
		return n.NVRam
	}
	if n.Source != nil && n.Source.File != nil {
		return n.Source.File.File
	}
	return ""
}

// cloneXML returns the definition of a clone of image as described by plan,
// and the image's interfaces that the plan's isolation leaves unfiltered.
// image is not modified.
func cloneXML(image *libvirtxml.Domain, plan clonePlan) (*libvirtxml.Domain, []string, error) {
	if plan.Name == "" || plan.UUID == "" {
		return nil, nil, errors.New("clone plan needs a name and a uuid")
	}
	toCopy, err := writableDisks(image)
	if err != nil {
		return nil, nil, err
	}
	// Deep copy: libvirtxml structs are full of pointers and slices.
	doc, err := image.Marshal()
	if err != nil {
		return nil, nil, fmt.Errorf("encode image XML: %w", err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		return nil, nil, fmt.Errorf("decode image XML: %w", err)
	}

	d.Name = plan.Name
	d.UUID = plan.UUID
	d.ID = nil
	// The title describes the image, not this machine.
	d.Title = ""
	if plan.Type != "" {
		d.Type = plan.Type
	}
	d.Metadata = &libvirtxml.DomainMetadata{XML: plan.Metadata}
	resetIdentity(&d, plan)

	if d.Devices == nil {
		d.Devices = &libvirtxml.DomainDeviceList{}
	}
	for _, c := range toCopy {
		disk := &d.Devices.Disks[c.Index]
		out, ok := plan.Disks[c.Target]
		if !ok {
			return nil, nil, fmt.Errorf("disk %s: no volume planned", c.Target)
		}
		replaceDiskSource(disk, out, plan.Linked)
	}
	if len(plan.Disks) != len(toCopy) {
		return nil, nil, fmt.Errorf("clone plan has %d volumes for %d writable disks", len(plan.Disks), len(toCopy))
	}

	if err := resize(&d, plan.VCPUs, plan.MemoryMiB); err != nil {
		return nil, nil, err
	}
	if plan.Scratch != "" {
		bus, dev, err := scratchTarget(&d)
		if err != nil {
			return nil, nil, err
		}
		d.Devices.Disks = append(d.Devices.Disks, libvirtxml.DomainDisk{
			Device: "disk",
			Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "qcow2", Discard: "unmap"},
			Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: plan.Scratch}},
			Target: &libvirtxml.DomainDiskTarget{Dev: dev, Bus: bus},
			Serial: scratchSerial,
		})
	}

	isolated, unfiltered, err := isolateInterfaces(d.Devices.Interfaces, plan.Isolation)
	if err != nil {
		return nil, nil, err
	}
	if err := newMACs(d.Devices.Interfaces, isolated, plan.TakenMACs, plan.Rand); err != nil {
		return nil, nil, err
	}
	resetGraphics(d.Devices.Graphics)
	rename := func(path string) string { return clonePath(plan.Image, plan.Name, path) }
	for i := range d.Devices.Serials {
		s := &d.Devices.Serials[i]
		s.Source, s.Log = chardevFiles(s.Source, rename, false), chardevLog(s.Log, rename)
	}
	for i := range d.Devices.Consoles {
		c := &d.Devices.Consoles[i]
		c.TTY = ""
		c.Source, c.Log = chardevFiles(c.Source, rename, false), chardevLog(c.Log, rename)
	}
	for i := range d.Devices.Parallels {
		p := &d.Devices.Parallels[i]
		p.Source, p.Log = chardevFiles(p.Source, rename, false), chardevLog(p.Log, rename)
	}
	for i := range d.Devices.Channels {
		c := &d.Devices.Channels[i]
		virtio := c.Target != nil && c.Target.VirtIO != nil
		c.Source, c.Log = chardevFiles(c.Source, rename, virtio), chardevLog(c.Log, rename)
		if virtio {
			// Connection state belongs to a running domain.
			c.Target.VirtIO.State = ""
		}
	}
	// After the renaming, so that these logs replace the image's.
	consoleLogs(&d, plan.ConsoleLog, true)
	return &d, unfiltered, nil
}

// replaceDiskSource points disk at its new volume, as type='file':
// AppArmor's virt-aa-helper cannot resolve volume disks (see
// terraform-provider-libvirt #546 and #1163). Everything else about the
// disk (target, bus, driver options, serial, boot order) is kept.
func replaceDiskSource(disk *libvirtxml.DomainDisk, out diskOut, linked bool) {
	old := disk.Source
	src := &libvirtxml.DomainDiskSource{
		File:          &libvirtxml.DomainDiskSourceFile{File: out.Path},
		StartupPolicy: old.StartupPolicy,
		Reservations:  old.Reservations,
		Readahead:     old.Readahead,
		Timeout:       old.Timeout,
	}
	switch {
	case old.File != nil:
		src.File.SecLabel = old.File.SecLabel
	case old.Volume != nil:
		src.File.SecLabel = old.Volume.SecLabel
	}
	if !linked {
		// A byte-for-byte copy has the image's layout and encryption.
		src.Slices, src.Encryption = old.Slices, old.Encryption
	}
	disk.Source = src
	if disk.Driver == nil {
		disk.Driver = &libvirtxml.DomainDiskDriver{}
	}
	disk.Driver.Type = out.Format
	// libvirt reads the new volume's backing chain itself.
	disk.BackingStore = nil
	disk.Mirror = nil
}

// resetIdentity gives the clone its own UUID-derived identity and drops
// what libvirt generated for the image.
func resetIdentity(d *libvirtxml.Domain, plan clonePlan) {
	d.HWUUID = ""
	if d.GenID != nil {
		// An empty <genid/> asks libvirt to generate one.
		d.GenID = &libvirtxml.DomainGenID{}
	}
	for _, si := range d.SysInfo {
		if si.SMBIOS == nil || si.SMBIOS.System == nil {
			continue
		}
		// libvirt requires the SMBIOS UUID to match the domain's.
		for i, e := range si.SMBIOS.System.Entry {
			if e.Name == "uuid" {
				si.SMBIOS.System.Entry[i].Value = plan.UUID
			}
		}
	}
	for i := range d.SecLabel {
		if d.SecLabel[i].Type == "dynamic" {
			// Generated per start; sharing one would let clones reach
			// each other's files under sVirt.
			d.SecLabel[i].Label, d.SecLabel[i].ImageLabel = "", ""
		}
	}
	if d.OS != nil && d.OS.NVRam != nil {
		// Never share the image's variable store.
		n := d.OS.NVRam
		d.OS.NVRam = &libvirtxml.DomainNVRam{
			NVRam:          plan.NVRAM,
			Template:       n.Template,
			TemplateFormat: n.TemplateFormat,
			Format:         n.Format,
		}
	}
}

// resetGraphics lets libvirt allocate ports and sockets, which would clash
// between clones (and with the image) if copied.
func resetGraphics(gs []libvirtxml.DomainGraphic) {
	for i := range gs {
		g := &gs[i]
		switch {
		case g.VNC != nil:
			v := g.VNC
			if v.Port > 0 || v.AutoPort == "no" {
				v.Port, v.AutoPort = -1, "yes"
			}
			if v.WebSocket > 0 {
				v.WebSocket = -1
			}
			v.Listeners = resetListeners(v.Listeners, v.Socket != "")
			v.Socket = ""
		case g.Spice != nil:
			s := g.Spice
			if s.Port > 0 || s.TLSPort > 0 || s.AutoPort == "no" {
				s.AutoPort = "yes"
				if s.Port > 0 {
					s.Port = -1
				}
				if s.TLSPort > 0 {
					s.TLSPort = -1
				}
			}
			s.Listeners = resetListeners(s.Listeners, false)
		case g.RDP != nil:
			r := g.RDP
			if r.Port > 0 || r.AutoPort == "no" {
				r.Port, r.AutoPort = -1, "yes"
			}
		}
	}
}

// resetListeners drops explicit socket paths, so that libvirt generates
// one per domain; addSocket adds a socket listener if there is none, for a
// legacy socket attribute being dropped.
func resetListeners(ls []libvirtxml.DomainGraphicListener, addSocket bool) []libvirtxml.DomainGraphicListener {
	hasSocket := false
	for i := range ls {
		if ls[i].Socket != nil {
			ls[i].Socket.Socket = ""
			hasSocket = true
		}
	}
	if addSocket && !hasSocket {
		ls = append(ls, libvirtxml.DomainGraphicListener{Socket: &libvirtxml.DomainGraphicListenerSocket{}})
	}
	return ls
}

// chardevFiles gives a character device's files and listening sockets
// clone-specific names. A listening socket of a virtio channel (such as the
// guest agent's) loses its path instead: libvirt then makes one in the
// domain's own directory. Sockets the device connects to are external
// services, shared on purpose.
func chardevFiles(src *libvirtxml.DomainChardevSource, rename func(string) string, virtioChannel bool) *libvirtxml.DomainChardevSource {
	if src == nil {
		return nil
	}
	switch {
	case src.File != nil:
		src.File.Path = rename(src.File.Path)
	case src.UNIX != nil && src.UNIX.Mode != "connect" && src.UNIX.Path != "":
		if virtioChannel {
			src.UNIX.Path = ""
		} else {
			src.UNIX.Path = rename(src.UNIX.Path)
		}
	}
	return src
}

func chardevLog(log *libvirtxml.DomainChardevLog, rename func(string) string) *libvirtxml.DomainChardevLog {
	if log != nil {
		log.File = rename(log.File)
	}
	return log
}

// clonePath derives a machine's own file name from a file of its image, in
// the same directory: the image name in the file name becomes the
// machine's, or the machine's name is put in front. The result is the same
// every time, so a console mirroring a serial port keeps pointing at the
// same file.
func clonePath(image, name, path string) string {
	if path == "" {
		return ""
	}
	dir, base := filepath.Split(path)
	if image != "" && strings.Contains(base, image) {
		return dir + strings.Replace(base, image, name, 1)
	}
	return dir + name + "-" + base
}

// newMACs gives every interface a fresh random MAC address that keeps the
// vendor prefix (OUI) of the one it replaces, or has the managed prefix
// (ManagedMACPrefix) where isolated[i], and differs from the taken ones,
// from all addresses seen in the image and from each other, and drops the
// host-side device name.
func newMACs(ifaces []libvirtxml.DomainInterface, isolated []bool, taken map[string]bool, r io.Reader) error {
	if len(ifaces) == 0 {
		return nil
	}
	if r == nil {
		return errors.New("clone plan has no random source")
	}
	used := make(map[string]bool, len(taken)+2*len(ifaces))
	for mac := range taken {
		used[strings.ToLower(mac)] = true
	}
	for _, iface := range ifaces {
		if iface.MAC != nil {
			used[strings.ToLower(iface.MAC.Address)] = true
		}
	}
	for i := range ifaces {
		iface := &ifaces[i]
		oui := fallbackOUI
		switch {
		case i < len(isolated) && isolated[i]:
			oui = managedOUI
		case iface.MAC != nil:
			if hw, err := net.ParseMAC(iface.MAC.Address); err == nil && len(hw) == 6 && hw[0]&0x01 == 0 {
				copy(oui[:], hw[:3])
			}
		}
		mac, err := randomMAC(oui, r, used)
		if err != nil {
			return err
		}
		used[mac] = true
		if iface.MAC == nil {
			iface.MAC = &libvirtxml.DomainInterfaceMAC{}
		}
		// Type and check describe the old address; drop them with it.
		*iface.MAC = libvirtxml.DomainInterfaceMAC{Address: mac}
		// Host-side device names (tap, macvtap) must be unique too; without
		// one libvirt picks a free name.
		iface.Target = nil
	}
	return nil
}

// randomMAC draws addresses under oui until one is not taken.
func randomMAC(oui [3]byte, r io.Reader, taken map[string]bool) (string, error) {
	for range 64 {
		hw := net.HardwareAddr{oui[0], oui[1], oui[2], 0, 0, 0}
		if _, err := io.ReadFull(r, hw[3:]); err != nil {
			return "", fmt.Errorf("random MAC address: %w", err)
		}
		if mac := hw.String(); !taken[mac] {
			return mac, nil
		}
	}
	return "", errors.New("random MAC address: no free address found")
}

// domainMACs returns the MAC addresses of d's interfaces, in lower case.
func domainMACs(d *libvirtxml.Domain) []string {
	if d.Devices == nil {
		return nil
	}
	var macs []string
	for _, iface := range d.Devices.Interfaces {
		if iface.MAC != nil && iface.MAC.Address != "" {
			macs = append(macs, strings.ToLower(iface.MAC.Address))
		}
	}
	return macs
}

// newUUID returns a random (version 4) UUID.
func newUUID(r io.Reader) (string, error) {
	var b [16]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return "", fmt.Errorf("random UUID: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}
