//! Part 9, **nvmeqd**: the NVMe engine's queues against a raw driver loop
//! written here, on the same controller, namespace, queue memory and BAR.
//!
//! The control drives the engine's own queue through
//! [`IoQueue::with_raw`]: it writes each 64-byte submission entry by hand
//! into the queue's ring (and a PRP list into the queue's list page for
//! transfers over two pages), rings the doorbell, and spins on (or, for the
//! interrupt row, blocks on the eventfd of) the completion queue's phase
//! tag, consuming entries and ringing the head doorbell as the engine does.
//! What the engine adds is what the control leaves out: request checks,
//! command IDs it gives out and hands back once, the buffers it keeps, its
//! errors.
//!
//! A third path, **prepared**, is the engine's hot path
//! ([`IoQueue::prepare`]): the row's buffers registered once per round
//! (outside the timed span), each command then its slot's entry with the
//! LBA filled in, and its slot token handed back by the reap.
//!
//! Rows, each engine and control interleaved in rounds (which goes first
//! alternates): QD1 latency, polled (spinning) and by MSI-X; the time per
//! command at QD 1, 8 and 32 of 4 KiB and 128 KiB Reads into host RAM and
//! into the ivshmem BAR (its dma-buf mapped in the IOAS), on one queue and
//! on two (a thread each); every row resubmits after each completion taken
//! (`wait_any`, or the control's equivalent), the loop of issue 26. Then
//! the cost of one command's submit and reap alone (the clock stopped while
//! waiting for the device), which the instruction-clock VM counts in
//! instructions.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};
use std::time::{Duration, Instant};

use dmabuf_p2p::importer::iommufd::{Ioas, IoasMapping, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::vfio::BarMapping;
use dmabuf_p2p::{ByteRange, VfioPciDevice};
use dmabuf_p2p_engine::Completion;
use dmabuf_p2p_engine::nvme::{
    Dma, IoQueue, Nvme, NvmeOptions, Op, Prepared, QueueOptions, RawQueue, Slot,
};

use crate::nvme::first_nvme;
use crate::stats::{Stats, emit, emit_meta, ns_since};
use crate::{Opts, R};

/// Slots of the buffers: the deepest row's commands, each its own area.
const SLOTS: u64 = 32;
/// Bytes per slot: the largest transfer.
const SLOT: u64 = 128 << 10;
/// Where the BAR area is (clear of part 7's first MiB).
const BAR_AREA: u64 = 16 << 20;
const TIMEOUT: Duration = Duration::from_secs(20);
/// The namespace's blocks (nvme0: 4 MiB of 512-byte blocks) and block size.
const BLOCK: u64 = 512;

/// The records' group.
pub const GROUP: &str = "nvmeqd";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Ram,
    Bar,
}

/// Which way a round drives the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The engine's checked API (`submit_read`, `wait`, `wait_any`).
    Engine,
    /// The engine's prepared commands.
    Prepared,
    /// The raw loop written here.
    Control,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Self::Engine => "engine",
            Self::Prepared => "prepared",
            Self::Control => "control",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Polled, spinning on the completion queue.
    Spin,
    /// MSI-X: blocking on the queue's eventfd.
    Irq,
}

/// One row: what runs, and how it is named in the records (`op`, with the
/// transfer size as `x`).
#[derive(Debug, Clone, Copy)]
struct Row {
    op: &'static str,
    queues: usize,
    qd: u16,
    size: u64,
    target: Target,
    wait: Wait,
    /// Per-command latency (QD1) rather than time per completion.
    latency: bool,
}

/// The memory the rows read into.
struct Areas {
    ram: Arc<IoasMapping>,
    ram_mem: Memfd,
    bar: Arc<IoasMapping>,
    bar_cpu: BarMapping,
}

impl Areas {
    fn iova(&self, t: Target) -> u64 {
        match t {
            Target::Ram => self.ram.iova(),
            Target::Bar => self.bar.iova(),
        }
    }

