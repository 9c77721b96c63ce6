//! Byte ranges inside an object and the CPU physical ranges behind them, with
//! checked arithmetic, and [`RangeProblem`], what a check finds wrong. A
//! leaf: the error type names these; checks of range lists and parsing live
//! in [`crate::range`].

use std::fmt;

/// A byte range `[offset, offset + length)` inside some object (a BAR, a buffer).
///
/// Its text form, used by [`fmt::Display`] and [`FromStr`](std::str::FromStr), is `OFFSET+LEN`:
///
/// ```
/// use dmabuf_p2p::ByteRange;
///
/// let r: ByteRange = "0x1000+8K".parse()?;
/// assert_eq!(r, ByteRange::new(0x1000, 0x2000));
/// assert_eq!(r.to_string(), "0x1000+0x2000");
/// assert_eq!(r.end(), Some(0x3000));
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct ByteRange {
    /// Start, in bytes from the start of the object.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

impl ByteRange {
    /// A range of `length` bytes at `offset`.
    pub const fn new(offset: u64, length: u64) -> Self {
        Self { offset, length }
    }

    /// The exclusive end, `offset + length`, or `None` if it does not fit in 64 bits.
    ///
    /// ```
    /// use dmabuf_p2p::ByteRange;
    /// assert_eq!(ByteRange::new(0x1000, 0x1000).end(), Some(0x2000));
    /// assert_eq!(ByteRange::new(u64::MAX, 1).end(), None);
    /// ```
    pub const fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }

    /// Whether the range has length zero.
    pub const fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Whether byte `pos` lies inside the range. An empty range contains nothing.
    ///
    /// Works for ranges whose end does not fit in 64 bits, too.
    ///
    /// ```
    /// use dmabuf_p2p::ByteRange;
    /// let r = ByteRange::new(0x1000, 0x1000);
    /// assert!(r.contains(0x1000) && r.contains(0x1fff));
    /// assert!(!r.contains(0x2000) && !r.contains(0xfff));
    /// ```
    pub const fn contains(&self, pos: u64) -> bool {
        // `pos - offset` cannot underflow once `pos >= offset`.
        pos >= self.offset && pos - self.offset < self.length
    }

    /// Whether `other` lies entirely inside `self`. An empty `other` is inside
    /// `self` if its offset is within `[offset, offset + length]`.
    ///
    /// ```
    /// use dmabuf_p2p::ByteRange;
    /// let bar = ByteRange::new(0, 0x10000);
    /// assert!(bar.contains_range(&ByteRange::new(0x1000, 0x2000)));
    /// assert!(!bar.contains_range(&ByteRange::new(0xf000, 0x2000)));
    /// ```
    pub const fn contains_range(&self, other: &ByteRange) -> bool {
        if other.offset < self.offset {
            return false;
        }
        let rel = other.offset - self.offset;
        // Everything is compared as distances from `self.offset`, so no sum of
        // two arbitrary u64 values is ever formed.
        rel <= self.length && other.length <= self.length - rel
    }

    /// Whether the two ranges share at least one byte. Empty ranges overlap nothing.
    ///
    /// ```
    /// use dmabuf_p2p::ByteRange;
    /// let a = ByteRange::new(0x0, 0x2000);
    /// assert!(a.overlaps(&ByteRange::new(0x1000, 0x2000)));
    /// assert!(!a.overlaps(&ByteRange::new(0x2000, 0x1000)));
    /// ```
    pub const fn overlaps(&self, other: &ByteRange) -> bool {
        if self.length == 0 || other.length == 0 {
            return false;
        }
        if self.offset <= other.offset {
            other.offset - self.offset < self.length
        } else {
            self.offset - other.offset < other.length
        }
    }

    /// Whether offset and length are both multiples of `align`. An `align` of 0
    /// or 1 means "no alignment required".
    pub const fn is_aligned(&self, align: u64) -> bool {
        align <= 1 || (self.offset.is_multiple_of(align) && self.length.is_multiple_of(align))
    }

    /// Checks that the range is usable inside an object of `size` bytes whose
    /// ranges must be aligned to `align` bytes (0 or 1: no alignment rule).
    ///
    /// The checks run in this order and the first failing one is reported:
    /// length zero ([`RangeProblem::Empty`]), offset or length not a multiple of
    /// `align` ([`RangeProblem::Unaligned`]), `offset + length` beyond 64 bits
    /// ([`RangeProblem::Overflow`]), end past `size` ([`RangeProblem::OutOfBounds`]).
    ///
    /// ```
    /// use dmabuf_p2p::{ByteRange, RangeProblem};
    /// let page = 4096;
    /// assert_eq!(ByteRange::new(0, 0x2000).check_in(0x2000, page), Ok(()));
    /// assert_eq!(ByteRange::new(0, 0).check_in(0x2000, page), Err(RangeProblem::Empty));
    /// assert_eq!(
    ///     ByteRange::new(0x1000, 0x2000).check_in(0x2000, page),
    ///     Err(RangeProblem::OutOfBounds { end: 0x3000, size: 0x2000 })
    /// );
    /// ```
    pub fn check_in(self, size: u64, align: u64) -> Result<(), RangeProblem> {
        if self.length == 0 {
            return Err(RangeProblem::Empty);
        }
        if !self.is_aligned(align) {
            return Err(RangeProblem::Unaligned { align });
        }
        let end = self.end().ok_or(RangeProblem::Overflow)?;
        if end > size {
            return Err(RangeProblem::OutOfBounds { end, size });
        }
        Ok(())
    }

    /// The physical range this BAR-relative range occupies when the BAR starts
    /// at physical address `bar_start`. Fails with [`RangeProblem::Overflow`] if
    /// `bar_start + offset + length` does not fit in 64 bits (the kernel answers
    /// `EOVERFLOW` in that case).
    ///
    /// ```
    /// use dmabuf_p2p::{ByteRange, range::PhysRange};
    /// let p = ByteRange::new(0x1000, 0x2000).to_phys(0xfe00_0000)?;
    /// assert_eq!(p, PhysRange::new(0xfe00_1000, 0x2000));
    /// # Ok::<(), dmabuf_p2p::RangeProblem>(())
    /// ```
    pub fn to_phys(self, bar_start: u64) -> Result<PhysRange, RangeProblem> {
        let start = bar_start
            .checked_add(self.offset)
            .ok_or(RangeProblem::Overflow)?;
        start
            .checked_add(self.length)
            .ok_or(RangeProblem::Overflow)?;
        Ok(PhysRange {
            start,
            length: self.length,
        })
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{:#x}", self.offset, self.length)
    }
}

/// A range of CPU physical addresses, `[start, start + length)`.
///
/// Displayed in hex with an exclusive end, `0xfe001000..0xfe003000`; the end is
/// computed in 128 bits so even a range ending at 2^64 prints correctly.
///
/// ```
/// use dmabuf_p2p::range::PhysRange;
/// assert_eq!(PhysRange::new(0xfe00_1000, 0x2000).to_string(), "0xfe001000..0xfe003000");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PhysRange {
    /// First physical address.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
}

