package qga

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// ExecRequest describes a program for the guest agent to start.
type ExecRequest struct {
	// Path is the program to run. qemu-ga searches its own PATH for a
	// name without a slash; an absolute path avoids surprises.
	Path string
	// Args are the program's arguments, without the program name.
	Args []string
	// Env, when not nil, REPLACES the program's whole environment with
	// these "NAME=value" entries: qemu-ga passes nothing of its own on,
	// not even PATH or HOME (seen with qemu-ga 7.2). An empty, non-nil
	// Env runs the program with an empty environment. A nil Env lets the
	// program inherit qemu-ga's environment.
	Env []string
	// Stdin is written to the program's standard input, which is then
	// closed. It may hold a secret: it travels base64-encoded inside the
	// agent command and never appears in an error. Without it the
	// program's standard input is /dev/null. Arguments and environment
	// show up in the guest's process list; pass secrets here instead.
	Stdin []byte
	// Capture asks qemu-ga to collect standard output and error for
	// Status to return. qemu-ga keeps up to 16 MiB of each, but the reply
	// travels base64-encoded as one libvirt RPC string of at most 4 MiB,
	// so about 3 MiB of output in all is the practical limit. Without
	// Capture both go to /dev/null.
	Capture bool
}

// Status is what guest-exec-status reports about a started program.
type Status struct {
	// Exited is true once the program has ended. qemu-ga forgets the pid
	// after reporting it once: a later Status for it fails with
	// ErrCommandFailed.
	Exited bool
	// ExitCode is the program's exit code once it exited normally, and
	// -1 while it runs or when a signal killed it.
	ExitCode int
	// Signal is the number of the signal that killed the program, or 0.
	Signal int
	// Stdout and Stderr hold the output captured so far when the
	// ExecRequest asked for it.
	Stdout, Stderr []byte
	// StdoutTruncated and StderrTruncated report that the agent dropped
	// output past its limit.
	StdoutTruncated, StderrTruncated bool
}

// Success reports whether the program exited with code 0.
func (s Status) Success() bool { return s.Exited && s.ExitCode == 0 && s.Signal == 0 }

// execArgs are guest-exec's arguments.
type execArgs struct {
	Path          string    `json:"path"`
	Arg           []string  `json:"arg,omitempty"`
	Env           *[]string `json:"env,omitempty"`
	InputData     string    `json:"input-data,omitempty"`
	CaptureOutput bool      `json:"capture-output,omitempty"`
}

// Start starts req.Path in domain and returns its pid in the guest, to pass
// to Status. It returns as soon as the program is spawned.
//
// When the agent refuses to start the program (qemu-ga 7.2 reports a missing
// program here, not as an exit code) the error is an *ExecError. Errors name
// the domain and the program, never its arguments, environment or input.
func (a *Agent) Start(ctx context.Context, domain string, req ExecRequest) (int, error) {
	if req.Path == "" {
		return 0, fmt.Errorf("guest-exec on %s: empty program path", domain)
	}
	dom, err := a.lookup(ctx, domain)
	if err != nil {
		return 0, err
	}
	return a.start(ctx, dom, req)
}

func (a *Agent) start(ctx context.Context, dom libvirt.Domain, req ExecRequest) (int, error) {
	args := execArgs{Path: req.Path, Arg: req.Args, CaptureOutput: req.Capture}
	if req.Env != nil {
		env := req.Env
		args.Env = &env
	}
	if len(req.Stdin) > 0 {
		args.InputData = base64.StdEncoding.EncodeToString(req.Stdin)
	}
	raw, err := a.raw(ctx, dom, "guest-exec", args, a.opts.CallTimeout)
	if err != nil {
		err = scrub(withSentinel(err), args.InputData, secretText(req.Stdin))
		if errors.Is(err, ErrCommandFailed) {
			return 0, &ExecError{Domain: dom.Name, Path: req.Path, Err: err}
		}
		return 0, fmt.Errorf("guest-exec %s on %s: %w", req.Path, dom.Name, err)
	}
	var r struct {
		PID *int `json:"pid"`
	}
	if err := json.Unmarshal(raw, &r); err != nil || r.PID == nil {
		return 0, fmt.Errorf("guest-exec %s on %s: reply has no pid", req.Path, dom.Name)
	}
	return *r.PID, nil
}

// secretText returns stdin as a string to look for in error messages, or ""
// when it is too short to tell apart from ordinary text.
func secretText(stdin []byte) string {
	if len(stdin) < 8 {
		return ""
	}
	return string(stdin)
}

