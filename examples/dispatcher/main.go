// Command dispatcher is a small orchestrator written against pkg/client
// alone: it reads job descriptions (one JSON object per line, from a file
// or stdin), submits them at a bounded rate, follows each to its outcome
// with a live progress line, tears down the jobs still running at their
// deadline, and prints a summary table. README.md shows it driving the
// demo's worker.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
)

// spec is one job description. Fields are the runner section's fields by
// the name of worker submit's flag for them (url, uuid, label, agent-name,
// ...); the secret is read from SecretFile.
type spec struct {
	Job         string                     `json:"job"`
	Image       string                     `json:"image"`
	Runner      string                     `json:"runner"`
	Fields      map[string]json.RawMessage `json:"fields"`
	SecretFile  string                     `json:"secret_file"`
	Host        string                     `json:"host"`
	ByImage     bool                       `json:"by_image"`
	Deadline    string                     `json:"deadline"`
	MaxLifetime string                     `json:"max_lifetime"`
}

// request turns s into a provision request and its deadline (def when s
// names none).
func (s spec) request(def time.Duration) (messages.Provision, time.Duration, error) {
	req := messages.Provision{JobID: s.Job, Image: s.Image, Runner: messages.Runner{Kind: messages.RunnerKind(s.Runner)}}
	if s.Runner == "" {
		req.Runner.Kind = messages.RunnerNone
	}
	kind, ok := runners.Lookup(req.Runner.Kind)
	if !ok {
		return req, 0, fmt.Errorf("job %s: unknown runner %q", s.Job, s.Runner)
	}
	for _, f := range kind.Fields {
		var err error
		switch raw := s.Fields[f.Flag]; {
		case f.Secret:
			var b []byte
			if b, err = os.ReadFile(s.SecretFile); err == nil {
				f.Set(&req.Runner, strings.TrimSpace(string(b)))
			}
		case raw == nil:
		case f.List():
			var vs []string
			if err = json.Unmarshal(raw, &vs); err == nil {
				f.SetValues(&req.Runner, vs)
			}
		default:
			var v string
			if err = json.Unmarshal(raw, &v); err == nil {
				f.Set(&req.Runner, v)
			}
		}
		if err != nil {
			return req, 0, fmt.Errorf("job %s: %s: %w", s.Job, f.Wire, err)
		}
	}
	deadline := def
	if s.Deadline != "" {
		d, err := time.ParseDuration(s.Deadline)
		if err != nil {
			return req, 0, fmt.Errorf("job %s: deadline: %w", s.Job, err)
		}
		deadline = d
	}
	if s.MaxLifetime != "" {
		d, err := time.ParseDuration(s.MaxLifetime)
		if err != nil {
			return req, 0, fmt.Errorf("job %s: max_lifetime: %w", s.Job, err)
		}
		req.MaxLifetimeS = int64(d.Seconds())
	}
	return req, deadline, nil
}

// readSpecs reads one spec per non-empty line.
func readSpecs(r io.Reader) ([]spec, error) {
	var out []spec
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		if strings.TrimSpace(sc.Text()) == "" {
			continue
		}
		var s spec
		dec := json.NewDecoder(strings.NewReader(sc.Text()))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&s); err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		out = append(out, s)
	}
	return out, sc.Err()
}

// result is what became of one job.
type result struct {
	job      string
	status   client.Status
	note     string // torn down at its deadline, never served, ...
	err      error
	took     time.Duration
	finished bool
}

// follow follows job to its outcome. At its deadline, or when the
// dispatcher is interrupted, it tears the job down; after a deadline it
// follows the job to the end that brings.
func follow(ctx context.Context, job *client.Job, deadline time.Duration, progress chan<- result) result {
	start := time.Now()
	r := result{job: job.ID}
	// watch follows the job; a second watch skips what the first saw,
	// as a Follow starts again at the job's first event.
	watch := func(ctx context.Context) {
		seen := r.status.Events
		for st, err := range job.Follow(ctx) {
			var undecodable *client.DecodeError
			if errors.As(err, &undecodable) {
				continue
			}
			if r.err = err; err != nil {
				return
			}
			if st.Events > seen {
				r.status = st
				progress <- r
			}
		}
	}
	dctx, cancel := context.WithTimeout(ctx, deadline)
	watch(dctx)
	cancel()
	if r.status.Outcome == nil && (errors.Is(r.err, context.DeadlineExceeded) || ctx.Err() != nil) {
		r.note = "torn down at its deadline"
		if ctx.Err() != nil {
			r.note = "interrupted: torn down"
		}
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Minute)
		defer cancel()
		_, r.err = job.Teardown(tctx, r.note)
		switch {
		case errors.Is(r.err, client.ErrNoHost):
			r.note, r.err = "never served: no host took it", nil
		case r.err == nil && ctx.Err() == nil:
			watch(tctx)
		}
	}
	r.took, r.finished = time.Since(start), true
	return r
}

