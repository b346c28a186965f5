package client

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
	"github.com/stretchy-ci/libvirt-worker/pkg/seal"
)

// SubmitOption configures Submit.
type SubmitOption func(*submitOptions)

type submitOptions struct {
	host          string
	byImage       bool
	seal          SealMode
	checkCarriers bool
}

// OnHost pins the provision to host: only its worker takes it, before
// image and shared requests; it waits while that worker does not run
// (docs/protocol.md 2.5). The job's handle knows its host from the start.
func OnHost(host string) SubmitOption { return func(o *submitOptions) { o.host = host } }

// OnImage publishes the provision on its image's subject, where only the
// hosts that carry the image take it, in order, each when it has room
// (recommended, docs/protocol.md 2.5). A request for an image no running
// host carries waits, without any event, until one does or the request
// stream's max age (24 h) drops it: combine it with CheckCarriers, and
// give Wait a deadline.
func OnImage() SubmitOption { return func(o *submitOptions) { o.byImage = true } }

// WithSealing says when the runner secret is sealed to a key of the hosts
// that may serve the request (docs/protocol.md 3.13); default SealAuto.
func WithSealing(mode SealMode) SubmitOption { return func(o *submitOptions) { o.seal = mode } }

// CheckCarriers reads the host registry before publishing and refuses
// with ErrImageNotCarried when no host that may serve the request (the
// pinned one, or any) is active and carries its image.
func CheckCarriers() SubmitOption { return func(o *submitOptions) { o.checkCarriers = true } }

// SealMode is when Submit seals a provision's runner secret.
type SealMode string

const (
	// SealAuto seals when every host that may serve the request (the
	// pinned host; else every active host that carries the image) lists
	// a common key in the host registry, and otherwise, or when the
	// registry cannot be read, sends the secret in the clear: check
	// Job.SealKey.
	SealAuto SealMode = "auto"
	// SealAlways seals, or refuses with ErrNoSealKey.
	SealAlways SealMode = "always"
	// SealNever sends the secret in the clear, as a worker without keys
	// needs it.
	SealNever SealMode = "never"
)

// Submit publishes a provision request and returns a handle on its job.
// By default the request goes to the shared subject, where any host may
// take it and one without the image hands it on (so a job whose image no
// host carries ends failed, image_not_found, rather than waiting); OnImage
// and OnHost route it otherwise. req.V and req.RequestedAt, when zero,
// are set to messages.SchemaVersion and now; the request is checked
// whole first (a *messages.ValidationError lists every problem) and req
// itself is not changed.
//
// The request's Nats-Msg-Id is "provision:<job_id>", so a submit retried
// within two minutes (after a lost acknowledgement, or by an orchestrator
// that restarted) stores the request once: the retry's Receipt says
// Duplicate. Publishing is retried while the servers do not answer, until
// ctx ends (ErrUnreachable). A job id is single-use: to retry a failed
// job, submit a new id.
func (c *Client) Submit(ctx context.Context, req messages.Provision, opts ...SubmitOption) (*Job, error) {
	o := submitOptions{seal: SealAuto}
	for _, opt := range opts {
		opt(&o)
	}
	switch {
	case o.byImage && o.host != "":
		return nil, errors.New("submit: OnImage and OnHost: give one")
	case o.host != "" && !messages.ValidHost(o.host):
		return nil, fmt.Errorf("submit: host id %q: must be 1-64 characters of A-Z a-z 0-9 _ -", o.host)
	case o.seal != SealAuto && o.seal != SealAlways && o.seal != SealNever:
		return nil, fmt.Errorf("submit: sealing %q: must be auto, always or never", o.seal)
	}
	if req.V == 0 {
		req.V = messages.SchemaVersion
	}
	if req.RequestedAt.IsZero() {
		req.RequestedAt = time.Now().UTC()
	}
	if err := runners.Validate(&req); err != nil {
		return nil, fmt.Errorf("submit job %s: %w", req.JobID, err)
	}
	ctx, stop := c.guard(ctx)
	defer stop()

	secret := o.seal != SealNever && len(runners.Secrets(req.Runner)) > 0
	var hosts []messages.Host
	if o.checkCarriers || secret {
		var err error
		hosts, err = c.Hosts(ctx)
		if err != nil && (o.checkCarriers || o.seal == SealAlways) {
			return nil, fmt.Errorf("submit job %s: %w", req.JobID, err)
		}
	}
	if o.checkCarriers && len(candidates(hosts, o.host, req.Image)) == 0 {
		where := "any active host"
		if o.host != "" {
			where = "host " + o.host + " (active)"
		}
		return nil, fmt.Errorf("submit job %s: image %q is not carried by %s: %w", req.JobID, req.Image, where, ErrImageNotCarried)
	}
	var keyID string
	if secret {
		var err error
		if req, keyID, err = sealFor(req, hosts, o.host, o.seal); err != nil {
			return nil, fmt.Errorf("submit job %s: %w", req.JobID, err)
		}
	}
	subject := messages.ProvisionSubject()
	switch {
	case o.host != "":
		subject = messages.HostProvisionSubject(o.host)
	case o.byImage:
		subject = messages.ImageProvisionSubject(req.Image)
	}
	rc, err := c.publishRequest(ctx, subject, &req, "provision:"+req.JobID)
	if err != nil {
		return nil, err
	}
	return &Job{ID: req.JobID, Receipt: rc, SealKey: keyID, c: c, host: o.host}, nil
}

