package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

// deadlineRetry spaces out the teardowns of a machine that could not be
// removed.
const deadlineRetry = 30 * time.Second

// teardownOutcome is how a teardown ended.
type teardownOutcome int

const (
	// tornDown: the machine is gone and the job's end published.
	tornDown teardownOutcome = iota
	// retryTeardown: try again later (a request's redelivery, or the next
	// tick 30 s on for a teardown the machine began by itself).
	retryTeardown
	// abandoned: the teardown's final delivery failed and said so; the
	// machine may remain for a reconciliation to remove.
	abandoned
	// heldNow: the job's end is published and its machine held, shut
	// off; heldUnrecorded: held, but recording the hold failed, which the
	// next tick tries again.
	heldNow
	heldUnrecorded
)

// startTeardown removes the machine and publishes its end: in the slot of
// the request that asked for it, or in release's for an end the machine
// decided itself. A machine the end holds (holdFor) is kept instead.
func (a *actor) startTeardown(root context.Context, e *ending, release func()) {
	e.back = PhaseReady
	switch {
	case e.release:
		e.back = PhaseHeld
	case a.rec.phase == PhaseRemoving:
		e.back = PhaseRemoving
	}
	if a.rec.phase != PhaseTearingDown {
		a.to(PhaseTearingDown)
	}
	e.hold = a.holdFor(e)
	a.end = e
	em, holder := a.rec.em, a.rec.claim.lostTo
	var con consoleSource
	if e.cause != nil {
		con = a.consoleSource()
	}
	a.launch(root, "tear down", func(ctx context.Context) func() {
		if release != nil {
			defer release()
		}
		outcome, until, err := a.m.remove(ctx, a.key, &em, *e, holder, con)
		return func() {
			a.rec.em = em
			a.endTeardown(e, outcome, until, err)
		}
	})
}

// endTeardown applies a teardown's outcome.
func (a *actor) endTeardown(e *ending, outcome teardownOutcome, until time.Time, err error) {
	if (outcome == tornDown || outcome == heldNow || outcome == heldUnrecorded) && e.reason != messages.ReasonClaimLost {
		a.releaseClaim() // before the teardown is answered, and acked
	}
	enders := a.enders
	a.enders, a.end = nil, nil
	defer func() {
		for _, c := range enders {
			c <- answer{err: err}
		}
	}()
	switch outcome {
	case tornDown:
		a.rec.finished = true
		a.to(PhaseGone)
	case heldNow, heldUnrecorded:
		a.rec.finished = true
		a.enterHeld(until, outcome == heldNow)
		if outcome == heldUnrecorded && a.m.cfg.Report != nil {
			a.m.cfg.Report("hold", a.jobID, err)
		}
		err = nil // the job ended; the hold is recorded at the next tick
	case abandoned:
		a.to(PhaseGone)
	default:
		a.rec.retryAt = a.m.cfg.Now().Add(deadlineRetry)
		if a.jobID == "" {
			a.rec.retiring = e.reason // a warm machine's retirement, tried again
		}
		a.to(e.back)
		if e.self && err != nil && a.m.cfg.Report != nil {
			a.m.cfg.Report(e.reason, a.jobID, err)
		}
	}
}

