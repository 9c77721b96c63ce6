//! What a BAR's guest-physical range must fit: the IOAS's usable IOVA
//! ranges, outside the VMM's own mappings (guest RAM) and outside the other
//! BARs. Pure bookkeeping: the kernel is asked elsewhere, and only when the
//! ranges may have changed (a device registered or removed,
//! [`GuestBarMap::refresh_limits`](super::GuestBarMap::refresh_limits)) or
//! a map was refused.

use crate::importer::iommufd::{IovaRange, IovaRanges};
use crate::pci::{BAR_COUNT, PciAddress};
use crate::range::ByteRange;

use super::unreachable::{Unreachable, address_width};

/// Names one BAR of one registered device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BarKey {
    /// Slot index of the device in the map.
    pub(crate) slot: u32,
    /// BAR index.
    pub(crate) bar: u8,
}

/// The span a BAR holds, `[start, last]`, and its device (to name it).
#[derive(Debug, Clone, Copy)]
struct Held {
    start: u64,
    last: u64,
    device: PciAddress,
}

/// The usable ranges, the VMM's mappings and the BARs' claims.
#[derive(Debug, Default)]
pub(crate) struct Limits {
    /// `IOMMU_IOAS_IOVA_RANGES`, as last asked.
    usable: Vec<IovaRange>,
    /// The VMM's declared mappings, sorted by start, with their names.
    vmm: Vec<(IovaRange, String)>,
    /// The GPA span each BAR's mapping holds (live or dead: a dead area
    /// still holds its IOVA), at index `slot * BAR_COUNT + bar`: set and
    /// cleared in place, whatever the order of the GPAs. Which GPAs are
    /// taken is asked of the IOAS's own set of mapped areas (sorted, one
    /// search); this names who holds one, when one is.
    held: Vec<Option<Held>>,
    /// The ranges of held spans that are not mapped (a BAR's MSI-X table
    /// and PBA pages), with their BAR: not in the IOAS's area set, still
    /// the BAR's. Few (empty unless such a BAR is offered).
    holes: Vec<(u64, u64, BarKey)>,
    /// How many BARs are refused for a reason others' changes may lift
    /// (kept by the map, so that a change looks for them only if any).
    pub(crate) waiting: usize,
}

/// `[start, start + size)` as an inclusive last byte, `None` if empty or
/// past the end of the address space.
fn last_of(start: u64, size: u64) -> Option<u64> {
    size.checked_sub(1).and_then(|s| start.checked_add(s))
}

/// Where `key`'s span is kept in [`Limits::held`].
#[inline]
fn index(key: BarKey) -> usize {
    key.slot as usize * BAR_COUNT as usize + usize::from(key.bar)
}

impl Limits {
    /// Records the usable ranges.
    pub(crate) fn set_usable(&mut self, ranges: &IovaRanges) {
        self.usable.clear();
        self.usable.extend_from_slice(&ranges.ranges);
    }

    /// Adds a VMM mapping.
    pub(crate) fn declare(&mut self, range: IovaRange, label: String) {
        let at = self.vmm.partition_point(|(r, _)| r.start < range.start);
        self.vmm.insert(at, (range, label));
    }

    /// Removes the VMM mappings that start at `start`; whether any did.
    pub(crate) fn forget(&mut self, start: u64) -> bool {
        let before = self.vmm.len();
        self.vmm.retain(|(r, _)| r.start != start);
        self.vmm.len() != before
    }

    /// Whether `[gpa, gpa + size)` may hold the BAR `key`: inside one
    /// usable range, clear of the VMM's mappings and of every other BAR's
    /// span. `mapped(gpa, size)` says whether any of it is mapped in the
    /// IOAS (the IOAS's area set, which holds every BAR's area): only then
    /// are the BARs' spans searched for the one in the way. An area that is
    /// no BAR's is left to the kernel (`EEXIST`). No allocation unless it
    /// answers no.
    pub(crate) fn check(
        &self,
        key: BarKey,
        gpa: u64,
        size: u64,
        mapped: impl FnOnce(u64, u64) -> bool,
    ) -> Result<(), Unreachable> {
        let Some(last) = last_of(gpa, size) else {
            return Err(self.outside(gpa, size));
        };
        if !self.usable.iter().any(|r| r.start <= gpa && last <= r.last) {
            return Err(self.outside(gpa, size));
        }
        // The VMM's mappings are few: the first that ends at or after gpa.
        if let Some((r, label)) = self
            .vmm
            .iter()
            .find(|(r, _)| r.last >= gpa && r.start <= last)
        {
            return Err(Unreachable::CollidesWithVmm {
                gpa,
                size,
                vmm: *r,
                label: label.clone(),
            });
        }
        if mapped(gpa, size)
            || self
                .holes
                .iter()
                .any(|&(s, l, k)| k != key && s <= last && gpa <= l)
        {
            return self.overlapping(key, gpa, last);
        }
        Ok(())
    }

