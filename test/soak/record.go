package soak

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/test/soak/check"
)

// follow delivers every event of the event stream, from the first, to fn
// until ctx ends, through an ordered consumer, which makes itself again
// after a node of the cluster went away.
func follow(ctx context.Context, js jetstream.JetStream, fn func(check.Event)) error {
	var cons jetstream.Consumer
	var err error
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		cons, err = js.OrderedConsumer(ctx, messages.EventsStream, jetstream.OrderedConsumerConfig{
			FilterSubjects: []string{messages.EventFilter("", "", "")}, DeliverPolicy: jetstream.DeliverAllPolicy,
		})
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("follow events: %w", err)
	}
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	for {
		msg, err := it.Next()
		if errors.Is(err, jetstream.ErrMsgIteratorClosed) || ctx.Err() != nil {
			return nil
		}
		if err != nil {
			continue // the ordered consumer resets itself
		}
		fn(toEvent(msg))
	}
}

func toEvent(msg jetstream.Msg) check.Event {
	e := check.Event{Subject: msg.Subject(), MsgID: msg.Headers().Get(jetstream.MsgIDHeader)}
	if md, err := msg.Metadata(); err == nil {
		e.Stream, e.Stored = md.Sequence.Stream, md.Timestamp
	}
	ev, err := messages.DecodeEvent(msg.Data())
	if err != nil {
		e.Err = err.Error()
	} else {
		e.Event = ev
	}
	return e
}

// readAllEvents reads the whole event stream as it is stored now.
func readAllEvents(ctx context.Context, js jetstream.JetStream) ([]check.Event, error) {
	s, err := js.Stream(ctx, messages.EventsStream)
	if err != nil {
		return nil, fmt.Errorf("read the events: %w", err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("read the events: %w", err)
	}
	last := info.State.LastSeq
	var out []check.Event
	if info.State.Msgs == 0 {
		return nil, nil
	}
	cons, err := js.OrderedConsumer(ctx, messages.EventsStream, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverAllPolicy})
	if err != nil {
		return nil, fmt.Errorf("read the events: %w", err)
	}
	for {
		batch, err := cons.Fetch(500, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			return nil, fmt.Errorf("read the events: %w", err)
		}
		n := 0
		for msg := range batch.Messages() {
			n++
			e := toEvent(msg)
			out = append(out, e)
			if e.Stream >= last {
				return out, nil
			}
		}
		if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) {
			return nil, fmt.Errorf("read the events: %w", err)
		}
		if n == 0 {
			return nil, fmt.Errorf("read the events: stopped at %d of %d", len(out), info.State.Msgs)
		}
	}
}

// leftRequests reads the messages left in the request stream; jobOf
// names the job of a stream sequence the orchestrator published.
func leftRequests(ctx context.Context, js jetstream.JetStream) ([]check.LeftRequest, error) {
	s, err := js.Stream(ctx, messages.RequestsStream)
	if err != nil {
		return nil, fmt.Errorf("read the requests: %w", err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("read the requests: %w", err)
	}
	var out []check.LeftRequest
	if info.State.Msgs == 0 {
		return nil, nil
	}
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read request %d: %w", seq, err)
		}
		out = append(out, check.LeftRequest{Stream: seq, Subject: m.Subject, JobID: messages.PeekJobID(m.Data)})
	}
	return out, nil
}

// terminations records the request stream's MSG_TERMINATED advisories.
type terminations struct {
	mu  sync.Mutex
	all []check.Termination
	sub *nats.Subscription
}

func watchTerminations(nc *nats.Conn) (*terminations, error) {
	t := &terminations{}
	sub, err := nc.Subscribe("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED."+messages.RequestsStream+".*", func(m *nats.Msg) {
		var a struct {
			Consumer string `json:"consumer"`
			Seq      uint64 `json:"stream_seq"`
			Reason   string `json:"reason"`
		}
		if json.Unmarshal(m.Data, &a) != nil {
			return
		}
		t.mu.Lock()
		t.all = append(t.all, check.Termination{Time: time.Now(), Stream: a.Seq, Consumer: a.Consumer, Reason: a.Reason})
		t.mu.Unlock()
	})
	if err != nil {
		return nil, fmt.Errorf("watch terminations: %w", err)
	}
	t.sub = sub
	return t, nil
}

func (t *terminations) list() []check.Termination {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]check.Termination(nil), t.all...)
}
