//! udmabuf: dma-bufs over memfd pages (`/dev/udmabuf`, uAPI reference B).
//!
//! [`Udmabuf::create`] turns one page-aligned range of a memfd into a
//! dma-buf, [`Udmabuf::create_list`] several ranges (of one or more memfds)
//! into one. Both ask for a close-on-exec fd.
//!
//! The kernel's rules are checked first, so the error names the item that
//! breaks them ([`check_items`]):
//!
//! * the memfd is a regular shmem or hugetlbfs file ([`Error::Memfd`]);
//! * it has `F_SEAL_SHRINK` and neither `F_SEAL_WRITE` nor
//!   `F_SEAL_FUTURE_WRITE` ([`Error::Memfd`], naming the seal);
//! * offset and size are page-aligned, the size non-zero, the range inside
//!   the memfd ([`Error::InvalidRange`]);
//! * the list has at least one item and at most `list_limit`, the total at
//!   most `size_limit_mb` MiB ([`Error::InvalidRange`],
//!   [`Error::UdmabufLimit`]).
//!
//! Base-page alignment is enough for hugetlb memfds too.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::dmabuf::{DmaBuf, fs_magic};
use crate::error::{Error, RangeProblem, Result};
use crate::memfd::{Seals, fd_label};
use crate::range::ByteRange;
use crate::range::human_size;
use crate::range::page_size;
use crate::{ioctl, sys};

/// The udmabuf device node.
pub const DEVICE: &str = "/dev/udmabuf";
/// Where the udmabuf module parameters live.
pub const PARAMETERS: &str = "/sys/module/udmabuf/parameters";

const TMPFS_MAGIC: u64 = 0x0102_1994;
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

/// The udmabuf module's limits (`/sys/module/udmabuf/parameters/`).
///
/// ```
/// use dmabuf_p2p::exporter::udmabuf::UdmabufLimits;
/// let d = UdmabufLimits::default();
/// assert_eq!((d.list_limit, d.size_limit_mb), (1024, 64));
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdmabufLimits {
    /// Most items in one `UDMABUF_CREATE_LIST` (`list_limit`, default 1024).
    pub list_limit: u64,
    /// Most MiB in one buffer (`size_limit_mb`, default 64).
    pub size_limit_mb: u64,
}

impl Default for UdmabufLimits {
    fn default() -> Self {
        Self {
            list_limit: 1024,
            size_limit_mb: 64,
        }
    }
}

impl UdmabufLimits {
    /// Limits from their values (for tests and tools).
    pub const fn new(list_limit: u64, size_limit_mb: u64) -> Self {
        Self {
            list_limit,
            size_limit_mb,
        }
    }

    /// Reads the limits from sysfs; a parameter that cannot be read or parsed
    /// keeps its kernel default.
    ///
    /// ```
    /// let l = dmabuf_p2p::exporter::udmabuf::UdmabufLimits::read();
    /// assert!(l.list_limit > 0);
    /// ```
    pub fn read() -> Self {
        Self::read_from(Path::new(PARAMETERS))
    }

    /// As [`UdmabufLimits::read`], from another directory (for tests).
    pub fn read_from(dir: &Path) -> Self {
        let get = |name: &str| -> Option<u64> {
            let text = std::fs::read_to_string(dir.join(name)).ok()?;
            // Module parameters are `int`s; a negative one refuses everything.
            let v: i64 = text.trim().parse().ok()?;
            Some(u64::try_from(v).unwrap_or(0))
        };
        let d = Self::default();
        Self {
            list_limit: get("list_limit").unwrap_or(d.list_limit),
            size_limit_mb: get("size_limit_mb").unwrap_or(d.size_limit_mb),
        }
    }

    /// The largest buffer in bytes.
    pub fn size_limit_bytes(&self) -> u64 {
        self.size_limit_mb.saturating_mul(1 << 20)
    }
}

