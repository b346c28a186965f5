package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
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
	_, err := p.publish(ctx, ev, msgID)
	return err
}

// publish stores ev with the options, retrying failed attempts with
// backoff until ctx ends; a refused condition is returned at once.
func (p *Publisher) publish(ctx context.Context, ev messages.Event, msgID string, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	data, err := messages.Marshal(&ev)
	if err != nil {
		return nil, err
	}
	subject := ev.Subject()
	opts = append(opts, jetstream.WithMsgID(msgID), jetstream.WithExpectStream(messages.EventsStream))
	backoff := 100 * time.Millisecond
	retry := time.NewTimer(0)
	defer retry.Stop()
	<-retry.C
	for {
		pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ack, err := p.js.Publish(pctx, subject, data, opts...)
		cancel()
		if err == nil {
			return ack, nil
		}
		if wrongLastSequence(err) {
			return nil, err
		}
		retry.Reset(backoff)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("publish event %s: %w", msgID, errors.Join(err, ctx.Err()))
		case <-retry.C:
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// maxRenumbers bounds how often one Append follows events that other
// hosts stored in the meantime before it gives up for now.
const maxRenumbers = 16

// Append stores ev as the next event of its job, after the job's event at
// stream sequence after (0: the job has no event yet, or the caller does
// not know its newest). The publish is conditional on that
// (Nats-Expected-Last-Subject-Sequence over the job's event subjects): when
// another event of the job was stored since, typically another host's,
// ev is renumbered to follow the job's newest event and published again,
// so a job's seq goes up by one per stored event in stream order, across
// hosts. It returns the stored event's seq and stream sequence; an event
// stored before with the same msgID (a retried publish) is returned as
// stored. Failed attempts are retried with backoff until ctx ends.
func (p *Publisher) Append(ctx context.Context, ev messages.Event, msgID string, after uint64) (seq, stored uint64, err error) {
	filter := messages.EventFilter("", ev.Token(), "")
	for range maxRenumbers {
		ack, err := p.publish(ctx, ev, msgID, jetstream.WithExpectLastSequenceForSubject(after, filter))
		switch {
		case err == nil && !ack.Duplicate:
			return ev.Seq, ack.Sequence, nil
		case err == nil:
			// Stored before by a publish whose ack was lost, or by
			// another host with the same Nats-Msg-Id: the server looks
			// for duplicates before it checks the condition.
			return p.storedSeq(ctx, ev, ack.Sequence)
		case !wrongLastSequence(err):
			return 0, 0, err
		}
		newest, at, id, found, err := p.newest(ctx, filter)
		if err != nil {
			return 0, 0, fmt.Errorf("publish event %s: %w", msgID, err)
		}
		if found && id == msgID {
			if newest.Host != ev.Host && !fleetWide(ev) {
				return 0, 0, fmt.Errorf("%s event of job %s: %w (%s's, stream sequence %d)", ev.State, ev.JobID, ErrOthersEvent, newest.Host, at)
			}
			return newest.Seq, at, nil // stored by an earlier attempt
		}
		if found && !mayFollow(ev, newest) {
			return 0, 0, fmt.Errorf("%s event of job %s: %w (%s's %s, stream sequence %d)", ev.State, ev.JobID, ErrJobMovedOn, newest.Host, newest.State, at)
		}
		ev.Seq, after = newest.Seq+1, at
	}
	return 0, 0, fmt.Errorf("publish event %s: other events of job %s kept coming first", msgID, ev.JobID)
}

// ErrJobMovedOn means that a step of a build was not published because
// the job went on on another host since this host's last event: that
// host's event, not a dropped one, is the job's newest (this host stalled
// past its claim, 5.2 R), or the job ended (for accepted).
var ErrJobMovedOn = errors.New("the job went on on another host")

// mayFollow reports whether ev may be numbered after newest, the job's
// newest event, stored since the event ev's host saw last. Another
// host's dropped, and anything of ev's own host, may be followed by any
// event; a build's steps after accepted continue their host's own chain
// and follow nothing else (a host that lost the job publishes nothing
// more of it but dropped, 5.2 R); accepted, a new attempt, follows
// anything but the job's end.
func mayFollow(ev, newest messages.Event) bool {
	if newest.Host == ev.Host || newest.State == messages.StateDropped {
		return true
	}
	switch ev.State {
	case messages.StateAccepted:
		return !newest.State.Terminal() && newest.State != messages.StateReleased
	case messages.StateCloning, messages.StateCloned, messages.StateBooting, messages.StateRunning,
		messages.StateAgentReady, messages.StateRunnerStarted:
		return false
	}
	return true
}

// wrongLastSequence reports whether err is the server's refusal of a
// conditional publish: code 10071, or 10164 on replicated streams.
func wrongLastSequence(err error) bool {
	var aerr *jetstream.APIError
	return errors.As(err, &aerr) &&
		(aerr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
			aerr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// ErrOthersEvent means that the event stream holds another host's event
// under the Nats-Msg-Id of an event being appended, so it was not
// stored: two hosts served the same step of a job with the same delivery
// count (one of them a repeated request).
var ErrOthersEvent = errors.New("the event stream holds another host's event under this Nats-Msg-Id")

// fleetWide reports whether ev is an event that any host may publish for
// the fleet under the same Nats-Msg-Id, so that it is stored once: the
// failed event of a request that ran out of deliveries (6.2), which one
// host publishes and another may find stored.
func fleetWide(ev messages.Event) bool {
	return ev.State == messages.StateFailed && ev.Error != nil && ev.Error.Code == messages.CodeMaxDeliveries
}

// storedSeq returns the seq of the event stored at stream sequence at,
// which the server named as ev's duplicate; ErrOthersEvent when another
// host stored it.
func (p *Publisher) storedSeq(ctx context.Context, ev messages.Event, at uint64) (uint64, uint64, error) {
	s, err := p.js.Stream(ctx, messages.EventsStream)
	if err != nil {
		return 0, 0, fmt.Errorf("event stream: %w", err)
	}
	raw, err := s.GetMsg(ctx, at)
	if err != nil {
		return 0, 0, fmt.Errorf("event %d of job %s: %w", at, ev.JobID, err)
	}
	old, err := messages.DecodeEvent(raw.Data)
	if err != nil {
		return 0, 0, fmt.Errorf("event %d of job %s: %w", at, ev.JobID, err)
	}
	if old.Host != ev.Host && !fleetWide(ev) {
		return 0, 0, fmt.Errorf("%s event of job %s: %w (%s's, stream sequence %d)", ev.State, ev.JobID, ErrOthersEvent, old.Host, at)
	}
	return old.Seq, at, nil
}

// newest returns the newest event on filter with its stream sequence and
// Nats-Msg-Id.
func (p *Publisher) newest(ctx context.Context, filter string) (ev messages.Event, at uint64, msgID string, found bool, err error) {
	s, err := p.js.Stream(ctx, messages.EventsStream)
	if err != nil {
		return ev, 0, "", false, fmt.Errorf("event stream: %w", err)
	}
	raw, err := s.GetLastMsgForSubject(ctx, filter)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return ev, 0, "", false, nil
	}
	if err != nil {
		return ev, 0, "", false, fmt.Errorf("last event on %s: %w", filter, err)
	}
	if ev, err = messages.DecodeEvent(raw.Data); err != nil {
		return ev, 0, "", false, fmt.Errorf("last event on %s: %w", filter, err)
	}
	return ev, raw.Sequence, raw.Header.Get(jetstream.MsgIDHeader), true, nil
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
// host's recent history with it (lifecycle.Journal), through the replay
// of pkg/client.
func (p *Publisher) Recent(ctx context.Context, host string, since time.Time) ([]messages.Event, error) {
	var out []messages.Event
	var derr *client.DecodeError
	for ev, err := range client.New(p.js).Events(ctx, client.Query{Host: host, Since: since}) {
		switch {
		case errors.As(err, &derr):
		case err != nil:
			return nil, fmt.Errorf("recent events of host %s: %w", host, err)
		default:
			out = append(out, ev)
		}
	}
	return out, nil
}
