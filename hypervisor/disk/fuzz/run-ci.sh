#!/usr/bin/env bash
# Build the parvis_disk fuzz targets (VHD and VHDX opened read-only and read-write) on the
# stable toolchain and run each for a bounded time over its seed corpus; see .ci/fuzz.sh.
#
#   hypervisor/disk/fuzz/run-ci.sh [SECONDS_PER_TARGET]     (default 30, or $FUZZ_SECONDS)
#
# Builds and the grown corpus live in "$CARGO_TARGET_DIR/fuzz" (else hypervisor/disk/fuzz/target).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$here/../../../.ci/fuzz.sh" "$here" fuzz "${1:-${FUZZ_SECONDS:-30}}" 65536 \
    vhd_open_read=seeds/vhd vhd_open_rw=seeds/vhd-rw vhdx_open_rw=seeds/vhdx
