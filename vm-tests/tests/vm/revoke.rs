//! Revocation against the real kernel: an ivshmem BAR exported as a dma-buf,
//! mapped in an IOAS through an [`Attachment`], revoked by memory decode off,
//! by a config write behind the library's back, by a reset and by closing the
//! exporter. In every case a raw engine copy to the revoked IOVA (what a buggy
//! or malicious driver would do, bypassing [`Attachment::ensure_live`]) must
//! not change a single byte of the BAR, and each test asserts exactly that.
//!
//! The BAR must not be read while memory decode is off (vfio zaps the mmap and
//! the access would `SIGBUS`): the tests snapshot it before and compare after
//! decode is back on. Each test owns a 64 KiB area of shm0's BAR2 (see the
//! table in `p2p.rs`).

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmabuf_p2p::importer::iommufd::{Ioas, IoasMapping, Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{
    Attachment, BufferState, RestorePolicy, RevocationEvent, RevokeReason, probe_revoked,
};
use dmabuf_p2p::vfio::{BarMapping, CONFIG_REGION_INDEX, VfioPciDevice};
use dmabuf_p2p::{ByteRange, Error};
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_engine::{Completion, DmaEngine};
use dmabuf_p2p_vm_tests::{
    DMA_TIMEOUT, Kmsg, assert_bytes, bar_read, bar_write, check_write_faults, edu_address, pattern,
    request_host_check, shm_address,
};

/// The size of each test's area and of its export.
const LEN: u64 = 0x10000;
/// Where in the export the copies go, and how many bytes they move.
const OFF: u64 = 0x400;
const COPY: u64 = 0x800;

/// The engine, the exporter and what the tests share.
struct Rig {
    iommufd: Iommufd,
    ioas: Ioas,
    edu: Edu,
    /// A memfd holding `new` (the bytes copies move), mapped read-only.
    src_map: IoasMapping,
    src: Memfd,
    new: Vec<u8>,
    /// The BAR's bytes in the test's area before anything was copied.
    old: Vec<u8>,
    area: u64,
    // Declared last so they go last: the BAR mmap before the device.
    bar: Option<BarMapping>,
    dev: Option<VfioPciDevice>,
}

impl Rig {
    /// Opens edu and shm0, fills shm0's BAR2 at `area..area+LEN` with a
    /// pattern and puts the bytes to copy in a memfd.
    fn new(area: u64, seed: u8) -> Self {
        let iommufd = Iommufd::open().unwrap();
        let ioas = iommufd.alloc_ioas().unwrap();
        let edu = Edu::open(edu_address().parse().unwrap(), &ioas).unwrap();
        assert_eq!(
            edu.completion(),
            Completion::Interrupt,
            "MSI set-up failed: {:?}",
            edu.polling_reason()
        );
        let mut dev = VfioPciDevice::open(shm_address("shm0").parse().unwrap()).unwrap();
        dev.bind(&iommufd).unwrap();
        dev.set_memory_decode(true).unwrap();
        let bar = dev.map_bar(2).unwrap();
        let old = pattern(seed.into(), LEN as usize);
        bar_write(&bar, area, &old);
        let new = pattern(seed.wrapping_add(100).into(), COPY as usize);
        let src = Memfd::new("revoke-src", 0x1000).unwrap();
        src.write_at(0, &new).unwrap();
        let src_map = ioas
            .map_file(
                &src,
                ByteRange::new(0, 0x1000),
                IovaPlacement::Auto,
                MapPerms::Read,
            )
            .unwrap();
        Self {
            iommufd,
            ioas,
            edu,
            src_map,
            src,
            new,
            old,
            area,
            bar: Some(bar),
            dev: Some(dev),
        }
    }

    fn dev(&self) -> &VfioPciDevice {
        self.dev.as_ref().unwrap()
    }

    /// Exports `area + at .. + len` and maps it with `policy`, recording its events.
    fn attach(&self, at: u64, len: u64, policy: RestorePolicy) -> (Attachment, Events) {
        let export = self
            .dev()
            .export_bar(2, &[ByteRange::new(self.area + at, len)])
            .unwrap();
        let att = Attachment::map(
            &export,
            &self.ioas,
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
            policy,
        )
        .unwrap();
        let events = Events::default();
        let log = Arc::clone(&events.0);
        att.on_event(move |_, ev| log.lock().unwrap().push(ev.clone()));
        (att, events)
    }

    /// The BAR's bytes in the test's area now (memory decode must be on).
    fn area_now(&self) -> Vec<u8> {
        bar_read(self.bar.as_ref().unwrap(), self.area, LEN as usize)
    }

    /// An engine copy of the new bytes to `iova`: two transfers.
    fn copy(&mut self, iova: u64) {
        self.edu
            .memcpy(self.src_map.iova(), iova, COPY, DMA_TIMEOUT)
            .unwrap();
    }

    /// A raw engine copy of the new bytes to `iova`, which is revoked, as a
    /// buggy or malicious driver would make it: nothing checks the IOVA
    /// first. Marks it in the kernel log, and reports (and checks) the IOMMU
    /// faults the kernel logged for it: possibly none, as the kernel
    /// rate-limits them and QEMU drops a fault while one is pending. The
    /// caller checks the BAR.
    fn copy_into_revoked(&mut self, iova: u64, what: &str) {
        let mut kmsg = Kmsg::open_at_end().unwrap();
        Kmsg::mark(&format!(
            "{what}: edu copy of {COPY:#x} bytes to IOVA {iova:#x}"
        ));
        self.copy(iova);
        let faults = kmsg.iommu_faults(Duration::from_millis(200));
        let records = check_write_faults(&faults, &edu_address());
        if faults.is_empty() {
            println!("{what}: no IOMMU fault message in /dev/kmsg");
        } else {
            println!("{what}: the kernel logged {records} IOMMU fault record(s):");
            for f in &faults {
                println!("    {f}");
            }
        }
    }

    /// Writes the new bytes (still in edu's buffer after a copy) to
    /// `iova` again: one transfer.
    fn store_again(&mut self, iova: u64) {
        self.edu.store(0, iova, COPY, DMA_TIMEOUT).unwrap();
    }

    /// `base` with the new bytes at `at` (an offset in the area).
    fn with_new_at(&self, base: &[u8], at: u64) -> Vec<u8> {
        let mut v = base.to_vec();
        v[at as usize..(at + COPY) as usize].copy_from_slice(&self.new);
        v
    }

    /// Another export of the first page at `at` in the area, for
    /// `probe_revoked` to ask about (an attachment keeps its dma-buf to
    /// itself); it is revoked and restored with the attachment's.
    fn probe_buf(&self, at: u64) -> dmabuf_p2p::DmaBuf {
        self.dev()
            .export_bar(2, &[ByteRange::new(self.area + at, 0x1000)])
            .unwrap()
            .into_dmabuf()
    }
}

/// The events an attachment's callback saw.
#[derive(Default)]
struct Events(Arc<Mutex<Vec<RevocationEvent>>>);

impl Events {
    fn get(&self) -> Vec<RevocationEvent> {
        self.0.lock().unwrap().clone()
    }
}

/// Memory decode off revokes an Automatic attachment (callback, `ensure_live`,
/// `probe_revoked`) and a raw engine copy to its IOVA faults in the IOMMU
/// without changing a BAR byte; decode on restores it at the same IOVA and
/// the next copy lands.
#[test]
fn memory_decode_off_revokes_and_on_restores() {
    let mut rig = Rig::new(0x10000, 70);
    let (att, events) = rig.attach(0, LEN, RestorePolicy::Automatic);
    let iova = att.iova();
    let buf = rig.probe_buf(0);
    assert!(
        !probe_revoked(&rig.iommufd, &buf).unwrap(),
        "a live buffer probes live"
    );
    att.ensure_live().unwrap();

    rig.dev().set_memory_decode(false).unwrap();
    assert_eq!(
        events.get(),
        [RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff)]
    );
    assert!(att.is_revoked());
    assert_eq!(att.revoked_reason(), Some(RevokeReason::MemoryDecodeOff));
    assert!(
        matches!(att.ensure_live(), Err(Error::Revoked { .. })),
        "{:?}",
        att.ensure_live()
    );
    assert_eq!(
        rig.dev().hub().state(),
        BufferState::Revoked(RevokeReason::MemoryDecodeOff)
    );
    assert!(
        probe_revoked(&rig.iommufd, &buf).unwrap(),
        "the kernel says revoked while decode is off"
    );

    rig.copy_into_revoked(iova + OFF, "copy into the revoked BAR");

    rig.dev().set_memory_decode(true).unwrap();
    assert_eq!(
        events.get(),
        [
            RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff),
            RevocationEvent::Restored
        ]
    );
    assert!(!att.is_revoked());
    assert_eq!(att.iova(), iova, "restored at the same IOVA");
    att.ensure_live().unwrap();
    assert!(
        !probe_revoked(&rig.iommufd, &buf).unwrap(),
        "the kernel says live after decode on"
    );
    assert_eq!(att.counts(), (1, 1));
    assert_bytes(
        &rig.area_now(),
        &rig.old,
        rig.area,
        "BAR after a copy into the revoked buffer",
    );

    rig.store_again(iova + OFF);
    let want = rig.with_new_at(&rig.old, OFF);
    assert_bytes(
        &rig.area_now(),
        &want,
        rig.area,
        "BAR after a copy into the restored buffer",
    );
    request_host_check("shm0", rig.area, &want);
}

