//! Smoke tests: the VM offers what every other test needs.

use std::fs;
use std::path::Path;

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::importer::iommufd::Iommufd;
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p::vfio::VfioPciDevice;

use dmabuf_p2p_vm_tests::{EDU_ID, IVSHMEM_ID, driver_of, ivshmem_devices, pci_devices, vfio_cdev};

#[test]
fn device_nodes_exist() {
    for node in [
        "/dev/iommu",
        "/dev/udmabuf",
        "/dev/dma_heap/system",
        "/dev/vfio/devices",
    ] {
        assert!(Path::new(node).exists(), "{node} is missing");
    }
    let cdevs = fs::read_dir("/dev/vfio/devices").unwrap().count();
    assert!(
        cdevs >= 3,
        "expected a vfio cdev for edu and two ivshmem devices, found {cdevs}"
    );
}

#[test]
fn test_devices_are_bound_to_vfio_pci() {
    let edu = pci_devices(EDU_ID);
    let shm = pci_devices(IVSHMEM_ID);
    assert!(!edu.is_empty(), "no edu device: {edu:?}");
    assert!(shm.len() >= 2, "ivshmem devices: {shm:?}");
    for bdf in edu.iter().chain(&shm) {
        assert_eq!(driver_of(bdf).as_deref(), Some("vfio-pci"), "{bdf} driver");
        assert!(
            vfio_cdev(bdf).is_some_and(|p| p.exists()),
            "{bdf} has no vfio cdev"
        );
    }
}

/// The library lists sysfs with its own `getdents64` into a written buffer
/// (src/dir.rs): it finds exactly the PCI devices the kernel names in
/// `/proc/bus/pci/devices`, a file read, not a sysfs readdir (docs/KERNEL.md,
/// "The kernfs readdir lock cycle"). The VM has one PCI domain, 0000.
#[test]
fn sysfs_lists_every_pci_device() {
    let table = fs::read_to_string("/proc/bus/pci/devices").unwrap();
    let mut want: Vec<String> = table
        .lines()
        .map(|l| {
            let bbdf = u16::from_str_radix(l.split_whitespace().next().unwrap(), 16).unwrap();
            let (bus, devfn) = (bbdf >> 8, bbdf & 0xff);
            format!("0000:{bus:02x}:{:02x}.{:x}", devfn >> 3, devfn & 7)
        })
        .collect();
    want.sort();
    let got: Vec<String> = Sysfs::default()
        .devices()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(got, want);
    // q35's own devices, a root port per test device, and the test devices.
    assert!(got.len() > 20, "only {} PCI devices: {got:?}", got.len());
}

#[test]
fn ivshmem_bars_have_the_configured_sizes() {
    let sizes: Vec<u64> = ivshmem_devices().iter().map(|(_, s)| *s).collect();
    assert!(
        sizes.contains(&(1 << 20)),
        "no 1 MiB ivshmem BAR2: {sizes:?}"
    );
    assert!(
        sizes.contains(&(64 << 20)),
        "no 64 MiB ivshmem BAR2: {sizes:?}"
    );
}

#[test]
fn export_of_ivshmem_bar2_has_the_bar_size() {
    let (bdf, size) = ivshmem_devices()
        .into_iter()
        .next()
        .expect("an ivshmem device");
    let iommufd = Iommufd::open().unwrap();
    let mut dev = VfioPciDevice::open(bdf.parse().unwrap()).unwrap();
    dev.bind(&iommufd).unwrap();
    dev.set_memory_decode(true).unwrap();
    let export = dev.export_bar(2, &[ByteRange::new(0, size)]).unwrap();
    assert_eq!(
        export.dmabuf().size().unwrap(),
        size,
        "dma-buf size of {bdf} BAR2"
    );
    assert_eq!(export.dmabuf().fdinfo().unwrap().exp_name, "vfio_pci_core");
}
