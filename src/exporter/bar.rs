//! BAR ranges exported as dma-bufs (`VFIO_DEVICE_FEATURE_DMA_BUF`): the
//! export plan checked before any ioctl, the export itself, and
//! [`BarExport`], the buffer with the ranges it was made from.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::dmabuf::DmaBuf;
use crate::error::{Error, Result};
use crate::ioctl;
use crate::pci::PciAddress;
use crate::range::human_size;
use crate::range::{
    ByteRange, PhysRange, TOTAL_LIMIT, map_to_phys, page_size, validate_export_ranges,
};
use crate::revoke::{Revocable, RevocationHub};
use crate::sys;
use crate::vfio::{Bar, VfioPciDevice, check_bar_index};

/// The `open_flags` of every export: `O_RDWR | O_CLOEXEC`.
///
/// ```
/// use dmabuf_p2p::exporter::bar::EXPORT_OPEN_FLAGS;
/// assert_eq!(EXPORT_OPEN_FLAGS, (libc::O_RDWR | libc::O_CLOEXEC) as u32);
/// ```
#[allow(clippy::cast_sign_loss)]
pub const EXPORT_OPEN_FLAGS: u32 = (libc::O_RDWR | libc::O_CLOEXEC) as u32;

/// An export request checked against a BAR, ready for the kernel: what
/// [`VfioPciDevice::export_bar`] sends and records. Built by [`plan_export`].
///
/// ```
/// # use dmabuf_p2p::pci::{Resource, IORESOURCE_MEM};
/// # use dmabuf_p2p::vfio::{Bar, RegionInfo};
/// let bar = Bar::new(2, RegionInfo::new(2, 7, 0x10_0000, 2 << 40), Resource::new(2, 0xfe00_0000, 0x10_0000, IORESOURCE_MEM));
/// let plan = dmabuf_p2p::exporter::bar::plan_export("0000:00:03.0".parse()?, &bar, &[dmabuf_p2p::ByteRange::new(0, 0x2000)], 0x1000)?;
/// assert_eq!((plan.size(), plan.phys()[0].start), (0x2000, 0xfe00_0000));
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportPlan {
    device: PciAddress,
    bar: u32,
    ranges: OneOrMany<ByteRange>,
    phys: OneOrMany<PhysRange>,
    size: u64,
}

impl ExportPlan {
    /// The device.
    pub fn device(&self) -> PciAddress {
        self.device
    }

    /// The BAR index.
    pub fn bar(&self) -> u32 {
        self.bar
    }

    /// The ranges, BAR-relative, in request order.
    pub fn ranges(&self) -> &[ByteRange] {
        self.ranges.as_slice()
    }

    /// The same ranges as physical addresses.
    pub fn phys(&self) -> &[PhysRange] {
        self.phys.as_slice()
    }

    /// The total length: the size of the dma-buf.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// One item held inline or several in a vector: a one-range export (the
/// common case) allocates nothing for its ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            Self::One(item) => std::slice::from_ref(item),
            Self::Many(items) => items,
        }
    }
}

/// Checks an export of `ranges` of `bar` on `device` before any ioctl, with
/// `page` as the alignment (normally [`page_size`]): the BAR must be 0..=5
/// ([`Error::InvalidRegion`]), present and a memory BAR (also
/// `InvalidRegion`), and the ranges must pass
/// [`validate_export_ranges`] ([`Error::InvalidRange`] naming the first bad
/// range). The physical ranges are computed from the BAR's sysfs start.
///
/// ```
/// use dmabuf_p2p::exporter::bar::plan_export;
/// use dmabuf_p2p::vfio::{Bar, RegionInfo};
/// use dmabuf_p2p::pci::{Resource, IORESOURCE_MEM};
/// use dmabuf_p2p::{ByteRange, Error, RangeProblem};
///
/// let bar = Bar::new(2, RegionInfo::new(2, 7, 0x10_0000, 2 << 40), Resource::new(2, 0xfe00_0000, 0x10_0000, IORESOURCE_MEM));
/// let dev = "0000:00:03.0".parse()?;
/// let plan = plan_export(dev, &bar, &[ByteRange::new(0x1000, 0x2000)], 0x1000)?;
/// assert_eq!(plan.phys()[0].start, 0xfe00_1000);
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
        source: None,
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
    let (ranges, phys) = if let &[range] = ranges {
        let phys = range.to_phys(bar.phys_start()).map_err(|problem| {
            named(Error::InvalidRange {
                target: String::new(),
                range,
                problem,
            })
        })?;
        (OneOrMany::One(range), OneOrMany::One(phys))
    } else {
        let phys = map_to_phys("", bar.phys_start(), ranges).map_err(named)?;
        (OneOrMany::Many(ranges.to_vec()), OneOrMany::Many(phys))
    };
    Ok(ExportPlan {
        device,
        bar: bar.index,
        ranges,
        phys,
        size,
    })
}

