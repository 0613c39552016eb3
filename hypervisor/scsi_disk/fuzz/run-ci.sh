#!/usr/bin/env bash
# Build the SCSI disk emulator's fuzz target (ScsiDisk::execute and the controller helpers
# fed arbitrary CDBs, parameter lists and buffer sizes) on the stable toolchain and run it
# for a bounded time over its seeds; see .ci/fuzz.sh.
#
#   hypervisor/scsi_disk/fuzz/run-ci.sh [SECONDS]     (default 30, or $FUZZ_SECONDS)
#
# Builds and the grown corpus live in "$CARGO_TARGET_DIR/fuzz-scsi-disk" (else
# hypervisor/scsi_disk/fuzz/target).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$here/../../../.ci/fuzz.sh" "$here" fuzz-scsi-disk "${1:-${FUZZ_SECONDS:-30}}" 4096 \
    execute=seeds/execute
