//! A userspace NVMe driver over VFIO: a [`StorageEngine`] that reads
//! logical blocks into any IOVA of its IO address space (host RAM, or another
//! device's BAR exported as a dma-buf) and writes them from one.
//!
//! Bring-up follows the NVMe base specification: disable the controller
//! (waiting up to CAP.TO), place the admin queues, enable, Identify the
//! controller and namespace, ask for the I/O queue pairs and create the
//! first. Every queue lives in memory of its own (a memfd) that the driver
//! maps into the caller's IOAS ([`Ioas::map_file`]), so the controller
//! reaches it through the IOMMU like any other DMA.
//!
//! [`Nvme`] is the controller with one I/O queue of its own, which its
//! [`StorageEngine`] methods and `submit_*`/`wait*` use. More queues come
//! from [`Nvme::create_queue`]: an [`IoQueue`] is `Send`, owns its rings,
//! doorbells and command IDs, and is driven without locks, so the usual
//! pattern is one per thread. Each has its caller-chosen depth, its own
//! MSI-X vector or polled completion (optionally spinning, with a budget),
//! batches behind one doorbell ([`IoQueue::batch`]) and raw commands
//! ([`IoQueue::submit_raw`]); submitting and completing allocate nothing.
//!
//! A command's completion is handed to the caller exactly once, and its
//! command ID is not given to another command before that (or, for a
//! command given up, before its completion has arrived): see [`CommandId`].
//! A completion status other than success is an [`Error::Nvme`] carrying
//! the [`Status`].
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
//!
//! Several queues at depth, one per thread (the queues' memory and the
//! buffers are in the controller's IOAS):
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use dmabuf_p2p::{memfd::Memfd, ByteRange, Iommufd, IovaPlacement, MapPerms};
//! use dmabuf_p2p_engine::nvme::{Dma, Nvme, NvmeOptions, QueueOptions};
//!
//! let ioas = Iommufd::open()?.alloc_ioas()?;
//! let nvme = Nvme::open_with_options("0000:0f:00.0".parse()?, &ioas, NvmeOptions::new().io_queues(3))?;
//! std::thread::scope(|s| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//!     for t in 0..2u64 {
//!         let mut q = nvme.create_queue(QueueOptions::new().depth(32))?;
//!         let mem = Memfd::new("buf", 32 * 4096)?;
//!         let buf = Arc::new(ioas.map_file(&mem, ByteRange::new(0, 32 * 4096), IovaPlacement::Auto, MapPerms::ReadWrite)?);
//!         s.spawn(move || -> dmabuf_p2p_engine::Result<()> {
//!             for i in 0..32u64 {
//!                 q.submit_read(t * 256 + i * 8, 8, Dma::held(&buf, i * 4096))?; // 32 in flight
//!             }
//!             while q.in_flight() > 0 {
//!                 let done = q.wait_any(Duration::from_secs(5))?;
//!                 q.check(done)?;                                          // its status
//!             }
//!             Ok(())
//!         });
//!     }
//!     Ok(())
//! }).map_err(|e| e.to_string())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod command;
mod controller;
mod dma;
mod dma_area;
pub mod identify;
mod io_queue;
mod prepared;
pub mod problem;
pub mod prp;
pub mod queue;
pub mod regs;
pub mod shadow_doorbell;

use std::sync::Arc;
use std::time::Duration;

pub use command::Status;
pub use dma::{Dma, DmaMemory};
pub use identify::{ControllerIdentity, NamespaceIdentity};
pub use io_queue::{
    Batch, CommandId, DEFAULT_DEPTH, DROP_WAIT, Done, IoQueue, MAX_DEPTH, QueueOptions, RawQueue,
};
pub use prepared::{Op, Prepared, Reaped, Refused, Slot};
pub use problem::NvmeProblem;
pub use regs::{CmbInfo, PmrInfo};
pub use shadow_doorbell::{Doorbell, DoorbellWrites};

use self::command::cns;
use self::controller::{Controller, read_u64_lo_hi, write_u64_lo_hi};
use self::regs::{Capabilities, PAGE};
use dmabuf_p2p::Ioas;
use dmabuf_p2p::pci::PciAddress;
use dmabuf_p2p::vfio::VfioPciDevice;