    /// The first 16 bytes of `slot` of queue `q`'s half.
    fn head(&self, t: Target, q: usize, slot: u64) -> R<[u8; 16]> {
        let mut b = [0u8; 16];
        let at = (q as u64 * SLOTS + slot) * SLOT;
        match t {
            Target::Ram => self.ram_mem.read_at(at, &mut b)?,
            Target::Bar => self.bar_cpu.read(BAR_AREA + at, &mut b)?,
        }
        Ok(b)
    }

    fn clear_head(&self, t: Target, q: usize, slot: u64) -> R<()> {
        let at = (q as u64 * SLOTS + slot) * SLOT;
        match t {
            Target::Ram => self.ram_mem.write_at(at, &[0u8; 16])?,
            Target::Bar => self.bar_cpu.write(BAR_AREA + at, &[0u8; 16])?,
        }
        Ok(())
    }
}

/// The byte at `offset` of the test bed's NVMe images (the test bed's
/// `nvme_image_byte`): a read that landed is checked against it.
pub(crate) fn image_byte(offset: u64) -> u8 {
    let mut z = (offset / 8).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    z.to_le_bytes()[(offset % 8) as usize]
}

/// Sequential LBAs of `size`-byte reads, from a start of its own.
struct Lbas {
    next: u64,
    step: u64,
    end: u64,
}

impl Lbas {
    fn new(size: u64, blocks: u64, start: u64) -> Self {
        let step = size / BLOCK;
        Self {
            next: start % (blocks - step),
            step,
            end: blocks - step,
        }
    }

    #[inline]
    fn take(&mut self) -> u64 {
        let l = self.next;
        self.next += self.step;
        if self.next > self.end {
            self.next = 0;
        }
        l
    }
}

/// What one round of a row measured: ns per command (median of the
/// commands' latencies, or the round's time over its completions), and the
/// LBA last read into slot 0, to check that it landed.
struct Round {
    ns: f64,
    slot0_lba: Option<u64>,
}

/// The part; with `cost_only`, the cost of one command alone (what the
/// instruction-clock VM runs).
pub fn queue_depth(opts: &Opts, dev: &VfioPciDevice, ioas: &Ioas, cost_only: bool) -> R<()> {
    let Some(bdf) = first_nvme() else {
        emit_meta("nvmeqd", "no NVMe controller in this VM: part skipped");
        return Ok(());
    };
    // Queue 1 (the engine's own) stays idle; rows make theirs.
    let nvme = Nvme::open_with_options(bdf.parse()?, ioas, NvmeOptions::new().io_queues(3))?;
    let blocks = nvme.namespace().map_or(0, |n| n.blocks);
    emit_meta("nvmeqd_device", &bdf);
    let len = 2 * SLOTS * SLOT;
    let ram_mem = Memfd::new("bench-nvmeqd", len)?;
    let ram = Arc::new(ioas.map_file(
        &ram_mem,
        ByteRange::new(0, len),
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
    )?);
    let export = dev.export_bar(2, &[ByteRange::new(BAR_AREA, len)])?;
    let bar =
        Arc::new(ioas.map_dmabuf(export.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite)?);
    let areas = Areas {
        ram,
        ram_mem,
        bar,
        bar_cpu: dev.map_bar(2)?,
    };

    let mut rows = vec![
        Row {
            op: "latency_polled",
            queues: 1,
            qd: 1,
            size: 4096,
            target: Target::Ram,
            wait: Wait::Spin,
            latency: true,
        },
        Row {
            op: "latency_irq",
            queues: 1,
            qd: 1,
            size: 4096,
            target: Target::Ram,
            wait: Wait::Irq,
            latency: true,
        },
    ];
    for (queues, names) in [
        (
            1,
            [
                "q1_qd1_ram",
                "q1_qd8_ram",
                "q1_qd32_ram",
                "q1_qd1_bar",
                "q1_qd8_bar",
                "q1_qd32_bar",
            ],
        ),
        (
            2,
            [
                "q2_qd1_ram",
                "q2_qd8_ram",
                "q2_qd32_ram",
                "q2_qd1_bar",
                "q2_qd8_bar",
                "q2_qd32_bar",
            ],
        ),
    ] {
        for (i, target) in [Target::Ram, Target::Bar].into_iter().enumerate() {
            for (j, qd) in [1u16, 8, 32].into_iter().enumerate() {
                for size in [4096u64, 128 << 10] {
                    rows.push(Row {
                        op: names[i * 3 + j],
                        queues,
                        qd,
                        size,
                        target,
                        wait: Wait::Spin,
                        latency: false,
                    });
                }
            }
        }
    }
    if !cost_only {
        for row in &rows {
            measure_row(opts, &nvme, &areas, blocks, row)?;
        }
    }
    for size in [4096u64, 128 << 10] {
        command_cost(opts, &nvme, &areas, blocks, size)?;
    }
    Ok(())
}

