package provision

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// imageDisk is a disk of an image that a clone must not share: the clone
// gets its own copy-on-write volume in its place.
type imageDisk struct {
	// Target is the guest device name, e.g. "vda"; it names the volume.
	Target string
	// Path is the image's file, the backing store of the new volume.
	Path string
}

// clonePlan is everything cloneXML needs besides the image definition.
// Its fields are decided (and its volumes created) before the XML is built,
// so cloneXML stays a pure function.
type clonePlan struct {
	Name string
	UUID string
	// Type replaces the domain type unless empty.
	Type string
	// Disks maps the target of every disk returned by writableDisks to
	// the path of the volume that replaces it.
	Disks map[string]string
	// Metadata is the element placed inside <metadata>.
	Metadata string
	// Rand supplies the new MAC addresses.
	Rand io.Reader
}

// fallbackOUI is QEMU's locally administered prefix, used when the image's
// MAC is missing or unusable.
var fallbackOUI = [3]byte{0x52, 0x54, 0x00}

// copiesDisk reports whether a clone needs its own copy of disk d. Read-only
// disks and CD-ROMs are shared as they are, as are disks the image marks
// shareable, which are meant to be attached to several domains at once.
func copiesDisk(d *libvirtxml.DomainDisk) bool {
	if d.ReadOnly != nil || d.Shareable != nil || d.Device == "cdrom" {
		return false
	}
	return d.Source != nil
}

// writableDisks returns the disks of image that need a copy. Writable disks
// of types other than file cannot be copied yet, and are rejected rather
// than shared between machines.
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
		if strings.ContainsAny(target, "-/") || seen[target] {
			return nil, fmt.Errorf("disk %s: unusable or duplicate target name: %w", target, ErrImageInvalid)
		}
		seen[target] = true
		if d.Source.File == nil || d.Source.File.File == "" {
			return nil, fmt.Errorf("disk %s: writable disks of type %s are not supported: %w", target, diskType(d.Source), ErrImageInvalid)
		}
		disks = append(disks, imageDisk{Target: target, Path: d.Source.File.File})
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

// cloneXML returns the definition of a clone of image as described by plan.
// image is not modified.
func cloneXML(image *libvirtxml.Domain, plan clonePlan) (*libvirtxml.Domain, error) {
	if plan.Name == "" || plan.UUID == "" {
		return nil, errors.New("clone plan needs a name and a uuid")
	}
	toCopy, err := writableDisks(image)
	if err != nil {
		return nil, err
	}
	// Deep copy: libvirtxml structs are full of pointers and slices.
	doc, err := image.Marshal()
	if err != nil {
		return nil, fmt.Errorf("encode image XML: %w", err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		return nil, fmt.Errorf("decode image XML: %w", err)
	}

	d.Name = plan.Name
	d.UUID = plan.UUID
	d.ID = nil
	if plan.Type != "" {
		d.Type = plan.Type
	}
	d.Metadata = &libvirtxml.DomainMetadata{XML: plan.Metadata}
	resetIdentity(&d)

	if d.Devices == nil {
		d.Devices = &libvirtxml.DomainDeviceList{}
	}
	replaced := 0
	for i := range d.Devices.Disks {
		disk := &d.Devices.Disks[i]
		if !copiesDisk(disk) {
			continue
		}
		path, ok := plan.Disks[disk.Target.Dev]
		if !ok {
			return nil, fmt.Errorf("disk %s: no volume planned", disk.Target.Dev)
		}
		disk.Source.File.File = path
		if disk.Driver == nil {
			disk.Driver = &libvirtxml.DomainDiskDriver{}
		}
		disk.Driver.Type = "qcow2"
		// The new volume records its backing file itself.
		disk.BackingStore = nil
		replaced++
	}
	if replaced != len(toCopy) || len(plan.Disks) != len(toCopy) {
		return nil, fmt.Errorf("clone plan has %d volumes for %d writable disks", len(plan.Disks), len(toCopy))
	}

	if err := newMACs(d.Devices.Interfaces, plan.Rand); err != nil {
		return nil, err
	}
	return &d, nil
}

// resetIdentity drops what libvirt derives from, or must keep unique like,
// the domain UUID, so that the clone gets its own.
func resetIdentity(d *libvirtxml.Domain) {
	d.HWUUID = ""
	if d.GenID != nil {
		// An empty <genid/> asks libvirt to generate one.
		d.GenID = &libvirtxml.DomainGenID{}
	}
	for _, si := range d.SysInfo {
		if si.SMBIOS == nil || si.SMBIOS.System == nil {
			continue
		}
		entries := si.SMBIOS.System.Entry[:0]
		for _, e := range si.SMBIOS.System.Entry {
			if e.Name != "uuid" {
				entries = append(entries, e)
			}
		}
		si.SMBIOS.System.Entry = entries
	}
	if d.OS != nil && d.OS.NVRam != nil {
		// Never share the image's variable store: without a path libvirt
		// creates one for the clone from the template (and removes it on
		// undefine with the NVRAM flag).
		d.OS.NVRam = &libvirtxml.DomainNVRam{
			Template:       d.OS.NVRam.Template,
			TemplateFormat: d.OS.NVRam.TemplateFormat,
			Format:         d.OS.NVRam.Format,
		}
	}
}

// newMACs gives every interface a fresh random MAC address that keeps the
// vendor prefix (OUI) of the one it replaces and differs from all the
// addresses seen in the image and from each other, and drops the host-side
// device name.
func newMACs(ifaces []libvirtxml.DomainInterface, r io.Reader) error {
	if len(ifaces) == 0 {
		return nil
	}
	if r == nil {
		return errors.New("clone plan has no random source")
	}
	taken := make(map[string]bool)
	for _, iface := range ifaces {
		if iface.MAC != nil {
			taken[strings.ToLower(iface.MAC.Address)] = true
		}
	}
	for i := range ifaces {
		iface := &ifaces[i]
		oui := fallbackOUI
		if iface.MAC != nil {
			if hw, err := net.ParseMAC(iface.MAC.Address); err == nil && len(hw) == 6 && hw[0]&0x01 == 0 {
				copy(oui[:], hw[:3])
			}
		}
		mac, err := randomMAC(oui, r, taken)
		if err != nil {
			return err
		}
		taken[mac] = true
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

func randomMAC(oui [3]byte, r io.Reader, taken map[string]bool) (string, error) {
	for range 32 {
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
