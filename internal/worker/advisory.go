package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// A request that a consumer of the work-queue stream has delivered
// max_deliver times without an ack or term is never delivered again, yet
// stays in the stream, and nobody reports its job's end (nats-server#5564).
// That happens when the worker dies on the final delivery, or loses its
// connection for longer than ack_wait. The server then publishes a
// max-deliveries advisory; the workers of a fleet take these in one queue
// group, and the one that gets an advisory reports the job failed
// (max_deliveries) and deletes the message.

// MaxDeliveriesQueue is the queue group in which the workers of a fleet take
// the request stream's max-deliveries advisories, so that one handles each.
const MaxDeliveriesQueue = "stretchy-libvirt-max-deliveries"

// MaxDeliveriesSubject is where the server announces that a consumer of the
// request stream gave up delivering a message.
const MaxDeliveriesSubject = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES." + messages.RequestsStream + ".>"

// originMaxDeliveries names the failed event's cause in its Nats-Msg-Id,
// <job_id>:failed:max_deliveries:<stream sequence>, so that two workers
// reporting the same message store one event.
const originMaxDeliveries = "max_deliveries"

// advisoryTimeout bounds the handling of one advisory.
const advisoryTimeout = time.Minute

// An advisory whose handling failed (NATS without a quorum: its stream
// or the job's events could not be read, the event not published) is
// handled again every advisoryRetry while no other advisory comes, for up
// to advisoryRetryFor: the server sends it once, and its request is never
// delivered again, so nothing else would end the job.
const (
	advisoryRetry    = 2 * time.Second
	advisoryRetryFor = 10 * time.Minute
)

// failedAdvisory is an advisory to handle again, since its first failure.
type failedAdvisory struct {
	a     deliveryAdvisory
	since time.Time
}

// deliveryAdvisory is what is read of io.nats.jetstream.advisory.v1.max_deliver.
type deliveryAdvisory struct {
	Stream     string `json:"stream"`
	Consumer   string `json:"consumer"`
	StreamSeq  uint64 `json:"stream_seq"`
	Deliveries int    `json:"deliveries"`
}

// exhaustion is the worker's state for ending requests that will not be
// delivered again. Its zero value is ready; the stream handle is looked up
// on first use.
type exhaustion struct {
	mu       sync.Mutex
	js       jetstream.JetStream
	requests jetstream.Stream
	// serving holds the stream sequences of the requests this worker is
	// handling; waiting the advisories that came for one of them, to be
	// handled once it is settled.
	serving map[uint64]bool
	waiting map[uint64]deliveryAdvisory
	// failed are the advisories to handle again, by stream sequence.
	failed map[uint64]failedAdvisory
}

// serving records that msg is being handled until the returned function is
// called, after the message was settled. An advisory that came for it in
// the meantime is handled then: a message this worker acked or terminated
// is gone by then, one it handed back is reported and deleted.
func (w *Worker) serving(ctx context.Context, msg jetstream.Msg) (settled func()) {
	meta, err := msg.Metadata()
	if err != nil {
		return func() {}
	}
	seq := meta.Sequence.Stream
	w.ex.mu.Lock()
	if w.ex.serving == nil {
		w.ex.serving = make(map[uint64]bool)
		w.ex.waiting = make(map[uint64]deliveryAdvisory)
	}
	w.ex.serving[seq] = true
	w.ex.mu.Unlock()
	return func() {
		w.ex.mu.Lock()
		delete(w.ex.serving, seq)
		a, ok := w.ex.waiting[seq]
		delete(w.ex.waiting, seq)
		w.ex.mu.Unlock()
		if ok {
			w.exhausted(ctx, a)
		}
	}
}

// subscribeMaxDeliveries joins the fleet's queue group for max-deliveries
// advisories when the worker has a NATS connection; the subscription
// buffers advisories until maxDeliveriesLoop reads them.
func (w *Worker) subscribeMaxDeliveries(ctx context.Context) (*nats.Subscription, error) {
	nc := w.cfg.NATS
	if nc == nil {
		return nil, nil
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	w.ex.mu.Lock()
	w.ex.js = js
	w.ex.mu.Unlock()
	sub, err := nc.QueueSubscribeSync(MaxDeliveriesSubject, MaxDeliveriesQueue)
	if err != nil {
		return nil, fmt.Errorf("subscribe to %s: %w", MaxDeliveriesSubject, err)
	}
	// The server must know the subscription before this worker settles
	// anything, or it sends no advisory (it skips subjects nobody reads).
	fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := nc.FlushWithContext(fctx); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("subscribe to %s: %w", MaxDeliveriesSubject, err)
	}
	return sub, nil
}

// maxDeliveriesLoop handles the advisories of sub, one at a time, until ctx
// ends; opCtx bounds the handling of the last one.
func (w *Worker) maxDeliveriesLoop(ctx, opCtx context.Context, sub *nats.Subscription) {
	if sub == nil {
		return
	}
	defer func() { _ = sub.Unsubscribe() }()
	for {
		wctx, cancel := context.WithTimeout(ctx, advisoryRetry)
		msg, err := sub.NextMsgWithContext(wctx)
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case errors.Is(err, nats.ErrBadSubscription), errors.Is(err, nats.ErrConnectionClosed):
			return
		case errors.Is(err, context.DeadlineExceeded):
			w.retryExhausted(opCtx)
			continue
		case err != nil:
			// nats.ErrSlowConsumer: advisories were dropped, which leaves
			// their messages as they were without this loop.
			continue
		}
		var a deliveryAdvisory
		if err := json.Unmarshal(msg.Data, &a); err != nil || a.Stream != messages.RequestsStream || a.StreamSeq == 0 {
			continue
		}
		w.exhausted(opCtx, a)
	}
}

