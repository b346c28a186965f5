// Package integration tests the worker end to end with real parts: an
// in-process NATS server with JetStream, the host's real libvirtd and real
// QEMU guests cloned from the tiny test image ("go tool task image" builds
// it). Tests skip when libvirtd is absent unless STRETCHY_REQUIRE_LIBVIRT=1,
// which CI sets so that a missing libvirtd fails instead.
package integration
