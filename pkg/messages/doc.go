// Package messages is the wire contract between an orchestrator and the
// libvirt worker: the provision and teardown requests the worker consumes,
// the lifecycle events it publishes, and the NATS subjects and stream names
// they travel on.
//
// Every message is a msgpack map with explicit field names. Decoders ignore
// unknown fields so that older workers accept messages from newer
// orchestrators; the "v" field carries the schema's major version, which
// changes only when a change would break an existing reader. docs/protocol.md
// documents the same contract for implementers in other languages, and the
// golden fixtures under testdata/ pin its encoding.
package messages
