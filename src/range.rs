//! Byte ranges and their checks (pure arithmetic, host-tested).
//!
//! * [`ByteRange`] (defined below the error type, re-exported here):
//!   `[offset, offset + length)` inside an object (a BAR, a buffer), with
//!   checked arithmetic, validation ([`ByteRange::check_in`]) and the CLI
//!   syntax `OFFSET+LEN` ([`str::parse`], implemented here).
//! * [`validate_export_ranges`]: the kernel's rules for the range list of a VFIO
//!   BAR dma-buf export, checked before any ioctl so the error names the range.
//! * [`PhysRange`] and [`map_to_phys`]: BAR-relative ranges turned into CPU
//!   physical ranges, without silent overflow.
//! * [`page_size`] and [`parse_size`]: small helpers the checks and the CLI share.

use std::str::FromStr;
use std::sync::OnceLock;

use crate::error::{Error, RangeProblem, Result};
pub use crate::types::{ByteRange, PhysRange};

/// The largest total length a VFIO dma-buf export accepts, plus one: the kernel
/// refuses a total with bit 63 set (`DMA_IOVA_USE_SWIOTLB`).
pub(crate) const TOTAL_LIMIT: u64 = 1 << 63;

impl FromStr for ByteRange {
    type Err = Error;

    /// Parses `OFFSET+LEN`. Each number is hexadecimal with a `0x` prefix or
    /// decimal, optionally followed by a binary size suffix (see [`parse_size`]).
    /// Surrounding whitespace is ignored. The range is not validated against
    /// any object here; use [`ByteRange::check_in`] for that.
    fn from_str(s: &str) -> Result<Self> {
        const WHAT: &str = "byte range";
        let t = s.trim();
        let Some((off, len)) = t.split_once('+') else {
            return Err(parse_error(WHAT, s, "expected OFFSET+LEN, e.g. 0x1000+4K"));
        };
        let offset = parse_number(off).map_err(|p| parse_error(WHAT, s, format!("offset: {p}")))?;
        let length = parse_number(len).map_err(|p| parse_error(WHAT, s, format!("length: {p}")))?;
        Ok(Self { offset, length })
    }
}

/// The CPU page size in bytes, from `sysconf(_SC_PAGESIZE)`, read once and cached.
///
/// Falls back to 4096 if `sysconf` gives no usable answer.
///
/// ```
/// let page = dmabuf_p2p::range::page_size();
/// assert!(page.is_power_of_two() && page >= 4096);
/// ```
#[inline]
pub fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
            Ok(Some(v)) => u64::try_from(v).ok().filter(|p| p.is_power_of_two()),
            _ => None,
        }
        .unwrap_or(4096)
    })
}

/// Checks the range list of a VFIO BAR dma-buf export against the kernel's
/// rules (uAPI reference D.2), before any ioctl, and returns the total length
/// (the size the dma-buf will have).
///
/// * the list must not be empty ([`RangeProblem::Count`]);
/// * each range must pass [`ByteRange::check_in`]`(bar_size, align)`;
/// * the sum of the lengths must fit in 64 bits ([`RangeProblem::TotalOverflow`])
///   and must not have bit 63 set ([`RangeProblem::TotalTooLarge`]).
///
/// Ranges may overlap, repeat or come in any order, as the kernel allows.
/// `target` names the BAR in the error, e.g. `"0000:00:04.0 BAR2 (1 MiB)"`; the
/// error's `range` is the first offending one (for an empty list, `0x0+0x0`).
///
/// ```
/// use dmabuf_p2p::{range::validate_export_ranges, ByteRange, Error, RangeProblem};
///
/// let ranges = [ByteRange::new(0, 0x1000), ByteRange::new(0x4000, 0x2000)];
/// assert_eq!(validate_export_ranges("BAR2", &ranges, 0x10000, 0x1000)?, 0x3000);
///
/// let bad = [ByteRange::new(0, 0x1000), ByteRange::new(0x800, 0x1000)];
/// match validate_export_ranges("BAR2", &bad, 0x10000, 0x1000) {
///     Err(Error::InvalidRange { range, problem: RangeProblem::Unaligned { .. }, .. }) => {
///         assert_eq!(range, bad[1]);
///     }
///     other => panic!("unexpected {other:?}"),
/// }
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn validate_export_ranges(
    target: &str,
    ranges: &[ByteRange],
    bar_size: u64,
    align: u64,
) -> Result<u64> {
    let invalid = |range: ByteRange, problem: RangeProblem| Error::InvalidRange {
        target: target.to_owned(),
        range,
        problem,
    };
    if ranges.is_empty() {
        return Err(invalid(
            ByteRange::new(0, 0),
            RangeProblem::Count("no ranges given".to_owned()),
        ));
    }
    let mut total: u64 = 0;
    for &range in ranges {
        range
            .check_in(bar_size, align)
            .map_err(|p| invalid(range, p))?;
        total = total
            .checked_add(range.length)
            .ok_or_else(|| invalid(range, RangeProblem::TotalOverflow))?;
        if total >= TOTAL_LIMIT {
            return Err(invalid(range, RangeProblem::TotalTooLarge { total }));
        }
    }
    Ok(total)
}