// publishRequest stores a request, retrying while the servers do not
// answer in time (a cluster electing a leader, a loaded host) until ctx
// ends: msgID makes a retried publish, whose first attempt may have been
// stored, count once. A retry that the stream answers "duplicate message
// id is in process" (its first attempt is being stored) is retried too,
// until the stream says what became of the first. Other errors (no such
// stream, a refused permission) are returned at once.
func (c *Client) publishRequest(ctx context.Context, subject string, v any, msgID string) (Receipt, error) {
	data, err := messages.Marshal(v)
	if err != nil {
		return Receipt{}, err
	}
	ctx, stop := c.guard(ctx)
	defer stop()
	what := "publish " + subject
	backoff := 100 * time.Millisecond
	for {
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ack, err := c.js.Publish(actx, subject, data, jetstream.WithMsgID(msgID), jetstream.WithExpectStream(messages.RequestsStream))
		cancel()
		if err == nil {
			return Receipt{Subject: subject, Sequence: ack.Sequence, Duplicate: ack.Duplicate}, nil
		}
		if ctx.Err() != nil {
			return Receipt{}, c.fail(what, errors.Join(err, ctx.Err()))
		}
		if !unanswered(err) && !inProcess(err) {
			return Receipt{}, c.fail(what, err)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return Receipt{}, c.fail(what, errors.Join(err, ctx.Err()))
		case <-t.C:
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// candidates are the hosts that may serve a request for image: the pinned
// host, when it is active and carries the image; else every active host
// that carries it.
func candidates(hosts []messages.Host, pinned, image string) []messages.Host {
	var out []messages.Host
	for _, h := range hosts {
		if pinned != "" && h.Host != pinned {
			continue
		}
		if h.State == messages.HostActive && slices.ContainsFunc(h.Images, func(im messages.HostImage) bool { return im.Name == image }) {
			out = append(out, h)
		}
	}
	return out
}

// sealFor returns req with the secret of its runner sealed to a key that
// every host that may serve it lists in its record (the pinned host, as
// long as it has a record; else every active host that carries the
// image), the first host's preferred key first, and that key's id. With
// SealAuto and no such key it returns req unchanged and no id. req's
// runner sections are copied, not changed.
func sealFor(req messages.Provision, hosts []messages.Host, pinned string, mode SealMode) (messages.Provision, string, error) {
	secrets := runners.Secrets(req.Runner)
	if mode == SealNever || len(secrets) == 0 {
		return req, "", nil
	}
	key, ok := commonKey(hosts, pinned, req.Image)
	if !ok {
		if mode == SealAlways {
			return req, "", fmt.Errorf("%w: none is listed by every host that may serve image %q (worker keys generate on each, or copy one key to all)", ErrNoSealKey, req.Image)
		}
		return req, "", nil
	}
	s, err := seal.Seal(key, req.JobID, secrets[0], rand.Reader)
	if err != nil {
		return req, "", err
	}
	// A copy of the runner's sections, so that the caller's keep their
	// secret.
	data, err := messages.Marshal(&req)
	if err != nil {
		return req, "", err
	}
	cp, err := messages.DecodeProvision(data)
	if err != nil {
		return req, "", err
	}
	if err := runners.Unseal(&cp.Runner, ""); err != nil {
		return req, "", err
	}
	cp.Runner.Sealed = &s
	return cp, key.ID, nil
}

// commonKey returns the first key of the first candidate host that every
// candidate lists (a pinned host counts as the one candidate whatever its
// state, as its requests wait for it).
func commonKey(hosts []messages.Host, pinned, image string) (messages.SealKey, bool) {
	var cands []messages.Host
	for _, h := range hosts {
		switch {
		case pinned != "":
			if h.Host == pinned {
				cands = append(cands, h)
			}
		case h.State == messages.HostActive && slices.ContainsFunc(h.Images, func(im messages.HostImage) bool { return im.Name == image }):
			cands = append(cands, h)
		}
	}
	if len(cands) == 0 {
		return messages.SealKey{}, false
	}
	for _, k := range cands[0].SealKeys {
		if messages.SealKeyID(k.Public) != k.ID {
			continue
		}
		all := true
		for _, h := range cands[1:] {
			if !slices.ContainsFunc(h.SealKeys, func(o messages.SealKey) bool { return o.ID == k.ID && string(o.Public) == string(k.Public) }) {
				all = false
				break
			}
		}
		if all {
			return k, true
		}
	}
	return messages.SealKey{}, false
}
