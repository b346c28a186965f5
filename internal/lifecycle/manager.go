package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// Machines creates, starts and removes job machines. *provision.Provisioner
// implements it.
type Machines interface {
	Clone(ctx context.Context, s provision.Spec) (provision.Machine, error)
	Start(ctx context.Context, jobID string) error
	Remove(ctx context.Context, jobID string) (existed bool, err error)
	Lookup(ctx context.Context, jobID string) (provision.Machine, bool, error)
	List(ctx context.Context) ([]provision.Machine, error)
	ListOrphanVolumes(ctx context.Context) ([]string, error)
}

// Agent talks to a machine's guest agent. *qga.Agent implements it.
type Agent interface {
	WaitReady(ctx context.Context, domain string) error
	OSInfo(ctx context.Context, domain string) (qga.OSInfo, error)
	Run(ctx context.Context, domain string, req qga.ExecRequest) (qga.Status, error)
	Start(ctx context.Context, domain string, req qga.ExecRequest) (int, error)
	Status(ctx context.Context, domain string, pid int) (qga.Status, error)
}

// Publisher makes an event durable as the next event of its job.
// *bus.Publisher implements it.
type Publisher interface {
	// Append stores ev after the job's event at stream position after
	// (0: none known). When other events of the job were stored since
	// (another host's), ev is renumbered to follow the newest, so seq
	// goes up by one per stored event of the job across hosts. It
	// returns the seq and stream position ev was stored with; publishing
	// twice with the same msgID stores the event once.
	Append(ctx context.Context, ev messages.Event, msgID string, after uint64) (seq, pos uint64, err error)
}

// History tells the newest event already published for a job, so that a
// machine picked up again after a restart is known to be acknowledged and
// how far it got.
type History interface {
	// LastEvent returns the job's newest event, from host only unless
	// host is empty.
	LastEvent(ctx context.Context, jobID, host string) (ev messages.Event, found bool, err error)
}

// Journal reads a host's recent events, so that a restarted worker can end
// the teardowns its predecessor began (FinishTeardowns). *bus.Publisher
// implements it.
type Journal interface {
	Recent(ctx context.Context, host string, since time.Time) ([]messages.Event, error)
}

// Slots hands out the host's operation slots to the teardowns a machine
// begins by itself (runner exit, deadline, stopped guest, lost claim);
// operations a request began run in the slot their caller holds.
type Slots interface {
	// Acquire waits for a slot until ctx ends; release frees it.
	Acquire(ctx context.Context) (release func(), err error)
	// TryAcquire takes a slot for a warm pool's refill only if one is
	// free that no request waits for or is likely to need; ok is false
	// otherwise.
	TryAcquire() (release func(), ok bool)
}

// Config wires a Manager.
type Config struct {
	// Host is this worker's host id, carried in every event.
	Host     string
	Machines Machines
	// Agent starts runners in machines; nil means no runner is ever
	// started and machines are ready once they run (for tests of the
	// provisioning steps alone).
	Agent  Agent
	Events Publisher
	// History is optional; without it a restarted worker cannot tell how
	// far a machine it finds got, and removes it as half-built.
	History History
	// Journal is optional; without it FinishTeardowns does nothing.
	Journal Journal
	// Slots bounds the teardowns machines begin by themselves; nil means
	// no bound (tests).
	Slots Slots
	// Report, when set, is told of background work that failed and will
	// be tried again: a teardown a machine began by itself (op is its
	// reason). Only logging should hang off it.
	Report func(op, jobID string, err error)
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Remember is how long finished jobs are remembered so that a repeated
	// provision request does not create a second machine; 0 means 24h.
	Remember time.Duration
	// Faults, when set, is called at the fault points (fault.go); only
	// tests set it.
	Faults Faults
	// Claims, when set, claims every job across hosts before its machine
	// is built and keeps the claim while the machine exists (claim.go).
	Claims Claims
	// ClaimTTL is how long a claim lives unrenewed; it must be below the
	// requests' AckWait. Default 15s.
	ClaimTTL time.Duration
	// Pool, when set, keeps warm machines ready for jobs (pool.go).
	Pool *PoolConfig
	// Resources bounds machine sizes, one machine's and all the host's
	// together (resources.go); zero fields are no bound.
	Resources Resources
	// Sizes tells images' own sizes; nil counts what a request leaves 0
	// as 0 until its clone tells the machine's size.
	Sizes ImageSizer
	// ConsoleDir, when set, is where clones log their serial consoles
	// (provision.Spec.ConsoleDir); a failed event carries the end of the
	// log.
	ConsoleDir string
	// RunnerPoll is how often a running runner is looked at between
	// ticks, by one guest agent call, so that its exit is noticed at
	// once; 0 means 200ms, negative only at ticks.
	RunnerPoll time.Duration
	// Holds, when set, keeps machines after their jobs end, shut off, for
	// a request's hold_on_failure_s or an operator's hold (hold.go), up to
	// MaxHold; nil or a MaxHold of 0 holds nothing.
	Holds   HoldMachines
	MaxHold time.Duration
}

