//! Automatic IOVA placement that keeps large IOMMU pages: the arithmetic
//! (pure, host-tested), and, crate-private, the one home of what placement
//! knows of each IOAS (its mapped areas, usable windows, allowed list and
//! page sizes) and of the lock it holds while it picks.
//!
//! An IOMMU maps a buffer with a page of size `p` only where the IOVA and the
//! physical address agree modulo `p`. The kernel's own automatic placement
//! aligns to at most `PAGE_SIZE`, or 2 MiB with transparent huge pages, so a
//! 1 GiB BAR it places gets 2 MiB or 4 KiB IOMMU pages where one 1 GiB page
//! would do. [`pick_iova`] picks instead, inside the usable IOVA windows and
//! free of the areas already mapped ([`IovaSet`]), the lowest IOVA congruent
//! to the buffer's physical start modulo the largest page size that fits the
//! buffer ([`IommuPageSizes::alignment_for`]), falling back to smaller page
//! sizes only when no such IOVA is free.
//!
//! ```
//! use dmabuf_p2p::importer::placement::{pick_iova, IommuPageSizes, IovaSet, PlacementRequest};
//!
//! let mut taken = IovaSet::new();
//! taken.insert(0x1000, 0x1000);
//! let sizes = IommuPageSizes::X86;
//! let req = PlacementRequest { length: 1 << 30, residue: 0, max_alignment: sizes.alignment_for(1 << 30), page_sizes: sizes };
//! let usable = [0..=0xfedf_ffff, 0xfef0_0000..=u64::MAX];
//! assert_eq!(pick_iova(&usable, &taken, 0x1000, &req), Some(1 << 30));
//! ```

use std::fmt;
use std::io;
use std::ops::RangeInclusive;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::importer::iommufd::iova::{IovaPlacement, IovaRange, IovaRanges};

/// The page sizes an IOMMU domain can use, as a bitmap (bit `n` set: pages of
/// `2^n` bytes), like the kernel's `pgsize_bitmap` and type1's
/// `iova_pgsizes`.
///
/// ```
/// use dmabuf_p2p::importer::placement::IommuPageSizes;
/// let x86 = IommuPageSizes::X86;
/// assert_eq!(x86.bits(), 0x4020_1000);
/// assert_eq!(x86.largest(), 1 << 30);
/// assert_eq!(x86.alignment_for(64 << 20), 2 << 20);
/// assert_eq!(x86.alignment_for(4096), 4096);
/// assert_eq!(x86.alignment_for(100), 4096);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IommuPageSizes(u64);

impl IommuPageSizes {
    /// 4 KiB, 2 MiB and 1 GiB: what x86 IOMMUs (VT-d second-level tables,
    /// AMD-Vi) and the emulated VT-d of the test VM offer, and what ARM SMMUs
    /// with a 4 KiB granule offer too. The default when nothing better is
    /// known.
    pub const X86: Self = Self((1 << 12) | (1 << 21) | (1 << 30));

    /// A bitmap as the kernel reports it; bits below 4 KiB are ignored and an
    /// empty map becomes 4 KiB only.
    ///
    /// ```
    /// use dmabuf_p2p::importer::placement::IommuPageSizes;
    /// assert_eq!(IommuPageSizes::from_bits(0).bits(), 0x1000);
    /// assert_eq!(IommuPageSizes::from_bits(0x20_1fff).bits(), 0x20_1000);
    /// ```
    pub const fn from_bits(bits: u64) -> Self {
        let bits = bits & !0xfff;
        if bits == 0 { Self(1 << 12) } else { Self(bits) }
    }

    /// The bitmap.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// The largest page size.
    pub const fn largest(self) -> u64 {
        1 << (63 - self.0.leading_zeros())
    }

    /// The smallest page size.
    pub const fn smallest(self) -> u64 {
        1 << self.0.trailing_zeros()
    }

