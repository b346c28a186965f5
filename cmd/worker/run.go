package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/internal/metrics"
	"github.com/stretchy-ci/libvirt-worker/internal/worker"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
	"github.com/stretchy-ci/libvirt-worker/pkg/seal"
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
	cfg, _, err := loadConfig("worker run", args)
	if err != nil {
		return err
	}
	log := newLogger(cfg.LogFormat, cfg.LogLevel)
	// The keys first: a key file others could read stops the worker
	// before it takes any request.
	keys, err := seal.LoadDir(cfg.KeysDir)
	if err != nil {
		return fmt.Errorf("--keys-dir: %w", err)
	}
	if cfg.RequireSealed && keys.Len() == 0 {
		return fmt.Errorf("--require-sealed-secrets: no key in --keys-dir %s to open sealed secrets with (worker keys generate)", cfg.KeysDir)
	}
	// Test only (docs/reliability.md): die by SIGKILL at a lifecycle point,
	// as a crash or power loss would, or with STRETCHY_FAULT_ACTION=stop
	// freeze by SIGSTOP, as a stalled host would, until SIGCONT;
	// deliberately no flag.
	sig := syscall.SIGKILL
	if os.Getenv("STRETCHY_FAULT_ACTION") == "stop" {
		sig = syscall.SIGSTOP
	}
	faults, ferr := lifecycle.ParseFault(os.Getenv("STRETCHY_FAULT"), func(point string) {
		log.Warn("fault injected, signalling the worker", "point", point, "signal", sig.String())
		_ = syscall.Kill(os.Getpid(), sig)
		// The signal stops the threads a moment later; this goroutine
		// must not take a step in that moment.
		time.Sleep(100 * time.Millisecond)
	})
	if ferr != nil {
		return fmt.Errorf("STRETCHY_FAULT: %w", ferr)
	}
	if faults != nil {
		log.Warn("fault injection armed; this worker will signal itself", "fault", os.Getenv("STRETCHY_FAULT"), "signal", sig.String())
	}

	natsURL, natsAuth := cfg.NATSURL, cfg.NATS
	if natsURL == "" {
		if err := os.MkdirAll(cfg.NATSDataDir, 0o700); err != nil {
			return fmt.Errorf("nats data dir: %w", err)
		}
		// Anything that can reach the host's loopback can reach the
		// server, guests with user-mode networking too: it takes only
		// its own user, whose seed only root and the worker's user may
		// read (docs/security.md 1.1).
		creds, err := embedded.EnsureCredentials(cfg.NATSDataDir)
		if err != nil {
			return err
		}
		srv, err := embedded.Start(embedded.Options{StoreDir: cfg.NATSDataDir, Port: cfg.NATSPort, NKey: creds.PublicKey()})
		if err != nil {
			return err
		}
		defer func() {
			srv.Shutdown()
			srv.WaitForShutdown()
		}()
		natsURL = srv.ClientURL()
		natsAuth.EmbeddedDir = cfg.NATSDataDir
		log.Info("started embedded nats", "url", natsURL, "data_dir", cfg.NATSDataDir, "credentials", creds.Path())
	}

	nc, js, err := connectNATS(natsURL, natsAuth, workerClient(cfg.Host, cfg.workerInbox(), log))
	if err != nil {
		return err
	}
	defer nc.Drain()
	topo := bus.Topology{
		Host: cfg.Host, EventsMaxAge: cfg.EventsMaxAge, RequestsMaxAge: cfg.RequestsMaxAge,
		AckWait: cfg.AckWait, MaxDeliver: cfg.MaxDeliver, Replicas: cfg.Replicas,
	}
	var consumers bus.Consumers
	var claims *bus.Claims
	var fleet *bus.Fleet
	err = nc.settle(ctx, startupTimeout, log, "streams, consumers and buckets", func(ctx context.Context) error {
		var err error
		if consumers, err = bus.Ensure(ctx, js, topo); err != nil {
			return err
		}
		if claims, err = bus.OpenClaims(ctx, js, bus.Topology{Host: cfg.Host, AckWait: cfg.AckWait, Replicas: cfg.Replicas}); err != nil {
			return err
		}
		fleet, err = bus.OpenFleet(ctx, js, topo)
		return err
	})
	if err != nil {
		return err
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
	// A libvirt connection of its own tells the guest agent's start, so
	// that agent_ready follows it at once (qga.AgentEvents).
	agentEvents := qga.NewAgentEvents(func(ctx context.Context) (*libvirt.Libvirt, error) {
		return provision.Dial(ctx, cfg.LibvirtURI)
	})
	linkWG.Go(func() { _ = agentEvents.Run(linkCtx) })

	pub := bus.NewPublisher(js)
	isolation := guestIsolation(cfg, log)
	machines := provision.New(lv, provision.Options{DomainType: cfg.DomainType, Link: link, Isolation: isolation})
	if err := startIsolation(ctx, machines, isolation, cfg, natsURL, log); err != nil {
		return err
	}
	// What Clone and Remove know of the host's other domains and volumes,
	// kept current by libvirt's events on a connection of its own.
	linkWG.Go(func() {
		_ = machines.Watch(linkCtx, provision.WatchOptions{
			Events:      func(ctx context.Context) (provision.EventConn, error) { return provision.Dial(ctx, cfg.LibvirtURI) },
			OnCheck:     viewLogger(log),
			OnSharedMAC: sharedMACLogger(log),
		})
	})
	// One set of operation slots for the requests the worker pulls and
	// the teardowns machines begin by themselves.
	slots := worker.NewSlots(cfg.Parallelism)
	var w *worker.Worker
	var mx *metrics.Metrics
	agent := qga.New(lv, qga.Options{Caller: link, Events: agentEvents,
		Ready: func(wake qga.Wake) { mx.AgentReady(string(wake)) }})
	mx = metrics.New(workerSource{&w}, metrics.Probes{
		NATSConnected:    nc.IsConnected,
		LibvirtConnected: link.Connected,
		AgentEvents:      agent.EventsLive,
		NATS:             nc.FlushWithContext,
		Libvirt: func(ctx context.Context) error {
			return link.Call(ctx, 5*time.Second, func() error { _, err := lv.ConnectGetLibVersion(); return err })
		},
	})
	var guest lifecycle.Agent = agent
	if fake, err := fakeGuestAgent(lv, link); err != nil {
		return err
	} else if fake != nil {
		guest = fake
		log.Warn("fake guest agent: this worker runs no runner in any guest (soak build)")
	}
	var pool *lifecycle.PoolConfig
	if len(cfg.Warm) > 0 {
		pool = &lifecycle.PoolConfig{Machines: machines, Ready: cfg.Warm.ready(), Saved: cfg.Warm.saved(), Clock: agent,
			MaxReadyAge: cfg.WarmMaxAge, RetireOnClose: cfg.WarmRetire, MaxVMs: cfg.MaxVMs}
	}
	consoleDir := cfg.consoleCapture()
	if consoleDir != "" {
		if err := prepareConsoleDir(consoleDir); err != nil {
			return fmt.Errorf("--console-dir: %w", err)
		}
	}
	life := lifecycle.New(lifecycle.Config{
		Pool: pool,
		Resources: lifecycle.Resources{
			MaxVCPUs: cfg.MaxVCPUsPerMachine, MaxMemoryMiB: cfg.MaxMemoryPerMachine,
			HostVCPUs: cfg.HostVCPUs, HostMemoryMiB: cfg.HostMemory, MaxScratchGiB: cfg.MaxScratchGiB,
		},
		Sizes:      machines,
		ConsoleDir: consoleDir,
		Holds:      machines,
		MaxHold:    cfg.MaxHold,
		Host:       cfg.Host,
		Machines:   machines,
		Agent:      guest,
		Events:     mx.Events(pub),
		History:    pub,
		Journal:    pub,
		Faults:     faults,
		Claims:     claims,
		ClaimTTL:   bus.ClaimTTL(cfg.AckWait),
		Slots:      slots,
		Report: func(op, jobID string, err error) {
			log.Error("background work failed, will retry", "op", op, "job_id", jobID, "error", err)
		},
	})
	defer life.Close()
	w = worker.New(worker.Config{
		Parallelism: cfg.Parallelism, MaxVMs: cfg.MaxVMs, AckWait: cfg.AckWait,
		MaxDeliver: cfg.MaxDeliver, ShutdownGrace: cfg.ShutdownGrace, Faults: faults,
		NATS: nc.Conn, Slots: slots, Keys: keys, RequireSealed: cfg.RequireSealed,
		// Only operators send control requests (docs/protocol.md 2.9).
		ReplyPrefixes: []string{cfg.OperatorInboxPrefix + "."},
		// Often enough to renew every claim within a third of its TTL.
		WatchInterval: min(2*time.Second, bus.ClaimTTL(cfg.AckWait)/3),
		Fleet: &worker.FleetConfig{
			Host: cfg.Host, Version: version(), Inventory: machines, Registry: fleet,
			Images: cfg.Images, MinFreeSpace: uint64(cfg.MinFreeSpace), OnChange: logChange(log),
			SealKeys: keys.Published(),
		},
		OnControl: func(c messages.Control, err error) {
			attrs := []any{"op", c.Op, "job_id", c.JobID, "by", c.By}
			if c.Op == messages.ControlHold {
				attrs = append(attrs, "for", (time.Duration(c.ForS) * time.Second).String())
			}
			if err != nil {
				log.Warn("control request refused", append(attrs, "error", err)...)
				return
			}
			log.Info("control request served", attrs...)
		},
		OnSettle: func(s worker.Settlement) {
			mx.Settled(s)
			attrs := []any{"op", s.Op, "job_id", s.JobID, "attempt", s.Attempt, "outcome", s.Outcome}
			switch {
			case s.Op != "provision" && s.Op != "teardown":
				log.Error("background work failed, will retry", "op", s.Op, "job_id", s.JobID, "error", s.Err)
			case s.Err == nil:
				log.Info("request settled", attrs...)
			case errors.Is(s.Err, worker.ErrHandedBack):
				log.Info("request handed back for another host", append(attrs, "reason", s.Err)...)
			case s.Outcome == "left":
				log.Warn("request left to the host holding the job's claim", append(attrs, "error", s.Err)...)
			case s.Outcome == "term":
				log.Warn("request refused", append(attrs, "error", s.Err)...)
			default:
				log.Error("request failed", append(attrs, "error", s.Err)...)
			}
		},
	}, consumers, life)

	log.Info("worker started", "host", cfg.Host, "version", version(), "libvirt_uri", cfg.LibvirtURI,
		"parallelism", cfg.Parallelism, "max_vms", cfg.MaxVMs, "nats_url", redactURL(natsURL),
		"images", cfg.Images.String(), "http_addr", cfg.HTTPAddr, "console_dir", consoleDir, "max_hold", cfg.MaxHold.String(),
		"seal_keys", sealKeyIDs(keys), "require_sealed_secrets", cfg.RequireSealed)
	var side conc.WaitGroup
	sideCtx, stopSide := context.WithCancel(ctx)
	if cfg.HTTPAddr != "" {
		ln, err := net.Listen("tcp", cfg.HTTPAddr)
		if err != nil {
			stopSide()
			return fmt.Errorf("--http-addr: %w", err)
		}
		srv := &http.Server{Handler: mx.Handler(), ReadHeaderTimeout: 10 * time.Second}
		side.Go(func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http server", "error", err)
			}
		})
		side.Go(func() {
			<-sideCtx.Done()
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx)
		})
	}
	side.Go(func() { drainOnSignal(sideCtx, w, log) })
	err = w.Run(ctx)
	stopSide()
	side.Wait()
	if err != nil {
		return err
	}
	st := w.Stats()
	log.Info("worker stopped", "provisions", st.Provisions, "teardowns", st.Teardowns, "running_machines", life.Active())
	return nil
}

