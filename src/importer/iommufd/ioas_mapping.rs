//! The mapping lifecycle: [`Ioas::map_user`], [`Ioas::map_file`],
//! [`Ioas::map_dmabuf`] and [`Ioas::copy_from`] make an [`IoasMapping`];
//! it unmaps, maps again at the same IOVA ([`IoasMapping::remap`]), and
//! unmaps on drop. The fixed-IOVA paths are one ioctl each, inlined into
//! their callers.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use super::ioas::Ioas;
use super::iova::IovaPlacement;
use crate::dmabuf::{DmaBuf, is_dmabuf};
use crate::error::{Error, RangeProblem, Result};
use crate::importer::placement::MapResult;
use crate::ioctl;
use crate::range::{ByteRange, human_size};
use crate::sys;

/// What devices may do through a mapping. iommufd needs at least one of read
/// and write, so there is no "none".
///
/// ```
/// use dmabuf_p2p::importer::iommufd::MapPerms;
/// assert!(MapPerms::ReadWrite.readable() && MapPerms::ReadWrite.writable());
/// assert!(!MapPerms::Read.writable());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapPerms {
    /// Devices may read (DMA from the memory).
    Read,
    /// Devices may write (DMA to the memory).
    Write,
    /// Both.
    ReadWrite,
}

impl MapPerms {
    /// Whether devices may read.
    ///
    /// ```
    /// use dmabuf_p2p::importer::iommufd::MapPerms;
    /// assert!(MapPerms::Read.readable() && !MapPerms::Write.readable());
    /// ```
    pub const fn readable(self) -> bool {
        matches!(self, Self::Read | Self::ReadWrite)
    }

    /// Whether devices may write.
    ///
    /// ```
    /// use dmabuf_p2p::importer::iommufd::MapPerms;
    /// assert!(MapPerms::Write.writable() && !MapPerms::Read.writable());
    /// ```
    pub const fn writable(self) -> bool {
        matches!(self, Self::Write | Self::ReadWrite)
    }

    /// The `IOMMU_IOAS_MAP_{READABLE,WRITEABLE}` bits.
    const fn flags(self) -> u32 {
        match self {
            Self::Read => sys::IOMMU_IOAS_MAP_READABLE,
            Self::Write => sys::IOMMU_IOAS_MAP_WRITEABLE,
            Self::ReadWrite => sys::IOMMU_IOAS_MAP_READABLE | sys::IOMMU_IOAS_MAP_WRITEABLE,
        }
    }
}