// Delivery describes the request message being handled.
type Delivery struct {
	// Attempt is the message's delivery count, from 1.
	Attempt int
	// Final is true when the message will not be delivered again, so a
	// transient failure must be reported as final.
	Final bool
	// Origin names what started a step that no request caused (deadline,
	// reconcile); Attempt is 0 then.
	Origin string
	// Request is the stream sequence of the request message; it ties a
	// job's claim to the request it serves.
	Request uint64
}

// msgID is the event's Nats-Msg-Id: retried publishes of the same step
// are stored once.
func (d Delivery) msgID(jobID string, state messages.State) string {
	if d.Origin != "" {
		return fmt.Sprintf("%s:%s:%s", jobID, state, d.Origin)
	}
	return fmt.Sprintf("%s:%s:%d", jobID, state, d.Attempt)
}

// ErrSuperseded is returned by Provision when a teardown request for the
// same job arrived while the machine was being built; the teardown reports
// the job's end.
var ErrSuperseded = errors.New("provision superseded by teardown")

// errClosed answers commands to a Manager that is closing.
var errClosed = errors.New("the lifecycle manager is closing")

// Failure is a permanent failure that has been reported with a failed event.
// The request that caused it must not be retried.
type Failure struct {
	Code messages.ErrorCode
	Err  error
}

func (f *Failure) Error() string { return fmt.Sprintf("%s: %v", f.Code, f.Err) }
func (f *Failure) Unwrap() error { return f.Err }

// Manager is the registry of one host's machine actors and the host's
// capacity. It is safe for concurrent use; it knows of each actor only
// which job it serves and whether it counts as a machine, and talks to it
// only through its inbox.
type Manager struct {
	cfg Config

	// root is the context of every actor; Close ends it.
	root   context.Context
	cancel context.CancelFunc
	actors conc.WaitGroup

	mu     sync.Mutex
	closed bool
	// byJob maps each job this host serves to its actor; byKey each
	// machine key (a cold machine's is its job id) to its actor, warm
	// machines no job bound included.
	byJob    map[string]*actor
	byKey    map[string]*actor
	pool     poolState
	machines int            // actors that own or build a machine
	byImage  map[string]int // those machines by image
	used     Size           // what those machines hold
	// claimants are the machines that claim storage (storage.go): those
	// counted, and warm ones about to be.
	claimants map[*actor]claimant
	reserved  int // machines promised to requests not yet read
	// unadopted counts the machines the last reconciliation found and
	// could not take over (their job's history could not be read, or
	// their removal failed); unlisted is set while it could not even
	// list them. Both count against MaxVMs: the machines are there.
	unadopted int
	unlisted  bool
	// reservedSize is what was promised to requests read but not yet
	// handled (ReserveSize).
	reservedSize Size
	// reservedByImage is what those requests hold, by image, of what
	// claims storage; storage is what the host's pools have room for.
	reservedByImage map[string]imageUse
	storage         Storage
	done            map[string]time.Time // finished jobs, for idempotency
	// roomed is closed and replaced whenever room for a machine may have
	// been freed (CapacityChanged).
	roomed chan struct{}
	// held are the held machines (hold.go).
	held map[*actor]HeldMachine
	// orphans are the volume paths the last reconciliation found without a
	// domain; only the Reconcile goroutine touches it.
	orphans map[string]bool
	// consoleOrphans are the keys of the console logs the last
	// reconciliation found without a domain (console.go); only the
	// Reconcile goroutine touches it.
	consoleOrphans map[string]bool
	// guests is, by image, the OS family a guest of the image's latest
	// generation seen reported (runner.go).
	guests map[string]guestOS
}

