package soak

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/sourcegraph/conc"
)

// proc is a child process the soak starts, kills, freezes and starts
// again: a worker, a NATS node or a libvirtd. Its output goes to a log
// file that every start appends to.
type proc struct {
	name string
	log  string
	// command builds the process anew for each start.
	command func() *exec.Cmd

	// waits owns the goroutine that waits for each start's process.
	waits conc.WaitGroup

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{}
	stopped bool // SIGSTOP sent, no SIGCONT yet
}

func (p *proc) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		select {
		case <-p.done: // it died by itself
			p.waits.Wait()
			p.cmd = nil
		default:
			return fmt.Errorf("%s: already running", p.name)
		}
	}
	f, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("%s: %w", p.name, err)
	}
	fmt.Fprintf(f, "=== soak: start %s at %s\n", p.name, time.Now().UTC().Format(time.RFC3339Nano))
	cmd := p.command()
	cmd.Stdout, cmd.Stderr = f, f
	// Its own process group, so that a terminal's ^C reaches only the
	// soak, which stops its children itself; and SIGKILL when the soak
	// dies without stopping them (kill -9, a CI timeout), so that no
	// nats-server, libvirtd or worker outlives it. The kernel sends it
	// when the thread that started the child ends: Go ends threads only
	// when a goroutine locked to one returns, which the soak does not do.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start %s: %w", p.name, err)
	}
	done := make(chan struct{})
	p.cmd, p.done, p.stopped = cmd, done, false
	p.waits.Go(func() {
		_ = cmd.Wait()
		f.Close()
		close(done)
	})
	return nil
}

// running reports whether the process runs (or is frozen).
func (p *proc) running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// signal sends sig to the process; it fails when none runs.
func (p *proc) signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return fmt.Errorf("%s: not running", p.name)
	}
	switch sig {
	case syscall.SIGSTOP:
		p.stopped = true
	case syscall.SIGCONT:
		p.stopped = false
	}
	return p.cmd.Process.Signal(sig)
}

// kill ends the process with SIGKILL and waits for it; a frozen process
// dies too.
func (p *proc) kill() error {
	return p.end(syscall.SIGKILL, 10*time.Second)
}

// terminate asks the process to stop with SIGTERM, and kills it when it
// has not within grace.
func (p *proc) terminate(grace time.Duration) error {
	if err := p.end(syscall.SIGTERM, grace); err == nil {
		return nil
	}
	return p.kill()
}

func (p *proc) end(sig syscall.Signal, wait time.Duration) error {
	p.mu.Lock()
	cmd, done, stopped := p.cmd, p.done, p.stopped
	p.mu.Unlock()
	if cmd == nil {
		return nil
	}
	if err := cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("%s: %w", p.name, err)
	}
	if stopped && sig != syscall.SIGKILL {
		_ = cmd.Process.Signal(syscall.SIGCONT)
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		return fmt.Errorf("%s did not end within %s of %s", p.name, wait, sig)
	}
	p.waits.Wait()
	p.mu.Lock()
	p.cmd, p.done, p.stopped = nil, nil, false
	p.mu.Unlock()
	return nil
}
