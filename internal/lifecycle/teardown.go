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

// Teardown removes the machine of jobID, publishing tearing_down and then
// torn_down, or failed when cause is set (the machine is removed because
// something went wrong, such as its deadline passing). A provision still in
// progress for the job is stopped and rolled back first. A job this host
// has no machine for gets a torn_down event with the unknown_job error, once;
// a job it finished recently gets nothing. Errors are transient.
func (m *Manager) Teardown(ctx context.Context, jobID, reason string, cause *messages.Error, d Delivery) error {
	if served, err := m.TeardownBuild(ctx, jobID, reason, cause, d); served {
		return err
	}
	m.mu.Lock()
	j := m.jobs[jobID]
	_, finished := m.done[jobID]
	if j != nil {
		if j.tearing {
			m.mu.Unlock()
			return nil
		}
		j.tearing = true
	}
	m.mu.Unlock()

	if j != nil {
		select {
		case <-j.built:
		case <-ctx.Done():
			m.mu.Lock()
			j.tearing = false
			m.mu.Unlock()
			return ctx.Err()
		}
		m.mu.Lock()
		current := m.jobs[jobID] == j
		m.mu.Unlock()
		if !current {
			return nil // the provision failed and reported it
		}
	} else {
		if finished {
			return nil
		}
		mach, found, err := m.cfg.Machines.Lookup(ctx, jobID)
		if err != nil {
			return fmt.Errorf("look up machine of job %s: %w", jobID, err)
		}
		if !found {
			u := &job{id: jobID}
			last := m.startSeq(ctx, u)
			if done, err := m.finishedBefore(ctx, u, last, reason, cause, d); done || err != nil {
				return err
			}
			err := m.emit(ctx, u, messages.StateTornDown, d, 0, reason, &messages.Error{
				Code:    messages.CodeUnknownJob,
				Message: fmt.Sprintf("host %s has no machine for job %s", m.cfg.Host, jobID),
			})
			if err == nil {
				// A provision of the job arriving later must not build a
				// machine nobody will tear down.
				m.untrack(jobID, true)
			}
			return err
		}
		j = adopted(mach)
		j.tearing = true
		if !m.track(j) {
			return nil
		}
		m.startSeq(ctx, j)
	}
	return m.remove(ctx, j, reason, cause, d)
}

// supersession is a teardown handed to the build it stops.
type supersession struct {
	reason string
	cause  *messages.Error
	d      Delivery
	// err is the teardown's outcome, set by the build before it closes
	// the job's built channel.
	err error
}

// TeardownBuild ends the job of a provision in flight on this host: it
// stops the build, whose operation then removes what it built and
// publishes tearing_down and the end (torn_down, or failed when cause is
// set) with d, in the slot it holds already. So a teardown of a machine
// being built needs no operation slot of its own and does not wait behind
// other builds. served is false, and nothing is done, when no build of
// the job is in flight (or one is being torn down already); the caller
// then takes a slot and calls Teardown. Otherwise TeardownBuild returns
// once the build ended, with the teardown's outcome; ctx bounds only the
// wait, not the teardown.
func (m *Manager) TeardownBuild(ctx context.Context, jobID, reason string, cause *messages.Error, d Delivery) (served bool, err error) {
	m.mu.Lock()
	j := m.jobs[jobID]
	if j == nil || j.cancel == nil || j.tearing {
		m.mu.Unlock()
		return false, nil
	}
	e := &supersession{reason: reason, cause: cause, d: d}
	j.tearing, j.endedBy = true, e
	j.cancel(ErrSuperseded)
	m.mu.Unlock()
	select {
	case <-j.built:
		return true, e.err
	case <-ctx.Done():
		return true, fmt.Errorf("wait for the build of job %s to end: %w", jobID, ctx.Err())
	}
}

// endSuperseded publishes the end of a job whose build a teardown stopped,
// once the build's machine is removed. When that fails the job stays
// tracked without a machine, and the teardown's next delivery ends it.
func (m *Manager) endSuperseded(ctx context.Context, j *job, e *supersession) error {
	err := m.emit(ctx, j, messages.StateTearingDown, e.d, 0, e.reason, nil)
	if err == nil {
		state := messages.StateTornDown
		if e.cause != nil {
			state = messages.StateFailed
		}
		err = m.emit(ctx, j, state, e.d, 0, e.reason, e.cause)
	}
	if err != nil {
		m.mu.Lock()
		j.tearing, j.endedBy = false, nil
		m.mu.Unlock()
		return err
	}
	m.untrack(j.id, true)
	return nil
}

