package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
	"github.com/stretchy-ci/libvirt-worker/pkg/redact"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

// maxOutput bounds the runner output carried in a runner_exited event.
const maxOutput = 2 << 10

// lostRunnerChecks is how many checks in a row the guest agent may deny
// knowing the runner before the job ends.
const lostRunnerChecks = 5

func execRequest(c runners.Command, capture bool) qga.ExecRequest {
	return qga.ExecRequest{Path: c.Path, Args: c.Args, Env: c.Env, Stdin: c.Stdin, Capture: capture}
}

// detectOS returns the image's declared OS family, or asks the guest.
func detectOS(ctx context.Context, agent Agent, domain, imageOS string) (runners.OS, error) {
	if imageOS != "" {
		return runners.ParseOS(imageOS, "")
	}
	info, err := agent.OSInfo(ctx, domain)
	if err != nil {
		return "", fmt.Errorf("detect the OS of %s: %w", domain, err)
	}
	os, err := runners.ParseOS(info.ID, "")
	if err == nil {
		return os, nil
	}
	// guest-get-osinfo carries no kernel name, and os-release ids are
	// open-ended: ask a Unix guest's kernel.
	uctx, cancel := context.WithTimeout(ctx, prepareTimeout)
	defer cancel()
	st, uerr := agent.Run(uctx, domain, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", "uname -s"}, Capture: true})
	if uerr != nil {
		return "", fmt.Errorf("detect the OS of %s: %w (uname: %v)", domain, err, uerr)
	}
	os, err = runners.ParseOS(info.ID, strings.TrimSpace(string(st.Stdout)))
	if err != nil {
		return "", fmt.Errorf("detect the OS of %s: %w", domain, err)
	}
	return os, nil
}

// guestOS is what the guest of one image generation said it runs.
type guestOS struct {
	generation string
	os         runners.OS
}

// guestOS returns the OS family an earlier clone of image's generation
// reported: every clone of a generation boots the same disks, so asking
// each guest again only delays the runner. An image whose generation is
// not known ("") is always asked.
func (m *Manager) guestOS(image, generation string) (runners.OS, bool) {
	if generation == "" {
		return "", false
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	g, ok := m.guests[image]
	return g.os, ok && g.generation == generation
}

// learnGuestOS remembers what a guest of image's generation reported; a
// new generation replaces the image's old one.
func (m *Manager) learnGuestOS(image, generation string, os runners.OS) {
	if generation == "" {
		return
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.guests == nil {
		m.guests = map[string]guestOS{}
	}
	m.guests[image] = guestOS{generation: generation, os: os}
}

// probe looks at a ready machine once: a domain that is shut off or gone
// ends the machine (machine_stopped); a runner the guest agent reports as
// exited is published with runner_exited and ends it; a guest agent that
// keeps denying it knows the runner ends it too (runner_lost). Anything it
// cannot find out now (libvirt or the agent do not answer) is looked at
// again at the next tick; the deadline bounds the wait.
func (a *actor) probe() func(context.Context) func() {
	em, r, domain := a.rec.em, a.rec.runner, a.rec.domain
	noop := func() {}
	return func(ctx context.Context) func() {
		if r.exit != nil && !r.reported {
			// An exit an earlier tick saw but could not publish.
			return a.reportExit(ctx, em, r.exit, r.since)
		}
		mach, found, err := a.m.cfg.Machines.Lookup(ctx, a.key)
		if err != nil {
			return noop // libvirt unreachable: look again next time
		}
		if !found || !mach.Running {
			_, cause, _ := causeOf(messages.ReasonStopped, domain)
			return func() { a.decideEnd(a.m.root, &ending{reason: messages.ReasonStopped, cause: cause, self: true}) }
		}
		if r.pid == 0 || a.m.cfg.Agent == nil {
			return noop
		}
		return a.checkRunner(ctx, em, r, domain, true)
	}
}

// pollRunner looks at the runner only, between ticks (Config.RunnerPoll):
// a runner's exit is noticed within that interval instead of a tick's,
// at the cost of one guest agent call per running runner.
func (a *actor) pollRunner() func(context.Context) func() {
	em, r, domain := a.rec.em, a.rec.runner, a.rec.domain
	return func(ctx context.Context) func() { return a.checkRunner(ctx, em, r, domain, false) }
}

// pollsRunner reports whether the machine's runner is to be polled now.
func (a *actor) pollsRunner() bool {
	r := a.rec.runner
	return a.rec.phase == PhaseReady && a.act == nil && a.m.cfg.RunnerPoll > 0 && a.m.cfg.Agent != nil &&
		a.jobID != "" && r.pid != 0 && r.exit == nil && !a.m.cfg.Now().Before(a.rec.retryAt)
}

// runnerPoll returns the channel of the next runner poll, nil when the
// runner is not polled now.
func (a *actor) runnerPoll() <-chan time.Time {
	if !a.pollsRunner() {
		return nil
	}
	switch {
	case a.poll == nil:
		a.poll = time.NewTimer(a.m.cfg.RunnerPoll)
	case !a.pollArmed:
		a.poll.Reset(a.m.cfg.RunnerPoll)
	}
	a.pollArmed = true
	return a.poll.C
}

// checkRunner asks the guest agent about the runner: an exit is published
// (runner_exited) and ends the machine; a runner the agent keeps denying
// it knows at ticks (tick: this check is a tick's) ends it too
// (runner_lost).
func (a *actor) checkRunner(ctx context.Context, em emitter, r runnerState, domain string, tick bool) func() {
	noop := func() {}
	{
		st, err := a.m.cfg.Agent.Status(ctx, domain, r.pid)
		switch {
		case errors.Is(err, qga.ErrCommandFailed) && !tick:
			return noop // counted at ticks only, whose spacing the rule means
		case errors.Is(err, qga.ErrCommandFailed):
			// The agent answers but no longer knows the runner (it was
			// restarted in the guest): nothing will ever report its end.
			return func() {
				if a.rec.runner.statusFailures++; a.rec.runner.statusFailures >= lostRunnerChecks {
					a.decideEnd(a.m.root, &ending{reason: messages.ReasonRunnerLost, self: true, cause: &messages.Error{
						Code: messages.CodeAgentFailed, Message: fmt.Sprintf("the guest agent of %s lost track of the runner: %v", domain, err)}})
				}
			}
		case err != nil || !st.Exited:
			// An agent that does not answer now may answer later; the
			// deadline bounds the wait.
			return func() { a.rec.runner.statusFailures = 0 }
		}
		// qemu-ga reports an exit once: keep it until it is published.
		exit := &runnerExit{code: st.ExitCode}
		exit.output, exit.withheld = output(r, st)
		return a.reportExit(ctx, em, exit, r.since)
	}
}

// reportExit publishes runner_exited, in the probe that saw the exit; the
// machine then ends, or, if the event could not be published, keeps the
// exit for the next tick to publish.
func (a *actor) reportExit(ctx context.Context, em emitter, exit *runnerExit, since time.Time) func() {
	err := em.emit(ctx, messages.StateRunnerExited, Delivery{Origin: messages.ReasonRunnerExited}, em.since(since), "", nil,
		func(ev *messages.Event) {
			code := exit.code
			ev.ExitCode, ev.Output, ev.OutputWithheld = &code, exit.output, exit.withheld
		})
	if err == nil {
		a.m.cfg.Faults.At(FaultAfterRunnerExit)
	}
	return func() {
		a.rec.em = em
		a.rec.runner.exit = exit
		if err != nil {
			return
		}
		a.rec.runner.reported = true
		a.decideEnd(a.m.root, &ending{reason: messages.ReasonRunnerExited, self: true})
	}
}

// output returns the end of what the runner printed, without secrets in
// any of the forms redact.New lists: each of stdout and stderr is
// scrubbed on its own and in whole before the two are joined and cut to their last maxOutput bytes, so that a secret
// cut by either does not leave a part of itself. A stream the agent
// truncated at its limit may end in the first bytes of a secret; that end
// is redacted too. When the job's secrets are not known (the machine was
// adopted after a restart) nothing is returned and withheld is true.
func output(r runnerState, st qga.Status) (out string, withheld bool) {
	if !r.secretsKnown {
		return "", len(st.Stdout)+len(st.Stderr) > 0
	}
	sc := redact.New(r.secrets...)
	scrub := func(b []byte, truncated bool) string {
		if truncated {
			return sc.ScrubCut(string(b))
		}
		return sc.Scrub(string(b))
	}
	out = scrub(st.Stdout, st.StdoutTruncated) + scrub(st.Stderr, st.StderrTruncated)
	if len(out) > maxOutput {
		out = out[len(out)-maxOutput:]
		if i := strings.IndexByte(out, '\n'); i >= 0 && i < len(out)-1 {
			out = out[i+1:]
		}
	}
	return strings.ToValidUTF8(out, "?"), false
}