/// With `RestorePolicy::LeaveRevoked` an attachment stays revoked after
/// memory decode is back on: `restore()` fails while decode is off, a raw
/// copy to its IOVA with the BAR live again changes no byte, and `restore()`
/// maps it at the same IOVA, where the next copy lands.
#[test]
fn leave_revoked_stays_revoked_until_restore() {
    let mut rig = Rig::new(0x20000, 80);
    let (att, events) = rig.attach(0, LEN, RestorePolicy::LeaveRevoked);
    let iova = att.iova();

    rig.dev().set_memory_decode(false).unwrap();
    assert!(att.is_revoked());
    assert!(
        matches!(att.restore(), Err(Error::Revoked { .. })),
        "restore while the exporter revokes"
    );

    rig.dev().set_memory_decode(true).unwrap();
    assert_eq!(rig.dev().hub().state(), BufferState::Live);
    assert_eq!(
        events.get(),
        [RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff)],
        "no automatic restore"
    );
    assert_eq!(att.revoked_reason(), Some(RevokeReason::MemoryDecodeOff));
    assert!(matches!(att.ensure_live(), Err(Error::Revoked { .. })));

    // The BAR is live, the attachment is not: the copy must not land.
    rig.copy_into_revoked(iova + OFF, "copy into the left-revoked attachment");
    assert_bytes(
        &rig.area_now(),
        &rig.old,
        rig.area,
        "BAR after a copy into the left-revoked attachment",
    );

    att.restore().unwrap();
    assert_eq!(
        events.get(),
        [
            RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff),
            RevocationEvent::Restored
        ]
    );
    assert_eq!(att.iova(), iova, "restored at the same IOVA");
    att.ensure_live().unwrap();
    rig.store_again(iova + OFF);
    let want = rig.with_new_at(&rig.old, OFF);
    assert_bytes(
        &rig.area_now(),
        &want,
        rig.area,
        "BAR after a copy into the restored attachment",
    );
    request_host_check("shm0", rig.area, &want);
}