/// Checks udmabuf items `(memfd, offset, size)` against the kernel's rules
/// (see the module docs) and returns the total size the dma-buf will have.
/// Nothing is created; this is what [`Udmabuf::create_list`] runs first.
///
/// ```
/// use std::os::fd::AsFd;
/// use dmabuf_p2p::exporter::udmabuf::{check_items, UdmabufLimits};
/// use dmabuf_p2p::memfd::{Memfd, MemfdOptions};
/// use dmabuf_p2p::Error;
///
/// let good = Memfd::new("ok", 8192)?;
/// let total = check_items(&[(good.as_fd(), 0, 4096), (good.as_fd(), 4096, 4096)], &UdmabufLimits::default())?;
/// assert_eq!(total, 8192);
///
/// let unsealed = MemfdOptions::new().seal_shrink(false).create("no-seal", 4096)?;
/// match check_items(&[(unsealed.as_fd(), 0, 4096)], &UdmabufLimits::default()) {
///     Err(Error::Memfd { problem }) => assert!(problem.contains("F_SEAL_SHRINK")),
///     other => panic!("{other:?}"),
/// }
/// # Ok::<(), Error>(())
/// ```
pub fn check_items(items: &[(BorrowedFd<'_>, u64, u64)], limits: &UdmabufLimits) -> Result<u64> {
    if items.is_empty() {
        return Err(Error::InvalidRange {
            target: "udmabuf item list".to_owned(),
            range: ByteRange::new(0, 0),
            problem: RangeProblem::Count("the list is empty".to_owned()),
        });
    }
    let count = items.len() as u64;
    if count > limits.list_limit {
        return Err(Error::UdmabufLimit {
            limit: "list_limit",
            max: limits.list_limit,
            requested: count,
        });
    }
    let mut total: u64 = 0;
    for (index, &(memfd, offset, size)) in items.iter().enumerate() {
        check_item(index, items.len(), memfd, ByteRange::new(offset, size))?;
        total = total.checked_add(size).ok_or_else(|| Error::InvalidRange {
            target: "udmabuf item list".to_owned(),
            range: ByteRange::new(offset, size),
            problem: RangeProblem::TotalOverflow,
        })?;
    }
    if total > limits.size_limit_bytes() {
        return Err(Error::UdmabufLimit {
            limit: "size_limit_mb",
            max: limits.size_limit_mb,
            requested: total.div_ceil(1 << 20),
        });
    }
    Ok(total)
}

/// One item's checks, in the order: range shape, file kind, seals, bounds.
/// The item is named (via `/proc/self/fd`) only when a check fails.
fn check_item(index: usize, count: usize, memfd: BorrowedFd<'_>, range: ByteRange) -> Result<()> {
    let who = || {
        if count > 1 {
            format!("udmabuf item {index}: memfd {}", fd_label(memfd))
        } else {
            format!("memfd {}", fd_label(memfd))
        }
    };
    let renamed = |e: Error| match e {
        Error::Sys { op, source, .. } => Error::sys(op, who(), source),
        other => other,
    };
    let page = page_size();
    if range.is_empty() {
        return Err(Error::InvalidRange {
            target: who(),
            range,
            problem: RangeProblem::Empty,
        });
    }
    if !range.is_aligned(page) {
        return Err(Error::InvalidRange {
            target: who(),
            range,
            problem: RangeProblem::Unaligned { align: page },
        });
    }

    let st = nix::sys::stat::fstat(memfd).map_err(|e| Error::sys("fstat", who(), e.into()))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Error::Memfd {
            problem: format!("{} is not a regular file (mode {:#o})", who(), st.st_mode),
        });
    }
    let magic = fs_magic(memfd).map_err(renamed)?;
    if magic != TMPFS_MAGIC && magic != HUGETLBFS_MAGIC {
        return Err(Error::Memfd {
            problem: format!(
                "{} is not a shmem (memfd/tmpfs) or hugetlbfs file (filesystem magic {magic:#x})",
                who()
            ),
        });
    }

    let seals = Seals::of(memfd).map_err(renamed)?;
    if !seals.contains(Seals::SHRINK) {
        let hint = if seals.contains(Seals::SEAL) {
            "; its F_SEAL_SEAL forbids adding it (create the memfd with MFD_ALLOW_SEALING)"
        } else {
            "; add it with F_ADD_SEALS"
        };
        return Err(Error::Memfd {
            problem: format!(
                "{} lacks the F_SEAL_SHRINK seal (seals: {seals}){hint}",
                who()
            ),
        });
    }
    for (seal, name) in [
        (Seals::WRITE, "F_SEAL_WRITE"),
        (Seals::FUTURE_WRITE, "F_SEAL_FUTURE_WRITE"),
    ] {
        if seals.contains(seal) {
            return Err(Error::Memfd {
                problem: format!(
                    "{} has the {name} seal, which udmabuf refuses (seals: {seals})",
                    who()
                ),
            });
        }
    }

    let size = u64::try_from(st.st_size).unwrap_or(0);
    range
        .check_in(size, page)
        .map_err(|problem| Error::InvalidRange {
            target: format!("{} ({})", who(), human_size(size)),
            range,
            problem,
        })
}

