package worker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

// Config tunes a Worker. Zero values mean the defaults.
type Config struct {
	// Parallelism bounds concurrent operations (a provision until its
	// machine runs, or a teardown); default 3.
	Parallelism int
	// MaxVMs bounds the managed machines on this host; default 8.
	MaxVMs int
	// AckWait and MaxDeliver must match the consumers' settings.
	AckWait    time.Duration
	MaxDeliver int
	// ShutdownGrace is how long operations in flight may continue after
	// Run's context ends; then they are cancelled, rolled back and their
	// requests handed back for redelivery. Default 60s.
	ShutdownGrace time.Duration
	// PullWait bounds one long-poll pull request; no operation slot is
	// held while it waits. Default 2s.
	PullWait time.Duration
	// WatchInterval is how often running machines are checked for an
	// exited runner, a stop of their own and their deadline; default 2s.
	WatchInterval time.Duration
	// ReconcileInterval is how often the host's managed machines are
	// compared with what the worker tracks (adopting, removing leftovers);
	// default 1m. Run also reconciles once before it pulls anything.
	ReconcileInterval time.Duration
	// OnSettle, when set, is told how each message was settled, and of
	// failed background work (Op "reconcile" or a teardown reason).
	OnSettle func(Settlement)
	// Faults, when set, is called before each request is settled
	// (lifecycle.FaultBeforeAck); only tests set it.
	Faults lifecycle.Faults
	// NATS, when set, is the connection on which the worker takes its
	// share of the request stream's max-deliveries advisories, and ends
	// the requests they name (advisory.go).
	NATS *nats.Conn
	// Slots, when set, are the operation slots the worker shares with
	// the lifecycle, which takes them for the teardowns machines begin by
	// themselves; nil makes Parallelism slots of the worker's own.
	Slots *Slots
	// Fleet, when set, makes the worker route provisions by image, keep
	// its host's record in the registry and drain on request (fleet.go);
	// with NATS, it also answers the host's control requests (control.go).
	Fleet *FleetConfig
	// OnControl, when set, is told of each control request and its
	// outcome, once it was answered.
	OnControl func(c messages.Control, err error)
	// ReplyPrefixes are the inbox prefixes a control request's reply
	// subject must begin with to be served; default DefaultReplyPrefixes.
	ReplyPrefixes []string
	// Keys open sealed runner secrets (sealed.go); nil holds none, so
	// every sealed secret is refused (unknown_seal_key).
	Keys Unsealer
	// RequireSealed refuses provisions whose runner secret is in the
	// clear (secret_not_sealed), building nothing.
	RequireSealed bool
}

// Settlement says how one request message was settled.
type Settlement struct {
	Op      string // "provision" or "teardown"
	JobID   string
	Attempt int
	// Outcome is "ack", "term" or "nak", or "left" when another host
	// holds the job's claim and settles the message; for a request that
	// reached max deliveries (advisory.go), "deleted", or "kept" when
	// that failed.
	Outcome string
	Err     error
}

// Stats are the worker's own accounting.
type Stats struct {
	InFlight    int64 // operations running now
	MaxInFlight int64 // highest InFlight seen
	Provisions  int64 // provision messages settled
	Teardowns   int64 // teardown messages settled (deadline teardowns excluded)
}

// Worker pulls requests for one host and runs them through a lifecycle
// manager.
type Worker struct {
	cfg  Config
	cons bus.Consumers
	life *lifecycle.Manager

	slots *Slots
	// teardowns bounds the teardown requests in hand (waiting for a slot
	// or for the build they end, or running) to Parallelism.
	teardowns chan struct{}
	ex        exhaustion
	// finished is set once the teardowns the previous process left
	// unfinished are ended (lifecycle.FinishTeardowns).
	finished atomic.Bool

	provisionsSettled, teardownsSettled atomic.Int64

	// fl is the worker's part in a fleet; nil without Config.Fleet.
	fl *fleet
	// arrivals carries the subjects of provisions just published, while
	// Run watches them (arrivals.go); nil otherwise.
	arrivals chan string
}

// New returns a Worker reading from cons.
func New(cfg Config, cons bus.Consumers, life *lifecycle.Manager) *Worker {
	if cfg.Parallelism <= 0 {
		cfg.Parallelism = 3
	}
	if cfg.MaxVMs <= 0 {
		cfg.MaxVMs = 8
	}
	if cfg.AckWait <= 0 {
		cfg.AckWait = bus.DefaultAckWait
	}
	if cfg.MaxDeliver <= 0 {
		cfg.MaxDeliver = bus.DefaultMaxDeliver
	}
	if cfg.ShutdownGrace <= 0 {
		cfg.ShutdownGrace = 60 * time.Second
	}
	if cfg.PullWait <= 0 {
		cfg.PullWait = 2 * time.Second
	}
	if cfg.WatchInterval <= 0 {
		cfg.WatchInterval = 2 * time.Second
	}
	if cfg.ReconcileInterval <= 0 {
		cfg.ReconcileInterval = time.Minute
	}
	if cfg.Slots == nil {
		cfg.Slots = NewSlots(cfg.Parallelism)
	}
	return &Worker{
		cfg: cfg, cons: cons, life: life,
		slots:     cfg.Slots,
		teardowns: make(chan struct{}, cfg.Parallelism),
		fl:        newFleet(cfg.Fleet),
	}
}

