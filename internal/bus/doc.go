// Package bus is the worker's side of NATS JetStream: it creates the request
// and event streams and the worker's consumers idempotently, publishes
// lifecycle events durably and without duplicates, and offers the small
// client calls the command line uses to submit requests and read events.
package bus
