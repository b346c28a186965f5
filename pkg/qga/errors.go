package qga

import (
	"errors"
	"fmt"
	"strings"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/redact"
)

// Sentinel errors for the branches callers take. They are always wrapped
// with the domain and the agent command they concern and, where libvirt
// reported the problem, with the libvirt.Error itself.
var (
	// ErrAgentUnavailable means the domain runs but its guest agent is not
	// connected or did not answer in time. It is usually transient: the
	// guest is still booting, or is busy.
	ErrAgentUnavailable = errors.New("guest agent unavailable")
	// ErrAgentTimeout means WaitReady's context ended before the guest
	// agent answered. It wraps the context's error.
	ErrAgentTimeout = errors.New("guest agent not ready in time")
	// ErrAgentNotConfigured means the domain has no guest agent channel,
	// so the agent can never answer.
	ErrAgentNotConfigured = errors.New("guest agent not configured")
	// ErrDomainNotRunning means the domain is shut off, crashed or paused.
	ErrDomainNotRunning = errors.New("domain not running")
	// ErrDomainNotFound means no domain has the given name.
	ErrDomainNotFound = errors.New("no such domain")
	// ErrCommandFailed means the guest agent answered the command with an
	// error, for example because guest-exec could not start the program or
	// guest-exec-status does not know the pid.
	ErrCommandFailed = errors.New("guest agent command failed")
	// ErrRunTimeout means Run's context ended before the program exited.
	// The program may still be running in the guest. It wraps the
	// context's error.
	ErrRunTimeout = errors.New("program did not exit in time")
)

// classify names the case a libvirt error stands for. It is the one place
// that looks inside libvirt errors. It returns nil for errors that are not
// libvirt's (connection failures, decoding) or that callers do not branch
// on.
func classify(err error) error {
	var e libvirt.Error
	if !errors.As(err, &e) {
		return nil
	}
	switch libvirt.ErrorNumber(e.Code) {
	case libvirt.ErrAgentUnresponsive, // "QEMU guest agent is not connected", "Guest agent not available for now"
		libvirt.ErrAgentCommandTimeout: // newer libvirt: the agent did not answer in time
		return ErrAgentUnavailable
	case libvirt.ErrArgumentUnsupported: // "QEMU guest agent is not configured"
		return ErrAgentNotConfigured
	case libvirt.ErrOperationInvalid: // "domain is not running", also when paused
		return ErrDomainNotRunning
	case libvirt.ErrNoDomain:
		return ErrDomainNotFound
	case libvirt.ErrAgentCommandFailed:
		return ErrCommandFailed
	case libvirt.ErrInternalError:
		// libvirt 9.0 reports an error answer of the agent as an internal
		// error: "internal error: unable to execute QEMU agent command
		// 'guest-exec': <the agent's message>".
		if strings.Contains(e.Message, "unable to execute QEMU agent command") {
			return ErrCommandFailed
		}
	}
	return nil
}

// retryable reports whether a failed guest-ping may succeed later while a
// guest boots: the agent is not connected yet, or libvirt reported a
// problem it does not classify, such as "Missing agent reply object" or
// "Error while processing agent IO" when qemu-ga (re)starts in the guest.
// A missing, stopped or agent-less domain, an error answer of the agent and
// failures of the libvirt connection itself are final.
func retryable(err error) bool {
	var e libvirt.Error
	if !errors.As(err, &e) {
		return false
	}
	s := classify(err)
	return s == nil || s == ErrAgentUnavailable
}

// withSentinel adds the sentinel classify finds for err in front of err, so
// that errors.Is finds the sentinel and errors.As still finds the
// libvirt.Error.
func withSentinel(err error) error {
	if s := classify(err); s != nil {
		return fmt.Errorf("%w: %w", s, err)
	}
	return err
}

// scrub returns err, or, when its text quotes one of secrets in any form
// redact.New lists, a libvirt.Error with the same code whose message says
// it was withheld. libvirt's messages do not quote agent commands today;
// this keeps it so should one ever do.
func scrub(err error, secrets ...string) error {
	if err == nil || !redact.New(secrets...).Contains(err.Error()) {
		return err
	}
	var e libvirt.Error
	if errors.As(err, &e) {
		return libvirt.Error{Code: e.Code, Message: "libvirt error message withheld: it quoted the program's input"}
	}
	return errors.New("error message withheld: it quoted the program's input")
}

// ExecError means the guest agent refused to start a program, for example
// because it does not exist or is not executable. errors.Is(err,
// ErrCommandFailed) holds for it.
type ExecError struct {
	// Domain is the domain the program was to run in.
	Domain string
	// Path is the program's path as given in the ExecRequest.
	Path string
	// Err is the agent's answer as libvirt reported it.
	Err error
}

// Error names the command, the program, the domain and the agent's reason,
// and never the program's arguments, environment or input.
func (e *ExecError) Error() string {
	return fmt.Sprintf("guest-exec %s on %s: %v", e.Path, e.Domain, e.Err)
}

// Unwrap returns the agent's answer.
func (e *ExecError) Unwrap() error { return e.Err }

// maxStderrTail is how much of the end of stderr an ExitError quotes.
const maxStderrTail = 512

// ExitError means a program ran and exited with a non-zero code or was
// killed by a signal. Run returns it along with the Status.
type ExitError struct {
	// Domain is the domain the program ran in.
	Domain string
	// Path is the program's path as given in the ExecRequest.
	Path string
	// Status is how the program ended, with its captured output.
	Status Status

	// tail is the end of stderr to quote, with the program's input
	// removed; set by Run, computed from Status otherwise.
	tail string
}

// Error names the program, the domain, the exit code or signal and quotes
// the end of stderr (at most 512 bytes).
func (e *ExitError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "guest-exec %s on %s: ", e.Path, e.Domain)
	if e.Status.Signal != 0 {
		fmt.Fprintf(&b, "killed by signal %d", e.Status.Signal)
	} else {
		fmt.Fprintf(&b, "exit code %d", e.Status.ExitCode)
	}
	tail := e.tail
	if tail == "" {
		tail = stderrTail(e.Status.Stderr, nil)
	}
	if tail != "" {
		fmt.Fprintf(&b, ", stderr %q", tail)
	}
	return b.String()
}

// stderrTail returns at most the last maxStderrTail bytes of stderr with
// surrounding white space removed, after replacing the program's input
// and each of its lines of eight bytes or more, in any form redact.New
// lists, with redact.Mark: a program that echoes a secret it was given
// must not leak it into an error message.
func stderrTail(stderr, stdin []byte) string {
	s := string(stderr)
	if len(stdin) > 0 {
		secrets := []string{string(stdin)}
		for line := range strings.SplitSeq(string(stdin), "\n") {
			if line = strings.TrimSpace(line); len(line) >= 8 {
				secrets = append(secrets, line)
			}
		}
		s = redact.New(secrets...).Scrub(s)
	}
	s = strings.TrimSpace(s)
	if len(s) > maxStderrTail {
		s = "…" + s[len(s)-maxStderrTail:]
	}
	return strings.ToValidUTF8(s, "\uFFFD")
}