impl Ioas {
    /// Maps into this IOAS the pages behind `range` of an existing mapping
    /// `src` (`IOMMU_IOAS_COPY`): the new area shares the source area's
    /// pages object, pinned pages or a dma-buf alike, and nothing is pinned
    /// or attached twice. `range` is relative to the source mapping (offset
    /// 0 is `src.iova()`). `src` may be in this IOAS or another IOAS of the
    /// same iommufd.
    ///
    /// The returned [`IoasMapping`] unmaps on drop and does not depend on
    /// `src`, which may be dropped first. It records the same file as the
    /// source (the same dma-buf fd, or its own duplicate of a memfd's, at the
    /// matching offset), so
    /// [`IoasMapping::remap`] maps that file again with `IOMMU_IOAS_MAP_FILE`
    /// at the same IOVA: the same pages, from a fresh pages object. A copy of
    /// a dma-buf area is revoked together with the source area (they share
    /// the buffer's attachment) and is restored by its own remap; copies are
    /// not known to a [`RevocationHub`](crate::revoke::RevocationHub).
    ///
    /// Checked before the ioctl: `src` must belong to the same iommufd and
    /// be mapped, and must map a file (memfd or dma-buf), not user memory
    /// (a copy could outlive the promise made to [`Ioas::map_user`]): each
    /// [`Error::Unsupported`] naming the source; `range` must be non-empty
    /// and inside the source ([`Error::InvalidRange`]). IOVA problems at the
    /// destination are [`Error::InvalidIova`], as for the map calls. The
    /// kernel copies a revoked dma-buf area without complaint, as an area
    /// that maps nothing.
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
    /// use dmabuf_p2p::ByteRange;
    ///
    /// let iommufd = Iommufd::open()?;
    /// let (a, b) = (iommufd.alloc_ioas()?, iommufd.alloc_ioas()?);
    /// let memfd = dmabuf_p2p::memfd::Memfd::new("shared", 0x20000)?;
    /// let src = a.map_file(&memfd, ByteRange::new(0, 0x20000), IovaPlacement::Auto, MapPerms::ReadWrite)?;
    /// let copy = b.copy_from(&src, ByteRange::new(0x10000, 0x10000), IovaPlacement::Fixed(0x100_0000), MapPerms::Read)?;
    /// assert_eq!((copy.iova(), copy.length(), copy.source_offset()), (0x100_0000, 0x10000, 0x10000));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn copy_from(
        &self,
        src: &IoasMapping,
        range: ByteRange,
        at: IovaPlacement,
        perms: MapPerms,
    ) -> Result<IoasMapping> {
        const OP: &str = "IOMMU_IOAS_COPY";
        let refuse = |problem: String| Error::Unsupported {
            target: format!("source {src}"),
            operation: OP,
            problem,
            source: None,
        };
        if !src.ioas.iommufd().same_context(self.iommufd()) {
            return Err(refuse(format!(
                "the source is in another iommufd than IOAS {}; a copy works within one iommufd (map the \
                 source's file into IOAS {} instead)",
                self.id(),
                self.id()
            )));
        }
        if !src.mapped {
            return Err(refuse(
                "the source is not mapped (unmapped, or its last remap failed)".to_owned(),
            ));
        }
        range
            .check_in(src.length, 1)
            .map_err(|problem| Error::InvalidRange {
                target: format!("source {src} ({})", human_size(src.length)),
                range,
                problem,
            })?;
        let overflow = || Error::InvalidRange {
            target: format!("source {src}"),
            range,
            problem: RangeProblem::Overflow,
        };
        let src_iova = src.iova.checked_add(range.offset).ok_or_else(overflow)?;
        let source = match &src.source {
            Source::User { .. } => {
                return Err(refuse(
                    "the source maps user memory: a copy could outlive the promise made for it to \
                     Ioas::map_user; map the memory into this IOAS with map_user instead"
                        .to_owned(),
                ));
            }
            Source::File { fd, start } => {
                let start = start.checked_add(range.offset).ok_or_else(overflow)?;
                Source::File {
                    fd: dup_source(fd.as_fd())?,
                    start,
                }
            }
            Source::DmaBuf { buf, start } => {
                let start = start.checked_add(range.offset).ok_or_else(overflow)?;
                Source::DmaBuf {
                    buf: buf.share(),
                    start,
                }
            }
        };
        let phys = src.phys.and_then(|p| p.checked_add(range.offset));
        let mut mapping = IoasMapping::unmapped(self, at, range.length, perms, source, phys);
        let _placing = (at == IovaPlacement::Auto).then(|| self.placement().lock());
        // The copy shares the source's pages: congruent to the source IOVA,
        // it can use the same IOMMU page sizes.
        let residue = mapping.phys.unwrap_or(src_iova);
        let req = || self.placement().request(range.length, residue, true);
        let copy = |at: IovaPlacement| {
            let (iova, placement) = at.to_arg();
            let arg = sys::iommu_ioas_copy {
                flags: placement | perms.flags(),
                dst_ioas_id: self.id(),
                src_ioas_id: src.ioas.id(),
                length: range.length,
                dst_iova: iova,
                src_iova,
                ..Default::default()
            };
            ioctl::iommu_ioas_copy(self.iommufd().as_fd(), &arg).map_err(|e| (OP, e))
        };
        let usable = || self.iova_ranges().ok();
        match self.placement().place(at, usable, req, copy) {
            Ok(got) => {
                mapping.iova = got;
                mapping.mapped = true;
                self.placement().record_mapped(got, range.length);
                Ok(mapping)
            }
            // `mapping` is dropped unmapped: only its hold on the fd goes.
            Err((at, _, e)) => Err(mapping.placement_error(at, &e).unwrap_or_else(|| {
                Error::sys(
                    OP,
                    format!("{src} {range} -> IOAS {} at {:#x}", self.id(), at.iova()),
                    e,
                )
            })),
        }
    }

    /// Maps `length` bytes of this process's memory at `addr`
    /// (`IOMMU_IOAS_MAP`). The pages are pinned by the kernel; memory that
    /// cannot be pinned (a VFIO BAR or udmabuf `mmap`, `VM_PFNMAP`) fails
    /// with `EFAULT`.
    ///
    /// # Safety
    ///
    /// Devices attached to the IOAS may read and (with a writable `perms`)
    /// write the memory at any time until the returned mapping is dropped
    /// (an [`IoasMapping::remap`] maps it again). Until then the caller must
    /// keep the memory allocated and mapped at `addr`, and must not hold
    /// Rust references to it that such device writes would invalidate
    /// (access it through raw pointers or volatile operations only).
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::iommufd::{MapPerms, Iommufd, IovaPlacement};
    ///
    /// let ioas = Iommufd::open()?.alloc_ioas()?;
    /// let len = 0x10000;
    /// // SAFETY: an anonymous private mapping we own and never free here.
    /// let mem = unsafe {
    ///     libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
    ///                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    /// };
    /// assert_ne!(mem, libc::MAP_FAILED);
    /// let ptr = std::ptr::NonNull::new(mem.cast::<u8>()).unwrap();
    /// // SAFETY: the memory stays mapped for the life of the process and is
    /// // only accessed through raw pointers.
    /// let map = unsafe { ioas.map_user(ptr, len, IovaPlacement::Auto, MapPerms::ReadWrite)? };
    /// println!("IOVA {:#x}", map.iova());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub unsafe fn map_user(
        &self,
        addr: NonNull<u8>,
        length: usize,
        at: IovaPlacement,
        perms: MapPerms,
    ) -> Result<IoasMapping> {
        let source = Source::User {
            addr: addr.as_ptr() as usize,
        };
        let length = length as u64;
        if length == 0 {
            return Err(Error::InvalidRange {
                target: source.describe(),
                range: ByteRange::new(addr.as_ptr() as u64, 0),
                problem: RangeProblem::Empty,
            });
        }
        let mut mapping = IoasMapping::unmapped(self, at, length, perms, source, None);
        // SAFETY: the caller's contract (see `# Safety`) covers device access
        // to `addr..addr+length` until `mapping` is dropped, which is when it
        // is unmapped for the last time.
        unsafe { mapping.map_at(at) }?;
        Ok(mapping)
    }

    /// Maps `range` (byte offsets) of a file into the IOAS
    /// (`IOMMU_IOAS_MAP_FILE`). The file is a memfd (any shmem or hugetlbfs
    /// file) or a dma-buf; iommufd takes only single-range VFIO PCI dma-bufs
    /// (see [`Ioas::map_dmabuf`] for the errors).
    ///
    /// The mapping keeps a duplicate of the fd (close-on-exec), so the
    /// caller's fd may be closed, and [`IoasMapping::remap`] can map the same
    /// range again. The range is checked against the file's size first
    /// ([`Error::InvalidRange`]): for a memfd with no device attached to the
    /// IOAS the kernel would not check it until a device attaches.
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::iommufd::{MapPerms, Iommufd, IovaPlacement};
    /// use dmabuf_p2p::ByteRange;
    /// use dmabuf_p2p::memfd::Memfd;
    ///
    /// let memfd = Memfd::new("buf", 0x20000)?;
    /// let ioas = Iommufd::open()?.alloc_ioas()?;
    /// let map = ioas.map_file(&memfd, ByteRange::new(0, 0x20000), IovaPlacement::Fixed(0x100_0000), MapPerms::ReadWrite)?;
    /// assert_eq!((map.iova(), map.length()), (0x100_0000, 0x20000));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn map_file(
        &self,
        file: impl AsFd,
        range: ByteRange,
        at: IovaPlacement,
        perms: MapPerms,
    ) -> Result<IoasMapping> {
        let fd = dup_source(file.as_fd())?;
        let source = if is_dmabuf(fd.as_fd())? {
            Source::DmaBuf {
                buf: DmaBuf::from_owned_unchecked(fd)?,
                start: range.offset,
            }
        } else {
            Source::File {
                fd,
                start: range.offset,
            }
        };
        let size = source.size()?;
        self.map_source(source, size, range, at, perms, None)
    }

    /// Maps `range` of `source`, whose size is `size`, after checking the
    /// range against it; `phys` is the physical address of the range's
    /// first byte, when known.
    fn map_source(
        &self,
        source: Source,
        size: u64,
        range: ByteRange,
        at: IovaPlacement,
        perms: MapPerms,
        phys: Option<u64>,
    ) -> Result<IoasMapping> {
        range
            .check_in(size, 1)
            .map_err(|problem| Error::InvalidRange {
                target: format!("{} ({})", source.describe(), human_size(size)),
                range,
                problem,
            })?;
        let mut mapping = IoasMapping::unmapped(self, at, range.length, perms, source, phys);
        // SAFETY: a file source maps kernel-owned pages (shmem, hugetlbfs or
        // device MMIO), not this process's Rust memory.
        unsafe { mapping.map_at(at) }?;
        Ok(mapping)
    }

    /// Maps the whole of a dma-buf (`IOMMU_IOAS_MAP_FILE`, offset 0, its
    /// full size): the P2P path of a VFIO BAR export.
    ///
    /// Errors besides those of [`Ioas::map_file`]:
    /// * [`Error::NotImportable`] (`EOPNOTSUPP`): a VFIO dma-buf with more
    ///   than one range, or a dma-buf of another exporter (udmabuf, a heap,
    ///   a GPU driver); the message says which, from fdinfo's `exp_name`;
    /// * [`Error::Revoked`] (`ENODEV`): the exporter has revoked it (for VFIO:
    ///   memory decode off, the device in D3, reset in progress, or the
    ///   device fd closed);
    /// * [`Error::InvalidIova`]: IOVA taken (`EEXIST`), misaligned or reserved
    ///   (`EINVAL` at a fixed IOVA), or no room (`ENOSPC`).
    ///
    /// ```no_run
    /// use dmabuf_p2p::vfio::VfioPciDevice;
    /// use dmabuf_p2p::importer::iommufd::{MapPerms, Iommufd, IovaPlacement};
    /// use dmabuf_p2p::ByteRange;
    ///
    /// let iommufd = Iommufd::open()?;
    /// let mut dev = VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// dev.bind(&iommufd)?;
    /// dev.set_memory_decode(true)?;
    /// let export = dev.export_bar(2, &[ByteRange::new(0, 0x10_0000)])?;
    /// let ioas = iommufd.alloc_ioas()?;
    /// let map = ioas.map_dmabuf(export.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite)?;
    /// println!("BAR2 at IOVA {:#x}", map.iova());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn map_dmabuf(
        &self,
        buf: &DmaBuf,
        at: IovaPlacement,
        perms: MapPerms,
    ) -> Result<IoasMapping> {
        self.map_dmabuf_at_phys(buf, at, perms, None)
    }

    /// [`Ioas::map_dmabuf`] of a buffer whose first byte is at physical
    /// address `phys`, when known: automatic placement aligns the IOVA
    /// with it.
    #[inline]
    pub(crate) fn map_dmabuf_at_phys(
        &self,
        buf: &DmaBuf,
        at: IovaPlacement,
        perms: MapPerms,
        phys: Option<u64>,
    ) -> Result<IoasMapping> {
        // The one syscall is the map: a `DmaBuf` is known to be one (no
        // `fstatfs`), knows its size (no `lseek`), and the mapping holds
        // the same fd by reference count (no `dup`).
        // The whole buffer: no range to check.
        let source = Source::DmaBuf {
            buf: buf.share(),
            start: 0,
        };
        let phys = phys.or_else(|| buf.phys_start());
        let mut mapping = IoasMapping::unmapped(self, at, buf.size()?, perms, source, phys);
        // SAFETY: a dma-buf maps kernel-owned pages (device memory), not this
        // process's Rust memory.
        unsafe { mapping.map_at(at) }?;
        Ok(mapping)
    }
}