use crate::deadline::Deadline;
use crate::{Completion, Error, Result, StorageEngine};

/// The PCI class code of an NVMe controller (mass storage, NVM, NVMe).
pub const NVME_CLASS: u32 = 0x01_08_02;

/// How to bring a controller up ([`Nvme::open_with_options`]).
///
/// ```
/// use dmabuf_p2p_engine::Completion;
/// use dmabuf_p2p_engine::nvme::{NvmeOptions, QueueOptions};
/// let opts = NvmeOptions::new().io_queues(4).queue(QueueOptions::new().depth(8));
/// assert_eq!(opts.io_queues_asked(), 4);
/// assert_eq!(NvmeOptions::new().completion_asked(), Completion::Interrupt);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NvmeOptions {
    completion: Completion,
    io_queues: u16,
    queue: QueueOptions,
    shadow_doorbells: bool,
}

impl Default for NvmeOptions {
    fn default() -> Self {
        Self {
            completion: Completion::Interrupt,
            io_queues: 1,
            queue: QueueOptions::default(),
            shadow_doorbells: true,
        }
    }
}

impl NvmeOptions {
    /// Interrupts, one I/O queue pair, the first queue of depth 64.
    pub fn new() -> Self {
        Self::default()
    }

    /// [`Completion::Interrupt`]: an MSI-X vector for the admin queue and
    /// one per I/O queue, where the device and the kernel allow;
    /// [`Completion::Polling`]: no interrupt at all, every completion queue
    /// made with interrupts off, as polled-mode drivers do.
    pub fn completion(mut self, completion: Completion) -> Self {
        self.completion = completion;
        self
    }

    /// The completion asked for.
    pub fn completion_asked(&self) -> Completion {
        self.completion
    }

    /// I/O queue pairs to ask the controller for (Set Features, Number of
    /// Queues, which a controller answers once per reset): the most
    /// [`Nvme::create_queue`] can make, the first included.
    pub fn io_queues(mut self, n: u16) -> Self {
        self.io_queues = n.max(1);
        self
    }

    /// The queue pairs asked for.
    pub fn io_queues_asked(&self) -> u16 {
        self.io_queues
    }

    /// Shadow doorbells (Doorbell Buffer Config, see
    /// [`shadow_doorbell`]): on by default where the controller advertises
    /// them (OACS bit 8); `false` writes every doorbell over MMIO (for
    /// comparisons).
    pub fn shadow_doorbells(mut self, on: bool) -> Self {
        self.shadow_doorbells = on;
        self
    }

    /// Whether shadow doorbells are asked for.
    pub fn shadow_doorbells_asked(&self) -> bool {
        self.shadow_doorbells
    }

    /// How to make the controller's first I/O queue (the one [`Nvme`]
    /// keeps).
    pub fn queue(mut self, queue: QueueOptions) -> Self {
        self.queue = queue;
        self
    }
}

/// An NVMe controller driven from userspace, owning its VFIO device, with
/// one I/O queue of its own ([`Nvme::queue`]); more from
/// [`Nvme::create_queue`]. The controller is shut down when the `Nvme` and
/// every queue made from it are gone.
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
    /// Declared first: deleted before the controller may go.
    queue: IoQueue,
    version: (u16, u8, u8),
    identity: ControllerIdentity,
    namespace: Option<NamespaceIdentity>,
    max_transfer: u64,
    /// Why the controller has no interrupts, if it has none.
    no_irq: Option<String>,
    /// Why Doorbell Buffer Config failed, if it was sent and failed.
    shadow_refused: Option<Error>,
    ctrl: Arc<Controller>,
}

impl Nvme {
    /// Opens the NVMe controller at `address` (bound to vfio-pci), binds it
    /// to `ioas`'s iommufd, attaches it to `ioas`, and brings it up with one
    /// I/O queue pair. Namespace 1 is selected when it is active.
    /// Completion is by MSI-X where the device and the kernel allow it, by
    /// polling otherwise ([`Nvme::polling_reason`] says why).
    pub fn open(address: PciAddress, ioas: &Ioas) -> Result<Self> {
        Self::open_with_options(address, ioas, NvmeOptions::default())
    }

