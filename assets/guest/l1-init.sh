#!/bin/sh
# Parvis L1 test-host /init (busybox sh). Packed by build-images.sh into
# l1-initramfs.cpio. Runs inside QEMU/TCG with an emulated AMD CPU (svm), loads
# kvm_amd, mounts the 9p share host0 at /host and runs the scenario given by
# parvis.scenario=<path>. See README.md next to this file for the markers.
# This script must never exit: it always ends in `poweroff -f`.

export PATH=/host/bin:/sbin:/bin:/usr/sbin:/usr/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
[ -t 1 ] || exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

scenario=
shell=
read -r cmdline </proc/cmdline
for w in $cmdline; do
	case "$w" in
	parvis.scenario=*) scenario=${w#parvis.scenario=} ;;
	parvis.shell) shell=1 ;;
	parvis.quiet) echo 1 >/proc/sys/kernel/printk ;;
	esac
done

modprobe kvm_amd npt=1 nested=1 2>/dev/null
if [ -e /dev/kvm ]; then echo PARVIS-L1-KVM=ok; else echo PARVIS-L1-KVM=missing; fi

modprobe -a virtio_pci 9pnet_virtio 9p 2>/dev/null
mkdir -p /host
share=missing
n=0
while [ $n -lt 20 ]; do
	if mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 host0 /host 2>/dev/null; then
		share=ok
		break
	fi
	# No virtio-9p device at all: do not wait.
	grep -qs . /sys/bus/virtio/drivers/9pnet_virtio/virtio*/mount_tag || break
	sleep 0.1
	n=$((n + 1))
done
echo "PARVIS-L1-SHARE=$share"

ip link set lo up 2>/dev/null
modprobe virtio_net 2>/dev/null
if [ -e /sys/class/net/eth0 ]; then
	# QEMU user-mode networking defaults.
	ip link set eth0 up
	ip addr add 10.0.2.15/24 dev eth0
	ip route add default via 10.0.2.2
	echo 'nameserver 10.0.2.3' >/etc/resolv.conf
	echo PARVIS-L1-NET=ok
else
	echo PARVIS-L1-NET=none
fi

export PARVIS_IMAGES=/images
if [ -n "$scenario" ]; then
	cd / || true
	sh "$scenario"
	echo "PARVIS-L1-SCENARIO-EXIT=$?"
else
	echo PARVIS-L1-NO-SCENARIO
fi

if [ -n "$shell" ]; then
	echo "PARVIS L1 shell on the serial console: type 'poweroff -f' (or exit) to end L1."
	setsid cttyhack sh -l
fi

sync
umount /host 2>/dev/null
poweroff -f
while :; do sleep 3600; done