// Stats returns a snapshot of the worker's accounting.
func (w *Worker) Stats() Stats {
	now, most := w.slots.InFlight()
	return Stats{
		InFlight: now, MaxInFlight: most,
		Provisions: w.provisionsSettled.Load(), Teardowns: w.teardownsSettled.Load(),
	}
}

// Run takes over the managed machines already on the host, then serves
// requests until ctx ends. It then stops pulling, lets operations in
// flight finish within the shutdown grace and returns nil. Running
// machines are left running; the next Run adopts them.
func (w *Worker) Run(ctx context.Context) error {
	advisories, err := w.subscribeMaxDeliveries(ctx)
	if err != nil {
		return err
	}
	stopWatching := w.watchArrivals()
	defer stopWatching()
	w.reconcile(ctx)
	w.fleetStart(ctx)
	defer w.fleetStop()
	opCtx, cancelOps := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelOps()

	var ops conc.WaitGroup
	var loops conc.WaitGroup
	loops.Go(func() { w.provisionLoop(ctx, opCtx, &ops) })
	loops.Go(func() { w.teardownLoop(ctx, opCtx, &ops) })
	loops.Go(func() { w.watchLoop(ctx) })
	loops.Go(func() { w.maxDeliveriesLoop(ctx, opCtx, advisories) })
	loops.Go(func() { w.fleetLoop(ctx) })
	loops.Go(func() { w.serveControl(ctx) })
	loops.Wait()

	grace := time.AfterFunc(w.cfg.ShutdownGrace, cancelOps)
	defer grace.Stop()
	ops.Wait()
	return nil
}

// inSlot runs op in a slot of priority p, waiting for one while ctx lasts;
// it reports false, without running op, when ctx ended first.
func (w *Worker) inSlot(ctx context.Context, p priority, op func()) bool {
	if w.slots.acquire(ctx, p) != nil {
		return false
	}
	defer w.slots.release()
	op()
	return true
}

// next pulls at most one message from the first consumer that has one,
// waiting up to PullWait on the last.
func (w *Worker) next(ctx context.Context, consumers ...jetstream.Consumer) jetstream.Msg {
	msg, _ := w.sweep(ctx, consumers, w.cfg.PullWait)
	return msg
}

// sweep pulls at most one message from the first of consumers that has
// one, waiting up to lastWait on the last (none: only what is there now).
// After a failed pull it pauses and reports failed.
func (w *Worker) sweep(ctx context.Context, consumers []jetstream.Consumer, lastWait time.Duration) (msg jetstream.Msg, failed bool) {
	for i, c := range consumers {
		wait := time.Duration(0)
		if i == len(consumers)-1 {
			wait = lastWait
		}
		msg, err := fetchOne(ctx, c, wait)
		if err != nil {
			w.pause(ctx)
			return nil, true
		}
		if msg != nil {
			return msg, false
		}
	}
	return nil, false
}

