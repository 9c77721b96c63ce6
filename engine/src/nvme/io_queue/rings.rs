//! The hot path: commands into the submission ring, completions out of
//! the completion ring into the command table, and the waits.

use std::io::Read;
use std::os::fd::AsFd;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use super::super::command::{Command, Status};
use super::super::controller::{IRQ_SLICE, POLL_SLEEP};
use super::super::dma::Dma;
use super::super::problem::NvmeProblem;
use super::super::prp;
use super::super::queue::{Arrival, CommandTable, Taken};
use super::super::regs::PAGE;
use super::ids::{CommandId, Done};
use super::{IoQueue, Keep};
use crate::deadline::Deadline;
use crate::{Error, Result, wait_readable};

impl IoQueue {
    // ----------------------------------------------------------------
    // The hot path
    // ----------------------------------------------------------------

    /// Checks a Read or Write and writes it to the submission queue (no
    /// doorbell).
    #[inline(always)]
    pub(super) fn push_blocks(
        &mut self,
        opcode: u8,
        lba: u64,
        count: u32,
        dma: Dma,
    ) -> Result<CommandId> {
        let bytes = self.check_blocks(lba, count, &dma)?;
        let nlb = u64::from(count - 1);
        self.push(
            opcode,
            self.limits.nsid,
            [lba, nlb, 0],
            dma.iova,
            bytes,
            dma.keep,
        )
    }

    /// Checks a raw command's data and writes it to the submission queue.
    pub(super) fn push_raw(&mut self, cmd: Command, data: Option<(Dma, u64)>) -> Result<CommandId> {
        let pair = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
        let cdw = [
            pair(cmd.cdw[0], cmd.cdw[1]),
            pair(cmd.cdw[2], cmd.cdw[3]),
            pair(cmd.cdw[4], cmd.cdw[5]),
        ];
        match data {
            None => self.push(cmd.opcode, cmd.nsid, cdw, 0, 0, None),
            Some((dma, len)) => {
                self.check_data(&dma, len)?;
                self.push(cmd.opcode, cmd.nsid, cdw, dma.iova, len, dma.keep)
            }
        }
    }

    /// Takes a CID and writes the command to the submission queue: `cdw`
    /// are dwords 10 to 15 in pairs; `len` bytes of data at `iova` (none
    /// when 0), checked.
    #[inline(always)]
    pub(super) fn push(
        &mut self,
        opcode: u8,
        nsid: u32,
        cdw: [u64; 3],
        iova: u64,
        len: u64,
        keep: Option<Keep>,
    ) -> Result<CommandId> {
        let Some((cid, generation)) = self.table.take(opcode, keep) else {
            return Err(self.full());
        };
        if let Err(e) = self.write_entry(cid, opcode, nsid, cdw, iova, len) {
            self.table.cancel(cid);
            return Err(e);
        }
        Ok(CommandId {
            queue: self.serial,
            qid: self.qid,
            cid,
            generation,
        })
    }

    /// Writes the submission queue entry of `cid` (and its PRP list).
    #[inline(always)]
    pub(super) fn write_entry(
        &mut self,
        cid: u16,
        opcode: u8,
        nsid: u32,
        cdw: [u64; 3],
        iova: u64,
        len: u64,
    ) -> Result<()> {
        let (prp1, prp2) = if len == 0 {
            (0, 0)
        } else {
            let list_at = u64::from(cid) * PAGE;
            // Never `None` for a checked transfer (at most the maximum
            // transfer, which one list page covers, not wrapping).
            let Some(plan) = prp::plan(iova, len, self.lists_iova + list_at) else {
                return Err(self.ctrl.error(NvmeProblem::TransferTooLarge {
                    bytes: len,
                    max: prp::MAX_LIST_TRANSFER,
                }));
            };
            if plan.list_len > 0 {
                self.area
                    .cpu
                    .write_u64s(self.lists_offset + list_at, plan.list())?;
            }
            (plan.prp1, plan.prp2)
        };
        let entry = [
            u64::from(opcode) | (u64::from(cid) << 16) | (u64::from(nsid) << 32),
            0,
            0,
            prp1,
            prp2,
            cdw[0],
            cdw[1],
            cdw[2],
        ];
        self.sq.write(&entry);
        self.sq.advance();
        Ok(())
    }

    /// Tells the controller about every entry written so far.
    #[inline(always)]
    pub(super) fn ring(&mut self) -> Result<()> {
        self.ring_sq();
        Ok(())
    }

    /// Rings the submission doorbell with the tail, the completion
    /// queue's head first if completions were taken since it was last
    /// told.
    #[inline(always)]
    pub(in crate::nvme) fn ring_sq(&self) {
        // The entries (and PRP lists) are in memory before the controller
        // hears of them.
        fence(Ordering::SeqCst);
        self.announce_head();
        self.sq_doorbell.write(u32::from(self.sq.position()));
    }

    /// Tells the controller the completion queue's head if completions
    /// were taken since it last heard: right before each tail doorbell
    /// and before a wait blocks, never alone as completions are taken
    /// (QEMU serves head-then-tail back to back far faster: BENCHMARKS,
    /// the peer check). Each tail announcing the head, the controller
    /// counts at most the commands then in flight, so never a full ring.
    #[inline(always)]
    pub(in crate::nvme) fn announce_head(&self) {
        let head = u32::from(self.cq.position());
        if self.cq_doorbell.last() != head {
            self.cq_doorbell.write(head);
        }
    }

