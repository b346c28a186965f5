package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"sort"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// Holds. A machine is held, instead of removed, when its job ends and
// either its request asked for a hold on failure (hold_on_failure_s) and
// the job failed (a failed end, or a runner that exited with a code other
// than 0), or an operator held it (Manager.Hold) while its job ran. The
// job's terminal event is published as usual, with held_until; then the
// hold is recorded in the machine's metadata and the machine is powered
// off (provision.PowerOff): its disks and console log stay for whoever
// debugs it, its memory does not, and its runner cannot take another job.
// A held machine counts against the host's capacity. When its hold ends,
// or an operator releases it, it is removed and a released event
// published. A restarted worker knows a held machine by its metadata, or,
// if it died before recording it, by its job's terminal event.

// HoldMachines is what holds need of libvirt. *provision.Provisioner
// implements it.
type HoldMachines interface {
	SetHold(ctx context.Context, key string, h provision.Hold) (provision.Machine, error)
	PowerOff(ctx context.Context, key string) error
}

// Errors of Hold, Release and Console.
var (
	ErrNoMachine = errors.New("no machine of the job on this host")
	ErrNotHeld   = errors.New("the job's machine is not held")
	ErrHoldsOff  = errors.New("this host holds no machines (--max-hold 0)")
	ErrNotNow    = errors.New("not possible in the machine's phase")
	ErrNoConsole = errors.New("no console log")
)

// HoldInfo is a machine's hold as Hold and Release leave it.
type HoldInfo struct {
	Phase Phase
	// HeldUntil is when a held machine's hold ends.
	HeldUntil time.Time
	// HoldFor is the hold a machine whose job runs gets when it ends.
	HoldFor time.Duration
}

// HeldMachine is a held machine as the host registry lists it.
type HeldMachine struct {
	JobID string
	Until time.Time
}

// holdTimeout bounds recording a hold.
const holdTimeout = 30 * time.Second

func (m *Manager) holdsOn() bool { return m.cfg.Holds != nil && m.cfg.MaxHold > 0 }

// capHold bounds a hold by the host's --max-hold; 0 asks for all of it.
func (m *Manager) capHold(d time.Duration) time.Duration {
	if !m.holdsOn() {
		return 0
	}
	if d <= 0 || d > m.cfg.MaxHold {
		return m.cfg.MaxHold
	}
	return d
}

// holdFor returns how long the machine is kept when it ends by e: an
// operator's hold for any end of the job, the request's hold on failure
// for a failure; 0 removes it.
func (a *actor) holdFor(e *ending) time.Duration {
	if e.release || a.jobID == "" || !a.m.holdsOn() || e.reason == messages.ReasonClaimLost {
		return 0
	}
	if a.rec.holdFor > 0 {
		return min(a.rec.holdFor, a.m.cfg.MaxHold)
	}
	if a.rec.holdOnFailure <= 0 {
		return 0
	}
	failed := e.cause != nil
	if x := a.rec.runner.exit; e.reason == messages.ReasonRunnerExited && x != nil && x.code != 0 {
		failed = true
	}
	if !failed {
		return 0
	}
	return min(a.rec.holdOnFailure, a.m.cfg.MaxHold)
}

// recordHold records a hold ending at until in the machine's metadata and
// powers it off. The metadata goes first: a worker that dies in between
// finds a held machine, running, which it powers off.
func (m *Manager) recordHold(ctx context.Context, key string, until time.Time) error {
	ctx, cancel := context.WithTimeout(ctx, holdTimeout)
	defer cancel()
	if _, err := m.cfg.Holds.SetHold(ctx, key, provision.Hold{Until: until}); err != nil {
		return err
	}
	return m.cfg.Holds.PowerOff(ctx, key)
}

// enterHeld makes the machine a held one, its hold ending at until; a
// release asked for while it was being held begins at once.
func (a *actor) enterHeld(until time.Time, recorded bool) {
	a.rec.heldUntil, a.rec.holdRecorded = until, recorded
	a.rec.holdFor = 0
	a.to(PhaseHeld)
	if len(a.releasers) > 0 {
		replies := a.releasers
		a.releasers = nil
		a.releaseHeld(a.m.root, replies...)
	}
}

// releaseHeld removes the held machine in the caller's slot, answering
// replies once it is gone.
func (a *actor) releaseHeld(root context.Context, replies ...chan answer) {
	e := &ending{release: true, reason: messages.ReasonReleased, d: Delivery{Origin: messages.ReasonReleased}}
	a.enders = append(a.enders, replies...)
	if a.act == nil {
		a.startTeardown(root, e, nil)
		return
	}
	if a.pending == nil {
		a.pending = e
		a.act.cancel(errOvertaken)
	}
}

