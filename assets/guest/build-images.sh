#!/usr/bin/env bash
# Build the Parvis test-guest images (Debian kernel + busybox initramfs) into
#   ${PARVIS_CACHE:-$HOME/.cache/parvis}/images/
# Outputs: vmlinuz vmlinux kernel-release l2-initramfs.cpio l2-storvsc.cpio l1-initramfs.cpio
# manifest.txt
# Idempotent: a no-op (well under a second) when the outputs exist and were built
# from the current build-images.sh, l1-init.sh, l2-init.sh, storvsc-init.sh, parvis-drm.c and
# parvis-io.c. Logs go to stderr;
# the only line on stdout is the images directory.
# Options: --force (or PARVIS_FORCE_REBUILD=1) rebuilds unconditionally.
# Needs: apt-get, apt-cache, dpkg-deb, cpio, xz, sha256sum, flock, GNU grep, gcc (static libc).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${PARVIS_CACHE:-$HOME/.cache/parvis}
OUT=$CACHE_ROOT/images
OUTPUTS=(vmlinuz vmlinux kernel-release l2-initramfs.cpio l2-storvsc.cpio l1-initramfs.cpio manifest.txt)
INPUTS=(build-images.sh l1-init.sh l2-init.sh storvsc-init.sh parvis-drm.c parvis-io.c)
FORCE=${PARVIS_FORCE_REBUILD:-0}

log() { printf 'build-images: %s\n' "$*" >&2; }
die() {
	printf 'build-images: ERROR: %s\n' "$*" >&2
	exit 1
}

for arg in "$@"; do
	case "$arg" in
	--force) FORCE=1 ;;
	-h | --help)
		sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown argument: $arg" ;;
	esac
done

# Hash of everything that determines the outputs (README changes do not count).
input_hash() {
	(cd "$SCRIPT_DIR" && sha256sum "${INPUTS[@]}") | sha256sum | cut -d' ' -f1
}
STAMP=$(input_hash)

up_to_date() {
	[ "$FORCE" = 1 ] && return 1
	local f
	for f in "${OUTPUTS[@]}"; do
		[ -s "$OUT/$f" ] || return 1
	done
	grep -qx "inputs-sha256 $STAMP" "$OUT/manifest.txt"
}

mkdir -p "$CACHE_ROOT"
# Serialise concurrent callers (parallel tests); the check is repeated under the lock.
exec 9>"$CACHE_ROOT/images.lock"
flock 9
if up_to_date; then
	printf '%s\n' "$OUT"
	exit 0
fi

for tool in apt-get apt-cache dpkg-deb cpio xz sha256sum grep od find sort gcc; do
	command -v "$tool" >/dev/null || die "missing tool: $tool"
done

START=$SECONDS
WORK=$(mktemp -d "$CACHE_ROOT/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
log "building into $OUT (work dir $WORK)"

as_root() {
	if [ "$(id -u)" = 0 ]; then
		"$@"
	elif command -v sudo >/dev/null; then
		sudo -n "$@"
	else
		die "need root for: $*"
	fi
}

APT_UPDATED=0
apt_update_once() {
	[ "$APT_UPDATED" = 1 ] && return 1
	APT_UPDATED=1
	log "apt-get update"
	as_root apt-get update -qq >&2 || die "apt-get update failed"
}

# candidate_version(pkg)
candidate_version() {
	apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }'
}

