//! The guest's BAR registers, as a VMM keeps them: virtual, never written to
//! the device. What the guest wrote, what it reads back, and where (if
//! anywhere) the BAR is now.
//!
//! The rules ([`BarRegister`]):
//!
//! * a write of all ones to a half (the sizing probe) leaves that half
//!   *probing* until a write of anything else; a probing BAR is nowhere;
//! * a 64-bit BAR's address is complete when both halves were written since
//!   it was last complete (in either order; probes do not count), or when the
//!   guest writes `PCI_COMMAND` ([`BarRegister::settle`]: a guest enabling
//!   decode is done programming). Until then it is *half programmed*: the
//!   mixed address (new low half, old high half) is never mapped;
//! * address 0 is unassigned (as QEMU takes it): not mapped.
//!
//! ```
//! use dmabuf_p2p::vmm::{BarAddress, BarRegister};
//!
//! // A 64-bit prefetchable 1 MiB BAR, as Linux sizes and then places it.
//! let mut bar = BarRegister::new(1 << 20, 0xc);
//! bar.write_low(0xffff_ffff);
//! assert_eq!(bar.read_low(), 0xfff0_000c); // the size, as a guest reads it
//! bar.write_low(0);
//! bar.write_high(0xffff_ffff);
//! bar.write_high(0);
//! assert_eq!(bar.address(), BarAddress::Unassigned);
//! bar.write_low(0xc000_0000);
//! assert_eq!(bar.address(), BarAddress::HalfProgrammed);
//! bar.write_high(0x80);
//! assert_eq!(bar.address(), BarAddress::At(0x80_c000_0000));
//! ```

use std::fmt;

/// Where a BAR is, as its registers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BarAddress {
    /// Address 0: the guest has not placed it (or left it unplaced).
    Unassigned,
    /// A sizing probe (all ones) is in one of its halves.
    Probing,
    /// A 64-bit BAR with one half written since its address was last
    /// complete.
    HalfProgrammed,
    /// At this guest-physical address.
    At(u64),
}

impl fmt::Display for BarAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unassigned => f.write_str("unassigned"),
            Self::Probing => f.write_str("being sized (all ones written)"),
            Self::HalfProgrammed => {
                f.write_str("half programmed (one half of the 64-bit address written)")
            }
            Self::At(gpa) => write!(f, "at {gpa:#x}"),
        }
    }
}

/// One memory BAR's registers as the guest sees them: the low dword (flags
/// in bits 0..=3) and, for a 64-bit BAR, the high dword.
///
/// `size` is the BAR's size (a power of two); `flags` the low four bits the
/// device reports (bit 2: 64-bit, bit 3: prefetchable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRegister {
    size: u64,
    flags: u32,
    low: u32,
    high: u32,
    low_probe: bool,
    high_probe: bool,
    low_fresh: bool,
    high_fresh: bool,
}

/// `PCI_BASE_ADDRESS_MEM_TYPE_64` in the low dword.
const MEM_TYPE_64: u32 = 0x4;
/// The flag bits of a memory BAR's low dword.
const FLAG_BITS: u32 = 0xf;

impl BarRegister {
    /// An unassigned memory BAR of `size` bytes (rounded up to a power of two,
    /// at least 16) with the device's `flags` (bits 0..=3 of its low dword;
    /// bit 0, I/O space, is cleared: these are memory BARs).
    ///
    /// ```
    /// use dmabuf_p2p::vmm::{BarAddress, BarRegister};
    /// let bar = BarRegister::new(64 << 10, 0x0); // 32-bit, 64 KiB
    /// assert!(!bar.is_64bit());
    /// assert_eq!(bar.address(), BarAddress::Unassigned);
    /// ```
    pub fn new(size: u64, flags: u32) -> Self {
        Self {
            size: size.max(16).checked_next_power_of_two().unwrap_or(1 << 63),
            flags: flags & FLAG_BITS & !1,
            low: 0,
            high: 0,
            low_probe: false,
            high_probe: false,
            low_fresh: false,
            high_fresh: false,
        }
    }

