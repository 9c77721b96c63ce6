# pci_devices: the sysfs directory of every PCI device, sorted, found without
# listing sysfs. A readdir of sysfs whose buffer faults can record the lockdep
# edge kernfs_rwsem -> mmap_lock that closes the cycle with vfio-pci
# (docs/KERNEL.md), so no glob or ls over /sys: /proc/bus/pci/devices names
# every device ("BBDF<tab>VVVVDDDD..." in hex; domain 0, the only one here).
pci_devices() {
    while read -r bdf _; do
        devfn=$((0x${bdf#??}))
        printf '/sys/bus/pci/devices/0000:%s:%02x.%x\n' "${bdf%??}" $((devfn >> 3)) $((devfn & 7))
    done </proc/bus/pci/devices | sort
}
