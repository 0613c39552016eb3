#!/usr/bin/env bash
# Install what building and testing Parvis needs on a Debian 12 machine. Idempotent: it
# installs only what is missing.
#
# qemu-system-x86 and qemu-utils are installed together at the same version: a newer
# qemu-utils from backports would otherwise be removed by apt, leaving no qemu-img.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
for cmd_pkg in qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio \
    xz:xz-utils iasl:acpica-tools mke2fs:e2fsprogs; do
    command -v "${cmd_pkg%%:*}" >/dev/null 2>&1 || need+=("${cmd_pkg#*:}")
done
if [ -x /bin/busybox ] && ! /bin/busybox --list >/dev/null 2>&1; then need+=(busybox-static); fi
# The static busybox is what the guest images use.
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)

qemu_ok() {
    command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null &&
        [ "$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null)" = \
          "$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null)" ]
}

if [ ${#need[@]} -eq 0 ] && qemu_ok; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
if [ -z "$v" ] || [ "$v" = "(none)" ]; then
    echo "setup-host: qemu-system-x86 is not available from apt" >&2
    exit 1
fi
$SUDO apt-get install -y -qq --allow-downgrades \
    "qemu-system-x86=$v" "qemu-utils=$v" "qemu-system-common=$v" "qemu-block-extra=$v" \
    busybox-static cpio xz-utils acpica-tools e2fsprogs >/dev/null
qemu_ok || { echo "setup-host: qemu-system-x86 and qemu-utils versions differ" >&2; exit 1; }
