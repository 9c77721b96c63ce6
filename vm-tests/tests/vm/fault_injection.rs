//! Allocation failures inside the kernel, at every step the library takes
//! into it: for each operation, the Nth fault-injectable call of the calling
//! thread fails (failslab, fail_page_alloc and iommufd's own fail_iommufd,
//! through `/proc/thread-self/fail-nth`: see `dmabuf_p2p_vm_tests::fail_nth`),
//! for N = 1, 2, ... until the operation runs without an injection.
//!
//! After each try: the call returned (a typed [`Error`] or success, never a
//! panic); the process has exactly the fds it had before; no IOVA area is left
//! behind (a fresh map at the same IOVA succeeds); and an attachment's
//! reported state is what the kernel does: an edu copy to its IOVA lands iff
//! the attachment says it is live. A kernel WARNING/BUG during a sweep fails
//! the whole run (the host scans the console); each sweep marks the kernel log
//! first, so the console says which sweep was running.
//!
//! Sampling, to keep the suite within minutes under TCG: every N up to
//! [`DENSE`], then N grows by an eighth per step up to [`LIMIT`]
//! ([`sweep_points`]); the device reset, which takes much longer per try, up
//! to [`RESET_DENSE`]. The copy checks (100 ms of QEMU timer each) run on every
//! try of the attachment sweeps and, for the others, whenever an injected
//! failure was absorbed (the call succeeded anyway).
//!
//! These tests own shm1's BAR2 bytes `AREA..AREA + LEN` (63 MiB in, above
//! every other test's area).

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use dmabuf_p2p::exporter::heap::DmaHeap;
use dmabuf_p2p::exporter::udmabuf::Udmabuf;
use dmabuf_p2p::importer::iommufd::{Ioas, IoasMapping, Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::BufferState;
use dmabuf_p2p::revoke::{Attachment, RestorePolicy};
use dmabuf_p2p::share::{BufferInfo, Incoming, recv, recv_timeout, send_offer};
use dmabuf_p2p::vfio::{BarMapping, VfioPciDevice};
use dmabuf_p2p::{ByteRange, Error};
use dmabuf_p2p_engine::DmaEngine;
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_vm_tests::fail_nth::{FailNth, SweepLog, sweep_points};
use dmabuf_p2p_vm_tests::{
    DMA_TIMEOUT, Kmsg, bar_read, bar_write, edu_address, open_fd_count, pattern, shm_address,
};

/// Every N up to this is tried.
const DENSE: u32 = 32;
/// No N above this is tried.
const LIMIT: u32 = 600;
/// The reset sweep's limits (a reset is slow under TCG).
const RESET_DENSE: u32 = 6;
const RESET_LIMIT: u32 = 40;

/// The tests' area of shm1's BAR2 and the export's length.
const AREA: u64 = 0x3f0_0000;
const LEN: u64 = 0x10000;
/// Where copies land in the export, and how many bytes they move (inside
/// edu's buffer without touching its last byte: QEMU 7.2's edu aborts on a
/// transfer ending at the buffer's end).
const OFF: u64 = 0x400;
const COPY: u64 = 0x800;
/// The fixed IOVA every sweep maps at.
const IOVA: u64 = 0x4000_0000;

/// The engine, the exporter and the bytes copies move.
struct Rig {
    ioas: Ioas,
    edu: Edu,
    src_map: IoasMapping,
    _src: Memfd,
    new: Vec<u8>,
    old: Vec<u8>,
    scratch: Memfd,
    // Declared last so they go last: the BAR mmap before the device.
    bar: BarMapping,
    dev: VfioPciDevice,
    // The device is bound to it: it must outlive the device.
    _iommufd: Iommufd,
}

impl Rig {
    fn new(seed: u64) -> Self {
        let iommufd = Iommufd::open().unwrap();
        let ioas = iommufd.alloc_ioas().unwrap();
        let edu = Edu::open(edu_address().parse().unwrap(), &ioas).unwrap();
        let mut dev = VfioPciDevice::open(shm_address("shm1").parse().unwrap()).unwrap();
        dev.bind(&iommufd).unwrap();
        dev.set_memory_decode(true).unwrap();
        let bar = dev.map_bar(2).unwrap();
        let new = pattern(seed, COPY as usize);
        let old = pattern(seed + 1, COPY as usize);
        let src = Memfd::new("fault-src", 0x1000).unwrap();
        src.write_at(0, &new).unwrap();
        let src_map = ioas
            .map_file(
                &src,
                ByteRange::new(0, 0x1000),
                IovaPlacement::Auto,
                MapPerms::Read,
            )
            .unwrap();
        let scratch = Memfd::new("fault-scratch", LEN).unwrap();
        Self {
            ioas,
            edu,
            src_map,
            _src: src,
            new,
            old,
            scratch,
            bar,
            dev,
            _iommufd: iommufd,
        }
    }

    fn export(&self) -> dmabuf_p2p::exporter::bar::BarExport {
        self.dev
            .export_bar(2, &[ByteRange::new(AREA, LEN)])
            .unwrap()
    }

    /// Whether an edu copy to `IOVA + OFF` changes the BAR. Memory decode is
    /// turned on (uninjected) for the BAR accesses if it is off; `iova_live`
    /// callers that must not restore set their attachment's policy first.
    fn copy_lands(&mut self) -> bool {
        if !self.dev.memory_decode().unwrap() {
            self.dev.set_memory_decode(true).unwrap();
        }
        bar_write(&self.bar, AREA + OFF, &self.old);
        self.edu
            .memcpy(self.src_map.iova(), IOVA + OFF, COPY, DMA_TIMEOUT)
            .unwrap();
        let got = bar_read(&self.bar, AREA + OFF, COPY as usize);
        if got == self.new {
            true
        } else if got == self.old {
            false
        } else {
            panic!(
                "the BAR at {:#x} holds neither the old nor the new bytes",
                AREA + OFF
            )
        }
    }

    /// Panics unless what an attachment says (`live`) is what a copy does.
    fn assert_copy_agrees(&mut self, live: bool, context: &str) {
        let landed = self.copy_lands();
        assert_eq!(
            landed, live,
            "{context}: attachment says live={live}, copy landed={landed}"
        );
    }

    /// After one try of a sweep: nothing left at `IOVA`, no fd leaked.
    fn assert_clean_after_try(&self, what: &str, n: u32, fds: usize) {
        self.assert_iova_free(what);
        assert_eq!(open_fd_count(), fds, "{what}: N={n}: fd count");
    }

    /// Panics unless nothing is mapped at `IOVA`: a fresh map there succeeds.
    fn assert_iova_free(&self, what: &str) {
        let m = self.ioas.map_file(
            &self.scratch,
            ByteRange::new(0, LEN),
            IovaPlacement::Fixed(IOVA),
            MapPerms::Read,
        );
        if let Err(e) = m {
            panic!(
                "{what}: an IOVA area is left behind at {IOVA:#x}: a fresh map there fails: {e}"
            );
        }
    }
}

/// Runs one sweep: for each N of `points`, `setup` (uninjected) makes the
/// state, `op` runs with the Nth fault-injectable call failing, and `check`
/// looks at the result; the state is then dropped and the fd count must be
/// back where it was. Stops at the first N where nothing was injected, which
/// must be a success.
fn sweep<S, T>(
    what: &str,
    points: impl Iterator<Item = u32>,
    fail: &FailNth,
    mut setup: impl FnMut() -> S,
    mut op: impl FnMut(&mut S) -> Result<T, Error>,
    mut check: impl FnMut(&mut S, &Result<T, Error>, bool),
) -> SweepLog {
    Kmsg::mark(&format!("fault-injection sweep: {what}"));
    let mut log = SweepLog::default();
    for n in points {
        let fds = open_fd_count();
        let mut state = setup();
        let (result, fired) = fail.run(n, || op(&mut state));
        log.tried.push(n);
        if !fired && let Err(e) = &result {
            panic!("{what}: fails without an injected failure (N={n}): {e}");
        }
        check(&mut state, &result, fired);
        match (&result, fired) {
            (Err(e), _) => {
                assert!(
                    e.raw_os_error().is_some(),
                    "{what}: N={n}: an injected kernel failure must carry the kernel's errno: {e}"
                );
                log.failed.push((n, e.raw_os_error()));
            }
            (Ok(_), true) => log.absorbed.push(n),
            (Ok(_), false) => {}
        }
        drop(result);
        drop(state);
        let now = open_fd_count();
        assert_eq!(now, fds, "{what}: N={n}: {fds} fds before, {now} after");
        if !fired {
            log.clean_at = Some(n);
            break;
        }
    }
    finish(what, &log);
    log
}

/// Prints a sweep's summary (also into the kernel log, so the console shows
/// it whatever libtest captures) and checks that it ended uninjected.
fn finish(what: &str, log: &SweepLog) {
    let line = log.summary(what);
    println!("{line}");
    Kmsg::mark(&line);
    assert!(
        log.clean_at.is_some(),
        "{what}: still injecting at N={}: raise LIMIT",
        log.tried.last().copied().unwrap_or(0)
    );
    // Clean at N=1: the call makes no fault-injectable call in this thread
    // (FailNth::open proved that injection works), which the summary says.
}

fn points() -> impl Iterator<Item = u32> {
    sweep_points(DENSE, LIMIT)
}

#[test]
fn vfio_bar_export_survives_allocation_failures() {
    let mut rig = Rig::new(1);
    let fail = FailNth::open().unwrap();
    let dev = &rig.dev;
    let mut absorbed_exports = Vec::new();
    sweep(
        "VFIO BAR export",
        points(),
        &fail,
        || (),
        |()| dev.export_bar(2, &[ByteRange::new(AREA, LEN)]),
        |(), r, fired| {
            if let (Ok(export), true) = (r, fired) {
                // Keep it alive for the copy check below.
                absorbed_exports.push(export.dmabuf().describe());
            }
        },
    );
    // The device still exports, and the export still works for DMA.
    let export = rig.export();
    let _m = rig
        .ioas
        .map_dmabuf(
            export.dmabuf(),
            IovaPlacement::Fixed(IOVA),
            MapPerms::ReadWrite,
        )
        .unwrap();
    assert!(
        rig.copy_lands(),
        "a copy through a fresh export after the sweep did not land"
    );
    println!("absorbed exports: {absorbed_exports:?}");
}

#[test]
fn ioas_map_of_a_bar_dmabuf_survives_allocation_failures() {
    let mut rig = Rig::new(2);
    let fail = FailNth::open().unwrap();
    let export = rig.export();
    let ioas = &rig.ioas;
    let scratch = &rig.scratch;
    let log = sweep(
        "IOMMU_IOAS_MAP_FILE",
        points(),
        &fail,
        || (),
        |()| {
            ioas.map_dmabuf(
                export.dmabuf(),
                IovaPlacement::Fixed(IOVA),
                MapPerms::ReadWrite,
            )
        },
        |(), r, _| {
            if r.is_err() {
                rig_free(ioas, scratch, "IOAS map");
            }
        },
    );
    // A mapping made while an injected failure was absorbed must work: make
    // one at the first absorbed N again and copy through it.
    if let Some(&n) = log.absorbed.first() {
        let (m, _) = fail.run(n, || {
            rig.ioas.map_dmabuf(
                export.dmabuf(),
                IovaPlacement::Fixed(IOVA),
                MapPerms::ReadWrite,
            )
        });
        let _m = m.unwrap();
        assert!(
            rig.copy_lands(),
            "N={n}: the map succeeded but a copy through it did not land"
        );
    }
    rig.assert_iova_free("after the IOAS map sweep");
}

/// [`Rig::assert_iova_free`] without the rig (for closures that borrow parts).
fn rig_free(ioas: &Ioas, scratch: &Memfd, what: &str) {
    if let Err(e) = ioas.map_file(
        scratch,
        ByteRange::new(0, LEN),
        IovaPlacement::Fixed(IOVA),
        MapPerms::Read,
    ) {
        panic!("{what}: an IOVA area is left behind at {IOVA:#x}: a fresh map there fails: {e}");
    }
}

#[test]
fn ioas_unmap_survives_allocation_failures() {
    let rig = Rig::new(3);
    let fail = FailNth::open().unwrap();
    let export = rig.export();
    sweep(
        "IOMMU_IOAS_UNMAP",
        points(),
        &fail,
        || {
            rig.ioas
                .map_dmabuf(
                    export.dmabuf(),
                    IovaPlacement::Fixed(IOVA),
                    MapPerms::ReadWrite,
                )
                .unwrap()
        },
        IoasMapping::unmap,
        |m, r, _| match r {
            Ok(_) => {
                assert!(!m.is_mapped());
                rig.assert_iova_free("unmap reported success");
            }
            Err(_) => assert!(
                m.is_mapped(),
                "a failed unmap must leave the handle owning the area"
            ),
        },
    );
    rig.assert_iova_free("after the unmap sweep (failed unmaps retried on drop)");
}

#[test]
fn attachment_map_survives_allocation_failures() {
    let mut rig = Rig::new(4);
    let fail = FailNth::open().unwrap();
    let export = rig.export();
    let what = "Attachment::map";
    Kmsg::mark(&format!("fault-injection sweep: {what}"));
    let mut log = SweepLog::default();
    for n in points() {
        let fds = open_fd_count();
        let (r, fired) = fail.run(n, || {
            Attachment::map(
                &export,
                &rig.ioas,
                IovaPlacement::Fixed(IOVA),
                MapPerms::ReadWrite,
                RestorePolicy::Automatic,
            )
        });
        log.tried.push(n);
        match &r {
            Err(e) => {
                assert!(fired, "{what}: fails uninjected: {e}");
                assert!(e.raw_os_error().is_some(), "{what}: N={n}: no errno in {e}");
                log.failed.push((n, e.raw_os_error()));
                rig.assert_iova_free("Attachment::map failed");
            }
            Ok(att) => {
                if fired {
                    log.absorbed.push(n);
                }
                let live = !att.is_revoked();
                rig.assert_copy_agrees(live, &format!("{what}: N={n}"));
            }
        }
        drop(r);
        rig.assert_clean_after_try(what, n, fds);
        if !fired {
            log.clean_at = Some(n);
            break;
        }
    }
    finish(what, &log);
}

/// Memory decode off (the revoke) and on (the restore) with injected
/// failures; an attachment's state is checked against a copy each time.
#[test]
fn revoke_and_restore_survive_allocation_failures() {
    let mut rig = Rig::new(5);
    let fail = FailNth::open().unwrap();
    let export = rig.export();
    for (what, revoke) in [
        ("revoke (memory decode off)", true),
        ("restore (memory decode on)", false),
    ] {
        Kmsg::mark(&format!("fault-injection sweep: {what}"));
        let mut log = SweepLog::default();
        for n in points() {
            let fds = open_fd_count();
            let att = Attachment::map(
                &export,
                &rig.ioas,
                IovaPlacement::Fixed(IOVA),
                MapPerms::ReadWrite,
                RestorePolicy::Automatic,
            )
            .unwrap();
            if !revoke {
                rig.dev.set_memory_decode(false).unwrap();
                assert!(att.is_revoked());
            }
            let (r, fired) = fail.run(n, || rig.dev.set_memory_decode(!revoke));
            log.tried.push(n);
            assert!(fired || r.is_ok(), "{what}: fails uninjected: {r:?}");
            match (&r, fired) {
                (Err(e), _) => {
                    assert!(e.raw_os_error().is_some(), "{what}: N={n}: no errno in {e}");
                    log.failed.push((n, e.raw_os_error()));
                }
                (Ok(()), true) => log.absorbed.push(n),
                _ => {}
            }
            // What the library says, then what the kernel does. The copy
            // check turns decode on if it is off: stop that from restoring.
            let live = !att.is_revoked();
            att.set_policy(RestorePolicy::LeaveRevoked);
            if revoke && live {
                // Decode is still on (the write failed): the copy runs as is.
                assert!(
                    rig.dev.memory_decode().unwrap(),
                    "{what}: N={n}: live, decode off"
                );
            }
            let landed = if revoke && !live {
                // Copy while decode is off, read after it is back on.
                copy_while_revoked(&mut rig)
            } else {
                rig.copy_lands()
            };
            assert_eq!(
                landed, live,
                "{what}: N={n} (injected: {fired}, result {r:?}): attachment says live={live}, copy landed={landed}"
            );
            drop(att);
            rig.dev.set_memory_decode(true).unwrap();
            rig.assert_clean_after_try(what, n, fds);
            if !fired {
                log.clean_at = Some(n);
                break;
            }
        }
        finish(what, &log);
    }
}

/// An edu copy to `IOVA` while memory decode is off (the BAR must not be
/// touched then); decode is turned on afterwards to look. Returns whether it
/// landed.
fn copy_while_revoked(rig: &mut Rig) -> bool {
    // The old bytes go in first, with decode on for a moment: the caller's
    // attachment is LeaveRevoked, so that does not restore it.
    rig.dev.set_memory_decode(true).unwrap();
    bar_write(&rig.bar, AREA + OFF, &rig.old);
    rig.dev.set_memory_decode(false).unwrap();
    rig.edu
        .memcpy(rig.src_map.iova(), IOVA + OFF, COPY, DMA_TIMEOUT)
        .unwrap();
    rig.dev.set_memory_decode(true).unwrap();
    let got = bar_read(&rig.bar, AREA + OFF, COPY as usize);
    assert!(
        got == rig.new || got == rig.old,
        "the BAR holds neither old nor new bytes"
    );
    got == rig.new
}

/// `Attachment::restore` (LeaveRevoked policy: the library's own remap)
/// with injected failures.
#[test]
fn attachment_restore_survives_allocation_failures() {
    let mut rig = Rig::new(6);
    let fail = FailNth::open().unwrap();
    let export = rig.export();
    let what = "Attachment::restore";
    Kmsg::mark(&format!("fault-injection sweep: {what}"));
    let mut log = SweepLog::default();
    for n in points() {
        let fds = open_fd_count();
        let att = Attachment::map(
            &export,
            &rig.ioas,
            IovaPlacement::Fixed(IOVA),
            MapPerms::ReadWrite,
            RestorePolicy::LeaveRevoked,
        )
        .unwrap();
        rig.dev.set_memory_decode(false).unwrap();
        rig.dev.set_memory_decode(true).unwrap();
        assert!(att.is_revoked());
        let (r, fired) = fail.run(n, || att.restore());
        log.tried.push(n);
        assert!(fired || r.is_ok(), "{what}: fails uninjected: {r:?}");
        match (&r, fired) {
            (Err(e), _) => {
                assert!(e.raw_os_error().is_some(), "{what}: N={n}: no errno in {e}");
                log.failed.push((n, e.raw_os_error()));
            }
            (Ok(()), true) => log.absorbed.push(n),
            _ => {}
        }
        assert_eq!(
            r.is_ok(),
            !att.is_revoked(),
            "{what}: N={n}: result {r:?} vs state"
        );
        let live = !att.is_revoked();
        rig.assert_copy_agrees(live, &format!("{what}: N={n}"));
        if !live {
            // A failed restore is not final: the next one (uninjected) works.
            att.restore().unwrap();
            assert!(
                rig.copy_lands(),
                "{what}: N={n}: retried restore, copy did not land"
            );
        }
        drop(att);
        rig.assert_clean_after_try(what, n, fds);
        if !fired {
            log.clean_at = Some(n);
            break;
        }
    }
    finish(what, &log);
}

/// A device reset (revoke + restore inside the kernel) with injected failures.
#[test]
fn device_reset_survives_allocation_failures() {
    let mut rig = Rig::new(7);
    assert!(
        rig.dev.supports_reset().unwrap(),
        "shm1 has no reset method"
    );
    let fail = FailNth::open().unwrap();
    let export = rig.export();
    let what = "VfioPciDevice::reset";
    Kmsg::mark(&format!("fault-injection sweep: {what}"));
    let mut log = SweepLog::default();
    for n in sweep_points(RESET_DENSE, RESET_LIMIT) {
        let fds = open_fd_count();
        let att = Attachment::map(
            &export,
            &rig.ioas,
            IovaPlacement::Fixed(IOVA),
            MapPerms::ReadWrite,
            RestorePolicy::Automatic,
        )
        .unwrap();
        let (r, fired) = fail.run(n, || rig.dev.reset());
        log.tried.push(n);
        assert!(fired || r.is_ok(), "{what}: fails uninjected: {r:?}");
        match (&r, fired) {
            (Err(e), _) => {
                assert!(e.raw_os_error().is_some(), "{what}: N={n}: no errno in {e}");
                log.failed.push((n, e.raw_os_error()));
            }
            (Ok(()), true) => log.absorbed.push(n),
            _ => {}
        }
        // A reset clears the command register: decode back on (Automatic
        // restores the attachment), then compare state and copy.
        rig.dev.set_memory_decode(true).unwrap();
        let live = !att.is_revoked();
        rig.assert_copy_agrees(live, &format!("{what}: N={n} (result {r:?})"));
        drop(att);
        rig.assert_clean_after_try(what, n, fds);
        if !fired {
            log.clean_at = Some(n);
            break;
        }
    }
    finish(what, &log);
}

#[test]
fn udmabuf_create_survives_allocation_failures() {
    let fail = FailNth::open().unwrap();
    let udmabuf = Udmabuf::open().unwrap();
    let memfd = Memfd::new("fault-udmabuf", 0x10000).unwrap();
    memfd.write_at(0, &pattern(8, 0x10000)).unwrap();
    sweep(
        "udmabuf create",
        points(),
        &fail,
        || (),
        |()| udmabuf.create(memfd.as_fd(), 0, 0x10000),
        |(), r, _| {
            if let Ok(buf) = r {
                assert_eq!(buf.size().unwrap(), 0x10000);
            }
        },
    );
}

#[test]
fn dma_heap_alloc_survives_allocation_failures() {
    let fail = FailNth::open().unwrap();
    let heap = DmaHeap::open("system").unwrap();
    sweep(
        "dma-heap alloc",
        points(),
        &fail,
        || (),
        |()| heap.alloc(0x10000),
        |(), r, _| {
            if let Ok(buf) = r {
                assert_eq!(buf.size().unwrap(), 0x10000);
            }
        },
    );
}

#[test]
fn share_send_and_receive_survive_allocation_failures() {
    let rig = Rig::new(9);
    let fail = FailNth::open().unwrap();
    let export = rig.export();
    let info = BufferInfo::from_export(&export);
    sweep(
        "share send (SCM_RIGHTS)",
        points(),
        &fail,
        || UnixStream::pair().unwrap(),
        |(a, _)| send_offer(a, export.dmabuf(), &info, BufferState::Live, None),
        |(_, b), r, _| match r {
            Ok(()) => match recv_timeout(b, Duration::from_secs(5)) {
                Ok(Some(Incoming::Offer(o))) => assert_eq!(o.buf.size().unwrap(), LEN),
                other => panic!("sent, but the receiver got {other:?}"),
            },
            Err(_) => {
                // Nothing may arrive: a short wait must time out.
                let later = recv_timeout(b, Duration::from_millis(200));
                assert!(
                    matches!(later, Err(Error::Timeout { .. })),
                    "the send failed, but the receiver got {later:?}"
                );
            }
        },
    );
    sweep(
        "share receive (SCM_RIGHTS)",
        points(),
        &fail,
        || {
            let (a, b) = UnixStream::pair().unwrap();
            send_offer(&a, export.dmabuf(), &info, BufferState::Live, None).unwrap();
            (a, b)
        },
        |(_, b)| recv(b),
        |_, r, _| {
            if let Ok(got) = r {
                match got {
                    Some(Incoming::Offer(o)) => assert_eq!(o.buf.size().unwrap(), LEN),
                    other => panic!("received {other:?}, not the offer"),
                }
            }
        },
    );
    drop(rig);
}
