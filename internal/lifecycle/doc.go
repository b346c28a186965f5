// Package lifecycle is the state machine of one job's machine: accepted,
// cloning, cloned, booting, running, tearing down, torn down or failed. It
// decides which event to publish at each step, rolls back half-built
// machines, and keeps the per-host bookkeeping the worker needs (which jobs
// have machines, how many, which are past their deadline).
//
// It knows nothing about NATS or libvirt: machines and events reach it
// through the small interfaces declared here, so tests drive it with fakes
// and the worker drives it with JetStream and go-libvirt.
package lifecycle
