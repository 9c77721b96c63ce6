//! Revocation under load: a thousand rounds of revoke (memory decode off), a
//! raw engine copy to the revoked IOVA (what a buggy or malicious peer would
//! do, bypassing [`Attachment::ensure_live`]), and restore (decode on, which
//! maps the attachment again at the same IOVA), on mapped BARs. Not one byte
//! of a BAR may change while it is revoked, and every copy after a restore
//! must land.
//!
//! Each edu transfer takes 100 ms (a QEMU timer), and a round needs two (the
//! attempted copy and the one that must land), so a thousand rounds on one
//! engine would take more than 200 s. The test bed has six edu engines and
//! six 64 KiB ivshmem devices (`shm2`..`shm7`) for this: the rounds are split
//! between independent streams, one thread each, each with its own engine,
//! exporter and IO address space. Each copy is a single transfer: the engine
//! loads the bytes into its buffer once and stores them out every time.
//!
//! One round of a stream, with `D` the bytes in the engine's buffer and `o`
//! an offset that moves every round:
//!
//! 1. the CPU writes `!D` (every byte differs from `D`) at `o` through the
//!    BAR mmap, so that any byte of a copy landing there would show;
//! 2. memory decode off: the attachment is revoked and its IOVA torn down;
//! 3. the engine stores `D` to `iova + o` anyway (one transfer), which must
//!    fault in the IOMMU;
//! 4. memory decode on: the attachment is back at the same IOVA;
//! 5. the whole BAR is compared with what it must hold: every differing byte
//!    is a leaked byte (the BAR cannot be read while decode is off: vfio has
//!    the mmap zapped and the access would `SIGBUS`);
//! 6. the engine stores `D` to `iova + o` again, which must land: the bytes
//!    at `o` are read back.
//!
//! At the end each stream's BAR is compared once more, and the host checks
//! the ivshmem backing files hold the same bytes.

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{Attachment, RestorePolicy, RevocationEvent, RevokeReason};
use dmabuf_p2p::vfio::{BarMapping, VfioPciDevice};
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_engine::{Completion, DmaEngine};
use dmabuf_p2p_vm_tests::{EDU_ID, ivshmem_devices, pci_devices, request_host_check};

/// Rounds in all, split between the streams.
const ROUNDS: u32 = 1000;
/// The BAR2 size of the stream devices (`shm2`..`shm7`).
const SMALL_SHM: u64 = 64 << 10;
/// Bytes per copy: one edu transfer, clear of the last byte of edu's buffer.
const COPY: u64 = 0x800;
/// How long one edu transfer may take (it takes 100 ms).
const DMA_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) use dmabuf_p2p_vm_tests::pattern;

/// The small ivshmem devices with their test-bed names, in PCI address order
/// (which is the order of their root ports: `shm2` first).
pub(crate) fn small_shms() -> Vec<(String, String)> {
    ivshmem_devices()
        .into_iter()
        .filter(|(_, size)| *size == SMALL_SHM)
        .enumerate()
        .map(|(i, (bdf, _))| (bdf, format!("shm{}", i + 2)))
        .collect()
}

/// Compares the whole BAR with `expected`, reading it through the mmap in
/// 8-byte words (memory decode must be on), and makes `expected` what the BAR
/// holds. Returns how many bytes differed and the offset of the first.
///
/// One pass of word reads: comparing the whole BAR every round is most of a
/// round's CPU time in the VM (the suite is a debug build, under TCG).
fn compare_bar(bar: &BarMapping, expected: &mut [u64]) -> (u64, Option<usize>) {
    assert_eq!(bar.len(), expected.len() * 8);
    let base = bar.as_ptr().cast::<u64>();
    let (mut differ, mut first) = (0u64, None);
    for (i, want) in expected.iter_mut().enumerate() {
        let word = base.wrapping_add(i);
        // SAFETY: `i * 8 + 8 <= bar.len()`, so the word lies inside the live
        // mapping, which is page-aligned, so the word is aligned; the access
        // is volatile and no reference into the BAR exists.
        let got = unsafe { word.read_volatile() };
        if got != *want {
            let bytes = (got ^ *want).to_ne_bytes();
            differ += bytes.iter().filter(|b| **b != 0).count() as u64;
            let lane = bytes.iter().position(|b| *b != 0).unwrap_or(0);
            first.get_or_insert(i * 8 + lane);
            *want = got;
        }
    }
    (differ, first)
}

/// The bytes as native-endian 8-byte words (`bytes.len()` is a multiple of 8).
fn words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

/// Writes a line to the kernel log (`/dev/kmsg`), which the test bed saves as
/// `console.log`: the place for a passing test's numbers (libtest captures
/// its output, and a line written to the report port mid-test would split
/// libtest's `test NAME ... ok` line).
pub(crate) fn kmsg(line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = f.write_all(format!("dmabuf-p2p: {line}\n").as_bytes());
    }
    println!("{line}");
}

