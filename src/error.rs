//! The one error type of the crate.
//!
//! Every variant says what was asked (device, region, range, IOVA, fd) and, where
//! the kernel refused, carries its errno as a [`std::io::Error`].

use std::io;

#[cfg(feature = "drm")]
pub use crate::types::ImportRefusal;
#[cfg(feature = "share")]
use crate::types::ShareProblem;
pub use crate::types::{AllowedIovaProblem, RangeProblem};
use crate::types::{ByteRange, IovaRange};

/// Errors returned by dmabuf-p2p.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call on a named object failed; `source` holds the errno.
    #[error("{op} on {target}: {source}")]
    Sys {
        /// The operation, e.g. `"VFIO_DEVICE_FEATURE(DMA_BUF)"` or `"open"`.
        op: &'static str,
        /// What it was applied to, e.g. `"0000:01:00.0 BAR2"` or `"/dev/iommu"`.
        target: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    /// A byte range is unusable for the object it addresses. Checked before any
    /// ioctl, so the range named is the one that was wrong.
    #[error("range {range} of {target}: {problem}")]
    InvalidRange {
        /// What the range addresses, e.g. `"0000:01:00.0 BAR2 (1 MiB)"`.
        target: String,
        /// The offending range.
        range: ByteRange,
        /// What is wrong with it.
        problem: RangeProblem,
    },

    /// A region index that cannot be exported or used as a memory BAR.
    #[error("{device} region {index}: {problem}")]
    InvalidRegion {
        /// The PCI address of the device.
        device: String,
        /// The VFIO region index.
        index: u32,
        /// What is wrong with it.
        problem: String,
        /// The kernel's answer, when it was the kernel that refused (an index
        /// past the device's regions: `EINVAL`); `None` when checked before
        /// any ioctl.
        #[source]
        source: Option<io::Error>,
    },

    /// A PCI device is missing, or not usable the way it was asked for.
    #[error("PCI device {device}: {problem}")]
    Device {
        /// The PCI address (or what was given as one).
        device: String,
        /// What is wrong.
        problem: String,
        /// The kernel's answer, when the problem came from a system call
        /// (e.g. `ENOENT` for a missing cdev node, `EINVAL` from a cdev that
        /// is not bound); `None` when found without one.
        #[source]
        source: Option<io::Error>,
    },

    /// A file descriptor that was expected to be a dma-buf is not one.
    #[error("fd {fd} is not a dma-buf: {problem}")]
    NotDmaBuf {
        /// The raw fd number, for the message only.
        fd: i32,
        /// What it is instead, or why it could not be checked.
        problem: String,
    },

    /// iommufd cannot import this dma-buf: it has more than one range, or it is
    /// not a VFIO (P2P) dma-buf. `IOMMU_IOAS_MAP_FILE` answered `EOPNOTSUPP`.
    #[error("iommufd cannot import dma-buf {buffer}: {problem}")]
    NotImportable {
        /// The buffer, e.g. `"udmabuf (64 KiB)"` or `"vfio_pci_core, 2 ranges"`.
        buffer: String,
        /// Why.
        problem: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    /// The exporter has revoked the buffer (`ENODEV` from the kernel, or
    /// known revoked before asking it).
    #[error("dma-buf {buffer} is revoked by its exporter")]
    Revoked {
        /// The buffer.
        buffer: String,
        /// The kernel's answer (`ENODEV`) when the kernel refused; `None`
        /// when the library knew the buffer revoked without asking.
        #[source]
        source: Option<io::Error>,
    },

    /// The exporter does not allow `mmap` of this dma-buf.
    #[error("mmap of dma-buf {buffer} refused by exporter {exporter}: {source}")]
    MmapRefused {
        /// The buffer.
        buffer: String,
        /// The exporter name from fdinfo.
        exporter: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    /// A memfd breaks a udmabuf rule (seals, size, alignment).
    #[error("memfd for udmabuf: {problem}")]
    Memfd {
        /// Which rule.
        problem: String,
    },

    /// An IOVA is unusable: misaligned, outside the allowed ranges, or taken.
    #[error("IOVA {iova:#x} (+{length:#x}) in IOAS {ioas}: {problem}")]
    InvalidIova {
        /// The IOAS id.
        ioas: u32,
        /// The requested IOVA.
        iova: u64,
        /// The requested length.
        length: u64,
        /// What is wrong.
        problem: String,
        /// The kernel's answer (`EEXIST`, `ENOSPC`, `EOVERFLOW`, `EINVAL`)
        /// when the kernel refused; `None` when checked before any ioctl.
        #[source]
        source: Option<io::Error>,
    },

    /// Text (sysfs, fdinfo, a PCI address, a range spec) could not be parsed.
    #[error("cannot parse {what} {input:?}: {problem}")]
    Parse {
        /// What kind of text, e.g. `"PCI address"`.
        what: &'static str,
        /// The input, possibly shortened.
        input: String,
        /// What is wrong with it.
        problem: String,
    },

    /// A PCI device is bound to another driver than the one needed (or to none).
    #[error("PCI device {device}: bound to {}, not {expected}", driver.as_deref().unwrap_or("no driver"))]
    WrongDriver {
        /// The PCI address.
        device: String,
        /// The driver it is bound to, if any.
        driver: Option<String>,
        /// The driver that is needed, e.g. `"vfio-pci"`.
        expected: String,
    },

    /// The device or object does not support the operation (for example
    /// `VFIO_DEVICE_RESET` on a device without a reset method, or `mmap` of a
    /// region without the `MMAP` flag). Checked before any ioctl.
    #[error("{target}: {operation} is not supported: {problem}")]
    Unsupported {
        /// What it was asked of, e.g. `"0000:00:03.0"` or `"0000:00:03.0 BAR0"`.
        target: String,
        /// The operation, e.g. `"VFIO_DEVICE_RESET"`.
        operation: &'static str,
        /// Why not.
        problem: String,
        /// The kernel's answer, when it was the kernel that refused
        /// (e.g. `ENOTTY` for an interface the kernel lacks); `None` when
        /// checked before any ioctl.
        #[source]
        source: Option<io::Error>,
    },

    /// An iommufd object ID (IOAS, HWPT, device) that does not exist in this
    /// iommufd context, or is of the wrong type (`ENOENT` from the kernel).
    #[error("{op}: no iommufd object {id} of the right type in {target}: {source}")]
    UnknownObject {
        /// The operation, e.g. `"VFIO_DEVICE_ATTACH_IOMMUFD_PT"`.
        op: &'static str,
        /// What it was applied to, e.g. `"0000:00:03.0"` or `"/dev/iommu"`.
        target: String,
        /// The object ID given.
        id: u32,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    /// A dma-buf name that `DMA_BUF_SET_NAME` would refuse: longer than 31
    /// bytes, or with a NUL byte. Checked before the ioctl.
    #[error("cannot name dma-buf {buffer} {name:?}: {problem}")]
    InvalidName {
        /// The buffer being named (empty when only the name was checked).
        buffer: String,
        /// The name that was asked for.
        name: String,
        /// What is wrong with it.
        problem: String,
    },

    /// No dma-heap of this name exists.
    #[error("no dma-heap {name:?} in {dir} (available: {})", .available.join(", "))]
    HeapNotFound {
        /// The heap name that was asked for.
        name: String,
        /// The directory searched, normally `/dev/dma_heap`.
        dir: String,
        /// The heaps that do exist there.
        available: Vec<String>,
    },

    /// A udmabuf request over one of the udmabuf module's limits
    /// (`/sys/module/udmabuf/parameters/`). Checked before the ioctl.
    #[error("udmabuf {limit} is {max}, but the request needs {requested}")]
    UdmabufLimit {
        /// Which parameter: `"list_limit"` (items per list) or
        /// `"size_limit_mb"` (total MiB).
        limit: &'static str,
        /// The parameter's value.
        max: u64,
        /// What the request needs, in the parameter's unit (items, or MiB
        /// rounded up).
        requested: u64,
    },
    /// An operation did not finish in time (a DMA copy, a device request).
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after: std::time::Duration,
    },

    /// An allowed-IOVA list for [`Ioas::allow_iovas`](crate::Ioas::allow_iovas)
    /// that cannot be set: a range that is empty or overlaps another (checked
    /// before the ioctl), or one that covers IOVAs reserved in the IOAS
    /// (`EADDRINUSE` from the kernel). The kernel kept the previous list.
    #[error("allowed IOVA range #{index} {range} for IOAS {ioas}: {problem}")]
    InvalidAllowedIova {
        /// The IOAS id.
        ioas: u32,
        /// The position of the offending range in the list given.
        index: usize,
        /// The offending range.
        range: IovaRange,
        /// What is wrong with it.
        problem: AllowedIovaProblem,
    },

    /// The kernel refused to read or set an iommufd option (`IOMMU_OPTION`).
    #[error("{target}: IOMMU_OPTION {option} refused: {problem}")]
    OptionRefused {
        /// The option and, for a set, the value, e.g. `"RLIMIT_MODE = mm"` or
        /// `"HUGE_PAGES of IOAS 2 = off"`.
        option: String,
        /// The iommufd, e.g. `"iommufd (fd 3)"`.
        target: String,
        /// Why, in words.
        problem: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },

    /// A kernel importer (a DRM device's PRIME import) refused a dma-buf,
    /// for the reason `why` (read from what the kernel answered and what
    /// the library knows of the importer and the PCI path), or the library
    /// refused it before asking, for an import that would succeed and not
    /// work ([`ImportRefusal::MultiRangeBlob`]).
    #[cfg(feature = "drm")]
    #[error("{importer} refused dma-buf {buffer}: {why}")]
    ImportRefused {
        /// The importer, e.g. `"/dev/dri/card0 (virtio_gpu, 0000:03:00.0)"`.
        importer: String,
        /// The buffer.
        buffer: String,
        /// Why.
        why: ImportRefusal,
        /// The kernel's answer (`EOPNOTSUPP`, `EINVAL`); `None` when the
        /// library refused before asking.
        #[source]
        source: Option<io::Error>,
    },

    /// A message of the buffer-sharing protocol ([`crate::share`]) was refused,
    /// or the connection it needed is over. Every fd that came with a refused
    /// message was closed.
    #[cfg(feature = "share")]
    #[error("buffer sharing over {peer}: {problem}")]
    Share {
        /// The other end, e.g. `"socket /tmp/bar.sock"`.
        peer: String,
        /// What is wrong.
        problem: ShareProblem,
    },
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds [`Error::Sys`] from an [`io::Error`].
    pub(crate) fn sys(op: &'static str, target: impl Into<String>, source: io::Error) -> Self {
        Self::Sys {
            op,
            target: target.into(),
            source,
        }
    }

    /// The errno behind this error: `Some` for every error the kernel
    /// answered (a failed system call, a revoked buffer's `ENODEV`, an IOVA
    /// the kernel refused, a device the kernel would not open or use, ...),
    /// `None` for what was refused before asking it.
    ///
    /// ```
    /// use dmabuf_p2p::Error;
    /// let by_kernel = Error::Revoked {
    ///     buffer: "vfio_pci_core dma-buf".into(),
    ///     source: Some(std::io::Error::from_raw_os_error(libc::ENODEV)),
    /// };
    /// assert_eq!(by_kernel.raw_os_error(), Some(libc::ENODEV));
    /// let known = Error::Revoked { buffer: "IOVA 0x1000".into(), source: None };
    /// assert_eq!(known.raw_os_error(), None);
    /// ```
    pub fn raw_os_error(&self) -> Option<i32> {
        // Every variant named: a new one must say whether it holds an errno.
        match self {
            Self::Sys { source, .. }
            | Self::NotImportable { source, .. }
            | Self::MmapRefused { source, .. }
            | Self::UnknownObject { source, .. }
            | Self::OptionRefused { source, .. } => source.raw_os_error(),
            Self::Revoked { source, .. }
            | Self::InvalidIova { source, .. }
            | Self::InvalidRegion { source, .. }
            | Self::Device { source, .. }
            | Self::Unsupported { source, .. } => source.as_ref().and_then(io::Error::raw_os_error),
            #[cfg(feature = "drm")]
            Self::ImportRefused { source, .. } => source.as_ref().and_then(io::Error::raw_os_error),
            Self::InvalidAllowedIova { problem, .. } => match problem {
                AllowedIovaProblem::Reserved { .. } => Some(libc::EADDRINUSE),
                AllowedIovaProblem::Empty | AllowedIovaProblem::Overlaps { .. } => None,
            },
            Self::InvalidRange { .. }
            | Self::NotDmaBuf { .. }
            | Self::Memfd { .. }
            | Self::Parse { .. }
            | Self::WrongDriver { .. }
            | Self::InvalidName { .. }
            | Self::HeapNotFound { .. }
            | Self::UdmabufLimit { .. }
            | Self::Timeout { .. } => None,
            #[cfg(feature = "share")]
            Self::Share { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ByteRange, IovaRange, RangeProblem};

    fn errno(n: i32) -> io::Error {
        io::Error::from_raw_os_error(n)
    }

    /// `raw_os_error` of a variant built with and without the kernel's
    /// answer.
    fn both(make: impl Fn(Option<io::Error>) -> Error, n: i32) {
        assert_eq!(make(Some(errno(n))).raw_os_error(), Some(n));
        assert_eq!(make(None).raw_os_error(), None);
    }

    #[test]
    fn sys() {
        let e = Error::sys("open", "/dev/iommu", errno(libc::ENOENT));
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn invalid_range_is_checked_before_the_kernel() {
        let e = Error::InvalidRange {
            target: "BAR2".into(),
            range: ByteRange::new(1, 0),
            problem: RangeProblem::Empty,
        };
        assert_eq!(e.raw_os_error(), None);
    }

    #[test]
    fn invalid_region() {
        both(
            |source| Error::InvalidRegion {
                device: "0000:00:03.0".into(),
                index: 99,
                problem: "past the device's regions".into(),
                source,
            },
            libc::EINVAL,
        );
    }

    /// Adopting a cdev that was never bound: the kernel's `EINVAL` is the
    /// source, and `raw_os_error` says so.
    #[test]
    fn device() {
        both(
            |source| Error::Device {
                device: "0000:00:03.0".into(),
                problem: "not bound to an iommufd".into(),
                source,
            },
            libc::EINVAL,
        );
    }

    #[test]
    fn not_dmabuf() {
        let e = Error::NotDmaBuf {
            fd: 3,
            problem: "a regular file".into(),
        };
        assert_eq!(e.raw_os_error(), None);
    }

    #[test]
    fn not_importable() {
        let e = Error::NotImportable {
            buffer: "udmabuf (64 KiB)".into(),
            problem: "not a VFIO dma-buf".into(),
            source: errno(libc::EOPNOTSUPP),
        };
        assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP));
    }

    #[test]
    fn revoked() {
        both(
            |source| Error::Revoked {
                buffer: "vfio_pci_core".into(),
                source,
            },
            libc::ENODEV,
        );
    }

    #[test]
    fn mmap_refused() {
        let e = Error::MmapRefused {
            buffer: "BAR2".into(),
            exporter: "vfio_pci_core".into(),
            source: errno(libc::EINVAL),
        };
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn memfd() {
        let e = Error::Memfd {
            problem: "not sealed".into(),
        };
        assert_eq!(e.raw_os_error(), None);
    }

    #[test]
    fn invalid_iova() {
        both(
            |source| Error::InvalidIova {
                ioas: 2,
                iova: 0x1000,
                length: 0x1000,
                problem: "taken".into(),
                source,
            },
            libc::EEXIST,
        );
    }

    #[test]
    fn parse() {
        let e = Error::Parse {
            what: "PCI address",
            input: "nope".into(),
            problem: "no colon".into(),
        };
        assert_eq!(e.raw_os_error(), None);
    }

    #[test]
    fn wrong_driver() {
        let e = Error::WrongDriver {
            device: "0000:00:03.0".into(),
            driver: Some("nvme".into()),
            expected: "vfio-pci".into(),
        };
        assert_eq!(e.raw_os_error(), None);
    }

    #[test]
    fn unsupported() {
        both(
            |source| Error::Unsupported {
                target: "0000:00:03.0".into(),
                operation: "VFIO_DEVICE_RESET",
                problem: "no reset method".into(),
                source,
            },
            libc::ENOTTY,
        );
    }

    #[test]
    fn unknown_object() {
        let e = Error::UnknownObject {
            op: "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
            target: "0000:00:03.0".into(),
            id: 7,
            source: errno(libc::ENOENT),
        };
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn invalid_name() {
        let e = Error::InvalidName {
            buffer: String::new(),
            name: "x".repeat(40),
            problem: "too long".into(),
        };
        assert_eq!(e.raw_os_error(), None);
    }

    #[test]
    fn heap_not_found() {
        let e = Error::HeapNotFound {
            name: "cma".into(),
            dir: "/dev/dma_heap".into(),
            available: vec!["system".into()],
        };
        assert_eq!(e.raw_os_error(), None);
    }

    #[test]
    fn udmabuf_limit() {
        let e = Error::UdmabufLimit {
            limit: "list_limit",
            max: 1024,
            requested: 2048,
        };
        assert_eq!(e.raw_os_error(), None);
    }

    #[test]
    fn timeout() {
        let e = Error::Timeout {
            what: "a device request".into(),
            after: std::time::Duration::from_secs(1),
        };
        assert_eq!(e.raw_os_error(), None);
    }

    #[test]
    fn invalid_allowed_iova() {
        let e = |problem| Error::InvalidAllowedIova {
            ioas: 2,
            index: 0,
            range: IovaRange::new(0x1000, 0x1fff),
            problem,
        };
        let usable = vec![IovaRange::new(0, 0xfedf_ffff)];
        assert_eq!(
            e(AllowedIovaProblem::Reserved { usable }).raw_os_error(),
            Some(libc::EADDRINUSE)
        );
        assert_eq!(e(AllowedIovaProblem::Empty).raw_os_error(), None);
    }

    #[test]
    fn option_refused() {
        let e = Error::OptionRefused {
            option: "RLIMIT_MODE = mm".into(),
            target: "iommufd (fd 3)".into(),
            problem: "needs CAP_SYS_RESOURCE".into(),
            source: errno(libc::EPERM),
        };
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    #[cfg(feature = "share")]
    #[test]
    fn share() {
        let e = Error::Share {
            peer: "socket /run/x.sock".into(),
            problem: ShareProblem::Disconnected("closed".into()),
        };
        assert_eq!(e.raw_os_error(), None);
    }
}
