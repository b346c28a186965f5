package check

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"time"
)

// Print writes the report: the summary, then each violation with the
// whole history of its job (requests, events, settlements) and the faults
// around it, so that a failing run can be understood from its log.
func (r Report) Print(w io.Writer, h *History) {
	s := r.Summary
	fmt.Fprintf(w, "soak: seed %d, %s, %d jobs, %d requests published, %d events, %d settlements, %d capacity samples\n",
		h.Seed, h.End.Sub(h.Start).Round(time.Second), s.Jobs, s.Requests, s.Events, s.Settlements, s.Samples)
	fmt.Fprintf(w, "jobs: %s\n", counts(s.JobsByKind))
	fmt.Fprintf(w, "outcomes: %s\n", counts(s.Outcomes))
	faults := map[string]int{}
	for k, n := range s.Faults {
		faults[string(k)] = n
	}
	fmt.Fprintf(w, "faults: %s\n", counts(faults))
	if len(s.Explained) > 0 {
		fmt.Fprintf(w, "outcomes explained by a teardown or a fault: %s\n", counts(s.Explained))
	}
	hosts := make([]string, 0, len(s.Peak))
	for h := range s.Peak {
		hosts = append(hosts, h)
	}
	sort.Strings(hosts)
	for _, host := range hosts {
		p := s.Peak[host]
		fmt.Fprintf(w, "peak on %s: %d operations in flight, %d machines (worker), %d domains (libvirt)\n", host, p.OpsInFlight, p.Machines, p.Domains)
	}
	fmt.Fprintf(w, "violations: %d\n", len(r.Violations))
	shown := map[string]bool{}
	for i, v := range r.Violations {
		fmt.Fprintf(w, "\nVIOLATION %d: %s (docs/protocol.md %s)", i+1, v.Invariant, v.Section)
		if v.JobID != "" {
			fmt.Fprintf(w, ", job %s", v.JobID)
		}
		if v.Host != "" {
			fmt.Fprintf(w, ", host %s", v.Host)
		}
		fmt.Fprintf(w, ":\n  %s\n", v.Detail)
		if v.JobID == "" || shown[v.JobID] {
			continue
		}
		shown[v.JobID] = true
		printJob(w, h, v.JobID)
	}
}

func counts(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// line is one entry of a job's history, in time order.
type line struct {
	at   time.Time
	text string
}

// PrintJob writes the whole history of job id and the faults around it.
func PrintJob(w io.Writer, h *History, id string) { printJob(w, h, id) }

func printJob(w io.Writer, h *History, id string) {
	var lines []line
	var first, last time.Time
	seen := func(t time.Time) {
		if first.IsZero() || t.Before(first) {
			first = t
		}
		if t.After(last) {
			last = t
		}
	}
	for _, j := range h.Jobs {
		if j.ID == id {
			lines = append(lines, line{j.Submitted, fmt.Sprintf("job: kind %s, route %s, image %q, host %q, runner %s, exit %d, duplicated %v", j.Kind, j.Route, j.Image, j.Host, j.Runner, j.ExitCode, j.Duplicated)})
			seen(j.Submitted)
		}
	}
	for _, r := range h.Requests {
		if r.JobID != id {
			continue
		}
		t := fmt.Sprintf("publish %s on %s, Nats-Msg-Id %q: stream %d", r.Op, r.Subject, r.MsgID, r.Stream)
		if r.Duplicate {
			t += " (duplicate)"
		}
		if r.Err != "" {
			t += " error: " + r.Err
		}
		lines = append(lines, line{r.Time, t})
		seen(r.Time)
	}
	for _, e := range h.Events {
		if e.Event.JobID != id {
			continue
		}
		ev := e.Event
		t := fmt.Sprintf("event stream %d seq %d %s host %s attempt %d", e.Stream, ev.Seq, ev.State, ev.Host, ev.Attempt)
		if ev.Reason != "" {
			t += " reason " + ev.Reason
		}
		if ev.Error != nil {
			t += fmt.Sprintf(" error %s: %s", ev.Error.Code, ev.Error.Message)
		}
		if ev.Holder != "" {
			t += " holder " + ev.Holder
		}
		if ev.ExitCode != nil {
			t += fmt.Sprintf(" exit_code %d", *ev.ExitCode)
		}
		t += fmt.Sprintf(" msg_id %q (worker time %s)", e.MsgID, ev.Time.Format("15:04:05.000"))
		lines = append(lines, line{e.Stored, t})
		seen(e.Stored)
	}
	for _, s := range h.Settlements {
		if s.JobID != id {
			continue
		}
		t := fmt.Sprintf("settled by %s: %s attempt %d %s", s.Host, s.Op, s.Attempt, s.Outcome)
		if s.Err != "" {
			t += ": " + s.Err
		}
		lines = append(lines, line{s.Time, t})
		seen(s.Time)
	}
	for _, f := range h.Faults {
		if f.End.Add(30*time.Second).Before(first) || f.Start.After(last.Add(30*time.Second)) {
			continue
		}
		lines = append(lines, line{f.Start, fmt.Sprintf("fault %s on %s until %s %s", f.Kind, f.Target, f.End.Format("15:04:05.000"), f.Note)})
	}
	sort.SliceStable(lines, func(i, j int) bool { return lines[i].at.Before(lines[j].at) })
	fmt.Fprintf(w, "  history of job %s and the faults around it:\n", id)
	for _, l := range lines {
		fmt.Fprintf(w, "    %s %s\n", l.at.Format("15:04:05.000"), l.text)
	}
}
