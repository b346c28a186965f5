package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/internal/worker"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

func newLogger(format, level string) *slog.Logger {
	var lv slog.Level
	_ = lv.UnmarshalText([]byte(level))
	opts := &slog.HandlerOptions{Level: lv}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

func runCommand(ctx context.Context, args []string) error {
	var cfg Config
	fs := flag.NewFlagSet("worker run", flag.ContinueOnError)
	cfg.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	log := newLogger(cfg.LogFormat, cfg.LogLevel)
	// Test only (docs/reliability.md): die by SIGKILL at a lifecycle point,
	// as a crash or power loss would, or with STRETCHY_FAULT_ACTION=stop
	// freeze by SIGSTOP, as a stalled host would, until SIGCONT;
	// deliberately no flag.
	sig := syscall.SIGKILL
	if os.Getenv("STRETCHY_FAULT_ACTION") == "stop" {
		sig = syscall.SIGSTOP
	}
	faults, err := lifecycle.ParseFault(os.Getenv("STRETCHY_FAULT"), func(point string) {
		log.Warn("fault injected, signalling the worker", "point", point, "signal", sig.String())
		_ = syscall.Kill(os.Getpid(), sig)
		// The signal stops the threads a moment later; this goroutine
		// must not take a step in that moment.
		time.Sleep(100 * time.Millisecond)
	})
	if err != nil {
		return fmt.Errorf("STRETCHY_FAULT: %w", err)
	}
	if faults != nil {
		log.Warn("fault injection armed; this worker will signal itself", "fault", os.Getenv("STRETCHY_FAULT"), "signal", sig.String())
	}

	natsURL := cfg.NATSURL
	if natsURL == "" {
		if err := os.MkdirAll(cfg.NATSDataDir, 0o700); err != nil {
			return fmt.Errorf("nats data dir: %w", err)
		}
		srv, err := embedded.Start(embedded.Options{StoreDir: cfg.NATSDataDir, Port: cfg.NATSPort})
		if err != nil {
			return err
		}
		defer func() {
			srv.Shutdown()
			srv.WaitForShutdown()
		}()
		natsURL = srv.ClientURL()
		log.Info("started embedded nats", "url", natsURL, "data_dir", cfg.NATSDataDir)
	}

	nc, js, err := connectNATS(natsURL, cfg.NATS, natsClient{
		Name: "stretchy-libvirt-worker " + cfg.Host, Log: log, Reconnect: true,
	})
	if err != nil {
		return err
	}
	defer nc.Drain()
	ensureCtx, stopEnsure := nc.failFast(ctx)
	consumers, err := bus.Ensure(ensureCtx, js, bus.Topology{
		Host: cfg.Host, EventsMaxAge: cfg.EventsMaxAge, RequestsMaxAge: cfg.RequestsMaxAge,
		AckWait: cfg.AckWait, MaxDeliver: cfg.MaxDeliver, Replicas: cfg.Replicas,
	})
	var claims *bus.Claims
	if err == nil {
		claims, err = bus.OpenClaims(ensureCtx, js, bus.Topology{Host: cfg.Host, AckWait: cfg.AckWait, Replicas: cfg.Replicas})
	}
	stopEnsure()
	if err != nil {
		return nc.explain(err)
	}

	// The link reconnects the same connection when libvirtd restarts, for
	// as long as the worker runs, including its shutdown grace.
	link := provision.NewLink(cfg.LibvirtURI, provision.LinkOptions{
		OnState: func(connected bool, err error) {
			switch {
			case connected:
				log.Info("libvirt connection restored", "libvirt_uri", cfg.LibvirtURI)
			case err != nil:
				log.Warn("libvirt reconnect failed", "libvirt_uri", cfg.LibvirtURI, "error", err)
			default:
				log.Warn("libvirt connection lost", "libvirt_uri", cfg.LibvirtURI)
			}
		},
	})
	if err := link.Connect(ctx); err != nil {
		return err
	}
	linkCtx, stopLink := context.WithCancel(context.WithoutCancel(ctx))
	var linkWG conc.WaitGroup
	linkWG.Go(func() {
		if err := link.Run(linkCtx); err != nil && linkCtx.Err() == nil {
			log.Error("libvirt connection", "error", err)
		}
	})
	defer func() {
		stopLink()
		linkWG.Wait()
		_ = link.Close()
	}()
	lv := link.Libvirt()

	pub := bus.NewPublisher(js)
	// One set of operation slots for the requests the worker pulls and
	// the teardowns machines begin by themselves.
	slots := worker.NewSlots(cfg.Parallelism)
	life := lifecycle.New(lifecycle.Config{
		Host:     cfg.Host,
		Machines: provision.New(lv, provision.Options{DomainType: cfg.DomainType, Link: link}),
		Agent:    qga.New(lv, qga.Options{Caller: link}),
		Events:   pub,
		History:  pub,
		Journal:  pub,
		Faults:   faults,
		Claims:   claims,
		ClaimTTL: bus.ClaimTTL(cfg.AckWait),
		Slots:    slots,
		Report: func(op, jobID string, err error) {
			log.Error("background work failed, will retry", "op", op, "job_id", jobID, "error", err)
		},
	})
	defer life.Close()
	w := worker.New(worker.Config{
		Parallelism: cfg.Parallelism, MaxVMs: cfg.MaxVMs, AckWait: cfg.AckWait,
		MaxDeliver: cfg.MaxDeliver, ShutdownGrace: cfg.ShutdownGrace, Faults: faults,
		NATS: nc.Conn, Slots: slots,
		// Often enough to renew every claim within a third of its TTL.
		WatchInterval: min(2*time.Second, bus.ClaimTTL(cfg.AckWait)/3),
		OnSettle: func(s worker.Settlement) {
			attrs := []any{"op", s.Op, "job_id", s.JobID, "attempt", s.Attempt, "outcome", s.Outcome}
			switch {
			case s.Op != "provision" && s.Op != "teardown":
				log.Error("background work failed, will retry", "op", s.Op, "job_id", s.JobID, "error", s.Err)
			case s.Err == nil:
				log.Info("request settled", attrs...)
			case s.Outcome == "left":
				log.Warn("request left to the host holding the job's claim", append(attrs, "error", s.Err)...)
			case s.Outcome == "term":
				log.Warn("request refused", append(attrs, "error", s.Err)...)
			default:
				log.Error("request failed", append(attrs, "error", s.Err)...)
			}
		},
	}, consumers, life)

	log.Info("worker started", "host", cfg.Host, "libvirt_uri", cfg.LibvirtURI,
		"parallelism", cfg.Parallelism, "max_vms", cfg.MaxVMs, "nats_url", redactURL(natsURL))
	if err := w.Run(ctx); err != nil {
		return err
	}
	st := w.Stats()
	log.Info("worker stopped", "provisions", st.Provisions, "teardowns", st.Teardowns, "running_machines", life.Active())
	return nil
}

// redactURL hides credentials in NATS URLs before they are logged.
func redactURL(s string) string {
	parts := strings.Split(s, ",")
	for i, p := range parts {
		if at := strings.LastIndex(p, "@"); at >= 0 {
			if scheme := strings.Index(p, "://"); scheme >= 0 && scheme < at {
				parts[i] = p[:scheme+3] + "REDACTED@" + p[at+1:]
			}
		}
	}
	return strings.Join(parts, ",")
}
