package lifecycle

import (
	"context"
	"crypto/rand"
	"slices"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// Warm pools. A warm machine is cloned and booted to agent_ready before
// any job exists, under a name that carries no job id (stretchy-_warm-…,
// messages.ValidWarmKey), and waits idle. A provision of its image binds it:
// claim, the job recorded in the machine's metadata, the job's events, the
// runner's secret and launch; the job's runner starts in a fraction of a
// cold build's time, and the secret reaches the machine only then. A warm
// machine serves one job and is removed with it, like any other.
//
// Idle machines count against --max-vms, but give way to a cold build that
// needs their room; they are retired after MaxReadyAge, when their image
// changes, when the host drains, and when the Manager closes if
// RetireOnClose is set. Refills take an operation slot only when one is
// free that no request needs (Slots.TryAcquire), and only for the clone
// and the boot, not while the guest boots.
//
// A saved pool's idle machines (PoolConfig.Saved) wait saved to disk, not
// running: each is booted once, its clock set, and saved (savedPrepare);
// a job binds it while saved, and it is restored, bound again and its
// clock set before its runner starts (savedBind).

// WarmMachines is what warm pools need of libvirt beyond Machines.
// *provision.Provisioner implements it.
type WarmMachines interface {
	// Bind records the job of b in the metadata of the warm machine key.
	Bind(ctx context.Context, key string, b provision.Binding) (provision.Machine, error)
	// InspectImage reports an image, with its generation.
	InspectImage(ctx context.Context, image string) (provision.ImageReport, error)
	// Save stops a running warm machine with its memory on disk (saved
	// pools).
	Save(ctx context.Context, key string) error
	// Restore starts a saved warm machine from its saved memory, or
	// afresh (fresh) when that cannot be done.
	Restore(ctx context.Context, key string) (fresh bool, err error)
}

// GuestClock sets a guest's clock through its agent. *qga.Agent
// implements it.
type GuestClock interface {
	SetTime(ctx context.Context, domain string, t time.Time) error
}

// PoolConfig configures the warm pools of a host.
type PoolConfig struct {
	Machines WarmMachines
	// Ready is how many idle warm machines to keep of each image.
	Ready map[string]int
	// Saved are the images whose pools are saved: each idle machine is
	// booted once, then saved to disk by libvirt, so that it holds no
	// host memory or CPU while it waits, and restored when a job binds
	// it. The others wait running.
	Saved map[string]bool
	// Clock sets restored guests' clocks; required with Saved pools.
	Clock GuestClock
	// MaxReadyAge retires an idle warm machine this old; 0 means never.
	MaxReadyAge time.Duration
	// RetireOnClose retires the idle machines when the Manager closes;
	// otherwise they stay, and the next process removes them.
	RetireOnClose bool
	// MaxVMs bounds all machines of the host, warm ones included; it must
	// be the worker's --max-vms. Default 8.
	MaxVMs int
}

// generationEvery is how often the images of the pools are inspected for
// a change of their generation.
const generationEvery = 10 * time.Second

// warmFailureBackoff pauses the refills of an image whose last warm
// machine failed to come up.
const warmFailureBackoff = time.Minute

// poolState is the registry's side of the warm pools, guarded by the
// Manager's mu.
type poolState struct {
	idle     map[string][]idleMachine // by image, oldest first
	warming  map[string]int           // machines being prepared, by image
	gens     map[string]string        // the images' generations, as last inspected
	sizes    map[string]Size          // and their sizes
	inspect  time.Time                // when they were
	retryAt  map[string]time.Time
	draining bool
}

// idleMachine is an idle warm machine as the registry knows it: its actor,
// since when it is idle and the image generation it was cloned from.
type idleMachine struct {
	a     *actor
	since time.Time
	gen   string
}

func newPoolState() poolState {
	return poolState{idle: map[string][]idleMachine{}, warming: map[string]int{}, gens: map[string]string{},
		sizes: map[string]Size{}, retryAt: map[string]time.Time{}}
}

func (p *poolState) idleCount() int {
	n := 0
	for _, l := range p.idle {
		n += len(l)
	}
	return n
}

// forgetLocked drops a from the idle lists.
func (p *poolState) forgetLocked(a *actor) {
	for image, l := range p.idle {
		p.idle[image] = slices.DeleteFunc(l, func(im idleMachine) bool { return im.a == a })
	}
}

// popLocked takes the oldest idle machine of image whose generation is
// the image's current one and that is what req asks for (its size, no
// scratch disk); image "" takes the oldest of any image, for a cold build
// that needs its room.
func (p *poolState) popLocked(image string, req *messages.Provision) *actor {
	best, bestImage := -1, ""
	for img, l := range p.idle {
		if image != "" && img != image {
			continue
		}
		for i, im := range l {
			if gen := p.gens[img]; image != "" && gen != "" && im.gen != gen {
				continue // stale: retired at its next tick
			}
			if req != nil && !servesSize(im.a.size, *req) {
				continue
			}
			if best < 0 || im.since.Before(p.idle[bestImage][best].since) {
				best, bestImage = i, img
			}
			break
		}
	}
	if best < 0 {
		return nil
	}
	im := p.idle[bestImage][best]
	im.a.pooled = im
	p.idle[bestImage] = slices.Delete(p.idle[bestImage], best, best+1)
	return im.a
}

// unbind takes a job's registration off warm machine a, which the job
// took from its pool but did not bind, and puts a back among the idle
// machines as it was.
func (m *Manager) unbind(a *actor) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if a.registered != "" && m.byJob[a.registered] == a {
		delete(m.byJob, a.registered)
	}
	a.registered = ""
	im := a.pooled
	im.a = a
	l := m.pool.idle[a.rec.image]
	i := slices.IndexFunc(l, func(o idleMachine) bool { return im.since.Before(o.since) })
	if i < 0 {
		i = len(l)
	}
	m.pool.idle[a.rec.image] = slices.Insert(l, i, im)
}

