#!/usr/bin/env bash
# Build the proto fuzz target (the agent's UploadDisk stream decoder) on the stable
# toolchain and run it for a bounded time over its seeds; see .ci/fuzz.sh.
#
#   proto/fuzz/run-ci.sh [SECONDS_PER_TARGET]     (default 30, or $FUZZ_SECONDS)
#
# Builds and the grown corpus live in "$CARGO_TARGET_DIR/fuzz-proto" (else proto/fuzz/target).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$here/../../.ci/fuzz.sh" "$here" fuzz-proto "${1:-${FUZZ_SECONDS:-30}}" 16384 \
    upload_wire=seeds/upload_wire
