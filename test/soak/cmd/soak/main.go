// Command soak runs the randomized fault-injection soak of the libvirt
// worker (test/soak) and checks its whole history: go tool task soak.
//
//	soak -seed 1 -duration 90s            # one run; the seed replays it
//	soak -check .cache/soak/<run>/history.json   # judge a recorded run again
//	soak -real tiny-linux -duration 90s   # a short run on real guests
//	soak -measure-sync                    # publish cost of sync_interval settings
package main

import (
	"context"
	crand "crypto/rand"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/stretchy-ci/libvirt-worker/test/soak"
	"github.com/stretchy-ci/libvirt-worker/test/soak/check"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "soak: %v\n", err)
		os.Exit(1)
	}
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

func run() error {
	var (
		seed       = flag.Int64("seed", 0, "seed of the run's jobs and faults (0: a random one, printed)")
		duration   = flag.Duration("duration", 90*time.Second, "how long jobs are submitted; the soak then drains")
		rate       = flag.Float64("rate", 3, "jobs submitted per second")
		faultEvery = flag.Duration("fault-every", 4*time.Second, "mean time between faults (0: none)")
		faults     = flag.String("faults", "", "comma-separated fault kinds to inject (default: all)")
		dir        = flag.String("dir", ".cache/soak", "directory of the runs' logs, NATS stores and histories")
		workerBin  = flag.String("worker", "bin/soak-worker", "worker binary (built with -tags soak unless -real)")
		natsBin    = flag.String("nats-server", "bin/nats-server", "nats-server binary")
		corpus     = flag.String("corpus", "pkg/messages/testdata/bad", "bad-request corpus")
		syncSet    = flag.String("sync", soak.RecommendedSync, "the NATS nodes' jetstream sync_interval (empty: the server's default)")
		parallel   = flag.Int("parallelism", 3, "every worker's --parallelism")
		maxVMs     = flag.Int("max-vms", 8, "every worker's --max-vms")
		realImage  = flag.String("real", "", "run real guests of this image on qemu:///system with the real guest agent")
		checkFile  = flag.String("check", "", "only check this recorded history")
		jobs       = flag.String("job", "", "with -check: print the history of these comma-separated jobs instead")
		report     = flag.String("report", "", "write the run's figures into this file's soak section (docs/reliability.md)")
		measure    = flag.Bool("measure-sync", false, "measure the event stream's publish rate and latency with sync_interval default and always, and print a table")
	)
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *checkFile != "" {
		f, err := os.Open(*checkFile)
		if err != nil {
			return err
		}
		defer f.Close()
		h, err := check.Read(f)
		if err != nil {
			return err
		}
		if *jobs != "" {
			for _, id := range strings.Split(*jobs, ",") {
				check.PrintJob(os.Stdout, h, id)
			}
			return nil
		}
		return verdict(h, "")
	}
	if *measure {
		return soak.MeasureSync(ctx, soak.MeasureConfig{NATSBin: *natsBin, Dir: filepath.Join(*dir, "measure-sync"), Logf: logf}, os.Stdout)
	}
	if *seed == 0 {
		var b [8]byte
		_, _ = crand.Read(b[:])
		*seed = int64(binary.LittleEndian.Uint64(b[:]) >> 1)
	}
	cfg := soak.Config{
		Seed: *seed, Duration: *duration, Rate: *rate, FaultEvery: *faultEvery,
		WorkerBin: *workerBin, NATSBin: *natsBin, Corpus: *corpus, Sync: *syncSet,
		Parallelism: *parallel, MaxVMs: *maxVMs, Real: *realImage, Logf: logf,
	}
	for _, k := range strings.Split(*faults, ",") {
		if k = strings.TrimSpace(k); k != "" {
			cfg.Faults = append(cfg.Faults, check.FaultKind(k))
		}
	}
	name := fmt.Sprintf("%s-seed%d", time.Now().UTC().Format("20060102-150405"), *seed)
	if *realImage != "" {
		name += "-real"
	}
	cfg.Dir = filepath.Join(*dir, name)
	logf("soak: seed %d (replay with -seed %d), logs in %s", *seed, *seed, cfg.Dir)
	h, err := soak.Run(ctx, cfg)
	if err != nil {
		return err
	}
	path := filepath.Join(cfg.Dir, "history.json")
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := h.Write(f); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	logf("soak: history in %s (check it again with -check %s)", path, path)
	if ctx.Err() != nil {
		// The soak stopped submitting and drained, so that it leaves
		// nothing behind; a shortened run is no soak of its duration.
		err := verdict(h, "")
		return errors.Join(fmt.Errorf("interrupted (seed %d): no figures written", *seed), err)
	}
	return verdict(h, *report)
}

// verdict checks h, prints the report and fails when a promise broke.
func verdict(h *check.History, report string) error {
	r := check.Check(h)
	r.Print(os.Stdout, h)
	if report != "" {
		if err := soak.WriteReport(report, h, r); err != nil {
			return err
		}
		logf("soak: figures written to %s", report)
	}
	if n := len(r.Violations); n > 0 {
		return fmt.Errorf("%d violations (seed %d)", n, h.Seed)
	}
	return nil
}