// tickHeld ends a hold whose time is up, in an operation slot of its own,
// whether or not it was recorded, and records one not recorded yet.
func (a *actor) tickHeld(root context.Context) {
	now := a.m.cfg.Now()
	if a.act != nil || now.Before(a.rec.retryAt) {
		return
	}
	if !now.Before(a.rec.heldUntil) {
		e := &ending{release: true, reason: messages.ReasonHoldExpired, d: Delivery{Origin: messages.ReasonHoldExpired}, self: true}
		a.teardownInSlot(root, e, func() {})
		return
	}
	if !a.rec.holdRecorded {
		key, until := a.key, a.rec.heldUntil
		a.launch(root, "record the hold", func(ctx context.Context) func() {
			err := a.m.recordHold(ctx, key, until)
			return func() {
				if err == nil {
					a.rec.holdRecorded = true
					return
				}
				// Tried again later, but the hold ends on time whatever
				// became of its recording.
				a.rec.retryAt = a.m.cfg.Now().Add(deadlineRetry)
				if a.rec.heldUntil.Before(a.rec.retryAt) {
					a.rec.retryAt = a.rec.heldUntil
				}
				if a.m.cfg.Report != nil {
					a.m.cfg.Report("hold", a.jobID, err)
				}
			}
		})
		return
	}
}

// onHold: a machine whose job runs is held when the job ends; a held one
// is kept until d from now. The hold is recorded in the machine's
// metadata before the answer, so that it survives a restart.
func (a *actor) onHold(c *holdCmd) {
	if !a.m.holdsOn() {
		c.reply <- answer{err: ErrHoldsOff}
		return
	}
	d := a.m.capHold(c.d)
	ctx, cancel := context.WithTimeout(c.ctx, holdTimeout)
	defer cancel()
	var err error
	switch a.rec.phase {
	case PhaseReady, PhaseEnding:
		if a.jobID == "" {
			err = fmt.Errorf("machine %s serves no job: %w", a.rec.domain, ErrNoMachine)
			break
		}
		if _, err = a.m.cfg.Holds.SetHold(ctx, a.key, provision.Hold{For: d}); err == nil {
			a.rec.holdFor = d
		}
	case PhaseHeld:
		until := a.m.cfg.Now().Add(d)
		if _, err = a.m.cfg.Holds.SetHold(ctx, a.key, provision.Hold{Until: until}); err == nil {
			a.rec.heldUntil = until
			a.m.noteHeld(a, true)
		}
	case PhaseBuilding, PhaseNew:
		err = fmt.Errorf("the machine of job %s is being built; hold it once its runner started: %w", a.jobID, ErrNotNow)
	case PhaseTearingDown, PhaseRollingBack:
		err = fmt.Errorf("the machine of job %s is being removed: %w", a.jobID, ErrNotNow)
	default:
		err = fmt.Errorf("job %s: %w", a.jobID, ErrNoMachine)
	}
	*c.out = a.holdInfo()
	c.reply <- answer{err: err}
}

// onRelease: a held machine is removed in the caller's slot (answered once
// it is gone); a machine whose job runs loses its hold.
func (a *actor) onRelease(root context.Context, c *releaseCmd) {
	switch {
	case a.rec.phase == PhaseHeld:
		*c.out = a.holdInfo()
		c.out.Phase = PhaseGone
		a.releaseHeld(root, c.reply)
	case (a.rec.phase == PhaseReady || a.rec.phase == PhaseEnding) && a.rec.holdFor > 0:
		ctx, cancel := context.WithTimeout(c.ctx, holdTimeout)
		defer cancel()
		_, err := a.m.cfg.Holds.SetHold(ctx, a.key, provision.Hold{})
		if err == nil {
			a.rec.holdFor = 0
		}
		*c.out = a.holdInfo()
		c.reply <- answer{err: err}
	case a.rec.phase == PhaseTearingDown && a.end != nil && a.end.release:
		a.enders = append(a.enders, c.reply) // being released already
		*c.out = HoldInfo{Phase: PhaseGone}
	case a.rec.phase == PhaseTearingDown && a.end != nil && a.end.hold > 0:
		// The job's end is being published and its machine held: released
		// as soon as it is.
		a.releasers = append(a.releasers, c.reply)
		*c.out = HoldInfo{Phase: PhaseGone}
	default:
		*c.out = a.holdInfo()
		c.reply <- answer{err: fmt.Errorf("job %s: %w", a.jobID, ErrNotHeld)}
	}
}

func (a *actor) holdInfo() HoldInfo {
	info := HoldInfo{Phase: a.rec.phase, HoldFor: a.rec.holdFor}
	if a.rec.phase == PhaseHeld {
		info.HeldUntil = a.rec.heldUntil
	}
	return info
}

// consoleSource is where a machine's console log is and what to scrub
// from it.
type consoleSource struct {
	path    string
	secrets []string
	// known: the secrets are known (not a machine adopted after a
	// restart), so the console can be published.
	known bool
}