    /// The largest page size not larger than `length` (the smallest page
    /// size if none is): the IOVA alignment worth asking for a buffer of
    /// that length.
    pub const fn alignment_for(self, length: u64) -> u64 {
        let fitting = if length == 0 {
            0
        } else {
            // Bits 0..=log2(length).
            let top = 63 - length.leading_zeros();
            let mask = if top == 63 { u64::MAX } else { (2 << top) - 1 };
            self.0 & mask
        };
        if fitting == 0 {
            self.smallest()
        } else {
            1 << (63 - fitting.leading_zeros())
        }
    }

    /// The page sizes below `alignment`, largest first.
    fn below(self, alignment: u64) -> impl Iterator<Item = u64> {
        let mut rest = self.0 & alignment.wrapping_sub(1);
        std::iter::from_fn(move || {
            if rest == 0 {
                return None;
            }
            let p = 1 << (63 - rest.leading_zeros());
            rest &= !p;
            Some(p)
        })
    }
}

impl Default for IommuPageSizes {
    fn default() -> Self {
        Self::X86
    }
}

impl fmt::Display for IommuPageSizes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut rest = self.0;
        while rest != 0 {
            let p = 1u64 << rest.trailing_zeros();
            rest &= !p;
            let text = match p {
                p if p >= 1 << 30 => format!("{}G", p >> 30),
                p if p >= 1 << 20 => format!("{}M", p >> 20),
                p => format!("{}K", p >> 10),
            };
            if !first {
                f.write_str(",")?;
            }
            f.write_str(&text)?;
            first = false;
        }
        Ok(())
    }
}

/// A set of IOVA ranges, kept as disjoint, non-adjacent spans (adjacent
/// insertions merge), so that finding a hole costs the number of holes, not
/// the number of areas: the areas an IOAS handle knows to be mapped.
///
/// ```
/// use dmabuf_p2p::importer::placement::IovaSet;
/// let mut s = IovaSet::new();
/// s.insert(0x1000, 0x1000);
/// s.insert(0x2000, 0x1000);
/// assert_eq!(s.spans().collect::<Vec<_>>(), [0x1000..=0x2fff]);
/// s.remove(0x1000, 0x1000);
/// assert_eq!(s.spans().collect::<Vec<_>>(), [0x2000..=0x2fff]);
/// assert!(s.overlaps(0x2fff, 1) && !s.overlaps(0x3000, 0x1000));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IovaSet {
    /// (start, last) of each span, inclusive, ascending. A vector keeps its
    /// capacity: mapping and unmapping allocate nothing once it has grown.
    spans: Vec<(u64, u64)>,
}

impl IovaSet {
    /// The empty set.
    pub const fn new() -> Self {
        Self { spans: Vec::new() }
    }

