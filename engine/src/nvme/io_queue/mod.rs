//! One I/O queue pair of an NVMe controller, owned by one thread at a
//! time: submission (one command, or a batch behind one doorbell), and
//! completion handed out per command, to any waiter, or polled.
//!
//! The submit and completion paths allocate nothing and take no lock: the
//! queue's memory, its doorbells (its own mapping of BAR0) and its command
//! table are the handle's alone. What the queues of one controller share
//! ([`Controller`]) is touched only to create and delete them.

use std::fmt;
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dmabuf_p2p::MappedRing;

use super::command::{Command, nvm};
use super::controller::Controller;
use super::dma::{Dma, DmaMemory};
use super::dma_area::DmaArea;
use super::identify::NamespaceIdentity;
use super::problem::NvmeProblem;
use super::queue::{CommandTable, SlotState};
use super::regs::PAGE;
use super::shadow_doorbell::{Doorbell, DoorbellWrites};
use crate::deadline::Deadline;
use crate::{Completion, Result};

mod batch;
mod checks;
mod close;
mod ids;
mod options;
mod raw;
mod rings;
mod storage;

pub use batch::Batch;
pub use close::DROP_WAIT;
pub use ids::{CommandId, Done};
pub use options::{DEFAULT_DEPTH, MAX_DEPTH, QueueOptions};
pub use raw::RawQueue;

/// What the checks of a Read or Write need from the namespace.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) nsid: u32,
    /// log2 of the block size.
    shift: u32,
    pub(super) blocks: u64,
    /// Blocks one command may move (0 without a namespace: nothing passes).
    max_blocks: u32,
    /// Bytes one command may move.
    max_transfer: u64,
}

impl Limits {
    fn new(ns: Option<NamespaceIdentity>, max_transfer: u64) -> Self {
        match ns {
            Some(ns) if ns.block_size.is_power_of_two() => {
                let shift = ns.block_size.trailing_zeros();
                let max_blocks = (max_transfer >> shift).min(1 << 16);
                Self {
                    nsid: ns.nsid,
                    shift,
                    blocks: ns.blocks,
                    // At most 65536.
                    max_blocks: max_blocks as u32,
                    max_transfer,
                }
            }
            _ => Self {
                nsid: 0,
                shift: 9,
                blocks: 0,
                max_blocks: 0,
                max_transfer,
            },
        }
    }
}

/// The keep-alive of a command's memory.
pub(super) type Keep = Arc<dyn DmaMemory>;

/// Every queue the process makes gets a number of its own, which its
/// command IDs carry.
static QUEUES_MADE: AtomicU32 = AtomicU32::new(0);

