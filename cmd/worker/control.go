package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

const holdUsage = `usage: worker hold <job> [--for D] [--host H] [--nats-url U]
       worker release <job> [--host H] [--nats-url U]
       worker console <job> [--bytes N] [--host H] [--nats-url U]

hold keeps the job's machine when its job ends, however it ends: the
machine is powered off (its disks and console log stay, its memory does
not, and its runner can take no other job), counts against the host's
capacity, and is removed --for after the job's end (default and cap: the
host's --max-hold). On a held machine it sets the hold to end --for from
now. release removes a held machine now, or cancels the hold of one whose
job runs. console prints the end of the machine's serial console log, the
job's secrets removed. The job's host is found from its newest event
unless --host names it; the host's worker answers (docs/protocol.md 2.9).
`

func controlCommand(ctx context.Context, op messages.ControlOp, args []string) error {
	fs := flag.NewFlagSet("worker "+string(op), flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), holdUsage); fs.PrintDefaults() }
	var nf natsFlags
	nf.register(fs, operatorRole)
	host := fs.String("host", "", "the job's host; empty finds it from the job's newest event")
	var holdFor time.Duration
	var bytes int
	switch op {
	case messages.ControlHold:
		fs.DurationVar(&holdFor, "for", 0, "how long to keep the machine after its job's end (0: the host's --max-hold)")
	case messages.ControlConsole:
		fs.IntVar(&bytes, "bytes", 64<<10, fmt.Sprintf("at most this many bytes of the log's end (at most %d)", messages.MaxControlConsoleBytes))
	}
	var job string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		job, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if job == "" && fs.NArg() == 1 {
		job = fs.Arg(0)
	} else if fs.NArg() > 0 || job == "" {
		return errors.New(strings.SplitN(holdUsage, "\n\n", 2)[0])
	}
	if !messages.ValidJobID(job) {
		return fmt.Errorf("%q is not a job id", job)
	}
	if holdFor < 0 || holdFor > messages.MaxHold {
		return fmt.Errorf("--for %s: must be between 0 and %s", holdFor, messages.MaxHold)
	}
	c, err := nf.client("stretchy-libvirt-worker client", client.WithIdentity(defaultBy()))
	if err != nil {
		return err
	}
	defer c.Close()
	var opts []client.JobOption
	if *host != "" {
		opts = append(opts, client.AtHost(*host))
	}
	j := c.Job(job, opts...)
	// A release waits for an operation slot and the removal; finding the
	// job's host takes one short replay.
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute+10*time.Second)
	defer cancel()
	var reply messages.ControlReply
	switch op {
	case messages.ControlHold:
		reply, err = j.Hold(ctx, holdFor)
	case messages.ControlRelease:
		reply, err = j.Release(ctx)
	case messages.ControlConsole:
		var console string
		if console, err = j.Console(ctx, bytes); err == nil {
			_, err = os.Stdout.WriteString(console)
		}
	}
	if errors.Is(err, client.ErrNoHost) {
		return fmt.Errorf("job %s has no events: no host serves it (--host names one)", job)
	}
	if err != nil {
		return err
	}
	switch op {
	case messages.ControlHold:
		if !reply.HeldUntil.IsZero() {
			fmt.Printf("job %s: machine held on host %s until %s\n", job, reply.Host, reply.HeldUntil.Local().Format(time.RFC3339))
		} else {
			fmt.Printf("job %s: machine on host %s will be held for %s once its job ends\n", job, reply.Host, time.Duration(reply.HoldForS)*time.Second)
		}
	case messages.ControlRelease:
		if reply.Phase == "gone" {
			fmt.Printf("job %s: held machine on host %s removed\n", job, reply.Host)
		} else {
			fmt.Printf("job %s: the hold of its machine on host %s is cancelled\n", job, reply.Host)
		}
	}
	return nil
}