    /// Whether nothing is in it.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The spans, ascending, as inclusive ranges.
    pub fn spans(&self) -> impl Iterator<Item = RangeInclusive<u64>> + '_ {
        self.spans.iter().map(|&(s, l)| s..=l)
    }

    /// The index of the first span whose last byte is at or after `pos`.
    #[inline]
    fn first_ending_at_or_after(&self, pos: u64) -> usize {
        self.spans.partition_point(|&(_, l)| l < pos)
    }

    /// Adds `[start, start + length)` (clamped at the end of the IOVA space).
    /// Empty ranges add nothing.
    #[inline]
    pub fn insert(&mut self, start: u64, length: u64) {
        let Some(last) = last_of(start, length) else {
            return;
        };
        // The usual case: past every span, not touching the last.
        if self
            .spans
            .last()
            .is_none_or(|&(_, end)| end.saturating_add(1) < start)
        {
            self.spans.push((start, last));
            return;
        }
        self.insert_among(start, last);
    }

    /// [`IovaSet::insert`] of `[start, last]` somewhere among the spans.
    fn insert_among(&mut self, start: u64, last: u64) {
        // Spans that overlap or touch the new one (end at start - 1 or
        // later, begin at last + 1 or earlier) merge with it.
        let lo = self.first_ending_at_or_after(start.saturating_sub(1));
        let hi = self
            .spans
            .partition_point(|&(s, _)| s <= last.saturating_add(1));
        if lo >= hi {
            self.spans.insert(lo, (start, last));
            return;
        }
        let first = start.min(self.spans[lo].0);
        let end = last.max(self.spans[hi - 1].1);
        self.spans[lo] = (first, end);
        // One span grown in place (an area mapped beside another, e.g. a
        // VMM's BAR moved back next to its neighbour): nothing to drain.
        if hi - lo > 1 {
            self.spans.drain(lo + 1..hi);
        }
    }

    /// Removes `[start, start + length)`, splitting spans as needed.
    #[inline]
    pub fn remove(&mut self, start: u64, length: u64) {
        let Some(last) = last_of(start, length) else {
            return;
        };
        let lo = self.first_ending_at_or_after(start);
        // The usual case: exactly one span, as it was inserted.
        if self.spans.get(lo) == Some(&(start, last)) {
            if lo + 1 == self.spans.len() {
                self.spans.pop();
            } else {
                self.spans.remove(lo);
            }
            return;
        }
        let hi = self.spans.partition_point(|&(s, _)| s <= last);
        if lo >= hi {
            return;
        }
        let (first, end) = (self.spans[lo].0, self.spans[hi - 1].1);
        // Inside one span (an area unmapped from among its neighbours):
        // shrink it in place, or split it in two.
        if hi - lo == 1 {
            match (first < start, end > last) {
                (false, false) => {
                    self.spans.remove(lo);
                }
                (true, false) => self.spans[lo].1 = start - 1,
                (false, true) => self.spans[lo].0 = last + 1,
                (true, true) => {
                    self.spans[lo].1 = start - 1;
                    self.spans.insert(lo + 1, (last + 1, end));
                }
            }
            return;
        }
        let mut keep = [None, None];
        if first < start {
            keep[0] = Some((first, start - 1));
        }
        if end > last {
            keep[1] = Some((last + 1, end));
        }
        self.spans.splice(lo..hi, keep.into_iter().flatten());
    }

    /// Whether any of `[start, start + length)` is in the set.
    #[inline]
    pub fn overlaps(&self, start: u64, length: u64) -> bool {
        let Some(last) = last_of(start, length) else {
            return false;
        };
        self.first_in(start, last).is_some()
    }

    /// The first span that intersects `[start, last]`, if any.
    fn first_in(&self, start: u64, last: u64) -> Option<(u64, u64)> {
        let i = self.first_ending_at_or_after(start);
        self.spans.get(i).copied().filter(|&(s, _)| s <= last)
    }
}

/// The inclusive last byte of `[start, start + length)`, clamped at
/// `u64::MAX`; `None` for an empty range.
fn last_of(start: u64, length: u64) -> Option<u64> {
    (length > 0).then(|| start.saturating_add(length - 1))
}

/// What [`pick_iova`] places.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementRequest {
    /// Bytes to map.
    pub length: u64,
    /// The buffer's first byte's physical address, or the best stand-in for
    /// it (a file offset, a user address, a source IOVA); only its value
    /// modulo the alignment matters. The IOVA is made congruent to it.
    pub residue: u64,
    /// The largest alignment worth having (a power of two): usually
    /// [`IommuPageSizes::alignment_for`] of the length, less when the
    /// buffer is known not to be contiguous that far.
    pub max_alignment: u64,
    /// The IOMMU's page sizes: the alignments tried below `max_alignment`
    /// when no IOVA with that alignment is free.
    pub page_sizes: IommuPageSizes,
}