// remove removes the machine of em's job and publishes tearing_down and its
// end: torn_down, or failed when the ending has a cause. A machine whose
// job another host took (claim_lost) is removed without either: the job
// goes on there, so this host publishes dropped instead. An ending with a
// hold publishes the end with held_until and keeps the machine, shut off
// (outcome heldNow, until the hold's end); a held machine's own end
// (release) removes it and publishes released. con is the console a
// failed end carries.
func (m *Manager) remove(ctx context.Context, key string, em *emitter, e ending, holder string, con consoleSource) (teardownOutcome, time.Time, error) {
	switch {
	case e.release:
		start := m.cfg.Now()
		if _, err := m.cfg.Machines.Remove(ctx, key); err != nil {
			return retryTeardown, time.Time{}, fmt.Errorf("remove held machine %s: %w", messages.DomainName(key), err)
		}
		if err := em.emit(ctx, messages.StateReleased, e.d, em.since(start), e.reason, nil); err != nil {
			return retryTeardown, time.Time{}, err
		}
		return tornDown, time.Time{}, nil
	case e.reason == messages.ReasonClaimLost:
		if err := m.removeOwn(ctx, key, false); err != nil {
			return retryTeardown, time.Time{}, fmt.Errorf("remove machine of job %s: %w", em.jobID, err)
		}
		if err := em.emit(ctx, messages.StateDropped, e.d, 0, messages.ReasonClaimLost, nil,
			func(ev *messages.Event) { ev.Holder = holder }); err != nil {
			return retryTeardown, time.Time{}, err
		}
		return tornDown, time.Time{}, nil
	}
	if err := em.emit(ctx, messages.StateTearingDown, e.d, 0, e.reason, nil); err != nil {
		return retryTeardown, time.Time{}, err
	}
	m.cfg.Faults.At(FaultMidTeardown)
	state := messages.StateTornDown
	var fill []func(*messages.Event)
	if e.cause != nil {
		state = messages.StateFailed
		// Read before the machine and its log go.
		fill = append(fill, con.fill())
	}
	if e.hold > 0 {
		until := m.cfg.Now().Add(e.hold).UTC().Truncate(time.Second)
		fill = append(fill, func(ev *messages.Event) { ev.HeldUntil = until })
		if err := em.emit(ctx, state, e.d, 0, e.reason, e.cause, fill...); err != nil {
			return retryTeardown, time.Time{}, err
		}
		if err := m.recordHold(ctx, key, until); err != nil {
			return heldUnrecorded, until, err
		}
		return heldNow, until, nil
	}
	start := m.cfg.Now()
	if _, err := m.cfg.Machines.Remove(ctx, key); err != nil {
		err = fmt.Errorf("remove machine %s: %w", messages.DomainName(key), err)
		if !e.d.Final {
			return retryTeardown, time.Time{}, err
		}
		// Nobody will ask again: say so, and stop tracking a machine that
		// the next reconciliation will find and retry.
		if perr := em.emit(ctx, messages.StateFailed, e.d, em.since(start), e.reason,
			&messages.Error{Code: messages.CodeTeardownFailed, Message: err.Error()}); perr != nil {
			return retryTeardown, time.Time{}, perr
		}
		return abandoned, time.Time{}, &Failure{Code: messages.CodeTeardownFailed, Err: err}
	}
	m.cfg.Faults.At(FaultAfterRemove)
	if err := em.emit(ctx, state, e.d, em.since(start), e.reason, e.cause, fill...); err != nil {
		return retryTeardown, time.Time{}, err
	}
	return tornDown, time.Time{}, nil
}

// adoptRecord fills the record of a machine this process did not create.
func (a *actor) adoptRecord(mach provision.Machine) {
	a.rec.image, a.rec.domain, a.rec.deadline, a.rec.kind = mach.Image, mach.Name, mach.Deadline, mach.RunnerKind
	a.rec.holdOnFailure, a.rec.holdFor = min(mach.HoldOnFailure, a.m.cfg.MaxHold), min(mach.HoldFor, a.m.cfg.MaxHold)
	if os, err := runners.ParseOS(mach.OS, ""); err == nil {
		a.rec.runner.os = string(os)
	}
	a.rec.em.identify(a.rec)
	if !a.rec.counted {
		a.rec.counted = true
		a.m.countMachine(a, true, a.rec.image, machineSize(mach))
	}
}

// adoptHeld takes over a machine held by an earlier process.
func (a *actor) adoptHeld(mach provision.Machine, until time.Time, recorded bool) {
	a.adoptRecord(mach)
	a.rec.finished = true
	for _, c := range a.enders {
		c <- answer{}
	}
	a.enders = nil
	a.enterHeld(until, recorded)
}