    /// [`Nvme::open`], asking for `completion`: [`Completion::Polling`]
    /// requests no interrupt at all and creates the I/O completion queue
    /// with interrupts off, as polled-mode drivers do.
    pub fn open_with(address: PciAddress, ioas: &Ioas, completion: Completion) -> Result<Self> {
        Self::open_with_options(address, ioas, NvmeOptions::new().completion(completion))
    }

    /// [`Nvme::open`] with `options`: completion, how many I/O queues to
    /// ask for, the first queue's depth.
    pub fn open_with_options(
        address: PciAddress,
        ioas: &Ioas,
        options: NvmeOptions,
    ) -> Result<Self> {
        let mut dev = VfioPciDevice::open(address)?;
        dev.bind(ioas.iommufd())?;
        dev.attach(ioas)?;
        Self::from_device_with_options(dev, ioas, options)
    }

    /// Takes a bound device attached to `ioas` and brings the controller up,
    /// with completion as for [`Nvme::open`].
    pub fn from_device(dev: VfioPciDevice, ioas: &Ioas) -> Result<Self> {
        Self::from_device_with_options(dev, ioas, NvmeOptions::default())
    }

    /// [`Nvme::from_device`], asking for `completion` as
    /// [`Nvme::open_with`] does.
    pub fn from_device_with(
        dev: VfioPciDevice,
        ioas: &Ioas,
        completion: Completion,
    ) -> Result<Self> {
        Self::from_device_with_options(dev, ioas, NvmeOptions::new().completion(completion))
    }

    /// [`Nvme::from_device`] with `options`.
    pub fn from_device_with_options(
        dev: VfioPciDevice,
        ioas: &Ioas,
        options: NvmeOptions,
    ) -> Result<Self> {
        let address = dev.address();
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
        let vectors = match options.completion {
            Completion::Interrupt => 1 + u32::from(options.io_queues),
            Completion::Polling => 0,
        };
        let (ctrl, no_irq) =
            Controller::bring_up(dev, bar0, cap, ioas, vectors, options.io_queues)?;
        let no_irq = match options.completion {
            Completion::Polling => Some("polling was asked for (Completion::Polling)".to_owned()),
            Completion::Interrupt => no_irq,
        };
        let ctrl = Arc::new(ctrl);
        let identity = identify::parse_controller(&*ctrl.identify(cns::CONTROLLER, 0)?);
        let mut shadow_refused = None;
        if options.shadow_doorbells && identity.has_doorbell_buffer_config() {
            // Without them every doorbell goes over MMIO: slower, as correct.
            if let Err(e) = ctrl.configure_shadow_doorbells() {
                log::warn!(
                    "{}: Doorbell Buffer Config failed, doorbells over MMIO only: {e}",
                    ctrl.label
                );
                shadow_refused = Some(e);
            }
        }
        let mdts_bytes = if identity.mdts == 0 || identity.mdts >= 32 {
            u64::MAX
        } else {
            ctrl.cap.page_size_min << identity.mdts
        };
        let max_transfer = mdts_bytes.min(prp::MAX_LIST_TRANSFER);
        let namespace = if identity.namespaces >= 1 {
            identify_namespace(&ctrl, identity.namespaces, 1).ok()
        } else {
            None
        };
        let queue = IoQueue::create(
            &ctrl,
            options.queue,
            namespace,
            max_transfer,
            no_irq.as_deref(),
        )?;
        Ok(Self {
            queue,
            version,
            identity,
            namespace,
            max_transfer,
            no_irq,
            shadow_refused,
            ctrl,
        })
    }

    /// Whether the controller's queues use shadow doorbells (asked for, OACS
    /// bit 8 set, and Doorbell Buffer Config succeeded).
    pub fn shadow_doorbells(&self) -> bool {
        self.ctrl.shadow_doorbells().is_some()
    }

