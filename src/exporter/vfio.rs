//! The VFIO PCI exporter: a device bound to `vfio-pci`, opened through its
//! VFIO cdev (`/dev/vfio/devices/vfioN`) and bound to an iommufd, whose BAR
//! ranges become dma-bufs (`VFIO_DEVICE_FEATURE_DMA_BUF`).
//!
//! The flow (uAPI reference E):
//!
//! 1. [`bind_to_vfio_pci`], if the device is not bound to `vfio-pci` yet;
//! 2. [`VfioPciDevice::open`] by PCI address: sysfs
//!    `/sys/bus/pci/devices/<addr>/vfio-dev/vfioN` names the cdev;
//! 3. [`VfioPciDevice::bind`] to an [`Iommufd`]. The kernel refuses every
//!    other device ioctl before this (`EINVAL`); this type refuses them
//!    without asking ([`Error::Device`], "not bound");
//! 4. optionally [`VfioPciDevice::attach`] to an [`Ioas`], so the device's
//!    own DMA goes through that address space;
//! 5. [`VfioPciDevice::set_memory_decode`]`(true)`, then
//!    [`VfioPciDevice::export_bar`].
//!
//! **Memory decode and revocation.** VFIO revokes every dma-buf of a device
//! while its memory decode (`PCI_COMMAND` bit 1) is off, while it is in D3,
//! and during a reset; an export made while decode is off is *born revoked*,
//! and importing it gives [`Error::Revoked`]. Turn decode on before
//! exporting. Closing the device (dropping the [`VfioPciDevice`]) revokes its
//! dma-bufs for good. An iommufd mapping of a revoked dma-buf stays dead even
//! after the exporter restores the buffer, until it is unmapped and mapped
//! again ([`IoasMapping::remap`](crate::importer::iommufd::IoasMapping::remap)).
//!
//! ```no_run
//! use dmabuf_p2p::exporter::vfio::VfioPciDevice;
//! use dmabuf_p2p::importer::iommufd::Iommufd;
//! use dmabuf_p2p::ByteRange;
//!
//! let iommufd = Iommufd::open()?;
//! let mut dev = VfioPciDevice::open("0000:00:03.0".parse()?)?;
//! dev.bind(&iommufd)?;
//! println!("{:04x}:{:04x}", dev.config_read_u16(0)?, dev.config_read_u16(2)?);
//! dev.set_memory_decode(true)?;
//! let export = dev.export_bar(2, &[ByteRange::new(0, 0x1000), ByteRange::new(0x4000, 0x2000)])?;
//! assert_eq!(export.size(), 0x3000);
//! for p in export.phys_ranges() {
//!     println!("{p}");
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::dmabuf::DmaBuf;
use crate::dmabuf::human_size;
use crate::error::{Error, RangeProblem, Result};
use crate::importer::iommufd::{Ioas, Iommufd};
use crate::ioctl;
use crate::pci::{BAR_COUNT, PciAddress, Resource};
use crate::range::{ByteRange, PhysRange, map_to_phys, page_size, validate_export_ranges};
use crate::revoke::{Revocable, RevocationHub, RevokeReason};
use crate::sys;
use crate::sysfs::Sysfs;

/// The driver a device must be bound to: `vfio-pci`.
///
/// ```
/// assert_eq!(dmabuf_p2p::exporter::vfio::VFIO_PCI_DRIVER, "vfio-pci");
/// ```
pub const VFIO_PCI_DRIVER: &str = "vfio-pci";

/// Where VFIO cdevs live: `/dev/vfio/devices`.
///
/// ```
/// assert_eq!(dmabuf_p2p::exporter::vfio::VFIO_CDEV_DIR, "/dev/vfio/devices");
/// ```
pub const VFIO_CDEV_DIR: &str = "/dev/vfio/devices";

/// The `open_flags` of every export: `O_RDWR | O_CLOEXEC`.
///
/// ```
/// use dmabuf_p2p::exporter::vfio::EXPORT_OPEN_FLAGS;
/// assert_eq!(EXPORT_OPEN_FLAGS, (libc::O_RDWR | libc::O_CLOEXEC) as u32);
/// ```
#[allow(clippy::cast_sign_loss)]
pub const EXPORT_OPEN_FLAGS: u32 = (libc::O_RDWR | libc::O_CLOEXEC) as u32;

/// VFIO region index of the expansion ROM.
///
/// ```
/// assert_eq!(dmabuf_p2p::exporter::vfio::ROM_REGION_INDEX, 6);
/// ```
pub const ROM_REGION_INDEX: u32 = sys::VFIO_PCI_ROM_REGION_INDEX;

/// VFIO region index of PCI config space.
///
/// ```
/// assert_eq!(dmabuf_p2p::exporter::vfio::CONFIG_REGION_INDEX, 7);
/// ```
pub const CONFIG_REGION_INDEX: u32 = sys::VFIO_PCI_CONFIG_REGION_INDEX;

/// Offset of the 16-bit `PCI_COMMAND` register in config space.
#[allow(clippy::cast_possible_truncation)]
const PCI_COMMAND: u64 = sys::PCI_COMMAND as u64;
/// `PCI_COMMAND` bit 1: memory space decode.
#[allow(clippy::cast_possible_truncation)]
const COMMAND_MEMORY: u16 = sys::PCI_COMMAND_MEMORY as u16;
/// `PCI_COMMAND` bit 2: bus master.
#[allow(clippy::cast_possible_truncation)]
const COMMAND_MASTER: u16 = sys::PCI_COMMAND_MASTER as u16;

/// Binds a PCI device to `vfio-pci` (uAPI reference E.1): writes
/// `driver_override`, unbinds the current driver if there is one, and asks
/// the bus to probe (`drivers_probe`). A device already bound to `vfio-pci` is
/// left alone. Needs root. Fails with [`Error::Device`] if the device does
/// not exist and [`Error::WrongDriver`] if it ends up bound elsewhere.
///
/// ```no_run
/// use dmabuf_p2p::exporter::vfio::{bind_to_vfio_pci, VfioPciDevice};
///
/// let addr = "0000:01:00.0".parse()?;
/// bind_to_vfio_pci(addr)?;
/// let dev = VfioPciDevice::open(addr)?;
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn bind_to_vfio_pci(addr: PciAddress) -> Result<()> {
    bind_to_vfio_pci_in(&Sysfs::default(), addr)
}

/// [`bind_to_vfio_pci`] in the sysfs tree `sysfs`.
///
/// ```no_run
/// use dmabuf_p2p::{exporter::vfio::bind_to_vfio_pci_in, sysfs::Sysfs};
/// bind_to_vfio_pci_in(&Sysfs::new("/sys"), "0000:01:00.0".parse()?)?;
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn bind_to_vfio_pci_in(sysfs: &Sysfs, addr: PciAddress) -> Result<()> {
    ensure_present(sysfs, addr)?;
    let old = sysfs.driver(addr)?;
    if old.as_deref() == Some(VFIO_PCI_DRIVER) {
        return Ok(());
    }
    let dir = sysfs.device_dir(addr);
    let name = addr.to_string();
    write_attr(addr, &dir.join("driver_override"), VFIO_PCI_DRIVER)?;
    if old.is_some() {
        write_attr(addr, &dir.join("driver/unbind"), &name)?;
    }
    write_attr(addr, &sysfs.root().join("bus/pci/drivers_probe"), &name)?;
    match sysfs.driver(addr)? {
        Some(d) if d == VFIO_PCI_DRIVER => Ok(()),
        driver => Err(Error::WrongDriver {
            device: name,
            driver,
            expected: VFIO_PCI_DRIVER.to_owned(),
        }),
    }
}

fn write_attr(addr: PciAddress, path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| Error::sys("write", format!("{addr} {}", path.display()), e))
}

fn ensure_present(sysfs: &Sysfs, addr: PciAddress) -> Result<()> {
    if sysfs.exists(addr) {
        Ok(())
    } else {
        Err(Error::Device {
            device: addr.to_string(),
            problem: format!("not present (no {})", sysfs.device_dir(addr).display()),
        })
    }
}

/// What `VFIO_DEVICE_GET_INFO` reports.
///
/// ```no_run
/// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
/// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
/// # dev.bind(&iommufd)?;
/// let info = dev.info()?;
/// assert!(info.is_pci());
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Number of regions (9 for vfio-pci: BARs 0..=5, ROM, config, VGA).
    pub num_regions: u32,
    /// Number of IRQ indexes.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Whether `VFIO_DEVICE_RESET` works (`VFIO_DEVICE_FLAGS_RESET`).
    ///
    /// ```
    /// use dmabuf_p2p::exporter::vfio::DeviceInfo;
    /// let info = DeviceInfo { flags: 3, num_regions: 9, num_irqs: 5 };
    /// assert!(info.supports_reset());
    /// ```
    pub const fn supports_reset(&self) -> bool {
        self.flags & sys::VFIO_DEVICE_FLAGS_RESET != 0
    }

    /// Whether it is a PCI device (`VFIO_DEVICE_FLAGS_PCI`).
    ///
    /// ```
    /// use dmabuf_p2p::exporter::vfio::DeviceInfo;
    /// assert!(DeviceInfo { flags: 2, num_regions: 9, num_irqs: 5 }.is_pci());
    /// ```
    pub const fn is_pci(&self) -> bool {
        self.flags & sys::VFIO_DEVICE_FLAGS_PCI != 0
    }
}

