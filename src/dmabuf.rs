//! [`DmaBuf`]: an owned dma-buf file descriptor, and what the dma-buf core
//! offers on it (uAPI reference A): size, fdinfo, name, CPU-access sync,
//! sync_file export/import and `mmap`.
//!
//! * [`DmaBuf`] owns the fd. Exporters ([`crate::exporter`]) create it; an fd
//!   of unknown origin becomes one through [`TryFrom<OwnedFd>`], which checks
//!   `fstatfs` (`DMA_BUF_MAGIC`) and hands the fd back on failure.
//! * [`CpuAccessGuard`] brackets CPU access: `DMA_BUF_IOCTL_SYNC` START when
//!   made, END when dropped.
//! * [`SyncFile`] owns a sync_file fd (a fence snapshot).
//! * [`Mapping`] owns an `mmap` of a buffer (or of a memfd) and unmaps it when
//!   dropped. Its memory can be changed by devices at any time, so it hands out
//!   no Rust references into it: access is by volatile copies and raw pointers.
//!
//! Every error names the buffer (exporter, size, name and fd number, from
//! fdinfo) and carries the kernel's errno.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, RangeProblem, Result};
use crate::fdinfo::FdInfo;
use crate::range::ByteRange;
use crate::range::page_size;
use crate::{ioctl, sys};

/// The longest name `DMA_BUF_SET_NAME` accepts, in bytes (`DMA_BUF_NAME_LEN`
/// minus the NUL).
pub const MAX_NAME_LEN: usize = sys::DMA_BUF_NAME_LEN as usize - 1;

/// Whether `fd` is a dma-buf: `fstatfs(fd).f_type == DMA_BUF_MAGIC`, the
/// definitive check (uAPI reference A.1). A failing `fstatfs` (a closed fd)
/// is [`Error::Sys`].
///
/// ```
/// use std::os::fd::AsFd;
/// let f = std::fs::File::open("/proc/self/status")?;
/// assert!(!dmabuf_p2p::dmabuf::is_dmabuf(f.as_fd())?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn is_dmabuf(fd: BorrowedFd<'_>) -> Result<bool> {
    Ok(fs_magic(fd)? == u64::from(sys::DMA_BUF_MAGIC))
}

/// `fstatfs(fd).f_type`, as the 32-bit magic the kernel stores.
pub(crate) fn fs_magic(fd: BorrowedFd<'_>) -> Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `st` is valid for writes of one `statfs`, which fstatfs fills;
    // `fd` is open for the call.
    let ret = unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) };
    if ret < 0 {
        return Err(Error::last_os("fstatfs", || {
            format!("fd {}", fd.as_raw_fd())
        }));
    }
    // SAFETY: fstatfs succeeded, so it initialised the struct (and it was
    // zeroed before, which is a valid `statfs` too: integers only).
    let st = unsafe { st.assume_init() };
    // `f_type` is a signed long on some targets; the magic is 32 bits.
    #[allow(clippy::cast_sign_loss, clippy::unnecessary_cast)]
    let magic = (st.f_type as u64) & 0xffff_ffff;
    Ok(magic)
}

/// A readable name for a few filesystem magics, for error messages.
fn fs_name(magic: u64) -> &'static str {
    match magic {
        0x444d_4142 => "dmabuf",
        0x0102_1994 => "tmpfs/shmem",
        0x9584_58f6 => "hugetlbfs",
        0x5049_5045 => "pipefs",
        0x534f_434b => "sockfs",
        0x0904_1934 => "anon_inode_fs",
        0x9fa0 => "proc",
        0x6265_6572 => "sysfs",
        0x1cd1 => "devpts",
        0xef53 => "ext2/3/4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0x794c_7630 => "overlayfs",
        _ => "another filesystem",
    }
}

/// Bytes as text: `64 KiB`, `2 MiB`, or `12345 bytes`.
pub(crate) fn human_size(n: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match n {
        0 => "0 bytes".to_owned(),
        n if n % GIB == 0 => format!("{} GiB", n / GIB),
        n if n % MIB == 0 => format!("{} MiB", n / MIB),
        n if n % KIB == 0 => format!("{} KiB", n / KIB),
        n => format!("{n} bytes"),
    }
}

/// The direction of CPU access, for [`DmaBuf::begin_cpu_access`] and the
/// sync_file calls (`DMA_BUF_SYNC_READ` / `WRITE` / `RW`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// The CPU reads (`DMA_BUF_SYNC_READ`).
    Read,
    /// The CPU writes (`DMA_BUF_SYNC_WRITE`).
    Write,
    /// Both (`DMA_BUF_SYNC_RW`).
    ReadWrite,
}

