#!/bin/sh
# /init of l2-storvsc.cpio: an initramfs as a Linux VM made on Hyper-V or Azure carries
# one (dracut's host-only default, initramfs-tools MODULES=dep): the VMBus storage driver
# and the root file system's, and no virtio driver at all. It finds the root disk over
# the synthetic SCSI controller, mounts it and hands over to its /init. Markers go to the
# console; on failure it powers off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
[ -t 1 ] || exec </dev/console >/dev/console 2>&1
echo PARVIS-STORVSC-INITRD

root=/dev/sda
read -r cmdline </proc/cmdline
for w in $cmdline; do
	case "$w" in
	root=/dev/*) root=${w#root=} ;;
	esac
done

fail() {
	echo "PARVIS-STORVSC-INITRD-ERROR=$*"
	dmesg | tail -n 30
	poweroff -f
	while :; do sleep 1; done
}

for m in hv_vmbus hv_storvsc sd_mod crc32c_generic ext4; do
	modprobe "$m" || fail "modprobe $m"
done
echo "PARVIS-STORVSC-INITRD-MODULES=$(cut -d' ' -f1 /proc/modules | sort | tr '\n' ',' | sed 's/,$//')"
n=0
while [ ! -b "$root" ]; do
	n=$((n + 1))
	[ $n -gt 600 ] && fail "no $root after 60s"
	sleep 0.1
done
mkdir -p /newroot
mount -t ext4 "$root" /newroot || fail "cannot mount $root"
[ -x /newroot/init ] || fail "no /init on $root"
echo "PARVIS-STORVSC-INITRD-ROOT=$root"
umount /proc /sys
exec switch_root /newroot /init
