package lifecycle

import (
	"context"
	"errors"
	"fmt"
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

// claim is a machine's hold on its job's claim, kept by its actor alone:
// the TTL, the renewal cadence and the due rule live here and nowhere else.
//
//   - take, before anything is built;
//   - confirm, before each step another host must not repeat and before
//     the request is acknowledged: a claim renewed within half its TTL
//     cannot have lapsed, an older one is renewed first;
//   - keep, at every tick: a claim a third of its TTL old is renewed;
//   - release, once this host is done with the job.
//
// A renewal that finds the claim lapsed takes it again unless another host
// took the job meanwhile, or served it and let it go (its events tell); a
// claim held elsewhere is lost.
type claim struct {
	rev     uint64    // 0 when not held
	request uint64    // the request served, for the claim's value
	at      time.Time // last successful write
	lostTo  string    // the holder found when the claim was lost
	// taken: this actor took the claim once; an adopted machine's claim
	// is taken again by its first renewal.
	taken bool
}

// serveClaim answers an activity's take or confirm.
func (a *actor) serveClaim(req claimRequest) error {
	if req.take {
		return a.takeClaim(req.ctx, req.d)
	}
	return a.confirmClaim(req.ctx)
}

// takeClaim claims the job for delivery d before anything is built. It
// returns nil when this host holds the claim (or claims are off) and
// *Dropped when another host does.
func (a *actor) takeClaim(ctx context.Context, d Delivery) error {
	if c := a.m.cfg.Claims; c != nil {
		rev, holder, err := c.Take(ctx, a.jobID, d.Request)
		if err != nil {
			return err
		}
		if rev == 0 {
			a.rec.claim.lostTo = holder.Host
			return &Dropped{Holder: holder.Host, Reason: messages.ReasonClaimedElsewhere, Leave: holder.Request == d.Request}
		}
		a.rec.claim = claim{rev: rev, request: d.Request, at: a.m.cfg.Now(), taken: true}
	}
	// A claim is taken on a job nobody holds: one that is new, one
	// whose holder let it go (it ended, or its build failed), or one
	// whose holder stalled past the TTL. The job's events tell which;
	// without claims (one host) they still tell a job that ended.
	kind := ""
	if a.build != nil {
		kind = string(a.build.req.Runner.Kind)
	}
	other, ended, err := a.m.jobElsewhere(ctx, a.jobID, kind)
	switch {
	case err != nil:
		a.releaseClaim()
		return err
	case ended:
		a.releaseClaim()
		return errJobEnded
	case other != "":
		a.releaseClaim()
		a.rec.claim.lostTo = other
		return &Dropped{Holder: other, Reason: messages.ReasonClaimedElsewhere}
	}
	return nil
}

// errJobEnded: a delivery of a provision whose job has ended already, on
// any host; nothing is built and nothing published, the request is acked
// (5.2 notes).
var errJobEnded = errors.New("the job has ended already")

// jobElsewhere tells from a job's events whether it ended (its newest
// event is terminal, or a hold's release), or another host serves it:
// its newest event that is not a dropped one is that host's, and the job
// was ready there (acknowledged, 6.4; kind is the request's runner kind).
// Such a host may have stalled past its claim's TTL with its machine
// running its runner: a second machine would run the job twice at once.
func (m *Manager) jobElsewhere(ctx context.Context, jobID, kind string) (other string, ended bool, err error) {
	if m.cfg.History == nil {
		return "", false, nil
	}
	last, found, err := m.cfg.History.LastEvent(ctx, jobID, "")
	if err != nil {
		return "", false, fmt.Errorf("read the events of job %s: %w", jobID, err)
	}
	if found && last.State == messages.StateDropped && last.Holder != "" && last.Holder != m.cfg.Host {
		// A dropped says nothing of the job; its holder's events do.
		if last, found, err = m.cfg.History.LastEvent(ctx, jobID, last.Holder); err != nil {
			return "", false, fmt.Errorf("read the events of job %s: %w", jobID, err)
		}
	}
	switch {
	case !found:
		return "", false, nil
	case last.State.Terminal() || last.State == messages.StateReleased:
		return "", true, nil
	case last.Host != m.cfg.Host && m.acknowledged(last.State, kind):
		return last.Host, false, nil
	}
	return "", false, nil
}

// confirmClaim makes sure the job is still this host's before a step.
func (a *actor) confirmClaim(ctx context.Context) error {
	if a.m.cfg.Claims == nil {
		return nil
	}
	if a.rec.claim.rev != 0 && a.m.cfg.Now().Sub(a.rec.claim.at) < a.m.cfg.ClaimTTL/2 {
		return nil
	}
	return a.renewClaim(ctx)
}

// keepClaim renews the claim when it is due (a third of the TTL old), with
// a third of the TTL to get an answer: a renewal that gets none is tried
// again at the next tick, so an outage does not hold the actor up; confirm
// catches a claim that lapsed meanwhile.
func (a *actor) keepClaim(root context.Context) error {
	if a.m.cfg.Claims == nil {
		return nil
	}
	if a.rec.claim.rev != 0 && a.m.cfg.Now().Sub(a.rec.claim.at) < a.m.cfg.ClaimTTL/3 {
		return nil
	}
	ctx, cancel := context.WithTimeout(root, a.m.cfg.ClaimTTL/3)
	defer cancel()
	return a.renewClaim(ctx)
}

// renewClaim renews the claim, taking a lapsed one again; a lost claim is
// returned as *Dropped, other errors as they are.
func (a *actor) renewClaim(ctx context.Context) error {
	c := a.m.cfg.Claims
	var rev uint64
	var holder messages.Claim
	var err error
	if a.rec.claim.rev != 0 {
		if rev, holder, err = c.Keep(ctx, a.jobID, a.rec.claim.request, a.rec.claim.rev); err != nil {
			return err
		}
	}
	if rev == 0 && (holder.Host == "" || holder.Host == a.m.cfg.Host) {
		other, err := a.m.servedElsewhere(ctx, a.jobID)
		if err != nil {
			return err
		}
		if holder.Host = other; other == "" {
			if rev, holder, err = c.Take(ctx, a.jobID, a.rec.claim.request); err != nil {
				return err
			}
		}
	}
	if rev == 0 {
		a.rec.claim.rev, a.rec.claim.lostTo = 0, holder.Host
		return &Dropped{Holder: holder.Host, Reason: messages.ReasonClaimLost, Leave: true}
	}
	a.rec.claim.rev, a.rec.claim.at = rev, a.m.cfg.Now()
	return nil
}

// releaseClaim gives the claim up once this host is done with the job; a
// claim that cannot be released lapses by itself.
func (a *actor) releaseClaim() {
	c := a.m.cfg.Claims
	if c == nil || a.rec.claim.rev == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), a.m.cfg.ClaimTTL/3)
	defer cancel()
	_ = c.Release(ctx, a.jobID, a.rec.claim.rev)
	a.rec.claim.rev = 0
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

