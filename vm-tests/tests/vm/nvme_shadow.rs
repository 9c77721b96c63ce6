//! Shadow doorbells (Doorbell Buffer Config) on QEMU 7.2's NVMe controller:
//! taken when advertised, most completion-queue head updates then skip the
//! MMIO write (the engine's own count), and every read still lands (each
//! buffer checked against the namespace image); with them turned off every
//! update is an MMIO write; a controller opened again after a reset takes
//! them again. The rest of the NVMe suite runs with them on (the default).
//!
//! | device | area | test |
//! | --- | --- | --- |
//! | nvme0 | reads only | `nvme_shadow_doorbells_skip_mmio_writes_and_reads_land` |

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use dmabuf_p2p::importer::iommufd::{Ioas, IoasMapping, Iommufd};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p_engine::Completion;
use dmabuf_p2p_engine::nvme::{
    CommandId, DoorbellWrites, IoQueue, Nvme, NvmeOptions, QueueOptions,
};
use dmabuf_p2p_vm_tests::{assert_bytes, nvme_address, nvme_image};

const BLOCK: u64 = 512;
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Commands per run: a few laps of every ring used.
const COMMANDS: u64 = 300;
/// Blocks per read (4 KiB).
const BLOCKS: u32 = 8;

fn open(ioas: &Ioas, shadow: bool) -> Nvme {
    Nvme::open_with_options(
        nvme_address("nvme0").parse().unwrap(),
        ioas,
        NvmeOptions::new()
            .completion(Completion::Polling)
            .io_queues(2)
            .shadow_doorbells(shadow),
    )
    .unwrap()
}

/// The LBA of command `i` (4 KiB reads spread over the first 3 MiB).
fn lba(i: u64) -> u64 {
    (i * 37 % 768) * u64::from(BLOCKS)
}

/// Runs `COMMANDS` 4 KiB reads on a new queue of `depth` (kept full:
/// a new read after each completion), each into its own 4 KiB of `mem`
/// (cleared first), checks every buffer against the image and returns the
/// queue's doorbell counts.
fn run(nvme: &Nvme, mem: &Memfd, map: &IoasMapping, depth: u16, how: &str) -> DoorbellWrites {
    let size = COMMANDS * 4096;
    mem.write_at(0, &vec![0xa5; size as usize]).unwrap();
    let mut q: IoQueue = nvme
        .create_queue(
            QueueOptions::new()
                .depth(depth)
                .completion(Completion::Polling)
                .spin(Duration::MAX),
        )
        .unwrap();
    let before = q.doorbell_writes();
    assert_eq!(
        before,
        DoorbellWrites::default(),
        "{how}: a new queue's counts"
    );
    let mut next = 0u64;
    let mut ids: Vec<(CommandId, u64)> = Vec::new();
    let mut done = 0u64;
    while done < COMMANDS {
        while next < COMMANDS && ids.len() < usize::from(depth) {
            let id = q
                .submit_read(lba(next), BLOCKS, map.iova() + next * 4096)
                .unwrap();
            ids.push((id, next));
            next += 1;
        }
        let d = q.wait_any(IO_TIMEOUT).unwrap();
        q.check(d).unwrap();
        let at = ids.iter().position(|(id, _)| *id == d.id).unwrap();
        ids.swap_remove(at);
        done += 1;
    }
    let counts = q.doorbell_writes();
    let (sq_bell, _) = q.doorbells();
    // Idle, QEMU 7.2's event index is the last tail it fetched up to.
    let sq_event = sq_bell.event_index();
    let tail = sq_bell.last();
    assert_eq!(q.shadow_doorbells(), nvme.shadow_doorbells(), "{how}");
    if nvme.shadow_doorbells() {
        assert_eq!(
            sq_event,
            Some(tail),
            "{how}: the controller's event index for the idle queue's tail"
        );
    } else {
        assert_eq!(sq_event, None, "{how}");
    }
    q.close(IO_TIMEOUT).unwrap();
    for i in 0..COMMANDS {
        let mut got = vec![0u8; 4096];
        mem.read_at(i * 4096, &mut got).unwrap();
        assert_bytes(
            &got,
            &nvme_image(lba(i) * BLOCK, 4096),
            lba(i) * BLOCK,
            &format!("{how}: read {i} at LBA {}", lba(i)),
        );
    }
    println!("{how}: depth {depth}, {COMMANDS} reads: {counts:?}");
    // One tail update per submit, one head update per reap that found one.
    assert_eq!(counts.sq_updates, COMMANDS, "{how}: tail updates");
    assert!(
        counts.cq_updates >= 1 && counts.cq_updates <= COMMANDS,
        "{how}: head updates {counts:?}"
    );
    counts
}

/// With shadow doorbells (QEMU 7.2 advertises OACS bit 8) at depth 1 and
/// 16: completion-queue head updates skip the MMIO write most of the time
/// (QEMU's event index is the head it read before its last read, so a
/// head moved past it needs none), fewer MMIO writes than commands in all,
/// and every read lands. Turned off: an MMIO write per update. Opened
/// again (after the reset that forgot them): taken again.
#[test]
fn nvme_shadow_doorbells_skip_mmio_writes_and_reads_land() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let (mem, map) = super::nvme::ram(&ioas, COMMANDS * 4096);

    let off = open(&ioas, false);
    assert!(
        off.identity().has_doorbell_buffer_config(),
        "QEMU 7.2's controller advertises Doorbell Buffer Config (OACS {:#x})",
        off.identity().oacs
    );
    assert!(!off.shadow_doorbells(), "turned off, yet in use");
    assert!(off.shadow_doorbells_error().is_none());
    for depth in [1, 16] {
        let c = run(&off, &mem, &map, depth, "shadow doorbells off");
        assert_eq!(
            (c.sq_mmio, c.cq_mmio),
            (c.sq_updates, c.cq_updates),
            "without shadows every update is an MMIO write"
        );
    }
    drop(off);

    // QD1 on QEMU 7.2 saves nothing: the controller is idle when each tail
    // comes (its event index is that tail), and its completion queue event
    // index is the head it holds, which the last MMIO write set. Deeper,
    // tails written while it fetches need no MMIO write.
    let mut deep = DoorbellWrites::default();
    for open_count in 1..=2 {
        let on = open(&ioas, true);
        assert!(
            on.shadow_doorbells(),
            "open {open_count}: Doorbell Buffer Config not in use: {:?}",
            on.shadow_doorbells_error()
        );
        for depth in [1, 16, 32] {
            let how = format!("shadow doorbells on, open {open_count}");
            let c = run(&on, &mem, &map, depth, &how);
            assert!(c.sq_mmio <= c.sq_updates, "{how}, depth {depth}: {c:?}");
            assert!(c.cq_mmio <= c.cq_updates, "{how}, depth {depth}: {c:?}");
            if depth > 1 {
                deep.sq_updates += c.sq_updates;
                deep.sq_mmio += c.sq_mmio;
            }
        }
        drop(on);
    }
    assert!(
        deep.sq_mmio < deep.sq_updates,
        "at depth 16 and 32 no tail update skipped its MMIO write: {deep:?}"
    );
}
