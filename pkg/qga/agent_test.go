package qga_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// ctxFor returns a context for one test step that ends with the test.
func ctxFor(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestWaitReady(t *testing.T) {
	g := sharedGuest(t)
	t.Logf("agent of %s answered guest-ping %v after DomainCreateXML", g.name, readyAfter.Round(time.Millisecond))

	// WaitReady woke up on libvirt's "agent connected" event rather than
	// on frequent polling.
	commands, events := readyConn.record()
	connected := 0
	for _, ev := range events {
		if m, ok := ev.(*libvirt.DomainEventCallbackAgentLifecycleMsg); ok && m.Dom.Name == g.name &&
			libvirt.ConnectDomainEventAgentLifecycleState(m.State) == libvirt.ConnectDomainEventAgentLifecycleStateConnected {
			connected++
		}
	}
	t.Logf("%d agent commands, %d agent lifecycle events (%d: %s connected)", len(commands), len(events), connected, g.name)
	if connected == 0 {
		t.Errorf("no agent-connected event for %s among %d events", g.name, len(events))
	}
	if limit := int(readyAfter/time.Second) + 3; len(commands) > limit {
		t.Errorf("WaitReady sent %d agent commands in %v, want at most %d (one a second plus the event's)", len(commands), readyAfter, limit)
	}

	// Once ready, WaitReady returns at once.
	a := qga.New(connect(t), qga.Options{})
	start := time.Now()
	if err := a.WaitReady(ctxFor(t, 2*time.Minute), g.name); err != nil {
		t.Fatalf("WaitReady on a ready guest: %v", err)
	}
	if d := time.Since(start); d > time.Minute {
		t.Errorf("WaitReady on a ready guest took %v, as if it waited for its context", d)
	}
}

func TestWaitReadyTimeout(t *testing.T) {
	// Only the firmware runs: the agent channel exists but nothing in the
	// guest ever opens it.
	g := newGuest(t, guestSpec{agent: true})
	a := qga.New(connect(t), qga.Options{})

	const wait = 2 * time.Second
	start := time.Now()
	err := a.WaitReady(ctxFor(t, wait), g.name)
	elapsed := time.Since(start)
	if !errors.Is(err, qga.ErrAgentTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitReady = %v, want ErrAgentTimeout wrapping context.DeadlineExceeded", err)
	}
	if elapsed > wait+20*time.Second {
		t.Errorf("WaitReady returned %v after its context ended, want promptly", elapsed-wait)
	}
	if !strings.Contains(err.Error(), g.name) {
		t.Errorf("error %q does not name the domain", err)
	}
}

func TestWaitReadyFailsFast(t *testing.T) {
	tests := []struct {
		name string
		spec *guestSpec // nil: no domain at all
		want error
	}{
		{name: "no agent channel", spec: &guestSpec{agent: false}, want: qga.ErrAgentNotConfigured},
		{name: "paused", spec: &guestSpec{agent: true, paused: true}, want: qga.ErrDomainNotRunning},
		{name: "no such domain", want: qga.ErrDomainNotFound},
	}
	a := qga.New(connect(t), qga.Options{})
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			name := namePrefix + "absent-" + randomHex(4)
			if tt.spec != nil {
				name = newGuest(t, *tt.spec).name
			}
			start := time.Now()
			err := a.WaitReady(ctxFor(t, 2*time.Minute), name)
			if !errors.Is(err, tt.want) {
				t.Fatalf("WaitReady = %v, want %v", err, tt.want)
			}
			if errors.Is(err, qga.ErrAgentTimeout) {
				t.Errorf("WaitReady = %v, want no ErrAgentTimeout", err)
			}
			if d := time.Since(start); d > time.Minute {
				t.Errorf("WaitReady took %v, as if it waited for its context; want it to fail at once", d)
			}
			if err := a.Ping(ctxFor(t, 10*time.Second), name); !errors.Is(err, tt.want) {
				t.Errorf("Ping = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestPing(t *testing.T) {
	g := sharedGuest(t)
	if err := qga.New(connect(t), qga.Options{}).Ping(ctxFor(t, 10*time.Second), g.name); err != nil {
		t.Fatal(err)
	}
}

func TestInfo(t *testing.T) {
	g := sharedGuest(t)
	info, err := qga.New(connect(t), qga.Options{}).Info(ctxFor(t, 10*time.Second), g.name)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("qemu-ga %s, %d commands enabled", info.Version, len(info.Commands))
	if !strings.HasPrefix(info.Version, "7.") {
		t.Errorf("Version = %q, want 7.x (the test guest has qemu-ga 7.2)", info.Version)
	}
	for _, c := range []string{"guest-ping", "guest-exec", "guest-exec-status", "guest-get-osinfo"} {
		if !slices.Contains(info.Commands, c) {
			t.Errorf("Commands lacks %s: %v", c, info.Commands)
		}
	}
}

func TestOSInfo(t *testing.T) {
	g := sharedGuest(t)
	os, err := qga.New(connect(t), qga.Options{}).OSInfo(ctxFor(t, 10*time.Second), g.name)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", os)
	// From the guest's /etc/os-release (test/guest) and uname.
	if os.ID != "stretchy-tiny" || os.VersionID != "1" || os.Name != "Stretchy tiny test guest" {
		t.Errorf("os-release fields = %q %q %q, want stretchy-tiny 1 \"Stretchy tiny test guest\"", os.ID, os.VersionID, os.Name)
	}
	if os.Machine != "x86_64" {
		t.Errorf("Machine = %q, want x86_64", os.Machine)
	}
	if !strings.HasSuffix(os.KernelRelease, "-amd64") || !strings.Contains(os.KernelVersion, "Debian") {
		t.Errorf("kernel = %q %q, want a Debian amd64 kernel", os.KernelRelease, os.KernelVersion)
	}
}

func TestRun(t *testing.T) {
	g := sharedGuest(t)
	a := qga.New(connect(t), qga.Options{})
	binary := []byte("line one\nline two\x00\xff\xfe binary\n")
	tests := []struct {
		name       string
		req        qga.ExecRequest
		wantStdout string // exact
		wantIn     string // contained in stdout
		wantNotIn  string // not contained in stdout
	}{
		{
			name:       "echo",
			req:        qga.ExecRequest{Path: "/bin/echo", Args: []string{"hello"}, Capture: true},
			wantStdout: "hello\n",
		},
		{
			name:       "stdin round trip",
			req:        qga.ExecRequest{Path: "/bin/cat", Stdin: binary, Capture: true},
			wantStdout: string(binary),
		},
		{
			name:       "env replaces the environment",
			req:        qga.ExecRequest{Path: "/usr/bin/env", Env: []string{"A=1"}, Capture: true},
			wantStdout: "A=1\n",
		},
		{
			name:       "empty env empties the environment",
			req:        qga.ExecRequest{Path: "/usr/bin/env", Env: []string{}, Capture: true},
			wantStdout: "",
		},
		{
			name:      "nil env inherits the agent's",
			req:       qga.ExecRequest{Path: "/usr/bin/env", Capture: true},
			wantIn:    "PATH=",
			wantNotIn: "A=1",
		},
		{
			name:   "as stretchy",
			req:    qga.ExecRequest{Path: "/bin/su", Args: []string{"-s", "/bin/sh", "stretchy", "-c", "id"}, Capture: true},
			wantIn: "uid=1000(stretchy)",
		},
		{
			name:       "without capture",
			req:        qga.ExecRequest{Path: "/bin/echo", Args: []string{"hello"}},
			wantStdout: "",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel() // the agent serialises; this checks Agent is safe to share
			st, err := a.Run(ctxFor(t, 60*time.Second), g.name, tt.req)
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
			if !st.Exited || st.ExitCode != 0 || st.Signal != 0 || !st.Success() {
				t.Errorf("status = %+v, want exited with code 0", st)
			}
			if len(st.Stderr) != 0 {
				t.Errorf("stderr = %q, want none", st.Stderr)
			}
			out := string(st.Stdout)
			if tt.wantIn == "" && out != tt.wantStdout {
				t.Errorf("stdout = %q, want %q", out, tt.wantStdout)
			}
			if tt.wantIn != "" && !strings.Contains(out, tt.wantIn) {
				t.Errorf("stdout = %q, want it to contain %q", out, tt.wantIn)
			}
			if tt.wantNotIn != "" && strings.Contains(out, tt.wantNotIn) {
				t.Errorf("stdout = %q, want no %q", out, tt.wantNotIn)
			}
		})
	}
}

func TestRunExitError(t *testing.T) {
	g := sharedGuest(t)
	a := qga.New(connect(t), qga.Options{})
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantSignal int
		wantStderr string
		wantMsg    []string
	}{
		{
			name:       "non-zero exit",
			args:       []string{"-c", "echo oops >&2; exit 3"},
			wantCode:   3,
			wantStderr: "oops\n",
			wantMsg:    []string{"guest-exec /bin/sh on " + g.name, "exit code 3", `"oops"`},
		},
		{
			name:       "killed by a signal",
			args:       []string{"-c", "kill -9 $$"},
			wantCode:   -1,
			wantSignal: 9,
			wantMsg:    []string{"guest-exec /bin/sh on " + g.name, "killed by signal 9"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			st, err := a.Run(ctxFor(t, 60*time.Second), g.name, qga.ExecRequest{Path: "/bin/sh", Args: tt.args, Capture: true})
			var ee *qga.ExitError
			if !errors.As(err, &ee) {
				t.Fatalf("Run = %v, want *ExitError", err)
			}
			if ee.Status.ExitCode != tt.wantCode || ee.Status.Signal != tt.wantSignal || !ee.Status.Exited || ee.Status.Success() {
				t.Errorf("ExitError.Status = %+v, want exit code %d, signal %d", ee.Status, tt.wantCode, tt.wantSignal)
			}
			if string(st.Stderr) != tt.wantStderr || string(ee.Status.Stderr) != tt.wantStderr {
				t.Errorf("stderr = %q (ExitError %q), want %q", st.Stderr, ee.Status.Stderr, tt.wantStderr)
			}
			for _, m := range tt.wantMsg {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q lacks %q", err, m)
				}
			}
			if ee.Path != "/bin/sh" || ee.Domain != g.name {
				t.Errorf("ExitError names %s on %s", ee.Path, ee.Domain)
			}
		})
	}
}