/// The physical range of `range` of `bar` if [`plan_export`] of that one
/// range would succeed with alignment `page` (a power of two), `None`
/// otherwise: every check of the planner, combined into one test without
/// early exits, for the hot path of [`VfioPciDevice::export_bar`].
fn quick_phys(bar: &Bar, range: ByteRange, page: u64) -> Option<PhysRange> {
    let ByteRange { offset, length } = range;
    let end = offset.wrapping_add(length);
    let start = bar.phys_start().wrapping_add(offset);
    let memory = bar.resource.is_mem() & !bar.resource.is_io();
    let aligned = page <= 1 || (offset | length) & (page - 1) == 0;
    let ok = bar.is_present()
        & memory
        & (length != 0)
        & aligned
        & (end >= offset)
        & (end <= bar.size())
        & (length < TOTAL_LIMIT)
        & (start >= offset)
        & (start.wrapping_add(length) >= start);
    ok.then_some(PhysRange::new(start, length))
}

/// The exact bytes [`VfioPciDevice::export_bar`] passes to
/// `VFIO_DEVICE_FEATURE` for an export of `ranges` of BAR `region_index`: the
/// `vfio_device_feature` header (`argsz`, `flags = GET | DMA_BUF`), the
/// `vfio_device_feature_dma_buf` part (`region_index`, `open_flags =`
/// [`EXPORT_OPEN_FLAGS`], `flags = 0`, `nr_ranges`) and the ranges, 16 bytes
/// each. For inspection and tests; nothing is checked here.
///
/// ```
/// use dmabuf_p2p::{exporter::bar::export_request, ByteRange};
/// let bytes = export_request(2, &[ByteRange::new(0, 0x1000), ByteRange::new(0x4000, 0x2000)])?;
/// assert_eq!(bytes.len(), 8 + 16 + 2 * 16);
/// assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 56); // argsz
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn export_request(region_index: u32, ranges: &[ByteRange]) -> Result<Vec<u8>> {
    let raw: Vec<_> = ranges.iter().copied().map(to_dma_range).collect();
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

fn to_dma_range(range: ByteRange) -> sys::vfio_region_dma_range {
    sys::vfio_region_dma_range {
        offset: range.offset,
        length: range.length,
    }
}

/// A BAR as named in errors: `0000:00:03.0 BAR2 (1 MiB)`.
fn bar_name(device: PciAddress, index: u32, size: u64) -> String {
    format!("{device} BAR{index} ({})", human_size(size))
}

impl VfioPciDevice {
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
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
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
                self.address().to_string(),
                e,
            )),
        }
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
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// dev.set_memory_decode(true)?;
    /// let export = dev.export_bar(2, &[ByteRange::new(0, 0x10_0000)])?;
    /// println!("{export}");
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn export_bar(&self, index: u32, ranges: &[ByteRange]) -> Result<BarExport> {
        // The common case, one range of a BAR seen before, passes every
        // check in one test; anything else (and every error) takes the
        // checks one by one, which name what is wrong.
        let plan = match ranges {
            &[range] if let Some(plan) = self.quick_plan(index, range) => plan,
            _ => self.checked_plan(index, ranges)?,
        };
        // Born revoked or not, from the register as the device knows it (its
        // own writes, resets, the VMM's notes): no config read on the hot
        // path. Only a device that has not seen the register yet reads it.
        let memory_decode = self
            .known_memory_decode()
            .or_else(|| self.memory_decode().ok());
        let fd = match ranges {
            &[one] => ioctl::vfio_device_feature_dma_buf_one(
                self.fd(),
                index,
                EXPORT_OPEN_FLAGS,
                to_dma_range(one),
            ),
            many => {
                let raw: Vec<_> = many.iter().copied().map(to_dma_range).collect();
                ioctl::vfio_device_feature_dma_buf(self.fd(), index, EXPORT_OPEN_FLAGS, &raw)
            }
        }
        .map_err(|e| self.export_error(index, ranges, e))?;
        let mut buf = DmaBuf::from_export(fd, plan.size());
        if let [one] = plan.phys() {
            buf = buf.with_phys_start(one.start);
        }
        Ok(BarExport {
            buf,
            plan,
            memory_decode,
            hub: Arc::clone(self.hub()),
        })
    }

    /// The plan of a one-range export of a BAR already looked at, if the
    /// device is bound and not being removed and the range passes
    /// [`plan_export`]'s checks; `None` sends the caller to
    /// [`checked_plan`](Self::checked_plan).
    #[inline]
    fn quick_plan(&self, index: u32, range: ByteRange) -> Option<ExportPlan> {
        let bar = self.known_bar(index)?;
        let usable = self.is_bound() & !self.removal_requested();
        let phys = quick_phys(bar, range, page_size()).filter(|_| usable)?;
        Some(ExportPlan {
            device: self.address(),
            bar: index,
            ranges: OneOrMany::One(range),
            phys: OneOrMany::One(phys),
            size: range.length,
        })
    }

    /// The checks of an export one by one, in the order the errors are
    /// reported: bound, not being removed, the BAR, the ranges.
    fn checked_plan(&self, index: u32, ranges: &[ByteRange]) -> Result<ExportPlan> {
        self.bound()?;
        if self.removal_requested() {
            return Err(
                self.device_error("is being removed (the kernel asked for it back); close it")
            );
        }
        let bar = self.bar(index)?;
        plan_export(self.address(), &bar, ranges, page_size())
    }

    /// The error of a refused export, naming the BAR and the ranges.
    #[cold]
    fn export_error(&self, index: u32, ranges: &[ByteRange], e: std::io::Error) -> Error {
        let list: Vec<String> = ranges.iter().map(ToString::to_string).collect();
        let size = self.known_bar(index).map_or(0, Bar::size);
        Error::sys(
            "VFIO_DEVICE_FEATURE(DMA_BUF)",
            format!(
                "{} ranges [{}]",
                bar_name(self.address(), index, size),
                list.join(", ")
            ),
            e,
        )
    }
}

