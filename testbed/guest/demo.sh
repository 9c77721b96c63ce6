# The demo: the edu DMA engine copies into and out of an ivshmem BAR that was
# exported as a dma-buf and mapped through the IOMMU (or an NVMe controller
# reads blocks into it), then the export is revoked.
. /etc/testbed/pci.sh
find_dev() {
    for d in $(pci_devices); do
        [ "$(cat $d/vendor):$(cat $d/device)" = "$1" ] && { echo ${d##*/}; return; }
    done
}
find_class() {
    for d in $(pci_devices); do
        [ "$(cat $d/class)" = "$1" ] && { echo ${d##*/}; return; }
    done
}
target=$(find_dev 0x1af4:0x1110)
# DEMO_ENGINE=nvme (set by `vm demo --engine nvme`): the first NVMe controller
# reads blocks into the BAR instead (read-only: nothing is written to it).
if [ "$DEMO_ENGINE" = nvme ]; then
    engine=$(find_class 0x010802)
    kind=NVMe
    extra="--blocks 8"
else
    engine=$(find_dev 0x1234:0x11e8)
    kind=edu
    extra=
fi
# DEMO_JSON=--json (set by `vm demo --json`) keeps the report pure JSON.
[ -z "$DEMO_JSON" ] && echo "engine ($kind): $engine   target (ivshmem): $target"
DMABUF_P2P_HOST_CHECK=shm0 /bin/dmabuf-p2p $DEMO_JSON p2p-test --engine "$engine" --target "$target:2" $extra
