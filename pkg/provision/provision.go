package provision

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
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
	DomainDefineXMLFlags(xml string, flags libvirt.DomainDefineFlags) (libvirt.Domain, error)
	DomainCreate(dom libvirt.Domain) error
	DomainDestroy(dom libvirt.Domain) error
	DomainUndefineFlags(dom libvirt.Domain, flags libvirt.DomainUndefineFlagsValues) error
	StorageVolLookupByPath(path string) (libvirt.StorageVol, error)
	StoragePoolLookupByVolume(vol libvirt.StorageVol) (libvirt.StoragePool, error)
	StorageVolGetXMLDesc(vol libvirt.StorageVol, flags uint32) (string, error)
	StorageVolGetPath(vol libvirt.StorageVol) (string, error)
	StorageVolCreateXML(pool libvirt.StoragePool, xml string, flags libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error)
	StorageVolDelete(vol libvirt.StorageVol, flags libvirt.StorageVolDeleteFlags) error
}

// Dial connects to libvirtd over its local unix socket and opens uri on it;
// an empty uri means qemu:///system. Test driver URIs such as
// test:///abs/path/node.xml are served by the same daemon, and each such
// connection gets private state.
//
// go-libvirt takes no context, so ctx only bounds the socket dial and is
// checked once the connection is up. The caller disconnects the returned
// connection.
func Dial(ctx context.Context, uri string) (*libvirt.Libvirt, error) {
	if uri == "" {
		uri = string(libvirt.QEMUSystem)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("connect to libvirt %s: %w", uri, err)
	}
	var opts []dialers.LocalOption
	if deadline, ok := ctx.Deadline(); ok {
		// A non-positive timeout would mean "no timeout" to net.DialTimeout.
		opts = append(opts, dialers.WithLocalTimeout(max(time.Until(deadline), time.Millisecond)))
	}
	l := libvirt.NewWithDialer(dialers.NewLocal(opts...))
	if err := l.ConnectToURI(libvirt.ConnectURI(uri)); err != nil {
		return nil, fmt.Errorf("connect to libvirt %s: %w", uri, err)
	}
	if err := ctx.Err(); err != nil {
		_ = l.Disconnect()
		return nil, fmt.Errorf("connect to libvirt %s: %w", uri, err)
	}
	return l, nil
}

// Options configure a Provisioner.
type Options struct {
	// DomainType replaces the image's domain type in clones: "qemu" for
	// TCG emulation or "kvm". Empty keeps the image's type.
	DomainType string
}

// Provisioner clones images into managed domains and removes them.
// Its methods are safe for concurrent use as far as the Conn is.
type Provisioner struct {
	conn Conn
	opts Options
	// rand supplies UUIDs and MAC addresses.
	rand io.Reader
}

// New returns a Provisioner that works through conn.
func New(conn Conn, opts Options) *Provisioner {
	return &Provisioner{conn: conn, opts: opts, rand: rand.Reader}
}

// Spec says which image to clone for which job, and what to record about it.
type Spec struct {
	JobID       string
	Image       string
	Host        string
	RunnerKind  string
	RequestedAt time.Time
	Deadline    time.Time
}

// Machine describes a managed domain as recorded in its metadata.
type Machine struct {
	Name        string
	JobID       string
	Image       string
	Host        string
	RunnerKind  string
	RequestedAt time.Time
	Deadline    time.Time
	// Volumes are the paths of the volumes created for the job; Remove
	// deletes exactly these.
	Volumes []string
	// Running is true whenever the domain is not shut off, including
	// paused and crashed domains, since all of them still hold resources.
	Running bool
}
