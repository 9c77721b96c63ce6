//! The iommufd importer: IO address spaces (IOAS) of `/dev/iommu` and the
//! mappings in them.
//!
//! * [`Iommufd`] is an open `/dev/iommu`. Cloning it shares the one fd.
//! * [`Ioas`] is an IO address space (`IOMMU_IOAS_ALLOC`). It is a shared
//!   handle: clones name the same IOAS, and the IOAS is destroyed
//!   (`IOMMU_DESTROY`) when the last handle goes, unless it was adopted from
//!   its owner ([`Ioas::adopt`]: a VMM's IOAS, which the VMM destroys). Every
//!   [`IoasMapping`] and every attached [`VfioPciDevice`](crate::vfio::VfioPciDevice)
//!   holds one, so the IOAS always outlives what uses it and the iommufd
//!   outlives the IOAS, whatever order values are dropped in.
//! * [`IoasMapping`] is one mapped area (`IOMMU_IOAS_MAP` of user memory or
//!   `IOMMU_IOAS_MAP_FILE` of a memfd or a dma-buf). It unmaps on drop and
//!   keeps what is needed to map the same source again at the same IOVA
//!   ([`IoasMapping::remap`]): the file's fd (for a [`DmaBuf`], the same fd,
//!   shared by reference count; for other files a duplicate), the offset, the
//!   IOVA, the length and the [`MapPerms`].
//!
//! What iommufd accepts (uAPI reference E.4, E.5): any memfd (shmem or
//! hugetlbfs file), and of the dma-bufs only single-range VFIO PCI ones. A
//! dma-buf from anywhere else, or a VFIO one with several ranges, is refused
//! with [`Error::NotImportable`]; a revoked VFIO dma-buf with
//! [`Error::Revoked`]. IOVA problems (taken, misaligned, reserved, no room)
//! are [`Error::InvalidIova`].
//!
//! ```no_run
//! use dmabuf_p2p::importer::iommufd::{MapPerms, Iommufd, IovaPlacement};
//! use dmabuf_p2p::ByteRange;
//!
//! let iommufd = Iommufd::open()?;
//! let ioas = iommufd.alloc_ioas()?;
//! println!("usable IOVAs: {:?}", ioas.iova_ranges()?);
//! let memfd = dmabuf_p2p::memfd::Memfd::new("buffer", 0x10000)?;
//! let map = ioas.map_file(&memfd, ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::ReadWrite)?;
//! println!("mapped at IOVA {:#x}", map.iova());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::dmabuf::{DmaBuf, is_dmabuf};
use crate::error::{AllowedIovaProblem, Error, RangeProblem, Result};
use crate::importer::placement::{IommuPageSizes, IovaSet, PlacementRequest, pick_iova};
use crate::ioctl;
use crate::range::ByteRange;
use crate::range::human_size;
use crate::shared_fd::SharedFd;
use crate::sys;
pub use crate::types::IovaRange;

/// The iommufd device node.
///
/// ```
/// assert_eq!(dmabuf_p2p::importer::iommufd::IOMMUFD_PATH, "/dev/iommu");
/// ```
pub const IOMMUFD_PATH: &str = "/dev/iommu";

/// An open iommufd (`/dev/iommu`): the context that IO address spaces, bound
/// devices and mappings live in.
///
/// Cloning is cheap and shares the one fd; the fd is closed when the last
/// clone, [`Ioas`] and bound device using it are gone.
///
/// ```no_run
/// use dmabuf_p2p::importer::iommufd::Iommufd;
///
/// let iommufd = Iommufd::open()?;
/// let ioas = iommufd.alloc_ioas()?;
/// assert!(!ioas.iova_ranges()?.ranges.is_empty());
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Iommufd {
    // Shared like a dma-buf's fd: every IOAS handle reaches the fd without a
    // pointer to chase.
    fd: SharedFd,
}