/// An I/O submission and completion queue pair, with its own memory, its
/// own MSI-X vector (or none, polled) and its own command IDs. It is
/// `Send`: make one per thread ([`super::Nvme::create_queue`]) and move it
/// there; nothing on its submit and completion paths locks or allocates.
///
/// A command is submitted with its data as a bare IOVA or as a held buffer
/// ([`Dma`]). Its completion is handed out once: to [`wait`](Self::wait)
/// for that command, or to [`wait_any`](Self::wait_any),
/// [`poll`](Self::poll) or [`poll_into`](Self::poll_into), oldest first. A
/// command given up ([`abandon`](Self::abandon)) still runs; its completion
/// is dropped when it comes, and a held buffer is kept until then.
///
/// # Closing a queue with commands in flight
///
/// [`close`](Self::close), and dropping the queue (which closes it with
/// [`DROP_WAIT`]), never delete the queue while the controller still runs
/// one of its commands, unless the controller fails to finish it:
///
/// 1. wait up to the timeout for every command submitted here, given-up
///    ones included, to complete;
/// 2. for any still running, send an Abort (admin) for each and wait up to
///    the timeout again;
/// 3. delete the submission queue, then the completion queue. The
///    controller completes or aborts the submission queue's commands
///    before it answers, so only then are the queue's memory and the
///    commands' held buffers let go of. Commands aborted here make
///    `close` fail with [`NvmeProblem::AbortedByDeletion`].
///
/// The NVMe specification lets a host delete a submission queue with
/// commands outstanding (they are aborted), but a careful driver does not
/// rely on it: the Linux driver freezes and drains its queues first. Here
/// it is also what keeps QEMU 7.2's NVMe device alive: its Delete I/O
/// Submission Queue (`nvme_del_sq` in hw/nvme/ctrl.c) cancels each
/// in-flight request with the synchronous `blk_aio_cancel`, which runs the
/// main loop (`aio_poll`, with the big QEMU lock held) until the request's
/// DMA control block drops its last reference. A request whose data goes
/// to or from MMIO (another controller's CMB, say) waits for QEMU's single
/// bounce buffer; cancelling it there (`dma_aio_cancel` in
/// softmmu/dma-helpers.c) calls the request's completion, so QEMU prints
/// "aio failed: Operation canceled", but never drops that reference, and
/// the main loop waits forever: the whole VM freezes. Reproduced in the VM
/// with reads into nvme1's CMB and QEMU's `dma_*` trace events
/// (docs/TESTBED.md). A request into RAM never waits for the bounce
/// buffer, so by QEMU's code its cancel completes.
pub struct IoQueue {
    /// The submission ring (64-byte entries; its cursor is the tail) and
    /// the completion ring (16-byte entries; its cursor is the head, its
    /// lap the phase tag expected: a new entry's is `!lap`), in `area`.
    pub(super) sq: MappedRing<8>,
    pub(super) cq: MappedRing<2>,
    /// The doorbells, in this queue's own mapping of BAR0.
    pub(super) sq_doorbell: Doorbell,
    pub(super) cq_doorbell: Doorbell,
    pub(super) lists_offset: u64,
    pub(super) lists_iova: u64,
    qid: u16,
    /// This queue's number in the process ([`CommandId`]).
    serial: u32,
    pub(super) limits: Limits,
    pub(super) table: CommandTable<Keep>,
    pub(super) spin: Duration,
    irq: Option<File>,
    /// Completions for no command in flight (ignored).
    pub(super) strays: u64,
    polling_reason: Option<String>,
    namespace: Option<NamespaceIdentity>,
    /// The rings and PRP list pages: submission queue at 0, then the
    /// completion queue, then the lists at `lists_offset`.
    pub(super) area: DmaArea,
    /// Whether the queue pair was deleted on the controller (closed).
    deleted: bool,
    /// Declared last: the controller outlives the queue's memory.
    pub(super) ctrl: Arc<Controller>,
}

impl fmt::Debug for IoQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoQueue")
            .field("controller", &self.ctrl.address)
            .field("qid", &self.qid)
            .field("depth", &self.table.depth())
            .field("in_flight", &self.table.in_use())
            .field("completion", &self.completion())
            .finish_non_exhaustive()
    }
}

