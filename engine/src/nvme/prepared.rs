//! Prepared commands: the hot path of an [`IoQueue`] for callers who move
//! the same buffers over and over (a userspace driver's fixed I/O buffers).
//!
//! Each buffer is registered once ([`IoQueue::prepare`]), which checks it
//! (its length against MDTS and the namespace, its IOVA's alignment, a held
//! buffer's length), builds its PRP list and its 64-byte submission entry,
//! and ties it to one command slot: the slot index is the command ID. A
//! submit then only puts the opcode and the LBA into that entry (one
//! comparison: the LBA against the namespace's end), copies it into the
//! submission queue and rings the doorbell; a reap reads the completion
//! queue's head entry and hands its slot back with the status.
//!
//! The promises of the checked API hold by the types instead of by a
//! command table: a slot is submitted by moving its [`Slot`] into the
//! queue, which is the only way to name it, and is handed back only by the
//! reap of that slot's completion, once; a set and its slots live inside
//! the closure given to [`IoQueue::prepare`] and carry a lifetime of their
//! own, so a slot of another set, or of an earlier one, does not compile
//! (no check at run time); the set owns the registered buffers, and when
//! the closure returns the queue keeps those of commands still running
//! until they complete (the queue's close waits for them).

use std::fmt;
use std::marker::PhantomData;
use std::num::NonZeroU64;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use super::command::{Status, nvm};
use super::dma::{Dma, DmaMemory};
use super::io_queue::IoQueue;
use super::problem::NvmeProblem;
use super::prp;
use super::regs::PAGE;
use crate::Result;
use crate::deadline::Deadline;

/// The brand of one set: an invariant lifetime that only the closure given
/// to [`IoQueue::prepare`] knows, so that no two sets' slots have the same
/// type.
type Brand<'id> = PhantomData<fn(&'id ()) -> &'id ()>;

/// What a prepared command does with its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// NVM Read: blocks into the buffer.
    Read = nvm::READ,
    /// NVM Write: blocks from the buffer.
    Write = nvm::WRITE,
}

/// The right to submit a command on one slot of a [`Prepared`] set (its
/// buffer, its command ID). Not `Clone`: submitting moves it into the
/// queue, and only the reap of that command's completion hands it back,
/// so a slot is never in flight twice and a completion goes to its own
/// command once. Its lifetime `'id` is its set's alone: it cannot leave
/// the closure given to [`IoQueue::prepare`], nor be given to another set.
///
/// ```compile_fail
/// # fn f(q: &mut dmabuf_p2p_engine::nvme::IoQueue, r: &mut dmabuf_p2p_engine::nvme::IoQueue) -> dmabuf_p2p_engine::Result<()> {
/// use dmabuf_p2p_engine::nvme::{Dma, Op};
/// q.prepare([(Dma::at(0x10000), 8)], |p, mut mine| {
///     r.prepare([(Dma::at(0x20000), 8)], |other, _| {
///         // A slot of another set: does not compile.
///         let _ = other.submit(mine.pop().unwrap(), Op::Read, 0);
///     })
/// })??;
/// # Ok(()) }
/// ```
///
/// ```compile_fail
/// # fn f(q: &mut dmabuf_p2p_engine::nvme::IoQueue) -> dmabuf_p2p_engine::Result<()> {
/// use dmabuf_p2p_engine::nvme::Dma;
/// // A slot kept past its set: does not compile.
/// let kept = q.prepare([(Dma::at(0x10000), 8)], |_, mut slots| slots.pop())?;
/// # Ok(()) }
/// ```
#[derive(Debug, PartialEq, Eq)]
pub struct Slot<'id> {
    index: u16,
    brand: Brand<'id>,
}

impl Slot<'_> {
    /// The slot's index: its buffer's place in the list given to
    /// [`IoQueue::prepare`], and its command ID.
    #[inline]
    pub fn index(&self) -> u16 {
        self.index
    }
}

/// A prepared command's completion: its slot, handed back
/// ([`into_slot`](Self::into_slot)), and the completion's status. Eight
/// bytes (the completion's dword 3 shifted left by one, and bit 0 set so
/// that it is never zero), so that a reap returns it in a register.
#[derive(PartialEq, Eq)]
pub struct Reaped<'id> {
    raw: NonZeroU64,
    brand: Brand<'id>,
}

impl<'id> Reaped<'id> {
    /// The slot's index (its command ID).
    #[inline]
    pub fn index(&self) -> u16 {
        (self.raw.get() >> 1) as u16
    }

