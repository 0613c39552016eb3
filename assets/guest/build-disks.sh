#!/usr/bin/env bash
# Build realistic Debian 12 guest disks into
#   ${PARVIS_CACHE:-$HOME/.cache/parvis}/disks/
# Outputs: debian12-gen2.vhdx debian12-gen1.vhdx azure-fixed.vhd xfs-bls.vhdx no-linux.vhdx
# manifest.txt (plus build.log and configs/, the boot configuration each disk carries).
# Idempotent: a no-op (well under a second) when the outputs exist and were built from the
# current build-disks.sh, disk-marker.sh and disk-parvis-marker.service. The debootstrapped
# base is cached in disks-base/, keyed by the hash of its recipe (a part of this script).
# Logs go to stderr; the only line on stdout is the disks directory.
# Options: --force (or PARVIS_FORCE_REBUILD=1) rebuilds the base and the disks.
# Needs: root, network access to deb.debian.org, debootstrap, qemu-img, sfdisk + partx,
# losetup, mkfs.ext4 + e2fsck, mkfs.xfs + xfs_repair, mkfs.vfat + fsck.vfat, mtools, zstd.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${PARVIS_CACHE:-$HOME/.cache/parvis}
OUT=$CACHE_ROOT/disks
BASE_CACHE=$CACHE_ROOT/disks-base
DISKS=(debian12-gen2.vhdx debian12-gen1.vhdx azure-fixed.vhd xfs-bls.vhdx no-linux.vhdx)
OUTPUTS=("${DISKS[@]}" manifest.txt)
INPUTS=(build-disks.sh disk-marker.sh disk-parvis-marker.service)
FORCE=${PARVIS_FORCE_REBUILD:-0}

log() { printf 'build-disks: %s\n' "$*" >&2; }
die() {
	printf 'build-disks: ERROR: %s\n' "$*" >&2
	exit 1
}

for arg in "$@"; do
	case "$arg" in
	--force) FORCE=1 ;;
	-h | --help)
		sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
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
exec 9>>"$CACHE_ROOT/disks.lock"
flock 9
if up_to_date; then
	printf '%s\n' "$OUT"
	exit 0
fi

if [ "$(id -u)" != 0 ]; then
	command -v sudo >/dev/null || die "needs root (debootstrap, loop devices, mount, chroot)"
	log "not root: running again with sudo"
	flock -u 9
	exec 9>&-
	exec sudo -n env PARVIS_CACHE="$CACHE_ROOT" PARVIS_FORCE_REBUILD="$FORCE" \
		bash "$SCRIPT_DIR/build-disks.sh"
fi

for tool in debootstrap qemu-img sfdisk partx losetup mount umount chroot mkfs.ext4 e2fsck \
	debugfs mkfs.xfs xfs_repair mkfs.vfat fsck.vfat mcopy mmd mdir zstd tar fstrim sha256sum \
	findmnt awk; do
	command -v "$tool" >/dev/null || die "missing tool: $tool (tests/setup-host.sh installs it)"
done

START=$SECONDS
WORK=$(mktemp -d "$CACHE_ROOT/.disks-build.XXXXXX")
LOG=$WORK/build.log
: >"$LOG"
MOUNTS=() # mount points made by this script, innermost last
LOOPS=()  # loop devices attached by this script