impl IoQueue {
    /// Makes I/O queue pair number `qid`-to-be on `ctrl` (Create I/O
    /// Completion Queue, then Submission Queue) in memory of its own.
    pub(super) fn create(
        ctrl: &Arc<Controller>,
        opts: QueueOptions,
        namespace: Option<NamespaceIdentity>,
        max_transfer: u64,
        no_irq: Option<&str>,
    ) -> Result<Self> {
        let max = u16::try_from(ctrl.cap.max_queue_entries.saturating_sub(1))
            .unwrap_or(u16::MAX)
            .min(MAX_DEPTH);
        if opts.depth == 0 || opts.depth > max {
            return Err(ctrl.error(NvmeProblem::QueueDepth {
                depth: u32::from(opts.depth),
                max: u32::from(max),
            }));
        }
        let depth = opts.depth;
        let entries = depth + 1;
        let sq_bytes = (u64::from(entries) * 64).next_multiple_of(PAGE);
        let cq_bytes = (u64::from(entries) * 16).next_multiple_of(PAGE);
        let lists_bytes = u64::from(depth) * PAGE;
        let area = DmaArea::new(
            &ctrl.ioas,
            "nvme-io-queue",
            sq_bytes + cq_bytes + lists_bytes,
        )?;
        let db = Arc::new(ctrl.dev.map_bar(0)?);
        let qid = ctrl.take_qid()?;
        let rings = (|| -> Result<_> {
            // Shadows zeroed before the queue is made: it starts at 0.
            let shadow = ctrl.shadow_doorbells();
            let bell = |register: u64| -> Result<Doorbell> {
                let entry = match &shadow {
                    Some(b) => b.entry(register)?,
                    None => None,
                };
                Ok(Doorbell::new(db.register_u32(register)?, entry, entries))
            };
            Ok((
                area.cpu.ring::<8>(0, entries)?,
                area.cpu.ring::<2>(sq_bytes, entries)?,
                bell(ctrl.cap.sq_doorbell(qid))?,
                bell(ctrl.cap.cq_doorbell(qid))?,
            ))
        })();
        let (sq, cq, sq_doorbell, cq_doorbell) = match rings {
            Ok(r) => r,
            Err(e) => {
                ctrl.release_qid(qid);
                return Err(e);
            }
        };
        let wants_irq = opts.completion.unwrap_or(if ctrl.vectors.is_empty() {
            Completion::Polling
        } else {
            Completion::Interrupt
        }) == Completion::Interrupt;
        let (irq, polling_reason) = match (wants_irq, ctrl.vectors.get(usize::from(qid))) {
            (false, _) => (
                None,
                Some("polling was asked for (Completion::Polling)".into()),
            ),
            (true, Some(efd)) => match efd.try_clone() {
                Ok(f) => (Some(f), None),
                Err(e) => (None, Some(format!("duplicating the MSI-X eventfd: {e}"))),
            },
            (true, None) => (
                None,
                Some(match no_irq {
                    Some(why) => why.to_owned(),
                    None if ctrl.vectors.is_empty() => {
                        "the controller was opened without interrupts".to_owned()
                    }
                    None => format!(
                        "no MSI-X vector for queue {qid} ({} set up)",
                        ctrl.vectors.len()
                    ),
                }),
            ),
        };
        // Without MSI-X a controller takes vector 0 only (QEMU refuses any
        // other with Invalid Interrupt Vector), interrupts off or not.
        let vector = if irq.is_some() { qid } else { 0 };
        let made = ctrl
            .admin_command(Command::create_io_cq(
                qid,
                u32::from(entries),
                area.iova(sq_bytes),
                vector,
                irq.is_some(),
            ))
            .and_then(|_| {
                ctrl.admin_command(Command::create_io_sq(
                    qid,
                    u32::from(entries),
                    area.iova(0),
                    qid,
                ))
                .inspect_err(|_| {
                    let _ = ctrl.admin_command(Command::delete_io_queue(false, qid));
                })
            });
        if let Err(e) = made {
            ctrl.release_qid(qid);
            return Err(e);
        }
        Ok(Self {
            sq,
            cq,
            sq_doorbell,
            cq_doorbell,
            lists_offset: sq_bytes + cq_bytes,
            lists_iova: area.iova(sq_bytes + cq_bytes),
            qid,
            serial: QUEUES_MADE.fetch_add(1, Ordering::Relaxed),
            limits: Limits::new(namespace, max_transfer),
            table: CommandTable::new(depth),
            spin: opts.spin,
            irq,
            strays: 0,
            polling_reason,
            namespace,
            area,
            deleted: false,
            ctrl: Arc::clone(ctrl),
        })
    }
}

impl IoQueue {
    /// The queue ID.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// Commands that may be in flight at once.
    pub fn depth(&self) -> u16 {
        self.table.depth()
    }

    /// Commands submitted whose completion has been neither taken nor
    /// dropped: in flight, completed and not yet taken, or given up and
    /// still running.
    #[inline]
    pub fn in_flight(&self) -> usize {
        self.table.in_use()
    }

    /// Commands the controller still has: submitted (given up or not)
    /// and their completion not yet reaped (a look at the command table;
    /// the completion queue is not read).
    pub fn running(&self) -> usize {
        self.table.running().count()
    }

    /// How this queue's completions are noticed.
    pub fn completion(&self) -> Completion {
        if self.irq.is_some() {
            Completion::Interrupt
        } else {
            Completion::Polling
        }
    }

    /// Why this queue polls, if it does.
    pub fn polling_reason(&self) -> Option<&str> {
        self.polling_reason.as_deref()
    }

