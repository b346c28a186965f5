package lifecycle

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
)

// Faults is called at the named points of a job's lifecycle, so that tests
// can stop the worker exactly there (the crash matrix kills the process
// with SIGKILL). Production leaves it nil, which makes every point a nil
// check. It must not block for long: it runs inside the operation.
type Faults func(point string)

// At calls f with point unless f is nil.
func (f Faults) At(point string) {
	if f != nil {
		f(point)
	}
}

// The fault points, in the order a job passes them. Each names the moment
// between two durable effects (an event stored, a libvirt change, an ack).
const (
	// FaultAfterAccept: accepted is published, nothing is built.
	FaultAfterAccept = "after_accept"
	// FaultBeforeClone: cloning is published, the clone has not begun.
	FaultBeforeClone = "before_clone"
	// FaultAfterClone: the domain and its volumes exist, cloned is not
	// published, the domain is not started.
	FaultAfterClone = "after_clone"
	// FaultBeforeStart: cloned is published and the claim confirmed for
	// the boot, the domain is not started.
	FaultBeforeStart = "before_start"
	// FaultAfterStart: the domain runs, running is not published.
	FaultAfterStart = "after_start"
	// FaultWaitingAgent: running is published, the guest agent has not
	// been asked yet.
	FaultWaitingAgent = "waiting_agent"
	// FaultAfterAgentReady: agent_ready is published, no runner is
	// prepared (for kind none the provision is about to return).
	FaultAfterAgentReady = "after_agent_ready"
	// FaultAfterRunnerStart: runner_started is published, the provision
	// has not returned, so its request is not acknowledged.
	FaultAfterRunnerStart = "after_runner_start"
	// FaultBeforeAck: the worker has the operation's result and has not
	// settled its request (provision or teardown) yet.
	FaultBeforeAck = "before_ack"
	// FaultAfterRunnerExit: the watch loop published runner_exited and
	// has not begun the teardown.
	FaultAfterRunnerExit = "after_runner_exit"
	// FaultMidTeardown: tearing_down is published, the machine is not
	// removed yet.
	FaultMidTeardown = "mid_teardown"
	// FaultAfterRemove: the machine is removed, the terminal event is not
	// published.
	FaultAfterRemove = "after_remove"
)

// FaultPoints lists every fault point in lifecycle order.
var FaultPoints = []string{
	FaultAfterAccept, FaultBeforeClone, FaultAfterClone, FaultBeforeStart, FaultAfterStart,
	FaultWaitingAgent, FaultAfterAgentReady, FaultAfterRunnerStart, FaultBeforeAck,
	FaultAfterRunnerExit, FaultMidTeardown, FaultAfterRemove,
}

// ParseFault turns a fault spec into Faults that call fire when the point
// is reached: "point" fires the first time, "point:N" the Nth time, and
// the empty spec is nil (no faults). fire is called at most once; the
// crash tests pass a function that SIGKILLs the process.
func ParseFault(spec string, fire func(point string)) (Faults, error) {
	if spec == "" {
		return nil, nil
	}
	point, nth, hasN := strings.Cut(spec, ":")
	if !slices.Contains(FaultPoints, point) {
		return nil, fmt.Errorf("fault %q: unknown point %q (known: %s)", spec, point, strings.Join(FaultPoints, ", "))
	}
	n := 1
	if hasN {
		var err error
		if n, err = strconv.Atoi(nth); err != nil || n < 1 {
			return nil, fmt.Errorf("fault %q: %q is not a positive count", spec, nth)
		}
	}
	var seen atomic.Int64
	return func(p string) {
		if p == point && seen.Add(1) == int64(n) {
			fire(p)
		}
	}, nil
}
