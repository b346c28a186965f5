package client

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// BenchmarkReplay measures replaying stored events for
// docs/benchmarks.md, as worker events and the lifecycle's journal do
// (read=ReadEvents: the callback loop every replay of this package is)
// and as a caller of Client.Events does (read=Events: the same loop
// behind the iterator), in events/s and in the bytes and allocations per
// event of the whole process over the timed replays, which, with the
// server in a process of its own, are the reader's alone.

// replayProfile, when set, makes BenchmarkReplay/server=process/read=ReadEvents
// write a CPU profile and an allocation profile of its timed replays alone
// (not of storing the events first) into that directory: replay-cpu.pprof
// and replay-allocs.pprof, the latter to be read against
// replay-allocs-base.pprof (go tool pprof -sample_index=alloc_space -base
// replay-allocs-base.pprof ...).
var replayProfile = flag.String("replay-profile", "", "directory for the profiles of BenchmarkReplay's timed replays through the callback loop (read=ReadEvents)")

// replayEvents is how many events BenchmarkReplay stores and replays.
const replayEvents = 100000

// helperServerEnv names the directory a test binary run as
// TestHelperNATSServer serves JetStream from.
const helperServerEnv = "STRETCHY_CLIENT_HELPER_NATS_DIR"

// TestHelperNATSServer is not a test: run by startJetStreamProcess as a
// process of its own, it serves JetStream until its standard input closes
// or it is signalled. Otherwise it skips.
func TestHelperNATSServer(t *testing.T) {
	dir := os.Getenv(helperServerEnv)
	if dir == "" {
		t.Skip("the NATS server process of startJetStreamProcess")
	}
	srv, err := embedded.Start(embedded.Options{StoreDir: dir, Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	fmt.Println(srv.ClientURL())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	gone := make(chan struct{})
	go func() {
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		close(gone)
	}()
	select {
	case <-sigs:
	case <-gone:
	}
	srv.Shutdown()
	srv.WaitForShutdown()
}

// startJetStreamProcess is startJetStream with the server in a process of
// its own, as "worker events" or an orchestrator meets it.
func startJetStreamProcess(tb testing.TB) jetstream.JetStream {
	tb.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperNATSServer$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperServerEnv+"="+tb.TempDir())
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		_ = stdin.Close()
		_ = cmd.Wait()
	})
	url, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		tb.Fatalf("the NATS server process: %v", err)
	}
	nc, err := nats.Connect(strings.TrimSpace(url))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		tb.Fatal(err)
	}
	createEventStream(tb, js)
	return js
}

// storeLikeWorker stores n events of n/10 jobs, each passing the states
// of a successful life in order, with the headers Publisher.Append gives
// them (message id, expected stream, expected last sequence of the job),
// which a reader receives with every event. It publishes asynchronously
// in batches, into an event stream nothing else writes to, so that each
// event's condition (the stream position of its job's previous event) is
// known beforehand.
func storeLikeWorker(tb testing.TB, js jetstream.JetStream, n int) {
	tb.Helper()
	ctx := context.Background()
	s, err := js.Stream(ctx, messages.EventsStream)
	if err != nil {
		tb.Fatal(err)
	}
	if s.CachedInfo().State.Msgs != 0 {
		tb.Fatal("storeLikeWorker needs an empty event stream")
	}
	const batch = 256
	states := messages.States[:10]
	for start := 0; start < n; start += batch {
		var acks []jetstream.PubAckFuture
		for i := start; i < min(start+batch, n); i++ {
			job := fmt.Sprintf("bench-%d", i/10)
			ev := messages.Event{
				V: 1, JobID: job, Host: hosts[(i/10)%len(hosts)], Image: "img", Domain: messages.DomainName(job),
				State: states[i%10], Time: time.Now().UTC(), Seq: uint64(i%10 + 1), Attempt: 1,
			}
			data, err := messages.Marshal(&ev)
			if err != nil {
				tb.Fatal(err)
			}
			after := uint64(0) // stream sequences count from 1
			if i%10 > 0 {
				after = uint64(i)
			}
			ack, err := js.PublishAsync(messages.EventSubject(ev.Host, ev.JobID, ev.State), data,
				jetstream.WithMsgID(fmt.Sprintf("%s:%s:1", job, ev.State)),
				jetstream.WithExpectStream(messages.EventsStream),
				jetstream.WithExpectLastSequenceForSubject(after, messages.EventFilter("", job, "")))
			if err != nil {
				tb.Fatal(err)
			}
			acks = append(acks, ack)
		}
		for _, ack := range acks {
			t := time.NewTimer(2 * time.Minute)
			select {
			case <-ack.Ok():
			case err := <-ack.Err():
				tb.Fatalf("store event: %v", err)
			case <-t.C:
				tb.Fatal("store event: no ack")
			}
			t.Stop()
		}
	}
}