// stream returns the request stream, looking it up once.
func (ex *exhaustion) stream(ctx context.Context) (jetstream.Stream, error) {
	// The lookup runs without the lock, which every request takes.
	ex.mu.Lock()
	js, s := ex.js, ex.requests
	ex.mu.Unlock()
	if s != nil {
		return s, nil
	}
	if js == nil {
		return nil, errors.New("no NATS connection for advisories")
	}
	s, err := js.Stream(ctx, messages.RequestsStream)
	if err != nil {
		return nil, fmt.Errorf("request stream: %w", err)
	}
	ex.mu.Lock()
	ex.requests = s
	ex.mu.Unlock()
	return s, nil
}

// retryExhausted handles again the advisories whose handling failed;
// one still failing after advisoryRetryFor is given up, which is said.
func (w *Worker) retryExhausted(ctx context.Context) {
	w.ex.mu.Lock()
	failed := w.ex.failed
	w.ex.failed = nil
	w.ex.mu.Unlock()
	for _, f := range failed {
		w.exhausted(ctx, f.a)
		if time.Since(f.since) < advisoryRetryFor {
			continue
		}
		w.ex.mu.Lock()
		_, again := w.ex.failed[f.a.StreamSeq]
		delete(w.ex.failed, f.a.StreamSeq)
		w.ex.mu.Unlock()
		if again && w.cfg.OnSettle != nil {
			w.cfg.OnSettle(Settlement{Op: "provision", Attempt: f.a.Deliveries, Outcome: "kept",
				Err: fmt.Errorf("request %d reached max deliveries: its handling failed for %s; given up", f.a.StreamSeq, advisoryRetryFor)})
		}
	}
}

// exhausted ends the request a max-deliveries advisory is about: unless
// this worker is still handling it (then it waits until that is settled),
// it publishes a failed event with max_deliveries for the request's job,
// if it can read a valid job id, the job has not ended already and this
// worker neither serves nor finished it, and then deletes the message.
// A message that is gone was settled (or handled by another worker).
func (w *Worker) exhausted(ctx context.Context, a deliveryAdvisory) {
	w.ex.mu.Lock()
	if w.ex.serving[a.StreamSeq] {
		w.ex.waiting[a.StreamSeq] = a
		w.ex.mu.Unlock()
		return
	}
	w.ex.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, advisoryTimeout)
	defer cancel()
	s := Settlement{Op: "provision", Attempt: a.Deliveries, Outcome: "kept"}
	w.ex.mu.Lock()
	prior, retried := w.ex.failed[a.StreamSeq]
	delete(w.ex.failed, a.StreamSeq)
	w.ex.mu.Unlock()
	report := func() {
		if s.Outcome == "kept" {
			// Handled again later (retryExhausted); said the first time.
			since := time.Now()
			if retried {
				since = prior.since
			}
			w.ex.mu.Lock()
			if w.ex.failed == nil {
				w.ex.failed = make(map[uint64]failedAdvisory)
			}
			w.ex.failed[a.StreamSeq] = failedAdvisory{a: a, since: since}
			w.ex.mu.Unlock()
			if retried {
				return
			}
		}
		if w.cfg.OnSettle != nil {
			w.cfg.OnSettle(s)
		}
	}
	stream, err := w.ex.stream(ctx)
	if err != nil {
		s.Err = fmt.Errorf("request %d reached max deliveries: %w", a.StreamSeq, err)
		report()
		return
	}
	raw, err := stream.GetMsg(ctx, a.StreamSeq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return
	}
	if err != nil {
		s.Err = fmt.Errorf("request %d reached max deliveries: read it: %w", a.StreamSeq, err)
		report()
		return
	}
	if strings.HasSuffix(raw.Subject, ".teardown") {
		s.Op = "teardown"
	}
	s.JobID = messages.PeekJobID(raw.Data)
	cause := fmt.Errorf("the %s request was delivered %d times by consumer %s without being settled; it will not be delivered again",
		s.Op, a.Deliveries, a.Consumer)
	if err := w.reportExhausted(ctx, s.JobID, a, cause); err != nil {
		s.Err = fmt.Errorf("%w; report it: %w", cause, err)
		report()
		return
	}
	s.Outcome, s.Err = "deleted", cause
	if err := stream.DeleteMsg(ctx, a.StreamSeq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		s.Outcome, s.Err = "kept", fmt.Errorf("%w; delete it: %w", cause, err)
	}
	report()
}

// reportExhausted publishes the failed event of an exhausted request's job,
// unless there is no job, or its last event already ended it.
func (w *Worker) reportExhausted(ctx context.Context, jobID string, a deliveryAdvisory, cause error) error {
	if jobID == "" {
		return nil
	}
	w.ex.mu.Lock()
	js := w.ex.js
	w.ex.mu.Unlock()
	last, found, err := bus.NewPublisher(js).LastEvent(ctx, jobID, "")
	if err != nil {
		return err
	}
	if found && last.State.Terminal() {
		return nil
	}
	d := lifecycle.Delivery{Attempt: a.Deliveries, Final: true, Origin: fmt.Sprintf("%s:%d", originMaxDeliveries, a.StreamSeq)}
	err = w.life.Reject(ctx, jobID, "", messages.CodeMaxDeliveries, cause, d)
	if f := (*lifecycle.Failure)(nil); errors.As(err, &f) {
		return nil // reported, or not this worker's to report
	}
	return err
}
