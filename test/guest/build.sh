#!/usr/bin/env bash
# Build the tiny test guest (Debian kernel + busybox + qemu-guest-agent) and
# register it with libvirt as the shut-off image domain $IMAGE_NAME, whose
# disk is the volume $IMAGE_NAME.qcow2 in the dir storage pool $POOL_NAME.
# IMAGE_VARIANT=panic registers the variant whose init fails at once
# (default name tiny-linux-panic): the same build, booted with
# stretchy.panic on its kernel command line.
#
# Cached: the build is keyed by the candidate versions of the Debian packages
# used and a hash of this directory; when nothing changed it only checks that
# pool, volume, boot files and domain are in place (about a second).
# Needs root and a running libvirtd (scripts/libvirt-up.sh). See README.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LIBVIRT_URI="${LIBVIRT_URI:-qemu:///system}"
POOL_NAME="${POOL_NAME:-ci-images}"
POOL_DIR="${POOL_DIR:-/var/lib/libvirt/ci-images}"
IMAGE_VARIANT="${IMAGE_VARIANT:-}"
case "$IMAGE_VARIANT" in
  "") VARIANT_CMDLINE="" ;;
  panic) VARIANT_CMDLINE=" stretchy.panic" ;;
  *) echo "guest-build: ERROR: IMAGE_VARIANT '$IMAGE_VARIANT': the only variant is panic" >&2; exit 1 ;;
esac
IMAGE_NAME="${IMAGE_NAME:-tiny-linux${IMAGE_VARIANT:+-$IMAGE_VARIANT}}"
# The guest's own name (host name, file system label): the image's, without
# the variant's suffix, so that an image and its variants share one build.
if [ -n "$IMAGE_VARIANT" ]; then GUEST_NAME="${GUEST_NAME:-${IMAGE_NAME%-"$IMAGE_VARIANT"}}"; fi
GUEST_NAME="${GUEST_NAME:-$IMAGE_NAME}"
BOOT_DIR="${BOOT_DIR:-/var/lib/libvirt/ci-boot/$IMAGE_NAME}"
WORK="${WORK_DIR:-/var/cache/stretchy-test-guest}"
VOLUME="$IMAGE_NAME.qcow2"
DISK_SIZE=64M
MEMORY_MIB=128
# The image's MAC address (clones get their own): a fixed one for
# tiny-linux, one from a hash of the name for other images and variants, so
# that the images on a host differ.
if [ "$IMAGE_NAME" = tiny-linux ]; then
  MAC=52:54:00:7e:00:01
else
  h="$(printf '%s' "$IMAGE_NAME" | sha256sum | cut -c1-4)"
  MAC="52:54:00:7e:${h:0:2}:${h:2:2}"
fi
CMDLINE="console=ttyS0 root=/dev/vda rw quiet panic=1$VARIANT_CMDLINE"

# Debian packages unpacked into the guest's root file system (the kernel
# package is unpacked separately: only its kernel and a few modules are used).
PACKAGES=(libc6 libglib2.0-0 libnuma1 liburing2 libudev1 libpcre2-8-0 libffi8
          libmount1 libselinux1 libblkid1 zlib1g qemu-guest-agent busybox-static)
# Modules the initramfs loads, in dependency order (drivers/... paths below
# /lib/modules/<version>/kernel, without .ko).
MODULES=(drivers/virtio/virtio_ring drivers/virtio/virtio
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci_modern_dev
         drivers/virtio/virtio_pci drivers/block/virtio_blk
         drivers/char/virtio_console net/core/failover drivers/net/net_failover
         drivers/net/virtio_net lib/crc16 fs/mbcache fs/jbd2/jbd2
         crypto/crc32c_generic fs/ext4/ext4
         drivers/input/evdev drivers/acpi/button)