// lookUpForTeardown serves a teardown request for a job this process has
// no record of: a machine of the job on the host is adopted and removed in
// the request's slot; without one, the history decides (finishedBefore),
// and a job this host does not know gets torn_down with unknown_job, once.
func (a *actor) lookUpForTeardown(e *ending) func(context.Context) func() {
	em := a.rec.em
	return func(ctx context.Context) func() {
		mach, found, err := a.m.cfg.Machines.Lookup(ctx, a.key)
		if err != nil {
			err = fmt.Errorf("look up machine of job %s: %w", a.jobID, err)
			return func() { a.settled(false, err) }
		}
		if found {
			return func() {
				a.adoptRecord(mach)
				a.startTeardown(a.m.root, e, nil)
			}
		}
		// A warm machine bound to the job has a name of its own, which
		// the job's events tell: one this process does not track yet is
		// adopted by the next reconciliation, before which the job is not
		// to be declared unknown.
		if key, err := a.m.warmMachineOf(ctx, a.jobID); err != nil || key != "" {
			if err == nil {
				err = fmt.Errorf("job %s has machine %s, which this worker does not track yet", a.jobID, messages.DomainName(key))
			}
			return func() { a.settled(false, err) }
		}
		finished, err := a.m.unknownTeardown(ctx, &em, *e)
		return func() {
			a.rec.em = em
			a.settled(finished, err)
		}
	}
}

// warmMachineOf returns the key of the warm machine bound to jobID on
// this host, as the job's newest event of this host names it, if that
// machine exists and names the job; "" otherwise.
func (m *Manager) warmMachineOf(ctx context.Context, jobID string) (string, error) {
	if m.cfg.History == nil {
		return "", nil
	}
	last, found, err := m.cfg.History.LastEvent(ctx, jobID, m.cfg.Host)
	if err != nil {
		return "", fmt.Errorf("read the events of job %s: %w", jobID, err)
	}
	if !found || last.Machine == "" || !messages.ValidWarmKey(last.Machine) {
		return "", nil
	}
	mach, found, err := m.cfg.Machines.Lookup(ctx, last.Machine)
	if err != nil {
		return "", fmt.Errorf("look up machine %s of job %s: %w", messages.DomainName(last.Machine), jobID, err)
	}
	if !found || mach.JobID != jobID {
		return "", nil
	}
	return last.Machine, nil
}

// settled ends a job's bookkeeping that found no machine.
func (a *actor) settled(finished bool, err error) {
	a.rec.finished = finished
	a.to(PhaseGone)
	for _, c := range a.enders {
		c <- answer{err: err}
	}
	a.enders = nil
	answerFinished := answer{}
	if !finished {
		answerFinished = answer{err: fmt.Errorf("job %s has no machine on host %s", a.jobID, a.m.cfg.Host)}
	}
	a.answerWaiting(answerFinished)
}

// unknownTeardown answers a teardown of a job without a machine here. A
// job that an earlier process of this host ended, or was ending, before it
// died without settling the request (the history survives, the memory does
// not) gets no second terminal event, or the end that teardown did not
// publish; any other gets torn_down with unknown_job, and counts as
// finished here, so that a provision arriving later builds nothing nobody
// would tear down. A dropped is read as its holder's newest event, also
// when the holder is this host. A job that went on on another host since
// (its newest event, or for a dropped its holder's, is that host's) is that host's to
// answer for: the teardown is acked without an event, as the orchestrator
// sends it where the job is now (2.5); a torn_down here would be a second
// end of a job another host serves.
func (m *Manager) unknownTeardown(ctx context.Context, em *emitter, e ending) (finished bool, err error) {
	var last messages.Event
	if m.cfg.History != nil {
		last, _, _ = m.cfg.History.LastEvent(ctx, em.jobID, "")
		if last.State == messages.StateDropped && last.Holder != "" {
			// A dropped tells of its holder, which may be this host:
			// the holder's newest event says where the job stands.
			last, _, _ = m.cfg.History.LastEvent(ctx, em.jobID, last.Holder)
		}
	}
	if last.Host != "" && last.Host != m.cfg.Host && last.State != messages.StateDropped {
		return false, nil
	}
	if last.Host == m.cfg.Host {
		switch {
		case last.State.Terminal():
			return true, nil
		case last.State == messages.StateTearingDown && last.Reason == e.reason && e.cause == nil:
			em.image, em.domain, em.os = last.Image, last.Domain, last.OS
			if err := em.emit(ctx, messages.StateTornDown, e.d, 0, e.reason, nil); err != nil {
				return false, err
			}
			return true, nil
		}
	}
	err = em.emit(ctx, messages.StateTornDown, e.d, 0, e.reason, &messages.Error{
		Code:    messages.CodeUnknownJob,
		Message: fmt.Sprintf("host %s has no machine for job %s", m.cfg.Host, em.jobID),
	})
	return err == nil, err
}

