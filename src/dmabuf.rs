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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::error::{Error, RangeProblem, Result};
use crate::fdinfo::FdInfo;
pub use crate::mapping::Mapping;
use crate::range::ByteRange;
use crate::range::{human_size, page_size};
use crate::shared_fd::SharedFd;
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
    let st = nix::sys::statfs::fstatfs(fd)
        .map_err(|e| Error::sys("fstatfs", format!("fd {}", fd.as_raw_fd()), e.into()))?;
    // `f_type` is a signed long on some targets; the magic is 32 bits.
    #[allow(clippy::cast_sign_loss, clippy::unnecessary_cast)]
    let magic = (st.filesystem_type().0 as u64) & 0xffff_ffff;
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
#[non_exhaustive]
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
    fd: SharedFd,
    size: u64,
    phys: Option<u64>,
}

impl DmaBuf {
    /// Wraps an fd the caller knows to be a dma-buf of `size` bytes (what
    /// its exporter was asked to make), without checking.
    #[inline]
    pub(crate) fn from_export(fd: OwnedFd, size: u64) -> Self {
        Self {
            fd: SharedFd::new(fd),
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
    #[inline]
    pub(crate) fn with_phys_start(mut self, phys: u64) -> Self {
        self.phys = Some(phys);
        self
    }

    /// The physical address of the first byte, when known (a single-range
    /// VFIO BAR export).
    #[inline]
    pub(crate) fn phys_start(&self) -> Option<u64> {
        self.phys
    }

    /// Another handle of the same fd (no syscall): what a mapping keeps.
    #[inline]
    pub(crate) fn share(&self) -> Self {
        Self {
            fd: self.fd.clone(),
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
    #[inline]
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
        let name = format!("mapping of {label} at {:#x}", range.offset);
        Mapping::map_shared(self.fd.as_fd(), range.offset, len, len, writable, name).map_err(
            |source| {
                if source.raw_os_error() == Some(libc::EINVAL) {
                    Error::MmapRefused {
                        buffer: label,
                        exporter: self.exporter(),
                        source,
                    }
                } else {
                    Error::sys("mmap", format!("{range} of {label}"), source)
                }
            },
        )
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
            .as_fd()
            .try_clone_to_owned()
            .map(|fd| Self {
                fd: SharedFd::new(fd),
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
        match self.fd.into_owned() {
            Ok(fd) => Ok(fd),
            Err(shared) => shared.as_fd().try_clone_to_owned().map_err(|e| {
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
    nix::unistd::lseek(fd, 0, nix::unistd::Whence::SeekEnd)
        .map(i64::unsigned_abs)
        .map_err(|e| {
            Error::sys(
                "lseek(SEEK_END)",
                format!("dma-buf fd {}", fd.as_raw_fd()),
                e.into(),
            )
        })
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
            None => PollTimeout::NONE,
            Some(t) => PollTimeout::try_from(t.as_millis()).unwrap_or(PollTimeout::MAX),
        };
        let mut pfd = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(&mut pfd, ms) {
                Ok(n) => {
                    let ready = pfd[0]
                        .revents()
                        .is_some_and(|r| r.contains(PollFlags::POLLIN));
                    return Ok(n > 0 && ready);
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(Error::sys(
                        "poll",
                        format!("sync_file fd {}", self.0.as_raw_fd()),
                        e.into(),
                    ));
                }
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
    #[inline]
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

#[cfg(test)]
mod tests {
    use super::*;

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
