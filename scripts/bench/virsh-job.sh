#!/usr/bin/env bash
# The process-per-step baseline of docs/benchmarks.md: one CI job's machine
# done with one virsh process per libvirt or guest-agent call, as a shell
# provisioner would, timing every step.
#
#   scripts/bench/virsh-job.sh NAME [SLEEP]
#
# clones the image (IMAGE, default tiny-linux) into the domain NAME (not
# stretchy-...: a worker on this host would take a domain of that prefix
# without metadata for a half-built one of its own), starts it, pings its
# guest agent every 100 ms until it answers, writes a secret file and
# starts the Forgejo stub runner through guest-exec (it exits after SLEEP
# seconds, default 2), polls guest-exec-status every 100 ms until the
# runner exited, and removes domain and volume again. Each step prints one
# line "step NAME START END" with times in seconds since the epoch
# (EPOCHREALTIME, no process per timestamp) as it ends (teardown also as
# its parts, destroy and undefine+vol-delete), and "runner_pid PID" once
# the runner runs, so that a harness can follow the job live.
# The domain definition is prepared before the first step, untimed.
# Whatever fails, the machine is removed (untimed then).
set -euo pipefail
name="$1"
sleep_s="${2:-2}"
image="${IMAGE:-tiny-linux}"
pool="${POOL:-ci-images}"
uri="${LIBVIRT_URI:-qemu:///system}"
case "$name" in stretchy-*) echo "virsh-job: $name: the prefix stretchy- is the worker's" >&2; exit 2 ;; esac

v() { virsh -q -c "$uri" "$@"; }

dir=$(mktemp -d /tmp/stretchy-bench-virsh.XXXXXX)
defined="" created=""
cleanup() {
  status=$?
  trap - EXIT
  if [ -n "$defined" ]; then
    v destroy "$name" >/dev/null 2>&1 || true
    v undefine "$name" >/dev/null 2>&1 || true
  fi
  [ -n "$created" ] && { v vol-delete --pool "$pool" "$vol" >/dev/null 2>&1 || true; }
  rm -rf "$dir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# ---------------------------------------------------------- untimed: prepare
src=$(v dumpxml --inactive "$image")
backing=$(sed -n "s/.*<source file='\([^']*\)'.*/\1/p" <<<"$src" | head -1)
[ -n "$backing" ] || { echo "virsh-job: $image has no file disk" >&2; exit 1; }
capacity=$(v vol-info --bytes "$backing" | awk '$1 == "Capacity:" {print $2}')
vol="$name-vda.qcow2"
overlay="$(dirname "$backing")/$vol"
mac=$(printf '52:54:00:%02x:%02x:%02x' $((RANDOM % 256)) $((RANDOM % 256)) $((RANDOM % 256)))
# New name, no UUID (libvirt makes one), a new MAC, the overlay as disk.
sed -e "s|<name>$image</name>|<name>$name</name>|" -e '/<uuid>/d' \
    -e "s|<mac address='[^']*'/>|<mac address='$mac'/>|" \
    -e "s|<source file='$backing'/>|<source file='$overlay'/>|" <<<"$src" >"$dir/domain.xml"
secret=$(head -c 24 /dev/urandom | base64)
secret_b64=$(printf '%s' "$secret" | base64 -w0)

step() { echo "step $1 $2 $EPOCHREALTIME"; }

# ---------------------------------------------------------- timed steps
t=$EPOCHREALTIME
v vol-create-as "$pool" "$vol" "$capacity" --format qcow2 --backing-vol "$backing" --backing-vol-format qcow2 >/dev/null
created=1
v define "$dir/domain.xml" >/dev/null
defined=1
step clone "$t"

t=$EPOCHREALTIME
v start "$name" >/dev/null
step start "$t"

t=$EPOCHREALTIME
until v qemu-agent-command "$name" '{"execute":"guest-ping"}' >/dev/null 2>&1; do
  sleep 0.1
done
step agent "$t"

# The secret reaches the guest as guest-exec input, as the worker does it,
# then the launcher runs the stub as the user stretchy.
t=$EPOCHREALTIME
write=$(v qemu-agent-command "$name" "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/sh\",\"arg\":[\"-c\",\"umask 077 && mkdir -p /home/stretchy/.stretchy && cat >/home/stretchy/.stretchy/token && chown -R stretchy /home/stretchy/.stretchy\"],\"input-data\":\"$secret_b64\"}}")
wpid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' <<<"$write")
until v qemu-agent-command "$name" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$wpid}}" | grep -q '"exited":true'; do
  sleep 0.01
done
launch=$(v qemu-agent-command "$name" "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/su\",\"arg\":[\"-s\",\"/bin/sh\",\"stretchy\",\"-c\",\"cd /home/stretchy && exec /usr/local/bin/forgejo-runner one-job --url=https://forgejo.example.org/ --token-url=file:/home/stretchy/.stretchy/token --label=stub-sleep=$sleep_s --wait\"],\"capture-output\":true}}")
pid=$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' <<<"$launch")
[ -n "$pid" ] || { echo "virsh-job: guest-exec: $launch" >&2; exit 1; }
step runner "$t"
echo "runner_pid $pid"

t=$EPOCHREALTIME
until v qemu-agent-command "$name" "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}" | grep -q '"exited":true'; do
  sleep 0.1
done
step exit "$t"

t=$EPOCHREALTIME
v destroy "$name" >/dev/null
step destroy "$t"
u=$EPOCHREALTIME
v undefine "$name" >/dev/null
defined=""
v vol-delete --pool "$pool" "$vol" >/dev/null
created=""
step undefine+vol-delete "$u"
step teardown "$t"
