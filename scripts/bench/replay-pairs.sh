#!/usr/bin/env bash
# Paired replay measurement: this tree's replay through pkg/client's
# iterator (BenchmarkReplay read=Events) and through the callback loop
# behind it (read=ReadEvents), against the callback replay of another
# revision (its BenchmarkReplay read=ReadEvents, in internal/bus before
# pkg/client existed). Each run is a process of its own with its own
# 100,000 stored events and the server in another process; the order of
# the three rotates every round, so that a loaded machine's drift falls on
# each in turn. Prints events/s per round and the per-round ratios.
# Usage: scripts/bench/replay-pairs.sh [revision (default main)] [rounds (default 6)]
set -euo pipefail
rev="${1:-main}"
rounds="${2:-6}"
root="$(git rev-parse --show-toplevel)"
work="$(mktemp -d /tmp/replay-pairs.XXXXXX)"
trap 'rm -rf "$work"' EXIT

# The package holding BenchmarkReplay in a tree.
benchpkg() {
  for d in pkg/client internal/bus; do
    if cat "$1/$d"/*_test.go 2>/dev/null | grep -q '^func BenchmarkReplay'; then
      echo "$1/$d"
      return
    fi
  done
  echo "no BenchmarkReplay in $1" >&2
  return 1
}

mkdir "$work/base"
git -C "$root" archive "$rev" | tar -x -C "$work/base"
newpkg="$(benchpkg "$root")" basepkg="$(benchpkg "$work/base")"
(cd "$newpkg" && go test -c -o "$work/new.test" .)
(cd "$basepkg" && go test -c -o "$work/base.test" .)

run() { # kind round
  local dir bin read
  case $1 in
    iterator) dir=$newpkg bin=$work/new.test read=Events ;;
    callback) dir=$newpkg bin=$work/new.test read=ReadEvents ;;
    base) dir=$basepkg bin=$work/base.test read=ReadEvents ;;
  esac
  (cd "$dir" && "$bin" -test.run '^$' -test.bench "^BenchmarkReplay\$/^server=process\$/^read=$read\$" -test.benchtime 4x) |
    awk -v k="$1" '/^Benchmark/ { print k, $(NF-1) }'
}

orders=("iterator callback base" "callback base iterator" "base iterator callback")
results="$work/results"
for r in $(seq 1 "$rounds"); do
  for k in ${orders[$(((r - 1) % 3))]}; do
    run "$k" "$r" | sed "s/^/$r /" | tee -a "$results"
  done
done
echo "events/s by round (iterator, callback, $rev) and ratios:"
awk '{ v[$1 " " $2] = $3; n = $1 > n ? $1 : n }
  END { for (r = 1; r <= n; r++) printf "%d  %8.0f %8.0f %8.0f  iterator/%s %.2f  iterator/callback %.2f\n", r,
    v[r " iterator"], v[r " callback"], v[r " base"], "'"$rev"'", v[r " iterator"] / v[r " base"], v[r " iterator"] / v[r " callback"] }' "$results"