impl Access {
    /// The `DMA_BUF_SYNC_*` direction bits.
    ///
    /// ```
    /// use dmabuf_p2p::dmabuf::Access;
    /// assert_eq!(Access::ReadWrite.bits(), Access::Read.bits() | Access::Write.bits());
    /// ```
    pub const fn bits(self) -> u32 {
        match self {
            Self::Read => sys::DMA_BUF_SYNC_READ,
            Self::Write => sys::DMA_BUF_SYNC_WRITE,
            Self::ReadWrite => sys::DMA_BUF_SYNC_RW,
        }
    }

    const fn sync_op(self, end: bool) -> &'static str {
        match (self, end) {
            (Self::Read, false) => "DMA_BUF_IOCTL_SYNC(START|READ)",
            (Self::Write, false) => "DMA_BUF_IOCTL_SYNC(START|WRITE)",
            (Self::ReadWrite, false) => "DMA_BUF_IOCTL_SYNC(START|RW)",
            (Self::Read, true) => "DMA_BUF_IOCTL_SYNC(END|READ)",
            (Self::Write, true) => "DMA_BUF_IOCTL_SYNC(END|WRITE)",
            (Self::ReadWrite, true) => "DMA_BUF_IOCTL_SYNC(END|RW)",
        }
    }

    const fn export_op(self) -> &'static str {
        match self {
            Self::Read => "DMA_BUF_IOCTL_EXPORT_SYNC_FILE(READ)",
            Self::Write => "DMA_BUF_IOCTL_EXPORT_SYNC_FILE(WRITE)",
            Self::ReadWrite => "DMA_BUF_IOCTL_EXPORT_SYNC_FILE(RW)",
        }
    }

    const fn import_op(self) -> &'static str {
        match self {
            Self::Read => "DMA_BUF_IOCTL_IMPORT_SYNC_FILE(READ)",
            Self::Write => "DMA_BUF_IOCTL_IMPORT_SYNC_FILE(WRITE)",
            Self::ReadWrite => "DMA_BUF_IOCTL_IMPORT_SYNC_FILE(RW)",
        }
    }
}

/// What `/proc/self/fdinfo/<fd>` says about a dma-buf fd (uAPI reference
/// A.3): the generic lines and the dma-buf ones, flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DmaBufFdInfo {
    /// The per-boot unique dma-buf number (`ino:`, also `fstat`'s `st_ino`).
    pub ino: u64,
    /// File status flags (`flags:`), including `O_CLOEXEC` if set on the fd.
    pub flags: u32,
    /// Buffer size in bytes (`size:`).
    pub size: u64,
    /// File references: fds, mappings and importers (`count:`).
    pub count: u64,
    /// The exporter (`exp_name:`): `udmabuf`, a heap name such as `system`,
    /// `vfio_pci_core`, ...
    pub exp_name: String,
    /// The name set with [`DmaBuf::set_name`] (`name:`), if any.
    pub name: Option<String>,
}

impl DmaBufFdInfo {
    /// Whether the fd is close-on-exec.
    pub const fn is_cloexec(&self) -> bool {
        self.flags & (libc::O_CLOEXEC as u32) != 0
    }
}

/// An owned dma-buf fd, with the buffer's size (recorded when the buffer
/// was made or adopted, so that asking costs no syscall).
///
/// The fd is reference-counted: an iommufd mapping of the buffer
/// ([`IoasMapping`](crate::importer::iommufd::IoasMapping)) holds it too, so
/// that it can map the buffer again after a revocation. The fd is closed
/// when the `DmaBuf` and every mapping holding it are gone; dropping the
/// `DmaBuf` alone leaves the mappings working.
///
/// ```no_run
/// use dmabuf_p2p::exporter::heap::DmaHeap;
/// use dmabuf_p2p::dmabuf::Access;
///
/// let buf = DmaHeap::open("system")?.alloc(64 << 10)?;
/// buf.set_name("frames")?;
/// assert_eq!(buf.size()?, 64 << 10);
/// let mut map = buf.mmap()?;
/// {
///     let _cpu = buf.begin_cpu_access(Access::Write)?;
///     map.write(0, b"hello")?;
/// } // END here
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug)]
pub struct DmaBuf {
    fd: Arc<OwnedFd>,
    size: u64,
    phys: Option<u64>,
}

impl DmaBuf {
    /// Wraps an fd the caller knows to be a dma-buf of `size` bytes (what
    /// its exporter was asked to make), without checking.
    pub(crate) fn from_export(fd: OwnedFd, size: u64) -> Self {
        Self {
            fd: Arc::new(fd),
            size,
            phys: None,
        }
    }

