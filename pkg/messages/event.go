package messages

import "time"

// State is a step of a job's lifecycle as reported in events.
type State string

// Lifecycle states in the order a successful job passes them. TornDown and
// Failed are terminal: a job's last event has one of them.
const (
	StateAccepted      State = "accepted"
	StateCloning       State = "cloning"
	StateCloned        State = "cloned"
	StateBooting       State = "booting"
	StateRunning       State = "running"
	StateAgentReady    State = "agent_ready"
	StateRunnerStarted State = "runner_started"
	StateRunnerExited  State = "runner_exited"
	StateTearingDown   State = "tearing_down"
	StateTornDown      State = "torn_down"
	StateFailed        State = "failed"
	// StateDropped is not a step of the job: it says that the host in the
	// event let go of a delivery of the job's provision request because
	// another host holds the job's claim (Event.Holder). The claim
	// holder's events carry the job on; a dropped event never ends a job.
	StateDropped State = "dropped"
	// StateReleased is not a step of the job either: it says that the
	// machine a job's end kept (Event.HeldUntil on its terminal event)
	// was removed, when its hold ended (reason hold_expired) or an
	// operator released it (reason released).
	StateReleased State = "released"
)

// States lists every state in lifecycle order.
var States = []State{
	StateAccepted, StateCloning, StateCloned, StateBooting, StateRunning,
	StateAgentReady, StateRunnerStarted, StateRunnerExited,
	StateTearingDown, StateTornDown, StateFailed, StateDropped, StateReleased,
}

// Terminal reports whether no further event follows s for the same job.
func (s State) Terminal() bool { return s == StateTornDown || s == StateFailed }

// Valid reports whether s is a known state.
func (s State) Valid() bool {
	for _, k := range States {
		if s == k {
			return true
		}
	}
	return false
}

// Event reports one step of a job's lifecycle. Events are published on
// EventSubject and kept in EventsStream.
type Event struct {
	V     int    `msgpack:"v"`
	JobID string `msgpack:"job_id"`
	Host  string `msgpack:"host"`
	Image string `msgpack:"image,omitempty"`
	// Domain is the libvirt domain of the job's machine, once known.
	Domain string    `msgpack:"domain,omitempty"`
	State  State     `msgpack:"state"`
	Time   time.Time `msgpack:"time"`
	// Seq numbers the events of one job from 1, in the order they happened.
	Seq uint64 `msgpack:"seq"`
	// Attempt is the delivery count of the request message that caused the
	// event; it is above 1 when a request was redelivered.
	Attempt int `msgpack:"attempt"`
	// PhaseMS is how long, in milliseconds, the phase that this event ends
	// took: for cloned the cloning, for running the boot.
	PhaseMS int64 `msgpack:"phase_ms"`
	// Reason says why a teardown began (tearing_down) or what triggered the
	// event, as a short machine-readable word.
	Reason string `msgpack:"reason,omitempty"`
	// OS is the guest's operating system family (linux, freebsd, darwin,
	// windows), set from agent_ready on.
	OS string `msgpack:"os,omitempty"`
	// RunnerPID is the guest-agent process id of the runner, set on
	// runner_started; a restarted worker uses it to keep watching.
	RunnerPID int `msgpack:"runner_pid,omitempty"`
	// ExitCode is the runner's exit status, set on runner_exited.
	ExitCode *int `msgpack:"exit_code,omitempty"`
	// Output is the end of what the runner printed (at most 2 KiB, secrets
	// removed), set on runner_exited when there was any.
	Output string `msgpack:"output,omitempty"`
	// OutputWithheld is set on runner_exited when the worker does not
	// publish the runner's output because it cannot scrub the job's
	// secrets from it: it adopted the machine after a restart, and
	// secrets are never kept beyond the worker process that received them.
	OutputWithheld bool `msgpack:"output_withheld,omitempty"`
	// Console is the end of what the machine wrote to its serial console
	// (at most MaxConsoleLines lines and MaxConsoleBytes bytes, the job's
	// secrets removed), set on failed events of a job whose machine was
	// booted, when the console wrote anything.
	Console string `msgpack:"console,omitempty"`
	// ConsoleWithheld is set on failed events when the worker does not
	// publish the console because it cannot scrub the job's secrets from
	// it (it adopted the machine after a restart), as OutputWithheld.
	ConsoleWithheld bool `msgpack:"console_withheld,omitempty"`
	// HeldUntil is set on the terminal event of a job whose machine is
	// kept, shut off, for debugging instead of being removed: until when.
	// A released event follows once it is removed.
	HeldUntil time.Time `msgpack:"held_until,omitempty"`
	// Holder is the host that holds the job's claim, set on dropped events
	// when it is known.
	Holder string `msgpack:"holder,omitempty"`
	// Machine is the key of a warm machine (ValidWarmKey): on the events
	// of its preparation and retirement, which have no JobID, and on the
	// events of the job that bound it.
	Machine string `msgpack:"machine,omitempty"`
	// Warm is set on every event of a job served by a warm machine, one
	// booted before the job existed.
	Warm bool `msgpack:"warm,omitempty"`
	// Error is set on failed events and on torn_down events that did not
	// find a machine.
	Error *Error `msgpack:"error,omitempty"`
}

