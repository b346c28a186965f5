package bench

import (
	"context"
	_ "embed"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/internal/worker"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

//go:embed testdata/node.xml
var nodeTemplate string

// testNode writes the test driver's node definition into dir, with the
// given domains' XML added, and returns its test:/// URI. Each connection
// to it gets a private copy of that state in libvirtd.
func testNode(dir string, domains []string) (string, error) {
	return testNodeWith(dir, domains, nil)
}

// testNodeWith is testNode with volumes (their XML) added to the pool.
func testNodeWith(dir string, domains, volumes []string) (string, error) {
	if err := os.MkdirAll(filepath.Join(dir, "pool"), 0o755); err != nil {
		return "", err
	}
	doc := strings.ReplaceAll(nodeTemplate, "@DIR@", dir)
	doc = strings.Replace(doc, "@DOMAINS@", strings.Join(domains, "\n"), 1)
	doc = strings.Replace(doc, "@VOLUMES@", strings.Join(volumes, "\n"), 1)
	path := filepath.Join(dir, "node.xml")
	if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
		return "", err
	}
	return "test://" + path, nil
}

// testImage is the image domain of testdata/node.xml.
const testImage = "image"

// fakeAgent is a guest agent without a guest: it is ready at once, the
// guest is Linux, every command succeeds at once, and a runner has exited
// with 0 the first time it is asked about. With it the worker's
// scheduling is measured without any boot or guest cost.
type fakeAgent struct{ pids atomic.Int64 }

func (*fakeAgent) WaitReady(context.Context, string) error { return nil }

func (*fakeAgent) OSInfo(context.Context, string) (qga.OSInfo, error) {
	return qga.OSInfo{ID: "debian"}, nil
}

func (*fakeAgent) Run(context.Context, string, qga.ExecRequest) (qga.Status, error) {
	return qga.Status{Exited: true}, nil
}

func (a *fakeAgent) Start(context.Context, string, qga.ExecRequest) (int, error) {
	return int(a.pids.Add(1)), nil
}

func (*fakeAgent) Status(context.Context, string, int) (qga.Status, error) {
	return qga.Status{Exited: true}, nil
}

// inProcess is a worker wired in this process as "worker run" wires it
// (cmd/worker/run.go: the same packages and settings, the metrics and
// HTTP server left out), with an agent of the caller's.
type inProcess struct {
	w    *worker.Worker
	life *lifecycle.Manager
	link *provision.Link
	stop func() error
}

// inProcessOptions configure startInProcess.
type inProcessOptions struct {
	Host        string
	LibvirtURI  string
	Parallelism int
	MaxVMs      int
	Agent       lifecycle.Agent
	NATS        *NATS
	Images      []string
	// OnSettle, when set, is told of every settlement (failures included).
	OnSettle func(worker.Settlement)
}

func startInProcess(ctx context.Context, o inProcessOptions) (*inProcess, error) {
	js := o.NATS.JS
	ackWait := bus.DefaultAckWait
	topo := bus.Topology{Host: o.Host, AckWait: ackWait, MaxDeliver: bus.DefaultMaxDeliver}
	consumers, err := bus.Ensure(ctx, js, topo)
	if err != nil {
		return nil, err
	}
	claims, err := bus.OpenClaims(ctx, js, bus.Topology{Host: o.Host, AckWait: ackWait})
	if err != nil {
		return nil, err
	}
	fleet, err := bus.OpenFleet(ctx, js, topo)
	if err != nil {
		return nil, err
	}
	link := provision.NewLink(o.LibvirtURI, provision.LinkOptions{})
	if err := link.Connect(ctx); err != nil {
		return nil, err
	}
	linkCtx, stopLink := context.WithCancel(context.WithoutCancel(ctx))
	var linkWG conc.WaitGroup
	linkWG.Go(func() { _ = link.Run(linkCtx) })
	lv := link.Libvirt()
	pub := bus.NewPublisher(js)
	machines := provision.New(lv, provision.Options{Link: link})
	viewChecked := make(chan error, 1)
	linkWG.Go(func() {
		_ = machines.Watch(linkCtx, provision.WatchOptions{
			Events:  func(ctx context.Context) (provision.EventConn, error) { return provision.Dial(ctx, o.LibvirtURI) },
			OnCheck: firstCheck(viewChecked),
		})
	})
	if err := waitCheck(ctx, viewChecked); err != nil {
		stopLink()
		linkWG.Wait()
		_ = link.Close()
		return nil, err
	}
	slots := worker.NewSlots(o.Parallelism)
	life := lifecycle.New(lifecycle.Config{
		Host: o.Host, Machines: machines, Agent: o.Agent, Events: pub, History: pub, Journal: pub,
		Claims: claims, ClaimTTL: bus.ClaimTTL(ackWait), Slots: slots,
	})
	w := worker.New(worker.Config{
		Parallelism: o.Parallelism, MaxVMs: o.MaxVMs, AckWait: ackWait, MaxDeliver: bus.DefaultMaxDeliver,
		NATS: o.NATS.NC, Slots: slots,
		WatchInterval: min(2*time.Second, bus.ClaimTTL(ackWait)/3),
		Fleet: &worker.FleetConfig{
			Host: o.Host, Version: "bench", Inventory: machines, Registry: fleet,
			Images: o.Images, MinFreeSpace: 2 << 30,
		},
		OnSettle: o.OnSettle,
	}, consumers, life)
	runCtx, stopRun := context.WithCancel(ctx)
	done := make(chan error, 1)
	var runWG conc.WaitGroup
	runWG.Go(func() { done <- w.Run(runCtx) })
	return &inProcess{w: w, life: life, link: link, stop: func() error {
		stopRun()
		runWG.Wait()
		life.Close()
		stopLink()
		linkWG.Wait()
		_ = link.Close()
		if err := <-done; err != nil {
			return fmt.Errorf("worker: %w", err)
		}
		return nil
	}}, nil
}

// firstCheck returns a provision.WatchOptions.OnCheck that sends the
// outcome of the first full check of the host view on ch.
func firstCheck(ch chan<- error) func(error) {
	var once sync.Once
	return func(err error) { once.Do(func() { ch <- err }) }
}

// waitCheck waits for the first full check of a host view: the worker
// pulls only after its first reconciliation, which takes longer.
func waitCheck(ctx context.Context, ch <-chan error) error {
	t := time.NewTimer(time.Minute)
	defer t.Stop()
	select {
	case err := <-ch:
		if err != nil {
			return fmt.Errorf("host view: %w", err)
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return fmt.Errorf("host view: no full check within a minute")
	}
}