    /// Wraps an fd the caller knows to be a dma-buf, without checking it,
    /// asking its size once (`lseek(SEEK_END)`). Use [`TryFrom<OwnedFd>`]
    /// (checks `fstatfs`) for fds of unknown origin.
    pub(crate) fn from_owned_unchecked(fd: OwnedFd) -> Result<Self> {
        let size = seek_size(fd.as_fd())?;
        Ok(Self::from_export(fd, size))
    }

    /// Records the physical address of the buffer's first byte (a
    /// single-range BAR export), for IOVA placement.
    pub(crate) fn with_phys_start(mut self, phys: u64) -> Self {
        self.phys = Some(phys);
        self
    }

    /// The physical address of the first byte, when known (a single-range
    /// VFIO BAR export).
    pub(crate) fn phys_start(&self) -> Option<u64> {
        self.phys
    }

    /// Another handle of the same fd (no syscall): what a mapping keeps.
    pub(crate) fn share(&self) -> Self {
        Self {
            fd: Arc::clone(&self.fd),
            size: self.size,
            phys: self.phys,
        }
    }

    /// Names the buffer for messages: `udmabuf dma-buf fd 5 (64 KiB)`, with
    /// its name if set; just `dma-buf fd 5` if fdinfo cannot be read.
    ///
    /// ```no_run
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?;
    /// assert!(buf.describe().starts_with("system dma-buf fd "));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn describe(&self) -> String {
        let raw = self.fd.as_raw_fd();
        match self.fdinfo() {
            Ok(i) => match i.name {
                Some(name) => format!(
                    "{} dma-buf {name:?} fd {raw} ({})",
                    i.exp_name,
                    human_size(i.size)
                ),
                None => format!("{} dma-buf fd {raw} ({})", i.exp_name, human_size(i.size)),
            },
            Err(_) => format!("dma-buf fd {raw}"),
        }
    }

    /// The exporter's name from fdinfo, or `"unknown"`.
    fn exporter(&self) -> String {
        self.fdinfo()
            .map_or_else(|_| "unknown".to_owned(), |i| i.exp_name)
    }

    /// The buffer size in bytes, as recorded when the buffer was made (the
    /// size its exporter was asked for) or adopted ([`TryFrom<OwnedFd>`]
    /// asks `lseek(fd, 0, SEEK_END)`, which a dma-buf answers with its size,
    /// uAPI reference A.4). A dma-buf's size never changes. No syscall;
    /// never fails (the `Result` is kept for compatibility).
    ///
    /// ```no_run
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(5000)?;
    /// assert_eq!(buf.size()?, 8192); // rounded up to a page
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn size(&self) -> Result<u64> {
        Ok(self.size)
    }

    /// The parsed fdinfo of this fd. A file without the dma-buf lines (which a
    /// checked `DmaBuf` cannot be) is [`Error::NotDmaBuf`].
    ///
    /// ```no_run
    /// use std::os::fd::AsFd;
    /// use dmabuf_p2p::exporter::udmabuf::Udmabuf;
    /// use dmabuf_p2p::memfd::Memfd;
    ///
    /// let memfd = Memfd::new("pages", 64 << 10)?;
    /// let buf = Udmabuf::open()?.create(memfd.as_fd(), 0, 64 << 10)?;
    /// let info = buf.fdinfo()?;
    /// assert_eq!((info.exp_name.as_str(), info.size), ("udmabuf", 64 << 10));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn fdinfo(&self) -> Result<DmaBufFdInfo> {
        let info = FdInfo::of_fd(&self.fd)?;
        let Some(d) = info.dmabuf else {
            return Err(Error::NotDmaBuf {
                fd: self.fd.as_raw_fd(),
                problem: "its fdinfo has no exp_name line".to_owned(),
            });
        };
        Ok(DmaBufFdInfo {
            ino: info.ino,
            flags: info.flags,
            size: d.size,
            count: d.count,
            exp_name: d.exp_name,
            name: d.name,
        })
    }

    /// Names the buffer (`DMA_BUF_SET_NAME`); the name shows in fdinfo
    /// (`name:`) and `/proc/self/fd` (`/dmabuf:<name>`). It may be changed at
    /// any time.
    ///
    /// A name longer than [`MAX_NAME_LEN`] (31) bytes or containing a NUL byte
    /// is [`Error::InvalidName`], checked before the ioctl.
    ///
    /// ```no_run
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?;
    /// buf.set_name("camera0 frame")?;
    /// assert_eq!(buf.fdinfo()?.name.as_deref(), Some("camera0 frame"));
    /// assert!(buf.set_name(&"x".repeat(32)).is_err());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn set_name(&self, name: &str) -> Result<()> {
        let cname = check_name(name).map_err(|problem| Error::InvalidName {
            buffer: self.describe(),
            name: name.to_owned(),
            problem,
        })?;
        ioctl::dma_buf_set_name(self.fd.as_fd(), &cname).map_err(|e| {
            Error::sys(
                "DMA_BUF_SET_NAME",
                format!("{} to {name:?}", self.describe()),
                e,
            )
        })
    }

    /// Begins CPU access (`DMA_BUF_IOCTL_SYNC` START) and returns a guard that
    /// ends it (END, same direction) when dropped. Between the two, the CPU
    /// sees what devices wrote and its writes reach devices afterwards. The
    /// kernel's `EINTR`/`EAGAIN` are retried.
    ///
    /// ```no_run
    /// use dmabuf_p2p::dmabuf::Access;
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?;
    /// let map = buf.mmap()?;
    /// let guard = buf.begin_cpu_access(Access::Read)?;
    /// let bytes = map.to_vec();
    /// guard.end()?; // or just drop it
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn begin_cpu_access(&self, access: Access) -> Result<CpuAccessGuard<'_>> {
        self.sync_start(access)?;
        Ok(CpuAccessGuard {
            buf: self,
            access,
            ended: false,
        })
    }

    /// Raw `DMA_BUF_IOCTL_SYNC` START, without a guard. Prefer
    /// [`DmaBuf::begin_cpu_access`]; the kernel does not track pairing.
    ///
    /// ```no_run
    /// use dmabuf_p2p::dmabuf::Access;
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?;
    /// buf.sync_start(Access::Write)?;
    /// buf.sync_end(Access::Write)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn sync_start(&self, access: Access) -> Result<()> {
        let flags = u64::from(sys::DMA_BUF_SYNC_START | access.bits());
        ioctl::dma_buf_sync(self.fd.as_fd(), flags)
            .map_err(|e| Error::sys(access.sync_op(false), self.describe(), e))
    }

    /// Raw `DMA_BUF_IOCTL_SYNC` END, without a guard. udmabuf answers an END
    /// before any START with `EINVAL` ([`Error::Sys`]).
    ///
    /// ```no_run
    /// use dmabuf_p2p::dmabuf::Access;
    /// use dmabuf_p2p::{exporter::udmabuf::Udmabuf, memfd::Memfd};
    /// use std::os::fd::AsFd;
    /// let memfd = Memfd::new("pages", 4096)?;
    /// let buf = Udmabuf::open()?.create(memfd.as_fd(), 0, 4096)?;
    /// assert_eq!(buf.sync_end(Access::Read).unwrap_err().raw_os_error(), Some(libc::EINVAL));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn sync_end(&self, access: Access) -> Result<()> {
        let flags = u64::from(sys::DMA_BUF_SYNC_END | access.bits());
        ioctl::dma_buf_sync(self.fd.as_fd(), flags)
            .map_err(|e| Error::sys(access.sync_op(true), self.describe(), e))
    }

    /// Exports the buffer's current fences as a sync_file
    /// (`DMA_BUF_IOCTL_EXPORT_SYNC_FILE`): for [`Access::Read`] the fences a
    /// reader must wait for (writers), otherwise all fences. With no fences
    /// it is an already-signalled stub.
    ///
    /// ```no_run
    /// use dmabuf_p2p::dmabuf::Access;
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?;
    /// let fence = buf.export_sync_file(Access::Write)?;
    /// assert!(fence.is_signaled()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn export_sync_file(&self, access: Access) -> Result<SyncFile> {
        ioctl::dma_buf_export_sync_file(self.fd.as_fd(), access.bits())
            .map(SyncFile)
            .map_err(|e| Error::sys(access.export_op(), self.describe(), e))
    }

    /// Adds the fence of `sync_file` to the buffer
    /// (`DMA_BUF_IOCTL_IMPORT_SYNC_FILE`): as a read fence for
    /// [`Access::Read`], as a write fence otherwise. An fd that is not a
    /// sync_file gives `EINVAL`.
    ///
    /// ```no_run
    /// use dmabuf_p2p::dmabuf::Access;
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?;
    /// let fence = buf.export_sync_file(Access::Read)?;
    /// buf.import_sync_file(Access::Write, &fence)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn import_sync_file(&self, access: Access, sync_file: &SyncFile) -> Result<()> {
        ioctl::dma_buf_import_sync_file(self.fd.as_fd(), access.bits(), sync_file.0.as_fd())
            .map_err(|e| {
                Error::sys(
                    access.import_op(),
                    format!(
                        "{} with sync_file fd {}",
                        self.describe(),
                        sync_file.0.as_raw_fd()
                    ),
                    e,
                )
            })
    }

    /// Maps the whole buffer read-write (`MAP_SHARED`). See [`Mapping`].
    ///
    /// An exporter without mmap support (VFIO dma-bufs in Linux 7.2) gives
    /// [`Error::MmapRefused`].
    ///
    /// ```no_run
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?;
    /// let mut map = buf.mmap()?;
    /// map.write(10, &[1, 2, 3])?;
    /// let mut back = [0; 3];
    /// map.read(10, &mut back)?;
    /// assert_eq!(back, [1, 2, 3]);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn mmap(&self) -> Result<Mapping> {
        let size = self.size()?;
        self.mmap_range(ByteRange::new(0, size), true)
    }

    /// Maps `range` of the buffer, read-write if `writable` (the fd must then
    /// be open for writing) or read-only. The offset must be page-aligned and
    /// the range non-empty and inside the buffer ([`Error::InvalidRange`]);
    /// refusal by the exporter (`EINVAL`) is [`Error::MmapRefused`]; other
    /// failures (`EACCES` for a writable map of a read-only buffer, `ENOMEM`)
    /// are [`Error::Sys`].
    ///
    /// ```no_run
    /// use dmabuf_p2p::ByteRange;
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(16384)?;
    /// let second_page = buf.mmap_range(ByteRange::new(4096, 4096), false)?;
    /// assert_eq!(second_page.len(), 4096);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn mmap_range(&self, range: ByteRange, writable: bool) -> Result<Mapping> {
        let size = self.size()?;
        let bad = |problem| Error::InvalidRange {
            target: self.describe(),
            range,
            problem,
        };
        range.check_in(size, 1).map_err(bad)?;
        if !range.offset.is_multiple_of(page_size()) {
            return Err(bad(RangeProblem::Unaligned { align: page_size() }));
        }
        let len = usize::try_from(range.length).map_err(|_| bad(RangeProblem::Overflow))?;
        let label = self.describe();
        Mapping::map_fd(self.fd.as_fd(), range.offset, len, writable, &label).map_err(|source| {
            if source.raw_os_error() == Some(libc::EINVAL) {
                Error::MmapRefused {
                    buffer: label,
                    exporter: self.exporter(),
                    source,
                }
            } else {
                Error::sys("mmap", format!("{range} of {label}"), source)
            }
        })
    }

    /// A second fd for the same buffer (`F_DUPFD_CLOEXEC`).
    ///
    /// ```no_run
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?;
    /// let twin = buf.try_clone()?;
    /// assert_eq!(twin.fdinfo()?.ino, buf.fdinfo()?.ino);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn try_clone(&self) -> Result<Self> {
        self.fd
            .try_clone()
            .map(|fd| Self {
                fd: Arc::new(fd),
                size: self.size,
                phys: self.phys,
            })
            .map_err(|e| Error::sys("fcntl(F_DUPFD_CLOEXEC)", self.describe(), e))
    }

    /// The fd, as an [`OwnedFd`] of the caller's own: the fd itself if no
    /// mapping holds it, otherwise a duplicate (`F_DUPFD_CLOEXEC`), which
    /// can fail ([`Error::Sys`], e.g. `EMFILE`). Also `OwnedFd::try_from`.
    ///
    /// ```no_run
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?;
    /// let fd: std::os::fd::OwnedFd = buf.into_owned_fd()?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn into_owned_fd(self) -> Result<OwnedFd> {
        match Arc::try_unwrap(self.fd) {
            Ok(fd) => Ok(fd),
            Err(shared) => shared.try_clone().map_err(|e| {
                Error::sys(
                    "fcntl(F_DUPFD_CLOEXEC)",
                    format!("dma-buf fd {}", shared.as_raw_fd()),
                    e,
                )
            }),
        }
    }
}

