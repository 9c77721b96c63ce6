//! A userspace NVMe driver over VFIO: a [`StorageEngine`] that reads
//! logical blocks into any IOVA of its IO address space (host RAM, or another
//! device's BAR exported as a dma-buf) and writes them from one.
//!
//! Bring-up follows the NVMe base specification: disable the controller
//! (waiting up to CAP.TO), place the admin queues, enable, Identify the
//! controller and namespace, ask for one I/O queue pair and create it.
//! Queues, PRP lists and the Identify buffer live in one memfd that the
//! driver maps into the caller's IOAS ([`Ioas::map_file`]), so the controller
//! reaches them through the IOMMU like any other DMA. Completions are
//! signalled by MSI-X vector 0 through a VFIO eventfd; without it the driver
//! polls the completion queue. A completion status other than success
//! is an [`Error::Nvme`] carrying the [`Status`].
//!
//! What a controller reports when the IOMMU refuses its data DMA is its own
//! business: a Data Transfer Error becomes [`NvmeProblem::CommandFailed`],
//! but QEMU 7.2's NVMe model completes such a Read *successfully* and the
//! data goes nowhere (seen in the VM tests: reads into a revoked BAR export
//! or an unmapped IOVA). Whether the bytes landed is the target mapping's
//! state ([`dmabuf_p2p::revoke::Attachment::is_revoked`]), not the status.
//!
//! Only 4 KiB controller pages (CAP.MPSMIN = 0, every controller) and
//! formats without metadata are supported. One PRP list page per command
//! bounds a transfer at 2 MiB besides MDTS.

pub mod command;
pub mod identify;
pub mod problem;
pub mod prp;
pub mod queue;
pub mod regs;

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

pub use command::Status;
pub use identify::{ControllerIdentity, NamespaceIdentity};
pub use problem::NvmeProblem;
pub use regs::{CmbInfo, PmrInfo};

use self::command::{Command, Completion as Cqe, cns};
use self::queue::{CompletionRing, Slots, SubmissionRing};
use self::regs::{Capabilities, PAGE};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::pci::PciAddress;
use dmabuf_p2p::vfio::{BarMapping, MSIX_IRQ_INDEX, VfioPciDevice};
use dmabuf_p2p::{ByteRange, Ioas, IoasMapping, IovaPlacement, MapPerms, Mapping};

use crate::deadline::Deadline;
use crate::{Completion, Error, Result, StorageEngine, wait_readable};

/// The PCI class code of an NVMe controller (mass storage, NVM, NVMe).
pub const NVME_CLASS: u32 = 0x01_08_02;

/// Entries of the admin queues.
const ADMIN_ENTRIES: u16 = 32;
/// Entries of the I/O queues (at most; CAP.MQES may allow fewer).
const IO_ENTRIES: u16 = 64;
/// How long an admin command may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Byte offsets of the driver's memory (one memfd, one IOAS mapping).
const ADMIN_SQ: u64 = 0;
const ADMIN_CQ: u64 = PAGE;
const IO_SQ: u64 = 2 * PAGE;
const IO_CQ: u64 = 3 * PAGE;
const IDENTIFY_BUF: u64 = 4 * PAGE;
/// One PRP list page per I/O command slot from here.
const PRP_LISTS: u64 = 5 * PAGE;
const DMA_AREA: u64 = PRP_LISTS + IO_ENTRIES as u64 * PAGE;

/// The I/O queue's ID.
const IO_QID: u16 = 1;

/// An NVMe controller driven from userspace, owning its VFIO device.
///
/// ```no_run
/// use std::time::Duration;
/// use dmabuf_p2p::{memfd::Memfd, ByteRange, Iommufd, IovaPlacement, MapPerms};
/// use dmabuf_p2p_engine::{nvme::Nvme, StorageEngine};
///
/// let ioas = Iommufd::open()?.alloc_ioas()?;
/// let mut nvme = Nvme::open("0000:0f:00.0".parse()?, &ioas)?;
/// let buf = Memfd::new("data", 0x10000)?;
/// let map = ioas.map_file(&buf, ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::ReadWrite)?;
/// nvme.read_blocks(0, 8, map.iova(), Duration::from_secs(5))?; // blocks 0..8 of namespace 1
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Nvme {
    label: String,
    cap: Capabilities,
    version: (u16, u8, u8),
    identity: ControllerIdentity,
    namespace: Option<NamespaceIdentity>,
    max_transfer: u64,
    admin: Queue,
    io: Option<Queue>,
    /// Completions of I/O commands that arrived while waiting for another.
    done: Vec<Cqe>,
    irq: Option<File>,
    fallback_reason: Option<String>,
    /// Declared before `dev`: unmapped from the IOAS after the controller is
    /// disabled (in `drop`) and before the device closes.
    dma: DmaArea,
    bar0: BarMapping,
    dev: VfioPciDevice,
}