// BenchmarkReplay measures replaying 100,000 stored events.
// read=ReadEvents is the loop of every replay (Client.read, which
// internal/bus's ReadEvents was before it moved here) with a callback, as
// worker events used it; read=Events is the same replay through the
// iterator of Client.Events, what a caller of the library sees; read=plain
// reads the same consumer decoding every event with messages.DecodeEvent
// and Msg.Metadata, as ReadEvents did before it had a decoder of its own;
// read=raw only receives the messages, which is what the NATS client
// costs whatever the reader does. server=process runs the server in a
// process of its own, so that the figures are the reader's;
// server=in-process, as the worker's embedded server is, counts the
// server's allocations as well.
func BenchmarkReplay(b *testing.B) {
	readers := []struct {
		name string
		read func(testing.TB, jetstream.JetStream) int
	}{
		{"raw", replayRaw},
		{"plain", replayPlain},
		{"ReadEvents", replayCount},
		{"Events", replayIterator},
	}
	for _, server := range []struct {
		name  string
		start func(testing.TB) jetstream.JetStream
	}{
		{"process", startJetStreamProcess},
		{"in-process", startJetStream},
	} {
		b.Run("server="+server.name, func(b *testing.B) {
			js := server.start(b)
			storeLikeWorker(b, js, replayEvents)
			for _, r := range readers {
				if server.name != "process" && r.name != "ReadEvents" && r.name != "Events" {
					continue
				}
				b.Run("read="+r.name, func(b *testing.B) {
					stop := func() {}
					if server.name == "process" && r.name == "ReadEvents" {
						stop = startReplayProfile(b)
					}
					var before, after runtime.MemStats
					runtime.GC()
					runtime.ReadMemStats(&before)
					b.ResetTimer()
					for range b.N {
						if got := r.read(b, js); got != replayEvents {
							b.Fatalf("replayed %d events, want %d", got, replayEvents)
						}
					}
					b.StopTimer()
					runtime.ReadMemStats(&after)
					stop()
					events := float64(replayEvents * b.N)
					b.ReportMetric(events/b.Elapsed().Seconds(), "events/s")
					b.ReportMetric(float64(after.TotalAlloc-before.TotalAlloc)/events, "B/event")
					b.ReportMetric(float64(after.Mallocs-before.Mallocs)/events, "allocs/event")
				})
			}
		})
	}
}