/// A dma-buf's size: `lseek(fd, 0, SEEK_END)` (uAPI reference A.4).
fn seek_size(fd: BorrowedFd<'_>) -> Result<u64> {
    // SAFETY: lseek on an open fd; no memory is involved.
    let ret = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(Error::sys(
            "lseek(SEEK_END)",
            format!("dma-buf fd {}", fd.as_raw_fd()),
            e,
        ));
    }
    Ok(ret.unsigned_abs())
}

/// Checks a dma-buf name; the problem as text if it is unusable.
fn check_name(name: &str) -> Result<std::ffi::CString, String> {
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{} bytes long, the kernel takes at most {MAX_NAME_LEN}",
            name.len()
        ));
    }
    std::ffi::CString::new(name).map_err(|e| format!("contains a NUL byte at {}", e.nul_position()))
}

/// Checks `name` against the rules of [`DmaBuf::set_name`] without a buffer:
/// at most [`MAX_NAME_LEN`] bytes and no NUL. The error is
/// [`Error::InvalidName`] with an empty `buffer`.
///
/// ```
/// use dmabuf_p2p::{dmabuf::validate_name, Error};
/// assert!(validate_name("camera0").is_ok());
/// assert!(matches!(validate_name(&"n".repeat(32)), Err(Error::InvalidName { .. })));
/// assert!(matches!(validate_name("a\0b"), Err(Error::InvalidName { .. })));
/// ```
pub fn validate_name(name: &str) -> Result<()> {
    check_name(name)
        .map(drop)
        .map_err(|problem| Error::InvalidName {
            buffer: String::new(),
            name: name.to_owned(),
            problem,
        })
}