/// What `VFIO_DEVICE_GET_REGION_INFO` reports for one region.
///
/// ```no_run
/// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
/// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
/// # dev.bind(&iommufd)?;
/// let config = dev.region_info(dmabuf_p2p::exporter::vfio::CONFIG_REGION_INDEX)?;
/// println!("config space: {} bytes", config.size);
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region index (BARs 0..=5, ROM 6, config 7, VGA 8).
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes; 0 for an absent BAR (unused, or the upper half of a
    /// 64-bit BAR).
    pub size: u64,
    /// Offset of the region in the device fd, for `pread`/`pwrite`/`mmap`.
    pub offset: u64,
}

impl RegionInfo {
    /// Whether the region can be read (`VFIO_REGION_INFO_FLAG_READ`).
    ///
    /// ```
    /// # let r = dmabuf_p2p::exporter::vfio::RegionInfo { index: 2, flags: 7, size: 1 << 20, offset: 2 << 40 };
    /// assert!(r.readable());
    /// ```
    pub const fn readable(&self) -> bool {
        self.flags & sys::VFIO_REGION_INFO_FLAG_READ != 0
    }

    /// Whether the region can be written (`VFIO_REGION_INFO_FLAG_WRITE`).
    ///
    /// ```
    /// # let r = dmabuf_p2p::exporter::vfio::RegionInfo { index: 2, flags: 7, size: 1 << 20, offset: 2 << 40 };
    /// assert!(r.writable());
    /// ```
    pub const fn writable(&self) -> bool {
        self.flags & sys::VFIO_REGION_INFO_FLAG_WRITE != 0
    }

    /// Whether the region can be `mmap`ed (`VFIO_REGION_INFO_FLAG_MMAP`).
    ///
    /// ```
    /// # let r = dmabuf_p2p::exporter::vfio::RegionInfo { index: 2, flags: 7, size: 1 << 20, offset: 2 << 40 };
    /// assert!(r.mmap_supported());
    /// ```
    pub const fn mmap_supported(&self) -> bool {
        self.flags & sys::VFIO_REGION_INFO_FLAG_MMAP != 0
    }
}

/// A BAR as VFIO and sysfs describe it.
///
/// ```
/// use dmabuf_p2p::exporter::vfio::{Bar, RegionInfo};
/// use dmabuf_p2p::pci::{Resource, IORESOURCE_MEM};
///
/// let bar = Bar {
///     index: 2,
///     region: RegionInfo { index: 2, flags: 7, size: 1 << 20, offset: 2 << 40 },
///     resource: Resource { index: 2, start: 0xfe00_0000, size: 1 << 20, flags: IORESOURCE_MEM },
/// };
/// assert!(bar.is_present() && bar.resource.is_mem());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// The BAR index, 0..=5.
    pub index: u32,
    /// VFIO's view: size, flags, offset in the device fd.
    pub region: RegionInfo,
    /// sysfs's view (`resource` line): physical start, size, kind.
    pub resource: Resource,
}

impl Bar {
    /// Whether the BAR exists (VFIO reports a non-zero size).
    ///
    /// ```
    /// # use dmabuf_p2p::pci::{Resource, IORESOURCE_MEM};
    /// # use dmabuf_p2p::exporter::vfio::{Bar, RegionInfo};
    /// let bar = Bar {
    ///     index: 2,
    ///     region: RegionInfo { index: 2, flags: 7, size: 0x10_0000, offset: 2 << 40 },
    ///     resource: Resource { index: 2, start: 0xfe00_0000, size: 0x10_0000, flags: IORESOURCE_MEM },
    /// };
    /// assert!(bar.is_present());
    /// ```
    pub const fn is_present(&self) -> bool {
        self.region.size != 0
    }

    /// The size in bytes.
    ///
    /// ```
    /// # use dmabuf_p2p::pci::{Resource, IORESOURCE_MEM};
    /// # use dmabuf_p2p::exporter::vfio::{Bar, RegionInfo};
    /// let bar = Bar {
    ///     index: 2,
    ///     region: RegionInfo { index: 2, flags: 7, size: 0x10_0000, offset: 2 << 40 },
    ///     resource: Resource { index: 2, start: 0xfe00_0000, size: 0x10_0000, flags: IORESOURCE_MEM },
    /// };
    /// assert_eq!(bar.size(), 0x10_0000);
    /// ```
    pub const fn size(&self) -> u64 {
        self.region.size
    }

    /// The physical address of its first byte.
    ///
    /// ```
    /// # use dmabuf_p2p::pci::{Resource, IORESOURCE_MEM};
    /// # use dmabuf_p2p::exporter::vfio::{Bar, RegionInfo};
    /// let bar = Bar {
    ///     index: 2,
    ///     region: RegionInfo { index: 2, flags: 7, size: 0x10_0000, offset: 2 << 40 },
    ///     resource: Resource { index: 2, start: 0xfe00_0000, size: 0x10_0000, flags: IORESOURCE_MEM },
    /// };
    /// assert_eq!(bar.phys_start(), 0xfe00_0000);
    /// ```
    pub const fn phys_start(&self) -> u64 {
        self.resource.start
    }
}

/// An export request checked against a BAR, ready for the kernel: what
/// [`VfioPciDevice::export_bar`] sends and records. Built by [`plan_export`].
///
/// ```
/// # use dmabuf_p2p::pci::{Resource, IORESOURCE_MEM};
/// # use dmabuf_p2p::exporter::vfio::{Bar, RegionInfo};
/// let bar = Bar {
///     index: 2,
///     region: RegionInfo { index: 2, flags: 7, size: 0x10_0000, offset: 2 << 40 },
///     resource: Resource { index: 2, start: 0xfe00_0000, size: 0x10_0000, flags: IORESOURCE_MEM },
/// };
/// let plan = dmabuf_p2p::exporter::vfio::plan_export("0000:00:03.0".parse()?, &bar, &[dmabuf_p2p::ByteRange::new(0, 0x2000)], 0x1000)?;
/// assert_eq!((plan.size, plan.phys[0].start), (0x2000, 0xfe00_0000));
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportPlan {
    /// The device.
    pub device: PciAddress,
    /// The BAR index.
    pub bar: u32,
    /// The ranges, BAR-relative, in request order.
    pub ranges: Vec<ByteRange>,
    /// The same ranges as physical addresses.
    pub phys: Vec<PhysRange>,
    /// The total length: the size of the dma-buf.
    pub size: u64,
}

/// Checks an export of `ranges` of `bar` on `device` before any ioctl, with
/// `page` as the alignment (normally [`page_size`]): the BAR must be 0..=5
/// ([`Error::InvalidRegion`]), present and a memory BAR (also
/// `InvalidRegion`), and the ranges must pass
/// [`validate_export_ranges`] ([`Error::InvalidRange`] naming the first bad
/// range). The physical ranges are computed from the BAR's sysfs start.
///
/// ```
/// use dmabuf_p2p::exporter::vfio::{plan_export, Bar, RegionInfo};
/// use dmabuf_p2p::pci::{Resource, IORESOURCE_MEM};
/// use dmabuf_p2p::{ByteRange, Error, RangeProblem};
///
/// let bar = Bar {
///     index: 2,
///     region: RegionInfo { index: 2, flags: 7, size: 0x10_0000, offset: 2 << 40 },
///     resource: Resource { index: 2, start: 0xfe00_0000, size: 0x10_0000, flags: IORESOURCE_MEM },
/// };
/// let dev = "0000:00:03.0".parse()?;
/// let plan = plan_export(dev, &bar, &[ByteRange::new(0x1000, 0x2000)], 0x1000)?;
/// assert_eq!(plan.phys[0].start, 0xfe00_1000);
///
/// let bad = ByteRange::new(0xff000, 0x2000);
/// match plan_export(dev, &bar, &[bad], 0x1000) {
///     Err(Error::InvalidRange { range, problem: RangeProblem::OutOfBounds { .. }, .. }) => assert_eq!(range, bad),
///     other => panic!("{other:?}"),
/// }
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn plan_export(
    device: PciAddress,
    bar: &Bar,
    ranges: &[ByteRange],
    page: u64,
) -> Result<ExportPlan> {
    check_bar_index(device, bar.index)?;
    let invalid = |problem: String| Error::InvalidRegion {
        device: device.to_string(),
        index: bar.index,
        problem,
    };
    if !bar.is_present() {
        return Err(invalid(
            "BAR not present (size 0: unused, or the upper half of a 64-bit BAR)".to_owned(),
        ));
    }
    if bar.resource.is_io() || !bar.resource.is_mem() {
        return Err(invalid(
            "an I/O-port BAR; only memory BARs can be exported".to_owned(),
        ));
    }
    // The BAR's name only goes into an error: format it then, not on every
    // export.
    let named = |e: Error| match e {
        Error::InvalidRange { range, problem, .. } => Error::InvalidRange {
            target: bar_name(device, bar.index, bar.size()),
            range,
            problem,
        },
        other => other,
    };
    let size = validate_export_ranges("", ranges, bar.size(), page).map_err(named)?;
    let phys = map_to_phys("", bar.phys_start(), ranges).map_err(named)?;
    Ok(ExportPlan {
        device,
        bar: bar.index,
        ranges: ranges.to_vec(),
        phys,
        size,
    })
}

