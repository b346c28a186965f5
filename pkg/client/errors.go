package client

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Sentinels for the branches a caller takes. Every error of this package
// wraps at most one of them, with what failed; test with errors.Is.
var (
	// ErrUnreachable: NATS did not answer: no server could be connected
	// to, the connection closed, or a request timed out (also when the
	// caller's context ended while waiting for the answer).
	ErrUnreachable = errors.New("nats unreachable")
	// ErrNotSetUp: the provisioner's streams or buckets do not exist on
	// this NATS deployment: no worker has started against it yet.
	ErrNotSetUp = errors.New("the libvirt provisioner's streams are not set up (is a worker running?)")
	// ErrImageNotCarried: with CheckCarriers, the host registry lists no
	// active host that carries the request's image (or not the pinned
	// host); nothing was published.
	ErrImageNotCarried = errors.New("image not carried by any active host")
	// ErrNoSealKey: with SealAlways, no sealing key is listed by every
	// host that may serve the request; nothing was published.
	ErrNoSealKey = errors.New("no sealing key common to the hosts that may serve the request")
	// ErrNoHost: the job has no event yet, so no host is known to serve
	// it (docs/protocol.md 2.5); name one with AtHost, or wait for the
	// job's first event (Job.Follow).
	ErrNoHost = errors.New("no host serves the job yet")
	// ErrHostDown: no worker answers the control requests of the job's
	// host: it is not running, or predates control requests.
	ErrHostDown = errors.New("the host's worker does not answer")
	// ErrConsoleWithheld: the host withholds the console of the job's
	// machine, as its worker restarted since the job began and cannot
	// scrub the job's secrets from it (docs/protocol.md 7.7).
	ErrConsoleWithheld = errors.New("console withheld")
)

// JobError is the outcome of a job that ended failed: the host that
// reported it and the protocol's error code (docs/protocol.md 5.5). Wait
// returns it with the outcome. Readers treat an unknown code as a failure
// of the job.
type JobError struct {
	JobID   string
	Host    string
	Code    messages.ErrorCode
	Message string
}

func (e *JobError) Error() string {
	return fmt.Sprintf("job %s failed on host %s: %s: %s", e.JobID, e.Host, e.Code, e.Message)
}

// ControlError is a control request that the job's host refused: what its
// worker replied (the job has no machine there, a hold beyond the host's
// cap, ...).
type ControlError struct {
	Host    string
	Message string
}

func (e *ControlError) Error() string { return fmt.Sprintf("host %s: %s", e.Host, e.Message) }

// DecodeError is an event that could not be decoded, yielded by the event
// iterators in its place; they go on with the next event.
type DecodeError struct {
	// StreamSeq is the event's sequence in the event stream.
	StreamSeq uint64
	Err       error
}

func (e *DecodeError) Error() string {
	return fmt.Sprintf("event %d: %v", e.StreamSeq, e.Err)
}

func (e *DecodeError) Unwrap() error { return e.Err }

// PermissionError is the server's refusal of a publish or subscription
// the connection's NATS user is not allowed (docs/security.md lists what
// each role needs). It matches nats.ErrPermissionViolation.
type PermissionError struct {
	// Op is "publish to" or "subscribe to".
	Op      string
	Subject string
}

func (e *PermissionError) Error() string {
	return fmt.Sprintf("%v: the NATS user may not %s %q (docs/security.md lists what it needs)", nats.ErrPermissionViolation, e.Op, e.Subject)
}

func (e *PermissionError) Unwrap() error { return nats.ErrPermissionViolation }

var permissionRE = regexp.MustCompile(`(?i)permissions violation for (publish|subscription) to "([^"]*)"`)

// PermissionViolation turns the permissions violation that nats.go reports
// asynchronously, `Permissions Violation for Publish to "subject"`, into a
// *PermissionError naming what the user lacks; other errors are returned
// unchanged. Connections made by Connect do this themselves; one passed to
// New may call it from its own error handler.
func PermissionViolation(err error) error {
	if err == nil {
		return nil
	}
	m := permissionRE.FindStringSubmatch(err.Error())
	if m == nil {
		return err
	}
	op := "publish to"
	if strings.EqualFold(m[1], "subscription") {
		op = "subscribe to"
	}
	return &PermissionError{Op: op, Subject: m[2]}
}

// unanswered reports whether err says that the servers did not answer in
// time or that there is no connection, which a retry may change.
func unanswered(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoServers) || errors.Is(err, nats.ErrConnectionClosed) ||
		errors.Is(err, nats.ErrDisconnected) || errors.Is(err, nats.ErrConnectionReconnecting) ||
		errors.Is(err, jetstream.ErrConnectionClosed) || errors.Is(err, nats.ErrConnectionDraining)
}

// jsErrCodeDuplicateInProcess is the JetStream error a replicated stream
// answers a publish with while an earlier publish with the same
// Nats-Msg-Id is still being stored (JSStreamDuplicateMessageConflict;
// nats.go names no constant for it).
const jsErrCodeDuplicateInProcess jetstream.ErrorCode = 10158

// inProcess reports whether err says that an earlier publish of the same
// Nats-Msg-Id is being stored: it may yet be stored or fail, and a retry
// finds out which.
func inProcess(err error) bool {
	var aerr *jetstream.APIError
	return errors.As(err, &aerr) && aerr.ErrorCode == jsErrCodeDuplicateInProcess
}

// notSetUp reports whether err says that a stream or bucket of the
// provisioner does not exist.
func notSetUp(err error) bool {
	return errors.Is(err, jetstream.ErrStreamNotFound) || errors.Is(err, jetstream.ErrBucketNotFound) ||
		errors.Is(err, jetstream.ErrNoStreamResponse)
}
