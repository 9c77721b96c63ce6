//! What VFIO reports about a device: its flags, regions and BARs.

use super::VfioPciDevice;
use crate::error::{Error, Result};
use crate::ioctl;
use crate::pci::{BAR_COUNT, PciAddress, Resource};
use crate::sys;

/// VFIO region index of the expansion ROM.
///
/// ```
/// assert_eq!(dmabuf_p2p::vfio::ROM_REGION_INDEX, 6);
/// ```
pub const ROM_REGION_INDEX: u32 = sys::VFIO_PCI_ROM_REGION_INDEX;

/// VFIO region index of PCI config space.
///
/// ```
/// assert_eq!(dmabuf_p2p::vfio::CONFIG_REGION_INDEX, 7);
/// ```
pub const CONFIG_REGION_INDEX: u32 = sys::VFIO_PCI_CONFIG_REGION_INDEX;

/// What `VFIO_DEVICE_GET_INFO` reports.
///
/// ```no_run
/// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
/// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
/// # dev.bind(&iommufd)?;
/// let info = dev.info()?;
/// assert!(info.is_pci());
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[non_exhaustive]
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
    /// A device info from its parts (for tests and tools).
    pub const fn new(flags: u32, num_regions: u32, num_irqs: u32) -> Self {
        Self {
            flags,
            num_regions,
            num_irqs,
        }
    }

    /// Whether `VFIO_DEVICE_RESET` works (`VFIO_DEVICE_FLAGS_RESET`).
    ///
    /// ```
    /// use dmabuf_p2p::vfio::DeviceInfo;
    /// let info = DeviceInfo::new(3, 9, 5);
    /// assert!(info.supports_reset());
    /// ```
    pub const fn supports_reset(&self) -> bool {
        self.flags & sys::VFIO_DEVICE_FLAGS_RESET != 0
    }

    /// Whether it is a PCI device (`VFIO_DEVICE_FLAGS_PCI`).
    ///
    /// ```
    /// use dmabuf_p2p::vfio::DeviceInfo;
    /// assert!(DeviceInfo::new(2, 9, 5).is_pci());
    /// ```
    pub const fn is_pci(&self) -> bool {
        self.flags & sys::VFIO_DEVICE_FLAGS_PCI != 0
    }
}

/// What `VFIO_DEVICE_GET_REGION_INFO` reports for one region.
///
/// ```no_run
/// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
/// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
/// # dev.bind(&iommufd)?;
/// let config = dev.region_info(dmabuf_p2p::vfio::CONFIG_REGION_INDEX)?;
/// println!("config space: {} bytes", config.size);
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[non_exhaustive]
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
    /// A region info from its parts (for tests and tools).
    pub const fn new(index: u32, flags: u32, size: u64, offset: u64) -> Self {
        Self {
            index,
            flags,
            size,
            offset,
        }
    }

    /// Whether the region can be read (`VFIO_REGION_INFO_FLAG_READ`).
    ///
    /// ```
    /// # let r = dmabuf_p2p::vfio::RegionInfo::new(2, 7, 1 << 20, 2 << 40);
    /// assert!(r.readable());
    /// ```
    pub const fn readable(&self) -> bool {
        self.flags & sys::VFIO_REGION_INFO_FLAG_READ != 0
    }

    /// Whether the region can be written (`VFIO_REGION_INFO_FLAG_WRITE`).
    ///
    /// ```
    /// # let r = dmabuf_p2p::vfio::RegionInfo::new(2, 7, 1 << 20, 2 << 40);
    /// assert!(r.writable());
    /// ```
    pub const fn writable(&self) -> bool {
        self.flags & sys::VFIO_REGION_INFO_FLAG_WRITE != 0
    }

    /// Whether the region can be `mmap`ed (`VFIO_REGION_INFO_FLAG_MMAP`).
    ///
    /// ```
    /// # let r = dmabuf_p2p::vfio::RegionInfo::new(2, 7, 1 << 20, 2 << 40);
    /// assert!(r.mmap_supported());
    /// ```
    pub const fn mmap_supported(&self) -> bool {
        self.flags & sys::VFIO_REGION_INFO_FLAG_MMAP != 0
    }
}