    /// The 15-bit status field (CQE dword 3 bits 31:17).
    #[inline]
    pub fn status_field(&self) -> u16 {
        (self.raw.get() >> 18) as u16
    }

    /// Whether the command succeeded (status code type and code zero).
    #[inline]
    pub fn is_success(&self) -> bool {
        self.status_field() & 0x7ff == 0
    }

    /// The status, decoded.
    pub fn status(&self) -> Status {
        Status::from_field(self.status_field())
    }

    /// The slot, free for its next command.
    #[inline]
    pub fn into_slot(self) -> Slot<'id> {
        Slot {
            index: self.index(),
            brand: PhantomData,
        }
    }
}

impl fmt::Debug for Reaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reaped")
            .field("index", &self.index())
            .field("status", &self.status())
            .finish()
    }
}

/// A prepared command the queue refused: its slot, handed back, and why.
#[derive(Debug, thiserror::Error)]
#[error("prepared slot {}: {problem}", slot.index)]
pub struct Refused<'id> {
    /// The slot, still free.
    pub slot: Slot<'id>,
    /// What was wrong.
    pub problem: NvmeProblem,
}

/// One registered buffer: its submission entry without opcode and LBA,
/// whose word 1 (dwords 2 and 3, zero in a Read or Write) holds the last
/// LBA a command of the slot's length may start at: 64 bytes, one cache
/// line.
type Template = [u64; 8];
/// The word of a [`Template`] holding the last LBA.
const LAST_LBA: usize = 1;
/// One in-flight flag for every command ID a completion can name, so that
/// a reap looks its CID up without a bounds check (64 KiB a set).
type InFlight = Box<[bool; 1 << 16]>;

/// A set of buffers registered on an [`IoQueue`], driven through their
/// [`Slot`]s inside the closure given to [`IoQueue::prepare`]. While it
/// lives the queue is its alone; when the closure returns the queue takes
/// the slots back, and a command still running keeps its buffer alive
/// until it completes (as a given-up command does: the queue's close waits
/// for it).
///
/// Nothing on its submit and reap paths allocates, locks, checks a slot's
/// set or makes a `Result` of a completion.
pub struct Prepared<'q, 'id> {
    queue: &'q mut IoQueue,
    slots: Box<[Template]>,
    /// What each slot's commands keep alive (held buffers).
    keeps: Box<[Option<std::sync::Arc<dyn DmaMemory>>]>,
    /// Whether each CID has a command of this set in flight (only those
    /// below the slot count ever do).
    in_flight: InFlight,
    brand: Brand<'id>,
}

