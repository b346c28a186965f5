#!/usr/bin/env bash
# Demo: start the worker with its embedded NATS server, ask it for one
# machine cloned from the tiny test image, watch the lifecycle events, tear
# the machine down, and show that nothing is left behind.
# Usage: scripts/demo.sh path/to/worker
set -euo pipefail
W="$1"
IMAGE="${DEMO_IMAGE:-tiny-linux}"
PORT="${DEMO_NATS_PORT:-14222}"
HOST=demo
URL="nats://127.0.0.1:$PORT"
export STRETCHY_NATS_URL="$URL"
dir=$(mktemp -d /tmp/stretchy-demo.XXXXXX)
job="demo-$(date +%s)"
wpid="" epid="" provisioned=""

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
  status=$?
  trap - EXIT INT TERM
  if [ -n "$provisioned" ] && [ -n "$wpid" ] && kill -0 "$wpid" 2>/dev/null; then
    "$W" submit teardown --job "$job" --host "$HOST" --reason "demo interrupted" >/dev/null 2>&1 || true
    timeout 60 "$W" events --job "$job" --follow --until torn_down >/dev/null 2>&1 || true
  fi
  [ -n "$epid" ] && kill "$epid" 2>/dev/null || true
  if [ -n "$wpid" ]; then
    kill -TERM "$wpid" 2>/dev/null || true
    wait "$wpid" 2>/dev/null || true
  fi
  if [ "$status" -ne 0 ]; then
    echo "demo failed; the worker's log:" >&2
    tail -n 30 "$dir/worker.log" >&2 || true
  fi
  rm -rf "$dir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "Starting the worker (embedded NATS on $URL, libvirt qemu:///system, TCG guests)"
"$W" run --host "$HOST" --nats-url "" --nats-data-dir "$dir/nats" --nats-port "$PORT" \
  --domain-type qemu --parallelism 3 --max-vms 4 >"$dir/worker.log" 2>&1 &
wpid=$!
for _ in $(seq 100); do
  grep -q "worker started" "$dir/worker.log" && break
  kill -0 "$wpid" 2>/dev/null || { echo "the worker exited"; exit 1; }
  sleep 0.1
done
grep -q "worker started" "$dir/worker.log" || { echo "the worker did not start within 10s"; exit 1; }
sed -n 's/^/  worker log: /p' "$dir/worker.log"

say "Following the job's events live"
"$W" events --follow --job "$job" &
epid=$!
sleep 0.5

say "Submitting a provision request for job $job (image $IMAGE)"
start=$(date +%s.%N)
"$W" submit provision --job "$job" --image "$IMAGE" --max-lifetime 10m
provisioned=1
timeout 120 "$W" events --job "$job" --state running --follow --until running >/dev/null
sleep 0.3

say "The machine runs; libvirt's view of it"
virsh -q -c qemu:///system list --all | grep -E "stretchy-$job" | sed 's/^/  /'
disk=$(virsh -q -c qemu:///system domblklist "stretchy-$job" | awk '$1=="vda"{print $2}')
echo "  disk $disk"
qemu-img info -U "$disk" | grep -E 'file format|virtual size|disk size|backing file:' | sed 's/^/    /'

say "Submitting a teardown request"
"$W" submit teardown --job "$job" --host "$HOST" --reason "demo finished"
timeout 120 "$W" events --job "$job" --state torn_down --follow --until torn_down >/dev/null
provisioned=""
end=$(date +%s.%N)
sleep 0.3
kill "$epid" 2>/dev/null || true
wait "$epid" 2>/dev/null || true
epid=""

say "Summary"
awk -v j="$job" -v s="$start" -v e="$end" 'BEGIN { printf "  job %s: provisioned, ran and torn down in %.1f s\n", j, e - s }'
kill -TERM "$wpid"
wait "$wpid" || true
wpid=""
grep -E 'request settled|worker stopped' "$dir/worker.log" | sed 's/^/  worker log: /'
bash "$(dirname "$0")/check-leftovers.sh" | sed 's/^/  /'
