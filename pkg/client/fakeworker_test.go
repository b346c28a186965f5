package client_test

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// The tests and examples of the client run against a real NATS server
// with the worker's own streams, consumers and buckets (internal/bus),
// and a fake worker per host that takes requests from the worker's own
// consumers and publishes events as internal/lifecycle does: with
// Publisher.Append, each event conditional on the job's previous one. It
// builds nothing; what a job does is in its request:
//
//   - image "no-such-image": accepted, cloning, failed (image_not_found);
//   - runner kind none: accepted … agent_ready, then it waits for a
//     teardown (tearing_down, torn_down, reason requested);
//   - any other kind: accepted … runner_started, runner_exited with the
//     exit code of a label "exit=N" (default 0), tearing_down, torn_down
//     (reason runner_exited); with hold_on_failure_s and a label
//     "fail", failed (runner_start_failed) with held_until instead.
//
// A teardown of a job it has no machine for is torn_down with
// unknown_job. It answers control requests for its jobs.

// startServer starts an in-process JetStream server and returns its URL.
func startServer(tb testing.TB) string {
	tb.Helper()
	srv, err := embedded.Start(embedded.Options{StoreDir: tb.TempDir(), Port: -1})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	return srv.ClientURL()
}

// dial connects as the worker side (or an admin) does, with nats.go's
// defaults.
func dial(tb testing.TB, url string) jetstream.JetStream {
	tb.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		tb.Fatal(err)
	}
	return js
}

type fakeWorker struct {
	host string
	js   jetstream.JetStream
	pub  *bus.Publisher

	mu       sync.Mutex
	machines map[string]bool   // jobs whose machine exists here
	pos      map[string]uint64 // stream sequence of each job's newest event here
	seq      map[string]uint64
}

