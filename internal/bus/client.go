package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

// SubmitProvision publishes a provision request, pinned to host when host
// is not empty. Its Nats-Msg-Id is derived from the job id, so submitting
// the same job twice within the duplicate window stores it once.
func SubmitProvision(ctx context.Context, js jetstream.JetStream, req messages.Provision, host string) (uint64, error) {
	if err := runners.Validate(&req); err != nil {
		return 0, err
	}
	subject := messages.ProvisionSubject()
	if host != "" {
		subject = messages.HostProvisionSubject(host)
	}
	return publishRequest(ctx, js, subject, &req, "provision:"+req.JobID)
}

// SubmitTeardown publishes a teardown request for the machine of a job on
// host.
func SubmitTeardown(ctx context.Context, js jetstream.JetStream, req messages.Teardown, host string) (uint64, error) {
	if err := req.Validate(); err != nil {
		return 0, err
	}
	if !messages.ValidHost(host) {
		return 0, fmt.Errorf("teardown needs the job's host id, got %q", host)
	}
	return publishRequest(ctx, js, messages.TeardownSubject(host), &req, "teardown:"+req.JobID)
}

// publishRequest stores a request, retrying while the servers do not
// answer in time (a cluster electing a leader, a loaded host) until ctx
// ends: msgID makes a retried publish, whose first attempt may have been
// stored, count once. Other errors (no such stream, a refused
// permission) are returned at once.
func publishRequest(ctx context.Context, js jetstream.JetStream, subject string, v any, msgID string) (uint64, error) {
	data, err := messages.Marshal(v)
	if err != nil {
		return 0, err
	}
	backoff := 100 * time.Millisecond
	for {
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ack, err := js.Publish(actx, subject, data, jetstream.WithMsgID(msgID), jetstream.WithExpectStream(messages.RequestsStream))
		cancel()
		if err == nil {
			return ack.Sequence, nil
		}
		if ctx.Err() != nil || !unanswered(err) {
			return 0, fmt.Errorf("publish %s: %w", subject, err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return 0, fmt.Errorf("publish %s: %w", subject, errors.Join(err, ctx.Err()))
		case <-t.C:
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// unanswered reports whether err says that the servers did not answer a
// publish in time, which a retry may change. No responders at all (no
// stream takes the subject) is an answer: it is returned at once.
func unanswered(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout)
}

// ReadOptions select the events ReadEvents delivers.
type ReadOptions struct {
	// Filter is a subject filter such as messages.EventFilter returns.
	Filter string
	// Since, when set, starts at the first event stored at or after it;
	// otherwise New decides.
	Since time.Time
	// New starts after the events stored now.
	New bool
	// Follow keeps waiting for new events instead of returning once the
	// events stored at the start have been read.
	Follow bool
}

// ReadEvents calls fn for every event selected by o, in stream order,
// through an ordered consumer that the server filters by subject and
// starts at the right time, so that a replay reads only what it needs. An
// undecodable event is passed with its error so that readers can report
// it and go on. It returns when fn returns an error, when ctx ends, or,
// without Follow, after the last stored event.
func ReadEvents(ctx context.Context, js jetstream.JetStream, o ReadOptions,
	fn func(streamSeq uint64, ev messages.Event, err error) error) error {
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{o.Filter}, DeliverPolicy: jetstream.DeliverAllPolicy}
	switch {
	case !o.Since.IsZero():
		cfg.DeliverPolicy, cfg.OptStartTime = jetstream.DeliverByStartTimePolicy, &o.Since
	case o.New:
		cfg.DeliverPolicy = jetstream.DeliverNewPolicy
	}
	follow := o.Follow
	cons, err := js.OrderedConsumer(ctx, messages.EventsStream, cfg)
	if err != nil {
		return fmt.Errorf("read events: %w", err)
	}
	if !follow {
		info, err := cons.Info(ctx)
		if err != nil {
			return fmt.Errorf("read events: %w", err)
		}
		if info.NumPending == 0 {
			return nil
		}
	}
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("read events: %w", err)
	}
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	defer it.Stop()
	dec := newEventDecoder()
	for {
		msg, err := it.Next()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("read events: %w", err)
		}
		seq, pending, ok := ackSequences(msg.Reply())
		if !ok {
			meta, err := msg.Metadata()
			if err != nil {
				return fmt.Errorf("read events: %w", err)
			}
			seq, pending = meta.Sequence.Stream, meta.NumPending
		}
		ev, derr := dec.decode(msg.Data())
		if err := fn(seq, ev, derr); err != nil {
			return err
		}
		if !follow && pending == 0 {
			return nil
		}
	}
}
