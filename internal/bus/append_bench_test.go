package bus

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// BenchmarkAppend measures publishing lifecycle events for
// docs/benchmarks.md, in events/s; the replay's benchmark is
// pkg/client's BenchmarkReplay.

// helperServerEnv names the directory a test binary run as
// TestHelperNATSServer serves JetStream from.
const helperServerEnv = "STRETCHY_BUS_HELPER_NATS_DIR"

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
// its own, as a worker on another host meets it.
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
	if _, err := Ensure(context.Background(), js, Topology{Host: "h0"}); err != nil {
		tb.Fatal(err)
	}
	return js
}

// appendRuns numbers BenchmarkAppend's runs, which share a server, so
// that each publishes jobs of its own.
var appendRuns atomic.Int64

// BenchmarkAppend measures publishing lifecycle events as the lifecycle
// does: each job's events one after the other through Publisher.Append,
// each conditional on the job's previous one and waiting for its ack,
// with the given number of jobs at once. One iteration is one event.
func BenchmarkAppend(b *testing.B) {
	for _, server := range []struct {
		name  string
		start func(testing.TB) jetstream.JetStream
	}{
		{"process", startJetStreamProcess},
		{"in-process", startJetStream},
	} {
		b.Run("server="+server.name, func(b *testing.B) {
			js := server.start(b)
			pub := NewPublisher(js)
			for _, jobs := range []int{1, 16, 64} {
				b.Run(fmt.Sprintf("jobs=%d", jobs), func(b *testing.B) {
					ctx := context.Background()
					run := appendRuns.Add(1)
					var next atomic.Int64
					var failed atomic.Value
					b.ResetTimer()
					var wg conc.WaitGroup
					for w := range jobs {
						wg.Go(func() {
							// A job's life of ten events, then the next job.
							var seq, pos uint64
							job, lives := "", 0
							for next.Add(1) <= int64(b.N) {
								if job == "" || seq == 10 {
									lives++
									job, seq, pos = fmt.Sprintf("append%d-w%d-%d", run, w, lives), 0, 0
								}
								st := messages.States[seq]
								ev := messages.Event{V: 1, JobID: job, Host: "h0", Image: "img", State: st,
									Time: time.Now().UTC(), Seq: seq + 1, Attempt: 1}
								var err error
								if seq, pos, err = pub.Append(ctx, ev, fmt.Sprintf("%s:%s:1", job, st), pos); err != nil {
									failed.Store(err)
									return
								}
							}
						})
					}
					wg.Wait()
					b.StopTimer()
					if err, _ := failed.Load().(error); err != nil {
						b.Fatal(err)
					}
					b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
				})
			}
		})
	}
}
