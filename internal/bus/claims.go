package bus

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// ClaimTTL is how long a claim lives without renewal: half the requests'
// AckWait. A host that stalls loses its claims before the server hands its
// unacknowledged requests to another host, so the other host can claim
// them; the stalled host finds out at its next renewal.
func ClaimTTL(ackWait time.Duration) time.Duration { return ackWait / 2 }

// ClaimsBucketConfig is the configuration of the claims bucket.
func ClaimsBucketConfig(t Topology) jetstream.KeyValueConfig {
	t = t.withDefaults()
	return jetstream.KeyValueConfig{
		Bucket:       messages.ClaimsBucket,
		Description:  "Which host serves each job of the libvirt provisioner (key job_id)",
		History:      1,
		TTL:          ClaimTTL(t.AckWait),
		MaxValueSize: 1024,
		Storage:      jetstream.FileStorage,
		Replicas:     t.Replicas,
	}
}

// Claims keeps the claims of one host in the claims bucket. Each write is
// a compare-and-set on the key's revision, so of two hosts that race for a
// job exactly one wins. It implements lifecycle.Claims.
type Claims struct {
	kv   jetstream.KeyValue
	host string
	now  func() time.Time
}

// OpenClaims creates or updates the claims bucket and returns the claims of
// t.Host. It is safe to run from several workers at once.
func OpenClaims(ctx context.Context, js jetstream.JetStream, t Topology) (*Claims, error) {
	cfg := ClaimsBucketConfig(t)
	var kv jetstream.KeyValue
	var err error
	for range 3 { // a lost creation race shows as "already in use"
		if kv, err = js.CreateOrUpdateKeyValue(ctx, cfg); err == nil || !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			break
		}
	}
	if err != nil {
		return nil, fmt.Errorf("create key-value bucket %s: %w", cfg.Bucket, err)
	}
	return &Claims{kv: kv, host: t.Host, now: time.Now}, nil
}

func (c *Claims) value(request uint64) []byte {
	b, err := messages.Marshal(messages.Claim{V: messages.SchemaVersion, Host: c.host, Request: request, Since: c.now().UTC()})
	if err != nil {
		panic(err) // a struct of plain fields always encodes
	}
	return b
}

// Take claims jobID for this host, serving the request with stream
// sequence request. It returns the claim's revision, or 0 and the claim of
// the host that holds the job. A claim of this host left by an earlier
// process is taken over.
func (c *Claims) Take(ctx context.Context, jobID string, request uint64) (uint64, messages.Claim, error) {
	for range 3 {
		rev, err := c.kv.Create(ctx, jobID, c.value(request))
		if err == nil {
			return rev, messages.Claim{}, nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return 0, messages.Claim{}, fmt.Errorf("claim job %s: %w", jobID, err)
		}
		holder, hrev, found, err := c.holder(ctx, jobID)
		if err != nil {
			return 0, messages.Claim{}, err
		}
		if !found {
			continue // it lapsed between the two calls
		}
		if holder.Host != c.host {
			return 0, holder, nil
		}
		rev, err = c.kv.Update(ctx, jobID, c.value(request), hrev)
		if err == nil {
			return rev, messages.Claim{}, nil
		}
		if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return 0, messages.Claim{}, fmt.Errorf("claim job %s: %w", jobID, err)
		}
	}
	return 0, messages.Claim{}, fmt.Errorf("claim job %s: the claim kept changing", jobID)
}

// Keep renews the claim on jobID held at revision rev and returns its new
// revision. When the claim is no longer at rev it returns 0 and the claim
// now in the bucket, whose Host is empty when the claim lapsed and nobody
// took the job since.
func (c *Claims) Keep(ctx context.Context, jobID string, request, rev uint64) (uint64, messages.Claim, error) {
	next, err := c.kv.Update(ctx, jobID, c.value(request), rev)
	if err == nil {
		return next, messages.Claim{}, nil
	}
	if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		return 0, messages.Claim{}, fmt.Errorf("renew the claim on job %s: %w", jobID, err)
	}
	holder, _, _, err := c.holder(ctx, jobID)
	return 0, holder, err
}

// Release gives up the claim on jobID if it is still held at rev.
func (c *Claims) Release(ctx context.Context, jobID string, rev uint64) error {
	err := c.kv.Delete(ctx, jobID, jetstream.LastRevision(rev))
	if err != nil && !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		return fmt.Errorf("release the claim on job %s: %w", jobID, err)
	}
	return nil
}

// holder reads the claim on jobID; found is false when there is none.
func (c *Claims) holder(ctx context.Context, jobID string) (messages.Claim, uint64, bool, error) {
	e, err := c.kv.Get(ctx, jobID)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return messages.Claim{}, 0, false, nil
	}
	if err != nil {
		return messages.Claim{}, 0, false, fmt.Errorf("read the claim on job %s: %w", jobID, err)
	}
	cl, err := messages.DecodeClaim(e.Value())
	if err != nil {
		// Unreadable: someone else's, but not ours to overwrite.
		return messages.Claim{Host: "?"}, e.Revision(), true, nil
	}
	return cl, e.Revision(), true, nil
}
