//! Concurrency: ten threads export BAR ranges, map and unmap attachments,
//! revoke and restore (memory decode off and on, resets) and inspect
//! attachments, all at once, sharing one iommufd, one IOAS, three exporting
//! devices, their exports and the attachments. The run is bounded (a fixed
//! number of operations per thread) and watched: a watchdog fails the run if
//! it has not finished in time (a deadlock).
//!
//! Afterwards the invariants must hold: every device is left with memory
//! decode on and its hub live; each attachment's state matches its hub's
//! (an automatic attachment is live, a manual one is live after `restore`);
//! a live attachment's mapping really is live (an engine copy to its IOVA
//! lands in the BAR) and a revoked one's is not (the copy changes nothing);
//! the hubs count exactly the attachments that exist; fdinfo `count` of each
//! remaining buffer is what its attachments explain; and once everything is
//! dropped the fd count is back to its baseline and the IOAS is destroyed.

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use dmabuf_p2p::exporter::bar::BarExport;
use dmabuf_p2p::importer::iommufd::{Ioas, Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{Attachment, BufferState, RestorePolicy};
use dmabuf_p2p::vfio::VfioPciDevice;
use dmabuf_p2p::{ByteRange, Error};
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_engine::{Completion, DmaEngine};
use dmabuf_p2p_vm_tests::{EDU_ID, directive, open_fd_count, pci_devices};

use crate::load::{kmsg, pattern, small_shms};

/// Operations per worker thread.
const OPS: u64 = 120;
/// The run must be over by then, or the watchdog fails it.
const WATCHDOG: Duration = Duration::from_secs(240);
/// Exporting devices (of the 64 KiB ivshmem devices).
const DEVICES: usize = 3;
/// At most this many exports and attachments exist at once.
const MAX_EXPORTS: usize = 12;
const MAX_ATTACHMENTS: usize = 24;
const PAGE: u64 = 0x1000;
/// Bytes an engine copy moves in the final checks.
const COPY: u64 = 0x100;
const DMA_TIMEOUT: Duration = Duration::from_secs(10);

/// A small xorshift generator, one per thread.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// An export, with the device it came from.
struct Export {
    dev: usize,
    export: BarExport,
}

/// An attachment, with the export it was made from.
struct Att {
    export: Arc<Export>,
    att: Attachment,
}

/// What the threads share.
struct Shared {
    ioas: Ioas,
    devices: Vec<VfioPciDevice>,
    exports: Mutex<Vec<Arc<Export>>>,
    attachments: Mutex<Vec<Arc<Att>>>,
    /// Operations that must not fail but did.
    failures: Mutex<Vec<String>>,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    exports: AtomicU64,
    maps: AtomicU64,
    maps_refused_revoked: AtomicU64,
    unmaps: AtomicU64,
    revokes: AtomicU64,
    resets: AtomicU64,
    restores: AtomicU64,
    restores_refused: AtomicU64,
    checks: AtomicU64,
}

impl Shared {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }

    fn random_export(&self, rng: &mut Rng) -> Option<Arc<Export>> {
        let pool = self.exports.lock().unwrap();
        (!pool.is_empty()).then(|| Arc::clone(&pool[rng.below(pool.len())]))
    }

    fn random_attachment(&self, rng: &mut Rng) -> Option<Arc<Att>> {
        let pool = self.attachments.lock().unwrap();
        (!pool.is_empty()).then(|| Arc::clone(&pool[rng.below(pool.len())]))
    }

    /// Exports a random page-aligned range of a random device's BAR2 (made
    /// while decode is off, it is born revoked: that is fine).
    fn export(&self, rng: &mut Rng) {
        let dev = rng.below(self.devices.len());
        let pages = (self.devices[dev].bar(2).map(|b| b.size()).unwrap_or(0) / PAGE).max(1);
        let first = rng.next() % pages;
        let count = 1 + rng.next() % (pages - first).min(4);
        match self.devices[dev].export_bar(2, &[ByteRange::new(first * PAGE, count * PAGE)]) {
            Ok(export) => {
                self.stats.exports.fetch_add(1, Ordering::Relaxed);
                let mut pool = self.exports.lock().unwrap();
                if pool.len() >= MAX_EXPORTS {
                    let i = rng.below(pool.len());
                    pool.swap_remove(i);
                }
                pool.push(Arc::new(Export { dev, export }));
            }
            Err(e) => self.fail(format!("export of device {dev}: {e}")),
        }
    }

    /// Maps a random export, or drops a random attachment when there are
    /// many. Returns whether there was anything to do.
    fn map_or_unmap(&self, rng: &mut Rng) -> bool {
        let count = self.attachments.lock().unwrap().len();
        if count >= MAX_ATTACHMENTS || (count > 4 && rng.below(3) == 0) {
            let dropped = {
                let mut pool = self.attachments.lock().unwrap();
                let i = rng.below(pool.len());
                (!pool.is_empty()).then(|| pool.swap_remove(i))
            };
            if dropped.is_some() {
                self.stats.unmaps.fetch_add(1, Ordering::Relaxed);
            }
            drop(dropped); // unmaps, outside the pool's lock
            return true;
        }
        let Some(export) = self.random_export(rng) else {
            return false;
        };
        let policy = if rng.below(4) == 0 {
            RestorePolicy::LeaveRevoked
        } else {
            RestorePolicy::Automatic
        };
        match Attachment::map(
            &export.export,
            &self.ioas,
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
            policy,
        ) {
            Ok(att) => {
                self.stats.maps.fetch_add(1, Ordering::Relaxed);
                self.attachments
                    .lock()
                    .unwrap()
                    .push(Arc::new(Att { export, att }));
            }
            // The exporter is revoked right now (decode off on another thread).
            Err(Error::Revoked { .. }) => {
                self.stats
                    .maps_refused_revoked
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => self.fail(format!("map of an export of device {}: {e}", export.dev)),
        }
        true
    }

    /// Memory decode off and on again on a random device; sometimes a reset.
    fn revoke_restore(&self, rng: &mut Rng) {
        let d = rng.below(self.devices.len());
        let dev = &self.devices[d];
        if rng.below(8) == 0 && dev.supports_reset().unwrap_or(false) {
            match dev.reset() {
                Ok(()) => self.stats.resets.fetch_add(1, Ordering::Relaxed),
                Err(e) => return self.fail(format!("reset of device {d}: {e}")),
            };
            return;
        }
        if let Err(e) = dev.set_memory_decode(false) {
            self.fail(format!("decode off on device {d}: {e}"));
        }
        self.stats.revokes.fetch_add(1, Ordering::Relaxed);
        if rng.below(2) == 0 {
            thread::yield_now();
        }
        if let Err(e) = dev.set_memory_decode(true) {
            self.fail(format!("decode on on device {d}: {e}"));
        }
    }

    /// Looks at a random attachment from another thread; restores a manual
    /// one that is revoked. Returns whether there was anything to look at.
    fn check(&self, rng: &mut Rng) -> bool {
        let Some(a) = self.random_attachment(rng) else {
            return false;
        };
        self.stats.checks.fetch_add(1, Ordering::Relaxed);
        let (revocations, restores) = a.att.counts();
        if restores > revocations {
            self.fail(format!(
                "attachment at {:#x}: {restores} restores after {revocations} revocations",
                a.att.iova()
            ));
        }
        let _ = (
            a.att.info().clone(),
            a.att.ensure_live(),
            a.att.revoked_reason(),
            a.att.hub().state(),
        );
        if a.att.is_revoked() && a.att.policy() == RestorePolicy::LeaveRevoked {
            match a.att.restore() {
                Ok(()) => {
                    self.stats.restores.fetch_add(1, Ordering::Relaxed);
                }
                // The exporter is revoked again already.
                Err(Error::Revoked { .. }) => {
                    self.stats.restores_refused.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => self.fail(format!("restore: {e}")),
            }
        }
        true
    }
}

/// The roles of the worker threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Exporter,
    Mapper,
    Revoker,
    Checker,
}

const ROLES: [Role; 10] = [
    Role::Exporter,
    Role::Exporter,
    Role::Mapper,
    Role::Mapper,
    Role::Mapper,
    Role::Revoker,
    Role::Revoker,
    Role::Revoker,
    Role::Checker,
    Role::Checker,
];

/// Fails the whole run (the process exits non-zero, which the test bed
/// reports) unless told within `limit` that the threads have finished.
fn watchdog(limit: Duration, progress: Arc<Vec<AtomicU64>>) -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                let done: Vec<u64> = progress.iter().map(|p| p.load(Ordering::Relaxed)).collect();
                directive(&format!(
                    "concurrency: WATCHDOG: the threads did not finish within {limit:?} (deadlock?); operations \
                     done per thread {done:?} of {OPS} ({ROLES:?})"
                ));
                eprintln!("concurrency::threads_share_exports_attachments_and_revocation FAILED: watchdog");
                std::process::exit(101);
            }
        })
        .unwrap();
    tx
}