/// What one stream did.
#[derive(Debug, Default)]
struct StreamReport {
    shm: String,
    engine: String,
    rounds: u32,
    leaked_bytes: u64,
    /// Rounds whose revoked copy changed the BAR, with the first offset.
    leaks: Vec<(u32, usize)>,
    landed: u32,
    /// Rounds whose copy after the restore did not land.
    missed: Vec<u32>,
    revoked_events: u64,
    restored_events: u64,
    elapsed: Duration,
    /// Time spent in each step of the rounds, in the order of the module docs.
    steps: [Duration; 6],
}

/// Runs `rounds` rounds on one engine and one exporter in an IOAS of its own.
fn stream(
    iommufd: &Iommufd,
    engine: &str,
    shm_bdf: &str,
    shm: &str,
    rounds: u32,
    seed: u64,
) -> StreamReport {
    let started = Instant::now();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut edu = Edu::open(engine.parse().unwrap(), &ioas).unwrap();
    assert_eq!(
        edu.completion(),
        Completion::Interrupt,
        "{engine}: MSI set-up failed: {:?}",
        edu.polling_reason()
    );

    let mut dev = VfioPciDevice::open(shm_bdf.parse().unwrap()).unwrap();
    dev.bind(iommufd).unwrap();
    dev.set_memory_decode(true).unwrap();
    let bar = dev.map_bar(2).unwrap();
    let len = bar.len() as u64;
    assert_eq!(len, SMALL_SHM, "{shm} ({shm_bdf}) BAR2 size");
    let initial = pattern(seed, len as usize);
    bar.write(0, &initial).unwrap();
    let mut expected = words(&initial);

    let export = dev.export_bar(2, &[ByteRange::new(0, len)]).unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    let iova = att.iova();
    let revoked_events = Arc::new(AtomicU64::new(0));
    let restored_events = Arc::new(AtomicU64::new(0));
    {
        let (rv, rs) = (Arc::clone(&revoked_events), Arc::clone(&restored_events));
        att.on_event(move |_, ev| match ev {
            RevocationEvent::Revoked(_) => {
                rv.fetch_add(1, Ordering::Relaxed);
            }
            RevocationEvent::Restored => {
                rs.fetch_add(1, Ordering::Relaxed);
            }
            other => panic!("unexpected event {other:?}"),
        });
    }

    // The bytes every copy moves, loaded into edu's buffer once; `poison`
    // differs from them in every byte.
    let data = pattern(seed ^ 0xd00d, COPY as usize);
    let poison: Vec<u8> = data.iter().map(|b| !b).collect();
    let poison_words = words(&poison);
    let src = Memfd::new("load-src", 0x1000).unwrap();
    src.write_at(0, &data).unwrap();
    let src_map = ioas
        .map_file(
            &src,
            ByteRange::new(0, 0x1000),
            IovaPlacement::Auto,
            MapPerms::Read,
        )
        .unwrap();
    edu.load(src_map.iova(), 0, COPY, DMA_TIMEOUT).unwrap();

    let mut report = StreamReport {
        shm: shm.to_owned(),
        engine: engine.to_owned(),
        ..StreamReport::default()
    };
    let slots = (len - COPY) / 8 + 1;
    for round in 0..rounds {
        // Offsets spread over the whole BAR, 8-byte aligned.
        let off = (u64::from(round).wrapping_mul(0x9e37_79b1) % slots) * 8;
        let at = (off / 8) as usize..((off + COPY) / 8) as usize;

        let mut t = Instant::now();
        let mut lap = |step: usize, steps: &mut [Duration; 6]| {
            steps[step] += t.elapsed();
            t = Instant::now();
        };
        // 1. Poison the destination so a landing copy would show.
        bar.write(off, &poison).unwrap();
        expected[at.clone()].copy_from_slice(&poison_words);

        // 2. Revoke.
        dev.set_memory_decode(false).unwrap();
        assert_eq!(
            att.revoked_reason(),
            Some(RevokeReason::MemoryDecodeOff),
            "{shm} round {round}: not revoked"
        );
        assert!(
            att.ensure_live().is_err(),
            "{shm} round {round}: ensure_live passes while revoked"
        );
        lap(0, &mut report.steps);

        // 3. A raw copy to the revoked IOVA, bypassing the library's check.
        edu.store(0, iova + off, COPY, DMA_TIMEOUT).unwrap();
        lap(1, &mut report.steps);

        // 4. Restore.
        dev.set_memory_decode(true).unwrap();
        assert!(
            !att.is_revoked(),
            "{shm} round {round}: not restored ({:?})",
            att.last_error()
        );
        assert_eq!(
            att.iova(),
            iova,
            "{shm} round {round}: restored at another IOVA"
        );
        lap(2, &mut report.steps);

        // 5. Not one byte may have changed.
        // (`compare_bar` takes what it found into `expected`, so each leaked
        // byte counts once.)
        let (n, first) = compare_bar(&bar, &mut expected);
        if let Some(first) = first {
            report.leaked_bytes += n;
            report.leaks.push((round, first));
        }
        lap(3, &mut report.steps);

        // 6. After the restore the copy lands.
        edu.store(0, iova + off, COPY, DMA_TIMEOUT).unwrap();
        lap(4, &mut report.steps);
        let mut got = vec![0u8; COPY as usize];
        bar.read(off, &mut got).unwrap();
        if got == data {
            report.landed += 1;
        } else {
            report.missed.push(round);
        }
        expected[at].copy_from_slice(&words(&got));
        lap(5, &mut report.steps);
        report.rounds += 1;
    }

    let (n, first) = compare_bar(&bar, &mut expected);
    assert_eq!(
        n, 0,
        "{shm}: {n} bytes of the BAR changed outside the rounds' copies, the first at {first:?}"
    );
    let end: Vec<u8> = expected.iter().flat_map(|w| w.to_ne_bytes()).collect();
    request_host_check(shm, 0, &end);
    let (revocations, restores) = att.counts();
    assert_eq!(
        (revocations, restores),
        (u64::from(rounds), u64::from(rounds)),
        "{shm}: attachment counts"
    );
    report.revoked_events = revoked_events.load(Ordering::Relaxed);
    report.restored_events = restored_events.load(Ordering::Relaxed);
    assert!(
        dev.memory_decode().unwrap(),
        "{shm}: memory decode is left on"
    );
    report.elapsed = started.elapsed();
    report
}

