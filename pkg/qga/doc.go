// Package qga talks to the QEMU guest agent (qemu-ga) inside a CI machine,
// through libvirt's agent passthrough, which is the worker's only channel into
// a guest: no network, no SSH.
//
// An Agent waits for the agent of a freshly booted domain to answer, reads
// what the guest is (guest-info, guest-get-osinfo) and starts programs in it
// (guest-exec), whose exit the caller notices by polling guest-exec-status.
// go-libvirt calls take no context, and libvirt's own agent timeout bounds
// only the wait for the guest, so an Agent given a Caller (the worker's
// *provision.Link) makes every call through it, with a deadline of the
// agent timeout plus a margin: a call that libvirtd or the connection never
// answers fails with the Caller's timeout error and the connection is made
// again. The context passed in is checked between calls and caps each
// call's timeout. Input handed to a program may be a secret: it never
// appears in an error.
package qga