log() { echo "guest-build: $*"; }
die() { echo "guest-build: ERROR: $*" >&2; exit 1; }
virsh() { command virsh -q -c "$LIBVIRT_URI" "$@"; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
export PATH="$PATH:/usr/sbin:/sbin"
for n in "$POOL_NAME" "$IMAGE_NAME" "$GUEST_NAME"; do
  case "$n" in stretchy-*) die "'$n': the prefix stretchy- is reserved for managed domains" ;; esac
done
for c in virsh qemu-img mkfs.ext4 xz dpkg-deb apt-get busybox; do
  command -v "$c" >/dev/null || die "$c missing: run scripts/libvirt-up.sh first"
done
virsh version >/dev/null 2>&1 || die "libvirtd does not answer on $LIBVIRT_URI: run scripts/libvirt-up.sh first"

# ---------------------------------------------------------------- cache key
package_info() {
  apt-cache show --no-all-versions linux-image-amd64 "${PACKAGES[@]}" 2>/dev/null |
    grep -E '^(Package|Version|Depends): ' || true
}
info="$(package_info)"
if [ "$(grep -c '^Package: ' <<<"$info")" -ne $((${#PACKAGES[@]} + 1)) ]; then
  log "apt lists incomplete: apt-get update"
  apt-get update -qq
  info="$(package_info)"
  [ "$(grep -c '^Package: ' <<<"$info")" -eq $((${#PACKAGES[@]} + 1)) ] ||
    die "some packages are not available: $(grep '^Package: ' <<<"$info" | tr '\n' ' ')"
fi
# linux-image-amd64 depends on the current linux-image-<abi>-amd64 (= version)
KPKG="$(awk '/^Package: linux-image-amd64$/ {m=1; next} /^Package: / {m=0}
             m && /^Depends: / {for (i = 2; i <= NF; i++) if ($i ~ /^linux-image-[0-9]/) {print $i; exit}}' <<<"$info")"
[ -n "$KPKG" ] || die "cannot resolve the kernel package from linux-image-amd64"
KVER="${KPKG#linux-image-}"
key="$( { echo "$info" "$DISK_SIZE" "$GUEST_NAME"
          cd "$HERE" && find . -type f ! -name README.md ! -name '*~' | LC_ALL=C sort | xargs sha256sum; } |
        sha256sum | cut -c1-16)"

OUT="$WORK/out"
have_artifacts() {
  [ "$(cat "$WORK/key" 2>/dev/null)" = "$key" ] &&
    [ -f "$OUT/disk.qcow2" ] && [ -f "$OUT/initrd.img" ] && [ -f "$OUT/kernel" ]
}

# ---------------------------------------------------------------- build
build() {
  log "building (key $key, kernel $KPKG)"
  rm -rf "$WORK/debs" "$WORK/kernel" "$WORK/rootfs" "$WORK/initramfs" "$OUT" "$WORK/key"
  mkdir -p "$WORK/debs" "$WORK/kernel" "$WORK/rootfs" "$WORK/initramfs" "$OUT"
  chown _apt "$WORK/debs" 2>/dev/null || true   # apt-get download's sandbox user
  if ! (cd "$WORK/debs" && apt-get download -qq "$KPKG" "${PACKAGES[@]}" >/dev/null); then
    # stale apt lists name versions the mirror no longer has: update, start over
    [ -z "${GUEST_BUILD_RETRY:-}" ] || die "apt-get download failed"
    log "apt-get download failed: apt-get update and retry"
    apt-get update -qq
    GUEST_BUILD_RETRY=1 exec bash "$HERE/build.sh"
  fi

  local deb
  for deb in "$WORK"/debs/*.deb; do
    case "${deb##*/}" in
      linux-image-*) dpkg-deb -x "$deb" "$WORK/kernel" ;;
      *) dpkg-deb -x "$deb" "$WORK/rootfs" ;;
    esac
  done

  # Kernel. The bzImage decompresses itself on every boot (~3 s under TCG);
  # instead boot the raw vmlinux ELF (PVH entry point) unpacked from its xz
  # payload once here. Falls back to the bzImage if that fails.
  local bz="$WORK/kernel/boot/vmlinuz-$KVER" off
  [ -f "$bz" ] || die "no $bz in $KPKG"
  off="$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$bz" | head -1 | cut -d: -f1 || true)"
  if [ -n "$off" ] && xz -dc --single-stream <(tail -c +$((off + 1)) "$bz") >"$OUT/kernel" 2>/dev/null &&
     [ "$(head -c 4 "$OUT/kernel" | od -An -c | tr -d ' ')" = '177ELF' ]; then
    echo vmlinux >"$OUT/kernel-kind"
  else
    log "WARNING: could not unpack vmlinux from $bz, booting the (slower) bzImage"
    cp "$bz" "$OUT/kernel"
    echo bzImage >"$OUT/kernel-kind"
  fi

  # initramfs: static busybox + modules + /init, as a gzipped newc cpio.
  local ird="$WORK/initramfs" m a
  mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
  cp "$WORK/rootfs/bin/busybox" "$ird/bin/busybox"
  for a in sh mount umount insmod switch_root mkdir cat echo sleep usleep reboot; do
    ln -s busybox "$ird/bin/$a"
  done
  : >"$ird/modules"
  for m in "${MODULES[@]}"; do
    local ko="$WORK/kernel/lib/modules/$KVER/kernel/$m.ko"
    if [ -f "$ko.xz" ]; then xz -dc "$ko.xz" >"$ird/lib/modules/${m##*/}.ko"
    elif [ -f "$ko" ]; then cp "$ko" "$ird/lib/modules/${m##*/}.ko"
    else die "module $m missing in $KPKG"; fi
    echo "${m##*/}" >>"$ird/modules"
  done
  install -m 755 "$HERE/init" "$ird/init"
  (cd "$ird" && find . | LC_ALL=C sort | busybox cpio -o -H newc -R 0:0 2>/dev/null) |
    gzip -9n >"$OUT/initrd.img"

  # Root file system.
  local r="$WORK/rootfs"
  rm -rf "$r"/usr/share/{doc,man,info,locale,lintian,bug} "$r/usr/lib/x86_64-linux-gnu/gconv"
  mkdir -p "$r"/{proc,sys,dev,run,tmp,root,home,sbin,usr/bin,usr/sbin,usr/local/bin,var/lib,var/log,etc/init.d}
  chmod 1777 "$r/tmp"; chmod 700 "$r/root"
  ln -sfn /run "$r/var/run"
  # busybox applets as symlinks, without replacing real files
  local path
  while read -r path; do
    [ -e "$r/$path" ] || [ -L "$r/$path" ] || { mkdir -p "$r/${path%/*}"; ln -s /bin/busybox "$r/$path"; }
  done < <("$r/bin/busybox" --list-full)
  install -m 644 "$HERE/inittab" "$r/etc/inittab"
  install -m 755 "$HERE/rcS" "$r/etc/init.d/rcS"
  install -m 755 "$HERE/virtio-port-links" "$HERE/start-qemu-ga" "$HERE/shutdown" "$r/sbin/"
  # ACPI power button (virsh shutdown --mode acpi) -> busybox acpid -> poweroff
  mkdir -p "$r/etc/acpi/PWRF"
  printf '#!/bin/sh\nexec /sbin/poweroff\n' >"$r/etc/acpi/PWRF/00000080"
  chmod 755 "$r/etc/acpi/PWRF/00000080"
  echo "$GUEST_NAME" >"$r/etc/hostname"
  printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost\n' "$GUEST_NAME" >"$r/etc/hosts"
  printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' >"$r/etc/nsswitch.conf"
  echo /bin/sh >"$r/etc/shells"
  echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' >"$r/etc/profile"
  cat >"$r/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
stretchy:x:1000:1000:stretchy:/home/stretchy:/bin/sh
other:x:1001:1001:other:/home/other:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
  cat >"$r/etc/group" <<'EOF'
root:x:0:
tty:x:5:
stretchy:x:1000:
other:x:1001:
nogroup:x:65534:
EOF
  printf 'root:*:19000:0:99999:7:::\nstretchy:*:19000:0:99999:7:::\nother:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n' >"$r/etc/shadow"
  chmod 640 "$r/etc/shadow"
  cat >"$r/etc/os-release" <<EOF
ID=stretchy-tiny
ID_LIKE=debian
NAME="Stretchy tiny test guest"
PRETTY_NAME="Stretchy tiny test guest 1 ($KPKG)"
VERSION_ID="1"
VERSION="1"
BUILD_ID="$key"
EOF
  # stub runners (see runner-stub), the stretchy user's home, and the home
  # of a second user, other, whom tests let try to read stretchy's files
  install -m 755 "$HERE/runner-stub" "$r/usr/local/bin/forgejo-runner"
  install -m 755 "$HERE/runner-stub" "$r/usr/bin/java"
  install -d -m 755 -o 1000 -g 1000 "$r/home/stretchy" "$r/home/stretchy/actions-runner" \
    "$r/home/stretchy/actions-runner/bin"
  install -m 755 -o 1000 -g 1000 "$HERE/runner-stub" "$r/home/stretchy/actions-runner/run.sh"
  install -m 755 -o 1000 -g 1000 "$HERE/runner-stub" "$r/home/stretchy/actions-runner/bin/Runner.Listener"
  install -d -m 755 -o 1001 -g 1001 "$r/home/other"
  echo "placeholder: /usr/bin/java is a stub" >"$r/home/stretchy/agent.jar"
  chown 1000:1000 "$r/home/stretchy/agent.jar"

  # sanity checks, run in the unpacked tree: every library qemu-ga needs is
  # there, and su to stretchy and to other works
  chroot "$r" /usr/sbin/qemu-ga --version >/dev/null || die "qemu-ga does not run in the rootfs (missing library?)"
  [ "$(chroot "$r" /bin/su -s /bin/sh stretchy -c 'id -u')" = 1000 ] || die "su to stretchy does not work"
  [ "$(chroot "$r" /bin/su -s /bin/sh other -c 'id -u')" = 1001 ] || die "su to other does not work"

  # ext4 image straight from the folder (mkfs.ext4 -d keeps owners and modes)
  rm -f "$WORK/rootfs.ext4"; truncate -s "$DISK_SIZE" "$WORK/rootfs.ext4"
  mkfs.ext4 -q -F -L "$GUEST_NAME" -E lazy_itable_init=0,lazy_journal_init=0 \
    -d "$r" "$WORK/rootfs.ext4"
  qemu-img convert -O qcow2 "$WORK/rootfs.ext4" "$OUT/disk.qcow2"
  rm -rf "$WORK/rootfs.ext4" "$WORK/debs" "$WORK/kernel"   # ~470 MB, not needed any more
  echo "$key" >"$WORK/key"
  log "built the disk of $GUEST_NAME ($(du -h "$OUT/disk.qcow2" | cut -f1) on disk), $(cat "$OUT/kernel-kind"), initrd $(du -h "$OUT/initrd.img" | cut -f1)"
}

mkdir -p "$WORK"
have_artifacts || build

# ---------------------------------------------------------------- publish
# install SRC as DEST (atomically, new inode) unless identical
publish() {
  local src="$1" dest="$2"
  if ! cmp -s "$src" "$dest"; then
    cp "$src" "$dest.tmp.$$"
    mv -f "$dest.tmp.$$" "$dest"
    echo changed
  fi
}

domain_state() { virsh domstate "$IMAGE_NAME" 2>/dev/null || true; }
stop_image() {
  if [ "$(domain_state)" = running ] || [ "$(domain_state)" = paused ]; then
    virsh destroy "$IMAGE_NAME" >/dev/null
    log "destroyed running $IMAGE_NAME (the image domain must stay shut off)"
  fi
}

# storage pool
if ! virsh pool-info "$POOL_NAME" >/dev/null 2>&1; then
  virsh pool-define-as "$POOL_NAME" dir --target "$POOL_DIR" >/dev/null
  log "defined pool $POOL_NAME ($POOL_DIR)"
fi
if [ ! -d "$POOL_DIR" ]; then
  virsh pool-build "$POOL_NAME" >/dev/null
  log "built pool $POOL_NAME"
fi
pool_info="$(virsh pool-info "$POOL_NAME")"
if ! grep -q '^State: *running' <<<"$pool_info"; then
  virsh pool-start "$POOL_NAME" >/dev/null
  log "started pool $POOL_NAME"
fi
if ! grep -q '^Autostart: *yes' <<<"$pool_info"; then
  virsh pool-autostart "$POOL_NAME" >/dev/null
  log "pool $POOL_NAME set to autostart"
fi
actual_dir="$(virsh pool-dumpxml "$POOL_NAME" | sed -n 's:.*<path>\(.*\)</path>.*:\1:p')"
[ "$actual_dir" = "$POOL_DIR" ] || die "pool $POOL_NAME exists with target $actual_dir, not $POOL_DIR"

# kernel + initrd (outside the pool), volume
mkdir -p "$BOOT_DIR"
changed=""
for f in kernel initrd.img; do
  [ -z "$(publish "$OUT/$f" "$BOOT_DIR/$f")" ] || { changed=1; log "installed $BOOT_DIR/$f"; }
done
if ! cmp -s "$OUT/disk.qcow2" "$POOL_DIR/$VOLUME"; then
  stop_image
  publish "$OUT/disk.qcow2" "$POOL_DIR/$VOLUME" >/dev/null
  changed=1
  log "installed volume $POOL_NAME/$VOLUME"
fi
if [ -n "$changed" ] || ! virsh vol-info --pool "$POOL_NAME" "$VOLUME" >/dev/null 2>&1; then
  virsh pool-refresh "$POOL_NAME" >/dev/null
fi
virsh vol-info --pool "$POOL_NAME" "$VOLUME" >/dev/null || die "volume $VOLUME not visible in pool $POOL_NAME"

# image domain (a fixture: defined straight from this XML)
xml="$(cat <<EOF
<domain type='qemu'>
  <name>$IMAGE_NAME</name>
  <description>Tiny test guest image (busybox + qemu-guest-agent)${IMAGE_VARIANT:+, variant $IMAGE_VARIANT}, built by test/guest/build.sh; key $key</description>
  <memory unit='MiB'>$MEMORY_MIB</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <loader type='rom'>/usr/share/qemu/qboot.rom</loader>
    <kernel>$BOOT_DIR/kernel</kernel>
    <initrd>$BOOT_DIR/initrd.img</initrd>
    <cmdline>$CMDLINE</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$POOL_DIR/$VOLUME'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <interface type='user'>
      <mac address='$MAC'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
)"
uuid="$(virsh domuuid "$IMAGE_NAME" 2>/dev/null || true)"
if [ -z "$uuid" ] || [ "$(cat "$WORK/$IMAGE_NAME.xml" 2>/dev/null)" != "$xml" ]; then
  stop_image
  printf '%s\n' "$xml" >"$WORK/$IMAGE_NAME.xml.new"
  # keep the UUID of an existing definition (libvirt refuses a new one)
  if [ -n "$uuid" ]; then
    sed "s|^  <name>.*|&\n  <uuid>$uuid</uuid>|" "$WORK/$IMAGE_NAME.xml.new" >"$WORK/$IMAGE_NAME.xml.define"
  else
    cp "$WORK/$IMAGE_NAME.xml.new" "$WORK/$IMAGE_NAME.xml.define"
  fi
  virsh define "$WORK/$IMAGE_NAME.xml.define" >/dev/null
  rm -f "$WORK/$IMAGE_NAME.xml.define"
  mv -f "$WORK/$IMAGE_NAME.xml.new" "$WORK/$IMAGE_NAME.xml"
  log "defined domain $IMAGE_NAME"
fi
case "$(domain_state)" in
  running|paused) log "WARNING: the image domain $IMAGE_NAME is running (it should stay shut off; clone it instead)" ;;
esac
