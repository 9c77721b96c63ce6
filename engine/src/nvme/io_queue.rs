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
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

use dmabuf_p2p::MappedRing;

use super::command::{self, Command, Status, nvm};
use super::controller::{Controller, DmaArea, IRQ_SLICE, POLL_SLEEP};
use super::dma::{Dma, DmaMemory};
use super::identify::NamespaceIdentity;
use super::problem::NvmeProblem;
use super::prp;
use super::queue::{Arrival, CommandTable, SlotState, Taken};
use super::regs::PAGE;
use super::shadow_doorbell::{Doorbell, DoorbellWrites};
use crate::deadline::Deadline;
use crate::{Completion, Error, Result, StorageEngine, wait_readable};

/// The deepest queue the driver makes (commands in flight at once).
pub const MAX_DEPTH: u16 = 1024;
/// The depth of a queue made with [`QueueOptions::default`].
pub const DEFAULT_DEPTH: u16 = 64;

/// A command submitted to an [`IoQueue`]: its queue (which queue of the
/// process, not only its queue ID, which a later queue may reuse), its
/// CID, and which use of that CID it is. A CID is given out again only
/// after the command's completion was taken (or dropped, for a command
/// given up), and then with the next use, so the ID of a finished command
/// stays stale: waiting for it is [`NvmeProblem::NotInFlight`], never
/// another command's completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommandId {
    queue: u32,
    qid: u16,
    cid: u16,
    generation: u32,
}

impl CommandId {
    /// The I/O queue's ID.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// The command identifier the controller sees.
    pub fn cid(&self) -> u16 {
        self.cid
    }

    /// Which use of the CID this command is.
    pub fn generation(&self) -> u32 {
        self.generation
    }
}

/// A command's completion, handed to the caller once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Which command.
    pub id: CommandId,
    /// Its opcode.
    pub opcode: u8,
    /// The status the controller returned.
    pub status: Status,
    /// Dword 0 of the completion (command specific).
    pub result: u32,
}

impl Done {
    /// Whether the command succeeded.
    #[inline]
    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    /// What went wrong, if the command failed: the problem an
    /// [`Error::Nvme`] carries ([`IoQueue::check`] makes the error).
    pub fn problem(&self) -> Option<NvmeProblem> {
        (!self.is_success()).then(|| NvmeProblem::CommandFailed {
            command: command::opcode_name(self.opcode, false),
            cid: self.id.cid,
            status: self.status,
        })
    }
}

/// How to make an I/O queue ([`super::Nvme::create_queue`]).
///
/// ```
/// use std::time::Duration;
/// use dmabuf_p2p_engine::Completion;
/// use dmabuf_p2p_engine::nvme::QueueOptions;
/// let polled = QueueOptions::new().depth(32).completion(Completion::Polling).spin(Duration::MAX);
/// assert_eq!(polled.depth_asked(), 32);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    depth: u16,
    completion: Option<Completion>,
    spin: Duration,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            depth: DEFAULT_DEPTH,
            completion: None,
            spin: Duration::ZERO,
        }
    }
}

impl QueueOptions {
    /// Depth 64, completion as the controller was opened with, no spinning.
    pub fn new() -> Self {
        Self::default()
    }

    /// Commands in flight at once, 1..=[`MAX_DEPTH`] and at most what the
    /// controller allows (CAP.MQES); the rings get one entry more.
    pub fn depth(mut self, depth: u16) -> Self {
        self.depth = depth;
        self
    }

    /// The depth asked for.
    pub fn depth_asked(&self) -> u16 {
        self.depth
    }

    /// [`Completion::Interrupt`] (the queue's own MSI-X vector, when the
    /// controller was opened with interrupts and has a vector for it) or
    /// [`Completion::Polling`] (the completion queue is made without
    /// interrupts).
    pub fn completion(mut self, completion: Completion) -> Self {
        self.completion = Some(completion);
        self
    }