/// A dma-buf exported from BAR ranges, with what it was made from: the
/// device, the BAR, the BAR-relative ranges and the physical ranges behind
/// them. The [`DmaBuf`] is closed with it unless taken out with
/// [`BarExport::into_dmabuf`].
///
/// ```no_run
/// # use dmabuf_p2p::ByteRange;
/// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
/// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
/// let export = dev.export_bar(2, &[ByteRange::new(0x1000, 0x1000)])?;
/// let pfns = export.phys_ranges()[0].pfns(4096);
/// let buf = export.into_dmabuf();
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug)]
pub struct BarExport {
    // Dropped in this order: the buffer's close last, so that nothing
    // else is left to do after the kernel's work.
    hub: Arc<RevocationHub>,
    plan: ExportPlan,
    memory_decode: Option<bool>,
    buf: DmaBuf,
}

impl Revocable for BarExport {
    fn dmabuf(&self) -> &DmaBuf {
        &self.buf
    }

    fn hub(&self) -> &Arc<RevocationHub> {
        &self.hub
    }

    fn phys_ranges(&self) -> Vec<PhysRange> {
        self.plan.phys().to_vec()
    }

    fn exporter_bar(&self) -> Option<(PciAddress, u32)> {
        Some((self.plan.device(), self.plan.bar()))
    }
}

