//! `dmabuf-p2p-bench`: the benchmarks behind `docs/BENCHMARKS.md`. Runs inside
//! the test VM (`cargo xtask bench` builds it, boots the VM with one 64 GiB
//! ivshmem BAR and collects what it prints); each result is one line
//! `@@bench {json}` on stdout. It measures the largest ivshmem BAR it finds.
//!
//! The parts, in the order they run and the page shows them:
//!
//! 1. **sweep**: map and unmap cost against size, for a BAR dma-buf
//!    (`IOMMU_IOAS_MAP_FILE`), the legacy type1 container
//!    (`VFIO_IOMMU_MAP_DMA` of the mmap'd BAR) and a memfd (`MAP_FILE`).
//! 2. **overhead**: export, map, unmap and close through the library and
//!    through raw ioctls ([`raw`], on the bench's own uAPI definitions,
//!    [`uapi`]), interleaved, as ratios per operation; **profile**: the
//!    steps the library adds around the ioctls, timed alone.
//! 3. **revoke**: memory decode off (revoke) and on (restore) with N
//!    single-page attachments.
//! 4. **scale**: exporting and mapping N single-page dma-bufs: time per
//!    buffer and kernel memory per buffer.
//! 5. **placement**: a BAR range mapped where the kernel places it, where
//!    the library places it (`IovaPlacement::Auto`) and at an aligned fixed
//!    IOVA: map and unmap time, the IOVA's alignment, IOMMU page-table pages.
//! 6. **threads**: restoring N revoked mappings (unmap + map each) from one
//!    thread and from two.
//! 7. **nvme**: an NVMe controller's Reads into host RAM and into the BAR
//!    (through its dma-buf IOVA), interleaved, as a ratio per size
//!    (`dmabuf-p2p-engine`'s NVMe driver).
//! 8. **vmm** ([`vmm`]): `GuestBarMap`'s handling of trapped guest writes
//!    against a hand-written VMM path, and registering 8 devices with
//!    64 KiB and 64 GiB BARs; in a VM of its own with 72 ivshmem devices,
//!    only when asked (`--only=vmm`).
//! 9. **nvmeqd**: the NVMe engine's queues at depth 1, 8 and 32, one queue
//!    and two, against a raw driver loop on the same queue memory
//!    ([`nvme_qd`]); QD1 latency polled and by MSI-X; the cost of one
//!    command's submit and reap.
//! 10. **firstexport**: the first BAR export of a freshly opened device
//!     against the second, and the raw export between them.
//!
//! And only when asked (`--only=peer --peer=PATH`), alone: **peer**
//! ([`nvme_peer`]), an outside NVMe driver (libvfn's `perf`) against the
//! engine on the same controller, issue 26's outside check.
//!
//! Every figure is the median of repeated runs, with min and max. Options:
//! `--quick` (a quarter of the time budgets), `--only=sweep,overhead,...`,
//! `--peer=PATH`.

mod first_export;
mod nvme;
mod nvme_peer;
mod nvme_qd;
mod raw;
mod stats;
mod uapi;
mod vmm;

