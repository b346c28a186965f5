package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

const libvirtSocket = "/var/run/libvirt/libvirt-sock"

// requireLibvirt skips the test without libvirtd, or fails it when
// STRETCHY_REQUIRE_LIBVIRT=1 says it must be there (CI).
func requireLibvirt(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(libvirtSocket); err != nil {
		if os.Getenv("STRETCHY_REQUIRE_LIBVIRT") == "1" {
			t.Fatalf("libvirtd socket %s: %v", libvirtSocket, err)
		}
		t.Skipf("no libvirtd (%v); set STRETCHY_REQUIRE_LIBVIRT=1 to fail instead", err)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// lockedBuffer is a child's output, written while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// daemon is "worker run" in a process of its own, as on a host.
type daemon struct {
	cmd *exec.Cmd
	log *lockedBuffer
}

// startDaemon starts "worker args..." with env and no other STRETCHY_
// variable, and waits for its log to say "worker started". It is stopped
// with SIGTERM when the test ends.
func startDaemon(t *testing.T, env []string, args ...string) *daemon {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "STRETCHY_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(append(cmd.Env, "WORKER_TEST_RUN_MAIN=1"), env...)
	d := &daemon{cmd: cmd, log: &lockedBuffer{}}
	cmd.Stdout, cmd.Stderr = d.log, d.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("worker %s log:\n%s", strings.Join(args, " "), d.log.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(d.log.String(), "worker started") {
		select {
		case <-exited:
			t.Fatalf("worker %s exited:\n%s", strings.Join(args, " "), d.log.String())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("worker %s did not start within 30s:\n%s", strings.Join(args, " "), d.log.String())
		}
	}
	return d
}

// runWorkerAs is runWorker as the user uid, from a copy of the test
// binary that user may run.
func runWorkerAs(t *testing.T, uid int, env []string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	dir, err := os.MkdirTemp("", "worker-as")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin := filepath.Join(dir, "worker")
	b, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "STRETCHY_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(append(cmd.Env, "WORKER_TEST_RUN_MAIN=1"), env...)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(uid)}}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		code = exit.ExitCode()
	case err != nil:
		t.Fatal(err)
	}
	return out.String(), errOut.String(), code
}

// TestEmbeddedServerCommands runs worker run with its embedded server, as
// on a single host, and the other commands against it with the same
// environment and no NATS flags: they find the server and its
// credentials. A client without them is refused, as is a command given
// another data directory, which says where it looked; the seed shows in
// no log, output, argument list or environment.
func TestEmbeddedServerCommands(t *testing.T) {
	requireLibvirt(t)
	dir := filepath.Join(t.TempDir(), "nats")
	port := strconv.Itoa(freePort(t))
	host := "h-embedded"
	env := []string{"STRETCHY_NATS_DATA_DIR=" + dir, "STRETCHY_NATS_PORT=" + port, "STRETCHY_HOST=" + host,
		"STRETCHY_LIBVIRT_URI=test:///default", "STRETCHY_CONSOLE_DIR=", "STRETCHY_LOG_LEVEL=debug"}
	w := startDaemon(t, env, "run")
	url := "nats://127.0.0.1:" + port

	seedFile, err := os.ReadFile(embedded.CredentialsPath(dir))
	if err != nil {
		t.Fatal(err)
	}
	var seed string
	for _, line := range strings.Split(string(seedFile), "\n") {
		if strings.HasPrefix(line, "SU") {
			seed = line
		}
	}
	if seed == "" {
		t.Fatalf("no seed in %s", embedded.CredentialsPath(dir))
	}
	var outputs []string

	// Anyone else who can open a connection, a guest through user-mode
	// networking among them.
	if nc, err := nats.Connect(url, nats.MaxReconnects(0)); err == nil {
		nc.Close()
		t.Fatal("connected to the embedded server without credentials")
	} else if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("without credentials: %v, want an authorization violation", err)
	}

	job := "embedded-1"
	for _, c := range []struct {
		args []string
		code int
		says string
	}{
		{[]string{"hosts"}, 0, host},
		{[]string{"submit", "provision", "--job", job, "--image", "no-such-image", "--host", host}, 0, "submitted provision for job " + job},
		{[]string{"events", "--job", job, "--follow", "--until", "failed"}, 0, "image_not_found"},
		{[]string{"events", "--summary"}, 0, job},
		{[]string{"drain", host}, 0, "host " + host + " drains"},
		{[]string{"undrain", host}, 0, "host " + host + " takes provisions again"},
		// The job has no machine to hold: the worker answers so.
		{[]string{"hold", job}, 1, "host " + host + ": "},
		{[]string{"console", job}, 1, "host " + host + ": "},
		{[]string{"config"}, 0, `nats-data-dir = "` + dir + `"`},
	} {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			stdout, stderr, code := runWorker(t, env, c.args...)
			outputs = append(outputs, stdout, stderr)
			if code != c.code || !strings.Contains(stdout+stderr, c.says) {
				t.Fatalf("exit status %d, want %d, saying %q:\n%s%s", code, c.code, c.says, stdout, stderr)
			}
		})
	}
	t.Run("doctor", func(t *testing.T) {
		stdout, stderr, _ := runWorker(t, env, "doctor", "--json", "--nats-url", url)
		outputs = append(outputs, stdout, stderr)
		var report struct {
			Checks []check `json:"checks"`
		}
		if err := json.Unmarshal([]byte(stdout), &report); err != nil {
			t.Fatalf("%v:\n%s%s", err, stdout, stderr)
		}
		seen := map[string]bool{}
		for _, c := range report.Checks {
			if strings.HasPrefix(c.Name, "nats") {
				seen[c.Name] = true
				if c.Status != statusOK {
					t.Errorf("%s %s: %s %s", c.Name, c.Target, c.Status, c.Message)
				}
			}
		}
		if !seen["nats"] || !seen["nats.stream"] || !seen["nats.consumer"] {
			t.Errorf("NATS checks %v, want nats, nats.stream and nats.consumer", seen)
		}
	})
	t.Run("another data directory", func(t *testing.T) {
		other := t.TempDir()
		stdout, stderr, code := runWorker(t, append(env, "STRETCHY_NATS_DATA_DIR="+other), "hosts")
		outputs = append(outputs, stdout, stderr)
		want := "there are none in " + embedded.CredentialsPath(other)
		if code != 1 || !strings.Contains(stderr, "authorization violation") || !strings.Contains(stderr, want) {
			t.Fatalf("exit status %d, want 1 and an authorization violation saying %q:\n%s", code, want, stderr)
		}
	})
	t.Run("a user who may not read the credentials", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("running a command as another user needs root")
		}
		stdout, stderr, code := runWorkerAs(t, 65534, env, "hosts")
		outputs = append(outputs, stdout, stderr)
		want := embedded.CredentialsPath(dir) + ", which this user may not read: run the command as root or as the worker's user"
		if code != 1 || !strings.Contains(stderr, "authorization violation") || !strings.Contains(stderr, want) {
			t.Fatalf("exit status %d, want 1 and an authorization violation saying %q:\n%s", code, want, stderr)
		}
	})
	t.Run("a file others may read", func(t *testing.T) {
		copyDir := t.TempDir()
		path := embedded.CredentialsPath(copyDir)
		if err := os.WriteFile(path, seedFile, 0o644); err != nil {
			t.Fatal(err)
		}
		stdout, stderr, code := runWorker(t, append(env, "STRETCHY_NATS_DATA_DIR="+copyDir), "hosts")
		outputs = append(outputs, stdout, stderr)
		if code != 1 || !strings.Contains(stderr, path+": mode 0644") || strings.Contains(stderr, "connect to nats") {
			t.Fatalf("exit status %d, want 1 and a refusal of %s before connecting:\n%s", code, path, stderr)
		}
	})

	pid := w.cmd.Process.Pid
	for _, f := range []string{"cmdline", "environ"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, f))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte(seed)) {
			t.Errorf("the worker's %s shows the seed", f)
		}
	}
	if err := w.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(w.log.String(), "worker stopped") && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	log := w.log.String()
	if !strings.Contains(log, "started embedded nats") || !strings.Contains(log, embedded.CredentialsPath(dir)) {
		t.Errorf("the log does not say where the embedded server's credentials are:\n%s", log)
	}
	for i, out := range append(outputs, log) {
		if strings.Contains(out, seed) || strings.Contains(out, seed[2:20]) {
			t.Errorf("output %d shows the seed:\n%s", i, out)
		}
	}
}

