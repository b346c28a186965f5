package client

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// bucket returns the key-value bucket name, bound once per client; a
// bind that failed is tried again next time.
func (c *Client) bucket(ctx context.Context, name string) (jetstream.KeyValue, error) {
	slot := &c.hosts
	if name == messages.DrainsBucket {
		slot = &c.drains
	}
	c.mu.Lock()
	kv := *slot
	c.mu.Unlock()
	if kv != nil {
		return kv, nil
	}
	kv, err := c.js.KeyValue(ctx, name)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if *slot == nil {
		*slot = kv
	}
	return *slot, nil
}

// Hosts returns the records of the hosts whose workers run now, sorted by
// host id, from the host registry (docs/protocol.md 2.6): each host's
// state, images, capacity, held machines and sealing keys. A record lives
// 30 s unless its worker refreshes it (every 10 s). Unreadable records
// are skipped.
func (c *Client) Hosts(ctx context.Context) ([]messages.Host, error) {
	ctx, stop := c.guard(ctx)
	defer stop()
	const what = "read the host registry"
	kv, err := c.bucket(ctx, messages.HostsBucket)
	if err != nil {
		return nil, c.fail(what, err)
	}
	keys, err := bucketKeys(ctx, c.js, messages.HostsBucket)
	if err != nil {
		return nil, c.fail(what, err)
	}
	var out []messages.Host
	for _, k := range keys {
		e, err := kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
			continue
		}
		if err != nil {
			return nil, c.fail("read the record of host "+k, err)
		}
		h, err := messages.DecodeHost(e.Value())
		if err != nil {
			continue
		}
		out = append(out, h)
	}
	slices.SortFunc(out, func(a, b messages.Host) int { return strings.Compare(a.Host, b.Host) })
	return out, nil
}

// Drains returns the drain requests of all hosts, their workers running
// or not, sorted by host id (docs/protocol.md 2.7). An Operator's call.
func (c *Client) Drains(ctx context.Context) ([]messages.Drain, error) {
	ctx, stop := c.guard(ctx)
	defer stop()
	const what = "read the drain requests"
	kv, err := c.bucket(ctx, messages.DrainsBucket)
	if err != nil {
		return nil, c.fail(what, err)
	}
	keys, err := bucketKeys(ctx, c.js, messages.DrainsBucket)
	if err != nil {
		return nil, c.fail(what, err)
	}
	var out []messages.Drain
	for _, k := range keys {
		e, err := kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
			continue
		}
		if err != nil {
			return nil, c.fail("read the drain request of host "+k, err)
		}
		d, err := messages.DecodeDrain(e.Value())
		if err != nil {
			d = messages.Drain{Host: k}
		}
		out = append(out, d)
	}
	return out, nil
}

// Drain asks host to take no more provisions until Undrain; it keeps its
// machines and serves their teardowns (docs/protocol.md 6.6). The request
// is kept in NATS, so it works with the host's worker down and lasts
// across its restarts. by says who asked, for people; empty: the client's
// identity (WithIdentity). An Operator's call.
func (c *Client) Drain(ctx context.Context, host, by string) error {
	if !messages.ValidHost(host) {
		return fmt.Errorf("host id %q: must be 1-64 characters of A-Z a-z 0-9 _ -", host)
	}
	if by == "" {
		by = c.by
	}
	b, err := messages.Marshal(&messages.Drain{V: messages.SchemaVersion, Host: host, By: by, At: time.Now().UTC()})
	if err != nil {
		return err
	}
	ctx, stop := c.guard(ctx)
	defer stop()
	kv, err := c.bucket(ctx, messages.DrainsBucket)
	if err != nil {
		return c.fail("drain host "+host, err)
	}
	if _, err := kv.Put(ctx, host, b); err != nil {
		return c.fail("drain host "+host, err)
	}
	return nil
}

// Undrain lets host take provisions again (within 10 s). An Operator's
// call.
func (c *Client) Undrain(ctx context.Context, host string) error {
	if !messages.ValidHost(host) {
		return fmt.Errorf("host id %q: must be 1-64 characters of A-Z a-z 0-9 _ -", host)
	}
	ctx, stop := c.guard(ctx)
	defer stop()
	kv, err := c.bucket(ctx, messages.DrainsBucket)
	if err != nil {
		return c.fail("undrain host "+host, err)
	}
	if err := kv.Delete(ctx, host); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return c.fail("undrain host "+host, err)
	}
	return nil
}

// bucketKeys lists the keys of a bucket that hold a value or a delete
// marker, from the stream's per-subject state: one request, and no
// consumer, which a NATS user with least permissions could not create.
func bucketKeys(ctx context.Context, js jetstream.JetStream, bucket string) ([]string, error) {
	s, err := js.Stream(ctx, "KV_"+bucket)
	if err != nil {
		return nil, fmt.Errorf("key-value bucket %s: %w", bucket, err)
	}
	prefix := "$KV." + bucket + "."
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(prefix+">"))
	if err != nil {
		return nil, fmt.Errorf("keys of bucket %s: %w", bucket, err)
	}
	keys := make([]string, 0, len(info.State.Subjects))
	for subj := range info.State.Subjects {
		keys = append(keys, strings.TrimPrefix(subj, prefix))
	}
	slices.Sort(keys)
	return keys, nil
}
