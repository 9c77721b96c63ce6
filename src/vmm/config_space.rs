//! Where the registers a [`GuestBarMap`](super::GuestBarMap) follows sit in
//! a type-0 config header, found once per device from its first 256 bytes:
//! `PCI_COMMAND`, the six BAR dwords, the power-management control register
//! and the PCIe device control register (for function-level reset); and which
//! BARs hold the MSI-X table and PBA (never offered to peers).

use crate::range::ByteRange;

/// Offset of `PCI_COMMAND`.
pub(crate) const COMMAND: u64 = 0x04;
/// `PCI_COMMAND` memory decode.
pub(crate) const COMMAND_MEMORY: u16 = 0x2;
/// Offset of BAR 0.
pub(crate) const BAR0: u64 = 0x10;
/// Offset of the capability pointer.
const CAP_PTR: usize = 0x34;
/// `PCI_STATUS` bit 4: the capability list exists.
const STATUS_CAP_LIST: u8 = 0x10;
/// Capability IDs.
const CAP_ID_PM: u8 = 0x01;
const CAP_ID_EXP: u8 = 0x10;
const CAP_ID_MSIX: u8 = 0x11;
/// `PCI_EXP_DEVCTL_BCR_FLR`: initiate function-level reset.
pub(crate) const DEVCTL_FLR: u16 = 0x8000;
/// `PCI_PM_CTRL_STATE_MASK` and D3hot.
pub(crate) const PM_STATE_MASK: u16 = 0x3;
pub(crate) const PM_STATE_D3HOT: u16 = 0x3;

/// What [`Layout::of`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Offset of the PM control/status register (`PMCSR`).
    pub(crate) pm_control: Option<u64>,
    /// Offset of the PCIe device control register.
    pub(crate) pcie_devctl: Option<u64>,
    /// BARs that hold the MSI-X table or PBA (bit per BAR).
    pub(crate) msix_bars: u8,
    /// The MSI-X table and the PBA: (BAR, byte range in it).
    pub(crate) msix_table: Option<(u8, ByteRange)>,
    pub(crate) msix_pba: Option<(u8, ByteRange)>,
}

impl Layout {
    /// Walks the capability list of `config` (at least the first 64 bytes
    /// of config space; 256 for capabilities). Loops and pointers out of
    /// range end the walk.
    pub(crate) fn of(config: &[u8]) -> Self {
        let mut out = Self::default();
        let byte = |i: usize| config.get(i).copied();
        let dword = |i: usize| {
            Some(u32::from_le_bytes([
                byte(i)?,
                byte(i + 1)?,
                byte(i + 2)?,
                byte(i + 3)?,
            ]))
        };
        if byte(6).is_none_or(|s| s & STATUS_CAP_LIST == 0) {
            return out;
        }
        let mut next = byte(CAP_PTR).map_or(0, |p| usize::from(p & !3));
        // At most 48 capabilities fit in 192 bytes.
        for _ in 0..48 {
            if next < 0x40 {
                break;
            }
            let (Some(id), Some(ptr)) = (byte(next), byte(next + 1)) else {
                break;
            };
            match id {
                CAP_ID_PM => out.pm_control = Some(next as u64 + 4),
                CAP_ID_EXP => out.pcie_devctl = Some(next as u64 + 8),
                CAP_ID_MSIX => {
                    // Message Control: table size N - 1; N entries of 16
                    // bytes, and N pending bits in 8-byte words.
                    let n = byte(next + 2).zip(byte(next + 3)).map_or(1, |(lo, hi)| {
                        u64::from(u16::from_le_bytes([lo, hi]) & 0x7ff) + 1
                    });
                    let lengths = [n * 16, n.div_ceil(64) * 8];
                    for (k, at) in [next + 4, next + 8].into_iter().enumerate() {
                        if let Some(v) = dword(at) {
                            #[allow(clippy::cast_possible_truncation)]
                            let bir = (v & 7).min(7) as u8;
                            out.msix_bars |= 1 << bir;
                            let range = ByteRange::new(u64::from(v & !7), lengths[k]);
                            if k == 0 {
                                out.msix_table = Some((bir, range));
                            } else {
                                out.msix_pba = Some((bir, range));
                            }
                        }
                    }
                }
                _ => {}
            }
            next = usize::from(ptr & !3);
        }
        out
    }
}