// Bounds of Event.Console. A Linux kernel's panic takes 30 to 45 lines
// of about 60 bytes after the line that says why; the bounds keep a few
// lines before it.
const (
	MaxConsoleBytes = 4 << 10
	MaxConsoleLines = 60
)

// Error is a machine-readable code with a message for people.
type Error struct {
	Code    ErrorCode `msgpack:"code"`
	Message string    `msgpack:"message"`
}

// ErrorCode classifies failures for machines reading events.
type ErrorCode string

// Error codes carried in events.
const (
	CodeBadMessage         ErrorCode = "bad_message"
	CodeInvalidRequest     ErrorCode = "invalid_request"
	CodeUnsupportedVersion ErrorCode = "unsupported_version"
	CodeImageNotFound      ErrorCode = "image_not_found"
	CodeImageInvalid       ErrorCode = "image_invalid"
	CodeCloneFailed        ErrorCode = "clone_failed"
	CodeBootFailed         ErrorCode = "boot_failed"
	CodeBootTimeout        ErrorCode = "boot_timeout"
	CodeDeadlineExceeded   ErrorCode = "deadline_exceeded"
	CodeUnknownJob         ErrorCode = "unknown_job"
	CodeTeardownFailed     ErrorCode = "teardown_failed"
	CodeShutdown           ErrorCode = "shutdown"
	CodeMachineStopped     ErrorCode = "machine_stopped"
	CodeAgentFailed        ErrorCode = "agent_failed"
	CodeRunnerUnsupported  ErrorCode = "runner_unsupported"
	CodeRunnerStartFailed  ErrorCode = "runner_start_failed"
	CodeInternal           ErrorCode = "internal"
	// CodeMaxDeliveries means the request was delivered max_deliver
	// times without being settled (its worker died or lost its connection
	// each time) and will not be delivered again.
	CodeMaxDeliveries ErrorCode = "max_deliveries"
	// CodeInsufficientStorage means a pool of the image had less free
	// space than the host's minimum on every delivery of a request pinned
	// to the host; nothing was cloned.
	CodeInsufficientStorage ErrorCode = "insufficient_storage"
	// CodeResourcesExceeded means the machine's size (the request's vcpus
	// or memory_mib, else the image's) is beyond the host's bounds on one
	// machine, or beyond everything the host may ever run at once;
	// nothing was built.
	CodeResourcesExceeded ErrorCode = "resources_exceeded"
	// CodeSecretNotSealed means the request carried its runner secret in
	// the clear to a worker started with --require-sealed-secrets;
	// nothing was built.
	CodeSecretNotSealed ErrorCode = "secret_not_sealed"
	// CodeUnknownSealKey means the runner secret was sealed to a key this
	// worker does not hold (runner.sealed.key_id); nothing was built.
	CodeUnknownSealKey ErrorCode = "unknown_seal_key"
	// CodeSealedSecretInvalid means the sealed runner secret could not be
	// opened with the key it names (a corrupt or forged box, or one
	// sealed to another key of that id), or what it holds is not a
	// payload for this job; nothing was built.
	CodeSealedSecretInvalid ErrorCode = "sealed_secret_invalid"
)

// Reasons carried in events: why a teardown began, or what the worker
// itself noticed.
const (
	ReasonRequested    = "requested"
	ReasonDeadline     = "deadline"
	ReasonReconcile    = "reconcile"
	ReasonRunnerExited = "runner_exited"
	ReasonStopped      = "machine_stopped"
	ReasonRunnerLost   = "runner_lost"
	// ReasonClaimLost: this host's claim on the job lapsed (the host
	// stalled for longer than the claim's TTL) and another host took the
	// job, or it could not be renewed; on dropped and tearing_down events.
	ReasonClaimLost = "claim_lost"
	// ReasonClaimedElsewhere: a delivery found the job claimed by another
	// host; on dropped events.
	ReasonClaimedElsewhere = "claimed_elsewhere"
	// Reasons a warm machine no job bound is retired (tearing_down and
	// torn_down of the machine): it reached the pool's max_ready_age,
	// its image changed, the host drains or stops, or a cold build needed
	// its room under --max-vms.
	ReasonMaxReadyAge  = "max_ready_age"
	ReasonImageChanged = "image_changed"
	ReasonDraining     = "draining"
	ReasonShutdown     = "shutdown"
	ReasonCapacity     = "capacity"
	// ReasonBindFailed: a job took the idle warm machine and libvirt
	// refused to record the job in its metadata, so what the machine is
	// is not known; it is retired, and the job's request comes again.
	ReasonBindFailed = "bind_failed"
	// Reasons a held machine is removed (released): its hold ended, or
	// an operator released it (worker release).
	ReasonHoldExpired = "hold_expired"
	ReasonReleased    = "released"
)

// Claim is the value of a job's key in ClaimsBucket: the host that serves
// the job. A worker creates it with compare-and-set before it clones and
// renews it (again by revision) while the job's machine exists; the
// bucket's TTL removes the claims of hosts that stopped renewing.
type Claim struct {
	V    int    `msgpack:"v"`
	Host string `msgpack:"host"`
	// Request is the stream sequence of the provision request the host
	// serves (0 for a machine adopted after a restart).
	Request uint64    `msgpack:"request"`
	Since   time.Time `msgpack:"since"`
}