impl Iommufd {
    /// Opens `/dev/iommu` read-write and close-on-exec.
    ///
    /// ```no_run
    /// let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn open() -> Result<Self> {
        Self::open_path(IOMMUFD_PATH)
    }

    /// Opens the iommufd device node at `path`.
    ///
    /// ```no_run
    /// let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open_path("/dev/iommu")?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::sys("open", path.display().to_string(), e))?;
        Ok(Self {
            fd: SharedFd::new(OwnedFd::from(file)),
        })
    }

    /// Wraps an fd the caller knows to be an open iommufd (for example one
    /// received from another process). Nothing is checked here; a wrong fd
    /// makes every later ioctl fail with `ENOTTY`.
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::iommufd::Iommufd;
    /// use std::os::fd::OwnedFd;
    ///
    /// let f = std::fs::OpenOptions::new().read(true).write(true).open("/dev/iommu")?;
    /// let iommufd = Iommufd::from_fd(OwnedFd::from(f));
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self {
            fd: SharedFd::new(fd),
        }
    }

    /// Whether `self` and `other` share the same open iommufd (are clones).
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::iommufd::Iommufd;
    /// let a = Iommufd::open()?;
    /// assert!(a.same_context(&a.clone()));
    /// assert!(!a.same_context(&Iommufd::open()?));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn same_context(&self, other: &Iommufd) -> bool {
        self.fd.same_as(&other.fd)
    }

    /// Allocates a new, empty IO address space (`IOMMU_IOAS_ALLOC`).
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// println!("IOAS {}", ioas.id());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn alloc_ioas(&self) -> Result<Ioas> {
        let id = ioctl::iommu_ioas_alloc(self.as_fd())
            .map_err(|e| Error::sys("IOMMU_IOAS_ALLOC", self.name(), e))?;
        Ok(Ioas {
            inner: Arc::new(IoasInner {
                iommufd: self.clone(),
                id,
                owned: true,
                placement: Mutex::new(()),
                known: Mutex::new(Known::default()),
            }),
        })
    }

    /// The usable IOVA ranges of the IOAS with ID `ioas_id`
    /// (`IOMMU_IOAS_IOVA_RANGES`): a thin wrapper for IDs that did not come
    /// from [`Iommufd::alloc_ioas`]. An ID that is not an IOAS of this
    /// iommufd is [`Error::UnknownObject`]. See [`Ioas::iova_ranges`].
    ///
    /// ```no_run
    /// use dmabuf_p2p::{importer::iommufd::Iommufd, Error};
    /// let iommufd = Iommufd::open()?;
    /// assert!(matches!(iommufd.iova_ranges(12345), Err(Error::UnknownObject { id: 12345, .. })));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn iova_ranges(&self, ioas_id: u32) -> Result<IovaRanges> {
        const OP: &str = "IOMMU_IOAS_IOVA_RANGES";
        // Start with room for a few ranges and grow when the kernel says the
        // array is too small (its EMSGSIZE, reported by the helper as a count
        // larger than the array). The count can change between two calls (a
        // device attached meanwhile), hence the loop; it is bounded so a
        // misbehaving kernel cannot make it spin forever.
        let mut out = vec![sys::iommu_iova_range::default(); 8];
        for _ in 0..16 {
            let got =
                ioctl::iommu_ioas_iova_ranges(self.as_fd(), ioas_id, &mut out).map_err(|e| {
                    if e.raw_os_error() == Some(libc::ENOENT) {
                        Error::UnknownObject {
                            op: OP,
                            target: self.name(),
                            id: ioas_id,
                            source: e,
                        }
                    } else {
                        Error::sys(OP, format!("{} IOAS {ioas_id}", self.name()), e)
                    }
                })?;
            let count = usize::try_from(got.count).unwrap_or(usize::MAX);
            if count <= out.len() {
                out.truncate(count);
                let ranges = out
                    .iter()
                    .map(|r| IovaRange::new(r.start, r.last))
                    .collect();
                return Ok(IovaRanges::new(ranges, got.alignment));
            }
            out.resize(count, sys::iommu_iova_range::default());
        }
        Err(Error::sys(
            OP,
            format!("{} IOAS {ioas_id}", self.name()),
            io::Error::other("the number of ranges kept changing"),
        ))
    }

    /// Reads an iommufd option (`IOMMU_OPTION`, `IOMMU_OPTION_OP_GET`): the
    /// context-wide accounting mode, or whether one IOAS may use huge IOMMU
    /// pages. An IOAS ID that is not an IOAS of this iommufd is
    /// [`Error::UnknownObject`]. [`Ioas::huge_pages`] is the same for an
    /// [`Ioas`] handle.
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::iommufd::{Iommufd, IommufdOption, OptionId, RlimitMode};
    ///
    /// let iommufd = Iommufd::open()?;
    /// let ioas = iommufd.alloc_ioas()?;
    /// assert_eq!(iommufd.option(OptionId::RlimitMode)?, IommufdOption::RlimitMode(RlimitMode::User));
    /// let huge = iommufd.option(OptionId::HugePages { ioas: ioas.id() })?;
    /// assert_eq!(huge, IommufdOption::HugePages { ioas: ioas.id(), enabled: true });
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn option(&self, id: OptionId) -> Result<IommufdOption> {
        let arg = sys::iommu_option {
            option_id: id.raw(),
            op: OPTION_OP_GET,
            object_id: id.object(),
            ..Default::default()
        };
        let got =
            ioctl::iommu_option(self.as_fd(), &arg).map_err(|e| self.option_error(id, None, e))?;
        let unexpected = || {
            Error::sys(
                "IOMMU_OPTION",
                self.option_target(id),
                io::Error::other(format!(
                    "the kernel reported {} = {}, which is neither 0 nor 1",
                    id, got.val64
                )),
            )
        };
        Ok(match id {
            OptionId::RlimitMode => IommufdOption::RlimitMode(match got.val64 {
                0 => RlimitMode::User,
                1 => RlimitMode::Mm,
                _ => return Err(unexpected()),
            }),
            OptionId::HugePages { ioas } => IommufdOption::HugePages {
                ioas,
                enabled: match got.val64 {
                    0 => false,
                    1 => true,
                    _ => return Err(unexpected()),
                },
            },
        })
    }

    /// Sets an iommufd option (`IOMMU_OPTION`, `IOMMU_OPTION_OP_SET`).
    ///
    /// * [`IommufdOption::RlimitMode`] needs `CAP_SYS_RESOURCE` and a fresh
    ///   iommufd: once it holds any object (an IOAS, a bound device) the
    ///   kernel refuses with `EBUSY`. Set it right after [`Iommufd::open`].
    /// * [`IommufdOption::HugePages`] with `enabled: false` maps everything
    ///   with `PAGE_SIZE` IOMMU pages (for measurements); the kernel refuses
    ///   it once a device is attached to the IOAS and areas are mapped
    ///   (`EINVAL`). Turning it on again always works.
    ///
    /// Refusals are [`Error::OptionRefused`] saying which rule was broken; an
    /// IOAS ID that is not an IOAS of this iommufd is [`Error::UnknownObject`].
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::iommufd::{Iommufd, IommufdOption, OptionId, RlimitMode};
    ///
    /// let iommufd = Iommufd::open()?;
    /// iommufd.set_option(IommufdOption::RlimitMode(RlimitMode::Mm))?; // before anything else
    /// let ioas = iommufd.alloc_ioas()?;
    /// iommufd.set_option(IommufdOption::HugePages { ioas: ioas.id(), enabled: false })?;
    /// assert_eq!(
    ///     iommufd.option(OptionId::HugePages { ioas: ioas.id() })?,
    ///     IommufdOption::HugePages { ioas: ioas.id(), enabled: false }
    /// );
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn set_option(&self, value: IommufdOption) -> Result<()> {
        let id = value.id();
        let val64 = match value {
            IommufdOption::RlimitMode(RlimitMode::User) => 0,
            IommufdOption::RlimitMode(RlimitMode::Mm) => 1,
            IommufdOption::HugePages { enabled, .. } => u64::from(enabled),
        };
        let arg = sys::iommu_option {
            option_id: id.raw(),
            op: OPTION_OP_SET,
            object_id: id.object(),
            val64,
            ..Default::default()
        };
        ioctl::iommu_option(self.as_fd(), &arg)
            .map(drop)
            .map_err(|e| self.option_error(id, Some(value), e))
    }

    /// What an option applies to, for messages.
    fn option_target(&self, id: OptionId) -> String {
        match id {
            OptionId::RlimitMode => self.name(),
            OptionId::HugePages { ioas } => format!("{} IOAS {ioas}", self.name()),
        }
    }

    /// The error for a failed `IOMMU_OPTION` (`set` is the value of a SET).
    fn option_error(&self, id: OptionId, set: Option<IommufdOption>, e: io::Error) -> Error {
        const OP: &str = "IOMMU_OPTION";
        let option = match set {
            Some(v) => v.to_string(),
            None => format!("{id} (get)"),
        };
        let problem = match (e.raw_os_error(), id) {
            (Some(libc::ENOENT), OptionId::HugePages { ioas }) => {
                return Error::UnknownObject {
                    op: OP,
                    target: self.name(),
                    id: ioas,
                    source: e,
                };
            }
            (Some(libc::EBUSY), OptionId::RlimitMode) => {
                "the iommufd already holds objects (an IOAS, a bound device): the accounting mode can only be \
                 changed on a fresh iommufd, before anything else (EBUSY)"
            }
            (Some(libc::EPERM), OptionId::RlimitMode) => {
                "changing the accounting mode needs CAP_SYS_RESOURCE (EPERM)"
            }
            (Some(libc::EINVAL), OptionId::HugePages { .. }) if set.is_some() => {
                "huge pages cannot be turned off while a device is attached to the IOAS and areas are mapped: \
                 turn them off before mapping (EINVAL)"
            }
            (Some(libc::EOPNOTSUPP), _) => "this kernel does not know the option (EOPNOTSUPP)",
            _ => return Error::sys(OP, format!("{} ({option})", self.option_target(id)), e),
        };
        Error::OptionRefused {
            option,
            target: self.name(),
            problem: problem.to_owned(),
            source: e,
        }
    }

    /// The name used in error messages.
    pub(crate) fn name(&self) -> String {
        format!("iommufd (fd {})", self.fd.as_raw_fd())
    }
}