/// Ends CPU access to a [`DmaBuf`] (`DMA_BUF_IOCTL_SYNC` END) when dropped;
/// made by [`DmaBuf::begin_cpu_access`]. An END that fails on drop is
/// ignored; call [`CpuAccessGuard::end`] to see the error.
#[must_use = "CPU access ends as soon as the guard is dropped"]
#[derive(Debug)]
pub struct CpuAccessGuard<'a> {
    buf: &'a DmaBuf,
    access: Access,
    ended: bool,
}

impl CpuAccessGuard<'_> {
    /// The direction given at START.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Ends CPU access now and reports the kernel's answer.
    pub fn end(mut self) -> Result<()> {
        self.ended = true;
        self.buf.sync_end(self.access)
    }
}

impl Drop for CpuAccessGuard<'_> {
    fn drop(&mut self) {
        if !self.ended {
            // Nothing can be returned from drop; `end()` reports errors.
            let _ = self.buf.sync_end(self.access);
        }
    }
}

/// An owned sync_file fd: a snapshot of fences, from
/// [`DmaBuf::export_sync_file`] or another driver. Always close-on-exec when
/// exported by the dma-buf core.
///
/// `From<OwnedFd>` wraps any fd without checking; the kernel answers
/// `EINVAL` when a non-sync_file is imported.
#[derive(Debug)]
pub struct SyncFile(OwnedFd);