/// `/dev/udmabuf`, open.
///
/// ```no_run
/// use std::os::fd::AsFd;
/// use dmabuf_p2p::exporter::udmabuf::Udmabuf;
/// use dmabuf_p2p::memfd::Memfd;
///
/// let memfd = Memfd::new("pages", 1 << 20)?;
/// memfd.write_at(0, b"hello")?;
/// let udmabuf = Udmabuf::open()?;
/// let buf = udmabuf.create(memfd.as_fd(), 0, 1 << 20)?;
/// let mut head = [0u8; 5];
/// buf.mmap()?.read(0, &mut head)?;
/// assert_eq!(&head, b"hello");
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug)]
pub struct Udmabuf {
    dev: OwnedFd,
    path: PathBuf,
    limits: UdmabufLimits,
}

impl Udmabuf {
    /// Opens [`DEVICE`] (read-write, close-on-exec) and reads the module
    /// limits. A missing device is [`Error::Sys`] with `ENOENT`.
    pub fn open() -> Result<Self> {
        Self::open_path(DEVICE)
    }

    /// Opens a udmabuf device at another path.
    ///
    /// ```no_run
    /// let u = dmabuf_p2p::exporter::udmabuf::Udmabuf::open_path("/dev/udmabuf")?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::sys("open", path.display().to_string(), e))?;
        Ok(Self {
            dev: file.into(),
            path: path.to_owned(),
            limits: UdmabufLimits::read(),
        })
    }

    /// The limits read at open.
    pub fn limits(&self) -> UdmabufLimits {
        self.limits
    }

    /// A dma-buf over `size` bytes of `memfd` at `offset` (`UDMABUF_CREATE`,
    /// close-on-exec). See the module docs for what is checked first.
    ///
    /// ```no_run
    /// use std::os::fd::AsFd;
    /// use dmabuf_p2p::{exporter::udmabuf::Udmabuf, memfd::Memfd};
    /// let memfd = Memfd::new("pages", 3 * 4096)?;
    /// let buf = Udmabuf::open()?.create(memfd.as_fd(), 4096, 8192)?;
    /// assert_eq!(buf.size()?, 8192);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn create(&self, memfd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<DmaBuf> {
        check_items(&[(memfd, offset, size)], &self.limits)?;
        let arg = sys::udmabuf_create {
            memfd: raw_u32(memfd),
            flags: sys::UDMABUF_FLAGS_CLOEXEC,
            offset,
            size,
        };
        ioctl::udmabuf_create(self.dev.as_fd(), &arg)
            .map(|fd| DmaBuf::from_export(fd, size))
            .map_err(|e| {
                let range = ByteRange::new(offset, size);
                Error::sys(
                    "UDMABUF_CREATE",
                    format!("{}: memfd {} {range}", self.path.display(), fd_label(memfd)),
                    e,
                )
            })
    }

    /// One dma-buf over several `(memfd, offset, size)` ranges, in order
    /// (`UDMABUF_CREATE_LIST`, close-on-exec). Its size is the sum of the
    /// sizes. See the module docs for what is checked first.
    ///
    /// ```no_run
    /// use std::os::fd::AsFd;
    /// use dmabuf_p2p::{exporter::udmabuf::Udmabuf, memfd::Memfd};
    /// let a = Memfd::new("a", 8192)?;
    /// let b = Memfd::new("b", 8192)?;
    /// let buf = Udmabuf::open()?.create_list(&[(a.as_fd(), 4096, 4096), (b.as_fd(), 0, 8192)])?;
    /// assert_eq!(buf.size()?, 12288);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn create_list(&self, items: &[(BorrowedFd<'_>, u64, u64)]) -> Result<DmaBuf> {
        check_items(items, &self.limits)?;
        let list: Vec<sys::udmabuf_create_item> = items
            .iter()
            .map(|&(memfd, offset, size)| sys::udmabuf_create_item {
                memfd: raw_u32(memfd),
                __pad: 0,
                offset,
                size,
            })
            .collect();
        // `check_items` made sure the sum does not overflow.
        let size = items
            .iter()
            .fold(0u64, |sum, &(_, _, n)| sum.saturating_add(n));
        ioctl::udmabuf_create_list(self.dev.as_fd(), sys::UDMABUF_FLAGS_CLOEXEC, &list)
            .map(|fd| DmaBuf::from_export(fd, size))
            .map_err(|e| {
                let what: Vec<String> = items
                    .iter()
                    .map(|&(fd, offset, size)| {
                        format!("fd {} {}", fd.as_raw_fd(), ByteRange::new(offset, size))
                    })
                    .collect();
                Error::sys(
                    "UDMABUF_CREATE_LIST",
                    format!("{}: [{}]", self.path.display(), what.join(", ")),
                    e,
                )
            })
    }
}

impl AsFd for Udmabuf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.dev.as_fd()
    }
}

/// An open fd's number as the `__u32` the uAPI wants (never negative for a
/// borrowed fd).
fn raw_u32(fd: BorrowedFd<'_>) -> u32 {
    fd.as_raw_fd().unsigned_abs()
}