// New returns a Manager; Close stops its actors.
func New(cfg Config) *Manager {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Remember == 0 {
		cfg.Remember = 24 * time.Hour
	}
	if cfg.ClaimTTL <= 0 {
		cfg.ClaimTTL = 15 * time.Second
	}
	if cfg.RunnerPoll == 0 {
		cfg.RunnerPoll = 200 * time.Millisecond
	}
	root, cancel := context.WithCancel(context.Background())
	return &Manager{
		cfg: cfg, root: root, cancel: cancel,
		byJob:           make(map[string]*actor),
		byKey:           make(map[string]*actor),
		pool:            newPoolState(),
		byImage:         make(map[string]int),
		claimants:       make(map[*actor]claimant),
		reservedByImage: make(map[string]imageUse),
		done:            make(map[string]time.Time),
		roomed:          make(chan struct{}),
		held:            make(map[*actor]HeldMachine),
	}
}

// Close stops every actor and waits for them. Running machines are left
// running, their runners too; a later Manager adopts them (Reconcile).
// Call it once the operations that the worker started have returned.
func (m *Manager) Close() {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.cancel()
	m.actors.Wait()
}

// Active returns the number of machines that exist or are being built,
// with those a reconciliation found and could not take over yet.
func (m *Manager) Active() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.countLocked()
}

// countLocked is what counts against MaxVMs.
func (m *Manager) countLocked() int { return m.machines + m.unadopted }

// Unreconciled reports whether the last reconciliation left machines of
// the host it could not take over, or could not list them: it should be
// tried again soon, and until then the host's count is not complete.
func (m *Manager) Unreconciled() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.unadopted > 0 || m.unlisted
}

// TryReserve reserves room for one more machine under max, counting the
// machines that exist or are being built and earlier reservations; ok is
// false when none fits. The caller reads a provision request only then,
// and calls release once that request was handled (its machine, if any,
// then counts on its own).
func (m *Manager) TryReserve(max int) (release func(), ok bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	// Idle warm machines give way to a cold build (Provision).
	if m.unlisted || m.countLocked()-m.pool.idleCount()+m.reserved >= max {
		return func() {}, false
	}
	m.reserved++
	var once sync.Once
	return func() {
		once.Do(func() {
			m.mu.Lock()
			m.reserved--
			m.roomedLocked()
			m.mu.Unlock()
		})
	}, true
}

// CapacityChanged returns a channel that is closed the next time room for a
// machine may have been freed: a machine went or a reservation was given
// back. Take it before TryReserve, so that a change in between is not
// missed.
func (m *Manager) CapacityChanged() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.roomed
}

func (m *Manager) roomedLocked() {
	close(m.roomed)
	m.roomed = make(chan struct{})
}

// forgetOldLocked drops finished jobs older than Remember.
func (m *Manager) forgetOldLocked() {
	cutoff := m.cfg.Now().Add(-m.cfg.Remember)
	for id, t := range m.done {
		if t.Before(cutoff) {
			delete(m.done, id)
		}
	}
}

// known reports whether an actor serves jobID now, or the job finished
// recently.
func (m *Manager) known(jobID string) (active, finished bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, active = m.byJob[jobID]
	if !active {
		_, active = m.byKey[jobID]
	}
	_, finished = m.done[jobID]
	return active, finished
}