impl AsFd for Iommufd {
    #[inline]
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// [`Iommufd::from_fd`]: for an iommufd a VMM opened (give the library a
/// duplicate, `OwnedFd::try_clone`, and keep the original: each side closes
/// its own fd, and both name the same iommufd context).
///
/// ```no_run
/// use dmabuf_p2p::importer::iommufd::Iommufd;
/// use std::os::fd::OwnedFd;
///
/// let vmm_fd = OwnedFd::from(std::fs::OpenOptions::new().read(true).write(true).open("/dev/iommu")?);
/// let iommufd = Iommufd::from(vmm_fd.try_clone()?);
/// # Ok::<(), std::io::Error>(())
/// ```
impl From<OwnedFd> for Iommufd {
    fn from(fd: OwnedFd) -> Self {
        Self::from_fd(fd)
    }
}

impl AsRawFd for Iommufd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// `IOMMU_OPTION_OP_GET` and `_SET`, as the `u16` the `op` field is.
const OPTION_OP_GET: u16 = sys::IOMMU_OPTION_OP_GET as u16;
const OPTION_OP_SET: u16 = sys::IOMMU_OPTION_OP_SET as u16;

/// How iommufd charges the memory it pins against `RLIMIT_MEMLOCK`
/// (`IOMMU_OPTION_RLIMIT_MODE`, one setting per iommufd). Processes with
/// `CAP_IPC_LOCK` are not charged either way.
///
/// ```
/// use dmabuf_p2p::importer::iommufd::RlimitMode;
/// assert_eq!(RlimitMode::default(), RlimitMode::User);
/// assert_eq!(RlimitMode::Mm.to_string(), "mm");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RlimitMode {
    /// Per user: pins count against the user's locked-memory total (the
    /// kernel's default, value 0).
    #[default]
    User,
    /// Per process: pins count against the process's own pinned memory, the
    /// way VFIO's type1 container does (value 1).
    Mm,
}

impl fmt::Display for RlimitMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::User => "user",
            Self::Mm => "mm",
        })
    }
}

/// Which iommufd option to read with [`Iommufd::option`].
///
/// ```
/// use dmabuf_p2p::importer::iommufd::OptionId;
/// assert_eq!(OptionId::HugePages { ioas: 2 }.to_string(), "HUGE_PAGES of IOAS 2");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OptionId {
    /// `IOMMU_OPTION_RLIMIT_MODE`: the iommufd's accounting mode.
    RlimitMode,
    /// `IOMMU_OPTION_HUGE_PAGES` of the IOAS with this ID.
    HugePages {
        /// The IOAS ID.
        ioas: u32,
    },
}

impl OptionId {
    /// The `option_id` field.
    const fn raw(self) -> u32 {
        match self {
            Self::RlimitMode => sys::IOMMU_OPTION_RLIMIT_MODE,
            Self::HugePages { .. } => sys::IOMMU_OPTION_HUGE_PAGES,
        }
    }

    /// The `object_id` field (0 for the context-wide option).
    const fn object(self) -> u32 {
        match self {
            Self::RlimitMode => 0,
            Self::HugePages { ioas } => ioas,
        }
    }
}

impl fmt::Display for OptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RlimitMode => f.write_str("RLIMIT_MODE"),
            Self::HugePages { ioas } => write!(f, "HUGE_PAGES of IOAS {ioas}"),
        }
    }
}

/// An iommufd option with its value: what [`Iommufd::option`] reads and
/// [`Iommufd::set_option`] sets.
///
/// ```
/// use dmabuf_p2p::importer::iommufd::{IommufdOption, OptionId, RlimitMode};
/// let off = IommufdOption::HugePages { ioas: 3, enabled: false };
/// assert_eq!(off.id(), OptionId::HugePages { ioas: 3 });
/// assert_eq!(IommufdOption::RlimitMode(RlimitMode::Mm).to_string(), "RLIMIT_MODE = mm");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IommufdOption {
    /// How pinned memory is accounted, for the whole iommufd.
    RlimitMode(RlimitMode),
    /// Whether IOAS `ioas` may combine contiguous pages into huge IOMMU
    /// pages (the default) or maps everything with `PAGE_SIZE` pages.
    HugePages {
        /// The IOAS ID.
        ioas: u32,
        /// Huge pages allowed.
        enabled: bool,
    },
}

