package soak

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// RecommendedSync is the jetstream sync_interval docs/fleet.md recommends
// for the fleet's cluster, which the soak's cluster runs: every write is
// flushed and synced before it is acknowledged (with replicas, when the
// Raft log is flushed), so that nodes dying together lose no
// acknowledged event, request or claim.
const RecommendedSync = "always"

// MeasureConfig configures MeasureSync.
type MeasureConfig struct {
	NATSBin string
	Dir     string
	// Rounds is how many times each setting is measured, in turn.
	Rounds int
	// Serial is how many events one job appends in a row; Jobs and
	// PerJob how many jobs append at once, and how many events each.
	Serial, Jobs, PerJob int
	Logf                 func(string, ...any)
}

// syncRun is one measurement of one setting.
type syncRun struct {
	serialRate, parallelRate float64
	serialP50, serialP99     time.Duration
	parallelP50, parallelP99 time.Duration
}

// MeasureSync measures what the event stream costs with the cluster's
// sync_interval at the server's default (2 minutes) and at always, side
// by side: a fresh 3-node cluster per run, the event stream made as the
// workers make it (3 replicas), then events appended as the lifecycle
// appends them (bus.Publisher.Append: each conditional on the job's
// previous one, waiting for its ack), by one job in a row and by many
// jobs at once. It writes a Markdown table of medians (minimum–maximum).
func MeasureSync(ctx context.Context, cfg MeasureConfig, w io.Writer) error {
	if cfg.Rounds == 0 {
		cfg.Rounds = 5
	}
	if cfg.Serial == 0 {
		cfg.Serial = 1000
	}
	if cfg.Jobs == 0 {
		cfg.Jobs, cfg.PerJob = 16, 100
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	settings := []string{"", "always"}
	runs := map[string][]syncRun{}
	for round := range cfg.Rounds {
		for _, set := range settings {
			dir := filepath.Join(cfg.Dir, fmt.Sprintf("%s-%d", syncName(set), round))
			_ = os.RemoveAll(dir)
			r, err := measureOnce(ctx, cfg, dir, set)
			if err != nil {
				return fmt.Errorf("sync_interval %s: %w", syncName(set), err)
			}
			cfg.Logf("soak: sync_interval %s, round %d: %.0f events/s in a row (p50 %s), %.0f events/s with %d jobs", syncName(set), round+1,
				r.serialRate, r.serialP50, r.parallelRate, cfg.Jobs)
			runs[set] = append(runs[set], r)
		}
	}
	fmt.Fprintf(w, "| sync_interval | 1 job: events/s | 1 job: ack p50 | 1 job: ack p99 | %d jobs: events/s | %d jobs: ack p50 | %d jobs: ack p99 |\n", cfg.Jobs, cfg.Jobs, cfg.Jobs)
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|")
	for _, set := range settings {
		rs := runs[set]
		col := func(f func(syncRun) float64, unit string) string { return spread(rs, f, unit) }
		ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s |\n", syncName(set),
			col(func(r syncRun) float64 { return r.serialRate }, ""),
			col(func(r syncRun) float64 { return ms(r.serialP50) }, " ms"),
			col(func(r syncRun) float64 { return ms(r.serialP99) }, " ms"),
			col(func(r syncRun) float64 { return r.parallelRate }, ""),
			col(func(r syncRun) float64 { return ms(r.parallelP50) }, " ms"),
			col(func(r syncRun) float64 { return ms(r.parallelP99) }, " ms"))
	}
	fmt.Fprintf(w, "\n%d runs of each, in turn; %d events by one job in a row, then %d jobs appending %d events each at once.\n", cfg.Rounds, cfg.Serial, cfg.Jobs, cfg.PerJob)
	return nil
}

func spread(rs []syncRun, f func(syncRun) float64, unit string) string {
	var v []float64
	for _, r := range rs {
		v = append(v, f(r))
	}
	slices.Sort(v)
	format := "%.0f"
	if unit != "" {
		format = "%.1f"
	}
	return fmt.Sprintf(format+"%s ("+format+"–"+format+")", v[len(v)/2], unit, v[0], v[len(v)-1])
}

func measureOnce(ctx context.Context, cfg MeasureConfig, dir, set string) (syncRun, error) {
	cluster, err := StartCluster(ctx, cfg.NATSBin, dir, 3, set)
	if err != nil {
		return syncRun{}, err
	}
	defer cluster.Stop()
	nc, err := nats.Connect(cluster.URLs(), nats.MaxReconnects(-1))
	if err != nil {
		return syncRun{}, err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return syncRun{}, err
	}
	if err := retry(ctx, 3*time.Minute, func(ctx context.Context) error {
		_, err := bus.Ensure(ctx, js, bus.Topology{Host: "measure", Replicas: 3})
		return err
	}); err != nil {
		return syncRun{}, err
	}
	pub := bus.NewPublisher(js)
	appendEvents := func(job string, n int, lat *[]time.Duration, mu *sync.Mutex) error {
		var seq, pos uint64
		for i := range n {
			ev := messages.Event{V: 1, JobID: job, Host: "measure", State: messages.StateRunning, Time: time.Now().UTC(), Seq: seq + 1, Attempt: 1}
			t := time.Now()
			var err error
			if seq, pos, err = pub.Append(ctx, ev, fmt.Sprintf("%s:%d", job, i), pos); err != nil {
				return err
			}
			d := time.Since(t)
			mu.Lock()
			*lat = append(*lat, d)
			mu.Unlock()
		}
		return nil
	}
	var r syncRun
	var mu sync.Mutex
	// A few events first, so that every replica is placed and warm.
	var warm []time.Duration
	if err := appendEvents("warm", 20, &warm, &mu); err != nil {
		return r, err
	}
	var serial []time.Duration
	start := time.Now()
	if err := appendEvents("serial", cfg.Serial, &serial, &mu); err != nil {
		return r, err
	}
	r.serialRate = float64(cfg.Serial) / time.Since(start).Seconds()
	r.serialP50, r.serialP99 = quantile(serial, 0.5), quantile(serial, 0.99)
	var parallel []time.Duration
	var wg conc.WaitGroup
	errs := make([]error, cfg.Jobs)
	start = time.Now()
	for j := range cfg.Jobs {
		wg.Go(func() { errs[j] = appendEvents(fmt.Sprintf("job-%d", j), cfg.PerJob, &parallel, &mu) })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return r, err
		}
	}
	r.parallelRate = float64(cfg.Jobs*cfg.PerJob) / time.Since(start).Seconds()
	r.parallelP50, r.parallelP99 = quantile(parallel, 0.5), quantile(parallel, 0.99)
	return r, nil
}

func quantile(ds []time.Duration, q float64) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[min(len(s)-1, int(q*float64(len(s))))]
}
