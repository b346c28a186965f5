package bench

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/sourcegraph/conc"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// observer watches the guests of the benchmark through a libvirt
// connection of its own, for the reference points that neither the
// worker's events nor the virsh script give: when a guest's agent
// connected, and when its runner exited.
type observer struct {
	l     *libvirt.Libvirt
	agent *qga.Agent

	stop context.CancelFunc
	wg   conc.WaitGroup

	mu        sync.Mutex
	connected map[string]time.Time // domain name -> first "agent connected"
	stopped   map[string]time.Time // domain name -> first "stopped"
}

// newObserver connects to qemu:///system and records every domain's
// agent lifecycle events, and when it stopped (its QEMU process is gone),
// from now on.
func newObserver(ctx context.Context) (*observer, error) {
	l, err := provision.Dial(ctx, "qemu:///system")
	if err != nil {
		return nil, err
	}
	sctx, stop := context.WithCancel(context.Background())
	events, err := l.SubscribeEvents(sctx, libvirt.DomainEventIDAgentLifecycle, libvirt.OptDomain{})
	if err != nil {
		stop()
		_ = l.Disconnect()
		return nil, fmt.Errorf("subscribe to agent lifecycle events: %w", err)
	}
	lifecycle, err := l.SubscribeEvents(sctx, libvirt.DomainEventIDLifecycle, libvirt.OptDomain{})
	if err != nil {
		stop()
		_ = l.Disconnect()
		return nil, fmt.Errorf("subscribe to lifecycle events: %w", err)
	}
	o := &observer{l: l, agent: qga.New(l, qga.Options{}), stop: stop, connected: map[string]time.Time{}, stopped: map[string]time.Time{}}
	o.wg.Go(func() {
		for ev := range lifecycle {
			at := time.Now()
			msg, ok := ev.(*libvirt.DomainEventCallbackLifecycleMsg)
			if !ok || libvirt.DomainEventType(msg.Msg.Event) != libvirt.DomainEventStopped {
				continue
			}
			o.mu.Lock()
			if _, seen := o.stopped[msg.Msg.Dom.Name]; !seen {
				o.stopped[msg.Msg.Dom.Name] = at
			}
			o.mu.Unlock()
		}
	})
	o.wg.Go(func() {
		for ev := range events {
			at := time.Now()
			msg, ok := ev.(*libvirt.DomainEventCallbackAgentLifecycleMsg)
			if !ok || libvirt.ConnectDomainEventAgentLifecycleState(msg.State) != libvirt.ConnectDomainEventAgentLifecycleStateConnected {
				continue
			}
			o.mu.Lock()
			if _, seen := o.connected[msg.Dom.Name]; !seen {
				o.connected[msg.Dom.Name] = at
			}
			o.mu.Unlock()
		}
	})
	return o, nil
}

// agentConnected returns when libvirt said that domain's agent connected
// first, as the observer received it.
func (o *observer) agentConnected(domain string) (time.Time, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	t, ok := o.connected[domain]
	return t, ok
}

// domainStopped returns when libvirt said that domain stopped first, as
// the observer received it: libvirt sends the event once the QEMU process
// is gone.
func (o *observer) domainStopped(domain string) (time.Time, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	t, ok := o.stopped[domain]
	return t, ok
}

// waitStopped reports whether domain stops within d: an agent call that
// failed as the domain was destroyed returns before libvirt's event.
func (o *observer) waitStopped(ctx context.Context, domain string, d time.Duration) bool {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.NewTimer(d)
	defer deadline.Stop()
	for {
		if _, ok := o.domainStopped(domain); ok {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-deadline.C:
			return false
		case <-tick.C:
		}
	}
}

// close ends the subscriptions and the connection.
func (o *observer) close() {
	o.stop()
	o.wg.Wait()
	_ = o.l.Disconnect()
}

// Polling of the exit watcher.
const (
	// watchSlow is the interval while the runner is not due to exit yet.
	watchSlow = 200 * time.Millisecond
	// watchFast is the interval from watchEarly before it is due.
	watchFast  = 10 * time.Millisecond
	watchEarly = 700 * time.Millisecond
	// watcherLag bounds how long the watcher in the guest takes to see
	// the runner gone: its loop waits 5 ms (a shell builtin, no process
	// per round) between looks, which takes up to about 11 ms under TCG.
	watcherLag = 15 * time.Millisecond
)

// watchCut is watchExit's error when the domain stopped before the
// watcher saw the runner's exit, which lies after after.
type watchCut struct{ after time.Time }

func (c *watchCut) Error() string {
	return fmt.Sprintf("the guest stopped before its exit watcher saw the runner exit (after %s)", c.after.Format(time.StampMilli))
}

// watchExit tells when the guest process pid of domain (a runner, as
// guest-exec started it) exited. It starts a watcher in the guest through
// its own guest-exec, a shell loop that ends when /proc/<pid> is gone
// (qemu-ga reaped the runner, which is when the agent can first report
// its exit), and asks the agent for the watcher's status, every 200 ms
// until expect-700 ms and every 10 ms from then on. The exit lies between
// the last status that found the watcher running, less watcherLag, and
// the answer that found it exited; exitAt is the middle, and halfWidth
// half that interval. The runner's own status, which the worker or the
// virsh script poll, is left alone: qemu-ga reports an exit only once.
func (o *observer) watchExit(ctx context.Context, domain string, pid int, expect time.Time) (exitAt time.Time, halfWidth time.Duration, err error) {
	script := fmt.Sprintf(`f=/tmp/.bench-watch-$$; mkfifo "$f" && exec 3<>"$f" && rm -f "$f"; `+
		`while [ -d /proc/%d ]; do read -t 0.005 x <&3; done`, pid)
	running := time.Now()
	wpid, err := o.agent.Start(ctx, domain, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", script}})
	if err != nil {
		return time.Time{}, 0, fmt.Errorf("start exit watcher in %s: %w", domain, err)
	}
	timer := time.NewTimer(0)
	defer timer.Stop()
	for first := true; ; first = false {
		if !first {
			interval := watchFast
			if time.Until(expect) > watchEarly {
				interval = watchSlow
			}
			timer.Reset(interval)
			select {
			case <-ctx.Done():
				return time.Time{}, 0, ctx.Err()
			case <-timer.C:
			}
		}
		asked := time.Now()
		st, err := o.agent.Status(ctx, domain, wpid)
		answered := time.Now()
		if err != nil {
			if !first && o.waitStopped(ctx, domain, 3*time.Second) {
				return time.Time{}, 0, &watchCut{after: running.Add(-watcherLag)}
			}
			return time.Time{}, 0, fmt.Errorf("exit watcher in %s: %w", domain, err)
		}
		if st.Exited {
			if first {
				return time.Time{}, 0, fmt.Errorf("runner %d in %s had exited before its watcher looked", pid, domain)
			}
			lower := running.Add(-watcherLag)
			half := answered.Sub(lower) / 2
			return lower.Add(half), half, nil
		}
		running = asked
	}
}
