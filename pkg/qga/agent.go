package qga

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// Conn is the part of a go-libvirt connection an Agent uses.
// *libvirt.Libvirt satisfies it.
type Conn interface {
	DomainLookupByName(Name string) (libvirt.Domain, error)
	QEMUDomainAgentCommand(Dom libvirt.Domain, Cmd string, Timeout int32, Flags uint32) (libvirt.OptString, error)
	SubscribeEvents(ctx context.Context, eventID libvirt.DomainEventID, dom libvirt.OptDomain) (<-chan interface{}, error)
}

// Caller makes the Agent's calls on Conn as the rest of the worker makes
// its own: fn makes them, Call waits while the connection is being made
// again, returns once ctx ends or timeout passes and, on timeout, drops the
// connection, so that fn ends soon, and returns an error its owner can
// recognise as such. *provision.Link is one; its errors on timeout wrap
// provision.ErrTimeout, which provision.IsUnavailable reports.
type Caller interface {
	Call(ctx context.Context, timeout time.Duration, fn func() error) error
}

// Defaults of Options.
const (
	// DefaultPingTimeout is the agent's timeout for guest-ping: the agent
	// answers at once or is busy.
	DefaultPingTimeout = 3 * time.Second
	// DefaultCallTimeout is the agent's timeout for every other command.
	// guest-exec returns as soon as the program is spawned, so this does
	// not limit how long it runs.
	DefaultCallTimeout = 10 * time.Second
	// DefaultMargin is what a call may take beyond its agent timeout:
	// libvirt starts each command with a guest-sync of its own (up to 5 s,
	// and tried twice when the first reply goes missing), and libvirtd
	// answers through a connection that other calls share.
	DefaultMargin = 15 * time.Second
)

// Options configure an Agent. Zero values mean the defaults.
type Options struct {
	// Caller makes every libvirt call of the Agent, with a deadline of
	// the call's agent timeout plus Margin. Without it the Agent calls Conn
	// directly, and a call takes as long as libvirtd or the connection
	// does: go-libvirt calls have no deadline, and the agent timeout
	// libvirt applies bounds only the wait for the guest. That is only
	// acceptable where a hung call holds up nothing but its caller, such
	// as a one-shot tool or a test that ends with its process; a worker
	// passes its *provision.Link.
	Caller Caller
	// PingTimeout is the agent's timeout for guest-ping; default
	// DefaultPingTimeout. libvirt counts it in whole seconds.
	PingTimeout time.Duration
	// CallTimeout is the agent's timeout for every other command; default
	// DefaultCallTimeout. libvirt counts it in whole seconds.
	CallTimeout time.Duration
	// Margin is what a call made through Caller may take beyond its agent
	// timeout before the connection is presumed hung; default
	// DefaultMargin. Looking up a domain, which does not reach the agent,
	// has Margin alone.
	Margin time.Duration
	// Events, when set and running, wakes WaitReady when an agent
	// connects, also with a Caller; without it WaitReady polls when it
	// has a Caller.
	Events *AgentEvents
	// Ready, when set, is told how each WaitReady that succeeded found
	// the agent, so that a host can see whether agent events reach it.
	Ready func(Wake)
}

// Wake is what made the guest-ping that found an agent ready.
type Wake string

// The ways WaitReady finds an agent.
const (
	// WakeFirst: the first ping answered; the agent was up already.
	WakeFirst Wake = "first"
	// WakeEvent: a ping right after libvirt said the agent connected.
	WakeEvent Wake = "event"
	// WakePoll: a ping of the polling interval.
	WakePoll Wake = "poll"
)

// Poll intervals.
const (
	// readyPoll is how often WaitReady pings while it has no agent
	// lifecycle events to wait for.
	readyPoll = 250 * time.Millisecond
	// readyPollWithEvents is how often WaitReady pings while the
	// "agent connected" event can wake it: only a safety net.
	readyPollWithEvents = time.Second
	// readyRetry is how often WaitReady pings for a while after the
	// agent connected, should its first ping come too early.
	readyRetry      = 20 * time.Millisecond
	readyRetryTimes = 50
	// Run asks guest-exec-status every runPollMin for the first
	// runPollFast, which covers the short commands that prepare a runner
	// (tens of ms under TCG), and then at an interval that doubles up to
	// runPollMax. A status call costs the guest ~2 ms.
	runPollMin  = 5 * time.Millisecond
	runPollFast = 100 * time.Millisecond
	runPollMax  = 500 * time.Millisecond
)

