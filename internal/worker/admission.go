package worker

import (
	"context"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

// Admission by size (docs/protocol.md 3.2, 7.6): a provision's machine
// holds its vCPUs and memory of the host's totals, and claims what its
// disks may take of its storage pools. One that does not fit what the
// host's machines leave waits before it takes a slot; one beyond a bound,
// or that its pools could not hold even on an empty host, is refused, or
// handed back for a host that may serve it.

// admission is what admit found out about a pulled provision.
type admission struct {
	req messages.Provision
	// beyond is set when the machine's size is beyond a bound of this
	// host, or beyond what its pools could hold, which it can never
	// serve; code is the error code it is refused with.
	beyond error
	code   messages.ErrorCode
	// release gives back the size reserved for the request.
	release func()
}

// admit reserves the size of msg's machine, waiting while it does not fit;
// ok is false when ctx ended first. A request that cannot be read, whose
// image's size cannot be told, or that is beyond a bound reserves nothing
// and goes on to be refused (or to fail) as such.
func (w *Worker) admit(ctx context.Context, msg jetstream.Msg) (adm admission, ok bool) {
	adm.release = func() {}
	req, err := messages.DecodeProvision(msg.Data())
	if err != nil || runners.Validate(&req) != nil {
		return adm, true
	}
	if w.fl != nil && !w.fl.keep(req.Image) {
		return adm, true // not an image of this host's: nothing of it is looked up
	}
	adm.req = req
	sz, err := w.life.SizeOf(ctx, req)
	if err != nil {
		return adm, true // no such image (or libvirt is away): the build says so
	}
	if err := w.life.CheckBounds(sz); err != nil {
		adm.beyond, adm.code = err, messages.CodeResourcesExceeded
		return adm, true
	}
	for {
		roomed := w.life.CapacityChanged()
		// Looked at again on every wake: the pools' room changes.
		if err := w.life.CheckStorage(req.Image, sz); err != nil {
			adm.beyond, adm.code = err, messages.CodeInsufficientStorage
			return adm, true
		}
		if release, ok := w.life.ReserveSize(req.Image, sz); ok {
			adm.release = release
			return adm, true
		}
		select {
		case <-ctx.Done():
			return adm, false
		case <-roomed:
		}
	}
}

// refuseSize settles a provision beyond this host's bounds or storage:
// refused with resources_exceeded (or insufficient_storage) when it is
// pinned here, on its final delivery, or when no other active host that
// carries its image may serve it; handed back for another host otherwise.
func (w *Worker) refuseSize(ctx context.Context, msg jetstream.Msg, adm admission, d lifecycle.Delivery) (jobID string, routed bool, err error) {
	req := adm.req
	refuse := func() (string, bool, error) {
		return req.JobID, true, w.life.Reject(ctx, req.JobID, req.Image, adm.code, adm.beyond, d)
	}
	f := w.fl
	if d.Final || f == nil || msg.Subject() == messages.HostProvisionSubject(f.cfg.Host) {
		return refuse()
	}
	hosts, err := f.cfg.Registry.Hosts(ctx)
	if err != nil {
		return req.JobID, true, fmt.Errorf("read the host registry: %w", err)
	}
	for _, h := range hosts {
		if h.Host != f.cfg.Host && h.State == messages.HostActive && carries(h, req.Image) && admits(h, req) {
			f.tell(Change{Kind: "handed_back", Image: req.Image, JobID: req.JobID, Err: adm.beyond})
			return req.JobID, true, fmt.Errorf("%w; host %s may serve it: %w", adm.beyond, h.Host, ErrHandedBack)
		}
	}
	return refuse()
}

// carries reports whether h's record lists image as admitted.
func carries(h messages.Host, image string) bool {
	for _, im := range h.Images {
		if im.Name == image && im.Admitted {
			return true
		}
	}
	return false
}

// admits reports whether h's bounds admit the size req asks for itself;
// its image's size there, and the room of its pools, are not known here.
func admits(h messages.Host, req messages.Provision) bool {
	within := func(v, bound int) bool { return bound <= 0 || v <= bound }
	return within(req.VCPUs, h.MaxVCPUsPerMachine) && within(req.VCPUs, h.VCPUsTotal) &&
		within(req.MemoryMiB, h.MaxMemoryPerMachineMiB) && within(req.MemoryMiB, h.MemoryTotalMiB) &&
		within(req.ScratchDiskGiB, h.MaxScratchGiB)
}