/// The driver's own memory: CPU mapping and IOAS mapping of one memfd.
#[derive(Debug)]
struct DmaArea {
    cpu: Mapping,
    iova: IoasMapping,
    _memfd: Memfd,
}

impl DmaArea {
    fn new(ioas: &Ioas) -> Result<Self> {
        let memfd = Memfd::new("nvme-queues", DMA_AREA)?;
        let cpu = memfd.mmap()?;
        let iova = ioas.map_file(
            &memfd,
            ByteRange::new(0, DMA_AREA),
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
        )?;
        Ok(Self {
            cpu,
            iova,
            _memfd: memfd,
        })
    }

    fn iova(&self, offset: u64) -> u64 {
        self.iova.iova() + offset
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        Ok(self.cpu.write(offset, data)?)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Ok(self.cpu.read(offset, buf)?)
    }
}

/// A queue pair's memory and bookkeeping.
#[derive(Debug)]
struct Queue {
    qid: u16,
    entries: u16,
    sq_offset: u64,
    cq_offset: u64,
    sq: SubmissionRing,
    cq: CompletionRing,
    slots: Slots,
    /// The opcode of the command in each slot (for messages).
    opcodes: Vec<u8>,
    /// Slots whose waiter gave up: their completion is dropped on arrival.
    abandoned: Vec<bool>,
}

impl Queue {
    fn new(qid: u16, entries: u16, sq_offset: u64, cq_offset: u64) -> Self {
        Self {
            qid,
            entries,
            sq_offset,
            cq_offset,
            sq: SubmissionRing::new(entries),
            cq: CompletionRing::new(entries),
            // One slot fewer than entries: the submission ring keeps one free.
            slots: Slots::new(entries - 1),
            opcodes: vec![0; usize::from(entries)],
            abandoned: vec![false; usize::from(entries)],
        }
    }
}

/// A command accepted by [`Nvme::submit_read`] or [`Nvme::submit_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommandId(pub u16);

/// The outcome of a command, from [`Nvme::wait_any`].
#[derive(Debug)]
pub struct Finished {
    /// Which command.
    pub id: CommandId,
    /// Its status: `Ok` on success, else [`Error::Nvme`] with
    /// [`NvmeProblem::CommandFailed`].
    pub result: Result<()>,
}

impl Nvme {
    /// Opens the NVMe controller at `address` (bound to vfio-pci), binds it
    /// to `ioas`'s iommufd, attaches it to `ioas`, and brings it up with one
    /// I/O queue pair. Namespace 1 is selected when it is active.
    /// Completion is by MSI-X where the device and the kernel allow it, by
    /// polling otherwise ([`Nvme::polling_reason`] says why).
    pub fn open(address: PciAddress, ioas: &Ioas) -> Result<Self> {
        Self::open_with(address, ioas, Completion::Interrupt)
    }

    /// [`Nvme::open`], asking for `completion`: [`Completion::Polling`]
    /// requests no interrupt at all and creates the I/O completion queue
    /// with interrupts off, as polled-mode drivers do; the reaping loop then
    /// sleeps briefly between looks at the queue.
    pub fn open_with(address: PciAddress, ioas: &Ioas, completion: Completion) -> Result<Self> {
        let mut dev = VfioPciDevice::open(address)?;
        dev.bind(ioas.iommufd())?;
        dev.attach(ioas)?;
        Self::from_device_with(dev, ioas, completion)
    }