/// Runs `row` in interleaved rounds and emits engine, prepared, control
/// and the ratios to the control (time per command).
fn measure_row(opts: &Opts, nvme: &Nvme, areas: &Areas, blocks: u64, row: &Row) -> R<()> {
    let completion = match row.wait {
        Wait::Spin => Completion::Polling,
        Wait::Irq => Completion::Interrupt,
    };
    let spin = match row.wait {
        Wait::Spin => Duration::MAX,
        Wait::Irq => Duration::ZERO,
    };
    let mut queues: Vec<IoQueue> = (0..row.queues)
        .map(|_| {
            nvme.create_queue(
                QueueOptions::new()
                    .depth(row.qd)
                    .completion(completion)
                    .spin(spin),
            )
        })
        .collect::<Result<_, _>>()?;
    // Commands per round and queue: enough to fill the queue many times.
    let per_round = match (row.latency, row.size) {
        (true, _) => 64,
        (false, 4096) => 256,
        (false, _) => 64,
    };
    let budget = opts.budget(15, 61, 10.0);
    let (mut engine, mut prepared, mut raw) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ratio, mut ratio_prepared) = (Vec::new(), Vec::new());
    // One untimed round of each first.
    let mut lbas: Vec<Lbas> = (0..row.queues)
        .map(|q| Lbas::new(row.size, blocks, q as u64 * 4096))
        .collect();
    const PATHS: [Path; 3] = [Path::Engine, Path::Prepared, Path::Control];
    for path in PATHS {
        run_round(&mut queues, areas, row, &mut lbas, per_round, path)?;
    }
    budget.repeat(|i| -> R<()> {
        // Which path goes first rotates.
        let mut got = [0.0; 3];
        for k in 0..3 {
            let at = (i + k) % 3;
            got[at] = run_round(&mut queues, areas, row, &mut lbas, per_round, PATHS[at])?;
        }
        engine.push(got[0]);
        prepared.push(got[1]);
        raw.push(got[2]);
        ratio.push(got[0] / got[2]);
        ratio_prepared.push(got[1] / got[2]);
        Ok(())
    })?;
    emit(GROUP, "engine", row.op, row.size, "ns", &Stats::of(&engine));
    emit(
        GROUP,
        "prepared",
        row.op,
        row.size,
        "ns",
        &Stats::of(&prepared),
    );
    emit(GROUP, "raw", row.op, row.size, "ns", &Stats::of(&raw));
    emit(
        GROUP,
        "ratio",
        row.op,
        row.size,
        "ratio",
        &Stats::of(&ratio),
    );
    emit(
        GROUP,
        "ratio_prepared",
        row.op,
        row.size,
        "ratio",
        &Stats::of(&ratio_prepared),
    );
    Ok(())
}

/// One round on every queue of the row (a thread each when two); ns per
/// command: the median latency (QD1 rows), or the slowest queue's time
/// over its completions.
fn run_round(
    queues: &mut [IoQueue],
    areas: &Areas,
    row: &Row,
    lbas: &mut [Lbas],
    per_round: usize,
    path: Path,
) -> R<f64> {
    for q in 0..queues.len() {
        areas.clear_head(row.target, q, 0)?;
    }
    let rounds: Vec<Round> = if queues.len() == 1 {
        vec![one_queue(
            &mut queues[0],
            areas,
            row,
            &mut lbas[0],
            0,
            per_round,
            path,
        )?]
    } else {
        std::thread::scope(|s| -> R<Vec<Round>> {
            let handles: Vec<_> = queues
                .iter_mut()
                .zip(lbas.iter_mut())
                .enumerate()
                .map(|(qi, (q, l))| {
                    s.spawn(move || {
                        one_queue(q, areas, row, l, qi, per_round, path).map_err(|e| e.to_string())
                    })
                })
                .collect();
            let mut out = Vec::new();
            for h in handles {
                out.push(h.join().map_err(|_| "a queue's thread panicked")??);
            }
            Ok(out)
        })?
    };
    // What went to slot 0 last is there: the reads landed.
    for (qi, r) in rounds.iter().enumerate() {
        if let Some(lba) = r.slot0_lba {
            let got = areas.head(row.target, qi, 0)?;
            let want: Vec<u8> = (0..16).map(|i| image_byte(lba * BLOCK + i)).collect();
            if got[..] != want[..] {
                return Err(format!(
                    "{} ({}): slot 0 of queue {qi} does not hold LBA {lba}: {got:02x?}",
                    row.op,
                    path.name()
                )
                .into());
            }
        }
    }
    Ok(rounds.iter().map(|r| r.ns).fold(0.0, f64::max))
}

