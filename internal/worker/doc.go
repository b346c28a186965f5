// Package worker is the loop that feeds JetStream requests to the job
// lifecycle. It takes an operation slot only for work in hand (a pulled
// message, a teardown it decided on), never for a pull that waits, and
// gives freed slots to teardowns before provisions. It pulls a provision
// only when a slot is free and the host has room for a machine (no
// prefetch that could outlive its ack deadline), keeps pulling teardowns
// at capacity, lets a teardown of a machine being built end that build in
// the build's own slot, keeps long operations alive with progress
// heartbeats, tears down machines whose runner exited, that stopped by
// themselves or that passed their deadline, settles every message (ack,
// nak with delay, or terminate) in one place, and ends requests that ran
// out of deliveries (max-deliveries advisories) with a failed event.
//
// With a FleetConfig it is one host of a fleet: it pulls from the consumer
// of each image its libvirt carries (images found and lost while it runs),
// in turn, hands shared requests for images it lacks on to a host that
// has them, keeps its record in the host registry, and drains on request.
package worker
