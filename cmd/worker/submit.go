package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

var submitUsage = `usage: worker submit provision --job ID --image NAME [--host H | --by-image] [--boot-timeout D] [--max-lifetime D]
                                  [--runner ` + strings.Join(kindNames(), "|") + ` [runner flags] --secret-file F]
       worker submit teardown  --job ID [--host H] [--reason TEXT]`

// labels collects a repeated flag.
type labels []string

func (l *labels) String() string     { return strings.Join(*l, ",") }
func (l *labels) Set(v string) error { *l = append(*l, v); return nil }

func submitCommand(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New(submitUsage)
	}
	kind, args := args[0], args[1:]
	help := kind == "-h" || kind == "-help" || kind == "--help"
	if !help && kind != "provision" && kind != "teardown" {
		return fmt.Errorf("unknown request %q\n%s", kind, submitUsage)
	}
	fs := flag.NewFlagSet("worker submit "+kind, flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprintf(fs.Output(), "%s\n\nflags:\n", submitUsage); fs.PrintDefaults() }
	var nf natsFlags
	nf.register(fs, orchestratorRole)
	job := fs.String("job", "", "job id")
	host := fs.String("host", "", "host id: pins a provision to a host; for a teardown, the job's host (empty: the host its events name)")
	byImage := fs.Bool("by-image", false, "publish the provision on its image's subject, where only hosts that carry the image take it (docs/protocol.md 2.5)")
	image := fs.String("image", "", "image: name of the shut-off libvirt domain to clone")
	var runner runnerFlags
	runner.register(fs)
	bootTimeout := fs.Duration("boot-timeout", 0, "boot timeout (0: the worker's default)")
	maxLifetime := fs.Duration("max-lifetime", 0, "maximum lifetime of the machine (0: the worker's default)")
	reason := fs.String("reason", "requested from the command line", "teardown reason")
	sealing := fs.String("seal", string(client.SealAuto), "seal the runner secret to a key of the hosts that may serve the request (docs/protocol.md 3.13): auto (when they list a common key), always (or refuse), never")
	if help {
		fs.Usage()
		return flag.ErrHelp
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	mode := client.SealMode(*sealing)
	if mode != client.SealAuto && mode != client.SealAlways && mode != client.SealNever {
		return fmt.Errorf("--seal %q: must be auto, always or never", *sealing)
	}
	if kind == "provision" && *byImage && *host != "" {
		return errors.New("--by-image and --host: give one")
	}
	c, err := nf.client("stretchy-libvirt-worker client")
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()

	var rc client.Receipt
	switch kind {
	case "provision":
		r, rerr := runner.section()
		if rerr != nil {
			return rerr
		}
		req := messages.Provision{
			V: messages.SchemaVersion, JobID: *job, Image: *image,
			Runner:       r,
			BootTimeoutS: int64(bootTimeout.Seconds()), MaxLifetimeS: int64(maxLifetime.Seconds()),
			RequestedAt: time.Now().UTC(),
		}
		opts := []client.SubmitOption{client.WithSealing(mode)}
		switch {
		case *byImage:
			opts = append(opts, client.OnImage())
		case *host != "":
			opts = append(opts, client.OnHost(*host))
		}
		j, err := c.Submit(ctx, req, opts...)
		if errors.Is(err, client.ErrNoSealKey) {
			return fmt.Errorf("--seal always: %w", err)
		}
		if err != nil {
			return err
		}
		if mode == client.SealAuto && j.SealKey == "" && len(runners.Secrets(req.Runner)) > 0 {
			fmt.Fprintln(os.Stderr, "worker submit: no sealing key is known for the hosts that may serve this request; the runner secret travels in the clear")
		}
		rc = j.Receipt
	case "teardown":
		var opts []client.JobOption
		if *host != "" {
			opts = append(opts, client.AtHost(*host))
		}
		rc, err = c.Job(*job, opts...).Teardown(ctx, *reason)
		if errors.Is(err, client.ErrNoHost) {
			return fmt.Errorf("job %s has no events: no host serves it yet (--host names one)", *job)
		}
		if err != nil {
			return err
		}
	}
	fmt.Printf("submitted %s for job %s (request stream sequence %d)\n", kind, *job, rc.Sequence)
	return nil
}

