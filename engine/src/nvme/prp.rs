//! Physical Region Page pointers for an IOVA-contiguous buffer: PRP1 holds
//! the first (possibly offset) page, PRP2 the second page or, for transfers
//! over two pages, the IOVA of a list of the remaining page addresses.
//! Planning allocates nothing: the list of a contiguous buffer is its pages
//! in order, so the plan is their first address and count.

use super::regs::PAGE;

/// Entries one list page holds. The driver uses one list page per command
/// and never chains, so a transfer covers at most this many pages after
/// the first.
pub const LIST_ENTRIES: u64 = PAGE / 8;

/// The data pointer of one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrpPlan {
    /// PRP entry 1: the start of the data.
    pub prp1: u64,
    /// PRP entry 2: zero, the second page, or the list's IOVA.
    pub prp2: u64,
    /// The first entry of the list to write at the list IOVA (the
    /// buffer's second page).
    pub list_first: u64,
    /// Entries of the list: pages `list_first`, `list_first + PAGE`, ...
    /// (zero when no list is needed).
    pub list_len: u64,
}

impl PrpPlan {
    /// The list's entries, in order.
    pub fn list(&self) -> impl ExactSizeIterator<Item = u64> + use<> {
        let first = self.list_first;
        // At most LIST_ENTRIES (`plan`).
        (0..self.list_len as usize).map(move |i| first + i as u64 * PAGE)
    }
}

/// Plans the PRPs for `len` bytes at IOVA `iova`, with the list (if needed)
/// at `list_iova`. `iova` must be dword aligned and `len` non-zero; `None`
/// when the transfer needs more list entries than one page holds or its
/// pages run past the end of the IOVA space.
///
/// ```
/// use dmabuf_p2p_engine::nvme::prp::plan;
/// // 3 pages from a page boundary: PRP1, then a list of the other two.
/// let p = plan(0x10_0000, 3 * 4096, 0x9000).unwrap();
/// assert_eq!((p.prp1, p.prp2), (0x10_0000, 0x9000));
/// assert_eq!(p.list().collect::<Vec<_>>(), vec![0x10_1000, 0x10_2000]);
/// ```
#[inline]
pub fn plan(iova: u64, len: u64, list_iova: u64) -> Option<PrpPlan> {
    let first = PAGE - iova % PAGE;
    if len <= first {
        return Some(PrpPlan {
            prp1: iova,
            prp2: 0,
            list_first: 0,
            list_len: 0,
        });
    }
    let second = iova.checked_add(first)?;
    let rest = len - first;
    if rest <= PAGE {
        return Some(PrpPlan {
            prp1: iova,
            prp2: second,
            list_first: 0,
            list_len: 0,
        });
    }
    let pages = rest.div_ceil(PAGE);
    if pages > LIST_ENTRIES {
        return None;
    }
    second.checked_add((pages - 1) * PAGE)?;
    Some(PrpPlan {
        prp1: iova,
        prp2: list_iova,
        list_first: second,
        list_len: pages,
    })
}

/// The largest transfer whose PRPs fit one list page, for any start offset:
/// one list page of entries, each a whole page.
pub const MAX_LIST_TRANSFER: u64 = LIST_ENTRIES * PAGE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_one_page() {
        let p = plan(0x1000, 4096, 0xff000).unwrap();
        assert_eq!((p.prp1, p.prp2, p.list_len), (0x1000, 0, 0));
        let p = plan(0x1ffc, 4, 0xff000).unwrap();
        assert_eq!((p.prp1, p.prp2), (0x1ffc, 0));
    }

    #[test]
    fn offset_start_crossing_into_second_page_uses_prp2() {
        let p = plan(0x1800, 4096, 0xff000).unwrap();
        assert_eq!((p.prp1, p.prp2, p.list_len), (0x1800, 0x2000, 0));
        let p = plan(0x1000, 8192, 0xff000).unwrap();
        assert_eq!((p.prp1, p.prp2), (0x1000, 0x2000));
    }

    #[test]
    fn offset_start_over_two_pages_uses_a_list() {
        // 0x1800 + 0x2000 ends at 0x3800: pages 0x1000, 0x2000, 0x3000.
        let p = plan(0x1800, 0x2000, 0xff000).unwrap();
        assert_eq!((p.prp1, p.prp2), (0x1800, 0xff000));
        assert_eq!(p.list().collect::<Vec<_>>(), vec![0x2000, 0x3000]);
        assert_eq!(p.list().len(), 2);
    }

    #[test]
    fn list_capacity() {
        // Page aligned: the first page in PRP1, 512 more in the list.
        let most = PAGE + MAX_LIST_TRANSFER;
        assert_eq!(plan(0x10_0000, most, 0).unwrap().list_len, 512);
        assert!(plan(0x10_0000, most + 1, 0).is_none());
        // Any offset fits MAX_LIST_TRANSFER.
        for off in [0, 4, 0x800, 0xffc] {
            let p = plan(0x10_0000 + off, MAX_LIST_TRANSFER, 0).unwrap();
            assert!(p.list_len <= LIST_ENTRIES);
        }
        // Pages past the end of the IOVA space.
        assert!(plan(u64::MAX - 0x2fff, 0x5000, 0).is_none());
        assert!(plan(u64::MAX - 0xfff, 0x2000, 0).is_none());
    }

    #[test]
    fn entries_are_page_aligned_and_cover_the_buffer() {
        for (iova, len) in [(0x2004u64, 0x5000u64), (0x3000, 0x3001), (0xffc, 0x2008)] {
            let p = plan(iova, len, 0).unwrap();
            let mut pages = vec![p.prp1];
            if p.list_len == 0 {
                if p.prp2 != 0 {
                    pages.push(p.prp2);
                }
            } else {
                pages.extend(p.list());
            }
            assert!(pages[1..].iter().all(|e| e % PAGE == 0));
            let covered = (PAGE - iova % PAGE) + (pages.len() as u64 - 1) * PAGE;
            assert!(covered >= len && covered - len < PAGE, "{iova:#x}+{len:#x}");
        }
    }
}