# unmount_all: unmount everything this script mounted, innermost first.
unmount_all() {
	local i
	for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
		umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}" 2>/dev/null ||
			log "cannot unmount ${MOUNTS[i]}"
	done
	MOUNTS=()
}
# release: unmount_all, then detach this script's loop devices.
release() {
	local i
	unmount_all
	for i in "${LOOPS[@]}"; do
		losetup -d "$i" 2>/dev/null || log "cannot detach $i"
	done
	LOOPS=()
}
cleanup() {
	local rc=$?
	release
	if [ "$rc" != 0 ] && [ -s "$LOG" ]; then
		cp "$LOG" "$CACHE_ROOT/disks-failed.log"
		log "full log: $CACHE_ROOT/disks-failed.log"
	fi
	# Never delete through a mount that is still there (the chroot's bind mounts).
	if grep -qF " $WORK/" /proc/self/mounts; then
		log "something is still mounted under $WORK; not deleting it"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
log "building into $OUT (work dir $WORK, log $LOG)"

# run cmd...: the command's output goes to the log; on failure its tail goes to stderr.
run() {
	printf '+ %s\n' "$*" >>"$LOG"
	if ! "$@" >>"$LOG" 2>&1; then
		tail -n 40 "$LOG" >&2
		die "failed: $*"
	fi
}

mnt() {
	mount "$@" >>"$LOG" 2>&1 || die "mount $*"
	MOUNTS+=("${!#}")
}

# loop_attach VAR image [offset size]: attach the image (or the byte range of one partition:
# these kernels make no partition devices for loops) and store /dev/loopN in VAR. The numbers
# start at 32: GRUB's scripts take a /dev/loop[0-9] for a file-backed loop and look for its
# backing file, which is not in the chroot (losetup creates the device through loop-control).
loop_attach() {
	local n dev
	for ((n = 32; n < 128; n++)); do
		dev=/dev/loop$n
		[ -e "/sys/block/loop$n/loop/backing_file" ] && continue
		if [ $# -ge 4 ]; then
			losetup --offset "$3" --sizelimit "$4" "$dev" "$2" 2>>"$LOG" || continue
		else
			losetup "$dev" "$2" 2>>"$LOG" || continue
		fi
		LOOPS+=("$dev")
		printf -v "$1" '%s' "$dev"
		return 0
	done
	die "no free loop device in /dev/loop32../dev/loop127"
}

# in_chroot root cmd...: run in the chroot with a clean environment, no input.
in_chroot() {
	local r=$1
	shift
	env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb \
		DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true \
		chroot "$r" "$@" </dev/null
}

# chroot_enter root: proc, read-only sysfs, a private /dev (only the nodes added with
# chroot_dev, so nothing touches the host's /dev), tmpfs on /run, /tmp and /var/tmp (nothing
# temporary ends up in the image), and no service starts.
chroot_enter() {
	local r=$1 n
	mnt -t proc proc "$r/proc"
	mnt -t sysfs -o ro sysfs "$r/sys"
	mnt -t tmpfs -o mode=0755,size=16m parvis-dev "$r/dev"
	for n in null zero full random urandom tty ptmx; do
		cp -a "/dev/$n" "$r/dev/$n"
	done
	mkdir -p "$r/dev/pts" "$r/dev/shm" "$r/dev/disk/by-uuid"
	ln -s /proc/self/fd "$r/dev/fd"
	ln -s /proc/self/fd/0 "$r/dev/stdin"
	ln -s /proc/self/fd/1 "$r/dev/stdout"
	ln -s /proc/self/fd/2 "$r/dev/stderr"
	mnt -t tmpfs -o mode=0755 parvis-run "$r/run"
	mkdir -p "$r/run/lock"
	mnt -t tmpfs -o mode=1777 parvis-tmp "$r/tmp"
	mnt -t tmpfs -o mode=1777 parvis-vartmp "$r/var/tmp"
	printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"
	chmod 0755 "$r/usr/sbin/policy-rc.d"
}

# chroot_dev root /dev/loopN [uuid]: make the device (and /dev/disk/by-uuid/<uuid>) visible
# in the chroot.
chroot_dev() {
	cp -a "$2" "$1/dev/"
	if [ $# -ge 3 ]; then
		ln -sfn "../../${2#/dev/}" "$1/dev/disk/by-uuid/$3"
	fi
}

# ------------------------------------------------------------------ base
# BEGIN BASE RECIPE (the text up to END BASE RECIPE is the key of the cached base)
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
SECURITY_MIRROR=http://deb.debian.org/debian-security
BASE_PACKAGES=(systemd-sysv udev kmod initramfs-tools e2fsprogs zstd)
# Downloaded with the base (with their dependencies) and installed per disk without network.
POOL_SETS=(
	"linux-image-amd64"
	"linux-image-cloud-amd64"
	"grub-pc"
	"grub-efi-amd64 grub-efi-amd64-signed shim-signed"
	"xfsprogs"
)

base_sources() {
	cat <<EOF
deb $MIRROR $SUITE main
deb $SECURITY_MIRROR $SUITE-security main
deb $MIRROR $SUITE-updates main
EOF
}

# Like Debian's "slim" images: no documentation (except copyright), manuals or translations,
# now or in any package installed later. And no kernel modules for hardware that a virtual
# machine does not have (about 150 MB of the generic kernel's 400 MB). The includes keep what
# a MODULES=most initramfs takes from those trees, so that it comes out the same.
base_dpkg_excludes() {
	cat <<'EOF'
# Parvis test disks: no documentation, manuals or translations.
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
# Parvis test disks: no drivers for hardware that a virtual machine does not have.
path-exclude=/lib/modules/*/kernel/sound/*
path-include=/lib/modules/*/kernel/sound/soundcore.ko
path-include=/lib/modules/*/kernel/sound/core/*
path-exclude=/lib/modules/*/kernel/drivers/media/*
path-exclude=/lib/modules/*/kernel/drivers/net/wireless/*
path-exclude=/lib/modules/*/kernel/drivers/gpu/drm/amd/*
path-exclude=/lib/modules/*/kernel/drivers/gpu/drm/i915/*
path-exclude=/lib/modules/*/kernel/drivers/gpu/drm/nouveau/*
path-exclude=/lib/modules/*/kernel/drivers/gpu/drm/radeon/*
path-exclude=/lib/modules/*/kernel/drivers/infiniband/*
path-include=/lib/modules/*/kernel/drivers/infiniband/core/*
path-include=/lib/modules/*/kernel/drivers/infiniband/hw/mlx4/*
path-include=/lib/modules/*/kernel/drivers/infiniband/hw/mlx5/*
path-exclude=/lib/modules/*/kernel/drivers/iio/*
path-exclude=/lib/modules/*/kernel/drivers/staging/*
path-exclude=/lib/modules/*/kernel/drivers/comedi/*
path-exclude=/lib/modules/*/kernel/drivers/bluetooth/*
path-exclude=/lib/modules/*/kernel/net/bluetooth/*
path-exclude=/lib/modules/*/kernel/drivers/isdn/*
EOF
}

# build_base dir: dir/root.tar.zst (the stripped root), dir/debs (the pool), dir/lists (its
# apt lists), dir/packages.txt.
build_base() {
	local dir=$1 b=$WORK/base s
	log "base: debootstrap $SUITE minbase + ${BASE_PACKAGES[*]} (a minute or two)"
	run debootstrap --variant=minbase --arch=amd64 --components=main \
		--include="$(
			IFS=,
			echo "${BASE_PACKAGES[*]}"
		)" "$SUITE" "$b" "$MIRROR"
	base_sources >"$b/etc/apt/sources.list"
	base_dpkg_excludes >"$b/etc/dpkg/dpkg.cfg.d/parvis-slim"
	# Strip what debootstrap installed before the exclusions existed.
	find "$b/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
	find "$b/usr/share/doc" -mindepth 1 -type d -empty -delete
	rm -rf "$b"/usr/share/{man,info,locale,lintian}/*
	chroot_enter "$b"
	log "base: apt-get update + upgrade from $SUITE, $SUITE-security, $SUITE-updates"
	run in_chroot "$b" apt-get update
	run in_chroot "$b" apt-get -y --no-install-recommends dist-upgrade
	for s in "${POOL_SETS[@]}"; do
		log "base: downloading $s (and dependencies)"
		# shellcheck disable=SC2086
		run in_chroot "$b" apt-get -y --no-install-recommends --download-only install $s
	done
	release
	rm -f "$b/usr/sbin/policy-rc.d"
	mkdir -p "$dir/debs" "$dir/lists"
	mv "$b"/var/cache/apt/archives/*.deb "$dir/debs/"
	find "$b/var/lib/apt/lists" -maxdepth 1 -type f -not -name lock -exec mv -t "$dir/lists/" {} +
	rm -rf "$b"/var/cache/apt/*.bin "$b"/var/lib/apt/lists/* "$b"/var/cache/apt/archives/partial/* \
		"$b"/var/log/bootstrap.log "$b"/var/cache/debconf/*-old "$b"/var/lib/dpkg/*-old \
		"$b"/run/* "$b"/tmp/* "$b"/var/tmp/* "$b"/dev/* "$b"/etc/resolv.conf
	in_chroot "$b" dpkg-query -W -f '${Package} ${Version}\n' >"$dir/packages.txt"
	log "base: packing"
	tar -C "$b" --numeric-owner --xattrs --xattrs-include='*' -cf - . |
		zstd -q -T0 -6 -o "$dir/root.tar.zst"
	rm -rf "$b"
}
# END BASE RECIPE

BASE_KEY=$(sed -n '/^# BEGIN BASE RECIPE/,/^# END BASE RECIPE/p' "${BASH_SOURCE[0]}" |
	sha256sum | cut -c1-16)
BASE=$BASE_CACHE/$BASE_KEY
[ "$FORCE" = 1 ] && rm -rf "$BASE"
if [ -f "$BASE/done" ]; then
	log "base: cached in $BASE"
else
	rm -rf "$BASE" "$BASE.new"
	mkdir -p "$BASE.new"
	build_base "$BASE.new"
	date -u +%Y-%m-%dT%H:%M:%SZ >"$BASE.new/done"
	mv "$BASE.new" "$BASE"
	# Keep only the current base.
	find "$BASE_CACHE" -mindepth 1 -maxdepth 1 -not -name "$BASE_KEY" -exec rm -rf {} +
	log "base: built in $((SECONDS - START)) s ($(du -sh "$BASE" | cut -f1))"
fi

# The per-build copy of the pool and lists (hard links when possible), bind-mounted into
# each chroot so that neither the debs nor the lists are ever written into an image.
POOL=$WORK/pool
mkdir -p "$POOL"
cp -al "$BASE/debs" "$BASE/lists" "$POOL/" 2>/dev/null || cp -a "$BASE/debs" "$BASE/lists" "$POOL/"
mkdir -p "$POOL/debs/partial" "$POOL/lists/partial"

# ------------------------------------------------------------- helpers
# det_uuid name: a fixed random-looking UUID (version 4 layout) derived from the name, so
# that a rebuild gives the same UUIDs (and fixtures taken from the disks stay valid).
det_uuid() {
	local h
	h=$(printf 'parvis-disks:%s' "$1" | sha256sum | cut -c1-32)
	printf '%s-%s-4%s-%x%s-%s\n' "${h:0:8}" "${h:8:4}" "${h:13:3}" \
		$((0x${h:16:1} & 3 | 8)) "${h:17:3}" "${h:20:12}"
}
# det_hex name n: n fixed hex digits derived from the name.
det_hex() {
	printf 'parvis-disks:%s' "$1" | sha256sum | cut -c1-"$2"
}

GPT_ESP=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
GPT_LINUX=0FC63DAF-8483-4772-8E79-3D69D8477DE4
MIB=1048576

# new_image raw size sfdisk-script: a sparse raw image with that partition table; sets
# PSTART[n] and PSIZE[n] (bytes) for each partition n.
new_image() {
	local img=$1 nr start sectors
	rm -f "$img"
	truncate -s "$2" "$img"
	printf '%s\n' "$3" >"$WORK/sfdisk.in"
	run sfdisk --no-reread --no-tell-kernel "$img" <"$WORK/sfdisk.in"
	PSTART=()
	PSIZE=()
	while read -r nr start sectors; do
		PSTART[nr]=$((start * 512))
		PSIZE[nr]=$((sectors * 512))
	done < <(partx -g -o NR,START,SECTORS "$img")
	[ ${#PSTART[@]} -gt 0 ] || die "no partitions in $img"
}

# unpack_base root: the cached base into the mounted root, the chroot set up, apt's lists
# and pool bound in.
unpack_base() {
	local r=$1
	zstd -dc "$BASE/root.tar.zst" | tar -C "$r" --numeric-owner --xattrs --xattrs-include='*' -xpf -
	chroot_enter "$r"
	mnt --bind "$POOL/lists" "$r/var/lib/apt/lists"
	mnt --bind "$POOL/debs" "$r/var/cache/apt/archives"
}

# configure_system root hostname fstab-text: what an installer writes, plus the marker.
configure_system() {
	local r=$1 host=$2
	printf '%s\n' "$host" >"$r/etc/hostname"
	cat >"$r/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	$host

# The following lines are desirable for IPv6 capable hosts
::1     localhost ip6-localhost ip6-loopback
ff02::1 ip6-allnodes
ff02::2 ip6-allrouters
EOF
	printf '%s\n' "$3" >"$r/etc/fstab"
	# A fixed machine ID, as an installed system has one: no first-boot setup, and the BLS
	# entry names carry it.
	det_hex "machine-id-$host" 32 >"$r/etc/machine-id"
	install -m 0755 "$SCRIPT_DIR/disk-marker.sh" "$r/usr/local/sbin/parvis-marker"
	install -m 0644 "$SCRIPT_DIR/disk-parvis-marker.service" \
		"$r/etc/systemd/system/parvis-marker.service"
	run in_chroot "$r" systemctl enable parvis-marker.service
	[ -L "$r/etc/systemd/system/multi-user.target.wants/parvis-marker.service" ] ||
		die "parvis-marker.service is not enabled"
}

# fstab_header: the comment block Debian's installer writes.
fstab_header() {
	cat <<'EOF'
# /etc/fstab: static file system information.
#
# Use 'blkid' to print the universally unique identifier for a
# device; this may be used with UUID= as a more robust way to name devices
# that works even if disks are added and removed. See fstab(5).
#
# systemd generates mount units based on this file, see systemd.mount(5).
# Please run 'systemctl daemon-reload' after making changes here.
#
# <file system> <mount point>   <type>  <options>       <dump>  <pass>
EOF
}

# initramfs_modules root most|list [module...]: set before the kernel is installed, so its
# postinst builds the initramfs once, the way it stays.
initramfs_modules() {
	local r=$1 mode=$2
	shift 2
	sed -i "s/^MODULES=.*/MODULES=$mode/" "$r/etc/initramfs-tools/initramfs.conf"
	grep -qx "MODULES=$mode" "$r/etc/initramfs-tools/initramfs.conf" || die "cannot set MODULES=$mode"
	if [ $# -gt 0 ]; then
		printf '%s\n' "$@" >>"$r/etc/initramfs-tools/modules"
	fi
}

# install_pkgs root pkg...: from the pool, no network, no recommends.
install_pkgs() {
	local r=$1
	shift
	log "  installing $*"
	run in_chroot "$r" apt-get -y --no-install-recommends --no-download install "$@"
}

# preseed root line...: debconf answers.
preseed() {
	local r=$1
	shift
	printf '%s\n' "$@" >"$r/tmp/preseed"
	run in_chroot "$r" debconf-set-selections /tmp/preseed
}

# kernel_release root: the one kernel installed.
kernel_release() {
	local k
	k=$(ls "$1/lib/modules")
	[ "$(wc -w <<<"$k")" = 1 ] || die "expected one kernel in $1, found: $k"
	printf '%s\n' "$k"
}

# update_grub root root-uuid: Debian's update-grub. 10_linux writes root=UUID= only when
# /dev/disk/by-uuid/<uuid> exists (chroot_dev makes it).
update_grub() {
	local r=$1
	run in_chroot "$r" update-grub
	[ -s "$r/boot/grub/grub.cfg" ] || die "update-grub wrote no grub.cfg"
	grep -q "root=UUID=$2" "$r/boot/grub/grub.cfg" || die "grub.cfg has no root=UUID=$2"
}

# grub_default_entry grub.cfg: "kernel<TAB>initrd<TAB>arguments" of the first menuentry.
grub_default_entry() {
	awk '
		/^[ \t]*menuentry / { inside = 1 }
		inside && $1 == "linux" { k = $2; $1 = ""; $2 = ""; sub(/^[ \t]+/, ""); a = $0 }
		inside && $1 == "initrd" { i = $2 }
		inside && /^[ \t]*}/ { printf "%s\t%s\t%s\n", k, i, a; exit }
	' "$1"
}

# describe_root root disk: manifest lines about the installed system.
describe_root() {
	local r=$1 d=$2 k initrd m have=()
	k=$(kernel_release "$r")
	echo "$d kernel $k"
	in_chroot "$r" dpkg-query -W -f '${Package} ${Version}\n' |
		awk -v d="$d" '$1 ~ /^(linux-image-|grub|shim|systemd$|udev$|initramfs-tools$|e2fsprogs$|xfsprogs$)/ { print d, "package", $1, $2 }'
	initrd=$r/boot/initrd.img-$k
	[ -s "$initrd" ] || die "no $initrd"
	in_chroot "$r" lsinitramfs "/boot/initrd.img-$k" >"$WORK/lsinitramfs"
	mkdir -p "$NEW/configs/$d"
	cp "$WORK/lsinitramfs" "$NEW/configs/$d/initrd-files.txt"
	echo "$d initrd-size $(stat -c %s "$initrd")"
	echo "$d initrd-modules-count $(grep -c '\.ko$' "$WORK/lsinitramfs")"
	for m in hv_vmbus hv_storvsc sd_mod hv_netvsc virtio_blk virtio_pci virtio_mmio ext4 xfs vfat; do
		if grep -q "/$m\.ko$" "$WORK/lsinitramfs"; then have+=("$m"); fi
	done
	echo "$d initrd-has-modules ${have[*]}"
	echo "$d initramfs MODULES=$(sed -n 's/^MODULES=//p' "$r/etc/initramfs-tools/initramfs.conf")$(
		grep -v '^#' "$r/etc/initramfs-tools/modules" | grep . | tr '\n' ' ' | sed 's/^./ list: &/'
	)"
	echo "$d hostname $(cat "$r/etc/hostname")"
	echo "$d machine-id $(cat "$r/etc/machine-id")"
}

# save_config disk name file: keep a copy of a boot configuration file in configs/<disk>/.
save_config() {
	mkdir -p "$NEW/configs/$1"
	cp "$3" "$NEW/configs/$1/$2"
}

# repack_ext4 root loop uuid: the root file system made again, with mke2fs -d, from its own
# files. The kernel's allocator spreads directories over all block groups, which touches most
# 32 MiB VHDX blocks; mke2fs -d lays the files out one after the other. Same UUID, Debian's
# mke2fs defaults, same files; GRUB finds its files by UUID and path, not by block.
repack_ext4() {
	local r=$1 dev=$2 uuid=$3 tree=$WORK/tree
	unmount_all
	mnt -o ro "$dev" "$r"
	rm -rf "$tree"
	mkdir "$tree"
	tar -C "$r" --one-file-system --numeric-owner --xattrs --xattrs-include='*' --acls \
		--exclude=./lost+found -cf - . |
		tar -C "$tree" --numeric-owner --xattrs --xattrs-include='*' --acls -xpf -
	unmount_all
	run mkfs.ext4 -q -F -U "$uuid" -d "$tree" "$dev"
	rm -rf "$tree"
}

# finish_root root [mount...]: drop what only the build needed; fstrim the mounts (on a loop
# device that punches holes in the image, so freed blocks stay sparse).
finish_root() {
	local r=$1 m
	shift
	rm -f "$r/usr/sbin/policy-rc.d" "$r"/var/cache/apt/*.bin "$r"/var/cache/debconf/*-old \
		"$r"/var/lib/dpkg/*-old
	for m in "$@"; do
		run fstrim "$m"
	done
}

# partition_lines disk raw: manifest lines from the partition table.
partition_lines() {
	local d=$1 img=$2 line
	echo "$d label $(sfdisk -d "$img" | sed -n 's/^label: //p')"
	echo "$d label-id $(sfdisk -d "$img" | sed -n 's/^label-id: //p')"
	while IFS= read -r line; do
		echo "$d partition $line"
	done < <(partx -P -o NR,START,SECTORS,TYPE,UUID,NAME,FLAGS "$img")
}

# convert raw out: dynamic VHDX as Hyper-V makes them (32 MiB blocks), or a fixed VHD
# (raw + footer, the size taken exactly as given, as Azure requires).
convert() {
	case "$2" in
	*.vhdx)
		run qemu-img convert -f raw -O vhdx -o subformat=dynamic,block_size=33554432 "$1" "$2"
		run qemu-img check -f vhdx "$2"
		;;
	*.vhd)
		run qemu-img convert -f raw -O vpc -o subformat=fixed,force_size=on "$1" "$2"
		;;
	esac
	local vsize
	vsize=$(qemu-img info -f "$(fmt_of "$2")" --output=json "$2" | awk -F'[:,]' '/"virtual-size"/ { gsub(/ /, "", $2); print $2; exit }')
	[ "$vsize" = "$(stat -c %s "$1")" ] || die "$2: virtual size $vsize is not the raw size"
	rm -f "$1"
}
fmt_of() { case "$1" in *.vhdx) echo vhdx ;; *.vhd) echo vpc ;; esac }

NEW=$WORK/out
mkdir -p "$NEW"
MANIFEST=$WORK/manifest.body
: >"$MANIFEST"

# ------------------------------------------------------------------ gen2
# Hyper-V Generation 2: GPT, 100 MiB FAT32 ESP, ext4 root holding /boot. Debian's signed
# shim + GRUB as installed on UEFI, both as the "debian" entry and at the removable path.
build_gen2() {
	local d=debian12-gen2.vhdx host=parvis-gen2 img=$WORK/gen2.raw r=$WORK/root-gen2
	local root_uuid esp_id esp_uuid rootdev espdev k entry
	log "$d: partitioning, file systems"
	root_uuid=$(det_uuid gen2-root)
	esp_id=$(det_hex gen2-esp 8 | tr a-f A-F)
	esp_uuid=${esp_id:0:4}-${esp_id:4:4}
	new_image "$img" 2G "label: gpt
label-id: $(det_uuid gen2-disk | tr a-f A-F)
unit: sectors
first-lba: 2048
start=2048, size=204800, type=$GPT_ESP, uuid=$(det_uuid gen2-p1 | tr a-f A-F)
start=206848, type=$GPT_LINUX, uuid=$(det_uuid gen2-p2 | tr a-f A-F)"
	loop_attach espdev "$img" "${PSTART[1]}" "${PSIZE[1]}"
	loop_attach rootdev "$img" "${PSTART[2]}" "${PSIZE[2]}"
	run mkfs.vfat -F 32 -i "$esp_id" "$espdev"
	run mkfs.ext4 -q -U "$root_uuid" "$rootdev"
	mkdir -p "$r"
	mnt "$rootdev" "$r"
	log "$d: base"
	unpack_base "$r"
	chroot_dev "$r" "$rootdev" "$root_uuid"
	chroot_dev "$r" "$espdev" "$esp_uuid"
	configure_system "$r" "$host" "$(fstab_header)
# / was on /dev/sda2 during installation
UUID=$root_uuid /               ext4    errors=remount-ro 0       1
# /boot/efi was on /dev/sda1 during installation
UUID=$esp_uuid  /boot/efi       vfat    umask=0077      0       1"
	initramfs_modules "$r" most
	install_pkgs "$r" linux-image-amd64
	k=$(kernel_release "$r")
	# The build host's kernel has no vfat: grub-install only checks, through the mount table,
	# that /boot/efi is on a FAT device, so a tmpfs named after the FAT loop device takes the
	# files, and mtools copies them onto the FAT.
	mkdir -p "$r/boot/efi"
	mnt -t tmpfs "$espdev" "$r/boot/efi"
	preseed "$r" "grub-efi-amd64 grub2/update_nvram boolean false" \
		"grub-efi-amd64 grub2/force_efi_extra_removable boolean false"
	install_pkgs "$r" grub-efi-amd64 grub-efi-amd64-signed shim-signed
	log "$d: grub-install (debian entry, removable path), update-grub"
	run in_chroot "$r" grub-install --target=x86_64-efi --efi-directory=/boot/efi \
		--bootloader-id=debian --no-nvram --modules="part_gpt part_msdos ext2"
	run in_chroot "$r" grub-install --target=x86_64-efi --efi-directory=/boot/efi \
		--removable --no-nvram --modules="part_gpt part_msdos ext2"
	[ -s "$r/boot/efi/EFI/debian/grub.cfg" ] || die "grub-install wrote no EFI/debian/grub.cfg"
	[ -s "$r/boot/efi/EFI/BOOT/BOOTX64.EFI" ] || die "grub-install wrote no EFI/BOOT/BOOTX64.EFI"
	update_grub "$r" "$root_uuid"
	run mcopy -s -p -m -i "$espdev" "$r/boot/efi/EFI" ::/
	save_config "$d" esp-EFI-debian-grub.cfg "$r/boot/efi/EFI/debian/grub.cfg"
	save_config "$d" boot-grub-grub.cfg "$r/boot/grub/grub.cfg"
	save_config "$d" etc-default-grub "$r/etc/default/grub"
	save_config "$d" etc-fstab "$r/etc/fstab"
	entry=$(grub_default_entry "$r/boot/grub/grub.cfg")
	[ "$(cut -f1 <<<"$entry")" = "/boot/vmlinuz-$k" ] || die "$d: the default entry is not /boot/vmlinuz-$k: $entry"
	{
		echo "$d format vhdx subformat=dynamic block_size=33554432"
		echo "$d style hyper-v-gen2 (UEFI)"
		partition_lines "$d" "$img"
		echo "$d fs 1 vfat uuid=$esp_uuid mount=/boot/efi"
		echo "$d fs 2 ext4 uuid=$root_uuid mount=/"
		echo "$d root-uuid $root_uuid"
		echo "$d esp-files $(cd "$r/boot/efi" && find . -type f | sed 's/^\.//' | sort | tr '\n' ' ')"
		echo "$d boot-config partition=2 /boot/grub/grub.cfg; partition=1 /EFI/debian/grub.cfg"
		echo "$d boot-entry partition=2 kernel=$(cut -f1 <<<"$entry") initrd=$(cut -f2 <<<"$entry")"
		echo "$d cmdline $(cut -f3 <<<"$entry")"
		describe_root "$r" "$d"
	} >>"$MANIFEST"
	finish_root "$r"
	unmount_all
	run fsck.vfat -n "$espdev"
	repack_ext4 "$r" "$rootdev" "$root_uuid"
	run e2fsck -fn "$rootdev"
	release
	sfdisk -d "$img" >"$NEW/configs/$d/sfdisk-d"
	convert "$img" "$NEW/$d"
}

# ------------------------------------------------------------------ gen1
# Hyper-V Generation 1 (BIOS): MBR, one bootable ext4 root; grub-pc in the MBR gap.
build_gen1() {
	local d=debian12-gen1.vhdx host=parvis-gen1 img=$WORK/gen1.raw r=$WORK/root-gen1
	local root_uuid rootdev diskdev k entry
	log "$d: partitioning, file system"
	root_uuid=$(det_uuid gen1-root)
	new_image "$img" 2G "label: dos
label-id: 0x$(det_hex gen1-disk 8)
unit: sectors
start=2048, type=83, bootable"
	loop_attach diskdev "$img"
	loop_attach rootdev "$img" "${PSTART[1]}" "${PSIZE[1]}"
	run mkfs.ext4 -q -U "$root_uuid" "$rootdev"
	mkdir -p "$r"
	mnt "$rootdev" "$r"
	log "$d: base"
	unpack_base "$r"
	chroot_dev "$r" "$rootdev" "$root_uuid"
	chroot_dev "$r" "$diskdev"
	configure_system "$r" "$host" "$(fstab_header)
# / was on /dev/sda1 during installation
UUID=$root_uuid /               ext4    errors=remount-ro 0       1"
	initramfs_modules "$r" most
	install_pkgs "$r" linux-image-amd64
	k=$(kernel_release "$r")
	grub_pc_package "$r"
	grub_pc "$r" "$diskdev" "$root_uuid"
	save_config "$d" boot-grub-grub.cfg "$r/boot/grub/grub.cfg"
	save_config "$d" etc-default-grub "$r/etc/default/grub"
	save_config "$d" etc-fstab "$r/etc/fstab"
	entry=$(grub_default_entry "$r/boot/grub/grub.cfg")
	[ "$(cut -f1 <<<"$entry")" = "/boot/vmlinuz-$k" ] || die "$d: the default entry is not /boot/vmlinuz-$k: $entry"
	{
		echo "$d format vhdx subformat=dynamic block_size=33554432"
		echo "$d style hyper-v-gen1 (BIOS)"
		partition_lines "$d" "$img"
		echo "$d fs 1 ext4 uuid=$root_uuid mount=/"
		echo "$d root-uuid $root_uuid"
		echo "$d boot-config partition=1 /boot/grub/grub.cfg; GRUB i386-pc in the MBR and its gap"
		echo "$d boot-entry partition=1 kernel=$(cut -f1 <<<"$entry") initrd=$(cut -f2 <<<"$entry")"
		echo "$d cmdline $(cut -f3 <<<"$entry")"
		describe_root "$r" "$d"
	} >>"$MANIFEST"
	finish_root "$r"
	repack_ext4 "$r" "$rootdev" "$root_uuid"
	run e2fsck -fn "$rootdev"
	release
	sfdisk -d "$img" >"$NEW/configs/$d/sfdisk-d"
	convert "$img" "$NEW/$d"
}

# grub_pc_package root: the grub-pc package, its postinst told to install GRUB nowhere.
grub_pc_package() {
	preseed "$1" "grub-pc grub-pc/install_devices multiselect" \
		"grub-pc grub-pc/install_devices_empty boolean true"
	install_pkgs "$1" grub-pc
}

# grub_pc root whole-disk-dev root-uuid: GRUB written to the disk's MBR and the gap after it
# (core.img finds /boot/grub by UUID: an offset loop shows GRUB no partition table), then
# update-grub.
grub_pc() {
	local r=$1
	log "  grub-install --target=i386-pc, update-grub"
	run in_chroot "$r" grub-install --target=i386-pc --modules="part_msdos ext2" "$2"
	[ -s "$r/boot/grub/i386-pc/core.img" ] || die "grub-install wrote no core.img"
	update_grub "$r" "$3"
}

# ----------------------------------------------------------------- azure
# Azure: a fixed VHD, MBR, one ext4 root; Debian's cloud kernel with an initramfs that holds
# only the Hyper-V drivers; GRUB settings of Debian's own Azure images.
build_azure() {
	local d=azure-fixed.vhd host=parvis-azure img=$WORK/azure.raw r=$WORK/root-azure
	local root_uuid rootdev diskdev k entry kdeb m mods=()
	log "$d: partitioning, file system"
	root_uuid=$(det_uuid azure-root)
	new_image "$img" 1G "label: dos
label-id: 0x$(det_hex azure-disk 8)
unit: sectors
start=2048, type=83, bootable"
	loop_attach diskdev "$img"
	loop_attach rootdev "$img" "${PSTART[1]}" "${PSIZE[1]}"
	run mkfs.ext4 -q -U "$root_uuid" "$rootdev"
	mkdir -p "$r"
	mnt "$rootdev" "$r"
	log "$d: base"
	unpack_base "$r"
	chroot_dev "$r" "$rootdev" "$root_uuid"
	chroot_dev "$r" "$diskdev"
	# Debian's cloud images' fstab line for the root.
	configure_system "$r" "$host" "$(fstab_header)
UUID=$root_uuid / ext4 rw,discard,errors=remount-ro,x-systemd.growfs 0 1"
	# Only what boots from a VMBus disk (plus the root file system's driver when it is a
	# module: the cloud kernel has ext4 built in).
	kdeb=$(find "$POOL/debs" -name 'linux-image-[0-9]*-cloud-amd64_*.deb' | head -n1)
	[ -n "$kdeb" ] || die "no cloud kernel in the pool"
	dpkg-deb -c "$kdeb" >"$WORK/cloud-kernel.list"
	for m in hv_vmbus hv_storvsc sd_mod scsi_transport_fc hv_netvsc hv_utils hyperv-keyboard \
		hv_balloon ext4; do
		if grep -q "/$m\.ko$" "$WORK/cloud-kernel.list"; then mods+=("${m//-/_}"); fi
	done
	initramfs_modules "$r" list "${mods[@]}"
	install_pkgs "$r" linux-image-cloud-amd64
	k=$(kernel_release "$r")
	case "$k" in *-cloud-amd64) ;; *) die "$d: $k is not the cloud kernel" ;; esac
	# GRUB settings of Debian's Azure images (debian-cloud-images: grub-cloud-amd64's
	# /etc/default/grub, and grub.d/15_timeout.cfg of class AZURE), written after grub-pc
	# so that its postinst keeps them.
	grub_pc_package "$r"
	cat >"$r/etc/default/grub" <<'EOF'
# If you change this file, run 'update-grub' afterwards to update
# /boot/grub/grub.cfg.
# For full documentation of the options in this file, see:
#   info -f grub -n 'Simple configuration'

GRUB_DEFAULT=0
GRUB_TIMEOUT=5
GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200 earlyprintk=ttyS0,115200 consoleblank=0"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
EOF
	printf 'GRUB_TIMEOUT=1\nGRUB_TIMEOUT_STYLE=countdown\n' >"$r/etc/default/grub.d/15_timeout.cfg"
	grub_pc "$r" "$diskdev" "$root_uuid"
	save_config "$d" boot-grub-grub.cfg "$r/boot/grub/grub.cfg"
	save_config "$d" etc-default-grub "$r/etc/default/grub"
	save_config "$d" etc-fstab "$r/etc/fstab"
	save_config "$d" etc-initramfs-tools-modules "$r/etc/initramfs-tools/modules"
	entry=$(grub_default_entry "$r/boot/grub/grub.cfg")
	[ "$(cut -f1 <<<"$entry")" = "/boot/vmlinuz-$k" ] || die "$d: the default entry is not /boot/vmlinuz-$k: $entry"
	{
		echo "$d format vpc subformat=fixed force_size=on"
		echo "$d style azure"
		partition_lines "$d" "$img"
		echo "$d fs 1 ext4 uuid=$root_uuid mount=/"
		echo "$d root-uuid $root_uuid"
		echo "$d boot-config partition=1 /boot/grub/grub.cfg; GRUB i386-pc in the MBR and its gap"
		echo "$d boot-entry partition=1 kernel=$(cut -f1 <<<"$entry") initrd=$(cut -f2 <<<"$entry")"
		echo "$d cmdline $(cut -f3 <<<"$entry")"
		describe_root "$r" "$d"
	} >>"$MANIFEST"
	finish_root "$r"
	repack_ext4 "$r" "$rootdev" "$root_uuid"
	run e2fsck -fn "$rootdev"
	release
	sfdisk -d "$img" >"$NEW/configs/$d/sfdisk-d"
	convert "$img" "$NEW/$d"
}

# --------------------------------------------------------------- xfs-bls
# A separate XFS /boot holding the kernel, the initramfs and Boot Loader Spec type #1
# entries (as Fedora's kernel-install + grubby write them), no GRUB at all; ext4 root.
build_xfs_bls() {
	local d=xfs-bls.vhdx host=parvis-xfs-bls img=$WORK/xfs.raw r=$WORK/root-xfs
	local root_uuid boot_uuid esp_id esp_uuid rootdev bootdev espdev k mid entry cmdline
	log "$d: partitioning, file systems"
	root_uuid=$(det_uuid xfs-root)
	boot_uuid=$(det_uuid xfs-boot)
	esp_id=$(det_hex xfs-esp 8 | tr a-f A-F)
	esp_uuid=${esp_id:0:4}-${esp_id:4:4}
	new_image "$img" 2G "label: gpt
label-id: $(det_uuid xfs-disk | tr a-f A-F)
unit: sectors
first-lba: 2048
start=2048, size=204800, type=$GPT_ESP, uuid=$(det_uuid xfs-p1 | tr a-f A-F)
start=206848, size=1048576, type=$GPT_LINUX, uuid=$(det_uuid xfs-p2 | tr a-f A-F)
start=1255424, type=$GPT_LINUX, uuid=$(det_uuid xfs-p3 | tr a-f A-F)"
	loop_attach espdev "$img" "${PSTART[1]}" "${PSIZE[1]}"
	loop_attach bootdev "$img" "${PSTART[2]}" "${PSIZE[2]}"
	loop_attach rootdev "$img" "${PSTART[3]}" "${PSIZE[3]}"
	run mkfs.vfat -F 32 -i "$esp_id" "$espdev"
	run mmd -i "$espdev" ::/EFI ::/EFI/BOOT
	run mkfs.xfs -q -m uuid="$boot_uuid" "$bootdev"
	run mkfs.ext4 -q -U "$root_uuid" "$rootdev"
	mkdir -p "$r"
	mnt "$rootdev" "$r"
	mkdir -p "$r/boot"
	mnt -t xfs "$bootdev" "$r/boot"
	log "$d: base"
	unpack_base "$r"
	mkdir -p "$r/boot/efi"
	chroot_dev "$r" "$rootdev" "$root_uuid"
	chroot_dev "$r" "$bootdev" "$boot_uuid"
	configure_system "$r" "$host" "$(fstab_header)
UUID=$root_uuid /               ext4    errors=remount-ro 0       1
UUID=$boot_uuid /boot           xfs     defaults        0       0
UUID=$esp_uuid  /boot/efi       vfat    umask=0077      0       2"
	cmdline="root=UUID=$root_uuid ro quiet"
	printf '%s\n' "$cmdline" >"$r/etc/kernel/cmdline"
	initramfs_modules "$r" most
	install_pkgs "$r" linux-image-amd64 xfsprogs
	k=$(kernel_release "$r")
	[ -s "$r/boot/vmlinuz-$k" ] && [ -s "$r/boot/initrd.img-$k" ] || die "$d: no kernel/initrd in /boot"
	mid=$(cat "$r/etc/machine-id")
	# os-release NAME and VERSION, as Fedora's 20-grub.install titles its entries.
	local name version
	name=$(. "$r/usr/lib/os-release" && echo "$NAME")
	version=$(. "$r/usr/lib/os-release" && echo "$VERSION")
	mkdir -p "$r/boot/loader/entries"
	entry=$r/boot/loader/entries/$mid-$k.conf
	cat >"$entry" <<EOF
title $name ($k) $version
version $k
linux /vmlinuz-$k
initrd /initrd.img-$k
options $cmdline
EOF
	if find "$r" -xdev -name grub.cfg | grep -q . || find "$r/boot" -name grub.cfg | grep -q .; then
		die "$d: a grub.cfg exists"
	fi
	save_config "$d" "loader-entries-$mid-$k.conf" "$entry"
	save_config "$d" etc-fstab "$r/etc/fstab"
	{
		echo "$d format vhdx subformat=dynamic block_size=33554432"
		echo "$d style xfs-boot-bls"
		partition_lines "$d" "$img"
		echo "$d fs 1 vfat uuid=$esp_uuid mount=/boot/efi (holds only the empty directory /EFI/BOOT)"
		echo "$d fs 2 xfs uuid=$boot_uuid mount=/boot"
		echo "$d fs 3 ext4 uuid=$root_uuid mount=/"
		echo "$d root-uuid $root_uuid"
		echo "$d boot-uuid $boot_uuid"
		echo "$d boot-config partition=2 /loader/entries/$mid-$k.conf (no grub.cfg anywhere)"
		echo "$d boot-entry partition=2 kernel=/vmlinuz-$k initrd=/initrd.img-$k"
		echo "$d cmdline $cmdline"
		describe_root "$r" "$d"
	} >>"$MANIFEST"
	finish_root "$r" "$r/boot"
	unmount_all
	run fsck.vfat -n "$espdev"
	run xfs_repair -n "$bootdev"
	repack_ext4 "$r" "$rootdev" "$root_uuid"
	run e2fsck -fn "$rootdev"
	release
	sfdisk -d "$img" >"$NEW/configs/$d/sfdisk-d"
	convert "$img" "$NEW/$d"
}

# -------------------------------------------------------------- no-linux
# A data disk: GPT, one ext4 partition with files, no kernel, no boot configuration.
build_no_linux() {
	local d=no-linux.vhdx img=$WORK/nolinux.raw src=$WORK/nolinux-files uuid datadev
	log "$d: partitioning, file system"
	uuid=$(det_uuid nolinux-data)
	new_image "$img" 512M "label: gpt
label-id: $(det_uuid nolinux-disk | tr a-f A-F)
unit: sectors
first-lba: 2048
start=2048, type=$GPT_LINUX, uuid=$(det_uuid nolinux-p1 | tr a-f A-F), name=\"data\""
	rm -rf "$src"
	mkdir -p "$src/projects/parvis" "$src/photos" "$src/backup/etc"
	printf 'Parvis test data disk: files, no operating system.\n' >"$src/README.txt"
	seq 1 20000 >"$src/projects/parvis/numbers.txt"
	head -c $((2 * MIB)) /dev/urandom >"$src/backup/blob.bin"
	printf 'not a real fstab\n' >"$src/backup/etc/fstab.txt"
	ln -s ../README.txt "$src/photos/README-link"
	loop_attach datadev "$img" "${PSTART[1]}" "${PSIZE[1]}"
	run mkfs.ext4 -q -U "$uuid" -L data -d "$src" "$datadev"
	run e2fsck -fn "$datadev"
	release
	mkdir -p "$NEW/configs/$d"
	sfdisk -d "$img" >"$NEW/configs/$d/sfdisk-d"
	{
		echo "$d format vhdx subformat=dynamic block_size=33554432"
		echo "$d style data-disk"
		partition_lines "$d" "$img"
		echo "$d fs 1 ext4 uuid=$uuid label=data"
		echo "$d root-uuid none"
		echo "$d kernel none"
		echo "$d boot-config none"
		echo "$d boot-entry none"
		echo "$d cmdline none"
		echo "$d files $(cd "$src" && find . -mindepth 1 | sed 's/^\.//' | sort | tr '\n' ' ')"
	} >>"$MANIFEST"
	convert "$img" "$NEW/$d"
}

build_gen2
build_gen1
build_azure
build_xfs_bls
build_no_linux

# ---------------------------------------------------------------- manifest
{
	echo "# Parvis guest disks, built by assets/guest/build-disks.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)"
	echo "# Lines: <disk> <key> <value...>; partition lines are partx -P output (sectors of 512 bytes)."
	echo "inputs-sha256 $STAMP"
	echo "base $BASE_KEY built $(cat "$BASE/done") from $SUITE ($MIRROR, $SUITE-security, $SUITE-updates)"
	cat "$MANIFEST"
	for d in "${DISKS[@]}"; do
		echo "$d virtual-size $(qemu-img info -f "$(fmt_of "$d")" --output=json "$NEW/$d" | awk -F'[:,]' '/"virtual-size"/ { gsub(/ /, "", $2); print $2; exit }')"
		echo "$d file-size $(stat -c %s "$NEW/$d")"
		echo "$d allocated-bytes $(($(stat -c %b "$NEW/$d") * $(stat -c %B "$NEW/$d")))"
		echo "$d sha256 $(sha256sum "$NEW/$d" | cut -d' ' -f1)"
	done
} >"$NEW/manifest.txt"
cp "$LOG" "$NEW/build.log"

# Swap the new directory in (the manifest with the stamp is part of it).
rm -rf "$OUT.old"
[ -e "$OUT" ] && mv "$OUT" "$OUT.old"
mv "$NEW" "$OUT"
rm -rf "$OUT.old"
if [ -n "${SUDO_UID:-}" ]; then
	chown -R "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$OUT" "$BASE_CACHE" "$CACHE_ROOT/disks.lock" 2>/dev/null || true
fi
log "done in $((SECONDS - START)) s: $(cd "$OUT" && stat -c '%n=%s' "${DISKS[@]}" | tr '\n' ' ')"
printf '%s\n' "$OUT"