    /// Takes a bound device attached to `ioas` and brings the controller up,
    /// with completion as for [`Nvme::open`].
    pub fn from_device(dev: VfioPciDevice, ioas: &Ioas) -> Result<Self> {
        Self::from_device_with(dev, ioas, Completion::Interrupt)
    }

    /// [`Nvme::from_device`], asking for `completion` as
    /// [`Nvme::open_with`] does.
    pub fn from_device_with(
        dev: VfioPciDevice,
        ioas: &Ioas,
        completion: Completion,
    ) -> Result<Self> {
        let address = dev.address();
        let label = format!("nvme {address}");
        let class = dev.config_read_u32(8)? >> 8;
        if class != NVME_CLASS {
            return Err(nvme_error(address, NvmeProblem::NotNvme { class }));
        }
        dev.set_memory_decode(true)?;
        dev.set_bus_master(true)?;
        let bar0 = dev.map_bar(0)?;
        let cap_raw = read_u64_lo_hi(&bar0, regs::CAP)?;
        if cap_raw == u64::MAX {
            return Err(nvme_error(
                address,
                NvmeProblem::ControllerFatal {
                    what: "CAP reads all ones (memory decode off, or the device is gone)".into(),
                },
            ));
        }
        let cap = Capabilities::decode(cap_raw);
        if !cap.nvm_command_set {
            return Err(unsupported(
                address,
                "the NVM command set (CAP.CSS bit 0 is 0)",
            ));
        }
        if cap.page_size_min > PAGE {
            return Err(unsupported(
                address,
                &format!(
                    "4 KiB memory pages (the controller's smallest is {} bytes)",
                    cap.page_size_min
                ),
            ));
        }
        let version = regs::version(bar0.read_u32(regs::VS)?);
        let dma = DmaArea::new(ioas)?;
        let io_entries = IO_ENTRIES.min(u16::try_from(cap.max_queue_entries).unwrap_or(u16::MAX));
        let admin_entries =
            ADMIN_ENTRIES.min(u16::try_from(cap.max_queue_entries).unwrap_or(u16::MAX));
        let mut me = Self {
            label,
            cap,
            version,
            identity: ControllerIdentity {
                vendor: 0,
                serial: String::new(),
                model: String::new(),
                firmware: String::new(),
                mdts: 0,
                namespaces: 0,
            },
            namespace: None,
            max_transfer: 0,
            admin: Queue::new(0, admin_entries, ADMIN_SQ, ADMIN_CQ),
            io: None,
            done: Vec::new(),
            irq: None,
            fallback_reason: None,
            dma,
            bar0,
            dev,
        };
        me.disable()?;
        me.bar0.write_u32(
            regs::AQA,
            regs::aqa(u32::from(admin_entries), u32::from(admin_entries)),
        )?;
        write_u64_lo_hi(&me.bar0, regs::ASQ, me.dma.iova(ADMIN_SQ))?;
        write_u64_lo_hi(&me.bar0, regs::ACQ, me.dma.iova(ADMIN_CQ))?;
        match completion {
            Completion::Interrupt => match me.dev.irq_eventfd(MSIX_IRQ_INDEX, "MSI-X") {
                Ok(fd) => me.irq = Some(File::from(fd)),
                Err(e) => me.fallback_reason = Some(e.to_string()),
            },
            Completion::Polling => {
                me.fallback_reason = Some("polling was asked for (Completion::Polling)".into());
            }
        }
        me.enable()?;
        me.identify_controller()?;
        me.create_io_queues(io_entries)?;
        if me.identity.namespaces >= 1 {
            me.namespace = me.identify_namespace(1).ok();
        }
        Ok(me)
    }

    /// The VFIO device behind the engine.
    pub fn device(&self) -> &VfioPciDevice {
        &self.dev
    }

    /// The decoded CAP register.
    pub fn capabilities(&self) -> &Capabilities {
        &self.cap
    }

    /// The NVMe version the controller implements (major, minor, tertiary).
    pub fn version(&self) -> (u16, u8, u8) {
        self.version
    }

    /// What Identify Controller said.
    pub fn identity(&self) -> &ControllerIdentity {
        &self.identity
    }

    /// The namespace reads and writes go to, if one is selected.
    pub fn namespace(&self) -> Option<&NamespaceIdentity> {
        self.namespace.as_ref()
    }

