//! An IOVA range as the kernel reports it, and [`AllowedIovaProblem`], what
//! is wrong with one range of an allowed-IOVA list. A leaf: the error type
//! names these.

use std::fmt;

/// One usable IOVA range, `start..=last` (inclusive, as the kernel reports it).
///
/// ```no_run
/// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
/// for r in ioas.iova_ranges()?.ranges {
///     println!("{:#x}..={:#x}", r.start, r.last);
/// }
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IovaRange {
    /// First usable IOVA.
    pub start: u64,
    /// Last usable IOVA (inclusive).
    pub last: u64,
}

impl IovaRange {
    /// The range `start..=last`.
    pub const fn new(start: u64, last: u64) -> Self {
        Self { start, last }
    }

    /// Whether `[iova, iova + length)` lies entirely in this range. An empty
    /// or overflowing request is never contained.
    ///
    /// ```
    /// use dmabuf_p2p::importer::iommufd::IovaRange;
    /// let r = IovaRange::new(0x1000, 0xffff);
    /// assert!(r.contains(0x1000, 0xf000));
    /// assert!(!r.contains(0x1000, 0xf001));
    /// assert!(!r.contains(0x2000, 0));
    /// ```
    pub const fn contains(&self, iova: u64, length: u64) -> bool {
        if length == 0 || iova < self.start {
            return false;
        }
        match iova.checked_add(length - 1) {
            Some(last) => last <= self.last,
            None => false,
        }
    }
}

impl fmt::Display for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..={:#x}", self.start, self.last)
    }
}

/// What is wrong with one range of an allowed-IOVA list
/// ([`Error::InvalidAllowedIova`](crate::Error::InvalidAllowedIova)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllowedIovaProblem {
    /// `start` is not below `last`: the kernel refuses empty and one-byte
    /// ranges alike (`EINVAL`).
    #[error("start is not below last")]
    Empty,
    /// It overlaps another range of the same list (`EINVAL`).
    #[error("overlaps range #{other} {with}")]
    Overlaps {
        /// The position of the other range in the list.
        other: usize,
        /// The other range.
        with: IovaRange,
    },
    /// It covers IOVAs that are reserved in the IOAS (the MSI window or
    /// what lies outside the IOMMU's aperture, once a device is attached):
    /// `EADDRINUSE`. `usable` is what `IOMMU_IOAS_IOVA_RANGES` reported
    /// afterwards.
    #[error(
        "covers reserved IOVAs (EADDRINUSE); the usable ranges are {}",
        join_ranges(usable)
    )]
    Reserved {
        /// The IOAS's usable ranges.
        usable: Vec<IovaRange>,
    },
}

fn join_ranges(ranges: &[IovaRange]) -> String {
    let list: Vec<String> = ranges.iter().map(ToString::to_string).collect();
    list.join(", ")
}
