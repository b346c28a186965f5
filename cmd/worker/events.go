package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

const eventsUsage = `usage: worker events [--job ID] [--host H] [--state S] [--since 2h | --from T [--to T]]
                     [--follow | --new] [--until STATE] [--summary] [--json]

Replays lifecycle events from the event stream, oldest first; the server
filters by host, job and state and starts at --since/--from, so a replay
reads only what it prints. Times are RFC 3339 (2026-11-27T02:00:00Z).
`

// eventQuery is what "worker events" was asked for.
type eventQuery struct {
	q       client.Query
	until   messages.State
	summary bool
	asJSON  bool
}

func eventsCommand(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("worker events", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), eventsUsage); fs.PrintDefaults() }
	var nf natsFlags
	nf.register(fs, orchestratorRole)
	job := fs.String("job", "", "only events of this job")
	host := fs.String("host", "", "only events of this host")
	state := fs.String("state", "", "only events in this state")
	since := fs.Duration("since", 0, "only events of the last duration, such as 2h")
	from := fs.String("from", "", "only events at or after this time (RFC 3339)")
	to := fs.String("to", "", "only events at or before this time (RFC 3339)")
	follow := fs.Bool("follow", false, "keep printing new events")
	newOnly := fs.Bool("new", false, "skip past events; print only new ones (implies --follow)")
	until := fs.String("until", "", "with --follow: exit after an event in this state (for scripts)")
	summary := fs.Bool("summary", false, "one line per job: image, host, OS, start, total time, outcome, error")
	asJSON := fs.Bool("json", false, "print JSON lines instead of a table")
	if err := fs.Parse(args); err != nil {
		return err
	}
	q := eventQuery{summary: *summary, asJSON: *asJSON, until: messages.State(*until)}
	q.q = client.Query{Host: *host, Job: *job, State: messages.State(*state), Follow: *follow || *newOnly, New: *newOnly}
	for _, s := range []string{*state, *until} {
		if s != "" && !messages.State(s).Valid() {
			return fmt.Errorf("%q is not a state; states: %v", s, messages.States)
		}
	}
	var err error
	switch {
	case *since != 0 && *from != "":
		return errors.New("give --since or --from, not both")
	case *since != 0:
		q.q.Since = time.Now().Add(-*since)
	case *from != "":
		if q.q.Since, err = time.Parse(time.RFC3339, *from); err != nil {
			return fmt.Errorf("--from: %w", err)
		}
	}
	if *to != "" {
		if q.q.Until, err = time.Parse(time.RFC3339, *to); err != nil {
			return fmt.Errorf("--to: %w", err)
		}
	}
	if q.summary && q.q.Follow {
		return errors.New("--summary prints once the replay ends: it does not go with --follow")
	}
	c, err := nf.client("stretchy-libvirt-worker client")
	if err != nil {
		return err
	}
	defer c.Close()

	var out eventWriter = newTable(os.Stdout)
	switch {
	case q.summary:
		out = newSummary(os.Stdout, q.asJSON)
	case q.asJSON:
		out = jsonLines{json.NewEncoder(os.Stdout)}
	}
	for ev, rerr := range c.Events(ctx, q.q) {
		var derr *client.DecodeError
		if errors.As(rerr, &derr) {
			fmt.Fprintf(os.Stderr, "skipping undecodable event %d: %v\n", derr.StreamSeq, derr.Err)
			continue
		}
		if rerr != nil {
			err = rerr
			break
		}
		if err = out.write(ev); err != nil {
			break
		}
		if q.until != "" && ev.State == q.until {
			break
		}
	}
	// An interrupt ends a follower quietly; a refused request does not
	// (it is a *client.PermissionError).
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	if ferr := out.flush(); err == nil {
		err = ferr
	}
	return err
}

type eventWriter interface {
	write(messages.Event) error
	flush() error
}

type jsonLines struct{ enc *json.Encoder }

func (j jsonLines) write(ev messages.Event) error { return j.enc.Encode(ev) }
func (jsonLines) flush() error                    { return nil }

// table prints events in fixed-width columns, one line at a time, so that
// a follower sees each event at once and the columns still line up.
type table struct {
	w      io.Writer
	header bool
}

func newTable(w io.Writer) *table { return &table{w: w} }

const tableRow = "%-23s  %-10s  %-24s  %3s  %-14s  %8s  %s\n"