// adopt decides about a managed machine found on the host, by the job's
// last event: a machine whose provision was acknowledged is watched again
// (running) or torn down (stopped); any other is half-built and removed
// without events, as its request will be delivered again.
func (a *actor) adopt(mach provision.Machine) func(context.Context) func() {
	return func(ctx context.Context) func() {
		if a.jobID == "" {
			// An idle warm machine of a process gone: its readiness is
			// not known, and a new one is cheap; it is retired.
			return func() {
				a.adoptRecord(mach)
				a.retire(a.m.root, messages.ReasonReconcile)
			}
		}
		if !mach.HeldUntil.IsZero() {
			// Held by an earlier process: kept until its hold ends, or
			// released at once by a host that holds nothing now.
			until := mach.HeldUntil
			var err error
			switch {
			case !a.m.holdsOn():
				until = a.m.cfg.Now()
			case mach.Running:
				err = a.m.cfg.Holds.PowerOff(ctx, mach.Key) // it died before it could
			}
			return func() { a.adoptHeld(mach, until, err == nil) }
		}
		last, err := a.m.lastOwnEvent(ctx, a.jobID)
		if err != nil {
			// Without the history the worker cannot tell a running job
			// from a half-built one: leave the machine for the next
			// reconciliation.
			return func() { a.settled(false, err) }
		}
		if last.Host == a.m.cfg.Host && last.State.Terminal() && !last.HeldUntil.IsZero() && a.m.holdsOn() {
			// Its end was published with a hold that the earlier process
			// died before it recorded.
			return func() {
				a.rec.em.seq = last.Seq
				a.adoptHeld(mach, last.HeldUntil, false)
			}
		}
		acked := last.Host == a.m.cfg.Host && a.m.acknowledged(last.State, mach.RunnerKind)
		if !acked {
			// Looked up again, not removed by name alone: with two workers
			// on one libvirtd, the machine listed may have been replaced
			// since by another host's build of the job, of the same name.
			if err := a.m.removeOwn(ctx, mach.Key, false); err != nil {
				err = fmt.Errorf("remove half-built machine %s: %w", mach.Name, err)
				return func() { a.settled(false, err) }
			}
			return func() { a.settled(false, nil) }
		}
		return func() {
			a.adoptRecord(mach)
			a.rec.em.seq = last.Seq
			// A machine shut off after this host's tearing_down is one
			// whose removal was cut off half-way (destroyed, not yet
			// undefined): its teardown is done again with that reason, as
			// for a running one (5.2 L), not ended as stopped (M).
			if !mach.Running && last.State != messages.StateTearingDown {
				_, cause, _ := causeOf(messages.ReasonReconcile, mach.Name)
				a.startTeardown(a.m.root, &ending{reason: messages.ReasonReconcile, cause: cause,
					d: Delivery{Origin: messages.ReasonReconcile}}, nil)
				return
			}
			if last.OS != "" {
				a.rec.runner.os = last.OS
				a.rec.em.os = last.OS
			}
			a.rec.runner.pid = last.RunnerPID
			switch last.State {
			case messages.StateRunnerExited:
				a.rec.runner.exit, a.rec.runner.reported = &runnerExit{}, true
				a.rec.runner.endReason = messages.ReasonRunnerExited
			case messages.StateTearingDown:
				a.rec.runner.exit, a.rec.runner.reported = &runnerExit{}, true
				a.rec.runner.endReason = last.Reason
			}
			for _, c := range a.enders {
				c <- answer{}
			}
			a.enders = nil
			a.to(PhaseReady)
		}
	}
}