    /// How long a wait looks at the completion queue without sleeping
    /// before it blocks on the interrupt (or, polling, sleeps 200 µs
    /// between looks). Zero (the default): block or sleep at once.
    /// `Duration::MAX`: spin for the whole timeout, the lowest latency for
    /// a thread that has nothing else to do.
    pub fn set_spin(&mut self, budget: Duration) {
        self.spin = budget;
    }

    /// The namespace Reads and Writes go to.
    pub fn namespace(&self) -> Option<&NamespaceIdentity> {
        self.namespace.as_ref()
    }

    /// Sends this queue's Reads and Writes to namespace `ns` (from
    /// [`super::Nvme::identify_namespace`]).
    pub fn set_namespace(&mut self, ns: NamespaceIdentity) {
        self.namespace = Some(ns);
        self.limits = Limits::new(Some(ns), self.limits.max_transfer);
    }

    /// Completions the controller posted for no command in flight, which
    /// were ignored (a controller bug if ever non-zero).
    pub fn stray_completions(&self) -> u64 {
        self.strays
    }

    /// Whether this queue's doorbells have shadows (the controller took
    /// Doorbell Buffer Config): most updates then need no MMIO write.
    pub fn shadow_doorbells(&self) -> bool {
        self.sq_doorbell.is_shadowed()
    }

    /// The submission queue tail and completion queue head doorbells.
    pub fn doorbells(&self) -> (&Doorbell, &Doorbell) {
        (&self.sq_doorbell, &self.cq_doorbell)
    }

    /// Doorbell updates since the queue was made, and how many of them
    /// were MMIO writes (every one without shadow doorbells).
    pub fn doorbell_writes(&self) -> DoorbellWrites {
        let (sq_updates, sq_mmio) = self.sq_doorbell.counts();
        let (cq_updates, cq_mmio) = self.cq_doorbell.counts();
        DoorbellWrites {
            sq_updates,
            sq_mmio,
            cq_updates,
            cq_mmio,
        }
    }

    /// Starts reading `count` blocks from `lba` of the queue's namespace
    /// into `dst` (an IOVA, or a held buffer). Checks the request first
    /// (namespace, range, MDTS, alignment, the buffer's length); the
    /// completion is then taken by [`wait`](Self::wait) or the others.
    #[inline(always)]
    pub fn submit_read(&mut self, lba: u64, count: u32, dst: impl Into<Dma>) -> Result<CommandId> {
        let id = self.push_blocks(nvm::READ, lba, count, dst.into())?;
        self.ring()?;
        Ok(id)
    }

    /// Starts writing `count` blocks at `lba` from `src` (see
    /// [`submit_read`](Self::submit_read)).
    #[inline(always)]
    pub fn submit_write(&mut self, lba: u64, count: u32, src: impl Into<Dma>) -> Result<CommandId> {
        let id = self.push_blocks(nvm::WRITE, lba, count, src.into())?;
        self.ring()?;
        Ok(id)
    }

    /// Starts any I/O command: `cmd`'s opcode, namespace and dwords 10 to
    /// 15 are sent as they are; its CID and data pointer are the queue's.
    /// `data` is the memory and its length in bytes (at most the
    /// controller's maximum transfer), for which the queue builds PRP1,
    /// PRP2 and a PRP list; `None` for a command without data.
    ///
    /// ```no_run
    /// # fn f(q: &mut dmabuf_p2p_engine::nvme::IoQueue) -> dmabuf_p2p_engine::Result<()> {
    /// use std::time::Duration;
    /// use dmabuf_p2p_engine::nvme::command::Command;
    /// // Flush (opcode 0) namespace 1.
    /// let flush = Command { opcode: 0x00, nsid: 1, ..Command::default() };
    /// let id = q.submit_raw(flush, None)?;
    /// q.wait(id, Duration::from_secs(5))?;
    /// # Ok(()) }
    /// ```
    pub fn submit_raw(&mut self, cmd: Command, data: Option<(Dma, u64)>) -> Result<CommandId> {
        let id = self.push_raw(cmd, data)?;
        self.ring()?;
        Ok(id)
    }