// spawnMode says when lookup makes an actor for a job that has none.
type spawnMode int

const (
	spawnNever          spawnMode = iota
	spawnUnlessFinished           // not for a job this host ended recently
	spawnAlways                   // also for one: its machine is still there (Reconcile)
)

// lookup returns the actor of jobID, or, when there is none, a new one as
// mode allows. finished reports a job this host ended recently for which
// no actor is made; then a is nil.
func (m *Manager) lookup(jobID string, mode spawnMode) (a *actor, created, finished bool, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, false, false, errClosed
	}
	m.forgetOldLocked()
	if a := m.byJob[jobID]; a != nil {
		return a, false, false, nil
	}
	if _, ok := m.done[jobID]; ok && mode != spawnAlways {
		return nil, false, true, nil
	}
	if mode == spawnNever {
		return nil, false, false, nil
	}
	a = newActor(m, jobID)
	m.registerLocked(a, jobID)
	m.actors.Go(func() { a.run(m.root) })
	return a, true, false, nil
}

// spawnAdopter returns a new actor for a machine found on the host, under
// its key and its job (none for a warm machine no job bound), or nil when
// an actor has the machine already. extra: the job has an actor with
// another machine, so this one is a second machine of the job (a warm
// machine an earlier process bound and then lost track of), registered
// under its key only, to be removed.
func (m *Manager) spawnAdopter(mach provision.Machine) (a *actor, extra bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed || m.byKey[mach.Key] != nil {
		return nil, false
	}
	register := mach.JobID
	if o := m.byJob[mach.JobID]; mach.JobID != "" && o != nil {
		if o.key == mach.Key {
			return nil, false
		}
		register, extra = "", true
	}
	a = newActor(m, mach.JobID)
	a.key = mach.Key
	if mach.Warm {
		a.rec.em.machine = mach.Key
	}
	m.registerLocked(a, register)
	m.actors.Go(func() { a.run(m.root) })
	return a, extra
}

// registerLocked enters a into the registry: under its key, and under
// jobID unless that is empty (a warm machine no job bound).
func (m *Manager) registerLocked(a *actor, jobID string) {
	m.byKey[a.key] = a
	if jobID != "" {
		m.byJob[jobID] = a
		a.registered = jobID
	}
}

// countMachine makes a's machine, of image and size sz, count against
// the host's capacity (on true) or stop counting (false); only the
// machine's actor calls it.
func (m *Manager) countMachine(a *actor, counted bool, image string, sz Size) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if counted {
		m.machines++
		m.byImage[image]++
		a.size = sz
		m.used = m.used.add(sz)
		m.claimants[a] = claimant{image: image, scratchGiB: sz.ScratchGiB}
		return
	}
	m.machines--
	if m.byImage[image]--; m.byImage[image] <= 0 {
		delete(m.byImage, image)
	}
	delete(m.claimants, a)
	m.used = m.used.sub(a.size)
	a.size = Size{}
	m.roomedLocked()
}

// resize changes what a's counted machine holds to sz, once its clone
// tells its size.
func (m *Manager) resize(a *actor, sz Size) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.used = m.used.sub(a.size).add(sz)
	if c, ok := m.claimants[a]; ok {
		c.scratchGiB = sz.ScratchGiB
		m.claimants[a] = c
	}
	if sz.VCPUs < a.size.VCPUs || sz.MemoryMiB < a.size.MemoryMiB || sz.ScratchGiB < a.size.ScratchGiB {
		m.roomedLocked()
	}
	a.size = sz
}

// MachinesByImage returns how many machines of each image exist on this
// host or are being built, for the worker's metrics and its record in the
// host registry.
func (m *Manager) MachinesByImage() map[string]int {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]int, len(m.byImage))
	for image, n := range m.byImage {
		out[image] = n
	}
	return out
}

