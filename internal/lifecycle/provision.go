package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// cleanupTimeout bounds the rollback of a failed provision and the
// publishing of its failed event, which run even when ctx has ended.
const cleanupTimeout = 2 * time.Minute

// Provision builds and boots the machine for req and starts its runner,
// publishing an event at each step, and returns once the runner runs (for
// runner kind none, once the guest agent answers; without an Agent, once
// the machine runs). A job that already has a
// machine on this host, or had one recently, is left alone and nil is
// returned: requests are idempotent by job id. A delivery that finds an
// earlier one still building returns its outcome (awaitEarlier).
//
// With Claims set, the job is claimed across hosts first; a job another
// host holds, or takes over while this one stalls, is dropped: what this
// delivery built is removed, a dropped event published and *Dropped
// returned.
//
// On failure everything created for the job is removed first. A permanent
// failure (or any failure on the final delivery) is reported with a failed
// event and returned as *Failure; other errors are transient and the
// request should be delivered again.
func (m *Manager) Provision(ctx context.Context, req messages.Provision, d Delivery) error {
	pctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	// The lifetime counts from the request, but never from the future: a
	// skewed orchestrator clock must not make a machine immortal.
	start := req.RequestedAt
	if now := m.cfg.Now(); start.After(now) {
		start = now
	}
	j := &job{
		id: req.JobID, image: req.Image, domain: messages.DomainName(req.JobID),
		deadline: start.Add(req.MaxLifetime()), cancel: cancel, built: make(chan struct{}),
	}
	if !m.track(j) {
		return m.awaitEarlier(ctx, req.JobID)
	}
	defer close(j.built)
	defer func() {
		// The build is over, however it ended: a teardown from now on
		// takes the job as it is.
		m.mu.Lock()
		j.cancel = nil
		m.mu.Unlock()
	}()

	// Claim the job across hosts before anything is built.
	if err := m.take(ctx, j, d); err != nil {
		m.untrack(j.id, false)
		m.mu.Lock()
		if j.endedBy != nil {
			// Nothing was built: the teardown's next delivery answers.
			j.endedBy.err = fmt.Errorf("job %s was not claimed: %w", j.id, err)
		}
		m.mu.Unlock()
		var dropped *Dropped
		if !errors.As(err, &dropped) {
			return err
		}
		if perr := m.drop(ctx, j, d, dropped); perr != nil {
			return errors.Join(err, perr)
		}
		return dropped
	}
	stopKeeping := m.keepWhileBuilding(pctx, j, cancel)
	err := m.build(pctx, j, req, d)
	stopKeeping()
	if err == nil {
		// The request is acknowledged next: only if the job is still
		// this host's.
		err = m.confirm(pctx, j)
	}
	if err == nil {
		// A teardown that came as the last step finished still ends the
		// job here, in this operation's slot.
		m.mu.Lock()
		superseded := j.endedBy != nil
		if !superseded {
			j.running, j.cancel = true, nil
		}
		m.mu.Unlock()
		if !superseded {
			return nil
		}
		err = ErrSuperseded
	}

	cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer ccancel()
	m.mu.Lock()
	ending := j.endedBy
	m.mu.Unlock()
	var dropped *Dropped
	if errors.As(err, &dropped) || errors.As(context.Cause(pctx), &dropped) {
		// Another host serves the job now: undo what this delivery built,
		// say so, and leave the request to the holder.
		m.untrack(j.id, false)
		if ending != nil {
			// The teardown is answered by its next delivery, which finds
			// no machine of the job here (unknown_job).
			ending.err = fmt.Errorf("job %s went to host %s while its teardown waited", j.id, dropped.Holder)
		}
		if rerr := m.removeOwn(cctx, j.id, false); rerr != nil {
			return errors.Join(dropped, rerr)
		}
		if perr := m.drop(cctx, j, d, dropped); perr != nil {
			return errors.Join(dropped, perr)
		}
		return dropped
	}
	// The job's claim goes, whatever happens next: a redelivery may be
	// served by any host at once.
	defer m.release(cctx, j)
	if rerr := m.removeOwn(cctx, j.id, true); rerr != nil {
		// The machine may still exist: let the request come again, which
		// removes the leftover before building anew.
		m.untrack(j.id, false)
		if ending != nil {
			ending.err = fmt.Errorf("roll back the build of job %s: %w", j.id, rerr)
		}
		return errors.Join(err, rerr)
	}
	if ending != nil {
		// A teardown superseded the build: end the job for it here, in
		// this operation's slot, with the teardown's delivery.
		ending.err = m.endSuperseded(cctx, j, ending)
		return ErrSuperseded
	}
	code, permanent := classify(pctx, err)
	if !permanent && !d.Final {
		m.untrack(j.id, false)
		return err
	}
	perr := m.emit(cctx, j, messages.StateFailed, d, 0, "", &messages.Error{Code: code, Message: err.Error()})
	if perr != nil {
		m.untrack(j.id, false)
		return errors.Join(err, perr)
	}
	m.untrack(j.id, true)
	return &Failure{Code: code, Err: err}
}