impl fmt::Debug for Prepared<'_, '_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("qid", &self.queue.qid())
            .field("slots", &self.slots.len())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl IoQueue {
    /// Registers `buffers` for prepared commands and runs `work` with the
    /// set and its slots; returns what `work` returns. Each
    /// `(memory, blocks)` is one slot (slot `i` is the `i`-th buffer, and
    /// command ID `i`), whose commands move `blocks` blocks of the queue's
    /// namespace to or from that memory. Every check of a Read or Write that does not
    /// depend on the LBA is made here (see
    /// [`submit_read`](Self::submit_read)), and each buffer's PRP list is
    /// written into the queue's list page of its slot. A held buffer
    /// ([`Dma::held`]) is kept by the set (and past it while a command on
    /// it runs); a bare IOVA must stay mapped as long. When `work` returns
    /// (or unwinds) the queue takes the slots back: a command still
    /// running is then given up (its completion dropped when it comes, its
    /// buffer kept until then).
    ///
    /// The queue must have no command in flight
    /// ([`NvmeProblem::QueueBusy`]); 1 to [`depth`](Self::depth) buffers
    /// ([`NvmeProblem::PreparedSlots`]).
    ///
    /// ```no_run
    /// # fn f(q: &mut dmabuf_p2p_engine::nvme::IoQueue, iova: u64) -> Result<(), Box<dyn std::error::Error>> {
    /// use dmabuf_p2p_engine::nvme::{Dma, Op};
    /// // Eight 4 KiB buffers (8 blocks of 512 bytes each).
    /// q.prepare((0..8u64).map(|i| (Dma::at(iova + i * 4096), 8)), |p, mut free| {
    ///     for (i, slot) in free.drain(..).enumerate() {
    ///         // Refused (an LBA past the end): the slot comes back in the error.
    ///         p.submit(slot, Op::Read, i as u64 * 8).map_err(|r| r.problem.to_string())?;
    ///     }
    ///     while p.in_flight() > 0 {
    ///         let done = p.wait(std::time::Duration::from_secs(5)).map_err(|e| e.to_string())?;
    ///         assert!(done.is_success());
    ///         free.push(done.into_slot()); // ready for its next command
    ///     }
    ///     Ok::<_, String>(())
    /// })??;
    /// # Ok(()) }
    /// ```
    pub fn prepare<R>(
        &mut self,
        buffers: impl IntoIterator<Item = (Dma, u32)>,
        work: impl for<'id> FnOnce(&mut Prepared<'_, 'id>, Vec<Slot<'id>>) -> R,
    ) -> Result<R> {
        let in_use = self.table.in_use();
        if in_use != 0 {
            return Err(self.ctrl.error(NvmeProblem::QueueBusy {
                qid: self.qid(),
                in_use,
            }));
        }
        let depth = self.depth();
        let (mut slots, mut keeps) = (Vec::new(), Vec::new());
        for (i, (dma, blocks)) in buffers.into_iter().enumerate() {
            if i >= usize::from(depth) {
                return Err(self.ctrl.error(NvmeProblem::PreparedSlots {
                    asked: i + 1,
                    depth,
                }));
            }
            let bytes = self.check_blocks(0, blocks, &dma)?;
            let list_at = i as u64 * PAGE;
            let plan = prp::plan(dma.iova, bytes, self.lists_iova + list_at).ok_or_else(|| {
                self.ctrl.error(NvmeProblem::TransferTooLarge {
                    bytes,
                    max: prp::MAX_LIST_TRANSFER,
                })
            })?;
            if plan.list_len > 0 {
                self.area
                    .cpu
                    .write_u64s(self.lists_offset + list_at, plan.list())?;
            }
            slots.push([
                ((i as u64) << 16) | (u64::from(self.limits.nsid) << 32),
                self.limits.blocks - u64::from(blocks),
                0,
                plan.prp1,
                plan.prp2,
                0,
                u64::from(blocks - 1),
                0,
            ]);
            keeps.push(dma.keep);
        }
        // 1..=depth slots (checked above).
        let n = slots.len() as u16;
        if !self.table.lend(n) {
            return Err(self.ctrl.error(NvmeProblem::PreparedSlots {
                asked: slots.len(),
                depth,
            }));
        }
        let tokens = (0..n)
            .map(|index| Slot {
                index,
                brand: PhantomData,
            })
            .collect();
        let mut set = Prepared {
            queue: self,
            slots: slots.into_boxed_slice(),
            keeps: keeps.into_boxed_slice(),
            in_flight: vec![false; 1 << 16]
                .into_boxed_slice()
                .try_into()
                .unwrap_or_else(|_| unreachable!("1 << 16 flags")),
            brand: PhantomData,
        };
        Ok(work(&mut set, tokens))
    }
}

