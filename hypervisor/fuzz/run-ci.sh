#!/usr/bin/env bash
# Build the VMM's fuzz targets (VMBus ring layer, VMBus control plane, synthetic device
# parsers) on the stable toolchain and run each for a bounded time over its seeds; see
# .ci/fuzz.sh.
#
#   hypervisor/fuzz/run-ci.sh [SECONDS_PER_TARGET]     (default 30, or $FUZZ_SECONDS)
#
# Builds and the grown corpus live in "$CARGO_TARGET_DIR/fuzz-hypervisor" (else
# hypervisor/fuzz/target).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$here/../../.ci/fuzz.sh" "$here" fuzz-hypervisor "${1:-${FUZZ_SECONDS:-30}}" 16384 \
    vmbus_ring=seeds/vmbus_ring vmbus_control=seeds/vmbus_control \
    synth_devices=seeds/synth_devices storvsp=seeds/storvsp \
    netvsp=seeds/netvsp icvsp=seeds/icvsp
