package qga_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
	"libvirt.org/go/libvirtxml"

	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

const (
	// libvirtSocket is where dialers.NewLocal connects.
	libvirtSocket = "/var/run/libvirt/libvirt-sock"
	// imageDomain is the test guest built by test/guest/build.sh. It is
	// never started or changed here: other tests clone it concurrently.
	imageDomain = "tiny-linux"
	// imagePool holds the image's disk and the overlays made here.
	imagePool = "ci-images"
	// namePrefix names every domain and volume these tests create. It
	// keeps the managed prefix "stretchy-", so that leftover checks
	// (scripts/check-leftovers.sh) see anything left behind, but the dot
	// makes "qgatest.<random>" an invalid job id: a worker running on the
	// same host (the integration tests' workers reconcile every managed
	// domain at start) neither adopts nor removes these domains and
	// volumes, which it did with "stretchy-qgatest-<random>".
	namePrefix = "stretchy-qgatest."
	// agentChannel is the virtio-serial port qemu-ga listens on.
	agentChannel = "org.qemu.guest_agent.0"
	// bootTimeout bounds the shared guest's boot; it is ready in 4-8 s
	// under TCG on an idle host.
	bootTimeout = 2 * time.Minute
)

// requireLibvirt skips the test when no libvirtd is listening, unless
// STRETCHY_REQUIRE_LIBVIRT=1 (as in CI) makes that a failure.
func requireLibvirt(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(libvirtSocket); err != nil {
		if os.Getenv("STRETCHY_REQUIRE_LIBVIRT") == "1" {
			t.Fatalf("libvirtd required (STRETCHY_REQUIRE_LIBVIRT=1) but %s is missing: %v", libvirtSocket, err)
		}
		t.Skipf("no libvirtd (%v); set STRETCHY_REQUIRE_LIBVIRT=1 to fail instead", err)
	}
}

// The package's tests share one libvirt connection and one booted guest,
// which TestMain removes at the end.
var (
	connOnce sync.Once
	conn     *libvirt.Libvirt
	connErr  error

	guestOnce  sync.Once
	shared     *guest
	readyAfter time.Duration
	readyConn  *recordingConn // what the shared guest's WaitReady did
	guestErr   error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if shared != nil {
		if err := shared.remove(); err != nil {
			fmt.Fprintf(os.Stderr, "remove shared guest: %v\n", err)
			code = 1
		}
	}
	if conn != nil {
		_ = conn.Disconnect()
	}
	os.Exit(code)
}

// connect returns the package's libvirt connection.
func connect(t testing.TB) *libvirt.Libvirt {
	t.Helper()
	requireLibvirt(t)
	connOnce.Do(func() {
		l := libvirt.NewWithDialer(dialers.NewLocal())
		if err := l.ConnectToURI(libvirt.QEMUSystem); err != nil {
			connErr = fmt.Errorf("connect to %s: %w", libvirt.QEMUSystem, err)
			return
		}
		conn = l
	})
	if connErr != nil {
		t.Fatal(connErr)
	}
	return conn
}

// sharedGuest returns the package's booted guest, booting it and waiting
// for its agent on first use.
func sharedGuest(t testing.TB) *guest {
	t.Helper()
	l := connect(t)
	guestOnce.Do(func() {
		g, err := startGuest(l, guestSpec{boot: true, agent: true})
		if err != nil {
			guestErr = err
			return
		}
		shared = g
		ctx, cancel := context.WithTimeout(context.Background(), bootTimeout)
		defer cancel()
		readyConn = &recordingConn{Conn: l}
		if err := qga.New(readyConn, qga.Options{}).WaitReady(ctx, g.name); err != nil {
			guestErr = fmt.Errorf("shared guest %s: %w", g.name, err)
			return
		}
		readyAfter = time.Since(g.started)
	})
	if guestErr != nil {
		t.Fatal(guestErr)
	}
	return shared
}