impl<'id> Prepared<'_, 'id> {
    /// Slots in the set.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Always false: a set has at least one slot.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Blocks each command of slot `index` moves.
    pub fn blocks(&self, index: u16) -> Option<u32> {
        // NLB + 1 (`prepare`).
        self.slots.get(usize::from(index)).map(|t| t[6] as u32 + 1)
    }

    /// Commands submitted whose completion has not been reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight[..self.slots.len()]
            .iter()
            .filter(|&&f| f)
            .count()
    }

    /// Writes `slot`'s command (`op` on its blocks from `lba`) to the
    /// submission queue without ringing the doorbell (see
    /// [`ring`](Self::ring); the end of the set rings it too). An LBA
    /// whose blocks run past the namespace is refused and the slot handed
    /// back.
    #[inline(always)]
    pub fn push(&mut self, slot: Slot<'id>, op: Op, lba: u64) -> Result<(), Refused<'id>> {
        let t = match self.slots.get(usize::from(slot.index)) {
            Some(t) if lba <= t[LAST_LBA] => t,
            _ => return Err(self.refuse(slot, lba)),
        };
        // A Slot exists only while its command is not in flight.
        let index = usize::from(slot.index);
        debug_assert!(!self.in_flight[index]);
        self.in_flight[index] = true;
        // Dwords 2 to 5 and 14 to 15 of a Read or Write are zero.
        let entry = [t[0] | op as u64, 0, 0, t[3], t[4], lba, t[6], 0];
        self.queue.sq.write(&entry);
        self.queue.sq.advance();
        Ok(())
    }

    /// Tells the controller about every command pushed so far (one
    /// doorbell write).
    #[inline(always)]
    pub fn ring(&mut self) {
        self.queue.ring_sq();
    }

    /// [`push`](Self::push), then [`ring`](Self::ring).
    #[inline(always)]
    pub fn submit(&mut self, slot: Slot<'id>, op: Op, lba: u64) -> Result<(), Refused<'id>> {
        self.push(slot, op, lba)?;
        self.queue.ring_sq();
        Ok(())
    }

    /// The next completion, if the completion queue holds one: its slot
    /// handed back, with its status. Never waits; the completion queue's
    /// head doorbell is rung with the next submission (or before a wait
    /// blocks). `None` also when the entry was for no
    /// command in flight (a controller bug: counted in
    /// [`IoQueue::stray_completions`], and the next reap looks further).
    #[inline(always)]
    pub fn reap(&mut self) -> Option<Reaped<'id>> {
        self.take()
    }

    /// The head entry of the completion queue, if new, taken. Its head
    /// doorbell is rung with the next tail, or before a wait blocks
    /// (`IoQueue::announce_head`): ringing it at once, alone, is
    /// slower under QEMU, and ringing it only once a run of completions
    /// was drained let a queue as deep as its ring look full to the
    /// controller (0.67 of the peer's Reads per second at QD32).
    #[inline(always)]
    fn take(&mut self) -> Option<Reaped<'id>> {
        let q = &mut *self.queue;
        let dw3 = q.cq.read_u32::<3>();
        if (dw3 & (1 << 16) != 0) == q.cq.lap() {
            return None;
        }
        // Whatever the caller reads of the buffer comes after the phase
        // tag.
        fence(Ordering::Acquire);
        q.cq.advance();
        // CID in bits 15:0, the status field in 31:17.
        let flag = &mut self.in_flight[usize::from(dw3 as u16)];
        if *flag {
            *flag = false;
            // Never zero: bit 0 is set.
            NonZeroU64::new((u64::from(dw3) << 1) | 1).map(|raw| Reaped {
                raw,
                brand: PhantomData,
            })
        } else {
            self.stray();
            None
        }
    }

    #[cold]
    #[inline(never)]
    fn stray(&mut self) {
        self.queue.strays += 1;
    }

    /// Whether the completion queue holds a completion (a look that
    /// changes nothing).
    #[inline]
    pub fn has_completion(&self) -> bool {
        self.queue.cq_is_new()
    }

    /// Waits up to `timeout` for the next completion: spinning for the
    /// queue's spin budget ([`IoQueue::set_spin`]), then blocking on its
    /// interrupt or sleeping between looks. With nothing in flight,
    /// [`NvmeProblem::NothingInFlight`] at once. The completion queue's head
    /// doorbell is rung as [`reap`](Self::reap) says.
    pub fn wait(&mut self, timeout: Duration) -> Result<Reaped<'id>> {
        if let Some(r) = self.take() {
            return Ok(r);
        }
        if self.in_flight() == 0 {
            return Err(self.queue.ctrl.error(NvmeProblem::NothingInFlight {
                qid: self.queue.qid(),
            }));
        }
        let start = Instant::now();
        let budget = self.queue.spin.min(timeout);
        if !budget.is_zero() {
            let mut spins = 0u32;
            loop {
                if let Some(r) = self.take() {
                    return Ok(r);
                }
                // No PAUSE between looks (see `IoQueue::wait_for`).
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) && start.elapsed() >= budget {
                    break;
                }
            }
        }
        let deadline = Deadline::after(timeout.saturating_sub(start.elapsed()));
        loop {
            if let Some(r) = self.take() {
                return Ok(r);
            }
            self.queue
                .idle(deadline, timeout, "a prepared NVMe command")?;
        }
    }

    #[cold]
    #[inline(never)]
    fn refuse(&self, slot: Slot<'id>, lba: u64) -> Refused<'id> {
        // A slot of this set (the brand says so): its index is in range.
        let count = self
            .slots
            .get(usize::from(slot.index))
            .map_or(0, |t| t[6] as u32 + 1);
        let problem = NvmeProblem::LbaOutOfRange {
            nsid: self.queue.limits.nsid,
            lba,
            count,
            blocks: self.queue.limits.blocks,
        };
        Refused { slot, problem }
    }
}

impl Drop for Prepared<'_, '_> {
    fn drop(&mut self) {
        // Every command pushed and every completion taken is announced
        // (the same tail again is no news to the controller).
        self.queue.ring_sq();
        for ((cid, &running), keep) in (0u16..)
            .zip(self.in_flight.iter())
            .zip(self.keeps.iter_mut())
        {
            self.queue.table.give_back(cid, running, keep.take());
        }
    }
}