/// The lowest IOVA, never 0, where `req` fits: inside one of the `usable`
/// windows (inclusive, ascending or not), outside `taken`, a multiple of
/// `ioas_alignment` (the IOAS's `out_iova_alignment`), and congruent to
/// `req.residue` modulo the largest alignment that allows a free spot,
/// starting from `req.max_alignment` and going down through the smaller
/// page sizes of `req.page_sizes` to `ioas_alignment`.
/// `None` if nothing fits, or if the residue cannot be honoured at all
/// (it is not a multiple of `ioas_alignment`).
pub fn pick_iova(
    usable: &[RangeInclusive<u64>],
    taken: &IovaSet,
    ioas_alignment: u64,
    req: &PlacementRequest,
) -> Option<u64> {
    let ioas_alignment = ioas_alignment.max(1);
    if req.length == 0 || !ioas_alignment.is_power_of_two() {
        return None;
    }
    let top = req.max_alignment.max(ioas_alignment);
    if !top.is_power_of_two() {
        return None;
    }
    let sizes = IommuPageSizes::from_bits(req.page_sizes.bits() | ioas_alignment);
    let tries = std::iter::once(top).chain(sizes.below(top));
    for align in tries.filter(|&a| a >= ioas_alignment) {
        let residue = req.residue & (align - 1);
        if !residue.is_multiple_of(ioas_alignment) {
            return None;
        }
        let mut best: Option<u64> = None;
        for w in usable {
            if let Some(iova) = first_fit(w, taken, req.length, align, residue)
                && best.is_none_or(|b| iova < b)
            {
                best = Some(iova);
            }
        }
        if best.is_some() {
            return best;
        }
    }
    None
}

/// The lowest `iova >= max(start, 1)` in window `w` with `iova % align ==
/// residue` such that `[iova, iova + length)` stays in `w` and misses `taken`.
fn first_fit(
    w: &RangeInclusive<u64>,
    taken: &IovaSet,
    length: u64,
    align: u64,
    residue: u64,
) -> Option<u64> {
    let (lo, hi) = (*w.start(), *w.end());
    let mut from = lo.max(1);
    loop {
        let iova = align_up_to(from, align, residue)?;
        let last = iova.checked_add(length - 1)?;
        if last > hi {
            return None;
        }
        match taken.first_in(iova, last) {
            None => return Some(iova),
            Some((_, l)) => from = l.checked_add(1)?,
        }
    }
}

/// The smallest `x >= from` with `x % align == residue` (`align` a power of
/// two, `residue < align`), or `None` past `u64::MAX`.
fn align_up_to(from: u64, align: u64, residue: u64) -> Option<u64> {
    let base = from & !(align - 1);
    let x = base | residue;
    if x >= from {
        Some(x)
    } else {
        x.checked_add(align)
    }
}

// ---------------------------------------------------------------------------
// The placement state of one IOAS
// ---------------------------------------------------------------------------

/// What automatic placement knows of one IOAS, and the lock it holds while
/// it picks: shared by every handle of the IOAS.
#[derive(Debug, Default)]
pub(crate) struct PlacementState {
    /// Held while an IOVA is picked and mapped (automatic placement) and
    /// across the unmap and map of a remap, so that a remap gets its IOVA
    /// back: no automatic placement through another handle of this IOAS can
    /// take the IOVA between the two.
    lock: Mutex<()>,
    /// What the library knows of the IOAS. Locked briefly, never across an
    /// ioctl.
    known: Mutex<Known>,
}

/// What automatic placement works from.
#[derive(Debug, Default)]
struct Known {
    /// The areas mapped through handles of this IOAS.
    areas: IovaSet,
    /// Areas mapped by someone else: declared by the owner
    /// ([`Ioas::declare_foreign_area`](crate::Ioas::declare_foreign_area):
    /// a VMM's guest RAM), or learned when the kernel refused a picked IOVA
    /// as taken.
    foreign: IovaSet,
    /// Where automatic placement may go: the usable ranges
    /// (`IOMMU_IOAS_IOVA_RANGES`) cut to the allowed list, with the IOAS's
    /// alignment; asked when first needed and again when the kernel refuses
    /// a picked IOVA as misaligned or reserved (a device attached since).
    windows: Option<(Vec<RangeInclusive<u64>>, u64)>,
    /// The allowed list set through
    /// [`Ioas::allow_iovas`](crate::Ioas::allow_iovas) (empty: none).
    allowed: Vec<IovaRange>,
    /// The IOMMU page sizes placement aligns for.
    page_sizes: IommuPageSizes,
}

