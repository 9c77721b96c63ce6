//! [`DmaBuf`]: an owned dma-buf file descriptor.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// An owned dma-buf fd. Closing it (drop) drops this process's reference to
/// the buffer; importers such as an iommufd mapping hold their own.
#[derive(Debug)]
pub struct DmaBuf {
    fd: OwnedFd,
}

impl DmaBuf {
    /// Wraps an fd the caller knows to be a dma-buf, without checking.
    /// Use `DmaBuf::try_from_fd` (checks `fstatfs`) for fds of unknown origin.
    pub(crate) fn from_owned_unchecked(fd: OwnedFd) -> Self {
        Self { fd }
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

impl From<DmaBuf> for OwnedFd {
    fn from(b: DmaBuf) -> Self {
        b.fd
    }
}

impl IntoRawFd for DmaBuf {
    fn into_raw_fd(self) -> RawFd {
        self.fd.into_raw_fd()
    }
}

impl FromRawFd for DmaBuf {
    /// # Safety
    /// `fd` must be an open dma-buf fd that the caller owns.
    unsafe fn from_raw_fd(fd: RawFd) -> Self {
        // SAFETY: the caller hands over ownership of an open fd.
        Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } }
    }
}
