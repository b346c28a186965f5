package worker

import (
	"context"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
)

// arrivalWait bounds the pull that follows an arrival: the publish reaches
// core subscribers a moment before the stream has stored it, and another
// host may take the request first.
const arrivalWait = 250 * time.Millisecond

// watchArrivals makes w.arrivals carry the subject of each provision
// published for this host, its images or any host (bus.WatchArrivals),
// so that a provision is pulled as soon as it is published whichever
// consumer holds it; one long poll can wait on one consumer only. Without
// a connection or a fleet (tests), or when the subscription fails, the
// worker long-polls its last consumer instead. The returned func ends
// the watch.
func (w *Worker) watchArrivals() (stop func()) {
	if w.cfg.NATS == nil || w.fl == nil {
		return func() {}
	}
	arrivals := make(chan string, 64)
	stop, err := bus.WatchArrivals(w.cfg.NATS, w.cfg.Fleet.Host, func(subject string) {
		select {
		case arrivals <- subject:
		default: // full: the sweep that drains it finds this one too
		}
	})
	if err != nil {
		if w.cfg.OnSettle != nil {
			w.cfg.OnSettle(Settlement{Op: "watch arrivals", Outcome: "poll", Err: err})
		}
		return func() {}
	}
	w.arrivals = arrivals
	return stop
}

// nextArrival pulls at most one message: from the first of consumers()
// that has one without waiting, else from the one of consumers() then a
// provision is published to next, within PullWait. It returns nil when
// PullWait passes first, so that the caller looks at drain and capacity
// again.
func (w *Worker) nextArrival(ctx context.Context, consumers func() []jetstream.Consumer) jetstream.Msg {
	if msg, failed := w.sweep(ctx, consumers(), 0); msg != nil || failed {
		return msg
	}
	timeout := time.NewTimer(w.cfg.PullWait)
	defer timeout.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timeout.C:
			return nil
		case subject := <-w.arrivals:
			c := consumerOf(consumers(), subject)
			if c == nil {
				continue // an image this host does not serve (now)
			}
			msg, err := fetchOne(ctx, c, arrivalWait)
			if err != nil {
				w.pause(ctx)
				return nil
			}
			if msg != nil {
				return msg
			}
		}
	}
}

// consumerOf returns the consumer of consumers that filters subject.
func consumerOf(consumers []jetstream.Consumer, subject string) jetstream.Consumer {
	for _, c := range consumers {
		if info := c.CachedInfo(); info != nil && info.Config.FilterSubject == subject {
			return c
		}
	}
	return nil
}

// fetchOne pulls at most one message from c, waiting up to wait for one
// (none: only what is there now).
func fetchOne(ctx context.Context, c jetstream.Consumer, wait time.Duration) (jetstream.Msg, error) {
	var batch jetstream.MessageBatch
	var err error
	if wait <= 0 {
		batch, err = c.FetchNoWait(1)
	} else {
		fctx, cancel := context.WithTimeout(ctx, wait)
		defer cancel()
		batch, err = c.Fetch(1, jetstream.FetchContext(fctx))
	}
	if err != nil {
		return nil, err
	}
	for msg := range batch.Messages() {
		return msg, nil
	}
	return nil, nil
}