func TestStartMissingProgram(t *testing.T) {
	g := sharedGuest(t)
	a := qga.New(connect(t), qga.Options{})
	const path = "/nonexistent/program"
	req := qga.ExecRequest{Path: path, Args: []string{"--flag"}, Capture: true}

	for name, run := range map[string]func() error{
		"Start": func() error { _, err := a.Start(ctxFor(t, 30*time.Second), g.name, req); return err },
		"Run":   func() error { _, err := a.Run(ctxFor(t, 30*time.Second), g.name, req); return err },
	} {
		t.Run(name, func(t *testing.T) {
			err := run()
			var ee *qga.ExecError
			if !errors.As(err, &ee) || !errors.Is(err, qga.ErrCommandFailed) {
				t.Fatalf("got %v, want *ExecError and ErrCommandFailed", err)
			}
			if ee.Path != path || ee.Domain != g.name {
				t.Errorf("ExecError names %s on %s", ee.Path, ee.Domain)
			}
			msg := err.Error()
			for _, want := range []string{"guest-exec", path, g.name, "No such file"} {
				if !strings.Contains(msg, want) {
					t.Errorf("error %q lacks %q", msg, want)
				}
			}
			if strings.Contains(msg, "--flag") {
				t.Errorf("error %q quotes the arguments", msg)
			}
		})
	}
}