// servesSize reports whether a warm machine of size sz is what req asks
// for: a warm machine is its image's size and has no scratch disk.
func servesSize(sz Size, req messages.Provision) bool {
	return (req.VCPUs == 0 || req.VCPUs == sz.VCPUs) && (req.MemoryMiB == 0 || req.MemoryMiB == sz.MemoryMiB) && req.ScratchDiskGiB == 0
}

// SetDraining tells the pools that the host drains (no refills; idle
// machines are retired at their next tick) or takes provisions again.
func (m *Manager) SetDraining(draining bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pool.draining = draining
}

// Pools returns how many warm machines of each pooled image are idle and
// how many are being prepared.
func (m *Manager) Pools() (idle, warming map[string]int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	idle, warming = map[string]int{}, map[string]int{}
	for image, l := range m.pool.idle {
		idle[image] = len(l)
	}
	for image, n := range m.pool.warming {
		warming[image] = n
	}
	return idle, warming
}

// generation returns the generation last inspected of image.
func (m *Manager) generation(image string) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.pool.gens[image]
}

// refill inspects the pooled images now and then and starts warm machines
// where a pool has fewer than it should, as far as free slots and
// --max-vms allow. It runs in Tick's goroutine.
func (m *Manager) refill() {
	pc := m.cfg.Pool
	if pc == nil || len(pc.Ready) == 0 {
		return
	}
	now := m.cfg.Now()
	m.mu.Lock()
	due := now.Sub(m.pool.inspect) >= generationEvery
	m.mu.Unlock()
	if due {
		gens, sizes := map[string]string{}, map[string]Size{}
		for image := range pc.Ready {
			ctx, cancel := context.WithTimeout(m.root, generationEvery)
			r, err := pc.Machines.InspectImage(ctx, image)
			cancel()
			if err == nil {
				gens[image], sizes[image] = r.Generation, Size{VCPUs: r.VCPUs, MemoryMiB: r.MemoryMiB}
			}
		}
		m.mu.Lock()
		for image, gen := range gens {
			m.pool.gens[image], m.pool.sizes[image] = gen, sizes[image]
		}
		m.pool.inspect = now
		m.mu.Unlock()
	}
	images := make([]string, 0, len(pc.Ready))
	for image := range pc.Ready {
		images = append(images, image)
	}
	slices.Sort(images)
	for _, image := range images {
		for m.wantsWarm(image, now) {
			release := func() {}
			if s := m.cfg.Slots; s != nil {
				var ok bool
				if release, ok = s.TryAcquire(); !ok {
					return // no slot to spare: next tick
				}
			}
			if !m.startWarm(image, release) {
				release()
				return
			}
		}
	}
}

