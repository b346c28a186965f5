# shellcheck shell=bash
# Sourced by the scripts that start daemons: . "$(dirname "$0")/lib/daemon.sh"

# start_daemon CMD [ARG...] runs CMD in a session of its own, with none of
# this shell's descriptors but stdin, stdout and stderr. A daemon outlives
# its starter, and so does whatever descriptor it inherits: a CI job's lock
# that the job's shell got from flock(1), say, would stay held after the
# job. Nor must a terminal's or CI job's signals to its session reach it.
# internal/daemon does the same for Go code.
#
# Called from the script's own shell it returns CMD's status, at once for a
# daemon that forks into the background (start_daemon libvirtd -d). In a
# subshell, such as a background job (start_daemon CMD &), it replaces that
# subshell, so $! is CMD's pid; nothing after it in the subshell runs.
start_daemon() {
  if [ "$BASHPID" = "$$" ]; then
    ( start_daemon "$@" )
    return
  fi
  local fd
  # The glob's own directory descriptor is closed again by the time the
  # loop runs, and closing it twice is harmless.
  for fd in /proc/"$BASHPID"/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ]; then
      exec {fd}>&-
    fi
  done
  # setsid forks only when this shell leads its process group (job
  # control); -w then still returns CMD's status.
  exec setsid -w "$@"
}
