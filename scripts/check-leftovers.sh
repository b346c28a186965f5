#!/usr/bin/env bash
# Fails when any managed (stretchy-) domain or volume exists on the host.
set -euo pipefail
uri="${LIBVIRT_URI:-qemu:///system}"
left=$(virsh -q -c "$uri" list --all --name | grep '^stretchy-' || true)
for pool in $(virsh -q -c "$uri" pool-list --name); do
  virsh -q -c "$uri" pool-refresh "$pool" >/dev/null 2>&1 || true
  vols=$(virsh -q -c "$uri" vol-list "$pool" 2>/dev/null | awk '$1 ~ /^stretchy-/ {print $2}')
  [ -n "$vols" ] && left+=$'\n'"$vols"
done
left=$(printf '%s' "$left" | sed '/^$/d')
if [ -n "$left" ]; then
  echo "managed resources left on the host:"
  printf '%s\n' "$left"
  exit 1
fi
echo "no stretchy- domain or volume left on the host"