# kernel_package: the linux-image-<release> package that linux-image-amd64 depends on.
kernel_package() {
	apt-cache depends linux-image-amd64 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

# fetch_deb(pkg, version): download into $WORK/debs, verify against the apt index.
# Prints the path of the .deb.
fetch_deb() {
	local pkg=$1 ver=$2 deb sum
	mkdir -p "$WORK/debs"
	rm -f "$WORK/debs/${pkg}_"*.deb
	if ! (cd "$WORK/debs" && apt-get download -q "$pkg=$ver" >&2 2>"$WORK/apt.err"); then
		cat "$WORK/apt.err" >&2
		return 1
	fi
	deb=$(find "$WORK/debs" -maxdepth 1 -name "${pkg}_*.deb" -print -quit)
	[ -n "$deb" ] || die "apt-get download $pkg=$ver produced no .deb"
	[ "$(dpkg-deb -f "$deb" Package)" = "$pkg" ] || die "$deb is not $pkg"
	[ "$(dpkg-deb -f "$deb" Version)" = "$ver" ] || die "$deb is not version $ver"
	sum=$(sha256sum "$deb" | cut -d' ' -f1)
	local expected
	expected=$(apt-cache show "$pkg=$ver" 2>/dev/null | awk '$1 == "SHA256:" { print $2 }') || true
	if [ -z "$expected" ]; then
		apt_update_once || true
		expected=$(apt-cache show "$pkg=$ver" 2>/dev/null | awk '$1 == "SHA256:" { print $2 }') || true
	fi
	[ -n "$expected" ] || die "apt-cache show $pkg=$ver reports no SHA256"
	if ! grep -qxF "$sum" <<<"$expected"; then
		die "SHA256 MISMATCH for $deb: got $sum, apt index says: $(echo "$expected" | tr '\n' ' ')"
	fi
	log "verified $pkg $ver sha256 $sum"
	printf '%s\n' "$deb"
}

# resolve_and_fetch: sets KPKG KVER KDEB BVER BDEB. Retries once after apt-get update
# (stale or missing package lists).
resolve_and_fetch() {
	local attempt
	for attempt in 1 2; do
		if [ "$attempt" = 2 ]; then apt_update_once || return 1; fi
		apt-cache show linux-image-amd64 >/dev/null 2>&1 || continue
		KPKG=$(kernel_package)
		[ -n "$KPKG" ] || continue
		KVER=$(candidate_version "$KPKG")
		BVER=$(candidate_version busybox-static)
		case "$KVER/$BVER" in /* | */ | *"(none)"*) continue ;; esac
		log "kernel package $KPKG $KVER, busybox-static $BVER"
		KDEB=$(fetch_deb "$KPKG" "$KVER") || continue
		BDEB=$(fetch_deb busybox-static "$BVER") || continue
		return 0
	done
	return 1
}
resolve_and_fetch || die "could not resolve/download linux-image-amd64's kernel and busybox-static"