func TestSecretNeverInErrors(t *testing.T) {
	g := sharedGuest(t)
	a := qga.New(connect(t), qga.Options{})
	secret := "stretchy-secret-" + randomHex(8)
	tests := []struct {
		name  string
		req   qga.ExecRequest
		start bool // use Start instead of Run
		// echoed: the program writes its input to stderr, so the
		// secret is in Status and must be kept out of the message.
		echoed bool
	}{
		{
			name:  "missing program",
			req:   qga.ExecRequest{Path: "/nonexistent/program", Stdin: []byte(secret)},
			start: true,
		},
		{
			name: "failing program reading its input",
			req:  qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", "cat >/dev/null; echo failed >&2; exit 2"}, Stdin: []byte(secret), Capture: true},
		},
		{
			name:   "failing program echoing its input",
			req:    qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", "cat >&2; exit 1"}, Stdin: []byte(secret), Capture: true},
			echoed: true,
		},
		{
			name:   "failing program echoing a line of its input",
			req:    qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", "sed -n 2p >&2; exit 1"}, Stdin: []byte("token:\n" + secret + "\nend\n"), Capture: true},
			echoed: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var err error
			if tt.start {
				_, err = a.Start(ctxFor(t, 30*time.Second), g.name, tt.req)
			} else {
				_, err = a.Run(ctxFor(t, 30*time.Second), g.name, tt.req)
			}
			if err == nil {
				t.Fatal("no error")
			}
			t.Logf("error: %v", err)
			forbidden := []string{secret, base64.StdEncoding.EncodeToString([]byte(secret)), base64.StdEncoding.EncodeToString(tt.req.Stdin), `"input-data"`}
			for _, text := range []string{err.Error(), fmt.Sprintf("%+v", err), fmt.Sprintf("%v", errors.Unwrap(err))} {
				for _, f := range forbidden {
					if strings.Contains(text, f) {
						t.Errorf("error text %q contains %q", text, f)
					}
				}
			}
			var ee *qga.ExitError
			if tt.echoed && (!errors.As(err, &ee) || !bytes.Contains(ee.Status.Stderr, []byte(secret))) {
				t.Errorf("want an *ExitError whose Status.Stderr holds the echoed input, got %v", err)
			}
		})
	}
}

