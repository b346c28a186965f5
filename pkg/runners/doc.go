// Package runners describes the CI runners the worker starts in a machine,
// one entry per runner kind in a table (Kinds, Lookup): the fields of the
// kind's section in a provision request, their rules and which are
// secrets, and the runner program on each OS family. From it come the
// validation of whole provision requests (Validate), the secrets to scrub
// from a runner's output (Secrets), and launch plans: the commands the
// worker runs through the QEMU guest agent to write the runner's secret,
// configuration (Forgejo) and launch script into the guest and to start
// the runner as the local user stretchy (For), and those that ask a runner program for its version the
// same way (VersionPlan). It is pure: it does no I/O, and secrets only ever
// travel as a command's standard input, never in argv, in the environment
// or in a script. Plan's documentation describes how each OS family starts
// the runner and why.
package runners