impl SyncFile {
    /// Whether every fence has signalled: `poll(POLLIN)` with no wait.
    pub fn is_signaled(&self) -> Result<bool> {
        self.wait(Some(Duration::ZERO))
    }

    /// Waits until the fences have signalled or `timeout` passes (`None`:
    /// forever); returns whether they signalled. `EINTR` is retried with the
    /// full timeout.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use dmabuf_p2p::dmabuf::Access;
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?;
    /// assert!(buf.export_sync_file(Access::Read)?.wait(Some(Duration::from_millis(10)))?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        let ms = match timeout {
            None => -1,
            Some(t) => libc::c_int::try_from(t.as_millis()).unwrap_or(libc::c_int::MAX),
        };
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: `pfd` is one valid pollfd for the call; the fd is ours.
            let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ret >= 0 {
                return Ok(ret > 0 && pfd.revents & libc::POLLIN != 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Error::sys(
                    "poll",
                    format!("sync_file fd {}", self.0.as_raw_fd()),
                    e,
                ));
            }
        }
    }
}

impl AsFd for SyncFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for SyncFile {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl From<SyncFile> for OwnedFd {
    fn from(s: SyncFile) -> Self {
        s.0
    }
}

impl From<OwnedFd> for SyncFile {
    fn from(fd: OwnedFd) -> Self {
        Self(fd)
    }
}

/// The error of `DmaBuf::try_from(OwnedFd)`: why the fd is not a dma-buf,
/// with the fd itself, so the caller gets it back ([`TryFromFdError::into_fd`]).
/// Dropping the error (or converting it into [`Error`]) closes the fd.
#[derive(Debug)]
pub struct TryFromFdError {
    fd: OwnedFd,
    error: Error,
}

impl TryFromFdError {
    /// The error ([`Error::NotDmaBuf`], or [`Error::Sys`] if `fstatfs` failed).
    pub fn error(&self) -> &Error {
        &self.error
    }

    /// Gives the fd back.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Both parts.
    pub fn into_parts(self) -> (OwnedFd, Error) {
        (self.fd, self.error)
    }
}

impl fmt::Display for TryFromFdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl std::error::Error for TryFromFdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.error)
    }
}

impl From<TryFromFdError> for Error {
    /// Keeps the error and closes the fd.
    fn from(e: TryFromFdError) -> Self {
        e.error
    }
}

impl TryFrom<OwnedFd> for DmaBuf {
    type Error = TryFromFdError;