/// The largest alignment automatic placement asks for memory whose physical
/// contiguity is unknown (memfd pages, user memory): transparent or
/// hugetlbfs huge pages of 2 MiB.
const UNKNOWN_CONTIGUITY_ALIGNMENT: u64 = 2 << 20;

/// What one map ioctl gives: the IOVA, or the operation's name and errno.
pub(crate) type MapResult = std::result::Result<u64, (&'static str, io::Error)>;

impl PlacementState {
    /// Takes the placement lock.
    pub(crate) fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[inline]
    fn known(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records an area mapped through a handle of this IOAS.
    #[inline(always)]
    pub(crate) fn record_mapped(&self, iova: u64, length: u64) {
        self.known().areas.insert(iova, length);
    }

    /// Forgets an area unmapped through a handle of this IOAS.
    #[inline(always)]
    pub(crate) fn record_unmapped(&self, iova: u64, length: u64) {
        self.known().areas.remove(iova, length);
    }

    /// Whether any of `[iova, iova + length)` is mapped through a handle
    /// of this IOAS.
    #[inline]
    pub(crate) fn overlaps_mapped(&self, iova: u64, length: u64) -> bool {
        self.known().areas.overlaps(iova, length)
    }

    /// Records an area mapped by someone else, which automatic placement
    /// avoids.
    pub(crate) fn declare_foreign(&self, iova: u64, length: u64) {
        self.known().foreign.insert(iova, length);
    }

    /// Forgets (part of) an area mapped by someone else.
    pub(crate) fn forget_foreign(&self, iova: u64, length: u64) {
        self.known().foreign.remove(iova, length);
    }

    /// A new allowed list ([`Ioas::allow_iovas`](crate::Ioas::allow_iovas)
    /// succeeded): the windows are asked again when next needed.
    pub(crate) fn set_allowed(&self, ranges: &[IovaRange]) {
        let mut known = self.known();
        known.allowed = ranges.to_vec();
        known.windows = None;
    }

    /// The IOMMU page sizes placement aligns for.
    pub(crate) fn page_sizes(&self) -> IommuPageSizes {
        self.known().page_sizes
    }

    /// Sets the IOMMU page sizes placement aligns for.
    pub(crate) fn set_page_sizes(&self, sizes: IommuPageSizes) {
        self.known().page_sizes = sizes;
    }

    /// The placement windows and the IOAS alignment, asked from the kernel
    /// (`usable`) if not known (or `refresh`). `None` if the kernel cannot
    /// say.
    fn windows(
        &self,
        refresh: bool,
        usable: &impl Fn() -> Option<IovaRanges>,
    ) -> Option<(Vec<RangeInclusive<u64>>, u64)> {
        if !refresh && let Some(w) = &self.known().windows {
            return Some(w.clone());
        }
        let ranges = usable()?;
        let mut known = self.known();
        let windows = placement_windows(&ranges.ranges, &known.allowed);
        known.windows = Some((windows, ranges.alignment));
        known.windows.clone()
    }

    /// An IOVA for `req`, outside the known and foreign areas.
    fn pick(
        &self,
        req: &PlacementRequest,
        refresh: bool,
        usable: &impl Fn() -> Option<IovaRanges>,
    ) -> Option<u64> {
        let (windows, alignment) = self.windows(refresh, usable)?;
        let known = self.known();
        if known.foreign.is_empty() {
            return pick_iova(&windows, &known.areas, alignment, req);
        }
        let mut taken = known.areas.clone();
        for span in known.foreign.spans() {
            taken.insert(*span.start(), span.end() - span.start() + 1);
        }
        pick_iova(&windows, &taken, alignment, req)
    }

    /// The placement request for `length` bytes whose first byte is at
    /// physical address (or stand-in) `residue`; `contiguous` says whether
    /// the memory is known to be physically contiguous.
    pub(crate) fn request(&self, length: u64, residue: u64, contiguous: bool) -> PlacementRequest {
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
    /// the IOVA is picked here, outside every area this IOAS's handles
    /// mapped and every foreign area declared or learned, and mapped fixed.
    /// No loop: if the kernel refuses the pick as taken (`EEXIST`: an area
    /// nobody declared), the refused range is learned as foreign and the
    /// kernel places the mapping itself (it knows every area); if it
    /// refuses it as misaligned or reserved (`EINVAL`: a device attached
    /// since the windows were asked), the windows are asked again and one
    /// more pick is made. So `Auto` makes at most three map calls and fails
    /// only when the kernel's own placement does (`ENOSPC`: no room).
    /// `usable` asks the kernel for the IOAS's usable ranges. The caller
    /// holds the placement lock for `Auto`. Returns the IOVA, or the
    /// placement of the failed call and its error.
    pub(crate) fn place(
        &self,
        at: IovaPlacement,
        usable: impl Fn() -> Option<IovaRanges>,
        request: impl FnOnce() -> PlacementRequest,
        mut issue: impl FnMut(IovaPlacement) -> MapResult,
    ) -> std::result::Result<u64, (IovaPlacement, &'static str, io::Error)> {
        if at == IovaPlacement::Auto {
            let req = &request();
            for refresh in [false, true] {
                let Some(iova) = self.pick(req, refresh, &usable) else {
                    break;
                };
                match issue(IovaPlacement::Fixed(iova)) {
                    Ok(got) => return Ok(got),
                    Err((_, e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                        self.declare_foreign(iova, req.length);
                        break;
                    }
                    // Misaligned or reserved: the windows changed; once.
                    Err((_, e)) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    // Not about the IOVA (revoked, not importable, ...).
                    Err((op, e)) => return Err((IovaPlacement::Auto, op, e)),
                }
            }
        }
        issue(at).map_err(|(op, e)| (at, op, e))
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M2: u64 = 2 << 20;

    #[test]
    fn alignment_follows_the_page_sizes() {
        let s = IommuPageSizes::X86;
        assert_eq!(s.alignment_for(G), G);
        assert_eq!(s.alignment_for(G - 4096), M2);
        assert_eq!(s.alignment_for(16 * G), G);
        assert_eq!(s.alignment_for(u64::MAX), G);
        assert_eq!(s.alignment_for(M2 - 1), 4096);
        assert_eq!(s.alignment_for(0), 4096);
        assert_eq!(s.below(G).collect::<Vec<_>>(), [M2, 4096]);
        assert_eq!(s.to_string(), "4K,2M,1G");
    }

    #[test]
    fn picks_the_large_page_alignment_past_small_areas() {
        let mut taken = IovaSet::new();
        taken.insert(0x1000, 0x3000);
        let req = PlacementRequest {
            length: G,
            residue: 0x38_0000_0000,
            max_alignment: G,
            page_sizes: IommuPageSizes::X86,
        };
        let usable = [0..=0xfedf_ffff, 0xfef0_0000..=(1 << 48) - 1];
        assert_eq!(pick_iova(&usable, &taken, 4096, &req), Some(G));
        // The BAR's physical start is 2 MiB past a 1 GiB boundary: so is the IOVA.
        let odd = PlacementRequest {
            residue: 0x38_0020_0000,
            ..req
        };
        assert_eq!(pick_iova(&usable, &taken, 4096, &odd), Some(M2));
        // 1 GiB to 4 GiB taken: the next 1 GiB-aligned spot is in the high window.
        taken.insert(G, 3 * G);
        assert_eq!(pick_iova(&usable, &taken, 4096, &req), Some(4 * G));
    }

    #[test]
    fn falls_back_to_smaller_pages_then_to_nothing() {
        let req = PlacementRequest {
            length: G,
            residue: 0,
            max_alignment: G,
            page_sizes: IommuPageSizes::X86,
        };
        // A window that holds 1 GiB only at a 2 MiB-aligned IOVA.
        let w = [(G / 2)..=(G / 2 + G + M2 - 1)];
        let taken = IovaSet::new();
        assert_eq!(pick_iova(&w, &taken, 4096, &req), Some(G / 2));
        let tight = [(G / 2 + 4096)..=(G / 2 + 4096 + G - 1)];
        assert_eq!(pick_iova(&tight, &taken, 4096, &req), Some(G / 2 + 4096));
        let small = [0x1000..=0x2fff];
        assert_eq!(pick_iova(&small, &taken, 4096, &req), None);
        // A residue the IOAS alignment cannot honour.
        let sub = PlacementRequest {
            length: 4096,
            residue: 0x10,
            max_alignment: 4096,
            page_sizes: IommuPageSizes::X86,
        };
        assert_eq!(pick_iova(&[0..=u64::MAX], &taken, 4096, &sub), None);
    }

    #[test]
    fn never_zero_and_never_past_the_end() {
        let taken = IovaSet::new();
        let req = PlacementRequest {
            length: 4096,
            residue: 0,
            max_alignment: 4096,
            page_sizes: IommuPageSizes::X86,
        };
        assert_eq!(pick_iova(&[0..=0xffff], &taken, 4096, &req), Some(0x1000));
        let top = [(u64::MAX - 0xfff)..=u64::MAX];
        assert_eq!(pick_iova(&top, &taken, 4096, &req), Some(u64::MAX - 0xfff));
        let past = PlacementRequest {
            length: 0x2000,
            ..req
        };
        assert_eq!(pick_iova(&top, &taken, 4096, &past), None);
    }

    #[test]
    fn set_merges_and_splits() {
        let mut s = IovaSet::new();
        s.insert(0x3000, 0x1000);
        s.insert(0x1000, 0x1000);
        s.insert(0x2000, 0x1000);
        assert_eq!(s.spans().collect::<Vec<_>>(), [0x1000..=0x3fff]);
        s.remove(0x2000, 0x1000);
        assert_eq!(
            s.spans().collect::<Vec<_>>(),
            [0x1000..=0x1fff, 0x3000..=0x3fff]
        );
        s.insert(u64::MAX - 0xfff, 0x1000);
        assert!(s.overlaps(u64::MAX, 1));
        s.remove(0, u64::MAX);
        assert_eq!(s.spans().count(), 1);
        s.remove(u64::MAX, 1);
        assert!(s.is_empty());
        // Prefix, suffix and middle of one span; growth beside one.
        s.insert(0x1000, 0x4000);
        s.remove(0x1000, 0x1000);
        s.remove(0x4000, 0x1000);
        assert_eq!(s.spans().collect::<Vec<_>>(), [0x2000..=0x3fff]);
        s.insert(0x4000, 0x1000);
        s.remove(0x3000, 0x1000);
        assert_eq!(
            s.spans().collect::<Vec<_>>(),
            [0x2000..=0x2fff, 0x4000..=0x4fff]
        );
    }

    /// Random inserts and removes of page runs against a page-by-page model
    /// (seed printed; 2000 steps).
    #[test]
    fn set_matches_a_page_model() {
        let seed = 0x5eed_1234_u64;
        println!("set_matches_a_page_model: seed {seed:#x}");
        let mut x = seed;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut s = IovaSet::new();
        let mut model = [false; 64];
        for _ in 0..2000 {
            let (first, pages) = (next(64), 1 + next(6));
            let pages = pages.min(64 - first);
            let add = next(2) == 0;
            if add {
                s.insert(first * 0x1000, pages * 0x1000);
            } else {
                s.remove(first * 0x1000, pages * 0x1000);
            }
            for p in first..first + pages {
                model[p as usize] = add;
            }
            let from_set: Vec<bool> = (0..64u64).map(|p| s.overlaps(p * 0x1000, 0x1000)).collect();
            assert_eq!(from_set, model);
            // Spans stay disjoint, ascending and never touching.
            let spans: Vec<_> = s.spans().collect();
            assert!(spans.windows(2).all(|w| w[0].end() + 1 < *w[1].start()));
        }
    }
}