    /// Whether the completion queue's head entry is new (its phase tag).
    #[inline(always)]
    pub(in crate::nvme) fn cq_is_new(&self) -> bool {
        (self.cq.read_u32::<3>() & (1 << 16) != 0) != self.cq.lap()
    }

    /// Takes every new completion off the completion queue into the
    /// command table; how many. The head doorbell is rung with the next
    /// tail, or before a wait blocks (`announce_head`).
    #[inline(always)]
    pub(super) fn reap(&mut self) -> Result<usize> {
        self.reap_for(None)
    }

    /// [`reap`](Self::reap) for a caller waiting for CID `waited`, whose
    /// completion it hands over at once.
    #[inline(always)]
    pub(super) fn reap_for(&mut self, waited: Option<u16>) -> Result<usize> {
        let mut n = 0usize;
        loop {
            let dw3 = self.cq.read_u32::<3>();
            if (dw3 & (1 << 16) != 0) == self.cq.lap() {
                break;
            }
            // The rest of the entry is read only after its phase tag.
            fence(Ordering::Acquire);
            let dw0 = self.cq.read_u32::<0>();
            self.cq.advance();
            // CID in bits 15:0, the status field in 31:17.
            let arrival = self
                .table
                .complete_for(dw3 as u16, (dw3 >> 17) as u16, dw0, waited);
            if arrival == Arrival::Stray {
                self.strays += 1;
            }
            n += 1;
            // The waiter's completion is here: the rest can wait.
            if waited == Some(dw3 as u16) && arrival == Arrival::Kept {
                break;
            }
            // A whole ring's worth at a time; the rest on the next call.
            if n == usize::from(self.cq.entries()) {
                break;
            }
        }
        Ok(n)
    }

    #[inline(always)]
    pub(super) fn done(&self, t: Taken) -> Done {
        Done {
            id: CommandId {
                queue: self.serial,
                qid: self.qid,
                cid: t.cid,
                generation: t.generation,
            },
            opcode: t.opcode,
            status: Status::from_field(t.status),
            result: t.dw0,
        }
    }

    /// Reaps until slot `cid` (any slot, for `None`) holds a completion
    /// not yet taken: first spinning for the spin budget, then blocking on
    /// the interrupt or sleeping between looks, until `timeout`.
    pub(super) fn wait_for(&mut self, cid: Option<u16>, timeout: Duration) -> Result<()> {
        let ready = |t: &CommandTable<Keep>| match cid {
            Some(c) => t.is_completed(c),
            None => t.has_ready(),
        };
        let start = Instant::now();
        let budget = self.spin.min(timeout);
        if !budget.is_zero() {
            let mut spins = 0u32;
            loop {
                if self.reap_for(cid)? > 0 && ready(&self.table) {
                    return Ok(());
                }
                // No PAUSE (`spin_loop`) between looks: under TCG it leaves
                // the translated code for QEMU's CPU loop, which cost a
                // QD1 command 25 µs against 19 without (BENCHMARKS, the
                // peer check); libvfn's loop does not pause either.
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) && start.elapsed() >= budget {
                    break;
                }
            }
        }
        let deadline = Deadline::after(timeout.saturating_sub(start.elapsed()));
        let what = if cid.is_some() {
            "an NVMe I/O command"
        } else {
            "an NVMe I/O completion"
        };
        loop {
            if self.reap_for(cid)? > 0 && ready(&self.table) {
                return Ok(());
            }
            self.idle(deadline, timeout, what)?;
        }
    }

    /// Blocks on the interrupt (bounded, in case one is missed) or sleeps
    /// briefly; past `deadline`, the timeout error (or the controller's
    /// fatal status, if it reports one).
    pub(in crate::nvme) fn idle(
        &self,
        deadline: Deadline,
        timeout: Duration,
        what: &str,
    ) -> Result<()> {
        // Before blocking, the controller knows every completion taken.
        self.announce_head();
        let left = deadline.left();
        if left.is_zero() {
            self.ctrl.check_alive()?;
            return Err(Error::Timeout {
                what: format!("{what} on {} queue {}", self.ctrl.label, self.qid),
                after: timeout,
            });
        }
        match &self.irq {
            Some(efd) => {
                wait_readable(efd.as_fd(), left.min(IRQ_SLICE), "NVMe MSI-X eventfd")?;
                let mut count = [0u8; 8];
                // Non-blocking: WouldBlock when nothing was signalled.
                let _ = (&*efd).read(&mut count);
            }
            None => std::thread::sleep(left.min(POLL_SLEEP)),
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    pub(super) fn full(&self) -> Error {
        self.ctrl.error(NvmeProblem::QueueFull {
            in_flight: self.table.in_use(),
        })
    }

    #[cold]
    #[inline(never)]
    pub(super) fn not_in_flight(&self, id: CommandId) -> Error {
        self.ctrl.error(NvmeProblem::NotInFlight {
            qid: id.qid,
            cid: id.cid,
            generation: id.generation,
            queue: self.qid,
        })
    }
}
