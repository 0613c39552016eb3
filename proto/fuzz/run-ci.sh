#!/usr/bin/env bash
# Build the proto fuzz target (the agent's UploadDisk stream decoder) on the stable toolchain
# and run it for a bounded time over its seeds. Exits non-zero if the build fails or the
# fuzzer finds a crash, a timeout or an out-of-memory input (saved under
# $WORK/artifacts/<target>/). Same scheme as hypervisor/disk/fuzz/run-ci.sh.
#
#   proto/fuzz/run-ci.sh [SECONDS_PER_TARGET]     (default 30, or $FUZZ_SECONDS)
#
# Builds and the grown corpus live in "$CARGO_TARGET_DIR/fuzz-proto" when CARGO_TARGET_DIR
# is set (else proto/fuzz/target). Nothing is written into the tree.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
seconds="${1:-${FUZZ_SECONDS:-30}}"
work="${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz-proto}"
work="${work:-$here/target}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz passes -Z flags; RUSTC_BOOTSTRAP lets stable take them. No sanitizer (-s none):
# coverage instrumentation, debug assertions and overflow checks remain.
export RUSTC_BOOTSTRAP=1
cd "$here"
cargo fuzz build -s none --target-dir "$work" >&2

host="$(rustc -vV | sed -n 's/^host: //p')"
bin="$work/$host/release"

status=0
for target in upload_wire; do
    corpus="$work/corpus/$target"
    artifacts="$work/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    echo "fuzz: $target for ${seconds}s (corpus $corpus)" >&2
    if ! "$bin/$target" "$corpus" "$here/seeds/$target" \
        -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 2>"$work/$target.log"; then
        status=1
        echo "fuzz: $target FAILED; the last lines of $work/$target.log:" >&2
        tail -n 40 "$work/$target.log" >&2
        ls -l "$artifacts" >&2
    else
        grep -E '^stat::(number_of_executed_units|new_units_added)' "$work/$target.log" >&2 || true
    fi
done
exit "$status"
