//! What a [`VfioPciDevice`](super::VfioPciDevice) last knew of its
//! `PCI_COMMAND` register, readable without a config-space read.
//!
//! Kept current by the device's own reads and writes of the register, the
//! VMM's notifications and resets. One atomic word: the 16-bit value, which
//! of its two bytes are known, and a generation that every change bumps, so a
//! read made without the transition lock cannot overwrite what a transition
//! recorded while the read was in flight.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::range::ByteRange;

/// Config-space offset of `PCI_COMMAND` (two bytes).
const COMMAND_OFFSET: u64 = 4;
/// `PCI_COMMAND` bit 1: memory space decode (in the low byte).
const MEMORY: u16 = 0x2;

const LOW_KNOWN: u64 = 1 << 16;
const HIGH_KNOWN: u64 = 1 << 17;
const GEN_SHIFT: u32 = 32;

/// The last known `PCI_COMMAND` of a device.
#[derive(Debug, Default)]
pub(crate) struct KnownCommand(AtomicU64);

/// The state of a [`KnownCommand`] at one moment, for
/// [`KnownCommand::record_read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Snapshot(u64);

impl KnownCommand {
    /// Nothing known yet.
    pub(crate) const fn unknown() -> Self {
        Self(AtomicU64::new(0))
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot(self.0.load(Ordering::Acquire))
    }

    /// The whole register, if both bytes are known.
    pub(crate) fn command(&self) -> Option<u16> {
        let w = self.0.load(Ordering::Acquire);
        (w & (LOW_KNOWN | HIGH_KNOWN) == LOW_KNOWN | HIGH_KNOWN).then_some(value(w))
    }

    /// The memory-decode bit, if the low byte is known.
    #[inline]
    pub(crate) fn memory_decode(&self) -> Option<bool> {
        let w = self.0.load(Ordering::Acquire);
        (w & LOW_KNOWN != 0).then_some(value(w) & MEMORY != 0)
    }

    /// Records the whole register (read or written under the transition
    /// lock, or told by the VMM): always wins.
    #[inline]
    pub(crate) fn set(&self, command: u16) {
        self.update(|w| with(w, u64::from(command) | LOW_KNOWN | HIGH_KNOWN));
    }

    /// Records only the memory-decode bit (what the VMM told), keeping the
    /// rest if known.
    pub(crate) fn set_memory_decode(&self, on: bool) {
        self.update(|w| {
            let old = if w & LOW_KNOWN != 0 { value(w) } else { 0 };
            let new = if on { old | MEMORY } else { old & !MEMORY };
            with(w, u64::from(new) | LOW_KNOWN | (w & HIGH_KNOWN))
        });
    }

    /// Forgets everything (a write whose result could not be read back).
    pub(crate) fn forget(&self) {
        self.update(|w| with(w, 0));
    }

    /// Records the bytes of `PCI_COMMAND` inside `bytes`, which a read
    /// without the transition lock found at config offset `offset`, unless
    /// anything was recorded since `before` (taken before the read): that is
    /// at least as new. Returns the memory-decode bit if `bytes` holds it.
    pub(crate) fn record_read(&self, before: Snapshot, offset: u64, bytes: &[u8]) -> Option<bool> {
        let (low, high) = command_bytes(offset, bytes);
        let decode = low.map(|b| u16::from(b) & MEMORY != 0);
        if low.is_none() && high.is_none() {
            return decode;
        }
        let new = merged(before.0, low, high);
        // A failed exchange means a newer record: keep it.
        let _ = self
            .0
            .compare_exchange(before.0, new, Ordering::AcqRel, Ordering::Acquire);
        decode
    }

    /// Records the bytes of `PCI_COMMAND` inside `bytes`, written at config
    /// offset `offset` under the transition lock: always wins, and keeps
    /// the byte the write did not cover. Returns the memory-decode bit as
    /// known afterwards.
    #[inline]
    pub(crate) fn record_write(&self, offset: u64, bytes: &[u8]) -> Option<bool> {
        // The whole register (a guest's or a VMM's usual write).
        if let (COMMAND_OFFSET, &[low, high]) = (offset, bytes) {
            let v = u16::from_le_bytes([low, high]);
            self.set(v);
            return Some(v & MEMORY != 0);
        }
        let (low, high) = command_bytes(offset, bytes);
        if low.is_some() || high.is_some() {
            self.update(|w| merged(w, low, high));
        }
        self.memory_decode()
    }

    #[inline]
    fn update(&self, f: impl Fn(u64) -> u64) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| Some(f(w)));
    }
}

/// Whether a config access of `len` bytes at `offset` touches `PCI_COMMAND`.
pub(crate) fn touches_command(offset: u64, len: usize) -> bool {
    ByteRange::new(offset, len as u64).overlaps(&ByteRange::new(COMMAND_OFFSET, 2))
}

