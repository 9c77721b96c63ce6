//! Inside an existing VMM (issue 11): the VMM opens, binds and attaches its
//! devices and owns the IOAS; the library adopts them, exports a BAR, maps
//! it at a fixed guest-physical IOVA in the VMM's IOAS, and follows the
//! guest's `PCI_COMMAND` writes through the trap API. The VMM also tells it
//! of its own decode writes (`note_memory_decode`) and of the kernel's
//! request for the device back (`note_unplug_request`), or lets the library
//! take that request itself (`AdoptOptions::take_device_request_irq`); the
//! two unplug tests hot-unplug shm1 with QMP `device_del` and plug it back in
//! with the helpers of `faults.rs`.
//!
//! The VMM is played by rust-vmm's own crates, what cloud-hypervisor uses:
//! `iommufd-ioctls` (`IommuFd`, `IommufdIoas`) and `vfio-ioctls` with
//! `vfio_cdev` (`VfioIommufd` without a hypervisor device handle, so no
//! KVM: `VfioDevice::new_from_fd` binds the cdev and attaches it to the
//! IOAS). The test opens the cdev itself: `VfioDevice::new` would find it
//! with `read_dir` on sysfs, a readdir that can record the lockdep edge of
//! docs/KERNEL.md. The VMM's guest RAM is a memfd it maps at `RAM_GPA`
//! itself.
//!
//! BAR areas (shm1, see the table in `p2p.rs`): 0x2a0_0000.. for the VMM
//! flow, 0x2b0_0000.. for the property test, 0x2c0_0000.. for the 5d case,
//! 0x2d0_0000.. for the unplug with the library's request IRQ, 0x2e0_0000..
//! for the VMM's unplug request, 0x2f0_0000.. for `note_memory_decode`.

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iommufd_ioctls::{IommuFd, IommufdIoas};
use vfio_ioctls::{VfioDevice, VfioIommufd};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use dmabuf_p2p::importer::iommufd::{Ioas, Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{Attachment, BufferState, RestorePolicy, RevocationEvent, RevokeReason};
use dmabuf_p2p::vfio::{AdoptOptions, CONFIG_REGION_INDEX, REQ_IRQ_INDEX, VfioPciDevice};
use dmabuf_p2p::{ByteRange, Error, PciAddress};
use dmabuf_p2p_engine::DmaEngine;
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_vm_tests::{
    DMA_TIMEOUT, Kmsg, assert_bytes, bar_read, bar_write, check_write_faults, directive,
    edu_address, open_fd_count, pattern, request_host_check, shm_address,
};

use super::faults::{
    REQUEST_TIMEOUT, SYSFS_TIMEOUT, Shm1Restorer, bind_replugged, note, open_replugged_exporter,
    qmp_ok, replug_shm1, shm_with, sysfs_dir, wait_until,
};

/// Where the VMM maps its guest RAM (a memfd) in its IOAS.
const RAM_GPA: u64 = 0x1000_0000;
const RAM_LEN: u64 = 0x1_0000;
/// Where the guest placed shm1's BAR2 window: the fixed IOVA of the export.
const BAR_GPA: u64 = 0xc000_0000;
/// The size of each export.
const LEN: u64 = 0x1_0000;
/// Bytes per copy.
const COPY: u64 = 0x800;
const PCI_COMMAND: u64 = 4;
const MEMORY: u16 = 0x2;

/// The VMM's own objects, made with rust-vmm's crates. Fields drop in order:
/// the devices (detach and close, and drop their handles of the
/// `VfioIommufd` wrapper), then the IOAS (destroyed with its last handle),
/// then the iommufd.
struct Vmm {
    shm: VfioDevice,
    edu: VfioDevice,
    ioas: Arc<IommufdIoas>,
    iommufd: Arc<IommuFd>,
    ram: Memfd,
}

impl Vmm {
    /// Opens `/dev/iommu`, allocates an IOAS, opens, binds and attaches shm1
    /// and edu to it, and maps a memfd as guest RAM at `RAM_GPA`.
    fn new() -> Self {
        let cdev = |bdf: String| {
            let path = dmabuf_p2p_vm_tests::vfio_cdev(&bdf).unwrap();
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap()
        };
        let iommufd = Arc::new(IommuFd::new().unwrap());
        let ioas = Arc::new(IommufdIoas::new(Arc::clone(&iommufd)).unwrap());
        let vfio = Arc::new(
            VfioIommufd::new(Arc::clone(&iommufd), Some(Arc::clone(&ioas)), None).unwrap(),
        );
        let shm = VfioDevice::new_from_fd(cdev(shm_address("shm1")), vfio.clone(), true).unwrap();
        let edu = VfioDevice::new_from_fd(cdev(edu_address()), vfio.clone(), true).unwrap();
        let ram = Memfd::new("vmm-guest-ram", RAM_LEN).unwrap();
        ioas.map_file(ram.as_fd().as_raw_fd(), 0, RAM_LEN, RAM_GPA, true)
            .unwrap();
        Self {
            shm,
            edu,
            ioas,
            iommufd,
            ram,
        }
    }

    /// `PCI_COMMAND` of shm1, read by the VMM on its own fd.
    fn command(&self) -> u16 {
        let mut b = [0u8; 2];
        self.shm
            .region_read(CONFIG_REGION_INDEX, &mut b, PCI_COMMAND);
        u16::from_le_bytes(b)
    }

    /// A `PCI_COMMAND` write by the VMM on its own fd, which the library
    /// does not see.
    fn write_command(&self, value: u16) {
        self.shm
            .region_write(CONFIG_REGION_INDEX, &value.to_le_bytes(), PCI_COMMAND);
    }

    /// The vendor ID of `dev`, read on the VMM's fd (0 if the fd is gone:
    /// vfio-ioctls only logs a failed read).
    fn vendor(dev: &VfioDevice) -> u16 {
        let mut b = [0u8; 2];
        dev.region_read(CONFIG_REGION_INDEX, &mut b, 0);
        u16::from_le_bytes(b)
    }

    /// The VMM registers its own eventfd as shm1's device-request trigger
    /// (`VFIO_PCI_REQ_IRQ_INDEX`), as a VMM that handles hot-unplug does.
    fn request_eventfd(&self) -> EventFd {
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        self.shm.enable_irq(REQ_IRQ_INDEX, vec![&efd]).unwrap();
        efd
    }
}

/// Whether the kernel signalled `efd` (reads it, so the count is consumed).
fn signalled(efd: &EventFd) -> bool {
    match efd.read() {
        Ok(n) => n != 0,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("reading the VMM's device-request eventfd: {e}"),
    }
}

/// A duplicate of an fd the VMM owns.
fn dup(fd: RawFd) -> OwnedFd {
    // SAFETY: the VMM object owning `fd` is borrowed by the caller for the
    // whole call, so the fd is open; the duplicate is a new fd.
    unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .unwrap()
}

/// What the library holds after adopting the VMM's objects.
struct Adopted {
    iommufd: Iommufd,
    ioas: Ioas,
    edu: Edu,
    dev: VfioPciDevice,
}

fn adopt(vmm: &Vmm) -> Adopted {
    adopt_with(vmm, AdoptOptions::default())
}

/// [`adopt`], with `options` for shm1 (edu is adopted with the defaults).
fn adopt_with(vmm: &Vmm, options: AdoptOptions) -> Adopted {
    let iommufd = Iommufd::from(dup(vmm.iommufd.as_raw_fd()));
    let ioas = Ioas::adopt(&iommufd, vmm.ioas.id()).unwrap();
    assert!(!ioas.is_owned());
    let dev = VfioPciDevice::adopt(
        dup(vmm.shm.as_raw_fd()),
        vmm.shm.iommufd_dev_id().unwrap(),
        &iommufd,
        options,
    )
    .unwrap();
    assert!(dev.is_adopted());
    assert_eq!(dev.address().to_string(), shm_address("shm1"));
    assert_eq!(dev.devid(), vmm.shm.iommufd_dev_id());
    assert_eq!(
        dev.known_command(),
        Some(vmm.command()),
        "adopt reads PCI_COMMAND"
    );
    let edu_dev = VfioPciDevice::adopt(
        dup(vmm.edu.as_raw_fd()),
        vmm.edu.iommufd_dev_id().unwrap(),
        &iommufd,
        AdoptOptions::default(),
    )
    .unwrap();
    let edu = Edu::from_device(edu_dev).unwrap();
    Adopted {
        iommufd,
        ioas,
        edu,
        dev,
    }
}

/// The events an attachment's callback saw.
#[derive(Default, Clone)]
struct Events(Arc<Mutex<Vec<RevocationEvent>>>);

impl Events {
    fn on(att: &Attachment) -> Self {
        let events = Self::default();
        let log = Arc::clone(&events.0);
        att.on_event(move |_, ev| log.lock().unwrap().push(ev.clone()));
        events
    }

    fn get(&self) -> Vec<RevocationEvent> {
        self.0.lock().unwrap().clone()
    }
}

/// The attachment saw `expected`, in order, and is live again at the IOVA it
/// had (`BAR_GPA`).
fn assert_restored(att: &Attachment, events: &Events, expected: &[RevocationEvent], why: &str) {
    assert_eq!(events.get(), expected, "{why}");
    assert_eq!(att.iova(), BAR_GPA, "{why}: the IOVA changed");
    att.ensure_live()
        .unwrap_or_else(|e| panic!("{why}: not live: {e}"));
}

/// An engine copy of `bytes` (put in guest RAM) to `iova`, made whatever the
/// attachment says, as a guest driver would: marked in the kernel log, and
/// any IOMMU faults logged for it checked to be the engine's writes.
fn guest_copy(edu: &mut Edu, ram: &Memfd, bytes: &[u8], iova: u64, what: &str) {
    ram.write_at(0, bytes).unwrap();
    let mut kmsg = Kmsg::open_at_end().unwrap();
    Kmsg::mark(&format!(
        "{what}: edu copy of {:#x} bytes to IOVA {iova:#x}",
        bytes.len()
    ));
    edu.memcpy(RAM_GPA, iova, bytes.len() as u64, DMA_TIMEOUT)
        .unwrap();
    let faults = kmsg.iommu_faults(Duration::from_millis(100));
    check_write_faults(&faults, &edu_address());
}

/// The VMM flow: adopt, export shm1's BAR2, map it at `BAR_GPA` in the VMM's
/// IOAS; the guest turns memory decode off and on through the trap API; the
/// engine's copy lands, is blocked (not one byte changes, in the guest and
/// in the host's backing file), and lands again at the same IOVA. Then the
/// library lets go of everything first: the VMM's fds, IOAS and RAM mapping
/// are still there, the library's BAR mapping is gone, and once the VMM has
/// dropped its objects no fd is left open.
#[test]
fn vmm_adopts_and_follows_the_guests_memory_decode() {
    const AREA: u64 = 0x2a0_0000;
    let (off1, off2, off3) = (0x400, 0x2400, 0x4400);
    let fds_before = open_fd_count();
    let vmm = Vmm::new();
    let fds_vmm = open_fd_count();
    let mut lib = adopt(&vmm);
    assert!(lib.dev.iommufd().unwrap().same_context(&lib.iommufd));
    assert!(lib.ioas.iommufd().same_context(&lib.iommufd));

    // The guest turns memory decode on (vfio-pci left it off at open).
    let command = vmm.command();
    lib.dev
        .guest_config_write(PCI_COMMAND, &(command | MEMORY).to_le_bytes())
        .unwrap();
    assert_eq!(lib.dev.known_memory_decode(), Some(true));
    assert_ne!(vmm.command() & MEMORY, 0, "the write reached the device");
    assert_eq!(lib.dev.hub().state(), BufferState::Live);

    let bar = lib.dev.map_bar(2).unwrap();
    let old = pattern(1100, LEN as usize);
    bar_write(&bar, AREA, &old);
    let export = lib.dev.export_bar(2, &[ByteRange::new(AREA, LEN)]).unwrap();
    let att = Attachment::map(
        &export,
        &lib.ioas,
        IovaPlacement::Fixed(BAR_GPA),
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    assert_eq!(att.iova(), BAR_GPA);
    let events = Events::on(&att);

    // Lands.
    let new1 = pattern(1101, COPY as usize);
    guest_copy(&mut lib.edu, &vmm.ram, &new1, BAR_GPA + off1, "live");
    let mut want = old.clone();
    want[off1 as usize..(off1 + COPY) as usize].copy_from_slice(&new1);
    assert_bytes(
        &bar_read(&bar, AREA, LEN as usize),
        &want,
        AREA,
        "after the first copy",
    );

    // The guest turns decode off: revoked, and the copy is blocked.
    lib.dev
        .guest_config_write(PCI_COMMAND, &(command & !MEMORY).to_le_bytes())
        .unwrap();
    assert_eq!(vmm.command() & MEMORY, 0);
    assert_eq!(lib.dev.known_memory_decode(), Some(false));
    assert_eq!(
        events.get(),
        [RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff)]
    );
    assert!(matches!(att.ensure_live(), Err(Error::Revoked { .. })));
    let new2 = pattern(1102, COPY as usize);
    guest_copy(&mut lib.edu, &vmm.ram, &new2, BAR_GPA + off2, "revoked");

    // The guest turns it on again: restored at the same IOVA, and the copy
    // lands there; the blocked one changed nothing.
    lib.dev
        .guest_config_write(PCI_COMMAND, &(command | MEMORY).to_le_bytes())
        .unwrap();
    assert_restored(
        &att,
        &events,
        &[
            RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff),
            RevocationEvent::Restored,
        ],
        "the guest turned decode on again",
    );
    assert_bytes(
        &bar_read(&bar, AREA, LEN as usize),
        &want,
        AREA,
        "after the blocked copy",
    );
    let new3 = pattern(1103, COPY as usize);
    guest_copy(&mut lib.edu, &vmm.ram, &new3, BAR_GPA + off3, "restored");
    want[off3 as usize..(off3 + COPY) as usize].copy_from_slice(&new3);
    assert_bytes(
        &bar_read(&bar, AREA, LEN as usize),
        &want,
        AREA,
        "after the restored copy",
    );
    request_host_check("shm1", AREA, &want);

    // The library lets go first.
    let ioas_id = vmm.ioas.id();
    drop((att, export, bar));
    drop(lib);
    assert_eq!(
        open_fd_count(),
        fds_vmm,
        "the library closed its own fds, no more"
    );
    assert_eq!(Vmm::vendor(&vmm.shm), 0x1af4, "the VMM's shm1 fd is open");
    assert_eq!(Vmm::vendor(&vmm.edu), 0x1234, "the VMM's edu fd is open");
    // Its BAR mapping went with its attachment; the VMM's IOAS and its RAM
    // mapping are still there.
    assert!(
        vmm.ioas.unmap(BAR_GPA, LEN).is_err(),
        "no mapping left at BAR_GPA"
    );
    vmm.ioas.unmap(RAM_GPA, RAM_LEN).unwrap();
    let checker = Iommufd::from(dup(vmm.iommufd.as_raw_fd()));
    checker.iova_ranges(ioas_id).unwrap();

    // Then the VMM closes its own objects: nothing was closed twice.
    drop(vmm);
    assert!(
        matches!(
            checker.iova_ranges(ioas_id),
            Err(Error::UnknownObject { .. })
        ),
        "the VMM destroyed its IOAS"
    );
    drop(checker);
    assert_eq!(open_fd_count(), fds_before, "every fd closed");
}

