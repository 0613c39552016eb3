#!/bin/sh
# Parvis L2 test-guest /init (busybox sh). Packed by build-images.sh into
# l2-initramfs.cpio. Contract with the Rust tests: see README.md next to this file.
# Every marker is printed on its own line to /dev/console (ttyS0).
# This script must never exit: it always ends in `poweroff -f`.

# Benchmark marker first: /dev/console is packed into the cpio, so stdout is
# already the console when the kernel runs us.
echo PARVIS-L2-USERSPACE

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Defensive: if the kernel could not give us a console, take it now.
[ -t 1 ] || exec </dev/console >/dev/console 2>&1

read -r cmdline </proc/cmdline
tests=shell
drm_args=
echo_count=100
io_dev=
io_time=5
net_ip=
net_ping=
net_mib=32
for w in $cmdline; do
	case "$w" in
	parvis.test=*) tests=${w#parvis.test=} ;;
	parvis.quiet) echo 1 >/proc/sys/kernel/printk ;;
	parvis.drm=*) drm_args=$(echo "${w#parvis.drm=}" | tr ':' ' ') ;;
	parvis.echo=*) echo_count=${w#parvis.echo=} ;;
	parvis.io=*) io_dev=${w#parvis.io=} ;;
	parvis.iotime=*) io_time=${w#parvis.iotime=} ;;
	parvis.ip=*) net_ip=${w#parvis.ip=} ;;
	parvis.ping=*) net_ping=$(echo "${w#parvis.ping=}" | tr ',' ' ') ;;
	parvis.netmib=*) net_mib=${w#parvis.netmib=} ;;
	esac
done

disk_waited=

# power_button_watch: like a distribution's logind, power off cleanly when the ACPI
# power button is pressed (the host's "shutdown").
power_button_watch() {
	modprobe -q button 2>/dev/null
	modprobe -q evdev 2>/dev/null
	for d in /sys/class/input/event*; do
		[ "$(cat "$d/device/name" 2>/dev/null)" = "Power Button" ] || continue
		ev=/dev/input/${d##*/}
		n=0
		while [ ! -e "$ev" ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
		head -c 24 "$ev" >/dev/null 2>&1 || return
		echo PARVIS-POWER-BUTTON
		sync
		poweroff -f
	done
}

load() { # load(module...): modprobe each, ignore failures (built-in or absent).
	for m in "$@"; do modprobe -q "$m" 2>/dev/null; done
	return 0
}

power_button_watch &

# The host's shutdown service (hv_utils) runs /sbin/poweroff, which signals init: end as
# a distribution's init would. `hold` waits in `wait`, so the trap runs at once.
trap 'echo PARVIS-SHUTDOWN-REQUEST; sync; poweroff -f' USR2 TERM

# coldplug: load the modules matching every device's modalias (no udev/mdev
# here). Two passes: hv_vmbus (ACPI) must probe before VMBus children appear.
coldplug() {
	for _ in 1 2; do
		find /sys/devices -name modalias -type f 2>/dev/null | while read -r f; do
			a=$(cat "$f" 2>/dev/null) && [ -n "$a" ] && modprobe -q "$a" 2>/dev/null
		done
	done
	return 0
}

wait_for() { # wait_for(path, tenths): wait up to tenths*0.1 s for path to exist.
	n=0
	while [ ! -e "$1" ]; do
		[ "$n" -ge "$2" ] && return 1
		sleep 0.1
		n=$((n + 1))
	done
	return 0
}

disk_ready() { # waits only once: a later disk action fails at once
	[ -b /dev/vda ] && return 0
	if [ -z "$disk_waited" ]; then
		disk_waited=1
		load virtio_mmio virtio_pci virtio_blk
		wait_for /dev/vda 300 && return 0
	fi
	echo "PARVIS-DISK-ERROR=no /dev/vda after 30s"
	return 1
}

act_nproc() {
	n=$(nproc 2>/dev/null)
	if [ -z "$n" ]; then
		n=0
		for r in $(tr ',' ' ' </sys/devices/system/cpu/online); do
			case "$r" in
			*-*) n=$((n + ${r#*-} - ${r%-*} + 1)) ;;
			*) n=$((n + 1)) ;;
			esac
		done
	fi
	echo "PARVIS-NPROC=$n"
}

act_disk() {
	disk_ready || return 0
	echo "PARVIS-DISK-LBS=$(cat /sys/block/vda/queue/logical_block_size)"
	echo "PARVIS-DISK-SIZE=$(($(cat /sys/block/vda/size) * 512))"
	sum=$(sha256sum /dev/vda) || { echo "PARVIS-DISK-ERROR=read failed"; return 0; }
	echo "PARVIS-DISK-SHA256=${sum%% *}"
}

# Boot userspace from the virtio disk: mount its ext4 file system and switch_root to its
# /init (the disk's own userland then runs as PID 1).
act_rootdisk() {
	disk_ready || return 0
	# ext4's metadata checksums need the crc32c algorithm, a module in Debian's kernel.
	load crc32c_generic ext4
	mkdir -p /newroot
	if ! mount -t ext4 /dev/vda /newroot; then
		echo "PARVIS-ROOTDISK-ERROR=mount failed"
		return 0
	fi
	if [ ! -x /newroot/init ]; then
		echo "PARVIS-ROOTDISK-ERROR=no /init on the disk"
		umount /newroot
		return 0
	fi
	echo "PARVIS-ROOTDISK-MOUNTED"
	umount /proc /sys 2>/dev/null
	exec switch_root /newroot /init
}

act_diskwrite() {
	disk_ready || return 0
	if printf 'PARVIS-GUEST-WROTE-THIS' |
		dd of=/dev/vda bs=1 seek=1048576 count=23 conv=notrunc 2>/dev/null &&
		sync; then
		echo PARVIS-DISK-WRITTEN
	else
		echo "PARVIS-DISK-ERROR=write failed"
	fi
}

act_fb() {
	if [ ! -e /dev/fb0 ]; then
		load hyperv_drm
		coldplug
	fi
	if ! wait_for /dev/fb0 100; then
		echo "PARVIS-FB-ERROR=no /dev/fb0 after 10s"
		return 0
	fi
	s=/sys/class/graphics/fb0
	size=$(cat $s/virtual_size) || size=
	bpp=$(cat $s/bits_per_pixel) || bpp=
	stride=$(cat $s/stride) || stride=
	w=${size%%,*}
	h=${size##*,}
	case "$w$h$bpp$stride" in '' | *[!0-9]*)
		echo "PARVIS-FB-ERROR=unreadable fb0 attributes size=$size bpp=$bpp stride=$stride"
		return 0
		;;
	esac
	if [ "$bpp" != 32 ]; then
		echo "PARVIS-FB-ERROR=unsupported bpp $bpp"
		return 0
	fi
	if [ "$w" -lt 1 ] || [ "$h" -lt 4 ] || [ "$stride" -lt $((w * 4)) ]; then
		echo "PARVIS-FB-ERROR=bad geometry ${w}x${h} stride $stride"
		return 0
	fi
	# Keep fbcon (cursor blink, console text) off the framebuffer.
	for v in /sys/class/vtconsole/vtcon*; do
		grep -q 'frame buffer' "$v/name" 2>/dev/null && echo 0 >"$v/bind" 2>/dev/null
	done
	t=/tmp/parvis-fb
	mkdir -p $t
	band=$((h / 4))
	i=0
	ok=1
	# XRGB8888 little-endian: red, green, blue, white. The last band also
	# takes the remainder rows when h is not a multiple of 4.
	for px in '\000\000\377\000' '\000\377\000\000' '\377\000\000\000' '\377\377\377\000'; do
		rows=$band
		[ $i -eq 3 ] && rows=$((h - 3 * band))
		# shellcheck disable=SC2059 # $px is a format of octal escapes
		printf "$px" >$t/row
		while [ "$(wc -c <$t/row)" -lt "$stride" ]; do
			cat $t/row $t/row >$t/tmp && mv $t/tmp $t/row
		done
		head -c "$stride" $t/row >$t/line
		cp $t/line $t/band
		n=1
		while [ $n -lt "$rows" ]; do
			cat $t/band $t/band >$t/tmp && mv $t/tmp $t/band
			n=$((n * 2))
		done
		dd if=$t/band of=/dev/fb0 bs="$stride" count="$rows" seek=$((i * band)) conv=notrunc 2>/dev/null || ok=0
		rm -f $t/row $t/line $t/band $t/tmp
		i=$((i + 1))
	done
	rm -rf $t
	if [ $ok = 1 ]; then
		echo "PARVIS-FB-DRAWN=${w}x${h}x${bpp}"
	else
		echo "PARVIS-FB-ERROR=write to /dev/fb0 failed"
	fi
}

act_ticks() {
	n=1
	while [ $n -le 50 ]; do
		echo "PARVIS-TICK=$n"
		sleep 0.2
		n=$((n + 1))
	done
}

act_panic() {
	load pvpanic-mmio pvpanic-pci
	sync
	echo c >/proc/sysrq-trigger
}

act_shell() {
	echo "PARVIS L2 guest shell on the serial console: type 'poweroff -f' (or exit) to end the VM."
	setsid cttyhack sh -l
}

# The demo: the synthetic keyboard, mouse and video when the VM has VMBus, a shell on the
# screen (tty1, what the console shows and types into) and one on the serial console.
act_demo() {
	if vmbus_up 2>/dev/null; then
		load evdev hyperv_keyboard hid_hyperv hid_generic hyperv_drm
		coldplug
		wait_for /dev/dri/card0 100
	fi
	{
		printf '\033[2J\033[H'
		echo "Parvis demo VM: Debian's kernel $(uname -r) and a busybox userland."
		echo "This screen is the VM's, streamed by the agent; type here once you click it."
		echo
	} >/dev/tty1 2>/dev/null
	setsid sh -c 'exec sh -l <>/dev/tty1 >&0 2>&1' &
	echo "PARVIS-DEMO-READY"
	act_shell
}

# net: the first network adapter: its driver and address, then parvis.ip= on it and a
# ping to every parvis.ping= address (three tries each, the neighbour may still boot).
act_net() {
	# VMBus when the VMM offers it (Parvis), PCI virtio otherwise (QEMU).
	load hv_vmbus hv_netvsc virtio_pci virtio_net
	coldplug
	if ! wait_for /sys/class/net/eth0 100; then
		echo "PARVIS-NET-ERROR=no eth0 after 10s"
		return 0
	fi
	drv=$(readlink /sys/class/net/eth0/device/driver)
	echo "PARVIS-NET-DRIVER=${drv##*/}"
	echo "PARVIS-NET-MAC=$(cat /sys/class/net/eth0/address)"
	ip link set lo up
	ip link set eth0 up
	[ -n "$net_ip" ] && ip addr add "$net_ip" dev eth0
	echo "PARVIS-NET-UP=$(cat /sys/class/net/eth0/operstate)"
	for a in $net_ping; do
		r=fail
		for _ in 1 2 3 4 5 6 7 8 9 10; do
			if ping -c 1 -W 2 "$a" >/dev/null 2>&1; then r=ok; break; fi
		done
		echo "PARVIS-PING-$a=$r"
	done
}

# netbench (after net): fetch http://<first parvis.ping address>:8080/blob and print
# PARVIS-NETBENCH-H2G=<wget status> <uptime before> <uptime after>; then serve a blob of
# parvis.netmib MiB on port 8080 for the host to fetch, print PARVIS-NETBENCH-SERVING and
# wait to be stopped.
act_netbench() {
	host=${net_ping%% *}
	t0=$(cut -d' ' -f1 /proc/uptime)
	wget -q -O /dev/null "http://$host:8080/blob"
	rc=$?
	t1=$(cut -d' ' -f1 /proc/uptime)
	echo "PARVIS-NETBENCH-H2G=$rc $t0 $t1"
	mkdir -p /tmp/www
	dd if=/dev/zero of=/tmp/www/blob bs=1048576 count="$net_mib" 2>/dev/null
	httpd -p 8080 -h /tmp/www
	echo PARVIS-NETBENCH-SERVING
	act_hold
}

act_hold() {
	while :; do
		sleep 3600 &
		wait $!
	done
}

act_coldplug() { # extra: load drivers for all present devices, list what is loaded
	coldplug
	echo "PARVIS-MODULES=$(cut -d' ' -f1 /proc/modules | tr '\n' ',' | sed 's/,$//')"
}

# Hyper-V identity as the kernel saw it at boot.
act_hyperv() {
	if dmesg | grep -q 'Hypervisor detected: Microsoft Hyper-V'; then
		echo "PARVIS-HV-DETECTED=1"
	else
		echo "PARVIS-HV-DETECTED=0 ($(dmesg | grep -m1 'Hypervisor detected'))"
	fi
	l=$(dmesg | grep -m1 'Hyper-V: privilege flags')
	echo "PARVIS-HV-FLAGS=${l#*Hyper-V: }"
	echo "PARVIS-CLOCKSOURCES=$(cat /sys/devices/system/clocksource/clocksource0/available_clocksource)"
	echo "PARVIS-CLOCKSOURCE=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
}

# vmbus_up: load hv_vmbus once and wait for the bus.
vmbus_up() {
	[ -d /sys/bus/vmbus/devices ] && return 0
	modprobe hv_vmbus 2>/tmp/vmbus.err || {
		echo "PARVIS-VMBUS-ERROR=modprobe hv_vmbus: $(cat /tmp/vmbus.err)"
		return 1
	}
	wait_for /sys/bus/vmbus/devices 100 || {
		echo "PARVIS-VMBUS-ERROR=no /sys/bus/vmbus/devices"
		return 1
	}
}

# VMBus: version, devices (class ids), HYP interrupts.
act_vmbus() {
	vmbus_up || return 0
	# Offers arrive asynchronously after the version handshake.
	sleep 1
	l=$(dmesg | grep -m1 'Vmbus version:')
	echo "PARVIS-VMBUS-VERSION=${l##*Vmbus version:}"
	devs=
	for d in /sys/bus/vmbus/devices/*; do
		[ -e "$d/class_id" ] || continue
		devs="$devs$(cat "$d/class_id"),"
	done
	echo "PARVIS-VMBUS-DEVICES=${devs%,}"
	echo "PARVIS-VMBUS-HYP=$(grep 'HYP:' /proc/interrupts | tr -s ' ')"
}

# scsi_up: VMBus, then the synthetic SCSI controller's driver and the disk driver.
scsi_up() {
	vmbus_up || return 1
	load hv_storvsc sd_mod
	coldplug
	return 0
}

# scsi_disks: "name,H:C:T:L" for every SCSI disk, one per line, sorted by address.
scsi_disks() {
	for b in /sys/block/sd*; do
		[ -e "$b/device" ] || continue
		a=$(readlink "$b/device")
		echo "${a##*/} ${b##*/}"
	done | sort | while read -r a n; do echo "$n,$a"; done
}

# scsi_report(name): one PARVIS-SCSI-DISK line: name, address, size, vendor, model, wwid,
# discard limit.
scsi_report() {
	d=/sys/block/$1
	a=$(readlink "$d/device")
	v=$(cat "$d/device/vendor" 2>/dev/null)
	m=$(cat "$d/device/model" 2>/dev/null)
	# shellcheck disable=SC2086 # trim the padding
	echo "PARVIS-SCSI-DISK=$1,${a##*/},$(($(cat "$d/size") * 512)),$(echo $v),$(echo $m),$(cat "$d/device/wwid" 2>/dev/null),$(cat "$d/queue/discard_max_bytes")"
}

# scsi_dmesg: every kernel line about storage that reports a problem.
scsi_dmesg() {
	dmesg | grep -iE 'storvsc|hv_storvsc|sd [0-9]+:|scsi|blk_update_request|I/O error' |
		grep -iE 'error|fail|fault|timeout|abort|reset|invalid' |
		while read -r l; do echo "PARVIS-SCSI-DMESG=$l"; done
	echo "PARVIS-SCSI-DMESG-END"
}

# Storage over VMBus: the controller probes, each disk reports its identity, is read whole
# (sha256) and written at 1 MiB; a disk that allows discard then has 16 MiB at 8 MiB
# discarded.
act_scsi() {
	scsi_up || return 0
	n=0
	until [ "$(scsi_disks | wc -l)" -ge 1 ]; do
		n=$((n + 1))
		if [ $n -gt 300 ]; then
			echo "PARVIS-SCSI-ERROR=no SCSI disk after 30s"
			scsi_dmesg
			return 0
		fi
		sleep 0.1
	done
	sleep 1
	l=$(dmesg | grep -m1 'storvsc_host_t')
	echo "PARVIS-SCSI-HOST=${l##*] }"
	for e in $(scsi_disks); do scsi_report "${e%%,*}"; done
	for e in $(scsi_disks); do
		n=${e%%,*}
		sum=$(sha256sum "/dev/$n") || { echo "PARVIS-SCSI-ERROR=read failed on $n"; continue; }
		echo "PARVIS-SCSI-SHA256=$n,${sum%% *}"
		if printf 'PARVIS-GUEST-WROTE-THIS' |
			dd of="/dev/$n" bs=1 seek=1048576 count=23 conv=notrunc 2>/dev/null && sync; then
			echo "PARVIS-SCSI-WRITTEN=$n"
		fi
	done
	for e in $(scsi_disks); do
		n=${e%%,*}
		[ "$(cat "/sys/block/$n/queue/discard_max_bytes")" -gt 0 ] || continue
		if blkdiscard -o 8388608 -l 16777216 "/dev/$n"; then
			echo "PARVIS-SCSI-DISCARDED=$n"
		else
			echo "PARVIS-SCSI-ERROR=blkdiscard failed on $n"
		fi
	done
	sync
	scsi_dmesg
}

# SCSI hot plug: report the disks present, then wait for one more to appear (write a marker
# to it) and for it to go away again.
act_scsihot() {
	scsi_up || return 0
	wait_for /dev/sda 300
	sleep 1
	before=$(scsi_disks | tr '\n' ' ')
	echo "PARVIS-SCSI-HOT-READY=$before"
	n=0
	new=
	while [ -z "$new" ]; do
		for e in $(scsi_disks); do
			case " $before " in *" $e "*) ;; *) new=$e ;; esac
		done
		n=$((n + 1))
		if [ $n -gt 1200 ]; then
			echo "PARVIS-SCSI-ERROR=no new disk after 120s"
			scsi_dmesg
			return 0
		fi
		[ -n "$new" ] || sleep 0.1
	done
	name=${new%%,*}
	wait_for "/dev/$name" 100
	scsi_report "$name"
	if printf 'PARVIS-HOT-ADDED-DISK-WROTE-THIS' |
		dd of="/dev/$name" bs=1 seek=4096 count=32 conv=notrunc 2>/dev/null && sync; then
		echo "PARVIS-SCSI-HOT-WRITTEN=$name"
	fi
	echo "PARVIS-SCSI-HOT-ADDED=$name"
	n=0
	while [ -e "/sys/block/$name" ]; do
		n=$((n + 1))
		if [ $n -gt 1200 ]; then
			echo "PARVIS-SCSI-ERROR=$name still there after 120s"
			scsi_dmesg
			return 0
		fi
		sleep 0.1
	done
	echo "PARVIS-SCSI-HOT-REMOVED=$name"
	echo "PARVIS-SCSI-HOT-LEFT=$(scsi_disks | tr '\n' ' ')"
	scsi_dmesg
}

# Disk benchmark: parvis-io on the first SCSI disk or /dev/vda (parvis.io=DEVICE overrides,
# parvis.iotime=SECONDS per measurement).
act_iobench() {
	dev=$io_dev
	case "$dev" in
	/dev/sd*) scsi_up && wait_for "$dev" 300 ;;
	/dev/vd*) disk_ready ;;
	'')
		if scsi_up 2>/dev/null && wait_for /dev/sda 100; then
			dev=/dev/sda
		elif disk_ready; then
			dev=/dev/vda
		fi
		;;
	esac
	[ -b "$dev" ] || { echo "PARVIS-IO-ERROR=no disk $dev"; return 0; }
	parvis-io "$dev" "$io_time"
}