    /// Why completion is by polling, if it is: why MSI-X could not be set
    /// up, or that polling was asked for ([`Nvme::open_with`]).
    pub fn polling_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Selects namespace `nsid` for reads and writes (Identify Namespace).
    /// A namespace that does not exist or is inactive is
    /// [`NvmeProblem::NoSuchNamespace`]; one with metadata is unsupported.
    pub fn select_namespace(&mut self, nsid: u32) -> Result<NamespaceIdentity> {
        let ns = self.identify_namespace(nsid)?;
        self.namespace = Some(ns);
        Ok(ns)
    }

    /// Identify Namespace `nsid`.
    pub fn identify_namespace(&mut self, nsid: u32) -> Result<NamespaceIdentity> {
        let missing = NvmeProblem::NoSuchNamespace {
            nsid,
            count: self.identity.namespaces,
        };
        if nsid == 0 || nsid == u32::MAX || nsid > self.identity.namespaces {
            return Err(self.error(missing));
        }
        let data = match self.identify(cns::NAMESPACE, nsid) {
            Ok(d) => d,
            Err(Error::Nvme {
                problem: NvmeProblem::CommandFailed { status, .. },
                ..
            }) if status.is_invalid_namespace() => return Err(self.error(missing)),
            Err(e) => return Err(e),
        };
        let ns = identify::parse_namespace(nsid, &data).ok_or_else(|| self.error(missing))?;
        if ns.metadata_size != 0 {
            return Err(self.error(NvmeProblem::Unsupported {
                what: format!(
                    "namespace {nsid} is formatted with {} metadata bytes per block",
                    ns.metadata_size
                ),
            }));
        }
        Ok(ns)
    }

    /// The controller memory buffer: enables its registers (CMBMSC.CRE, on
    /// controllers with CAP.CMBS) and reads CMBLOC/CMBSZ. Its BAR range can
    /// then be exported ([`VfioPciDevice::export_bar`]) and used as a DMA
    /// target by other devices. [`NvmeProblem::NoCmb`] if there is none.
    pub fn enable_cmb(&mut self) -> Result<CmbInfo> {
        if self.cap.cmb_msc {
            write_u64_lo_hi(&self.bar0, regs::CMBMSC, regs::CMBMSC_CRE)?;
        }
        let loc = self.bar0.read_u32(regs::CMBLOC)?;
        let sz = self.bar0.read_u32(regs::CMBSZ)?;
        let cmb = CmbInfo::decode(loc, sz).ok_or_else(|| self.error(NvmeProblem::NoCmb))?;
        let bar = self.dev.bar(cmb.bar)?;
        if cmb.size == 0 || cmb.offset.saturating_add(cmb.size) > bar.size() {
            return Err(self.error(NvmeProblem::Unsupported {
                what: format!(
                    "the CMB ({:#x} bytes at {:#x} of BAR{}) does not fit its BAR ({:#x} bytes)",
                    cmb.size,
                    cmb.offset,
                    cmb.bar,
                    bar.size()
                ),
            }));
        }
        Ok(cmb)
    }