/// A BAR as VFIO and sysfs describe it.
///
/// ```
/// use dmabuf_p2p::vfio::{Bar, RegionInfo};
/// use dmabuf_p2p::pci::{Resource, IORESOURCE_MEM};
///
/// let bar = Bar::new(2, RegionInfo::new(2, 7, 1 << 20, 2 << 40), Resource::new(2, 0xfe00_0000, 1 << 20, IORESOURCE_MEM));
/// assert!(bar.is_present() && bar.resource.is_mem());
/// ```
#[non_exhaustive]
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
    /// A BAR from VFIO's and sysfs's views of it (for tests and tools).
    pub const fn new(index: u32, region: RegionInfo, resource: Resource) -> Self {
        Self {
            index,
            region,
            resource,
        }
    }

    /// Whether the BAR exists (VFIO reports a non-zero size).
    ///
    /// ```
    /// # use dmabuf_p2p::pci::{Resource, IORESOURCE_MEM};
    /// # use dmabuf_p2p::vfio::{Bar, RegionInfo};
    /// let bar = Bar::new(2, RegionInfo::new(2, 7, 0x10_0000, 2 << 40), Resource::new(2, 0xfe00_0000, 0x10_0000, IORESOURCE_MEM));
    /// assert!(bar.is_present());
    /// ```
    #[inline]
    pub const fn is_present(&self) -> bool {
        self.region.size != 0
    }

    /// The size in bytes.
    ///
    /// ```
    /// # use dmabuf_p2p::pci::{Resource, IORESOURCE_MEM};
    /// # use dmabuf_p2p::vfio::{Bar, RegionInfo};
    /// let bar = Bar::new(2, RegionInfo::new(2, 7, 0x10_0000, 2 << 40), Resource::new(2, 0xfe00_0000, 0x10_0000, IORESOURCE_MEM));
    /// assert_eq!(bar.size(), 0x10_0000);
    /// ```
    #[inline]
    pub const fn size(&self) -> u64 {
        self.region.size
    }

    /// The physical address of its first byte.
    ///
    /// ```
    /// # use dmabuf_p2p::pci::{Resource, IORESOURCE_MEM};
    /// # use dmabuf_p2p::vfio::{Bar, RegionInfo};
    /// let bar = Bar::new(2, RegionInfo::new(2, 7, 0x10_0000, 2 << 40), Resource::new(2, 0xfe00_0000, 0x10_0000, IORESOURCE_MEM));
    /// assert_eq!(bar.phys_start(), 0xfe00_0000);
    /// ```
    #[inline]
    pub const fn phys_start(&self) -> u64 {
        self.resource.start
    }
}

/// `index` must be a BAR (0..=5).
pub(crate) fn check_bar_index(device: PciAddress, index: u32) -> Result<()> {
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
        source: None,
    })
}

impl VfioPciDevice {
    /// `VFIO_DEVICE_GET_INFO`: flags (reset support), region and IRQ counts.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let info = dev.info()?;
    /// println!("{} regions, reset: {}", info.num_regions, info.supports_reset());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn info(&self) -> Result<DeviceInfo> {
        self.bound()?;
        let i = ioctl::vfio_device_get_info(self.fd())
            .map_err(|e| Error::sys("VFIO_DEVICE_GET_INFO", self.address.to_string(), e))?;
        Ok(DeviceInfo::new(i.flags, i.num_regions, i.num_irqs))
    }

    /// `VFIO_DEVICE_GET_REGION_INFO` for region `index`. An index past the
    /// device's regions is [`Error::InvalidRegion`].
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
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
                    source: Some(e),
                }
            } else {
                Error::sys(
                    "VFIO_DEVICE_GET_REGION_INFO",
                    format!("{} region {index}", self.address),
                    e,
                )
            }
        })?;
        Ok(RegionInfo::new(index, r.flags, r.size, r.offset))
    }

    /// BAR `index` if [`bar`](Self::bar) has looked at it already.
    #[inline]
    pub(crate) fn known_bar(&self, index: u32) -> Option<&Bar> {
        self.bars.get(usize::try_from(index).ok()?)?.get()
    }

    /// BAR `index` (0..=5): VFIO's region info plus sysfs's `resource` line
    /// (its physical start and kind). Indexes 6 (ROM), 7 (config) and above
    /// are [`Error::InvalidRegion`]. An absent BAR is returned with size 0
    /// ([`Bar::is_present`]). Read once, then remembered: a BAR cannot change
    /// while vfio-pci holds the device. The `resource` lines come from
    /// [`open`](Self::open), which reads them with its other sysfs reads:
    /// the first look at a BAR (the first export) asks only
    /// `VFIO_DEVICE_GET_REGION_INFO`.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
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
        let known = self
            .resources
            .as_deref()
            .and_then(|all| all.iter().find(|r| r.index == index));
        let resource = match known {
            Some(r) => *r,
            None => self.sysfs.bar(self.address, index)?,
        };
        Ok(*slot.get_or_init(|| Bar::new(index, region, resource)))
    }
}
