// Package provision turns libvirt "images" into disposable CI machines and
// removes them again without leaving anything behind.
//
// An image is an ordinary, shut-off libvirt domain, as installed with
// virt-manager or packer: BIOS or UEFI, any number of disks (type='file'
// inside a storage pool's directory, or type='volume'), NICs, graphics.
// Clone defines a managed domain named Prefix+job id with a new identity
// (UUID, MACs, ports, sockets, serial log files, NVRAM) whose writable
// disks are new volumes of the job in the image's pools, and records what
// it created in the domain's <metadata>, so that Remove, Lookup, List and
// ListOrphanVolumes later work from libvirt's own state alone. Nothing here
// touches a domain whose name does not start with Prefix, nor a volume not
// named for a job or still used by anything else.
//
// # Clone modes
//
// Spec.CloneMode, else the image's default, else linked. Operators set an
// image's default, and its guest OS family (Machine.OS), with
//
//	virsh metadata IMAGE https://stretchy-ci.dev/xmlns/libvirt-worker/1 \
//	  --key stretchy --config --set '<image clone-mode="copy" os="windows"/>'
//
// The modes:
//
//   - linked: a qcow2 overlay per disk, backed by the image's volume. Takes
//     the same few milliseconds for a 1 GiB or a 1 TiB image and no space
//     until the guest writes. Right for most CI images. The image must not
//     change while clones exist (edit a copy and switch the image name).
//   - reflink: a same-format copy that shares extents through the file
//     system (FICLONE). Also constant time, and independent of the image
//     afterwards, but needs a pool directory on btrfs, XFS (reflink=1) or
//     similar on this host; elsewhere it fails with ErrReflinkUnsupported.
//     Right where images are updated in place or disks must be raw.
//   - copy: a full copy through libvirt (virStorageVolCreateXMLFrom).
//     Independent everywhere, but time and space grow with the data in the
//     image. Right for small images, encrypted disks, or pools where
//     neither of the others works.
//
// # Size, scratch disk, console
//
// A Spec may give the machine another size than the image's (VCPUs,
// MemoryMiB; the image's CPU topology, NUMA cells and memory devices are
// adjusted to fit), an empty scratch disk (ScratchGiB), and a directory
// its serial ports and consoles log to (ConsoleDir; ConsoleLogPath names
// the main console's file, ConsoleTail reads its end). Machine records
// the size, the scratch volume and the logs, which Remove deletes with
// the machine. docs/protocol.md 7.6 and 7.7 say what changes and how
// virtlogd bounds the logs.
//
// # Guest isolation
//
// With Options.Isolation, Clone attaches the guest filter (an nwfilter
// that DefineGuestFilter defines from a list of Deny destinations, the
// control plane) to every bridge and network interface of the clone,
// isolates its bridge port and gives it a MAC address under
// ManagedMACPrefix, so that managed guests reach neither the control
// plane nor each other. Other interfaces (user-mode slirp, macvtap, ...)
// cannot be filtered; Isolation.Unfiltered says whether Clone warns,
// refuses or allows them. isolation.go lists the rules; docs/security.md
// section 4 what they mean for operators.
//
// # Connections
//
// go-libvirt calls take no context; every call made here is bounded by a
// deadline (Options.CallTimeout) and the caller's ctx. A Link keeps one
// *libvirt.Libvirt usable across libvirtd restarts for all its holders.
package provision