// pause waits a moment after a failed pull so an unreachable server is not
// hammered.
func (w *Worker) pause(ctx context.Context) {
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// provisionLoop pulls a provision, pinned to this host first, then a
// shared one, waiting up to PullWait on the last, whenever an operation
// slot is free that no other work waits for and the host has room for a
// machine (MaxVMs, counting the machines being built). The wait for a
// message holds no slot: a provision takes its slot once it is pulled, so
// the worker's own teardowns never wait for an idle pull, and a pulled
// provision waits at most for work that came first.
func (w *Worker) provisionLoop(ctx, opCtx context.Context, ops *conc.WaitGroup) {
	for ctx.Err() == nil {
		if w.slots.waitIdle(ctx) != nil {
			return
		}
		if w.drainWait(ctx) {
			continue
		}
		roomed := w.life.CapacityChanged()
		unreserve, room := w.life.TryReserve(w.cfg.MaxVMs)
		if !room {
			select {
			case <-ctx.Done():
			case <-roomed:
			}
			continue
		}
		msg := w.nextProvision(ctx)
		if msg == nil {
			unreserve()
			continue
		}
		stop := w.heartbeat(msg)
		// A provision that does not fit what the host's machines leave of
		// its totals waits here, like one at MaxVMs, holding no slot.
		adm, ok := w.admit(ctx, msg)
		if !ok {
			stop()
			unreserve()
			w.handBack(msg)
			continue
		}
		// Taken here, not in the operation's goroutine, so that the next
		// pull waits until this provision has its slot.
		if w.slots.acquire(ctx, requestNext) != nil {
			stop()
			adm.release()
			unreserve()
			w.handBack(msg)
			return
		}
		ops.Go(func() {
			defer unreserve()
			defer adm.release()
			defer w.slots.release()
			w.handleProvision(opCtx, msg, stop, adm)
		})
	}
}

// teardownLoop pulls this host's teardown requests, up to Parallelism in
// hand at once, and whether or not a slot is free: a teardown of a machine
// being built ends that build in the build's own slot; any other takes a
// slot, before provisions waiting for one.
func (w *Worker) teardownLoop(ctx, opCtx context.Context, ops *conc.WaitGroup) {
	for {
		select {
		case <-ctx.Done():
			return
		case w.teardowns <- struct{}{}:
		}
		msg := w.next(ctx, w.cons.Teardown)
		if msg == nil {
			<-w.teardowns
			continue
		}
		ops.Go(func() {
			defer func() { <-w.teardowns }()
			w.handleTeardown(ctx, opCtx, msg)
		})
	}
}

// handBack returns a pulled message that will not be served (the worker
// is stopping) for immediate redelivery, to this worker or another.
func (w *Worker) handBack(msg jetstream.Msg) {
	err := msg.Nak()
	if w.cfg.OnSettle != nil {
		s := Settlement{Op: "provision", JobID: messages.PeekJobID(msg.Data()), Outcome: "nak"}
		if isTeardown(msg) {
			s.Op = "teardown"
		}
		if meta, merr := msg.Metadata(); merr == nil {
			s.Attempt = int(meta.NumDelivered)
		}
		if err != nil {
			s.Err = fmt.Errorf("nak message: %w", err)
		}
		w.cfg.OnSettle(s)
	}
}

// isTeardown tells a teardown request from a provision by its subject.
func isTeardown(msg jetstream.Msg) bool {
	return strings.HasSuffix(msg.Subject(), ".teardown")
}

// reconcile runs one reconciliation and reports what failed; what failed
// is tried again next time. Until it succeeded once, it also ends the
// teardowns that the previous process of this host left unfinished.
func (w *Worker) reconcile(ctx context.Context) {
	if err := w.life.Reconcile(ctx); err != nil && w.cfg.OnSettle != nil {
		w.cfg.OnSettle(Settlement{Op: "reconcile", Outcome: "retry", Err: err})
	}
	if w.finished.Load() {
		return
	}
	if err := w.life.FinishTeardowns(ctx); err != nil {
		if w.cfg.OnSettle != nil {
			w.cfg.OnSettle(Settlement{Op: "finish teardowns", Outcome: "retry", Err: err})
		}
		return
	}
	w.finished.Store(true)
}

// watchLoop lets every machine look after itself at each tick (a ready
// machine whose runner exited, whose guest stopped or whose deadline
// passed ends itself in a slot of its own, ahead of provisions; claims are
// renewed) and reconciles the host now and then.
func (w *Worker) watchLoop(ctx context.Context) {
	tick := time.NewTicker(w.cfg.WatchInterval)
	defer tick.Stop()
	lastReconcile := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		// A reconciliation that left machines it could not take over
		// (they count against --max-vms meanwhile) is tried again at
		// the next tick.
		if time.Since(lastReconcile) >= w.cfg.ReconcileInterval || w.life.Unreconciled() {
			w.reconcile(ctx)
			lastReconcile = time.Now()
		}
		w.life.Tick()
	}
}

func (w *Worker) delivery(msg jetstream.Msg) lifecycle.Delivery {
	d := lifecycle.Delivery{Attempt: 1}
	if meta, err := msg.Metadata(); err == nil {
		d.Attempt, d.Request = int(meta.NumDelivered), meta.Sequence.Stream
	}
	d.Final = d.Attempt >= w.cfg.MaxDeliver
	return d
}

// handleProvision serves a provision message in the slot it holds; stop
// ends the message's heartbeat, which runs from the pull on.
func (w *Worker) handleProvision(ctx context.Context, msg jetstream.Msg, stop func(), adm admission) {
	defer w.serving(ctx, msg)()
	d := w.delivery(msg)
	jobID, routed, err := w.route(ctx, msg, d)
	if !routed && adm.beyond != nil {
		jobID, routed, err = w.refuseSize(ctx, msg, adm, d)
	}
	if !routed {
		jobID, err = w.provision(ctx, msg.Data(), d)
	}
	stop()
	w.provisionsSettled.Add(1)
	w.settle(msg, "provision", jobID, d, err)
}