// startFakeWorker runs a fake worker of host over a connection of its own
// until the test ends; its host record lists images.
func startFakeWorker(tb testing.TB, url, host string, images ...string) *fakeWorker {
	tb.Helper()
	stop, w, err := runFakeWorker(url, host, images...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(stop)
	return w
}

// runFakeWorker is startFakeWorker for the examples, which have no
// testing.TB: it returns what stops the worker.
func runFakeWorker(url, host string, images ...string) (stop func(), w *fakeWorker, err error) {
	nc, err := nats.Connect(url)
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	fail := func(err error) (func(), *fakeWorker, error) {
		cancel()
		nc.Close()
		return nil, nil, err
	}
	t := bus.Topology{Host: host, AckWait: 5 * time.Second}
	cons, err := bus.Ensure(ctx, js, t)
	if err != nil {
		return fail(err)
	}
	fleet, err := bus.OpenFleet(ctx, js, t)
	if err != nil {
		return fail(err)
	}
	rec := messages.Host{State: messages.HostActive, Version: "fake", SlotsTotal: 1, MachinesMax: 4}
	for _, im := range images {
		rec.Images = append(rec.Images, messages.HostImage{Name: im, Admitted: true})
	}
	if err := fleet.PutHost(ctx, rec); err != nil {
		return fail(err)
	}
	w = &fakeWorker{host: host, js: js, pub: bus.NewPublisher(js), machines: map[string]bool{}, pos: map[string]uint64{}, seq: map[string]uint64{}}
	sub, err := nc.Subscribe(messages.ControlSubject(host), w.control)
	if err != nil {
		return fail(err)
	}
	consumers := []jetstream.Consumer{cons.Pinned, cons.Provision, cons.Teardown}
	for _, im := range images {
		c, err := bus.EnsureImageConsumer(ctx, js, t, im)
		if err != nil {
			return fail(err)
		}
		consumers = append(consumers, c)
	}
	var wg sync.WaitGroup
	for _, c := range consumers {
		wg.Go(func() { w.serve(ctx, c) })
	}
	return func() {
		cancel()
		wg.Wait()
		_ = sub.Unsubscribe()
		nc.Close()
	}, w, nil
}

// serve takes requests from c until ctx ends.
func (w *fakeWorker) serve(ctx context.Context, c jetstream.Consumer) {
	for ctx.Err() == nil {
		batch, err := c.Fetch(1, jetstream.FetchMaxWait(200*time.Millisecond))
		if err != nil {
			continue
		}
		for msg := range batch.Messages() {
			meta, err := msg.Metadata()
			if err != nil {
				_ = msg.Term()
				continue
			}
			attempt := int(meta.NumDelivered)
			if strings.HasSuffix(msg.Subject(), ".teardown") {
				req, err := messages.DecodeTeardown(msg.Data())
				if err == nil {
					err = w.teardown(ctx, req, attempt)
				}
				w.settle(ctx, msg, err)
				continue
			}
			req, err := messages.DecodeProvision(msg.Data())
			if err == nil {
				err = w.provision(ctx, req, attempt)
			}
			w.settle(ctx, msg, err)
		}
	}
}

func (w *fakeWorker) settle(ctx context.Context, msg jetstream.Msg, err error) {
	if err != nil && ctx.Err() == nil {
		_ = msg.NakWithDelay(100 * time.Millisecond)
		return
	}
	_ = msg.Ack()
}

// emit appends the job's next event on this host.
func (w *fakeWorker) emit(ctx context.Context, ev messages.Event, origin string) error {
	w.mu.Lock()
	ev.V, ev.Host, ev.Time, ev.Seq = messages.SchemaVersion, w.host, time.Now().UTC(), w.seq[ev.JobID]+1
	after := w.pos[ev.JobID]
	w.mu.Unlock()
	seq, pos, err := w.pub.Append(ctx, ev, fmt.Sprintf("%s:%s:%s", ev.JobID, ev.State, origin), after)
	if err != nil {
		return err
	}
	w.mu.Lock()
	w.seq[ev.JobID], w.pos[ev.JobID] = seq, pos
	w.mu.Unlock()
	return nil
}

func (w *fakeWorker) provision(ctx context.Context, req messages.Provision, attempt int) error {
	a := strconv.Itoa(attempt)
	ev := func(st messages.State) messages.Event {
		return messages.Event{JobID: req.JobID, Image: req.Image, Domain: messages.DomainName(req.JobID), State: st, Attempt: attempt}
	}
	for _, st := range []messages.State{messages.StateAccepted, messages.StateCloning} {
		if err := w.emit(ctx, ev(st), a); err != nil {
			return err
		}
	}
	if req.Image == "no-such-image" {
		failed := ev(messages.StateFailed)
		failed.Error = &messages.Error{Code: messages.CodeImageNotFound, Message: fmt.Sprintf("no image %q on host %s", req.Image, w.host)}
		return w.emit(ctx, failed, a)
	}
	for _, st := range []messages.State{messages.StateCloned, messages.StateBooting, messages.StateRunning} {
		if err := w.emit(ctx, ev(st), a); err != nil {
			return err
		}
	}
	// The machine is there before agent_ready says so, for a teardown
	// that follows the event at once.
	w.mu.Lock()
	w.machines[req.JobID] = true
	w.mu.Unlock()
	ready := ev(messages.StateAgentReady)
	ready.OS = "linux"
	if err := w.emit(ctx, ready, a); err != nil {
		return err
	}
	if req.Runner.Kind == messages.RunnerNone {
		return nil
	}
	var labels []string
	if req.Runner.Forgejo != nil {
		labels = req.Runner.Forgejo.Labels
	}
	code := 0
	for _, l := range labels {
		if n, ok := strings.CutPrefix(l, "exit="); ok {
			code, _ = strconv.Atoi(n)
		}
		if l == "fail" && req.HoldOnFailureS > 0 {
			failed := ev(messages.StateFailed)
			failed.OS, failed.HeldUntil = "linux", time.Now().UTC().Add(req.HoldOnFailure()).Truncate(time.Second)
			failed.Error = &messages.Error{Code: messages.CodeRunnerStartFailed, Message: "the runner did not start"}
			return w.emit(ctx, failed, a)
		}
	}
	started := ev(messages.StateRunnerStarted)
	started.OS, started.RunnerPID = "linux", 812
	if err := w.emit(ctx, started, a); err != nil {
		return err
	}
	exited := ev(messages.StateRunnerExited)
	exited.OS, exited.Attempt, exited.ExitCode = "linux", 0, &code
	if err := w.emit(ctx, exited, messages.ReasonRunnerExited); err != nil {
		return err
	}
	return w.remove(ctx, req.JobID, req.Image, messages.ReasonRunnerExited, 0, messages.ReasonRunnerExited)
}

// remove tears the job's machine down: tearing_down, torn_down.
func (w *fakeWorker) remove(ctx context.Context, job, image, reason string, attempt int, origin string) error {
	for _, st := range []messages.State{messages.StateTearingDown, messages.StateTornDown} {
		ev := messages.Event{JobID: job, Image: image, Domain: messages.DomainName(job), State: st, Attempt: attempt, Reason: reason, OS: "linux"}
		if err := w.emit(ctx, ev, origin); err != nil {
			return err
		}
	}
	w.mu.Lock()
	delete(w.machines, job)
	w.mu.Unlock()
	return nil
}

func (w *fakeWorker) teardown(ctx context.Context, req messages.Teardown, attempt int) error {
	w.mu.Lock()
	has := w.machines[req.JobID]
	w.mu.Unlock()
	if has {
		return w.remove(ctx, req.JobID, "", messages.ReasonRequested, attempt, strconv.Itoa(attempt))
	}
	return w.emit(ctx, messages.Event{JobID: req.JobID, State: messages.StateTornDown, Attempt: attempt, Reason: messages.ReasonRequested,
		Error: &messages.Error{Code: messages.CodeUnknownJob, Message: "no machine of the job on host " + w.host}}, strconv.Itoa(attempt)+":unknown")
}

// control answers a control request as internal/worker does.
func (w *fakeWorker) control(m *nats.Msg) {
	reply := messages.ControlReply{V: messages.SchemaVersion, Host: w.host}
	req, err := messages.DecodeControl(m.Data)
	if err == nil {
		err = req.Validate()
	}
	w.mu.Lock()
	has := err == nil && w.machines[req.JobID]
	w.mu.Unlock()
	switch {
	case err != nil:
		reply.Error = err.Error()
	case !has:
		reply.Error = fmt.Sprintf("job %s has no machine on this host", req.JobID)
	case req.Op == messages.ControlHold:
		reply.OK, reply.Phase, reply.HoldForS = true, "ready", req.ForS
	case req.Op == messages.ControlRelease:
		reply.OK, reply.Phase = true, "ready"
	case req.Op == messages.ControlConsole:
		reply.OK, reply.Console = true, "console of "+req.JobID+"\n"
	}
	data, err := messages.Marshal(reply)
	if err != nil {
		panic(errors.Join(errors.New("encode a control reply"), err))
	}
	_ = m.Respond(data)
}
