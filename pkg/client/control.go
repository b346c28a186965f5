package client

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// controlTimeout bounds a control request whose context has no earlier
// deadline: a release waits for an operation slot and the removal
// (docs/protocol.md 2.9).
const controlTimeout = 3 * time.Minute

// Hold keeps the job's machine when its job ends, however it ends: shut
// off, its disks and console log kept, for d after the job's end (0: the
// host's --max-hold, which also caps d; docs/protocol.md 6.8). On a
// machine held already it sets the hold to end d from now. The reply
// says until when (HeldUntil, a held machine) or for how long once the job
// ends (HoldForS). An Operator's call: the request goes to the host that
// serves the job (Job.Host).
func (j *Job) Hold(ctx context.Context, d time.Duration) (messages.ControlReply, error) {
	if d < 0 || d > messages.MaxHold {
		return messages.ControlReply{}, fmt.Errorf("hold job %s for %s: must be between 0 and %s", j.ID, d, messages.MaxHold)
	}
	return j.control(ctx, messages.Control{Op: messages.ControlHold, ForS: int64(d / time.Second)})
}

// Release removes the job's held machine now, or cancels the hold of a
// machine whose job runs (the reply's Phase is "gone" for the former). It
// returns once the machine is removed. An Operator's call.
func (j *Job) Release(ctx context.Context) (messages.ControlReply, error) {
	return j.control(ctx, messages.Control{Op: messages.ControlRelease})
}

// Console returns the end of the job's machine's serial console log, at
// most maxBytes (0: messages.MaxControlConsoleBytes, which also caps it),
// the job's secrets removed; ErrConsoleWithheld when the host cannot
// remove them. An Operator's call.
func (j *Job) Console(ctx context.Context, maxBytes int) (string, error) {
	reply, err := j.control(ctx, messages.Control{Op: messages.ControlConsole, Bytes: maxBytes})
	if err != nil {
		return "", err
	}
	if reply.ConsoleWithheld {
		return "", fmt.Errorf("host %s withholds the console of job %s: %w: its worker restarted since the job began and cannot scrub the job's secrets; read the log on the host (docs/protocol.md 7.7)",
			reply.Host, j.ID, ErrConsoleWithheld)
	}
	return reply.Console, nil
}

// control sends req for the job to its host's worker and returns the
// worker's reply, a *ControlError when it refused.
func (j *Job) control(ctx context.Context, req messages.Control) (messages.ControlReply, error) {
	req.V, req.JobID, req.By = messages.SchemaVersion, j.ID, j.c.by
	what := string(req.Op) + " job " + j.ID
	if err := req.Validate(); err != nil {
		return messages.ControlReply{}, fmt.Errorf("%s: %w", what, err)
	}
	host, err := j.Host(ctx)
	if err != nil {
		return messages.ControlReply{}, fmt.Errorf("%s: %w", what, err)
	}
	if !messages.ValidHost(host) {
		return messages.ControlReply{}, fmt.Errorf("%s: host id %q: must be 1-64 characters of A-Z a-z 0-9 _ -", what, host)
	}
	data, err := messages.Marshal(req)
	if err != nil {
		return messages.ControlReply{}, err
	}
	ctx, stop := j.c.guard(ctx)
	defer stop()
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, controlTimeout)
		defer cancel()
	}
	msg, err := j.c.nc.RequestWithContext(ctx, messages.ControlSubject(host), data)
	if errors.Is(err, nats.ErrNoResponders) {
		return messages.ControlReply{}, fmt.Errorf("%s: host %s: %w (it is not running, or predates control requests)", what, host, ErrHostDown)
	}
	if err != nil {
		return messages.ControlReply{}, j.c.fail(what, err)
	}
	reply, err := messages.DecodeControlReply(msg.Data)
	if err != nil {
		return messages.ControlReply{}, fmt.Errorf("%s: the reply of host %s: %w", what, host, err)
	}
	if !reply.OK {
		return reply, &ControlError{Host: reply.Host, Message: reply.Error}
	}
	return reply, nil
}
