package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

// Agent talks to a machine's guest agent. *qga.Agent implements it.
type Agent interface {
	WaitReady(ctx context.Context, domain string) error
	OSInfo(ctx context.Context, domain string) (qga.OSInfo, error)
	Run(ctx context.Context, domain string, req qga.ExecRequest) (qga.Status, error)
	Start(ctx context.Context, domain string, req qga.ExecRequest) (int, error)
	Status(ctx context.Context, domain string, pid int) (qga.Status, error)
}

// maxOutput bounds the runner output carried in a runner_exited event.
const maxOutput = 2 << 10

// lostRunnerChecks is how many checks in a row the guest agent may deny
// knowing the runner before the job ends.
const lostRunnerChecks = 5

// prepareTimeout bounds each preparation command in the guest.
const prepareTimeout = time.Minute

// startRunner waits for the guest agent, detects the guest OS and starts the
// job's runner, publishing agent_ready and runner_started. For runner kind
// none it returns after agent_ready.
func (m *Manager) startRunner(ctx context.Context, j *job, req messages.Provision, imageOS string, d Delivery) error {
	start := m.cfg.Now()
	bctx, cancel := context.WithTimeout(ctx, req.BootTimeout())
	err := m.cfg.Agent.WaitReady(bctx, j.domain)
	cancel()
	if err != nil {
		if ctx.Err() == nil && (errors.Is(err, qga.ErrAgentTimeout) || errors.Is(err, context.DeadlineExceeded)) {
			return &stepError{code: messages.CodeBootTimeout,
				err: fmt.Errorf("the guest agent of %s did not answer within the boot timeout of %s: %w", j.domain, req.BootTimeout(), err)}
		}
		return &stepError{code: messages.CodeAgentFailed, err: err}
	}
	// Waiting for the agent takes as long as the guest boots.
	if err := m.confirm(ctx, j); err != nil {
		return err
	}
	osFamily, err := m.detectOS(ctx, j, imageOS)
	if err != nil {
		return &stepError{code: messages.CodeAgentFailed, err: err}
	}
	j.os = string(osFamily)
	if err := m.emit(ctx, j, messages.StateAgentReady, d, m.since(start), "", nil); err != nil {
		return err
	}
	m.cfg.Faults.At(FaultAfterAgentReady)

	plan, err := runners.For(j.id, osFamily, req.Runner)
	switch {
	case errors.Is(err, runners.ErrUnsupported):
		return &stepError{code: messages.CodeRunnerUnsupported, err: err}
	case err != nil:
		return &stepError{code: messages.CodeInvalidRequest, err: err}
	case plan.Empty():
		return nil
	}
	// Nothing goes into the guest unless this host still serves the job.
	if err := m.confirm(ctx, j); err != nil {
		return err
	}
	start = m.cfg.Now()
	for _, c := range plan.Prepare {
		pctx, cancel := context.WithTimeout(ctx, prepareTimeout)
		_, err := m.cfg.Agent.Run(pctx, j.domain, execRequest(c, false))
		cancel()
		if err != nil {
			return &stepError{code: messages.CodeRunnerStartFailed, err: fmt.Errorf("%s: %w", c.Purpose, err)}
		}
	}
	if err := m.confirm(ctx, j); err != nil {
		return err
	}
	pid, err := m.cfg.Agent.Start(ctx, j.domain, execRequest(plan.Launch, true))
	if err != nil {
		return &stepError{code: messages.CodeRunnerStartFailed,
			err: fmt.Errorf("%s: %w", plan.Launch.Purpose, err)}
	}
	j.pid, j.runnerSince = pid, m.cfg.Now()
	if err := m.emit(ctx, j, messages.StateRunnerStarted, d, m.since(start), "", nil); err != nil {
		return err
	}
	m.cfg.Faults.At(FaultAfterRunnerStart)
	return nil
}

func execRequest(c runners.Command, capture bool) qga.ExecRequest {
	return qga.ExecRequest{Path: c.Path, Args: c.Args, Env: c.Env, Stdin: c.Stdin, Capture: capture}
}