func TestStatus(t *testing.T) {
	g := sharedGuest(t)
	a := qga.New(connect(t), qga.Options{})
	ctx := ctxFor(t, 30*time.Second)

	pid, err := a.Start(ctx, g.name, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", "echo started; sleep 1; echo done"}, Capture: true})
	if err != nil {
		t.Fatal(err)
	}
	st, err := a.Status(ctx, g.name, pid)
	if err != nil {
		t.Fatal(err)
	}
	if st.Exited || st.ExitCode != -1 || st.Success() {
		t.Errorf("first Status = %+v, want running with ExitCode -1", st)
	}
	ticker := time.NewTicker(100 * time.Millisecond)
	defer ticker.Stop()
	for !st.Exited {
		select {
		case <-ctx.Done():
			t.Fatalf("pid %d did not exit: %v", pid, ctx.Err())
		case <-ticker.C:
		}
		if st, err = a.Status(ctx, g.name, pid); err != nil {
			t.Fatal(err)
		}
	}
	if !st.Success() || string(st.Stdout) != "started\ndone\n" || st.StdoutTruncated || st.StderrTruncated {
		t.Errorf("final Status = %+v, stdout %q", st, st.Stdout)
	}
	// qemu-ga forgets a pid once it has reported its exit.
	if _, err := a.Status(ctx, g.name, pid); !errors.Is(err, qga.ErrCommandFailed) {
		t.Errorf("Status of a reaped pid = %v, want ErrCommandFailed", err)
	}
}

func TestRunTimeout(t *testing.T) {
	g := sharedGuest(t)
	a := qga.New(connect(t), qga.Options{})
	const wait = time.Second
	start := time.Now()
	st, err := a.Run(ctxFor(t, wait), g.name, qga.ExecRequest{Path: "/bin/sleep", Args: []string{"30"}})
	if !errors.Is(err, qga.ErrRunTimeout) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run = %v, want ErrRunTimeout wrapping context.DeadlineExceeded", err)
	}
	if st.Exited {
		t.Errorf("Status = %+v, want still running", st)
	}
	if d := time.Since(start); d > wait+20*time.Second {
		t.Errorf("Run returned %v after its context ended", d-wait)
	}
}
