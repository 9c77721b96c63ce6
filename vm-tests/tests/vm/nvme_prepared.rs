//! The NVMe engine's prepared commands (`IoQueue::prepare`) driven the way
//! a userspace driver drives its fixed buffers: slots resubmitted as their
//! completions come back, reads and writes at depth, into host RAM and
//! into an ivshmem BAR, every completion's bytes checked against the
//! namespace.
//!
//! | device | area | test |
//! | --- | --- | --- |
//! | nvme0 | LBA 7424..8192 written, restored at the end | `nvme_prepared_random_slots_match_the_namespace` |
//! | shm1 | 0x3500000..0x3710000 | the same |

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmabuf_p2p::importer::iommufd::{IoasMapping, Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::vfio::BarMapping;
use dmabuf_p2p::{ByteRange, VfioPciDevice};
use dmabuf_p2p_engine::nvme::{Dma, NvmeProblem, Op, Prepared, QueueOptions, Reaped, Slot};
use dmabuf_p2p_engine::{Completion, StorageEngine};
use dmabuf_p2p_vm_tests::{
    Kmsg, assert_bytes, directive, nvme_image, request_host_check, shm_address,
};

const BLOCK: u64 = 512;
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// nvme0's namespace: 4 MiB of 512-byte blocks.
const NS_BLOCKS: u64 = 8192;
/// The blocks the test writes (the property test's too; restored at the
/// end of each, and the suite runs one test at a time).
const WRITE_AREA: std::ops::Range<u64> = 7424..8192;
/// Each buffer: the largest transfer (128 KiB) from any page offset.
const BUF_LEN: u64 = (128 << 10) + 4096;
/// Buffers in host RAM, and in shm1's BAR2.
const PER_KIND: u64 = 16;
const SHM_AREA: u64 = 0x350_0000;
/// Guard bytes checked either side of every transfer.
const GUARD: u64 = 64;

/// xorshift64: the run is reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// Buffer `b`: 0..16 in host RAM, 16..32 in the BAR.
struct Memory {
    ram: Memfd,
    ram_map: Arc<IoasMapping>,
    bar: BarMapping,
    bar_map: Arc<IoasMapping>,
}

impl Memory {
    fn is_bar(b: usize) -> bool {
        b as u64 >= PER_KIND
    }

    fn at(b: usize) -> u64 {
        (b as u64 % PER_KIND) * BUF_LEN
    }

    fn read(&self, b: usize, off: u64, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        if Self::is_bar(b) {
            self.bar.read(SHM_AREA + Self::at(b) + off, &mut v).unwrap();
        } else {
            self.ram.read_at(Self::at(b) + off, &mut v).unwrap();
        }
        v
    }

    fn write(&self, b: usize, off: u64, data: &[u8]) {
        if Self::is_bar(b) {
            self.bar.write(SHM_AREA + Self::at(b) + off, data).unwrap();
        } else {
            self.ram.write_at(Self::at(b) + off, data).unwrap();
        }
    }

    fn dma(&self, b: usize, off: u64) -> Dma {
        let map = if Self::is_bar(b) {
            &self.bar_map
        } else {
            &self.ram_map
        };
        Dma::held(map, Self::at(b) + off)
    }
}

/// One prepared slot as the test sees it.
#[derive(Debug, Clone, Copy)]
struct Shape {
    buf: usize,
    off: u64,
    blocks: u32,
}

/// A slot's command in flight.
#[derive(Debug, Clone, Copy)]
struct Cmd {
    lba: u64,
    write: bool,
}

#[derive(Default, Debug)]
struct Tally {
    submitted: usize,
    batched: usize,
    reads_ram: usize,
    reads_bar: usize,
    writes_ram: usize,
    writes_bar: usize,
    lba_refused: usize,
    dropped_in_flight: usize,
}

struct World {
    rng: Rng,
    seed: u64,
    mem: Memory,
    /// What each buffer must hold.
    expect: Vec<Vec<u8>>,
    /// The namespace as it must read.
    model: Vec<u8>,
    shapes: Vec<Shape>,
    running: Vec<Option<Cmd>>,
    tally: Tally,
    step: usize,
}

impl World {
    fn ctx(&self) -> String {
        format!("seed {} step {}", self.seed, self.step)
    }

    fn overlaps(&self, lba: u64, blocks: u32, write: bool) -> bool {
        self.running
            .iter()
            .zip(&self.shapes)
            .filter_map(|(c, s)| c.map(|c| (c, s)))
            .any(|(c, s)| {
                let hit = lba < c.lba + u64::from(s.blocks) && c.lba < lba + u64::from(blocks);
                hit && (write || c.write)
            })
    }

    /// A command for `slot`: a write (fresh bytes put in its buffer first)
    /// or a read, at an LBA nothing running conflicts with.
    fn plan(&mut self, slot: &Slot<'_>) -> Option<(Op, u64)> {
        let s = self.shapes[usize::from(slot.index())];
        let write = self.rng.below(3) == 0;
        for _ in 0..8 {
            let lba = if write {
                let room = WRITE_AREA.end - WRITE_AREA.start - u64::from(s.blocks) + 1;
                WRITE_AREA.start + self.rng.below(room)
            } else {
                self.rng.below(NS_BLOCKS - u64::from(s.blocks) + 1)
            };
            if self.overlaps(lba, s.blocks, write) {
                continue;
            }
            if write {
                let len = u64::from(s.blocks) * BLOCK;
                let data = self.rng.bytes(len as usize);
                self.mem.write(s.buf, s.off, &data);
                self.expect[s.buf][s.off as usize..(s.off + len) as usize].copy_from_slice(&data);
            }
            self.running[usize::from(slot.index())] = Some(Cmd { lba, write });
            return Some((if write { Op::Write } else { Op::Read }, lba));
        }
        None
    }

    /// A completion: its status, and its bytes (a read's buffer against
    /// the namespace, a write's into the model), with guard bytes.
    fn finish(&mut self, r: &Reaped<'_>) {
        let i = usize::from(r.index());
        assert!(
            r.is_success(),
            "{}: slot {i} failed: {}",
            self.ctx(),
            r.status()
        );
        let cmd = self.running[i]
            .take()
            .unwrap_or_else(|| panic!("{}: a completion for idle slot {i}", self.ctx()));
        self.settle(i, cmd);
    }

    fn settle(&mut self, i: usize, cmd: Cmd) {
        let s = self.shapes[i];
        let len = u64::from(s.blocks) * BLOCK;
        let at = (cmd.lba * BLOCK) as usize;
        let range = s.off as usize..(s.off + len) as usize;
        if cmd.write {
            let data = self.expect[s.buf][range].to_vec();
            self.model[at..at + len as usize].copy_from_slice(&data);
        } else {
            let data = self.model[at..at + len as usize].to_vec();
            self.expect[s.buf][range].copy_from_slice(&data);
        }
        let lo = s.off.saturating_sub(GUARD);
        let hi = (s.off + len + GUARD).min(BUF_LEN);
        let got = self.mem.read(s.buf, lo, hi - lo);
        let want = &self.expect[s.buf][lo as usize..hi as usize];
        if got != want {
            assert_bytes(
                &got,
                want,
                lo,
                &format!(
                    "{}: buffer {} ({}) after slot {i}'s {} of {} blocks at LBA {}",
                    self.ctx(),
                    s.buf,
                    if Memory::is_bar(s.buf) { "BAR" } else { "RAM" },
                    if cmd.write { "write" } else { "read" },
                    s.blocks,
                    cmd.lba
                ),
            );
        }
        let t = &mut self.tally;
        *match (cmd.write, Memory::is_bar(s.buf)) {
            (false, false) => &mut t.reads_ram,
            (false, true) => &mut t.reads_bar,
            (true, false) => &mut t.writes_ram,
            (true, true) => &mut t.writes_bar,
        } += 1;
    }
}

/// Random rounds, each on a queue of its own (depth 1 to 64, polled and
/// spinning, by MSI-X, or polled and sleeping) with 1 to 32 prepared
/// slots, each a buffer in host RAM or in shm1's BAR (exported, mapped in
/// the IOAS) of 1 to 256 blocks at any dword offset. Steps: submit a free
/// slot (a read anywhere, or a write into the write area from fresh
/// bytes), push several and ring once, wait for a completion and check
/// its bytes against the model of the namespace (guard bytes either
/// side), submit an LBA past the end (refused, the slot handed back; a
/// slot of another set does not compile: the engine's doctests). Every
/// third round ends its set with commands in flight and closes the queue,
/// which waits for them; their bytes are checked after. The seed is printed;
/// `DMABUF_P2P_SEED=<seed> cargo xtask vm-test nvme_prepared` replays it.
#[test]
fn nvme_prepared_random_slots_match_the_namespace() {
    const ROUNDS: usize = 9;
    const STEPS: usize = 100;
    let seed = dmabuf_p2p_vm_tests::property_seed();
    directive(&format!(
        "nvme prepared test: seed {seed} (replay: DMABUF_P2P_SEED={seed} cargo xtask vm-test nvme_prepared)"
    ));
    Kmsg::mark(&format!("nvme prepared test: seed {seed}"));
    let started = Instant::now();
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut nvme = super::nvme::open_with_queues("nvme0", &ioas, 2);
    let len = PER_KIND * BUF_LEN;
    let (ram, ram_map) = super::nvme::ram(&ioas, len);
    let shm = {
        let mut d = VfioPciDevice::open(shm_address("shm1").parse().unwrap()).unwrap();
        d.bind(&iommufd).unwrap();
        d.set_memory_decode(true).unwrap();
        d
    };
    let export = shm.export_bar(2, &[ByteRange::new(SHM_AREA, len)]).unwrap();
    let mem = Memory {
        ram,
        ram_map: Arc::new(ram_map),
        bar: shm.map_bar(2).unwrap(),
        bar_map: Arc::new(
            ioas.map_dmabuf(export.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite)
                .unwrap(),
        ),
    };
    let mut w = World {
        rng: Rng(seed | 1),
        seed,
        mem,
        expect: Vec::new(),
        model: Vec::new(),
        shapes: Vec::new(),
        running: Vec::new(),
        tally: Tally::default(),
        step: 0,
    };
    for b in 0..2 * PER_KIND as usize {
        let data = w.rng.bytes(BUF_LEN as usize);
        w.mem.write(b, 0, &data);
        w.expect.push(data);
    }
    // The model: the namespace as it is now, read through the checked
    // API; the write area must hold the image's bytes.
    {
        let (m, map) = super::nvme::ram(&ioas, 128 << 10);
        for lba in (0..NS_BLOCKS).step_by(256) {
            nvme.read_blocks(lba, 256, map.iova(), IO_TIMEOUT).unwrap();
            let mut v = vec![0u8; 128 << 10];
            m.read_at(0, &mut v).unwrap();
            w.model.extend(v);
        }
        let area = (WRITE_AREA.start * BLOCK) as usize..(WRITE_AREA.end * BLOCK) as usize;
        assert_bytes(
            &w.model[area.clone()],
            &nvme_image(area.start as u64, area.len()),
            area.start as u64,
            &format!("seed {seed}: the write area before the run"),
        );
    }

    // What prepare refuses: a busy queue, more buffers than its depth.
    {
        let mut q = nvme.create_queue(QueueOptions::new().depth(2)).unwrap();
        let id = q.submit_read(0, 8, w.mem.dma(0, 0)).unwrap();
        let e = q.prepare([(w.mem.dma(1, 0), 8)], |_, _| ()).unwrap_err();
        assert!(
            matches!(
                &e,
                dmabuf_p2p_engine::Error::Nvme {
                    problem: NvmeProblem::QueueBusy { in_use: 1, .. },
                    ..
                }
            ),
            "{e}"
        );
        q.wait(id, IO_TIMEOUT).unwrap();
        assert_bytes(
            &w.mem.read(0, 0, 4096),
            &w.model[..4096],
            0,
            "a checked read",
        );
        w.expect[0][..4096].copy_from_slice(&w.model[..4096]);
        let e = q
            .prepare((0..3).map(|b| (w.mem.dma(b, 0), 8)), |_, _| ())
            .unwrap_err();
        assert!(
            matches!(
                &e,
                dmabuf_p2p_engine::Error::Nvme {
                    problem: NvmeProblem::PreparedSlots { asked: 3, depth: 2 },
                    ..
                }
            ),
            "{e}"
        );
        let e = q.prepare([(w.mem.dma(1, 0), 0)], |_, _| ()).unwrap_err();
        assert!(
            matches!(
                &e,
                dmabuf_p2p_engine::Error::Nvme {
                    problem: NvmeProblem::EmptyTransfer,
                    ..
                }
            ),
            "{e}"
        );
        q.close(IO_TIMEOUT).unwrap();
    }

    let modes = [
        (Completion::Polling, Duration::MAX),
        (Completion::Interrupt, Duration::ZERO),
        (Completion::Polling, Duration::ZERO),
    ];
    for round in 0..ROUNDS {
        let depth = match round {
            0 => 1,
            1 => 64,
            _ => 1 + w.rng.below(64) as u16,
        };
        let (completion, spin) = modes[round % modes.len()];
        let mut q = nvme
            .create_queue(
                QueueOptions::new()
                    .depth(depth)
                    .completion(completion)
                    .spin(spin),
            )
            .unwrap();
        // Slots: distinct buffers, random lengths and offsets.
        let n = 1 + w.rng.below(u64::from(depth).min(2 * PER_KIND)) as usize;
        let mut bufs: Vec<usize> = (0..2 * PER_KIND as usize).collect();
        for i in (1..bufs.len()).rev() {
            bufs.swap(i, w.rng.below(i as u64 + 1) as usize);
        }
        w.shapes = bufs[..n]
            .iter()
            .map(|&buf| {
                let blocks = match w.rng.below(4) {
                    0 => 8,
                    1 => 256,
                    _ => 1 + w.rng.below(256) as u32,
                };
                let room = BUF_LEN - u64::from(blocks) * BLOCK;
                let off =
                    (w.rng.below(room / 4096 + 1) * 4096 + w.rng.below(1024) * 4).min(room) & !3;
                Shape { buf, off, blocks }
            })
            .collect();
        w.running = vec![None; n];
        Kmsg::mark(&format!(
            "nvme prepared test: round {round}, depth {depth}, {completion:?}, spin {spin:?}, {n} slots"
        ));
        let bufs: Vec<(Dma, u32)> = w
            .shapes
            .iter()
            .map(|s| (w.mem.dma(s.buf, s.off), s.blocks))
            .collect();
        // The set lives in the closure; what it leaves running is counted.
        let left = q
            .prepare(bufs, |p, mut free| {
                assert_eq!((p.len(), free.len()), (n, n));
                for _ in 0..STEPS {
                    w.step += 1;
                    step(&mut w, p, &mut free);
                }
                if round % 3 == 2 && p.in_flight() > 0 {
                    // The set ends with commands in flight: the queue
                    // keeps their buffers and its close waits for them.
                    return p.in_flight();
                }
                while p.in_flight() > 0 {
                    let r = p.wait(IO_TIMEOUT).unwrap();
                    w.finish(&r);
                    free.push(r.into_slot());
                }
                assert!(p.reap().is_none());
                0
            })
            .unwrap();
        w.tally.dropped_in_flight += left;
        q.close(IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("{}: close after the set: {e}", w.ctx()));
        for i in 0..n {
            if let Some(cmd) = w.running[i].take() {
                assert!(left > 0, "{}: slot {i} still running", w.ctx());
                w.settle(i, cmd);
            }
        }
        // Nothing else holds the buffers now.
        assert_eq!(Arc::strong_count(&w.mem.ram_map), 1, "{}", w.ctx());
        assert_eq!(Arc::strong_count(&w.mem.bar_map), 1, "{}", w.ctx());
    }

    // Every buffer whole, then the written area through the checked API;
    // then the area gets the image's bytes back.
    for b in 0..2 * PER_KIND as usize {
        assert_bytes(
            &w.mem.read(b, 0, BUF_LEN),
            &w.expect[b],
            0,
            &format!("seed {seed}: buffer {b} at the end"),
        );
    }
    let (m, map) = super::nvme::ram(&ioas, 128 << 10);
    for lba in WRITE_AREA.step_by(256) {
        nvme.read_blocks(lba, 256, map.iova(), IO_TIMEOUT).unwrap();
        let mut v = vec![0u8; 128 << 10];
        m.read_at(0, &mut v).unwrap();
        let at = (lba * BLOCK) as usize;
        assert_bytes(
            &v,
            &w.model[at..at + (128 << 10)],
            lba * BLOCK,
            &format!("seed {seed}: the written area at LBA {lba} after the run"),
        );
        m.write_at(0, &nvme_image(lba * BLOCK, 128 << 10)).unwrap();
        nvme.write_blocks(lba, 256, map.iova(), IO_TIMEOUT).unwrap();
    }
    request_host_check(
        "nvme0",
        WRITE_AREA.start * BLOCK,
        &nvme_image(
            WRITE_AREA.start * BLOCK,
            ((WRITE_AREA.end - WRITE_AREA.start) * BLOCK) as usize,
        ),
    );
    let t = &w.tally;
    let summary = format!(
        "nvme prepared test: seed {seed}, {ROUNDS} rounds x {STEPS} steps in {:.1} s: {t:?}",
        started.elapsed().as_secs_f64()
    );
    directive(&summary);
    Kmsg::mark(&summary);
    assert!(
        t.reads_ram > 0 && t.reads_bar > 0 && t.writes_ram > 0 && t.writes_bar > 0,
        "{summary}"
    );
    assert!(
        t.batched > 0 && t.lba_refused > 0 && t.dropped_in_flight > 0,
        "{summary}"
    );
    // Slots were reused: far more commands than slots.
    assert!(t.submitted > ROUNDS * 2 * PER_KIND as usize, "{summary}");
}

/// One random step.
fn step<'id>(w: &mut World, p: &mut Prepared<'_, 'id>, free: &mut Vec<Slot<'id>>) {
    let roll = w.rng.below(100);
    match roll {
        // Submit one.
        0..45 if !free.is_empty() => {
            let slot = free.swap_remove(w.rng.below(free.len() as u64) as usize);
            match w.plan(&slot) {
                Some((op, lba)) => {
                    p.submit(slot, op, lba)
                        .unwrap_or_else(|r| panic!("{}: {r}", w.ctx()));
                    w.tally.submitted += 1;
                }
                None => free.push(slot),
            }
        }
        // Push several, one doorbell.
        45..55 if free.len() >= 2 => {
            let k = 2 + w.rng.below(free.len() as u64 - 1) as usize;
            let mut pushed = 0;
            for _ in 0..k {
                let slot = free.swap_remove(w.rng.below(free.len() as u64) as usize);
                match w.plan(&slot) {
                    Some((op, lba)) => {
                        p.push(slot, op, lba)
                            .unwrap_or_else(|r| panic!("{}: {r}", w.ctx()));
                        pushed += 1;
                    }
                    None => free.push(slot),
                }
            }
            p.ring();
            w.tally.submitted += pushed;
            w.tally.batched += usize::from(pushed > 1);
        }
        // Refused: an LBA whose blocks run past the namespace.
        95..100 if !free.is_empty() => {
            let slot = free.pop().unwrap();
            let blocks = u64::from(p.blocks(slot.index()).unwrap());
            let lba = NS_BLOCKS - blocks + 1 + w.rng.below(4);
            let r = p.submit(slot, Op::Read, lba).unwrap_err();
            assert!(
                matches!(r.problem, NvmeProblem::LbaOutOfRange { .. }),
                "{}: {r}",
                w.ctx()
            );
            free.push(r.slot);
            w.tally.lba_refused += 1;
        }
        // Wait for one (or, with nothing in flight, that is refused).
        _ => {
            if p.in_flight() == 0 {
                assert!(p.reap().is_none(), "{}", w.ctx());
                return;
            }
            let r = p
                .wait(IO_TIMEOUT)
                .unwrap_or_else(|e| panic!("{}: {e}", w.ctx()));
            w.finish(&r);
            free.push(r.into_slot());
        }
    }
}