/// Issue 11's defect "5d": memory decode turned off outside the library (a
/// raw write on the VMM's fd that nobody is told of), then the library's own
/// `set_memory_decode(true)`: the attachment is restored, and the engine's
/// copy lands without `refresh()`.
#[test]
fn decode_off_outside_then_library_on_lands_without_refresh() {
    const AREA: u64 = 0x2c0_0000;
    let vmm = Vmm::new();
    let mut lib = adopt(&vmm);
    lib.dev.set_memory_decode(true).unwrap();
    let bar = lib.dev.map_bar(2).unwrap();
    let old = pattern(1300, LEN as usize);
    bar_write(&bar, AREA, &old);
    let export = lib.dev.export_bar(2, &[ByteRange::new(AREA, LEN)]).unwrap();
    let att = Attachment::map(
        &export,
        &lib.ioas,
        IovaPlacement::Fixed(BAR_GPA),
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    let events = Events::on(&att);

    let command = vmm.command();
    vmm.write_command(command & !MEMORY);
    assert!(!att.is_revoked(), "nobody told the library yet");
    lib.dev.set_memory_decode(true).unwrap();
    assert_restored(
        &att,
        &events,
        &[
            RevocationEvent::Revoked(RevokeReason::External),
            RevocationEvent::Restored,
        ],
        "the library saw decode off before its write and recorded the revocation",
    );
    let new = pattern(1301, COPY as usize);
    guest_copy(
        &mut lib.edu,
        &vmm.ram,
        &new,
        BAR_GPA + 0x800,
        "after the library's decode-on",
    );
    let mut want = old;
    want[0x800..0x800 + COPY as usize].copy_from_slice(&new);
    assert_bytes(&bar_read(&bar, AREA, LEN as usize), &want, AREA, "BAR");

    // The same through the trap API, and with a told VMM write.
    vmm.write_command(command & !MEMORY);
    lib.dev
        .guest_config_write(PCI_COMMAND, &(command | MEMORY).to_le_bytes())
        .unwrap();
    assert!(!att.is_revoked());
    assert_eq!(att.counts(), (2, 2));
    vmm.write_command(command & !MEMORY);
    vmm.write_command(command | MEMORY);
    lib.dev
        .note_command_change(command & !MEMORY, command | MEMORY);
    assert_eq!(att.counts(), (3, 3));
    let new = pattern(1302, COPY as usize);
    guest_copy(
        &mut lib.edu,
        &vmm.ram,
        &new,
        BAR_GPA + 0x1000,
        "after a told cycle",
    );
    want[0x1000..0x1000 + COPY as usize].copy_from_slice(&new);
    assert_bytes(&bar_read(&bar, AREA, LEN as usize), &want, AREA, "BAR");
    request_host_check("shm1", AREA, &want);
}

/// One step of the property test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `set_memory_decode(on)`.
    Library(bool),
    /// The guest's write through `guest_config_write`.
    Trap(bool),
    /// A VMM write on its own fd, told with `note_command_change`.
    Told(bool),
    /// A VMM write on its own fd that nobody is told of.
    Untold(bool),
    /// A read of the register by the library (`command()`).
    Read,
    /// `VfioPciDevice::reset`.
    LibraryReset,
    /// A reset by the VMM on its own fd, told with `note_reset`.
    ToldReset,
    /// `restore()` of every revoked attachment, while the hub is live.
    RestoreEach,
    /// `VfioPciDevice::sync_with_kernel`.
    Sync,
}

