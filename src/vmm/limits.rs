//! What a BAR's guest-physical range must fit: the IOAS's usable IOVA
//! ranges, outside the VMM's own mappings (guest RAM) and outside the other
//! BARs. Pure bookkeeping: the kernel is asked elsewhere, and only when the
//! ranges may have changed (a device registered or removed,
//! [`GuestBarMap::refresh_limits`](super::GuestBarMap::refresh_limits)) or
//! a map was refused.

use crate::importer::iommufd::{IovaRange, IovaRanges};
use crate::pci::PciAddress;

use super::unreachable::{Unreachable, address_width};

/// Names one BAR of one registered device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BarKey {
    /// Slot index of the device in the map.
    pub(crate) slot: u32,
    /// BAR index.
    pub(crate) bar: u8,
}

/// One claimed span: `[start, last]` and who holds it.
#[derive(Debug, Clone, Copy)]
struct Claim {
    start: u64,
    last: u64,
    key: BarKey,
    device: PciAddress,
}

/// The usable ranges, the VMM's mappings and the BARs' claims.
#[derive(Debug, Default)]
pub(crate) struct Limits {
    /// `IOMMU_IOAS_IOVA_RANGES`, as last asked.
    usable: Vec<IovaRange>,
    /// The VMM's declared mappings, sorted by start, with their names.
    vmm: Vec<(IovaRange, String)>,
    /// GPA spans of BAR mappings (live or dead: a dead area still holds its
    /// IOVA), sorted by start, disjoint.
    claims: Vec<Claim>,
    /// How many BARs are refused for a reason others' changes may lift
    /// (kept by the map, so that a change looks for them only if any).
    pub(crate) waiting: usize,
}

/// `[start, start + size)` as an inclusive last byte, `None` if empty or
/// past the end of the address space.
fn last_of(start: u64, size: u64) -> Option<u64> {
    size.checked_sub(1).and_then(|s| start.checked_add(s))
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
    /// claim. No allocation unless it answers no.
    pub(crate) fn check(&self, key: BarKey, gpa: u64, size: u64) -> Result<(), Unreachable> {
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
        let i = self.claims.partition_point(|c| c.last < gpa);
        if let Some(c) = self.claims[i..]
            .iter()
            .take_while(|c| c.start <= last)
            .find(|c| c.key != key)
        {
            return Err(Unreachable::OverlapsBar {
                gpa,
                size,
                other: c.device,
                other_bar: u32::from(c.key.bar),
            });
        }
        Ok(())
    }

    fn outside(&self, gpa: u64, size: u64) -> Unreachable {
        Unreachable::OutsideIovaRanges {
            gpa,
            size,
            usable: self.usable.clone(),
            address_width: address_width(&self.usable),
        }
    }

    /// Records that `key` holds `[gpa, gpa + size)` (checked before).
    pub(crate) fn claim(&mut self, key: BarKey, device: PciAddress, gpa: u64, size: u64) {
        let Some(last) = last_of(gpa, size) else {
            return;
        };
        let at = self.claims.partition_point(|c| c.start < gpa);
        self.claims.insert(
            at,
            Claim {
                start: gpa,
                last,
                key,
                device,
            },
        );
    }

    /// Forgets `key`'s claim at `gpa`.
    pub(crate) fn release(&mut self, key: BarKey, gpa: u64) {
        let at = self.claims.partition_point(|c| c.start < gpa);
        if let Some(pos) = self.claims[at..]
            .iter()
            .take_while(|c| c.start == gpa)
            .position(|c| c.key == key)
        {
            self.claims.remove(at + pos);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let dev: PciAddress = "0000:03:00.0".parse().unwrap();
        let _ = dev;
        assert!(l.check(key(0, 2), 0xc000_0000, 1 << 20).is_ok());
        match l.check(key(0, 2), 0x80_0000_0000, 1 << 20) {
            Err(Unreachable::OutsideIovaRanges { address_width, .. }) => {
                assert_eq!(address_width, 39)
            }
            other => panic!("{other:?}"),
        }
        // The MSI window.
        assert!(matches!(
            l.check(key(0, 2), 0xfee0_0000, 0x1000),
            Err(Unreachable::OutsideIovaRanges { .. })
        ));
        // Past the end of the address space.
        assert!(matches!(
            l.check(key(0, 2), u64::MAX - 0xfff, 0x2000),
            Err(Unreachable::OutsideIovaRanges { .. })
        ));
    }

    #[test]
    fn guest_ram_and_other_bars_are_refused_and_released() {
        let mut l = limits();
        let dev: PciAddress = "0000:03:00.0".parse().unwrap();
        match l.check(key(0, 2), 0x3ff0_0000, 1 << 20) {
            Err(Unreachable::CollidesWithVmm { label, vmm, .. }) => {
                assert_eq!(label, "guest RAM");
                assert_eq!(vmm, IovaRange::new(0, 0x3fff_ffff));
            }
            other => panic!("{other:?}"),
        }
        l.claim(key(0, 2), dev, 0xc000_0000, 1 << 20);
        // Its own claim does not count against it (a remap at the same GPA).
        assert!(l.check(key(0, 2), 0xc000_0000, 1 << 20).is_ok());
        match l.check(key(1, 0), 0xc00f_f000, 0x2000) {
            Err(Unreachable::OverlapsBar {
                other, other_bar, ..
            }) => {
                assert_eq!((other, other_bar), (dev, 2));
            }
            other => panic!("{other:?}"),
        }
        assert!(l.check(key(1, 0), 0xc010_0000, 0x1000).is_ok());
        l.release(key(0, 2), 0xc000_0000);
        assert!(l.check(key(1, 0), 0xc00f_f000, 0x2000).is_ok());
        assert!(l.forget(0));
        assert!(l.check(key(0, 2), 0x3ff0_0000, 1 << 20).is_ok());
        assert!(!l.forget(0));
    }
}