fn one_queue(
    q: &mut IoQueue,
    areas: &Areas,
    row: &Row,
    lbas: &mut Lbas,
    qi: usize,
    n: usize,
    path: Path,
) -> R<Round> {
    let base = areas.iova(row.target) + qi as u64 * SLOTS * SLOT;
    if path == Path::Engine {
        if row.latency {
            engine_latency(q, row, base, lbas, n)
        } else {
            engine_depth(q, row, base, lbas, n)
        }
    } else if path == Path::Prepared {
        let blocks = (row.size / BLOCK) as u32;
        q.prepare(
            (0..u64::from(row.qd)).map(|i| (Dma::at(base + i * SLOT), blocks)),
            |p, slots| {
                if row.latency {
                    prepared_latency(p, slots, lbas, n)
                } else {
                    prepared_depth(p, slots, lbas, n)
                }
            },
        )?
    } else {
        let r = q.with_raw(|raw| {
            if row.latency {
                raw_latency(raw, row, base, lbas, n)
            } else {
                raw_depth(raw, row, base, lbas, n)
            }
        })?;
        Ok(r?)
    }
}

// ---------------------------------------------------------------------------
// The engine
// ---------------------------------------------------------------------------

/// QD1: submit, wait for that command, `n` times; the median latency.
fn engine_latency(q: &mut IoQueue, row: &Row, base: u64, lbas: &mut Lbas, n: usize) -> R<Round> {
    let blocks = (row.size / BLOCK) as u32;
    let mut lat = Vec::with_capacity(n);
    let mut last = 0;
    for _ in 0..n {
        last = lbas.take();
        let t = Instant::now();
        let id = q.submit_read(last, blocks, base)?;
        q.wait(id, TIMEOUT)?;
        lat.push(ns_since(t));
    }
    Ok(Round {
        ns: Stats::of(&lat).median,
        slot0_lba: Some(last),
    })
}

/// QD `row.qd`: fill the queue, then resubmit into each command's slot
/// after its completion is taken (`wait_any`), until `n` completed.
fn engine_depth(q: &mut IoQueue, row: &Row, base: u64, lbas: &mut Lbas, n: usize) -> R<Round> {
    let blocks = (row.size / BLOCK) as u32;
    let qd = usize::from(row.qd);
    // Slot of each CID, and the LBA last read into each slot.
    let mut slot_of = [0u16; SLOTS as usize];
    let mut lba_of = [0u64; SLOTS as usize];
    let t = Instant::now();
    for (slot, last) in lba_of.iter_mut().enumerate().take(qd) {
        let lba = lbas.take();
        let id = q.submit_read(lba, blocks, base + slot as u64 * SLOT)?;
        slot_of[usize::from(id.cid())] = slot as u16;
        *last = lba;
    }
    let (mut submitted, mut done) = (qd, 0);
    while done < n {
        let d = q.wait_any(TIMEOUT)?;
        if !d.is_success() {
            return Err(format!("engine: a Read failed: {}", d.status).into());
        }
        done += 1;
        let slot = slot_of[usize::from(d.id.cid())];
        if submitted < n {
            let lba = lbas.take();
            let id = q.submit_read(lba, blocks, base + u64::from(slot) * SLOT)?;
            slot_of[usize::from(id.cid())] = slot;
            lba_of[usize::from(slot)] = lba;
            submitted += 1;
        }
    }
    let ns = ns_since(t) / n as f64;
    Ok(Round {
        ns,
        slot0_lba: Some(lba_of[0]),
    })
}

