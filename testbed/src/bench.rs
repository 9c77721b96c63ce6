//! `cargo xtask bench`: builds the in-VM benchmark (`bench/`, package
//! `dmabuf-p2p-bench`) in release mode, boots the test VM with one 1 GiB
//! ivshmem BAR in place of the usual ivshmem devices, collects the `@@bench {json}` results the guest prints and
//! writes `docs/BENCHMARKS.md` with SVG plots under `docs/bench/`.
//!
//! * `cargo xtask bench` — the full run (about 5-10 minutes under TCG).
//! * `cargo xtask bench --quick` — a quarter of the guest's time budgets.
//! * `cargo xtask bench --only=sweep,overhead,revoke,scale` — some parts
//!   only; the docs are then written to the run directory, not `docs/`.
//! * `cargo xtask bench --render FILE` — rewrite the docs from a saved
//!   `results.json` without booting anything.
//! * `cargo xtask bench --strace` — the syscalls of two library and two raw
//!   export-map-unmap-close cycles, labelled (needs the host's strace).
//!
//! Every run leaves `results.json`, `BENCHMARKS.md` and the plots in its run
//! directory (`target/testbed/bench[-TAG]/`).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::initramfs::Initramfs;
use crate::qemu::{Accel, Ivshmem};
use crate::suite::{self, GuestBinaries, RunSpec};
use crate::{deps, run_captured, workspace_root, Error, Result};

/// Where the benchmark binary lives in the VM.
pub const GUEST_BENCH: &str = "/bin/dmabuf-p2p-bench";

/// Size of the ivshmem device the benchmark maps.
pub const BIG_BAR: u64 = 1 << 30;
/// Its QEMU id (and backing file `target/testbed/bench[-TAG]/bench.mem`).
pub const BENCH_SHM: &str = "bench";

/// Guest memory for the benchmark VM: the 1 GiB memfd sweep pins 1 GiB of
/// guest pages.
pub const BENCH_MEMORY_MIB: u32 = 2560;

/// The docs page, relative to the workspace root.
pub const DOC: &str = "docs/BENCHMARKS.md";
/// The plots' directory, relative to the workspace root.
pub const PLOTS: &str = "docs/bench";

/// One `@@bench` record. Results have `series`, `op`, `x`, `unit` and the
/// statistics; facts about the run (`group` = `meta`) have `key` and `value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The table: `sweep`, `overhead`, `revoke`, `scale` or `meta`.
    pub group: String,
    /// The line in the table (`dmabuf`, `type1`, `memfd`, `library`, `raw`, `ratio`).
    #[serde(default)]
    pub series: String,
    /// The operation (`map`, `unmap`, `export`, ...).
    #[serde(default)]
    pub op: String,
    /// Size in bytes, or a count.
    #[serde(default)]
    pub x: u64,
    /// `ns`, `ratio` or `bytes`.
    #[serde(default)]
    pub unit: String,
    /// Median of the repeated runs.
    #[serde(default)]
    pub median: Option<f64>,
    /// Smallest.
    #[serde(default)]
    pub min: Option<f64>,
    /// Largest.
    #[serde(default)]
    pub max: Option<f64>,
    /// Number of runs.
    #[serde(default)]
    pub n: usize,
    /// `meta` records: the fact's name.
    #[serde(default)]
    pub key: String,
    /// `meta` records: its value.
    #[serde(default)]
    pub value: String,
}

/// A whole benchmark run, as saved in `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// UTC date of the run.
    pub date: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// The host CPU model.
    pub host_cpu: String,
    /// QEMU's version line.
    pub qemu: String,
    /// Guest CPUs and memory.
    pub vm: String,
    /// Wall time of the VM.
    pub vm_seconds: f64,
    /// Whether `--quick` was given.
    pub quick: bool,
    /// The records, in the order the guest sent them.
    pub records: Vec<Record>,
}

impl Results {
    /// The record of one measurement.
    pub fn get(&self, group: &str, series: &str, op: &str, x: u64) -> Option<&Record> {
        self.records.iter().find(|r| r.group == group && r.series == series && r.op == op && r.x == x)
    }

    /// The median of one measurement.
    pub fn median(&self, group: &str, series: &str, op: &str, x: u64) -> Option<f64> {
        self.get(group, series, op, x).and_then(|r| r.median)
    }

    /// The x values of a group, sorted.
    pub fn xs(&self, group: &str) -> Vec<u64> {
        let set: BTreeSet<u64> = self.records.iter().filter(|r| r.group == group).map(|r| r.x).collect();
        set.into_iter().collect()
    }

    /// A `meta` fact.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.records.iter().find(|r| r.group == "meta" && r.key == key).map(|r| r.value.as_str())
    }

    /// (x, median, min, max) of one series and operation, by x.
    pub fn points(&self, group: &str, series: &str, op: &str) -> Vec<(f64, f64, f64, f64)> {
        let mut v: Vec<(f64, f64, f64, f64)> = self
            .records
            .iter()
            .filter(|r| r.group == group && r.series == series && r.op == op)
            .filter_map(|r| Some((r.x as f64, r.median?, r.min?, r.max?)))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }
}