# event_for(phys-prefix|name): the /dev/input/eventN whose input device matches.
event_for() {
	for e in /sys/class/input/event*; do
		[ -e "$e" ] || continue
		ph=$(cat "$e/device/phys" 2>/dev/null)
		nm=$(cat "$e/device/name" 2>/dev/null)
		case "$ph" in "$1"*) echo "/dev/input/${e##*/}"; return 0 ;; esac
		[ "$nm" = "$1" ] && { echo "/dev/input/${e##*/}"; return 0; }
	done
	return 1
}

# evdev_reader(tag, dev, stop-type, stop-code, stop-value): print every non-SYN/MSC event
# as PARVIS-EV=tag,type,code,value until the stop event.
evdev_reader() {
	exec 3<"$2"
	while :; do
		set -- "$1" "$2" "$3" "$4" "$5" $(dd bs=24 count=1 <&3 2>/dev/null | od -An -tu2 -w24)
		[ $# -ge 17 ] || break
		t=${14} c=${15} v=$((${16} + ${17} * 65536))
		[ "$v" -ge 2147483648 ] && v=$((v - 4294967296))
		case "$t" in 0 | 4) continue ;; esac
		echo "PARVIS-EV=$1,$t,$c,$v"
		[ "$t" = "$3" ] && [ "$c" = "$4" ] && [ "$v" = "$5" ] && break
	done
	exec 3<&-
}