// retire removes a from the registry; finished marks its job done for
// good. Only a's goroutine calls it, as it stops.
func (m *Manager) retire(a *actor, finished bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.byJob[a.registered] == a {
		delete(m.byJob, a.registered)
	}
	if m.byKey[a.key] == a {
		delete(m.byKey, a.key)
	}
	m.pool.forgetLocked(a)
	delete(m.held, a)
	if finished && a.registered != "" {
		m.done[a.registered] = m.cfg.Now()
	}
}

// call sends cmd to the actor serving jobID, making one as mode allows,
// and waits for the actor's answer; the registry itself answers for a job
// that finished here (finished) or has no actor (absent).
func (m *Manager) call(ctx context.Context, jobID string, mode spawnMode, cmd command) (answer, error) {
	for {
		a, _, finished, err := m.lookup(jobID, mode)
		switch {
		case err != nil:
			return answer{}, err
		case finished:
			return answer{finished: true}, nil
		case a == nil:
			return answer{absent: true}, nil
		}
		ans, err := m.send(ctx, a, cmd)
		if err != nil {
			return answer{}, err
		}
		if ans.retry {
			continue
		}
		return ans, nil
	}
}

// send gives cmd to a and waits for its answer; an actor that stopped
// before it took cmd answers retry, so the caller asks the registry again.
func (m *Manager) send(ctx context.Context, a *actor, cmd command) (answer, error) {
	reply := make(chan answer, 1)
	cmd.setReply(reply)
	select {
	case a.inbox <- cmd:
	case <-a.stopped:
		return answer{retry: true}, nil
	case <-ctx.Done():
		return answer{}, ctx.Err()
	}
	// The actor answers every command it took, also when it stops, so the
	// wait ends; a provision's caller keeps its slot until the build is
	// rolled back.
	return <-reply, nil
}

// Provision builds and boots the machine for req and starts its runner,
// publishing an event at each step, and returns once the runner runs (for
// runner kind none, once the guest agent answers; without an Agent, once
// the machine runs). The caller holds an operation slot for it. A job that
// already has a machine on this host, or had one recently, is left alone
// and nil is returned: requests are idempotent by job id. A delivery that
// finds an earlier one still building returns that build's outcome: nil
// if it built the machine, a transient error otherwise.
//
// With Claims set, the job is claimed across hosts first; a job another
// host holds, or takes over while this one stalls, is dropped: what this
// delivery built is removed, a dropped event published and *Dropped
// returned.
//
// On failure everything created for the job is removed first. A permanent
// failure (or any failure on the final delivery) is reported with a failed
// event and returned as *Failure; other errors are transient and the
// request should be delivered again. When ctx ends the build is stopped
// and rolled back before Provision returns.
func (m *Manager) Provision(ctx context.Context, req messages.Provision, d Delivery) error {
	for {
		a, warm, victims, finished, err := m.lookupProvision(req)
		switch {
		case err != nil:
			return err
		case finished:
			return nil
		}
		for _, victim := range victims {
			// An idle warm machine makes room for this cold build.
			if _, err := m.send(ctx, victim, &retireCmd{reason: messages.ReasonCapacity}); err != nil {
				return err
			}
		}
		ans, err := m.send(ctx, a, &provisionCmd{ctx: ctx, req: req, d: d, warm: warm})
		if err != nil {
			return err
		}
		if ans.retry {
			continue
		}
		return ans.err
	}
}