// TestRunWithLeastPermissions runs worker run against a NATS server whose
// users hold exactly the documented permissions (docs/security.md 2),
// each with its role's inbox prefix only: the worker starts and serves,
// an orchestrator's submit and events and an operator's hosts, drain,
// undrain and hold work with their defaults. An operator command with
// another inbox prefix is refused, and the worker leaves a control
// request unanswered whose reply subject is not under the operators'
// prefix.
func TestRunWithLeastPermissions(t *testing.T) {
	requireLibvirt(t)
	host := "h-least"
	wpub, wsub := bus.WorkerPermissions(host)
	opub, osub := client.OrchestratorPermissions()
	ppub, psub := client.OperatorPermissions()
	srv, pwFile := permServer(t, map[string][2][]string{
		"worker": {wpub, wsub}, "orchestrator": {opub, osub}, "operator": {ppub, psub},
	})
	url := "nats://" + hostPort(srv)
	as := func(user string) []string {
		return []string{"STRETCHY_NATS_URL=" + url, "STRETCHY_NATS_USER=" + user, "STRETCHY_NATS_PASSWORD_FILE=" + pwFile,
			"STRETCHY_HOST=" + host, "STRETCHY_NATS_DATA_DIR=" + t.TempDir()}
	}
	w := startDaemon(t, append(as("worker"), "STRETCHY_LIBVIRT_URI=test:///default", "STRETCHY_CONSOLE_DIR="), "run")

	job := "least-1"
	for _, c := range []struct {
		user string
		env  []string
		args []string
		code int
		says string
	}{
		{"orchestrator", nil, []string{"submit", "provision", "--job", job, "--image", "no-such-image", "--host", host}, 0, "submitted provision"},
		{"orchestrator", nil, []string{"events", "--job", job, "--follow", "--until", "failed"}, 0, "image_not_found"},
		{"operator", nil, []string{"hosts"}, 0, host},
		{"operator", nil, []string{"drain", host}, 0, "drains"},
		{"operator", nil, []string{"undrain", host}, 0, "takes provisions again"},
		{"operator", nil, []string{"hold", job}, 1, "host " + host + ": "},
		{"operator", nil, []string{"hosts", "--inbox-prefix", "_INBOX.elsewhere"}, 1, `may not subscribe to "_INBOX.elsewhere.`},
		{"operator", []string{"STRETCHY_OPERATOR_INBOX_PREFIX=_INBOX.elsewhere"}, []string{"hosts"}, 1, `may not subscribe to "_INBOX.elsewhere.`},
		{"operator", nil, []string{"hosts", "--inbox-prefix", "_INBOX.stretchy.operator."}, 1, "--inbox-prefix \"_INBOX.stretchy.operator.\": a trailing dot"},
		{"orchestrator", []string{"STRETCHY_ORCHESTRATOR_INBOX_PREFIX=" + client.OperatorInbox}, []string{"events", "--job", job},
			1, `may not subscribe to "` + client.OperatorInbox + `.`},
	} {
		t.Run(c.user+" "+strings.Join(append(c.env, c.args...), " "), func(t *testing.T) {
			stdout, stderr, code := runWorker(t, append(as(c.user), c.env...), c.args...)
			if code != c.code || !strings.Contains(stdout+stderr, c.says) {
				t.Fatalf("exit status %d, want %d, saying %q:\n%s%s", code, c.code, c.says, stdout, stderr)
			}
		})
	}

	// A control request whose reply subject is an inbox, but not an
	// operator's, is refused unanswered.
	admin, _, err := connectNATS(url, NATSAuth{User: "admin", PasswordFile: pwFile}, natsClient{Name: "admin", InboxPrefix: client.OrchestratorInbox})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	data, err := messages.Marshal(messages.Control{V: messages.SchemaVersion, Op: messages.ControlConsole, JobID: job})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Request(messages.ControlSubject(host), data, 2*time.Second); !errors.Is(err, nats.ErrTimeout) {
		t.Fatalf("a control request with the reply subject of an orchestrator's inbox: %v, want no answer", err)
	}
	want := `reply subject \"` + client.OrchestratorInbox + "."
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(w.log.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("the worker's log does not say it refused the request (%s):\n%s", want, w.log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if log := w.log.String(); strings.Contains(strings.ToLower(log), "permissions violation") {
		t.Fatalf("the worker was refused something:\n%s", log)
	}
}
