// Package runners turns the runner section of a provision request into a
// launch plan: the commands the worker runs through the QEMU guest agent to
// write the runner's secret and launch script into the guest and to start
// the runner as the local user stretchy, and those that ask a runner program
// for its version the same way (VersionPlan). It is pure: it does no I/O, and
// secrets only ever travel as a command's standard input, never in argv, in
// the environment or in a script. Plan's documentation describes how each OS
// family starts the runner and why.
package runners
