package provision

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// Prefix starts the name of every domain this package manages. Domains
// whose names do not start with it are never modified or removed.
const Prefix = "stretchy-"

// DomainName returns the name of the managed domain for a job.
func DomainName(jobID string) string { return Prefix + jobID }

// Conn lists the libvirt calls the Provisioner makes. *libvirt.Libvirt
// satisfies it.
type Conn interface {
	ConnectListAllDomains(needResults int32, flags libvirt.ConnectListAllDomainsFlags) ([]libvirt.Domain, uint32, error)
	DomainLookupByName(name string) (libvirt.Domain, error)
	DomainGetState(dom libvirt.Domain, flags uint32) (int32, int32, error)
	DomainGetXMLDesc(dom libvirt.Domain, flags libvirt.DomainXMLFlags) (string, error)
	DomainGetMetadata(dom libvirt.Domain, typ int32, uri libvirt.OptString, flags libvirt.DomainModificationImpact) (string, error)
	DomainSetMetadata(dom libvirt.Domain, typ int32, metadata libvirt.OptString, key libvirt.OptString, uri libvirt.OptString, flags libvirt.DomainModificationImpact) error
	DomainDefineXMLFlags(xml string, flags libvirt.DomainDefineFlags) (libvirt.Domain, error)
	DomainCreate(dom libvirt.Domain) error
	DomainDestroy(dom libvirt.Domain) error
	DomainUndefineFlags(dom libvirt.Domain, flags libvirt.DomainUndefineFlagsValues) error
	ConnectListAllStoragePools(needResults int32, flags libvirt.ConnectListAllStoragePoolsFlags) ([]libvirt.StoragePool, uint32, error)
	StoragePoolLookupByName(name string) (libvirt.StoragePool, error)
	StoragePoolLookupByTargetPath(path string) (libvirt.StoragePool, error)
	StoragePoolLookupByVolume(vol libvirt.StorageVol) (libvirt.StoragePool, error)
	StoragePoolGetXMLDesc(pool libvirt.StoragePool, flags libvirt.StorageXMLFlags) (string, error)
	StoragePoolRefresh(pool libvirt.StoragePool, flags uint32) error
	StoragePoolListAllVolumes(pool libvirt.StoragePool, needResults int32, flags uint32) ([]libvirt.StorageVol, uint32, error)
	StorageVolLookupByName(pool libvirt.StoragePool, name string) (libvirt.StorageVol, error)
	StorageVolLookupByPath(path string) (libvirt.StorageVol, error)
	StorageVolGetXMLDesc(vol libvirt.StorageVol, flags uint32) (string, error)
	StorageVolGetPath(vol libvirt.StorageVol) (string, error)
	StorageVolCreateXML(pool libvirt.StoragePool, xml string, flags libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error)
	StorageVolCreateXMLFrom(pool libvirt.StoragePool, xml string, clonevol libvirt.StorageVol, flags libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error)
	StorageVolUpload(vol libvirt.StorageVol, outStream io.Reader, offset uint64, length uint64, flags libvirt.StorageVolUploadFlags) error
	StorageVolDelete(vol libvirt.StorageVol, flags libvirt.StorageVolDeleteFlags) error
	NwfilterLookupByName(name string) (libvirt.Nwfilter, error)
	NwfilterGetXMLDesc(filter libvirt.Nwfilter, flags uint32) (string, error)
	NwfilterDefineXML(xml string) (libvirt.Nwfilter, error)
}

// Dial connects to libvirtd through uri's transport and opens its driver;
// an empty uri means qemu:///system over the local socket. Remote URIs
// (qemu+tls://, qemu+tcp://, qemu+ssh://) are described at transport. Test
// driver URIs such as test:///abs/path/node.xml are served by the local
// daemon, and each such connection gets private state.
//
// The connection is not re-established if libvirtd restarts; long-lived
// callers use a Link instead. go-libvirt takes no context, so ctx only
// bounds the socket dial and is checked once the connection is up. The
// caller disconnects the returned connection.
func Dial(ctx context.Context, uri string) (*libvirt.Libvirt, error) {
	if uri == "" {
		uri = string(libvirt.QEMUSystem)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("connect to libvirt %s: %w", uri, err)
	}
	timeout := 10 * time.Second
	if deadline, ok := ctx.Deadline(); ok {
		// A non-positive timeout would mean "no timeout" to net.DialTimeout.
		timeout = max(time.Until(deadline), time.Millisecond)
	}
	d, open, err := transport(uri, DefaultSocket, timeout)
	if err != nil {
		return nil, fmt.Errorf("connect to libvirt %s: %w", uri, err)
	}
	l := libvirt.NewWithDialer(d)
	if err := l.ConnectToURI(open); err != nil {
		return nil, fmt.Errorf("connect to libvirt %s: %w", uri, err)
	}
	if err := ctx.Err(); err != nil {
		_ = l.Disconnect()
		return nil, fmt.Errorf("connect to libvirt %s: %w", uri, err)
	}
	return l, nil
}