/// The exact bytes [`VfioPciDevice::export_bar`] passes to
/// `VFIO_DEVICE_FEATURE` for an export of `ranges` of BAR `region_index`: the
/// `vfio_device_feature` header (`argsz`, `flags = GET | DMA_BUF`), the
/// `vfio_device_feature_dma_buf` part (`region_index`, `open_flags =`
/// [`EXPORT_OPEN_FLAGS`], `flags = 0`, `nr_ranges`) and the ranges, 16 bytes
/// each. For inspection and tests; nothing is checked here.
///
/// ```
/// use dmabuf_p2p::{exporter::vfio::export_request, ByteRange};
/// let bytes = export_request(2, &[ByteRange::new(0, 0x1000), ByteRange::new(0x4000, 0x2000)])?;
/// assert_eq!(bytes.len(), 8 + 16 + 2 * 16);
/// assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 56); // argsz
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn export_request(region_index: u32, ranges: &[ByteRange]) -> Result<Vec<u8>> {
    let raw = to_dma_ranges(ranges);
    ioctl::vfio_dma_buf_feature_arg(region_index, EXPORT_OPEN_FLAGS, &raw)
        .map(|b| b.as_bytes().to_vec())
        .map_err(|e| {
            Error::sys(
                "VFIO_DEVICE_FEATURE(DMA_BUF) request",
                format!("BAR{region_index}"),
                e,
            )
        })
}

fn to_dma_ranges(ranges: &[ByteRange]) -> Vec<sys::vfio_region_dma_range> {
    ranges
        .iter()
        .map(|r| sys::vfio_region_dma_range {
            offset: r.offset,
            length: r.length,
        })
        .collect()
}

/// `index` must be a BAR (0..=5).
fn check_bar_index(device: PciAddress, index: u32) -> Result<()> {
    if index < BAR_COUNT {
        return Ok(());
    }
    let what = match index {
        ROM_REGION_INDEX => "the expansion ROM",
        CONFIG_REGION_INDEX => "config space",
        8 => "the VGA region",
        _ => "not a VFIO PCI region",
    };
    Err(Error::InvalidRegion {
        device: device.to_string(),
        index,
        problem: format!("{what}, not a BAR (BARs are 0..={})", BAR_COUNT - 1),
    })
}

/// A BAR as named in errors: `0000:00:03.0 BAR2 (1 MiB)`.
fn bar_name(device: PciAddress, index: u32, size: u64) -> String {
    format!("{device} BAR{index} ({})", human_size(size))
}

/// A PCI device opened through its VFIO cdev.
///
/// Open it with [`VfioPciDevice::open`], then [`VfioPciDevice::bind`] it to
/// an [`Iommufd`]; every other operation needs the binding. Dropping it closes
/// the cdev, which detaches and unbinds the device and permanently revokes
/// its dma-bufs.
///
/// The device holds a clone of its iommufd and of the [`Ioas`] it is attached
/// to, and closes its own fd before dropping them, so the kernel detaches
/// before the IOAS is destroyed, whatever the caller's drop order.
///
/// **Hot-unplug.** The bind also registers an eventfd for VFIO's device
/// request (`VFIO_PCI_REQ_IRQ_INDEX`): the kernel signals it when it wants
/// the device back and waits for the device to be closed.
/// [`unplug_requested`](VfioPciDevice::unplug_requested) (non-blocking),
/// [`wait_unplug_request`](VfioPciDevice::wait_unplug_request) or
/// [`unplug_request_fd`](VfioPciDevice::unplug_request_fd) (for an event
/// loop) notice it, revoke every export with
/// [`RevokeReason::Unplug`], and the
/// owner then drops the device.
///
/// ```no_run
/// use dmabuf_p2p::exporter::vfio::VfioPciDevice;
/// use dmabuf_p2p::importer::iommufd::Iommufd;
///
/// let iommufd = Iommufd::open()?;
/// let ioas = iommufd.alloc_ioas()?;
/// let mut dev = VfioPciDevice::open("0000:00:03.0".parse()?)?;
/// let devid = dev.bind(&iommufd)?;
/// let hwpt = dev.attach(&ioas)?;
/// println!("device {devid} in IOAS {} (HWPT {hwpt})", ioas.id());
/// dev.detach()?;
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug)]
pub struct VfioPciDevice {
    // Declared first so it is closed first (see the type's documentation).
    file: File,
    address: PciAddress,
    sysfs: Sysfs,
    cdev: PathBuf,
    bound: Option<Bound>,
    attached: Option<Attached>,
    config: OnceLock<RegionInfo>,
    /// BARs 0..=5 as first read by [`VfioPciDevice::bar`]: they cannot move or
    /// change size while vfio-pci holds the device (a resize or reassignment
    /// needs it unbound), so every export after the first reads no sysfs.
    bars: [OnceLock<Bar>; BAR_COUNT as usize],
    /// Every attachment of this device's exports; told when the device revokes.
    hub: Arc<RevocationHub>,
    /// The eventfd registered for `VFIO_PCI_REQ_IRQ_INDEX` at bind time (the
    /// kernel's "give the device back" request), or why there is none.
    request: RequestChannel,
    /// Set once the kernel has asked for the device back.
    unplug_requested: AtomicBool,
}

/// The device-request channel of a [`VfioPciDevice`].
#[derive(Debug)]
enum RequestChannel {
    /// Not bound yet: VFIO refuses `VFIO_DEVICE_SET_IRQS` before the bind.
    NotBound,
    /// An eventfd the kernel signals when it wants the device back.
    Armed(OwnedFd),
    /// Registering failed; the text says why.
    Unavailable(String),
}

#[derive(Debug)]
struct Bound {
    iommufd: Iommufd,
    devid: u32,
}

#[derive(Debug)]
struct Attached {
    pt_id: u32,
    hwpt_id: u32,
    ioas: Option<Ioas>,
}

