package provision

import (
	"context"
	"errors"
	"fmt"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Saved warm machines. A warm machine of a saved pool is booted once, to
// agent_ready, and then stopped with its memory written to disk by
// libvirt (managed save, virDomainManagedSave): it holds no host memory
// and no QEMU process while it waits, and starting it again
// (virDomainCreate) restores it where it stopped, guest agent included.
// The file takes about as much disk as the guest's memory in use, in
// libvirt's save directory (/var/lib/libvirt/qemu/save for qemu:///system);
// it goes when the machine is restored or removed (Remove undefines with
// VIR_DOMAIN_UNDEFINE_MANAGED_SAVE).
//
// A restored guest's live definition is the one it was saved with, so
// what Bind records while the machine is saved reaches only the
// persistent definition: Bind is called again once the machine runs.

// Save stops the warm machine key, its memory saved by libvirt. It fails
// for a machine that is not an unbound warm one, or does not run.
func (p *Provisioner) Save(ctx context.Context, key string) error {
	if err := p.save(ctx, key); err != nil {
		return fmt.Errorf("save %s: %w", DomainName(key), err)
	}
	return nil
}

func (p *Provisioner) save(ctx context.Context, key string) error {
	dom, m, err := p.warmMachine(ctx, key)
	if err != nil {
		return err
	}
	if m.JobID != "" {
		return fmt.Errorf("it serves job %s: %w", m.JobID, ErrExists)
	}
	if !m.Running {
		return errors.New("it is not running")
	}
	return p.whole(ctx, func() error { return p.conn.DomainManagedSave(dom, 0) })
}

// Restore starts the saved warm machine key from its saved memory. When
// libvirt cannot restore it (a save file that a newer QEMU cannot read, a
// damaged one), the saved state is discarded and the machine boots
// afresh, from its disks as the first boot left them: fresh is true, and
// the caller waits for its guest agent as after a boot.
func (p *Provisioner) Restore(ctx context.Context, key string) (fresh bool, err error) {
	fresh, err = p.restore(ctx, key)
	if err != nil {
		return fresh, fmt.Errorf("restore %s: %w", DomainName(key), err)
	}
	return fresh, nil
}

func (p *Provisioner) restore(ctx context.Context, key string) (bool, error) {
	dom, m, err := p.warmMachine(ctx, key)
	if err != nil {
		return false, err
	}
	if m.Running {
		return false, nil // restored already (a repeated call)
	}
	err = p.whole(ctx, func() error { return p.conn.DomainCreate(dom) })
	if err == nil {
		// libvirt itself boots afresh past a save file whose header it
		// cannot read; the reason it runs tells.
		reason, err := call(ctx, p, func() (int32, error) {
			_, reason, err := p.conn.DomainGetState(dom, 0)
			return reason, err
		})
		if err != nil {
			return false, fmt.Errorf("state: %w", err)
		}
		return libvirt.DomainRunningReason(reason) != libvirt.DomainRunningRestored, nil
	}
	if IsUnavailable(err) {
		return false, err
	}
	restoreErr := err
	err = p.whole(ctx, func() error {
		_, err := p.conn.DomainCreateWithFlags(dom, uint32(libvirt.DomainStartForceBoot))
		return err
	})
	if err != nil {
		return true, fmt.Errorf("%w; booting it afresh: %w", restoreErr, err)
	}
	return true, nil
}

// warmMachine looks up the warm machine key.
func (p *Provisioner) warmMachine(ctx context.Context, key string) (libvirt.Domain, Machine, error) {
	if !messages.ValidWarmKey(key) {
		return libvirt.Domain{}, Machine{}, fmt.Errorf("warm machine key %q: %w", key, ErrInvalidJobID)
	}
	dom, err := call(ctx, p, func() (libvirt.Domain, error) { return p.conn.DomainLookupByName(DomainName(key)) })
	if isNoDomain(err) {
		return libvirt.Domain{}, Machine{}, ErrNotFound
	}
	if err != nil {
		return libvirt.Domain{}, Machine{}, fmt.Errorf("look up: %w", err)
	}
	m, err := p.machine(ctx, dom)
	if isNoDomain(err) {
		return libvirt.Domain{}, Machine{}, ErrNotFound
	}
	if err != nil {
		return libvirt.Domain{}, Machine{}, err
	}
	if !m.Warm {
		return libvirt.Domain{}, Machine{}, fmt.Errorf("not a warm machine: %w", ErrExists)
	}
	return dom, m, nil
}

// whole runs a call that writes or reads a machine's whole memory, bounded
// like the copy of a whole volume (Options.CopyTimeout).
func (p *Provisioner) whole(ctx context.Context, fn func() error) error {
	_, err := bounded(ctx, p.opts.Link, p.opts.CopyTimeout, func() (struct{}, error) { return struct{}{}, fn() })
	return err
}
