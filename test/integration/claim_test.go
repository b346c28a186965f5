package integration

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// stopped reports whether the process is stopped by a signal (SIGSTOP).
func stopped(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// pid (comm) state ...; comm may hold spaces, the state follows ") ".
	s := string(b)
	i := strings.LastIndex(s, ") ")
	return i >= 0 && i+2 < len(s) && (s[i+2] == 'T' || s[i+2] == 't')
}

// statesFrom returns the states of jobID's events published by host.
func (el *eventLog) statesFrom(jobID, host string) []messages.State {
	var out []messages.State
	for _, ev := range el.of(jobID) {
		if ev.Host == host {
			out = append(out, ev.State)
		}
	}
	return out
}

// TestOneMachinePerJobAcrossHosts: worker A takes a job and freezes
// (SIGSTOP, as a GC pause or a suspended host would) for longer than
// AckWait; the server hands the request to worker B, which claims the job
// and builds it. When A resumes it finds its claim lost, undoes what it
// built, publishes dropped naming B (never a terminal event, whatever its
// interrupted step did), leaves the request to B and goes on serving. Both workers share one libvirtd here, which makes the test
// stricter than two hosts: A's rollback must not touch B's machine of the
// same name.
func TestOneMachinePerJobAcrossHosts(t *testing.T) {
	l := dialLibvirt(t)
	for _, c := range []struct {
		point string
		// a is what A publishes of the job: up to the point, then dropped.
		a []messages.State
	}{
		{lifecycle.FaultAfterAccept, []messages.State{messages.StateAccepted, messages.StateDropped}},
		// A stalls after the boot's claim confirmation: B removes A's
		// machine (its leftover of the same name) and builds its own, so
		// A's start fails when it resumes. That failure is not A's to
		// report: A lost the job.
		{lifecycle.FaultBeforeStart, []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateCloned,
			messages.StateBooting, messages.StateDropped}},
		{lifecycle.FaultWaitingAgent, []messages.State{messages.StateAccepted, messages.StateCloning, messages.StateCloned,
			messages.StateBooting, messages.StateRunning, messages.StateDropped}},
	} {
		t.Run(c.point, func(t *testing.T) {
			url, js := startNATS(t)
			events := followEvents(t, js)
			tag := strings.ReplaceAll(c.point, "_", "-")
			hostA, hostB := "claim-a-"+tag, "claim-b-"+tag

			t.Setenv("STRETCHY_FAULT", c.point)
			t.Setenv("STRETCHY_FAULT_ACTION", "stop")
			a := startProcess(t, url, "--host", hostA)
			t.Setenv("STRETCHY_FAULT", "")
			t.Setenv("STRETCHY_FAULT_ACTION", "")
			// Whatever happens, a stopped A must be able to take its
			// SIGTERM when the test ends (cleanups run last-in first).
			t.Cleanup(func() { _ = a.cmd.Process.Signal(syscall.SIGCONT) })

			job := uniqueJob(t, "claim")
			submitProvision(t, js, job)
			deadline := time.Now().Add(bootWait)
			for !stopped(a.cmd.Process.Pid) {
				if time.Now().After(deadline) {
					t.Fatalf("worker A did not stop at %s; events:\n%s", c.point, events.dump())
				}
				time.Sleep(50 * time.Millisecond)
			}
			pausedAt := time.Now()

			b := startProcess(t, url, "--host", hostB)
			ready := events.waitState(t, job, messages.StateAgentReady, bootWait+15*time.Second)
			if ready.Host != hostB {
				t.Fatalf("agent_ready came from %s, want %s; events:\n%s", ready.Host, hostB, events.dump())
			}
			// B's machine is the one on the host, and it is B's.
			mach, found, err := provision.New(l, provision.Options{}).Lookup(context.Background(), job)
			if err != nil || !found || mach.Host != hostB || !mach.Running {
				t.Fatalf("machine of %s: found %v, host %q, running %v, %v", job, found, mach.Host, mach.Running, err)
			}
			t.Logf("A paused at %s for %s; B built the job from delivery %d", c.point, time.Since(pausedAt).Round(time.Second), ready.Attempt)

			if err := a.cmd.Process.Signal(syscall.SIGCONT); err != nil {
				t.Fatal(err)
			}
			dropped := events.waitState(t, job, messages.StateDropped, 30*time.Second)
			if dropped.Host != hostA || dropped.Holder != hostB || dropped.Reason != messages.ReasonClaimLost {
				t.Fatalf("dropped event %+v, want host %s, holder %s, reason %s", dropped, hostA, hostB, messages.ReasonClaimLost)
			}
			if got := events.statesFrom(job, hostA); !slices.Equal(got, c.a) {
				t.Fatalf("A published %v, want %v; events:\n%s", got, c.a, events.dump())
			}
			// A's rollback left B's machine alone.
			if mach, found, err := provision.New(l, provision.Options{}).Lookup(context.Background(), job); err != nil || !found || !mach.Running || mach.Host != hostB {
				t.Fatalf("after A resumed: machine found %v, running %v, host %q, %v", found, mach.Running, mach.Host, err)
			}
			// The request was settled once, by B: the work queue is empty.
			waitQueueEmpty(t, js)

			// A goes on serving: a job pinned to it runs and ends.
			other := uniqueJob(t, "claim-after")
			req := provisionRequest(other)
			if _, err := submitReq(context.Background(), js, req, hostA); err != nil {
				t.Fatal(err)
			}
			if ev := events.waitState(t, other, messages.StateAgentReady, bootWait); ev.Host != hostA {
				t.Fatalf("the pinned job ran on %s", ev.Host)
			}

			teardownOn(t, js, hostB, job)
			teardownOn(t, js, hostA, other)
			for _, j := range []string{job, other} {
				events.waitState(t, j, messages.StateTornDown, bootWait)
			}
			// One numbering across both hosts: A's dropped follows the
			// events B published meanwhile, and B's follow it.
			for _, j := range []string{job, other} {
				for i, ev := range events.of(j) {
					if ev.Seq != uint64(i+1) {
						t.Fatalf("job %s: event %d in stream order (%s from %s) has seq %d, want %d; events:\n%s",
							j, i+1, ev.State, ev.Host, ev.Seq, i+1, events.dump())
					}
				}
			}
			for _, j := range []string{job, other} {
				var terminal int
				for _, ev := range events.of(j) {
					if ev.State.Terminal() {
						terminal++
					}
				}
				if terminal != 1 {
					t.Fatalf("job %s has %d terminal events; events:\n%s", j, terminal, events.dump())
				}
			}
			if left, err := resources(l, messages.DomainName(job)); err != nil || len(left) > 0 {
				t.Fatalf("left behind: %v (%v)", left, err)
			}
			b.stop(t)
			a.stop(t)
			// A neither acked nor nak'd its stale delivery: it left it.
			if log := a.log.String(); !strings.Contains(log, `"outcome":"left"`) || !strings.Contains(log, job) {
				t.Fatalf("A's log does not show the request of %s left to B:\n%s", job, log)
			}
		})
	}
}
