#!/usr/bin/env bash
# parvis-console for Windows: cross-build parvis-console.exe (x86_64-pc-windows-gnu) on
# Debian 12, then smoke-test it under Xvfb + Wine against a real parvis-agent on loopback.
#
#   tests/windows-console.sh [all|build|test] [--release]     (default: all, debug)
#
# build: Debian's own Rust (rustc-web 1.96, called by absolute path since rustup's comes
#   first on PATH) rebuilds the Windows std from Debian's std sources (-Z build-std) and
#   mingw-w64 links. The target dir is cached outside the clone
#   ($PARVIS_CACHE/target-windows), the .exe is copied to
#   $PARVIS_CACHE/windows/parvis-console.exe.
# test: a parvis-agent with TLS on 127.0.0.1 (state in a temporary folder, no VM can run)
#   gets two VMs through the parvis CLI; the .exe runs under Wine with a hosts file naming
#   that agent and `--report-after`, which writes what its window shows as JSON and saves
#   the window as a PNG. Passes when the host is online and lists exactly the two VMs, the
#   picture is not blank and the console wrote its log file. Artifacts in tests/output/:
#   windows-console.png (the window), .json (its report), .log (the console's log file),
#   -agent.log and -wine.log (what they printed).
#
# Idempotent: Debian packages are installed only when missing, the Wine prefix is kept in
# $PARVIS_CACHE/wine ($PARVIS_CACHE: ~/.cache/parvis by default). Exits non-zero with the
# reason on the last line ("windows-console: FAILED: ...") when anything fails.
# Needs root or sudo for apt-get, and crates.io (std's own dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

what=all
profile=debug
for a in "$@"; do
    case "$a" in
        all | build | test) what=$a ;;
        --release) profile=release ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *) echo "windows-console: unknown argument $a (see --help)" >&2; exit 2 ;;
    esac
done

cache=${PARVIS_CACHE:-$HOME/.cache/parvis}
triple=x86_64-pc-windows-gnu
win_target=$cache/target-windows
exe_dir=$cache/windows
exe=$exe_dir/parvis-console.exe
out=$repo/tests/output
mkdir -p "$exe_dir" "$out"

say() { echo "windows-console: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }
# Seconds (with tenths) since the epoch, for the timings printed.
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }

# ---- Packages --------------------------------------------------------------------------

packages=(rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64 wine64 wine xvfb imagemagick)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q >/dev/null || fail "apt-get update failed"
    $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        fail "cannot install ${missing[*]}"
fi
# rust-web-src puts std's sources where rustc-web's sysroot (/usr) looks for them.
[ -f /usr/lib/rustlib/src/rust/library/std/Cargo.toml ] ||
    fail "std's sources are missing (/usr/lib/rustlib/src/rust/library); reinstall rust-web-src"

# ---- Build -----------------------------------------------------------------------------