    /// The BAR's size.
    pub const fn size(&self) -> u64 {
        self.size
    }

    /// Whether it is a 64-bit BAR (two dwords).
    pub const fn is_64bit(&self) -> bool {
        self.flags & 0x6 == MEM_TYPE_64
    }

    /// The address bits of the low dword (the size mask's).
    #[allow(clippy::cast_possible_truncation)]
    const fn low_mask(&self) -> u32 {
        (!(self.size - 1)) as u32 & !FLAG_BITS
    }

    /// The address bits of the high dword.
    #[allow(clippy::cast_possible_truncation)]
    const fn high_mask(&self) -> u32 {
        if self.is_64bit() {
            ((!(self.size - 1)) >> 32) as u32
        } else {
            0
        }
    }

    /// The guest wrote `value` to the low dword.
    pub fn write_low(&mut self, value: u32) {
        if value | FLAG_BITS == u32::MAX {
            self.low_probe = true;
            return;
        }
        self.low_probe = false;
        self.low = value & self.low_mask();
        if !self.is_64bit() || self.high_fresh {
            self.low_fresh = false;
            self.high_fresh = false;
        } else {
            self.low_fresh = true;
        }
    }

    /// The guest wrote `value` to the high dword (of a 64-bit BAR; ignored
    /// otherwise).
    pub fn write_high(&mut self, value: u32) {
        if !self.is_64bit() {
            return;
        }
        if value == u32::MAX {
            self.high_probe = true;
            return;
        }
        self.high_probe = false;
        self.high = value & self.high_mask();
        if self.low_fresh {
            self.low_fresh = false;
            self.high_fresh = false;
        } else {
            self.high_fresh = true;
        }
    }

    /// The guest wrote `PCI_COMMAND`: whatever it programmed is complete.
    /// Probes stay probes.
    ///
    /// ```
    /// use dmabuf_p2p::vmm::{BarAddress, BarRegister};
    /// let mut bar = BarRegister::new(1 << 20, 0x4);
    /// bar.write_low(0xfe00_0000); // the high half stays 0
    /// assert_eq!(bar.address(), BarAddress::HalfProgrammed);
    /// bar.settle();
    /// assert_eq!(bar.address(), BarAddress::At(0xfe00_0000));
    /// ```
    pub fn settle(&mut self) {
        self.low_fresh = false;
        self.high_fresh = false;
    }

    /// Whether [`settle`](Self::settle) would change [`address`](Self::address).
    pub const fn is_half_programmed(&self) -> bool {
        self.low_fresh || self.high_fresh
    }

    /// Places the BAR at `gpa` (or unassigns it, with `None`), both halves
    /// at once: what a VMM that places BARs itself does.
    ///
    /// ```
    /// use dmabuf_p2p::vmm::{BarAddress, BarRegister};
    /// let mut bar = BarRegister::new(1 << 20, 0x4);
    /// bar.set_address(Some(0x40_0000_0000));
    /// assert_eq!(bar.address(), BarAddress::At(0x40_0000_0000));
    /// assert_eq!((bar.read_low(), bar.read_high()), (0x4, 0x40));
    /// ```
    #[allow(clippy::cast_possible_truncation)]
    pub fn set_address(&mut self, gpa: Option<u64>) {
        let gpa = gpa.unwrap_or(0);
        self.low = (gpa as u32) & self.low_mask();
        self.high = ((gpa >> 32) as u32) & self.high_mask();
        self.low_probe = false;
        self.high_probe = false;
        self.settle();
    }

    /// Back to the state after a reset: unassigned, nothing pending.
    pub fn reset(&mut self) {
        self.set_address(None);
    }

    /// What a guest reads from the low dword: the address (or, while
    /// probing, the size mask) and the flags.
    pub const fn read_low(&self) -> u32 {
        let bits = if self.low_probe {
            self.low_mask()
        } else {
            self.low
        };
        bits | self.flags
    }

    /// What a guest reads from the high dword (0 for a 32-bit BAR).
    pub const fn read_high(&self) -> u32 {
        if self.high_probe {
            self.high_mask()
        } else {
            self.high
        }
    }

