package lifecycle

import (
	"context"
	"fmt"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// emitter publishes the events of one job and numbers them. It is a value
// that belongs to the job's actor and is handed to the activity that
// publishes while it runs, which hands it back with its outcome: so events
// of one job are published one at a time, each after the previous one was
// stored.
type emitter struct {
	cfg   *Config
	jobID string
	// machine is a warm machine's key: the events of its preparation and
	// retirement are the machine's (no job id), and those of the job that
	// binds it say warm.
	machine string
	// The job's identity as its events carry it.
	image, domain, os string
	// seq and pos are the job's newest event as this host knows it: its
	// number and its stream position (0: unknown), the condition of the
	// next Append.
	seq, pos uint64
}

// identify copies the job's identity from the record.
func (e *emitter) identify(r record) {
	e.image, e.domain, e.os = r.image, r.domain, r.runner.os
}

// emit publishes the job's next event, numbered after the job's newest
// event on the stream, whichever host published it. fill sets the fields
// only some states carry.
func (e *emitter) emit(ctx context.Context, state messages.State, d Delivery, phase time.Duration, reason string, er *messages.Error, fill ...func(*messages.Event)) error {
	ev := messages.Event{
		V: messages.SchemaVersion, JobID: e.jobID, Host: e.cfg.Host, Image: e.image, Domain: e.domain,
		State: state, Time: e.cfg.Now().UTC(), Seq: e.seq + 1, Attempt: d.Attempt,
		PhaseMS: phase.Milliseconds(), Reason: reason, Error: er, OS: e.os,
		Machine: e.machine, Warm: e.machine != "" && e.jobID != "",
	}
	for _, f := range fill {
		f(&ev)
	}
	msgID := d.msgID(ev.Token(), state)
	switch {
	case er != nil && er.Code == messages.CodeUnknownJob:
		msgID += ":unknown"
	case state == messages.StateDropped:
		// Several hosts may drop deliveries of one job, of one request
		// or of repeated ones.
		msgID += fmt.Sprintf(":%s:%d", e.cfg.Host, d.Request)
	}
	seq, pos, err := e.cfg.Events.Append(ctx, ev, msgID, e.pos)
	if err != nil {
		return fmt.Errorf("publish %s event of %s: %w", state, ev.Token(), err)
	}
	e.seq, e.pos = seq, pos
	return nil
}

// since returns the time from t until now, 0 for the zero time or a time
// in the future.
func (e *emitter) since(t time.Time) time.Duration {
	if t.IsZero() {
		return 0
	}
	return max(0, e.cfg.Now().Sub(t))
}
