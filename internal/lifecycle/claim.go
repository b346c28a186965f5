package lifecycle

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Claims records, across all hosts, which host serves a job, so that a
// request delivered to two hosts (the first stalled for longer than the
// request's AckWait, and the server handed it on) builds one machine.
// Every write is a compare-and-set on the claim's revision, and a claim
// that is not renewed lapses after a TTL shorter than AckWait.
// *bus.Claims implements it.
type Claims interface {
	// Take claims jobID for this host, serving the request with stream
	// sequence request. It returns the claim's revision, or 0 and the
	// claim of the host that holds the job.
	Take(ctx context.Context, jobID string, request uint64) (rev uint64, holder messages.Claim, err error)
	// Keep renews the claim held at rev and returns its new revision, or 0
	// and the claim now in place (Host empty when it lapsed and nobody
	// took the job since).
	Keep(ctx context.Context, jobID string, request, rev uint64) (uint64, messages.Claim, error)
	// Release gives up the claim if it is still held at rev.
	Release(ctx context.Context, jobID string, rev uint64) error
}

// Dropped is returned by Provision when this host let go of the job
// because another host holds its claim; a dropped event is published.
type Dropped struct {
	// Holder is the host holding the claim, empty when nobody does (this
	// host's claim lapsed while it stalled).
	Holder string
	// Reason is messages.ReasonClaimedElsewhere or ReasonClaimLost.
	Reason string
	// Leave is true when the message must not be settled: the delivery is
	// stale, or the holder serves this very request and settles it.
	// Otherwise the message is a repeated request for a job another host
	// serves, and is acknowledged.
	Leave bool
}

func (e *Dropped) Error() string {
	holder := e.Holder
	if holder == "" {
		holder = "nobody"
	}
	return fmt.Sprintf("job dropped (%s): its claim is held by %s", e.Reason, holder)
}

// claim is a job's hold on its claim.
type claim struct {
	mu      sync.Mutex
	rev     uint64    // 0 when not held
	request uint64    // the request served, for the claim's value
	at      time.Time // last successful write
	lostTo  string    // the holder found when the claim was lost
}

// take claims j for the delivery d before anything is built. It returns
// nil when this host holds the claim (or claims are off) and *Dropped when
// another host does.
func (m *Manager) take(ctx context.Context, j *job, d Delivery) error {
	if m.cfg.Claims == nil {
		return nil
	}
	j.claim.mu.Lock()
	defer j.claim.mu.Unlock()
	rev, holder, err := m.cfg.Claims.Take(ctx, j.id, d.Request)
	if err != nil {
		return err
	}
	if rev == 0 {
		return &Dropped{Holder: holder.Host, Reason: messages.ReasonClaimedElsewhere, Leave: holder.Request == d.Request}
	}
	j.claim.rev, j.claim.request, j.claim.at = rev, d.Request, m.cfg.Now()
	return nil
}

// renew renews j's claim. A claim that lapsed (the process stalled for
// longer than the TTL, or the renewals were slow) is taken again unless
// another host took the job meanwhile, or served it and let it go: its
// events tell. Transient errors are returned as they are; a lost claim as
// *Dropped.
func (m *Manager) renew(ctx context.Context, j *job) error {
	if m.cfg.Claims == nil {
		return nil
	}
	j.claim.mu.Lock()
	defer j.claim.mu.Unlock()
	var rev uint64
	var holder messages.Claim
	var err error
	if j.claim.rev != 0 {
		if rev, holder, err = m.cfg.Claims.Keep(ctx, j.id, j.claim.request, j.claim.rev); err != nil {
			return err
		}
	}
	if rev == 0 && (holder.Host == "" || holder.Host == m.cfg.Host) {
		other, err := m.servedElsewhere(ctx, j.id)
		if err != nil {
			return err
		}
		if holder.Host = other; other == "" {
			if rev, holder, err = m.cfg.Claims.Take(ctx, j.id, j.claim.request); err != nil {
				return err
			}
		}
	}
	if rev == 0 {
		j.claim.rev, j.claim.lostTo = 0, holder.Host
		return &Dropped{Holder: holder.Host, Reason: messages.ReasonClaimLost, Leave: true}
	}
	j.claim.rev, j.claim.at = rev, m.cfg.Now()
	return nil
}

// renewSoon is renew for the periodic renewals: one that NATS does not
// answer within a third of the TTL is tried again at the next round, so
// an outage does not hold up the watch loop.
func (m *Manager) renewSoon(ctx context.Context, j *job) error {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.ClaimTTL/3)
	defer cancel()
	return m.renew(ctx, j)
}