    /// Takes `fd` if `fstatfs` says it is a dma-buf, and records its size
    /// (`lseek`); otherwise returns it inside the error.
    ///
    /// ```
    /// use std::os::fd::OwnedFd;
    /// use dmabuf_p2p::{DmaBuf, Error};
    /// let fd: OwnedFd = std::fs::File::open("/proc/self/status")?.into();
    /// let err = DmaBuf::try_from(fd).unwrap_err();
    /// assert!(matches!(err.error(), Error::NotDmaBuf { .. }));
    /// let _fd_back: OwnedFd = err.into_fd();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    fn try_from(fd: OwnedFd) -> Result<Self, TryFromFdError> {
        match fs_magic(fd.as_fd()) {
            Ok(magic) if magic == u64::from(sys::DMA_BUF_MAGIC) => match seek_size(fd.as_fd()) {
                Ok(size) => Ok(Self::from_export(fd, size)),
                Err(error) => Err(TryFromFdError { fd, error }),
            },
            Ok(magic) => {
                let raw = fd.as_raw_fd();
                let what = std::fs::read_link(format!("/proc/self/fd/{raw}"))
                    .map(|p| format!("{} ", p.display()))
                    .unwrap_or_default();
                let error = Error::NotDmaBuf {
                    fd: raw,
                    problem: format!(
                        "it is {what}on {} (filesystem magic {magic:#x})",
                        fs_name(magic)
                    ),
                };
                Err(TryFromFdError { fd, error })
            }
            Err(error) => Err(TryFromFdError { fd, error }),
        }
    }
}

impl AsFd for DmaBuf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for DmaBuf {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl TryFrom<DmaBuf> for OwnedFd {
    type Error = Error;

    /// [`DmaBuf::into_owned_fd`].
    fn try_from(b: DmaBuf) -> Result<Self> {
        b.into_owned_fd()
    }
}

/// A shared memory mapping (`mmap` with `MAP_SHARED`) of a dma-buf or memfd,
/// unmapped when dropped. The mapping holds its own reference to the file,
/// so it may outlive the [`DmaBuf`] or [`Memfd`](crate::memfd::Memfd) it
/// came from.
///
/// **The memory is shared with devices and other mappings.** A device can
/// write it at any moment (that is the point of a dma-buf), and another
/// mapping of the same buffer aliases it. Rust references (`&[u8]`,
/// `&mut [u8]`) to such memory would promise the compiler that it does not
/// change, so `Mapping` hands out none. Access is by copying in and out with
/// volatile loads and stores ([`Mapping::read`], [`Mapping::write`],
/// [`Mapping::to_vec`], [`Mapping::fill`]), which the compiler neither
/// elides nor caches, or through raw pointers ([`Mapping::as_ptr`]) for
/// callers who take on that reasoning themselves. Bracket accesses with
/// [`DmaBuf::begin_cpu_access`] so caches are coherent with devices.
///
/// ```no_run
/// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?;
/// let mut map = buf.mmap()?;
/// assert!(map.to_vec().iter().all(|&b| b == 0)); // heap memory starts zeroed
/// map.fill(0, 4096, 0xa5)?;
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    label: String,
}

// SAFETY: a Mapping is an address range owned by this value; nothing in it is
// tied to the creating thread. munmap may run on any thread.
unsafe impl Send for Mapping {}
// SAFETY: `&self` methods only read the memory with volatile loads; writes
// need `&mut self`. (Other mappings and devices may write concurrently,
// which volatile access tolerates, see the type docs.)
unsafe impl Sync for Mapping {}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .field("of", &self.label)
            .finish()
    }
}

