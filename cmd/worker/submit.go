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

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

var submitUsage = `usage: worker submit provision --job ID --image NAME [--host H | --by-image] [--boot-timeout D] [--max-lifetime D]
                                  [--runner ` + strings.Join(kindNames(), "|") + ` [runner flags] --secret-file F]
       worker submit teardown  --job ID --host H [--reason TEXT]`

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
	host := fs.String("host", "", "host id: pins a provision to a host; required for a teardown")
	byImage := fs.Bool("by-image", false, "publish the provision on its image's subject, where only hosts that carry the image take it (docs/protocol.md 2.5)")
	image := fs.String("image", "", "image: name of the shut-off libvirt domain to clone")
	var runner runnerFlags
	runner.register(fs)
	bootTimeout := fs.Duration("boot-timeout", 0, "boot timeout (0: the worker's default)")
	maxLifetime := fs.Duration("max-lifetime", 0, "maximum lifetime of the machine (0: the worker's default)")
	reason := fs.String("reason", "requested from the command line", "teardown reason")
	sealing := fs.String("seal", string(sealAuto), "seal the runner secret to a key of the hosts that may serve the request (docs/protocol.md 3.13): auto (when they list a common key), always (or refuse), never")
	if help {
		fs.Usage()
		return flag.ErrHelp
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	nc, js, err := nf.connect("stretchy-libvirt-worker client")
	if err != nil {
		return err
	}
	defer nc.Close()
	ctx, stop := nc.failFast(ctx)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()

	var seq uint64
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
		mode := sealMode(*sealing)
		if mode != sealAuto && mode != sealAlways && mode != sealNever {
			return fmt.Errorf("--seal %q: must be auto, always or never", *sealing)
		}
		if mode != sealNever && len(runners.Secrets(req.Runner)) > 0 {
			hosts, herr := bus.ReadHosts(ctx, js)
			if herr != nil && mode == sealAlways {
				return nc.explain(fmt.Errorf("--seal always: %w", herr))
			}
			sealed, serr := sealFor(&req, hosts, *host, mode)
			switch {
			case serr != nil:
				return serr
			case !sealed:
				fmt.Fprintln(os.Stderr, "worker submit: no sealing key is known for the hosts that may serve this request; the runner secret travels in the clear")
			}
		}
		switch {
		case *byImage && *host != "":
			return errors.New("--by-image and --host: give one")
		case *byImage:
			seq, err = bus.SubmitImageProvision(ctx, js, req)
		default:
			seq, err = bus.SubmitProvision(ctx, js, req, *host)
		}
	case "teardown":
		seq, err = bus.SubmitTeardown(ctx, js, messages.Teardown{
			V: messages.SchemaVersion, JobID: *job, Reason: *reason, RequestedAt: time.Now().UTC(),
		}, *host)
	}
	if err != nil {
		return nc.explain(err)
	}
	fmt.Printf("submitted %s for job %s (request stream sequence %d)\n", kind, *job, seq)
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
