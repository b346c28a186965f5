package worker

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

// Routing a provision by its image (docs/protocol.md 6.5): a host pulls
// from the consumer of every image it carries and admits, and a shared
// request whose image it cannot serve goes on to a host that can, or back
// to the stream until none could by its final delivery.

// nextProvision pulls one provision: pinned first, then the image
// consumers in round-robin order after the image served last, then the
// shared one; then it waits up to PullWait for a new one (arrivals.go).
func (w *Worker) nextProvision(ctx context.Context) jetstream.Msg {
	if w.fl == nil {
		return w.next(ctx, w.cons.Pinned, w.cons.Provision)
	}
	// The images this host serves change while a pull waits.
	consumers := func() []jetstream.Consumer {
		return append(append([]jetstream.Consumer{w.cons.Pinned}, w.fl.imageConsumers()...), w.cons.Provision)
	}
	var msg jetstream.Msg
	if w.arrivals != nil {
		msg = w.nextArrival(ctx, consumers)
	} else {
		msg = w.next(ctx, consumers()...)
	}
	if msg == nil {
		return nil
	}
	if w.fl.draining() {
		// A drain began while the pull waited: the request goes back at
		// once, for another host.
		w.handBack(msg)
		return nil
	}
	if image, ok := subjectImage(msg.Subject()); ok {
		w.fl.served(image)
	}
	return msg
}

// subjectImage returns the image of an image provision subject.
func subjectImage(subject string) (string, bool) {
	rest, ok := strings.CutPrefix(subject, "stretchy."+messages.ProvisionerID+".req.image.")
	if !ok {
		return "", false
	}
	tok, ok := strings.CutSuffix(rest, ".provision")
	if !ok {
		return "", false
	}
	image, err := messages.ParseImageToken(tok)
	return image, err == nil
}

// ErrHandedBack marks a request handed back for another host, or for
// later: not a failure of its job. Settlements carry it.
var ErrHandedBack = errors.New("handed back")

// route decides what becomes of a provision this host should not serve
// itself; routed is false when it should (or when the request is bad,
// which provision reports). err settles the message like a provision's:
// nil acks (forwarded), a *lifecycle.Failure terminates, anything else
// hands the request back with backoff.
func (w *Worker) route(ctx context.Context, msg jetstream.Msg, d lifecycle.Delivery) (jobID string, routed bool, err error) {
	f := w.fl
	if f == nil {
		return "", false, nil
	}
	req, derr := messages.DecodeProvision(msg.Data())
	if derr != nil || runners.Validate(&req) != nil {
		return "", false, nil
	}
	isCarried, admitted := f.lookup(req.Image)
	subject := msg.Subject()
	switch image, onImage := subjectImage(subject); {
	case onImage && image != req.Image:
		cause := fmt.Errorf("image %q is not the image %q of subject %s", req.Image, image, subject)
		return req.JobID, true, w.life.Reject(ctx, req.JobID, req.Image, messages.CodeInvalidRequest, cause, d)
	case onImage && !admitted:
		f.tell(Change{Kind: "handed_back", Image: req.Image, JobID: req.JobID})
		return req.JobID, true, fmt.Errorf("image %s: not carried or short of space here: %w", req.Image, ErrHandedBack)
	case onImage:
		return "", false, nil
	case subject == messages.HostProvisionSubject(f.cfg.Host):
		if !f.keep(req.Image) {
			// Not one of the host's images: the request must not make the
			// worker look up, let alone clone, any other domain.
			cause := fmt.Errorf("host %s does not serve image %q (--images %s)", f.cfg.Host, req.Image, strings.Join(f.cfg.Images, ","))
			return req.JobID, true, w.life.Reject(ctx, req.JobID, req.Image, messages.CodeImageNotFound, cause, d)
		}
		if !isCarried || admitted {
			return "", false, nil
		}
		cause := fmt.Errorf("a storage pool of image %s has less than %d bytes free", req.Image, f.cfg.MinFreeSpace)
		if d.Final {
			return req.JobID, true, w.life.Reject(ctx, req.JobID, req.Image, messages.CodeInsufficientStorage, cause, d)
		}
		f.tell(Change{Kind: "handed_back", Image: req.Image, JobID: req.JobID, Err: cause})
		return req.JobID, true, fmt.Errorf("%w: %w", cause, ErrHandedBack)
	}
	if admitted {
		return "", false, nil
	}
	return req.JobID, true, w.routeShared(ctx, msg, req, isCarried, d)
}

// routeShared forwards a shared request to its image's subject when a
// host can serve it there, else records this host as having tried it and
// hands it back, or on its final delivery fails the job.
func (w *Worker) routeShared(ctx context.Context, msg jetstream.Msg, req messages.Provision, here bool, d lifecycle.Delivery) error {
	f := w.fl
	carriers, err := f.cfg.Registry.Carriers(ctx, req.Image)
	if err != nil {
		err = fmt.Errorf("find the hosts that carry image %s: %w", req.Image, err)
		if d.Final {
			// No delivery is left to try again: handed back, the request
			// would end only by the server's max_deliveries advisory,
			// which the outage that keeps the registry from us can lose.
			return w.life.Reject(ctx, req.JobID, req.Image, messages.CodeInternal, err, d)
		}
		return err
	}
	if here {
		carriers = append(carriers, f.cfg.Host)
	}
	if len(carriers) > 0 {
		if err := f.cfg.Registry.Forward(ctx, msg.Data(), req.Image, req.JobID); err != nil {
			if d.Final {
				return w.life.Reject(ctx, req.JobID, req.Image, messages.CodeInternal, err, d)
			}
			return err
		}
		f.tell(Change{Kind: "forwarded", Image: req.Image, JobID: req.JobID, Hosts: carriers})
		if d.Request != 0 {
			_ = f.cfg.Registry.ForgetTried(ctx, d.Request)
		}
		return nil
	}
	tried, err := f.cfg.Registry.Tried(ctx, d.Request, req.JobID, req.Image)
	if err != nil {
		f.tell(Change{Kind: "error", JobID: req.JobID, Err: err})
		tried = []string{f.cfg.Host}
	}
	if !d.Final {
		f.tell(Change{Kind: "handed_back", Image: req.Image, JobID: req.JobID, Hosts: tried})
		return fmt.Errorf("image %s: no active host carries it: %w", req.Image, ErrHandedBack)
	}
	cause := fmt.Errorf("image %q is carried by no active host; tried by %s", req.Image, strings.Join(tried, ", "))
	err = w.life.Reject(ctx, req.JobID, req.Image, messages.CodeImageNotFound, cause, d)
	var failure *lifecycle.Failure
	if errors.As(err, &failure) {
		_ = f.cfg.Registry.ForgetTried(ctx, d.Request)
	}
	return err
}
