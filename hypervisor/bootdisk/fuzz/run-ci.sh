#!/usr/bin/env bash
# Build the boot-disk reader's fuzz targets on the stable toolchain and run each for a
# bounded time over its seeds; see .ci/fuzz.sh.
#
#   hypervisor/bootdisk/fuzz/run-ci.sh [SECONDS]     (default 30, or $FUZZ_SECONDS)
#
# Builds and the grown corpus live in "$CARGO_TARGET_DIR/fuzz-bootdisk" (else
# hypervisor/bootdisk/fuzz/target).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$here/../../../.ci/fuzz.sh" "$here" fuzz-bootdisk "${1:-${FUZZ_SECONDS:-30}}" 262144 \
    partitions=seeds/partitions ext4=seeds/ext4 xfs=seeds/xfs btrfs=seeds/btrfs \
    vfat=seeds/vfat grub_cfg=seeds/grub_cfg disk=seeds/disk
