#!/usr/bin/env bash
# Demo: start the worker with its embedded NATS server and ask it for one
# machine per CI runner kind (Forgejo Runner, GitHub Actions Runner, Jenkins
# agent), cloned from the tiny test image whose stub runners record how they
# were started and exit after a few seconds. Watch the lifecycle events
# live, then show a per-job summary and that nothing is left behind. With
# the example orchestrator (examples/dispatcher, built on pkg/client), it
# then drives the same worker with three more jobs, one of which never
# ends by itself and is torn down at its deadline.
# Usage: scripts/demo.sh path/to/worker [path/to/dispatcher]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib/daemon.sh"
W="$1"
D="${2:-}"
IMAGE="${DEMO_IMAGE:-tiny-linux}"
PORT="${DEMO_NATS_PORT:-14222}"
HOST=demo
URL="nats://127.0.0.1:$PORT"
export STRETCHY_NATS_URL="$URL"
dir=$(mktemp -d /tmp/stretchy-demo.XXXXXX)
# The worker's embedded server takes only its own credentials, which it
# makes in its data directory; the other commands find them there.
export STRETCHY_NATS_DATA_DIR="$dir/nats"
run="demo-$(date +%H%M%S)"
jobs=("$run-forgejo" "$run-github" "$run-jenkins")
# The dispatcher's jobs, torn down by the cleanup should it be interrupted.
djobs=("$run-d-forgejo" "$run-d-github" "$run-d-none")
wpid="" epid="" submitted=""

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# leftovers_of_demo fails when a domain or volume of this demo's jobs exists.
leftovers_of_demo() {
  local left
  left=$( { virsh -q -c qemu:///system list --all --name; virsh -q -c qemu:///system vol-list ci-images; } | grep -e "stretchy-$run" || true)
  if [ -n "$left" ]; then
    echo "  left on the host:"; printf '%s\n' "$left" | sed 's/^/    /'; return 1
  fi
  echo "  no domain or volume of the demo's jobs is left on the host"
}

cleanup() {
  status=$?
  trap - EXIT INT TERM
  if [ -n "$submitted" ] && [ -n "$wpid" ] && kill -0 "$wpid" 2>/dev/null; then
    echo "tearing the demo's machines down..."
    for job in "${jobs[@]}" "${djobs[@]}"; do
      "$W" submit teardown --job "$job" --host "$HOST" --reason "demo interrupted" >/dev/null 2>&1 || true
    done
    for job in "${jobs[@]}" "${djobs[@]}"; do
      timeout 60 "$W" events --job "$job" --follow --until torn_down >/dev/null 2>&1 || true
    done
  fi
  [ -n "$epid" ] && kill "$epid" 2>/dev/null || true
  [ -n "${ppid_progress:-}" ] && kill "$ppid_progress" 2>/dev/null || true
  if [ -n "$wpid" ]; then
    kill -TERM "$wpid" 2>/dev/null || true
    wait "$wpid" 2>/dev/null || true
  fi
  if [ "$status" -eq 130 ]; then
    leftovers_of_demo || status=1
  elif [ "$status" -ne 0 ]; then
    echo "demo failed; the worker's log:" >&2
    tail -n 30 "$dir/worker.log" >&2 || true
  fi
  rm -rf "$dir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "Starting the worker (embedded NATS on $URL, libvirt qemu:///system, TCG guests)"
# Its own session: a Ctrl-C in the terminal reaches this script, which
# tears the machines down through the worker before stopping it. Nor does
# it keep a descriptor this script inherited (scripts/lib/daemon.sh).
start_daemon "$W" run --host "$HOST" --nats-url "" --nats-data-dir "$dir/nats" --nats-port "$PORT" \
  --domain-type qemu --parallelism 3 --max-vms 4 >"$dir/worker.log" 2>&1 &
wpid=$!
for _ in $(seq 100); do
  grep -q "worker started" "$dir/worker.log" && break
  kill -0 "$wpid" 2>/dev/null || { echo "the worker exited"; exit 1; }
  sleep 0.1
done
grep -q "worker started" "$dir/worker.log" || { echo "the worker did not start within 10s"; exit 1; }
sed -n 's/^/  worker log: /p' "$dir/worker.log"

say "Following the events of the demo's jobs live"
"$W" events --new &
epid=$!
sleep 0.5

say "Submitting one job per runner kind (secrets are read from files, never arguments)"
umask 077
printf 'forgejo-token-%s' "$run" >"$dir/forgejo.secret"
printf 'github-jit-config-%s' "$run" >"$dir/github.secret"
printf 'jenkins-secret-%s' "$run" >"$dir/jenkins.secret"
start=$(date +%s.%N)
"$W" submit provision --job "$run-forgejo" --image "$IMAGE" --max-lifetime 10m --boot-timeout 2m \
  --runner forgejo --url https://forgejo.example.org/ --uuid 0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f --label debian-12 --label tiny \
  --secret-file "$dir/forgejo.secret"
"$W" submit provision --job "$run-github" --image "$IMAGE" --max-lifetime 10m --boot-timeout 2m \
  --runner github --secret-file "$dir/github.secret"
"$W" submit provision --job "$run-jenkins" --image "$IMAGE" --max-lifetime 10m --boot-timeout 2m \
  --runner jenkins --url https://jenkins.example.org/ --agent-name "demo agent" \
  --secret-file "$dir/jenkins.secret"
submitted=1
echo "(three TCG guests boot at once on this machine; each runner exits a few seconds after it starts)"

# A progress line every few seconds until every runner has started.
(
  while sleep 3; do
    started=$("$W" events --state runner_started --since 1h --json 2>/dev/null | grep -c . || true)
    [ "$started" -ge 3 ] && break
    awk -v s="$start" -v n="$started" -v now="$(date +%s.%N)" \
      'BEGIN { printf "   ... %.0f s since submit: %d of 3 runners started, guests booting\n", now - s, n }'
  done
) &
ppid_progress=$!

for job in "${jobs[@]}"; do
  timeout 180 "$W" events --job "$job" --follow --until torn_down >/dev/null
done
kill "$ppid_progress" 2>/dev/null || true
submitted=""
end=$(date +%s.%N)
sleep 0.3
kill "$epid" 2>/dev/null || true
wait "$epid" 2>/dev/null || true
epid=""

say "Summary"
"$W" events --summary --since 1h | sed 's/^/  /'
done_ok=$("$W" events --summary --since 1h --json | grep -c '"outcome":"torn_down","exit_code":0' || true)
if [ "$done_ok" -ne 3 ]; then
  echo "  expected 3 jobs torn down after their runner exited with 0, got $done_ok"; exit 1
fi
awk -v s="$start" -v e="$end" 'BEGIN { printf "  three jobs provisioned, run and torn down in %.1f s\n", e - s }'

if [ -n "$D" ]; then
  say "An orchestrator on pkg/client: examples/dispatcher, three jobs, one of them torn down at its 90 s deadline"
  printf 'forgejo-token-%s-d' "$run" >"$dir/forgejo-d.secret"
  printf 'github-jit-config-%s-d' "$run" >"$dir/github-d.secret"
  cat >"$dir/jobs.jsonl" <<JOBS
{"job": "$run-d-forgejo", "image": "$IMAGE", "runner": "forgejo", "secret_file": "$dir/forgejo-d.secret", "max_lifetime": "10m", "fields": {"url": "https://forgejo.example.org/", "uuid": "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f", "label": ["tiny", "stub-exit=3"]}}
{"job": "$run-d-github", "image": "$IMAGE", "runner": "github", "by_image": true, "secret_file": "$dir/github-d.secret", "max_lifetime": "10m"}
{"job": "$run-d-none", "image": "$IMAGE", "runner": "none", "deadline": "90s", "max_lifetime": "10m"}
JOBS
  sed 's/^/  jobs.jsonl: /' "$dir/jobs.jsonl"
  submitted=1
  # The embedded server's credentials, as the worker's commands find them.
  "$D" --nats-url "$URL" --nats-nkey-seed "$STRETCHY_NATS_DATA_DIR/user.nk" --rate 1 --deadline 5m "$dir/jobs.jsonl" | tee "$dir/dispatcher.out" | sed 's/^/  /'
  submitted=""
  for want in "$run-d-forgejo .* torn_down  *3 " "$run-d-github .* torn_down  *0 " "$run-d-none .* torn_down .*torn down at its deadline"; do
    grep -q -e "$want" "$dir/dispatcher.out" || { echo "  the dispatcher's summary lacks a line matching: $want"; exit 1; }
  done
  echo "  the dispatcher's three jobs ended as described: exit 3, exit 0, torn down at the deadline"
fi
kill -TERM "$wpid"
wait "$wpid" || true
wpid=""
if grep -q -e "forgejo-token-$run" -e "github-jit-config-$run" -e "jenkins-secret-$run" "$dir/worker.log"; then
  echo "  a runner secret appears in the worker's log"; exit 1
fi
echo "  the worker's log mentions no runner secret"
leftovers_of_demo
