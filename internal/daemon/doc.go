// Package daemon starts programs that outlive their starter, such as a
// libvirtd that a test restarts, detached from it: in a session of their
// own, and with no descriptor of the starting process but stdio.
//
// Go's os/exec passes a child only stdio and ExtraFiles of the descriptors
// it opened itself, but every descriptor the process inherited without
// close-on-exec (a CI job's flock(1) lock, say) goes on to every child, and
// a daemon keeps it open, and the lock held, after its starter ended.
// scripts/lib/daemon.sh does the same for the shell scripts.
package daemon