// lookupProvision finds the actor for a provision of req: the job's own,
// or an idle warm machine of its image and size that the job binds
// (warm), or a new one that builds it cold, with idle warm machines to
// retire first (victims) when the host is full: at --max-vms, or holding
// more of its totals, or claiming more of the room of a pool the build
// claims of, than they allow with the reservations of the requests read. finished: the job ended here recently.
func (m *Manager) lookupProvision(req messages.Provision) (a *actor, warm bool, victims []*actor, finished bool, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil, false, nil, false, errClosed
	}
	m.forgetOldLocked()
	if a := m.byJob[req.JobID]; a != nil {
		return a, false, nil, false, nil
	}
	if _, ok := m.done[req.JobID]; ok {
		return nil, false, nil, true, nil
	}
	if w := m.pool.popLocked(req.Image, &req); w != nil {
		m.byJob[req.JobID] = w
		w.registered = req.JobID
		return w, true, nil, false, nil
	}
	var freed Size
	for m.countLocked()-len(victims) >= m.maxVMs() || m.overLocked(m.reservedSize.sub(freed)) {
		v := m.pool.popLocked("", nil)
		if v == nil {
			break
		}
		victims = append(victims, v)
		freed = freed.add(v.size)
	}
	for v := m.storageVictimLocked(req, victims); v != nil; v = m.storageVictimLocked(req, victims) {
		victims = append(victims, v)
	}
	a = newActor(m, req.JobID)
	m.registerLocked(a, req.JobID)
	m.actors.Go(func() { a.run(m.root) })
	return a, false, victims, false, nil
}

// Teardown removes the machine of jobID, publishing tearing_down and then
// torn_down, or failed when cause is set (the machine is removed because
// something went wrong, such as its deadline passing). The caller holds an
// operation slot for it. A build in progress for the job is stopped and
// rolled back first (TeardownBuild). A job this host has no machine for
// gets a torn_down event with the unknown_job error, once; a job it
// finished recently, or is tearing down already, gets nothing. Errors are
// transient.
func (m *Manager) Teardown(ctx context.Context, jobID, reason string, cause *messages.Error, d Delivery) error {
	ans, err := m.call(ctx, jobID, spawnUnlessFinished, &teardownCmd{reason: reason, cause: cause, d: d})
	if err != nil || ans.finished {
		return err
	}
	return ans.err
}

// TeardownBuild ends the job of a provision in flight on this host: it
// stops the build, whose operation then removes what it built and
// publishes tearing_down and the end (torn_down, or failed when cause is
// set) with d, in the slot it holds already. So a teardown of a machine
// being built needs no operation slot of its own and does not wait behind
// other builds. served is false, and nothing is done, when no build of
// the job is in flight; the caller then takes a slot and calls Teardown.
// Otherwise TeardownBuild returns once the build ended, with the
// teardown's outcome.
func (m *Manager) TeardownBuild(ctx context.Context, jobID, reason string, cause *messages.Error, d Delivery) (served bool, err error) {
	ans, err := m.call(ctx, jobID, spawnNever, &teardownCmd{reason: reason, cause: cause, d: d, buildOnly: true})
	if err != nil {
		return false, err
	}
	if ans.finished || ans.absent || !ans.served {
		return false, nil
	}
	return true, ans.err
}

// Reject reports a provision request that cannot be served (it does not
// decode or validate) with a failed event when its job id is readable and
// the job is neither served nor finished by this host, and returns the
// *Failure to settle it with. Pass no job id for other requests: a bad
// teardown must not declare a job failed.
func (m *Manager) Reject(ctx context.Context, jobID, image string, code messages.ErrorCode, cause error, d Delivery) error {
	f := &Failure{Code: code, Err: cause}
	if jobID == "" {
		return f
	}
	if busy, finished := m.known(jobID); busy || finished {
		return f
	}
	ans, err := m.call(ctx, jobID, spawnUnlessFinished, &rejectCmd{image: image, code: code, cause: cause, d: d})
	switch {
	case err != nil:
		return err
	case ans.err != nil:
		return ans.err
	}
	return f
}

// Tick asks every machine to look after itself once: a ready machine
// whose deadline passed, whose guest stopped, or whose runner exited (it
// publishes runner_exited first) is torn down in an operation slot of its
// own; claims that are due are renewed, and a machine whose job another
// host took is given up. A machine whose teardown failed is looked at
// again 30 s later. Tick does not wait for any of it.
func (m *Manager) Tick() {
	m.mu.Lock()
	actors := make([]*actor, 0, len(m.byKey))
	for _, a := range m.byKey {
		actors = append(actors, a)
	}
	m.mu.Unlock()
	for _, a := range actors {
		a.poke()
	}
	m.refill()
}
