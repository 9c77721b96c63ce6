//! The IOVA values the iommufd calls take and return: the usable ranges of
//! an IOAS ([`IovaRanges`]) and where a mapping goes ([`IovaPlacement`]).
//! One range is [`IovaRange`], a plain value of `types/`.

use crate::sys;
pub use crate::types::IovaRange;

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
    pub(super) fn problem_with(&self, iova: u64, length: u64) -> Option<String> {
        let align = self.alignment.max(1);
        if !iova.is_multiple_of(align) || !length.is_multiple_of(align) {
            return Some(format!("IOVA and length must be multiples of {align:#x}"));
        }
        if !self.contains(iova, length) {
            let list: Vec<String> = self.ranges.iter().map(ToString::to_string).collect();
            return Some(format!(
                "not inside one usable IOVA range ({}; IOMMU address width {} bits)",
                list.join(", "),
                self.address_width()
            ));
        }
        None
    }

    /// The IOMMU address width the usable ranges imply: the bits needed for
    /// the highest usable IOVA (64 when they reach the top, as in an IOAS
    /// no device is attached to yet).
    ///
    /// ```
    /// use dmabuf_p2p::importer::iommufd::{IovaRange, IovaRanges};
    /// let r = IovaRanges::new(vec![IovaRange::new(0, 0xfedf_ffff), IovaRange::new(0xfef0_0000, (1 << 39) - 1)], 4096);
    /// assert_eq!(r.address_width(), 39);
    /// ```
    pub fn address_width(&self) -> u32 {
        self.ranges
            .iter()
            .map(|r| r.last)
            .max()
            .map_or(0, |top| 64 - top.leading_zeros())
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
    /// ([`Ioas::iommu_page_sizes`](crate::Ioas::iommu_page_sizes)), so that a 1 GiB BAR gets one 1 GiB
    /// IOMMU page. For memory without known physical contiguity (a memfd,
    /// user memory) the alignment is at most 2 MiB. Smaller alignments are
    /// used only when no such IOVA is free. The library maps at the IOVA it
    /// picked (`IOMMU_IOAS_MAP_FIXED_IOVA`), avoiding the areas mapped
    /// through any handle of the IOAS and the areas its owner declared
    /// ([`Ioas::declare_foreign_area`](crate::Ioas::declare_foreign_area):
    /// a VMM's guest RAM). An area nobody declared makes the kernel refuse
    /// the pick (`EEXIST`): the refused range is remembered and the kernel
    /// places that mapping itself (at most 2 MiB-aligned), as it does when
    /// nothing fits. No retry loop: at most three map calls, and a failure
    /// only when the kernel has no room either (`ENOSPC`).
    Auto,
    /// Exactly at this IOVA (`IOMMU_IOAS_MAP_FIXED_IOVA`).
    Fixed(u64),
}

impl IovaPlacement {
    /// The `iova` field and the flag bits for the kernel.
    #[inline]
    pub(super) fn to_arg(self) -> (u64, u32) {
        match self {
            Self::Auto => (0, 0),
            Self::Fixed(iova) => (iova, sys::IOMMU_IOAS_MAP_FIXED_IOVA),
        }
    }

    /// The IOVA to name in errors (0 for [`IovaPlacement::Auto`]).
    #[inline]
    pub(super) fn iova(self) -> u64 {
        self.to_arg().0
    }
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
    fn placement_flags() {
        assert_eq!(IovaPlacement::Auto.to_arg(), (0, 0));
        assert_eq!(
            IovaPlacement::Fixed(0x1000).to_arg(),
            (0x1000, sys::IOMMU_IOAS_MAP_FIXED_IOVA)
        );
    }
}
