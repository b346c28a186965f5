package lifecycle

import (
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Storage admission. A machine may take of its storage pools what its
// disks can grow to, and libvirt's free space shows only what they took
// so far: a sparse scratch disk takes nothing until the guest writes. So
// every machine of the host, from its admission (ReserveSize) until it is
// gone, claims of its pools a scratch disk's full virtual size, in the
// pool of its image's first writable disk, and, for a copy clone, the
// allocation of its image's disks, which the copy writes; linked and
// reflink clones share the image's data and claim nothing, their growth
// is what --min-free-space keeps room for. A provision is admitted only
// while the claims, its own included, fit each pool's room: its free
// space as last found less --min-free-space; idle warm machines' claims
// count as room, as their vCPUs and memory do, and a cold build that
// needs it retires them. What a machine wrote counts twice, in its claim
// and in the free space; the host never promises more than it has.

// Storage is the room of the host's pools and where clones of each image
// put their disks, as the worker last found them (SetStorage).
type Storage struct {
	// Room is, by pool, the bytes machines may claim: the pool's free
	// space less what the host keeps free there (--min-free-space);
	// below 0 when it is short already.
	Room map[string]int64
	// Images are, by image, what a clone of the image claims.
	Images map[string]ImageStorage
}

// ImageStorage is what a clone of an image claims of the host's pools.
type ImageStorage struct {
	// ScratchPool is the pool a clone's scratch disk is created in: that
	// of the image's first writable disk.
	ScratchPool string
	// Clone is, by pool, what a clone's own disks take there once made:
	// for a copy clone, the allocation of the image's disks; none for
	// linked and reflink clones.
	Clone map[string]int64
}

// ErrBeyondStorage marks a machine that the host's pools could not hold
// even with none of the host's machines left.
var ErrBeyondStorage = errors.New("beyond the room of the host's storage pools")

// claimant is a machine that claims storage: its image and the GiB of
// its scratch disk.
type claimant struct {
	image      string
	scratchGiB int
}

// imageUse is what machines of one image, or reservations for them, hold
// of what claims storage.
type imageUse struct {
	machines   int
	scratchGiB int
}

func (u imageUse) add(o imageUse) imageUse {
	return imageUse{u.machines + o.machines, u.scratchGiB + o.scratchGiB}
}

func (u imageUse) sub(o imageUse) imageUse {
	return imageUse{u.machines - o.machines, u.scratchGiB - o.scratchGiB}
}

// SetStorage replaces what the Manager knows of the host's storage; a
// provision waiting for room tries again.
func (m *Manager) SetStorage(st Storage) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.storage = st
	m.roomedLocked()
}

// claim returns what n machines of image, with scratchGiB of scratch
// disks together, claim of each pool; nil when the image's storage is
// not known (no inventory, or an image the host does not carry), which
// claims nothing.
func (st Storage) claim(image string, u imageUse) map[string]int64 {
	is, ok := st.Images[image]
	if !ok {
		return nil
	}
	c := make(map[string]int64, len(is.Clone)+1)
	for pool, b := range is.Clone {
		c[pool] += int64(u.machines) * b
	}
	if u.scratchGiB > 0 && is.ScratchPool != "" {
		c[is.ScratchPool] += int64(u.scratchGiB) << 30
	}
	return c
}

// claimsLocked returns what the host's machines and the reservations
// claim of each pool, but for the machines skip holds.
func (m *Manager) claimsLocked(skip map[*actor]bool) map[string]int64 {
	claims := map[string]int64{}
	for a, c := range m.claimants {
		if skip[a] {
			continue
		}
		for pool, b := range m.storage.claim(c.image, imageUse{machines: 1, scratchGiB: c.scratchGiB}) {
			claims[pool] += b
		}
	}
	for image, u := range m.reservedByImage {
		for pool, b := range m.storage.claim(image, u) {
			claims[pool] += b
		}
	}
	return claims
}

// idleLocked returns the idle warm machines.
func (m *Manager) idleLocked() map[*actor]bool {
	idle := map[*actor]bool{}
	for _, l := range m.pool.idle {
		for _, im := range l {
			idle[im.a] = true
		}
	}
	return idle
}

// storageFitsLocked reports whether a machine of image and size sz fits
// what the claims leave of each pool's room, with the idle warm machines'
// claims as room when idleRoom is set: a provision binds one of them or
// retires them when it needs their room (storageVictimLocked), as it does
// for the host's totals.
func (m *Manager) storageFitsLocked(image string, sz Size, idleRoom bool) bool {
	need := m.storage.claim(image, imageUse{machines: 1, scratchGiB: sz.ScratchGiB})
	if len(need) == 0 {
		return true
	}
	var skip map[*actor]bool
	if idleRoom {
		skip = m.idleLocked()
	}
	claims := m.claimsLocked(skip)
	for pool, n := range need {
		if room, ok := m.storage.Room[pool]; ok && n > 0 && claims[pool]+n > room {
			return false
		}
	}
	return true
}

// storageVictimLocked takes, for the cold build of req, the oldest idle
// warm machine that claims of a pool whose claims, the build's
// reservation included and victims' not, are above its room; nil when
// there is none or no pool of the build is short.
func (m *Manager) storageVictimLocked(req messages.Provision, victims []*actor) *actor {
	need := m.storage.claim(req.Image, imageUse{machines: 1, scratchGiB: req.ScratchDiskGiB})
	skip := make(map[*actor]bool, len(victims))
	for _, v := range victims {
		skip[v] = true
	}
	claims := m.claimsLocked(skip)
	short := map[string]bool{}
	for pool, n := range need {
		if room, ok := m.storage.Room[pool]; ok && n > 0 && claims[pool] > room {
			short[pool] = true
		}
	}
	if len(short) == 0 {
		return nil
	}
	best, bestImage := -1, ""
	for image, l := range m.pool.idle {
		for i, im := range l {
			c := m.claimants[im.a]
			frees := false
			for pool, b := range m.storage.claim(c.image, imageUse{machines: 1, scratchGiB: c.scratchGiB}) {
				frees = frees || (b > 0 && short[pool])
			}
			if frees && (best < 0 || im.since.Before(m.pool.idle[bestImage][best].since)) {
				best, bestImage = i, image
			}
		}
	}
	if best < 0 {
		return nil
	}
	a := m.pool.idle[bestImage][best].a
	m.pool.idle[bestImage] = slices.Delete(m.pool.idle[bestImage], best, best+1)
	return a
}

// CheckStorage returns an error wrapping ErrBeyondStorage, naming the
// pool, when a machine of image and size sz claims more of a pool than
// its room would be were none of the host's machines and reservations
// left.
func (m *Manager) CheckStorage(image string, sz Size) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	need := m.storage.claim(image, imageUse{machines: 1, scratchGiB: sz.ScratchGiB})
	claims := m.claimsLocked(nil)
	for _, pool := range slices.Sorted(maps.Keys(need)) {
		n := need[pool]
		room, ok := m.storage.Room[pool]
		if ok && n > 0 && n > room+claims[pool] {
			return fmt.Errorf("a machine of image %s claims %s of storage pool %s, which has room for %s (its free space less --min-free-space, with what this host's machines claim there): %w",
				image, gibs(n), pool, gibs(max(room+claims[pool], 0)), ErrBeyondStorage)
		}
	}
	return nil
}

// gibs writes a number of bytes in GiB.
func gibs(n int64) string { return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30)) }