// finishedBefore handles a teardown of a job without a machine that an
// earlier process of this host already ended, or was ending, before it died
// without settling the request (the history survives, the memory does not):
// an ended job gets no second terminal event; a teardown for the same reason
// that removed the machine but did not publish its end is finished with it.
// done is false when the job is unknown after all.
func (m *Manager) finishedBefore(ctx context.Context, u *job, last messages.Event, reason string, cause *messages.Error, d Delivery) (done bool, err error) {
	if last.Host != m.cfg.Host {
		return false, nil
	}
	switch {
	case last.State.Terminal():
	case last.State == messages.StateTearingDown && last.Reason == reason && cause == nil:
		u.image, u.domain, u.os = last.Image, last.Domain, last.OS
		if err := m.emit(ctx, u, messages.StateTornDown, d, 0, reason, nil); err != nil {
			return false, err
		}
	default:
		return false, nil
	}
	m.untrack(u.id, true)
	return true, nil
}

func (m *Manager) remove(ctx context.Context, j *job, reason string, cause *messages.Error, d Delivery) error {
	if reason == messages.ReasonClaimLost {
		return m.removeDropped(ctx, j, d)
	}
	if err := m.emit(ctx, j, messages.StateTearingDown, d, 0, reason, nil); err != nil {
		m.retryLater(j)
		return err
	}
	m.cfg.Faults.At(FaultMidTeardown)
	start := m.cfg.Now()
	if _, err := m.cfg.Machines.Remove(ctx, j.id); err != nil {
		err = fmt.Errorf("remove machine of job %s: %w", j.id, err)
		if d.Final {
			// Nobody will ask again: say so, and stop tracking a machine
			// that the next reconciliation will find and retry.
			if perr := m.emit(ctx, j, messages.StateFailed, d, m.since(start), reason,
				&messages.Error{Code: messages.CodeTeardownFailed, Message: err.Error()}); perr != nil {
				m.retryLater(j)
				return perr
			}
			m.untrack(j.id, false)
			return &Failure{Code: messages.CodeTeardownFailed, Err: err}
		}
		m.retryLater(j)
		return err
	}
	m.cfg.Faults.At(FaultAfterRemove)
	state := messages.StateTornDown
	if cause != nil {
		state = messages.StateFailed
	}
	if err := m.emit(ctx, j, state, d, m.since(start), reason, cause); err != nil {
		m.retryLater(j)
		return err
	}
	m.release(ctx, j)
	m.untrack(j.id, true)
	return nil
}

// removeDropped removes the running machine of a job that another host
// took over (KeepClaims): the job goes on there, so this host publishes
// dropped instead of tearing_down and torn_down.
func (m *Manager) removeDropped(ctx context.Context, j *job, d Delivery) error {
	if err := m.removeOwn(ctx, j.id, false); err != nil {
		m.retryLater(j)
		return fmt.Errorf("remove machine of job %s: %w", j.id, err)
	}
	j.claim.mu.Lock()
	holder := j.claim.lostTo
	j.claim.mu.Unlock()
	if err := m.drop(ctx, j, d, &Dropped{Holder: holder, Reason: messages.ReasonClaimLost}); err != nil {
		m.retryLater(j)
		return err
	}
	m.untrack(j.id, true)
	return nil
}

// deadlineRetry spaces out deadline teardowns of a machine that could not
// be removed.
const deadlineRetry = 30 * time.Second

// retryLater lets a failed teardown be tried again, by a request at once or
// by the deadline check after deadlineRetry.
func (m *Manager) retryLater(j *job) {
	m.mu.Lock()
	j.tearing = false
	j.retryAt = m.cfg.Now().Add(deadlineRetry)
	m.mu.Unlock()
}

// adopted makes a record for a machine this process did not create.
func adopted(mach provision.Machine) *job {
	built := make(chan struct{})
	close(built)
	j := &job{
		id: mach.JobID, image: mach.Image, domain: mach.Name,
		deadline: mach.Deadline, running: mach.Running, built: built,
	}
	if os, err := runners.ParseOS(mach.OS, ""); err == nil {
		j.os = string(os)
	}
	return j
}