impl IommufdOption {
    /// Which option this is.
    ///
    /// ```
    /// use dmabuf_p2p::importer::iommufd::{IommufdOption, OptionId, RlimitMode};
    /// assert_eq!(IommufdOption::RlimitMode(RlimitMode::User).id(), OptionId::RlimitMode);
    /// ```
    pub const fn id(self) -> OptionId {
        match self {
            Self::RlimitMode(_) => OptionId::RlimitMode,
            Self::HugePages { ioas, .. } => OptionId::HugePages { ioas },
        }
    }
}

impl fmt::Display for IommufdOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RlimitMode(mode) => write!(f, "RLIMIT_MODE = {mode}"),
            Self::HugePages { ioas, enabled } => {
                write!(
                    f,
                    "HUGE_PAGES of IOAS {ioas} = {}",
                    if *enabled { "on" } else { "off" }
                )
            }
        }
    }
}

/// What `IOMMU_IOAS_IOVA_RANGES` reports for an IOAS: where mappings may be
/// placed, and how IOVAs and lengths must be aligned. Both change when
/// devices are attached or detached; ask again after that.
///
/// ```no_run
/// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
/// let r = ioas.iova_ranges()?;
/// assert!(r.alignment.is_power_of_two());
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IovaRanges {
    /// The usable ranges, in ascending order.
    pub ranges: Vec<IovaRange>,
    /// Required alignment of IOVAs and lengths (`out_iova_alignment`, at most
    /// the page size).
    pub alignment: u64,
}

impl IovaRanges {
    /// Usable ranges and their alignment (for tests and tools).
    pub fn new(ranges: Vec<IovaRange>, alignment: u64) -> Self {
        Self { ranges, alignment }
    }

    /// Whether `[iova, iova + length)` lies inside one usable range.
    ///
    /// ```
    /// use dmabuf_p2p::importer::iommufd::{IovaRange, IovaRanges};
    /// let r = IovaRanges::new(vec![IovaRange::new(0, 0xfedf_ffff)], 4096);
    /// assert!(r.contains(0x1000_0000, 0x1000));
    /// assert!(!r.contains(0xfee0_0000, 0x1000));
    /// ```
    pub fn contains(&self, iova: u64, length: u64) -> bool {
        self.ranges.iter().any(|r| r.contains(iova, length))
    }

    /// Why `[iova, iova + length)` could not be mapped at a fixed IOVA, as far
    /// as these ranges tell, or `None` if they allow it.
    fn problem_with(&self, iova: u64, length: u64) -> Option<String> {
        let align = self.alignment.max(1);
        if !iova.is_multiple_of(align) || !length.is_multiple_of(align) {
            return Some(format!("IOVA and length must be multiples of {align:#x}"));
        }
        if !self.contains(iova, length) {
            let list: Vec<String> = self.ranges.iter().map(ToString::to_string).collect();
            return Some(format!(
                "not inside one usable IOVA range ({})",
                list.join(", ")
            ));
        }
        None
    }
}

/// Where a mapping goes in the IOAS.
///
/// ```
/// use dmabuf_p2p::importer::iommufd::IovaPlacement;
/// let anywhere = IovaPlacement::Auto;
/// let there = IovaPlacement::Fixed(0x4000_0000);
/// assert_ne!(anywhere, there);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IovaPlacement {
    /// Wherever there is room, placed by the library so that the IOMMU can
    /// use its largest pages: the lowest free IOVA (never 0) inside the
    /// IOAS's usable ranges (and its allowed list, if one was set through
    /// this handle) that is congruent to the buffer's physical start modulo
    /// the largest IOMMU page size not larger than the mapping
    /// ([`Ioas::iommu_page_sizes`]), so that a 1 GiB BAR gets one 1 GiB
    /// IOMMU page. For memory without known physical contiguity (a memfd,
    /// user memory) the alignment is at most 2 MiB. Smaller alignments are
    /// used only when no such IOVA is free. The library maps at the IOVA it
    /// picked (`IOMMU_IOAS_MAP_FIXED_IOVA`), avoiding the areas mapped
    /// through any handle of the IOAS; an area it does not know of (mapped
    /// by raw ID or by another process) makes the kernel refuse that IOVA
    /// (`EEXIST`) and the next one is tried; after a few refusals, or if
    /// nothing fits, the kernel places it (at most 2 MiB-aligned).
    Auto,
    /// Exactly at this IOVA (`IOMMU_IOAS_MAP_FIXED_IOVA`).
    Fixed(u64),
}

impl IovaPlacement {
    /// The `iova` field and the flag bits for the kernel.
    fn to_arg(self) -> (u64, u32) {
        match self {
            Self::Auto => (0, 0),
            Self::Fixed(iova) => (iova, sys::IOMMU_IOAS_MAP_FIXED_IOVA),
        }
    }

    /// The IOVA to name in errors (0 for [`IovaPlacement::Auto`]).
    fn iova(self) -> u64 {
        self.to_arg().0
    }
}

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

/// An IO address space of an [`Iommufd`] (`IOMMU_IOAS_ALLOC`).
///
/// A shared handle: clones name the same IOAS, and it is destroyed
/// (`IOMMU_DESTROY`) when the last clone is dropped. Mappings and attached
/// devices hold a clone, so it is never destroyed under them. (If a device
/// was attached to it by raw ID and is still attached, the kernel refuses the
/// destroy with `EBUSY`; the IOAS then lives until the iommufd is closed.)
///
/// ```no_run
/// use dmabuf_p2p::importer::iommufd::Iommufd;
///
/// let ioas = Iommufd::open()?.alloc_ioas()?; // the IOAS keeps the iommufd open
/// let ranges = ioas.iova_ranges()?;
/// println!("IOAS {}: {:?}, alignment {:#x}", ioas.id(), ranges.ranges, ranges.alignment);
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Ioas {
    inner: Arc<IoasInner>,
}