// Agent issues guest agent commands to domains over one libvirt
// connection. It is safe for concurrent use; it keeps no state of its own.
type Agent struct {
	conn Conn
	opts Options
}

// New returns an Agent that talks to guests through conn.
func New(conn Conn, opts Options) *Agent {
	if opts.PingTimeout <= 0 {
		opts.PingTimeout = DefaultPingTimeout
	}
	if opts.CallTimeout <= 0 {
		opts.CallTimeout = DefaultCallTimeout
	}
	if opts.Margin <= 0 {
		opts.Margin = DefaultMargin
	}
	return &Agent{conn: conn, opts: opts}
}

// EventsLive reports whether WaitReady is woken by agent lifecycle events
// now: Options.Events is set and delivers them.
func (a *Agent) EventsLive() bool { return a.opts.Events != nil && a.opts.Events.Live() }

// Info is what guest-info reports about the agent.
type Info struct {
	// Version is qemu-ga's version, such as "7.2.22".
	Version string
	// Commands lists the agent commands that are enabled in the guest.
	Commands []string
}

// OSInfo is what guest-get-osinfo reports about the guest's operating
// system. On Linux the first five fields come from os-release(5) and the
// kernel fields from uname(2); fields the guest does not know are empty.
// guest-get-osinfo has no uname sysname ("Linux"): that is not reported.
type OSInfo struct {
	ID         string
	Name       string
	PrettyName string
	Version    string
	VersionID  string
	Variant    string
	VariantID  string
	// KernelRelease is uname's release, such as "6.1.0-56-amd64".
	KernelRelease string
	// KernelVersion is uname's version, such as "#1 SMP PREEMPT_DYNAMIC ...".
	KernelVersion string
	// Machine is uname's machine, such as "x86_64".
	Machine string
}

// WaitReady returns once the guest agent of domain answers guest-ping.
//
// Until the guest has started qemu-ga, libvirt answers at once that the
// agent is not connected. With Options.Events (running), or without a
// Caller, WaitReady is woken by libvirt's agent lifecycle event and pings
// as soon as the agent connects (again every 20 ms for a second, should
// the first ping come too early), with a slow ticker as a safety net;
// otherwise, or while events are not delivered, it pings every 250 ms. The caller
// bounds the wait with ctx, its boot timeout: when ctx ends first,
// WaitReady returns ErrAgentTimeout wrapping ctx's error, possibly up to
// one ping timeout late when there is no Caller, as a call in flight cannot
// be interrupted.
//
// It retries while the agent is not connected and on other errors libvirt
// reports while qemu-ga starts up. It fails at once, without waiting, with
// ErrDomainNotFound, ErrDomainNotRunning (also when the domain is paused or
// the guest died during boot), ErrAgentNotConfigured, ErrCommandFailed (the
// agent answered, with an error) or an error of the libvirt connection,
// which waiting does not change: the Caller's error when a call got no
// answer in time.
func (a *Agent) WaitReady(ctx context.Context, domain string) error {
	timedOut := func(last error) error {
		if last != nil {
			return fmt.Errorf("wait for guest agent on %s: %w: %w (last: %v)", domain, ErrAgentTimeout, ctx.Err(), last)
		}
		return fmt.Errorf("wait for guest agent on %s: %w: %w", domain, ErrAgentTimeout, ctx.Err())
	}
	dom, err := a.lookup(ctx, domain)
	if err != nil {
		if ctx.Err() != nil {
			return timedOut(nil)
		}
		return err
	}

	// Subscribe before the first ping, so that a connection between
	// the two cannot go unnoticed.
	var events <-chan any
	var connects <-chan struct{}
	if a.opts.Events != nil {
		var stop func()
		connects, stop = a.opts.Events.watch(dom)
		defer stop()
	} else {
		var unsubscribe func()
		events, unsubscribe = a.subscribe(ctx, dom)
		defer unsubscribe()
	}
	interval := readyPoll
	if events != nil || connects != nil {
		interval = readyPollWithEvents
	}
	ticker := time.NewTicker(interval)
	defer ticker.Stop()

	var last error
	retries := 0
	woken := WakeFirst
	for {
		if retries > 0 {
			retries--
			ticker.Reset(readyRetry)
		} else {
			ticker.Reset(interval)
		}
		err := a.ping(ctx, dom)
		if err == nil {
			if a.opts.Ready != nil {
				a.opts.Ready(woken)
			}
			return nil
		}
		if ctx.Err() != nil {
			if retryable(err) {
				last = err
			}
			return timedOut(last)
		}
		if !retryable(err) {
			return err
		}
		last = err

	wait:
		for {
			select {
			case <-ctx.Done():
				break wait
			case <-ticker.C:
				if retries == 0 {
					woken = WakePoll
				}
				break wait
			case _, ok := <-connects:
				if !ok {
					// The events stopped: poll.
					connects, interval = nil, readyPoll
					ticker.Reset(readyPoll)
					continue
				}
				retries, woken = readyRetryTimes, WakeEvent
				break wait
			case ev, ok := <-events:
				if !ok {
					// The connection lost the subscription: poll.
					events, interval = nil, readyPoll
					ticker.Reset(readyPoll)
					continue
				}
				if agentConnected(ev, dom) {
					retries, woken = readyRetryTimes, WakeEvent
					break wait
				}
			}
		}
		if ctx.Err() != nil {
			return timedOut(last)
		}
	}
}

