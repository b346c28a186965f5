package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

const submitUsage = `usage: worker submit provision --job ID --image NAME [--host H] [--boot-timeout D] [--max-lifetime D]
       worker submit teardown  --job ID --host H [--reason TEXT]`

func connect(url string) (*nats.Conn, jetstream.JetStream, error) {
	nc, err := nats.Connect(url, nats.Name("stretchy-libvirt-worker client"))
	if err != nil {
		return nil, nil, fmt.Errorf("connect to nats %s: %w", redactURL(url), err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, js, nil
}

func submitCommand(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New(submitUsage)
	}
	kind, args := args[0], args[1:]
	fs := flag.NewFlagSet("worker submit "+kind, flag.ContinueOnError)
	natsURL := fs.String("nats-url", envString("STRETCHY_NATS_URL", nats.DefaultURL), "NATS URL (STRETCHY_NATS_URL)")
	job := fs.String("job", "", "job id")
	host := fs.String("host", "", "host id: pins a provision to a host; required for a teardown")
	image := fs.String("image", "", "image: name of the shut-off libvirt domain to clone")
	runner := fs.String("runner", string(messages.RunnerNone), "runner kind; only \"none\" can be given on the command line")
	bootTimeout := fs.Duration("boot-timeout", 0, "boot timeout (0: the worker's default)")
	maxLifetime := fs.Duration("max-lifetime", 0, "maximum lifetime of the machine (0: the worker's default)")
	reason := fs.String("reason", "requested from the command line", "teardown reason")
	if err := fs.Parse(args); err != nil {
		return err
	}
	nc, js, err := connect(*natsURL)
	if err != nil {
		return err
	}
	defer nc.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()

	var seq uint64
	switch kind {
	case "provision":
		if *runner != string(messages.RunnerNone) {
			return fmt.Errorf("--runner %q: runners with credentials are submitted by an orchestrator, not on a command line", *runner)
		}
		seq, err = bus.SubmitProvision(ctx, js, messages.Provision{
			V: messages.SchemaVersion, JobID: *job, Image: *image,
			Runner:       messages.Runner{Kind: messages.RunnerNone},
			BootTimeoutS: int64(bootTimeout.Seconds()), MaxLifetimeS: int64(maxLifetime.Seconds()),
			RequestedAt: time.Now().UTC(),
		}, *host)
	case "teardown":
		seq, err = bus.SubmitTeardown(ctx, js, messages.Teardown{
			V: messages.SchemaVersion, JobID: *job, Reason: *reason, RequestedAt: time.Now().UTC(),
		}, *host)
	default:
		return fmt.Errorf("unknown request %q\n%s", kind, submitUsage)
	}
	if err != nil {
		return err
	}
	fmt.Printf("submitted %s for job %s (request stream sequence %d)\n", kind, *job, seq)
	return nil
}