func (t *table) write(ev messages.Event) error {
	if !t.header {
		if _, err := fmt.Fprintf(t.w, tableRow, "TIME", "HOST", "JOB", "SEQ", "STATE", "PHASE", "DETAIL"); err != nil {
			return err
		}
		t.header = true
	}
	detail := ev.Reason
	switch {
	case ev.Error != nil:
		detail = string(ev.Error.Code) + ": " + ev.Error.Message
	case ev.State == messages.StateAgentReady:
		detail = "os " + ev.OS
	case ev.State == messages.StateRunnerExited && ev.ExitCode != nil:
		detail = fmt.Sprintf("exit code %d", *ev.ExitCode)
		if ev.OutputWithheld {
			detail += ", output withheld"
		}
	case ev.State == messages.StateDropped && ev.Holder != "":
		detail = ev.Reason + ", held by " + ev.Holder
	}
	if !ev.HeldUntil.IsZero() {
		detail += "; machine held until " + ev.HeldUntil.Local().Format("2006-01-02 15:04:05")
	}
	if ev.Console != "" || ev.ConsoleWithheld {
		detail += "; console in the event (--json shows it)"
	}
	_, err := fmt.Fprintf(t.w, tableRow, ev.Time.Local().Format("2006-01-02 15:04:05.000"), ev.Host, ev.JobID,
		fmt.Sprint(ev.Seq), ev.State, phase(ev.PhaseMS), detail)
	return err
}

func (t *table) flush() error { return nil }

func phase(ms int64) string {
	if ms == 0 {
		return "-"
	}
	return (time.Duration(ms) * time.Millisecond).Round(time.Millisecond).String()
}

// JobSummary is one job's history in one line.
type JobSummary struct {
	JobID   string    `json:"job_id"`
	Image   string    `json:"image,omitempty"`
	Host    string    `json:"host"`
	OS      string    `json:"os,omitempty"`
	Start   time.Time `json:"start"`
	End     time.Time `json:"end"`
	Total   string    `json:"total"`
	Outcome string    `json:"outcome"`
	Exit    *int      `json:"exit_code,omitempty"`
	Error   string    `json:"error,omitempty"`
	// HeldUntil is set while the job's machine is held after its end;
	// Released once a released event said it was removed.
	HeldUntil time.Time `json:"held_until,omitzero"`
	Released  time.Time `json:"released,omitzero"`
}

// summary folds each job's events into its client.Status, as an
// orchestrator following the job sees it, and prints one line per job.
type summary struct {
	w      io.Writer
	asJSON bool
	jobs   map[string]*client.Status
}

func newSummary(w io.Writer, asJSON bool) *summary {
	return &summary{w: w, asJSON: asJSON, jobs: map[string]*client.Status{}}
}

func (s *summary) write(ev messages.Event) error {
	if ev.JobID == "" {
		return nil // a warm machine's own event: no job to summarise
	}
	st := s.jobs[ev.JobID]
	if st == nil {
		st = &client.Status{JobID: ev.JobID}
		s.jobs[ev.JobID] = st
	}
	st.Apply(ev)
	return nil
}

// summaries returns the jobs' lines, oldest job first.
func (s *summary) summaries() []*JobSummary {
	list := make([]*JobSummary, 0, len(s.jobs))
	for _, st := range s.jobs {
		j := &JobSummary{JobID: st.JobID, Image: st.Image, Host: st.Host, OS: st.OS, Start: st.Start, End: st.Last,
			Exit: st.ExitCode, Outcome: "in progress", Released: st.Released}
		switch {
		case st.Outcome != nil:
			j.Outcome = string(st.Outcome.State)
			if st.Released.IsZero() {
				j.HeldUntil = st.Outcome.HeldUntil
			}
		case st.State != "":
			j.Outcome = "in progress (" + string(st.State) + ")"
		}
		if st.Error != nil {
			j.Error = string(st.Error.Code) + ": " + st.Error.Message
		}
		j.Total = j.End.Sub(j.Start).Round(time.Millisecond).String()
		list = append(list, j)
	}
	sort.Slice(list, func(a, b int) bool { return list[a].Start.Before(list[b].Start) })
	return list
}

func (s *summary) flush() error {
	list := s.summaries()
	if s.asJSON {
		enc := json.NewEncoder(s.w)
		for _, j := range list {
			if err := enc.Encode(j); err != nil {
				return err
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(s.w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "JOB\tIMAGE\tHOST\tOS\tSTART\tTOTAL\tOUTCOME\tEXIT\tERROR")
	for _, j := range list {
		exit := "-"
		if j.Exit != nil {
			exit = fmt.Sprint(*j.Exit)
		}
		outcome := j.Outcome
		if !j.HeldUntil.IsZero() {
			outcome += ", held until " + j.HeldUntil.Local().Format("2006-01-02 15:04:05")
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", j.JobID, j.Image, j.Host, dash(j.OS),
			j.Start.Local().Format("2006-01-02 15:04:05"), j.Total, outcome, exit, dash(j.Error))
	}
	return tw.Flush()
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
