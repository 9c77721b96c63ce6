//! Shadow doorbells (NVMe 1.3 Doorbell Buffer Config, admin opcode 0x7C,
//! advertised by OACS bit 8): the driver writes each new submission queue
//! tail and completion queue head into a doorbell buffer in host memory,
//! and writes the MMIO doorbell only when the controller's event index for
//! that doorbell lies between the old and the new value.
//!
//! Why: on an emulated or virtual controller every MMIO doorbell write is
//! a VM exit into the device model. QEMU 7.2 (hw/nvme/ctrl.c) re-reads a
//! queue's shadow tail after each command it fetches and publishes, as
//! the event index, the tail it had before that read; it reads the shadow
//! head before each completion it posts and publishes the head it had
//! before that read. So a tail written while the controller is still
//! fetching, and a head written after a completion the controller posted
//! in the same pass, need no MMIO write: it sees them anyway.
//!
//! Order of a doorbell update: the shadow store, a full fence, the event
//! index load (the controller orders its event index store before its
//! shadow re-read the same way), then maybe the MMIO store. Both buffers
//! are one area of host memory mapped in the controller's IO address
//! space; the layout of each follows the doorbell registers (queue `y`'s
//! tail at `2y` strides, its head at `2y + 1`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use dmabuf_p2p::{Ioas, MappedRegister};

use super::command::Command;
use super::dma_area::DmaArea;
use super::regs::{Capabilities, PAGE};
use crate::Result;

/// Where the doorbell registers start in BAR0 (the buffers' offset 0).
const DOORBELLS: u64 = 0x1000;

/// Whether a doorbell moved from `old` to `new` on a ring of `entries`
/// must be written over MMIO, given the controller's `event` index: when
/// `event` lies in `[old, new)` going round the ring (the controller has
/// seen `old` or later and may not look again). Ring indices wrap at
/// `entries`, not at 2^16, so the distances are taken modulo `entries`;
/// an event index outside the ring (a controller that never wrote one)
/// asks for the MMIO write. No move, no write.
///
/// ```
/// use dmabuf_p2p_engine::nvme::shadow_doorbell::needs_mmio;
/// assert!(needs_mmio(3, 4, 3, 64)); // the controller saw 3: tell it
/// assert!(!needs_mmio(2, 4, 3, 64)); // it has not caught up: it will look
/// assert!(needs_mmio(63, 1, 63, 64)); // round the end of the ring
/// ```
#[inline(always)]
pub fn needs_mmio(event: u32, new: u16, old: u16, entries: u16) -> bool {
    let n = u32::from(entries);
    if event >= n {
        return new != old;
    }
    let (new, old) = (u32::from(new), u32::from(old));
    let moved = (new + n - old) % n;
    let behind = (event + n - old) % n;
    behind < moved
}

/// The two buffers of one controller (shadow doorbells at offset 0, event
/// indices at `len`), in host memory mapped in its IO address space.
#[derive(Debug)]
pub(super) struct ShadowBuffers {
    area: DmaArea,
    /// Bytes of each buffer (whole pages).
    len: u64,
    stride: u64,
}

impl ShadowBuffers {
    /// Buffers for the admin queue and `io_queues` I/O queue pairs.
    pub(super) fn new(ioas: &Ioas, cap: &Capabilities, io_queues: u16) -> Result<Self> {
        let len = (2 * (u64::from(io_queues) + 1) * cap.doorbell_stride).next_multiple_of(PAGE);
        Ok(Self {
            area: DmaArea::new(ioas, "nvme-shadow-doorbells", 2 * len)?,
            len,
            stride: cap.doorbell_stride,
        })
    }

    /// Doorbell Buffer Config for these buffers (PRP1 the shadow doorbells,
    /// PRP2 the event indices).
    pub(super) fn config_command(&self) -> Command {
        Command::doorbell_buffer_config(self.area.iova(0), self.area.iova(self.len))
    }

    /// The shadow and event index of the doorbell register at `register`
    /// (its BAR0 offset), both set to 0 (a queue about to be made starts
    /// there). `None` for a register past the buffers.
    pub(super) fn entry(&self, register: u64) -> Result<Option<ShadowEntry>> {
        let Some(at) = register.checked_sub(DOORBELLS) else {
            return Ok(None);
        };
        if at % self.stride.max(4) != 0 || at + 4 > self.len {
            return Ok(None);
        }
        let value = self.area.cpu.register_u32(at)?;
        let event = self.area.cpu.register_u32(self.len + at)?;
        value.write(0);
        event.write(0);
        Ok(Some(ShadowEntry { value, event }))
    }
}

/// One doorbell's shadow and event index.
#[derive(Debug)]
pub(super) struct ShadowEntry {
    value: MappedRegister,
    event: MappedRegister,
}

/// Counts of one doorbell's updates ([`IoQueue::doorbell_writes`](super::IoQueue::doorbell_writes)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DoorbellWrites {
    /// Updates of the submission queue tail (calls that moved it or not).
    pub sq_updates: u64,
    /// Of those, MMIO writes to the tail doorbell.
    pub sq_mmio: u64,
    /// Updates of the completion queue head.
    pub cq_updates: u64,
    /// Of those, MMIO writes to the head doorbell.
    pub cq_mmio: u64,
}

