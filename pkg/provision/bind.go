package provision

import (
	"context"
	"fmt"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Binding is what a job that takes a warm machine records in the
// machine's metadata.
type Binding struct {
	JobID       string
	RunnerKind  string
	RequestedAt time.Time
	Deadline    time.Time
	// HoldOnFailure: how long the machine is kept if the job fails.
	HoldOnFailure time.Duration
}

// Bind records that the warm machine key now serves the job of b, in its
// running definition and its persistent one, so that a worker started
// later (Lookup, List) knows the machine as the job's. It fails for a
// machine that is not warm or serves a job already. A saved machine
// (Save), which does not run, gets the binding in its persistent
// definition only: restored, it runs with the definition it was saved
// with, so it is bound again then.
func (p *Provisioner) Bind(ctx context.Context, key string, b Binding) (Machine, error) {
	m, err := p.bind(ctx, key, b)
	if err != nil {
		return Machine{}, fmt.Errorf("bind %s to job %s: %w", DomainName(key), b.JobID, err)
	}
	return m, nil
}

func (p *Provisioner) bind(ctx context.Context, key string, b Binding) (Machine, error) {
	if !messages.ValidJobID(b.JobID) {
		return Machine{}, fmt.Errorf("job id %q: %w", b.JobID, ErrInvalidJobID)
	}
	dom, m, err := p.warmMachine(ctx, key)
	if err != nil {
		return Machine{}, err
	}
	if m.JobID != "" {
		return Machine{}, fmt.Errorf("not an unbound warm machine (job %q): %w", m.JobID, ErrExists)
	}
	m.JobID, m.RunnerKind, m.RequestedAt, m.Deadline = b.JobID, b.RunnerKind, b.RequestedAt, b.Deadline
	m.HoldOnFailure = b.HoldOnFailure
	doc, err := encodeMetadataElement(m)
	if err != nil {
		return Machine{}, err
	}
	impact := libvirt.DomainAffectLive | libvirt.DomainAffectConfig
	if !m.Running {
		impact = libvirt.DomainAffectConfig
	}
	err = p.do(ctx, func() error {
		return p.conn.DomainSetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{doc},
			libvirt.OptString{metadataPrefix}, libvirt.OptString{metadataNS}, impact)
	})
	if err != nil {
		return Machine{}, fmt.Errorf("set metadata: %w", err)
	}
	return m, nil
}