use std::error::Error;
use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::process::ExitCode;
use std::time::Instant;

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::importer::iommufd::{Ioas, Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::revoke::{Attachment, RestorePolicy};
use dmabuf_p2p::vfio::VfioPciDevice;

use stats::{Budget, Stats, emit, emit_meta, ns_since};

type R<T> = Result<T, Box<dyn Error>>;

/// The BAR under test (ivshmem's shared memory).
const BAR: u32 = 2;
/// Where every fixed mapping goes: 64 GiB, so that every mapping up to the
/// whole 64 GiB BAR is naturally aligned and clear of the MSI window at
/// 0xfee00000 (the emulated VT-d's IOVAs go to 2^39).
const IOVA: u64 = 0x10_0000_0000;
/// A map of the legacy type1 path that would take longer than this (its
/// previous size's time, scaled by size) is not made: the sweep stops there.
const TYPE1_LIMIT_NS: f64 = 60e9;
/// The page size (x86-64).
const PAGE: u64 = 4096;
/// Smallest size of the sweeps.
const MIN_SIZE: u64 = 64 << 10;

struct Opts {
    quick: bool,
    only: Option<Vec<String>>,
    /// `--peer=PATH`: the outside driver of the peer part.
    peer: Option<String>,
}

impl Opts {
    fn parse() -> Self {
        let mut o = Self {
            quick: false,
            only: None,
            peer: None,
        };
        for a in std::env::args().skip(1) {
            if a == "--quick" {
                o.quick = true;
            } else if let Some(list) = a.strip_prefix("--only=") {
                o.only = Some(list.split(',').map(str::to_owned).collect());
            } else if let Some(path) = a.strip_prefix("--peer=") {
                o.peer = Some(path.to_owned());
            }
        }
        o
    }

    fn wants(&self, part: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|l| l.iter().any(|p| p == part))
    }

    fn budget(&self, min: usize, max: usize, secs: f64) -> Budget {
        let b = Budget::new(min, max, secs);
        if self.quick { b.scaled(0.25) } else { b }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> R<()> {
    let opts = Opts::parse();
    let start = Instant::now();
    // `vmm_trace` or `vmm_trace=N`: N offered BARs (default 1).
    if let Some(part) = opts
        .only
        .as_ref()
        .and_then(|l| l.iter().find(|p| p.starts_with("vmm_trace")))
    {
        let offered = part
            .strip_prefix("vmm_trace=")
            .map_or(Ok(1), str::parse)
            .map_err(|e| format!("{part}: {e}"))?;
        return vmm::trace(20, offered);
    }
    raise_fd_limit(1 << 16)?;
    // The vmm part needs a VM of its own shape (many devices): alone.
    if opts
        .only
        .as_ref()
        .is_some_and(|l| l.iter().any(|p| p == "vmm"))
    {
        emit_meta(
            "kernel",
            fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
        );
        vmm::run(&opts)?;
        println!("bench: done in {:.1} s", start.elapsed().as_secs_f64());
        return Ok(());
    }
    // The peer part opens the NVMe controller only, first, when asked;
    // the other parts named with it run after it.
    if let Some(only) = opts.only.as_ref().filter(|l| l.iter().any(|p| p == "peer")) {
        let peer = opts
            .peer
            .as_deref()
            .ok_or("--only=peer needs --peer=PATH")?;
        nvme_peer::run(&opts, peer)?;
        if only.iter().all(|p| p == "peer") {
            emit_meta(
                "kernel",
                fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
            );
            println!("bench: done in {:.1} s", start.elapsed().as_secs_f64());
            return Ok(());
        }
    }
    let (bdf, bar_size) = largest_ivshmem()?;
    let group = iommu_group(&bdf)?;
    println!(
        "bench: device {bdf} (IOMMU group {group}), BAR{BAR} {} MiB",
        bar_size >> 20
    );
    emit_meta("device", &bdf);
    emit_meta("bar_size", &bar_size.to_string());
    emit_meta(
        "kernel",
        fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
    );
    emit_meta(
        "cpus",
        &std::thread::available_parallelism()
            .map_or(0, usize::from)
            .to_string(),
    );
    emit_meta(
        "mem_total_kib",
        &meminfo("MemTotal").unwrap_or(0).to_string(),
    );
    let sizes: Vec<u64> = std::iter::successors(Some(MIN_SIZE), |s| Some(s * 4))
        .take_while(|s| *s <= bar_size)
        .collect();

    // The legacy measurements need the device opened through its group, the
    // rest through its cdev; a device cannot be open both ways at once.
    if opts.wants("sweep") {
        sweep_type1(&opts, &bdf, group, &sizes)?;
    }

    let iommufd = Iommufd::open()?;
    // Before the device is opened for the other parts: it opens its own
    // handle each time (a device is bound once at a time).
    if opts.wants("firstexport") {
        first_export::first_export(&opts, &iommufd, &bdf)?;
    }
    let ioas = iommufd.alloc_ioas()?;
    let mut dev = VfioPciDevice::open(bdf.parse()?)?;
    dev.bind(&iommufd)?;
    // Attached, so that every mapping really fills IOMMU page tables.
    dev.attach(&ioas)?;
    dev.set_memory_decode(true)?;
    let (config, _) = raw::region_info(dev.as_raw_fd(), uapi::VFIO_PCI_CONFIG_REGION_INDEX)?;
    let ctx = Ctx {
        iommufd: iommufd.as_raw_fd(),
        ioas: ioas.id(),
        device: dev.as_raw_fd(),
        config,
    };

    if opts.wants("sweep") {
        sweep_dmabuf(&opts, &ctx, &sizes)?;
        sweep_memfd(&opts, &ctx, &sizes)?;
    }
    if opts
        .only
        .as_ref()
        .is_some_and(|l| l.iter().any(|p| p == "trace"))
    {
        trace(&ctx, &dev, &ioas)?;
    }
    if opts.wants("profile") {
        profile(&opts, &ctx, &dev, &ioas, &bdf)?;
    }
    if opts.wants("overhead") {
        overhead(&opts, &ctx, &dev, &ioas, &sizes)?;
    }
    if opts.wants("revoke") {
        revocation(&opts, &ctx, &dev, &ioas)?;
    }
    if opts.wants("scale") {
        scale(&opts, &ctx, &dev, &ioas)?;
    }
    if opts.wants("placement") {
        placement(&opts, &ctx, &dev, &ioas, &sizes)?;
    }
    if opts.wants("threads") {
        restore_threads(&opts, &ctx)?;
    }
    if opts.wants("nvme") {
        nvme::reads(&opts, &dev, &ioas)?;
    }
    // `nvmeqd_cost` (the instruction-clock VM): only the per-command cost.
    let cost_only = opts
        .only
        .as_ref()
        .is_some_and(|l| l.iter().any(|p| p == "nvmeqd_cost"));
    if opts.wants("nvmeqd") || cost_only {
        nvme_qd::queue_depth(&opts, &dev, &ioas, !opts.wants("nvmeqd"))?;
    }
    emit_meta(
        "guest_seconds",
        &format!("{:.1}", start.elapsed().as_secs_f64()),
    );
    println!("bench: done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Raw fds and ids of the cdev setup, for the raw baseline.
struct Ctx {
    iommufd: RawFd,
    ioas: u32,
    device: RawFd,
    /// Offset of the config region in the device fd.
    config: u64,
}

// ---------------------------------------------------------------------------
// 1. Map cost against size
// ---------------------------------------------------------------------------

/// Times `map(size)` and `unmap(size)` for each size after one untimed
/// warm-up pair (which faults in BAR mmaps and allocates memfd pages).
fn sweep(
    opts: &Opts,
    series: &str,
    sizes: &[u64],
    limit_ns: Option<f64>,
    mut map: impl FnMut(u64) -> R<()>,
    mut unmap: impl FnMut(u64) -> R<()>,
) -> R<()> {
    let mut last: Option<(u64, f64)> = None;
    for &size in sizes {
        if let (Some(limit), Some((prev, ns))) = (limit_ns, last)
            && ns * size as f64 / prev as f64 > limit
        {
            emit_meta(&format!("{series}_stopped_before"), &size.to_string());
            println!(
                "bench: sweep {series}: a map of {} MiB would take over {:.0} s; stopping",
                size >> 20,
                limit / 1e9
            );
            break;
        }
        map(size)?;
        unmap(size)?;
        let (mut m, mut u) = (Vec::new(), Vec::new());
        opts.budget(3, 31, 4.0).repeat(|_| -> R<()> {
            let t = Instant::now();
            map(size)?;
            m.push(ns_since(t));
            let t = Instant::now();
            unmap(size)?;
            u.push(ns_since(t));
            Ok(())
        })?;
        let (sm, su) = (Stats::of(&m), Stats::of(&u));
        last = Some((size, sm.median));
        emit("sweep", series, "map", size, "ns", &sm);
        emit("sweep", series, "unmap", size, "ns", &su);
        println!(
            "bench: sweep {series:7} {:>8} KiB: map {:>10.1} us, unmap {:>10.1} us (n={})",
            size >> 10,
            sm.median / 1e3,
            su.median / 1e3,
            sm.n
        );
    }
    Ok(())
}

fn sweep_type1(opts: &Opts, bdf: &str, group: u32, sizes: &[u64]) -> R<()> {
    let t1 = raw::Type1::open(group, bdf, BAR)?;
    emit_meta("type1_iova_pgsizes", &format!("{:#x}", t1.iova_pgsizes));
    emit_meta("type1_bar_len", &t1.bar_len().to_string());
    // Each size's untimed warm-up map faults its part of the BAR mmap in, as
    // a VMM would have; beyond a minute per map the sweep stops.
    sweep(
        opts,
        "type1",
        sizes,
        Some(TYPE1_LIMIT_NS),
        |s| Ok(t1.map(IOVA, s)?),
        |s| {
            let n = t1.unmap(IOVA, s)?;
            check_len("VFIO_IOMMU_UNMAP_DMA", n, s)
        },
    )
}

fn sweep_dmabuf(opts: &Opts, ctx: &Ctx, sizes: &[u64]) -> R<()> {
    // One export per size (outside the timing), mapped and unmapped repeatedly.
    let mut current: Option<(u64, RawFd)> = None;
    let result = sweep(
        opts,
        "dmabuf",
        sizes,
        None,
        |s| {
            let fd = match current {
                Some((size, fd)) if size == s => fd,
                other => {
                    if let Some((_, old)) = other {
                        raw::close(old)?;
                    }
                    let fd = raw::export(ctx.device, BAR, 0, s)?;
                    current = Some((s, fd));
                    fd
                }
            };
            raw::map_file(ctx.iommufd, ctx.ioas, fd, 0, s, IOVA)?;
            Ok(())
        },
        |s| {
            check_len(
                "IOMMU_IOAS_UNMAP",
                raw::unmap(ctx.iommufd, ctx.ioas, IOVA, s)?,
                s,
            )
        },
    );
    if let Some((_, fd)) = current {
        raw::close(fd)?;
    }
    result
}

fn sweep_memfd(opts: &Opts, ctx: &Ctx, sizes: &[u64]) -> R<()> {
    // The memfd's pages are really allocated (and pinned): leave the guest
    // 384 MiB to live on.
    let avail = meminfo("MemAvailable").unwrap_or(0) * 1024;
    let sizes: Vec<u64> = sizes
        .iter()
        .copied()
        .filter(|s| s + (384 << 20) <= avail)
        .collect();
    let Some(&max) = sizes.last() else {
        return Ok(());
    };
    emit_meta("memfd_max_size", &max.to_string());
    let fd = raw::memfd(max)?;
    // Allocate every page once.
    raw::map_file(ctx.iommufd, ctx.ioas, fd, 0, max, IOVA)?;
    raw::unmap(ctx.iommufd, ctx.ioas, IOVA, max)?;
    let r = sweep(
        opts,
        "memfd",
        &sizes,
        None,
        |s| Ok(raw::map_file(ctx.iommufd, ctx.ioas, fd, 0, s, IOVA).map(drop)?),
        |s| {
            check_len(
                "IOMMU_IOAS_UNMAP",
                raw::unmap(ctx.iommufd, ctx.ioas, IOVA, s)?,
                s,
            )
        },
    );
    raw::close(fd)?;
    r
}

fn check_len(op: &str, got: u64, want: u64) -> R<()> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{op} unmapped {got:#x} bytes, expected {want:#x}").into())
    }
}

// ---------------------------------------------------------------------------
// 2. Library overhead
// ---------------------------------------------------------------------------

/// Operations of one export-map-unmap-close cycle.
const OPS: [&str; 4] = ["export", "map", "unmap", "close"];

/// One cycle through the library; per-operation nanoseconds. `COPY` makes
/// a second, separately placed copy of the same code (the library's own
/// control): the `black_box` keeps the two copies from being merged.
fn cycle_library<const COPY: u8>(dev: &VfioPciDevice, ioas: &Ioas, size: u64) -> R<[f64; 4]> {
    std::hint::black_box(COPY);
    let (t1, t2, t3);
    let t0 = Instant::now();
    {
        let export = dev.export_bar(BAR, &[ByteRange::new(0, size)])?;
        t1 = Instant::now();
        let mut mapping = ioas.map_dmabuf(
            export.dmabuf(),
            IovaPlacement::Fixed(IOVA),
            MapPerms::ReadWrite,
        )?;
        t2 = Instant::now();
        mapping.unmap()?;
        t3 = Instant::now();
        // The mapping, then the export, drop here where they lie, as at the
        // end of a caller's scope: `drop(x)` would first copy each to a
        // new place, work that is the benchmark's and not the library's.
    }
    let t4 = Instant::now();
    Ok(spans([t0, t1, t2, t3, t4]))
}

/// The same cycle with raw ioctls.
fn cycle_raw(ctx: &Ctx, size: u64) -> R<[f64; 4]> {
    let t0 = Instant::now();
    let fd = raw::export(ctx.device, BAR, 0, size)?;
    let t1 = Instant::now();
    raw::map_file(ctx.iommufd, ctx.ioas, fd, 0, size, IOVA)?;
    let t2 = Instant::now();
    raw::unmap(ctx.iommufd, ctx.ioas, IOVA, size)?;
    let t3 = Instant::now();
    raw::close(fd)?;
    let t4 = Instant::now();
    Ok(spans([t0, t1, t2, t3, t4]))
}

fn spans(t: [Instant; 5]) -> [f64; 4] {
    std::array::from_fn(|i| t[i + 1].duration_since(t[i]).as_secs_f64() * 1e9)
}

fn overhead(opts: &Opts, ctx: &Ctx, dev: &VfioPciDevice, ioas: &Ioas, sizes: &[u64]) -> R<()> {
    // A batch is K cycles of each of four paths, interleaved in balanced
    // order: the library, raw, raw again (the control: raw / raw shows what
    // the interleaving alone does to a ratio) and a second copy of the
    // library's cycle (what code placement alone does to the library's
    // ratio). A batch's figure per operation is the median over its
    // K cycles (one emulator hiccup does not move it); its ratios are each
    // path / raw. The results are the medians over the batches, with min and
    // max.
    const K: usize = 8;
    const PATHS: [&str; 4] = ["library", "raw", "control", "library_copy"];
    // A Williams square: over four rounds every path runs in every position
    // and right after every other path once, so no path always follows the
    // heavier library cycle (whose after-effects would slow it).
    const ORDERS: [[usize; 4]; 4] = [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]];
    // The sizes take turns, one batch each per round, so that every size is
    // measured across the whole run: a stretch of host load then moves all
    // sizes alike instead of the one that had the stretch to itself.
    let mut batches: Vec<[Vec<[f64; 5]>; 4]> = sizes.iter().map(|_| Default::default()).collect();
    let rounds = opts.budget(5, 321, 40.0 * sizes.len() as f64);
    rounds.repeat(|_| -> R<()> {
        for (&size, size_batches) in sizes.iter().zip(&mut batches) {
            // One untimed cycle of each path at this size first: the last
            // batch ran at another size.
            cycle_library::<0>(dev, ioas, size)?;
            cycle_raw(ctx, size)?;
            cycle_library::<1>(dev, ioas, size)?;
            let mut cycles: [Vec<[f64; 4]>; 4] = Default::default();
            for k in 0..K {
                for &path in &ORDERS[k % 4] {
                    let c = match path {
                        0 => cycle_library::<0>(dev, ioas, size)?,
                        3 => cycle_library::<1>(dev, ioas, size)?,
                        _ => cycle_raw(ctx, size)?,
                    };
                    cycles[path].push(c);
                }
            }
            for (b, c) in size_batches.iter_mut().zip(&cycles) {
                b.push(batch_medians(c));
            }
        }
        Ok(())
    })?;
    for (&size, size_batches) in sizes.iter().zip(&batches) {
        let mut line = format!("bench: overhead {:>8} KiB:", size >> 10);
        for (i, op) in OPS.iter().chain(&["total"]).enumerate() {
            let col = |v: &Vec<[f64; 5]>| v.iter().map(|b| b[i]).collect::<Vec<f64>>();
            let raw_col = col(&size_batches[1]);
            emit("overhead", "raw", op, size, "ns", &Stats::of(&raw_col));
            line.push_str(&format!(" {op}"));
            for (p, name) in PATHS.iter().enumerate().filter(|(p, _)| *p != 1) {
                let v = col(&size_batches[p]);
                emit("overhead", name, op, size, "ns", &Stats::of(&v));
                let ratio: Vec<f64> = v.iter().zip(&raw_col).map(|(a, b)| a / b).collect();
                let s = Stats::of(&ratio);
                let series = match *name {
                    "library" => "ratio".to_owned(),
                    other => format!("ratio_{other}"),
                };
                emit("overhead", &series, op, size, "ratio", &s);
                line.push_str(&format!(" {:.2}", s.median));
            }
        }
        println!(
            "{line} (library, control, library copy; n={})",
            size_batches[0].len()
        );
    }
    Ok(())
}

/// Per-operation medians of a batch of cycles, and the median cycle total.
fn batch_medians(cycles: &[[f64; 4]]) -> [f64; 5] {
    let col = |i: usize| Stats::of(&cycles.iter().map(|c| c[i]).collect::<Vec<_>>()).median;
    let total = Stats::of(&cycles.iter().map(|c| c.iter().sum()).collect::<Vec<f64>>()).median;
    [col(0), col(1), col(2), col(3), total]
}

/// Two cycles of each path with labelled marker syscalls in between, for
/// `strace` (`cargo xtask bench --strace`): a marker is a `write` of its
/// label to fd -1, which fails with `EBADF` and shows in the trace.
fn trace(ctx: &Ctx, dev: &VfioPciDevice, ioas: &Ioas) -> R<()> {
    let mark = |label: &str| {
        // SAFETY: writes from a valid buffer to an invalid fd (fails, EBADF).
        unsafe { libc::write(-1, label.as_ptr().cast(), label.len()) };
    };
    for _ in 0..2 {
        mark("library export");
        let e = dev.export_bar(BAR, &[ByteRange::new(0, MIN_SIZE)])?;
        mark("library map");
        let mut m = ioas.map_dmabuf(e.dmabuf(), IovaPlacement::Fixed(IOVA), MapPerms::ReadWrite)?;
        mark("library unmap");
        m.unmap()?;
        mark("library close");
        drop(m);
        drop(e);
        mark("raw export");
        let fd = raw::export(ctx.device, BAR, 0, MIN_SIZE)?;
        mark("raw map");
        raw::map_file(ctx.iommufd, ctx.ioas, fd, 0, MIN_SIZE, IOVA)?;
        mark("raw unmap");
        raw::unmap(ctx.iommufd, ctx.ioas, IOVA, MIN_SIZE)?;
        mark("raw close");
        raw::close(fd)?;
        mark("end");
    }
    // Revoke and restore with two attachments, through the library and by hand.
    let exports = (0..2)
        .map(|i| dev.export_bar(BAR, &[ByteRange::new(i * PAGE, PAGE)]))
        .collect::<Result<Vec<_>, _>>()?;
    let atts = exports
        .iter()
        .zip(0u64..)
        .map(|(e, i)| {
            Attachment::map(
                e,
                ioas,
                IovaPlacement::Fixed(IOVA + i * PAGE),
                MapPerms::ReadWrite,
                RestorePolicy::Automatic,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    mark("library revoke (2 attachments)");
    dev.set_memory_decode(false)?;
    mark("library restore (2 attachments)");
    dev.set_memory_decode(true)?;
    mark("end");
    drop(atts);
    drop(exports);
    let fds = (0..2)
        .map(|i| raw::export(ctx.device, BAR, i * PAGE, PAGE))
        .collect::<Result<Vec<_>, _>>()?;
    for (fd, i) in fds.iter().zip(0u64..) {
        raw::map_file(ctx.iommufd, ctx.ioas, *fd, 0, PAGE, IOVA + i * PAGE)?;
    }
    let cmd = raw::command(ctx.device, ctx.config)?;
    mark("raw revoke (2 mappings)");
    raw::set_command(ctx.device, ctx.config, cmd & !raw::COMMAND_MEMORY)?;
    mark("raw restore (2 mappings)");
    raw::set_command(ctx.device, ctx.config, cmd | raw::COMMAND_MEMORY)?;
    for (fd, i) in fds.iter().zip(0u64..) {
        raw::unmap(ctx.iommufd, ctx.ioas, IOVA + i * PAGE, PAGE)?;
        raw::map_file(ctx.iommufd, ctx.ioas, *fd, 0, PAGE, IOVA + i * PAGE)?;
    }
    mark("end");
    for (fd, i) in fds.iter().zip(0u64..) {
        raw::unmap(ctx.iommufd, ctx.ioas, IOVA + i * PAGE, PAGE)?;
        raw::close(*fd)?;
    }
    Ok(())
}

/// One step of the profile.
type Step<'a> = Box<dyn FnMut() -> R<()> + 'a>;

/// Where the library's time goes: each extra step it makes around the
/// ioctls, timed alone (median of many), next to the ioctls themselves.
fn profile(opts: &Opts, ctx: &Ctx, dev: &VfioPciDevice, ioas: &Ioas, bdf: &str) -> R<()> {
    use std::os::fd::AsFd;
    let fd = raw::export(ctx.device, BAR, 0, MIN_SIZE)?;
    let resource = format!("/sys/bus/pci/devices/{bdf}/resource");
    let dir = format!("/sys/bus/pci/devices/{bdf}");
    // SAFETY: `fd` is a dma-buf fd this function owns; the handle takes it over.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let buf = dmabuf_p2p::DmaBuf::try_from(owned).map_err(|_| "the export is not a dma-buf")?;
    let bfd = buf.as_fd().as_raw_fd();
    let mut steps: Vec<(&str, Step<'_>)> = vec![
        (
            "getppid",
            Box::new(|| {
                // SAFETY: no arguments, no memory.
                unsafe { libc::getppid() };
                Ok(())
            }),
        ),
        (
            "clock_pair",
            Box::new(|| {
                let _ = Instant::now().elapsed();
                Ok(())
            }),
        ),
        (
            "export_ioctl",
            Box::new(|| Ok(raw::close(raw::export(ctx.device, BAR, 0, MIN_SIZE)?)?)),
        ),
        (
            "pread_export_ioctl",
            Box::new(|| {
                raw::command(ctx.device, ctx.config)?;
                Ok(raw::close(raw::export(ctx.device, BAR, 0, MIN_SIZE)?)?)
            }),
        ),
        (
            "lib_export_bar",
            Box::new(|| {
                let e = dev.export_bar(BAR, &[ByteRange::new(0, MIN_SIZE)])?;
                drop(e);
                Ok(())
            }),
        ),
        (
            "lib_plan_export",
            Box::new(|| {
                let bar = dev.bar(BAR)?;
                let plan = dmabuf_p2p::exporter::bar::plan_export(
                    dev.address(),
                    &bar,
                    &[ByteRange::new(0, MIN_SIZE)],
                    dmabuf_p2p::range::page_size(),
                )?;
                std::hint::black_box(plan);
                Ok(())
            }),
        ),
        (
            "region_info_ioctl",
            Box::new(|| Ok(raw::region_info(ctx.device, BAR).map(drop)?)),
        ),
        (
            "stat_sysfs_dir",
            Box::new(|| {
                let _ = std::path::Path::new(&dir).is_dir();
                Ok(())
            }),
        ),
        (
            "read_sysfs_resource",
            Box::new(|| Ok(fs::read_to_string(&resource).map(drop)?)),
        ),
        (
            "config_pread",
            Box::new(|| Ok(raw::command(ctx.device, ctx.config).map(drop)?)),
        ),
        ("lib_bar", Box::new(|| Ok(dev.bar(BAR).map(drop)?))),
        (
            "lib_memory_decode",
            Box::new(|| Ok(dev.memory_decode().map(drop)?)),
        ),
        (
            "fstatfs",
            Box::new(|| Ok(dmabuf_p2p::is_dmabuf(buf.as_fd()).map(drop)?)),
        ),
        (
            "lseek_end",
            Box::new(|| {
                // SAFETY: lseek on an open fd; no memory is involved.
                unsafe { libc::lseek(bfd, 0, libc::SEEK_END) };
                Ok(())
            }),
        ),
        (
            "dup_and_close",
            Box::new(|| {
                // SAFETY: duplicating an open fd; the copy is closed at once.
                let d = unsafe { libc::fcntl(bfd, libc::F_DUPFD_CLOEXEC, 0) };
                if d < 0 {
                    return Err(std::io::Error::last_os_error().into());
                }
                Ok(raw::close(d)?)
            }),
        ),
    ];
    for (name, f) in &mut steps {
        for _ in 0..3 {
            f()?;
        }
        let mut v = Vec::new();
        opts.budget(50, 1000, 2.0).repeat(|_| -> R<()> {
            let t = Instant::now();
            f()?;
            v.push(ns_since(t));
            Ok(())
        })?;
        let s = Stats::of(&v);
        emit("profile", "step", name, 0, "ns", &s);
        println!(
            "bench: profile {name:20} {:>8.2} us (n={})",
            s.median / 1e3,
            s.n
        );
    }
    drop(steps);
    // The unmap ioctl alone, after a raw map and after a library map of the
    // same buffer (the library keeps a duplicate fd of it).
    let (mut raw_u, mut lib_u) = (Vec::new(), Vec::new());
    opts.budget(50, 1000, 2.0).repeat(|_| -> R<()> {
        raw::map_file(ctx.iommufd, ctx.ioas, bfd, 0, MIN_SIZE, IOVA)?;
        let t = Instant::now();
        raw::unmap(ctx.iommufd, ctx.ioas, IOVA, MIN_SIZE)?;
        raw_u.push(ns_since(t));
        let mut m = ioas.map_dmabuf(&buf, IovaPlacement::Fixed(IOVA), MapPerms::ReadWrite)?;
        let t = Instant::now();
        m.unmap()?;
        lib_u.push(ns_since(t));
        Ok(())
    })?;
    // The same few lines of user code (an `Arc` clone, a mutex, a vector
    // push and pop: the kind of bookkeeping the library does around an
    // ioctl) timed in a loop, right after a cheap syscall and right after an
    // export and close: under emulation, code that runs after the kernel did
    // real work runs slower than the same code in a loop.
    let books = std::sync::Mutex::new(Vec::<u64>::with_capacity(16));
    let count = std::sync::Arc::new(5u64);
    let bookkeeping = || {
        let c = std::sync::Arc::clone(&count);
        let mut b = books
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        b.push(*c);
        b.pop();
    };
    let (mut hot, mut after_getppid, mut after_export) = (Vec::new(), Vec::new(), Vec::new());
    opts.budget(50, 1000, 2.0).repeat(|_| -> R<()> {
        bookkeeping();
        let t = Instant::now();
        bookkeeping();
        hot.push(ns_since(t));
        // SAFETY: no arguments, no memory.
        unsafe { libc::getppid() };
        let t = Instant::now();
        bookkeeping();
        after_getppid.push(ns_since(t));
        raw::close(raw::export(ctx.device, BAR, 0, MIN_SIZE)?)?;
        let t = Instant::now();
        bookkeeping();
        after_export.push(ns_since(t));
        Ok(())
    })?;
    for (name, v) in [
        ("unmap_after_raw_map", &raw_u),
        ("unmap_after_library_map", &lib_u),
        ("bookkeeping_hot", &hot),
        ("bookkeeping_after_getppid", &after_getppid),
        ("bookkeeping_after_export", &after_export),
    ] {
        let s = Stats::of(v);
        emit("profile", "step", name, 0, "ns", &s);
        println!(
            "bench: profile {name:20} {:>8.2} us (n={})",
            s.median / 1e3,
            s.n
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Revocation
// ---------------------------------------------------------------------------

fn revocation(opts: &Opts, ctx: &Ctx, dev: &VfioPciDevice, ioas: &Ioas) -> R<()> {
    // Both setups cannot coexist (a config write revokes every dma-buf of
    // the device), so the library and raw paths alternate in rounds, each
    // round setting up N mappings, timing a few revoke/restore pairs and
    // tearing down. A round's ratio is its library median / its raw median.
    const ROUNDS: usize = 3;
    for n in [1u64, 16, 256, 1024, 4096] {
        // [revoke, restore, cycle] samples, and per-round medians.
        let mut lib: [Vec<f64>; 3] = Default::default();
        let mut raw_: [Vec<f64>; 3] = Default::default();
        let mut restore_write = Vec::new();
        let mut ratios: [Vec<f64>; 3] = Default::default();
        for _ in 0..ROUNDS {
            let l = revoke_round_library(opts, dev, ioas, n)?;
            let r = revoke_round_raw(opts, ctx, n, &mut restore_write)?;
            for k in 0..3 {
                ratios[k].push(Stats::of(&l[k]).median / Stats::of(&r[k]).median);
                lib[k].extend(&l[k]);
                raw_[k].extend(&r[k]);
            }
        }
        for (k, op) in ["revoke", "restore", "cycle"].iter().enumerate() {
            emit("revoke", "library", op, n, "ns", &Stats::of(&lib[k]));
            emit("revoke", "raw", op, n, "ns", &Stats::of(&raw_[k]));
            emit("revoke", "ratio", op, n, "ratio", &Stats::of(&ratios[k]));
        }
        emit(
            "revoke",
            "raw",
            "restore_write",
            n,
            "ns",
            &Stats::of(&restore_write),
        );
        let m = |v: &Vec<f64>| Stats::of(v).median / 1e6;
        println!(
            "bench: revoke N={n:5}: library revoke {:.2} ms restore {:.2} ms; raw revoke {:.2} ms restore {:.2} ms; cycle ratio {:.3} (n={})",
            m(&lib[0]),
            m(&lib[1]),
            m(&raw_[0]),
            m(&raw_[1]),
            Stats::of(&ratios[2]).median,
            lib[0].len()
        );
    }
    Ok(())
}

/// One library round: N single-page exports, each mapped once as an
/// Attachment (restored automatically), then revoke/restore pairs through
/// `set_memory_decode`. Returns [revoke, restore, cycle] times.
fn revoke_round_library(opts: &Opts, dev: &VfioPciDevice, ioas: &Ioas, n: u64) -> R<[Vec<f64>; 3]> {
    let mut exports = Vec::new();
    let mut atts = Vec::new();
    for i in 0..n {
        let e = dev.export_bar(BAR, &[ByteRange::new(i * PAGE, PAGE)])?;
        let a = Attachment::map(
            &e,
            ioas,
            IovaPlacement::Fixed(IOVA + i * PAGE),
            MapPerms::ReadWrite,
            RestorePolicy::Automatic,
        )?;
        exports.push(e);
        atts.push(a);
    }
    let mut out: [Vec<f64>; 3] = Default::default();
    opts.budget(3, 8, 1.5).repeat(|_| -> R<()> {
        let t = Instant::now();
        dev.set_memory_decode(false)?;
        let a = ns_since(t);
        let t = Instant::now();
        dev.set_memory_decode(true)?;
        let b = ns_since(t);
        out[0].push(a);
        out[1].push(b);
        out[2].push(a + b);
        Ok(())
    })?;
    if let Some(a) = atts.iter().find(|a| a.is_revoked()) {
        return Err(format!(
            "attachment at IOVA {:#x} still revoked after restore: {:?}",
            a.iova(),
            a.last_error()
        )
        .into());
    }
    Ok(out)
}

/// One raw round, the same done by hand: the config write revokes (the
/// kernel zaps the IOMMU entries; the dead areas stay, as the library keeps
/// them so that their IOVAs stay reserved); the restore is the config write,
/// then unmapping each dead area and mapping it again at its IOVA.
fn revoke_round_raw(
    opts: &Opts,
    ctx: &Ctx,
    n: u64,
    restore_write: &mut Vec<f64>,
) -> R<[Vec<f64>; 3]> {
    let mut fds = Vec::new();
    for i in 0..n {
        let fd = raw::export(ctx.device, BAR, i * PAGE, PAGE)?;
        raw::map_file(ctx.iommufd, ctx.ioas, fd, 0, PAGE, IOVA + i * PAGE)?;
        fds.push(fd);
    }
    let cmd = raw::command(ctx.device, ctx.config)?;
    let mut out: [Vec<f64>; 3] = Default::default();
    opts.budget(3, 8, 1.5).repeat(|_| -> R<()> {
        let t = Instant::now();
        raw::set_command(ctx.device, ctx.config, cmd & !raw::COMMAND_MEMORY)?;
        let a = ns_since(t);
        let t = Instant::now();
        raw::set_command(ctx.device, ctx.config, cmd | raw::COMMAND_MEMORY)?;
        restore_write.push(ns_since(t));
        for (i, fd) in (0..n).zip(&fds) {
            raw::unmap(ctx.iommufd, ctx.ioas, IOVA + i * PAGE, PAGE)?;
            raw::map_file(ctx.iommufd, ctx.ioas, *fd, 0, PAGE, IOVA + i * PAGE)?;
        }
        let b = ns_since(t);
        out[0].push(a);
        out[1].push(b);
        out[2].push(a + b);
        Ok(())
    })?;
    for (i, fd) in (0..n).zip(&fds) {
        raw::unmap(ctx.iommufd, ctx.ioas, IOVA + i * PAGE, PAGE)?;
        raw::close(*fd)?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// 4. Export and attach scale
// ---------------------------------------------------------------------------

/// Kernel memory counters: (`Slab`, `SUnreclaim`) in bytes, IOMMU page-table
/// pages (`nr_iommu_pages` of /proc/vmstat, if the kernel has it).
fn kernel_memory() -> [f64; 3] {
    let kib = |k| meminfo(k).map_or(f64::NAN, |v| (v * 1024) as f64);
    let iommu = vmstat("nr_iommu_pages").map_or(f64::NAN, |v| (v * PAGE) as f64);
    [kib("Slab"), kib("SUnreclaim"), iommu]
}

const MEM_OPS: [&str; 3] = ["slab", "sunreclaim", "iommu_pt"];

/// The largest N of the scale part.
const SCALE_MAX: u64 = 4096;

/// Bytes in use per slab cache (`active_objs * objsize` of /proc/slabinfo).
fn slabinfo() -> Vec<(String, f64)> {
    let Ok(text) = fs::read_to_string("/proc/slabinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("slabinfo"))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?.to_owned();
            let active: f64 = w.next()?.parse().ok()?;
            let _total = w.next()?;
            let size: f64 = w.next()?.parse().ok()?;
            Some((name, active * size))
        })
        .collect()
}

/// Bytes per buffer by which each cache grew.
fn growth(before: &[(String, f64)], after: &[(String, f64)], n: u64) -> Vec<(String, f64)> {
    after
        .iter()
        .map(|(name, bytes)| {
            let b0 = before
                .iter()
                .find(|(k, _)| k == name)
                .map_or(0.0, |(_, v)| *v);
            (name.clone(), (bytes - b0) / n as f64)
        })
        .collect()
}

/// Emits, over the runs, the caches whose median growth is at least 16
/// bytes per buffer, and the total of the per-run sums of those caches.
fn emit_slab_growth(runs: &[Vec<(String, f64)>], n: u64) {
    let Some(first) = runs.first() else { return };
    let mut kept = Vec::new();
    for (name, _) in first {
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.iter().find(|(k, _)| k == name).map(|(_, b)| *b))
            .collect();
        let s = Stats::of(&v);
        if s.median >= 16.0 {
            emit("slabinfo", name, "bytes_per_buffer", n, "bytes", &s);
            kept.push(name.clone());
        }
    }
    let totals: Vec<f64> = runs
        .iter()
        .map(|r| {
            r.iter()
                .filter(|(k, _)| kept.contains(k))
                .map(|(_, b)| *b)
                .sum()
        })
        .collect();
    emit(
        "slabinfo",
        "total",
        "bytes_per_buffer",
        n,
        "bytes",
        &Stats::of(&totals),
    );
}

/// One raw export, map, unmap and close: the first syscalls after reading
/// /proc are slow under emulation, which would land on the first buffer.
fn warm_up(ctx: &Ctx) -> R<()> {
    cycle_raw(ctx, PAGE).map(drop)
}

fn scale(opts: &Opts, ctx: &Ctx, dev: &VfioPciDevice, ioas: &Ioas) -> R<()> {
    for n in [1u64, 16, 256, 1024, SCALE_MAX] {
        // Per buffer: export, map, teardown (unmap + close) in ns; memory in bytes.
        let mut lib: Vec<[f64; 6]> = Vec::new();
        let mut rawv: Vec<[f64; 6]> = Vec::new();
        let mut slab_growth: Vec<Vec<(String, f64)>> = Vec::new();
        let nf = n as f64;
        opts.budget(3, 15, 10.0).repeat(|_| -> R<()> {
            let m0 = kernel_memory();
            warm_up(ctx)?;
            let t0 = Instant::now();
            let exports = (0..n)
                .map(|i| dev.export_bar(BAR, &[ByteRange::new(i * PAGE, PAGE)]))
                .collect::<Result<Vec<_>, _>>()?;
            let t1 = Instant::now();
            let maps = exports
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    ioas.map_dmabuf(
                        e.dmabuf(),
                        IovaPlacement::Fixed(IOVA + i as u64 * PAGE),
                        MapPerms::ReadWrite,
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let t2 = Instant::now();
            let m1 = kernel_memory();
            let t3 = Instant::now();
            drop(maps);
            drop(exports);
            let t4 = Instant::now();
            let span = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e9 / nf;
            lib.push([
                span(t0, t1),
                span(t1, t2),
                span(t3, t4),
                (m1[0] - m0[0]) / nf,
                (m1[1] - m0[1]) / nf,
                (m1[2] - m0[2]) / nf,
            ]);

            // Which kernel objects a buffer costs: /proc/slabinfo around the
            // raw runs of the largest N.
            let caches0 = (n == SCALE_MAX).then(slabinfo);
            let m0 = kernel_memory();
            warm_up(ctx)?;
            let t0 = Instant::now();
            let fds = (0..n)
                .map(|i| raw::export(ctx.device, BAR, i * PAGE, PAGE))
                .collect::<Result<Vec<_>, _>>()?;
            let t1 = Instant::now();
            for (i, fd) in (0..n).zip(&fds) {
                raw::map_file(ctx.iommufd, ctx.ioas, *fd, 0, PAGE, IOVA + i * PAGE)?;
            }
            let t2 = Instant::now();
            let m1 = kernel_memory();
            if let Some(before) = caches0 {
                slab_growth.push(growth(&before, &slabinfo(), n));
            }
            let t3 = Instant::now();
            for (i, fd) in (0..n).zip(&fds) {
                raw::unmap(ctx.iommufd, ctx.ioas, IOVA + i * PAGE, PAGE)?;
                raw::close(*fd)?;
            }
            let t4 = Instant::now();
            rawv.push([
                span(t0, t1),
                span(t1, t2),
                span(t3, t4),
                (m1[0] - m0[0]) / nf,
                (m1[1] - m0[1]) / nf,
                (m1[2] - m0[2]) / nf,
            ]);
            Ok(())
        })?;
        emit_slab_growth(&slab_growth, n);
        for (series, v) in [("library", &lib), ("raw", &rawv)] {
            for (i, op) in ["export", "map", "teardown"].iter().enumerate() {
                emit(
                    "scale",
                    series,
                    op,
                    n,
                    "ns",
                    &Stats::of(&v.iter().map(|r| r[i]).collect::<Vec<_>>()),
                );
            }
            for (i, op) in MEM_OPS.iter().enumerate() {
                let vals: Vec<f64> = v
                    .iter()
                    .map(|r| r[3 + i])
                    .filter(|x| x.is_finite())
                    .collect();
                if !vals.is_empty() {
                    emit("scale", series, op, n, "bytes", &Stats::of(&vals));
                }
            }
        }
        let med = |v: &Vec<[f64; 6]>, i: usize| {
            Stats::of(&v.iter().map(|r| r[i]).collect::<Vec<_>>()).median
        };
        println!(
            "bench: scale N={n:5}: library export {:.1} us map {:.1} us; raw export {:.1} us map {:.1} us; slab {:.0} B/buffer (n={})",
            med(&lib, 0) / 1e3,
            med(&lib, 1) / 1e3,
            med(&rawv, 0) / 1e3,
            med(&rawv, 1) / 1e3,
            med(&rawv, 3),
            lib.len()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. IOVA placement
// ---------------------------------------------------------------------------

/// The placements compared: where the kernel puts it (what
/// `IovaPlacement::Auto` did before the library placed it itself), where the
/// library puts it, and a fixed IOVA aligned for every size.
const PLACEMENTS: [&str; 4] = ["kernel", "library", "fixed", "library_fixed"];

/// The largest power of two dividing `iova` (0 for IOVA 0).
fn alignment_of(iova: u64) -> u64 {
    if iova == 0 {
        0
    } else {
        1 << iova.trailing_zeros()
    }
}

/// `nr_iommu_pages`, after folding the per-CPU counter deltas into it
/// (`/proc/sys/vm/stat_refresh`): without that, a few hundred pages can hide
/// in them.
fn iommu_pages() -> f64 {
    let _ = fs::write("/proc/sys/vm/stat_refresh", "1");
    vmstat("nr_iommu_pages").map_or(f64::NAN, |v| v as f64)
}

fn placement(opts: &Opts, ctx: &Ctx, dev: &VfioPciDevice, ioas: &Ioas, sizes: &[u64]) -> R<()> {
    // Something is always mapped already in a real IOAS: one page, placed
    // the way both automatic placements would (lowest free IOVA).
    let first = dev.export_bar(BAR, &[ByteRange::new(0, PAGE)])?;
    let first_map = ioas.map_dmabuf(first.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite)?;
    emit_meta("placement_first_iova", &format!("{:#x}", first_map.iova()));
    emit_meta("bar_phys", &format!("{:#x}", dev.bar(BAR)?.phys_start()));
    for &size in sizes {
        let export = dev.export_bar(BAR, &[ByteRange::new(0, size)])?;
        let fd = export.dmabuf().as_raw_fd();
        // Per placement: [map ns, unmap ns, IOVA alignment, IOMMU pages added].
        let mut rows: [Vec<[f64; 4]>; 4] = Default::default();
        // `settled`: wait first for page-table pages an earlier unmap freed
        // late, so that the count is this map's own; timed runs do not wait
        // and leave the count to the settled ones.
        let once = |mode: usize, settled: bool| -> R<[f64; 4]> {
            if settled {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let p0 = iommu_pages();
            let t = Instant::now();
            let (iova, lib) = match mode {
                0 => (
                    raw::map_file_kernel_placed(ctx.iommufd, ctx.ioas, fd, 0, size)?,
                    None,
                ),
                1 => {
                    let m =
                        ioas.map_dmabuf(export.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite)?;
                    (m.iova(), Some(m))
                }
                2 => (
                    raw::map_file(ctx.iommufd, ctx.ioas, fd, 0, size, IOVA)?,
                    None,
                ),
                // The library's own path at the aligned fixed IOVA: against
                // it, `Auto` differs only in where the IOVA comes from.
                _ => {
                    let m = ioas.map_dmabuf(
                        export.dmabuf(),
                        IovaPlacement::Fixed(IOVA),
                        MapPerms::ReadWrite,
                    )?;
                    (m.iova(), Some(m))
                }
            };
            let map_ns = ns_since(t);
            let added = iommu_pages() - p0;
            let t = Instant::now();
            match lib {
                Some(mut m) => check_len("IoasMapping::unmap", m.unmap()?, size)?,
                None => check_len(
                    "IOMMU_IOAS_UNMAP",
                    raw::unmap(ctx.iommufd, ctx.ioas, iova, size)?,
                    size,
                )?,
            }
            let unmap_ns = ns_since(t);
            Ok(if settled {
                [f64::NAN, f64::NAN, alignment_of(iova) as f64, added]
            } else {
                [map_ns, unmap_ns, alignment_of(iova) as f64, f64::NAN]
            })
        };
        // Two interleaved pairs: the raw ones, then the library's. The
        // kernel-placed map leaves emptied page-table pages in low IOVAs,
        // which the IOMMU driver keeps until a large page takes their place;
        // interleaved with it, every `Auto` map would pay for freeing them.
        // One untimed `Auto` map clears them before the library's pair.
        for pair in [[0, 2], [1, 3]] {
            if pair[0] == 1 {
                once(1, true)?;
            }
            for _ in 0..3 {
                for mode in pair {
                    rows[mode].push(once(mode, true)?);
                }
            }
            opts.budget(5, 31, 6.0).repeat(|k| -> R<()> {
                // Alternate the order so neither always runs first.
                for j in 0..2 {
                    let mode = pair[(j + k) % 2];
                    rows[mode].push(once(mode, false)?);
                }
                Ok(())
            })?;
        }
        let mut line = format!("bench: placement {:>8} KiB:", size >> 10);
        for (mode, name) in PLACEMENTS.iter().enumerate() {
            for (i, (op, unit)) in [
                ("map", "ns"),
                ("unmap", "ns"),
                ("alignment", "bytes"),
                ("iommu_pages", "pages"),
            ]
            .iter()
            .enumerate()
            {
                let v: Vec<f64> = rows[mode]
                    .iter()
                    .map(|r| r[i])
                    .filter(|x| x.is_finite())
                    .collect();
                if !v.is_empty() {
                    emit("placement", name, op, size, unit, &Stats::of(&v));
                }
            }
            let med = |i: usize| {
                let v: Vec<f64> = rows[mode]
                    .iter()
                    .map(|r| r[i])
                    .filter(|x| x.is_finite())
                    .collect();
                Stats::of(&v).median
            };
            line.push_str(&format!(
                " {name} {:.1}/{:.1} us align {:#x} +{:.0} pages;",
                med(0) / 1e3,
                med(1) / 1e3,
                med(2) as u64,
                med(3)
            ));
        }
        println!("{line}");
    }
    drop(first_map);
    Ok(())
}

// ---------------------------------------------------------------------------
// 6. Restore from several threads
// ---------------------------------------------------------------------------

/// Mappings restored at once in the threads part.
const THREADS_N: u64 = 1024;

/// Unmaps and maps again mappings `range` of the `fds` (mapping `i` at
/// `IOVA + i * PAGE`).
fn remap_range(ctx: &Ctx, fds: &[RawFd], range: std::ops::Range<usize>) -> std::io::Result<()> {
    for i in range {
        let iova = IOVA + i as u64 * PAGE;
        raw::unmap(ctx.iommufd, ctx.ioas, iova, PAGE)?;
        raw::map_file(ctx.iommufd, ctx.ioas, fds[i], 0, PAGE, iova)?;
    }
    Ok(())
}

/// The restore after a revocation is N unmaps plus N maps (a revoked
/// mapping stays dead). Does it go faster from two threads (the VM's vCPUs),
/// or does the kernel serialise it? Raw ioctls, rounds alternating which
/// goes first; a round's ratio is two threads / one thread.
fn restore_threads(opts: &Opts, ctx: &Ctx) -> R<()> {
    const ROUNDS: usize = 4;
    let n = THREADS_N;
    let fds = (0..n)
        .map(|i| raw::export(ctx.device, BAR, i * PAGE, PAGE))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, fd) in fds.iter().enumerate() {
        raw::map_file(ctx.iommufd, ctx.ioas, *fd, 0, PAGE, IOVA + i as u64 * PAGE)?;
    }
    let cmd = raw::command(ctx.device, ctx.config)?;
    let half = fds.len() / 2;
    let mut times: [Vec<f64>; 2] = Default::default();
    let mut ratios = Vec::new();
    for round in 0..ROUNDS {
        let mut medians = [0.0; 2];
        for j in 0..2 {
            let threads = (j + round) % 2;
            let mut v = Vec::new();
            opts.budget(3, 5, 2.0).repeat(|_| -> R<()> {
                raw::set_command(ctx.device, ctx.config, cmd & !raw::COMMAND_MEMORY)?;
                raw::set_command(ctx.device, ctx.config, cmd | raw::COMMAND_MEMORY)?;
                let t = Instant::now();
                if threads == 0 {
                    remap_range(ctx, &fds, 0..fds.len())?;
                } else {
                    std::thread::scope(|s| -> std::io::Result<()> {
                        let other = s.spawn(|| remap_range(ctx, &fds, half..fds.len()));
                        remap_range(ctx, &fds, 0..half)?;
                        other
                            .join()
                            .map_err(|_| std::io::Error::other("restore thread panicked"))?
                    })?;
                }
                v.push(ns_since(t));
                Ok(())
            })?;
            medians[threads] = Stats::of(&v).median;
            times[threads].extend(v);
        }
        ratios.push(medians[1] / medians[0]);
    }
    emit("threads", "one", "restore", n, "ns", &Stats::of(&times[0]));
    emit("threads", "two", "restore", n, "ns", &Stats::of(&times[1]));
    emit(
        "threads",
        "ratio",
        "restore",
        n,
        "ratio",
        &Stats::of(&ratios),
    );
    println!(
        "bench: restore of {n} mappings: one thread {:.1} ms, two threads {:.1} ms, ratio {:.3}",
        Stats::of(&times[0]).median / 1e6,
        Stats::of(&times[1]).median / 1e6,
        Stats::of(&ratios).median
    );
    for (i, fd) in fds.iter().enumerate() {
        raw::unmap(ctx.iommufd, ctx.ioas, IOVA + i as u64 * PAGE, PAGE)?;
        raw::close(*fd)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The VM
// ---------------------------------------------------------------------------

fn read_hex(path: &str) -> Option<u64> {
    let s = fs::read_to_string(path).ok()?;
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// The ivshmem device (1af4:1110) with the largest BAR2: (address, size).
/// Listed by the library's `Sysfs` (never `std::fs::read_dir` on sysfs:
/// docs/KERNEL.md).
fn largest_ivshmem() -> R<(String, u64)> {
    let mut best: Option<(String, u64)> = None;
    for addr in dmabuf_p2p::sysfs::Sysfs::default().devices()? {
        let bdf = addr.to_string();
        let dir = format!("/sys/bus/pci/devices/{bdf}");
        if read_hex(&format!("{dir}/vendor")) != Some(0x1af4)
            || read_hex(&format!("{dir}/device")) != Some(0x1110)
        {
            continue;
        }
        let res = fs::read_to_string(format!("{dir}/resource"))?;
        let Some(line) = res.lines().nth(BAR as usize) else {
            continue;
        };
        let mut w = line
            .split_whitespace()
            .filter_map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).ok());
        let (Some(start), Some(end)) = (w.next(), w.next()) else {
            continue;
        };
        let size = if end == 0 { 0 } else { end - start + 1 };
        if best.as_ref().is_none_or(|(_, s)| size > *s) {
            best = Some((bdf, size));
        }
    }
    best.ok_or_else(|| "no ivshmem device in this VM".into())
}

fn iommu_group(bdf: &str) -> R<u32> {
    let link = fs::read_link(format!("/sys/bus/pci/devices/{bdf}/iommu_group"))?;
    let name = link
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("iommu_group link without a name")?;
    Ok(name.parse()?)
}

fn meminfo(key: &str) -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

fn vmstat(key: &str) -> Option<u64> {
    let text = fs::read_to_string("/proc/vmstat").ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

fn raise_fd_limit(n: u64) -> R<()> {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit reads one valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(format!(
            "setrlimit(RLIMIT_NOFILE, {n}): {}",
            std::io::Error::last_os_error()
        )
        .into());
    }
    Ok(())
}