// servedElsewhere returns the host that published the job's newest event
// if that is another host and not a dropped event, else "".
func (m *Manager) servedElsewhere(ctx context.Context, jobID string) (string, error) {
	if m.cfg.History == nil {
		return "", nil
	}
	last, found, err := m.cfg.History.LastEvent(ctx, jobID, "")
	if err != nil {
		return "", fmt.Errorf("read the events of job %s: %w", jobID, err)
	}
	if found && last.Host != m.cfg.Host && last.State != messages.StateDropped {
		return last.Host, nil
	}
	return "", nil
}

// confirm makes sure j still holds its claim before a step that another
// host must not repeat (clone, boot, anything in the guest). A claim
// renewed within half its TTL cannot have lapsed; an older one (the
// process stalled) is renewed first.
func (m *Manager) confirm(ctx context.Context, j *job) error {
	if m.cfg.Claims == nil {
		return nil
	}
	j.claim.mu.Lock()
	fresh := j.claim.rev != 0 && m.cfg.Now().Sub(j.claim.at) < m.cfg.ClaimTTL/2
	j.claim.mu.Unlock()
	if fresh {
		return nil
	}
	return m.renew(ctx, j)
}

// keepWhileBuilding renews j's claim every third of its TTL until the
// returned stop is called; when the claim is lost it cancels the build
// with the *Dropped as cause. Transient failures are tried again at the
// next tick: confirm catches a claim that lapsed meanwhile.
func (m *Manager) keepWhileBuilding(ctx context.Context, j *job, cancel context.CancelCauseFunc) (stop func()) {
	if m.cfg.Claims == nil {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(m.cfg.ClaimTTL / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
			if err := m.renewSoon(ctx, j); err != nil {
				if errors.As(err, new(*Dropped)) {
					cancel(err)
					return
				}
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

// KeepClaims renews the claims of running machines that are due (a third
// of the TTL old), taking lapsed ones again (renew). A machine whose job another
// host took meanwhile is returned for removal with reason claim_lost; it
// is removed without tearing_down and torn_down events, since the job
// goes on elsewhere (Teardown). Claims that cannot be renewed now are
// tried again next time.
func (m *Manager) KeepClaims(ctx context.Context) []Ending {
	if m.cfg.Claims == nil {
		return nil
	}
	now := m.cfg.Now()
	m.mu.Lock()
	var due []*job
	for _, j := range m.jobs {
		if !j.running || j.tearing {
			continue
		}
		j.claim.mu.Lock()
		if j.claim.rev == 0 || now.Sub(j.claim.at) >= m.cfg.ClaimTTL/3 {
			due = append(due, j)
		}
		j.claim.mu.Unlock()
	}
	m.mu.Unlock()
	var out []Ending
	for _, j := range due {
		if err := m.renewSoon(ctx, j); errors.As(err, new(*Dropped)) {
			out = append(out, Ending{JobID: j.id, Reason: messages.ReasonClaimLost})
		}
	}
	return out
}

// release gives up j's claim once this host is done with the job; a claim
// that cannot be released lapses by itself.
func (m *Manager) release(ctx context.Context, j *job) {
	if m.cfg.Claims == nil {
		return
	}
	j.claim.mu.Lock()
	defer j.claim.mu.Unlock()
	if j.claim.rev != 0 {
		_ = m.cfg.Claims.Release(ctx, j.id, j.claim.rev)
		j.claim.rev = 0
	}
}

// removeOwn removes the machine of jobID if it is this host's: with two
// workers on one libvirtd (tests run so), the machine of that name may be
// the one the claim holder built. When no domain is found, volumes of the
// job without one are removed only if orphans is set: they may be the
// holder's clone in progress.
func (m *Manager) removeOwn(ctx context.Context, jobID string, orphans bool) error {
	mach, found, err := m.cfg.Machines.Lookup(ctx, jobID)
	if err != nil {
		return err
	}
	if found && !mach.MetadataUnreadable && mach.Host != "" && mach.Host != m.cfg.Host {
		return nil
	}
	if !found && !orphans {
		return nil
	}
	_, err = m.cfg.Machines.Remove(ctx, jobID)
	return err
}

// drop publishes that this host let go of j's job, naming the holder.
func (m *Manager) drop(ctx context.Context, j *job, d Delivery, dropped *Dropped) error {
	j.claim.mu.Lock()
	j.claim.lostTo = dropped.Holder
	j.claim.mu.Unlock()
	return m.emit(ctx, j, messages.StateDropped, d, 0, dropped.Reason, nil)
}