    /// Waits up to `timeout` for command `id` and hands out its completion;
    /// completions of other commands that arrive meanwhile are kept for
    /// their waiters. A failed status is [`Error::Nvme`](crate::Error::Nvme) with
    /// [`NvmeProblem::CommandFailed`]; a command whose completion was taken
    /// already, or given up, is [`NvmeProblem::NotInFlight`]. After a
    /// timeout the command is still in flight: wait again, or give it up.
    #[inline(always)]
    pub fn wait(&mut self, id: CommandId, timeout: Duration) -> Result<Done> {
        let state = if id.queue == self.serial {
            self.table.state(id.cid, id.generation)
        } else {
            None
        };
        match state {
            Some(SlotState::Completed) => {}
            Some(SlotState::InFlight) => {
                self.reap_for(Some(id.cid))?;
                if !self.table.is_completed(id.cid) {
                    self.wait_for(Some(id.cid), timeout)?;
                }
            }
            _ => return Err(self.not_in_flight(id)),
        }
        match self.table.take_completed(id.cid) {
            Some(t) => self.check(self.done(t)),
            None => Err(self.not_in_flight(id)),
        }
    }

    /// Waits up to `timeout` for any command and hands out its completion:
    /// the oldest not yet taken. A failed command is a [`Done`] whose
    /// status says so ([`check`](Self::check) makes it an error). With no
    /// command in flight and none to take, [`NvmeProblem::NothingInFlight`]
    /// at once.
    #[inline]
    pub fn wait_any(&mut self, timeout: Duration) -> Result<Done> {
        if let Some(d) = self.poll()? {
            return Ok(d);
        }
        if !self.table.has_waited_for() {
            return Err(self
                .ctrl
                .error(NvmeProblem::NothingInFlight { qid: self.qid }));
        }
        self.wait_for(None, timeout)?;
        match self.table.pop_ready() {
            Some(t) => Ok(self.done(t)),
            None => Err(self
                .ctrl
                .error(NvmeProblem::NothingInFlight { qid: self.qid })),
        }
    }

    /// The oldest completion not yet taken, without waiting: the
    /// completion queue is looked at once.
    #[inline]
    pub fn poll(&mut self) -> Result<Option<Done>> {
        if !self.table.has_ready() {
            self.reap()?;
        }
        Ok(self.table.pop_ready().map(|t| self.done(t)))
    }

    /// Whether a completion waits to be taken, reaped or still in the
    /// completion queue: a look at the queue's memory, which changes
    /// nothing (for an event loop, or to spin on outside a timed span).
    #[inline]
    pub fn has_completion(&self) -> bool {
        self.table.has_ready() || self.cq_is_new()
    }

    /// Without waiting, hands out up to `out.len()` completions, oldest
    /// first, into `out`; how many.
    #[inline]
    pub fn poll_into(&mut self, out: &mut [Done]) -> Result<usize> {
        self.reap()?;
        let mut n = 0;
        while n < out.len() {
            let Some(t) = self.table.pop_ready() else {
                break;
            };
            out[n] = self.done(t);
            n += 1;
        }
        Ok(n)
    }

    /// Gives command `id` up: its completion will be dropped, not handed
    /// out. It still runs: a held buffer ([`Dma::held`]) stays mapped until
    /// its completion arrives; a bare IOVA must stay mapped until then too
    /// ([`quiesce`](Self::quiesce) waits for that). Its CID is given out
    /// again only after that completion.
    pub fn abandon(&mut self, id: CommandId) -> Result<()> {
        if id.queue == self.serial && self.table.abandon(id.cid, id.generation) {
            Ok(())
        } else {
            Err(self.not_in_flight(id))
        }
    }

    /// Waits up to `timeout` until the controller has completed every
    /// command submitted here, given-up ones included: then nothing it
    /// was given is touched any more. Completions not yet taken stay.
    pub fn quiesce(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Deadline::after(timeout);
        loop {
            self.reap()?;
            if !self.table.has_running() {
                return Ok(());
            }
            self.idle(deadline, timeout, "the queue's commands to complete")?;
        }
    }

    /// `done` as a result: a failed status is [`Error::Nvme`](crate::Error::Nvme) with
    /// [`NvmeProblem::CommandFailed`].
    #[inline(always)]
    pub fn check(&self, done: Done) -> Result<Done> {
        match done.problem() {
            None => Ok(done),
            Some(problem) => Err(self.ctrl.error(problem)),
        }
    }
}