// subscribe subscribes to the agent lifecycle events of dom and returns
// them, or nil when WaitReady is to poll instead, and the function that
// ends the subscription.
//
// With a Caller it always polls. A go-libvirt subscription makes an RPC of
// its own when it ends, to deregister its callback, from a goroutine of
// go-libvirt's, once its context ends or the connection drops: no Caller
// can bound that call, and it races (go test -race reports it) with the
// Caller making the connection again, which is just when a hung call has
// made WaitReady give up. Polling costs one guest-ping every readyPoll,
// which libvirt answers at once while the agent is not connected.
func (a *Agent) subscribe(ctx context.Context, dom libvirt.Domain) (<-chan any, func()) {
	if a.opts.Caller != nil {
		return nil, func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	events, err := a.conn.SubscribeEvents(ctx, libvirt.DomainEventIDAgentLifecycle, libvirt.OptDomain{dom})
	if err != nil {
		cancel()
		return nil, func() {}
	}
	return events, func() {
		cancel()
		// go-libvirt's relay blocks on sending until its context ends;
		// drain so it can notice and close the channel.
		for range events {
		}
	}
}

// agentConnected reports whether ev says that dom's agent connected.
func agentConnected(ev any, dom libvirt.Domain) bool {
	msg, ok := ev.(*libvirt.DomainEventCallbackAgentLifecycleMsg)
	return ok && msg.Dom.UUID == dom.UUID &&
		libvirt.ConnectDomainEventAgentLifecycleState(msg.State) == libvirt.ConnectDomainEventAgentLifecycleStateConnected
}

// Ping returns nil when the guest agent of domain answers guest-ping.
// It returns ErrAgentUnavailable while the agent is not connected.
func (a *Agent) Ping(ctx context.Context, domain string) error {
	dom, err := a.lookup(ctx, domain)
	if err != nil {
		return err
	}
	return a.ping(ctx, dom)
}

func (a *Agent) ping(ctx context.Context, dom libvirt.Domain) error {
	return a.command(ctx, dom, "guest-ping", nil, a.opts.PingTimeout, nil)
}

// Info returns the guest agent's version and enabled commands.
func (a *Agent) Info(ctx context.Context, domain string) (Info, error) {
	dom, err := a.lookup(ctx, domain)
	if err != nil {
		return Info{}, err
	}
	var r struct {
		Version  string `json:"version"`
		Commands []struct {
			Name    string `json:"name"`
			Enabled bool   `json:"enabled"`
		} `json:"supported_commands"`
	}
	if err := a.command(ctx, dom, "guest-info", nil, a.opts.CallTimeout, &r); err != nil {
		return Info{}, err
	}
	info := Info{Version: r.Version}
	for _, c := range r.Commands {
		if c.Enabled {
			info.Commands = append(info.Commands, c.Name)
		}
	}
	return info, nil
}

// SetTime sets the guest's clock to t (guest-set-time), as a guest
// restored from a saved state needs: its clock stands where it was saved.
// qemu-ga also writes the time to the guest's hardware clock where it can.
func (a *Agent) SetTime(ctx context.Context, domain string, t time.Time) error {
	dom, err := a.lookup(ctx, domain)
	if err != nil {
		return err
	}
	return a.command(ctx, dom, "guest-set-time", struct {
		Time int64 `json:"time"`
	}{t.UnixNano()}, a.opts.CallTimeout, nil)
}

// OSInfo returns what the guest says about its operating system.
func (a *Agent) OSInfo(ctx context.Context, domain string) (OSInfo, error) {
	dom, err := a.lookup(ctx, domain)
	if err != nil {
		return OSInfo{}, err
	}
	var r struct {
		ID            string `json:"id"`
		Name          string `json:"name"`
		PrettyName    string `json:"pretty-name"`
		Version       string `json:"version"`
		VersionID     string `json:"version-id"`
		Variant       string `json:"variant"`
		VariantID     string `json:"variant-id"`
		KernelRelease string `json:"kernel-release"`
		KernelVersion string `json:"kernel-version"`
		Machine       string `json:"machine"`
	}
	if err := a.command(ctx, dom, "guest-get-osinfo", nil, a.opts.CallTimeout, &r); err != nil {
		return OSInfo{}, err
	}
	return OSInfo(r), nil
}

// lookup resolves a domain name. Every public method takes a name, as
// names are what the worker knows; libvirt needs the UUID that comes with
// the lookup.
func (a *Agent) lookup(ctx context.Context, domain string) (libvirt.Domain, error) {
	if err := ctx.Err(); err != nil {
		return libvirt.Domain{}, fmt.Errorf("look up domain %s: %w", domain, err)
	}
	var dom libvirt.Domain
	err := a.call(ctx, a.opts.Margin, func() error {
		d, err := a.conn.DomainLookupByName(domain)
		dom = d
		return err
	})
	if err != nil {
		return libvirt.Domain{}, fmt.Errorf("look up domain %s: %w", domain, withSentinel(err))
	}
	return dom, nil
}

// request is a guest agent command as qemu-ga reads it.
type request struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
}