impl VfioPciDevice {
    /// Opens the VFIO cdev of the device at `address`: sysfs
    /// `/sys/bus/pci/devices/<address>/vfio-dev/vfioN` names
    /// `/dev/vfio/devices/vfioN`.
    ///
    /// Errors: [`Error::Device`] if the device does not exist, has no VFIO
    /// cdev although bound to `vfio-pci` (a kernel without
    /// `CONFIG_VFIO_DEVICE_CDEV`), or the cdev node is missing;
    /// [`Error::WrongDriver`] naming the driver if it is not bound to a VFIO
    /// driver ([`bind_to_vfio_pci`] fixes that); [`Error::Sys`] if `open`
    /// fails (e.g. `EBUSY`, `EACCES`).
    ///
    /// ```no_run
    /// use dmabuf_p2p::{exporter::vfio::VfioPciDevice, Error};
    /// match VfioPciDevice::open("0000:00:03.0".parse()?) {
    ///     Ok(dev) => println!("opened {}", dev.cdev_path().display()),
    ///     Err(Error::WrongDriver { driver, .. }) => println!("bound to {driver:?}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn open(address: PciAddress) -> Result<Self> {
        Self::open_in(&Sysfs::default(), VFIO_CDEV_DIR, address)
    }

    /// [`VfioPciDevice::open`] with another sysfs tree and cdev directory.
    ///
    /// ```no_run
    /// use dmabuf_p2p::{exporter::vfio::VfioPciDevice, sysfs::Sysfs};
    /// let dev = VfioPciDevice::open_in(&Sysfs::default(), "/dev/vfio/devices", "0000:00:03.0".parse()?)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn open_in(sysfs: &Sysfs, cdev_dir: impl AsRef<Path>, address: PciAddress) -> Result<Self> {
        ensure_present(sysfs, address)?;
        let device = address.to_string();
        let Some(name) = sysfs.vfio_dev(address)? else {
            return Err(match sysfs.driver(address)? {
                Some(d) if d == VFIO_PCI_DRIVER => Error::Device {
                    device,
                    problem:
                        "bound to vfio-pci but has no VFIO cdev (vfio-dev/vfioN): the kernel needs \
                              CONFIG_VFIO_DEVICE_CDEV and CONFIG_IOMMUFD"
                            .to_owned(),
                },
                driver => Error::WrongDriver {
                    device,
                    driver,
                    expected: VFIO_PCI_DRIVER.to_owned(),
                },
            });
        };
        let cdev = cdev_dir.as_ref().join(&name);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cdev)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Error::Device {
                        device: device.clone(),
                        problem: format!("no VFIO cdev node {}", cdev.display()),
                    }
                } else {
                    Error::sys("open", format!("{device} {}", cdev.display()), e)
                }
            })?;
        Ok(Self {
            file,
            address,
            sysfs: sysfs.clone(),
            cdev,
            bound: None,
            attached: None,
            config: OnceLock::new(),
            bars: Default::default(),
            hub: RevocationHub::new(address.to_string()),
            request: RequestChannel::NotBound,
            unplug_requested: AtomicBool::new(false),
        })
    }

    /// The revocation hub of this device's exports: every
    /// [`Attachment`](crate::revoke::Attachment) made from them is registered
    /// here. Memory decode off ([`set_memory_decode`](Self::set_memory_decode),
    /// or a [`config_write`](Self::config_write) of `PCI_COMMAND`), a
    /// [`reset`](Self::reset) and closing the device revoke through it.
    pub fn hub(&self) -> &Arc<RevocationHub> {
        &self.hub
    }

    /// The PCI address.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// assert_eq!(dev.address().to_string(), "0000:00:03.0");
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The cdev path, e.g. `/dev/vfio/devices/vfio0`.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// println!("{}", dev.cdev_path().display());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn cdev_path(&self) -> &Path {
        &self.cdev
    }

    /// Binds the device to `iommufd` (`VFIO_DEVICE_BIND_IOMMUFD`) and returns
    /// its iommufd device ID. Needed once, before anything else; a second
    /// bind is [`Error::Device`]. The device keeps a clone of `iommufd`.
    ///
    /// The bind also registers an eventfd for the kernel's device request
    /// (`VFIO_PCI_REQ_IRQ_INDEX`, see
    /// [`unplug_requested`](Self::unplug_requested)): one more fd, closed
    /// with the device. If that fails the bind still succeeds, and
    /// `unplug_requested` says why there is no channel.
    ///
    /// ```no_run
    /// # use dmabuf_p2p::{exporter::vfio::VfioPciDevice, importer::iommufd::Iommufd};
    /// let mut dev = VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// let devid = dev.bind(&Iommufd::open()?)?;
    /// assert_eq!(dev.devid(), Some(devid));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn bind(&mut self, iommufd: &Iommufd) -> Result<u32> {
        if self.bound.is_some() {
            return Err(self.device_error("already bound to an iommufd"));
        }
        let devid = ioctl::vfio_device_bind_iommufd(self.fd(), iommufd.as_fd()).map_err(|e| {
            Error::sys(
                "VFIO_DEVICE_BIND_IOMMUFD",
                format!("{} to {}", self.address, iommufd.name()),
                e,
            )
        })?;
        self.bound = Some(Bound {
            iommufd: iommufd.clone(),
            devid,
        });
        // The kernel refuses SET_IRQS before the bind, so the request channel
        // is set up here. A device without one still works; it just cannot
        // hear unplug requests (`unplug_requested` then says why).
        self.request = match self.arm_request_channel() {
            Ok(efd) => RequestChannel::Armed(efd),
            Err(e) => RequestChannel::Unavailable(e.to_string()),
        };
        Ok(devid)
    }

    /// Registers a fresh eventfd as the trigger of `VFIO_PCI_REQ_IRQ_INDEX`.
    fn arm_request_channel(&self) -> Result<OwnedFd> {
        self.irq_eventfd(sys::VFIO_PCI_REQ_IRQ_INDEX, "device request IRQ")
    }

    /// Registers a fresh non-blocking eventfd as the trigger of vector 0 of
    /// the VFIO interrupt `index` (`VFIO_DEVICE_SET_IRQS`, action TRIGGER):
    /// e.g. `VFIO_PCI_MSI_IRQ_INDEX` for a DMA engine's completion interrupt.
    /// The eventfd becomes readable each time the interrupt fires. An index
    /// the device has no vector for is [`Error::Unsupported`]; `what` names
    /// the interrupt in errors. [`disable_irq`](Self::disable_irq) undoes it.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:01:00.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let msi = dev.irq_eventfd(dmabuf_p2p::sys::VFIO_PCI_MSI_IRQ_INDEX, "MSI")?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn irq_eventfd(&self, index: u32, what: &'static str) -> Result<OwnedFd> {
        let target = self.address.to_string();
        let info = ioctl::vfio_device_get_irq_info(self.fd(), index)
            .map_err(|e| Error::sys("VFIO_DEVICE_GET_IRQ_INFO", format!("{target} {what}"), e))?;
        if info.count == 0 {
            return Err(Error::Unsupported {
                target,
                operation: what,
                problem: format!("VFIO reports no vector for IRQ index {index}"),
            });
        }
        // SAFETY: eventfd() takes no pointers; the result is checked below.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(Error::last_os("eventfd", || format!("{target} {what}")));
        }
        // SAFETY: `raw` is a fresh eventfd that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        ioctl::vfio_device_set_irqs(
            self.fd(),
            sys::VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            0,
            ioctl::IrqData::Eventfd(&[efd.as_raw_fd()]),
        )
        .map_err(|e| {
            Error::sys(
                "VFIO_DEVICE_SET_IRQS(eventfd)",
                format!("{target} {what}"),
                e,
            )
        })?;
        Ok(efd)
    }

    /// Unregisters every trigger of VFIO interrupt `index` (`VFIO_DEVICE_SET_IRQS`
    /// with no data and count 0), e.g. before closing an eventfd from
    /// [`irq_eventfd`](Self::irq_eventfd).
    pub fn disable_irq(&self, index: u32) -> Result<()> {
        ioctl::vfio_device_set_irqs(
            self.fd(),
            sys::VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            0,
            ioctl::IrqData::None { count: 0 },
        )
        .map_err(|e| {
            Error::sys(
                "VFIO_DEVICE_SET_IRQS(disable)",
                format!("{} IRQ index {index}", self.address),
                e,
            )
        })
    }

    /// The eventfd the kernel signals when it asks for the device back
    /// (`VFIO_PCI_REQ_IRQ_INDEX`, registered by [`bind`](Self::bind)), for
    /// an event loop: when it is readable, call
    /// [`unplug_requested`](Self::unplug_requested). `None` before the bind
    /// or if registering failed. VFIO keeps one request trigger per device:
    /// if the same device is opened and bound twice, only the later bind's
    /// eventfd is signalled.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:02:00.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let fd = dev.unplug_request_fd().expect("request channel");
    /// // add `fd` to an epoll set with EPOLLIN ...
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn unplug_request_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.request {
            RequestChannel::Armed(efd) => Some(efd.as_fd()),
            RequestChannel::NotBound | RequestChannel::Unavailable(_) => None,
        }
    }

    /// Whether the kernel has asked for the device back, without blocking.
    ///
    /// When a device bound to `vfio-pci` is being removed (hot-unplug, or
    /// an unbind from the driver), the kernel signals the device-request
    /// eventfd and then **waits until every fd of the device is closed**,
    /// repeating the request every 10 seconds. The first time this sees the
    /// request it revokes every export through the [`hub`](Self::hub) with
    /// [`RevokeReason::Unplug`] (attachments tear their IOVA ranges down, so
    /// peer DMA to them faults instead of reaching a vanishing BAR); from
    /// then on it keeps answering `true`, and
    /// [`export_bar`](Self::export_bar) refuses new exports.
    ///
    /// The owner must then **drop the device**, and every [`BarMapping`] of
    /// it (a BAR `mmap` holds the device file open too), so the kernel can
    /// finish the removal. Dma-buf fds of its exports may stay open; they
    /// are dead for good.
    ///
    /// Errors: [`Error::Device`] before [`bind`](Self::bind);
    /// [`Error::Unsupported`] if the request channel could not be set up at
    /// bind time (the message says why); [`Error::Sys`] if reading the
    /// eventfd fails.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:02:00.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// if dev.unplug_requested()? {
    ///     drop(dev); // let the kernel remove it
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn unplug_requested(&self) -> Result<bool> {
        if self.unplug_requested.load(Ordering::Acquire) {
            return Ok(true);
        }
        let efd = self.request_eventfd()?;
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a local u64 from the non-blocking
        // eventfd this device owns.
        let n = unsafe { libc::read(efd.as_raw_fd(), (&raw mut count).cast(), 8) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => Ok(false),
                _ => Err(Error::sys(
                    "read",
                    format!("{} device-request eventfd", self.address),
                    e,
                )),
            };
        }
        if n != 8 || count == 0 {
            return Ok(false);
        }
        if !self.unplug_requested.swap(true, Ordering::AcqRel) {
            self.hub.revoke(RevokeReason::Unplug);
        }
        Ok(true)
    }

    /// Waits up to `timeout` for the kernel to ask for the device back; then
    /// as [`unplug_requested`](Self::unplug_requested) (which this calls).
    /// Returns `false` if the time passed without a request.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:02:00.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// if dev.wait_unplug_request(Duration::from_secs(30))? {
    ///     assert!(dev.hub().state() != dmabuf_p2p::revoke::BufferState::Live);
    ///     drop(dev);
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn wait_unplug_request(&self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.unplug_requested()? {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let efd = self.request_eventfd()?;
            let mut pfd = libc::pollfd {
                fd: efd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Round up, so a sub-millisecond rest does not spin.
            let ms =
                libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(Error::sys(
                        "poll",
                        format!("{} device-request eventfd", self.address),
                        e,
                    ));
                }
            }
        }
    }

    fn request_eventfd(&self) -> Result<&OwnedFd> {
        match &self.request {
            RequestChannel::Armed(efd) => Ok(efd),
            RequestChannel::NotBound => Err(self.device_error(
                "not bound to an iommufd yet; call bind() first (the device-request channel is set up by the bind)",
            )),
            RequestChannel::Unavailable(why) => Err(Error::Unsupported {
                target: self.address.to_string(),
                operation: "device request IRQ",
                problem: format!("no device-request channel: {why}"),
            }),
        }
    }

    /// Whether [`VfioPciDevice::bind`] succeeded.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// assert!(dev.is_bound());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn is_bound(&self) -> bool {
        self.bound.is_some()
    }

    /// The iommufd device ID from the bind.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// println!("iommufd device ID {:?}", dev.devid());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn devid(&self) -> Option<u32> {
        self.bound.as_ref().map(|b| b.devid)
    }

    /// The iommufd the device is bound to.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// assert!(dev.iommufd().is_some_and(|i| i.same_context(&iommufd)));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn iommufd(&self) -> Option<&Iommufd> {
        self.bound.as_ref().map(|b| &b.iommufd)
    }

    /// Attaches the device to `ioas` (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`), so its
    /// DMA is translated by that IOAS; returns the HWPT ID the kernel
    /// created. Attaching again replaces the previous attachment. The IOAS
    /// must belong to the iommufd the device is bound to ([`Error::Device`]
    /// otherwise). The device keeps a clone of `ioas` until detached.
    ///
    /// ```no_run
    /// # use dmabuf_p2p::{exporter::vfio::VfioPciDevice, importer::iommufd::Iommufd};
    /// let iommufd = Iommufd::open()?;
    /// let mut dev = VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// dev.bind(&iommufd)?;
    /// let ioas = iommufd.alloc_ioas()?;
    /// dev.attach(&ioas)?;
    /// assert!(dev.attached_ioas().is_some_and(|a| a.same_ioas(&ioas)));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn attach(&mut self, ioas: &Ioas) -> Result<u32> {
        let bound = self.bound()?;
        if !bound.iommufd.same_context(ioas.iommufd()) {
            return Err(self.device_error(&format!(
                "IOAS {} belongs to another iommufd than the one the device is bound to",
                ioas.id()
            )));
        }
        let hwpt_id = self.attach_raw(ioas.id())?;
        self.attached = Some(Attached {
            pt_id: ioas.id(),
            hwpt_id,
            ioas: Some(ioas.clone()),
        });
        Ok(hwpt_id)
    }

    /// Attaches to an IOAS or HWPT given by raw ID (for objects this crate
    /// did not allocate); returns the HWPT ID. An ID that does not exist in
    /// the bound iommufd is [`Error::UnknownObject`].
    ///
    /// ```no_run
    /// # use dmabuf_p2p::{exporter::vfio::VfioPciDevice, importer::iommufd::Iommufd, Error};
    /// # let mut dev = VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&Iommufd::open()?)?;
    /// assert!(matches!(dev.attach_pt(u32::MAX), Err(Error::UnknownObject { id: u32::MAX, .. })));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn attach_pt(&mut self, pt_id: u32) -> Result<u32> {
        self.bound()?;
        let hwpt_id = self.attach_raw(pt_id)?;
        self.attached = Some(Attached {
            pt_id,
            hwpt_id,
            ioas: None,
        });
        Ok(hwpt_id)
    }

    fn attach_raw(&self, pt_id: u32) -> Result<u32> {
        const OP: &str = "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
        ioctl::vfio_device_attach_iommufd_pt(self.fd(), pt_id).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                Error::UnknownObject {
                    op: OP,
                    target: self.address.to_string(),
                    id: pt_id,
                    source: e,
                }
            } else {
                Error::sys(OP, format!("{} to {pt_id}", self.address), e)
            }
        })
    }

    /// Detaches the device from its IOAS or HWPT
    /// (`VFIO_DEVICE_DETACH_IOMMUFD_PT`) and drops the device's clone of the
    /// IOAS. Does nothing if it is not attached.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// let ioas = iommufd.alloc_ioas()?;
    /// dev.attach(&ioas)?;
    /// dev.detach()?;
    /// assert!(dev.attached_ioas().is_none());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn detach(&mut self) -> Result<()> {
        self.bound()?;
        if self.attached.is_none() {
            return Ok(());
        }
        ioctl::vfio_device_detach_iommufd_pt(self.fd()).map_err(|e| {
            Error::sys("VFIO_DEVICE_DETACH_IOMMUFD_PT", self.address.to_string(), e)
        })?;
        self.attached = None;
        Ok(())
    }

    /// The IOAS the device is attached to (through [`VfioPciDevice::attach`]).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// let ioas = iommufd.alloc_ioas()?;
    /// dev.attach(&ioas)?;
    /// assert_eq!(dev.attached_ioas().map(|a| a.id()), Some(ioas.id()));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn attached_ioas(&self) -> Option<&Ioas> {
        self.attached.as_ref().and_then(|a| a.ioas.as_ref())
    }

    /// The IOAS/HWPT ID given to the attach and the HWPT ID the kernel
    /// reported, if attached.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// let ioas = iommufd.alloc_ioas()?;
    /// let hwpt = dev.attach(&ioas)?;
    /// assert_eq!(dev.attached_pt(), Some((ioas.id(), hwpt)));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn attached_pt(&self) -> Option<(u32, u32)> {
        self.attached.as_ref().map(|a| (a.pt_id, a.hwpt_id))
    }

    /// `VFIO_DEVICE_GET_INFO`: flags (reset support), region and IRQ counts.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let info = dev.info()?;
    /// println!("{} regions, reset: {}", info.num_regions, info.supports_reset());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn info(&self) -> Result<DeviceInfo> {
        self.bound()?;
        let i = ioctl::vfio_device_get_info(self.fd())
            .map_err(|e| Error::sys("VFIO_DEVICE_GET_INFO", self.address.to_string(), e))?;
        Ok(DeviceInfo {
            flags: i.flags,
            num_regions: i.num_regions,
            num_irqs: i.num_irqs,
        })
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for region `index`. An index past the
    /// device's regions is [`Error::InvalidRegion`].
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let r = dev.region_info(2)?;
    /// println!("BAR2: {} bytes at fd offset {:#x}, mmap: {}", r.size, r.offset, r.mmap_supported());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.bound()?;
        let r = ioctl::vfio_device_get_region_info(self.fd(), index).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                Error::InvalidRegion {
                    device: self.address.to_string(),
                    index,
                    problem: format!("no such region (VFIO_DEVICE_GET_REGION_INFO: {e})"),
                }
            } else {
                Error::sys(
                    "VFIO_DEVICE_GET_REGION_INFO",
                    format!("{} region {index}", self.address),
                    e,
                )
            }
        })?;
        Ok(RegionInfo {
            index,
            flags: r.flags,
            size: r.size,
            offset: r.offset,
        })
    }

    /// BAR `index` (0..=5): VFIO's region info plus sysfs's `resource` line
    /// (its physical start and kind). Indexes 6 (ROM), 7 (config) and above
    /// are [`Error::InvalidRegion`]. An absent BAR is returned with size 0
    /// ([`Bar::is_present`]). Read once, then remembered: a BAR cannot change
    /// while vfio-pci holds the device.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let bar = dev.bar(2)?;
    /// println!("BAR2 at {:#x}, {} bytes", bar.phys_start(), bar.size());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn bar(&self, index: u32) -> Result<Bar> {
        check_bar_index(self.address, index)?;
        // `index` is below BAR_COUNT (checked above).
        let slot = &self.bars[index as usize];
        if let Some(bar) = slot.get() {
            return Ok(*bar);
        }
        let region = self.region_info(index)?;
        let resource = self.sysfs.bar(self.address, index)?;
        Ok(*slot.get_or_init(|| Bar {
            index,
            region,
            resource,
        }))
    }

    /// Reads `buf.len()` bytes of config space at `offset` (a `pread` of the
    /// config region). VFIO virtualises parts of it (e.g. `PCI_COMMAND`).
    /// Reads past the end of config space are [`Error::InvalidRange`].
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let mut ids = [0u8; 4];
    /// dev.config_read(0, &mut ids)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.config_at(offset, buf.len())?;
        self.file
            .read_exact_at(buf, at)
            .map_err(|e| self.config_error("pread", offset, buf.len(), e))
    }

    /// Writes `data` to config space at `offset` (a `pwrite` of the config
    /// region). Clearing `PCI_COMMAND` memory decode this way revokes the
    /// device's dma-bufs; prefer [`VfioPciDevice::set_memory_decode`].
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// dev.config_write(0x3c, &[0x0b])?; // interrupt line
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    ///
    /// A write that changes `PCI_COMMAND`'s memory-decode bit goes through the
    /// revocation path: turning it off revokes this device's dma-bufs in the
    /// kernel, and every attachment is then torn down; turning it on restores
    /// them (per each attachment's policy). A VMM forwarding a guest's config
    /// writes gets the same behaviour by writing through here.
    ///
    /// Such writes are serialised per device (with
    /// [`set_memory_decode`](Self::set_memory_decode),
    /// [`set_bus_master`](Self::set_bus_master) and [`reset`](Self::reset)), and
    /// the attachments' callbacks run inside: a callback must not change this
    /// device's `PCI_COMMAND` or reset it (it would wait for itself).
    pub fn config_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if ByteRange::new(offset, data.len() as u64).contains(PCI_COMMAND) {
            let held = self.lock_command();
            self.config_write_held(offset, data, &held)
        } else {
            let at = self.config_at(offset, data.len())?;
            self.file
                .write_all_at(data, at)
                .map_err(|e| self.config_error("pwrite", offset, data.len(), e))
        }
    }

    /// Held across a change of `PCI_COMMAND` (read, write, read back) and the
    /// hub call it makes, and across a reset: the hub's transition lock
    /// ([`RevocationHub::lock_transitions`]). Threads that toggle memory decode
    /// or reset at once otherwise interleave their reads and writes, lose
    /// updates and leave the hub out of step with the device (live while the
    /// kernel had revoked, and so attachments whose areas are dead); and an
    /// attachment's own restore or map could run between the kernel's
    /// revocation and the hub's.
    fn lock_command(&self) -> MutexGuard<'_, ()> {
        self.hub.lock_transitions()
    }

    /// [`config_write`](Self::config_write), with the command lock held.
    fn config_write_held(
        &self,
        offset: u64,
        data: &[u8],
        _held: &MutexGuard<'_, ()>,
    ) -> Result<()> {
        let at = self.config_at(offset, data.len())?;
        let touches_memory_bit = ByteRange::new(offset, data.len() as u64).contains(PCI_COMMAND);
        let before = if touches_memory_bit {
            self.memory_decode().ok()
        } else {
            None
        };
        let written = self
            .file
            .write_all_at(data, at)
            .map_err(|e| self.config_error("pwrite", offset, data.len(), e));
        if touches_memory_bit {
            // Even a failed write may have revoked (the kernel revokes first);
            // ask the device what it has now.
            let after = self.memory_decode().ok();
            match (before, after) {
                // Decode is off: the kernel has revoked every dma-buf of the
                // device, so the attachments' areas are dead already.
                (_, Some(false)) => {
                    self.hub.revoked_by_kernel(RevokeReason::MemoryDecodeOff);
                }
                (Some(false), Some(true)) => {
                    self.hub.restore();
                }
                _ => {}
            }
        }
        written
    }

    /// Reads a byte of config space.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// let revision = dev.config_read_u8(8)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn config_read_u8(&self, offset: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.config_read(offset, &mut b)?;
        Ok(b[0])
    }

    /// Reads a little-endian 16-bit config register, e.g. the vendor ID at 0.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let (vendor, device) = (dev.config_read_u16(0)?, dev.config_read_u16(2)?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn config_read_u16(&self, offset: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Reads a little-endian 32-bit config register.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// let ids = dev.config_read_u32(0)?; // device << 16 | vendor
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn config_read_u32(&self, offset: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian 16-bit config register.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// let cmd = dev.command()?;
    /// dev.config_write_u16(4, cmd | 0x4)?; // bus master on
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn config_write_u16(&self, offset: u64, value: u16) -> Result<()> {
        self.config_write(offset, &value.to_le_bytes())
    }

    /// Writes a little-endian 32-bit config register.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// dev.config_write_u32(0x10, 0xffff_ffff)?; // BAR0 sizing (virtualised by VFIO)
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn config_write_u32(&self, offset: u64, value: u32) -> Result<()> {
        self.config_write(offset, &value.to_le_bytes())
    }

    /// The `PCI_COMMAND` register (as VFIO presents it).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// println!("PCI_COMMAND = {:#06x}", dev.command()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn command(&self) -> Result<u16> {
        self.config_read_u16(PCI_COMMAND)
    }

    /// Whether memory decode (`PCI_COMMAND` bit 1) is on.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// if !dev.memory_decode()? {
    ///     dev.set_memory_decode(true)?;
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn memory_decode(&self) -> Result<bool> {
        Ok(self.command()? & COMMAND_MEMORY != 0)
    }

    /// Turns memory decode (`PCI_COMMAND` bit 1) on or off with a
    /// read-modify-write of `PCI_COMMAND`. Turning it off revokes every
    /// dma-buf of the device (importers are told and unmap); turning it on
    /// restores them for the exporter, but an iommufd area that was revoked
    /// stays dead until remapped. Exports made while it is off are born
    /// revoked. BAR `mmap`s fault (`SIGBUS`) while it is off.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// dev.set_memory_decode(true)?;
    /// assert!(dev.memory_decode()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn set_memory_decode(&self, on: bool) -> Result<()> {
        self.set_command_bits(COMMAND_MEMORY, on)
    }

    /// Whether bus mastering (`PCI_COMMAND` bit 2) is on.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// dev.set_bus_master(true)?;
    /// assert!(dev.bus_master()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn bus_master(&self) -> Result<bool> {
        Ok(self.command()? & COMMAND_MASTER != 0)
    }

    /// Turns bus mastering (`PCI_COMMAND` bit 2) on or off: the device may
    /// only start DMA while it is on.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// dev.set_bus_master(true)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn set_bus_master(&self, on: bool) -> Result<()> {
        self.set_command_bits(COMMAND_MASTER, on)
    }

    fn set_command_bits(&self, bits: u16, on: bool) -> Result<()> {
        // Read-modify-write under the lock, or two threads setting different
        // bits at once lose one of the changes.
        let held = self.lock_command();
        let cmd = self.command()?;
        let new = if on { cmd | bits } else { cmd & !bits };
        if new == cmd {
            return Ok(());
        }
        self.config_write_held(PCI_COMMAND, &new.to_le_bytes(), &held)
    }

    /// Whether the device supports [`VfioPciDevice::reset`].
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// println!("reset: {}", dev.supports_reset()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn supports_reset(&self) -> Result<bool> {
        Ok(self.info()?.supports_reset())
    }

    /// Whether the device can export BAR ranges as dma-bufs
    /// ([`export_bar`](Self::export_bar)): a `VFIO_DEVICE_FEATURE` PROBE of
    /// GET `VFIO_DEVICE_FEATURE_DMA_BUF`. `false` when the driver lacks it
    /// (`EOPNOTSUPP`: a variant driver without P2P support) or the kernel
    /// has no such feature (`ENOTTY`: built without `CONFIG_VFIO_PCI_DMABUF`).
    /// Needs the device bound ([`bind`](Self::bind)); before that VFIO
    /// answers every device ioctl with `EINVAL`, so this is
    /// [`Error::Device`] without an ioctl.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// dev.bind(&iommufd)?;
    /// if !dev.supports_dma_buf_export()? {
    ///     eprintln!("{}: no dma-buf export, no P2P through iommufd", dev.address());
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn supports_dma_buf_export(&self) -> Result<bool> {
        self.bound()?;
        match ioctl::vfio_device_feature_probe(
            self.fd(),
            sys::VFIO_DEVICE_FEATURE_DMA_BUF,
            sys::VFIO_DEVICE_FEATURE_GET,
        ) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOTTY)) => {
                Ok(false)
            }
            Err(e) => Err(Error::sys(
                "VFIO_DEVICE_FEATURE(PROBE DMA_BUF)",
                self.address.to_string(),
                e,
            )),
        }
    }

    /// Resets the device (`VFIO_DEVICE_RESET`). Its dma-bufs are revoked for
    /// the reset and restored after it if memory decode is on; iommufd areas
    /// of them stay dead until remapped. A device without a reset method
    /// (`VFIO_DEVICE_FLAGS_RESET` clear) is [`Error::Unsupported`], checked
    /// before the ioctl.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// if dev.supports_reset()? {
    ///     dev.reset()?;
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn reset(&self) -> Result<()> {
        if !self.info()?.supports_reset() {
            return Err(Error::Unsupported {
                target: self.address.to_string(),
                operation: "VFIO_DEVICE_RESET",
                problem:
                    "the device has no reset method VFIO can use (VFIO_DEVICE_FLAGS_RESET is clear)"
                        .to_owned(),
            });
        }
        let _held = self.lock_command();
        let reset = ioctl::vfio_device_reset(self.fd())
            .map_err(|e| Error::sys("VFIO_DEVICE_RESET", self.address.to_string(), e));
        // The kernel revoked for the reset and un-revoked if memory decode is
        // on; the iommufd areas are dead either way, so tear down, then
        // restore if the buffers are usable again.
        self.hub.revoked_by_kernel(RevokeReason::Reset);
        if self.memory_decode().unwrap_or(false) {
            self.hub.restore();
        }
        reset
    }

    /// Maps BAR `index` into this process (`mmap` of the device fd at the
    /// region offset, shared, with the region's read/write permissions). A
    /// BAR smaller than a page is mapped as one page; accesses are still
    /// bounded by the BAR size. A BAR without `VFIO_REGION_INFO_FLAG_MMAP` is
    /// [`Error::Unsupported`]; an absent BAR is [`Error::InvalidRegion`].
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// dev.set_memory_decode(true)?;
    /// let bar = dev.map_bar(2)?;
    /// bar.write_u32(0, 0xdead_beef)?;
    /// assert_eq!(bar.read_u32(0)?, 0xdead_beef);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn map_bar(&self, index: u32) -> Result<BarMapping> {
        let bar = self.bar(index)?;
        let name = format!("{} BAR{index}", self.address);
        if !bar.is_present() {
            return Err(Error::InvalidRegion {
                device: self.address.to_string(),
                index,
                problem: "BAR not present (size 0)".to_owned(),
            });
        }
        if !bar.region.mmap_supported() {
            return Err(Error::Unsupported {
                target: name,
                operation: "mmap",
                problem: "VFIO does not allow mmap of this region (no VFIO_REGION_INFO_FLAG_MMAP)"
                    .to_owned(),
            });
        }
        let too_big = || Error::InvalidRegion {
            device: self.address.to_string(),
            index,
            problem: "too large to map in this address space".to_owned(),
        };
        let size = usize::try_from(bar.size()).map_err(|_| too_big())?;
        let page = usize::try_from(page_size()).map_err(|_| too_big())?;
        let map_len = size.checked_next_multiple_of(page).ok_or_else(too_big)?;
        let offset = libc::off_t::try_from(bar.region.offset).map_err(|_| too_big())?;
        let mut prot = 0;
        if bar.region.readable() {
            prot |= libc::PROT_READ;
        }
        if bar.region.writable() {
            prot |= libc::PROT_WRITE;
        }
        // SAFETY: a new shared mapping chosen by the kernel (NULL hint), so no
        // existing memory is replaced; the fd is open for the call and the
        // kernel keeps its own reference to the file for the mapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                prot,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os("mmap", || name));
        }
        let Some(ptr) = NonNull::new(ptr.cast::<u8>()) else {
            return Err(Error::sys(
                "mmap",
                name,
                io::Error::from_raw_os_error(libc::EFAULT),
            ));
        };
        Ok(BarMapping {
            ptr,
            map_len,
            size,
            device: self.address,
            index,
        })
    }

    /// Exports `ranges` (BAR-relative byte ranges) of BAR `index` as one
    /// dma-buf (`VFIO_DEVICE_FEATURE` GET `DMA_BUF`, opened
    /// `O_RDWR | O_CLOEXEC`); its size is the sum of the lengths.
    ///
    /// Everything the kernel would refuse is checked first, so the error
    /// names what is wrong ([`plan_export`]): the BAR index (0..=5; the ROM
    /// and config space are [`Error::InvalidRegion`]), an absent or I/O BAR,
    /// and every range (empty, not page-aligned, overflowing, past the BAR's
    /// end: [`Error::InvalidRange`]). Ranges may overlap and come in any
    /// order. The export records its physical ranges (BAR start from sysfs).
    ///
    /// **Turn memory decode on first** ([`VfioPciDevice::set_memory_decode`]):
    /// an export made while it is off is born revoked, and mapping it gives
    /// [`Error::Revoked`]. [`BarExport::memory_decode_at_export`] records
    /// what the register said just before the export.
    ///
    /// iommufd imports only single-range exports; make one export per range
    /// for that.
    ///
    /// ```no_run
    /// # use dmabuf_p2p::ByteRange;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// dev.set_memory_decode(true)?;
    /// let export = dev.export_bar(2, &[ByteRange::new(0, 0x10_0000)])?;
    /// println!("{export}");
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn export_bar(&self, index: u32, ranges: &[ByteRange]) -> Result<BarExport> {
        self.bound()?;
        if self.unplug_requested.load(Ordering::Acquire) {
            return Err(
                self.device_error("is being removed (the kernel asked for it back); close it")
            );
        }
        let bar = self.bar(index)?;
        let plan = plan_export(self.address, &bar, ranges, page_size())?;
        let memory_decode = self.memory_decode().ok();
        let raw = to_dma_ranges(ranges);
        let fd = ioctl::vfio_device_feature_dma_buf(self.fd(), index, EXPORT_OPEN_FLAGS, &raw)
            .map_err(|e| {
                let list: Vec<String> = ranges.iter().map(ToString::to_string).collect();
                Error::sys(
                    "VFIO_DEVICE_FEATURE(DMA_BUF)",
                    format!(
                        "{} ranges [{}]",
                        bar_name(self.address, index, bar.size()),
                        list.join(", ")
                    ),
                    e,
                )
            })?;
        Ok(BarExport {
            buf: DmaBuf::from_owned_unchecked(fd),
            plan,
            memory_decode,
            hub: Arc::clone(&self.hub),
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn bound(&self) -> Result<&Bound> {
        self.bound
            .as_ref()
            .ok_or_else(|| self.device_error("not bound to an iommufd yet; call bind() first"))
    }

    fn device_error(&self, problem: &str) -> Error {
        Error::Device {
            device: self.address.to_string(),
            problem: problem.to_owned(),
        }
    }

    /// The config region (cached after the first query).
    fn config_region(&self) -> Result<RegionInfo> {
        if let Some(r) = self.config.get() {
            return Ok(*r);
        }
        let r = self.region_info(CONFIG_REGION_INDEX)?;
        Ok(*self.config.get_or_init(|| r))
    }

    /// The fd offset of config-space byte `offset`, after checking that
    /// `len` bytes from there are inside config space.
    fn config_at(&self, offset: u64, len: usize) -> Result<u64> {
        let region = self.config_region()?;
        let range = ByteRange::new(offset, len as u64);
        range
            .check_in(region.size, 1)
            .map_err(|problem| Error::InvalidRange {
                target: format!(
                    "{} config space ({})",
                    self.address,
                    human_size(region.size)
                ),
                range,
                problem,
            })?;
        region
            .offset
            .checked_add(offset)
            .ok_or_else(|| Error::InvalidRange {
                target: format!("{} config space", self.address),
                range,
                problem: RangeProblem::Overflow,
            })
    }

    fn config_error(&self, op: &'static str, offset: u64, len: usize, e: io::Error) -> Error {
        Error::sys(
            op,
            format!(
                "{} config space {}",
                self.address,
                ByteRange::new(offset, len as u64)
            ),
            e,
        )
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        // The kernel revokes the device's dma-bufs for good when its last
        // reference goes (this fd, and any BarMapping's mmap, which keeps the
        // file open). This process's attachments are torn down now either way:
        // after this, nothing of ours may reach the BAR.
        self.hub.close(RevokeReason::DeviceClosed);
    }
}

impl AsFd for VfioPciDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for VfioPciDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// A dma-buf exported from BAR ranges, with what it was made from: the
/// device, the BAR, the BAR-relative ranges and the physical ranges behind
/// them. The [`DmaBuf`] is closed with it unless taken out with
/// [`BarExport::into_dmabuf`].
///
/// ```no_run
/// # use dmabuf_p2p::ByteRange;
/// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
/// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
/// let export = dev.export_bar(2, &[ByteRange::new(0x1000, 0x1000)])?;
/// let pfns = export.phys_ranges()[0].pfns(4096);
/// let buf = export.into_dmabuf();
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug)]
pub struct BarExport {
    buf: DmaBuf,
    plan: ExportPlan,
    memory_decode: Option<bool>,
    hub: Arc<RevocationHub>,
}