// guestSpec says what kind of transient clone of the image to create.
type guestSpec struct {
	// boot keeps the image's kernel and disk (as a copy-on-write
	// overlay). Without it only the firmware runs and nothing boots:
	// a cheap domain whose agent never connects.
	boot bool
	// agent keeps the guest agent channel.
	agent bool
	// paused starts the domain with its CPUs stopped.
	paused bool
}

// guest is a transient clone of the image domain.
type guest struct {
	l       *libvirt.Libvirt
	name    string
	dom     libvirt.Domain
	vol     *libvirt.StorageVol
	started time.Time
}

// newGuest starts a transient clone for one test and removes it when the
// test ends.
func newGuest(t testing.TB, spec guestSpec) *guest {
	t.Helper()
	g, err := startGuest(connect(t), spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := g.remove(); err != nil {
			t.Error(err)
		}
	})
	return g
}

// startGuest creates a transient clone of the image domain: a new name, no
// UUID, new MACs and, with spec.boot, its disk on a fresh qcow2 overlay
// backed by the image's disk. On error it removes what it created.
func startGuest(l *libvirt.Libvirt, spec guestSpec) (_ *guest, err error) {
	name := namePrefix + randomHex(4)
	g := &guest{l: l, name: name}
	defer func() {
		if err != nil {
			err = errors.Join(err, g.remove())
		}
	}()

	image, err := l.DomainLookupByName(imageDomain)
	if err != nil {
		return nil, fmt.Errorf("look up image %s: %w", imageDomain, err)
	}
	doc, err := l.DomainGetXMLDesc(image, libvirt.DomainXMLInactive)
	if err != nil {
		return nil, fmt.Errorf("image %s XML: %w", imageDomain, err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		return nil, fmt.Errorf("parse image %s XML: %w", imageDomain, err)
	}
	d.Name, d.UUID = name, ""
	d.Description = "transient clone of " + imageDomain + " for pkg/qga tests"
	for i := range d.Devices.Interfaces {
		d.Devices.Interfaces[i].MAC = &libvirtxml.DomainInterfaceMAC{Address: randomMAC()}
	}
	if !spec.agent {
		var keep []libvirtxml.DomainChannel
		for _, c := range d.Devices.Channels {
			if c.Target == nil || c.Target.VirtIO == nil || c.Target.VirtIO.Name != agentChannel {
				keep = append(keep, c)
			}
		}
		d.Devices.Channels = keep
	}
	if spec.boot {
		if err := g.overlayDisks(&d); err != nil {
			return nil, err
		}
	} else {
		d.OS.Kernel, d.OS.Initrd, d.OS.Cmdline = "", "", ""
		d.Devices.Disks = nil
	}
	xml, err := d.Marshal()
	if err != nil {
		return nil, fmt.Errorf("marshal %s XML: %w", name, err)
	}
	flags := libvirt.DomainNone
	if spec.paused {
		flags = libvirt.DomainStartPaused
	}
	g.started = time.Now()
	dom, err := l.DomainCreateXML(xml, flags)
	if err != nil {
		return nil, fmt.Errorf("create %s: %w", name, err)
	}
	g.dom = dom
	return g, nil
}

// overlayDisks points the image's one file disk at a new overlay volume.
func (g *guest) overlayDisks(d *libvirtxml.Domain) error {
	var disk *libvirtxml.DomainDisk
	for i := range d.Devices.Disks {
		dd := &d.Devices.Disks[i]
		if dd.Device == "disk" && dd.Source != nil && dd.Source.File != nil {
			if disk != nil {
				return fmt.Errorf("image %s has more than one file disk", imageDomain)
			}
			disk = dd
		}
	}
	if disk == nil {
		return fmt.Errorf("image %s has no file disk", imageDomain)
	}
	base, err := g.l.StorageVolLookupByPath(disk.Source.File.File)
	if err != nil {
		return fmt.Errorf("look up image disk %s: %w", disk.Source.File.File, err)
	}
	_, capacity, _, err := g.l.StorageVolGetInfo(base)
	if err != nil {
		return fmt.Errorf("image disk %s info: %w", disk.Source.File.File, err)
	}
	pool, err := g.l.StoragePoolLookupByName(imagePool)
	if err != nil {
		return fmt.Errorf("look up pool %s: %w", imagePool, err)
	}
	qcow2 := &libvirtxml.StorageVolumeTargetFormat{Type: "qcow2"}
	sv := libvirtxml.StorageVolume{
		Name:         g.name + "-vda.qcow2",
		Capacity:     &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: capacity},
		Target:       &libvirtxml.StorageVolumeTarget{Format: qcow2},
		BackingStore: &libvirtxml.StorageVolumeBackingStore{Path: disk.Source.File.File, Format: qcow2},
	}
	xml, err := sv.Marshal()
	if err != nil {
		return fmt.Errorf("marshal volume XML: %w", err)
	}
	vol, err := g.l.StorageVolCreateXML(pool, xml, 0)
	if err != nil {
		return fmt.Errorf("create volume %s: %w", sv.Name, err)
	}
	g.vol = &vol
	path, err := g.l.StorageVolGetPath(vol)
	if err != nil {
		return fmt.Errorf("volume %s path: %w", sv.Name, err)
	}
	disk.Source.File.File = path
	disk.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "qcow2"}
	return nil
}