// ---------------------------------------------------------------------------
// The engine's prepared commands
// ---------------------------------------------------------------------------

/// QD1, one prepared slot: submit, wait for it, `n` times; the median
/// latency.
fn prepared_latency<'id>(
    p: &mut Prepared<'_, 'id>,
    slots: Vec<Slot<'id>>,
    lbas: &mut Lbas,
    n: usize,
) -> R<Round> {
    let mut slot = slots.into_iter().next().ok_or("no prepared slot")?;
    let mut lat = Vec::with_capacity(n);
    let mut last = 0;
    for _ in 0..n {
        last = lbas.take();
        let t = Instant::now();
        p.submit(slot, Op::Read, last).map_err(|r| r.problem)?;
        let done = p.wait(TIMEOUT)?;
        lat.push(ns_since(t));
        if !done.is_success() {
            return Err(format!("prepared: a Read failed: {}", done.status()).into());
        }
        slot = done.into_slot();
    }
    Ok(Round {
        ns: Stats::of(&lat).median,
        slot0_lba: Some(last),
    })
}

/// QD = the slots: fill the queue, then resubmit each slot as its
/// completion is reaped, until `n` completed.
fn prepared_depth<'id>(
    p: &mut Prepared<'_, 'id>,
    slots: Vec<Slot<'id>>,
    lbas: &mut Lbas,
    n: usize,
) -> R<Round> {
    let mut lba_of = [0u64; SLOTS as usize];
    let t = Instant::now();
    let qd = slots.len();
    for slot in slots {
        let lba = lbas.take();
        lba_of[usize::from(slot.index())] = lba;
        p.submit(slot, Op::Read, lba).map_err(|r| r.problem)?;
    }
    let (mut submitted, mut done) = (qd, 0);
    while done < n {
        let d = p.wait(TIMEOUT)?;
        if !d.is_success() {
            return Err(format!("prepared: a Read failed: {}", d.status()).into());
        }
        done += 1;
        if submitted < n {
            let lba = lbas.take();
            lba_of[usize::from(d.index())] = lba;
            p.submit(d.into_slot(), Op::Read, lba)
                .map_err(|r| r.problem)?;
            submitted += 1;
        }
    }
    let ns = ns_since(t) / n as f64;
    Ok(Round {
        ns,
        slot0_lba: Some(lba_of[0]),
    })
}

// ---------------------------------------------------------------------------
// The control: the same queue, driven by hand
// ---------------------------------------------------------------------------

/// NVM Read.
const READ: u64 = 0x02;
const PAGE: u64 = 4096;

/// Writes a Read of `blocks` from `lba` into `iova` at submission slot
/// `tail` with command ID `cid`, its PRP list (over two pages) into the
/// list page of `cid`.
#[inline]
fn raw_entry(raw: &RawQueue, tail: u16, cid: u16, lba: u64, blocks: u64, iova: u64) {
    let len = blocks * BLOCK;
    let first = PAGE - (iova & (PAGE - 1));
    let (prp1, prp2) = if len <= first {
        (iova, 0)
    } else if len - first <= PAGE {
        (iova, iova + first)
    } else {
        let second = iova + first;
        let pages = (len - first).div_ceil(PAGE);
        let list = raw
            .lists
            .wrapping_add(usize::from(cid) * PAGE as usize)
            .cast::<u64>();
        for i in 0..pages as usize {
            // SAFETY: the list page of `cid` (< depth) is in the queue's
            // memory, 512 entries; `pages` is at most 32 here.
            unsafe {
                list.wrapping_add(i)
                    .write_volatile(second + i as u64 * PAGE)
            };
        }
        (iova, raw.lists_iova + u64::from(cid) * PAGE)
    };
    let sqe = raw.sq.wrapping_add(usize::from(tail) * 64).cast::<u64>();
    let words = [
        READ | (u64::from(cid) << 16) | (u64::from(raw.nsid) << 32),
        0,
        0,
        prp1,
        prp2,
        lba,
        blocks - 1,
        0,
    ];
    for (i, w) in words.into_iter().enumerate() {
        // SAFETY: entry `tail` (< entries) of the submission ring, 64 bytes.
        unsafe { sqe.wrapping_add(i).write_volatile(w) };
    }
}