/// Duplicates the fd a mapping keeps (close-on-exec). Done before mapping: if
/// the dup fails nothing has been mapped, and once mapped, the area is owned
/// by a handle that can undo it.
fn dup_source(file: BorrowedFd<'_>) -> Result<OwnedFd> {
    file.try_clone_to_owned().map_err(|e| {
        Error::sys(
            "fcntl(F_DUPFD_CLOEXEC)",
            format!("fd {}", file.as_raw_fd()),
            e,
        )
    })
}

/// What a mapping maps.
#[derive(Debug)]
enum Source {
    /// Process memory at this address (`IOMMU_IOAS_MAP`).
    User { addr: usize },
    /// A file that is not a dma-buf (a memfd), from byte `start`
    /// (`IOMMU_IOAS_MAP_FILE`); a duplicate of the caller's fd.
    File { fd: OwnedFd, start: u64 },
    /// A dma-buf from byte `start` (`IOMMU_IOAS_MAP_FILE`): the caller's
    /// [`DmaBuf`] shared by reference count, or for [`Ioas::map_file`] of a
    /// plain fd, a duplicate of it.
    DmaBuf { buf: DmaBuf, start: u64 },
}

impl Source {
    /// Names the source for messages.
    fn describe(&self) -> String {
        match self {
            Self::User { addr } => format!("user memory at {addr:#x}"),
            Self::File { fd, .. } => format!("file fd {}", fd.as_raw_fd()),
            Self::DmaBuf { buf, .. } => buf.describe(),
        }
    }