/// Maps BAR-relative ranges to physical ranges, given the BAR's physical start
/// address. Every sum is checked: a range whose physical end does not fit in 64
/// bits gives [`Error::InvalidRange`] with [`RangeProblem::Overflow`], naming
/// `target` and the range. Bounds against the BAR size are not checked here
/// (see [`validate_export_ranges`]).
///
/// ```
/// use dmabuf_p2p::{range::{map_to_phys, PhysRange}, ByteRange};
/// let phys = map_to_phys("BAR2", 0xfe00_0000, &[ByteRange::new(0x1000, 0x1000)])?;
/// assert_eq!(phys, vec![PhysRange::new(0xfe00_1000, 0x1000)]);
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn map_to_phys(target: &str, bar_start: u64, ranges: &[ByteRange]) -> Result<Vec<PhysRange>> {
    ranges
        .iter()
        .map(|&range| {
            range
                .to_phys(bar_start)
                .map_err(|problem| Error::InvalidRange {
                    target: target.to_owned(),
                    range,
                    problem,
                })
        })
        .collect()
}

/// Parses a size or offset: `0x`-prefixed hex or decimal, optionally followed by
/// a binary suffix `K`, `M`, `G` or `T` (case-insensitive, optionally followed
/// by `iB`), meaning 2^10, 2^20, 2^30, 2^40. Surrounding whitespace is ignored.
///
/// ```
/// use dmabuf_p2p::range::parse_size;
/// assert_eq!(parse_size("4K")?, 4096);
/// assert_eq!(parse_size("0x2M")?, 0x20_0000);
/// assert_eq!(parse_size("1GiB")?, 1 << 30);
/// assert!(parse_size("12Q").is_err());
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn parse_size(s: &str) -> Result<u64> {
    parse_number(s).map_err(|p| parse_error("size", s, p))
}

/// The number parser behind [`parse_size`] and [`ByteRange::from_str`]; the
/// error is the problem text only.
fn parse_number(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty number".to_owned());
    }
    let (body, shift) = split_suffix(t);
    let value = if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        parse_digits(hex, 16).ok_or_else(|| format!("{body:?} is not a hex number"))?
    } else {
        parse_digits(body, 10)
            .ok_or_else(|| format!("{body:?} is not a number (decimal, or hex with 0x)"))?
    };
    if shift == 0 {
        return Ok(value);
    }
    if value.leading_zeros() < shift {
        return Err(format!("{t:?} does not fit in 64 bits"));
    }
    Ok(value << shift)
}

/// Splits a size suffix off `t`, returning the rest and the shift it means.
fn split_suffix(t: &str) -> (&str, u32) {
    let core = t
        .strip_suffix("iB")
        .filter(|c| {
            c.ends_with(|ch: char| matches!(ch.to_ascii_uppercase(), 'K' | 'M' | 'G' | 'T'))
        })
        .unwrap_or(t);
    let shift = match core.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => 10,
        Some('M') => 20,
        Some('G') => 30,
        Some('T') => 40,
        _ => return (t, 0),
    };
    // The suffix is one ASCII byte, so slicing it off stays on a char boundary.
    (&core[..core.len() - 1], shift)
}

/// Parses a non-empty run of ASCII digits in `radix` (no sign, no prefix).
pub(crate) fn parse_digits(s: &str, radix: u32) -> Option<u64> {
    if s.is_empty() || !s.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(s, radix).ok()
}

/// Builds [`Error::Parse`], shortening very long inputs so messages stay readable.
pub(crate) fn parse_error(what: &'static str, input: &str, problem: impl Into<String>) -> Error {
    const MAX: usize = 80;
    let input = if input.chars().count() > MAX {
        let mut short: String = input.chars().take(MAX).collect();
        short.push('…');
        short
    } else {
        input.to_owned()
    };
    Error::Parse {
        what,
        input,
        problem: problem.into(),
    }
}

/// Bytes as text, in the largest binary unit that divides them: `64 KiB`,
/// `2 MiB`, `3 GiB`, or `12345 bytes`. What the crate's messages use, and
/// the CLI's and the test bed's output.
///
/// ```
/// use dmabuf_p2p::range::human_size;
/// assert_eq!(human_size(64 << 10), "64 KiB");
/// assert_eq!(human_size(1 << 30), "1 GiB");
/// assert_eq!(human_size((6 << 20) + 4096), "6148 KiB");
/// assert_eq!(human_size(12345), "12345 bytes");
/// ```
pub fn human_size(n: u64) -> String {
    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match n {
        0 => "0 bytes".to_owned(),
        n if n % GIB == 0 => format!("{} GiB", n / GIB),
        n if n % MIB == 0 => format!("{} MiB", n / MIB),
        n if n % KIB == 0 => format!("{} KiB", n / KIB),
        n => format!("{n} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 bytes");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(2 << 20), "2 MiB");
        assert_eq!(human_size(3 << 30), "3 GiB");
        assert_eq!(human_size(5000), "5000 bytes");
    }

    #[test]
    fn suffixes() {
        assert_eq!(parse_number("2M"), Ok(2 << 20));
        assert_eq!(parse_number("2m"), Ok(2 << 20));
        assert_eq!(parse_number("0x10k"), Ok(0x4000));
        assert_eq!(parse_number("0x1b"), Ok(0x1b));
        assert_eq!(parse_number("3TiB"), Ok(3 << 40));
        assert!(parse_number("iB").is_err());
        assert!(parse_number("K").is_err());
        assert!(parse_number("+5").is_err());
        assert!(parse_number("16777216T").is_err());
        assert_eq!(parse_number("16777215T"), Ok(16_777_215 << 40));
    }

    #[test]
    fn contains_range_edges() {
        let all = ByteRange::new(0, u64::MAX);
        assert!(all.contains_range(&ByteRange::new(u64::MAX, 0)));
        assert!(!all.contains_range(&ByteRange::new(u64::MAX, 1)));
        assert!(ByteRange::new(5, 0).contains_range(&ByteRange::new(5, 0)));
    }
}
