//! The kernel's iommufd selftest dma-buf: a revocable dma-buf without
//! hardware, for testing revocation handling.
//!
//! Kernels built with `CONFIG_IOMMUFD_TEST` (a kernel **test** facility, not
//! for production kernels; the project's test VM kernel has it) offer, through
//! `IOMMU_TEST_CMD` on `/dev/iommu`, a mock exporter: a dma-buf of kernel
//! memory that iommufd imports exactly like a VFIO BAR export
//! (`IOMMU_IOAS_MAP_FILE`), and that the test can revoke and restore at will.
//! Revocation then behaves as for VFIO (uAPI reference F): the areas of the
//! buffer are torn down in the IOMMU but stay allocated and dead, a new map
//! fails with [`Error::Revoked`] while revoked, and
//! after a restore only an unmap and a fresh map bring an area back.
//!
//! [`MockDmaBuf::revoke`] does only what the kernel does. To test code built
//! on [`Attachment`](crate::revoke::Attachment)s, make them from the mock (it
//! is [`Revocable`], with a hub of its own) and then either tell the hub, as
//! an exporter such as [`VfioPciDevice`](crate::VfioPciDevice) does for its
//! own revocations, or leave it uninformed to test detection with
//! [`Attachment::sync_with_kernel`](crate::revoke::Attachment::sync_with_kernel):
//!
//! ```no_run
//! use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
//! use dmabuf_p2p::exporter::mock::MockDmaBuf;
//! use dmabuf_p2p::revoke::{Attachment, Revocable, RestorePolicy, RevokeReason};
//!
//! let iommufd = Iommufd::open()?;
//! let ioas = iommufd.alloc_ioas()?;
//! let mock = MockDmaBuf::new(&iommufd, 0x4000)?;
//! let att = Attachment::map(&mock, &ioas, IovaPlacement::Auto, MapPerms::ReadWrite, RestorePolicy::Automatic)?;
//! mock.revoke(true)?; // the kernel tears the area down
//! mock.hub().revoked_by_kernel(RevokeReason::MemoryDecodeOff); // ... and the exporter says so
//! assert!(att.is_revoked());
//! mock.revoke(false)?;
//! mock.hub().restore(); // the attachment maps again at its IOVA
//! assert!(!att.is_revoked());
//! # Ok::<(), dmabuf_p2p::Error>(())
//! ```

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;

use crate::dmabuf::DmaBuf;
use crate::error::{Error, RangeProblem, Result};
use crate::importer::iommufd::Iommufd;
use crate::ioctl;
use crate::range::human_size;
use crate::range::{ByteRange, page_size};
use crate::revoke::{Revocable, RevocationHub};

/// The largest mock buffer the kernel makes, in pages (Linux 7.2).
///
/// ```
/// assert_eq!(dmabuf_p2p::exporter::mock::MAX_PAGES, 512);
/// ```
pub const MAX_PAGES: u64 = 512;

/// The exporter name a mock dma-buf shows in fdinfo (`exp_name`).
///
/// ```
/// assert_eq!(dmabuf_p2p::exporter::mock::MOCK_EXPORTER, "iommufd");
/// ```
pub const MOCK_EXPORTER: &str = "iommufd";

/// A dma-buf of the iommufd selftest's mock exporter
/// (`IOMMU_TEST_OP_DMABUF_GET`; kernels with `CONFIG_IOMMUFD_TEST` only): a
/// revocable buffer that iommufd maps like a single-range VFIO BAR export,
/// for testing revocation handling without hardware. See the
/// [module documentation](self).
///
/// It has no CPU access (`mmap` is refused) and no device behind it: DMA to
/// it is not something to test. It keeps a clone of the [`Iommufd`] it was
/// made with, which also serves its revoke requests.
///
/// ```no_run
/// use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
/// use dmabuf_p2p::exporter::mock::MockDmaBuf;
/// use dmabuf_p2p::Error;
///
/// let iommufd = Iommufd::open()?;
/// let ioas = iommufd.alloc_ioas()?;
/// let mock = MockDmaBuf::new(&iommufd, 0x4000)?;
/// let mut map = ioas.map_dmabuf(mock.dmabuf(), IovaPlacement::Fixed(0x10_0000), MapPerms::ReadWrite)?;
/// mock.revoke(true)?;
/// assert!(matches!(
///     ioas.map_dmabuf(mock.dmabuf(), IovaPlacement::Auto, MapPerms::Read),
///     Err(Error::Revoked { .. })
/// ));
/// mock.revoke(false)?;
/// map.remap()?; // unmap + map at 0x100000: live again
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub struct MockDmaBuf {
    buf: DmaBuf,
    iommufd: Iommufd,
    hub: Arc<RevocationHub>,
}

