package soak

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"time"

	"github.com/stretchy-ci/libvirt-worker/test/soak/check"
)

// The soak's figures live between these markers in docs/reliability.md;
// WriteReport replaces what is between them.
const (
	reportBegin = "<!-- soak figures: written by go tool task soak:report, do not edit by hand -->"
	reportEnd   = "<!-- end of soak figures -->"
)

// WriteReport writes the figures of the soak h, judged r, into path
// between its markers (appended at the end when it has none).
func WriteReport(path string, h *check.History, r check.Report) error {
	doc, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("report: %w", err)
	}
	section := reportBegin + "\n" + Figures(h, r) + reportEnd
	s := string(doc)
	i, j := strings.Index(s, reportBegin), strings.Index(s, reportEnd)
	if i >= 0 && j > i {
		s = s[:i] + section + s[j+len(reportEnd):]
	} else {
		s = strings.TrimRight(s, "\n") + "\n\n" + section + "\n"
	}
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		return fmt.Errorf("report: %w", err)
	}
	return nil
}

// Figures is the Markdown account of a soak: what ran, what was injected,
// what the checker found.
func Figures(h *check.History, r check.Report) string {
	var b strings.Builder
	s := r.Summary
	commit := h.Commit
	if commit == "" {
		commit = "unknown"
	}
	load := "unknown"
	if l, err := os.ReadFile("/proc/loadavg"); err == nil {
		load = strings.Join(strings.Fields(string(l))[:3], " ")
	}
	fmt.Fprintf(&b, "Run of %s UTC at commit `%s`, seed %d (replay: `go tool task soak SOAK_SEED=%d SOAK_DURATION=%s`); load average at the end %s.\n\n",
		h.Start.UTC().Format("2006-01-02 15:04"), commit, h.Seed, h.Seed, submittedFor(h).Round(time.Second), load)
	fmt.Fprintln(&b, "| | |")
	fmt.Fprintln(&b, "|---|---|")
	fmt.Fprintf(&b, "| hosts | %s |\n", hostList(h.Fleet.Hosts))
	fmt.Fprintf(&b, "| NATS | 3 nodes, `sync_interval: %s`, every stream and bucket R3; ack wait %s (claims live %s), max deliver %d |\n",
		h.Fleet.SyncSetting, h.Fleet.AckWait, h.Fleet.AckWait/2, h.Fleet.MaxDeliver)
	fmt.Fprintf(&b, "| wall time | %s (jobs submitted for %s, then drained) |\n", h.End.Sub(h.Start).Round(time.Second), submittedFor(h).Round(time.Second))
	fmt.Fprintf(&b, "| jobs | %d |\n", s.Jobs)
	fmt.Fprintf(&b, "| requests published | %d |\n", s.Requests)
	fmt.Fprintf(&b, "| events stored | %d |\n", s.Events)
	fmt.Fprintf(&b, "| settlements (worker logs) | %d |\n", s.Settlements)
	fmt.Fprintf(&b, "| capacity samples | %d |\n", s.Samples)
	fmt.Fprintf(&b, "| faults | %d: %s |\n", len(h.Faults), faultCounts(s.Faults))
	fmt.Fprintf(&b, "| violations | %d |\n\n", len(r.Violations))
	fmt.Fprintln(&b, "| jobs by kind and route | n |")
	fmt.Fprintln(&b, "|---|---|")
	for _, k := range sortedKeys(s.JobsByKind) {
		fmt.Fprintf(&b, "| %s | %d |\n", k, s.JobsByKind[k])
	}
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "| outcome (terminal event) | n |")
	fmt.Fprintln(&b, "|---|---|")
	for _, k := range sortedKeys(s.Outcomes) {
		fmt.Fprintf(&b, "| %s | %d |\n", k, s.Outcomes[k])
	}
	if len(s.Explained) > 0 {
		fmt.Fprintln(&b)
		fmt.Fprintln(&b, "| outcome other than the kind's, and what explains it | n |")
		fmt.Fprintln(&b, "|---|---|")
		for _, k := range sortedKeys(s.Explained) {
			fmt.Fprintf(&b, "| %s | %d |\n", k, s.Explained[k])
		}
	}
	fmt.Fprintln(&b)
	fmt.Fprintln(&b, "| host | peak operations in flight | peak machines (worker) | peak stretchy- domains (libvirt) |")
	fmt.Fprintln(&b, "|---|---|---|---|")
	for _, hst := range h.Fleet.Hosts {
		p := s.Peak[hst.ID]
		fmt.Fprintf(&b, "| %s | %d (of %d) | %d (of %d) | %d |\n", hst.ID, p.OpsInFlight, hst.Parallelism, p.Machines, hst.MaxVMs, p.Domains)
	}
	if len(r.Violations) > 0 {
		fmt.Fprintln(&b)
		fmt.Fprintln(&b, "Violations:")
		fmt.Fprintln(&b)
		for _, v := range r.Violations {
			fmt.Fprintf(&b, "- %s (%s) %s %s: %s\n", v.Invariant, v.Section, v.JobID, v.Host, v.Detail)
		}
	}
	return b.String()
}

// submittedFor is how long jobs were submitted: first to last.
func submittedFor(h *check.History) time.Duration {
	var first, last time.Time
	for _, j := range h.Jobs {
		if first.IsZero() || j.Submitted.Before(first) {
			first = j.Submitted
		}
		if j.Submitted.After(last) {
			last = j.Submitted
		}
	}
	return last.Sub(first)
}

func faultCounts(m map[check.FaultKind]int) string {
	var parts []string
	for _, k := range AllFaults {
		if n, ok := m[k]; ok && !containsPrefix(parts, string(k)+" ") {
			parts = append(parts, fmt.Sprintf("%s %d", k, n))
		}
	}
	return strings.Join(parts, ", ")
}

func containsPrefix(s []string, p string) bool {
	for _, x := range s {
		if strings.HasPrefix(x, p) {
			return true
		}
	}
	return false
}

func sortedKeys(m map[string]int) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// Revision names the checkout's commit, as the figures quote it: taken
// at the start of a run, so that a commit made while it runs is not
// taken for the one that ran.
func Revision() string {
	out, err := exec.Command("git", "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return ""
	}
	commit := strings.TrimSpace(string(out))
	if out, err := exec.Command("git", "status", "--porcelain", "--untracked-files=no").Output(); err == nil && len(bytes.TrimSpace(out)) > 0 {
		commit += " (with uncommitted changes)"
	}
	return commit
}
