// Command worker is the libvirt worker of the Stretchy CI machine
// provisioner. "worker run" serves provision and teardown requests from NATS
// JetStream on one host; "worker submit" and "worker events" drive and watch
// it from a shell.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

const usage = `usage: worker <command> [flags]

commands:
  run       serve requests on this host (the default)
  submit    publish a provision or teardown request
  events    print lifecycle events, past and live
  doctor    check this host, its images and NATS, with hints to fix them
  hosts     list the hosts of the fleet: state, images, slots, machines, space
  drain     make a host take no more provisions (undrain: take them again)
  hold      keep a job's machine after its job ends (release: remove it now)
  console   print the end of a job's machine's serial console
  config    print the effective configuration of worker run
  keys      make and list the keys runner secrets are sealed to
  version   print the worker's version

Run "worker <command> -h" for the flags of a command. Every flag can also be
set through the environment variable named in its help text.
`

func main() {
	args := os.Args[1:]
	// Without a command, flags are run's; help is the worker's.
	cmd := "run"
	if len(args) > 0 {
		switch a := args[0]; {
		case a == "-h" || a == "-help" || a == "--help":
			cmd, args = "help", args[1:]
		case a != "" && a[0] != '-':
			cmd, args = a, args[1:]
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	var err error
	switch cmd {
	case "run":
		err = runCommand(ctx, args)
	case "submit":
		err = submitCommand(ctx, args)
	case "events":
		err = eventsCommand(ctx, args)
	case "doctor":
		err = doctorCommand(ctx, args)
	case "hosts":
		err = hostsCommand(ctx, args)
	case "drain":
		err = drainCommand(ctx, args, true)
	case "undrain":
		err = drainCommand(ctx, args, false)
	case "hold":
		err = controlCommand(ctx, messages.ControlHold, args)
	case "release":
		err = controlCommand(ctx, messages.ControlRelease, args)
	case "console":
		err = controlCommand(ctx, messages.ControlConsole, args)
	case "config":
		err = configCommand(args)
	case "keys":
		err = keysCommand(args, stdout)
	case "version":
		fmt.Println(version())
	case "help":
		fmt.Print(usage)
		return
	default:
		fmt.Fprintf(os.Stderr, "worker: unknown command %q\n\n%s", cmd, usage)
		os.Exit(2)
	}
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "worker %s: %v\n", cmd, err)
		os.Exit(1)
	}
}
