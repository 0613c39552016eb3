#!/usr/bin/env bash
# Build one cargo-fuzz crate's targets on the stable toolchain and run each for a bounded
# time over its seeds (the run-ci.sh beside each fuzz crate calls this). Exits non-zero if
# the build fails or the fuzzer finds a crash, a timeout or an out-of-memory input (saved
# under $WORK/artifacts/<target>/).
#
#   .ci/fuzz.sh CRATE_DIR WORK_NAME SECONDS MAX_LEN TARGET=SEED_DIR...
#
# Idempotent: cargo-fuzz is installed only if missing; builds and the grown corpus live in
# "$CARGO_TARGET_DIR/WORK_NAME" when CARGO_TARGET_DIR is set (else CRATE_DIR/target), so
# later runs rebuild nothing and start from what earlier runs found. Nothing is written into
# the source tree.
set -euo pipefail

here="$(cd "$1" && pwd)"
work="${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/$2}"
work="${work:-$here/target}"
seconds="$3"
max_len="$4"
shift 4

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

status=0
for spec in "$@"; do
    target="${spec%%=*}"
    corpus="$work/corpus/$target"
    artifacts="$work/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    echo "fuzz: $target for ${seconds}s (corpus $corpus)" >&2
    # The first directory collects new inputs; the seeds are only read.
    if ! "$bin/$target" "$corpus" "$here/${spec#*=}" \
        -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
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
