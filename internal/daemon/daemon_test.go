package daemon

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// shellLib is scripts/lib/daemon.sh, seen from this package's directory.
var shellLib = filepath.Join("..", "..", "scripts", "lib", "daemon.sh")

// forking is a stand-in for a daemon that forks into the background, as
// libvirtd -d does: it prints the pid of the daemon proper and exits.
const forking = "sleep 60 </dev/null >/dev/null 2>&1 & echo $!"

// startGo starts "sleep 60" from Go, through Detach or, for the control
// case, as os/exec does by itself: directly, or with fork through the
// forking stand-in, whose output it waits for, as ensureLibvirtd does.
func startGo(detach, fork bool) func(t *testing.T) int {
	return func(t *testing.T) int {
		t.Helper()
		cmd := exec.Command("sleep", "60")
		if fork {
			cmd = exec.Command("sh", "-c", forking)
		}
		if detach {
			if err := Detach(cmd); err != nil {
				t.Fatal(err)
			}
		}
		if fork {
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("%s: %v", cmd, err)
			}
			return printedPid(t, out)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		})
		return cmd.Process.Pid
	}
}

// startBash starts "sleep 60" from a bash that inherited the test's
// descriptors, through start_daemon or, for the control case, as the
// scripts used to start daemons: as a background job (as demo.sh starts
// the worker), or with fork from the script's own shell through the
// forking stand-in (as libvirt-up.sh starts libvirtd -d).
func startBash(detach, fork bool) func(t *testing.T) int {
	return func(t *testing.T) int {
		t.Helper()
		script := "sleep 60 </dev/null >/dev/null 2>&1 & echo $!"
		if fork {
			script = "sh -c '" + forking + "'"
		}
		if detach {
			script = ". " + shellLib + "; start_daemon " + script
		}
		out, err := exec.Command("bash", "-c", script).Output()
		if err != nil {
			t.Fatalf("bash -c %q: %v", script, err)
		}
		return printedPid(t, out)
	}
}

// printedPid returns the pid a starter printed, of a process that is not
// the test's child: its parent is gone and init reaps it.
func printedPid(t *testing.T, out []byte) int {
	t.Helper()
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("the starter printed %q, not a pid", out)
	}
	t.Cleanup(func() {
		if comm(pid) == "sleep" {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	return pid
}

func TestDaemonKeepsNoDescriptorOfItsStarter(t *testing.T) {
	if _, err := exec.LookPath("setsid"); err != nil {
		t.Skipf("no setsid(1) for scripts/lib/daemon.sh: %v", err)
	}
	tests := []struct {
		name  string
		start func(t *testing.T) int
		// detached: the daemon holds no descriptor of the starter and
		// runs in a session of its own. The control cases start it as
		// before, and show that the test's lock does reach a child that
		// nothing closes it for.
		detached bool
	}{
		{name: "Go, through Detach", start: startGo(true, false), detached: true},
		{name: "Go, through Detach, forking", start: startGo(true, true), detached: true},
		{name: "bash, start_daemon in the background", start: startBash(true, false), detached: true},
		{name: "bash, start_daemon, forking", start: startBash(true, true), detached: true},
		{name: "Go, plain os/exec (control)", start: startGo(false, false)},
		{name: "Go, plain os/exec, forking (control)", start: startGo(false, true)},
		{name: "bash, plain & (control)", start: startBash(false, false)},
		{name: "bash, plain, forking (control)", start: startBash(false, true)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A lock held through a descriptor without close-on-exec, as a
			// CI job's shell inherits it from flock(1).
			lock := filepath.Join(t.TempDir(), "job.lock")
			fd, err := syscall.Open(lock, syscall.O_RDWR|syscall.O_CREAT, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			closed := false
			defer func() {
				if !closed {
					_ = syscall.Close(fd)
				}
			}()
			if err := syscall.Flock(fd, syscall.LOCK_EX); err != nil {
				t.Fatal(err)
			}

			pid := tt.start(t)
			waitExec(t, pid, "sleep")
			holds := holdsFile(t, pid, lock)
			sid, err := session(pid)
			if err != nil {
				t.Fatal(err)
			}
			mine, err := unix.Getsid(0)
			if err != nil {
				t.Fatal(err)
			}
			// The starter is done with the lock: is it free now?
			closed = true
			if err := syscall.Close(fd); err != nil {
				t.Fatal(err)
			}
			free := lockFree(t, lock)
			t.Logf("daemon %d: holds the lock file %v, session %d (the test's %d), lock free after the starter let go %v",
				pid, holds, sid, mine, free)

			if tt.detached {
				if holds {
					t.Errorf("daemon %d holds a descriptor of %s, which its starter inherited", pid, lock)
				}
				if sid == mine {
					t.Errorf("daemon %d runs in the test's session %d, want one of its own", pid, sid)
				}
				if !free {
					t.Errorf("the lock on %s is still held after its holder closed it", lock)
				}
				return
			}
			if !holds || sid != mine || free {
				t.Errorf("control case: the daemon holds the lock file %v, session %d (the test's %d), lock free %v; "+
					"want the lock inherited and the session shared, or this test proves nothing", holds, sid, mine, free)
			}
		})
	}
}

// TestCloseOnExecByProc checks the fallback for kernels without
// close_range(2), which this machine's kernel may not exercise.
func TestCloseOnExecByProc(t *testing.T) {
	fd, err := syscall.Open(filepath.Join(t.TempDir(), "f"), syscall.O_RDWR|syscall.O_CREAT, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := closeOnExecByProc(); err != nil {
		t.Fatal(err)
	}
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("descriptor %d is not close-on-exec after closeOnExecByProc", fd)
	}
	for _, std := range []int{0, 1, 2} {
		if flags, err := unix.FcntlInt(uintptr(std), unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC != 0 {
			t.Errorf("stdio descriptor %d became close-on-exec", std)
		}
	}
}

// comm returns the command name of pid, or "" when it is gone.
func comm(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// waitExec waits until pid runs name: what a starter holds until its exec
// does not count.
func waitExec(t *testing.T, pid int, name string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for comm(pid) != name {
		if time.Now().After(deadline) {
			t.Fatalf("process %d runs %q, not %q, after 10s", pid, comm(pid), name)
		}
		<-tick.C
	}
}

// holdsFile reports whether pid has a descriptor open on path.
func holdsFile(t *testing.T, pid int, path string) bool {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if target, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil && target == path {
			return true
		}
	}
	return false
}

// session returns the session id of pid, field 6 of /proc/<pid>/stat.
func session(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, field 2, is in parentheses and may hold spaces.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, errors.New("unreadable /proc/<pid>/stat")
	}
	f := strings.Fields(string(b[i+1:])) // from field 3, the state
	if len(f) < 4 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	return strconv.Atoi(f[3])
}

// lockFree reports whether path can be locked now through a descriptor of
// its own.
func lockFree(t *testing.T, path string) bool {
	t.Helper()
	fd, err := syscall.Open(path, syscall.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	err = syscall.Flock(fd, syscall.LOCK_EX|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return true
}
