package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// TestSummaryIgnoresDropped: a host that let go of a job (dropped, from a
// stale delivery arriving late) changes neither the job's host nor its
// outcome in the summary, and the table names the holder.
func TestSummaryIgnoresDropped(t *testing.T) {
	t0 := time.Date(2026, 11, 27, 8, 0, 0, 0, time.UTC)
	evs := []messages.Event{
		{JobID: "j1", Host: "a", State: messages.StateAccepted, Time: t0, Seq: 1},
		{JobID: "j1", Host: "b", State: messages.StateAccepted, Time: t0.Add(6 * time.Second), Seq: 2, Attempt: 2},
		{JobID: "j1", Host: "b", State: messages.StateAgentReady, Time: t0.Add(9 * time.Second), Seq: 3, Attempt: 2, OS: "linux"},
		{JobID: "j1", Host: "b", State: messages.StateTearingDown, Time: t0.Add(20 * time.Second), Seq: 4},
		{JobID: "j1", Host: "b", State: messages.StateTornDown, Time: t0.Add(21 * time.Second), Seq: 5},
		{JobID: "j1", Host: "a", State: messages.StateDropped, Time: t0.Add(22 * time.Second), Seq: 2,
			Reason: messages.ReasonClaimLost, Holder: "b"},
	}
	var out bytes.Buffer
	s := newSummary(&out, false)
	tab := newTable(&out)
	for _, ev := range evs {
		if err := s.write(ev); err != nil {
			t.Fatal(err)
		}
	}
	j := s.summaries()[0]
	if j.Host != "b" || j.Outcome != string(messages.StateTornDown) || j.End != t0.Add(21*time.Second) {
		t.Fatalf("summary %+v, want host b, torn_down, ended at the torn_down", j)
	}
	if err := tab.write(evs[len(evs)-1]); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "claim_lost, held by b") {
		t.Fatalf("table row %q does not name the holder", out.String())
	}
}

// TestSummaryPassesOverMisaddressedTeardown: a teardown sent to a host
// that does not serve the job is answered torn_down with unknown_job by
// that host and leaves the machine alone (docs/protocol.md 2.5); the
// summary keeps the job on its host, in progress.
func TestSummaryPassesOverMisaddressedTeardown(t *testing.T) {
	t0 := time.Date(2026, 11, 27, 8, 0, 0, 0, time.UTC)
	var out bytes.Buffer
	s := newSummary(&out, true)
	for _, ev := range []messages.Event{
		{JobID: "j2", Host: "a", State: messages.StateAccepted, Time: t0, Seq: 1, Attempt: 1},
		{JobID: "j2", Host: "a", State: messages.StateAgentReady, Time: t0.Add(9 * time.Second), Seq: 2, Attempt: 1, OS: "linux"},
		{JobID: "j2", Host: "b", State: messages.StateTornDown, Time: t0.Add(20 * time.Second), Seq: 3, Attempt: 1,
			Reason: messages.ReasonRequested, Error: &messages.Error{Code: messages.CodeUnknownJob, Message: "no machine"}},
	} {
		if err := s.write(ev); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.flush(); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"host":"a"`, `"outcome":"in progress (agent_ready)"`} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("summary %s does not say %s", out.String(), want)
		}
	}
	if strings.Contains(out.String(), "unknown_job") {
		t.Fatalf("summary %s takes the other host's answer for the job's end", out.String())
	}
}
