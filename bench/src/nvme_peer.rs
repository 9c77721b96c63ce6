//! The **peer** part (issue 26's outside check, only when asked:
//! `--only=peer --peer=PATH`): an NVMe driver written by others, run as a
//! child process, against the engine on the same controller and namespace
//! in one boot.
//!
//! The peer is libvfn's `examples/perf` (a polled read loop over one I/O
//! queue, each command one logical block into a 4 KiB page of its own),
//! built outside this repository and put into the VM by the test bed
//! (`DMABUF_P2P_BENCH_PEER`). Each round runs `perf -q QD -t 1` and the
//! engine's same loop for the same time, three ways: as part 9 drives it
//! (`wait_any`, then `submit_read`), as the peer's loop does (every
//! completion there taken, then that many Reads in one `batch`), and
//! through prepared commands (`wait`, then `submit` on the slot handed
//! back); the order rotates from round to round. Only one
//! driver may hold the controller at a time, so each side opens it for its
//! run and closes it after: the engine's run opens its own `/dev/iommu`,
//! the controller and the buffer and closes them all (no fd of this
//! process to `/dev/iommu` or `/dev/vfio` is left, checked before the next
//! side starts, so nothing of ours is bound or mapped); the peer's run
//! ends when its process has exited (its fds closed by the kernel), and
//! the engine's next open would fail if the controller were still bound.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::pci::PciAddress;
use dmabuf_p2p_engine::Completion;
use dmabuf_p2p_engine::nvme::{Dma, MAX_DEPTH, Nvme, NvmeOptions, Op, QueueOptions};

use crate::nvme::first_nvme;
use crate::nvme_qd::image_byte;
use crate::stats::{Stats, emit, emit_meta};
use crate::{Opts, R};

/// The records' group.
pub const GROUP: &str = "nvmepeer";
/// The queue depths compared.
const DEPTHS: [u16; 2] = [1, 32];
/// Seconds each side runs in a round (the peer's `-t`, whole seconds).
const ROUND_SECS: u64 = 1;
/// A page per command, as the peer's buffer has.
const PAGE: u64 = 4096;
const TIMEOUT: Duration = Duration::from_secs(20);
/// How long the peer may take beyond its run time before it is killed.
const PEER_GRACE: Duration = Duration::from_secs(60);

/// A measure of a round: its name, unit and value.
type Measure = (&'static str, &'static str, fn(&Side) -> f64);

/// One side's round: completions per second, and the mean and the
/// shortest time from submitting a command to taking its completion.
#[derive(Debug, Clone, Copy)]
struct Side {
    iops: f64,
    latency_ns: f64,
    fastest_ns: f64,
}