/// What `cargo xtask bench` was asked to do.
#[derive(Debug, Clone, Default)]
struct Opts {
    quick: bool,
    only: Option<String>,
    render: Option<PathBuf>,
    /// Run the `trace` part under strace and print the trace (no docs).
    strace: bool,
}

fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--strace" => o.strace = true,
            "--render" => {
                let f = it.next().ok_or_else(|| Error::Setup("--render needs a results.json".into()))?;
                o.render = Some(PathBuf::from(f));
            }
            s if s.starts_with("--only=") => o.only = Some(s["--only=".len()..].to_owned()),
            other => return Err(Error::Setup(format!("bench: unknown argument {other:?}"))),
        }
    }
    Ok(o)
}

/// `cargo xtask bench [--quick] [--only=PARTS] [--render FILE]`; returns
/// whether the run succeeded.
pub fn xtask(args: &[String]) -> Result<bool> {
    let opts = parse_opts(args)?;
    if let Some(file) = &opts.render {
        let text = fs::read_to_string(file).map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
        let results: Results =
            serde_json::from_str(&text).map_err(|e| Error::Setup(format!("{}: {e}", file.display())))?;
        write_docs(&results, &workspace_root())?;
        println!("bench: wrote {DOC} and {PLOTS}/*.svg from {}", file.display());
        return Ok(true);
    }
    let start = Instant::now();
    deps::ensure(deps::VM_TOOLS)?;
    let bench_bin = build_bench()?;

    let job = if opts.strace {
        format!("strace -f -o /tmp/strace.log {GUEST_BENCH} --only=trace; s=$?; cat /tmp/strace.log; exit $s\n")
    } else {
        let mut job = GUEST_BENCH.to_owned();
        if opts.quick {
            job.push_str(" --quick");
        }
        if let Some(only) = &opts.only {
            job.push_str(&format!(" --only={only}"));
        }
        job + "\n"
    };
    let spec = RunSpec::new("bench", job, false);
    let run_dir = run_dir(&spec.name);
    fs::create_dir_all(&run_dir).map_err(|e| Error::io(format!("creating {}", run_dir.display()), e))?;
    let initrd = run_dir.join("bench-initramfs.cpio");
    pack(&spec, &bench_bin, opts.strace, &initrd)?;
    // suite::run packs its standard initramfs (the CLI slot gets the bench
    // binary, nothing else is built) and the tweak replaces it with ours.
    let bins = GuestBinaries { vm_tests: None, cli: bench_bin };
    let mut shape = String::new();
    let verdict = suite::run(&spec, &bins, |c| {
        // Only the device under test: fewer devices, less to boot and bind.
        c.ivshmem = vec![Ivshmem { id: BENCH_SHM.into(), size: BIG_BAR }];
        c.memory_mib = BENCH_MEMORY_MIB;
        c.hugepages = 0;
        c.initrd = initrd.clone();
        shape = format!("{} vCPUs, {} MiB RAM, {:?} accel", c.cpus, c.memory_mib, c.accel);
    })?;
    // Remove the sparse 1 GiB backing file: nothing checks it afterwards.
    let _ = fs::remove_file(run_dir.join(format!("{BENCH_SHM}.mem")));
    if !verdict.passed() {
        suite::print_verdict("bench", &verdict);
        return Ok(false);
    }
    let mut records = Vec::new();
    for j in &verdict.report.bench {
        records.push(
            serde_json::from_str::<Record>(j).map_err(|e| Error::Setup(format!("bad @@bench record {j}: {e}")))?,
        );
    }
    let accel = match Accel::detect() {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let results = Results {
        date: utc_date(),
        accel: accel.to_owned(),
        host_cpu: host_cpu(),
        qemu: qemu_version(),
        vm: shape,
        vm_seconds: verdict.elapsed.as_secs_f64(),
        quick: opts.quick,
        records,
    };
    let json = serde_json::to_string_pretty(&results).map_err(|e| Error::Setup(e.to_string()))?;
    let saved = run_dir.join("results.json");
    fs::write(&saved, json).map_err(|e| Error::io(format!("writing {}", saved.display()), e))?;
    write_docs(&results, &run_dir)?;
    if opts.only.is_none() && !opts.strace {
        write_docs(&results, &workspace_root())?;
        println!("bench: wrote {DOC} and {PLOTS}/*.svg");
    } else {
        println!("bench: partial run (--only): docs written to {} only", run_dir.display());
    }
    println!(
        "bench: VM {:.0} s, total {:.0} s; results in {}",
        verdict.elapsed.as_secs_f64(),
        start.elapsed().as_secs_f64(),
        saved.display()
    );
    Ok(true)
}

/// The run directory `suite::run` uses for a run named `name`.
fn run_dir(name: &str) -> PathBuf {
    let dir = match std::env::var("DMABUF_P2P_RUN_TAG") {
        Ok(tag) if !tag.is_empty() => format!("{name}-{tag}"),
        _ => name.to_owned(),
    };
    workspace_root().join("target/testbed").join(dir)
}

/// Builds the benchmark in release mode (the library's own overhead is what
/// is measured, so it must be optimised); returns the executable.
fn build_bench() -> Result<PathBuf> {
    eprintln!("testbed: building the benchmark (release)");
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root()).args([
        "build",
        "--release",
        "--package",
        "dmabuf-p2p-bench",
        "--bin",
        "dmabuf-p2p-bench",
        "--message-format=json-render-diagnostics",
    ]);
    let out = run_captured(&mut cmd, "cargo build --release (dmabuf-p2p-bench)")?;
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == "dmabuf-p2p-bench" {
            if let Some(exe) = v["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    Err(Error::Setup("cargo build reported no dmabuf-p2p-bench executable".into()))
}

/// The benchmark VM's root: the standard layout plus the bench binary.
fn pack(spec: &RunSpec, bench: &Path, strace: bool, dest: &Path) -> Result<()> {
    let mut fs_ = Initramfs::new();
    fs_.host_binary("/bin/busybox", Path::new("/bin/busybox"))?;
    fs_.file("/init", 0o755, suite::INIT.as_bytes().to_vec());
    fs_.file("/etc/testbed/job.sh", 0o755, spec.job.as_bytes().to_vec());
    fs_.file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n".to_vec());
    fs_.file("/etc/group", 0o644, b"root:x:0:\n".to_vec());
    for d in ["/proc", "/sys", "/dev", "/tmp", "/root", "/run"] {
        fs_.dir(d);
    }
    fs_.host_binary(GUEST_BENCH, bench)?;
    if strace {
        fs_.host_binary("/bin/strace", Path::new("/usr/bin/strace"))?;
    }
    fs_.write_to(dest)
}

fn utc_date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn host_cpu() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())))
        .unwrap_or_else(|| "unknown".into())
}