/// A memory-decode-off written to config space behind the library's back (a
/// raw `pwrite` on a duplicate of the device fd) protects the BAR at once (a
/// raw copy changes no byte) and is found by `probe_revoked` and
/// `sync_with_kernel` (`Revoked(External)`); after an external decode-on,
/// `sync_with_kernel` restores the mapping at the same IOVA and the next copy lands.
#[test]
fn external_revoke_found_by_sync_with_kernel() {
    let mut rig = Rig::new(0x30000, 90);
    let (att, events) = rig.attach(0, LEN, RestorePolicy::Automatic);
    let iova = att.iova();
    let buf = rig.probe_buf(0);

    let config = rig.dev().region_info(CONFIG_REGION_INDEX).unwrap().offset;
    let raw = File::from(rig.dev().as_fd().try_clone_to_owned().unwrap());
    let command = rig.dev().command().unwrap();
    assert_ne!(command & 0x2, 0, "memory decode on");
    raw.write_all_at(&(command & !0x2).to_le_bytes(), config + 4)
        .unwrap();

    // The library did not see it ...
    assert!(!att.is_revoked());
    assert_eq!(rig.dev().hub().state(), BufferState::Live);
    assert!(events.get().is_empty());
    // ... but the kernel tore the IOMMU entries down already.
    rig.copy_into_revoked(
        iova + OFF,
        "copy after the external revoke, before the library noticed",
    );
    assert!(probe_revoked(&rig.iommufd, &buf).unwrap());
    assert!(
        att.sync_with_kernel(&rig.iommufd).unwrap(),
        "sync_with_kernel finds the revocation"
    );
    assert_eq!(att.revoked_reason(), Some(RevokeReason::External));
    assert_eq!(
        events.get(),
        [RevocationEvent::Revoked(RevokeReason::External)]
    );
    assert!(matches!(att.ensure_live(), Err(Error::Revoked { .. })));

    raw.write_all_at(&command.to_le_bytes(), config + 4)
        .unwrap();
    assert!(
        att.is_revoked(),
        "the library did not see the decode-on either"
    );
    assert!(!probe_revoked(&rig.iommufd, &buf).unwrap());
    assert!(
        !att.sync_with_kernel(&rig.iommufd).unwrap(),
        "sync_with_kernel finds the buffer live"
    );
    assert!(!att.is_revoked());
    assert_eq!(
        events.get(),
        [
            RevocationEvent::Revoked(RevokeReason::External),
            RevocationEvent::Restored
        ]
    );
    assert_eq!(att.iova(), iova, "restored at the same IOVA");
    assert_eq!(rig.dev().hub().state(), BufferState::Live);
    assert_bytes(
        &rig.area_now(),
        &rig.old,
        rig.area,
        "BAR after a copy into the externally revoked buffer",
    );

    rig.store_again(iova + OFF);
    let want = rig.with_new_at(&rig.old, OFF);
    assert_bytes(
        &rig.area_now(),
        &want,
        rig.area,
        "BAR after a copy into the restored buffer",
    );
    request_host_check("shm0", rig.area, &want);
}

