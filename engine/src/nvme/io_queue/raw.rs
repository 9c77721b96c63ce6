//! The queue lent to a raw driver loop (a benchmark's control, or a
//! command the queue does not know how to send).

use std::os::fd::{AsRawFd, RawFd};

use super::super::problem::NvmeProblem;
use super::super::shadow_doorbell::Doorbell;
use super::IoQueue;
use crate::Result;

/// A queue's view for a raw driver loop ([`IoQueue::with_raw`]): where its
/// rings and doorbells are, and the ring indices, which the loop must
/// leave consistent (every command it submitted completed and consumed).
#[derive(Debug)]
pub struct RawQueue<'q> {
    /// The queue ID.
    pub qid: u16,
    /// Entries of each ring.
    pub entries: u16,
    /// Commands the driver's table allows in flight (`entries - 1`).
    pub depth: u16,
    /// CPU address of submission queue entry 0 (64-byte entries).
    pub sq: *mut u8,
    /// CPU address of completion queue entry 0 (16-byte entries).
    pub cq: *mut u8,
    /// CPU address of the submission queue tail doorbell (MMIO). On a
    /// queue with shadow doorbells the controller reads the shadow, so a
    /// loop that writes only here loses commands: ring through `sq_bell`.
    pub sq_doorbell: *mut u32,
    /// CPU address of the completion queue head doorbell (MMIO); see
    /// `sq_doorbell`.
    pub cq_doorbell: *mut u32,
    /// The queue's tail doorbell as the engine rings it (shadow, event
    /// index, MMIO when needed).
    pub sq_bell: &'q Doorbell,
    /// The queue's head doorbell as the engine rings it.
    pub cq_bell: &'q Doorbell,
    /// CPU address of the PRP list pages, one per CID (`depth` of them).
    pub lists: *mut u8,
    /// IOVA of the first PRP list page.
    pub lists_iova: u64,
    /// The next submission queue slot; update it.
    pub sq_tail: u16,
    /// The next completion queue slot; update it. The controller was last
    /// told `cq_bell.last()`, which may be behind it: the engine rings the
    /// head right before the next tail, and a raw loop should too.
    pub cq_head: u16,
    /// The phase tag a new completion at `cq_head` carries; update it.
    pub cq_phase: bool,
    /// The namespace the queue's Reads and Writes go to.
    pub nsid: u32,
    /// Its block size in bytes.
    pub block_size: u64,
    /// The queue's MSI-X eventfd (non-blocking), when it has one.
    pub interrupt: Option<RawFd>,
}

impl IoQueue {
    /// Lends the queue to a raw driver loop `f` (a benchmark's control, or
    /// a command the queue does not know how to send): where the rings and
    /// doorbells are, and their indices. The queue must have no command in
    /// flight ([`NvmeProblem::QueueBusy`]); `f` must leave none either, and
    /// update `sq_tail`, `cq_head` and `cq_phase`, which the queue takes
    /// back. What `f` does with the pointers is its own `unsafe` business.
    pub fn with_raw<R>(&mut self, f: impl FnOnce(&mut RawQueue<'_>) -> R) -> Result<R> {
        let in_use = self.table.in_use();
        if in_use != 0 {
            return Err(self.ctrl.error(NvmeProblem::QueueBusy {
                qid: self.qid,
                in_use,
            }));
        }
        let mut raw = RawQueue {
            qid: self.qid,
            entries: self.sq.entries(),
            depth: self.table.depth(),
            sq: self.sq.as_ptr(),
            cq: self.cq.as_ptr(),
            sq_doorbell: self.sq_doorbell.as_ptr(),
            cq_doorbell: self.cq_doorbell.as_ptr(),
            sq_bell: &self.sq_doorbell,
            cq_bell: &self.cq_doorbell,
            lists: self
                .area
                .cpu
                .as_ptr()
                .wrapping_add(self.lists_offset as usize),
            lists_iova: self.lists_iova,
            sq_tail: self.sq.position(),
            cq_head: self.cq.position(),
            cq_phase: !self.cq.lap(),
            nsid: self.limits.nsid,
            block_size: 1 << self.limits.shift,
            interrupt: self.irq.as_ref().map(AsRawFd::as_raw_fd),
        };
        let r = f(&mut raw);
        let lap = self.sq.lap();
        self.sq.set_position(raw.sq_tail, lap);
        self.cq.set_position(raw.cq_head, !raw.cq_phase);
        Ok(r)
    }
}