/// A queue's doorbell: its MMIO register and, when the controller took
/// Doorbell Buffer Config, its shadow. Written through `&self` (the
/// queue's owner is the only writer; the atomics are plain loads and
/// stores, no read-modify-write, so they cost what a field does).
#[derive(Debug)]
pub struct Doorbell {
    mmio: MappedRegister,
    shadow: Option<ShadowEntry>,
    /// Ring entries (the indices wrap here).
    entries: u16,
    /// The value last written (to the shadow, or over MMIO).
    last: AtomicU32,
    updates: AtomicU64,
    mmio_writes: AtomicU64,
}

impl Doorbell {
    pub(super) fn new(mmio: MappedRegister, shadow: Option<ShadowEntry>, entries: u16) -> Self {
        Self {
            mmio,
            shadow,
            entries: entries.max(1),
            last: AtomicU32::new(0),
            updates: AtomicU64::new(0),
            mmio_writes: AtomicU64::new(0),
        }
    }

    /// Whether updates go to a shadow first.
    pub fn is_shadowed(&self) -> bool {
        self.shadow.is_some()
    }

    /// Tells the controller the new index `value` (a tail or a head): the
    /// shadow, and the MMIO register when the event index asks for it (or
    /// always, without a shadow). The caller has ordered the entries the
    /// value announces before this call.
    #[inline(always)]
    pub fn write(&self, value: u32) {
        bump(&self.updates);
        match &self.shadow {
            None => {
                self.last.store(value, Ordering::Relaxed);
                bump(&self.mmio_writes);
                self.mmio.write(value);
            }
            Some(s) => {
                let old = self.last.load(Ordering::Relaxed);
                self.last.store(value, Ordering::Relaxed);
                s.value.write(value);
                // The shadow store before the event index load: else the
                // controller may publish its index, not see the new value,
                // and go idle while this side reads a stale index.
                fence(Ordering::SeqCst);
                let event = s.event.read();
                if needs_mmio(event, value as u16, old as u16, self.entries) {
                    bump(&self.mmio_writes);
                    self.mmio.write(value);
                }
            }
        }
    }

    /// Writes `value` to the shadow (if any) and over MMIO, whatever the
    /// event index says (the admin queue, and a raw loop's control mode).
    pub fn write_always(&self, value: u32) {
        bump(&self.updates);
        bump(&self.mmio_writes);
        self.last.store(value, Ordering::Relaxed);
        if let Some(s) = &self.shadow {
            s.value.write(value);
            fence(Ordering::SeqCst);
        }
        self.mmio.write(value);
    }

    /// The value last written (the tail or head the controller was told).
    pub fn last(&self) -> u32 {
        self.last.load(Ordering::Relaxed)
    }

    /// The controller's event index for this doorbell (what it last
    /// published), when the doorbell has a shadow.
    pub fn event_index(&self) -> Option<u32> {
        self.shadow.as_ref().map(|s| s.event.read())
    }

    /// Updates so far and MMIO writes among them.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.updates.load(Ordering::Relaxed),
            self.mmio_writes.load(Ordering::Relaxed),
        )
    }

    /// The MMIO register's address, for raw loops (see
    /// [`MappedRegister::as_ptr`]).
    pub fn as_ptr(&self) -> *mut u32 {
        self.mmio.as_ptr()
    }
}

/// `c += 1` with a plain load and store (one writer).
#[inline(always)]
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::needs_mmio;

    /// The reference: walk from `old` to `new` one step at a time round a
    /// ring of `entries`; the MMIO write is needed when the walk passes
    /// over `event` (it steps off it).
    fn walk(event: u32, new: u16, old: u16, entries: u16) -> bool {
        if event >= u32::from(entries) {
            return new != old;
        }
        let mut at = old;
        while at != new {
            if u32::from(at) == event {
                return true;
            }
            at = (at + 1) % entries;
        }
        false
    }

    #[test]
    fn every_index_of_small_rings_matches_the_walk() {
        for entries in [2u16, 3, 5, 8, 33, 65] {
            for old in 0..entries {
                for new in 0..entries {
                    for event in 0..u32::from(entries) + 2 {
                        assert_eq!(
                            needs_mmio(event, new, old, entries),
                            walk(event, new, old, entries),
                            "event {event} new {new} old {old} entries {entries}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn wrap_around_the_end_of_the_ring() {
        // 1025 entries (depth 1024): tail 1020 -> 3 crosses the end.
        assert!(needs_mmio(1020, 3, 1020, 1025));
        assert!(needs_mmio(1024, 3, 1020, 1025));
        assert!(needs_mmio(0, 3, 1020, 1025));
        assert!(needs_mmio(2, 3, 1020, 1025));
        assert!(!needs_mmio(3, 3, 1020, 1025));
        assert!(!needs_mmio(1019, 3, 1020, 1025));
        // A whole lap less one: everything but `new` is in between.
        assert!(needs_mmio(500, 1019, 1020, 1025));
        assert!(!needs_mmio(1019, 1019, 1020, 1025));
    }

    #[test]
    fn no_move_no_write_and_a_stale_index_is_behind() {
        assert!(!needs_mmio(7, 7, 7, 64));
        assert!(!needs_mmio(0, 7, 7, 64));
        // The controller's index one behind `old` (QEMU's completion queue
        // index is the head it had before its last read): no write.
        assert!(!needs_mmio(6, 8, 7, 64));
        // No index published (zeroed buffer) and a ring that crosses 0.
        assert!(needs_mmio(0, 1, 63, 64));
        assert!(needs_mmio(u32::MAX, 1, 0, 64));
    }
}
