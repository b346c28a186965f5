package soak

import (
	"context"
	"fmt"
	"strings"
	"sync"

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