    /// The other BAR whose span meets `[gpa, last]`, as a refusal (a walk
    /// of every span: only when the IOAS has an area there).
    #[cold]
    fn overlapping(&self, key: BarKey, gpa: u64, last: u64) -> Result<(), Unreachable> {
        let own = index(key);
        match self
            .held
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != own)
            .find_map(|(i, h)| {
                h.filter(|h| h.start <= last && gpa <= h.last)
                    .map(|h| (i, h))
            }) {
            #[allow(clippy::cast_possible_truncation)]
            Some((i, h)) => Err(Unreachable::OverlapsBar {
                gpa,
                size: last - gpa + 1,
                other: h.device,
                other_bar: (i % BAR_COUNT as usize) as u32,
            }),
            None => Ok(()),
        }
    }

    fn outside(&self, gpa: u64, size: u64) -> Unreachable {
        Unreachable::OutsideIovaRanges {
            gpa,
            size,
            usable: self.usable.clone(),
            address_width: address_width(&self.usable),
        }
    }

    /// Records that `key` holds `[gpa, gpa + size)` (checked before), of
    /// which `holes` (offsets in it) are not mapped.
    #[inline]
    pub(crate) fn claim(
        &mut self,
        key: BarKey,
        device: PciAddress,
        gpa: u64,
        size: u64,
        holes: &[ByteRange],
    ) {
        let Some(last) = last_of(gpa, size) else {
            return;
        };
        for h in holes {
            if let Some(hl) = last_of(gpa.saturating_add(h.offset), h.length) {
                self.holes
                    .push((gpa.saturating_add(h.offset), hl.min(last), key));
            }
        }
        let i = index(key);
        if i >= self.held.len() {
            self.held.resize(i + 1, None);
        }
        self.held[i] = Some(Held {
            start: gpa,
            last,
            device,
        });
    }

    /// Forgets `key`'s span at `gpa`.
    #[inline]
    pub(crate) fn release(&mut self, key: BarKey, gpa: u64) {
        if let Some(h) = self.held.get_mut(index(key))
            && h.is_some_and(|h| h.start == gpa)
        {
            *h = None;
            if !self.holes.is_empty() {
                self.holes.retain(|&(_, _, k)| k != key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::importer::placement::IovaSet;

    /// `check` against an IOAS whose mapped areas are `areas`.
    fn check(
        l: &Limits,
        areas: &IovaSet,
        key: BarKey,
        gpa: u64,
        size: u64,
    ) -> Result<(), Unreachable> {
        l.check(key, gpa, size, |g, s| areas.overlaps(g, s))
    }

    fn key(slot: u32, bar: u8) -> BarKey {
        BarKey { slot, bar }
    }

    fn limits() -> Limits {
        let mut l = Limits::default();
        l.set_usable(&IovaRanges::new(
            vec![
                IovaRange::new(0, 0xfedf_ffff),
                IovaRange::new(0xfef0_0000, (1 << 39) - 1),
            ],
            4096,
        ));
        l.declare(IovaRange::new(0, 0x3fff_ffff), "guest RAM".into());
        l
    }

    #[test]
    fn usable_ranges_bound_every_bar() {
        let l = limits();
        let none = IovaSet::new();
        assert!(check(&l, &none, key(0, 2), 0xc000_0000, 1 << 20).is_ok());
        match check(&l, &none, key(0, 2), 0x80_0000_0000, 1 << 20) {
            Err(Unreachable::OutsideIovaRanges { address_width, .. }) => {
                assert_eq!(address_width, 39)
            }
            other => panic!("{other:?}"),
        }
        // The MSI window.
        assert!(matches!(
            check(&l, &none, key(0, 2), 0xfee0_0000, 0x1000),
            Err(Unreachable::OutsideIovaRanges { .. })
        ));
        // Past the end of the address space.
        assert!(matches!(
            check(&l, &none, key(0, 2), u64::MAX - 0xfff, 0x2000),
            Err(Unreachable::OutsideIovaRanges { .. })
        ));
    }

    #[test]
    fn guest_ram_and_other_bars_are_refused_and_released() {
        let mut l = limits();
        let mut areas = IovaSet::new();
        let dev: PciAddress = "0000:03:00.0".parse().unwrap();
        match check(&l, &areas, key(0, 2), 0x3ff0_0000, 1 << 20) {
            Err(Unreachable::CollidesWithVmm { label, vmm, .. }) => {
                assert_eq!(label, "guest RAM");
                assert_eq!(vmm, IovaRange::new(0, 0x3fff_ffff));
            }
            other => panic!("{other:?}"),
        }
        l.claim(key(0, 2), dev, 0xc000_0000, 1 << 20, &[]);
        areas.insert(0xc000_0000, 1 << 20);
        // Its own claim does not count against it (a remap at the same GPA).
        assert!(check(&l, &areas, key(0, 2), 0xc000_0000, 1 << 20).is_ok());
        match check(&l, &areas, key(1, 0), 0xc00f_f000, 0x2000) {
            Err(Unreachable::OverlapsBar {
                other, other_bar, ..
            }) => {
                assert_eq!((other, other_bar), (dev, 2));
            }
            other => panic!("{other:?}"),
        }
        assert!(check(&l, &areas, key(1, 0), 0xc010_0000, 0x1000).is_ok());
        l.release(key(0, 2), 0xc000_0000);
        areas.remove(0xc000_0000, 1 << 20);
        assert!(check(&l, &areas, key(1, 0), 0xc00f_f000, 0x2000).is_ok());
        assert!(l.forget(0));
        assert!(check(&l, &areas, key(0, 2), 0x3ff0_0000, 1 << 20).is_ok());
        assert!(!l.forget(0));
    }

    #[test]
    fn the_bar_in_the_way_is_named_among_many() {
        let mut l = limits();
        let mut areas = IovaSet::new();
        // 64 BARs of 64 KiB side by side (one span in the IOAS's set), on
        // 11 devices of six BAR indexes each.
        for k in 0..64u32 {
            let dev: PciAddress = format!("0000:04:{:02x}.0", k / 6).parse().unwrap();
            #[allow(clippy::cast_possible_truncation)]
            let key = key(k / 6, (k % 6) as u8);
            let gpa = 0x1_0000_0000 + u64::from(k) * 0x1_0000;
            assert!(check(&l, &areas, key, gpa, 0x1_0000).is_ok());
            l.claim(key, dev, gpa, 0x1_0000, &[]);
            areas.insert(gpa, 0x1_0000);
        }
        // BAR 3 of 0000:04:07.0 is the 46th: 0x1_002d_0000.
        match check(&l, &areas, key(20, 1), 0x1_002d_8000, 0x1000) {
            Err(Unreachable::OverlapsBar {
                other,
                other_bar,
                size,
                ..
            }) => {
                assert_eq!(other, "0000:04:07.0".parse().unwrap());
                assert_eq!((other_bar, size), (3, 0x1000));
            }
            other => panic!("{other:?}"),
        }
        // Moved away: the IOAS no longer has it, the span is free.
        l.release(key(7, 3), 0x1_002d_0000);
        areas.remove(0x1_002d_0000, 0x1_0000);
        assert!(check(&l, &areas, key(20, 1), 0x1_002d_8000, 0x1000).is_ok());
        // Its old release is no release of a newer span.
        l.claim(
            key(7, 3),
            "0000:04:07.0".parse().unwrap(),
            0x2_0000_0000,
            0x1_0000,
            &[],
        );
        areas.insert(0x2_0000_0000, 0x1_0000);
        l.release(key(7, 3), 0x1_002d_0000);
        assert!(matches!(
            check(&l, &areas, key(0, 0), 0x2_0000_0000, 0x1000),
            Err(Unreachable::OverlapsBar { other_bar: 3, .. })
        ));
        // A BAR with a hole (its MSI-X table's page, not mapped): the hole
        // is still its own.
        l.claim(
            key(30, 0),
            "0000:05:00.0".parse().unwrap(),
            0x4_0000_0000,
            0x4000,
            &[ByteRange::new(0x2000, 0x2000)],
        );
        areas.insert(0x4_0000_0000, 0x2000);
        assert!(matches!(
            check(&l, &areas, key(0, 0), 0x4_0000_3000, 0x1000),
            Err(Unreachable::OverlapsBar { other_bar: 0, .. })
        ));
        assert!(check(&l, &areas, key(30, 0), 0x4_0000_3000, 0x1000).is_ok());
        l.release(key(30, 0), 0x4_0000_0000);
        areas.remove(0x4_0000_0000, 0x2000);
        assert!(check(&l, &areas, key(0, 0), 0x4_0000_3000, 0x1000).is_ok());
        // An area of the IOAS that no BAR holds is left to the kernel.
        areas.insert(0x3_0000_0000, 0x1000);
        assert!(check(&l, &areas, key(0, 0), 0x3_0000_0000, 0x1000).is_ok());
    }
}
