// Package lifecycle runs the life of every managed machine on one host:
// claim, clone, boot, guest agent, runner, watch, teardown, and the events
// that report each step.
//
// Each machine is owned by one actor goroutine (actor.go) that holds its
// record and an explicit Phase, takes commands from its inbox (provision,
// teardown, tick, adopt, ...) and runs one activity at a time (the build's
// step table, build.go; a probe of the runner; a teardown) without ever
// sharing its record. The Manager (manager.go) is a registry of actors plus
// the host's capacity; it never reaches into an actor.
//
// It knows nothing about NATS or libvirt: machines, guest agents, events,
// claims and operation slots reach it through the small interfaces declared
// here, so tests drive it with fakes and the worker with JetStream and
// go-libvirt.
package lifecycle