// lastOwnEvent is the job's newest event that tells how far this host got
// with it: another host's dropped says nothing of that, so this host's own
// newest event counts then.
func (m *Manager) lastOwnEvent(ctx context.Context, jobID string) (messages.Event, error) {
	if m.cfg.History == nil {
		return messages.Event{}, nil
	}
	last, found, err := m.cfg.History.LastEvent(ctx, jobID, "")
	if err != nil {
		return messages.Event{}, fmt.Errorf("read the events of job %s: %w", jobID, err)
	}
	if !found {
		return messages.Event{}, nil
	}
	if last.State == messages.StateDropped && last.Host != m.cfg.Host {
		if last, found, err = m.cfg.History.LastEvent(ctx, jobID, m.cfg.Host); err != nil {
			return messages.Event{}, fmt.Errorf("read the events of job %s: %w", jobID, err)
		} else if !found {
			return messages.Event{}, nil
		}
	}
	return last, nil
}

// Reconcile takes over the managed machines found on the host, using the
// job's last event to tell whether its provision request was acknowledged
// (the runner had started; for runner kind none, the agent had answered):
//   - acknowledged and running: watched again, so the deadline, runner exit
//     and teardown requests apply; the runner is watched again through the
//     pid its runner_started event recorded;
//   - acknowledged and stopped: torn down, ending in failed with
//     machine_stopped, since nobody else will end the job;
//   - not acknowledged: a half-built machine of a worker that stopped
//     mid-provision; removed without events, because the request will be
//     delivered again and build it anew.
//
// Domains with the managed prefix but no valid job id in their name are not
// the worker's and are left alone, as are machines another host id's
// metadata names (another worker may share this libvirtd; tests do).
//
// Volumes of jobs without a domain (a worker stopped between creating them
// and defining the domain) are removed too, and so are console logs of
// machines without one (sweepConsoles). A machine that cannot be
// removed is left for the next reconciliation; the errors are returned
// together once every machine was looked at.
func (m *Manager) Reconcile(ctx context.Context) error {
	machines, err := m.cfg.Machines.List(ctx)
	if err != nil {
		m.mu.Lock()
		m.unlisted = true
		m.mu.Unlock()
		return fmt.Errorf("list managed machines: %w", err)
	}
	var errs []error
	left := 0
	defer func() {
		m.mu.Lock()
		m.unlisted, m.unadopted = false, left
		m.roomedLocked()
		m.mu.Unlock()
	}()
	for _, mach := range machines {
		if !messages.ValidMachineKey(mach.Key) || mach.Name != messages.DomainName(mach.Key) {
			continue
		}
		if !mach.MetadataUnreadable && mach.Host != "" && mach.Host != m.cfg.Host {
			continue
		}
		if mach.JobID != "" && !messages.ValidJobID(mach.JobID) {
			continue
		}
		// A finished job's machine is adopted too: its last event is
		// terminal, so it is removed as half-built.
		a, extra := m.spawnAdopter(mach)
		if a == nil {
			continue // served already
		}
		ans, err := m.send(ctx, a, &adoptCmd{mach: mach, extra: extra})
		if err == nil {
			err = ans.err
		}
		if err != nil {
			// Left where it is, untracked: it still counts.
			left++
			errs = append(errs, err)
		}
	}
	orphans, err := m.cfg.Machines.ListOrphanVolumes(ctx)
	if err != nil {
		errs = append(errs, fmt.Errorf("list orphan volumes: %w", err))
	}
	// A volume is an orphan only if it still has no domain one
	// reconciliation later: a clone in progress, of this worker or of
	// another one on the same libvirtd, defines its domain within seconds.
	seen := make(map[string]bool, len(orphans))
	for _, path := range orphans {
		seen[path] = true
		jobID, ok := provision.VolumeKey(path)
		if !ok || !m.orphans[path] {
			continue
		}
		if active, _ := m.known(jobID); active {
			continue // its provision is creating it right now
		}
		if _, err := m.cfg.Machines.Remove(ctx, jobID); err != nil {
			errs = append(errs, fmt.Errorf("remove orphan volume %s: %w", path, err))
		}
	}
	m.orphans = seen
	if err := m.sweepConsoles(ctx, machines); err != nil {
		errs = append(errs, fmt.Errorf("sweep console logs: %w", err))
	}
	return errors.Join(errs...)
}

