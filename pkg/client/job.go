package client

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Job is a handle on one job: the one Submit made, or any job by its id
// (Client.Job). Its methods read the job's history from the event stream
// each time, so a handle made after a restart of the orchestrator, or of
// the worker, knows what one made at the submit did, but the host a
// pinned job waits for before its first event (AtHost names it).
type Job struct {
	// ID is the job id.
	ID string
	// Receipt is what the request stream said about the job's provision,
	// for a handle Submit made; zero otherwise.
	Receipt Receipt
	// SealKey is the id of the worker key the runner secret was sealed
	// to (docs/protocol.md 3.13); empty when it travelled in the clear or
	// the runner has no secret.
	SealKey string

	c *Client
	// host is the host that serves the job when the caller knows it:
	// the pinned host of a submit, or AtHost.
	host string
}

// Receipt is the request stream's acknowledgement of a request.
type Receipt struct {
	// Subject is the subject the request was published on.
	Subject string
	// Sequence is its sequence in the request stream.
	Sequence uint64
	// Duplicate is set when the stream had the request already (the same
	// Nats-Msg-Id within its 2-minute duplicate window: a retried
	// submit, or a teardown sent again to the same host) and stored
	// nothing.
	Duplicate bool
}

// JobOption configures a handle from Client.Job.
type JobOption func(*Job)

// AtHost says which host serves the job, so that teardowns and control
// requests go there without reading the job's events: the host it was
// pinned to, or a host an operator names.
func AtHost(host string) JobOption { return func(j *Job) { j.host = host } }

// Job returns a handle on the job with id.
func (c *Client) Job(id string, opts ...JobOption) *Job {
	j := &Job{ID: id, c: c}
	for _, o := range opts {
		o(j)
	}
	return j
}

// Status reads the job's history as stored now and returns what it says
// (Status.Apply). A job without events has the zero Status but its JobID.
func (j *Job) Status(ctx context.Context) (Status, error) {
	st := Status{JobID: j.ID}
	if !messages.ValidJobID(j.ID) {
		return st, fmt.Errorf("%q is not a job id", j.ID)
	}
	ctx, stop := j.c.guard(ctx)
	defer stop()
	err := j.c.read(ctx, readOptions{filter: messages.EventFilter("", j.ID, "")}, func(_, _ uint64, ev messages.Event, derr error) error {
		if derr == nil {
			st.Apply(ev)
		}
		return nil
	})
	if err != nil {
		return st, j.c.fail("read the events of job "+j.ID, err)
	}
	return st, nil
}

// Follow yields the job's status after each of its events (Status.Event is
// the event), from its first event on, in order, waiting for new ones.
// It ends once the job has its outcome and every event stored by then has
// been read: the released event of a held machine when it is there
// already, not one yet to come. An undecodable event is yielded as a
// *DecodeError with the status before it, and following goes on; any
// other error ends it, the context's own error when the context ended.
// Each event is yielded once per Follow; a new Follow starts again at the
// job's first event.
func (j *Job) Follow(ctx context.Context) iter.Seq2[Status, error] {
	return func(yield func(Status, error) bool) {
		st := Status{JobID: j.ID}
		if !messages.ValidJobID(j.ID) {
			yield(st, fmt.Errorf("%q is not a job id", j.ID))
			return
		}
		ctx, stop := j.c.guard(ctx)
		defer stop()
		err := j.c.read(ctx, readOptions{filter: messages.EventFilter("", j.ID, ""), follow: true},
			func(streamSeq, pending uint64, ev messages.Event, derr error) error {
				if derr != nil {
					if !yield(st, &DecodeError{StreamSeq: streamSeq, Err: derr}) {
						return errStop
					}
					return nil
				}
				st.Apply(ev)
				if !yield(st, nil) || st.Outcome != nil && pending == 0 {
					return errStop
				}
				return nil
			})
		if err != nil && !errors.Is(err, errStop) {
			yield(st, j.c.failStream(ctx, "follow job "+j.ID, err))
		}
	}
}

// Wait returns the job's outcome once it ended, with Outcome.Err: nil for
// torn_down, a *JobError with the protocol's code for failed. It reads
// the job's history from its first event, so it returns the one outcome
// whenever it is called: before the job ended, after, and across restarts
// of the worker (whose successor adopts the job's machine and ends it
// once, docs/protocol.md 6.4) or of the NATS servers (as long as the
// connection reconnects). A job that is never served (its pinned host
// never runs, its image never carried) has no outcome: Wait returns the
// context's error when it ends, so give it a deadline.
func (j *Job) Wait(ctx context.Context) (Outcome, error) {
	for st, err := range j.Follow(ctx) {
		var de *DecodeError
		switch {
		case errors.As(err, &de):
			continue
		case err != nil:
			return Outcome{}, err
		case st.Outcome != nil:
			return *st.Outcome, st.Outcome.Err()
		}
	}
	if err := ctx.Err(); err != nil {
		return Outcome{}, err
	}
	return Outcome{}, fmt.Errorf("follow job %s: ended without an outcome", j.ID)
}

// Host returns the host that serves the job: the one AtHost or a pinned
// submit named, else the serving host of its events (Status.Host). It is
// ErrNoHost while the job has no event: a request waiting for a host that
// carries its image, or with room for it, has none yet.
func (j *Job) Host(ctx context.Context) (string, error) {
	if j.host != "" {
		return j.host, nil
	}
	st, err := j.Status(ctx)
	if err != nil {
		return "", err
	}
	if st.Host == "" {
		return "", fmt.Errorf("job %s has no events: %w", j.ID, ErrNoHost)
	}
	return st.Host, nil
}

// Teardown asks the host that serves the job (Job.Host) to remove its
// machine; reason is recorded with the request. It returns once the
// request stream stored the request; the job's end comes as its outcome
// (Wait). It is idempotent: a second teardown to the same host within two
// minutes is the same request (Receipt.Duplicate), while one to the host
// the job's events moved to since is a request of its own; a teardown of
// a job that ended is acknowledged by its host without an event. A job without events yet
// has no host to address: ErrNoHost (a pinned job's host is known: its
// teardown then ends it before it is built, docs/protocol.md 5.2 H).
func (j *Job) Teardown(ctx context.Context, reason string) (Receipt, error) {
	host, err := j.Host(ctx)
	if err != nil {
		return Receipt{}, fmt.Errorf("tear down job %s: %w", j.ID, err)
	}
	req := messages.Teardown{V: messages.SchemaVersion, JobID: j.ID, Reason: reason, RequestedAt: time.Now().UTC()}
	if err := req.Validate(); err != nil {
		return Receipt{}, fmt.Errorf("tear down job %s: %w", j.ID, err)
	}
	if !messages.ValidHost(host) {
		return Receipt{}, fmt.Errorf("tear down job %s: host id %q: must be 1-64 characters of A-Z a-z 0-9 _ -", j.ID, host)
	}
	return j.c.publishRequest(ctx, messages.TeardownSubject(host), &req, "teardown:"+host+":"+j.ID)
}
