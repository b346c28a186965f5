package soak

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// realHosts looks at the machine's libvirtd for the real-guest soak,
// whose hosts share it: a host's machines are those its metadata names,
// and what the soak leaves is named after its run.
type realHosts struct {
	runID string
	mu    sync.Mutex
	l     *libvirt.Libvirt
}

func newRealHosts(ctx context.Context, runID string) (*realHosts, error) {
	l, err := provision.Dial(ctx, "qemu:///system")
	if err != nil {
		return nil, err
	}
	return &realHosts{runID: runID, l: l}, nil
}

func (r *realHosts) close() { _ = r.l.Disconnect() }

func (r *realHosts) machines() ([]provision.Machine, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return provision.New(r.l, provision.Options{}).List(context.Background())
}

// domains counts host's machines, or returns -1.
func (r *realHosts) domains(host string) int {
	ms, err := r.machines()
	if err != nil {
		return -1
	}
	n := 0
	for _, m := range ms {
		if m.Host == host {
			n++
		}
	}
	return n
}

// leftovers lists host's machines and the run's volumes (listed under
// every host, as volumes do not say whose they are).
func (r *realHosts) leftovers(host string) ([]string, error) {
	ms, err := r.machines()
	if err != nil {
		return nil, err
	}
	var out []string
	prefix := messages.DomainName(r.runID)
	for _, m := range ms {
		if m.Host == host || (m.Host == "" && strings.HasPrefix(m.Name, prefix)) {
			out = append(out, "domain "+m.Name)
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	pools, _, err := r.l.ConnectListAllStoragePools(1, 0)
	if err != nil {
		return nil, fmt.Errorf("list pools: %w", err)
	}
	for _, p := range pools {
		vols, _, err := r.l.StoragePoolListAllVolumes(p, 1, 0)
		if err != nil {
			continue
		}
		for _, v := range vols {
			if strings.HasPrefix(v.Name, prefix) && strings.HasSuffix(host, "-a") {
				out = append(out, "volume "+v.Key)
			}
		}
	}
	return out, nil
}

// realHostIDs are the hosts of the real-guest run runID: names no other
// test or worker on the shared libvirtd uses, so that none of them
// touches the run's machines (workers leave machines whose metadata
// names another host alone) and the run touches none of theirs.
func realHostIDs(runID string) []string {
	return []string{"r" + runID + "-a", "r" + runID + "-b"}
}

// cleanRealRun removes from the machine's libvirtd what the real-guest
// run runID left there: the machines its hosts' metadata names, the
// volumes named for its jobs, and its hosts' guest filters. The soak
// calls it once its workers stopped, whatever ended the run (its
// checker saw the leftovers before), and at the start of a later run for
// a run that was killed.
func cleanRealRun(ctx context.Context, runID string) error {
	l, err := provision.Dial(ctx, "qemu:///system")
	if err != nil {
		return err
	}
	defer l.Disconnect()
	p := provision.New(l, provision.Options{})
	hosts := realHostIDs(runID)
	ms, err := p.List(ctx)
	if err != nil {
		return err
	}
	var errs []error
	for _, m := range ms {
		if slices.Contains(hosts, m.Host) {
			if _, err := p.Remove(ctx, m.Key); err != nil {
				errs = append(errs, err)
			}
		}
	}
	prefix := messages.DomainName(runID + "-")
	pools, _, err := l.ConnectListAllStoragePools(1, 0)
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("list pools: %w", err))...)
	}
	for _, pool := range pools {
		vols, _, err := l.StoragePoolListAllVolumes(pool, 1, 0)
		if err != nil {
			continue // an inactive pool
		}
		for _, v := range vols {
			if job, ok := provision.VolumeKey(v.Name); ok && strings.HasPrefix(v.Name, prefix) {
				if _, err := p.Remove(ctx, job); err != nil {
					errs = append(errs, err)
				}
			}
		}
	}
	for _, h := range hosts {
		if nf, err := l.NwfilterLookupByName(provision.GuestFilterName(h)); err == nil {
			if err := l.NwfilterUndefine(nf); err != nil {
				errs = append(errs, fmt.Errorf("undefine the guest filter of %s: %w", h, err))
			}
		}
	}
	return errors.Join(errs...)
}

// A real-guest run in progress has a marker in realRunsDir under its run
// id, holding the soak's pid and its start time (/proc/<pid>/stat field
// 22, which tells a live soak from a later process with its pid), so
// that a later run cleans up after one that was killed, and after no
// other.
func realRunsDir(dir string) string { return filepath.Join(dir, "real-runs") }

func processStart(pid int) (string, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", false
	}
	s := string(b)
	i := strings.LastIndex(s, ") ")
	if i < 0 {
		return "", false
	}
	fields := strings.Fields(s[i+2:])
	if len(fields) < 20 {
		return "", false
	}
	return fields[19], true
}

// markRealRun cleans up after earlier real-guest runs that were killed,
// then marks runID as in progress; the returned function cleans up after
// it and removes the mark.
func markRealRun(ctx context.Context, dir, runID string, logf func(string, ...any)) (func(), error) {
	runs := realRunsDir(dir)
	if err := os.MkdirAll(runs, 0o755); err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(runs)
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(runs, e.Name()))
		if err != nil {
			continue
		}
		var pid int
		var start string
		if _, err := fmt.Sscanf(string(b), "%d %s", &pid, &start); err == nil {
			if now, ok := processStart(pid); ok && now == start {
				continue // going on
			}
		}
		if err := cleanRealRun(ctx, e.Name()); err != nil {
			return nil, fmt.Errorf("clean up after the killed real-guest run %s: %w", e.Name(), err)
		}
		logf("soak: cleaned up after the real-guest run %s, which was killed", e.Name())
		_ = os.Remove(filepath.Join(runs, e.Name()))
	}
	start, _ := processStart(os.Getpid())
	mark := filepath.Join(runs, runID)
	if err := os.WriteFile(mark, fmt.Appendf(nil, "%d %s\n", os.Getpid(), start), 0o644); err != nil {
		return nil, err
	}
	return func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
		defer cancel()
		if err := cleanRealRun(ctx, runID); err != nil {
			logf("soak: clean up the real-guest run: %v (left for the next run)", err)
			return
		}
		_ = os.Remove(mark)
	}, nil
}