/// A device reset (if the device has one; else `reset()` is refused with
/// `Error::Unsupported` and nothing is revoked) revokes both attachments: the
/// Automatic one comes back at the same IOVA and a copy lands; the
/// LeaveRevoked one stays revoked, a raw copy to it changes no byte, and
/// after `restore()` a copy lands.
#[test]
fn reset_revokes_and_restores() {
    let mut rig = Rig::new(0x40000, 110);
    let half = LEN / 2;
    let (auto, auto_events) = rig.attach(0, half, RestorePolicy::Automatic);
    let (left, left_events) = rig.attach(half, half, RestorePolicy::LeaveRevoked);
    let (auto_iova, left_iova) = (auto.iova(), left.iova());

    let supports = rig.dev().supports_reset().unwrap();
    Kmsg::mark(&format!("shm0 supports VFIO_DEVICE_RESET: {supports}"));
    if !supports {
        assert!(matches!(rig.dev().reset(), Err(Error::Unsupported { .. })));
        assert_eq!(rig.dev().hub().revocations(), 0);
        assert!(auto_events.get().is_empty() && left_events.get().is_empty());
        assert!(!auto.is_revoked() && !left.is_revoked());
        return;
    }
    rig.dev().reset().unwrap();
    assert!(
        rig.dev().memory_decode().unwrap(),
        "memory decode is on after the reset"
    );
    assert_eq!(rig.dev().hub().state(), BufferState::Live);
    assert_eq!(
        auto_events.get(),
        [
            RevocationEvent::Revoked(RevokeReason::Reset),
            RevocationEvent::Restored
        ]
    );
    assert!(!auto.is_revoked());
    assert_eq!(auto.iova(), auto_iova, "restored at the same IOVA");
    assert_eq!(
        left_events.get(),
        [RevocationEvent::Revoked(RevokeReason::Reset)]
    );
    assert_eq!(left.revoked_reason(), Some(RevokeReason::Reset));

    rig.copy_into_revoked(
        left_iova + OFF,
        "copy into the attachment left revoked by the reset",
    );
    assert_bytes(
        &rig.area_now(),
        &rig.old,
        rig.area,
        "BAR after a copy into the revoked attachment",
    );

    rig.store_again(auto_iova + OFF);
    left.restore().unwrap();
    assert_eq!(left.iova(), left_iova);
    assert_eq!(
        left_events.get(),
        [
            RevocationEvent::Revoked(RevokeReason::Reset),
            RevocationEvent::Restored
        ]
    );
    rig.store_again(left_iova + OFF);
    let want = rig.with_new_at(&rig.with_new_at(&rig.old, OFF), half + OFF);
    assert_bytes(
        &rig.area_now(),
        &want,
        rig.area,
        "BAR after copies into both restored attachments",
    );
    request_host_check("shm0", rig.area, &want);
}

