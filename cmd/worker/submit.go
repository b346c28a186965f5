package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

const submitUsage = `usage: worker submit provision --job ID --image NAME [--host H] [--boot-timeout D] [--max-lifetime D]
                                  [--runner none|forgejo|github|jenkins [runner flags] --secret-file F]
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
	fs := flag.NewFlagSet("worker submit "+kind, flag.ContinueOnError)
	natsURL := fs.String("nats-url", envString("STRETCHY_NATS_URL", nats.DefaultURL), "NATS URL (STRETCHY_NATS_URL)")
	job := fs.String("job", "", "job id")
	host := fs.String("host", "", "host id: pins a provision to a host; required for a teardown")
	image := fs.String("image", "", "image: name of the shut-off libvirt domain to clone")
	var runner runnerFlags
	runner.register(fs)
	bootTimeout := fs.Duration("boot-timeout", 0, "boot timeout (0: the worker's default)")
	maxLifetime := fs.Duration("max-lifetime", 0, "maximum lifetime of the machine (0: the worker's default)")
	reason := fs.String("reason", "requested from the command line", "teardown reason")
	var auth NATSAuth
	auth.register(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	nc, js, err := connectNATS(*natsURL, auth, natsClient{Name: "stretchy-libvirt-worker client"})
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
		seq, err = bus.SubmitProvision(ctx, js, messages.Provision{
			V: messages.SchemaVersion, JobID: *job, Image: *image,
			Runner:       r,
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
		return nc.explain(err)
	}
	fmt.Printf("submitted %s for job %s (request stream sequence %d)\n", kind, *job, seq)
	return nil
}

// runnerFlags are the flags that make the runner section of a provision.
type runnerFlags struct {
	kind, secretFile   string
	url, uuid, handle  string
	labels             labels
	agentName, workDir string
}

func (f *runnerFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.kind, "runner", string(messages.RunnerNone), "runner kind: none, forgejo, github or jenkins")
	fs.StringVar(&f.url, "url", "", "forgejo, jenkins: the instance's URL")
	fs.StringVar(&f.uuid, "uuid", "", "forgejo: the runner's UUID")
	fs.StringVar(&f.handle, "handle", "", "forgejo: the job handle (optional)")
	fs.Var(&f.labels, "label", "forgejo: a runner label (repeat the flag for more)")
	fs.StringVar(&f.agentName, "agent-name", "", "jenkins: the agent's name")
	fs.StringVar(&f.workDir, "work-dir", "", "jenkins: the agent's work directory (optional)")
	fs.StringVar(&f.secretFile, "secret-file", "", "file holding the runner's secret (forgejo token, GitHub JIT config, Jenkins secret); secrets are never taken as arguments")
}

// section builds the runner section from the flags, with the secret read
// from a file so that it never sits in a process list.
func (f *runnerFlags) section() (messages.Runner, error) {
	kind := messages.RunnerKind(f.kind)
	r := messages.Runner{Kind: kind}
	if kind == messages.RunnerNone {
		return r, nil
	}
	if f.secretFile == "" {
		return r, fmt.Errorf("--runner %s needs --secret-file", kind)
	}
	b, err := os.ReadFile(f.secretFile)
	if err != nil {
		return r, fmt.Errorf("read the runner secret: %w", err)
	}
	secret := strings.TrimSpace(string(b))
	switch kind {
	case messages.RunnerForgejo:
		r.Forgejo = &messages.ForgejoRunner{URL: f.url, UUID: f.uuid, Token: secret, Labels: f.labels, Handle: f.handle}
	case messages.RunnerGitHub:
		r.GitHub = &messages.GitHubRunner{JITConfig: secret}
	case messages.RunnerJenkins:
		r.Jenkins = &messages.JenkinsAgent{URL: f.url, AgentName: f.agentName, Secret: secret, WorkDir: f.workDir}
	default:
		return r, fmt.Errorf("--runner %q: must be none, forgejo, github or jenkins", kind)
	}
	return r, nil
}
