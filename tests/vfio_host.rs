//! Host tests of the VFIO exporter and the iommufd importer: everything that
//! runs without a VFIO device. Export requests checked before any ioctl
//! (typed errors naming the range or region), the exact request bytes of a
//! two-range export, opening a device that is missing, unbound, bound to
//! another driver or without a cdev (against the real sysfs and a fake
//! tree), the vfio-pci binding protocol on a fake tree, and the error for a
//! missing `/dev/iommu`.

// Failing a test by panicking is what tests do.
#![allow(clippy::panic, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use dmabuf_p2p::exporter::bar::{EXPORT_OPEN_FLAGS, export_request, plan_export};
use dmabuf_p2p::importer::iommufd::{Iommufd, IovaRange, IovaRanges, MapPerms};
use dmabuf_p2p::pci::{
    IORESOURCE_IO, IORESOURCE_MEM, IORESOURCE_MEM_64, IORESOURCE_PREFETCH, Resource,
};
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p::vfio::{Bar, RegionInfo, VfioPciDevice, bind_to_vfio_pci_in};
use dmabuf_p2p::{ByteRange, Error, PciAddress, RangeProblem};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const PAGE: u64 = 4096;
const DEV: &str = "0000:00:04.0";

fn dev() -> PciAddress {
    DEV.parse().unwrap()
}

/// A memory BAR `index` of `size` bytes at physical `start`.
fn mem_bar(index: u32, start: u64, size: u64) -> Bar {
    Bar::new(
        index,
        RegionInfo::new(index, 7, size, u64::from(index) << 40),
        Resource::new(
            index,
            start,
            size,
            IORESOURCE_MEM | IORESOURCE_MEM_64 | IORESOURCE_PREFETCH,
        ),
    )
}

/// Asserts an `InvalidRange` naming `range` with `problem`, and a target that
/// names the device and BAR.
#[track_caller]
fn assert_invalid_range<T: std::fmt::Debug>(
    r: Result<T, Error>,
    range: ByteRange,
    problem: RangeProblem,
) {
    match r {
        Err(Error::InvalidRange {
            target,
            range: got,
            problem: p,
        }) => {
            assert_eq!((got, p), (range, problem));
            assert!(
                target.contains(DEV) && target.contains("BAR2"),
                "target {target:?}"
            );
        }
        other => panic!("expected InvalidRange for {range}, got {other:?}"),
    }
}

#[test]
fn plan_records_physical_ranges() -> TestResult {
    let bar = mem_bar(2, 0xfe00_0000, 1 << 20);
    let ranges = [
        ByteRange::new(0, PAGE),
        ByteRange::new(0x4000, 2 * PAGE),
        ByteRange::new(0, PAGE),
    ];
    let plan = plan_export(dev(), &bar, &ranges, PAGE)?;
    assert_eq!(
        (plan.device(), plan.bar(), plan.size()),
        (dev(), 2, 4 * PAGE)
    );
    assert_eq!(plan.ranges(), ranges);
    let phys: Vec<(u64, u64)> = plan.phys().iter().map(|p| (p.start, p.length)).collect();
    assert_eq!(
        phys,
        vec![
            (0xfe00_0000, PAGE),
            (0xfe00_4000, 2 * PAGE),
            (0xfe00_0000, PAGE)
        ]
    );
    assert_eq!(plan.phys()[1].pfns(PAGE), Some((0xfe004, 0xfe005)));
    // The whole BAR is fine.
    assert_eq!(
        plan_export(dev(), &bar, &[ByteRange::new(0, 1 << 20)], PAGE)?.size(),
        1 << 20
    );
    Ok(())
}

#[test]
fn plan_rejects_bad_ranges_naming_them() {
    let bar = mem_bar(2, 0xfe00_0000, 1 << 20);
    let good = ByteRange::new(0, PAGE);
    let cases = [
        (
            ByteRange::new(0x800, PAGE),
            RangeProblem::Unaligned { align: PAGE },
        ),
        (
            ByteRange::new(0, PAGE + 1),
            RangeProblem::Unaligned { align: PAGE },
        ),
        (ByteRange::new(PAGE, 0), RangeProblem::Empty),
        (
            ByteRange::new(u64::MAX - PAGE + 1, 2 * PAGE),
            RangeProblem::Overflow,
        ),
        (
            ByteRange::new((1 << 20) - PAGE, 2 * PAGE),
            RangeProblem::OutOfBounds {
                end: (1 << 20) + PAGE,
                size: 1 << 20,
            },
        ),
        (
            ByteRange::new(1 << 20, PAGE),
            RangeProblem::OutOfBounds {
                end: (1 << 20) + PAGE,
                size: 1 << 20,
            },
        ),
    ];
    for (bad, problem) in cases {
        // The bad range is named even when a good one comes first.
        assert_invalid_range(plan_export(dev(), &bar, &[good, bad], PAGE), bad, problem);
    }
    assert_invalid_range(
        plan_export(dev(), &bar, &[], PAGE),
        ByteRange::new(0, 0),
        RangeProblem::Count("no ranges given".to_owned()),
    );
}