/// Closing the exporting device while its buffer is mapped revokes for good:
/// the attachment reports `Revoked(DeviceClosed)`, a raw copy to its IOVA
/// changes no byte (checked in the backing file by the host, and in the guest
/// after reopening), `probe_revoked` says revoked, and `restore()` and a new
/// map fail with `Error::Revoked`.
#[test]
fn closing_the_exporter_revokes_for_good() {
    let mut rig = Rig::new(0x50000, 120);
    let (att, events) = rig.attach(0, LEN, RestorePolicy::Automatic);
    let export = rig
        .dev()
        .export_bar(2, &[ByteRange::new(rig.area, LEN)])
        .unwrap();
    let iova = att.iova();
    let hub = Arc::clone(rig.dev().hub());

    // The IOVA works while the exporter is open.
    rig.copy(iova + OFF);
    let before = rig.with_new_at(&rig.old, OFF);
    assert_bytes(
        &rig.area_now(),
        &before,
        rig.area,
        "BAR after a copy while open",
    );

    // Close it: the BAR mmap holds the device file too, so it goes first.
    drop(rig.bar.take());
    drop(rig.dev.take());
    assert_eq!(
        events.get(),
        [RevocationEvent::Revoked(RevokeReason::DeviceClosed)]
    );
    assert_eq!(att.revoked_reason(), Some(RevokeReason::DeviceClosed));
    assert_eq!(hub.state(), BufferState::Gone(RevokeReason::DeviceClosed));
    assert!(
        probe_revoked(&rig.iommufd, export.dmabuf()).unwrap(),
        "the kernel says revoked after close"
    );

    // Other bytes, so that landing would show.
    rig.new = pattern(121, COPY as usize);
    rig.src.write_at(0, &rig.new).unwrap();
    rig.copy_into_revoked(iova + OFF, "copy into the closed exporter's buffer");

    assert!(
        matches!(att.restore(), Err(Error::Revoked { .. })),
        "no restore after close"
    );
    let again = Attachment::map(
        &export,
        &rig.ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    );
    assert!(
        matches!(again, Err(Error::Revoked { .. })),
        "no new map after close: {again:?}"
    );
    assert!(att.is_revoked());
    request_host_check("shm0", rig.area, &before);

    // Reopen the device (leaving it as the other tests expect it) and look.
    let mut dev = VfioPciDevice::open(shm_address("shm0").parse().unwrap()).unwrap();
    dev.bind(&rig.iommufd).unwrap();
    dev.set_memory_decode(true).unwrap();
    let bar = dev.map_bar(2).unwrap();
    assert_bytes(
        &bar_read(&bar, rig.area, LEN as usize),
        &before,
        rig.area,
        "BAR (reopened) after a copy into the closed exporter's buffer",
    );
}