impl Op {
    /// Whether the library learns the register's state in this step (reads
    /// it, or is told).
    fn tells_the_library(self) -> bool {
        !matches!(self, Self::Untold(_) | Self::RestoreEach)
    }

    /// Whether the library brings attachments back in this step.
    fn restores(self) -> bool {
        matches!(
            self,
            Self::Library(true)
                | Self::Trap(true)
                | Self::Told(true)
                | Self::LibraryReset
                | Self::ToldReset
                | Self::RestoreEach
                | Self::Sync
        )
    }
}

/// xorshift64: the sequence is reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Random sequences (seeded; the seed is printed and logged, and
/// `DMABUF_P2P_SEED` replays one) of library, trapped, told and untold decode
/// toggles, resets, reads, restores and syncs. After every step in which
/// the library restores, each attachment that says live takes an engine copy
/// (bytes checked) and each one that says revoked does not (not one byte
/// changes). An untold decode-on only comes after the library has looked
/// at the register since the last untold decode-off: an off-and-on cycle
/// that leaves no trace in the register cannot be seen by anyone. A restore
/// after an untold decode-off is refused by the kernel (`Error::Revoked`),
/// and from then on no attachment may say live.
#[test]
fn random_decode_toggles_resets_and_restores_never_report_a_dead_mapping_live() {
    const AREA: u64 = 0x2b0_0000;
    const STEPS: usize = 300;
    let seed = dmabuf_p2p_vm_tests::property_seed();
    println!("seed {seed} (DMABUF_P2P_SEED={seed} replays it)");
    Kmsg::mark(&format!("vmm property test: seed {seed}"));
    let mut rng = Rng(seed);

    let vmm = Vmm::new();
    let mut lib = adopt(&vmm);
    lib.dev.set_memory_decode(true).unwrap();
    let supports_reset = lib.dev.supports_reset().unwrap();
    let bar = lib.dev.map_bar(2).unwrap();
    let policies = [
        RestorePolicy::Automatic,
        RestorePolicy::LeaveRevoked,
        RestorePolicy::Automatic,
    ];
    let mut atts = Vec::new();
    for (i, policy) in policies.iter().enumerate() {
        let at = AREA + i as u64 * LEN;
        let export = lib.dev.export_bar(2, &[ByteRange::new(at, LEN)]).unwrap();
        let att = Attachment::map(
            &export,
            &lib.ioas,
            IovaPlacement::Fixed(BAR_GPA + i as u64 * LEN),
            MapPerms::ReadWrite,
            *policy,
        )
        .unwrap();
        atts.push((at, att));
    }
    let command = vmm.command() | MEMORY;
    let mut unseen_off = false;
    let mut landed = 0;
    let mut blocked = 0;

    for step in 0..STEPS {
        let on = rng.below(2) == 0;
        let op = match rng.below(9) {
            0 => Op::Library(on),
            1 => Op::Trap(on),
            2 => Op::Told(on),
            3 if !on || !unseen_off => Op::Untold(on),
            4 => Op::Read,
            5 if supports_reset => Op::LibraryReset,
            6 if supports_reset => Op::ToldReset,
            7 => Op::RestoreEach,
            8 => Op::Sync,
            _ => Op::Library(true),
        };
        Kmsg::mark(&format!("vmm property test step {step}: {op:?}"));
        println!("step {step}: {op:?}");
        let mut learned = false;
        let value = |on: bool| if on { command } else { command & !MEMORY };
        match op {
            Op::Library(on) => lib.dev.set_memory_decode(on).unwrap(),
            Op::Trap(on) => lib
                .dev
                .guest_config_write(PCI_COMMAND, &value(on).to_le_bytes())
                .unwrap(),
            Op::Told(on) => {
                let old = vmm.command();
                vmm.write_command(value(on));
                lib.dev.note_command_change(old, value(on));
            }
            Op::Untold(on) => {
                vmm.write_command(value(on));
                unseen_off = !on;
            }
            Op::Read => {
                lib.dev.command().unwrap();
            }
            Op::LibraryReset => lib.dev.reset().unwrap(),
            Op::ToldReset => {
                vmm.shm.reset();
                lib.dev.note_reset().unwrap();
            }
            Op::RestoreEach => {
                if lib.dev.hub().state() == BufferState::Live {
                    let decode = vmm.command() & MEMORY != 0;
                    for (_, att) in &atts {
                        if !att.is_revoked() {
                            continue;
                        }
                        match att.restore() {
                            Ok(()) => assert!(decode, "step {step}: restored while decode is off"),
                            // An untold decode-off: the kernel refuses the
                            // map, and the library learns of it.
                            Err(Error::Revoked { .. }) if !decode => learned = true,
                            Err(e) => panic!("step {step}: restore: {e}"),
                        }
                    }
                }
            }
            Op::Sync => {
                lib.dev.sync_with_kernel().unwrap();
            }
        }
        if op.tells_the_library() || learned {
            unseen_off = false;
        }
        let decode = vmm.command() & MEMORY != 0;
        if !decode {
            // The library has looked, was told or learned from a refused
            // restore: it must not call anything live while the kernel has
            // revoked.
            if op.tells_the_library() {
                assert_eq!(lib.dev.known_memory_decode(), Some(false), "step {step}");
                assert_ne!(lib.dev.hub().state(), BufferState::Live, "step {step}");
                for (_, att) in &atts {
                    assert!(att.is_revoked(), "step {step}: live while decode is off");
                }
            }
            if learned {
                assert_ne!(lib.dev.hub().state(), BufferState::Live, "step {step}");
                for (_, att) in &atts {
                    assert!(
                        att.is_revoked(),
                        "step {step}: live after a refused restore"
                    );
                }
            }
            continue;
        }
        if !op.restores() {
            continue;
        }
        // Each attachment that says live takes a copy; each revoked one not.
        let bytes = pattern(2000 + step as u64, COPY as usize);
        vmm.ram.write_at(0, &bytes).unwrap();
        lib.edu.load(RAM_GPA, 0, COPY, DMA_TIMEOUT).unwrap();
        for (i, (at, att)) in atts.iter().enumerate() {
            let off = 0x800 * (step as u64 % 16);
            let before = bar_read(&bar, at + off, COPY as usize);
            let live = !att.is_revoked();
            let mut kmsg = Kmsg::open_at_end().unwrap();
            lib.edu
                .store(0, att.iova() + off, COPY, DMA_TIMEOUT)
                .unwrap();
            check_write_faults(
                &kmsg.iommu_faults(Duration::from_millis(50)),
                &edu_address(),
            );
            let after = bar_read(&bar, at + off, COPY as usize);
            let what = format!(
                "step {step} ({op:?}), attachment {i} ({:?}, says {})",
                att.policy(),
                if live { "live" } else { "revoked" }
            );
            if live {
                assert_bytes(&after, &bytes, at + off, &what);
                landed += 1;
            } else {
                assert_bytes(&after, &before, at + off, &what);
                blocked += 1;
            }
        }
    }
    directive(&format!(
        "vmm property test: seed {seed}, {STEPS} steps: {landed} copies landed, {blocked} blocked"
    ));
    assert!(landed > 0, "seed {seed}: no copy was checked to land");
}

