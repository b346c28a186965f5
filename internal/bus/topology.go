package bus

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Topology settings. The zero value of each field means its default.
type Topology struct {
	// Host is this worker's host id; it names the host's consumers.
	Host string
	// EventsMaxAge is how long events are kept; default 30 days.
	EventsMaxAge time.Duration
	// RequestsMaxAge is how long a request waits for a worker before the
	// stream drops it (a pinned request for a host that is gone); default
	// 24h.
	RequestsMaxAge time.Duration
	// AckWait is how long a delivered request may go without an ack or a
	// progress heartbeat before it is delivered again; default 30s.
	AckWait time.Duration
	// MaxDeliver bounds deliveries of one request; default 5.
	MaxDeliver int
	// Replicas of the streams in a clustered NATS; default 1.
	Replicas int
}

// Defaults of Topology.
const (
	DefaultEventsMaxAge   = 30 * 24 * time.Hour
	DefaultRequestsMaxAge = 24 * time.Hour
	DefaultAckWait        = 30 * time.Second
	DefaultMaxDeliver     = 5
	// DuplicateWindow is the streams' window for Nats-Msg-Id duplicates.
	DuplicateWindow = 2 * time.Minute
	// SharedProvisionConsumer is the durable consumer all workers share for
	// provision requests any host may take.
	SharedProvisionConsumer = "provision"
)

func (t Topology) withDefaults() Topology {
	if t.EventsMaxAge == 0 {
		t.EventsMaxAge = DefaultEventsMaxAge
	}
	if t.RequestsMaxAge == 0 {
		t.RequestsMaxAge = DefaultRequestsMaxAge
	}
	if t.AckWait == 0 {
		t.AckWait = DefaultAckWait
	}
	if t.MaxDeliver == 0 {
		t.MaxDeliver = DefaultMaxDeliver
	}
	if t.Replicas == 0 {
		t.Replicas = 1
	}
	return t
}

// HostProvisionConsumer names the consumer of provisions pinned to host.
func HostProvisionConsumer(host string) string { return "host_" + host + "_provision" }

// HostTeardownConsumer names the consumer of teardowns for host.
func HostTeardownConsumer(host string) string { return "host_" + host + "_teardown" }

// Consumers are the pull consumers one worker reads from.
type Consumers struct {
	// Provision is shared by all workers.
	Provision jetstream.Consumer
	// Pinned holds provisions for this host only.
	Pinned jetstream.Consumer
	// Teardown holds teardowns for this host.
	Teardown jetstream.Consumer
}

// RequestStreamConfig is the configuration of the request stream.
func RequestStreamConfig(t Topology) jetstream.StreamConfig {
	t = t.withDefaults()
	return jetstream.StreamConfig{
		Name:        messages.RequestsStream,
		Description: "Provision and teardown requests for the libvirt provisioner (work queue)",
		Subjects:    []string{messages.RequestSubjects},
		Retention:   jetstream.WorkQueuePolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    t.Replicas,
		Duplicates:  DuplicateWindow,
		MaxMsgSize:  messages.MaxMessageSize,
		MaxAge:      t.RequestsMaxAge,
	}
}

// EventStreamConfig is the configuration of the event stream.
func EventStreamConfig(t Topology) jetstream.StreamConfig {
	t = t.withDefaults()
	return jetstream.StreamConfig{
		Name:        messages.EventsStream,
		Description: "Lifecycle events of the libvirt provisioner's jobs",
		Subjects:    []string{messages.EventSubjects},
		Retention:   jetstream.LimitsPolicy,
		Storage:     jetstream.FileStorage,
		Replicas:    t.Replicas,
		MaxAge:      t.EventsMaxAge,
		Duplicates:  DuplicateWindow,
	}
}

func consumerConfig(t Topology, name, filter string) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       name,
		FilterSubject: filter,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       t.AckWait,
		MaxDeliver:    t.MaxDeliver,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		// Workers fetch one message per free slot; no more may be
		// outstanding per worker than that, but the consumer is shared.
		MaxAckPending: 10000,
	}
}

