//! [`Memfd`]: anonymous shared memory (`memfd_create(2)`) made ready for
//! [`udmabuf`](crate::exporter::udmabuf), and [`Seals`], its file seals.
//!
//! udmabuf takes pages from a memfd (uAPI reference B.3): the file must be
//! shmem or hugetlbfs, carry `F_SEAL_SHRINK` (so the pinned pages cannot be
//! truncated away) and must not carry `F_SEAL_WRITE`/`F_SEAL_FUTURE_WRITE`.
//! [`Memfd::new`] creates exactly that: `MFD_ALLOW_SEALING | MFD_CLOEXEC`, the
//! size set with `ftruncate`, then `F_SEAL_SHRINK` added. [`MemfdOptions`]
//! asks for huge pages (`MFD_HUGETLB`, 2 MiB) or leaves the seal off.
//!
//! Any other memfd works too: the udmabuf calls take a [`BorrowedFd`].

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::uio::{pread, pwrite};

use crate::error::{Error, Result};
use crate::mapping::Mapping;
use crate::range::ByteRange;

/// The huge page size [`MemfdOptions::hugetlb`] asks for (`MFD_HUGE_2MB`).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// A set of memfd file seals (`F_SEAL_*`, see `fcntl(2)`).
///
/// ```
/// use dmabuf_p2p::memfd::Seals;
/// let s = Seals::SHRINK | Seals::GROW;
/// assert!(s.contains(Seals::SHRINK) && !s.contains(Seals::WRITE));
/// assert_eq!(s.to_string(), "F_SEAL_SHRINK|F_SEAL_GROW");
/// assert_eq!(Seals::empty().to_string(), "none");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Seals(u32);

#[allow(clippy::cast_sign_loss)]
const fn seal_bit(v: libc::c_int) -> u32 {
    v as u32
}

impl Seals {
    /// `F_SEAL_SEAL`: no more seals can be added.
    pub const SEAL: Self = Self(seal_bit(libc::F_SEAL_SEAL));
    /// `F_SEAL_SHRINK`: the file cannot shrink. udmabuf requires it.
    pub const SHRINK: Self = Self(seal_bit(libc::F_SEAL_SHRINK));
    /// `F_SEAL_GROW`: the file cannot grow.
    pub const GROW: Self = Self(seal_bit(libc::F_SEAL_GROW));
    /// `F_SEAL_WRITE`: the contents cannot change. udmabuf refuses it.
    pub const WRITE: Self = Self(seal_bit(libc::F_SEAL_WRITE));
    /// `F_SEAL_FUTURE_WRITE`: no new writable mappings. udmabuf refuses it.
    pub const FUTURE_WRITE: Self = Self(seal_bit(libc::F_SEAL_FUTURE_WRITE));
    /// `F_SEAL_EXEC`: the exec mode bits cannot change.
    pub const EXEC: Self = Self(seal_bit(libc::F_SEAL_EXEC));

    const NAMES: [(Self, &'static str); 6] = [
        (Self::SEAL, "F_SEAL_SEAL"),
        (Self::SHRINK, "F_SEAL_SHRINK"),
        (Self::GROW, "F_SEAL_GROW"),
        (Self::WRITE, "F_SEAL_WRITE"),
        (Self::FUTURE_WRITE, "F_SEAL_FUTURE_WRITE"),
        (Self::EXEC, "F_SEAL_EXEC"),
    ];

    /// No seals.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// The seals of these `F_SEAL_*` bits (unknown bits are kept).
    ///
    /// ```
    /// use dmabuf_p2p::memfd::Seals;
    /// assert_eq!(Seals::from_bits(libc::F_SEAL_SHRINK as u32), Seals::SHRINK);
    /// ```
    pub const fn from_bits(bits: u32) -> Self {
        Self(bits)
    }

    /// The `F_SEAL_*` bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every seal of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no seal is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The seals of an open file (`fcntl(F_GET_SEALS)`). A file that does not
    /// support sealing gives [`Error::Sys`] with `EINVAL`.
    ///
    /// ```
    /// use std::os::fd::AsFd;
    /// use dmabuf_p2p::memfd::{Memfd, Seals};
    /// let m = Memfd::new("doc", 4096)?;
    /// assert_eq!(Seals::of(m.as_fd())?, Seals::SHRINK);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn of(fd: BorrowedFd<'_>) -> Result<Self> {
        let ret = fcntl(fd, FcntlArg::F_GET_SEALS)
            .map_err(|e| Error::sys("fcntl(F_GET_SEALS)", fd_label(fd), e.into()))?;
        Ok(Self(seal_bit(ret)))
    }
}