/// Adopting what is not a bound VFIO cdev, or an IOAS id that does not
/// exist, is refused with a typed error naming the problem.
#[test]
fn adopting_refuses_what_is_not_a_bound_vfio_cdev() {
    let iommufd = Iommufd::open().unwrap();
    let not_cdev = OwnedFd::from(File::open("/dev/null").unwrap());
    match VfioPciDevice::adopt(not_cdev, 1, &iommufd, AdoptOptions::default()) {
        Err(Error::Device { problem, .. }) => {
            assert!(problem.contains("not a VFIO cdev"), "{problem}")
        }
        other => panic!("adopting /dev/null: {other:?}"),
    }
    // A cdev opened but not bound.
    let cdev = dmabuf_p2p_vm_tests::vfio_cdev(&shm_address("shm1")).unwrap();
    let unbound = OwnedFd::from(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cdev)
            .unwrap(),
    );
    match VfioPciDevice::adopt(unbound, 1, &iommufd, AdoptOptions::default()) {
        Err(Error::Device { problem, .. }) => assert!(problem.contains("not bound"), "{problem}"),
        other => panic!("adopting an unbound cdev: {other:?}"),
    }
    // An IOAS id that does not exist.
    assert!(matches!(
        Ioas::adopt(&iommufd, 0xbeef),
        Err(Error::UnknownObject { id: 0xbeef, .. })
    ));
}