# Synthetic keyboard and mouse: wait for both evdev nodes, announce them, then print every
# event until Escape is released (keyboard) and the middle button pressed (mouse).
act_input() {
	vmbus_up || return 0
	load evdev hyperv_keyboard hid_hyperv hid_generic
	coldplug
	n=0
	while :; do
		kbd=$(event_for d34b2567-b9b6-42b9-8778) &&
			mouse=$(event_for "Microsoft Vmbus HID-compliant Mouse") && break
		n=$((n + 1))
		if [ $n -gt 300 ]; then
			echo "PARVIS-INPUT-ERROR=no synthetic keyboard/mouse event device after 30s"
			cat /proc/bus/input/devices
			return 0
		fi
		sleep 0.1
	done
	evdev_reader kbd "$kbd" 1 1 0 &
	k=$!
	evdev_reader mouse "$mouse" 1 274 1 &
	m=$!
	sleep 0.2
	echo "PARVIS-INPUT-READY=$kbd,$mouse"
	(sleep 60 && kill $k $m 2>/dev/null) &
	w=$!
	wait $k $m
	kill $w 2>/dev/null
	echo "PARVIS-INPUT-DONE"
}

# Synthetic video: hyperv_drm binds, then parvis-drm sets a mode and draws rectangles,
# each flushed with its own dirty rectangle (parvis.drm=WxH:RECTS:HOLD, all optional).
act_drm() {
	vmbus_up || return 0
	load hyperv_drm
	coldplug
	if ! wait_for /dev/dri/card0 200; then
		echo "PARVIS-DRM-ERROR=no /dev/dri/card0 after 20s"
		return 0
	fi
	d=$(readlink /sys/class/drm/card0/device/driver)
	echo "PARVIS-DRM-DRIVER=${d##*/}"
	l=$(dmesg | grep -m1 'Synthvid Version')
	echo "PARVIS-SYNTHVID=${l##*] }"
	# shellcheck disable=SC2086 # word splitting on purpose
	parvis-drm run $drm_args
}