#[derive(Debug)]
struct IoasInner {
    iommufd: Iommufd,
    id: u32,
    /// Whether this crate allocated the IOAS and destroys it with the last
    /// handle; `false` for one adopted from its owner ([`Ioas::adopt`]).
    owned: bool,
    /// Held while the kernel picks an IOVA (automatic placement) and across
    /// the unmap and map of [`IoasMapping::remap`], so that a remap gets its
    /// IOVA back: no automatic placement through another handle of this IOAS
    /// can take the IOVA between the two.
    placement: Mutex<()>,
    /// What the library knows of the IOAS, for automatic placement. Locked
    /// briefly, never across an ioctl.
    known: Mutex<Known>,
}

/// What automatic placement works from.
#[derive(Debug, Default)]
struct Known {
    /// The areas mapped through handles of this IOAS.
    areas: IovaSet,
    /// Where automatic placement may go: the usable ranges
    /// (`IOMMU_IOAS_IOVA_RANGES`) cut to the allowed list, with the IOAS's
    /// alignment; asked when first needed and again when the kernel refuses
    /// a picked IOVA as misaligned or reserved (a device attached since).
    windows: Option<(Vec<RangeInclusive<u64>>, u64)>,
    /// The allowed list set through [`Ioas::allow_iovas`] (empty: none).
    allowed: Vec<IovaRange>,
    /// The IOMMU page sizes placement aligns for.
    page_sizes: IommuPageSizes,
}

/// How many IOVAs automatic placement tries before the kernel places.
const PLACEMENT_TRIES: usize = 16;

/// The largest alignment automatic placement asks for memory whose physical
/// contiguity is unknown (memfd pages, user memory): transparent or
/// hugetlbfs huge pages of 2 MiB.
const UNKNOWN_CONTIGUITY_ALIGNMENT: u64 = 2 << 20;

impl IoasInner {
    fn lock_placement(&self) -> MutexGuard<'_, ()> {
        self.placement
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    #[inline]
    fn known(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records an area mapped through a handle of this IOAS.
    #[inline(always)]
    fn record_mapped(&self, iova: u64, length: u64) {
        self.known().areas.insert(iova, length);
    }

    /// Forgets an area unmapped through a handle of this IOAS.
    #[inline(always)]
    fn record_unmapped(&self, iova: u64, length: u64) {
        self.known().areas.remove(iova, length);
    }

    /// The placement windows and the IOAS alignment, asked from the kernel
    /// if not known (or `refresh`). `None` if the kernel cannot say.
    fn windows(&self, refresh: bool) -> Option<(Vec<RangeInclusive<u64>>, u64)> {
        if !refresh && let Some(w) = &self.known().windows {
            return Some(w.clone());
        }
        let ranges = self.iommufd.iova_ranges(self.id).ok()?;
        let mut known = self.known();
        let windows = placement_windows(&ranges.ranges, &known.allowed);
        known.windows = Some((windows, ranges.alignment));
        known.windows.clone()
    }

    /// An IOVA for `req`, outside the known areas and `blocked`.
    fn pick(&self, req: &PlacementRequest, blocked: &IovaSet, refresh: bool) -> Option<u64> {
        let (windows, alignment) = self.windows(refresh)?;
        let known = self.known();
        if blocked.is_empty() {
            return pick_iova(&windows, &known.areas, alignment, req);
        }
        let mut taken = known.areas.clone();
        for span in blocked.spans() {
            taken.insert(*span.start(), span.end() - span.start() + 1);
        }
        pick_iova(&windows, &taken, alignment, req)
    }

    /// The placement request for `length` bytes whose first byte is at
    /// physical address (or stand-in) `residue`; `contiguous` says whether
    /// the memory is known to be physically contiguous.
    fn request(&self, length: u64, residue: u64, contiguous: bool) -> PlacementRequest {
        let page_sizes = self.known().page_sizes;
        let mut max_alignment = page_sizes.alignment_for(length);
        if !contiguous {
            max_alignment = max_alignment.min(UNKNOWN_CONTIGUITY_ALIGNMENT);
        }
        PlacementRequest {
            length,
            residue,
            max_alignment,
            page_sizes,
        }
    }

    /// Runs `issue`, one map ioctl, at `at`. For [`IovaPlacement::Auto`]
    /// the IOVA is picked here and mapped fixed; a refused pick
    /// (`EEXIST`: an area this handle does not know; `EINVAL`: ranges
    /// changed) is followed by the next, and the kernel places it if
    /// nothing is left. The caller holds the placement lock for `Auto`.
    /// Returns the IOVA, or the placement of the failed call and its error.
    fn place(
        &self,
        at: IovaPlacement,
        request: impl FnOnce() -> PlacementRequest,
        mut issue: impl FnMut(IovaPlacement) -> MapResult,
    ) -> std::result::Result<u64, (IovaPlacement, &'static str, io::Error)> {
        if at == IovaPlacement::Auto {
            let req = &request();
            let mut blocked = IovaSet::new();
            let (mut refreshed, mut refresh) = (false, false);
            for _ in 0..PLACEMENT_TRIES {
                let Some(iova) = self.pick(req, &blocked, refresh) else {
                    break;
                };
                refresh = false;
                let fixed = IovaPlacement::Fixed(iova);
                match issue(fixed) {
                    Ok(got) => return Ok(got),
                    Err((_, e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                        blocked.insert(iova, req.length);
                    }
                    Err((_, e)) if e.raw_os_error() == Some(libc::EINVAL) && !refreshed => {
                        (refreshed, refresh) = (true, true);
                    }
                    // Misaligned or reserved again: let the kernel decide.
                    Err((_, e)) if e.raw_os_error() == Some(libc::EINVAL) => break,
                    // Not about the IOVA (revoked, not importable, ...).
                    Err((op, e)) => return Err((IovaPlacement::Auto, op, e)),
                }
            }
        }
        issue(at).map_err(|(op, e)| (at, op, e))
    }
}

/// What one map ioctl gives: the IOVA, or the operation's name and errno.
type MapResult = std::result::Result<u64, (&'static str, io::Error)>;

/// The usable ranges cut to the allowed ones (all of them if none).
fn placement_windows(usable: &[IovaRange], allowed: &[IovaRange]) -> Vec<RangeInclusive<u64>> {
    if allowed.is_empty() {
        return usable.iter().map(|r| r.start..=r.last).collect();
    }
    let mut out = Vec::new();
    for u in usable {
        for a in allowed {
            let (start, last) = (u.start.max(a.start), u.last.min(a.last));
            if start <= last {
                out.push(start..=last);
            }
        }
    }
    out
}

impl Drop for IoasInner {
    fn drop(&mut self) {
        // An adopted IOAS is its owner's to destroy.
        if !self.owned {
            return;
        }
        // Nothing can be done about a failure here (EBUSY: a device attached
        // by raw ID); the kernel frees the IOAS when the iommufd is closed.
        let _ = ioctl::iommu_destroy(self.iommufd.as_fd(), self.id);
    }
}

impl Ioas {
    /// A handle of the existing IOAS `id` of `iommufd`, one that someone
    /// else (a VMM) allocated and destroys: dropping the last handle does
    /// **not** destroy it. Mappings made through it go into that IOAS (at
    /// guest-physical IOVAs, with [`IovaPlacement::Fixed`]) and are unmapped
    /// when dropped; the owner must keep the IOAS until they are gone.
    /// Checked with `IOMMU_IOAS_IOVA_RANGES`: an `id` that is not an IOAS
    /// of `iommufd` is [`Error::UnknownObject`]. Adopt an IOAS once and clone
    /// that handle: clones share the lock that keeps a remap's IOVA from
    /// being taken by an automatic placement meanwhile.
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::iommufd::{Ioas, Iommufd};
    ///
    /// let iommufd = Iommufd::open()?;
    /// let owned = iommufd.alloc_ioas()?; // stands in for the VMM's IOAS
    /// let adopted = Ioas::adopt(&iommufd, owned.id())?;
    /// assert!(!adopted.is_owned() && owned.is_owned());
    /// drop(adopted); // the IOAS is still there
    /// assert!(iommufd.iova_ranges(owned.id()).is_ok());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn adopt(iommufd: &Iommufd, id: u32) -> Result<Self> {
        iommufd.iova_ranges(id)?;
        Ok(Self {
            inner: Arc::new(IoasInner {
                iommufd: iommufd.clone(),
                id,
                owned: false,
                placement: Mutex::new(()),
                known: Mutex::new(Known::default()),
            }),
        })
    }

    /// Whether the last handle destroys the IOAS (`false` for one made by
    /// [`Ioas::adopt`]).
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// assert!(ioas.is_owned());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn is_owned(&self) -> bool {
        self.inner.owned
    }

    /// The IOAS ID (what `VFIO_DEVICE_ATTACH_IOMMUFD_PT` takes).
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// println!("IOAS {}", ioas.id());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// The iommufd the IOAS belongs to.
    ///
    /// ```no_run
    /// let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// let ioas = iommufd.alloc_ioas()?;
    /// assert!(ioas.iommufd().same_context(&iommufd));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn iommufd(&self) -> &Iommufd {
        &self.inner.iommufd
    }

