// Package worker is the loop that feeds JetStream requests to the job
// lifecycle: it pulls a request only when an operation slot is free (no
// prefetch that could outlive its ack deadline), stops taking provisions
// while the host is at capacity but keeps taking teardowns, keeps long
// operations alive with progress heartbeats, tears down machines whose
// runner exited, that stopped by themselves or that passed their deadline,
// settles every message (ack, nak with delay, or terminate) in one place,
// and ends requests that ran out of deliveries (max-deliveries advisories)
// with a failed event.
package worker
