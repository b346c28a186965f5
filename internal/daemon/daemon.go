package daemon

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"
)

// Detach prepares cmd, not yet started, to start a daemon: in a session of
// its own, so that signals to the starter's session or terminal do not
// reach it, and with none of this process's descriptors but stdio and
// cmd.ExtraFiles. Call it right before cmd.Start, Run or CombinedOutput.
//
// It marks every descriptor of this process from 3 up close-on-exec, as
// Go's own already are: the process keeps them open, but no child of it
// inherits them from then on. A descriptor opened later without
// close-on-exec (only raw system calls do that) would still be passed on.
func Detach(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setsid = true
	// Setpgid would make the child a group leader, which cannot setsid.
	cmd.SysProcAttr.Setpgid = false
	if err := closeOnExec(); err != nil {
		return fmt.Errorf("detach %s: %w", cmd.Path, err)
	}
	return nil
}

// closeOnExec marks every descriptor from 3 up close-on-exec, with
// close_range(2) where the kernel has it (Linux 5.11) and through
// /proc/self/fd where not.
func closeOnExec() error {
	err := unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC)
	if err == nil || !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EINVAL) {
		return err
	}
	return closeOnExecByProc()
}

func closeOnExecByProc() error {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return err
	}
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 {
			continue
		}
		// EBADF: ReadDir's own descriptor, closed by now.
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil && !errors.Is(err, unix.EBADF) {
			return fmt.Errorf("descriptor %d: %w", fd, err)
		}
	}
	return nil
}