    /// Where the BAR is now.
    pub const fn address(&self) -> BarAddress {
        if self.low_probe || self.high_probe {
            return BarAddress::Probing;
        }
        if self.low_fresh || self.high_fresh {
            return BarAddress::HalfProgrammed;
        }
        let gpa = ((self.high as u64) << 32) | self.low as u64;
        if gpa == 0 {
            BarAddress::Unassigned
        } else {
            BarAddress::At(gpa)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_32bit_bar_moves_with_each_write() {
        let mut bar = BarRegister::new(64 << 10, 0x0);
        bar.write_low(0xfe01_0000);
        assert_eq!(bar.address(), BarAddress::At(0xfe01_0000));
        // Unaligned bits are not address bits.
        bar.write_low(0xfe02_1234);
        assert_eq!(bar.address(), BarAddress::At(0xfe02_0000));
        bar.write_low(0xffff_ffff);
        assert_eq!(bar.address(), BarAddress::Probing);
        assert_eq!(bar.read_low(), 0xffff_0000);
        bar.write_low(0);
        assert_eq!(bar.address(), BarAddress::Unassigned);
        // A high write of a 32-bit BAR is no part of it.
        bar.write_high(0x12);
        assert_eq!(bar.read_high(), 0);
    }

    #[test]
    fn a_64bit_bar_needs_both_halves_in_either_order() {
        let mut bar = BarRegister::new(1 << 20, 0xc);
        bar.set_address(Some(0x1_0000_0000));
        bar.write_high(0x2);
        assert_eq!(bar.address(), BarAddress::HalfProgrammed);
        bar.write_low(0x4000_0000);
        assert_eq!(bar.address(), BarAddress::At(0x2_4000_0000));
        bar.write_low(0x8000_0000);
        assert_eq!(bar.address(), BarAddress::HalfProgrammed);
        bar.write_high(0x3);
        assert_eq!(bar.address(), BarAddress::At(0x3_8000_0000));
    }

    #[test]
    fn probes_do_not_count_as_programming() {
        // Linux's one-BAR-at-a-time sizing: probe and restore each half.
        let mut bar = BarRegister::new(1 << 20, 0xc);
        bar.set_address(Some(0x80_0000_0000));
        bar.write_low(0xffff_ffff);
        assert_eq!(bar.address(), BarAddress::Probing);
        bar.write_low(0x0000_000c);
        bar.write_high(0xffff_ffff);
        assert_eq!(bar.read_high(), 0xffff_ffff);
        bar.write_high(0x80);
        assert_eq!(bar.address(), BarAddress::At(0x80_0000_0000));
        // Batched sizing: both halves probed, then both restored.
        bar.write_low(0xffff_ffff);
        bar.write_high(0xffff_ffff);
        bar.write_low(0);
        assert_eq!(bar.address(), BarAddress::Probing);
        bar.write_high(0x80);
        assert_eq!(bar.address(), BarAddress::At(0x80_0000_0000));
    }

    #[test]
    fn large_bars_have_address_bits_only_in_the_high_half() {
        let mut bar = BarRegister::new(64 << 30, 0xc);
        bar.write_low(0xffff_ffff);
        bar.write_high(0xffff_ffff);
        assert_eq!((bar.read_low(), bar.read_high()), (0xc, 0xffff_fff0));
        bar.write_low(0x1234_5000);
        bar.write_high(0x1_0001);
        assert_eq!(bar.address(), BarAddress::At(0x1_0000_0000_0000));
    }

    #[test]
    fn settle_completes_a_lone_half_and_reset_unassigns() {
        let mut bar = BarRegister::new(1 << 20, 0x4);
        bar.write_low(0xc000_0000);
        assert!(bar.is_half_programmed());
        bar.settle();
        assert_eq!(bar.address(), BarAddress::At(0xc000_0000));
        bar.write_low(0xffff_ffff);
        bar.settle();
        assert_eq!(bar.address(), BarAddress::Probing);
        bar.reset();
        assert_eq!(bar.address(), BarAddress::Unassigned);
        assert_eq!(bar.read_low(), 0x4);
    }
}