func (w *Worker) provision(ctx context.Context, data []byte, d lifecycle.Delivery) (string, error) {
	req, err := messages.DecodeProvision(data)
	if err != nil {
		id := messages.PeekJobID(data)
		return id, w.life.Reject(ctx, id, "", messages.CodeBadMessage, err, d)
	}
	if err := runners.Validate(&req); err != nil {
		id := ""
		if messages.ValidJobID(req.JobID) {
			id = req.JobID
		}
		return id, w.life.Reject(ctx, id, "", rejectCode(err), err, d)
	}
	if code, err := w.unseal(&req); err != nil {
		return req.JobID, w.life.Reject(ctx, req.JobID, req.Image, code, err, d)
	}
	return req.JobID, w.life.Provision(ctx, req, d)
}

// handleTeardown serves a teardown message: through the build it ends
// when its job's machine is being built, else in a slot of its own; ctx
// bounds the wait for that slot, opCtx the teardown.
func (w *Worker) handleTeardown(ctx, opCtx context.Context, msg jetstream.Msg) {
	defer w.serving(opCtx, msg)()
	d := w.delivery(msg)
	stop := w.heartbeat(msg)
	req, err := w.decodeTeardown(opCtx, msg.Data(), d)
	jobID := req.JobID
	if err == nil {
		var served bool
		served, err = w.life.TeardownBuild(opCtx, jobID, messages.ReasonRequested, nil, d)
		if !served && !w.inSlot(ctx, teardownFirst, func() {
			err = w.life.Teardown(opCtx, jobID, messages.ReasonRequested, nil, d)
		}) {
			stop()
			w.handBack(msg)
			return
		}
	} else if jobID == "" {
		jobID = messages.PeekJobID(msg.Data())
	}
	stop()
	w.teardownsSettled.Add(1)
	w.settle(msg, "teardown", jobID, d, err)
}

// decodeTeardown decodes and validates a teardown request; a bad one is
// refused without a failed event, as it says nothing about the job.
func (w *Worker) decodeTeardown(ctx context.Context, data []byte, d lifecycle.Delivery) (messages.Teardown, error) {
	req, err := messages.DecodeTeardown(data)
	if err != nil {
		return messages.Teardown{}, w.life.Reject(ctx, "", "", messages.CodeBadMessage, err, d)
	}
	if err := req.Validate(); err != nil {
		return messages.Teardown{JobID: ""}, w.life.Reject(ctx, "", "", rejectCode(err), err, d)
	}
	return req, nil
}

func rejectCode(err error) messages.ErrorCode {
	if errors.Is(err, messages.ErrUnsupportedVersion) {
		return messages.CodeUnsupportedVersion
	}
	return messages.CodeInvalidRequest
}

// heartbeat tells the server every third of AckWait that msg is still being
// worked on, until the returned stop is called.
func (w *Worker) heartbeat(msg jetstream.Msg) (stop func()) {
	done := make(chan struct{})
	var wg conc.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(w.cfg.AckWait / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				_ = msg.InProgress() // a lost heartbeat at worst means a redelivery
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

// settle is the one place where an operation's result becomes an
// acknowledgement: success acks (after the events are durable), permanent
// failures terminate the message (their failed event is already out), a
// job claimed by another host leaves the message to that host (or acks a
// repeated request for it), and everything else is handed back for
// redelivery with backoff.
func (w *Worker) settle(msg jetstream.Msg, op, jobID string, d lifecycle.Delivery, err error) {
	w.cfg.Faults.At(lifecycle.FaultBeforeAck)
	s := Settlement{Op: op, JobID: jobID, Attempt: d.Attempt, Err: err}
	var f *lifecycle.Failure
	var dropped *lifecycle.Dropped
	var aerr error
	switch {
	case errors.As(err, &dropped) && dropped.Leave:
		// Another host serves this very request, or will once the server
		// hands it on: its settlement is the one that counts.
		s.Outcome = "left"
	case err == nil || errors.Is(err, lifecycle.ErrSuperseded) || dropped != nil:
		s.Outcome, s.Err = "ack", nil
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		aerr = msg.DoubleAck(ctx)
		cancel()
	case errors.As(err, &f):
		s.Outcome = "term"
		aerr = msg.TermWithReason(string(f.Code))
	default:
		s.Outcome = "nak"
		aerr = msg.NakWithDelay(backoff(d.Attempt))
	}
	if aerr != nil {
		s.Err = errors.Join(s.Err, fmt.Errorf("%s message: %w", s.Outcome, aerr))
	}
	if w.cfg.OnSettle != nil {
		w.cfg.OnSettle(s)
	}
}

// backoff is the redelivery delay after a transient failure of the given
// delivery: 2s, 4s, 8s, ... capped at one minute.
func backoff(attempt int) time.Duration {
	d := 2 * time.Second
	for i := 1; i < attempt && d < time.Minute; i++ {
		d *= 2
	}
	return min(d, time.Minute)
}