impl Layout {
    /// The parts of BAR `bar` (of `size` bytes) a peer may reach when it
    /// holds the MSI-X table or PBA: the page-aligned ranges before, between
    /// and after the pages the table and PBA touch (what VFIO's sparse mmap
    /// offers a VMM, and what QEMU and cloud-hypervisor map around the
    /// table), ascending. The whole BAR if it holds neither; empty if
    /// nothing is left.
    pub(crate) fn reachable_parts(&self, bar: u8, size: u64, page: u64) -> Vec<ByteRange> {
        let mut holes: Vec<(u64, u64)> = [self.msix_table, self.msix_pba]
            .into_iter()
            .flatten()
            .filter(|(b, r)| *b == bar && r.length > 0)
            .map(|(_, r)| {
                let start = r.offset - r.offset % page;
                let end = r
                    .offset
                    .saturating_add(r.length)
                    .div_ceil(page)
                    .saturating_mul(page);
                (start, end.min(size))
            })
            .collect();
        holes.sort_unstable();
        let mut parts = Vec::new();
        let mut from = 0;
        for (start, end) in holes {
            if start > from && from < size {
                parts.push(ByteRange::new(from, start.min(size) - from));
            }
            from = from.max(end);
        }
        if from < size {
            parts.push(ByteRange::new(from, size - from));
        }
        parts
    }
}

/// Whether `[offset, offset + len)` overlaps `[reg, reg + width)`.
#[inline]
pub(crate) fn overlaps(offset: u64, len: usize, reg: u64, width: u64) -> bool {
    offset < reg + width && reg < offset.saturating_add(len as u64)
}

/// `current` (a register of `width` bytes at `reg`) with the bytes a write
/// of `data` at `offset` covers replaced.
#[inline]
pub(crate) fn merge(current: u32, reg: u64, width: u64, offset: u64, data: &[u8]) -> u32 {
    // A guest writes a register whole and aligned (a trapped write's hot
    // path): no loop over its bytes.
    if offset == reg {
        match (width, data) {
            (4, &[a, b, c, d]) => return u32::from_le_bytes([a, b, c, d]),
            (2, &[a, b]) => return (current & 0xffff_0000) | u32::from(u16::from_le_bytes([a, b])),
            _ => {}
        }
    }
    merge_bytes(current, reg, width, offset, data)
}