impl Revocable for BarExport {
    fn dmabuf(&self) -> &DmaBuf {
        &self.buf
    }

    fn hub(&self) -> &Arc<RevocationHub> {
        &self.hub
    }

    fn phys_ranges(&self) -> Vec<PhysRange> {
        self.plan.phys.clone()
    }
}

impl BarExport {
    /// The dma-buf.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// assert_eq!(export.dmabuf().size()?, 0x1000);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn dmabuf(&self) -> &DmaBuf {
        &self.buf
    }

    /// Takes the dma-buf out, dropping the record.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// let buf: dmabuf_p2p::DmaBuf = export.into_dmabuf();
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn into_dmabuf(self) -> DmaBuf {
        self.buf
    }

    /// The exporting device.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// assert_eq!(export.device(), dev.address());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn device(&self) -> PciAddress {
        self.plan.device
    }

    /// The BAR index.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// assert_eq!(export.bar(), 2);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn bar(&self) -> u32 {
        self.plan.bar
    }

    /// The BAR-relative ranges, in request order.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// assert_eq!(export.ranges(), &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)]);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn ranges(&self) -> &[ByteRange] {
        &self.plan.ranges
    }

    /// The physical ranges behind the buffer, in request order.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// assert_eq!(export.phys_ranges()[0].start, dev.bar(2)?.phys_start() + 0x1000);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn phys_ranges(&self) -> &[PhysRange] {
        &self.plan.phys
    }

    /// The buffer size: the sum of the range lengths.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// assert_eq!(export.size(), 0x1000);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn size(&self) -> u64 {
        self.plan.size
    }

    /// What `PCI_COMMAND` memory decode was just before the export (`None`
    /// if it could not be read). `Some(false)` means the buffer was born
    /// revoked.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// assert_eq!(export.memory_decode_at_export(), Some(true));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn memory_decode_at_export(&self) -> Option<bool> {
        self.memory_decode
    }
}

