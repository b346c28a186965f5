package bus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// HostTTL is how long a host record lives without being refreshed; a
// worker refreshes its own every HostTTL/3, so the record of a worker
// that died disappears within HostTTL.
const HostTTL = 30 * time.Second

// HostsBucketConfig is the configuration of the host registry.
func HostsBucketConfig(t Topology) jetstream.KeyValueConfig {
	t = t.withDefaults()
	return jetstream.KeyValueConfig{
		Bucket:       messages.HostsBucket,
		Description:  "The workers of the libvirt provisioner, their images and capacity (key host id)",
		History:      1,
		TTL:          HostTTL,
		MaxValueSize: 256 << 10,
		Storage:      jetstream.FileStorage,
		Replicas:     t.Replicas,
	}
}

// DrainsBucketConfig is the configuration of the drain requests: no TTL, so
// that a drain outlives the worker it is for.
func DrainsBucketConfig(t Topology) jetstream.KeyValueConfig {
	t = t.withDefaults()
	return jetstream.KeyValueConfig{
		Bucket:       messages.DrainsBucket,
		Description:  "Hosts of the libvirt provisioner that take no provisions (key host id)",
		History:      1,
		MaxValueSize: 1024,
		Storage:      jetstream.FileStorage,
		Replicas:     t.Replicas,
	}
}

// TriedBucketConfig is the configuration of the record of hosts that tried
// a shared provision request for an image they lack. Its TTL is the
// request stream's max age: no record outlives its request.
func TriedBucketConfig(t Topology) jetstream.KeyValueConfig {
	t = t.withDefaults()
	return jetstream.KeyValueConfig{
		Bucket:       messages.TriedBucket,
		Description:  "Hosts that tried a shared provision request of the libvirt provisioner and lack its image (key request stream sequence)",
		History:      1,
		TTL:          t.RequestsMaxAge,
		MaxValueSize: 16 << 10,
		Storage:      jetstream.FileStorage,
		Replicas:     t.Replicas,
	}
}

// Fleet is a worker's or an operator's view of the hosts sharing one NATS
// deployment: the host registry, drain requests, and the record of
// shared requests nobody could serve yet.
type Fleet struct {
	js                   jetstream.JetStream
	hosts, drains, tried jetstream.KeyValue
	host                 string
	t                    Topology
	// registry reads the host registry and writes drain requests as the
	// operators' client does, over the same connection.
	registry *client.Client
}

func openBucket(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	// An unchanged bucket is left alone, as streams are (ensureStream).
	if kv, err := js.KeyValue(ctx, cfg.Bucket); err == nil {
		if st, err := kv.Status(ctx); err == nil && sameBucket(st, cfg) {
			return kv, nil
		}
	}
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
	return kv, nil
}

func sameBucket(st jetstream.KeyValueStatus, cfg jetstream.KeyValueConfig) bool {
	s, ok := st.(*jetstream.KeyValueBucketStatus)
	if !ok {
		return false
	}
	c := s.StreamInfo().Config
	return c.Description == cfg.Description && c.MaxAge == cfg.TTL && c.Replicas == cfg.Replicas &&
		c.MaxMsgSize == cfg.MaxValueSize && c.MaxMsgsPerSubject == int64(cfg.History) && c.Storage == cfg.Storage
}

// OpenFleet creates or updates the fleet's buckets and returns the fleet as
// seen by host t.Host (empty for an operator's command). It is safe to run
// from several workers at once.
func OpenFleet(ctx context.Context, js jetstream.JetStream, t Topology) (*Fleet, error) {
	f := &Fleet{js: js, host: t.Host, t: t, registry: client.New(js)}
	var err error
	if f.hosts, err = openBucket(ctx, js, HostsBucketConfig(t)); err != nil {
		return nil, err
	}
	if f.drains, err = openBucket(ctx, js, DrainsBucketConfig(t)); err != nil {
		return nil, err
	}
	if f.tried, err = openBucket(ctx, js, TriedBucketConfig(t)); err != nil {
		return nil, err
	}
	return f, nil
}

// PutHost writes this host's record.
func (f *Fleet) PutHost(ctx context.Context, rec messages.Host) error {
	rec.V, rec.Host = messages.SchemaVersion, f.host
	b, err := messages.Marshal(&rec)
	if err != nil {
		return err
	}
	if _, err := f.hosts.Put(ctx, f.host, b); err != nil {
		return fmt.Errorf("write the record of host %s: %w", f.host, err)
	}
	return nil
}

// DeleteHost removes this host's record, when its worker stops.
func (f *Fleet) DeleteHost(ctx context.Context) error {
	if err := f.hosts.Delete(ctx, f.host); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("remove the record of host %s: %w", f.host, err)
	}
	return nil
}

// Hosts returns the records of the hosts alive now, sorted by host id,
// as an operator's client.Hosts reads them. Unreadable records are
// skipped.
func (f *Fleet) Hosts(ctx context.Context) ([]messages.Host, error) {
	return f.registry.Hosts(ctx)
}

// Carriers returns the hosts other than this one whose record says they are
// active and carry image, sorted by host id.
func (f *Fleet) Carriers(ctx context.Context, image string) ([]string, error) {
	hosts, err := f.Hosts(ctx)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, h := range hosts {
		if h.Host == f.host || h.State != messages.HostActive {
			continue
		}
		if slices.ContainsFunc(h.Images, func(i messages.HostImage) bool { return i.Name == image }) {
			out = append(out, h.Host)
		}
	}
	return out, nil
}