// Default bounds of single libvirt calls, see Options.
const (
	DefaultCallTimeout = 30 * time.Second
	DefaultCopyTimeout = 30 * time.Minute
)

// Options configure a Provisioner.
type Options struct {
	// DomainType replaces the image's domain type in clones: "qemu" for
	// TCG emulation or "kvm". Empty keeps the image's type.
	DomainType string
	// CallTimeout bounds every libvirt call except full copies; 0 means
	// DefaultCallTimeout. A call that exceeds it fails with ErrTimeout.
	CallTimeout time.Duration
	// CopyTimeout bounds calls that copy a whole volume (copy mode, NVRAM
	// upload); 0 means DefaultCopyTimeout.
	CopyTimeout time.Duration
	// Link, when the connection given to New is Link.Libvirt(), lets calls
	// wait while the Link reconnects, and lets a call that times out reset
	// the connection, since a libvirtd that does not answer one call
	// usually answers none.
	Link *Link
	// Isolation, when set, keeps clones' guests away from the control
	// plane and from each other (isolation.go, docs/security.md 4).
	Isolation *Isolation
}

// Provisioner clones images into managed domains and removes them.
// Its methods are safe for concurrent use as far as the Conn is.
type Provisioner struct {
	conn Conn
	opts Options
	// rand supplies UUIDs and MAC addresses.
	rand io.Reader

	// mu guards pendingMACs: addresses chosen by Clones whose domains are
	// not defined yet, so that concurrent Clones cannot pick the same one
	// before either shows up in libvirt.
	mu          sync.Mutex
	pendingMACs map[string]bool

	// domains and volumes keep what other domains' definitions and
	// volumes' documents said, for hostMACs and storageUse.
	domains parseCache[domainFacts]
	volumes parseCache[string]
}

// New returns a Provisioner that works through conn.
func New(conn Conn, opts Options) *Provisioner {
	if opts.CallTimeout <= 0 {
		opts.CallTimeout = DefaultCallTimeout
	}
	if opts.CopyTimeout <= 0 {
		opts.CopyTimeout = DefaultCopyTimeout
	}
	return &Provisioner{conn: conn, opts: opts, rand: rand.Reader, pendingMACs: make(map[string]bool)}
}

// CloneMode says how a clone gets its own copy of an image's disks.
type CloneMode string

// The clone modes; doc.go says when each is right.
const (
	// CloneLinked gives the clone qcow2 overlays backed by the image's
	// volumes: constant time and space whatever the image size.
	CloneLinked CloneMode = "linked"
	// CloneReflink copies the image's volumes in their own format by
	// sharing extents through the file system (FICLONE): constant time on
	// btrfs or XFS, refused elsewhere with ErrReflinkUnsupported.
	CloneReflink CloneMode = "reflink"
	// CloneCopy makes full, independent copies through libvirt; time and
	// space grow with the data in the image.
	CloneCopy CloneMode = "copy"
)

// valid reports whether m names a clone mode; the empty mode is not one.
func (m CloneMode) valid() bool {
	return m == CloneLinked || m == CloneReflink || m == CloneCopy
}