/// A thousand revoke / raw copy / restore rounds on mapped BARs, split
/// between parallel streams: zero bytes leak and every copy after a restore
/// lands.
#[test]
fn thousand_revocations_under_load_leak_nothing() {
    let started = Instant::now();
    let engines = pci_devices(EDU_ID);
    let shms = small_shms();
    let streams = engines.len().min(shms.len());
    assert!(
        streams > 0,
        "the load test needs edu engines ({engines:?}) and 64 KiB ivshmem devices ({shms:?})"
    );
    let iommufd = Iommufd::open().unwrap();

    let reports: Vec<StreamReport> = thread::scope(|s| {
        let handles: Vec<_> = (0..streams)
            .map(|i| {
                let rounds =
                    ROUNDS / streams as u32 + u32::from((i as u32) < ROUNDS % streams as u32);
                let (engine, (shm_bdf, shm)) = (&engines[i], &shms[i]);
                let iommufd = &iommufd;
                thread::Builder::new()
                    .name(format!("load-{shm}"))
                    .spawn_scoped(s, move || {
                        stream(iommufd, engine, shm_bdf, shm, rounds, 0x10ad + i as u64)
                    })
                    .unwrap()
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });

    let wall = started.elapsed();
    let rounds: u32 = reports.iter().map(|r| r.rounds).sum();
    let leaked: u64 = reports.iter().map(|r| r.leaked_bytes).sum();
    let landed: u32 = reports.iter().map(|r| r.landed).sum();
    for r in &reports {
        kmsg(&format!(
            "load: {} with {}: {} rounds, {} bytes leaked, {} copies landed after restore, {}/{} revoke/restore \
             events, {:.1} s (per round: {:?} ms poison + decode off, raw copy, decode on, compare, copy, read back)",
            r.shm,
            r.engine,
            r.rounds,
            r.leaked_bytes,
            r.landed,
            r.revoked_events,
            r.restored_events,
            r.elapsed.as_secs_f64(),
            r.steps.map(|d| d.as_millis() / u128::from(r.rounds.max(1)))
        ));
    }
    kmsg(&format!(
        "load: {rounds} rounds in {streams} streams, {leaked} bytes leaked, {landed}/{rounds} copies landed after \
         restore, {:.1} s wall",
        wall.as_secs_f64()
    ));
    for r in &reports {
        assert!(
            r.leaks.is_empty(),
            "{}: the BAR changed while revoked in rounds (round, first offset) {:?}",
            r.shm,
            r.leaks
        );
        assert!(
            r.missed.is_empty(),
            "{}: copies after restore did not land in rounds {:?}",
            r.shm,
            r.missed
        );
        assert_eq!(
            (r.revoked_events, r.restored_events),
            (u64::from(r.rounds), u64::from(r.rounds)),
            "{}",
            r.shm
        );
    }
    assert_eq!(rounds, ROUNDS);
    assert_eq!(leaked, 0);
    assert_eq!(landed, ROUNDS);
}
