#!/usr/bin/env bash
# Runs "go test -race" with the given arguments. The race detector writes
# each report to a file instead of the test output; when there are any,
# this prints them at the end, where a CI log's tail shows them, each stack
# cut to its first frames, and the full reports stay under .cache/race.
set -uo pipefail

dir="$PWD/.cache/race"
rm -rf "$dir"
mkdir -p "$dir"
GORACE="log_path=$dir/report ${GORACE:-}" go test -race "$@"
status=$?

shopt -s nullglob
reports=("$dir"/report.*)
if ((${#reports[@]} > 0)); then
	echo
	echo "=== data races: ${#reports[@]} report file(s) in $dir; the stacks, cut to 6 frames each:"
	for f in "${reports[@]}"; do
		echo "--- $f"
		awk '
			/^(WARNING: DATA RACE|Write at|Read at|Previous write|Previous read|Goroutine [0-9]+)/ { print; frames = 0; next }
			/^  [^ \/]/ && frames < 6 { print; frames++ }
			/^      \// && frames <= 6 { sub(/^.*\/(pkg\/mod|go\/src|work)\//, "      "); print }
		' "$f"
	done
	if ((status == 0)); then
		status=1
	fi
fi
exit "$status"
