# What the test VM offers: kernel, PCI devices with their drivers, device nodes.
echo "kernel: $(uname -r)"
. /etc/testbed/pci.sh
echo "PCI devices:"
for dev in $(pci_devices); do
    drv=-
    [ -e $dev/driver ] && drv=$(basename "$(readlink $dev/driver)")
    printf '  %s  %s:%s  class %s  driver %s\n' "${dev##*/}" "$(cat $dev/vendor)" "$(cat $dev/device)" "$(cat $dev/class)" "$drv"
done
echo "device nodes:"
for n in /dev/iommu /dev/vfio/devices/* /dev/udmabuf /dev/dma_heap/*; do
    [ -e "$n" ] && echo "  $n"
done