    /// Whether `self` and `other` are handles of the same IOAS.
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// assert!(ioas.clone().same_ioas(&ioas));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn same_ioas(&self, other: &Ioas) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The usable IOVA ranges and the required alignment
    /// (`IOMMU_IOAS_IOVA_RANGES`; an array too small for the answer,
    /// `EMSGSIZE`, is grown and the question asked again).
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// for r in ioas.iova_ranges()?.ranges {
    ///     println!("{r}");
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn iova_ranges(&self) -> Result<IovaRanges> {
        self.iommufd().iova_ranges(self.id())
    }

    /// Sets the IOAS's allowed IOVA list (`IOMMU_IOAS_ALLOW_IOVAS`),
    /// replacing the previous one; an empty slice removes it.
    ///
    /// What the kernel does with the list (Linux 7.2):
    /// * automatic placement ([`IovaPlacement::Auto`]) picks IOVAs inside
    ///   the allowed ranges only; when they are full it is
    ///   [`Error::InvalidIova`] (`ENOSPC`);
    /// * the ranges are guaranteed to stay usable: attaching a device whose
    ///   reserved regions (MSI window, aperture) intersect them is refused;
    /// * fixed IOVAs ([`IovaPlacement::Fixed`]) are **not** restricted to the
    ///   list: only reserved regions and existing areas stop them.
    ///
    /// Ranges are inclusive (`start..=last`). Checked before the ioctl, each
    /// an [`Error::InvalidAllowedIova`] naming the range and its position:
    /// `start` not below `last` ([`AllowedIovaProblem::Empty`], the kernel
    /// refuses one-byte ranges too) and ranges that overlap
    /// ([`AllowedIovaProblem::Overlaps`]). A range that covers IOVAs already
    /// reserved in the IOAS (an attached device's MSI window, say) is refused
    /// by the kernel with `EADDRINUSE`, reported as
    /// [`AllowedIovaProblem::Reserved`] for the first such range, with the
    /// usable ranges. After any error the previous list stays in force.
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, IovaRange, MapPerms};
    /// use dmabuf_p2p::ByteRange;
    ///
    /// let ioas = Iommufd::open()?.alloc_ioas()?;
    /// let window = IovaRange::new(0x1_0000_0000, 0x1_3fff_ffff);
    /// ioas.allow_iovas(&[window])?;
    /// let memfd = dmabuf_p2p::memfd::Memfd::new("buf", 0x10000)?;
    /// let map = ioas.map_file(&memfd, ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::ReadWrite)?;
    /// assert!(window.contains(map.iova(), map.length()));
    /// ioas.allow_iovas(&[])?; // no restriction any more
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// [`AllowedIovaProblem::Empty`]: crate::error::AllowedIovaProblem::Empty
    /// [`AllowedIovaProblem::Overlaps`]: crate::error::AllowedIovaProblem::Overlaps
    /// [`AllowedIovaProblem::Reserved`]: crate::error::AllowedIovaProblem::Reserved
    pub fn allow_iovas(&self, ranges: &[IovaRange]) -> Result<()> {
        check_allowed_iovas(self.id(), ranges)?;
        let raw: Vec<sys::iommu_iova_range> = ranges
            .iter()
            .map(|r| sys::iommu_iova_range {
                start: r.start,
                last: r.last,
            })
            .collect();
        let result = ioctl::iommu_ioas_allow_iovas(self.iommufd().as_fd(), self.id(), &raw);
        if result.is_ok() {
            let mut known = self.inner.known();
            known.allowed = ranges.to_vec();
            known.windows = None;
        }
        result.map_err(|e| {
            if e.raw_os_error() == Some(libc::EADDRINUSE) {
                // IOVA_RANGES reports exactly what is not reserved, whatever
                // the allowed list: the first range not inside one of those
                // is (one of) the culprit(s).
                if let Ok(usable) = self.iova_ranges() {
                    let inside = |r: &IovaRange| {
                        usable
                            .ranges
                            .iter()
                            .any(|u| u.start <= r.start && r.last <= u.last)
                    };
                    if let Some((index, range)) =
                        ranges.iter().enumerate().find(|(_, r)| !inside(r))
                    {
                        return Error::InvalidAllowedIova {
                            ioas: self.id(),
                            index,
                            range: *range,
                            problem: AllowedIovaProblem::Reserved {
                                usable: usable.ranges,
                            },
                        };
                    }
                }
            }
            let list: Vec<String> = ranges.iter().map(ToString::to_string).collect();
            Error::sys(
                "IOMMU_IOAS_ALLOW_IOVAS",
                format!("IOAS {} ranges [{}]", self.id(), list.join(", ")),
                e,
            )
        })
    }

    /// Whether this IOAS may use huge IOMMU pages
    /// (`IOMMU_OPTION_HUGE_PAGES`, on by default). See [`Iommufd::option`].
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// assert!(ioas.huge_pages()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn huge_pages(&self) -> Result<bool> {
        match self
            .iommufd()
            .option(OptionId::HugePages { ioas: self.id() })?
        {
            IommufdOption::HugePages { enabled, .. } => Ok(enabled),
            other => Err(Error::sys(
                "IOMMU_OPTION",
                format!("{} IOAS {}", self.iommufd().name(), self.id()),
                io::Error::other(format!("asked for HUGE_PAGES, got {other}")),
            )),
        }
    }

    /// Allows or forbids huge IOMMU pages in this IOAS
    /// (`IOMMU_OPTION_HUGE_PAGES`). Turning them off is refused once a
    /// device is attached and areas are mapped ([`Error::OptionRefused`]);
    /// see [`Iommufd::set_option`].
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// ioas.set_huge_pages(false)?; // before anything is mapped
    /// assert!(!ioas.huge_pages()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn set_huge_pages(&self, enabled: bool) -> Result<()> {
        self.iommufd().set_option(IommufdOption::HugePages {
            ioas: self.id(),
            enabled,
        })
    }

    /// The IOMMU page sizes automatic placement aligns for
    /// ([`IovaPlacement::Auto`]). iommufd does not report the page sizes of
    /// an IOAS's domains, so this is an assumption: 4 KiB, 2 MiB and 1 GiB
    /// ([`IommuPageSizes::X86`]: x86 IOMMUs, the emulated VT-d, SMMUs with a
    /// 4 KiB granule) unless set with [`Ioas::set_iommu_page_sizes`]. Too
    /// large a guess costs nothing but IOVA space; it never breaks a map.
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::placement::IommuPageSizes;
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// assert_eq!(ioas.iommu_page_sizes(), IommuPageSizes::X86);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn iommu_page_sizes(&self) -> IommuPageSizes {
        self.inner.known().page_sizes
    }

    /// Sets the IOMMU page sizes automatic placement aligns for (for
    /// example from type1's `iova_pgsizes` or the IOMMU's capability
    /// registers). Applies to every handle of this IOAS.
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::placement::IommuPageSizes;
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// ioas.set_iommu_page_sizes(IommuPageSizes::from_bits(0x20_1000)); // 4 KiB and 2 MiB
    /// assert_eq!(ioas.iommu_page_sizes().largest(), 2 << 20);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn set_iommu_page_sizes(&self, sizes: IommuPageSizes) {
        self.inner.known().page_sizes = sizes;
    }

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
        let mut mapping = IoasMapping {
            ioas: self.clone(),
            iova: at.iova(),
            length: range.length,
            perms,
            source,
            phys: src.phys.and_then(|p| p.checked_add(range.offset)),
            mapped: false,
        };
        let _placing = (at == IovaPlacement::Auto).then(|| self.inner.lock_placement());
        // The copy shares the source's pages: congruent to the source IOVA,
        // it can use the same IOMMU page sizes.
        let residue = mapping.phys.unwrap_or(src_iova);
        let req = || self.inner.request(range.length, residue, true);
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
        match self.inner.place(at, req, copy) {
            Ok(got) => {
                mapping.iova = got;
                mapping.mapped = true;
                self.inner.record_mapped(got, range.length);
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
        let mut mapping = IoasMapping {
            ioas: self.clone(),
            iova: at.iova(),
            length,
            perms,
            source,
            phys: None,
            mapped: false,
        };
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
        let mut mapping = IoasMapping {
            ioas: self.clone(),
            iova: at.iova(),
            length: range.length,
            perms,
            source,
            phys,
            mapped: false,
        };
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
        let mut mapping = IoasMapping {
            ioas: self.clone(),
            iova: at.iova(),
            length: buf.size()?,
            perms,
            source: Source::DmaBuf {
                buf: buf.share(),
                start: 0,
            },
            phys: phys.or_else(|| buf.phys_start()),
            mapped: false,
        };
        // SAFETY: a dma-buf maps kernel-owned pages (device memory), not this
        // process's Rust memory.
        unsafe { mapping.map_at(at) }?;
        Ok(mapping)
    }
}

