package check

import (
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// History is everything one soak recorded: the fleet it ran, the jobs it
// submitted and every publish it made, every event the event stream
// stored, how workers settled requests, the faults it injected, what it
// sampled of each host's capacity, and what was left at the end. It is
// written as JSON (soak -history) so that Check can judge a run again.
type History struct {
	Seed  int64     `json:"seed"`
	Start time.Time `json:"start"`
	End   time.Time `json:"end"`
	// Commit is the revision the soak ran, as git names it at the start
	// (with " (with uncommitted changes)" when the tree differed).
	Commit string `json:"commit,omitempty"`
	Fleet  Fleet  `json:"fleet"`

	Jobs         []Job         `json:"jobs"`
	Requests     []Request     `json:"requests"`
	Events       []Event       `json:"events"`
	Settlements  []Settlement  `json:"settlements"`
	Terminations []Termination `json:"terminations"`
	Faults       []Fault       `json:"faults"`
	Samples      []Sample      `json:"samples"`
	Final        Final         `json:"final"`
}

// Fleet is how the soak's hosts were configured.
type Fleet struct {
	Hosts       []Host        `json:"hosts"`
	AckWait     time.Duration `json:"ack_wait"`
	MaxDeliver  int           `json:"max_deliver"`
	SyncSetting string        `json:"sync_interval"`
}

// Host is one worker's configuration.
type Host struct {
	ID          string   `json:"id"`
	Images      []string `json:"images"`
	Parallelism int      `json:"parallelism"`
	MaxVMs      int      `json:"max_vms"`
}

// Route is how a provision was addressed (docs/protocol.md 2.5).
type Route string

// Routes of a provision.
const (
	RouteShared Route = "shared"
	RouteImage  Route = "image"
	RoutePinned Route = "pinned"
)

// Kind is what the orchestrator asked of a job, and so what its outcome
// must be.
type Kind string

// Kinds of jobs.
const (
	// KindRun: a runner that exits by itself (with ExitCode): torn_down,
	// reason runner_exited (5.2 A).
	KindRun Kind = "run"
	// KindDeadline: a runner that outlives max_lifetime_s: failed with
	// deadline_exceeded (5.2 J).
	KindDeadline Kind = "deadline"
	// KindTeardown: ended by the orchestrator's teardown: torn_down,
	// reason requested (5.2 B, I).
	KindTeardown Kind = "teardown"
	// KindHang: a guest whose agent never answers: failed with
	// boot_timeout (5.2 E).
	KindHang Kind = "hang"
	// KindNoImage: an image no host carries. Shared or pinned: failed
	// with image_not_found (6.5); by image: no event, the request waits
	// in the stream (2.5).
	KindNoImage Kind = "no_image"
	// KindBad: a malformed or invalid request from the corpus
	// (pkg/messages/testdata/bad): its documented code (5.2 G).
	KindBad Kind = "bad"
)

// Job is one job the orchestrator submitted.
type Job struct {
	ID    string `json:"id"`
	Kind  Kind   `json:"kind"`
	Route Route  `json:"route"`
	Image string `json:"image,omitempty"`
	// Host is the host a pinned job was pinned to.
	Host string `json:"host,omitempty"`
	// Runner is the runner kind (forgejo, none).
	Runner string `json:"runner,omitempty"`
	// ExitCode is what a KindRun job's runner exits with.
	ExitCode int `json:"exit_code,omitempty"`
	// Duplicated: the provision was published again with another
	// Nats-Msg-Id while its runner ran (a repeated request, 5.2 Q).
	Duplicated bool `json:"duplicated,omitempty"`
	// Bad is the corpus entry of a KindBad job.
	Bad *Bad `json:"bad,omitempty"`
	// Submitted is when the first publish was made.
	Submitted time.Time `json:"submitted"`
}

// Bad is a corpus entry (pkg/messages/testdata/bad/manifest.json).
type Bad struct {
	File        string             `json:"file"`
	Subject     string             `json:"subject"`
	Code        messages.ErrorCode `json:"code"`
	FailedEvent bool               `json:"failed_event"`
}

// Request is one publish to the request stream by the orchestrator.
type Request struct {
	Time    time.Time `json:"time"`
	JobID   string    `json:"job_id"`
	Op      string    `json:"op"` // provision, teardown
	Subject string    `json:"subject"`
	MsgID   string    `json:"msg_id,omitempty"`
	// Stream is the stream sequence the PubAck named; Duplicate that the
	// server found the Nats-Msg-Id within its window and stored nothing.
	Stream    uint64 `json:"stream,omitempty"`
	Duplicate bool   `json:"duplicate,omitempty"`
	// Err is why the publish failed (nothing was stored as far as the
	// orchestrator knows; it tries again with the same Nats-Msg-Id).
	Err string `json:"err,omitempty"`
}

// Event is one message of the event stream as the server stored it.
type Event struct {
	Stream  uint64    `json:"stream"`
	Subject string    `json:"subject"`
	MsgID   string    `json:"msg_id"`
	Stored  time.Time `json:"stored"`
	// Err is set when the payload did not decode; Event is then empty.
	Err   string         `json:"err,omitempty"`
	Event messages.Event `json:"event"`
}

// Settlement is a worker's account of how it settled a delivery, from
// its log.
type Settlement struct {
	Time    time.Time `json:"time"`
	Host    string    `json:"host"`
	Op      string    `json:"op"`
	JobID   string    `json:"job_id"`
	Attempt int       `json:"attempt"`
	Outcome string    `json:"outcome"`
	Err     string    `json:"err,omitempty"`
}

// Termination is a MSG_TERMINATED advisory of the request stream: a
// worker terminated the message with a reason (6.1).
type Termination struct {
	Time     time.Time `json:"time"`
	Stream   uint64    `json:"stream"`
	Consumer string    `json:"consumer"`
	Reason   string    `json:"reason"`
}

// FaultKind names a fault the soak injects.
type FaultKind string

// Faults.
const (
	FaultWorkerKill     FaultKind = "worker_kill"     // kill -9, then start again
	FaultWorkerStop     FaultKind = "worker_stop"     // SIGSTOP past the claim TTL, then SIGCONT
	FaultNATSKill       FaultKind = "nats_kill"       // kill -9 of one node, then start again
	FaultNATSKillTwo    FaultKind = "nats_kill_two"   // two nodes at once
	FaultLibvirtRestart FaultKind = "libvirt_restart" // the host's libvirtd: every machine lost
	FaultGuestStop      FaultKind = "guest_stop"      // a machine shut off by itself
	FaultTeardownStorm  FaultKind = "teardown_storm"  // teardowns for every job a host serves, and some it does not
	FaultDrain          FaultKind = "drain"           // drain, then undrain
)

// Fault is one injected fault, from its start until it was healed.
type Fault struct {
	Kind   FaultKind `json:"kind"`
	Target string    `json:"target"` // host, node or job
	Start  time.Time `json:"start"`
	End    time.Time `json:"end"`
	Note   string    `json:"note,omitempty"`
}

// Sample is one look at a host's capacity: what its worker reports
// (/metrics) and what its libvirt holds.
type Sample struct {
	Time time.Time `json:"time"`
	Host string    `json:"host"`
	// OpsInFlight and Machines are the worker's gauges
	// stretchy_worker_operations_in_flight and machines_running; -1 when
	// the worker did not answer.
	OpsInFlight int `json:"ops_in_flight"`
	Machines    int `json:"machines"`
	// Domains counts the host's stretchy- domains in libvirt; -1 when
	// libvirtd did not answer.
	Domains int `json:"domains"`
}

// Final is what was left once the soak drained.
type Final struct {
	// Leftovers are the stretchy- domains and volumes of each host.
	Leftovers map[string][]string `json:"leftovers"`
	// Requests are the messages left in the request stream.
	Requests []LeftRequest `json:"requests"`
	// Err is set when the final state could not be read.
	Err string `json:"err,omitempty"`
}

// LeftRequest is a message still in the request stream at the end.
type LeftRequest struct {
	Stream  uint64 `json:"stream"`
	Subject string `json:"subject"`
	JobID   string `json:"job_id,omitempty"`
}

// Write writes h as indented JSON.
func (h *History) Write(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", " ")
	if err := enc.Encode(h); err != nil {
		return fmt.Errorf("write history: %w", err)
	}
	return nil
}

// Read reads a history Write wrote.
func Read(r io.Reader) (*History, error) {
	var h History
	if err := json.NewDecoder(r).Decode(&h); err != nil {
		return nil, fmt.Errorf("read history: %w", err)
	}
	return &h, nil
}
