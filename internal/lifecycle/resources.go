package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// Machine sizes. Every machine holds its vCPUs and memory of the host's
// totals from the moment its build or adoption begins until it is gone,
// held machines included, and what its disks may take of their storage
// pools (Storage); a provision whose size does not fit what is left waits
// (ReserveSize), and one beyond a bound, or beyond what the pools could
// ever give it, can never be served here (CheckBounds, CheckStorage).

// Size is what a machine holds of the host: vCPUs, MiB of memory, and
// the GiB of its scratch disk.
type Size struct {
	VCPUs      int
	MemoryMiB  int
	ScratchGiB int
}

func (s Size) add(o Size) Size {
	return Size{s.VCPUs + o.VCPUs, s.MemoryMiB + o.MemoryMiB, s.ScratchGiB + o.ScratchGiB}
}

func (s Size) sub(o Size) Size {
	return Size{s.VCPUs - o.VCPUs, s.MemoryMiB - o.MemoryMiB, s.ScratchGiB - o.ScratchGiB}
}

func (s Size) String() string {
	if s.ScratchGiB > 0 {
		return fmt.Sprintf("%d vCPUs, %d MiB, %d GiB scratch disk", s.VCPUs, s.MemoryMiB, s.ScratchGiB)
	}
	return fmt.Sprintf("%d vCPUs, %d MiB", s.VCPUs, s.MemoryMiB)
}

// Resources are the host's bounds on machine sizes; 0 is no bound.
type Resources struct {
	// MaxVCPUs and MaxMemoryMiB bound one machine.
	MaxVCPUs     int
	MaxMemoryMiB int
	// HostVCPUs and HostMemoryMiB bound all machines of the host
	// together.
	HostVCPUs     int
	HostMemoryMiB int
	// MaxScratchGiB bounds one machine's scratch disk.
	MaxScratchGiB int
}

// ImageSizer tells an image's own size, which a clone gets where its
// request leaves vcpus or memory_mib 0. *provision.Provisioner implements
// it.
type ImageSizer interface {
	ImageSize(ctx context.Context, image string) (vcpus, memoryMiB int, err error)
}

// ErrBeyondBounds marks a size this host can never serve.
var ErrBeyondBounds = errors.New("beyond the host's bounds")

// SizeOf returns the size of req's machine: its vcpus and memory_mib, the
// image's where those are 0, and its scratch_disk_gib. Without
// Config.Sizes the image's size counts as 0. An image that does not exist
// is provision.ErrImageNotFound.
func (m *Manager) SizeOf(ctx context.Context, req messages.Provision) (Size, error) {
	sz := Size{VCPUs: req.VCPUs, MemoryMiB: req.MemoryMiB, ScratchGiB: req.ScratchDiskGiB}
	if (sz.VCPUs > 0 && sz.MemoryMiB > 0) || m.cfg.Sizes == nil {
		return sz, nil
	}
	vcpus, mib, err := m.cfg.Sizes.ImageSize(ctx, req.Image)
	if err != nil {
		return sz, err
	}
	if sz.VCPUs == 0 {
		sz.VCPUs = vcpus
	}
	if sz.MemoryMiB == 0 {
		sz.MemoryMiB = mib
	}
	return sz, nil
}

// CheckBounds returns an error wrapping ErrBeyondBounds, naming the bound,
// for a size beyond a bound on one machine or beyond a host total (which
// it could not fit even with no other machine on the host).
func (m *Manager) CheckBounds(sz Size) error {
	r := m.cfg.Resources
	var errs []error
	for _, b := range []struct {
		have, bound int
		what, flag  string
	}{
		{sz.VCPUs, r.MaxVCPUs, "vCPUs", "--max-vcpus-per-machine"},
		{sz.MemoryMiB, r.MaxMemoryMiB, "MiB of memory", "--max-memory-per-machine"},
		{sz.VCPUs, r.HostVCPUs, "vCPUs", "--host-vcpus"},
		{sz.MemoryMiB, r.HostMemoryMiB, "MiB of memory", "--host-memory"},
		{sz.ScratchGiB, r.MaxScratchGiB, "GiB of scratch disk", "--max-scratch-gib"},
	} {
		if b.bound > 0 && b.have > b.bound {
			errs = append(errs, fmt.Errorf("%d %s is more than host %s allows (%s %d)", b.have, b.what, m.cfg.Host, b.flag, b.bound))
		}
	}
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("machine size %w: %w", ErrBeyondBounds, errors.Join(errs...))
}

// fitsLocked reports whether sz fits what the host's machines and the
// reservations leave of its totals, counting idle warm machines as room:
// a cold build retires them when it needs theirs; and whether a machine
// of image and size sz fits what they leave of the pools' room.
func (m *Manager) fitsLocked(image string, sz Size) bool {
	r := m.cfg.Resources
	used := m.used.add(m.reservedSize).sub(m.pool.idleSizeLocked()).add(sz)
	return (r.HostVCPUs <= 0 || used.VCPUs <= r.HostVCPUs) && (r.HostMemoryMiB <= 0 || used.MemoryMiB <= r.HostMemoryMiB) &&
		m.storageFitsLocked(image, sz, true)
}

// overLocked reports whether the machines and reservations hold more than
// the host's totals without counting idle warm machines as room.
func (m *Manager) overLocked(extra Size) bool {
	r := m.cfg.Resources
	used := m.used.add(extra)
	return (r.HostVCPUs > 0 && used.VCPUs > r.HostVCPUs) || (r.HostMemoryMiB > 0 && used.MemoryMiB > r.HostMemoryMiB)
}

// ReserveSize reserves sz of the host's totals, and what a machine of
// image and size sz may take of the pools' room, for a provision that was
// read (TryReserve reserved its machine); ok is false when it does not fit
// now; then wait for CapacityChanged and try again. release gives it back
// once the provision was handled: its machine then holds its size itself.
func (m *Manager) ReserveSize(image string, sz Size) (release func(), ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.fitsLocked(image, sz) {
		return func() {}, false
	}
	m.reservedSize = m.reservedSize.add(sz)
	m.reservedByImage[image] = m.reservedByImage[image].add(imageUse{machines: 1, scratchGiB: sz.ScratchGiB})
	var once sync.Once
	return func() {
		once.Do(func() {
			m.mu.Lock()
			m.reservedSize = m.reservedSize.sub(sz)
			if u := m.reservedByImage[image].sub(imageUse{machines: 1, scratchGiB: sz.ScratchGiB}); u.machines > 0 {
				m.reservedByImage[image] = u
			} else {
				delete(m.reservedByImage, image)
			}
			m.roomedLocked()
			m.mu.Unlock()
		})
	}, true
}

// Usage returns what the host's machines hold of its resources, held ones
// included, and the host's bounds.
func (m *Manager) Usage() (used Size, bounds Resources) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.used, m.cfg.Resources
}

// machineSize is the size a machine found on the host holds.
func machineSize(mach provision.Machine) Size {
	return Size{VCPUs: mach.VCPUs, MemoryMiB: mach.MemoryMiB, ScratchGiB: mach.ScratchGiB}
}

// idleSizeLocked is what the idle warm machines hold.
func (p *poolState) idleSizeLocked() Size {
	var sz Size
	for _, l := range p.idle {
		for _, im := range l {
			sz = sz.add(im.a.size)
		}
	}
	return sz
}