/// [`merge`] byte by byte: partial, unaligned or wider writes.
fn merge_bytes(current: u32, reg: u64, width: u64, offset: u64, data: &[u8]) -> u32 {
    let mut bytes = current.to_le_bytes();
    for (i, b) in data.iter().enumerate() {
        let at = offset + i as u64;
        if at >= reg && at < reg + width {
            bytes[(at - reg) as usize] = *b;
        }
    }
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built capability chain of the shape an NVMe controller has
    /// (MSI-X with table and PBA in BAR 0, PM, PCIe); the VM tests read real
    /// devices' chains.
    fn nvme_like() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[6] = STATUS_CAP_LIST;
        c[CAP_PTR] = 0x40;
        c[0x40..0x42].copy_from_slice(&[CAP_ID_MSIX, 0x60]);
        c[0x44..0x48].copy_from_slice(&0x2000u32.to_le_bytes());
        c[0x48..0x4c].copy_from_slice(&0x3000u32.to_le_bytes());
        c[0x60..0x62].copy_from_slice(&[CAP_ID_PM, 0x80]);
        c[0x80..0x82].copy_from_slice(&[CAP_ID_EXP, 0x00]);
        c
    }

    #[test]
    fn capabilities_are_found() {
        let l = Layout::of(&nvme_like());
        assert_eq!(l.pm_control, Some(0x64));
        assert_eq!(l.pcie_devctl, Some(0x88));
        assert_eq!(l.msix_bars, 0b1);
        // Table size field 0 in the hand-built chain: one entry.
        assert_eq!(l.msix_table, Some((0, ByteRange::new(0x2000, 16))));
        assert_eq!(l.msix_pba, Some((0, ByteRange::new(0x3000, 8))));
    }

    #[test]
    fn the_parts_around_the_msix_table_and_pba_are_whole_pages() {
        const P: u64 = 4096;
        let l = Layout::of(&nvme_like());
        // QEMU's NVMe: registers and doorbells, the table at 0x2000, the
        // PBA at 0x3000, in a 16 KiB BAR: one part before.
        assert_eq!(l.reachable_parts(0, 0x4000, P), [ByteRange::new(0, 0x2000)]);
        // A larger BAR: the part after too.
        assert_eq!(
            l.reachable_parts(0, 0x10000, P),
            [ByteRange::new(0, 0x2000), ByteRange::new(0x4000, 0xc000)]
        );
        // Another BAR holds neither: whole.
        assert_eq!(l.reachable_parts(2, 0x8000, P), [ByteRange::new(0, 0x8000)]);
        // Unaligned table and PBA with a page between them: their pages
        // are left out, the page between is a part.
        let mut odd = l;
        odd.msix_table = Some((0, ByteRange::new(0x1800, 0x100)));
        odd.msix_pba = Some((0, ByteRange::new(0x3f00, 0x200)));
        assert_eq!(
            odd.reachable_parts(0, 0x8000, P),
            [
                ByteRange::new(0, 0x1000),
                ByteRange::new(0x2000, 0x1000),
                ByteRange::new(0x5000, 0x3000)
            ]
        );
        // Table and PBA in one page, at the start: the rest after it.
        odd.msix_table = Some((0, ByteRange::new(0, 0x800)));
        odd.msix_pba = Some((0, ByteRange::new(0x800, 8)));
        assert_eq!(
            odd.reachable_parts(0, 0x2000, P),
            [ByteRange::new(0x1000, 0x1000)]
        );
        // Nothing left.
        assert_eq!(odd.reachable_parts(0, 0x1000, P), []);
    }

    #[test]
    fn broken_lists_end_the_walk() {
        let mut c = nvme_like();
        c[0x81] = 0x80; // a loop
        let l = Layout::of(&c);
        assert_eq!(l.pcie_devctl, Some(0x88));
        c[6] = 0;
        assert_eq!(Layout::of(&c), Layout::default());
        assert_eq!(Layout::of(&c[..8]), Layout::default());
    }

    #[test]
    fn writes_merge_into_registers() {
        assert!(overlaps(4, 2, 4, 2) && overlaps(0, 8, 4, 2) && !overlaps(6, 2, 4, 2));
        assert_eq!(merge(0x1122_3344, 0x10, 4, 0x12, &[0xaa]), 0x11aa_3344);
        assert_eq!(
            merge(0x1122_3344, 0x10, 4, 0x10, &0xdead_beefu32.to_le_bytes()),
            0xdead_beef
        );
        assert_eq!(
            merge(0xffff_0000, COMMAND, 2, 4, &[0x06, 0x01]),
            0xffff_0106
        );
        assert_eq!(
            merge(0x1122_3344, 0x10, 4, 0x11, &[0xaa, 0xbb]),
            0x11bb_aa44
        );
        // A word write at 4 into PCI_COMMAND only.
        assert_eq!(
            merge(0x0000, COMMAND, 2, 4, &[0x06, 0x01, 0xff, 0xff]),
            0x0106
        );
    }
}