impl AsFd for BarExport {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.buf.as_fd()
    }
}

impl From<BarExport> for DmaBuf {
    fn from(e: BarExport) -> Self {
        e.buf
    }
}

impl From<BarExport> for OwnedFd {
    fn from(e: BarExport) -> Self {
        e.buf.into()
    }
}

impl fmt::Display for BarExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dma-buf fd {} = {} BAR{} [",
            self.buf.as_raw_fd(),
            self.plan.device,
            self.plan.bar
        )?;
        for (i, (r, p)) in self.plan.ranges.iter().zip(&self.plan.phys).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r} @ {p}")?;
        }
        write!(f, "] ({})", human_size(self.plan.size))
    }
}

/// A BAR mapped into this process ([`VfioPciDevice::map_bar`]), unmapped on
/// drop. Access goes through volatile reads and writes, bounded by the BAR
/// size and naturally aligned; anything else is [`Error::InvalidRange`].
///
/// The mapping keeps the device file open in the kernel on its own, so it may
/// outlive the [`VfioPciDevice`]. While the device's memory decode is off (or
/// it is resetting) VFIO has the pages unmapped, and an access raises
/// `SIGBUS`.
///
/// ```no_run
/// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
/// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
/// let bar = dev.map_bar(2)?;
/// bar.write_bytes(0x100, b"hello")?;
/// let mut back = [0u8; 5];
/// bar.read_bytes(0x100, &mut back)?;
/// assert_eq!(&back, b"hello");
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug)]
pub struct BarMapping {
    ptr: NonNull<u8>,
    map_len: usize,
    size: usize,
    device: PciAddress,
    index: u32,
}