// acknowledged reports whether a job whose newest event is in state s had
// its provision request acknowledged.
func (m *Manager) acknowledged(s messages.State, kind string) bool {
	ack := messages.StateRunnerStarted
	switch {
	case m.cfg.Agent == nil:
		ack = messages.StateRunning
	case kind == string(messages.RunnerNone):
		ack = messages.StateAgentReady
	}
	if s == "" || s.Terminal() || s == messages.StateDropped {
		return false
	}
	return slices.Index(messages.States, s) >= slices.Index(messages.States, ack)
}

// causeOf is the end of a teardown that the worker began by itself for
// reason: the terminal state, and the error it carries. ok is false for
// teardowns that a request began, which the request's redelivery ends.
func causeOf(reason, domain string) (state messages.State, cause *messages.Error, ok bool) {
	switch reason {
	case messages.ReasonRunnerExited:
		return messages.StateTornDown, nil, true
	case messages.ReasonDeadline:
		return messages.StateFailed, &messages.Error{Code: messages.CodeDeadlineExceeded,
			Message: "the machine reached its maximum lifetime"}, true
	case messages.ReasonStopped:
		return messages.StateFailed, &messages.Error{Code: messages.CodeMachineStopped,
			Message: fmt.Sprintf("machine %s stopped by itself", domain)}, true
	case messages.ReasonReconcile:
		return messages.StateFailed, &messages.Error{Code: messages.CodeMachineStopped,
			Message: fmt.Sprintf("machine %s was found stopped", domain)}, true
	case messages.ReasonRunnerLost:
		return messages.StateFailed, &messages.Error{Code: messages.CodeAgentFailed,
			Message: fmt.Sprintf("the guest agent of %s lost track of the runner", domain)}, true
	}
	return "", nil, false
}