    /// The error of a Doorbell Buffer Config the controller refused (the
    /// doorbells then go over MMIO only).
    pub fn shadow_doorbells_error(&self) -> Option<&Error> {
        self.shadow_refused.as_ref()
    }

    /// The VFIO device behind the engine.
    pub fn device(&self) -> &VfioPciDevice {
        &self.ctrl.dev
    }

    /// The decoded CAP register.
    pub fn capabilities(&self) -> &Capabilities {
        &self.ctrl.cap
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

    /// Why the engine's own queue polls, if it does: why MSI-X could not be
    /// set up, or that polling was asked for ([`Nvme::open_with`]).
    pub fn polling_reason(&self) -> Option<&str> {
        self.queue.polling_reason()
    }

    /// I/O queue pairs the controller granted: how many queues may exist
    /// at once, the engine's own included.
    pub fn io_queues_granted(&self) -> u16 {
        self.ctrl.granted
    }

    /// The engine's own I/O queue (queue 1), which the methods below use.
    pub fn queue(&mut self) -> &mut IoQueue {
        &mut self.queue
    }

    /// Makes another I/O queue pair (Create I/O Completion and Submission
    /// Queue), for the selected namespace: at most
    /// [`io_queues_granted`](Self::io_queues_granted) exist at once
    /// ([`NvmeProblem::NoQueueLeft`]). Interrupt completion needs the
    /// controller opened with interrupts; the queue then has an MSI-X
    /// vector of its own.
    pub fn create_queue(&self, options: QueueOptions) -> Result<IoQueue> {
        IoQueue::create(
            &self.ctrl,
            options,
            self.namespace,
            self.max_transfer,
            self.no_irq.as_deref(),
        )
    }

    /// Selects namespace `nsid` for reads and writes (Identify Namespace),
    /// for the engine's own queue and queues made after. A namespace that
    /// does not exist or is inactive is [`NvmeProblem::NoSuchNamespace`];
    /// one with metadata is unsupported.
    pub fn select_namespace(&mut self, nsid: u32) -> Result<NamespaceIdentity> {
        let ns = self.identify_namespace(nsid)?;
        self.namespace = Some(ns);
        self.queue.set_namespace(ns);
        Ok(ns)
    }

    /// Identify Namespace `nsid`.
    pub fn identify_namespace(&self, nsid: u32) -> Result<NamespaceIdentity> {
        identify_namespace(&self.ctrl, self.identity.namespaces, nsid)
    }

    /// The controller memory buffer: enables its registers (CMBMSC.CRE, on
    /// controllers with CAP.CMBS) and reads CMBLOC/CMBSZ. Its BAR range can
    /// then be exported ([`VfioPciDevice::export_bar`]) and used as a DMA
    /// target by other devices. [`NvmeProblem::NoCmb`] if there is none.
    pub fn enable_cmb(&self) -> Result<CmbInfo> {
        if self.ctrl.cap.cmb_msc {
            write_u64_lo_hi(&self.ctrl.bar0, regs::CMBMSC, regs::CMBMSC_CRE)?;
        }
        let loc = self.ctrl.bar0.read_u32(regs::CMBLOC)?;
        let sz = self.ctrl.bar0.read_u32(regs::CMBSZ)?;
        let cmb = CmbInfo::decode(loc, sz).ok_or_else(|| self.error(NvmeProblem::NoCmb))?;
        let bar = self.ctrl.dev.bar(cmb.bar)?;
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
    pub fn enable_pmr(&self) -> Result<PmrInfo> {
        if !self.ctrl.cap.pmr_supported {
            return Err(self.error(NvmeProblem::NoPmr {
                why: "CAP.PMRS is 0".into(),
            }));
        }
        let pmrcap = self.ctrl.bar0.read_u32(regs::PMRCAP)?;
        let size = match PmrInfo::bar_of(pmrcap) {
            Some(bar) => self.ctrl.dev.bar(bar)?.size(),
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
        self.ctrl.bar0.write_u32(regs::PMRCTL, regs::PMRCTL_EN)?;
        let limit = pmr.timeout.max(Duration::from_millis(500));
        let deadline = Deadline::after(limit);
        while self.ctrl.bar0.read_u32(regs::PMRSTS)? & regs::PMRSTS_NRDY != 0 {
            if deadline.passed() {
                return Err(Error::Timeout {
                    what: format!("{}: PMRSTS.NRDY to clear (PMRCAP.PMRTO)", self.ctrl.label),
                    after: limit,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(pmr)
    }

    /// Starts reading `count` blocks of the selected namespace from `lba`
    /// into `dst` on the engine's own queue ([`IoQueue::submit_read`]).
    pub fn submit_read(&mut self, lba: u64, count: u32, dst: impl Into<Dma>) -> Result<CommandId> {
        self.queue.submit_read(lba, count, dst)
    }

    /// Starts writing `count` blocks at `lba` from `src` on the engine's
    /// own queue ([`IoQueue::submit_write`]).
    pub fn submit_write(&mut self, lba: u64, count: u32, src: impl Into<Dma>) -> Result<CommandId> {
        self.queue.submit_write(lba, count, src)
    }

    /// Commands of the engine's own queue whose completion has been neither
    /// taken nor dropped ([`IoQueue::in_flight`]).
    pub fn in_flight(&self) -> usize {
        self.queue.in_flight()
    }

    /// Waits for any command of the engine's own queue
    /// ([`IoQueue::wait_any`]).
    pub fn wait_any(&mut self, timeout: Duration) -> Result<Done> {
        self.queue.wait_any(timeout)
    }

    /// Waits for command `id` of the engine's own queue ([`IoQueue::wait`]).
    pub fn wait(&mut self, id: CommandId, timeout: Duration) -> Result<Done> {
        self.queue.wait(id, timeout)
    }

    /// A completion of the engine's own queue, without waiting
    /// ([`IoQueue::poll`]).
    pub fn poll(&mut self) -> Result<Option<Done>> {
        self.queue.poll()
    }

    /// Gives up command `id` of the engine's own queue
    /// ([`IoQueue::abandon`]).
    pub fn abandon(&mut self, id: CommandId) -> Result<()> {
        self.queue.abandon(id)
    }

    fn error(&self, problem: NvmeProblem) -> Error {
        self.ctrl.error(problem)
    }
}

/// Identify Namespace `nsid` of a controller with `count` namespaces.
fn identify_namespace(ctrl: &Controller, count: u32, nsid: u32) -> Result<NamespaceIdentity> {
    let missing = NvmeProblem::NoSuchNamespace { nsid, count };
    if nsid == 0 || nsid == u32::MAX || nsid > count {
        return Err(ctrl.error(missing));
    }
    let data = match ctrl.identify(cns::NAMESPACE, nsid) {
        Ok(d) => d,
        Err(Error::Nvme {
            problem: NvmeProblem::CommandFailed { status, .. },
            ..
        }) if status.is_invalid_namespace() => return Err(ctrl.error(missing)),
        Err(e) => return Err(e),
    };
    let ns = identify::parse_namespace(nsid, &data).ok_or_else(|| ctrl.error(missing))?;
    if ns.metadata_size != 0 {
        return Err(ctrl.error(NvmeProblem::Unsupported {
            what: format!(
                "namespace {nsid} is formatted with {} metadata bytes per block",
                ns.metadata_size
            ),
        }));
    }
    Ok(ns)
}

impl StorageEngine for Nvme {
    fn name(&self) -> &str {
        "nvme"
    }

    fn completion(&self) -> Completion {
        self.queue.completion()
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
        let id = self.queue.submit_read(lba, count, dst)?;
        self.queue.wait_or_abandon(id, timeout)
    }

    fn write_blocks(&mut self, lba: u64, count: u32, src: u64, timeout: Duration) -> Result<()> {
        let id = self.queue.submit_write(lba, count, src)?;
        self.queue.wait_or_abandon(id, timeout)
    }
}

fn nvme_error(address: PciAddress, problem: NvmeProblem) -> Error {
    Error::Nvme {
        controller: address.to_string(),
        problem,
    }
}

fn unsupported(address: PciAddress, what: &str) -> Error {
    nvme_error(
        address,
        NvmeProblem::Unsupported {
            what: what.to_owned(),
        },
    )
}
