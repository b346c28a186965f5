package qga

import (
	"context"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// AgentEvents tells WaitReady the moment a guest agent connects, from
// libvirt's agent lifecycle events, so that a machine's agent_ready
// follows its agent's start by one guest-ping instead of a polling
// interval.
//
// It holds a libvirt connection of its own, used for nothing else, with
// one subscription for the agent events of every domain, made when the
// connection is, and fans the events out to the waiters of each domain.
// So no subscription is made or ended per wait: go-libvirt ends one with
// an RPC from a goroutine of its own, which races with a Caller that
// reconnects the shared connection (see subscribe). When the connection
// drops, the waiters' channels close (they poll) and Run connects again.
type AgentEvents struct {
	dial func(ctx context.Context) (*libvirt.Libvirt, error)

	mu      sync.Mutex
	live    bool
	waiters map[libvirt.UUID]map[*agentWaiter]struct{}
}

type agentWaiter struct{ ch chan struct{} }

// NewAgentEvents returns AgentEvents that dial their connection with
// dial; Run keeps it up.
func NewAgentEvents(dial func(ctx context.Context) (*libvirt.Libvirt, error)) *AgentEvents {
	return &AgentEvents{dial: dial, waiters: map[libvirt.UUID]map[*agentWaiter]struct{}{}}
}

// Run connects and subscribes, delivers events until the connection drops,
// and connects again, with backoff up to 10 s, until ctx ends; then it
// disconnects. It returns ctx's error.
func (e *AgentEvents) Run(ctx context.Context) error {
	delay := 100 * time.Millisecond
	for ctx.Err() == nil {
		if err := e.serve(ctx); err == nil {
			delay = 100 * time.Millisecond
			continue
		}
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
		delay = min(2*delay, 10*time.Second)
	}
	return ctx.Err()
}

// serve runs one connection: nil when it was up and dropped, or the
// error that kept it from coming up.
func (e *AgentEvents) serve(ctx context.Context) error {
	l, err := e.dial(ctx)
	if err != nil {
		return err
	}
	// The subscription's context never ends: the connection ends it, which
	// closes the channel; deregistering then fails fast on the closed
	// connection instead of racing with anything.
	events, err := l.SubscribeEvents(context.Background(), libvirt.DomainEventIDAgentLifecycle, libvirt.OptDomain{})
	if err != nil {
		_ = l.Disconnect()
		return err
	}
	e.setLive(true)
	defer e.setLive(false)
	for {
		select {
		case <-ctx.Done():
			_ = l.Disconnect()
			for range events {
			}
			return nil
		case ev, ok := <-events:
			if !ok {
				_ = l.Disconnect()
				return nil
			}
			e.deliver(ev)
		}
	}
}

// Live reports whether events are delivered now.
func (e *AgentEvents) Live() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.live
}

func (e *AgentEvents) setLive(live bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.live = live
	if live {
		return
	}
	// Events may have been missed: the waiters poll from now on.
	for uuid, ws := range e.waiters {
		for w := range ws {
			close(w.ch)
		}
		delete(e.waiters, uuid)
	}
}

func (e *AgentEvents) deliver(ev any) {
	msg, ok := ev.(*libvirt.DomainEventCallbackAgentLifecycleMsg)
	if !ok || libvirt.ConnectDomainEventAgentLifecycleState(msg.State) != libvirt.ConnectDomainEventAgentLifecycleStateConnected {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for w := range e.waiters[msg.Dom.UUID] {
		select {
		case w.ch <- struct{}{}:
		default: // one pending connect is enough
		}
	}
}

// watch returns a channel that receives a value whenever dom's agent
// connects, and closes when events stop being delivered; nil while the
// connection is down. stop ends the watch.
func (e *AgentEvents) watch(dom libvirt.Domain) (events <-chan struct{}, stop func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if !e.live {
		return nil, func() {}
	}
	w := &agentWaiter{ch: make(chan struct{}, 1)}
	if e.waiters[dom.UUID] == nil {
		e.waiters[dom.UUID] = map[*agentWaiter]struct{}{}
	}
	e.waiters[dom.UUID][w] = struct{}{}
	return w.ch, func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		if ws, ok := e.waiters[dom.UUID]; ok {
			if _, ok := ws[w]; ok {
				delete(ws, w)
				close(w.ch)
				if len(ws) == 0 {
					delete(e.waiters, dom.UUID)
				}
			}
		}
	}
}
