// Package check judges a soak's whole recorded History against the
// promises of docs/protocol.md: one terminal outcome per job, the one its
// request, its teardowns or an injected fault explain; no two hosts
// running a job at once; seq without gaps; no event after the end; the
// state diagram; Nats-Msg-Ids; nothing left on any host or in the request
// stream; capacity and parallelism bounds. It knows nothing of how the
// history was made, so hand-made histories test it (check_test.go).
package check