build() {
    local cargo_profile="" started cpu0 cpu1
    [ "$profile" = release ] && cargo_profile=--release
    local built=$win_target/$triple/$profile/parvis-console.exe
    [ -e "$built" ] && say "building $profile parvis-console.exe (cached in $win_target)" ||
        say "building $profile parvis-console.exe from scratch into $win_target (about 7 min of CPU)"
    started=$(now)
    cpu0=$(awk '{ print $14 + $15 + $16 + $17 }' /proc/$$/stat)
    # A subshell so that none of this reaches the test below.
    (
        export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
        # -Z build-std on a stable compiler. Unstable cargo: pinned by Debian's package.
        export RUSTC_BOOTSTRAP=1
        export CARGO_TARGET_DIR=$win_target
        export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc
        # ring and zstd-sys compile C for the target.
        export CC_x86_64_pc_windows_gnu=x86_64-w64-mingw32-gcc
        export AR_x86_64_pc_windows_gnu=x86_64-w64-mingw32-ar
        # Line tables are enough for a panic's backtrace in the log; full debug info makes
        # the debug .exe about 400 MB and its link slow.
        export CARGO_PROFILE_DEV_DEBUG=line-tables-only
        # Shares the machine (CI has 2 cores; other builds may be running).
        nice -n 15 /usr/bin/cargo build $cargo_profile --locked -j "${PARVIS_WINDOWS_JOBS:-2}" \
            -Z build-std=std,panic_abort --target $triple \
            -p console_gui --bin parvis-console
    ) || fail "cargo build for $triple failed (see above)"
    # CPU of the children this shell waited for (cargo, rustc, gcc), in clock ticks.
    cpu1=$(awk '{ print $14 + $15 + $16 + $17 }' /proc/$$/stat)
    [ -f "$built" ] || fail "cargo reported success but $built is missing"
    cp -f "$built" "$exe.tmp" && mv -f "$exe.tmp" "$exe"
    say "built $exe ($(du -m "$exe" | cut -f1) MB) in $(since "$started") s wall," \
        "$(( (cpu1 - cpu0) / $(getconf CLK_TCK) )) s CPU"
    # Only system DLLs: one file is enough to ship.
    local dlls
    dlls=$(x86_64-w64-mingw32-objdump -p "$exe" | sed -n 's/^\tDLL Name: //p' | sort -u | tr '\n' ' ')
    say "imports: $dlls"
    case " $dlls" in
        *" lib"*) fail "parvis-console.exe needs mingw's DLLs ($dlls); it must link them statically" ;;
    esac
    local subsystem
    subsystem=$(x86_64-w64-mingw32-objdump -p "$exe" | sed -n 's/^Subsystem[[:space:]]*//p')
    case "$subsystem" in
        *"Windows GUI"*) ;;
        *) fail "parvis-console.exe is not a GUI-subsystem program (Subsystem $subsystem)" ;;
    esac
}

# ---- Smoke test under Wine -------------------------------------------------------------

# Wine 8.0 (Debian 12) has no bcryptprimitives.dll, whose ProcessPrng every Rust >= 1.78
# std imports (every Windows 10/11 has it). A test-only stand-in for the Wine prefix,
# calling RtlGenRandom; never shipped.
shim() {
    local dir=$cache/windows/shim
    mkdir -p "$dir"
    cat >"$dir/bcryptprimitives.c.new" <<'C'
#include <windows.h>
#define SystemFunction036 NTAPI SystemFunction036
#include <ntsecapi.h>
#undef SystemFunction036

/* Test-only (Wine 8): fills d with n random bytes, as Windows' ProcessPrng does. */
BOOL WINAPI ProcessPrng(PBYTE d, SIZE_T n)
{
    while (n) {
        ULONG k = n > 0x40000000 ? 0x40000000 : (ULONG)n;
        if (!RtlGenRandom(d, k))
            return FALSE;
        d += k;
        n -= k;
    }
    return TRUE;
}
C
    if ! cmp -s "$dir/bcryptprimitives.c.new" "$dir/bcryptprimitives.c" ||
        [ ! -f "$dir/bcryptprimitives.dll" ]; then
        mv -f "$dir/bcryptprimitives.c.new" "$dir/bcryptprimitives.c"
        printf 'LIBRARY bcryptprimitives\nEXPORTS\nProcessPrng\n' >"$dir/bcryptprimitives.def"
        x86_64-w64-mingw32-gcc -O2 -shared -o "$dir/bcryptprimitives.dll" \
            "$dir/bcryptprimitives.c" "$dir/bcryptprimitives.def" -ladvapi32 ||
            fail "cannot build the test-only bcryptprimitives.dll"
    fi
    rm -f "$dir/bcryptprimitives.c.new"
    echo "$dir/bcryptprimitives.dll"
}

# A Linux path as Wine's Z: drive sees it.
winpath() { printf 'Z:%s' "${1//\//\\}"; }