/// The dma-buf `count` fdinfo shows for `export` now.
fn fd_count(export: &BarExport) -> u64 {
    export.dmabuf().fdinfo().unwrap().count
}

/// At least eight threads export, map, unmap, revoke and restore at once;
/// afterwards nothing is deadlocked, the invariants hold and nothing leaked.
#[test]
fn threads_share_exports_attachments_and_revocation() {
    let started = Instant::now();
    let baseline_fds = open_fd_count();
    let shms = small_shms();
    assert!(
        shms.len() >= DEVICES,
        "the concurrency test needs {DEVICES} 64 KiB ivshmem devices: {shms:?}"
    );
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let ioas_id = ioas.id();
    let devices: Vec<VfioPciDevice> = shms[..DEVICES]
        .iter()
        .map(|(bdf, _)| {
            let mut d = VfioPciDevice::open(bdf.parse().unwrap()).unwrap();
            d.bind(&iommufd).unwrap();
            d.set_memory_decode(true).unwrap();
            d
        })
        .collect();

    // What one attachment adds to its buffer's fdinfo `count`, live and
    // revoked, measured alone before the threads start.
    let (delta_live, delta_revoked) = {
        let export = devices[0]
            .export_bar(2, &[ByteRange::new(0, PAGE)])
            .unwrap();
        let alone = fd_count(&export);
        let att = Attachment::map(
            &export,
            &ioas,
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
            RestorePolicy::Automatic,
        )
        .unwrap();
        let live = fd_count(&export) - alone;
        devices[0].set_memory_decode(false).unwrap();
        let revoked = fd_count(&export) - alone;
        devices[0].set_memory_decode(true).unwrap();
        assert!(!att.is_revoked());
        assert_eq!(fd_count(&export) - alone, live, "count after restore");
        drop(att);
        assert_eq!(
            fd_count(&export),
            alone,
            "count after the attachment is dropped"
        );
        (live, revoked)
    };

    let shared = Shared {
        ioas: ioas.clone(),
        devices,
        exports: Mutex::new(Vec::new()),
        attachments: Mutex::new(Vec::new()),
        failures: Mutex::new(Vec::new()),
        stats: Stats::default(),
    };
    let progress: Arc<Vec<AtomicU64>> = Arc::new(ROLES.iter().map(|_| AtomicU64::new(0)).collect());
    let done = watchdog(WATCHDOG, Arc::clone(&progress));

    thread::scope(|s| {
        for (i, role) in ROLES.iter().copied().enumerate() {
            let (shared, progress) = (&shared, &progress);
            thread::Builder::new()
                .name(format!("{role:?}-{i}").to_lowercase())
                .spawn_scoped(s, move || {
                    let mut rng = Rng::new(0xc0c0 + i as u64);
                    let mut done = 0;
                    while done < OPS {
                        let did = match role {
                            Role::Exporter => {
                                shared.export(&mut rng);
                                true
                            }
                            Role::Mapper => shared.map_or_unmap(&mut rng),
                            Role::Revoker => {
                                shared.revoke_restore(&mut rng);
                                true
                            }
                            Role::Checker => shared.check(&mut rng),
                        };
                        if did {
                            done += 1;
                            progress[i].fetch_add(1, Ordering::Relaxed);
                        }
                        // Checks are much quicker than the rest: spread them
                        // over the run. (Nothing to do yet: wait a little.)
                        if !did || role == Role::Checker {
                            thread::sleep(Duration::from_millis(if did { 4 } else { 1 }));
                        }
                    }
                })
                .unwrap();
        }
    });
    let _ = done.send(());
    let run_time = started.elapsed();

    let failures = shared.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "operations failed during the run: {failures:#?}"
    );
    let st = &shared.stats;
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let ops: u64 = progress.iter().map(|p| p.load(Ordering::Relaxed)).sum();
    kmsg(&format!(
        "concurrency: {} threads, {ops} operations in {:.1} s: {} exports, {} maps ({} refused: revoked), {} unmaps, \
         {} decode off/on, {} resets, {} manual restores ({} refused), {} checks",
        ROLES.len(),
        run_time.as_secs_f64(),
        ld(&st.exports),
        ld(&st.maps),
        ld(&st.maps_refused_revoked),
        ld(&st.unmaps),
        ld(&st.revokes),
        ld(&st.resets),
        ld(&st.restores),
        ld(&st.restores_refused),
        ld(&st.checks),
    ));
    assert_eq!(ops, OPS * ROLES.len() as u64);

    let Shared {
        devices,
        exports,
        attachments,
        ioas: shared_ioas,
        ..
    } = shared;
    drop(shared_ioas);
    let mut exports = exports.into_inner().unwrap();
    let attachments: Vec<Arc<Att>> = attachments.into_inner().unwrap();

    // Devices: decode on, hubs live, counting exactly the attachments alive.
    for (d, dev) in devices.iter().enumerate() {
        assert!(
            dev.memory_decode().unwrap(),
            "device {d}: memory decode is left off"
        );
        assert_eq!(
            dev.hub().state(),
            BufferState::Live,
            "device {d}: its hub is not live with decode on"
        );
        let mine = attachments.iter().filter(|a| a.export.dev == d).count();
        assert_eq!(
            dev.hub().attachment_count(),
            mine,
            "device {d}: the hub's attachment count"
        );
    }

    // Attachments: an automatic one is live (the hub is); a manual one may be
    // revoked. Its mapping must be live exactly when it says so.
    let edu_addr = pci_devices(EDU_ID)[0].parse().unwrap();
    let mut edu = Edu::open(edu_addr, &ioas).unwrap();
    assert_eq!(
        edu.completion(),
        Completion::Interrupt,
        "MSI set-up failed: {:?}",
        edu.polling_reason()
    );
    let data = pattern(0xc0, COPY as usize);
    let poison: Vec<u8> = data.iter().map(|b| !b).collect();
    let src = Memfd::new("concurrency-src", PAGE).unwrap();
    src.write_at(0, &data).unwrap();
    let src_map = ioas
        .map_file(
            &src,
            ByteRange::new(0, PAGE),
            IovaPlacement::Auto,
            MapPerms::Read,
        )
        .unwrap();
    edu.load(src_map.iova(), 0, COPY, DMA_TIMEOUT).unwrap();
    let bars: Vec<_> = devices.iter().map(|d| d.map_bar(2).unwrap()).collect();
    let (mut live, mut revoked) = (0, 0);
    for (k, a) in attachments.iter().enumerate() {
        let is_revoked = a.att.is_revoked();
        if a.att.policy() == RestorePolicy::Automatic {
            assert!(
                !is_revoked,
                "attachment {k} ({:#x}, automatic) is revoked while its hub is live: {:?}",
                a.att.iova(),
                a.att.last_error()
            );
        }
        // The copy goes to a different place in each attachment's range.
        let range = a.export.export.ranges()[0];
        let at = ((k as u64 * 0x140) % (range.length - COPY + 1)) & !7;
        let bar = &bars[a.export.dev];
        bar.write(range.offset + at, &poison).unwrap();
        edu.store(0, a.att.iova() + at, COPY, DMA_TIMEOUT).unwrap();
        let mut got = vec![0u8; COPY as usize];
        bar.read(range.offset + at, &mut got).unwrap();
        if is_revoked {
            revoked += 1;
            assert_eq!(
                got,
                poison,
                "attachment {k} ({:#x}) is revoked, yet a copy to it landed",
                a.att.iova()
            );
            a.att.restore().unwrap();
            assert!(!a.att.is_revoked());
            edu.store(0, a.att.iova() + at, COPY, DMA_TIMEOUT).unwrap();
            bar.read(range.offset + at, &mut got).unwrap();
        } else {
            live += 1;
        }
        assert_eq!(
            got,
            data,
            "attachment {k} ({:#x}) is live, yet a copy to it did not land",
            a.att.iova()
        );
    }

    // fdinfo: each buffer's count is its own plus what its attachments add.
    // Every attachment is live now.
    let mut per_export: HashMap<*const Export, (Arc<Export>, u64)> = HashMap::new();
    for a in &attachments {
        per_export
            .entry(Arc::as_ptr(&a.export))
            .or_insert_with(|| (Arc::clone(&a.export), 0))
            .1 += 1;
    }
    for e in &exports {
        per_export
            .entry(Arc::as_ptr(e))
            .or_insert_with(|| (Arc::clone(e), 0));
    }
    let alone = {
        let probe = devices[0]
            .export_bar(2, &[ByteRange::new(0, PAGE)])
            .unwrap();
        fd_count(&probe)
    };
    for (export, n) in per_export.values() {
        assert_eq!(
            fd_count(&export.export),
            alone + n * delta_live,
            "fdinfo count of {} with {n} live attachments",
            export.export
        );
    }
    kmsg(&format!(
        "concurrency: afterwards {} attachments ({live} live, {revoked} revoked and restored), {} buffers; an \
         attachment adds {delta_live} to fdinfo count live, {delta_revoked} revoked",
        attachments.len(),
        per_export.len()
    ));

    // Everything goes; nothing may stay behind.
    drop(per_export);
    drop(attachments);
    for (d, dev) in devices.iter().enumerate() {
        assert_eq!(
            dev.hub().attachment_count(),
            0,
            "device {d}: attachments left after all were dropped"
        );
    }
    exports.clear();
    drop((src_map, src, bars, edu, devices));
    drop(ioas);
    match iommufd.iova_ranges(ioas_id) {
        Err(Error::UnknownObject { .. }) => {}
        other => panic!("IOAS {ioas_id} still exists after its last handle was dropped: {other:?}"),
    }
    drop(iommufd);
    assert_eq!(open_fd_count(), baseline_fds, "fds leaked");
    kmsg(&format!(
        "concurrency: done in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
}