// Reconcile takes over the managed machines found on the host, using the
// job's last event to tell whether its provision request was acknowledged
// (the runner had started; for runner kind none, the agent had answered):
//   - acknowledged and running: tracked again, so the deadline, runner exit
//     and teardown requests apply; the runner is watched again through the
//     pid its runner_started event recorded;
//   - acknowledged and stopped: torn down, ending in failed with
//     machine_stopped, since nobody else will end the job;
//   - not acknowledged: a half-built machine of a worker that stopped
//     mid-provision; removed without events, because the request will be
//     delivered again and build it anew.
//
// Domains with the managed prefix but no valid job id in their name are not
// the worker's and are left alone.
//
// Volumes of jobs without a domain (a worker stopped between creating them
// and defining the domain) are removed too. A machine that cannot be
// removed is left for the next reconciliation; the errors are returned
// together once every machine was looked at.
func (m *Manager) Reconcile(ctx context.Context) error {
	machines, err := m.cfg.Machines.List(ctx)
	if err != nil {
		return fmt.Errorf("list managed machines: %w", err)
	}
	var errs []error
	for _, mach := range machines {
		if err := m.reconcile(ctx, mach); err != nil {
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
		jobID, ok := provision.VolumeJobID(path)
		if !ok || !messages.ValidJobID(jobID) || !m.orphans[path] {
			continue
		}
		m.mu.Lock()
		_, known := m.jobs[jobID]
		m.mu.Unlock()
		if known {
			continue // its provision is creating it right now
		}
		if _, err := m.cfg.Machines.Remove(ctx, jobID); err != nil {
			errs = append(errs, fmt.Errorf("remove orphan volume %s: %w", path, err))
		}
	}
	m.orphans = seen
	return errors.Join(errs...)
}

func (m *Manager) reconcile(ctx context.Context, mach provision.Machine) error {
	if !messages.ValidJobID(mach.JobID) || mach.Name != messages.DomainName(mach.JobID) {
		return nil
	}
	// Another worker with its own host id may share this libvirtd (tests
	// do); its machines are its own.
	if !mach.MetadataUnreadable && mach.Host != "" && mach.Host != m.cfg.Host {
		return nil
	}
	m.mu.Lock()
	_, known := m.jobs[mach.JobID]
	m.mu.Unlock()
	if known {
		return nil
	}
	j := adopted(mach)
	// Without the history the worker cannot tell a running job from a
	// half-built one: leave the machine for the next reconciliation.
	last, err := m.history(ctx, j)
	if err != nil {
		return err
	}
	if last.State == messages.StateDropped && last.Host != m.cfg.Host {
		// Another host let go of a repeated delivery: that says nothing
		// of how far this host got.
		var found bool
		if last, found, err = m.cfg.History.LastEvent(ctx, j.id, m.cfg.Host); err != nil {
			return fmt.Errorf("read the events of job %s: %w", j.id, err)
		} else if !found {
			last = messages.Event{}
		}
	}
	// A job whose newest event is another host's went on there (this
	// host stalled or died before its request was acknowledged): the
	// machine here is half-built.
	acked := last.Host == m.cfg.Host && m.acknowledged(last.State, mach.RunnerKind)
	switch {
	case acked && mach.Running:
		if last.OS != "" {
			j.os = last.OS
		}
		j.pid = last.RunnerPID
		switch last.State {
		case messages.StateRunnerExited:
			j.exited, j.exitReported, j.endReason = true, true, messages.ReasonRunnerExited
		case messages.StateTearingDown:
			j.exited, j.exitReported, j.endReason = true, true, last.Reason
		}
		m.track(j)
		return nil
	case acked:
		j.tearing = true
		if !m.track(j) {
			return nil
		}
		_, cause, _ := causeOf(messages.ReasonReconcile, mach.Name)
		return m.remove(ctx, j, messages.ReasonReconcile, cause, Delivery{Origin: messages.ReasonReconcile})
	}
	if _, err := m.cfg.Machines.Remove(ctx, mach.JobID); err != nil {
		return fmt.Errorf("remove half-built machine %s: %w", mach.Name, err)
	}
	return nil
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
		if ev.State != messages.StateTearingDown || !messages.ValidJobID(id) {
			continue
		}
		state, cause, ok := causeOf(ev.Reason, ev.Domain)
		if !ok {
			continue
		}
		if err := m.finishTeardown(ctx, id, ev, state, cause); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (m *Manager) finishTeardown(ctx context.Context, id string, ev messages.Event, state messages.State, cause *messages.Error) error {
	if active, finished := m.known(id); active || finished {
		return nil
	}
	if _, found, err := m.cfg.Machines.Lookup(ctx, id); err != nil {
		return fmt.Errorf("look up machine of job %s: %w", id, err)
	} else if found {
		return nil // reconciliation's
	}
	j := &job{id: id, image: ev.Image, domain: ev.Domain, os: ev.OS}
	last, err := m.history(ctx, j)
	if err != nil {
		return err
	}
	// Only if nothing followed, on any host.
	if last.Host != m.cfg.Host || last.State != messages.StateTearingDown || last.Reason != ev.Reason {
		return nil
	}
	if !m.track(j) {
		return nil
	}
	if err := m.emit(ctx, j, state, Delivery{Origin: ev.Reason}, 0, ev.Reason, cause); err != nil {
		m.untrack(id, false)
		return err
	}
	m.untrack(id, true)
	return nil
}
