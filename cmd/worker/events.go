package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// errStop ends reading events once the wanted one was seen.
var errStop = errors.New("stop")

func eventsCommand(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("worker events", flag.ContinueOnError)
	natsURL := fs.String("nats-url", envString("STRETCHY_NATS_URL", nats.DefaultURL), "NATS URL (STRETCHY_NATS_URL)")
	job := fs.String("job", "", "only events of this job")
	host := fs.String("host", "", "only events of this host")
	state := fs.String("state", "", "only events in this state")
	follow := fs.Bool("follow", false, "keep printing new events")
	newOnly := fs.Bool("new", false, "skip past events; print only new ones (implies --follow)")
	until := fs.String("until", "", "with --follow: exit after an event in this state (for scripts)")
	asJSON := fs.Bool("json", false, "print JSON lines instead of a table")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *state != "" && !messages.State(*state).Valid() {
		return fmt.Errorf("--state %q: not a state", *state)
	}
	nc, js, err := connect(*natsURL)
	if err != nil {
		return err
	}
	defer nc.Close()

	deliver := jetstream.DeliverAllPolicy
	if *newOnly {
		deliver, *follow = jetstream.DeliverNewPolicy, true
	}
	filter := messages.EventFilter(*host, *job, messages.State(*state))
	return printEvents(ctx, js, filter, deliver, *follow, *asJSON, func(ev messages.Event) bool {
		return *until != "" && string(ev.State) == *until
	})
}

func printEvents(ctx context.Context, js jetstream.JetStream, filter string, deliver jetstream.DeliverPolicy, follow, asJSON bool, done func(messages.Event) bool) error {
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	if !asJSON {
		fmt.Fprintln(tw, "TIME\tHOST\tJOB\tSEQ\tSTATE\tPHASE\tDETAIL")
		tw.Flush()
	}
	enc := json.NewEncoder(os.Stdout)
	err := bus.ReadEvents(ctx, js, filter, deliver, follow, func(streamSeq uint64, ev messages.Event, derr error) error {
		if derr != nil {
			fmt.Fprintf(os.Stderr, "skipping undecodable event %d: %v\n", streamSeq, derr)
			return nil
		}
		if asJSON {
			if err := enc.Encode(ev); err != nil {
				return err
			}
		} else {
			detail := ev.Reason
			if ev.Error != nil {
				detail = string(ev.Error.Code) + ": " + ev.Error.Message
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", ev.Time.Local().Format("15:04:05.000"), ev.Host, ev.JobID, ev.Seq,
				ev.State, (time.Duration(ev.PhaseMS) * time.Millisecond).String(), detail)
			tw.Flush()
		}
		if done(ev) {
			return errStop
		}
		return nil
	})
	if errors.Is(err, errStop) || errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
