package worker

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// The tests poison requests pinned to a host that no running worker
// serves: the test itself plays that host's dying worker, so the workers
// under test only see the advisories.
const goneHost = "gone"

// noMachines is a host without managed machines; the advisory path never
// touches libvirt, but Run reconciles once.
type noMachines struct{}

func (noMachines) Clone(context.Context, provision.Spec) (provision.Machine, error) {
	return provision.Machine{}, errors.New("no machines in this test")
}
func (noMachines) Start(context.Context, string) error                 { return errors.New("no machines in this test") }
func (noMachines) Remove(context.Context, string) (bool, error)        { return false, nil }
func (noMachines) List(context.Context) ([]provision.Machine, error)   { return nil, nil }
func (noMachines) ListOrphanVolumes(context.Context) ([]string, error) { return nil, nil }
func (noMachines) Lookup(context.Context, string) (provision.Machine, bool, error) {
	return provision.Machine{}, false, nil
}

type advisoryEnv struct {
	url string
	js  jetstream.JetStream
}

func startServer(t *testing.T) advisoryEnv {
	t.Helper()
	srv, err := embedded.Start(embedded.Options{StoreDir: t.TempDir(), Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	env := advisoryEnv{url: srv.ClientURL()}
	env.js = connect(t, env.url)
	// MaxDeliver 2 for every consumer, the gone host's included.
	if _, err := bus.Ensure(context.Background(), env.js, bus.Topology{Host: goneHost, AckWait: 3 * time.Second, MaxDeliver: 2}); err != nil {
		t.Fatal(err)
	}
	return env
}

func connect(t *testing.T, url string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// testWorker is a worker with its own connection and no machines.
type testWorker struct {
	w *Worker

	mu      sync.Mutex
	settled []Settlement
}

func (tw *testWorker) settlements() []Settlement {
	tw.mu.Lock()
	defer tw.mu.Unlock()
	return append([]Settlement(nil), tw.settled...)
}

// newWorker builds a worker of host; run starts it for the test's duration.
func newWorker(t *testing.T, env advisoryEnv, host string) *testWorker {
	t.Helper()
	js := connect(t, env.url)
	cons, err := bus.Ensure(context.Background(), js, bus.Topology{Host: host, AckWait: 3 * time.Second, MaxDeliver: 2})
	if err != nil {
		t.Fatal(err)
	}
	pub := bus.NewPublisher(js)
	life := lifecycle.New(lifecycle.Config{Host: host, Machines: noMachines{}, Events: pub, History: pub})
	tw := &testWorker{}
	tw.w = New(Config{
		AckWait: 3 * time.Second, MaxDeliver: 2, PullWait: 200 * time.Millisecond, NATS: js.Conn(),
		OnSettle: func(s Settlement) {
			tw.mu.Lock()
			tw.settled = append(tw.settled, s)
			tw.mu.Unlock()
		},
	}, cons, life)
	return tw
}

func (tw *testWorker) run(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tw.w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

// watchAdvisories counts the max-deliveries advisories the server sends.
func watchAdvisories(t *testing.T, env advisoryEnv) func() int {
	t.Helper()
	sub, err := env.js.Conn().SubscribeSync(MaxDeliveriesSubject)
	if err != nil {
		t.Fatal(err)
	}
	if err := env.js.Conn().Flush(); err != nil {
		t.Fatal(err)
	}
	return func() int {
		n, _, err := sub.Pending()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
}

// poison publishes data to subject and lets the gone host's consumer
// deliver it twice (MaxDeliver) without settling it, as a worker that dies
// each time would. It returns the message's stream sequence.
func poison(t *testing.T, env advisoryEnv, subject, consumer string, data []byte) uint64 {
	t.Helper()
	ctx := context.Background()
	ack, err := env.js.Publish(ctx, subject, data)
	if err != nil {
		t.Fatal(err)
	}
	cons, err := env.js.Consumer(ctx, messages.RequestsStream, consumer)
	if err != nil {
		t.Fatal(err)
	}
	for delivery := 1; delivery <= 2; delivery++ {
		batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		got := 0
		for msg := range batch.Messages() {
			got++
			meta, err := msg.Metadata()
			if err != nil || meta.Sequence.Stream != ack.Sequence || meta.NumDelivered != uint64(delivery) {
				t.Fatalf("delivery %d: got %+v, %v", delivery, meta, err)
			}
			if err := msg.Nak(); err != nil {
				t.Fatal(err)
			}
		}
		if got != 1 {
			t.Fatalf("delivery %d did not come", delivery)
		}
	}
	// The next pull finds the message exhausted: no third delivery, and
	// the server announces it.
	batch, err := cons.Fetch(1, jetstream.FetchMaxWait(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	for msg := range batch.Messages() {
		t.Fatalf("a third delivery with MaxDeliver 2: %s", msg.Subject())
	}
	return ack.Sequence
}

func provisionData(t *testing.T, jobID string) []byte {
	t.Helper()
	data, err := messages.Marshal(&messages.Provision{
		V: 1, JobID: jobID, Image: "debian-12", Runner: messages.Runner{Kind: messages.RunnerNone},
		RequestedAt: time.Now().UTC(),
	})
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func teardownData(t *testing.T, jobID string) []byte {
	t.Helper()
	data, err := messages.Marshal(&messages.Teardown{V: 1, JobID: jobID, RequestedAt: time.Now().UTC()})
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// eventsOf returns the stored events of jobID with their raw headers.
func eventsOf(t *testing.T, js jetstream.JetStream, jobID string) []*nats.Msg {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, messages.EventsStream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []*nats.Msg
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && seq > 0; seq++ {
		raw, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		ev, err := messages.DecodeEvent(raw.Data)
		if err != nil {
			t.Fatalf("event %d: %v", seq, err)
		}
		if ev.JobID == jobID {
			out = append(out, &nats.Msg{Subject: raw.Subject, Data: raw.Data, Header: raw.Header})
		}
	}
	return out
}

func requestGone(t *testing.T, js jetstream.JetStream, seq uint64) bool {
	t.Helper()
	s, err := js.Stream(context.Background(), messages.RequestsStream)
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.GetMsg(context.Background(), seq)
	if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		t.Fatal(err)
	}
	return err != nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestMaxDeliveriesEndsPoisonedRequests poisons four requests while two
// workers share the advisories: each request is deleted from the stream
// once, by one worker, and its job gets exactly one failed event with
// max_deliveries unless no job id can be read or the job had ended.
func TestMaxDeliveriesEndsPoisonedRequests(t *testing.T) {
	env := startServer(t)
	advisories := watchAdvisories(t, env)
	a, b := newWorker(t, env, "adv-a"), newWorker(t, env, "adv-b")
	a.run(t)
	b.run(t)

	// A job that already ended: its request is deleted without an event.
	pub := bus.NewPublisher(env.js)
	ended := messages.Event{V: 1, JobID: "ended-1", Host: goneHost, State: messages.StateTornDown, Time: time.Now().UTC(), Seq: 3}
	if err := pub.Publish(context.Background(), ended, "ended-1:torn_down:1"); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name, subject, consumer string
		data                    []byte
		job                     string // job id that gets a failed event, "" for none
		peek                    string // job id the settlement names
	}{
		{"pinned provision", messages.HostProvisionSubject(goneHost), bus.HostProvisionConsumer(goneHost), provisionData(t, "poison-1"), "poison-1", "poison-1"},
		{"teardown", messages.TeardownSubject(goneHost), bus.HostTeardownConsumer(goneHost), teardownData(t, "poison-2"), "poison-2", "poison-2"},
		{"ended job", messages.HostProvisionSubject(goneHost), bus.HostProvisionConsumer(goneHost), provisionData(t, "ended-1"), "", "ended-1"},
		{"no job id", messages.HostProvisionSubject(goneHost), bus.HostProvisionConsumer(goneHost), []byte("not msgpack"), "", ""},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			seq := poison(t, env, tt.subject, tt.consumer, tt.data)
			waitFor(t, "the advisory", func() bool { return advisories() >= i+1 })
			waitFor(t, "the request deleted", func() bool { return requestGone(t, env.js, seq) })
			var settled []Settlement
			waitFor(t, "the settlement", func() bool {
				settled = settled[:0]
				for _, s := range append(a.settlements(), b.settlements()...) {
					if s.Outcome == "deleted" && s.JobID == tt.peek && s.Attempt == 2 {
						settled = append(settled, s)
					}
				}
				return len(settled) > 0
			})
			if len(settled) != 1 || settled[0].Err == nil || !strings.Contains(settled[0].Err.Error(), "delivered 2 times") {
				t.Fatalf("settlements %+v, want one deletion with its cause", settled)
			}
			if tt.job == "" {
				if evs := eventsOf(t, env.js, tt.peek); tt.peek != "" && len(evs) != 1 {
					t.Fatalf("%d events for an ended job, want its torn_down only", len(evs))
				}
				return
			}
			var evs []*nats.Msg
			waitFor(t, "the failed event", func() bool { evs = eventsOf(t, env.js, tt.job); return len(evs) > 0 })
			ev, err := messages.DecodeEvent(evs[0].Data)
			if err != nil {
				t.Fatal(err)
			}
			if ev.State != messages.StateFailed || ev.Error == nil || ev.Error.Code != messages.CodeMaxDeliveries ||
				ev.Attempt != 2 || ev.Seq != 1 || (ev.Host != "adv-a" && ev.Host != "adv-b") {
				t.Fatalf("event %+v %+v", ev, ev.Error)
			}
			if got, want := evs[0].Header.Get(jetstream.MsgIDHeader), tt.job+":failed:max_deliveries:"+strconv.FormatUint(seq, 10); got != want {
				t.Errorf("Nats-Msg-Id %q, want %q", got, want)
			}
		})
	}
	// Nothing more comes: no duplicate from the other worker.
	time.Sleep(time.Second)
	for _, job := range []string{"poison-1", "poison-2"} {
		if n := len(eventsOf(t, env.js, job)); n != 1 {
			t.Errorf("job %s has %d events, want one failed", job, n)
		}
	}
	if n := len(a.settlements()) + len(b.settlements()); n != len(tests) {
		t.Errorf("%d settlements for %d exhausted requests: %+v %+v", n, len(tests), a.settlements(), b.settlements())
	}
	t.Logf("worker adv-a handled %d advisories, adv-b %d", len(a.settlements()), len(b.settlements()))
}

// TestMaxDeliveriesReportedOnce has two workers report the same exhausted
// request at the same moment, as two workers outside one queue group
// would: the event's Nats-Msg-Id stores it once.
func TestMaxDeliveriesReportedOnce(t *testing.T) {
	env := startServer(t)
	a, b := newWorker(t, env, "adv-a"), newWorker(t, env, "adv-b")
	for _, tw := range []*testWorker{a, b} {
		if _, err := tw.w.subscribeMaxDeliveries(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	adv := deliveryAdvisory{Stream: messages.RequestsStream, Consumer: bus.HostProvisionConsumer(goneHost), StreamSeq: 7, Deliveries: 2}
	var wg sync.WaitGroup
	for _, tw := range []*testWorker{a, b} {
		wg.Go(func() {
			if err := tw.w.reportExhausted(context.Background(), "twice-1", adv, errors.New("exhausted")); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	// A late third report finds the job ended.
	if err := a.w.reportExhausted(context.Background(), "twice-1", adv, errors.New("exhausted")); err != nil {
		t.Fatal(err)
	}
	if n := len(eventsOf(t, env.js, "twice-1")); n != 1 {
		t.Fatalf("%d failed events stored, want 1", n)
	}
}

// TestMaxDeliveriesWaitsForTheServingWorker: an advisory for a request that
// this worker still handles (it lost its connection past ack_wait, say)
// waits until the worker has settled the request. Handed back, the request
// is then reported and deleted; acked late, it is gone and nothing more
// happens.
func TestMaxDeliveriesWaitsForTheServingWorker(t *testing.T) {
	for _, tt := range []struct {
		name     string
		ack      bool
		wantCode messages.ErrorCode // of the job's only event, "" for none
	}{
		{"handed back", false, messages.CodeMaxDeliveries},
		{"acked late", true, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			env := startServer(t)
			advisories := watchAdvisories(t, env)
			a := newWorker(t, env, "adv-a")
			a.run(t)
			ctx := context.Background()

			ack, err := env.js.Publish(ctx, messages.HostProvisionSubject(goneHost), provisionData(t, "slow-1"))
			if err != nil {
				t.Fatal(err)
			}
			cons, err := env.js.Consumer(ctx, messages.RequestsStream, bus.HostProvisionConsumer(goneHost))
			if err != nil {
				t.Fatal(err)
			}
			var final jetstream.Msg
			var settled func()
			for delivery := 1; delivery <= 2; delivery++ {
				batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
				if err != nil {
					t.Fatal(err)
				}
				for msg := range batch.Messages() {
					if delivery == 2 {
						// The worker takes the final delivery, and does
						// not settle it in time.
						final, settled = msg, a.w.serving(ctx, msg)
						continue
					}
					if err := msg.Nak(); err != nil {
						t.Fatal(err)
					}
				}
			}
			if settled == nil {
				t.Fatal("no second delivery")
			}
			// Past ack_wait the server gives the message up, and announces
			// it when the consumer would deliver it next: at the next pull.
			time.Sleep(3500 * time.Millisecond)
			batch, err := cons.Fetch(1, jetstream.FetchMaxWait(time.Second))
			if err != nil {
				t.Fatal(err)
			}
			for msg := range batch.Messages() {
				t.Fatalf("a third delivery with MaxDeliver 2: %s", msg.Subject())
			}
			waitFor(t, "the advisory", func() bool { return advisories() == 1 })
			time.Sleep(500 * time.Millisecond)
			if requestGone(t, env.js, ack.Sequence) || len(eventsOf(t, env.js, "slow-1")) != 0 {
				t.Fatal("the request was ended while its worker still handled it")
			}
			if tt.ack {
				actx, cancel := context.WithTimeout(ctx, 5*time.Second)
				err := final.DoubleAck(actx)
				cancel()
				if err != nil {
					t.Fatalf("late ack: %v", err)
				}
			}
			// A nak could not redeliver it any more; nothing is sent.
			settled()
			if !requestGone(t, env.js, ack.Sequence) {
				t.Fatal("the exhausted request is still in the stream")
			}
			evs := eventsOf(t, env.js, "slow-1")
			if tt.wantCode == "" {
				if len(evs) != 0 {
					t.Fatalf("%d events for a request acked late", len(evs))
				}
				return
			}
			if len(evs) != 1 {
				t.Fatalf("%d events, want one failed", len(evs))
			}
			if ev, _ := messages.DecodeEvent(evs[0].Data); ev.Error == nil || ev.Error.Code != tt.wantCode {
				t.Fatalf("event %+v", ev)
			}
		})
	}
}

// TestMaxDeliveriesRetriedAfterAnOutage: the advisory of an exhausted
// request comes while the job's events cannot be read (here the event
// stream is gone, as when NATS lost its quorum). The server sends the
// advisory once, so the worker handles it again until it can: once the
// stream is back, the job gets its failed event and the request is
// deleted. Before, the advisory was dropped after one failure and the job
// never ended (soak, seed 231082382223670582).
func TestMaxDeliveriesRetriedAfterAnOutage(t *testing.T) {
	env := startServer(t)
	advisories := watchAdvisories(t, env)
	a := newWorker(t, env, "adv-a")
	a.run(t)
	ctx := context.Background()
	if err := env.js.DeleteStream(ctx, messages.EventsStream); err != nil {
		t.Fatal(err)
	}
	seq := poison(t, env, messages.HostProvisionSubject(goneHost), bus.HostProvisionConsumer(goneHost), provisionData(t, "outage-1"))
	waitFor(t, "the advisory", func() bool { return advisories() >= 1 })
	waitFor(t, "a failed handling", func() bool {
		for _, s := range a.settlements() {
			if s.Outcome == "kept" && s.JobID == "outage-1" {
				return true
			}
		}
		return false
	})
	if requestGone(t, env.js, seq) {
		t.Fatal("the request was deleted while its job's events could not be read")
	}
	if _, err := bus.Ensure(ctx, env.js, bus.Topology{Host: goneHost, AckWait: 3 * time.Second, MaxDeliver: 2}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the request deleted", func() bool { return requestGone(t, env.js, seq) })
	evs := eventsOf(t, env.js, "outage-1")
	if len(evs) != 1 {
		t.Fatalf("%d events of the job, want its failed", len(evs))
	}
	if ev, err := messages.DecodeEvent(evs[0].Data); err != nil || ev.State != messages.StateFailed || ev.Error == nil || ev.Error.Code != messages.CodeMaxDeliveries {
		t.Fatalf("event %+v (%v), want failed max_deliveries", ev, err)
	}
}