// sealKeyIDs lists the ids of the sealing keys, for the log: ids only.
func sealKeyIDs(kr *seal.Keyring) string {
	var ids []string
	for _, k := range kr.Keys() {
		ids = append(ids, k.ID)
	}
	return strings.Join(ids, ",")
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

// workerSource lets the metrics read the worker, which is made after them
// (its lifecycle publishes through them).
type workerSource struct{ w **worker.Worker }

func (s workerSource) Snapshot() worker.Snapshot { return (*s.w).Snapshot() }

func (s workerSource) Carries(image string) bool { return *s.w != nil && (*s.w).Carries(image) }

// drainOnSignal drains this host on SIGUSR1 and undrains it on SIGUSR2,
// through the fleet's drain bucket, so that the drain outlives a restart.
func drainOnSignal(ctx context.Context, w *worker.Worker, log *slog.Logger) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(sigs)
	for {
		select {
		case <-ctx.Done():
			return
		case sig := <-sigs:
			drain := sig == syscall.SIGUSR1
			if err := w.Drain(ctx, drain, "signal"); err != nil {
				log.Error("drain on signal", "signal", sig.String(), "error", err)
				continue
			}
			log.Info("drain requested by signal", "signal", sig.String(), "drain", drain)
		}
	}
}

// logChange logs what the fleet side of the worker noticed.
func logChange(log *slog.Logger) func(worker.Change) {
	return func(c worker.Change) {
		switch c.Kind {
		case "beat":
		case "error":
			log.Warn("fleet", "image", c.Image, "job_id", c.JobID, "error", c.Err)
		case "state":
			if c.State == messages.HostDrained {
				log.Info("host drained: no machines left, taking no provisions", "state", c.State)
				return
			}
			log.Info("host state", "state", c.State)
		case "forwarded":
			log.Info("shared request forwarded to its image's subject", "job_id", c.JobID, "image", c.Image, "carriers", strings.Join(c.Hosts, ","))
		case "handed_back":
			log.Info("request handed back", "job_id", c.JobID, "image", c.Image, "tried", strings.Join(c.Hosts, ","))
		case "image_refused":
			log.Warn("image short of space: its requests are left to other hosts", "image", c.Image)
		default:
			log.Info(strings.ReplaceAll(c.Kind, "_", " "), "image", c.Image)
		}
	}
}

// viewLogger logs when the host view stops or starts being current.
func viewLogger(log *slog.Logger) func(error) {
	var failing bool
	return func(err error) {
		switch {
		case err != nil && !failing:
			log.Warn("host view check failed; clones and removals scan the host until it succeeds", "error", err)
		case err == nil && failing:
			log.Info("host view current again")
		}
		failing = err != nil
	}
}

// sharedMACLogger warns of a MAC address a managed domain shares with
// another, once per address and set of domains.
func sharedMACLogger(log *slog.Logger) func(mac string, domains []string) {
	seen := map[string]bool{}
	return func(mac string, domains []string) {
		key := mac + " " + strings.Join(domains, " ")
		if seen[key] {
			return
		}
		seen[key] = true
		log.Warn("a managed domain shares its MAC address with another domain", "mac", mac, "domains", domains)
	}
}
