package client

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Query selects the events Events yields. Host, Job and State are
// filtered by the server (empty: any), and Since starts the replay at the
// first event stored at or after it, so that a replay reads only what it
// yields.
type Query struct {
	Host  string
	Job   string
	State messages.State
	// Since, when set, starts at the first event stored at or after it;
	// otherwise at the oldest event the stream keeps (30 days by
	// default), or with New at the next one.
	Since time.Time
	// Until, when set, passes over events whose time is after it; a
	// followed replay ends at the first such event.
	Until time.Time
	// Follow keeps waiting for new events once the stored ones have been
	// read, until the context ends or the loop breaks.
	Follow bool
	// New starts after the events stored now, and implies Follow.
	New bool
}

// errStop ends a read from inside its callback.
var errStop = errors.New("stop")

// Events yields the events q selects, in stream order, which is each
// job's seq order (docs/protocol.md 5.3), each once. Without Follow it
// ends after the newest event stored when it started. An undecodable
// event is yielded as a *DecodeError and the replay goes on; any other
// error ends it, the context's own error when the context ended.
//
// It reads through an ordered consumer, which survives reconnects and
// resumes after the last event it delivered: a followed replay neither
// skips nor repeats an event across an outage of the servers, as long as
// the connection reconnects.
func (c *Client) Events(ctx context.Context, q Query) iter.Seq2[messages.Event, error] {
	return func(yield func(messages.Event, error) bool) {
		ctx, stop := c.guard(ctx)
		defer stop()
		follow := q.Follow || q.New
		err := c.read(ctx, readOptions{filter: messages.EventFilter(q.Host, q.Job, q.State), since: q.Since, new: q.New, follow: follow},
			func(streamSeq, _ uint64, ev messages.Event, derr error) error {
				if derr != nil {
					if !yield(messages.Event{}, &DecodeError{StreamSeq: streamSeq, Err: derr}) {
						return errStop
					}
					return nil
				}
				if !q.Until.IsZero() && ev.Time.After(q.Until) {
					if follow {
						return errStop
					}
					return nil
				}
				if !yield(ev, nil) {
					return errStop
				}
				return nil
			})
		if err != nil && !errors.Is(err, errStop) {
			yield(messages.Event{}, c.failStream(ctx, "read events", err))
		}
	}
}

// readOptions select the events read delivers.
type readOptions struct {
	// filter is a subject filter such as messages.EventFilter returns.
	filter string
	// since, when set, starts at the first event stored at or after it;
	// otherwise new decides.
	since time.Time
	// new starts after the events stored now.
	new bool
	// follow keeps waiting for new events instead of returning once the
	// events stored at the start have been read.
	follow bool
}

// read calls fn for every event selected by o, in stream order, with its
// stream sequence and the number of events pending after it, through an
// ordered consumer that the server filters by subject and starts at the
// right time. An undecodable event is passed with its error. It returns
// when fn returns an error, when ctx ends, or, without follow, after the
// last stored event. Every replay of this package is this loop (the
// event benchmarks measure it, BenchmarkReplay).
func (c *Client) read(ctx context.Context, o readOptions, fn func(streamSeq, pending uint64, ev messages.Event, err error) error) error {
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{o.filter}, DeliverPolicy: jetstream.DeliverAllPolicy}
	switch {
	case !o.since.IsZero():
		cfg.DeliverPolicy, cfg.OptStartTime = jetstream.DeliverByStartTimePolicy, &o.since
	case o.new:
		cfg.DeliverPolicy = jetstream.DeliverNewPolicy
	}
	cons, err := c.js.OrderedConsumer(ctx, messages.EventsStream, cfg)
	if err != nil {
		return err
	}
	if !o.follow {
		info, err := cons.Info(ctx)
		if err != nil {
			return err
		}
		if info.NumPending == 0 {
			return nil
		}
	}
	it, err := cons.Messages()
	if err != nil {
		return err
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
			return err
		}
		seq, pending, ok := ackSequences(msg.Reply())
		if !ok {
			meta, err := msg.Metadata()
			if err != nil {
				return fmt.Errorf("event metadata: %w", err)
			}
			seq, pending = meta.Sequence.Stream, meta.NumPending
		}
		ev, derr := dec.decode(msg.Data())
		if err := fn(seq, pending, ev, derr); err != nil {
			return err
		}
		if !o.follow && pending == 0 {
			return nil
		}
	}
}