// command runs the agent command name with args on dom and decodes the
// value it returns into out, unless out is nil. Its errors name the
// command and the domain, never the arguments.
func (a *Agent) command(ctx context.Context, dom libvirt.Domain, name string, args any, timeout time.Duration, out any) error {
	raw, err := a.raw(ctx, dom, name, args, timeout)
	if err != nil {
		return fmt.Errorf("%s on %s: %w", name, dom.Name, withSentinel(err))
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(raw, out); err != nil {
		return fmt.Errorf("%s on %s: decode reply: %w", name, dom.Name, err)
	}
	return nil
}

// raw runs an agent command and returns the JSON of its return value.
// Its errors carry neither the command nor the domain: callers add those
// and decide what else an error may say.
func (a *Agent) raw(ctx context.Context, dom libvirt.Domain, name string, args any, timeout time.Duration) (json.RawMessage, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	cmd, err := json.Marshal(request{Execute: name, Arguments: args})
	if err != nil {
		// Only a bug gets here; the arguments are plain structs. Do
		// not quote them: they may hold a secret.
		return nil, errors.New("encode command")
	}
	secs := seconds(ctx, timeout)
	var reply libvirt.OptString
	err = a.call(ctx, time.Duration(secs)*time.Second+a.opts.Margin, func() error {
		r, err := a.conn.QEMUDomainAgentCommand(dom, string(cmd), secs, 0)
		reply = r
		return err
	})
	if err != nil {
		return nil, err
	}
	if len(reply) == 0 {
		return nil, errors.New("empty reply")
	}
	var r struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal([]byte(reply[0]), &r); err != nil {
		return nil, fmt.Errorf("decode reply: %w", err)
	}
	if r.Return == nil {
		return nil, errors.New("reply has no return value")
	}
	return r.Return, nil
}

// call runs fn, which makes libvirt calls on a.conn, through the Caller
// with a deadline of timeout, or directly without one. What fn stores for
// its caller may only be read when call returns nil: after a timeout, fn
// may still be running.
func (a *Agent) call(ctx context.Context, timeout time.Duration, fn func() error) error {
	if a.opts.Caller == nil {
		return fn()
	}
	return a.opts.Caller.Call(ctx, timeout, fn)
}

// seconds converts timeout, shortened to what is left of ctx, into the
// whole seconds libvirt takes, at least one: zero would mean "do not wait".
func seconds(ctx context.Context, timeout time.Duration) int32 {
	if dl, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(dl))
	}
	return int32(max(1, math.Ceil(timeout.Seconds())))
}