log "extracting debs"
KROOT=$WORK/kernel
BBROOT=$WORK/busybox
dpkg-deb -x "$KDEB" "$KROOT"
dpkg-deb -x "$BDEB" "$BBROOT"
KREL=${KPKG#linux-image-}
[ -d "$KROOT/lib/modules/$KREL" ] || die "no lib/modules/$KREL in $KDEB"
[ -f "$KROOT/boot/vmlinuz-$KREL" ] || die "no boot/vmlinuz-$KREL in $KDEB"
BUSYBOX=$BBROOT/bin/busybox
[ -x "$BUSYBOX" ] || die "no bin/busybox in $BDEB"

NEW=$WORK/out
mkdir -p "$NEW"
cp "$KROOT/boot/vmlinuz-$KREL" "$NEW/vmlinuz"
printf '%s\n' "$KREL" >"$NEW/kernel-release"

# ---------------------------------------------------------------- vmlinux
# elf_complete(file): ELF64 magic, and the section header table lies inside the file.
elf_complete() {
	local f=$1 magic shoff shentsize shnum size
	magic=$(od -An -tx1 -N4 "$f" 2>/dev/null | tr -d ' \n')
	[ "$magic" = 7f454c46 ] || return 1
	shoff=$(od -An -tu8 -j40 -N8 "$f" | tr -d ' ')
	shentsize=$(od -An -tu2 -j58 -N2 "$f" | tr -d ' ')
	shnum=$(od -An -tu2 -j60 -N2 "$f" | tr -d ' ')
	size=$(stat -c %s "$f")
	[ $((shoff + shentsize * shnum)) -le "$size" ]
}

# extract_vmlinux(bzImage, out): try every compressed-payload magic, like the
# kernel's scripts/extract-vmlinux.
extract_vmlinux() {
	local img=$1 out=$2 magic cmd off
	local -a tries=(
		'\xFD7zXZ\x00|xz -dc'
		'\x28\xB5\x2F\xFD|zstd -dcq'
		'\x1F\x8B\x08|gzip -dc'
		'\x5D\x00\x00\x00|xz -dc --format=lzma'
		'\x02\x21\x4C\x18|lz4 -dc'
		'BZh|bzip2 -dc'
	)
	local t
	for t in "${tries[@]}"; do
		magic=${t%%|*}
		cmd=${t#*|}
		command -v "${cmd%% *}" >/dev/null || continue
		while IFS= read -r off; do
			# Decompressors complain about the trailing data; judge by the result.
			# shellcheck disable=SC2086
			tail -c "+$((off + 1))" "$img" | $cmd >"$out" 2>/dev/null || true
			if elf_complete "$out"; then
				log "vmlinux: ${cmd%% *} payload at offset $off ($(stat -c %s "$out") bytes)"
				return 0
			fi
		done < <(LC_ALL=C grep -obUaP "$magic" "$img" | cut -d: -f1)
	done
	rm -f "$out"
	return 1
}
extract_vmlinux "$NEW/vmlinuz" "$NEW/vmlinux" || die "could not extract an ELF vmlinux from vmlinuz"

# ------------------------------------------------------------ module sets
MODSRC=$KROOT/lib/modules/$KREL
log "depmod on the full module tree"
"$BUSYBOX" depmod -b "$KROOT" "$KREL"
[ -s "$MODSRC/modules.dep" ] || die "busybox depmod produced no modules.dep"

# module_closure(pattern...): module paths (relative to lib/modules/<rel>)
# matching the patterns (a .ko path or a directory ending in /), plus their
# dependencies per modules.dep, transitively.
module_closure() {
	local p want=() m
	for p in "$@"; do
		if [[ $p == */ ]]; then
			[ -d "$MODSRC/$p" ] || die "module directory $p not in $KPKG"
			while IFS= read -r m; do want+=("$m"); done < <(cd "$MODSRC" && find "$p" -name '*.ko' | sort)
		else
			[ -f "$MODSRC/$p" ] || die "module $p not in $KPKG"
			want+=("$p")
		fi
	done
	awk -v list="${want[*]}" '
		BEGIN { n = split(list, w, " "); for (i = 1; i <= n; i++) need[w[i]] = 1 }
		{ k = $1; sub(/:$/, "", k); deps[k] = ""; for (i = 2; i <= NF; i++) deps[k] = deps[k] " " $i }
		END {
			do {
				changed = 0
				for (m in need) {
					c = split(deps[m], d, " ")
					for (i = 1; i <= c; i++) if (!(d[i] in need)) { need[d[i]] = 1; changed = 1 }
				}
			} while (changed)
			for (m in need) print m
		}' "$MODSRC/modules.dep" | sort
}

L2_MODULES=(
	kernel/drivers/virtio/
	kernel/drivers/block/virtio_blk.ko
	kernel/fs/ext4/ext4.ko
	kernel/crypto/crc32c_generic.ko
	kernel/drivers/misc/pvpanic/
	kernel/drivers/hv/
	kernel/drivers/hid/hid.ko
	kernel/drivers/hid/hid-generic.ko
	kernel/drivers/hid/hid-hyperv.ko
	kernel/drivers/input/serio/hyperv-keyboard.ko
	kernel/drivers/input/evdev.ko
	kernel/drivers/acpi/button.ko
	kernel/drivers/gpu/drm/hyperv/
	kernel/drivers/scsi/hv_storvsc.ko
	kernel/drivers/scsi/sd_mod.ko
	kernel/drivers/net/hyperv/
	kernel/drivers/net/virtio_net.ko
)

# What a Hyper-V-made initramfs holds: VMBus, its storage driver, the disk and ext4
# drivers; no virtio.
STORVSC_MODULES=(
	kernel/drivers/hv/hv_vmbus.ko
	kernel/drivers/scsi/hv_storvsc.ko
	kernel/drivers/scsi/sd_mod.ko
	kernel/fs/ext4/ext4.ko
	kernel/crypto/crc32c_generic.ko
)
L1_MODULES=(
	kernel/arch/x86/kvm/kvm.ko
	kernel/arch/x86/kvm/kvm-amd.ko
	kernel/virt/lib/irqbypass.ko
	kernel/drivers/crypto/ccp/ccp.ko
	kernel/net/9p/9pnet.ko
	kernel/net/9p/9pnet_virtio.ko
	kernel/fs/9p/9p.ko
	kernel/drivers/virtio/virtio_pci.ko
	kernel/drivers/net/virtio_net.ko
	kernel/drivers/net/tun.ko
	kernel/net/bridge/bridge.ko
)

# ------------------------------------------------------------- initramfs
# populate_root(root, init, modules...): busybox + applet links + modules + /init.
populate_root() {
	local root=$1 init=$2 m
	shift 2
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,tmp,run,root,etc,mnt,lib/modules/"$KREL"}
	cp "$BUSYBOX" "$root/bin/busybox"
	while IFS= read -r m; do
		m=${m#/}
		[ "$m" = bin/busybox ] && continue
		mkdir -p "$root/$(dirname "$m")"
		ln -sf /bin/busybox "$root/$m"
	done < <("$BUSYBOX" --list-full)
	[ -L "$root/bin/sh" ] || die "busybox has no sh applet"
	install -m 0755 "$SCRIPT_DIR/$init" "$root/init"
	while IFS= read -r m; do
		mkdir -p "$root/lib/modules/$KREL/$(dirname "$m")"
		cp "$MODSRC/$m" "$root/lib/modules/$KREL/$m"
	done < <(module_closure "$@")
	cp "$MODSRC/modules.builtin" "$MODSRC/modules.order" "$root/lib/modules/$KREL/"
	"$BUSYBOX" depmod -b "$root" "$KREL"
	[ -s "$root/lib/modules/$KREL/modules.dep" ] || die "depmod failed in $root"
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
	printf 'root:x:0:\n' >"$root/etc/group"
}

# newc_entry(ino, mode_hex, rdevmajor, rdevminor, name): one data-less newc header.
newc_entry() {
	local name=$5 namesize pad
	namesize=$((${#name} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%s\0' \
		"$1" "0x$2" 0 0 1 0 0 0 0 "$3" "$4" "$namesize" 0 "$name"
	pad=$(((4 - (110 + namesize) % 4) % 4))
	head -c "$pad" /dev/zero
}

# pack_cpio(root, out): uncompressed newc; /dev and /dev/console are written by
# hand first (no mknod, so no root needed) so init starts with a console.
pack_cpio() {
	local root=$1 out=$2
	{
		newc_entry 1 41ED 0 0 dev
		newc_entry 2 2180 5 1 dev/console
		(cd "$root" && find . -mindepth 1 -exec touch -h -d @0 {} + &&
			find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
			cpio --quiet -o -H newc --owner=0:0 --reproducible)
	} >"$out"
}

# check_modprobe(root, module): modules.dep in root lists the module, and the
# module and all its dependencies are present (what busybox modprobe needs).
check_modprobe() {
	local root=$1 mod=$2 line f
	local dir=$root/lib/modules/$KREL
	line=$(grep -E "(^|/)${mod//_/[-_]}\.ko:" "$dir/modules.dep" | head -n1) ||
		die "module $mod missing from modules.dep in $root"
	for f in ${line/:/}; do
		[ -f "$dir/$f" ] || die "module $mod needs $f, not in $root"
	done
}

log "L2 initramfs"
populate_root "$WORK/l2root" l2-init.sh "${L2_MODULES[@]}"
# The DRM test helper (synthetic video tests): a static program, no kernel headers needed.
gcc -static -O2 -Wall -Werror -o "$WORK/l2root/bin/parvis-drm" "$SCRIPT_DIR/parvis-drm.c" ||
	die "cannot build parvis-drm.c (needs gcc and a static libc, Debian libc6-dev)"
# The disk benchmark: static too, Linux AIO through raw system calls (no libaio).
gcc -static -O2 -Wall -Werror -pthread -o "$WORK/l2root/bin/parvis-io" "$SCRIPT_DIR/parvis-io.c" ||
	die "cannot build parvis-io.c"
for m in virtio_mmio virtio_blk virtio_pci ext4 crc32c_generic pvpanic_mmio hyperv_drm hid_hyperv \
	hyperv_keyboard hv_storvsc sd_mod; do
	check_modprobe "$WORK/l2root" "$m"
done
pack_cpio "$WORK/l2root" "$NEW/l2-initramfs.cpio"

log "L2 storvsc-only initramfs"
populate_root "$WORK/sroot" storvsc-init.sh "${STORVSC_MODULES[@]}"
for m in hv_vmbus hv_storvsc sd_mod ext4 crc32c_generic; do
	check_modprobe "$WORK/sroot" "$m"
done
if (cd "$WORK/sroot/lib/modules/$KREL" && find . -name 'virtio*' | grep -q .); then
	die "the storvsc-only initramfs must hold no virtio module"
fi
pack_cpio "$WORK/sroot" "$NEW/l2-storvsc.cpio"

log "L1 initramfs"
populate_root "$WORK/l1root" l1-init.sh "${L1_MODULES[@]}"
for m in kvm_amd 9pnet_virtio 9p virtio_pci virtio_net; do
	check_modprobe "$WORK/l1root" "$m"
done
mkdir -p "$WORK/l1root/images"
cp "$NEW/vmlinux" "$NEW/vmlinuz" "$NEW/l2-initramfs.cpio" "$NEW/l2-storvsc.cpio" "$NEW/kernel-release" \
	"$WORK/l1root/images/"
pack_cpio "$WORK/l1root" "$NEW/l1-initramfs.cpio"

# ---------------------------------------------------------------- manifest
{
	echo "# Parvis guest images, built by assets/guest/build-images.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "inputs-sha256 $STAMP"
	echo "kernel-release $KREL"
	echo "deb $KPKG $KVER $(sha256sum "$KDEB" | cut -d' ' -f1)"
	echo "deb busybox-static $BVER $(sha256sum "$BDEB" | cut -d' ' -f1)"
	for f in vmlinuz vmlinux kernel-release l2-initramfs.cpio l2-storvsc.cpio l1-initramfs.cpio; do
		echo "file $f $(stat -c %s "$NEW/$f") $(sha256sum "$NEW/$f" | cut -d' ' -f1)"
	done
	for r in l2 s l1; do
		echo "modules-$r $(cd "$WORK/${r}root/lib/modules/$KREL" && find kernel -name '*.ko' -printf '%f\n' | sort | tr '\n' ' ')"
	done
} >"$NEW/manifest.txt"

# Swap the new directory in (the manifest with the stamp is part of it).
rm -rf "$OUT.old"
[ -e "$OUT" ] && mv "$OUT" "$OUT.old"
mv "$NEW" "$OUT"
rm -rf "$OUT.old"
log "done in $((SECONDS - START)) s: $(cd "$OUT" && stat -c '%n=%s' "${OUTPUTS[@]}" | tr '\n' ' ')"
printf '%s\n' "$OUT"
