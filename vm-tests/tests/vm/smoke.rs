//! Smoke tests: the VM offers what every other test needs.

use std::fs::{self, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use dmabuf_p2p_vm_tests::{driver_of, ivshmem_devices, pci_devices, vfio_cdev, EDU_ID, IVSHMEM_ID};

#[test]
fn device_nodes_exist() {
    for node in ["/dev/iommu", "/dev/udmabuf", "/dev/dma_heap/system", "/dev/vfio/devices"] {
        assert!(Path::new(node).exists(), "{node} is missing");
    }
    let cdevs = fs::read_dir("/dev/vfio/devices").unwrap().count();
    assert!(cdevs >= 3, "expected a vfio cdev for edu and two ivshmem devices, found {cdevs}");
}

#[test]
fn test_devices_are_bound_to_vfio_pci() {
    let edu = pci_devices(EDU_ID);
    let shm = pci_devices(IVSHMEM_ID);
    assert_eq!(edu.len(), 1, "edu devices: {edu:?}");
    assert!(shm.len() >= 2, "ivshmem devices: {shm:?}");
    for bdf in edu.iter().chain(&shm) {
        assert_eq!(driver_of(bdf).as_deref(), Some("vfio-pci"), "{bdf} driver");
        assert!(vfio_cdev(bdf).is_some_and(|p| p.exists()), "{bdf} has no vfio cdev");
    }
}

#[test]
fn ivshmem_bars_have_the_configured_sizes() {
    let sizes: Vec<u64> = ivshmem_devices().iter().map(|(_, s)| *s).collect();
    assert!(sizes.contains(&(1 << 20)), "no 1 MiB ivshmem BAR2: {sizes:?}");
    assert!(sizes.contains(&(64 << 20)), "no 64 MiB ivshmem BAR2: {sizes:?}");
}

// Raw uAPI, until the library's bindings replace it.
const VFIO_DEVICE_BIND_IOMMUFD: libc::c_ulong = 0x3b76;
const VFIO_DEVICE_FEATURE: libc::c_ulong = 0x3b75;
const VFIO_DEVICE_FEATURE_GET: u32 = 1 << 16;
const VFIO_DEVICE_FEATURE_DMA_BUF: u32 = 11;

#[repr(C)]
struct BindIommufd {
    argsz: u32,
    flags: u32,
    iommufd: i32,
    out_devid: u32,
    token_uuid_ptr: u64,
}

#[repr(C)]
struct FeatureDmaBuf {
    argsz: u32,
    flags: u32,
    region_index: u32,
    open_flags: u32,
    feature_flags: u32,
    nr_ranges: u32,
    offset: u64,
    length: u64,
}

#[test]
fn raw_export_of_ivshmem_bar2_has_the_bar_size() {
    let (bdf, size) = ivshmem_devices().into_iter().next().expect("an ivshmem device");
    let cdev = vfio_cdev(&bdf).expect("vfio cdev");
    let dev = OpenOptions::new().read(true).write(true).open(&cdev).unwrap();
    let iommu = OpenOptions::new().read(true).write(true).open("/dev/iommu").unwrap();
    let mut bind = BindIommufd {
        argsz: std::mem::size_of::<BindIommufd>() as u32,
        flags: 0,
        iommufd: iommu.as_raw_fd(),
        out_devid: 0,
        token_uuid_ptr: 0,
    };
    // SAFETY: BIND_IOMMUFD reads and writes a struct of exactly this layout.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), VFIO_DEVICE_BIND_IOMMUFD, &mut bind) };
    assert_eq!(r, 0, "VFIO_DEVICE_BIND_IOMMUFD: {}", std::io::Error::last_os_error());
    let mut feat = FeatureDmaBuf {
        argsz: std::mem::size_of::<FeatureDmaBuf>() as u32,
        flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_BUF,
        region_index: 2,
        open_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
        feature_flags: 0,
        nr_ranges: 1,
        offset: 0,
        length: size,
    };
    // SAFETY: the feature header, dma-buf request and one range, laid out as the uAPI says.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), VFIO_DEVICE_FEATURE, &mut feat) };
    assert!(fd >= 0, "VFIO_DEVICE_FEATURE(DMA_BUF) on {bdf} BAR2: {}", std::io::Error::last_os_error());
    // SAFETY: the ioctl returned a new fd that nothing else owns.
    let buf = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: lseek on an fd we own.
    let end = unsafe { libc::lseek(buf.as_raw_fd(), 0, libc::SEEK_END) };
    assert_eq!(end as u64, size, "dma-buf size of {bdf} BAR2");
    let fdinfo = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    assert!(fdinfo.contains("exp_name:\tvfio_pci_core"), "fdinfo: {fdinfo}");
}
