package worker

import (
	"context"
	"fmt"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// A drain request makes the host take no provisions, on any subject, while
// it keeps serving teardowns and watching its machines. The request lives
// in NATS (the fleet's drain bucket), so that an operator can drain a host
// from anywhere, also while its worker is down, and a drained worker that
// restarts stays drained. The host's state follows from the request and
// from its machines: draining while it has any, drained once it has none.

// Drain asks for this host to be drained (drain true) or to take
// provisions again, as worker drain and undrain do from elsewhere, and
// applies it at once. The request is stored in the fleet's drain bucket,
// so it outlives the process.
func (w *Worker) Drain(ctx context.Context, drain bool, by string) error {
	if w.fl == nil {
		return fmt.Errorf("drain: the worker has no fleet")
	}
	var err error
	if drain {
		err = w.fl.cfg.Registry.Drain(ctx, w.fl.cfg.Host, by)
	} else {
		err = w.fl.cfg.Registry.Undrain(ctx, w.fl.cfg.Host)
	}
	if err != nil {
		return err
	}
	w.setDrain(drain)
	if w.updateState() {
		if err := w.fl.cfg.Registry.PutHost(ctx, w.record()); err != nil {
			return err
		}
	}
	return nil
}

// setDrain records whether a drain is requested and wakes the provision
// loop when that changes.
func (w *Worker) setDrain(drain bool) {
	f := w.fl
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.drain == drain {
		return
	}
	f.drain = drain
	w.life.SetDraining(drain)
	close(f.changed)
	f.changed = make(chan struct{})
}

// updateState derives the host's state from the drain request and its
// machines, and reports whether it changed.
func (w *Worker) updateState() bool {
	f := w.fl
	busy := w.life.Active() > 0
	f.mu.Lock()
	state := messages.HostActive
	switch {
	case f.drain && busy:
		state = messages.HostDraining
	case f.drain:
		state = messages.HostDrained
	}
	changed := state != f.state
	f.state = state
	f.mu.Unlock()
	if changed {
		f.tell(Change{Kind: "state", State: state})
	}
	return changed
}

// drainWait blocks while the host drains and reports whether it did; the
// provision loop then checks again what it may pull.
func (w *Worker) drainWait(ctx context.Context) bool {
	if w.fl == nil {
		return false
	}
	w.fl.mu.Lock()
	drain, changed := w.fl.drain, w.fl.changed
	w.fl.mu.Unlock()
	if !drain {
		return false
	}
	select {
	case <-ctx.Done():
	case <-changed:
	}
	return true
}

// draining reports whether a drain is requested.
func (f *fleet) draining() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.drain
}