    /// How long a wait looks at the completion queue without sleeping
    /// before it blocks on the interrupt or, polling, sleeps between looks
    /// (see [`IoQueue::set_spin`]). `Duration::MAX`: spin for the whole
    /// timeout.
    pub fn spin(mut self, budget: Duration) -> Self {
        self.spin = budget;
        self
    }
}

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
    /// The doorbells, in this queue's own mapping of BAR0, with their
    /// shadows when the controller uses shadow doorbells.
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
    /// The next completion queue slot; update it.
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

    /// A batch: commands written to the submission queue and announced to
    /// the controller with one doorbell write when the batch is submitted
    /// or dropped.
    ///
    /// ```no_run
    /// # fn f(q: &mut dmabuf_p2p_engine::nvme::IoQueue, iova: u64) -> dmabuf_p2p_engine::Result<()> {
    /// let mut batch = q.batch();
    /// for i in 0..8u64 {
    ///     batch.read(i * 8, 8, iova + i * 4096)?;
    /// }
    /// batch.submit()?; // one doorbell for eight Reads
    /// # Ok(()) }
    /// ```
    pub fn batch(&mut self) -> Batch<'_> {
        Batch {
            queue: self,
            pushed: 0,
        }
    }

    /// Waits up to `timeout` for command `id` and hands out its completion;
    /// completions of other commands that arrive meanwhile are kept for
    /// their waiters. A failed status is [`Error::Nvme`] with
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

    /// `done` as a result: a failed status is [`Error::Nvme`] with
    /// [`NvmeProblem::CommandFailed`].
    #[inline(always)]
    pub fn check(&self, done: Done) -> Result<Done> {
        match done.problem() {
            None => Ok(done),
            Some(problem) => Err(self.ctrl.error(problem)),
        }
    }

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

    // ----------------------------------------------------------------
    // The hot path
    // ----------------------------------------------------------------

    /// Checks a Read or Write and writes it to the submission queue (no
    /// doorbell).
    #[inline(always)]
    fn push_blocks(&mut self, opcode: u8, lba: u64, count: u32, dma: Dma) -> Result<CommandId> {
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
    fn push_raw(&mut self, cmd: Command, data: Option<(Dma, u64)>) -> Result<CommandId> {
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

    /// The checks of a Read or Write, in one test: namespace, 1 to MDTS
    /// blocks, inside the namespace, a dword-aligned IOVA whose range does
    /// not wrap, and no longer than a held buffer. Returns the byte count.
    #[inline(always)]
    pub(super) fn check_blocks(&self, lba: u64, count: u32, dma: &Dma) -> Result<u64> {
        let l = &self.limits;
        let bytes = u64::from(count) << l.shift;
        let ok = (count.wrapping_sub(1) < l.max_blocks)
            & (lba < l.blocks)
            & (u64::from(count) <= l.blocks.wrapping_sub(lba))
            & (dma.iova & 3 == 0)
            & (bytes <= dma.available)
            & (dma.iova <= u64::MAX - bytes);
        if ok {
            Ok(bytes)
        } else {
            Err(self.blocks_error(lba, count, dma))
        }
    }

    /// Which check of [`check_blocks`](Self::check_blocks) failed.
    #[cold]
    #[inline(never)]
    fn blocks_error(&self, lba: u64, count: u32, dma: &Dma) -> Error {
        let l = &self.limits;
        let problem = match self.namespace {
            None => NvmeProblem::NoSuchNamespace { nsid: 1, count: 0 },
            Some(_) if count == 0 => NvmeProblem::EmptyTransfer,
            Some(_) if count > l.max_blocks => NvmeProblem::TransferTooLarge {
                bytes: u64::from(count) << l.shift,
                max: l.max_transfer,
            },
            Some(ns)
                if lba
                    .checked_add(u64::from(count))
                    .is_none_or(|end| end > l.blocks) =>
            {
                NvmeProblem::LbaOutOfRange {
                    nsid: ns.nsid,
                    lba,
                    count,
                    blocks: l.blocks,
                }
            }
            Some(_) => return self.data_error(dma, u64::from(count) << l.shift),
        };
        self.ctrl.error(problem)
    }

    /// The checks of a raw command's data pointer.
    #[inline]
    fn check_data(&self, dma: &Dma, len: u64) -> Result<()> {
        let ok = (len <= self.limits.max_transfer)
            & (dma.iova & 3 == 0)
            & (len <= dma.available)
            & (dma.iova <= u64::MAX - len);
        if ok {
            Ok(())
        } else {
            Err(self.data_error(dma, len))
        }
    }

    #[cold]
    #[inline(never)]
    fn data_error(&self, dma: &Dma, len: u64) -> Error {
        let problem = if len > self.limits.max_transfer {
            NvmeProblem::TransferTooLarge {
                bytes: len,
                max: self.limits.max_transfer,
            }
        } else if !dma.iova.is_multiple_of(4) {
            NvmeProblem::UnalignedIova {
                iova: dma.iova,
                align: 4,
            }
        } else if dma.iova.checked_add(len).is_none() {
            NvmeProblem::IovaOverflow {
                iova: dma.iova,
                len,
            }
        } else {
            NvmeProblem::BufferOverrun {
                iova: dma.iova,
                bytes: len,
                available: dma.available,
            }
        };
        self.ctrl.error(problem)
    }

    /// Takes a CID and writes the command to the submission queue: `cdw`
    /// are dwords 10 to 15 in pairs; `len` bytes of data at `iova` (none
    /// when 0), checked.
    #[inline(always)]
    fn push(
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
    fn write_entry(
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
    fn ring(&mut self) -> Result<()> {
        self.ring_sq();
        Ok(())
    }

    /// Rings the submission doorbell with the tail.
    #[inline(always)]
    pub(super) fn ring_sq(&self) {
        // The entries (and PRP lists) are in memory before the controller
        // hears of them.
        fence(Ordering::SeqCst);
        self.sq_doorbell.write(u32::from(self.sq.position()));
    }

    /// Whether the completion queue's head entry is new (its phase tag).
    #[inline(always)]
    pub(super) fn cq_is_new(&self) -> bool {
        (self.cq.read_u32::<3>() & (1 << 16) != 0) != self.cq.lap()
    }

    /// Takes every new completion off the completion queue into the
    /// command table and rings its head doorbell; how many.
    #[inline(always)]
    fn reap(&mut self) -> Result<usize> {
        self.reap_for(None)
    }

    /// [`reap`](Self::reap) for a caller waiting for CID `waited`, whose
    /// completion it hands over at once.
    #[inline(always)]
    fn reap_for(&mut self, waited: Option<u16>) -> Result<usize> {
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
        if n > 0 {
            self.cq_doorbell.write(u32::from(self.cq.position()));
        }
        Ok(n)
    }

    #[inline(always)]
    fn done(&self, t: Taken) -> Done {
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
    fn wait_for(&mut self, cid: Option<u16>, timeout: Duration) -> Result<()> {
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
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) && start.elapsed() >= budget {
                    break;
                }
                std::hint::spin_loop();
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
    pub(super) fn idle(&self, deadline: Deadline, timeout: Duration, what: &str) -> Result<()> {
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
    fn full(&self) -> Error {
        self.ctrl.error(NvmeProblem::QueueFull {
            in_flight: self.table.in_use(),
        })
    }

    #[cold]
    #[inline(never)]
    fn not_in_flight(&self, id: CommandId) -> Error {
        self.ctrl.error(NvmeProblem::NotInFlight {
            qid: id.qid,
            cid: id.cid,
            generation: id.generation,
            queue: self.qid,
        })
    }
}

/// How long dropping an [`IoQueue`] waits for its commands to complete
/// before it sends an Abort for each still running, and again after (see
/// [`IoQueue::close`]).
pub const DROP_WAIT: Duration = Duration::from_secs(10);

impl IoQueue {
    /// Deletes the queue pair on the controller once its commands are done
    /// (see the type's documentation, "Closing a queue with commands in
    /// flight"): waits up to `timeout` for them, then sends an Abort for
    /// each still running and waits up to `timeout` again, then deletes the
    /// queues. Completions not taken are dropped; every buffer the commands
    /// held is let go of. A command the deletion had to abort is
    /// [`NvmeProblem::AbortedByDeletion`] (its data is undefined); a failed
    /// deletion, the admin command's error.
    pub fn close(mut self, timeout: Duration) -> Result<()> {
        self.shut_down(timeout)
    }

    fn shut_down(&mut self, timeout: Duration) -> Result<()> {
        self.deleted = true;
        // A controller that is gone or failed finishes nothing: no wait.
        let mut running = self.running();
        let mut aborts = 0;
        if running > 0 && self.ctrl.check_alive().is_ok() {
            running = self.settle(timeout);
            if running > 0 && self.ctrl.check_alive().is_ok() {
                let cids: Vec<u16> = self.table.running().collect();
                for cid in cids {
                    // An Abort may be refused or not abort (QEMU 7.2
                    // answers every one "not aborted"): the wait after it
                    // says. No answer, or a controller gone: stop asking.
                    match self.ctrl.admin_command(Command::abort(self.qid, cid)) {
                        Ok(_)
                        | Err(Error::Nvme {
                            problem: NvmeProblem::CommandFailed { .. },
                            ..
                        }) => aborts += 1,
                        Err(_) => break,
                    }
                }
                running = self.settle(timeout);
            }
        }
        // The submission queue first: the controller completes or aborts
        // its commands before it answers, so after both deletions nothing
        // touches the queue's memory or a command's buffer, and what the
        // commands kept alive can go.
        let sq = self
            .ctrl
            .admin_command(Command::delete_io_queue(true, self.qid));
        let cq = self
            .ctrl
            .admin_command(Command::delete_io_queue(false, self.qid));
        if sq.is_ok() && cq.is_ok() {
            self.ctrl.release_qid(self.qid);
        }
        self.table.clear();
        sq?;
        cq?;
        if running > 0 {
            return Err(self.ctrl.error(NvmeProblem::AbortedByDeletion {
                qid: self.qid,
                commands: running,
                aborts,
            }));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the controller to finish every command
    /// here; how many it still runs.
    fn settle(&mut self, timeout: Duration) -> usize {
        // A timeout or a dead controller: the count says what is left.
        let _ = self.quiesce(timeout);
        self.running()
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = self.shut_down(DROP_WAIT);
        }
    }
}

/// Commands written to a queue's submission ring, announced with one
/// doorbell write by [`submit`](Self::submit) or when dropped
/// ([`IoQueue::batch`]).
#[derive(Debug)]
pub struct Batch<'q> {
    queue: &'q mut IoQueue,
    pushed: usize,
}

impl Batch<'_> {
    /// Adds a Read (see [`IoQueue::submit_read`]).
    #[inline]
    pub fn read(&mut self, lba: u64, count: u32, dst: impl Into<Dma>) -> Result<CommandId> {
        let id = self.queue.push_blocks(nvm::READ, lba, count, dst.into())?;
        self.pushed += 1;
        Ok(id)
    }

    /// Adds a Write (see [`IoQueue::submit_write`]).
    #[inline]
    pub fn write(&mut self, lba: u64, count: u32, src: impl Into<Dma>) -> Result<CommandId> {
        let id = self.queue.push_blocks(nvm::WRITE, lba, count, src.into())?;
        self.pushed += 1;
        Ok(id)
    }

    /// Adds a raw command (see [`IoQueue::submit_raw`]).
    pub fn raw(&mut self, cmd: Command, data: Option<(Dma, u64)>) -> Result<CommandId> {
        let id = self.queue.push_raw(cmd, data)?;
        self.pushed += 1;
        Ok(id)
    }

    /// Commands added and not yet announced.
    pub fn len(&self) -> usize {
        self.pushed
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.pushed == 0
    }

    /// Rings the doorbell once for every command added; how many.
    #[inline]
    pub fn submit(mut self) -> Result<usize> {
        let n = std::mem::take(&mut self.pushed);
        if n > 0 {
            self.queue.ring()?;
        }
        Ok(n)
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if self.pushed > 0 {
            // A write to a mapped register of this queue: cannot fail.
            let _ = self.queue.ring();
        }
    }
}

impl StorageEngine for IoQueue {
    fn name(&self) -> &str {
        "nvme"
    }

    fn completion(&self) -> Completion {
        IoQueue::completion(self)
    }

    fn block_size(&self) -> u64 {
        self.namespace.map_or(0, |n| n.block_size)
    }

    fn blocks(&self) -> u64 {
        self.namespace.map_or(0, |n| n.blocks)
    }

    fn max_transfer(&self) -> u64 {
        self.limits.max_transfer
    }

    fn read_blocks(&mut self, lba: u64, count: u32, dst: u64, timeout: Duration) -> Result<()> {
        let id = self.submit_read(lba, count, dst)?;
        self.wait_or_abandon(id, timeout)
    }

    fn write_blocks(&mut self, lba: u64, count: u32, src: u64, timeout: Duration) -> Result<()> {
        let id = self.submit_write(lba, count, src)?;
        self.wait_or_abandon(id, timeout)
    }
}

impl IoQueue {
    /// Waits for `id`; gives it up if the wait fails.
    pub(super) fn wait_or_abandon(&mut self, id: CommandId, timeout: Duration) -> Result<()> {
        match self.wait(id, timeout) {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = self.abandon(id);
                Err(e)
            }
        }
    }
}