// SAFETY: the mapping is device memory owned by this value; it is only
// accessed with volatile operations through `&self` (which MMIO tolerates
// from any thread) and unmapped once, in drop.
unsafe impl Send for BarMapping {}
// SAFETY: as above; shared access is volatile reads and writes only, with no
// Rust references into the memory.
unsafe impl Sync for BarMapping {}

/// The integer widths [`BarMapping`] reads and writes.
trait MmioValue: Copy {}
impl MmioValue for u8 {}
impl MmioValue for u16 {}
impl MmioValue for u32 {}
impl MmioValue for u64 {}

impl BarMapping {
    /// The BAR size in bytes (the accessible length).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// assert_eq!(bar.len() as u64, dev.bar(2)?.size());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.size
    }

    /// Whether the BAR is empty (never, for a mapped BAR).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// assert!(!bar.is_empty());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The device.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// assert_eq!(bar.device(), dev.address());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn device(&self) -> PciAddress {
        self.device
    }

    /// The BAR index.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// assert_eq!(bar.index(), 2);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The start of the mapping, for callers that need raw access (which must
    /// be volatile and within [`BarMapping::len`]).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// // SAFETY: inside the BAR, volatile.
    /// let first = unsafe { bar.as_ptr().read_volatile() };
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Volatile 8-bit read at `offset`.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// let b = bar.read_u8(3)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn read_u8(&self, offset: u64) -> Result<u8> {
        self.read(offset)
    }

    /// Volatile 16-bit read at `offset` (2-byte aligned).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// let h = bar.read_u16(2)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn read_u16(&self, offset: u64) -> Result<u16> {
        self.read(offset)
    }

    /// Volatile 32-bit read at `offset` (4-byte aligned).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// let w = bar.read_u32(4)?;
    /// assert!(bar.read_u32(2).is_err()); // misaligned
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn read_u32(&self, offset: u64) -> Result<u32> {
        self.read(offset)
    }

    /// Volatile 64-bit read at `offset` (8-byte aligned).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// let q = bar.read_u64(8)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn read_u64(&self, offset: u64) -> Result<u64> {
        self.read(offset)
    }

    /// Volatile 8-bit write at `offset`.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// bar.write_u8(3, 0xff)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn write_u8(&self, offset: u64, value: u8) -> Result<()> {
        self.write(offset, value)
    }

    /// Volatile 16-bit write at `offset` (2-byte aligned).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// bar.write_u16(2, 0xbeef)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn write_u16(&self, offset: u64, value: u16) -> Result<()> {
        self.write(offset, value)
    }

    /// Volatile 32-bit write at `offset` (4-byte aligned).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// bar.write_u32(4, 0xdead_beef)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn write_u32(&self, offset: u64, value: u32) -> Result<()> {
        self.write(offset, value)
    }

    /// Volatile 64-bit write at `offset` (8-byte aligned).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// bar.write_u64(8, u64::MAX)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn write_u64(&self, offset: u64, value: u64) -> Result<()> {
        self.write(offset, value)
    }

    /// Reads `buf.len()` bytes from `offset`, one volatile byte read each.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// let mut buf = [0u8; 16];
    /// bar.read_bytes(0, &mut buf)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let start = self.check(offset, buf.len(), 1)?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `check` proved `start + buf.len() <= size <= map_len`,
            // so every byte read is inside the live mapping.
            *b = unsafe { self.ptr.as_ptr().wrapping_add(start + i).read_volatile() };
        }
        Ok(())
    }

    /// Writes `data` at `offset`, one volatile byte write each.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::exporter::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// bar.write_bytes(0, b"hello")?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<()> {
        let start = self.check(offset, data.len(), 1)?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: `check` proved `start + data.len() <= size <= map_len`,
            // so every byte written is inside the live, writable mapping.
            unsafe { self.ptr.as_ptr().wrapping_add(start + i).write_volatile(*b) };
        }
        Ok(())
    }

    fn read<T: MmioValue>(&self, offset: u64) -> Result<T> {
        let at = self.check(offset, std::mem::size_of::<T>(), std::mem::align_of::<T>())?;
        // SAFETY: `check` proved the value lies inside the live mapping and is
        // naturally aligned (the mapping is page-aligned); every bit pattern
        // is a valid integer.
        Ok(unsafe {
            self.ptr
                .as_ptr()
                .wrapping_add(at)
                .cast::<T>()
                .read_volatile()
        })
    }

    fn write<T: MmioValue>(&self, offset: u64, value: T) -> Result<()> {
        let at = self.check(offset, std::mem::size_of::<T>(), std::mem::align_of::<T>())?;
        // SAFETY: `check` proved the value lies inside the live mapping and is
        // naturally aligned; no Rust reference points into device memory.
        unsafe {
            self.ptr
                .as_ptr()
                .wrapping_add(at)
                .cast::<T>()
                .write_volatile(value)
        };
        Ok(())
    }

    /// Checks `[offset, offset + len)` against the BAR and `align`; returns
    /// `offset` as a `usize`.
    fn check(&self, offset: u64, len: usize, align: usize) -> Result<usize> {
        let range = ByteRange::new(offset, len as u64);
        let invalid = |problem| Error::InvalidRange {
            target: format!(
                "{} BAR{} mapping ({})",
                self.device,
                self.index,
                human_size(self.size as u64)
            ),
            range,
            problem,
        };
        if offset % align as u64 != 0 {
            return Err(invalid(RangeProblem::Unaligned {
                align: align as u64,
            }));
        }
        let end = range.end().ok_or_else(|| invalid(RangeProblem::Overflow))?;
        if end > self.size as u64 {
            return Err(invalid(RangeProblem::OutOfBounds {
                end,
                size: self.size as u64,
            }));
        }
        usize::try_from(offset).map_err(|_| invalid(RangeProblem::Overflow))
    }
}

impl Drop for BarMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`map_len` describe exactly the mapping made in
        // `map_bar`, unmapped only here; no references into it exist.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}