impl Mapping {
    /// `mmap(NULL, len, PROT_READ[|PROT_WRITE], MAP_SHARED, fd, offset)`.
    pub(crate) fn map_fd(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        writable: bool,
        label: &str,
    ) -> io::Result<Self> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        if len == 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping at an address the kernel picks (NULL hint,
        // no MAP_FIXED), so no existing memory is replaced; `fd` is open.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(Self {
            ptr,
            len,
            writable,
            label: format!("mapping of {label} at {offset:#x}"),
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty mappings are not made.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the mapping was made writable.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The start address. Reading through it is sound only while the mapping
    /// lives, and only with the caveats of the type docs.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The start address, for writing (a read-only mapping faults on write).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        let range = ByteRange::new(offset as u64, len as u64);
        if len == 0 && offset <= self.len {
            return Ok(());
        }
        range
            .check_in(self.len as u64, 1)
            .map_err(|problem| Error::InvalidRange {
                target: self.label.clone(),
                range,
                problem,
            })
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::sys(
                "write",
                format!("read-only {}", self.label),
                io::Error::from_raw_os_error(libc::EACCES),
            ))
        }
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping (volatile
    /// loads). A range past the end is [`Error::InvalidRange`].
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: `check` proved `offset + buf.len() <= len`, and the mapping
        // is live and readable for `len` bytes from `ptr`.
        unsafe { volatile_read(self.ptr.as_ptr().wrapping_add(offset), buf) };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset` (volatile stores). A range
    /// past the end is [`Error::InvalidRange`]; a read-only mapping is
    /// [`Error::Sys`] with `EACCES`.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check(offset, data.len())?;
        // SAFETY: in bounds (checked), live, and mapped writable.
        unsafe { volatile_write(self.ptr.as_ptr().wrapping_add(offset), data) };
        Ok(())
    }

    /// Sets `len` bytes at `offset` to `byte` (volatile stores).
    pub fn fill(&mut self, offset: usize, len: usize, byte: u8) -> Result<()> {
        self.check_writable()?;
        self.check(offset, len)?;
        let chunk = [byte; 4096];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len());
            // SAFETY: `offset + done + n <= offset + len <= self.len`
            // (checked); live and writable.
            unsafe { volatile_write(self.ptr.as_ptr().wrapping_add(offset + done), &chunk[..n]) };
            done += n;
        }
        Ok(())
    }

    /// A copy of the whole mapping.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        // SAFETY: exactly `len` bytes from the live, readable mapping.
        unsafe { volatile_read(self.ptr.as_ptr(), &mut v) };
        v
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the range mmap returned; no Rust
        // reference into it exists (none is ever handed out), and it is
        // unmapped once.
        let _ = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Copies `dst.len()` bytes from `src` with volatile loads, 8 bytes at a time
/// where aligned.
///
/// # Safety
/// `src` must be valid for reads of `dst.len()` bytes.
unsafe fn volatile_read(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let mut i = 0;
    while i < n && (src as usize).wrapping_add(i) % 8 != 0 {
        // SAFETY: `i < n`, so in bounds by the caller's guarantee.
        dst[i] = unsafe { src.wrapping_add(i).read_volatile() };
        i += 1;
    }
    while n - i >= 8 {
        let p = src.wrapping_add(i).cast::<u64>();
        // SAFETY: `i + 8 <= n`, in bounds; `p` is 8-byte aligned (the loop
        // above aligned it and `i` advances by 8).
        let w = unsafe { p.read_volatile() };
        dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`, in bounds.
        dst[i] = unsafe { src.wrapping_add(i).read_volatile() };
        i += 1;
    }
}

/// Copies `src` to `dst` with volatile stores, 8 bytes at a time where
/// aligned.
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes.
unsafe fn volatile_write(dst: *mut u8, src: &[u8]) {
    let n = src.len();
    let mut i = 0;
    while i < n && (dst as usize).wrapping_add(i) % 8 != 0 {
        // SAFETY: `i < n`, in bounds by the caller's guarantee.
        unsafe { dst.wrapping_add(i).write_volatile(src[i]) };
        i += 1;
    }
    while n - i >= 8 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&src[i..i + 8]);
        let p = dst.wrapping_add(i).cast::<u64>();
        // SAFETY: `i + 8 <= n`, in bounds; `p` is 8-byte aligned.
        unsafe { p.write_volatile(u64::from_ne_bytes(w)) };
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`, in bounds.
        unsafe { dst.wrapping_add(i).write_volatile(src[i]) };
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 bytes");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(2 << 20), "2 MiB");
        assert_eq!(human_size(3 << 30), "3 GiB");
        assert_eq!(human_size(5000), "5000 bytes");
    }

    #[test]
    fn volatile_copies_round_trip_at_every_alignment() {
        let src: Vec<u8> = (0..64u8).collect();
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 17, 40] {
                let mut dst = vec![0u8; len];
                // SAFETY: `start + len <= 49 < 64`.
                unsafe { volatile_read(src.as_ptr().wrapping_add(start), &mut dst) };
                assert_eq!(dst, &src[start..start + len]);
                let mut out = vec![0xffu8; 64];
                // SAFETY: same bounds, in `out`.
                unsafe { volatile_write(out.as_mut_ptr().wrapping_add(start), &dst) };
                assert_eq!(&out[start..start + len], &src[start..start + len]);
                assert!(
                    out[..start]
                        .iter()
                        .chain(&out[start + len..])
                        .all(|&b| b == 0xff)
                );
            }
        }
    }

    #[test]
    fn names() {
        assert!(check_name("").is_ok());
        assert!(check_name(&"a".repeat(31)).is_ok());
        assert!(
            check_name(&"a".repeat(32))
                .unwrap_err()
                .contains("32 bytes")
        );
        assert!(check_name("a\0").unwrap_err().contains("NUL"));
    }
}