/// The part: `peer` is the peer's `perf` in the VM.
pub fn run(opts: &Opts, peer: &str) -> R<()> {
    let bdf = first_nvme().ok_or("the peer part needs an NVMe controller in the VM")?;
    let address: PciAddress = bdf.parse()?;
    let (blocks, block) = namespace(address)?;
    emit_meta("peer_device", &bdf);
    emit_meta("peer_block_size", &block.to_string());
    for qd in DEPTHS {
        emit_meta(
            &format!("peer_command_qd{qd}"),
            &peer_args(&bdf, qd)
                .iter()
                .fold(peer.to_owned(), |s, a| s + " " + a),
        );
    }
    let mut lba = 0;
    let mut backend = None;
    // The sides of a round: the engine three ways, and the peer.
    let sides = [
        Some(Style::Plain),
        Some(Style::Batched),
        Some(Style::Prepared),
        None,
    ];
    for qd in DEPTHS {
        let mut got: [Vec<Side>; 4] = Default::default();
        let mut walls = Vec::new();
        opts.budget(9, 41, 150.0).repeat(|i| -> R<()> {
            // Which goes first rotates from round to round.
            for k in 0..sides.len() {
                let which = (i + k) % sides.len();
                if let Some(style) = sides[which] {
                    got[which].push(engine_round(address, qd, style, blocks, block, &mut lba)?);
                    let held = vfio_fds(Path::new("/proc/self/fd"));
                    if !held.is_empty() {
                        return Err(format!(
                            "after the engine's round this process still holds {held:?}"
                        )
                        .into());
                    }
                } else {
                    let (side, wall, seen) = peer_round(peer, &bdf, qd)?;
                    got[which].push(side);
                    walls.push(wall.as_secs_f64() * 1e9);
                    backend = backend.or(seen);
                }
            }
            Ok(())
        })?;
        let x = u64::from(qd);
        let [plain, batched, prepared, theirs] = &got;
        let measures: [Measure; 3] = [
            ("iops", "iops", |s| s.iops),
            ("latency", "ns", |s| s.latency_ns),
            ("fastest", "ns", |s| s.fastest_ns),
        ];
        for (op, unit, f) in measures {
            let of = |v: &[Side]| Stats::of(&v.iter().map(f).collect::<Vec<f64>>());
            let ratio = |v: &[Side], to: &[Side]| {
                let r: Vec<f64> = v.iter().zip(to).map(|(o, p)| f(o) / f(p)).collect();
                Stats::of(&r)
            };
            emit(GROUP, "peer", op, x, unit, &of(theirs));
            emit(GROUP, "engine", op, x, unit, &of(plain));
            emit(GROUP, "ratio", op, x, "ratio", &ratio(plain, theirs));
            emit(GROUP, "engine_batched", op, x, unit, &of(batched));
            emit(
                GROUP,
                "ratio_batched",
                op,
                x,
                "ratio",
                &ratio(batched, theirs),
            );
            emit(GROUP, "engine_prepared", op, x, unit, &of(prepared));
            emit(
                GROUP,
                "ratio_prepared",
                op,
                x,
                "ratio",
                &ratio(prepared, theirs),
            );
            // Within the engine, per round.
            emit(
                GROUP,
                "plain_over_batched",
                op,
                x,
                "ratio",
                &ratio(plain, batched),
            );
        }
        emit(GROUP, "peer", "wall", x, "ns", &Stats::of(&walls));
    }
    emit_meta(
        "peer_backend",
        backend.unwrap_or("not seen (no /dev/iommu nor /dev/vfio/vfio among its fds)"),
    );
    Ok(())
}