/// With memory decode on: exports `LEN` bytes of shm1's BAR2 at `area`,
/// maps them at `BAR_GPA` as an attachment, fills the area with pattern
/// `seed` through the BAR, and has the engine copy pattern `seed + 1` to
/// `area + off`, checked through the BAR. Returns the export, the
/// attachment, its events and the bytes the area now holds. No BAR mmap
/// outlives the call (one holds the device open).
fn export_and_copy(
    lib: &mut Adopted,
    vmm: &Vmm,
    area: u64,
    off: u64,
    seed: u64,
    what: &str,
) -> (
    dmabuf_p2p::exporter::bar::BarExport,
    Attachment,
    Events,
    Vec<u8>,
) {
    lib.dev.set_memory_decode(true).unwrap();
    let old = pattern(seed, LEN as usize);
    let export = lib.dev.export_bar(2, &[ByteRange::new(area, LEN)]).unwrap();
    let att = map_at_bar_gpa(&export, &lib.ioas);
    let events = Events::on(&att);
    let new = pattern(seed + 1, COPY as usize);
    let mut want = old.clone();
    want[off as usize..(off + COPY) as usize].copy_from_slice(&new);
    let bar = lib.dev.map_bar(2).unwrap();
    bar_write(&bar, area, &old);
    guest_copy(&mut lib.edu, &vmm.ram, &new, BAR_GPA + off, what);
    assert_bytes(&bar_read(&bar, area, LEN as usize), &want, area, "BAR");
    (export, att, events, want)
}