// secretFileFlag names the file the secret fields of a runner section
// are read from, so that a secret never sits in a process list; the table
// of runner kinds gives it as their flag.
const secretFileFlag = "secret-file"

// runnerFlags are the flags that make the runner section of a provision,
// one per field of the table of runner kinds (pkg/runners), shared by the
// kinds with a field of that flag.
type runnerFlags struct {
	kind, secretFile string
	values           map[string]*string // the string flags
	lists            map[string]*labels // the repeated flags
}

func (f *runnerFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.kind, "runner", string(messages.RunnerNone), "runner kind: "+orList(kindNames()))
	f.values, f.lists = map[string]*string{}, map[string]*labels{}
	type runnerFlag struct {
		kinds []string
		usage string
		list  bool
	}
	var names, secrets []string
	flags := map[string]*runnerFlag{}
	for _, k := range runners.Kinds() {
		for _, field := range k.Fields {
			if field.Secret {
				secrets = append(secrets, field.Usage)
				continue
			}
			// Kinds share a flag for fields that agree
			// (TestSubmitSharedFlags): the first one's help serves all.
			fl := flags[field.Flag]
			if fl == nil {
				usage := field.Usage
				if !field.Required {
					usage += " (optional)"
				}
				if field.List() {
					usage += " (repeat the flag for more)"
				}
				fl = &runnerFlag{usage: usage, list: field.List()}
				flags[field.Flag] = fl
				names = append(names, field.Flag)
			}
			fl.kinds = append(fl.kinds, string(k.Kind))
		}
	}
	for _, name := range names {
		fl := flags[name]
		usage := strings.Join(fl.kinds, ", ") + ": " + fl.usage
		if fl.list {
			f.lists[name] = new(labels)
			fs.Var(f.lists[name], name, usage)
		} else {
			f.values[name] = fs.String(name, "", usage)
		}
	}
	fs.StringVar(&f.secretFile, secretFileFlag, "", "file holding the runner's secret ("+strings.Join(secrets, ", ")+
		"); secrets are never taken as arguments")
}

// section builds the runner section from the flags: each field of the
// kind's section from its flag, and its secret from the file named by
// --secret-file.
func (f *runnerFlags) section() (messages.Runner, error) {
	kind := messages.RunnerKind(f.kind)
	r := messages.Runner{Kind: kind}
	k, known := runners.Lookup(kind)
	if known && k.Section == "" {
		return r, nil
	}
	var secret string
	if !known || slices.ContainsFunc(k.Fields, func(field runners.Field) bool { return field.Secret }) {
		if f.secretFile == "" {
			return r, fmt.Errorf("--runner %s needs --%s", kind, secretFileFlag)
		}
		b, err := os.ReadFile(f.secretFile)
		if err != nil {
			return r, fmt.Errorf("read the runner secret: %w", err)
		}
		secret = strings.TrimSpace(string(b))
	}
	if !known {
		return r, fmt.Errorf("--runner %q: must be %s", kind, orList(kindNames()))
	}
	for _, field := range k.Fields {
		switch {
		case field.Secret:
			field.Set(&r, secret)
		case field.List():
			field.SetValues(&r, *f.lists[field.Flag])
		default:
			field.Set(&r, *f.values[field.Flag])
		}
	}
	return r, nil
}

// kindNames are the runner kinds, none first.
func kindNames() []string {
	var names []string
	for _, k := range runners.Kinds() {
		names = append(names, string(k.Kind))
	}
	return names
}

// orList writes words as "a, b or c".
func orList(words []string) string {
	if len(words) < 2 {
		return strings.Join(words, "")
	}
	return strings.Join(words[:len(words)-1], ", ") + " or " + words[len(words)-1]
}