impl MockDmaBuf {
    /// Makes a mock dma-buf of `len` bytes, a whole number of pages from 1 to
    /// [`MAX_PAGES`], opened read-write and close-on-exec.
    ///
    /// A length of 0, one that is not a multiple of the page size, or more
    /// than [`MAX_PAGES`] pages is [`Error::InvalidRange`] (checked before
    /// the ioctl: the kernel would round an odd length up, and refuse the
    /// others with `EINVAL`). A kernel without `CONFIG_IOMMUFD_TEST` gives
    /// [`Error::Unsupported`].
    ///
    /// ```no_run
    /// let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// let mock = dmabuf_p2p::exporter::mock::MockDmaBuf::new(&iommufd, 0x10000)?;
    /// assert_eq!(mock.dmabuf().size()?, 0x10000);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn new(iommufd: &Iommufd, len: u64) -> Result<Self> {
        const OP: &str = "IOMMU_TEST_OP_DMABUF_GET";
        let page = page_size();
        let max = MAX_PAGES.saturating_mul(page);
        let range = ByteRange::new(0, len);
        let target = format!("an iommufd mock dma-buf (at most {})", human_size(max));
        range
            .check_in(max, page)
            .map_err(|problem| Error::InvalidRange {
                target: target.clone(),
                range,
                problem,
            })?;
        let length = u32::try_from(len).map_err(|_| Error::InvalidRange {
            target,
            range,
            problem: RangeProblem::OutOfBounds {
                end: len,
                size: max,
            },
        })?;
        // The flags are small positive constants; the cast cannot change them.
        #[allow(clippy::cast_sign_loss)]
        let open_flags = (libc::O_RDWR | libc::O_CLOEXEC) as u32;
        let fd: OwnedFd = ioctl::iommu_test_dmabuf_get(iommufd.as_fd(), length, open_flags)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::ENOTTY) {
                    Error::Unsupported {
                        target: iommufd.name(),
                        operation: OP,
                        problem:
                            "the kernel has no iommufd selftest interface (it was built without \
                              CONFIG_IOMMUFD_TEST)"
                                .to_owned(),
                        source: Some(e),
                    }
                } else {
                    Error::sys(OP, format!("{} length {len:#x}", iommufd.name()), e)
                }
            })?;
        // The kernel rounds the length up to a page.
        let buf = DmaBuf::from_export(fd, u64::from(length).next_multiple_of(page_size()));
        let hub = RevocationHub::new(format!("iommufd mock dma-buf fd {}", buf.as_raw_fd()));
        Ok(Self {
            buf,
            iommufd: iommufd.clone(),
            hub,
        })
    }

    /// Revokes the buffer (`revoked = true`) or restores it (`false`) in the
    /// kernel (`IOMMU_TEST_OP_DMABUF_REVOKE`), as an exporter turning its
    /// memory off and on would. A revoke tears down the IOMMU entries of
    /// every area of the buffer, which stay dead after a restore until
    /// unmapped and mapped again ([`IoasMapping::remap`]). Revoking a revoked
    /// buffer or restoring a live one changes nothing.
    ///
    /// Only the kernel is told; the buffer's [`hub`](Revocable::hub) is not
    /// (see the [module documentation](self)).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// let mock = dmabuf_p2p::exporter::mock::MockDmaBuf::new(&iommufd, 0x1000)?;
    /// mock.revoke(true)?;
    /// assert!(dmabuf_p2p::revoke::probe_revoked(&iommufd, mock.dmabuf())?);
    /// mock.revoke(false)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    ///
    /// [`IoasMapping::remap`]: crate::IoasMapping::remap
    pub fn revoke(&self, revoked: bool) -> Result<()> {
        ioctl::iommu_test_dmabuf_revoke(self.iommufd.as_fd(), self.buf.as_fd(), revoked).map_err(
            |e| {
                let what = if revoked { "revoke" } else { "restore" };
                Error::sys(
                    "IOMMU_TEST_OP_DMABUF_REVOKE",
                    format!("{what} {}", self.buf.describe()),
                    e,
                )
            },
        )
    }

    /// The dma-buf.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// let mock = dmabuf_p2p::exporter::mock::MockDmaBuf::new(&iommufd, 0x1000)?;
    /// assert_eq!(mock.dmabuf().fdinfo()?.exp_name, "iommufd");
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn dmabuf(&self) -> &DmaBuf {
        &self.buf
    }

    /// The iommufd it was made with (and revokes through).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// let mock = dmabuf_p2p::exporter::mock::MockDmaBuf::new(&iommufd, 0x1000)?;
    /// assert!(mock.iommufd().same_context(&iommufd));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn iommufd(&self) -> &Iommufd {
        &self.iommufd
    }

    /// The dma-buf alone. It can no longer be revoked through this library,
    /// but stays a mock buffer (fdinfo `exp_name` `iommufd`).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// let buf = dmabuf_p2p::exporter::mock::MockDmaBuf::new(&iommufd, 0x1000)?.into_dmabuf();
    /// assert!(buf.mmap().is_err()); // the mock exporter has no mmap
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn into_dmabuf(self) -> DmaBuf {
        self.buf
    }
}

impl Revocable for MockDmaBuf {
    fn dmabuf(&self) -> &DmaBuf {
        &self.buf
    }

    fn hub(&self) -> &Arc<RevocationHub> {
        &self.hub
    }
}

impl AsFd for MockDmaBuf {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.buf.as_fd()
    }
}

impl AsRawFd for MockDmaBuf {
    fn as_raw_fd(&self) -> RawFd {
        self.buf.as_raw_fd()
    }
}

impl fmt::Debug for MockDmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockDmaBuf")
            .field("fd", &self.buf.as_raw_fd())
            .field("iommufd", &self.iommufd.as_raw_fd())
            .field("hub", &self.hub.state())
            .finish()
    }
}

impl fmt::Display for MockDmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.buf.describe())
    }
}
