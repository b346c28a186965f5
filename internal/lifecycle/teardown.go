package lifecycle

import (
	"context"
	"fmt"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// Teardown removes the machine of jobID, publishing tearing_down and then
// torn_down, or failed when cause is set (the machine is removed because
// something went wrong, such as its deadline passing). A provision still in
// progress for the job is stopped and rolled back first. A job this host
// has no machine for gets a torn_down event with the unknown_job error, once;
// a job it finished recently gets nothing. Errors are transient.
func (m *Manager) Teardown(ctx context.Context, jobID, reason string, cause *messages.Error, d Delivery) error {
	m.mu.Lock()
	j := m.jobs[jobID]
	_, finished := m.done[jobID]
	if j != nil {
		if j.tearing {
			m.mu.Unlock()
			return nil
		}
		j.tearing = true
		if j.cancel != nil {
			j.cancel(ErrSuperseded)
		}
	}
	m.mu.Unlock()

	if j != nil {
		select {
		case <-j.built:
		case <-ctx.Done():
			m.setTearing(j, false)
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
			m.startSeq(ctx, u)
			return m.emit(ctx, u, messages.StateTornDown, d, 0, reason, &messages.Error{
				Code:    messages.CodeUnknownJob,
				Message: fmt.Sprintf("host %s has no machine for job %s", m.cfg.Host, jobID),
			})
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

func (m *Manager) setTearing(j *job, v bool) {
	m.mu.Lock()
	j.tearing = v
	m.mu.Unlock()
}

func (m *Manager) remove(ctx context.Context, j *job, reason string, cause *messages.Error, d Delivery) error {
	if err := m.emit(ctx, j, messages.StateTearingDown, d, 0, reason, nil); err != nil {
		m.setTearing(j, false)
		return err
	}
	start := m.cfg.Now()
	if _, err := m.cfg.Machines.Remove(ctx, j.id); err != nil {
		m.setTearing(j, false)
		return fmt.Errorf("remove machine of job %s: %w", j.id, err)
	}
	state := messages.StateTornDown
	if cause != nil {
		state = messages.StateFailed
	}
	if err := m.emit(ctx, j, state, d, m.since(start), reason, cause); err != nil {
		m.setTearing(j, false)
		return err
	}
	m.untrack(j.id, true)
	return nil
}

// adopted makes a record for a machine this process did not create.
func adopted(mach provision.Machine) *job {
	built := make(chan struct{})
	close(built)
	return &job{
		id: mach.JobID, image: mach.Image, domain: mach.Name,
		deadline: mach.Deadline, running: mach.Running, built: built,
	}
}

// Reconcile takes over the managed machines found on the host: running
// ones are tracked again (deadline and teardown requests apply to them),
// the others are half-built or stopped leftovers and are removed.
func (m *Manager) Reconcile(ctx context.Context) error {
	machines, err := m.cfg.Machines.List(ctx)
	if err != nil {
		return fmt.Errorf("list managed machines: %w", err)
	}
	for _, mach := range machines {
		if mach.Running && mach.JobID != "" {
			j := adopted(mach)
			if m.track(j) {
				m.startSeq(ctx, j)
			}
			continue
		}
		if err := m.Teardown(ctx, mach.JobID, "reconcile", nil, Delivery{Attempt: 1}); err != nil {
			return err
		}
	}
	return nil
}
