package worker

import (
	"context"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// The tests submit requests as an orchestrator does, through pkg/client,
// with the runner secret as the test wrote it (sealed or not).

// submitProvision publishes req pinned to host, or on the shared subject
// when host is empty, and returns its request stream sequence.
func submitProvision(ctx context.Context, js jetstream.JetStream, req messages.Provision, host string) (uint64, error) {
	opts := []client.SubmitOption{client.WithSealing(client.SealNever)}
	if host != "" {
		opts = append(opts, client.OnHost(host))
	}
	job, err := client.New(js).Submit(ctx, req, opts...)
	if err != nil {
		return 0, err
	}
	return job.Receipt.Sequence, nil
}

// submitImageProvision publishes req on its image's subject.
func submitImageProvision(ctx context.Context, js jetstream.JetStream, req messages.Provision) error {
	_, err := client.New(js).Submit(ctx, req, client.OnImage(), client.WithSealing(client.SealNever))
	return err
}

// submitTeardown publishes a teardown of job to host.
func submitTeardown(ctx context.Context, js jetstream.JetStream, job, host string) error {
	_, err := client.New(js).Job(job, client.AtHost(host)).Teardown(ctx, "test")
	return err
}
