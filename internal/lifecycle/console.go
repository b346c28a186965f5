package lifecycle

import (
	"context"
	"errors"
	"fmt"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// sweepConsoles deletes the console logs in the console directory of
// machines that no longer exist: a worker killed between undefining a
// domain and deleting its logs leaves them, and nothing else would. A
// log is kept while a domain of its name exists, whoever's (machines is
// every managed domain Reconcile listed; workers sharing a libvirtd may
// share the directory), while this host builds or serves a machine of
// its key, and until a second reconciliation finds it still without a
// domain, as orphan volumes are: virtlogd creates a log only once its
// domain runs, so a clone in progress elsewhere has its domain by then.
// Just before the deletion the domain is looked up once more. Only the
// Reconcile goroutine calls it.
func (m *Manager) sweepConsoles(ctx context.Context, machines []provision.Machine) error {
	if m.cfg.ConsoleDir == "" {
		return nil
	}
	keys, err := provision.ConsoleLogKeys(m.cfg.ConsoleDir)
	if err != nil {
		return err
	}
	exists := make(map[string]bool, len(machines))
	for _, mach := range machines {
		exists[mach.Key] = true
	}
	seen := make(map[string]bool, len(keys))
	var errs []error
	for _, key := range keys {
		if exists[key] {
			continue
		}
		seen[key] = true
		if !m.consoleOrphans[key] {
			continue
		}
		if active, _ := m.known(key); active {
			continue
		}
		if _, found, err := m.cfg.Machines.Lookup(ctx, key); err != nil || found {
			if err != nil {
				errs = append(errs, fmt.Errorf("console logs of machine %s: %w", key, err))
			}
			continue
		}
		if err := provision.RemoveConsoleLogs(m.cfg.ConsoleDir, key); err != nil {
			errs = append(errs, err)
		}
	}
	m.consoleOrphans = seen
	return errors.Join(errs...)
}
