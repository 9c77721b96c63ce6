#!/bin/busybox sh
# PID 1 of the test VM: mount, bind the test devices to vfio-pci, run the job
# that the host packed into /etc/testbed/job.sh and report on serial port 1.
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /tmp /run /root
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null

. /etc/testbed/pci.sh
report=/dev/ttyS1
stty -F $report raw -echo 2>/dev/null
exec 3<>$report

fail_boot() {
    echo "testbed-init: $*" >&3
    echo "@@exit 125" >&3
    poweroff -f
}

# edu (1234:11e8), ivshmem (1af4:1110) and NVMe controllers (class 010802)
# go to vfio-pci.
for dev in $(pci_devices); do
    id="$(cat $dev/vendor):$(cat $dev/device)"
    [ "$(cat $dev/class)" = 0x010802 ] && id=nvme
    case "$id" in
    0x1234:0x11e8|0x1af4:0x1110|nvme)
        bdf=${dev##*/}
        [ -e $dev/driver ] && echo $bdf > $dev/driver/unbind
        echo vfio-pci > $dev/driver_override || fail_boot "driver_override of $bdf"
        echo $bdf > /sys/bus/pci/drivers_probe
        [ "$(basename "$(readlink $dev/driver)")" = vfio-pci ] || fail_boot "$bdf ($id) did not bind to vfio-pci"
        ;;
    esac
done

echo "@@booted $(cut -d' ' -f1 /proc/uptime)" >&3
cd /root
/bin/sh /etc/testbed/job.sh <&3 >&3 2>&3
echo "@@exit $?" >&3
sync
poweroff -f
