#!/usr/bin/env bash
# Make sure libvirt + QEMU (TCG) are installed and libvirtd is running.
# Idempotent; takes well under 2 s when everything is already in place.
# Targets Debian 12 without systemd (containers, CI machines): the daemons
# are started directly with -d, each in a session of its own and without
# this script's descriptors beyond stdio (scripts/lib/daemon.sh).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib/daemon.sh"

LIBVIRT_URI="${LIBVIRT_URI:-qemu:///system}"
# iptables brings ebtables-nft, ebtables, iptables and ip6tables, which
# libvirt's nwfilter runs for the worker's guest filter; iproute2's ip netns
# makes the isolation tests' networks.
PACKAGES=(libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils
          qemu-system-data busybox-static ovmf e2fsprogs iptables iproute2)

log() { echo "libvirt-up: $*"; }
die() { echo "libvirt-up: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
export PATH="$PATH:/usr/sbin:/sbin"

missing_bits() {
  local c
  for c in libvirtd virtlogd virsh qemu-system-x86_64 qemu-img mkfs.ext4 ebtables iptables ip6tables ip; do
    command -v "$c" >/dev/null 2>&1 || echo "$c"
  done
  [ -f /usr/share/qemu/qboot.rom ] || echo qboot.rom
  [ -f /usr/share/OVMF/OVMF_CODE.fd ] || echo OVMF_CODE.fd
  [ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" = "install ok installed" ] || echo busybox-static
}

missing="$(missing_bits | tr '\n' ' ')"
if [ -n "${missing// /}" ]; then
  log "missing: ${missing}- installing packages"
  # Keep dpkg from trying to start services (there is no init system here);
  # we start the daemons ourselves below.
  prc=/usr/sbin/policy-rc.d prc_backup=""
  if [ -e "$prc" ]; then prc_backup="$(mktemp)"; cp -p "$prc" "$prc_backup"; fi
  restore_prc() {
    if [ -n "$prc_backup" ]; then mv -f "$prc_backup" "$prc"; else rm -f "$prc"; fi
  }
  trap restore_prc EXIT
  printf '#!/bin/sh\nexit 101\n' >"$prc"; chmod 755 "$prc"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${PACKAGES[@]}" >/dev/null
  restore_prc; trap - EXIT
  missing="$(missing_bits | tr '\n' ' ')"
  [ -z "${missing// /}" ] || die "still missing after install: $missing"
  log "packages installed"
fi

# Without udev, /dev/kvm may be root:root 0600. The QEMU capability probe then
# reports KVM while libvirt's own check (as user libvirt-qemu) says "not
# usable", so libvirtd throws its capability cache away and re-probes QEMU
# (~4 s) on every define/start/version call. Apply Debian's udev rule by hand
# (root:kvm 0660). Guests still run as <domain type='qemu'> (TCG).
if [ -c /dev/kvm ] && getent group kvm >/dev/null &&
   [ "$(stat -c '%G %a' /dev/kvm)" != "kvm 660" ]; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
  log "set /dev/kvm to root:kvm 0660 (avoids libvirt capability re-probing)"
fi

mkdir -p /run/libvirt
if ! pgrep -x virtlogd >/dev/null; then
  start_daemon virtlogd -d
  log "started virtlogd"
fi
if ! pgrep -x libvirtd >/dev/null; then
  start_daemon libvirtd -d
  log "started libvirtd"
fi

# Wait (bounded) for libvirtd to answer. The first answer after a fresh start
# can take ~10 s (QEMU capability probe), longer on a busy 2-core machine.
wait_s="${LIBVIRT_WAIT_SECONDS:-60}"
deadline=$((SECONDS + wait_s))
until virsh -c "$LIBVIRT_URI" version >/dev/null 2>&1; do
  if [ "$SECONDS" -ge "$deadline" ]; then
    virsh -c "$LIBVIRT_URI" version >&2 || true
    die "libvirtd did not answer on $LIBVIRT_URI within $wait_s s (is /run/libvirt/libvirt-sock there? see /var/log/libvirt/)"
  fi
  sleep 0.2
done
# Note: libvirt's "default" NAT network is not needed: our domains have no NIC
# or a user-mode (<interface type='user'>) one, which need no host bridge.
# The isolation tests make bridges and network namespaces of their own.
virsh -c "$LIBVIRT_URI" nwfilter-list >/dev/null 2>&1 ||
  die "libvirtd has no nwfilter driver (virsh nwfilter-list fails); the worker's guest filter needs it"

