//! Byte ranges and their checks (pure arithmetic, host-tested).

use std::fmt;

/// A byte range `[offset, offset + length)` inside some object (a BAR, a buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
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
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{:#x}", self.offset, self.length)
    }
}
