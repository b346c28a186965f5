// Package bus is the worker's side of NATS JetStream: it creates the request
// and event streams and the worker's consumers idempotently, publishes
// lifecycle events durably and without duplicates, and keeps the worker's
// host record, drain state and claims. What orchestrators and operators
// call, submitting requests and reading events among it, is pkg/client.
package bus