    /// The fd to pass to `IOMMU_IOAS_MAP_FILE` and the start offset.
    fn file(&self) -> Option<(BorrowedFd<'_>, u64)> {
        match self {
            Self::User { .. } => None,
            Self::File { fd, start } => Some((fd.as_fd(), *start)),
            Self::DmaBuf { buf, start } => Some((buf.as_fd(), *start)),
        }
    }

    /// The size of a file source (a dma-buf's buffer size, a memfd's
    /// `st_size`).
    fn size(&self) -> Result<u64> {
        match self {
            Self::User { .. } => Ok(0),
            Self::File { fd, .. } => {
                file_size(fd.as_fd()).map_err(|e| Error::sys("fstat", self.describe(), e))
            }
            Self::DmaBuf { buf, .. } => buf.size(),
        }
    }
}

/// One mapped area of an [`Ioas`]: `length` bytes at `iova`. Unmapped
/// (`IOMMU_IOAS_UNMAP`) when dropped.
///
/// Keeps what is needed to map the same source again ([`IoasMapping::remap`]):
/// the IOAS (a shared handle, so the IOAS outlives the mapping), the file's
/// fd (a [`DmaBuf`] shared by reference count, or a duplicate of a memfd's;
/// for a dma-buf this also keeps the buffer alive), the file offset or user address, the IOVA, the length and the permissions.
///
/// A VFIO dma-buf mapping stays in place when the exporter revokes the
/// buffer: the IOMMU entries are gone, the area is not. Revocation is
/// permanent for that area (uAPI reference F); [`IoasMapping::remap`] is how
/// to restore it once the exporter has un-revoked.
///
/// ```no_run
/// # use dmabuf_p2p::importer::iommufd::{MapPerms, Iommufd, IovaPlacement};
/// # use dmabuf_p2p::ByteRange;
/// # let memfd = dmabuf_p2p::memfd::Memfd::new("buffer", 0x1000)?;
/// let ioas = Iommufd::open()?.alloc_ioas()?;
/// let mut map = ioas.map_file(&memfd, ByteRange::new(0, 0x1000), IovaPlacement::Auto, MapPerms::Read)?;
/// println!("{map}");
/// assert_eq!(map.unmap()?, 0x1000);
/// assert!(!map.is_mapped());
/// map.remap()?; // same IOVA again
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct IoasMapping {
    ioas: Ioas,
    iova: u64,
    length: u64,
    perms: MapPerms,
    source: Source,
    /// The physical address of the first byte, when known (a BAR): what
    /// automatic placement aligns the IOVA with.
    phys: Option<u64>,
    mapped: bool,
}