impl std::ops::BitOr for Seals {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Seals {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for Seals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("none");
        }
        let mut rest = self.0;
        let mut first = true;
        for (seal, name) in Self::NAMES {
            if self.contains(seal) {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
                rest &= !seal.0;
            }
        }
        if rest != 0 {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{rest:#x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Seals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Seals({self})")
    }
}

/// How [`MemfdOptions::create`] makes a memfd.
///
/// ```no_run
/// use dmabuf_p2p::memfd::MemfdOptions;
/// // 4 MiB of 2 MiB huge pages (needs reserved huge pages, e.g. `hugepages=64`).
/// let m = MemfdOptions::new().hugetlb(true).create("frames", 4 << 20)?;
/// assert!(m.is_hugetlb());
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemfdOptions {
    hugetlb: bool,
    seal_shrink: bool,
}

impl Default for MemfdOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl MemfdOptions {
    /// Base pages, `F_SEAL_SHRINK` added: ready for udmabuf.
    pub const fn new() -> Self {
        Self {
            hugetlb: false,
            seal_shrink: true,
        }
    }

    /// Back the memfd with 2 MiB huge pages (`MFD_HUGETLB | MFD_HUGE_2MB`).
    /// The size must then be a multiple of 2 MiB, and the system must have
    /// that many huge pages free. Such a file cannot be written with
    /// `write(2)`; use [`Memfd::mmap`].
    pub const fn hugetlb(mut self, yes: bool) -> Self {
        self.hugetlb = yes;
        self
    }

    /// Whether to add `F_SEAL_SHRINK` after sizing (default yes). Without it,
    /// udmabuf refuses the memfd; more seals can be added later with
    /// [`Memfd::add_seals`].
    pub const fn seal_shrink(mut self, yes: bool) -> Self {
        self.seal_shrink = yes;
        self
    }

    /// Creates a memfd called `name` (shown as `/memfd:<name>` in
    /// `/proc/self/fd`) of `size` bytes with `MFD_ALLOW_SEALING |
    /// MFD_CLOEXEC`.
    ///
    /// Errors: a name with a NUL byte or a hugetlb size that is not a
    /// multiple of 2 MiB is [`Error::Memfd`]; a failing `memfd_create`,
    /// `ftruncate` or `fcntl` is [`Error::Sys`] naming the memfd. The fd is
    /// closed on every error.
    ///
    /// ```
    /// use dmabuf_p2p::memfd::{MemfdOptions, Seals};
    /// let m = MemfdOptions::new().seal_shrink(false).create("unsealed", 8192)?;
    /// assert_eq!((m.size(), m.seals()?), (8192, Seals::empty()));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn create(self, name: &str, size: u64) -> Result<Memfd> {
        if name.contains('\0') {
            return Err(Error::Memfd {
                problem: format!("memfd name {name:?} contains a NUL byte"),
            });
        }
        if self.hugetlb && !size.is_multiple_of(HUGE_PAGE_SIZE) {
            return Err(Error::Memfd {
                problem: format!(
                    "size {size:#x} of hugetlb memfd {name:?} is not a multiple of the huge page size {HUGE_PAGE_SIZE:#x}"
                ),
            });
        }
        let len = libc::off_t::try_from(size).map_err(|_| Error::Memfd {
            problem: format!("size {size:#x} of memfd {name:?} does not fit in off_t"),
        })?;
        let mut flags = MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_CLOEXEC;
        if self.hugetlb {
            flags |= MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB;
        }
        let fd = memfd_create(name, flags).map_err(|e| {
            let what = if self.hugetlb {
                format!("{name:?} (MFD_HUGETLB, 2 MiB pages)")
            } else {
                format!("{name:?}")
            };
            Error::sys("memfd_create", what, e.into())
        })?;
        nix::unistd::ftruncate(&fd, len).map_err(|e| {
            Error::sys(
                "ftruncate",
                format!("memfd {name:?} to {size:#x} bytes"),
                e.into(),
            )
        })?;
        let memfd = Memfd {
            fd,
            name: name.to_owned(),
            size,
            hugetlb: self.hugetlb,
        };
        if self.seal_shrink {
            memfd.add_seals(Seals::SHRINK)?;
        }
        Ok(memfd)
    }
}