// remove destroys the domain (which, being transient, then disappears)
// and deletes its overlay volume. It tolerates either being gone already.
func (g *guest) remove() error {
	var errs []error
	if dom, err := g.l.DomainLookupByName(g.name); err == nil {
		if err := g.l.DomainDestroy(dom); err != nil && !libvirt.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("destroy %s: %w", g.name, err))
		}
	} else if !libvirt.IsNotFound(err) {
		errs = append(errs, fmt.Errorf("look up %s: %w", g.name, err))
	}
	if g.vol != nil {
		if err := g.l.StorageVolDelete(*g.vol, 0); err != nil {
			var e libvirt.Error
			if !errors.As(err, &e) || libvirt.ErrorNumber(e.Code) != libvirt.ErrNoStorageVol {
				errs = append(errs, fmt.Errorf("delete volume %s: %w", g.vol.Name, err))
			}
		}
		g.vol = nil
	}
	return errors.Join(errs...)
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // never fails
	return hex.EncodeToString(b)
}

// randomMAC returns a random MAC under QEMU's locally administered prefix
// 52:54:00, so clones never share the image's MAC.
func randomMAC() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[0], b[1], b[2])
}

// recordingConn passes calls on to a real connection and records the agent
// commands and events that went through it.
type recordingConn struct {
	qga.Conn
	mu       sync.Mutex
	commands []string
	events   []any
}

func (c *recordingConn) QEMUDomainAgentCommand(dom libvirt.Domain, cmd string, timeout int32, flags uint32) (libvirt.OptString, error) {
	c.mu.Lock()
	c.commands = append(c.commands, cmd)
	c.mu.Unlock()
	return c.Conn.QEMUDomainAgentCommand(dom, cmd, timeout, flags)
}

func (c *recordingConn) SubscribeEvents(ctx context.Context, id libvirt.DomainEventID, dom libvirt.OptDomain) (<-chan any, error) {
	in, err := c.Conn.SubscribeEvents(ctx, id, dom)
	if err != nil {
		return nil, err
	}
	out := make(chan any)
	go func() { // ends when go-libvirt closes in; the Agent drains out
		defer close(out)
		for ev := range in {
			c.mu.Lock()
			c.events = append(c.events, ev)
			c.mu.Unlock()
			out <- ev
		}
	}()
	return out, nil
}

// record returns the commands and events seen so far.
func (c *recordingConn) record() ([]string, []any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.commands), slices.Clone(c.events)
}