impl IoasMapping {
    /// A handle of `length` bytes of `source` in `ioas`, not mapped yet
    /// (`at` names the IOVA until a map says where it went); `phys` is the
    /// physical address of the first byte, when known.
    #[inline(always)]
    fn unmapped(
        ioas: &Ioas,
        at: IovaPlacement,
        length: u64,
        perms: MapPerms,
        source: Source,
        phys: Option<u64>,
    ) -> Self {
        Self {
            ioas: ioas.clone(),
            iova: at.iova(),
            length,
            perms,
            source,
            phys,
            mapped: false,
        }
    }

    /// The IOVA of the first byte.
    ///
    /// ```no_run
    /// # let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// # let memfd = dmabuf_p2p::memfd::Memfd::new("doc", 0x10000)?;
    /// # use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
    /// # let mut map = ioas.map_file(&memfd, dmabuf_p2p::ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::Read)?;
    /// println!("IOVA {:#x}", map.iova());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The length in bytes.
    ///
    /// ```no_run
    /// # let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// # let memfd = dmabuf_p2p::memfd::Memfd::new("doc", 0x10000)?;
    /// # use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
    /// # let mut map = ioas.map_file(&memfd, dmabuf_p2p::ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::Read)?;
    /// assert_eq!(map.length(), 0x10000);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn length(&self) -> u64 {
        self.length
    }

    /// The ID of the IOAS it is in.
    ///
    /// ```no_run
    /// # let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// # let memfd = dmabuf_p2p::memfd::Memfd::new("doc", 0x10000)?;
    /// # use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
    /// # let mut map = ioas.map_file(&memfd, dmabuf_p2p::ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::Read)?;
    /// assert_eq!(map.ioas_id(), ioas.id());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn ioas_id(&self) -> u32 {
        self.ioas.id()
    }

    /// The IOAS it is in.
    ///
    /// ```no_run
    /// # let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// # let memfd = dmabuf_p2p::memfd::Memfd::new("doc", 0x10000)?;
    /// # use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
    /// # let mut map = ioas.map_file(&memfd, dmabuf_p2p::ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::Read)?;
    /// assert!(map.ioas().same_ioas(&ioas));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn ioas(&self) -> &Ioas {
        &self.ioas
    }

    /// What devices may do through it.
    ///
    /// ```no_run
    /// # let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// # let memfd = dmabuf_p2p::memfd::Memfd::new("doc", 0x10000)?;
    /// # use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
    /// # let mut map = ioas.map_file(&memfd, dmabuf_p2p::ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::Read)?;
    /// assert_eq!(map.perms(), MapPerms::Read);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn perms(&self) -> MapPerms {
        self.perms
    }

    /// Whether the area is currently mapped (false after
    /// [`IoasMapping::unmap`], or after a failed [`IoasMapping::remap`]).
    ///
    /// ```no_run
    /// # let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// # let memfd = dmabuf_p2p::memfd::Memfd::new("doc", 0x10000)?;
    /// # use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
    /// # let mut map = ioas.map_file(&memfd, dmabuf_p2p::ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::Read)?;
    /// assert!(map.is_mapped());
    /// map.unmap()?;
    /// assert!(!map.is_mapped());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    /// The dma-buf it maps (the caller's [`DmaBuf`], shared),
    /// or `None` if it maps a memfd or user memory.
    ///
    /// ```no_run
    /// # let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// # let memfd = dmabuf_p2p::memfd::Memfd::new("doc", 0x10000)?;
    /// # use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
    /// # let mut map = ioas.map_file(&memfd, dmabuf_p2p::ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::Read)?;
    /// assert!(map.dmabuf().is_none()); // a memfd
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn dmabuf(&self) -> Option<&DmaBuf> {
        match &self.source {
            Source::DmaBuf { buf, .. } => Some(buf),
            _ => None,
        }
    }

    /// The source file's fd the mapping holds (memfd or
    /// dma-buf); `None` for user memory.
    ///
    /// ```no_run
    /// # let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// # let memfd = dmabuf_p2p::memfd::Memfd::new("doc", 0x10000)?;
    /// # use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
    /// # let mut map = ioas.map_file(&memfd, dmabuf_p2p::ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::Read)?;
    /// assert!(map.source_fd().is_some());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn source_fd(&self) -> Option<BorrowedFd<'_>> {
        self.source.file().map(|(fd, _)| fd)
    }

    /// The byte offset in the source file, or the user address for user
    /// memory.
    ///
    /// ```no_run
    /// # let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// # let memfd = dmabuf_p2p::memfd::Memfd::new("doc", 0x10000)?;
    /// # use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
    /// # let mut map = ioas.map_file(&memfd, dmabuf_p2p::ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::Read)?;
    /// assert_eq!(map.source_offset(), 0);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn source_offset(&self) -> u64 {
        match self.source {
            Source::File { start, .. } | Source::DmaBuf { start, .. } => start,
            Source::User { addr } => addr as u64,
        }
    }

    /// Unmaps the area now (`IOMMU_IOAS_UNMAP`) and returns the bytes the
    /// kernel unmapped. Idempotent: on an unmapped handle it returns 0. On an
    /// error the area stays mapped and owned by this handle (drop retries).
    /// A revoked dma-buf area unmaps normally.
    ///
    /// ```no_run
    /// # let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// # let memfd = dmabuf_p2p::memfd::Memfd::new("doc", 0x10000)?;
    /// # use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
    /// # let mut map = ioas.map_file(&memfd, dmabuf_p2p::ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::Read)?;
    /// assert_eq!(map.unmap()?, 0x10000);
    /// assert_eq!(map.unmap()?, 0); // already unmapped
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    #[inline]
    pub fn unmap(&mut self) -> Result<u64> {
        if !self.mapped {
            return Ok(0);
        }
        let n = ioctl::iommu_ioas_unmap(
            self.ioas.iommufd().as_fd(),
            self.ioas.id(),
            self.iova,
            self.length,
        )
        .map_err(|e| self.error("IOMMU_IOAS_UNMAP", e))?;
        self.mapped = false;
        self.ioas
            .placement()
            .record_unmapped(self.iova, self.length);
        Ok(n)
    }

    /// [`IoasMapping::unmap`] for drop, out of line: dropping an unmapped
    /// handle runs no more than a test.
    #[inline(never)]
    fn unmap_quietly(&mut self) {
        let _ = self.unmap();
    }

    /// Maps the same source again at the same IOVA (fixed), unmapping first
    /// if still mapped: the way to restore a dma-buf area after its exporter
    /// revoked and then restored the buffer. If the new map fails, the handle
    /// stays unmapped ([`IoasMapping::is_mapped`] is false) and the error
    /// says why ([`Error::Revoked`] while the exporter still revokes).
    ///
    /// ```no_run
    /// # let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// # let memfd = dmabuf_p2p::memfd::Memfd::new("doc", 0x10000)?;
    /// # use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
    /// # let mut map = ioas.map_file(&memfd, dmabuf_p2p::ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::Read)?;
    /// let iova = map.iova();
    /// map.remap()?;
    /// assert_eq!(map.iova(), iova);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn remap(&mut self) -> Result<()> {
        // No automatic placement in this IOAS may take the IOVA between the
        // unmap and the map (the map is fixed, so it does not lock again).
        let ioas = self.ioas.clone();
        let _placing = ioas.placement().lock();
        self.map_again_at(self.iova)
    }

    /// Maps the same source at another fixed IOVA, unmapping first if
    /// still mapped: a VMM's BAR the guest moved, without building a new
    /// handle. If the map fails, the handle stays unmapped.
    #[inline]
    pub(crate) fn map_again_at(&mut self, iova: u64) -> Result<()> {
        if self.mapped {
            self.unmap()?;
        }
        self.iova = iova;
        // SAFETY: a file source maps kernel-owned pages; for user memory the
        // contract of `Ioas::map_user` covers device access until this
        // handle is dropped, remaps included, at whatever IOVA.
        unsafe { self.map_at(IovaPlacement::Fixed(iova)) }
    }

    /// Issues the map ioctl for this handle's source at `at`, and records the
    /// IOVA on success.
    ///
    /// # Safety
    ///
    /// For a user-memory source, the memory must be valid for device access
    /// as [`Ioas::map_user`] requires.
    #[inline(always)]
    unsafe fn map_at(&mut self, at: IovaPlacement) -> Result<()> {
        // A fixed IOVA is one ioctl, inlined into the caller; automatic
        // placement picks first.
        if let IovaPlacement::Fixed(_) = at {
            // SAFETY: as for this function.
            return match unsafe { self.issue_map(at) } {
                Ok(got) => {
                    self.mapped_at(got);
                    Ok(())
                }
                Err((op, e)) => Err(self.map_error(op, at, e)),
            };
        }
        // SAFETY: as for this function.
        unsafe { self.map_placed(at) }
    }

    /// [`IoasMapping::map_at`] for automatic placement.
    ///
    /// # Safety
    ///
    /// As for [`IoasMapping::map_at`].
    unsafe fn map_placed(&mut self, at: IovaPlacement) -> Result<()> {
        let ioas = self.ioas.clone();
        let placement = ioas.placement();
        let _placing = (at == IovaPlacement::Auto).then(|| placement.lock());
        let this = &*self;
        let req = || match (&this.source, this.phys) {
            (_, Some(phys)) => placement.request(this.length, phys, true),
            // A dma-buf iommufd imports is a VFIO BAR range (or the selftest
            // mock): device memory, contiguous; a BAR's physical start is
            // aligned to its size, so its offset in the buffer stands in.
            (Source::DmaBuf { start, .. }, None) => placement.request(this.length, *start, true),
            (Source::File { start, .. }, None) => placement.request(this.length, *start, false),
            (Source::User { addr }, None) => placement.request(this.length, *addr as u64, false),
        };
        // SAFETY: for a user-memory source the caller guarantees the memory
        // may be handed to devices (see `# Safety`); file sources map
        // kernel-owned pages.
        let issue = |at: IovaPlacement| unsafe { this.issue_map(at) };
        let usable = || ioas.iova_ranges().ok();
        match placement.place(at, usable, req, issue) {
            Ok(got) => {
                self.mapped_at(got);
                Ok(())
            }
            Err((at, op, e)) => {
                self.iova = at.iova();
                Err(self.map_error(op, at, e))
            }
        }
    }

    /// Records a map at `iova` that succeeded.
    #[inline]
    fn mapped_at(&mut self, iova: u64) {
        self.iova = iova;
        self.mapped = true;
        self.ioas.placement().record_mapped(iova, self.length);
    }

    /// One map ioctl of this handle's source at `at`: the IOVA it got.
    ///
    /// # Safety
    ///
    /// As for [`IoasMapping::map_at`].
    #[inline(always)]
    unsafe fn issue_map(&self, at: IovaPlacement) -> MapResult {
        let (iova, placement) = at.to_arg();
        let flags = placement | self.perms.flags();
        let iommufd = self.ioas.iommufd().as_fd();
        match (&self.source, self.source.file()) {
            (Source::User { addr }, _) => {
                let arg = sys::iommu_ioas_map {
                    flags,
                    ioas_id: self.ioas.id(),
                    user_va: *addr as u64,
                    length: self.length,
                    iova,
                    ..Default::default()
                };
                // SAFETY: the caller guarantees the user memory may be handed
                // to devices (see `# Safety`).
                unsafe { ioctl::iommu_ioas_map(iommufd, &arg) }.map_err(|e| ("IOMMU_IOAS_MAP", e))
            }
            (_, Some((fd, start))) => {
                let arg = sys::iommu_ioas_map_file {
                    flags,
                    ioas_id: self.ioas.id(),
                    fd: fd.as_raw_fd(),
                    start,
                    length: self.length,
                    iova,
                    ..Default::default()
                };
                ioctl::iommu_ioas_map_file(iommufd, &arg).map_err(|e| ("IOMMU_IOAS_MAP_FILE", e))
            }
            (_, None) => Err((
                "IOMMU_IOAS_MAP_FILE",
                io::Error::from_raw_os_error(libc::EBADF),
            )),
        }
    }

    /// Turns a failed map into the most specific error.
    #[cold]
    fn map_error(&self, op: &'static str, at: IovaPlacement, e: io::Error) -> Error {
        let dmabuf = self.dmabuf();
        match e.raw_os_error() {
            Some(libc::ENODEV) if dmabuf.is_some() => Error::Revoked {
                buffer: self.source.describe(),
                source: Some(e),
            },
            Some(libc::EOPNOTSUPP) if dmabuf.is_some() => Error::NotImportable {
                buffer: self.source.describe(),
                problem: why_not_importable(dmabuf),
                source: e,
            },
            _ => match self.placement_error(at, &e) {
                Some(err) => err,
                None => self.error(op, e),
            },
        }
    }

    /// [`Error::InvalidIova`] for a map or copy to `at` that failed because
    /// of the IOVA (taken, no room, overflowing, or at a fixed IOVA
    /// misaligned or reserved), or `None` if the errno says something else.
    fn placement_error(&self, at: IovaPlacement, e: &io::Error) -> Option<Error> {
        let invalid_iova = |problem: String| {
            Some(Error::InvalidIova {
                ioas: self.ioas.id(),
                iova: at.iova(),
                length: self.length,
                problem,
                source: e.raw_os_error().map(io::Error::from_raw_os_error),
            })
        };
        match e.raw_os_error() {
            Some(libc::EEXIST) => invalid_iova("overlaps an existing mapping (EEXIST)".to_owned()),
            Some(libc::ENOSPC) => {
                invalid_iova("no free IOVA range of this length (ENOSPC)".to_owned())
            }
            Some(libc::EOVERFLOW) => invalid_iova("IOVA + length overflows (EOVERFLOW)".to_owned()),
            Some(libc::EINVAL) => match at {
                IovaPlacement::Fixed(iova) => {
                    let why = match self.ioas.iova_ranges() {
                        Ok(r) => r.problem_with(iova, self.length),
                        Err(_) => None,
                    };
                    let why = why.unwrap_or_else(|| {
                        "misaligned, reserved or not allowed (the usable ranges could not be asked)"
                            .to_owned()
                    });
                    invalid_iova(format!("{why} (EINVAL)"))
                }
                IovaPlacement::Auto => None,
            },
            _ => None,
        }
    }

    /// [`Error::Sys`] naming this mapping.
    fn error(&self, op: &'static str, e: io::Error) -> Error {
        Error::sys(op, self.to_string(), e)
    }
}