// Spec says which image to clone for which job, and what to record about it.
type Spec struct {
	// JobID is the job the machine serves; empty for a warm machine that
	// no job has bound yet.
	JobID string
	// Key names the machine, stretchy-<key>, and its volumes: a warm
	// machine's key (messages.ValidWarmKey); empty means JobID, a cold
	// machine's.
	Key         string
	Image       string
	Host        string
	RunnerKind  string
	RequestedAt time.Time
	Deadline    time.Time
	// CloneMode overrides the image's default clone mode (set in its
	// metadata, else CloneLinked); empty keeps it.
	CloneMode CloneMode
	// Generation is the image's generation (ImageReport.Generation) the
	// clone was made from, recorded for a warm machine so that a worker
	// can tell, also after a restart, whether its image changed since.
	Generation string
	// VCPUs, when above 0, is the machine's number of vCPUs instead of
	// the image's; MemoryMiB, when above 0, its memory in MiB. The
	// image's CPU topology, NUMA cells and memory devices are adjusted
	// to fit (see resize).
	VCPUs     int
	MemoryMiB int
	// ScratchGiB, when above 0, adds an empty disk of that many GiB: a
	// thin qcow2 volume of the job in the pool of the image's first
	// cloned disk, after the image's disks on the same bus, with the
	// serial "stretchy-scratch". Remove deletes it with the others.
	ScratchGiB int
	// ConsoleDir, when set, is the absolute directory, on the libvirt
	// host, that the machine's serial ports and consoles log to: the main
	// console to ConsoleLogPath(ConsoleDir, JobID), the others next to
	// it (see consoleLogs). It must exist; libvirt's virtlogd creates the
	// files. Empty keeps the image's chardev logs (renamed for the
	// machine).
	ConsoleDir string
	// HoldOnFailure is recorded for the worker: how long the machine is
	// kept after its job failed (Machine.HoldOnFailure).
	HoldOnFailure time.Duration
}

// key returns the machine's key: Key, or JobID for a cold machine.
func (s Spec) key() string {
	if s.Key != "" {
		return s.Key
	}
	return s.JobID
}

// Machine describes a managed domain as recorded in its metadata.
type Machine struct {
	Name string
	// Key is what follows Prefix in Name; Start, Remove and Lookup take
	// it. A cold machine's key is its job id.
	Key string
	// JobID is the job the machine serves: its key for a cold machine,
	// the bound job for a warm one, empty for a warm one no job bound.
	JobID string
	// Warm: the machine was booted for a warm pool, before its job.
	Warm bool
	// Generation is the image generation a warm machine was cloned from.
	Generation  string
	Image       string
	Host        string
	RunnerKind  string
	RequestedAt time.Time
	Deadline    time.Time
	// CloneMode is how the machine's disks were made.
	CloneMode CloneMode
	// OS is the guest OS family the image's metadata declares ("linux",
	// "windows", ...), empty if it declares none; callers that get one can
	// skip detecting the guest OS.
	OS string
	// ImageGeneration is the generation of the image (ImageReport's
	// Generation) as Clone read it; only Clone's result has it (it is not
	// recorded). Two clones of one generation run the same guest, so what
	// one's guest said about itself holds for the other.
	ImageGeneration string
	// Volumes are the paths of the volumes created for the job, disks
	// and NVRAM; Remove deletes exactly these.
	Volumes []string
	// Running is true whenever the domain is not shut off, including
	// paused and crashed domains, since all of them still hold resources.
	Running bool
	// MetadataUnreadable is set when the domain has no metadata of this
	// package or it cannot be decoded; the recorded fields are then empty
	// and only Name, JobID, Running, VCPUs and MemoryMiB are known. Such
	// a domain is still managed: Remove removes it, without deleting
	// volumes.
	MetadataUnreadable bool
	// VCPUs and MemoryMiB are the machine's size: what Clone gave it (the
	// Spec's, else the image's), as recorded, or as its definition says
	// for a machine whose metadata does not record it; what it holds of
	// the host's capacity.
	VCPUs     int
	MemoryMiB int
	// ScratchGiB is the size of the machine's scratch disk, 0 for none.
	ScratchGiB int
	// HeldUntil is set on a machine kept after its job ended (SetHold):
	// until when. HoldFor is the hold a machine whose job still runs gets
	// when that job ends.
	HeldUntil time.Time
	HoldFor   time.Duration
	// HoldOnFailure is the hold the machine gets if its job fails, as its
	// Spec or Binding recorded it.
	HoldOnFailure time.Duration
	// ConsoleLogs are the files the machine's serial ports and consoles
	// log to, the main console's first; none when it was built without
	// Spec.ConsoleDir. Remove deletes them and their backups unless told
	// to keep them.
	ConsoleLogs []string
}