// wantsWarm reports whether the pool of image lacks a machine and one may
// be started now.
func (m *Manager) wantsWarm(image string, now time.Time) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := &m.pool
	have := len(p.idle[image]) + p.warming[image]
	// Reservations are not counted: the worker holds one while it waits
	// for any request, which may well bind this machine; a cold build
	// that finds the host full retires an idle one instead.
	// A warm machine takes what is left of the host's totals and of its
	// pools' room, not room the requests read were promised, and only
	// within the bounds on one machine.
	sz, known := p.sizes[image]
	return !m.closed && !p.draining && have < m.cfg.Pool.Ready[image] &&
		!now.Before(p.retryAt[image]) && !m.unlisted && m.countLocked() < m.maxVMs() &&
		known && m.CheckBounds(sz) == nil && !m.overLocked(m.reservedSize.add(sz)) && m.storageFitsLocked(image, sz, false)
}

func (m *Manager) maxVMs() int {
	if m.cfg.Pool != nil && m.cfg.Pool.MaxVMs > 0 {
		return m.cfg.Pool.MaxVMs
	}
	return 8
}

// startWarm starts the actor of a new warm machine of image; release frees
// the slot it was given once the machine is booted.
func (m *Manager) startWarm(image string, release func()) bool {
	var random [6]byte
	_, _ = rand.Read(random[:])
	key := messages.WarmKey(random)
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return false
	}
	a := newActor(m, "")
	a.key = key
	a.rec.em.machine = key
	m.registerLocked(a, "")
	m.pool.warming[image]++
	// Its storage is claimed from now, not once its actor counts it, so
	// that the next wantsWarm sees it.
	m.claimants[a] = claimant{image: image}
	size := m.pool.sizes[image]
	m.actors.Go(func() { a.run(m.root) })
	m.mu.Unlock()
	reply := make(chan answer, 1)
	cmd := &warmCmd{image: image, size: size, release: release}
	cmd.setReply(reply)
	select {
	case a.inbox <- cmd:
		return true
	case <-a.stopped:
		m.mu.Lock()
		delete(m.claimants, a)
		m.mu.Unlock()
		return false
	}
}

// warmed moves a from the machines being prepared to the idle ones; ok
// false leaves the pool of image to try again after a pause.
func (m *Manager) warmed(a *actor, image, gen string, ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.pool.warming[image]--
	if ok {
		m.pool.idle[image] = append(m.pool.idle[image], idleMachine{a: a, since: m.cfg.Now(), gen: gen})
		return
	}
	m.pool.retryAt[image] = m.cfg.Now().Add(warmFailureBackoff)
}

// leavePool takes idle a out of its pool before it retires itself; false
// means a job took it meanwhile, whose binding is on its way to a.
func (m *Manager) leavePool(a *actor) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for image, l := range m.pool.idle {
		for i, im := range l {
			if im.a == a {
				m.pool.idle[image] = slices.Delete(l, i, i+1)
				return true
			}
		}
	}
	return false
}

// retireReason says why idle a should go now, or "".
func (m *Manager) retireReason(a *actor) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	for image, l := range m.pool.idle {
		for _, im := range l {
			if im.a != a {
				continue
			}
			switch {
			case m.pool.draining:
				return messages.ReasonDraining
			case m.cfg.Pool.MaxReadyAge > 0 && m.cfg.Now().Sub(im.since) >= m.cfg.Pool.MaxReadyAge:
				return messages.ReasonMaxReadyAge
			case m.pool.gens[image] != "" && im.gen != m.pool.gens[image]:
				return messages.ReasonImageChanged
			}
			return ""
		}
	}
	return ""
}