// BenchmarkReplayPaired measures the library's iterator against the
// callback loop behind it in pairs: each iteration replays the 100,000
// stored events once through each, in turns that alternate which goes
// first, so that a shared machine's load falls on both alike. It reports
// each one's events/s over all its replays and "iterator/callback", the
// median over the pairs of the iterator's rate over the callback's (the
// target of docs/benchmarks.md: at least 0.90).
func BenchmarkReplayPaired(b *testing.B) {
	js := startJetStreamProcess(b)
	storeLikeWorker(b, js, replayEvents)
	var ratios []float64
	var spent [2]time.Duration
	readers := [2]func(testing.TB, jetstream.JetStream) int{replayCount, replayIterator}
	b.ResetTimer()
	for i := range b.N {
		var took [2]time.Duration
		for k := range 2 {
			r := (i + k) % 2 // 0: callback, 1: iterator
			start := time.Now()
			if got := readers[r](b, js); got != replayEvents {
				b.Fatalf("replayed %d events, want %d", got, replayEvents)
			}
			took[r] = time.Since(start)
		}
		spent[0] += took[0]
		spent[1] += took[1]
		ratios = append(ratios, took[0].Seconds()/took[1].Seconds())
	}
	b.StopTimer()
	slices.Sort(ratios)
	median := ratios[len(ratios)/2]
	if len(ratios)%2 == 0 {
		median = (ratios[len(ratios)/2-1] + ratios[len(ratios)/2]) / 2
	}
	events := float64(replayEvents * b.N)
	b.ReportMetric(events/spent[0].Seconds(), "callback-events/s")
	b.ReportMetric(events/spent[1].Seconds(), "iterator-events/s")
	b.ReportMetric(median, "iterator/callback")
}

// replayCount replays every stored event through the callback loop and
// counts them, as a reader that looks at each and keeps none does.
func replayCount(tb testing.TB, js jetstream.JetStream) int {
	n := 0
	err := New(js).read(context.Background(), readOptions{filter: messages.EventFilter("", "", "")},
		func(_, _ uint64, ev messages.Event, err error) error {
			if err != nil {
				return err
			}
			if ev.JobID != "" {
				n++
			}
			return nil
		})
	if err != nil {
		tb.Fatal(err)
	}
	return n
}

// replayIterator replays every stored event through Client.Events and
// counts them, as replayCount does.
func replayIterator(tb testing.TB, js jetstream.JetStream) int {
	n := 0
	for ev, err := range New(js).Events(context.Background(), Query{}) {
		if err != nil {
			tb.Fatal(err)
		}
		if ev.JobID != "" {
			n++
		}
	}
	return n
}

// replayMessages passes every stored event message to fn, through the
// ordered consumer the replay uses, and returns how many there were.
func replayMessages(tb testing.TB, js jetstream.JetStream, fn func(jetstream.Msg) error) int {
	ctx := context.Background()
	cons, err := js.OrderedConsumer(ctx, messages.EventsStream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{messages.EventFilter("", "", "")}, DeliverPolicy: jetstream.DeliverAllPolicy,
	})
	if err != nil {
		tb.Fatal(err)
	}
	it, err := cons.Messages()
	if err != nil {
		tb.Fatal(err)
	}
	defer it.Stop()
	for n := 1; ; n++ {
		msg, err := it.Next()
		if err != nil {
			tb.Fatal(err)
		}
		if err := fn(msg); err != nil {
			tb.Fatal(err)
		}
		if n == replayEvents {
			return n
		}
	}
}

func replayRaw(tb testing.TB, js jetstream.JetStream) int {
	return replayMessages(tb, js, func(jetstream.Msg) error { return nil })
}

func replayPlain(tb testing.TB, js jetstream.JetStream) int {
	return replayMessages(tb, js, func(msg jetstream.Msg) error {
		if _, err := msg.Metadata(); err != nil {
			return err
		}
		_, err := messages.DecodeEvent(msg.Data())
		return err
	})
}

// startReplayProfile starts the profiles that -replay-profile asks for and
// returns what stops and writes them.
func startReplayProfile(tb testing.TB) (stop func()) {
	tb.Helper()
	dir := *replayProfile
	if dir == "" {
		return func() {}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	writeAllocs := func(name string) {
		runtime.GC()
		f, err := os.Create(dir + "/" + name)
		if err != nil {
			tb.Fatal(err)
		}
		defer f.Close()
		if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
			tb.Fatal(err)
		}
	}
	writeAllocs("replay-allocs-base.pprof")
	cpu, err := os.Create(dir + "/replay-cpu.pprof")
	if err != nil {
		tb.Fatal(err)
	}
	if err := pprof.StartCPUProfile(cpu); err != nil {
		tb.Fatal(err)
	}
	return func() {
		pprof.StopCPUProfile()
		_ = cpu.Close()
		writeAllocs("replay-allocs.pprof")
	}
}