// Drain asks host to take no more provisions, until Undrain, as an
// operator's client.Drain does. by says who asked, for people.
func (f *Fleet) Drain(ctx context.Context, host, by string) error {
	return f.registry.Drain(ctx, host, by)
}

// Undrain lets host take provisions again.
func (f *Fleet) Undrain(ctx context.Context, host string) error {
	return f.registry.Undrain(ctx, host)
}

// Drained reports whether an operator asked host to drain.
func (f *Fleet) Drained(ctx context.Context, host string) (bool, error) {
	_, err := f.drains.Get(ctx, host)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, jetstream.ErrKeyNotFound), errors.Is(err, jetstream.ErrKeyDeleted):
		return false, nil
	}
	return false, fmt.Errorf("read the drain request of host %s: %w", host, err)
}

// Tried adds this host to the hosts that tried the shared provision
// request at stream sequence request (for job and image) and returns them
// all, in the order they tried. Concurrent additions by other hosts are
// kept: each write is a compare-and-set on the key's revision.
func (f *Fleet) Tried(ctx context.Context, request uint64, jobID, image string) ([]string, error) {
	key := strconv.FormatUint(request, 10)
	for range 8 {
		var hosts []string
		var rev uint64
		e, err := f.tried.Get(ctx, key)
		switch {
		case err == nil:
			rev = e.Revision()
			if old, derr := messages.DecodeTried(e.Value()); derr == nil {
				hosts = old.Hosts
			}
		case !errors.Is(err, jetstream.ErrKeyNotFound):
			return nil, fmt.Errorf("read the hosts that tried request %d: %w", request, err)
		}
		if slices.Contains(hosts, f.host) {
			return hosts, nil
		}
		hosts = append(hosts, f.host)
		b, err := messages.Marshal(&messages.Tried{V: messages.SchemaVersion, JobID: jobID, Image: image, Hosts: hosts})
		if err != nil {
			return nil, err
		}
		if rev == 0 {
			_, err = f.tried.Create(ctx, key, b)
		} else {
			_, err = f.tried.Update(ctx, key, b, rev)
		}
		switch {
		case err == nil:
			return hosts, nil
		case !errors.Is(err, jetstream.ErrKeyExists) && !errors.Is(err, jetstream.ErrKeyRevisionMismatch):
			return nil, fmt.Errorf("record that host %s tried request %d: %w", f.host, request, err)
		}
		// Another host wrote meanwhile: read again.
	}
	return nil, fmt.Errorf("record that host %s tried request %d: the record kept changing", f.host, request)
}

// ForgetTried removes the record of request once the request is settled.
func (f *Fleet) ForgetTried(ctx context.Context, request uint64) error {
	err := f.tried.Purge(ctx, strconv.FormatUint(request, 10))
	if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("forget the hosts that tried request %d: %w", request, err)
	}
	return nil
}

// ImageConsumerConfig is the configuration of the consumer of image's
// provisions, which every host carrying the image shares.
func ImageConsumerConfig(t Topology, image string) jetstream.ConsumerConfig {
	return consumerConfig(t.withDefaults(), messages.ImageConsumer(image), messages.ImageProvisionSubject(image))
}

// EnsureImageConsumer creates or updates the consumer of image's
// provisions. It is safe to run from several workers at once.
func EnsureImageConsumer(ctx context.Context, js jetstream.JetStream, t Topology, image string) (jetstream.Consumer, error) {
	cfg := ImageConsumerConfig(t, image)
	s, err := js.Stream(ctx, messages.RequestsStream)
	if err != nil {
		return nil, fmt.Errorf("create consumer %s for image %s: %w", cfg.Durable, image, err)
	}
	c, err := createConsumer(ctx, s, cfg)
	if err != nil {
		return nil, fmt.Errorf("create consumer %s for image %s: %w", cfg.Durable, image, err)
	}
	return c, nil
}

// Forward publishes the provision request data, which came on the shared
// subject, to the subject of its image, where the hosts that carry the
// image take it. Its Nats-Msg-Id is "forward:<job_id>": the shared
// request's own id (provision:<job_id>) is in the same stream's duplicate
// window, and a forward retried after a lost ack, or by another host that
// got the same shared request again, is stored once.
func Forward(ctx context.Context, js jetstream.JetStream, data []byte, image, jobID string) error {
	subject := messages.ImageProvisionSubject(image)
	_, err := js.Publish(ctx, subject, data, jetstream.WithMsgID("forward:"+jobID), jetstream.WithExpectStream(messages.RequestsStream))
	if err != nil {
		return fmt.Errorf("forward the provision of job %s to %s: %w", jobID, subject, err)
	}
	return nil
}

// ImageConsumer creates or updates the consumer of image's provisions with
// the fleet's topology (EnsureImageConsumer).
func (f *Fleet) ImageConsumer(ctx context.Context, image string) (jetstream.Consumer, error) {
	return EnsureImageConsumer(ctx, f.js, f.t, image)
}

// Forward publishes a shared provision request to its image's subject
// (the function Forward).
func (f *Fleet) Forward(ctx context.Context, data []byte, image, jobID string) error {
	return Forward(ctx, f.js, data, image, jobID)
}