/// An owned memfd: anonymous shmem (or hugetlbfs) memory with a known size.
///
/// Created with `MFD_CLOEXEC`; closing it (drop) frees the memory unless a
/// mapping or a udmabuf still holds the pages.
///
/// ```
/// use dmabuf_p2p::memfd::Memfd;
/// let m = Memfd::new("example", 64 << 10)?;
/// m.write_at(0x100, b"hello")?;
/// let mut back = [0u8; 5];
/// m.read_at(0x100, &mut back)?;
/// assert_eq!(&back, b"hello");
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug)]
pub struct Memfd {
    fd: OwnedFd,
    name: String,
    size: u64,
    hugetlb: bool,
}

impl Memfd {
    /// A base-page memfd of `size` bytes with `F_SEAL_SHRINK`, ready for
    /// udmabuf. Same as `MemfdOptions::new().create(name, size)`.
    ///
    /// ```
    /// let m = dmabuf_p2p::memfd::Memfd::new("buf", 4096)?;
    /// assert_eq!(m.size(), 4096);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn new(name: &str, size: u64) -> Result<Self> {
        MemfdOptions::new().create(name, size)
    }

    /// A memfd of `size` bytes backed by 2 MiB huge pages, with
    /// `F_SEAL_SHRINK`. `size` must be a multiple of [`HUGE_PAGE_SIZE`].
    ///
    /// ```no_run
    /// let m = dmabuf_p2p::memfd::Memfd::new_hugetlb("huge", 2 << 20)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn new_hugetlb(name: &str, size: u64) -> Result<Self> {
        MemfdOptions::new().hugetlb(true).create(name, size)
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the memfd is backed by huge pages.
    pub fn is_hugetlb(&self) -> bool {
        self.hugetlb
    }

    /// The current seals.
    ///
    /// ```
    /// use dmabuf_p2p::memfd::{Memfd, Seals};
    /// assert!(Memfd::new("s", 4096)?.seals()?.contains(Seals::SHRINK));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn seals(&self) -> Result<Seals> {
        Seals::of(self.fd.as_fd())
    }

    /// Adds seals (`fcntl(F_ADD_SEALS)`). Refused with `EPERM` once
    /// `F_SEAL_SEAL` is set, and with `EBUSY` for `F_SEAL_WRITE` while a
    /// udmabuf pins the pages or a writable mapping exists.
    ///
    /// ```
    /// use dmabuf_p2p::memfd::{Memfd, Seals};
    /// let m = Memfd::new("g", 4096)?;
    /// m.add_seals(Seals::GROW)?;
    /// assert_eq!(m.seals()?, Seals::SHRINK | Seals::GROW);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn add_seals(&self, seals: Seals) -> Result<()> {
        let bits = libc::c_int::try_from(seals.bits()).map_err(|_| Error::Memfd {
            problem: format!(
                "seal bits {:#x} for {} do not fit in an int",
                seals.bits(),
                self.label()
            ),
        })?;
        fcntl(
            &self.fd,
            FcntlArg::F_ADD_SEALS(SealFlag::from_bits_retain(bits)),
        )
        .map(drop)
        .map_err(|e| {
            Error::sys(
                "fcntl(F_ADD_SEALS)",
                format!("{} adding {seals}", self.label()),
                e.into(),
            )
        })
    }

    /// Writes `data` at `offset` with `pwrite(2)`. Fails with `EINVAL` on a
    /// hugetlb memfd (hugetlbfs has no `write`); use [`Memfd::mmap`] there. A
    /// range past the end is [`Error::InvalidRange`] (the file does not grow).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_io_range(offset, data.len())?;
        let mut done = 0usize;
        while done < data.len() {
            let rest = &data[done..];
            let pos = offset_at(offset, done)?;
            match pwrite(&self.fd, rest, pos) {
                Ok(0) => {
                    return Err(Error::sys(
                        "pwrite",
                        self.label(),
                        io::ErrorKind::WriteZero.into(),
                    ));
                }
                Ok(n) => done += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::sys("pwrite", self.label(), e.into())),
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` with `pread(2)`. A range past the
    /// end is [`Error::InvalidRange`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_io_range(offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let pos = offset_at(offset, done)?;
            match pread(&self.fd, rest, pos) {
                Ok(0) => {
                    return Err(Error::sys(
                        "pread",
                        self.label(),
                        io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
                Ok(n) => done += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::sys("pread", self.label(), e.into())),
            }
        }
        Ok(())
    }

    /// Maps the whole memfd read-write and shared. The pages are the same
    /// ones a udmabuf made from this memfd hands to devices, so see
    /// [`Mapping`] for how concurrent device writes are handled.
    ///
    /// ```
    /// let m = dmabuf_p2p::memfd::Memfd::new("map", 8192)?;
    /// let mut map = m.mmap()?;
    /// map.write(4096, b"xyz")?;
    /// let mut back = [0u8; 3];
    /// m.read_at(4096, &mut back)?;
    /// assert_eq!(&back, b"xyz");
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn mmap(&self) -> Result<Mapping> {
        let label = self.label();
        let len = usize::try_from(self.size).map_err(|_| Error::InvalidRange {
            target: label.clone(),
            range: ByteRange::new(0, self.size),
            problem: crate::error::RangeProblem::Overflow,
        })?;
        if len == 0 {
            return Err(Error::InvalidRange {
                target: label,
                range: ByteRange::new(0, 0),
                problem: crate::error::RangeProblem::Empty,
            });
        }
        let name = format!("mapping of {label}");
        Mapping::map_shared(self.fd.as_fd(), 0, len, len, true, name)
            .map_err(|e| Error::sys("mmap", label, e))
    }

    fn check_io_range(&self, offset: u64, len: usize) -> Result<()> {
        let range = ByteRange::new(offset, len as u64);
        if len == 0 {
            return Ok(());
        }
        range
            .check_in(self.size, 1)
            .map_err(|problem| Error::InvalidRange {
                target: self.label(),
                range,
                problem,
            })
    }

    fn label(&self) -> String {
        format!(
            "memfd {:?} (fd {}, {} bytes{})",
            self.name,
            self.fd.as_raw_fd(),
            self.size,
            if self.hugetlb { ", hugetlb" } else { "" }
        )
    }
}

fn offset_at(offset: u64, done: usize) -> Result<libc::off_t> {
    offset
        .checked_add(done as u64)
        .and_then(|p| libc::off_t::try_from(p).ok())
        .ok_or_else(|| Error::InvalidRange {
            target: "memfd".to_owned(),
            range: ByteRange::new(offset, done as u64),
            problem: crate::error::RangeProblem::Overflow,
        })
}

impl AsFd for Memfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Memfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Memfd> for OwnedFd {
    fn from(m: Memfd) -> Self {
        m.fd
    }
}

/// Names an fd for error messages: `fd 5 (/memfd:name (deleted))`, from
/// `/proc/self/fd`, or just `fd 5`.
pub(crate) fn fd_label(fd: BorrowedFd<'_>) -> String {
    let raw = fd.as_raw_fd();
    match std::fs::read_link(format!("/proc/self/fd/{raw}")) {
        Ok(target) => format!("fd {raw} ({})", target.display()),
        Err(_) => format!("fd {raw}"),
    }
}