// detectOS returns the image's declared OS family, or asks the guest.
func (m *Manager) detectOS(ctx context.Context, j *job, imageOS string) (runners.OS, error) {
	if imageOS != "" {
		return runners.ParseOS(imageOS, "")
	}
	info, err := m.cfg.Agent.OSInfo(ctx, j.domain)
	if err != nil {
		return "", fmt.Errorf("detect the OS of %s: %w", j.domain, err)
	}
	os, err := runners.ParseOS(info.ID, "")
	if err == nil {
		return os, nil
	}
	// guest-get-osinfo carries no kernel name, and os-release ids are
	// open-ended: ask a Unix guest's kernel.
	uctx, cancel := context.WithTimeout(ctx, prepareTimeout)
	defer cancel()
	st, uerr := m.cfg.Agent.Run(uctx, j.domain, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", "uname -s"}, Capture: true})
	if uerr != nil {
		return "", fmt.Errorf("detect the OS of %s: %w (uname: %v)", j.domain, err, uerr)
	}
	os, err = runners.ParseOS(info.ID, strings.TrimSpace(string(st.Stdout)))
	if err != nil {
		return "", fmt.Errorf("detect the OS of %s: %w", j.domain, err)
	}
	return os, nil
}

// secretsOf lists the secret values of a runner section, to scrub them from
// anything the guest prints.
func secretsOf(r messages.Runner) []string {
	var s []string
	if r.Forgejo != nil {
		s = append(s, r.Forgejo.Token)
	}
	if r.GitHub != nil {
		s = append(s, r.GitHub.JITConfig)
	}
	if r.Jenkins != nil {
		s = append(s, r.Jenkins.Secret)
	}
	return s
}

// Ending is a running job whose machine must now be torn down.
type Ending struct {
	JobID  string
	Reason string
	// Cause is set when the end is a failure; the teardown then ends in
	// failed with this error.
	Cause *messages.Error
}

// Check looks at every running job once: a runner that exited is reported
// with runner_exited, and the job is returned for teardown, as are jobs
// whose machine stopped on its own and jobs past their deadline. Jobs
// returned stay returned until a teardown of them begins.
func (m *Manager) Check(ctx context.Context) []Ending {
	now := m.cfg.Now()
	m.mu.Lock()
	var todo []*job
	for _, j := range m.jobs {
		if j.running && !j.tearing && !now.Before(j.retryAt) {
			todo = append(todo, j)
		}
	}
	m.mu.Unlock()

	var out []Ending
	for _, j := range todo {
		if e, ok := m.check(ctx, j, now); ok {
			out = append(out, e)
		}
	}
	return out
}

func (m *Manager) check(ctx context.Context, j *job, now time.Time) (Ending, bool) {
	if !j.deadline.IsZero() && now.After(j.deadline) {
		_, cause, _ := causeOf(messages.ReasonDeadline, j.domain)
		return Ending{JobID: j.id, Reason: messages.ReasonDeadline, Cause: cause}, true
	}
	d := Delivery{Origin: messages.ReasonRunnerExited}
	if j.exited {
		if err := m.emitExit(ctx, j, d); err != nil {
			return Ending{}, false
		}
		reason := j.endReason
		if reason == "" {
			reason = messages.ReasonRunnerExited
		}
		return Ending{JobID: j.id, Reason: reason}, true
	}
	mach, found, err := m.cfg.Machines.Lookup(ctx, j.id)
	if err != nil {
		return Ending{}, false // libvirt unreachable: look again next time
	}
	if !found || !mach.Running {
		_, cause, _ := causeOf(messages.ReasonStopped, j.domain)
		return Ending{JobID: j.id, Reason: messages.ReasonStopped, Cause: cause}, true
	}
	if j.pid == 0 || m.cfg.Agent == nil {
		return Ending{}, false
	}
	st, err := m.cfg.Agent.Status(ctx, j.domain, j.pid)
	switch {
	case errors.Is(err, qga.ErrCommandFailed):
		// The agent answers but no longer knows the runner (it was
		// restarted in the guest): nothing will ever report its end.
		if j.statusFailures++; j.statusFailures >= lostRunnerChecks {
			return Ending{JobID: j.id, Reason: messages.ReasonRunnerLost, Cause: &messages.Error{
				Code: messages.CodeAgentFailed, Message: fmt.Sprintf("the guest agent of %s lost track of the runner: %v", j.domain, err)}}, true
		}
		return Ending{}, false
	case err != nil || !st.Exited:
		// An agent that does not answer now may answer later; the
		// deadline bounds the wait.
		j.statusFailures = 0
		return Ending{}, false
	}
	// qemu-ga reports an exit once: keep it until it is published.
	code := st.ExitCode
	j.exitCode, j.exited = &code, true
	j.exitOutput, j.outputWithheld = output(j, st)
	if err := m.emitExit(ctx, j, d); err != nil {
		return Ending{}, false
	}
	return Ending{JobID: j.id, Reason: messages.ReasonRunnerExited}, true
}

// emitExit publishes runner_exited once per job.
func (m *Manager) emitExit(ctx context.Context, j *job, d Delivery) error {
	if j.exitReported {
		return nil
	}
	if err := m.emit(ctx, j, messages.StateRunnerExited, d, m.since(j.runnerSince), "", nil); err != nil {
		return err
	}
	j.exitReported = true
	m.cfg.Faults.At(FaultAfterRunnerExit)
	return nil
}

// output returns the end of what the runner printed, without secrets:
// each of stdout and stderr is scrubbed on its own and in whole before the
// two are joined and cut to their last maxOutput bytes, so that a secret
// cut by either does not leave a part of itself. A stream the agent
// truncated at its limit may end in the first bytes of a secret; that end
// is redacted too. When the job's secrets are not known (the machine was
// adopted after a restart) nothing is returned and withheld is true.
func output(j *job, st qga.Status) (out string, withheld bool) {
	if !j.secretsKnown {
		return "", len(st.Stdout)+len(st.Stderr) > 0
	}
	out = scrub(string(st.Stdout), j.secrets, st.StdoutTruncated) + scrub(string(st.Stderr), j.secrets, st.StderrTruncated)
	if len(out) > maxOutput {
		out = out[len(out)-maxOutput:]
		if i := strings.IndexByte(out, '\n'); i >= 0 && i < len(out)-1 {
			out = out[i+1:]
		}
	}
	return strings.ToValidUTF8(out, "?"), false
}

// redacted replaces a secret in a runner's output.
const redacted = "[REDACTED]"

// scrub replaces every occurrence of each secret in s; when s was cut
// short after its last byte (truncated), an end of s that begins a secret
// is replaced as well.
func scrub(s string, secrets []string, truncated bool) string {
	for _, secret := range secrets {
		if secret != "" {
			s = strings.ReplaceAll(s, secret, redacted)
		}
	}
	if !truncated {
		return s
	}
	cut := len(s)
	for _, secret := range secrets {
		if n := overlap(s, secret); n > 0 {
			cut = min(cut, len(s)-n)
		}
	}
	if cut < len(s) {
		s = s[:cut] + redacted
	}
	return s
}

// overlap returns the length of the longest end of s that is a proper
// beginning of secret, in time linear in len(secret): the KMP failure
// function of secret, run over the end of s. Secrets hold no NUL byte.
func overlap(s, secret string) int {
	if len(secret) < 2 {
		return 0
	}
	fail := make([]int, len(secret))
	for i, k := 1, 0; i < len(secret); i++ {
		for k > 0 && secret[i] != secret[k] {
			k = fail[k-1]
		}
		if secret[i] == secret[k] {
			k++
		}
		fail[i] = k
	}
	k := 0
	for i := max(0, len(s)-len(secret)+1); i < len(s); i++ {
		for k > 0 && (k == len(secret) || s[i] != secret[k]) {
			k = fail[k-1]
		}
		if s[i] == secret[k] {
			k++
		}
	}
	return min(k, len(secret)-1)
}
