// Package client is the Go library for orchestrators and operators of the
// Stretchy libvirt workers: it submits provisions, follows jobs to their
// outcome, tears them down, replays the event history, reads the host
// registry, drains hosts and holds, releases and reads the console of a
// job's machine, speaking docs/protocol.md so that its callers need not.
// cmd/worker's client commands (submit, events, hosts, drain, undrain,
// hold, release, console) are written with it alone.
//
// # Guarantees
//
// Stability: the API of this package is stable within the module's major
// version. This version writes and reads schema v1 of the protocol
// (SchemaVersion, docs/protocol.md 10); optional fields, states, reasons
// and error codes that the protocol adds within v1 come as new fields and
// values, never as changes to what exists. A schema v2 would come with a
// new major version of the package.
//
// Ordering: the events of a job are yielded in the order the event stream
// stored them, which is their seq order across hosts (protocol 5.3); a
// replay over many jobs yields them in stream order.
//
// Delivery: events are durable (the event stream keeps them 30 days by
// default) and each iterator yields every event it selects once, with no
// gap, across reconnects of the connection. Across iterators delivery is
// at least once: a new Follow, Wait or replay starts again from its start
// (the job's first event, Query.Since), so a caller that restarts sees
// again what it saw before. Apply the events to a Status to get the job's
// state from them; it is the same however often they are read.
//
// Restarts: Wait reads the job's history from the stream, so it returns
// the job's single outcome whenever it is called and across restarts of
// the worker, whose successor adopts the job's machine and ends it once
// (protocol 6.4), and of the NATS servers, for as long as the connection
// reconnects (nats.go gives up after 60 attempts 2 s apart unless
// WithNATSOptions says otherwise; then ErrUnreachable, and a new Wait on a
// new connection returns the outcome from the history).
//
// Requests: Submit and Teardown publish with the Nats-Msg-Id the protocol
// requires (provision:<job_id>, teardown:<host>:<job_id>), so a retry within the
// streams' two-minute duplicate window is stored once; beyond it the
// worker is idempotent by job id. A job id is single-use.
//
// Errors: sentinels (ErrUnreachable, ErrNotSetUp, ErrImageNotCarried,
// ErrNoSealKey, ErrNoHost, ErrHostDown, ErrConsoleWithheld) for the
// branches a caller takes, *JobError with the protocol's error code for a
// job that failed, *ControlError for a refused control request,
// *PermissionError for a subject the NATS user may not use, *DecodeError
// for an event that does not decode, *messages.ValidationError for an
// invalid request.
//
// Roles: a client is an Orchestrator's (the default) or an Operator's
// (WithRole), which picks its inbox prefix; OrchestratorPermissions and
// OperatorPermissions list what each role's NATS user needs
// (docs/security.md 2).
package client

import "github.com/stretchy-ci/libvirt-worker/pkg/messages"

// SchemaVersion is the protocol's schema major version this package
// writes and reads.
const SchemaVersion = messages.SchemaVersion