/// Maps `export` at `BAR_GPA` in the VMM's IOAS, restored automatically.
fn map_at_bar_gpa(export: &dmabuf_p2p::exporter::bar::BarExport, ioas: &Ioas) -> Attachment {
    let att = Attachment::map(
        export,
        ioas,
        IovaPlacement::Fixed(BAR_GPA),
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    assert_eq!(att.iova(), BAR_GPA);
    att
}

/// `export_bar` after the kernel asked for the device back: refused, with
/// the device named and the reason given.
fn assert_export_refused(dev: &VfioPciDevice, area: u64) {
    match dev.export_bar(2, &[ByteRange::new(area, LEN)]) {
        Err(Error::Device {
            device, problem, ..
        }) => {
            assert_eq!(device, shm_address("shm1"));
            assert!(problem.contains("is being removed"), "{problem}");
        }
        other => panic!("export after the device request: {other:?}"),
    }
}

/// The library takes the device-request IRQ at adoption
/// (`AdoptOptions::take_device_request_irq`), which replaces the trigger the
/// VMM had registered. QEMU then hot-unplugs shm1 (`device_del`): the
/// library's eventfd fires and the VMM's does not; the hub is gone
/// (`Unplug`), the attachment revoked, a new export refused, and the
/// engine's copy to the old IOVA changes nothing (checked through the BAR
/// once the device is plugged back in, and in the host's backing file). The
/// device is then closed by both sides, leaves, and is plugged back in and
/// bound to vfio-pci for the tests after this one.
#[test]
fn library_takes_the_device_request_irq_and_revokes_on_hot_unplug() {
    const AREA: u64 = 0x2d0_0000;
    let (off1, off2) = (0x400, 0x2400);
    let shm1 = shm_with(64 << 20);
    assert_eq!(shm1.to_string(), shm_address("shm1"));
    let _restore = Shm1Restorer { addr: shm1 };
    let vmm = Vmm::new();
    let vmm_request = vmm.request_eventfd();
    let mut lib = adopt_with(&vmm, AdoptOptions::default().take_device_request_irq(true));
    assert!(
        lib.dev.unplug_request_fd().is_some(),
        "adopt registered the library's device-request eventfd"
    );
    assert!(!lib.dev.unplug_requested().unwrap());
    // The path works before the unplug.
    let (export, att, events, want) =
        export_and_copy(&mut lib, &vmm, AREA, off1, 1400, "before the unplug");

    let t0 = Instant::now();
    qmp_ok("device_del", r#"{"id":"shm1"}"#);
    assert!(
        lib.dev.wait_unplug_request(REQUEST_TIMEOUT).unwrap(),
        "no device request within {REQUEST_TIMEOUT:?} of device_del"
    );
    note(&format!(
        "device request {:?} after device_del",
        t0.elapsed()
    ));
    assert!(
        !signalled(&vmm_request),
        "the kernel signalled the VMM's eventfd: the library did not take the trigger"
    );
    assert!(
        lib.dev.unplug_requested().unwrap(),
        "the request is remembered"
    );
    assert_eq!(
        lib.dev.hub().state(),
        BufferState::Gone(RevokeReason::Unplug)
    );
    assert!(att.is_revoked());
    assert_eq!(att.revoked_reason(), Some(RevokeReason::Unplug));
    assert!(matches!(att.ensure_live(), Err(Error::Revoked { .. })));
    assert_eq!(
        events.get(),
        [RevocationEvent::Revoked(RevokeReason::Unplug)]
    );
    assert_export_refused(&lib.dev, AREA);
    // The guest's engine copies to the old IOVA: the mapping is gone.
    let new2 = pattern(1402, COPY as usize);
    guest_copy(
        &mut lib.edu,
        &vmm.ram,
        &new2,
        BAR_GPA + off2,
        "after the unplug request",
    );

    drop((att, export));
    drop(lib);
    drop(vmm);
    replug_and_check(shm1, AREA, &want);
}

/// After a device request, with every fd of shm1 closed: waits for the
/// kernel to finish the removal, plugs shm1 back in and binds it to vfio-pci
/// (retrying while its cdev is not ready, as `faults.rs` does), checks that
/// `want` is what its BAR holds at `area` (in the guest and in the host's
/// backing file), and that the VMM stand-in opens it again, as the next
/// tests will.
pub(super) fn replug_and_check(shm1: PciAddress, area: u64, want: &[u8]) {
    let gone = wait_until(SYSFS_TIMEOUT, || !Path::new(&sysfs_dir(shm1)).exists())
        .unwrap_or_else(|| panic!("{shm1} still in sysfs {SYSFS_TIMEOUT:?} after closing it"));
    note(&format!("{shm1} left sysfs {gone:?} after the close"));
    replug_shm1(shm1);
    bind_replugged(shm1);
    let iommufd = Iommufd::open().unwrap();
    let dev = open_replugged_exporter(shm1, &iommufd);
    let bar = dev.map_bar(2).unwrap();
    assert_bytes(
        &bar_read(&bar, area, want.len()),
        want,
        area,
        "after unplug and replug",
    );
    drop((bar, dev, iommufd));
    request_host_check("shm1", area, want);
    let vmm = Vmm::new();
    assert_eq!(Vmm::vendor(&vmm.shm), 0x1af4);
}

/// Without `take_device_request_irq` the device-request IRQ stays the
/// VMM's: the library has no channel, and when QEMU hot-unplugs shm1
/// (`device_del`) the kernel signals the VMM's own eventfd, registered
/// before adoption, while the library has seen nothing. The VMM then tells
/// it (`note_unplug_request`, twice: one revocation): the hub is gone
/// (`Unplug`), the attachment says revoked, a new export is refused, and the
/// engine's copy to the attachment's IOVA changes nothing (checked through
/// the BAR once the device is plugged back in, and in the host's backing
/// file). The device is left plugged in and bound to vfio-pci.
#[test]
fn vmm_tells_the_library_of_its_device_request() {
    const AREA: u64 = 0x2e0_0000;
    let (off1, off2) = (0x400, 0x2400);
    let shm1 = shm_with(64 << 20);
    assert_eq!(shm1.to_string(), shm_address("shm1"));
    let _restore = Shm1Restorer { addr: shm1 };
    let vmm = Vmm::new();
    let vmm_request = vmm.request_eventfd();
    let mut lib = adopt(&vmm);
    assert!(lib.dev.unplug_request_fd().is_none());
    assert!(matches!(
        lib.dev.unplug_requested(),
        Err(Error::Unsupported { .. })
    ));
    let (export, att, events, want) = export_and_copy(&mut lib, &vmm, AREA, off1, 1500, "live");

    assert!(!signalled(&vmm_request));
    let t0 = Instant::now();
    qmp_ok("device_del", r#"{"id":"shm1"}"#);
    let asked = wait_until(REQUEST_TIMEOUT, || signalled(&vmm_request));
    assert!(
        asked.is_some(),
        "the VMM's eventfd saw no device request within {REQUEST_TIMEOUT:?} of device_del"
    );
    note(&format!(
        "device request on the VMM's eventfd {:?} after device_del",
        t0.elapsed()
    ));
    assert_eq!(
        lib.dev.hub().state(),
        BufferState::Live,
        "the library has no channel of its own: it knows only what the VMM tells"
    );
    assert!(events.get().is_empty());

    lib.dev.note_unplug_request();
    lib.dev.note_unplug_request();
    assert_eq!(
        events.get(),
        [RevocationEvent::Revoked(RevokeReason::Unplug)],
        "revoked once"
    );
    assert_eq!(
        lib.dev.hub().state(),
        BufferState::Gone(RevokeReason::Unplug)
    );
    assert!(lib.dev.unplug_requested().unwrap());
    assert!(att.is_revoked());
    assert_eq!(att.revoked_reason(), Some(RevokeReason::Unplug));
    assert!(matches!(att.ensure_live(), Err(Error::Revoked { .. })));
    assert_export_refused(&lib.dev, AREA);
    let new2 = pattern(1502, COPY as usize);
    guest_copy(&mut lib.edu, &vmm.ram, &new2, BAR_GPA + off2, "unplug told");

    drop((att, export));
    drop(lib);
    drop(vmm);
    replug_and_check(shm1, AREA, &want);
}

/// The VMM turns memory decode off and on with its own writes on its own fd
/// and tells the library with `note_memory_decode`: off revokes (the
/// engine's copy changes nothing), on restores at the same IOVA (the copy
/// lands); a second `note_memory_decode(true)` is no transition and
/// remaps nothing. Then an off-and-on whose off half went untold, told as
/// `note_command_change(off, on)`: a full cycle, so the attachment that
/// says live really is, and the copy lands.
#[test]
fn vmm_tells_the_library_of_its_memory_decode_writes() {
    const AREA: u64 = 0x2f0_0000;
    let (off1, off2, off3, off4) = (0x400, 0x2400, 0x4400, 0x6400);
    let vmm = Vmm::new();
    let mut lib = adopt(&vmm);
    let command = vmm.command();
    vmm.write_command(command | MEMORY);
    lib.dev.note_memory_decode(true);
    assert_eq!(lib.dev.known_memory_decode(), Some(true));
    assert_eq!(lib.dev.hub().state(), BufferState::Live);
    let bar = lib.dev.map_bar(2).unwrap();
    let old = pattern(1600, LEN as usize);
    bar_write(&bar, AREA, &old);
    let export = lib.dev.export_bar(2, &[ByteRange::new(AREA, LEN)]).unwrap();
    let att = map_at_bar_gpa(&export, &lib.ioas);
    let events = Events::on(&att);
    let mut want = old;
    let copy_lands = |lib: &mut Adopted, want: &mut Vec<u8>, seed: u64, off: u64, what: &str| {
        let new = pattern(seed, COPY as usize);
        guest_copy(&mut lib.edu, &vmm.ram, &new, BAR_GPA + off, what);
        want[off as usize..(off + COPY) as usize].copy_from_slice(&new);
        assert_bytes(&bar_read(&bar, AREA, LEN as usize), want, AREA, what);
    };
    copy_lands(&mut lib, &mut want, 1601, off1, "live");

    // Off, told: revoked, and the copy is blocked.
    vmm.write_command(command & !MEMORY);
    lib.dev.note_memory_decode(false);
    assert_eq!(lib.dev.known_memory_decode(), Some(false));
    assert_eq!(
        lib.dev.hub().state(),
        BufferState::Revoked(RevokeReason::MemoryDecodeOff)
    );
    assert_eq!(
        events.get(),
        [RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff)]
    );
    assert!(att.is_revoked());
    assert!(matches!(att.ensure_live(), Err(Error::Revoked { .. })));
    let blocked = pattern(1602, COPY as usize);
    guest_copy(
        &mut lib.edu,
        &vmm.ram,
        &blocked,
        BAR_GPA + off2,
        "decode off, told",
    );

    // On, told: restored at the same IOVA; the blocked copy changed nothing
    // (the BAR is read only with decode on), and the next one lands.
    vmm.write_command(command | MEMORY);
    lib.dev.note_memory_decode(true);
    assert_restored(
        &att,
        &events,
        &[
            RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff),
            RevocationEvent::Restored,
        ],
        "decode on, told",
    );
    assert_bytes(
        &bar_read(&bar, AREA, LEN as usize),
        &want,
        AREA,
        "after the blocked copy",
    );
    copy_lands(&mut lib, &mut want, 1603, off3, "decode on, told");

    // On again, told again: no transition, nothing is remapped.
    lib.dev.note_memory_decode(true);
    assert_eq!(att.counts(), (1, 1), "a repeated on costs no remap");

    // Off and on again, told as one change from off to on: the kernel
    // revoked at the off, so the library must map again.
    vmm.write_command(command & !MEMORY);
    vmm.write_command(command | MEMORY);
    lib.dev
        .note_command_change(command & !MEMORY, command | MEMORY);
    assert_eq!(att.counts(), (2, 2));
    assert_restored(
        &att,
        &events,
        &[
            RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff),
            RevocationEvent::Restored,
            RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff),
            RevocationEvent::Restored,
        ],
        "an off-to-on change told at once is a full cycle",
    );
    copy_lands(
        &mut lib,
        &mut want,
        1604,
        off4,
        "after an off-to-on change told at once",
    );
    request_host_check("shm1", AREA, &want);
}