// consoleSource returns the machine's console log, or a source with no
// path when the host keeps none.
func (a *actor) consoleSource() consoleSource {
	if a.m.cfg.ConsoleDir == "" {
		return consoleSource{}
	}
	path, err := provision.ConsoleLogPath(a.m.cfg.ConsoleDir, a.key)
	if err != nil {
		return consoleSource{}
	}
	return consoleSource{path: path, secrets: append([]string(nil), a.rec.runner.secrets...), known: a.rec.runner.secretsKnown}
}

func (a *actor) onConsole(c *consoleCmd) {
	switch a.rec.phase {
	case PhaseNew, PhaseSettling, PhaseGone:
		c.reply <- answer{err: fmt.Errorf("job %s: %w", a.jobID, ErrNoMachine)}
		return
	}
	*c.out = a.consoleSource()
	c.reply <- answer{}
}

// tail returns the end of the console for a failed event: the text, or
// withheld when the console wrote something the worker cannot scrub.
func (c consoleSource) tail() (text string, withheld bool) {
	if c.path == "" {
		return "", false
	}
	text, err := provision.ConsoleTail(c.path, messages.MaxConsoleLines, messages.MaxConsoleBytes, c.secrets...)
	if err != nil || text == "" {
		return "", false // no log (never started), or unreadable: nothing to show
	}
	if !c.known {
		return "", true
	}
	return text, false
}

// fillConsole sets a failed event's console from c.
func (c consoleSource) fill() func(*messages.Event) {
	text, withheld := c.tail()
	return func(ev *messages.Event) { ev.Console, ev.ConsoleWithheld = text, withheld }
}

// Hold holds the machine of jobID: a machine whose job runs is kept, shut
// off, for d once its job ends (however it ends, except when another host
// takes the job); a held machine is kept until d from now. d 0, or above
// the host's MaxHold, is MaxHold. Errors wrap ErrHoldsOff, ErrNoMachine or
// ErrNotNow (a machine being built or removed).
func (m *Manager) Hold(ctx context.Context, jobID string, d time.Duration) (HoldInfo, error) {
	var info HoldInfo
	ans, err := m.call(ctx, jobID, spawnNever, &holdCmd{ctx: ctx, d: d, out: &info})
	switch {
	case err != nil:
		return HoldInfo{}, err
	case ans.finished || ans.absent:
		return HoldInfo{Phase: PhaseGone}, fmt.Errorf("job %s: %w", jobID, ErrNoMachine)
	}
	return info, ans.err
}

// Release removes the held machine of jobID, publishing released, and
// returns once it is gone; the caller holds an operation slot for it. For
// a machine whose job runs it cancels an operator's hold. Errors wrap
// ErrNotHeld or ErrNoMachine, or are the removal's.
func (m *Manager) Release(ctx context.Context, jobID string) (HoldInfo, error) {
	var info HoldInfo
	ans, err := m.call(ctx, jobID, spawnNever, &releaseCmd{ctx: ctx, out: &info})
	switch {
	case err != nil:
		return HoldInfo{}, err
	case ans.finished || ans.absent:
		return HoldInfo{Phase: PhaseGone}, fmt.Errorf("job %s: %w", jobID, ErrNoMachine)
	}
	return info, ans.err
}

// Console returns the end of the console log of jobID's machine, at most
// maxBytes, with the job's secrets scrubbed; withheld, with no text, when
// the worker does not know them (it adopted the machine after a restart).
func (m *Manager) Console(ctx context.Context, jobID string, maxBytes int) (text string, withheld bool, err error) {
	var src consoleSource
	ans, err := m.call(ctx, jobID, spawnNever, &consoleCmd{out: &src})
	switch {
	case err != nil:
		return "", false, err
	case ans.finished || ans.absent:
		return "", false, fmt.Errorf("job %s: %w", jobID, ErrNoMachine)
	case ans.err != nil:
		return "", false, ans.err
	case src.path == "":
		return "", false, fmt.Errorf("this host captures no consoles (--console-dir \"\"): %w", ErrNoConsole)
	}
	text, err = provision.ConsoleTail(src.path, maxBytes, maxBytes, src.secrets...)
	if errors.Is(err, fs.ErrNotExist) {
		return "", false, fmt.Errorf("%s: %w", src.path, ErrNoConsole)
	}
	if err != nil {
		return "", false, err
	}
	if !src.known && text != "" {
		return "", true, nil
	}
	return text, false, nil
}

// noteHeld enters a's machine into the list of held machines (on true)
// or takes it out.
func (m *Manager) noteHeld(a *actor, held bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if held {
		m.held[a] = HeldMachine{JobID: a.jobID, Until: a.rec.heldUntil}
		return
	}
	delete(m.held, a)
}

// Held lists the held machines, by the end of their holds.
func (m *Manager) Held() []HeldMachine {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]HeldMachine, 0, len(m.held))
	for _, h := range m.held {
		out = append(out, h)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Until.Before(out[j].Until) })
	return out
}