// claimer is an activity's way to its actor's claim.
type claimer struct {
	a *actor
	d Delivery
	// none: the build has no job to claim (a warm machine's preparation).
	none bool
}

func (c claimer) ask(ctx context.Context, take bool) error {
	if c.none {
		return nil
	}
	req := claimRequest{ctx: ctx, take: take, d: c.d, reply: make(chan error, 1)}
	select {
	case c.a.claims <- req:
	case <-ctx.Done():
		return fmt.Errorf("confirm the claim of job %s: %w", c.a.jobID, context.Cause(ctx))
	}
	return <-req.reply
}

// take claims the job before anything is built.
func (c claimer) take(ctx context.Context) error { return c.ask(ctx, true) }

// confirm makes sure the job is still this host's.
func (c claimer) confirm(ctx context.Context) error { return c.ask(ctx, false) }

// removeOwn removes the machine with key (a job id, or a warm key) if it
// is this host's: with two
// workers on one libvirtd (tests run so), the machine of that name may be
// the one the claim holder built. When no domain is found, volumes of the
// job without one are removed only if orphans is set: they may be the
// holder's clone in progress.
func (m *Manager) removeOwn(ctx context.Context, key string, orphans bool) error {
	mach, found, err := m.cfg.Machines.Lookup(ctx, key)
	if err != nil {
		return err
	}
	if found && !mach.MetadataUnreadable && mach.Host != "" && mach.Host != m.cfg.Host {
		return nil
	}
	if !found && !orphans {
		return nil
	}
	_, err = m.cfg.Machines.Remove(ctx, key)
	return err
}

// isDropped reports whether err is, or wraps, a *Dropped.
func isDropped(err error) (*Dropped, bool) {
	var d *Dropped
	ok := errors.As(err, &d)
	return d, ok
}

// ended reports whether the job's newest event (for a dropped, its
// holder's newest) is terminal: the job ended, on any host. Without a
// History it is not known to have ended.
func (m *Manager) ended(ctx context.Context, jobID string) (bool, error) {
	if m.cfg.History == nil {
		return false, nil
	}
	last, found, err := m.cfg.History.LastEvent(ctx, jobID, "")
	if err == nil && found && last.State == messages.StateDropped && last.Holder != "" {
		last, found, err = m.cfg.History.LastEvent(ctx, jobID, last.Holder)
	}
	if err != nil {
		return false, fmt.Errorf("read the newest event of job %s: %w", jobID, err)
	}
	return found && last.State.Terminal(), nil
}