impl fmt::Display for IoasMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = u128::from(self.iova) + u128::from(self.length);
        write!(
            f,
            "IOAS {} IOVA {:#x}..{end:#x} <- {}",
            self.ioas.id(),
            self.iova,
            self.source.describe()
        )?;
        if let Some((_, start)) = self.source.file() {
            write!(f, " @ {start:#x}")?;
        }
        Ok(())
    }
}

impl Drop for IoasMapping {
    #[inline]
    fn drop(&mut self) {
        // A failure cannot be reported from drop; the area then goes away
        // with the IOAS (destroyed with the last handle) or the iommufd.
        if self.mapped {
            self.unmap_quietly();
        }
    }
}

/// The `exp_name` of VFIO PCI dma-bufs in fdinfo.
const VFIO_EXPORTER: &str = "vfio_pci_core";

/// Why iommufd refused a dma-buf with `EOPNOTSUPP`, decided by the exporter
/// name in fdinfo.
fn why_not_importable(buf: Option<&DmaBuf>) -> String {
    let exp = buf.and_then(|b| b.fdinfo().ok()).map(|i| i.exp_name);
    match exp.as_deref() {
        Some(VFIO_EXPORTER) => {
            "a VFIO dma-buf with more than one range: iommufd imports single-range \
                                VFIO dma-bufs only; export each range separately"
                .to_owned()
        }
        Some(other) => format!(
            "exported by {other}, not by VFIO PCI: iommufd imports only VFIO P2P dma-bufs \
             (for memfd-backed buffers, map the memfd itself)"
        ),
        None => "not a VFIO PCI dma-buf (exporter unknown)".to_owned(),
    }
}

/// The size of a file (`fstat`'s `st_size`).
fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let st = nix::sys::stat::fstat(fd)?;
    u64::try_from(st.st_size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_flags() {
        assert_eq!(
            MapPerms::ReadWrite.flags(),
            sys::IOMMU_IOAS_MAP_READABLE | sys::IOMMU_IOAS_MAP_WRITEABLE
        );
    }
}
