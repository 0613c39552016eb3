#!/bin/sh
# Installed as /usr/local/sbin/parvis-marker on the disks that build-disks.sh makes, and run
# once by parvis-marker.service after multi-user.target. It writes one line to the first
# serial port (whatever the kernel console is):
#   PARVIS-DISK-BOOTED host=<hostname> kernel=<uname -r> root=<source of /> rootfs=<type of />
#   boot=<type of /boot or none> fb=<first line of /proc/fb, spaces as _, or none>
#   scsi=<number of devices bound to hv_storvsc, or 0>
# A value that cannot be found is written as `none`; blanks inside a value become `_`.

# one_word: the first line of stdin with blanks as _, or none when empty.
one_word() {
	v=$(head -n 1 | tr -s ' \t' '__')
	[ -n "$v" ] || v=none
	printf '%s' "$v"
}

host=$(one_word </proc/sys/kernel/hostname)
kernel=$(uname -r | one_word)
root=$(findmnt -n -o SOURCE / 2>/dev/null | one_word)
rootfs=$(findmnt -n -o FSTYPE / 2>/dev/null | one_word)
# findmnt prints nothing when /boot is not a mount point (it lives on the root file system).
boot=$(findmnt -n -o FSTYPE /boot 2>/dev/null | one_word)
fb=$(cat /proc/fb 2>/dev/null | one_word)
# Bound VMBus storage devices are links named by their GUID (the driver's other entries are
# bind, unbind, uevent, new_id, remove_id and module).
scsi=0
for d in /sys/bus/vmbus/drivers/hv_storvsc/*-*; do
	[ -e "$d" ] && scsi=$((scsi + 1))
done

line="PARVIS-DISK-BOOTED host=$host kernel=$kernel root=$root rootfs=$rootfs boot=$boot fb=$fb scsi=$scsi"
echo "$line"
# The leading newline ends whatever the boot loader or the kernel left on the current line.
if ! printf '\n%s\n' "$line" >/dev/ttyS0; then
	echo "parvis-marker: cannot write to /dev/ttyS0" >&2
	exit 1
fi
