package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Publisher publishes lifecycle events to the event stream.
type Publisher struct {
	js jetstream.JetStream
}

// NewPublisher returns a Publisher over js.
func NewPublisher(js jetstream.JetStream) *Publisher { return &Publisher{js: js} }

// Publish stores ev in the event stream and returns once the server has
// acknowledged it. msgID makes retried publishes of the same event a no-op
// within the stream's duplicate window. Failed attempts are retried with
// backoff until ctx ends.
func (p *Publisher) Publish(ctx context.Context, ev messages.Event, msgID string) error {
	data, err := messages.Marshal(&ev)
	if err != nil {
		return err
	}
	subject := messages.EventSubject(ev.Host, ev.JobID, ev.State)
	backoff := 100 * time.Millisecond
	retry := time.NewTimer(0)
	defer retry.Stop()
	<-retry.C
	for {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err = p.js.Publish(pctx, subject, data, jetstream.WithMsgID(msgID), jetstream.WithExpectStream(messages.EventsStream))
		cancel()
		if err == nil {
			return nil
		}
		retry.Reset(backoff)
		select {
		case <-ctx.Done():
			return fmt.Errorf("publish event %s: %w", msgID, errors.Join(err, ctx.Err()))
		case <-retry.C:
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// LastEvent returns the newest event of jobID published by host, or by
// any host when host is empty; found is false when there is none.
func (p *Publisher) LastEvent(ctx context.Context, jobID, host string) (messages.Event, bool, error) {
	s, err := p.js.Stream(ctx, messages.EventsStream)
	if err != nil {
		return messages.Event{}, false, fmt.Errorf("event stream: %w", err)
	}
	raw, err := s.GetLastMsgForSubject(ctx, messages.EventFilter(host, jobID, ""))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return messages.Event{}, false, nil
	}
	if err != nil {
		return messages.Event{}, false, fmt.Errorf("last event of job %s: %w", jobID, err)
	}
	ev, err := messages.DecodeEvent(raw.Data)
	if err != nil {
		return messages.Event{}, false, fmt.Errorf("last event of job %s: %w", jobID, err)
	}
	return ev, true, nil
}

// Recent returns the events host published since the given time, in
// stream order, skipping undecodable ones. A restarted worker reads its
// host's recent history with it (lifecycle.Journal).
func (p *Publisher) Recent(ctx context.Context, host string, since time.Time) ([]messages.Event, error) {
	var out []messages.Event
	err := ReadEvents(ctx, p.js, ReadOptions{Filter: messages.EventFilter(host, "", ""), Since: since},
		func(_ uint64, ev messages.Event, err error) error {
			if err == nil {
				out = append(out, ev)
			}
			return nil
		})
	if err != nil {
		return nil, fmt.Errorf("recent events of host %s: %w", host, err)
	}
	return out, nil
}