/// Rings the submission doorbell with `tail`.
#[inline]
fn raw_ring(raw: &RawQueue, tail: u16) {
    fence(Ordering::SeqCst);
    raw_announce_head(raw);
    // The engine's doorbell mode (shadow doorbells where the controller
    // took them): the control differs from the engine above the doorbell.
    raw.sq_bell.write(u32::from(tail));
}

/// The completion at the head if it is new: its CID and status field.
#[inline]
fn raw_peek(raw: &RawQueue) -> Option<(u16, u32)> {
    let e = raw.cq.wrapping_add(usize::from(raw.cq_head) * 16);
    // SAFETY: entry `cq_head` (< entries) of the completion ring.
    let dw3 = unsafe { e.wrapping_add(12).cast::<u32>().read_volatile() };
    if (dw3 & (1 << 16) != 0) != raw.cq_phase {
        return None;
    }
    fence(Ordering::Acquire);
    Some((dw3 as u16, dw3 >> 17))
}

#[inline]
fn raw_advance(raw: &mut RawQueue) {
    raw.cq_head += 1;
    if raw.cq_head == raw.entries {
        raw.cq_head = 0;
        raw.cq_phase = !raw.cq_phase;
    }
}

/// Rings the head doorbell if completions were taken since it was last
/// rung: right before each tail doorbell, as the engine does
/// (`IoQueue::announce_head`).
#[inline]
fn raw_announce_head(raw: &RawQueue) {
    if raw.cq_bell.last() != u32::from(raw.cq_head) {
        raw.cq_bell.write(u32::from(raw.cq_head));
    }
}

/// Blocks on the queue's MSI-X eventfd (up to 20 ms) and clears it.
fn raw_block(fd: RawFd) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut count = 0u64;
    // SAFETY: one pollfd, valid for the call.
    unsafe { libc::poll(&mut p, 1, 20) };
    // SAFETY: an 8-byte read into `count` of a non-blocking eventfd.
    unsafe { libc::read(fd, (&raw mut count).cast(), 8) };
}

/// The next completion, spinning or blocking: CID and status field.
#[inline]
fn raw_wait(raw: &mut RawQueue, wait: Wait) -> R<(u16, u32)> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        if let Some(c) = raw_peek(raw) {
            raw_advance(raw);
            return Ok(c);
        }
        // Spinning: no PAUSE between looks, as the engine (under TCG a
        // PAUSE leaves the translated code).
        if let (Wait::Irq, Some(fd)) = (wait, raw.interrupt) {
            // Before blocking, as the engine's wait.
            raw_announce_head(raw);
            raw_block(fd);
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(64) && start.elapsed() > TIMEOUT {
            return Err("control: no completion within 20 s".into());
        }
    }
}

fn raw_latency(raw: &mut RawQueue, row: &Row, base: u64, lbas: &mut Lbas, n: usize) -> R<Round> {
    let blocks = row.size / BLOCK;
    let mut lat = Vec::with_capacity(n);
    let mut last = 0;
    for _ in 0..n {
        last = lbas.take();
        let t = Instant::now();
        let tail = raw.sq_tail;
        raw_entry(raw, tail, 0, last, blocks, base);
        raw.sq_tail = if tail + 1 == raw.entries { 0 } else { tail + 1 };
        raw_ring(raw, raw.sq_tail);
        let (_, status) = raw_wait(raw, row.wait)?;
        if status != 0 {
            return Err(format!("control: a Read failed: status {status:#x}").into());
        }
        lat.push(ns_since(t));
    }
    Ok(Round {
        ns: Stats::of(&lat).median,
        slot0_lba: Some(last),
    })
}

