#!/usr/bin/env bash
# Build the parvis_disk fuzz targets on the stable toolchain and run each for a bounded time
# over its seed corpus. Exits non-zero if a build fails or the fuzzer finds a crash, a
# timeout or an out-of-memory input (the input is saved under $WORK/artifacts/<target>/).
#
#   hypervisor/disk/fuzz/run-ci.sh [SECONDS_PER_TARGET]     (default 30, or $FUZZ_SECONDS)
#
# Idempotent: cargo-fuzz is installed only if missing; builds and the grown corpus live in a
# cached directory, "$CARGO_TARGET_DIR/fuzz" when CARGO_TARGET_DIR is set (else
# hypervisor/disk/fuzz/target), so later runs rebuild nothing and start from what earlier
# runs found. Nothing is written into the source tree.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
seconds="${1:-${FUZZ_SECONDS:-30}}"
work="${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}"
work="${work:-$here/target}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz passes -Z flags to cargo and rustc; RUSTC_BOOTSTRAP lets the stable toolchain
# take them. Without a sanitizer (-s none) nothing needs nightly; the build still has
# coverage instrumentation, debug assertions and overflow checks (cargo-fuzz's default).
export RUSTC_BOOTSTRAP=1
cd "$here"
cargo fuzz build -s none --target-dir "$work" >&2

host="$(rustc -vV | sed -n 's/^host: //p')"
bin="$work/$host/release"

declare -A seeds=([vhd_open_read]=seeds/vhd [vhd_open_rw]=seeds/vhd-rw [vhdx_open_rw]=seeds/vhdx)
status=0
for target in vhd_open_read vhd_open_rw vhdx_open_rw; do
    corpus="$work/corpus/$target"
    artifacts="$work/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    echo "fuzz: $target for ${seconds}s (corpus $corpus)" >&2
    # The first directory collects new inputs; the seeds are only read.
    if ! "$bin/$target" "$corpus" "$here/${seeds[$target]}" \
        -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
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
