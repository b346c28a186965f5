// Command bench runs the benchmarks of test/bench and writes
// docs/benchmarks.md (go tool task bench). It is a harness for the
// worker's measurements, not part of the product.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/stretchy-ci/libvirt-worker/test/bench"
)

func main() {
	if len(os.Args) == 3 && os.Args[1] == bench.ServeNATSCommand {
		if err := bench.ServeNATS(os.Args[2]); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	var cfg bench.Config
	cfg.Register(flag.CommandLine)
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	start := time.Now()
	if err := bench.Run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "bench: done in %s\n", time.Since(start).Round(time.Second))
}
