package bus

import (
	"context"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// SubmitProvision publishes a provision request, pinned to host when host
// is not empty. Its Nats-Msg-Id is derived from the job id, so submitting
// the same job twice within the duplicate window stores it once.
func SubmitProvision(ctx context.Context, js jetstream.JetStream, req messages.Provision, host string) (uint64, error) {
	if err := req.Validate(); err != nil {
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

func publishRequest(ctx context.Context, js jetstream.JetStream, subject string, v any, msgID string) (uint64, error) {
	data, err := messages.Marshal(v)
	if err != nil {
		return 0, err
	}
	ack, err := js.Publish(ctx, subject, data, jetstream.WithMsgID(msgID), jetstream.WithExpectStream(messages.RequestsStream))
	if err != nil {
		return 0, fmt.Errorf("publish %s: %w", subject, err)
	}
	return ack.Sequence, nil
}

// ReadEvents calls fn for every event matching filter (see
// messages.EventFilter) from the position deliver says, in stream order.
// Without follow it returns once the events stored when it started have
// been read; with follow it then waits for new ones until ctx ends or fn
// returns an error. An undecodable event is passed with its error so that
// readers can report it and go on.
func ReadEvents(ctx context.Context, js jetstream.JetStream, filter string, deliver jetstream.DeliverPolicy, follow bool,
	fn func(streamSeq uint64, ev messages.Event, err error) error) error {
	cons, err := js.OrderedConsumer(ctx, messages.EventsStream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{filter},
		DeliverPolicy:  deliver,
	})
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
	for {
		msg, err := it.Next()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("read events: %w", err)
		}
		meta, err := msg.Metadata()
		if err != nil {
			return fmt.Errorf("read events: %w", err)
		}
		ev, derr := messages.DecodeEvent(msg.Data())
		if err := fn(meta.Sequence.Stream, ev, derr); err != nil {
			return err
		}
		if !follow && meta.NumPending == 0 {
			return nil
		}
	}
}