// Status returns the state of the program with pid, started by Start, with
// its captured output decoded. Once it reports Exited, qemu-ga forgets pid.
func (a *Agent) Status(ctx context.Context, domain string, pid int) (Status, error) {
	dom, err := a.lookup(ctx, domain)
	if err != nil {
		return Status{}, err
	}
	return a.status(ctx, dom, pid)
}

func (a *Agent) status(ctx context.Context, dom libvirt.Domain, pid int) (Status, error) {
	raw, err := a.raw(ctx, dom, "guest-exec-status", struct {
		PID int `json:"pid"`
	}{pid}, a.opts.CallTimeout)
	if err != nil {
		return Status{}, fmt.Errorf("guest-exec-status %d on %s: %w", pid, dom.Name, withSentinel(err))
	}
	st, err := decodeStatus(raw)
	if err != nil {
		return Status{}, fmt.Errorf("guest-exec-status %d on %s: %w", pid, dom.Name, err)
	}
	return st, nil
}

// decodeStatus turns guest-exec-status's return value into a Status.
func decodeStatus(raw []byte) (Status, error) {
	var r struct {
		Exited       bool   `json:"exited"`
		ExitCode     *int   `json:"exitcode"`
		Signal       *int   `json:"signal"`
		OutData      string `json:"out-data"`
		ErrData      string `json:"err-data"`
		OutTruncated bool   `json:"out-truncated"`
		ErrTruncated bool   `json:"err-truncated"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return Status{}, fmt.Errorf("decode reply: %w", err)
	}
	st := Status{
		Exited:          r.Exited,
		ExitCode:        -1,
		StdoutTruncated: r.OutTruncated,
		StderrTruncated: r.ErrTruncated,
	}
	if r.ExitCode != nil {
		st.ExitCode = *r.ExitCode
	}
	if r.Signal != nil {
		st.Signal = *r.Signal
	}
	var err error
	if st.Stdout, err = decodeOutput(r.OutData); err != nil {
		return Status{}, fmt.Errorf("decode stdout: %w", err)
	}
	if st.Stderr, err = decodeOutput(r.ErrData); err != nil {
		return Status{}, fmt.Errorf("decode stderr: %w", err)
	}
	return st, nil
}

func decodeOutput(s string) ([]byte, error) {
	if s == "" {
		return nil, nil
	}
	return base64.StdEncoding.DecodeString(s)
}

// Run starts req.Path in domain and waits until it exits, polling its status
// every 5 ms for 100 ms and then at an interval that doubles up to 500 ms:
// short commands are seen to end within a few ms, long ones cost two calls
// a second. It returns the
// final Status; when the program exited non-zero or was killed, also an
// *ExitError. When ctx ends first it returns ErrRunTimeout wrapping ctx's
// error and the last Status; the program may still run in the guest.
func (a *Agent) Run(ctx context.Context, domain string, req ExecRequest) (Status, error) {
	if req.Path == "" {
		return Status{}, fmt.Errorf("guest-exec on %s: empty program path", domain)
	}
	dom, err := a.lookup(ctx, domain)
	if err != nil {
		return Status{}, err
	}
	pid, err := a.start(ctx, dom, req)
	if err != nil {
		return Status{}, err
	}

	interval, fastUntil := runPollMin, time.Now().Add(runPollFast)
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	var st Status
	for {
		select {
		case <-ctx.Done():
			return st, fmt.Errorf("guest-exec %s on %s: pid %d: %w: %w", req.Path, dom.Name, pid, ErrRunTimeout, ctx.Err())
		case <-ticker.C:
		}
		st, err = a.status(ctx, dom, pid)
		if err != nil {
			if ctx.Err() != nil {
				return st, fmt.Errorf("guest-exec %s on %s: pid %d: %w: %w", req.Path, dom.Name, pid, ErrRunTimeout, ctx.Err())
			}
			return st, fmt.Errorf("guest-exec %s: %w", req.Path, err)
		}
		if st.Exited {
			break
		}
		if interval < runPollMax && time.Now().After(fastUntil) {
			interval = min(2*interval, runPollMax)
			ticker.Reset(interval)
		}
	}
	if !st.Success() {
		return st, &ExitError{Domain: dom.Name, Path: req.Path, Status: st, tail: stderrTail(st.Stderr, req.Stdin)}
	}
	return st, nil
}