// Ensure creates or updates both streams and the consumers of t.Host. It is
// safe to run from several workers at once.
func Ensure(ctx context.Context, js jetstream.JetStream, t Topology) (Consumers, error) {
	t = t.withDefaults()
	if !messages.ValidHost(t.Host) {
		return Consumers{}, fmt.Errorf("host id %q: must be 1-64 characters of A-Z a-z 0-9 _ -", t.Host)
	}
	req, err := ensureStream(ctx, js, RequestStreamConfig(t))
	if err != nil {
		return Consumers{}, err
	}
	if _, err := ensureStream(ctx, js, EventStreamConfig(t)); err != nil {
		return Consumers{}, err
	}
	var c Consumers
	for _, x := range []struct {
		dst          *jetstream.Consumer
		name, filter string
	}{
		{&c.Provision, SharedProvisionConsumer, messages.ProvisionSubject()},
		{&c.Pinned, HostProvisionConsumer(t.Host), messages.HostProvisionSubject(t.Host)},
		{&c.Teardown, HostTeardownConsumer(t.Host), messages.TeardownSubject(t.Host)},
	} {
		cons, err := createConsumer(ctx, req, consumerConfig(t, x.name, x.filter))
		if err != nil {
			return Consumers{}, fmt.Errorf("create consumer %s: %w", x.name, err)
		}
		*x.dst = cons
	}
	return c, nil
}

// sameStream reports whether the stream configuration have, as the server
// reports it, has every setting of want.
func sameStream(have, want jetstream.StreamConfig) bool {
	unlimited := func(n int32) int32 { // the server reports "no limit" as -1
		if n == 0 {
			return -1
		}
		return n
	}
	return slices.Equal(have.Subjects, want.Subjects) && have.Description == want.Description &&
		have.Retention == want.Retention && have.Storage == want.Storage && have.Replicas == want.Replicas &&
		have.Duplicates == want.Duplicates && unlimited(have.MaxMsgSize) == unlimited(want.MaxMsgSize) &&
		have.MaxAge == want.MaxAge
}

func ensureStream(ctx context.Context, js jetstream.JetStream, cfg jetstream.StreamConfig) (jetstream.Stream, error) {
	// A stream that is as it should be is left alone. Besides sparing
	// every worker start two writes, this keeps stream updates rare:
	// nats-server 2.15.2 reads a stream's file store configuration for a
	// new consumer without the lock its update writes it under (a data
	// race the race detector reports when a worker starts while another
	// client creates a consumer on the same stream).
	s, err := js.Stream(ctx, cfg.Name)
	switch {
	case err == nil && sameStream(s.CachedInfo().Config, cfg):
		return s, nil
	case err != nil && !errors.Is(err, jetstream.ErrStreamNotFound):
		return nil, fmt.Errorf("look up stream %s: %w", cfg.Name, err)
	}
	// Several workers may race to create the stream; a lost race shows as
	// "already in use" and the next try updates the winner's stream.
	var last error
	for range 3 {
		s, err := js.CreateOrUpdateStream(ctx, cfg)
		if err == nil {
			return s, nil
		}
		last = err
		if !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			break
		}
	}
	return nil, fmt.Errorf("create stream %s: %w", cfg.Name, last)
}

// consumerCreator creates consumers; jetstream.Stream and
// jetstream.JetStream (by stream name) both do.
type consumerCreator interface {
	CreateOrUpdateConsumer(ctx context.Context, cfg jetstream.ConsumerConfig) (jetstream.Consumer, error)
}

// createConsumer creates or updates a consumer, trying again for a while
// when a clustered server answers 503 (insufficient resources, no
// quorum): it does so while a new stream's peers settle, or while a node
// restarts.
func createConsumer(ctx context.Context, s consumerCreator, cfg jetstream.ConsumerConfig) (jetstream.Consumer, error) {
	wait := time.NewTimer(0)
	defer wait.Stop()
	<-wait.C
	for try := 1; ; try++ {
		c, err := s.CreateOrUpdateConsumer(ctx, cfg)
		var aerr *jetstream.APIError
		if err == nil || !errors.As(err, &aerr) || aerr.Code != 503 || try == 20 {
			return c, err
		}
		wait.Reset(500 * time.Millisecond)
		select {
		case <-ctx.Done():
			return nil, errors.Join(err, ctx.Err())
		case <-wait.C:
		}
	}
}