/// The low and high byte of `PCI_COMMAND` in `bytes`, found at config
/// offset `offset`, where present.
fn command_bytes(offset: u64, bytes: &[u8]) -> (Option<u8>, Option<u8>) {
    let at = |pos: u64| {
        pos.checked_sub(offset)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| bytes.get(i).copied())
    };
    (at(COMMAND_OFFSET), at(COMMAND_OFFSET + 1))
}

/// `w` with the bytes `low` and `high` of the register replaced (and marked
/// known), its generation bumped.
fn merged(w: u64, low: Option<u8>, high: Option<u8>) -> u64 {
    let mut v = value(w);
    let mut known = w & (LOW_KNOWN | HIGH_KNOWN);
    if let Some(b) = low {
        v = (v & 0xff00) | u16::from(b);
        known |= LOW_KNOWN;
    }
    if let Some(b) = high {
        v = (v & 0x00ff) | (u16::from(b) << 8);
        known |= HIGH_KNOWN;
    }
    with(w, u64::from(v) | known)
}

/// The register value in a word.
#[allow(clippy::cast_possible_truncation)]
const fn value(w: u64) -> u16 {
    w as u16
}

/// `w`'s generation plus one, with `state` (value and known bits).
const fn with(w: u64, state: u64) -> u64 {
    let generation = (w >> GEN_SHIFT).wrapping_add(1);
    (generation << GEN_SHIFT) | (state & (LOW_KNOWN | HIGH_KNOWN | 0xffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_until_read_or_set() {
        let k = KnownCommand::unknown();
        assert_eq!((k.command(), k.memory_decode()), (None, None));
        k.set(0x0406);
        assert_eq!((k.command(), k.memory_decode()), (Some(0x0406), Some(true)));
        k.forget();
        assert_eq!((k.command(), k.memory_decode()), (None, None));
    }

    #[test]
    fn partial_reads_fill_in_bytes() {
        let k = KnownCommand::unknown();
        // One byte at offset 4: the low byte only.
        assert_eq!(k.record_read(k.snapshot(), 4, &[0x06]), Some(true));
        assert_eq!((k.command(), k.memory_decode()), (None, Some(true)));
        // Offset 5: the high byte, no decode bit.
        assert_eq!(k.record_read(k.snapshot(), 5, &[0x04]), None);
        assert_eq!(k.command(), Some(0x0406));
        // A 16-byte read from 0 holds both.
        let mut hdr = [0u8; 16];
        hdr[4] = 0x04;
        hdr[5] = 0x00;
        assert_eq!(k.record_read(k.snapshot(), 0, &hdr), Some(false));
        assert_eq!(k.command(), Some(0x0004));
        // A read elsewhere changes nothing.
        assert_eq!(k.record_read(k.snapshot(), 8, &[1, 2, 3, 4]), None);
        assert_eq!(k.command(), Some(0x0004));
    }

    #[test]
    fn a_stale_read_does_not_overwrite_a_newer_record() {
        let k = KnownCommand::unknown();
        k.set(0x0006);
        let before = k.snapshot();
        // A transition records decode off while the read is in flight ...
        k.set(0x0004);
        // ... and the read, which saw the old value, loses.
        assert_eq!(k.record_read(before, 4, &[0x06, 0x00]), Some(true));
        assert_eq!(k.memory_decode(), Some(false));
    }

    #[test]
    fn writes_always_win_and_keep_the_other_byte() {
        let k = KnownCommand::unknown();
        k.set(0x0406);
        let before = k.snapshot();
        assert_eq!(k.record_write(4, &[0x04]), Some(false));
        assert_eq!(k.command(), Some(0x0404));
        // A read from before the write loses.
        k.record_read(before, 4, &[0x06, 0x04]);
        assert_eq!(k.command(), Some(0x0404));
        assert_eq!(k.record_write(5, &[0x00]), Some(false));
        assert_eq!(k.command(), Some(0x0004));
        assert_eq!(k.record_write(8, &[1]), Some(false));
        // The whole register at once (the trap path's fast case).
        assert_eq!(k.record_write(4, &[0x06, 0x01]), Some(true));
        assert_eq!(k.command(), Some(0x0106));
        assert_eq!(k.record_write(4, &[0x04, 0x00]), Some(false));
        assert_eq!(k.command(), Some(0x0004));
    }

    #[test]
    fn decode_bit_alone() {
        let k = KnownCommand::unknown();
        k.set_memory_decode(true);
        assert_eq!((k.command(), k.memory_decode()), (None, Some(true)));
        k.set(0x0406);
        k.set_memory_decode(false);
        assert_eq!(k.command(), Some(0x0404));
    }

    #[test]
    fn which_accesses_touch_the_register() {
        assert!(touches_command(4, 2));
        assert!(touches_command(5, 1));
        assert!(touches_command(0, 8));
        assert!(touches_command(2, 4));
        assert!(!touches_command(6, 2));
        assert!(!touches_command(0, 4));
        assert!(!touches_command(4, 0));
    }
}