/// The peer's arguments for depth `qd`: namespace 1, sequential reads.
fn peer_args(bdf: &str, qd: u16) -> Vec<String> {
    [
        "-d",
        bdf,
        "-N",
        "1",
        "-q",
        &qd.to_string(),
        "-t",
        &ROUND_SECS.to_string(),
        "-p",
        "read",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Namespace 1's size in blocks and its block size (an engine opened and
/// closed again).
fn namespace(address: PciAddress) -> R<(u64, u64)> {
    let iommufd = Iommufd::open()?;
    let ioas = iommufd.alloc_ioas()?;
    let nvme = Nvme::open_with(address, &ioas, Completion::Polling)?;
    let ns = nvme.namespace().ok_or("NVMe namespace 1 is not active")?;
    Ok((ns.blocks, ns.block_size))
}

/// The engine's round: everything opened for it and closed after.
#[allow(clippy::too_many_arguments)]
fn engine_round(
    address: PciAddress,
    qd: u16,
    style: Style,
    blocks: u64,
    block: u64,
    lba: &mut u64,
) -> R<Side> {
    let iommufd = Iommufd::open()?;
    let ioas = iommufd.alloc_ioas()?;
    let polled = QueueOptions::new()
        .depth(qd)
        .completion(Completion::Polling)
        .spin(Duration::MAX);
    let mut nvme = Nvme::open_with_options(
        address,
        &ioas,
        NvmeOptions::new()
            .completion(Completion::Polling)
            .queue(polled),
    )?;
    let len = u64::from(qd) * PAGE;
    let mem = Memfd::new("bench-peer", len)?;
    let map = ioas.map_file(
        &mem,
        ByteRange::new(0, len),
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
    )?;
    let side = match style {
        Style::Prepared => prepared_loop(&mut nvme, map.iova(), &mem, qd, blocks, block, lba)?,
        Style::Plain => engine_loop(&mut nvme, map.iova(), &mem, qd, false, blocks, block, lba)?,
        Style::Batched => engine_loop(&mut nvme, map.iova(), &mem, qd, true, blocks, block, lba)?,
    };
    drop(nvme);
    drop(map);
    drop(ioas);
    drop(iommufd);
    Ok(side)
}

/// How the engine's loop submits and takes completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    /// As part 9 drives it: `wait_any`, then `submit_read` into that
    /// command's page (a doorbell per command).
    Plain,
    /// As the peer's loop does: every completion there is taken
    /// (`poll`, one head doorbell), then as many Reads submitted in one
    /// `batch` (one tail doorbell).
    Batched,
    /// Prepared commands (`IoQueue::prepare`, a slot per page): `wait`,
    /// then `submit` on the slot it hands back (a doorbell per command).
    Prepared,
}

/// QD `qd` for [`ROUND_SECS`]: fill the queue, then resubmit into each
/// command's page after its completion is taken; then drain and check that
/// the last Read into page 0 landed. `batched`: as the peer's loop
/// ([`Style::Batched`]), else as part 9's ([`Style::Plain`]).
#[allow(clippy::too_many_arguments)]
fn engine_loop(
    nvme: &mut Nvme,
    base: u64,
    mem: &Memfd,
    qd: u16,
    batched: bool,
    blocks: u64,
    block: u64,
    lba: &mut u64,
) -> R<Side> {
    let q = nvme.queue();
    let depth = usize::from(qd);
    // By CID: the page and the submit time; by page: the LBA last read.
    let mut page_of = vec![0u16; usize::from(MAX_DEPTH) + 1];
    let mut sent_at = vec![None; page_of.len()];
    let mut lba_of = vec![0u64; depth];
    let mut next = || {
        let l = *lba % blocks;
        *lba = l + 1;
        l
    };
    let run = Duration::from_secs(ROUND_SECS);
    let start = Instant::now();
    {
        let mut batch = q.batch();
        for (page, last) in lba_of.iter_mut().enumerate() {
            let l = next();
            let t = Instant::now();
            let id = batch.read(l, 1, base + page as u64 * PAGE)?;
            page_of[usize::from(id.cid())] = page as u16;
            sent_at[usize::from(id.cid())] = Some(t);
            *last = l;
        }
        batch.submit()?;
    }
    let mut times = Times::default();
    let mut free = Vec::with_capacity(depth);
    let elapsed = loop {
        free.clear();
        if !batched {
            free.push(q.wait_any(TIMEOUT)?);
        } else {
            let spinning = Instant::now();
            let mut looks = 0u32;
            while free.is_empty() {
                while let Some(d) = q.poll()? {
                    free.push(d);
                }
                // The clock every 64 looks, as the engine's own wait.
                looks = looks.wrapping_add(1);
                if looks.is_multiple_of(64) && spinning.elapsed() > TIMEOUT {
                    return Err("engine: no completion within 20 s".into());
                }
            }
        }
        for d in &free {
            let cid = usize::from(d.id.cid());
            let sent: Instant = sent_at[cid].take().ok_or("a completion for no command")?;
            if !d.is_success() {
                return Err(format!("engine: a Read failed: {}", d.status).into());
            }
            times.took(sent);
        }
        let elapsed = start.elapsed();
        if elapsed >= run {
            break elapsed;
        }
        if !batched {
            let page = page_of[usize::from(free[0].id.cid())];
            let l = next();
            let t = Instant::now();
            let id = q.submit_read(l, 1, base + u64::from(page) * PAGE)?;
            page_of[usize::from(id.cid())] = page;
            sent_at[usize::from(id.cid())] = Some(t);
            lba_of[usize::from(page)] = l;
        } else {
            let mut batch = q.batch();
            for d in &free {
                let page = page_of[usize::from(d.id.cid())];
                let l = next();
                let t = Instant::now();
                let id = batch.read(l, 1, base + u64::from(page) * PAGE)?;
                page_of[usize::from(id.cid())] = page;
                sent_at[usize::from(id.cid())] = Some(t);
                lba_of[usize::from(page)] = l;
            }
            batch.submit()?;
        }
    };
    while q.in_flight() > 0 {
        let d = q.wait_any(TIMEOUT)?;
        q.check(d)?;
    }
    check_page0(mem, lba_of[0], block)?;
    Ok(times.side(elapsed))
}

/// A round's completions: how many, and their times since submit.
#[derive(Debug)]
struct Times {
    done: u64,
    total_ns: f64,
    fastest_ns: f64,
}

impl Default for Times {
    fn default() -> Self {
        Self {
            done: 0,
            total_ns: 0.0,
            fastest_ns: f64::INFINITY,
        }
    }
}

impl Times {
    /// A completion taken of a command submitted at `sent`.
    fn took(&mut self, sent: Instant) {
        let ns = sent.elapsed().as_secs_f64() * 1e9;
        self.total_ns += ns;
        self.fastest_ns = self.fastest_ns.min(ns);
        self.done += 1;
    }

    /// The round's side, over `elapsed`.
    fn side(&self, elapsed: Duration) -> Side {
        Side {
            iops: self.done as f64 / elapsed.as_secs_f64(),
            latency_ns: self.total_ns / self.done as f64,
            fastest_ns: self.fastest_ns,
        }
    }
}

/// [`engine_loop`] through prepared commands: a slot per page, each
/// completion's slot resubmitted at once (a doorbell per command).
fn prepared_loop(
    nvme: &mut Nvme,
    base: u64,
    mem: &Memfd,
    qd: u16,
    blocks: u64,
    block: u64,
    lba: &mut u64,
) -> R<Side> {
    let depth = usize::from(qd);
    let mut sent_at: Vec<Option<Instant>> = vec![None; depth];
    let mut lba_of = vec![0u64; depth];
    let mut next = || {
        let l = *lba % blocks;
        *lba = l + 1;
        l
    };
    let run = Duration::from_secs(ROUND_SECS);
    let pages = (0..u64::from(qd)).map(|i| (Dma::at(base + i * PAGE), 1));
    let side = nvme.queue().prepare(pages, |p, mut free| -> R<Side> {
        let start = Instant::now();
        for slot in free.drain(..) {
            let page = usize::from(slot.index());
            let l = next();
            sent_at[page] = Some(Instant::now());
            p.push(slot, Op::Read, l)
                .map_err(|r| r.problem.to_string())?;
            lba_of[page] = l;
        }
        p.ring();
        let mut times = Times::default();
        let elapsed = loop {
            let r = p.wait(TIMEOUT)?;
            let page = usize::from(r.index());
            let sent = sent_at[page].take().ok_or("a completion for no command")?;
            if !r.is_success() {
                return Err(format!("engine: a Read failed: {}", r.status()).into());
            }
            times.took(sent);
            let elapsed = start.elapsed();
            if elapsed >= run {
                break elapsed;
            }
            let l = next();
            sent_at[page] = Some(Instant::now());
            p.submit(r.into_slot(), Op::Read, l)
                .map_err(|r| r.problem.to_string())?;
            lba_of[page] = l;
        };
        while p.in_flight() > 0 {
            let r = p.wait(TIMEOUT)?;
            if !r.is_success() {
                return Err(format!("engine: a Read failed: {}", r.status()).into());
            }
        }
        Ok(times.side(elapsed))
    })??;
    check_page0(mem, lba_of[0], block)?;
    Ok(side)
}

/// Page 0 holds LBA `lba`'s first bytes (the last Read into it landed).
fn check_page0(mem: &Memfd, lba: u64, block: u64) -> R<()> {
    let mut head = [0u8; 16];
    mem.read_at(0, &mut head)?;
    let want: Vec<u8> = (0..16).map(|i| image_byte(lba * block + i)).collect();
    if head[..] != want[..] {
        return Err(format!("engine: page 0 does not hold LBA {lba}: {head:02x?}").into());
    }
    Ok(())
}

/// The peer's round: `perf` run to its end; what it printed, its wall
/// time, and which IOMMU interface its open fds showed.
fn peer_round(peer: &str, bdf: &str, qd: u16) -> R<(Side, Duration, Option<&'static str>)> {
    let out = Path::new("/tmp/peer.out");
    let err = Path::new("/tmp/peer.err");
    let start = Instant::now();
    let mut child = Command::new(peer)
        .args(peer_args(bdf, qd))
        .stdin(Stdio::null())
        .stdout(fs::File::create(out)?)
        .stderr(fs::File::create(err)?)
        .spawn()
        .map_err(|e| format!("starting {peer}: {e}"))?;
    let fds = format!("/proc/{}/fd", child.id());
    let mut seen = None;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if seen.is_none() {
            seen = backend(&vfio_fds(Path::new(&fds)));
        }
        if start.elapsed() > Duration::from_secs(ROUND_SECS) + PEER_GRACE {
            child.kill()?;
            child.wait()?;
            return Err(format!("{peer} did not end within {PEER_GRACE:?} of its run time").into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = start.elapsed();
    let text = fs::read_to_string(out)?;
    let errors = fs::read_to_string(err)?;
    if !status.success() {
        return Err(format!("{peer} (QD{qd}) failed: {status}\n{text}{errors}").into());
    }
    for line in text.lines() {
        println!("peer: QD{qd}: {line}");
    }
    let side = parse_perf(&text)
        .ok_or_else(|| format!("{peer} (QD{qd}): no result line in\n{text}{errors}"))?;
    Ok((side, wall, seen))
}

/// The result of `perf`: the line after its header `iops mbps lavg lmin
/// lmax` (latencies in µs).
fn parse_perf(text: &str) -> Option<Side> {
    let mut lines = text.lines().map(str::split_whitespace);
    lines.find(|l| l.clone().eq(["iops", "mbps", "lavg", "lmin", "lmax"]))?;
    let v: Vec<f64> = lines
        .next()?
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    match v[..] {
        [iops, _, lavg, lmin, _] if iops > 0.0 => Some(Side {
            iops,
            latency_ns: lavg * 1e3,
            fastest_ns: lmin * 1e3,
        }),
        _ => None,
    }
}

/// The targets of the fds in `dir` (a `/proc/PID/fd`) that are
/// `/dev/iommu` or under `/dev/vfio`.
fn vfio_fds(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| t == "/dev/iommu" || t.starts_with("/dev/vfio/"))
        .collect()
}

/// Which IOMMU interface a process's fds show.
fn backend(fds: &[String]) -> Option<&'static str> {
    let has = |f: &dyn Fn(&String) -> bool| fds.iter().any(f);
    if has(&|t| t == "/dev/iommu") && has(&|t| t.starts_with("/dev/vfio/devices/")) {
        Some("iommufd (its fds: /dev/iommu and the VFIO device cdev /dev/vfio/devices/vfioN)")
    } else if has(&|t| t == "/dev/vfio/vfio") {
        Some("VFIO type1 (its fds: the container /dev/vfio/vfio and a group)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What libvfn's `perf -q 1 -t 1` printed in the bench VM
    /// (2026-12-07, the run on docs/BENCHMARKS.md; stdout not a terminal,
    /// so no running stats).
    #[test]
    fn perf_result_parses() {
        let text = "      iops       mbps       lavg       lmin       lmax\n   \
                    9560.00       4.67     104.38      17.75    9718.46\n";
        let s = parse_perf(text).unwrap();
        assert_eq!(s.iops, 9560.0);
        assert!((s.latency_ns - 104_380.0).abs() < 1e-6);
        assert!((s.fastest_ns - 17_750.0).abs() < 1e-6);
        assert!(parse_perf("      iops       mbps       lavg       lmin       lmax\n").is_none());
        assert!(parse_perf("perf: failed to init nvme controller\n").is_none());
    }

    #[test]
    fn backend_from_fds() {
        let fds = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(
            backend(&fds(&["/dev/iommu", "/dev/vfio/devices/vfio1"]))
                .unwrap()
                .starts_with("iommufd")
        );
        assert!(
            backend(&fds(&["/dev/vfio/vfio", "/dev/vfio/7"]))
                .unwrap()
                .starts_with("VFIO type1")
        );
        assert_eq!(backend(&fds(&["/dev/iommu"])), None);
    }
}