#[test]
fn plan_rejects_a_sub_page_bar() {
    // ivshmem BAR0 is 256 bytes: no page-aligned range fits.
    let mut bar = mem_bar(0, 0xfe60_0000, 256);
    bar.index = 0;
    match plan_export(dev(), &bar, &[ByteRange::new(0, PAGE)], PAGE) {
        Err(Error::InvalidRange {
            target,
            problem: RangeProblem::OutOfBounds { end, size },
            ..
        }) => {
            assert_eq!((end, size), (PAGE, 256));
            assert!(target.contains("BAR0"), "{target}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn plan_rejects_non_bars_absent_and_io_bars() {
    for index in [6u32, 7, 8, 9, u32::MAX] {
        let bar = mem_bar(index, 0xfe00_0000, 1 << 20);
        match plan_export(dev(), &bar, &[ByteRange::new(0, PAGE)], PAGE) {
            Err(Error::InvalidRegion {
                device,
                index: i,
                problem,
                source,
            }) => {
                assert_eq!((device.as_str(), i), (DEV, index));
                assert!(source.is_none(), "refused before any ioctl");
                assert!(problem.contains("not a BAR"), "{problem}");
                if index == 6 {
                    assert!(problem.contains("ROM"), "{problem}");
                }
            }
            other => panic!("region {index}: {other:?}"),
        }
    }
    let absent = mem_bar(3, 0, 0);
    match plan_export(dev(), &absent, &[ByteRange::new(0, PAGE)], PAGE) {
        Err(Error::InvalidRegion {
            index: 3, problem, ..
        }) => assert!(problem.contains("not present"), "{problem}"),
        other => panic!("absent BAR: {other:?}"),
    }
    let mut io = mem_bar(4, 0xc000, 0x1000);
    io.resource.flags = IORESOURCE_IO;
    match plan_export(dev(), &io, &[ByteRange::new(0, PAGE)], PAGE) {
        Err(Error::InvalidRegion {
            index: 4, problem, ..
        }) => assert!(problem.contains("I/O"), "{problem}"),
        other => panic!("I/O BAR: {other:?}"),
    }
}

#[test]
fn plan_rejects_physical_overflow() {
    // The BAR-relative range is fine but the BAR sits at the top of the
    // physical space: the kernel would say EOVERFLOW.
    let bar = mem_bar(2, u64::MAX - PAGE + 1, 1 << 20);
    let r = ByteRange::new(0x2000, PAGE);
    assert_invalid_range(
        plan_export(dev(), &bar, &[r], PAGE),
        r,
        RangeProblem::Overflow,
    );
}

/// The request bytes against the kernel's uAPI, written out here rather
/// than taken from the library's bindings: `struct vfio_device_feature`
/// (`argsz`, `flags`, then the data at 8), `struct
/// vfio_device_feature_dma_buf` (`region_index`, `open_flags`, `flags`,
/// `nr_ranges`, then the ranges at 16), 16 bytes per range (`offset`,
/// `length`); `VFIO_DEVICE_FEATURE_GET` is `1 << 16`, `..._DMA_BUF` 11.
#[test]
fn two_range_request_has_the_uapi_layout() -> TestResult {
    let ranges = [ByteRange::new(0, 0x1000), ByteRange::new(0x4000, 0x2000)];
    let b = export_request(2, &ranges)?;
    let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_ne_bytes(b[o..o + 8].try_into().unwrap());

    let (hdr, feat) = (8, 16);
    assert_eq!(b.len(), 8 + 16 + 2 * 16);
    assert_eq!(u32_at(0) as usize, b.len(), "argsz");
    assert_eq!(u32_at(4), (1 << 16) | 11, "flags: GET | DMA_BUF");
    assert_eq!(u32_at(hdr), 2, "region_index");
    assert_eq!(u32_at(hdr + 4), EXPORT_OPEN_FLAGS, "open_flags");
    assert_eq!(EXPORT_OPEN_FLAGS, (libc::O_RDWR | libc::O_CLOEXEC) as u32);
    assert_eq!(u32_at(hdr + 8), 0, "flags");
    assert_eq!(u32_at(hdr + 12), 2, "nr_ranges");
    let first = hdr + feat;
    assert_eq!((u64_at(first), u64_at(first + 8)), (0, 0x1000));
    assert_eq!((u64_at(first + 16), u64_at(first + 24)), (0x4000, 0x2000));

    let one = export_request(0, &[ByteRange::new(0x1000, 0x1000)])?;
    assert_eq!(one.len(), 40);
    Ok(())
}

#[test]
fn opening_a_missing_device_names_it() {
    // No machine has a device at this address (domain 0x7fff).
    let addr: PciAddress = "7fff:ff:1f.7".parse().unwrap();
    match VfioPciDevice::open(addr) {
        Err(e @ Error::Device { .. }) => {
            assert!(e.to_string().contains("7fff:ff:1f.7"), "{e}");
            let Error::Device {
                device, problem, ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(device, "7fff:ff:1f.7");
            assert!(problem.contains("not present"), "{problem}");
        }
        other => panic!("expected Error::Device, got {other:?}"),
    }
}

#[test]
fn opening_iommufd_at_a_missing_path_names_it() {
    match Iommufd::open_path("/nonexistent/iommu") {
        Err(e @ Error::Sys { .. }) => {
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
            assert!(e.to_string().contains("/nonexistent/iommu"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn iova_range_arithmetic() {
    let r = IovaRanges::new(
        vec![
            IovaRange::new(0, 0xfedf_ffff),
            IovaRange::new(0xfef0_0000, 0x7f_ffff_ffff),
        ],
        0x1000,
    );
    assert!(r.contains(0x4000_0000, 0x1000));
    assert!(!r.contains(0xfee0_0000, 0x1000), "the MSI window is a hole");
    assert!(
        !r.contains(0xfedf_f000, 0x2000),
        "a request across the hole"
    );
    assert!(r.contains(0xfef0_0000, 0x1000));
    assert!(!r.contains(0x7f_ffff_f000, 0x2000));
    assert!(!r.contains(u64::MAX, 2));
    assert_eq!(r.ranges[1].to_string(), "0xfef00000..=0x7fffffffff");
    assert!(MapPerms::Write.writable() && !MapPerms::Write.readable());
}

// ---------------------------------------------------------------------------
// A fake sysfs tree
// ---------------------------------------------------------------------------

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("dmabuf-p2p-vfio-host-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A fake device directory under `devices/`, linked from `bus/pci/devices/`,
/// bound to `driver` if given.
fn fake_device(root: &Path, name: &str, driver: Option<&str>) -> std::io::Result<PathBuf> {
    let real = root.join("devices/pci0000:00").join(name);
    fs::create_dir_all(&real)?;
    fs::write(real.join("vendor"), "0x1af4\n")?;
    fs::write(real.join("device"), "0x1110\n")?;
    let bus = root.join("bus/pci/devices");
    fs::create_dir_all(&bus)?;
    symlink(
        format!("../../../devices/pci0000:00/{name}"),
        bus.join(name),
    )?;
    if let Some(d) = driver {
        fs::create_dir_all(root.join("bus/pci/drivers").join(d))?;
        symlink(format!("../../../bus/pci/drivers/{d}"), real.join("driver"))?;
    }
    Ok(real)
}

#[test]
fn open_names_the_wrong_driver() -> TestResult {
    let tmp = TempDir::new()?;
    fake_device(&tmp.0, DEV, Some("e1000e"))?;
    let sysfs = Sysfs::new(&tmp.0);
    match VfioPciDevice::open_in(&sysfs, tmp.0.join("dev"), dev()) {
        Err(e @ Error::WrongDriver { .. }) => {
            assert!(
                e.to_string().contains("e1000e") && e.to_string().contains("vfio-pci"),
                "{e}"
            );
            let Error::WrongDriver {
                device,
                driver,
                expected,
            } = e
            else {
                unreachable!()
            };
            assert_eq!(
                (device.as_str(), driver.as_deref(), expected.as_str()),
                (DEV, Some("e1000e"), "vfio-pci")
            );
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[test]
fn open_of_an_unbound_device_says_so() -> TestResult {
    let tmp = TempDir::new()?;
    fake_device(&tmp.0, DEV, None)?;
    match VfioPciDevice::open_in(&Sysfs::new(&tmp.0), tmp.0.join("dev"), dev()) {
        Err(e @ Error::WrongDriver { driver: None, .. }) => {
            assert!(e.to_string().contains("no driver"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}

#[test]
fn open_without_a_cdev_says_so() -> TestResult {
    let tmp = TempDir::new()?;
    let real = fake_device(&tmp.0, DEV, Some("vfio-pci"))?;
    let sysfs = Sysfs::new(&tmp.0);
    let cdev_dir = tmp.0.join("dev/vfio/devices");
    // Bound to vfio-pci on a kernel without VFIO cdevs: no vfio-dev/.
    match VfioPciDevice::open_in(&sysfs, &cdev_dir, dev()) {
        Err(Error::Device {
            device, problem, ..
        }) => {
            assert_eq!(device, DEV);
            assert!(
                problem.contains("no VFIO cdev") && problem.contains("CONFIG_VFIO_DEVICE_CDEV"),
                "{problem}"
            );
        }
        other => panic!("{other:?}"),
    }
    // sysfs names vfio7, but there is no /dev node.
    fs::create_dir_all(real.join("vfio-dev/vfio7"))?;
    match VfioPciDevice::open_in(&sysfs, &cdev_dir, dev()) {
        Err(Error::Device { problem, .. }) => assert!(problem.contains("vfio7"), "{problem}"),
        other => panic!("{other:?}"),
    }
    // With a node (a plain file here) the open works; the kernel ioctls then
    // fail on it, and everything else waits for the bind.
    fs::create_dir_all(&cdev_dir)?;
    fs::write(cdev_dir.join("vfio7"), "")?;
    let mut d = VfioPciDevice::open_in(&sysfs, &cdev_dir, dev())?;
    assert_eq!(d.cdev_path(), cdev_dir.join("vfio7"));
    assert!(!d.is_bound());
    match d.info() {
        Err(Error::Device { problem, .. }) => assert!(problem.contains("not bound"), "{problem}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        d.export_bar(2, &[ByteRange::new(0, PAGE)]),
        Err(Error::Device { .. })
    ));
    assert!(matches!(
        d.set_memory_decode(true),
        Err(Error::Device { .. })
    ));
    assert!(matches!(d.map_bar(2), Err(Error::Device { .. })));
    // /dev/null is no iommufd: the kernel's answer (ENOTTY) comes back typed,
    // and the device stays unbound.
    let not_iommufd = Iommufd::from_fd(std::fs::File::open("/dev/null")?.into());
    let r = d.bind(&not_iommufd);
    assert_eq!(
        r.as_ref().err().and_then(Error::raw_os_error),
        Some(libc::ENOTTY),
        "{r:?}"
    );
    assert!(!d.is_bound());
    Ok(())
}

#[test]
fn binding_writes_override_unbind_and_probe() -> TestResult {
    let tmp = TempDir::new()?;
    let real = fake_device(&tmp.0, DEV, Some("e1000e"))?;
    let sysfs = Sysfs::new(&tmp.0);
    // A fake tree has no kernel behind it: the device stays with e1000e, and
    // the function reports that, after writing the three files in order.
    match bind_to_vfio_pci_in(&sysfs, dev()) {
        Err(Error::WrongDriver { driver, .. }) => assert_eq!(driver.as_deref(), Some("e1000e")),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        fs::read_to_string(real.join("driver_override"))?,
        "vfio-pci"
    );
    assert_eq!(
        fs::read_to_string(tmp.0.join("bus/pci/drivers/e1000e/unbind"))?,
        DEV
    );
    assert_eq!(
        fs::read_to_string(tmp.0.join("bus/pci/drivers_probe"))?,
        DEV
    );

    // Already on vfio-pci: nothing is written.
    let other: PciAddress = "0000:00:05.0".parse()?;
    let real2 = fake_device(&tmp.0, "0000:00:05.0", Some("vfio-pci"))?;
    bind_to_vfio_pci_in(&sysfs, other)?;
    assert!(!real2.join("driver_override").exists());

    // Unbound: override and probe, no unbind.
    let third: PciAddress = "0000:00:06.0".parse()?;
    let real3 = fake_device(&tmp.0, "0000:00:06.0", None)?;
    assert!(matches!(
        bind_to_vfio_pci_in(&sysfs, third),
        Err(Error::WrongDriver { driver: None, .. })
    ));
    assert_eq!(
        fs::read_to_string(real3.join("driver_override"))?,
        "vfio-pci"
    );
    assert_eq!(
        fs::read_to_string(tmp.0.join("bus/pci/drivers_probe"))?,
        "0000:00:06.0"
    );

    // Missing device.
    assert!(matches!(
        bind_to_vfio_pci_in(&sysfs, "0000:00:1f.0".parse()?),
        Err(Error::Device { .. })
    ));
    Ok(())
}