// phase is what the progress line counts a job as.
func phase(r result) string {
	switch st := r.status; {
	case st.Outcome != nil || r.finished:
		return "done"
	case st.State == "":
		return "waiting"
	case st.State == messages.StateTearingDown:
		return "ending"
	case st.State == messages.StateAgentReady || st.State == messages.StateRunnerStarted || st.State == messages.StateRunnerExited:
		return "running"
	}
	return "booting"
}

func main() {
	url := flag.String("nats-url", envOr("STRETCHY_NATS_URL", "nats://127.0.0.1:4222"), "NATS URL(s)")
	creds := flag.String("nats-creds", "", "NATS .creds file")
	seed := flag.String("nats-nkey-seed", "", "NATS user nkey seed file (the demo's worker: <data dir>/user.nk)")
	rate := flag.Float64("rate", 2, "submits per second at most")
	deadline := flag.Duration("deadline", 10*time.Minute, "tear down a job not ended this long after its submit (a job's \"deadline\" overrides it)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: dispatcher [flags] [jobs.jsonl | -]\n\nflags:\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if err := run(*url, *creds, *seed, *rate, *deadline, flag.Arg(0)); err != nil {
		fmt.Fprintln(os.Stderr, "dispatcher:", err)
		os.Exit(1)
	}
}

func run(url, creds, seed string, rate float64, deadline time.Duration, path string) error {
	in := io.Reader(os.Stdin)
	if path != "" && path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		in = f
	}
	specs, err := readSpecs(in)
	if err != nil {
		return err
	}
	var opts []client.Option
	if creds != "" {
		opts = append(opts, client.WithCredsFile(creds))
	}
	if seed != "" {
		opts = append(opts, client.WithNKeySeedFile(seed))
	}
	c, err := client.Connect(url, append(opts, client.WithName("stretchy dispatcher example"))...)
	if err != nil {
		return err
	}
	defer c.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	progress := make(chan result)
	done := make(chan []result)
	go func() { done <- report(progress, len(specs)) }()
	var wg sync.WaitGroup
	tick := time.NewTicker(time.Duration(float64(time.Second) / rate))
	defer tick.Stop()
	for i, s := range specs {
		if i > 0 {
			select {
			case <-ctx.Done():
			case <-tick.C:
			}
		}
		req, d, err := s.request(deadline)
		var job *client.Job
		if err == nil && ctx.Err() == nil {
			var route []client.SubmitOption
			switch {
			case s.Host != "":
				route = append(route, client.OnHost(s.Host))
			case s.ByImage:
				route = append(route, client.OnImage(), client.CheckCarriers())
			}
			job, err = c.Submit(ctx, req, route...)
		}
		if err != nil || ctx.Err() != nil {
			progress <- result{job: s.Job, err: errors.Join(err, ctx.Err()), finished: true}
			continue
		}
		wg.Go(func() { progress <- follow(ctx, job, d, progress) })
	}
	wg.Wait()
	close(progress)
	failed := false
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "JOB\tHOST\tOUTCOME\tEXIT\tTOOK\tNOTE")
	for _, r := range <-done {
		outcome, exit, note := "-", "-", r.note
		var jobErr error
		if o := r.status.Outcome; o != nil {
			outcome, jobErr = string(o.State), o.Err()
			if o.ExitCode != nil {
				exit = fmt.Sprint(*o.ExitCode)
			}
		}
		for _, err := range []error{r.err, jobErr} {
			if err != nil {
				note = strings.TrimSpace(note + " " + err.Error())
			}
		}
		failed = failed || r.status.Outcome == nil || jobErr != nil
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", r.job, orDash(r.status.Host), outcome, exit, r.took.Round(time.Second), orDash(note))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if failed {
		return errors.New("not every job ended well")
	}
	return nil
}

// report owns the jobs' latest results: it prints the progress line as
// they change, and returns them once progress closes, in submit order.
func report(progress <-chan result, n int) []result {
	tty := false
	if fi, err := os.Stdout.Stat(); err == nil {
		tty = fi.Mode()&os.ModeCharDevice != 0
	}
	start := time.Now()
	latest := map[string]result{}
	var order []string
	last := ""
	for r := range progress {
		if _, ok := latest[r.job]; !ok {
			order = append(order, r.job)
		}
		latest[r.job] = r
		counts := map[string]int{}
		for _, r := range latest {
			counts[phase(r)]++
		}
		line := fmt.Sprintf("%d of %d jobs submitted: %d waiting, %d booting, %d running, %d ending, %d done", len(latest), n,
			counts["waiting"], counts["booting"], counts["running"], counts["ending"], counts["done"])
		if line == last {
			continue
		}
		last = line
		if tty {
			fmt.Printf("\r[%4.0fs] %s", time.Since(start).Seconds(), line)
		} else {
			fmt.Printf("[%4.0fs] %s\n", time.Since(start).Seconds(), line)
		}
	}
	if tty {
		fmt.Println()
	}
	out := make([]result, 0, len(order))
	for _, j := range order {
		out = append(out, latest[j])
	}
	return out
}

func envOr(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