/// The checks of [`Ioas::allow_iovas`] that need no kernel: every range has
/// `start < last`, and no two overlap.
fn check_allowed_iovas(ioas: u32, ranges: &[IovaRange]) -> Result<()> {
    let invalid = |index: usize, problem| Error::InvalidAllowedIova {
        ioas,
        index,
        range: ranges[index],
        problem,
    };
    if let Some(index) = ranges.iter().position(|r| r.start >= r.last) {
        return Err(invalid(index, AllowedIovaProblem::Empty));
    }
    // Sorted by start, a list with an overlap has one between neighbours.
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| (ranges[i].start, i));
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if ranges[b].start <= ranges[a].last {
            // Name the later one in the caller's list, against the earlier.
            let (index, other) = if a < b { (b, a) } else { (a, b) };
            return Err(invalid(
                index,
                AllowedIovaProblem::Overlaps {
                    other,
                    with: ranges[other],
                },
            ));
        }
    }
    Ok(())
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
        self.ioas.inner.record_unmapped(self.iova, self.length);
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
        let ioas = Arc::clone(&self.ioas.inner);
        let _placing = ioas.lock_placement();
        self.unmap()?;
        // SAFETY: a file source maps kernel-owned pages; for user memory the
        // contract of `Ioas::map_user` covers device access until this
        // handle is dropped, remaps included.
        unsafe { self.map_at(IovaPlacement::Fixed(self.iova)) }
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
        let ioas = Arc::clone(&self.ioas.inner);
        let _placing = (at == IovaPlacement::Auto).then(|| ioas.lock_placement());
        let this = &*self;
        let req = || match (&this.source, this.phys) {
            (_, Some(phys)) => ioas.request(this.length, phys, true),
            // A dma-buf iommufd imports is a VFIO BAR range (or the selftest
            // mock): device memory, contiguous; a BAR's physical start is
            // aligned to its size, so its offset in the buffer stands in.
            (Source::DmaBuf { start, .. }, None) => ioas.request(this.length, *start, true),
            (Source::File { start, .. }, None) => ioas.request(this.length, *start, false),
            (Source::User { addr }, None) => ioas.request(this.length, *addr as u64, false),
        };
        // SAFETY: for a user-memory source the caller guarantees the memory
        // may be handed to devices (see `# Safety`); file sources map
        // kernel-owned pages.
        let issue = |at: IovaPlacement| unsafe { this.issue_map(at) };
        match ioas.place(at, req, issue) {
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
        self.ioas.inner.record_mapped(iova, self.length);
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
                    let why =
                        why.unwrap_or_else(|| "misaligned, reserved or not allowed".to_owned());
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
pub(crate) const VFIO_EXPORTER: &str = "vfio_pci_core";

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
    fn iova_problems_are_explained() {
        let r = IovaRanges::new(vec![IovaRange::new(0, 0xfedf_ffff)], 0x1000);
        assert!(r.problem_with(0x1000, 0x1000).is_none());
        assert!(
            r.problem_with(0x1800, 0x1000)
                .is_some_and(|p| p.contains("multiples of 0x1000"))
        );
        assert!(
            r.problem_with(0xfee0_0000, 0x1000)
                .is_some_and(|p| p.contains("not inside"))
        );
    }

    #[test]
    fn allowed_iova_lists_are_checked() {
        let r = |start, last| IovaRange::new(start, last);
        assert!(check_allowed_iovas(1, &[]).is_ok());
        assert!(check_allowed_iovas(1, &[r(0, u64::MAX)]).is_ok());
        // Adjacent is fine, touching is not.
        assert!(check_allowed_iovas(1, &[r(0x2000, 0x2fff), r(0x1000, 0x1fff)]).is_ok());
        match check_allowed_iovas(7, &[r(0x1000, 0x1fff), r(0x5000, 0x5000)]) {
            Err(Error::InvalidAllowedIova {
                ioas: 7,
                index: 1,
                range,
                problem: AllowedIovaProblem::Empty,
            }) => {
                assert_eq!(range, r(0x5000, 0x5000));
            }
            other => panic!("one-byte range: {other:?}"),
        }
        assert!(matches!(
            check_allowed_iovas(7, &[r(0x9000, 0x1000)]),
            Err(Error::InvalidAllowedIova {
                index: 0,
                problem: AllowedIovaProblem::Empty,
                ..
            })
        ));
        // [0] covers [2]; [1] is apart. The later of the pair is named.
        let list = [r(0x1000, 0x8fff), r(0x10000, 0x1ffff), r(0x8000, 0x8fff)];
        match check_allowed_iovas(7, &list) {
            Err(
                e @ Error::InvalidAllowedIova {
                    index: 2,
                    problem: AllowedIovaProblem::Overlaps { other: 0, .. },
                    ..
                },
            ) => {
                assert_eq!(
                    e.to_string(),
                    "allowed IOVA range #2 0x8000..=0x8fff for IOAS 7: overlaps range #0 0x1000..=0x8fff"
                );
            }
            other => panic!("overlap: {other:?}"),
        }
        let touching = [r(0x2000, 0x3000), r(0x1000, 0x2000)];
        assert!(matches!(
            check_allowed_iovas(7, &touching),
            Err(Error::InvalidAllowedIova {
                index: 1,
                problem: AllowedIovaProblem::Overlaps { other: 0, .. },
                ..
            })
        ));
    }

    #[test]
    fn option_values() {
        assert_eq!(
            (OptionId::RlimitMode.raw(), OptionId::RlimitMode.object()),
            (sys::IOMMU_OPTION_RLIMIT_MODE, 0)
        );
        let huge = OptionId::HugePages { ioas: 9 };
        assert_eq!(
            (huge.raw(), huge.object()),
            (sys::IOMMU_OPTION_HUGE_PAGES, 9)
        );
        assert_eq!(u32::from(OPTION_OP_GET), sys::IOMMU_OPTION_OP_GET);
        assert_eq!(u32::from(OPTION_OP_SET), sys::IOMMU_OPTION_OP_SET);
        assert_eq!(
            IommufdOption::HugePages {
                ioas: 9,
                enabled: true
            }
            .to_string(),
            "HUGE_PAGES of IOAS 9 = on"
        );
    }

    #[test]
    fn placement_flags() {
        assert_eq!(IovaPlacement::Auto.to_arg(), (0, 0));
        assert_eq!(
            IovaPlacement::Fixed(0x1000).to_arg(),
            (0x1000, sys::IOMMU_IOAS_MAP_FIXED_IOVA)
        );
        assert_eq!(
            MapPerms::ReadWrite.flags(),
            sys::IOMMU_IOAS_MAP_READABLE | sys::IOMMU_IOAS_MAP_WRITEABLE
        );
    }
}