/// The control's queue-depth loop: the engine's, by hand. Every completion
/// the completion queue holds is consumed at once (one head doorbell), as
/// the engine's reap does, and kept in a small ring; each taken completion
/// resubmits into its slot (CID = slot).
fn raw_depth(raw: &mut RawQueue, row: &Row, base: u64, lbas: &mut Lbas, n: usize) -> R<Round> {
    let blocks = row.size / BLOCK;
    let qd = usize::from(row.qd);
    let mut lba_of = [0u64; SLOTS as usize];
    let mut ready = [0u16; SLOTS as usize];
    let (mut ready_head, mut ready_len) = (0usize, 0usize);
    let t = Instant::now();
    for (slot, last) in lba_of.iter_mut().enumerate().take(qd) {
        let lba = lbas.take();
        let tail = raw.sq_tail;
        raw_entry(
            raw,
            tail,
            slot as u16,
            lba,
            blocks,
            base + slot as u64 * SLOT,
        );
        raw.sq_tail = if tail + 1 == raw.entries { 0 } else { tail + 1 };
        raw_ring(raw, raw.sq_tail);
        *last = lba;
    }
    let (mut submitted, mut done) = (qd, 0);
    let start = Instant::now();
    let mut spins = 0u32;
    while done < n {
        if ready_len == 0 {
            // Reap every new completion (the head doorbell goes with the next tail).
            let mut got = 0;
            while let Some((cid, status)) = raw_peek(raw) {
                if status != 0 {
                    return Err(format!("control: a Read failed: status {status:#x}").into());
                }
                raw_advance(raw);
                ready[(ready_head + ready_len) % qd] = cid;
                ready_len += 1;
                got += 1;
            }
            if got == 0 {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) && start.elapsed() > TIMEOUT {
                    return Err("control: no completion within 20 s".into());
                }
                continue;
            }
        }
        let slot = ready[ready_head];
        ready_head = (ready_head + 1) % qd;
        ready_len -= 1;
        done += 1;
        if submitted < n {
            let lba = lbas.take();
            let tail = raw.sq_tail;
            raw_entry(raw, tail, slot, lba, blocks, base + u64::from(slot) * SLOT);
            raw.sq_tail = if tail + 1 == raw.entries { 0 } else { tail + 1 };
            raw_ring(raw, raw.sq_tail);
            lba_of[usize::from(slot)] = lba;
            submitted += 1;
        }
    }
    let ns = ns_since(t) / n as f64;
    Ok(Round {
        ns,
        slot0_lba: Some(lba_of[0]),
    })
}

// ---------------------------------------------------------------------------
// The cost of one command
// ---------------------------------------------------------------------------

/// QD1 on a polled queue: the time of the submit call and of the reap (a
/// wait for a completion already there), with the clock stopped while the
/// device works; minus the time of an empty timed span. On the
/// instruction clock these are instructions. The prepared path runs on a
/// second queue of the same shape (its set holds its queue for the run).
fn command_cost(opts: &Opts, nvme: &Nvme, areas: &Areas, blocks: u64, size: u64) -> R<()> {
    let polled = QueueOptions::new()
        .depth(1)
        .completion(Completion::Polling)
        .spin(Duration::MAX);
    let mut q = nvme.create_queue(polled)?;
    let mut pq = nvme.create_queue(polled)?;
    let base = areas.ram.iova();
    let nblocks = size / BLOCK;
    let mut lbas = Lbas::new(size, blocks, 0);
    pq.prepare([(Dma::at(base), nblocks as u32)], |p, slots| {
        command_cost_in(opts, &mut q, p, slots, base, nblocks, &mut lbas, size)
    })?
}