# Latency benchmark: for each key press on the synthetic keyboard, draw a square on the
# synthetic video device at once (parvis-drm echo; parvis.echo=COUNT presses).
act_echo() {
	vmbus_up || return 0
	load evdev hyperv_keyboard hyperv_drm
	coldplug
	n=0
	until kbd=$(event_for d34b2567-b9b6-42b9-8778) && [ -e /dev/dri/card0 ]; do
		n=$((n + 1))
		if [ $n -gt 300 ]; then
			echo "PARVIS-ECHO-ERROR=no synthetic keyboard or video after 30s"
			return 0
		fi
		sleep 0.1
	done
	parvis-drm echo "$kbd" "$echo_count"
}

IFS_SAVED=$IFS
IFS=,
# shellcheck disable=SC2086 # split on commas on purpose
set -- $tests
IFS=$IFS_SAVED
for a in "$@"; do
	case "$a" in
	nproc) act_nproc ;;
	disk) act_disk ;;
	diskwrite) act_diskwrite ;;
	rootdisk) act_rootdisk ;;
	fb) act_fb ;;
	ticks) act_ticks ;;
	panic) act_panic ;;
	shell) act_shell ;;
	demo) act_demo ;;
	hold) act_hold ;;
	coldplug) act_coldplug ;;
	hyperv) act_hyperv ;;
	vmbus) act_vmbus ;;
	input) act_input ;;
	drm) act_drm ;;
	echo) act_echo ;;
	scsi) act_scsi ;;
	scsihot) act_scsihot ;;
	iobench) act_iobench ;;
	net) act_net ;;
	netbench) act_netbench ;;
	'') ;;
	*) echo "PARVIS-UNKNOWN-ACTION=$a" ;;
	esac
done

echo PARVIS-POWEROFF
sync
poweroff -f
# poweroff -f does not return on success; never let init exit.
while :; do sleep 3600; done