impl BarExport {
    /// The dma-buf.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
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
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
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
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// assert_eq!(export.device(), dev.address());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn device(&self) -> PciAddress {
        self.plan.device()
    }

    /// The BAR index.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// assert_eq!(export.bar(), 2);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn bar(&self) -> u32 {
        self.plan.bar()
    }

    /// The BAR-relative ranges, in request order.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// assert_eq!(export.ranges(), &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)]);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn ranges(&self) -> &[ByteRange] {
        self.plan.ranges()
    }

    /// The physical ranges behind the buffer, in request order.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// assert_eq!(export.phys_ranges()[0].start, dev.bar(2)?.phys_start() + 0x1000);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn phys_ranges(&self) -> &[PhysRange] {
        self.plan.phys()
    }

    /// The buffer size: the sum of the range lengths.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0x1000, 0x1000)])?;
    /// assert_eq!(export.size(), 0x1000);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn size(&self) -> u64 {
        self.plan.size()
    }

    /// What `PCI_COMMAND` memory decode was just before the export, as the
    /// device knew it ([`VfioPciDevice::known_memory_decode`]: kept current
    /// by the library's own writes, resets and the VMM's notes; read from
    /// config space only if not known yet), `None` if it could not be read.
    /// `Some(false)` means the buffer was born revoked. A change made behind
    /// the library's back is seen after
    /// [`VfioPciDevice::sync_with_kernel`].
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
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

impl TryFrom<BarExport> for OwnedFd {
    type Error = Error;

    /// [`DmaBuf::into_owned_fd`] of its buffer.
    fn try_from(e: BarExport) -> Result<Self> {
        e.buf.into_owned_fd()
    }
}

impl fmt::Display for BarExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "dma-buf fd {} = {} BAR{} [",
            self.buf.as_raw_fd(),
            self.plan.device(),
            self.plan.bar()
        )?;
        for (i, (r, p)) in self.plan.ranges().iter().zip(self.plan.phys()).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r} @ {p}")?;
        }
        write!(f, "] ({})", human_size(self.plan.size()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{IORESOURCE_IO, IORESOURCE_MEM, Resource};
    use crate::vfio::RegionInfo;

    /// The hot path's one test agrees with the planner, check by check, on
    /// every edge: empty, unaligned, overflowing and out-of-bounds ranges,
    /// absent and I/O BARs, BARs near the top of the address space.
    #[test]
    fn quick_phys_agrees_with_plan_export() {
        let dev: PciAddress = "0000:00:03.0".parse().expect("address");
        let mut bars = Vec::new();
        for (start, size) in [
            (0xfe00_0000, 0x10_0000),
            (0x80_0000_0000, 64 << 30),
            (u64::MAX - 0xf_ffff, 0x10_0000),
            (u64::MAX - 0xfff, 0x10_0000),
            (0, 0),
        ] {
            for flags in [
                IORESOURCE_MEM,
                IORESOURCE_IO,
                IORESOURCE_MEM | IORESOURCE_IO,
                0,
            ] {
                let region = RegionInfo::new(2, 7, size, 2 << 40);
                bars.push(Bar::new(2, region, Resource::new(2, start, size, flags)));
            }
        }
        let edges = |size: u64| {
            let mut v = vec![
                0,
                1,
                0xfff,
                0x1000,
                0x1001,
                0x2000,
                1 << 63,
                (1 << 63) - 0x1000,
                u64::MAX,
                u64::MAX - 0xfff,
                u64::MAX - 0x1000 + 1,
            ];
            for d in [0, 0x1000, 1] {
                v.extend([size.wrapping_sub(d), size.wrapping_add(d)]);
            }
            v
        };
        let mut checked = 0;
        for bar in &bars {
            for page in [0x1000, 1] {
                for offset in edges(bar.size()) {
                    for length in edges(bar.size()) {
                        let range = ByteRange::new(offset, length);
                        let planned = plan_export(dev, bar, &[range], page)
                            .ok()
                            .map(|p| p.phys()[0]);
                        assert_eq!(
                            quick_phys(bar, range, page),
                            planned,
                            "{range} of {bar:?}, page {page:#x}"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 10_000, "{checked} cases");
    }
}