fn qemu_version() -> String {
    Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------

/// A byte count as `64 KiB`, `1 GiB`.
pub fn fmt_size(b: u64) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// A duration in nanoseconds, with three significant digits and a unit
/// picked for the value.
pub fn fmt_ns(ns: f64) -> String {
    let (v, unit) = if ns >= 1e9 {
        (ns / 1e9, "s")
    } else if ns >= 1e6 {
        (ns / 1e6, "ms")
    } else if ns >= 1e3 {
        (ns / 1e3, "µs")
    } else {
        (ns, "ns")
    };
    format!("{} {unit}", sig3(v))
}

fn sig3(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `median (min–max)` in the unit of the median.
fn cell(r: Option<&Record>) -> String {
    let Some(r) = r else { return "–".into() };
    let (Some(med), Some(min), Some(max)) = (r.median, r.min, r.max) else { return "–".into() };
    match r.unit.as_str() {
        "ratio" => format!("**{med:.3}** ({min:.2}–{max:.2})"),
        "bytes" => format!("{med:.0} ({min:.0}–{max:.0})"),
        _ => {
            let (div, unit) = if med >= 1e9 {
                (1e9, "s")
            } else if med >= 1e6 {
                (1e6, "ms")
            } else if med >= 1e3 {
                (1e3, "µs")
            } else {
                (1.0, "ns")
            };
            format!("{} {unit} ({}–{})", sig3(med / div), sig3(min / div), sig3(max / div))
        }
    }
}

/// Least-squares slope of log(median) against log(x) over the last `k`
/// points: about 1 for a cost proportional to size, 0 for a constant one.
pub fn loglog_slope(points: &[(f64, f64, f64, f64)], k: usize) -> Option<f64> {
    let pts: Vec<(f64, f64)> = points.iter().rev().take(k).map(|p| (p.0.ln(), p.1.ln())).collect();
    if pts.len() < 2 {
        return None;
    }
    let n = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

// ---------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------

const SWEEP_SERIES: [(&str, &str); 3] = [
    ("dmabuf", "BAR dma-buf, `IOMMU_IOAS_MAP_FILE`"),
    ("type1", "legacy type1, `VFIO_IOMMU_MAP_DMA` of the BAR mmap"),
    ("memfd", "memfd, `IOMMU_IOAS_MAP_FILE`"),
];
const OVERHEAD_OPS: [&str; 5] = ["export", "map", "unmap", "close", "total"];

/// Writes `docs/BENCHMARKS.md` and the plots under `root`.
pub fn write_docs(r: &Results, root: &Path) -> Result<()> {
    let plots = root.join(PLOTS);
    fs::create_dir_all(&plots).map_err(|e| Error::io(format!("creating {}", plots.display()), e))?;
    plot_sweep(r, &plots.join("map-vs-size.svg"))?;
    plot_overhead(r, &plots.join("overhead.svg"))?;
    plot_revoke(r, &plots.join("revocation.svg"))?;
    plot_scale(r, &plots.join("scale.svg"))?;
    let doc = root.join(DOC);
    fs::write(&doc, page(r)).map_err(|e| Error::io(format!("writing {}", doc.display()), e))
}

/// The Markdown page.
pub fn page(r: &Results) -> String {
    let mut s = String::new();
    let bar = r.meta("bar_size").and_then(|v| v.parse().ok()).unwrap_or(BIG_BAR);
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench` (run with `DMABUF_P2P_KERNEL=/work/shared/vm/bzImage \
         DMABUF_P2P_RUN_TAG=bench cargo xtask bench`); do not edit by hand. `cargo xtask bench \
         --render target/testbed/bench-bench/results.json` rewrites this page and its plots from \
         saved results.\n"
    );
    let accel = if r.accel == "tcg" { "**emulated (QEMU TCG, no KVM)**" } else { "run under KVM" };
    let _ = writeln!(
        s,
        "**Read the numbers as relative ones.** The VM is {accel}: every guest instruction, \
         the kernel's included, is translated by QEMU, and the IOMMU, the PCI config space and \
         the BARs are QEMU models. Absolute times are not hardware times (expect them to be one \
         to two orders of magnitude slower than on a real machine, and not uniformly so). What \
         carries over are the ratios, all taken between measurements interleaved or made in the \
         same VM run, and how costs grow with size and count. The host is a shared 2-core \
         machine on which other builds and VMs ran at the same time, which adds noise.\n"
    );
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| date | {} |", r.date);
    let _ = writeln!(s, "| host CPU | {} |", r.host_cpu);
    let _ = writeln!(s, "| QEMU | {} ({}) |", r.qemu, r.accel);
    let _ = writeln!(s, "| guest kernel | {} |", r.meta("kernel").unwrap_or("?"));
    let _ = writeln!(s, "| VM | {} |", r.vm);
    let _ = writeln!(
        s,
        "| device under test | ivshmem {} BAR2 ({}), bound to vfio-pci; the same device is attached to the IOAS (or owns the type1 container), so every mapping fills real IOMMU page tables |",
        r.meta("device").unwrap_or("?"),
        fmt_size(bar)
    );
    if let Some(p) = r.meta("type1_iova_pgsizes") {
        let _ = writeln!(s, "| IOMMU page sizes (type1 `iova_pgsizes`) | `{p}` |");
    }
    let _ = writeln!(s, "| VM wall time | {:.0} s{} |", r.vm_seconds, if r.quick { " (`--quick`)" } else { "" });
    let _ = writeln!(
        s,
        "\nEvery figure is the **median** of repeated runs, with the minimum and maximum in \
         brackets: `median (min–max)`. Repetitions are budgeted by time (TCG is slow), at \
         least 3 and usually 5-25; `n` is in `results.json`. The guest binary is \
         `bench/` (`dmabuf-p2p-bench`), built in release mode.\n"
    );

    // 1. Sweep
    let _ = writeln!(s, "## 1. Map cost against size\n");
    let _ = writeln!(
        s,
        "Mapping and unmapping one range of {} starting at IOVA 1 GiB, for each size. \
         **dma-buf**: a single-range `VFIO_DEVICE_FEATURE_DMA_BUF` export of the BAR (made \
         outside the timing), `IOMMU_IOAS_MAP_FILE` / `IOMMU_IOAS_UNMAP`. **type1**: the path \
         dma-buf export replaces, the device opened through its group in a `/dev/vfio/vfio` \
         type1v2 container, `VFIO_IOMMU_MAP_DMA` of the mmap'd BAR's virtual address / \
         `VFIO_IOMMU_UNMAP_DMA` (the device's cdev closed meanwhile). **memfd**: \
         `IOMMU_IOAS_MAP_FILE` of a memfd, whose pages are pinned on every map (allocated once \
         before timing). All raw ioctls, one untimed warm-up per size.\n",
        fmt_size(bar)
    );
    let _ = writeln!(s, "![map and unmap time against size, log-log](bench/map-vs-size.svg)\n");
    let xs = r.xs("sweep");
    let _ = write!(s, "| size |");
    for (_, name) in SWEEP_SERIES {
        let _ = write!(s, " {name}: map | unmap |");
    }
    let _ = writeln!(s, " type1 / dma-buf map |");
    let _ = writeln!(s, "|---|{}", "---|".repeat(SWEEP_SERIES.len() * 2 + 1));
    for &x in &xs {
        let _ = write!(s, "| {} |", fmt_size(x));
        for (series, _) in SWEEP_SERIES {
            let _ = write!(s, " {} | {} |", cell(r.get("sweep", series, "map", x)), cell(r.get("sweep", series, "unmap", x)));
        }
        let ratio = match (r.median("sweep", "type1", "map", x), r.median("sweep", "dmabuf", "map", x)) {
            (Some(a), Some(b)) => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let _ = writeln!(s, " {ratio} |");
    }
    let _ = writeln!(s, "\nHow each cost grows (log-log slope of the median over the four largest sizes: 1 means proportional to size, 0 means flat; and the cost at the largest size over the cost at the smallest):\n");
    let _ = writeln!(s, "| path | map slope | map growth | unmap slope | unmap growth |\n|---|---|---|---|---|");
    for (series, name) in SWEEP_SERIES {
        let mut row = format!("| {name} |");
        for op in ["map", "unmap"] {
            let p = r.points("sweep", series, op);
            let slope = loglog_slope(&p, 4).map_or("–".into(), |v| format!("{v:.2}"));
            let growth = match (p.first(), p.last()) {
                (Some(a), Some(b)) if p.len() > 1 => {
                    format!("×{:.0} ({} → {})", b.1 / a.1, fmt_size(a.0 as u64), fmt_size(b.0 as u64))
                }
                _ => "–".into(),
            };
            let _ = write!(row, " {slope} | {growth} |");
        }
        let _ = writeln!(s, "{row}");
    }
    if let Some(m) = r.meta("memfd_max_size") {
        let _ = writeln!(s, "\nThe memfd sweep stops at {} (what the guest's memory allows).", fmt_size(m.parse().unwrap_or(0)));
    }
    s.push_str(SWEEP_NOTES);

    // 2. Overhead
    let _ = writeln!(s, "\n## 2. Library overhead against raw ioctls\n");
    let _ = writeln!(
        s,
        "One cycle is: export the first `size` bytes of the BAR, map the dma-buf at a fixed IOVA, \
         unmap it, close it. **library**: `VfioPciDevice::export_bar`, `Ioas::map_dmabuf`, \
         `IoasMapping::unmap`, dropping the mapping and the export. **raw**: hand-written \
         `libc::ioctl` calls on the bindings' structs (`VFIO_DEVICE_FEATURE`, \
         `IOMMU_IOAS_MAP_FILE`, `IOMMU_IOAS_UNMAP`) and `close`, in the same binary, on the \
         same device, IOAS and iommufd. A batch runs 8 cycles of each, interleaved and \
         alternating which goes first; its ratio is library time / raw time for each \
         operation; the table gives the median ratio over the batches with min and max. \
         *total* is the whole cycle.\n"
    );
    let _ = writeln!(s, "![library / raw time per operation against size](bench/overhead.svg)\n");
    let _ = writeln!(s, "| size | {} |", OVERHEAD_OPS.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(OVERHEAD_OPS.len()));
    let oxs = r.xs("overhead");
    for &x in &oxs {
        let _ = write!(s, "| {} |", fmt_size(x));
        for op in OVERHEAD_OPS {
            let _ = write!(s, " {} |", cell(r.get("overhead", "ratio", op, x)));
        }
        s.push('\n');
    }
    let _ = writeln!(s, "\nThe raw times behind the ratios (median per operation):\n");
    let _ = writeln!(s, "| size | {} |", OVERHEAD_OPS.map(|o| format!("raw {o} | library {o}")).join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(OVERHEAD_OPS.len() * 2));
    for &x in &oxs {
        let _ = write!(s, "| {} |", fmt_size(x));
        for op in OVERHEAD_OPS {
            let f = |series| r.median("overhead", series, op, x).map_or("–".into(), fmt_ns);
            let _ = write!(s, " {} | {} |", f("raw"), f("library"));
        }
        s.push('\n');
    }
    let _ = writeln!(s);
    for op in OVERHEAD_OPS {
        let worst = oxs
            .iter()
            .filter_map(|&x| r.median("overhead", "ratio", op, x).map(|m| (x, m)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((x, m)) = worst {
            let verdict = if m <= 1.05 { "within 5%" } else { "**more than 5%**" };
            let _ = writeln!(s, "- {op}: worst median ratio {m:.3} (at {}), {verdict} of raw ioctls.", fmt_size(x));
        }
    }
    s.push_str(OVERHEAD_NOTES);

    // 3. Revocation
    let _ = writeln!(s, "\n## 3. Revocation and restore against the number of mappings\n");
    let _ = writeln!(
        s,
        "N single-page exports of the BAR, each mapped once. **library**: each mapped as a \
         `revoke::Attachment` (automatic restore); *revoke* is \
         `VfioPciDevice::set_memory_decode(false)`: the config write (the kernel revokes every \
         dma-buf and iommufd zaps each mapping's IOMMU entries), then the library unmaps every \
         dead area; *restore* is `set_memory_decode(true)`: the config write, then the library \
         unmaps and maps again every attachment at its IOVA. **raw**: the same with raw ioctls: \
         `pwrite` of `PCI_COMMAND`, then N `IOMMU_IOAS_UNMAP` (revoke) or N \
         `IOMMU_IOAS_MAP_FILE` (restore). *config write* is the raw `pwrite` alone: the \
         kernel's share.\n"
    );
    let _ = writeln!(s, "![revoke and restore time against the number of mappings](bench/revocation.svg)\n");
    let _ = writeln!(
        s,
        "| N | library revoke | library restore | raw revoke | raw restore | config write (revoke) | config write (restore) | library / raw revoke | library / raw restore |\n|---|---|---|---|---|---|---|---|---|"
    );
    for &x in &r.xs("revoke") {
        let ratio = |op| match (r.median("revoke", "library", op, x), r.median("revoke", "raw", op, x)) {
            (Some(a), Some(b)) => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {x} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(r.get("revoke", "library", "revoke", x)),
            cell(r.get("revoke", "library", "restore", x)),
            cell(r.get("revoke", "raw", "revoke", x)),
            cell(r.get("revoke", "raw", "restore", x)),
            cell(r.get("revoke", "raw", "revoke_write", x)),
            cell(r.get("revoke", "raw", "restore_write", x)),
            ratio("revoke"),
            ratio("restore"),
        );
    }
    let rx = r.xs("revoke");
    if let (Some(&lo), Some(&hi)) = (rx.first(), rx.last()) {
        for (series, op) in [("library", "revoke"), ("library", "restore")] {
            if let (Some(a), Some(b)) = (r.median("revoke", series, op, lo), r.median("revoke", series, op, hi)) {
                let per = (b - a) / (hi - lo) as f64;
                let _ = writeln!(s, "\n{series} {op}: {} per extra mapping (from N={lo} to N={hi}).", fmt_ns(per));
            }
        }
    }
    s.push_str(REVOKE_NOTES);

    // 4. Scale
    let _ = writeln!(s, "\n## 4. Export and map scale\n");
    let _ = writeln!(
        s,
        "N single-page exports of the BAR made and then each mapped at its own IOVA, then all \
         unmapped and closed (*teardown*); time per buffer. **library**: `export_bar` and \
         `Ioas::map_dmabuf` (each mapping keeps a duplicate of the dma-buf fd); **raw**: raw \
         ioctls. Kernel memory is read from `/proc/meminfo` (`Slab`, `SUnreclaim`) and \
         `/proc/vmstat` (`nr_iommu_pages`, the IOMMU page tables) before the exports and after \
         the mappings; the growth is given per buffer. Small N are dominated by slab noise.\n"
    );
    let _ = writeln!(s, "![time per buffer against the number of buffers](bench/scale.svg)\n");
    let _ = writeln!(
        s,
        "| N | library export | library map | library teardown | raw export | raw map | raw teardown | Slab / buffer (B) | SUnreclaim / buffer (B) | IOMMU page tables / buffer (B) |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for &x in &r.xs("scale") {
        let _ = writeln!(
            s,
            "| {x} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(r.get("scale", "library", "export", x)),
            cell(r.get("scale", "library", "map", x)),
            cell(r.get("scale", "library", "teardown", x)),
            cell(r.get("scale", "raw", "export", x)),
            cell(r.get("scale", "raw", "map", x)),
            cell(r.get("scale", "raw", "teardown", x)),
            cell(r.get("scale", "raw", "slab", x)),
            cell(r.get("scale", "raw", "sunreclaim", x)),
            cell(r.get("scale", "raw", "iommu_pt", x)),
        );
    }
    s.push_str(SCALE_NOTES);
    let _ = writeln!(
        s,
        "\n## Reproducing\n\n```sh\nDMABUF_P2P_KERNEL=/work/shared/vm/bzImage DMABUF_P2P_RUN_TAG=bench cargo xtask bench\n```\n\n\
         It builds `dmabuf-p2p-bench` in release mode, boots the test VM with one ivshmem \
         device of 1 GiB (a sparse file) in place of the usual ones and {} MiB of RAM, and runs the four parts in \
         order (type1 first, with the device's cdev closed; then everything through the cdev). \
         The results land in `target/testbed/bench[-TAG]/results.json`. `--quick` cuts the \
         time budgets to a quarter; `--only=sweep,overhead,revoke,scale` runs some parts (and \
         leaves `docs/` alone). It is not part of the test suite and nothing asserts a time.",
        BENCH_MEMORY_MIB
    );
    s
}

/// Observations on the sweep that the numbers alone do not say.
const SWEEP_NOTES: &str = "";
/// What the overhead investigation found.
const OVERHEAD_NOTES: &str = "";
/// Observations on revocation.
const REVOKE_NOTES: &str = "";
/// Observations on scale.
const SCALE_NOTES: &str = "";

// ---------------------------------------------------------------------------
// Plots
// ---------------------------------------------------------------------------

/// One line of a chart: (x, median, min, max) points.
struct Curve {
    name: String,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64, f64, f64)>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

fn curve(r: &Results, group: &str, series: &str, op: &str, name: &str, color: usize, dashed: bool) -> Curve {
    Curve { name: name.to_owned(), color: COLORS[color % COLORS.len()], dashed, points: r.points(group, series, op) }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Setup(format!("drawing a plot: {e}"))
}

fn fmt_count(v: f64) -> String {
    format!("{v:.0}")
}

fn fmt_bytes_axis(v: f64) -> String {
    fmt_size(v.round() as u64).replace(' ', "")
}

/// A chart with a log x axis and a log (`y_log`) or linear y axis.
#[allow(clippy::too_many_arguments)]
fn chart(
    area: &Area<'_>,
    title: &str,
    x_label: &str,
    x_fmt: fn(f64) -> String,
    y_label: &str,
    y_log: bool,
    curves: &[Curve],
    hline: Option<f64>,
) -> Result<()> {
    let pts = curves.iter().flat_map(|c| c.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for p in pts {
        x0 = x0.min(p.0);
        x1 = x1.max(p.0);
        y0 = y0.min(p.2);
        y1 = y1.max(p.3);
    }
    if let Some(h) = hline {
        y0 = y0.min(h);
        y1 = y1.max(h);
    }
    if x0 > x1 {
        // Nothing measured: an empty frame with the title.
        area.titled(&format!("{title} (no data)"), ("sans-serif", 18)).map_err(plot_err)?;
        return Ok(());
    }
    let xr = (x0 / 1.4..x1 * 1.4).log_scale();
    if y_log {
        chart_in(area, title, x_label, x_fmt, y_label, xr, (y0 / 1.5..y1 * 1.5).log_scale(), curves, hline)
    } else {
        let pad = ((y1 - y0) * 0.08).max(0.01);
        chart_in(area, title, x_label, x_fmt, y_label, xr, (y0 - pad)..(y1 + pad), curves, hline)
    }
}

#[allow(clippy::too_many_arguments)]
fn chart_in<X, Y>(
    area: &Area<'_>,
    title: &str,
    x_label: &str,
    x_fmt: fn(f64) -> String,
    y_label: &str,
    xr: X,
    yr: Y,
    curves: &[Curve],
    hline: Option<f64>,
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    Y: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let mut ch = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(xr, yr)
        .map_err(plot_err)?;
    let x_formatter = |v: &f64| x_fmt(*v);
    let y_formatter = |v: &f64| axis_number(*v);
    ch.configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&x_formatter)
        .y_label_formatter(&y_formatter)
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .draw()
        .map_err(plot_err)?;
    if let Some(h) = hline {
        let (xa, xb) = (ch.x_range().start, ch.x_range().end);
        ch.draw_series(DashedLineSeries::new(vec![(xa, h), (xb, h)], 6, 4, BLACK.mix(0.5).stroke_width(1)))
            .map_err(plot_err)?
            .label(format!("{h}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    for c in curves.iter().filter(|c| !c.points.is_empty()) {
        let color = c.color;
        let style = color.stroke_width(2);
        let line: Vec<(f64, f64)> = c.points.iter().map(|p| (p.0, p.1)).collect();
        let anno = if c.dashed {
            ch.draw_series(DashedLineSeries::new(line, 8, 5, style)).map_err(plot_err)?
        } else {
            ch.draw_series(LineSeries::new(line, style)).map_err(plot_err)?
        };
        anno.label(c.name.as_str()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        ch.draw_series(c.points.iter().map(|p| ErrorBar::new_vertical(p.0, p.2, p.1, p.3, color.stroke_width(1), 6)))
            .map_err(plot_err)?;
        ch.draw_series(c.points.iter().map(|p| Circle::new((p.0, p.1), 3, color.filled()))).map_err(plot_err)?;
    }
    ch.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// An axis number: plain for moderate values, with a k/M suffix otherwise.
fn axis_number(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e4 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = if v.abs() >= 100.0 { format!("{v:.0}") } else if v.abs() >= 1.0 { format!("{v:.2}") } else { format!("{v:.3}") };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// Scales the y values of curves (ns to µs or ms).
fn scaled(mut c: Curve, div: f64) -> Curve {
    for p in &mut c.points {
        p.1 /= div;
        p.2 /= div;
        p.3 /= div;
    }
    c
}

fn plot_sweep(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((1, 2));
    for (area, op) in panels.iter().zip(["map", "unmap"]) {
        let curves: Vec<Curve> = SWEEP_SERIES
            .iter()
            .enumerate()
            .map(|(i, (series, _))| {
                let name = match *series {
                    "dmabuf" => "BAR dma-buf (iommufd MAP_FILE)",
                    "type1" => "legacy type1 (MAP_DMA of BAR mmap)",
                    _ => "memfd (iommufd MAP_FILE)",
                };
                scaled(curve(r, "sweep", series, op, name, i, false), 1e3)
            })
            .collect();
        chart(area, &format!("{op} time against size (log-log)"), "size", fmt_bytes_axis, &format!("{op} time (µs)"), true, &curves, None)?;
    }
    root.present().map_err(plot_err)
}

fn plot_overhead(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let curves: Vec<Curve> = OVERHEAD_OPS
        .iter()
        .enumerate()
        .map(|(i, op)| curve(r, "overhead", "ratio", op, op, i, *op == "total"))
        .collect();
    chart(&root, "library / raw ioctl time per operation (median of batches)", "size", fmt_bytes_axis, "ratio", false, &curves, Some(1.05))?;
    root.present().map_err(plot_err)
}

fn plot_revoke(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let curves = vec![
        scaled(curve(r, "revoke", "library", "revoke", "library revoke", 0, false), 1e6),
        scaled(curve(r, "revoke", "library", "restore", "library restore", 1, false), 1e6),
        scaled(curve(r, "revoke", "raw", "revoke", "raw revoke", 0, true), 1e6),
        scaled(curve(r, "revoke", "raw", "restore", "raw restore", 1, true), 1e6),
        scaled(curve(r, "revoke", "raw", "revoke_write", "config write alone (revoke)", 2, true), 1e6),
    ];
    chart(&root, "revoke and restore against mappings attached (log-log)", "mappings", fmt_count, "time (ms)", true, &curves, None)?;
    root.present().map_err(plot_err)
}

fn plot_scale(r: &Results, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let curves = vec![
        scaled(curve(r, "scale", "library", "export", "library export", 0, false), 1e3),
        scaled(curve(r, "scale", "library", "map", "library map", 1, false), 1e3),
        scaled(curve(r, "scale", "library", "teardown", "library teardown", 2, false), 1e3),
        scaled(curve(r, "scale", "raw", "export", "raw export", 0, true), 1e3),
        scaled(curve(r, "scale", "raw", "map", "raw map", 1, true), 1e3),
        scaled(curve(r, "scale", "raw", "teardown", "raw teardown", 2, true), 1e3),
    ];
    chart(&root, "time per buffer against buffers exported and mapped", "buffers (N)", fmt_count, "µs per buffer", true, &curves, None)?;
    root.present().map_err(plot_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(group: &str, series: &str, op: &str, x: u64, unit: &str, m: f64) -> Record {
        Record {
            group: group.into(),
            series: series.into(),
            op: op.into(),
            x,
            unit: unit.into(),
            median: Some(m),
            min: Some(m * 0.9),
            max: Some(m * 1.1),
            n: 5,
            key: String::new(),
            value: String::new(),
        }
    }

    fn sample() -> Results {
        let mut records = Vec::new();
        for (i, x) in [65536u64, 1 << 20, 16 << 20, 1 << 30].into_iter().enumerate() {
            let f = (1u64 << (4 * i)) as f64;
            records.push(rec("sweep", "dmabuf", "map", x, "ns", 2e4));
            records.push(rec("sweep", "dmabuf", "unmap", x, "ns", 1e4));
            records.push(rec("sweep", "type1", "map", x, "ns", 1e4 * f));
            records.push(rec("sweep", "type1", "unmap", x, "ns", 5e3 * f));
            for op in OVERHEAD_OPS {
                records.push(rec("overhead", "ratio", op, x, "ratio", 1.02));
                records.push(rec("overhead", "raw", op, x, "ns", 1e4));
                records.push(rec("overhead", "library", op, x, "ns", 1.02e4));
            }
        }
        for n in [1u64, 16, 256] {
            records.push(rec("revoke", "library", "revoke", n, "ns", 1e5 * n as f64));
            records.push(rec("revoke", "raw", "revoke", n, "ns", 0.9e5 * n as f64));
            records.push(rec("scale", "raw", "export", n, "ns", 3e4));
            records.push(rec("scale", "raw", "slab", n, "bytes", 900.0));
        }
        let mut meta = rec("meta", "", "", 0, "", 0.0);
        meta.key = "bar_size".into();
        meta.value = (1u64 << 30).to_string();
        records.push(meta);
        Results {
            date: "today".into(),
            accel: "tcg".into(),
            host_cpu: "cpu".into(),
            qemu: "QEMU".into(),
            vm: "2 vCPUs".into(),
            vm_seconds: 100.0,
            quick: false,
            records,
        }
    }

    #[test]
    fn records_parse_from_guest_json() {
        let j = r#"{"group":"sweep","series":"dmabuf","op":"map","x":65536,"unit":"ns","median":1.5,"min":1.0,"max":2.0,"n":3}"#;
        let r: Record = serde_json::from_str(j).unwrap();
        assert_eq!((r.x, r.median, r.n), (65536, Some(1.5), 3));
        let m: Record = serde_json::from_str(r#"{"group":"meta","key":"kernel","value":"7.2.13"}"#).unwrap();
        assert_eq!((m.key.as_str(), m.value.as_str()), ("kernel", "7.2.13"));
    }

    #[test]
    fn slopes() {
        let lin: Vec<(f64, f64, f64, f64)> = (0..5).map(|i| (2f64.powi(i), 3.0 * 2f64.powi(i), 0.0, 0.0)).collect();
        assert!((loglog_slope(&lin, 4).unwrap() - 1.0).abs() < 1e-9);
        let flat: Vec<(f64, f64, f64, f64)> = (0..5).map(|i| (2f64.powi(i), 7.0, 0.0, 0.0)).collect();
        assert!(loglog_slope(&flat, 4).unwrap().abs() < 1e-9);
        assert!(loglog_slope(&flat[..1], 4).is_none());
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_size(65536), "64 KiB");
        assert_eq!(fmt_size(1 << 30), "1 GiB");
        assert_eq!(fmt_ns(1234.0), "1.23 µs");
        assert_eq!(fmt_ns(45_600_000.0), "45.6 ms");
        assert_eq!(axis_number(20000.0), "20k");
        assert_eq!(axis_number(0.5), "0.5");
    }

    #[test]
    fn page_and_plots_render() {
        let r = sample();
        let p = page(&r);
        assert!(p.contains("cargo xtask bench"));
        assert!(p.contains("TCG"));
        assert!(p.contains("| 64 KiB |"));
        assert!(p.contains("within 5%"));
        let dir = std::env::temp_dir().join(format!("bench-docs-{}", std::process::id()));
        write_docs(&r, &dir).unwrap();
        for f in ["map-vs-size.svg", "overhead.svg", "revocation.svg", "scale.svg"] {
            let svg = fs::read_to_string(dir.join(PLOTS).join(f)).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{f}");
        }
        assert!(dir.join(DOC).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
