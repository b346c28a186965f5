package messages

import (
	"errors"
	"fmt"
	"time"
)

// Control requests are core NATS requests (no stream: nothing to replay)
// that an operator's command sends to the worker of one host, which
// replies at once: hold or release a job's machine, read its console.
// The subject names the host; the operator finds it from the job's
// newest event.

// ControlOp is what a control request asks for.
type ControlOp string

// Control operations.
const (
	// ControlHold keeps the job's machine after its job ends, shut off,
	// for ForS seconds (capped by the host's --max-hold); on a machine
	// held already it sets the hold to end ForS seconds from now.
	ControlHold ControlOp = "hold"
	// ControlRelease removes a held machine now, or cancels the hold of a
	// machine whose job still runs.
	ControlRelease ControlOp = "release"
	// ControlConsole reads the end of the machine's console log.
	ControlConsole ControlOp = "console"
)

// MaxControlConsoleBytes bounds the console a control reply carries.
const MaxControlConsoleBytes = 256 << 10

// MaxHold bounds any hold: a host's --max-hold and a control request's
// for_s.
const MaxHold = 7 * 24 * time.Hour

// ControlSubject is the subject of control requests to host's worker.
func ControlSubject(host string) string { return subjectRoot + ".ctl." + host }

// ControlSubjects matches the control requests of every host.
const ControlSubjects = subjectRoot + ".ctl.*"

// Control is a control request.
type Control struct {
	V     int       `msgpack:"v"`
	Op    ControlOp `msgpack:"op"`
	JobID string    `msgpack:"job_id"`
	// ForS is the hold's length in seconds, for ControlHold; 0 means the
	// host's --max-hold.
	ForS int64 `msgpack:"for_s,omitempty"`
	// By says who asked (an operator's name), for the worker's log.
	By string `msgpack:"by,omitempty"`
	// Bytes bounds the console a ControlConsole reply carries; 0 means
	// MaxControlConsoleBytes, which also caps it.
	Bytes int `msgpack:"bytes,omitempty"`
}

// ControlReply is a worker's answer to a Control.
type ControlReply struct {
	V int `msgpack:"v"`
	// OK is false when the request could not be done; Error says why.
	OK    bool   `msgpack:"ok"`
	Error string `msgpack:"error,omitempty"`
	// Host is the replying worker's host id.
	Host string `msgpack:"host"`
	// Phase is the phase of the job's machine after the request: as the
	// worker's lifecycle names it ("ready", "held", "gone", ...).
	Phase string `msgpack:"phase,omitempty"`
	// HeldUntil is when the machine's hold ends, for a held machine.
	HeldUntil time.Time `msgpack:"held_until,omitempty"`
	// HoldFor is the hold a machine whose job still runs will get when
	// its job ends, in seconds.
	HoldForS int64 `msgpack:"hold_for_s,omitempty"`
	// Console is the end of the console log (ControlConsole), the job's
	// secrets removed; ConsoleWithheld when the worker cannot remove them
	// (it adopted the machine after a restart).
	Console         string `msgpack:"console,omitempty"`
	ConsoleWithheld bool   `msgpack:"console_withheld,omitempty"`
}

// ErrBadControl marks a control request that breaks a rule.
var ErrBadControl = errors.New("invalid control request")

// Validate checks a control request.
func (c *Control) Validate() error {
	var errs []error
	if c.V != SchemaVersion {
		errs = append(errs, fmt.Errorf("v %d: %w", c.V, ErrUnsupportedVersion))
	}
	switch c.Op {
	case ControlHold, ControlRelease, ControlConsole:
	default:
		errs = append(errs, fmt.Errorf("op %q: must be hold, release or console", c.Op))
	}
	if !ValidJobID(c.JobID) {
		errs = append(errs, fmt.Errorf("job_id %q: not a job id", c.JobID))
	}
	if maxS := int64(MaxHold / time.Second); c.ForS < 0 || c.ForS > maxS {
		errs = append(errs, fmt.Errorf("for_s %d: must be between 0 and %d", c.ForS, maxS))
	}
	if c.Bytes < 0 {
		errs = append(errs, fmt.Errorf("bytes %d: must not be negative", c.Bytes))
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w: %w", ErrBadControl, errors.Join(errs...))
	}
	return nil
}

// DecodeControl decodes a control request; it does not validate it.
func DecodeControl(data []byte) (Control, error) {
	var c Control
	err := unmarshal(data, &c)
	return c, err
}

// DecodeControlReply decodes a control reply.
func DecodeControlReply(data []byte) (ControlReply, error) {
	var r ControlReply
	err := unmarshal(data, &r)
	return r, err
}