# Wait up to $2 s for a line matching $3 in file $1; print its first match's capture.
wait_line() {
    local file=$1 secs=$2 re=$3 i
    for ((i = 0; i < secs * 10; i++)); do
        if grep -qE "$re" "$file" 2>/dev/null; then
            sed -nE "s/.*$re.*/\\1/p" "$file" | head -n1
            return 0
        fi
        kill -0 "$agent_pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

tmp=""
agent_pid=""
xvfb_pid=""
cleanup() {
    set +e
    if [ -n "$agent_pid" ]; then kill "$agent_pid" 2>/dev/null; wait "$agent_pid" 2>/dev/null; fi
    if [ -n "${WINEPREFIX:-}" ]; then wineserver -k 2>/dev/null; fi
    if [ -n "$xvfb_pid" ]; then kill "$xvfb_pid" 2>/dev/null; wait "$xvfb_pid" 2>/dev/null; fi
    if [ -n "$tmp" ]; then
        # Whatever happened, what the agent and Wine said.
        cp -f "$tmp/agent.log" "$out/windows-console-agent.log" 2>/dev/null
        cp -f "$tmp/wine.log" "$out/windows-console-wine.log" 2>/dev/null
        rm -rf "$tmp"
    fi
    return 0
}

smoke_test() {
    [ -f "$exe" ] || fail "no $exe; run tests/windows-console.sh build first"
    local started
    started=$(now)
    tmp=$(mktemp -d /tmp/parvis-wine-smoke.XXXXXX)
    trap cleanup EXIT
    rm -f "$out"/windows-console.{png,json,log} "$out"/windows-console-{agent,wine}.log

    # The agent and the CLI: this workspace's ordinary debug build.
    local target=${CARGO_TARGET_DIR:-$cache/target}
    say "building parvis-agent and parvis (debug, $target)"
    CARGO_TARGET_DIR=$target nice -n 10 cargo build -q -p agent --bin parvis-agent --bin parvis ||
        fail "cannot build parvis-agent and parvis"
    local agent=$target/debug/parvis-agent cli=$target/debug/parvis

    # The agent: TLS on a free loopback port, its own state; workers cannot run (/bin/false),
    # which the smoke test does not need. A boot image so that VMs can be created.
    local state=$tmp/state agent_log=$tmp/agent.log
    mkdir -p "$state/boot/default"
    : >"$state/boot/default/kernel"
    "$agent" --state-dir "$state" --listen 127.0.0.1:0 --tls --worker /bin/false \
        >"$agent_log" 2>&1 </dev/null &
    agent_pid=$!
    local addr fingerprint token
    addr=$(wait_line "$agent_log" 60 'listening on ([0-9.]+:[0-9]+)') ||
        fail "the agent did not start: $(tail -n 3 "$agent_log")"
    fingerprint=$(wait_line "$agent_log" 10 'fingerprint: ([0-9A-Fa-f:]+)') ||
        fail "the agent printed no TLS fingerprint"
    token=$(wait_line "$agent_log" 10 'token: ([^ ]+)') || fail "the agent printed no token"
    say "agent on $addr (TLS)"

    # Two VMs, through the CLI as a user would make them.
    local vm
    for vm in wine-smoke-one wine-smoke-two; do
        PARVIS_CONFIG=$tmp/cli-hosts.json PARVIS_ADDR=$addr PARVIS_TOKEN=$token \
            PARVIS_FINGERPRINT=$fingerprint "$cli" vm create --name "$vm" --boot-image default \
            >/dev/null || fail "parvis vm create --name $vm failed"
    done

    # The console's saved hosts: that agent, trusted.
    local hosts=$tmp/hosts.json
    printf '{"hosts":[{"name":"wine-smoke","addr":"%s","token":"%s","fingerprint":"%s"}]}\n' \
        "$addr" "$token" "$fingerprint" >"$hosts"

    # Wine: a cached prefix with the test-only DLL; no Mono or Gecko prompts.
    export WINEPREFIX=$cache/wine WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml="
    local dll
    dll=$(shim)
    if [ ! -f "$WINEPREFIX/system.reg" ]; then
        say "creating the Wine prefix $WINEPREFIX"
        # "failed to open ...syswow64\rundll32.exe" is harmless (no 32-bit Wine).
        wineboot -i >/dev/null 2>&1 || true
        wineserver -w 2>/dev/null || true
        [ -f "$WINEPREFIX/system.reg" ] || fail "wineboot did not create $WINEPREFIX"
    fi
    cp -f "$dll" "$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll"
    # The console's log (in %APPDATA%\parvis): the test wants a fresh one.
    find "$WINEPREFIX/drive_c/users" -path '*/AppData/Roaming/parvis/console.log*' -delete 2>/dev/null || true

    # An X screen with room for the 1280x860 window (no window manager, so no frame).
    : >"$tmp/display"
    Xvfb -displayfd 9 -screen 0 1440x960x24 -nolisten tcp 9>"$tmp/display" 2>"$tmp/xvfb.log" &
    xvfb_pid=$!
    local i
    for ((i = 0; i < 100; i++)); do [ -s "$tmp/display" ] && break; sleep 0.1; done
    [ -s "$tmp/display" ] || fail "Xvfb did not start: $(tail -n 3 "$tmp/xvfb.log")"
    export DISPLAY=:$(head -n1 "$tmp/display")

    # The console: reports as soon as the host is online with its VMs (at most 120 s).
    local report=$tmp/report.json status=0
    say "running parvis-console.exe under Wine on $DISPLAY"
    LIBGL_ALWAYS_SOFTWARE=1 timeout 300 wine "$exe" --config "$(winpath "$hosts")" \
        --report-after 120 "$(winpath "$report")" >"$tmp/wine.log" 2>&1 </dev/null || status=$?
    # Artifacts, whatever happened.
    local log
    log=$(find "$WINEPREFIX/drive_c/users" -path '*/AppData/Roaming/parvis/console.log' 2>/dev/null | head -n1)
    [ -n "$log" ] && cp -f "$log" "$out/windows-console.log"
    [ -f "$report" ] && cp -f "$report" "$out/windows-console.json"
    [ -f "${report%.json}.png" ] && cp -f "${report%.json}.png" "$out/windows-console.png"
    if [ "$status" -ne 0 ]; then
        sed 's/^/  wine: /' "$tmp/wine.log" | tail -n 20 >&2
        [ -n "$log" ] && sed 's/^/  console.log: /' "$log" | tail -n 20 >&2
        fail "parvis-console.exe exited with status $status under Wine"
    fi

    # What the window showed, from the app itself.
    [ -f "$report" ] || fail "the console wrote no report"
    local wrong
    wrong=$(python3 - "$report" wine-smoke wine-smoke-one wine-smoke-two 2>&1 <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
host, want = sys.argv[2], sorted(sys.argv[3:])
hosts = {h["name"]: h for h in r["hosts"]}
problems = []
if list(hosts) != [host]:
    problems.append(f"hosts {list(hosts)}, not [{host!r}]")
else:
    h = hosts[host]
    if h["status"] != "online":
        problems.append(f"host {host} is {h['status']}, not online")
    got = sorted(v["name"] for v in h["vms"])
    if got != want:
        problems.append(f"host {host} lists VMs {got}, not {want}")
print("; ".join(problems))
PY
    ) || fail "the console's report is not what report.rs writes: $wrong"
    [ -z "$wrong" ] || fail "the window showed: $wrong (tests/output/windows-console.json)"
    # The window's picture: the right size and not blank (a drawn UI has many colours).
    local png=$out/windows-console.png size colours
    [ -f "$png" ] || fail "the console saved no picture of its window"
    size=$(identify -format '%wx%h' "$png") || fail "$png is not an image"
    colours=$(identify -format '%k' "$png")
    [ "$colours" -ge 50 ] || fail "the window's picture is blank ($colours colours, $size)"
    # The log file in %APPDATA%\parvis.
    [ -n "$log" ] || fail "the console wrote no log file in %APPDATA%\\parvis"
    grep -q "wrote the report" "$log" || fail "the console's log ($log) lacks the report line"

    say "passed in $(since "$started") s: host online with its 2 VMs, window $size" \
        "($colours colours), log in the prefix's ${log#"$WINEPREFIX"/}"
    say "artifacts: $out/windows-console.png, .json, .log"
}

case "$what" in
    build) build ;;
    test) smoke_test ;;
    all) build; smoke_test ;;
esac
