//! The iommufd context: an open `/dev/iommu` ([`Iommufd`]), the usable IOVA
//! ranges of its IOASes, and its options (`IOMMU_OPTION`).

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use super::iova::{IovaRange, IovaRanges};
use crate::error::{Error, Result};
use crate::ioctl;
use crate::shared_fd::SharedFd;
use crate::sys;

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
/// clone, [`Ioas`](crate::Ioas) and bound device using it are gone.
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

    /// The usable IOVA ranges of the IOAS with ID `ioas_id`
    /// (`IOMMU_IOAS_IOVA_RANGES`): a thin wrapper for IDs that did not come
    /// from [`Iommufd::alloc_ioas`]. An ID that is not an IOAS of this
    /// iommufd is [`Error::UnknownObject`]. See [`Ioas::iova_ranges`](crate::Ioas::iova_ranges).
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
            let (count, alignment) = ioctl::iommu_ioas_iova_ranges(self.as_fd(), ioas_id, &mut out)
                .map_err(|e| {
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
            let count = usize::try_from(count).unwrap_or(usize::MAX);
            if count <= out.len() {
                out.truncate(count);
                let ranges = out
                    .iter()
                    .map(|r| IovaRange::new(r.start, r.last))
                    .collect();
                return Ok(IovaRanges::new(ranges, alignment));
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
    /// [`Error::UnknownObject`]. [`Ioas::huge_pages`](crate::Ioas::huge_pages) is the same for an
    /// [`Ioas`](crate::Ioas) handle.
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