/// [`command_cost`] with the prepared set made.
#[allow(clippy::too_many_arguments)]
fn command_cost_in<'id>(
    opts: &Opts,
    q: &mut IoQueue,
    p: &mut Prepared<'_, 'id>,
    slots: Vec<Slot<'id>>,
    base: u64,
    nblocks: u64,
    lbas: &mut Lbas,
    size: u64,
) -> R<()> {
    let mut slot = slots.into_iter().next();
    // The clock's own cost, the same way.
    let mut empty = Vec::new();
    for _ in 0..1001 {
        let t = Instant::now();
        empty.push(ns_since(t));
    }
    let clock = Stats::of(&empty).median;
    let (mut e_sub, mut e_reap, mut r_sub, mut r_reap) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut p_sub, mut p_reap) = (Vec::new(), Vec::new());
    let budget = opts.budget(201, 2001, 4.0);
    budget.repeat(|i| -> R<()> {
        for k in 0..3 {
            let path = [Path::Engine, Path::Prepared, Path::Control][(i + k) % 3];
            let lba = lbas.take();
            if path == Path::Prepared {
                let s = slot.take().ok_or("the prepared slot was not handed back")?;
                let t = Instant::now();
                let sent = p.submit(s, Op::Read, lba);
                let sub = ns_since(t);
                sent.map_err(|r| r.problem)?;
                spin_until("prepared", || p.has_completion())?;
                let t = Instant::now();
                let done = p.reap();
                let reap = ns_since(t);
                let done = done.ok_or("prepared: the completion was not reaped")?;
                if !done.is_success() {
                    return Err(format!("prepared: a Read failed: {}", done.status()).into());
                }
                slot = Some(done.into_slot());
                p_sub.push(sub - clock);
                p_reap.push(reap - clock);
            } else if path == Path::Engine {
                let t = Instant::now();
                let id = q.submit_read(lba, nblocks as u32, base)?;
                let sub = ns_since(t);
                spin_until("engine", || q.has_completion())?;
                let t = Instant::now();
                q.wait(id, TIMEOUT)?;
                let reap = ns_since(t);
                e_sub.push(sub - clock);
                e_reap.push(reap - clock);
            } else {
                let (sub, reap) = q.with_raw(|raw| -> R<(f64, f64)> {
                    let t = Instant::now();
                    let tail = raw.sq_tail;
                    raw_entry(raw, tail, 0, lba, nblocks, base);
                    raw.sq_tail = if tail + 1 == raw.entries { 0 } else { tail + 1 };
                    raw_ring(raw, raw.sq_tail);
                    let sub = ns_since(t);
                    spin_until("control", || raw_peek(raw).is_some())?;
                    let t = Instant::now();
                    let (_, status) = raw_peek(raw).unwrap_or((0, u32::MAX));
                    raw_advance(raw);
                    let reap = ns_since(t);
                    if status != 0 {
                        return Err(format!("control: a Read failed: status {status:#x}").into());
                    }
                    Ok((sub, reap))
                })??;
                r_sub.push(sub - clock);
                r_reap.push(reap - clock);
            }
        }
        Ok(())
    })?;
    let total = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<f64>>();
    emit(
        GROUP,
        "engine",
        "cost_submit",
        size,
        "ns",
        &Stats::of(&e_sub),
    );
    emit(GROUP, "raw", "cost_submit", size, "ns", &Stats::of(&r_sub));
    emit(
        GROUP,
        "prepared",
        "cost_submit",
        size,
        "ns",
        &Stats::of(&p_sub),
    );
    emit(
        GROUP,
        "prepared",
        "cost_reap",
        size,
        "ns",
        &Stats::of(&p_reap),
    );
    emit(
        GROUP,
        "prepared",
        "cost_total",
        size,
        "ns",
        &Stats::of(&total(&p_sub, &p_reap)),
    );
    emit(
        GROUP,
        "engine",
        "cost_reap",
        size,
        "ns",
        &Stats::of(&e_reap),
    );
    emit(GROUP, "raw", "cost_reap", size, "ns", &Stats::of(&r_reap));
    emit(
        GROUP,
        "engine",
        "cost_total",
        size,
        "ns",
        &Stats::of(&total(&e_sub, &e_reap)),
    );
    emit(
        GROUP,
        "raw",
        "cost_total",
        size,
        "ns",
        &Stats::of(&total(&r_sub, &r_reap)),
    );
    emit(
        GROUP,
        "meta_clock",
        "cost_clock",
        size,
        "ns",
        &Stats::of(&empty),
    );
    Ok(())
}

/// Spins until `ready` (outside any timed span: the cost loop times the
/// submit and the reap, not the device's work); `who`'s error after
/// [`TIMEOUT`].
fn spin_until(who: &str, mut ready: impl FnMut() -> bool) -> R<()> {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > TIMEOUT {
            return Err(format!("{who}: no completion within 20 s").into());
        }
    }
    Ok(())
}