    /// The persistent memory region: enables it (PMRCTL.EN) and waits until
    /// it is ready (PMRSTS.NRDY clear, up to PMRCAP's timeout). Its BAR can
    /// then be exported ([`VfioPciDevice::export_bar`]) and used as a DMA
    /// target by other devices; until it is enabled, a controller may drop
    /// accesses to that BAR. [`NvmeProblem::NoPmr`] if there is none.
    pub fn enable_pmr(&mut self) -> Result<PmrInfo> {
        if !self.cap.pmr_supported {
            return Err(self.error(NvmeProblem::NoPmr {
                why: "CAP.PMRS is 0".into(),
            }));
        }
        let pmrcap = self.bar0.read_u32(regs::PMRCAP)?;
        let size = match PmrInfo::bar_of(pmrcap) {
            Some(bar) => self.dev.bar(bar)?.size(),
            None => 0,
        };
        let Some(pmr) = PmrInfo::decode(pmrcap, size) else {
            return Err(self.error(NvmeProblem::NoPmr {
                why: format!(
                    "PMRCAP {pmrcap:#x} names BAR{}, which cannot hold one",
                    (pmrcap >> 5) & 0x7
                ),
            }));
        };
        if pmr.size == 0 {
            return Err(self.error(NvmeProblem::NoPmr {
                why: format!("BAR{} is not implemented", pmr.bar),
            }));
        }
        self.bar0.write_u32(regs::PMRCTL, regs::PMRCTL_EN)?;
        let limit = pmr.timeout.max(Duration::from_millis(500));
        let deadline = Deadline::after(limit);
        while self.bar0.read_u32(regs::PMRSTS)? & regs::PMRSTS_NRDY != 0 {
            if deadline.passed() {
                return Err(Error::Timeout {
                    what: format!("{}: PMRSTS.NRDY to clear (PMRCAP.PMRTO)", self.label),
                    after: limit,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(pmr)
    }

    /// Starts reading `count` blocks of the selected namespace from `lba`
    /// into IOVA `dst`. Checks the request first (namespace, range, MDTS,
    /// alignment); the command then completes in [`wait_any`](Self::wait_any)
    /// or [`wait`](Self::wait).
    pub fn submit_read(&mut self, lba: u64, count: u32, dst: u64) -> Result<CommandId> {
        self.submit_io(false, lba, count, dst)
    }

    /// Starts writing `count` blocks at `lba` from IOVA `src` (see
    /// [`submit_read`](Self::submit_read)).
    pub fn submit_write(&mut self, lba: u64, count: u32, src: u64) -> Result<CommandId> {
        self.submit_io(true, lba, count, src)
    }

    /// I/O commands submitted and not yet returned by a wait.
    pub fn in_flight(&self) -> usize {
        self.io.as_ref().map_or(0, |q| q.slots.in_use()) + self.done.len()
    }

    /// Waits for any submitted I/O command to complete.
    pub fn wait_any(&mut self, timeout: Duration) -> Result<Finished> {
        let deadline = Deadline::after(timeout);
        loop {
            if let Some(c) = self.done.pop() {
                return Ok(self.finished(c));
            }
            let got = self.reap(false)?;
            self.done.extend(got);
            if !self.done.is_empty() {
                continue;
            }
            self.idle_until(deadline, timeout, "an NVMe I/O completion")?;
        }
    }

    /// Waits for command `id`; completions of others are kept for
    /// [`wait_any`](Self::wait_any). After a timeout the command is given
    /// up: its completion is dropped when it comes, but until then the
    /// controller may still write the command's data IOVA.
    pub fn wait(&mut self, id: CommandId, timeout: Duration) -> Result<()> {
        let deadline = Deadline::after(timeout);
        loop {
            if let Some(i) = self.done.iter().position(|c| c.cid == id.0) {
                let c = self.done.swap_remove(i);
                return self.finished(c).result;
            }
            let got = self.reap(false)?;
            self.done.extend(got);
            if self.done.iter().any(|c| c.cid == id.0) {
                continue;
            }
            if let Err(e) = self.idle_until(deadline, timeout, "an NVMe I/O command") {
                if let Some(q) = self.io.as_mut()
                    && let Some(a) = q.abandoned.get_mut(usize::from(id.0))
                {
                    *a = true;
                }
                return Err(e);
            }
        }
    }

    fn finished(&self, c: Cqe) -> Finished {
        let result = if c.status.is_success() {
            Ok(())
        } else {
            let opcode = self
                .io
                .as_ref()
                .and_then(|q| q.opcodes.get(usize::from(c.cid)).copied())
                .unwrap_or(0);
            Err(self.error(NvmeProblem::CommandFailed {
                command: command::opcode_name(opcode, false),
                cid: c.cid,
                status: c.status,
            }))
        };
        Finished {
            id: CommandId(c.cid),
            result,
        }
    }

    /// The request checks before an I/O command: namespace, size, range,
    /// alignment. Returns the namespace and the byte count.
    fn check_io(&self, lba: u64, count: u32, iova: u64) -> Result<(NamespaceIdentity, u64)> {
        let Some(ns) = self.namespace else {
            return Err(self.error(NvmeProblem::NoSuchNamespace {
                nsid: 1,
                count: self.identity.namespaces,
            }));
        };
        if count == 0 {
            return Err(self.error(NvmeProblem::EmptyTransfer));
        }
        let bytes = u64::from(count) * ns.block_size;
        if bytes > self.max_transfer || count > u32::from(u16::MAX) + 1 {
            return Err(self.error(NvmeProblem::TransferTooLarge {
                bytes,
                max: self.max_transfer,
            }));
        }
        if lba
            .checked_add(u64::from(count))
            .is_none_or(|end| end > ns.blocks)
        {
            return Err(self.error(NvmeProblem::LbaOutOfRange {
                nsid: ns.nsid,
                lba,
                count,
                blocks: ns.blocks,
            }));
        }
        if !iova.is_multiple_of(4) {
            return Err(self.error(NvmeProblem::UnalignedIova { iova, align: 4 }));
        }
        if iova.checked_add(bytes).is_none() {
            return Err(self.error(NvmeProblem::IovaOverflow { iova, len: bytes }));
        }
        Ok((ns, bytes))
    }

    fn submit_io(&mut self, write: bool, lba: u64, count: u32, iova: u64) -> Result<CommandId> {
        let (ns, bytes) = self.check_io(lba, count, iova)?;
        let mut cmd = Command::read_write(write, ns.nsid, lba, count);
        let cid = self.submit(false, &mut cmd, Some((iova, bytes)))?;
        Ok(CommandId(cid))
    }

    /// Puts `cmd` on the admin or I/O submission queue with a fresh CID and
    /// rings the doorbell. `data` (IOVA, length) sets the PRPs, writing a
    /// PRP list into the slot's list page when needed.
    fn submit(&mut self, admin: bool, cmd: &mut Command, data: Option<(u64, u64)>) -> Result<u16> {
        let label = self.label.clone();
        let base_iova = self.dma.iova(0);
        let q = if admin {
            &mut self.admin
        } else {
            self.io
                .as_mut()
                .ok_or_else(|| nvme_error_label(&label, unsupported_problem("no I/O queue")))?
        };
        let full = |q: &Queue| {
            nvme_error_label(
                &label,
                NvmeProblem::QueueFull {
                    in_flight: q.slots.in_use(),
                },
            )
        };
        let Some(cid) = q.slots.take() else {
            return Err(full(q));
        };
        let list_offset = PRP_LISTS + u64::from(cid) * PAGE;
        if let Some((iova, len)) = data {
            let Some(plan) = prp::plan(iova, len, base_iova + list_offset) else {
                q.slots.free(cid);
                return Err(nvme_error_label(
                    &label,
                    NvmeProblem::TransferTooLarge {
                        bytes: len,
                        max: prp::MAX_LIST_TRANSFER,
                    },
                ));
            };
            if !plan.list.is_empty() {
                if admin {
                    q.slots.free(cid);
                    return Err(nvme_error_label(
                        &label,
                        unsupported_problem("PRP lists on the admin queue"),
                    ));
                }
                if let Err(e) = self
                    .dma
                    .cpu
                    .write(list_offset, &prp::list_bytes(&plan.list))
                {
                    q.slots.free(cid);
                    return Err(e.into());
                }
            }
            cmd.prp1 = plan.prp1;
            cmd.prp2 = plan.prp2;
        }
        let Some((slot, tail)) = q.sq.push() else {
            q.slots.free(cid);
            return Err(full(q));
        };
        cmd.cid = cid;
        q.opcodes[usize::from(cid)] = cmd.opcode;
        q.abandoned[usize::from(cid)] = false;
        let sqe_offset = q.sq_offset + u64::from(slot) * 64;
        let doorbell = self.cap.sq_doorbell(q.qid);
        self.dma.write(sqe_offset, &cmd.to_bytes())?;
        // The entry (and its PRP list) must be in memory before the
        // controller hears of it.
        fence(Ordering::SeqCst);
        self.bar0.write_u32(doorbell, u32::from(tail))?;
        Ok(cid)
    }

    /// Takes every new completion from the admin or I/O completion queue and
    /// rings its head doorbell. Completions of given-up commands are dropped.
    fn reap(&mut self, admin: bool) -> Result<Vec<Cqe>> {
        let q = if admin {
            &mut self.admin
        } else {
            match self.io.as_mut() {
                Some(q) => q,
                None => return Ok(Vec::new()),
            }
        };
        let mut out = Vec::new();
        let mut consumed = 0usize;
        loop {
            let at = q.cq_offset + u64::from(q.cq.head()) * 16;
            let mut dw3 = [0u8; 4];
            self.dma.read(at + 12, &mut dw3)?;
            let phase = u32::from_le_bytes(dw3) & (1 << 16) != 0;
            if !q.cq.is_new(phase) {
                break;
            }
            // The rest of the entry is read only after its phase tag.
            fence(Ordering::Acquire);
            let mut raw = [0u8; 16];
            self.dma.read(at, &mut raw)?;
            let cqe = Cqe::decode(&raw);
            q.cq.advance();
            consumed += 1;
            q.sq.set_head(cqe.sq_head);
            let known = q.slots.free(cqe.cid);
            let abandoned = q
                .abandoned
                .get(usize::from(cqe.cid))
                .copied()
                .unwrap_or(false);
            if known && !abandoned {
                out.push(cqe);
            }
            // A whole ring's worth at a time; the rest on the next call.
            if consumed >= usize::from(q.entries) {
                break;
            }
        }
        if consumed > 0 {
            let doorbell = self.cap.cq_doorbell(q.qid);
            self.bar0.write_u32(doorbell, u32::from(q.cq.head()))?;
        }
        Ok(out)
    }

    /// Sleeps until an interrupt (or a short poll interval) or `deadline`;
    /// past the deadline, a timeout error naming `what`, or the controller's
    /// fatal status if it reports one.
    fn idle_until(&mut self, deadline: Deadline, timeout: Duration, what: &str) -> Result<()> {
        let left = deadline.left();
        if left.is_zero() {
            self.check_alive()?;
            return Err(Error::Timeout {
                what: format!("{} on {}", what, self.label),
                after: timeout,
            });
        }
        match &self.irq {
            Some(efd) => {
                // Bounded: a completion is looked for even if an interrupt
                // was missed.
                wait_readable(
                    efd.as_fd(),
                    left.min(Duration::from_millis(20)),
                    "NVMe MSI-X eventfd",
                )?;
                let mut count = [0u8; 8];
                // Non-blocking: WouldBlock when nothing was signalled.
                let _ = (&*efd).read(&mut count);
            }
            None => std::thread::sleep(left.min(Duration::from_micros(200))),
        }
        Ok(())
    }

    /// A fatal controller status (or registers that read all ones) as an error.
    fn check_alive(&self) -> Result<()> {
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

    /// Runs one admin command and waits for it.
    fn admin_command(&mut self, mut cmd: Command, data: Option<(u64, u64)>) -> Result<Cqe> {
        let cid = self.submit(true, &mut cmd, data)?;
        let deadline = Deadline::after(ADMIN_TIMEOUT);
        let what = format!("admin command {}", cmd.name(true));
        loop {
            let got = self.reap(true)?;
            if let Some(c) = got.into_iter().find(|c| c.cid == cid) {
                if c.status.is_success() {
                    return Ok(c);
                }
                return Err(self.error(NvmeProblem::CommandFailed {
                    command: cmd.name(true),
                    cid,
                    status: c.status,
                }));
            }
            if let Err(e) = self.idle_until(deadline, ADMIN_TIMEOUT, &what) {
                if let Some(a) = self.admin.abandoned.get_mut(usize::from(cid)) {
                    *a = true;
                }
                return Err(e);
            }
        }
    }

    /// Identify with `cns` for `nsid`: the 4 KiB data structure.
    fn identify(&mut self, cns_value: u32, nsid: u32) -> Result<Box<[u8; 4096]>> {
        let buf = self.dma.iova(IDENTIFY_BUF);
        self.admin_command(Command::identify(cns_value, nsid, buf), None)?;
        let mut data = Box::new([0u8; 4096]);
        self.dma.read(IDENTIFY_BUF, &mut data[..])?;
        Ok(data)
    }

    fn identify_controller(&mut self) -> Result<()> {
        let data = self.identify(cns::CONTROLLER, 0)?;
        self.identity = identify::parse_controller(&data);
        let mdts_bytes = if self.identity.mdts == 0 || self.identity.mdts >= 32 {
            u64::MAX
        } else {
            self.cap.page_size_min << self.identity.mdts
        };
        self.max_transfer = mdts_bytes.min(prp::MAX_LIST_TRANSFER);
        Ok(())
    }

    fn create_io_queues(&mut self, entries: u16) -> Result<()> {
        self.admin_command(Command::set_num_queues(1, 1), None)?;
        let interrupts = self.irq.is_some();
        self.admin_command(
            Command::create_io_cq(
                IO_QID,
                u32::from(entries),
                self.dma.iova(IO_CQ),
                0,
                interrupts,
            ),
            None,
        )?;
        self.admin_command(
            Command::create_io_sq(IO_QID, u32::from(entries), self.dma.iova(IO_SQ), IO_QID),
            None,
        )?;
        self.io = Some(Queue::new(IO_QID, entries, IO_SQ, IO_CQ));
        Ok(())
    }

    /// Clears CC.EN and waits for CSTS.RDY to clear (up to CAP.TO).
    fn disable(&mut self) -> Result<()> {
        let cc = self.bar0.read_u32(regs::CC)?;
        if cc & regs::CC_EN != 0 {
            self.bar0.write_u32(regs::CC, cc & !regs::CC_EN)?;
        }
        self.wait_ready(false)
    }

    /// Sets CC (enable, NVM command set, 4 KiB pages, 64/16-byte entries)
    /// and waits for CSTS.RDY (up to CAP.TO).
    fn enable(&mut self) -> Result<()> {
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

    fn error(&self, problem: NvmeProblem) -> Error {
        nvme_error_label(&self.label, problem)
    }
}

impl StorageEngine for Nvme {
    fn name(&self) -> &str {
        "nvme"
    }

    fn completion(&self) -> Completion {
        if self.irq.is_some() {
            Completion::Interrupt
        } else {
            Completion::Polling
        }
    }

    fn block_size(&self) -> u64 {
        self.namespace.map_or(0, |n| n.block_size)
    }

    fn blocks(&self) -> u64 {
        self.namespace.map_or(0, |n| n.blocks)
    }

    fn max_transfer(&self) -> u64 {
        self.max_transfer
    }

    fn read_blocks(&mut self, lba: u64, count: u32, dst: u64, timeout: Duration) -> Result<()> {
        let id = self.submit_read(lba, count, dst)?;
        self.wait(id, timeout)
    }

    fn write_blocks(&mut self, lba: u64, count: u32, src: u64, timeout: Duration) -> Result<()> {
        let id = self.submit_write(lba, count, src)?;
        self.wait(id, timeout)
    }
}

impl Drop for Nvme {
    fn drop(&mut self) {
        // Stop the controller before its queue memory leaves the IOAS: a
        // normal shutdown (bounded), then disable.
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
        if self.irq.is_some() {
            let _ = self.dev.disable_irq(MSIX_IRQ_INDEX);
        }
    }
}

fn read_u64_lo_hi(bar: &BarMapping, offset: u64) -> Result<u64> {
    let lo = bar.read_u32(offset)?;
    let hi = bar.read_u32(offset + 4)?;
    Ok(u64::from(lo) | (u64::from(hi) << 32))
}

fn write_u64_lo_hi(bar: &BarMapping, offset: u64, value: u64) -> Result<()> {
    bar.write_u32(offset, value as u32)?;
    Ok(bar.write_u32(offset + 4, (value >> 32) as u32)?)
}

fn nvme_error(address: PciAddress, problem: NvmeProblem) -> Error {
    Error::Nvme {
        controller: address.to_string(),
        problem,
    }
}

fn nvme_error_label(label: &str, problem: NvmeProblem) -> Error {
    Error::Nvme {
        controller: label.trim_start_matches("nvme ").to_owned(),
        problem,
    }
}

fn unsupported_problem(what: &str) -> NvmeProblem {
    NvmeProblem::Unsupported { what: what.into() }
}

fn unsupported(address: PciAddress, what: &str) -> Error {
    nvme_error(address, unsupported_problem(what))
}