impl PhysRange {
    /// A physical range of `length` bytes at `start`.
    pub const fn new(start: u64, length: u64) -> Self {
        Self { start, length }
    }

    /// The exclusive end, or `None` if it does not fit in 64 bits.
    pub const fn end(&self) -> Option<u64> {
        self.start.checked_add(self.length)
    }

    /// The page frame numbers `[first, last]` this range touches for pages of
    /// `page` bytes, or `None` for an empty range, a zero page size, or an end
    /// past 2^64.
    ///
    /// ```
    /// use dmabuf_p2p::range::PhysRange;
    /// assert_eq!(PhysRange::new(0x1800, 0x1000).pfns(0x1000), Some((1, 2)));
    /// ```
    pub const fn pfns(&self, page: u64) -> Option<(u64, u64)> {
        if page == 0 || self.length == 0 {
            return None;
        }
        match self.start.checked_add(self.length - 1) {
            Some(last) => Some((self.start / page, last / page)),
            None => None,
        }
    }
}

impl fmt::Display for PhysRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end = u128::from(self.start) + u128::from(self.length);
        write!(f, "{:#x}..{:#x}", self.start, end)
    }
}

/// What is wrong with a [`ByteRange`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RangeProblem {
    /// Length zero.
    #[error("length is zero")]
    Empty,
    /// Offset or length is not a multiple of the page size.
    #[error("not aligned to {align:#x} bytes")]
    Unaligned {
        /// The required alignment.
        align: u64,
    },
    /// `offset + length` does not fit in 64 bits.
    #[error("offset + length overflows")]
    Overflow,
    /// The range ends past the end of the object.
    #[error("ends past the end ({end:#x} > {size:#x})")]
    OutOfBounds {
        /// Where the range ends (exclusive).
        end: u64,
        /// The object's size.
        size: u64,
    },
    /// Too many ranges, or none.
    #[error("{0}")]
    Count(String),
    /// The lengths of a range list add up to more than 64 bits can hold.
    #[error("total length of the ranges overflows 64 bits")]
    TotalOverflow,
    /// The lengths of a range list add up to a total with bit 63 set, which the
    /// kernel refuses for a dma-buf export.
    #[error("total length {total:#x} is too large (bit 63 set)")]
    TotalTooLarge {
        /// The running total when it first reached 2^63.
        total: u64,
    },
}
