package worker

import (
	"context"
	"fmt"
	"math"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// Inventory finds the images of this host and the free space of its
// pools. *provision.Provisioner implements it.
type Inventory interface {
	ListImages(ctx context.Context, keep func(name string) bool) ([]provision.ImageReport, error)
	RefreshPools(ctx context.Context) error
	InspectPools(ctx context.Context) ([]provision.PoolReport, error)
}

// Registry is what the worker shares with the other hosts of its fleet.
// *bus.Fleet implements it.
type Registry interface {
	PutHost(ctx context.Context, rec messages.Host) error
	DeleteHost(ctx context.Context) error
	Carriers(ctx context.Context, image string) ([]string, error)
	Hosts(ctx context.Context) ([]messages.Host, error)
	Drained(ctx context.Context, host string) (bool, error)
	Drain(ctx context.Context, host, by string) error
	Undrain(ctx context.Context, host string) error
	Tried(ctx context.Context, request uint64, jobID, image string) ([]string, error)
	ForgetTried(ctx context.Context, request uint64) error
	ImageConsumer(ctx context.Context, image string) (jetstream.Consumer, error)
	Forward(ctx context.Context, data []byte, image, jobID string) error
}

// FleetConfig makes a Worker one host of a fleet: it finds the images it
// carries, pulls from their consumers, hands shared requests for other
// images on, keeps its record in the host registry and drains on request
// (docs/protocol.md 6.5, 6.6). Zero durations mean the defaults.
type FleetConfig struct {
	// Host is this worker's host id; Version its version, for the record.
	Host, Version string
	Inventory     Inventory
	Registry      Registry
	// Images are shell patterns (path.Match) that limit the images the
	// host carries; none means every image found.
	Images []string
	// SealKeys are the public halves of the keys the worker opens sealed
	// runner secrets with (Config.Keys), which the host's record lists for
	// orchestrators to seal to, the one to prefer first.
	SealKeys []messages.SealKey
	// MinFreeSpace is the free space, in bytes, every pool of an image
	// needs for the host to take the image's requests.
	MinFreeSpace uint64
	// ImagesInterval is how often images and pools are looked at again;
	// default 30s.
	ImagesInterval time.Duration
	// HeartbeatInterval is how often the record is rewritten and the drain
	// request read; default bus.HostTTL/3.
	HeartbeatInterval time.Duration
	// OnChange, when set, is told of what the host's operator wants to
	// know: images found and lost, forwarded and handed back requests,
	// drain states, and background failures.
	OnChange func(Change)
}

// Change is something the fleet side of a worker noticed or did.
type Change struct {
	// Kind is "image_added", "image_removed", "image_admitted",
	// "image_refused" (a pool is short of space), "forwarded",
	// "handed_back", "state" (State changed), "beat" (the record was
	// written), or "error".
	Kind  string
	Image string
	JobID string
	State messages.HostState
	// Hosts are the carriers a request was forwarded for, or the hosts
	// that tried it.
	Hosts []string
	Err   error
}

// Snapshot is the fleet side of a worker at one moment, for metrics.
type Snapshot struct {
	State  messages.HostState
	Images []messages.HostImage
	Pools  []messages.HostPool
	// Pending is the number of requests waiting per consumer name, as
	// sampled at the last heartbeat.
	Pending map[string]uint64
	// Machines counts the machines per image.
	Machines                map[string]int
	SlotsTotal, SlotsInUse  int
	MachinesMax, MachinesIn int
}

// carried is an image this host serves.
type carried struct {
	report   provision.ImageReport
	consumer jetstream.Consumer
	admitted bool
}

// fleet is the worker's fleet state; its zero value is unused (no fleet).
type fleet struct {
	cfg     FleetConfig
	started time.Time

	mu     sync.Mutex
	images map[string]*carried
	// order is the round-robin order of image names; last the image
	// served last.
	order   []string
	last    string
	pools   []messages.HostPool
	pending map[string]uint64
	// drain is whether a drain is requested; state what the record says.
	drain bool
	state messages.HostState
	// changed is closed and replaced when drain changes.
	changed chan struct{}
}

func newFleet(cfg *FleetConfig) *fleet {
	if cfg == nil {
		return nil
	}
	c := *cfg
	if c.ImagesInterval <= 0 {
		c.ImagesInterval = 30 * time.Second
	}
	if c.HeartbeatInterval <= 0 {
		c.HeartbeatInterval = bus.HostTTL / 3
	}
	return &fleet{
		cfg: c, started: time.Now().UTC(), images: map[string]*carried{},
		state: messages.HostActive, changed: make(chan struct{}), pending: map[string]uint64{},
	}
}

func (f *fleet) tell(c Change) {
	if f.cfg.OnChange != nil {
		f.cfg.OnChange(c)
	}
}

// keep reports whether a domain name may be one of this host's images.
func (f *fleet) keep(name string) bool {
	if !messages.ValidImage(name) {
		return false
	}
	if len(f.cfg.Images) == 0 {
		return true
	}
	for _, p := range f.cfg.Images {
		if ok, _ := path.Match(p, name); ok {
			return true
		}
	}
	return false
}

// lookup returns whether this host carries image and admits its requests.
func (f *fleet) lookup(image string) (isCarried, admitted bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.images[image]
	return c != nil, c != nil && c.admitted
}

// inventory lists the host's images and pools again, creates the consumers
// of new images and drops lost ones, and returns the pools' room and what
// clones of the images claim of them, for admission (ok false: nothing
// new was found). Failures keep what was known.
func (f *fleet) inventory(ctx context.Context) (st lifecycle.Storage, ok bool) {
	reports, err := f.cfg.Inventory.ListImages(ctx, f.keep)
	if err != nil {
		f.tell(Change{Kind: "error", Err: fmt.Errorf("list images: %w", err)})
		return st, false
	}
	if err := f.cfg.Inventory.RefreshPools(ctx); err != nil {
		f.tell(Change{Kind: "error", Err: err})
	}
	pools, err := f.cfg.Inventory.InspectPools(ctx)
	if err != nil {
		f.tell(Change{Kind: "error", Err: err})
		return st, false
	}
	free := map[string]uint64{}
	for _, p := range pools {
		if p.Active {
			free[p.Name] = p.Available
		}
	}
	found := map[string]provision.ImageReport{}
	used := map[string]bool{}
	for _, r := range reports {
		if len(r.Problems) == 0 {
			found[r.Name] = r
			for _, p := range r.Pools() {
				used[p] = true
			}
		}
	}
	// Consumers are created outside the lock; one that cannot be created
	// now is tried again next time.
	var fresh []string
	f.mu.Lock()
	for name := range found {
		if f.images[name] == nil {
			fresh = append(fresh, name)
		}
	}
	f.mu.Unlock()
	consumers := map[string]jetstream.Consumer{}
	for _, name := range fresh {
		c, err := f.cfg.Registry.ImageConsumer(ctx, name)
		if err != nil {
			f.tell(Change{Kind: "error", Image: name, Err: err})
			delete(found, name)
			continue
		}
		consumers[name] = c
	}

	var changes []Change
	f.mu.Lock()
	for name := range f.images {
		if _, ok := found[name]; !ok {
			delete(f.images, name)
			changes = append(changes, Change{Kind: "image_removed", Image: name})
		}
	}
	for name, r := range found {
		admitted := true
		for _, p := range r.Pools() {
			if n, ok := free[p]; !ok || n < f.cfg.MinFreeSpace {
				admitted = false
			}
		}
		c := f.images[name]
		if c == nil {
			c = &carried{consumer: consumers[name], admitted: true}
			f.images[name] = c
			changes = append(changes, Change{Kind: "image_added", Image: name})
		}
		if c.admitted != admitted {
			kind := "image_refused"
			if admitted {
				kind = "image_admitted"
			}
			changes = append(changes, Change{Kind: kind, Image: name})
		}
		c.report, c.admitted = r, admitted
	}
	f.order = f.order[:0]
	for name := range f.images {
		f.order = append(f.order, name)
	}
	slices.Sort(f.order)
	f.pools = f.pools[:0]
	for name := range used {
		n, ok := free[name]
		f.pools = append(f.pools, messages.HostPool{Name: name, FreeBytes: n, Low: !ok || n < f.cfg.MinFreeSpace})
	}
	slices.SortFunc(f.pools, func(a, b messages.HostPool) int { return strings.Compare(a.Name, b.Name) })
	f.mu.Unlock()
	slices.SortFunc(changes, func(a, b Change) int { return strings.Compare(a.Image, b.Image) })
	for _, c := range changes {
		f.tell(c)
	}
	return storageOf(found, free, f.cfg.MinFreeSpace), true
}

// storageOf returns the room of the active pools, their free space less
// minFree, and what a clone of each image claims of them
// (lifecycle.Storage): its scratch disk goes into the pool of its first
// writable disk, and a copy clone takes the allocation of the image's
// disks, which the copy writes.
func storageOf(images map[string]provision.ImageReport, free map[string]uint64, minFree uint64) lifecycle.Storage {
	st := lifecycle.Storage{Room: make(map[string]int64, len(free)), Images: make(map[string]lifecycle.ImageStorage, len(images))}
	for pool, n := range free {
		st.Room[pool] = int64(min(n, math.MaxInt64)) - int64(min(minFree, math.MaxInt64))
	}
	for name, r := range images {
		var is lifecycle.ImageStorage
		if len(r.Disks) > 0 {
			is.ScratchPool = r.Disks[0].Pool
		}
		if r.CloneMode == provision.CloneCopy {
			is.Clone = map[string]int64{}
			for _, d := range r.Disks {
				is.Clone[d.Pool] += int64(min(d.Allocation, math.MaxInt64))
			}
		}
		st.Images[name] = is
	}
	return st
}

// imageConsumers returns the consumers of the admitted images, in
// round-robin order starting after the image served last.
func (f *fleet) imageConsumers() []jetstream.Consumer {
	f.mu.Lock()
	defer f.mu.Unlock()
	start := 0
	if f.last != "" {
		i, found := slices.BinarySearch(f.order, f.last)
		start = i
		if found {
			start = i + 1
		}
	}
	var out []jetstream.Consumer
	for k := range f.order {
		c := f.images[f.order[(start+k)%len(f.order)]]
		if c.admitted && c.consumer != nil {
			out = append(out, c.consumer)
		}
	}
	return out
}

// served moves the round robin past image.
func (f *fleet) served(image string) {
	f.mu.Lock()
	f.last = image
	f.mu.Unlock()
}

// record builds the host's registry record.
func (w *Worker) record() messages.Host {
	f := w.fl
	inUse, _ := w.slots.InFlight()
	f.mu.Lock()
	rec := messages.Host{
		Version: f.cfg.Version, State: f.state, Started: f.started,
		SlotsTotal: w.cfg.Parallelism, SlotsInUse: int(inUse),
		MachinesMax: w.cfg.MaxVMs, MachinesRunning: w.life.Active(),
		Pools: slices.Clone(f.pools), Heartbeat: time.Now().UTC(),
	}
	used, bounds := w.life.Usage()
	rec.VCPUsTotal, rec.VCPUsUsed, rec.MemoryTotalMiB, rec.MemoryUsedMiB = bounds.HostVCPUs, used.VCPUs, bounds.HostMemoryMiB, used.MemoryMiB
	rec.MaxVCPUsPerMachine, rec.MaxMemoryPerMachineMiB = bounds.MaxVCPUs, bounds.MaxMemoryMiB
	rec.MaxScratchGiB = bounds.MaxScratchGiB
	rec.SealKeys = slices.Clone(f.cfg.SealKeys)
	for _, h := range w.life.Held() {
		rec.Held = append(rec.Held, messages.HostHeld{JobID: h.JobID, Until: h.Until.UTC()})
	}
	for _, name := range f.order {
		c := f.images[name]
		rec.Images = append(rec.Images, messages.HostImage{
			Name: name, OS: c.report.OS, Firmware: c.report.Firmware, CloneMode: string(c.report.CloneMode),
			Generation: c.report.Generation, Admitted: c.admitted,
		})
	}
	f.mu.Unlock()
	return rec
}

// Snapshot returns the fleet side of the worker now; the zero Snapshot
// (with State active) when the worker has no FleetConfig.
func (w *Worker) Snapshot() Snapshot {
	inUse, _ := w.slots.InFlight()
	s := Snapshot{State: messages.HostActive, SlotsTotal: w.cfg.Parallelism, SlotsInUse: int(inUse),
		MachinesMax: w.cfg.MaxVMs, MachinesIn: w.life.Active(), Machines: w.life.MachinesByImage()}
	if w.fl == nil {
		return s
	}
	rec := w.record()
	s.State, s.Images, s.Pools = rec.State, rec.Images, rec.Pools
	w.fl.mu.Lock()
	s.Pending = make(map[string]uint64, len(w.fl.pending))
	for k, v := range w.fl.pending {
		s.Pending[k] = v
	}
	w.fl.mu.Unlock()
	return s
}

// Carries reports whether this host carries image now; false when the
// worker has no FleetConfig.
func (w *Worker) Carries(image string) bool {
	if w.fl == nil {
		return false
	}
	carried, _ := w.fl.lookup(image)
	return carried
}

// sample reads how many requests wait on each consumer this host pulls.
func (w *Worker) sample(ctx context.Context) {
	f := w.fl
	named := map[string]jetstream.Consumer{}
	for _, c := range []jetstream.Consumer{w.cons.Pinned, w.cons.Provision, w.cons.Teardown} {
		if c != nil {
			named[c.CachedInfo().Name] = c
		}
	}
	f.mu.Lock()
	for _, c := range f.images {
		if c.consumer != nil {
			named[c.consumer.CachedInfo().Name] = c.consumer
		}
	}
	f.mu.Unlock()
	pending := map[string]uint64{}
	for name, c := range named {
		info, err := c.Info(ctx)
		if err != nil {
			continue
		}
		pending[name] = info.NumPending
	}
	f.mu.Lock()
	f.pending = pending
	f.mu.Unlock()
}

// fleetStart finds the host's images and whether it is to drain, and
// writes its record, before Run pulls anything.
func (w *Worker) fleetStart(ctx context.Context) {
	if w.fl == nil {
		return
	}
	if st, ok := w.fl.inventory(ctx); ok {
		w.life.SetStorage(st)
	}
	w.beat(ctx)
}

// beat reads the drain request, updates the state, samples the queues
// and writes the record.
func (w *Worker) beat(ctx context.Context) {
	f := w.fl
	drain, err := f.cfg.Registry.Drained(ctx, f.cfg.Host)
	if err != nil {
		f.tell(Change{Kind: "error", Err: err})
	} else {
		w.setDrain(drain)
	}
	w.updateState()
	w.sample(ctx)
	if err := f.cfg.Registry.PutHost(ctx, w.record()); err != nil {
		f.tell(Change{Kind: "error", Err: err})
		return
	}
	f.tell(Change{Kind: "beat"})
}

// fleetLoop keeps the host's images, pools, state and record current
// until ctx ends, then removes the record.
func (w *Worker) fleetLoop(ctx context.Context) {
	if w.fl == nil {
		return
	}
	f := w.fl
	images := time.NewTicker(f.cfg.ImagesInterval)
	defer images.Stop()
	beat := time.NewTicker(f.cfg.HeartbeatInterval)
	defer beat.Stop()
	// A change of state (a machine gone while draining) is noticed at
	// once, so that "drained" shows when the host is empty.
	for {
		roomed := w.life.CapacityChanged()
		select {
		case <-ctx.Done():
			return
		case <-images.C:
			if st, ok := w.fl.inventory(ctx); ok {
				w.life.SetStorage(st)
			}
			w.beat(ctx)
		case <-beat.C:
			w.beat(ctx)
		case <-roomed:
			if w.updateState() {
				if err := f.cfg.Registry.PutHost(ctx, w.record()); err != nil {
					f.tell(Change{Kind: "error", Err: err})
				}
			}
		}
	}
}

// fleetStop removes the host's record once Run is done.
func (w *Worker) fleetStop() {
	if w.fl == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := w.fl.cfg.Registry.DeleteHost(ctx); err != nil {
		w.fl.tell(Change{Kind: "error", Err: err})
	}
}
