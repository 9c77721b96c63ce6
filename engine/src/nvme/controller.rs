//! What the handles of one controller share: its VFIO device, the mapping
//! of its registers, the admin queue (behind a lock: admin commands are
//! rare), which I/O queue IDs are in use, and its interrupt eventfds. The
//! controller is shut down when the last handle goes ([`super::Nvme`] and
//! every [`super::IoQueue`] hold one).

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::sync::atomic::{Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dmabuf_p2p::Ioas;
use dmabuf_p2p::vfio::{BarMapping, MSIX_IRQ_INDEX, VfioPciDevice};

use super::command::{Command, Completion as Cqe};
use super::dma_area::DmaArea;
use super::problem::NvmeProblem;
use super::queue::{CompletionRing, SubmissionRing};
use super::regs::{self, Capabilities, PAGE};
use super::shadow_doorbell::ShadowBuffers;
use crate::deadline::Deadline;
use crate::{Error, Result, wait_readable};

/// Entries of the admin queues.
pub(super) const ADMIN_ENTRIES: u16 = 32;
/// How long an admin command may take.
pub(super) const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a sleeping wait sleeps between looks at a completion queue.
pub(super) const POLL_SLEEP: Duration = Duration::from_micros(200);
/// How long a wait blocks on an interrupt before it looks at the queue
/// anyway (a missed interrupt costs this much, not the whole timeout).
pub(super) const IRQ_SLICE: Duration = Duration::from_millis(20);

/// Byte offsets in the admin memory.
const ADMIN_SQ: u64 = 0;
const ADMIN_CQ: u64 = PAGE;
const IDENTIFY_BUF: u64 = 2 * PAGE;
const ADMIN_AREA: u64 = 3 * PAGE;

/// The admin queue pair and its memory.
#[derive(Debug)]
pub(super) struct Admin {
    area: DmaArea,
    entries: u16,
    sq: SubmissionRing,
    cq: CompletionRing,
    /// The next CID: admin commands run one at a time, and a CID is
    /// reused only after 65536 others, so a late completion of a command
    /// that timed out is not taken for a newer one's.
    next_cid: u16,
}

/// One controller, shared by its handles.
#[derive(Debug)]
pub(super) struct Controller {
    /// "nvme <address>", for messages.
    pub(super) label: String,
    /// The PCI address, as errors name the controller.
    pub(super) address: String,
    pub(super) cap: Capabilities,
    pub(super) bar0: BarMapping,
    /// The IOAS the controller is attached to: queue memory is mapped there.
    pub(super) ioas: Ioas,
    admin: Mutex<Admin>,
    /// I/O queue IDs in use (index = qid; 0 is the admin queue's).
    qids: Mutex<Vec<bool>>,
    /// I/O queue pairs the controller granted.
    pub(super) granted: u16,
    /// The shadow doorbell buffers, once Doorbell Buffer Config took them;
    /// forgotten when the controller is disabled (a reset drops them).
    shadow: Mutex<Option<Arc<ShadowBuffers>>>,
    /// MSI-X eventfds, by vector: 0 for the admin queue, `q` for I/O queue
    /// `q`. Empty when the controller runs without interrupts.
    pub(super) vectors: Vec<File>,
    /// Declared last: closed after the controller is stopped and every
    /// memory area above is unmapped.
    pub(super) dev: VfioPciDevice,
}

impl Controller {
    /// Places the admin queues of the disabled controller, sets up
    /// `vectors` MSI-X vectors (none when 0; why not, if it fails),
    /// enables it and asks for `io_queues` I/O queue pairs.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bring_up(
        dev: VfioPciDevice,
        bar0: BarMapping,
        cap: Capabilities,
        ioas: &Ioas,
        vectors: u32,
        io_queues: u16,
    ) -> Result<(Self, Option<String>)> {
        let address = dev.address().to_string();
        let admin_entries = ADMIN_ENTRIES.min(u16::try_from(cap.max_queue_entries).unwrap_or(2));
        let area = DmaArea::new(ioas, "nvme-admin", ADMIN_AREA)?;
        let mut me = Self {
            label: format!("nvme {address}"),
            address,
            cap,
            bar0,
            ioas: ioas.clone(),
            admin: Mutex::new(Admin {
                area,
                entries: admin_entries,
                sq: SubmissionRing::new(admin_entries),
                cq: CompletionRing::new(admin_entries),
                next_cid: 0,
            }),
            qids: Mutex::new(Vec::new()),
            granted: 0,
            shadow: Mutex::new(None),
            vectors: Vec::new(),
            dev,
        };
        me.disable()?;
        {
            let admin = me.lock_admin();
            me.bar0.write_u32(
                regs::AQA,
                regs::aqa(u32::from(admin_entries), u32::from(admin_entries)),
            )?;
            write_u64_lo_hi(&me.bar0, regs::ASQ, admin.area.iova(ADMIN_SQ))?;
            write_u64_lo_hi(&me.bar0, regs::ACQ, admin.area.iova(ADMIN_CQ))?;
        }
        let mut no_irq = None;
        if vectors > 0 {
            let asked = me
                .dev
                .irq_vectors(MSIX_IRQ_INDEX)
                .map(|table| vectors.min(table))
                .and_then(|n| me.dev.irq_eventfds(MSIX_IRQ_INDEX, n, "MSI-X"));
            match asked {
                Ok(fds) => me.vectors = fds.into_iter().map(File::from).collect(),
                Err(e) => no_irq = Some(e.to_string()),
            }
        }
        me.enable()?;
        let asked = io_queues.clamp(1, u16::MAX - 1);
        let got = me.admin_command(Command::set_num_queues(asked, asked))?;
        // NSQA and NCQA, zero-based.
        let sqs = (got.result & 0xffff) as u16;
        let cqs = (got.result >> 16) as u16;
        me.granted = sqs.min(cqs).saturating_add(1).min(asked);
        me.qids = Mutex::new(vec![false; usize::from(me.granted) + 1]);
        Ok((me, no_irq))
    }

    /// Sends Doorbell Buffer Config with new buffers for every queue the
    /// controller granted; the queues made after it use them. Before any
    /// I/O queue is made.
    pub(super) fn configure_shadow_doorbells(&self) -> Result<()> {
        let buffers = ShadowBuffers::new(&self.ioas, &self.cap, self.granted)?;
        self.admin_command(buffers.config_command())?;
        *self.lock_shadow() = Some(Arc::new(buffers));
        Ok(())
    }

    /// The shadow doorbell buffers, when in use.
    pub(super) fn shadow_doorbells(&self) -> Option<Arc<ShadowBuffers>> {
        self.lock_shadow().clone()
    }

    fn lock_shadow(&self) -> MutexGuard<'_, Option<Arc<ShadowBuffers>>> {
        self.shadow
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_admin(&self) -> MutexGuard<'_, Admin> {
        // A panic while holding the lock leaves the ring state as it was
        // between commands: usable.
        self.admin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The lowest free I/O queue ID, now taken.
    pub(super) fn take_qid(&self) -> Result<u16> {
        let mut qids = self
            .qids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let free = qids.iter().skip(1).position(|used| !used);
        match free {
            Some(i) => {
                qids[i + 1] = true;
                // At most `granted`, a u16.
                Ok((i + 1) as u16)
            }
            None => Err(self.error(NvmeProblem::NoQueueLeft {
                granted: self.granted,
            })),
        }
    }

    /// Gives back I/O queue ID `qid`.
    pub(super) fn release_qid(&self, qid: u16) {
        let mut qids = self
            .qids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(q) = qids.get_mut(usize::from(qid)) {
            *q = false;
        }
    }

    /// Runs one admin command (its data pointer, if any, set by the
    /// caller) and waits for it.
    pub(super) fn admin_command(&self, mut cmd: Command) -> Result<Cqe> {
        self.admin_command_with(&mut cmd, None, None)
    }

    /// Identify with `cns` for `nsid`: the 4 KiB data structure.
    pub(super) fn identify(&self, cns: u32, nsid: u32) -> Result<Box<[u8; 4096]>> {
        let mut data = Box::new([0u8; 4096]);
        let mut cmd = Command::identify(cns, nsid, 0);
        self.admin_command_with(&mut cmd, Some(IDENTIFY_BUF), Some(&mut data[..]))?;
        Ok(data)
    }

    /// The admin command itself: `buffer` is an offset in the admin memory
    /// for PRP1, read into `out` after success.
    fn admin_command_with(
        &self,
        cmd: &mut Command,
        buffer: Option<u64>,
        out: Option<&mut [u8]>,
    ) -> Result<Cqe> {
        let mut admin = self.lock_admin();
        let Some((slot, tail)) = admin.sq.push() else {
            return Err(self.error(NvmeProblem::QueueFull {
                in_flight: usize::from(admin.sq.in_flight()),
            }));
        };
        let cid = admin.next_cid;
        admin.next_cid = admin.next_cid.wrapping_add(1);
        cmd.cid = cid;
        if let Some(off) = buffer {
            cmd.prp1 = admin.area.iova(off);
        }
        admin
            .area
            .cpu
            .write(ADMIN_SQ + u64::from(slot) * 64, &cmd.to_bytes())?;
        fence(Ordering::SeqCst);
        self.bar0
            .write_u32(self.cap.sq_doorbell(0), u32::from(tail))?;
        let deadline = Deadline::after(ADMIN_TIMEOUT);
        loop {
            if let Some(c) = self.reap_admin(&mut admin, cid)? {
                if !c.status.is_success() {
                    return Err(self.error(NvmeProblem::CommandFailed {
                        command: cmd.name(true),
                        cid,
                        status: c.status,
                    }));
                }
                if let (Some(off), Some(out)) = (buffer, out) {
                    admin.area.cpu.read(off, out)?;
                }
                return Ok(c);
            }
            if deadline.passed() {
                self.check_alive()?;
                return Err(Error::Timeout {
                    what: format!("admin command {} on {}", cmd.name(true), self.label),
                    after: ADMIN_TIMEOUT,
                });
            }
            match self.vectors.first() {
                Some(efd) => {
                    wait_readable(
                        efd.as_fd(),
                        deadline.left().min(IRQ_SLICE),
                        "NVMe MSI-X eventfd",
                    )?;
                    let mut count = [0u8; 8];
                    // Non-blocking: WouldBlock when nothing was signalled.
                    let _ = (&*efd).read(&mut count);
                }
                None => std::thread::sleep(deadline.left().min(POLL_SLEEP)),
            }
        }
    }

    /// Takes every new admin completion; the one for `cid`, if it came.
    fn reap_admin(&self, admin: &mut Admin, cid: u16) -> Result<Option<Cqe>> {
        let mut found = None;
        let mut consumed = 0u16;
        loop {
            let at = ADMIN_CQ + u64::from(admin.cq.head()) * 16;
            let dw3 = admin.area.cpu.read_u32(at + 12)?;
            if !admin.cq.is_new(dw3 & (1 << 16) != 0) {
                break;
            }
            fence(Ordering::Acquire);
            let mut raw = [0u8; 16];
            admin.area.cpu.read(at, &mut raw)?;
            let cqe = Cqe::decode(&raw);
            admin.cq.advance();
            admin.sq.set_head(cqe.sq_head);
            consumed += 1;
            if cqe.cid == cid {
                found = Some(cqe);
            }
            if consumed >= admin.entries {
                break;
            }
        }
        if consumed > 0 {
            self.bar0
                .write_u32(self.cap.cq_doorbell(0), u32::from(admin.cq.head()))?;
        }
        Ok(found)
    }

    /// A fatal controller status (or registers that read all ones) as an error.
    pub(super) fn check_alive(&self) -> Result<()> {
        let csts = self.bar0.read_u32(regs::CSTS)?;
        if csts == u32::MAX {
            return Err(self.error(NvmeProblem::ControllerFatal {
                what: "CSTS reads all ones (memory decode off, or the device is gone)".into(),
            }));
        }
        if csts & regs::CSTS_CFS != 0 {
            return Err(self.error(NvmeProblem::ControllerFatal {
                what: format!("CSTS.CFS is set (CSTS {csts:#x})"),
            }));
        }
        Ok(())
    }

    /// Clears CC.EN and waits for CSTS.RDY to clear (up to CAP.TO). The
    /// reset forgets Doorbell Buffer Config: so does the driver.
    fn disable(&self) -> Result<()> {
        let cc = self.bar0.read_u32(regs::CC)?;
        if cc & regs::CC_EN != 0 {
            self.bar0.write_u32(regs::CC, cc & !regs::CC_EN)?;
        }
        self.wait_ready(false)?;
        // Only once the controller stopped: it wrote event indices there.
        self.lock_shadow().take();
        Ok(())
    }

    /// Sets CC (enable, NVM command set, 4 KiB pages, 64/16-byte entries)
    /// and waits for CSTS.RDY (up to CAP.TO).
    fn enable(&self) -> Result<()> {
        self.bar0.write_u32(regs::CC, regs::CC_ENABLE)?;
        self.wait_ready(true)
    }

    fn wait_ready(&self, ready: bool) -> Result<()> {
        let limit = self.cap.timeout.max(Duration::from_millis(500));
        let deadline = Deadline::after(limit);
        loop {
            let csts = self.bar0.read_u32(regs::CSTS)?;
            if csts == u32::MAX {
                return Err(self.error(NvmeProblem::ControllerFatal {
                    what: "CSTS reads all ones (memory decode off, or the device is gone)".into(),
                }));
            }
            if ready && csts & regs::CSTS_CFS != 0 {
                return Err(self.error(NvmeProblem::ControllerFatal {
                    what: format!("CSTS.CFS set while enabling (CSTS {csts:#x})"),
                }));
            }
            if (csts & regs::CSTS_RDY != 0) == ready {
                return Ok(());
            }
            if deadline.passed() {
                return Err(Error::Timeout {
                    what: format!(
                        "{}: CSTS.RDY to become {} (CAP.TO)",
                        self.label,
                        u8::from(ready)
                    ),
                    after: limit,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[cold]
    pub(super) fn error(&self, problem: NvmeProblem) -> Error {
        Error::Nvme {
            controller: self.address.clone(),
            problem,
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // Stop the controller before its admin memory leaves the IOAS (the
        // I/O queues were deleted by their handles): a normal shutdown
        // (bounded), then disable.
        if let Ok(cc) = self.bar0.read_u32(regs::CC)
            && cc != u32::MAX
            && cc & regs::CC_EN != 0
        {
            let _ = self.bar0.write_u32(regs::CC, cc | regs::CC_SHN_NORMAL);
            let deadline = Instant::now() + self.cap.timeout.min(Duration::from_secs(2));
            while let Ok(csts) = self.bar0.read_u32(regs::CSTS) {
                if csts == u32::MAX
                    || csts & regs::CSTS_SHST_MASK == regs::CSTS_SHST_DONE
                    || Instant::now() > deadline
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = self.disable();
        }
        if !self.vectors.is_empty() {
            let _ = self.dev.disable_irq(MSIX_IRQ_INDEX);
        }
    }
}

pub(super) fn read_u64_lo_hi(bar: &BarMapping, offset: u64) -> Result<u64> {
    let lo = bar.read_u32(offset)?;
    let hi = bar.read_u32(offset + 4)?;
    Ok(u64::from(lo) | (u64::from(hi) << 32))
}

pub(super) fn write_u64_lo_hi(bar: &BarMapping, offset: u64, value: u64) -> Result<()> {
    bar.write_u32(offset, value as u32)?;
    Ok(bar.write_u32(offset + 4, (value >> 32) as u32)?)
}
