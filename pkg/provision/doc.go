// Package provision turns libvirt "images" into disposable CI machines and
// removes them again without leaving anything behind.
//
// An image is an ordinary, shut-off libvirt domain. Clone defines a managed
// domain named Prefix+job id whose writable disks are thin copy-on-write
// qcow2 volumes backed by the image's volumes, and records what it created in
// the domain's <metadata>, so that Remove, Lookup and List can later work from
// libvirt's own state alone. Nothing here touches a domain whose name does not
// start with Prefix.
package provision