// FinishTeardowns ends the jobs whose machine a teardown the worker began
// by itself (runner exit, deadline, stopped machine, lost runner,
// reconciliation) had removed when the previous process of this host died,
// before it published the end. Nothing else would end them: no request is
// left to be delivered again, and no domain for reconciliation to find.
// Such a job's newest event is this host's tearing_down; it gets the
// terminal event that teardown would have published (same Nats-Msg-Id).
// So does a ready job whose newest event is this host's runner_started
// or runner_exited and whose machine is gone: it went while no worker
// ran (libvirtd or the host restarted), and nothing else would end it.
// It gets the teardown a reconciliation that found its machine stopped
// would have begun (5.2 M; after runner_exited, 5.2 L), both events.
// It reads the host's events of the last Remember (24 h); run it once at
// start, after the first reconciliation, which adopts the machines whose
// removal had not happened yet.
func (m *Manager) FinishTeardowns(ctx context.Context) error {
	if m.cfg.Journal == nil || m.cfg.History == nil {
		return nil
	}
	recent, err := m.cfg.Journal.Recent(ctx, m.cfg.Host, m.cfg.Now().Add(-m.cfg.Remember))
	if err != nil {
		return err
	}
	newest := map[string]messages.Event{}
	for _, ev := range recent {
		newest[ev.JobID] = ev
	}
	var errs []error
	for id, ev := range newest {
		if !messages.ValidJobID(id) {
			continue
		}
		reason, vanished := ev.Reason, false
		switch ev.State {
		case messages.StateTearingDown:
		case messages.StateRunnerStarted:
			// Ready, and its machine is gone (reconciliation adopted those
			// that exist): libvirtd or the host restarted while no worker
			// ran. Ended as a stopped machine found at start (5.2 M).
			reason, vanished = messages.ReasonReconcile, true
		case messages.StateRunnerExited:
			// Its runner exited and the machine went before its teardown
			// began (5.2 L).
			reason, vanished = messages.ReasonRunnerExited, true
		default:
			continue
		}
		state, cause, ok := causeOf(reason, ev.Domain)
		if !ok {
			continue
		}
		if active, finished := m.known(id); active || finished {
			continue
		}
		ans, err := m.call(ctx, id, spawnUnlessFinished, &finishCmd{last: ev, state: state, cause: cause, reason: reason, vanished: vanished})
		if err == nil {
			err = ans.err
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// finishTeardown publishes the end of one such job, unless its machine
// exists after all (reconciliation's) or something followed its
// tearing_down, on any host.
func (m *Manager) finishTeardown(ctx context.Context, em *emitter, c *finishCmd) (finished bool, err error) {
	key := em.jobID
	if c.last.Machine != "" {
		key = c.last.Machine // a warm machine's name is its own
	}
	if _, found, err := m.cfg.Machines.Lookup(ctx, key); err != nil {
		return false, fmt.Errorf("look up machine of job %s: %w", em.jobID, err)
	} else if found {
		return false, nil
	}
	last, found, err := m.cfg.History.LastEvent(ctx, em.jobID, "")
	if err != nil {
		return false, fmt.Errorf("read the events of job %s: %w", em.jobID, err)
	}
	if !found || last.Host != m.cfg.Host || last.State != c.last.State || last.Reason != c.last.Reason || last.Seq != c.last.Seq {
		return false, nil
	}
	em.seq = last.Seq
	d := Delivery{Origin: c.reason}
	if c.vanished {
		if err := em.emit(ctx, messages.StateTearingDown, d, 0, c.reason, nil); err != nil {
			return false, err
		}
	}
	if err := em.emit(ctx, c.state, d, 0, c.reason, c.cause); err != nil {
		return false, err
	}
	return true, nil
}

// removingRetry spaces out the attempts to remove a machine a rollback
// could not remove, between the deliveries of its job that try at once.
const removingRetry = 5 * time.Second

// tickRemoving tries again to remove the machine a build's rollback could
// not remove, keeping the job's claim meanwhile; once it is gone the job's
// next delivery builds anew, here or elsewhere.
func (a *actor) tickRemoving(root context.Context) {
	if a.act != nil || a.m.cfg.Now().Before(a.rec.retryAt) {
		return
	}
	if a.rec.claim.rev != 0 {
		_ = a.keepClaim(root) // lost or not, the machine goes
	}
	a.removeLeftover(root)
}

// removeLeftover removes the machine of a PhaseRemoving actor. Once it is
// gone the actor stops, and the deliveries that waited for it are asked
// again, which builds the job anew; while it is not, they are handed back.
func (a *actor) removeLeftover(root context.Context) {
	key := a.key
	a.launch(root, "remove", func(ctx context.Context) func() {
		err := a.m.removeOwn(ctx, key, true)
		return func() {
			if err == nil {
				a.releaseClaim()
				a.to(PhaseGone) // the waiting deliveries are answered retry
				return
			}
			err = fmt.Errorf("remove the machine an earlier delivery of job %s built: %w", a.jobID, err)
			a.answerWaiting(answer{err: err})
			a.rec.retryAt = a.m.cfg.Now().Add(removingRetry)
			if a.rec.removeFailures++; a.rec.removeFailures%6 == 1 && a.m.cfg.Report != nil {
				a.m.cfg.Report("remove a rolled back machine", a.jobID, err)
			}
		}
	})
}

// returnToPool gives a warm machine that a job took but did not bind back
// to its pool, idle as before with its own events (em).
func (a *actor) returnToPool(em emitter) {
	a.m.unbind(a)
	a.jobID = ""
	a.rec.em = em
	a.rec.deadline, a.rec.kind = time.Time{}, ""
	a.rec.holdOnFailure, a.rec.holdFor = 0, 0
	a.rec.runner = runnerState{os: a.rec.runner.os}
	a.rec.claim = claim{}
	a.to(PhaseIdle)
}