// awaitEarlier settles a repeated delivery of a provision whose job this
// host serves or finished. The server delivers a request again while an
// earlier delivery is still being built when the worker's progress
// heartbeats did not reach it for AckWait (a stalled connection).
// Acknowledging then would end the request before its outcome is known,
// and if that build failed transiently nothing would deliver it again. So
// it waits for the build, and returns nil only if the job then has a
// machine or is finished; otherwise a transient error, so that the request
// comes again.
func (m *Manager) awaitEarlier(ctx context.Context, jobID string) error {
	m.mu.Lock()
	other := m.jobs[jobID]
	m.mu.Unlock()
	if other != nil {
		select {
		case <-other.built:
		case <-ctx.Done():
			return fmt.Errorf("wait for the earlier delivery of job %s: %w", jobID, ctx.Err())
		}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	_, finished := m.done[jobID]
	if current := m.jobs[jobID]; !finished && (current == nil || current != other) {
		return fmt.Errorf("the earlier delivery of job %s did not build its machine", jobID)
	}
	return nil
}

// build runs the steps of a provision; it returns at the first error.
func (m *Manager) build(ctx context.Context, j *job, req messages.Provision, d Delivery) error {
	// A machine left by an earlier delivery of this request is half-built:
	// that delivery was never acknowledged, so nobody relies on it.
	if _, found, err := m.cfg.Machines.Lookup(ctx, j.id); err != nil {
		return err
	} else if found {
		if _, err := m.cfg.Machines.Remove(ctx, j.id); err != nil {
			return err
		}
	}

	if err := m.emit(ctx, j, messages.StateAccepted, d, m.since(req.RequestedAt), "", nil); err != nil {
		return err
	}
	m.cfg.Faults.At(FaultAfterAccept)
	// Before each step that another host must not repeat, and before
	// reporting a step, make sure this host still serves the job: a stall
	// (a paused process, a suspended host) may have cost it the claim.
	if err := m.confirm(ctx, j); err != nil {
		return err
	}
	if err := m.emit(ctx, j, messages.StateCloning, d, 0, "", nil); err != nil {
		return err
	}
	m.cfg.Faults.At(FaultBeforeClone)
	if err := m.confirm(ctx, j); err != nil {
		return err
	}
	start := m.cfg.Now()
	mach, err := m.cfg.Machines.Clone(ctx, provision.Spec{
		JobID: j.id, Image: req.Image, Host: m.cfg.Host, RunnerKind: string(req.Runner.Kind),
		RequestedAt: req.RequestedAt, Deadline: j.deadline,
	})
	if err != nil {
		return &stepError{code: cloneCode(err), err: err}
	}
	m.cfg.Faults.At(FaultAfterClone)
	if err := m.confirm(ctx, j); err != nil {
		return err
	}
	if err := m.emit(ctx, j, messages.StateCloned, d, m.since(start), "", nil); err != nil {
		return err
	}
	if err := m.emit(ctx, j, messages.StateBooting, d, 0, "", nil); err != nil {
		return err
	}
	if err := m.confirm(ctx, j); err != nil {
		return err
	}
	start = m.cfg.Now()
	if err := m.cfg.Machines.Start(ctx, j.id); err != nil {
		return &stepError{code: messages.CodeBootFailed, err: err}
	}
	m.cfg.Faults.At(FaultAfterStart)
	if err := m.emit(ctx, j, messages.StateRunning, d, m.since(start), "", nil); err != nil {
		return err
	}
	m.cfg.Faults.At(FaultWaitingAgent)
	if err := m.confirm(ctx, j); err != nil {
		return err
	}
	if m.cfg.Agent == nil {
		return nil
	}
	j.secrets, j.secretsKnown = secretsOf(req.Runner), true
	return m.startRunner(ctx, j, req, mach.OS, d)
}

func (m *Manager) since(t time.Time) time.Duration {
	if t.IsZero() {
		return 0
	}
	d := m.cfg.Now().Sub(t)
	if d < 0 {
		return 0
	}
	return d
}

// stepError attaches the error code of the step that failed.
type stepError struct {
	code messages.ErrorCode
	err  error
}

func (e *stepError) Error() string { return e.err.Error() }
func (e *stepError) Unwrap() error { return e.err }

func cloneCode(err error) messages.ErrorCode {
	switch {
	case errors.Is(err, provision.ErrImageNotFound):
		return messages.CodeImageNotFound
	case errors.Is(err, provision.ErrImageInvalid):
		return messages.CodeImageInvalid
	}
	return messages.CodeCloneFailed
}

// classify returns the code of err and whether retrying cannot help. An
// operation cut short (shutdown), lost connections and unpublished events
// are transient; what libvirt or the guest refused for this request is
// permanent.
func classify(ctx context.Context, err error) (messages.ErrorCode, bool) {
	var se *stepError
	code := messages.CodeInternal
	if errors.As(err, &se) {
		code = se.code
	}
	switch {
	case ctx.Err() != nil:
		return messages.CodeShutdown, false
	case provision.IsUnavailable(err):
		return code, false
	case se != nil:
		return code, true
	}
	return code, false
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
	j := &job{id: jobID, image: image}
	m.startSeq(ctx, j)
	if err := m.emit(ctx, j, messages.StateFailed, d, 0, "", &messages.Error{Code: code, Message: cause.Error()}); err != nil {
		return err
	}
	return f
}
