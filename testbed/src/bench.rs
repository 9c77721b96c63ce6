//! `cargo xtask bench`: builds the in-VM benchmark (`bench/`, package
//! `dmabuf-p2p-bench`) in release mode, boots the test VM with one 64 GiB
//! ivshmem BAR in place of the usual ivshmem devices, collects the `@@bench {json}` results the guest prints and
//! writes `docs/BENCHMARKS.md` with SVG plots under `docs/bench/`.
//!
//! * `cargo xtask bench` — the full run (about 5-10 minutes under TCG).
//! * `cargo xtask bench --quick` — a quarter of the guest's time budgets.
//! * `cargo xtask bench --only=sweep,overhead,revoke,scale` — some parts
//!   only; the docs are then written to the run directory, not `docs/`.
//! * `cargo xtask bench --render FILE` — rewrite the docs from a saved
//!   `results.json` without booting anything.
//! * `cargo xtask bench --only=PARTS --merge [FILE]` — run some parts, put
//!   their results into the saved full run `FILE` (by default
//!   `docs/bench/results.json`) in place of that run's, and rewrite the
//!   docs from it: one part measured again leaves the others' numbers (and
//!   the prose written about them) alone.
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

use dmabuf_p2p::range::human_size;
use serde::{Deserialize, Serialize};

use crate::initramfs::Initramfs;
use crate::qemu::{Accel, Ivshmem};
use crate::suite::{self, GuestBinaries, RunSpec};
use crate::{Error, Result, deps, run_captured, workspace_root};

mod first_export;
mod notes;
mod nvme_peer;
mod nvme_qd;
mod plots;
mod shadow_doorbells;

use notes::{OVERHEAD_NOTES, PLACEMENT_NOTES, REVOKE_NOTES, SCALE_NOTES, SWEEP_NOTES};
use plots::{plot_overhead, plot_revoke, plot_scale, plot_sweep};

/// Where the benchmark binary lives in the VM.
pub const GUEST_BENCH: &str = "/bin/dmabuf-p2p-bench";
/// Where the peer part's outside driver (`DMABUF_P2P_BENCH_PEER`) lives in
/// the VM.
pub const GUEST_PEER: &str = "/bin/peer-perf";

/// Size of the ivshmem device the benchmark maps: a GPU-sized BAR (a
/// sparse backing file; nothing touches most of it).
pub const BIG_BAR: u64 = 64 << 30;
/// The q35 64-bit PCI hole: room for the BAR at an address aligned to its
/// size above the guest's RAM (QEMU's default is 32 GiB).
pub const PCI_HOLE64: &str = "256G";
/// Its QEMU id (and backing file `target/testbed/bench[-TAG]/bench.mem`).
pub const BENCH_SHM: &str = "bench";

/// Guest memory for the benchmark VM: the 1 GiB memfd sweep pins 1 GiB of
/// guest pages.
pub const BENCH_MEMORY_MIB: u32 = 2560;

/// How long the benchmark VM may run (`DMABUF_P2P_VM_TIMEOUT` overrides):
/// the full run takes 10-20 minutes under TCG on a quiet host.
pub const BENCH_VM_LIMIT_SECS: u64 = 3600;

/// QEMU's `-icount` for the instruction clock: one instruction is one
/// nanosecond of guest time, and an idle guest does not wait in real time.
pub const ICOUNT: &str = "shift=0,sleep=off";
/// The records' group of the overhead part on the instruction clock.
pub const ICOUNT_GROUP: &str = "overhead_icount";
/// The records' group of the placement part on the instruction clock.
pub const ICOUNT_PLACEMENT_GROUP: &str = "placement_icount";

/// The docs page, relative to the workspace root.
pub const DOC: &str = "docs/BENCHMARKS.md";
/// The plots' directory, relative to the workspace root.
pub const PLOTS: &str = "docs/bench";

/// One `@@bench` record. Results have `series`, `op`, `x`, `unit` and the
/// statistics; facts about the run (`group` = `meta`) have `key` and `value`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
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
    /// Wall time of the second VM, which ran the overhead and placement
    /// parts and the NVMe part's per-command cost on the instruction clock;
    /// `None` when it did not run.
    #[serde(default)]
    pub icount_vm_seconds: Option<f64>,
    /// Whether `--quick` was given.
    pub quick: bool,
    /// The host's one-minute load average when the VM started and when it
    /// ended (`/proc/loadavg`): other work on the host adds noise.
    #[serde(default)]
    pub host_load: Option<(f64, f64)>,
    /// The records, in the order the guest sent them.
    pub records: Vec<Record>,
}

impl Results {
    /// The record of one measurement.
    pub fn get(&self, group: &str, series: &str, op: &str, x: u64) -> Option<&Record> {
        self.records
            .iter()
            .find(|r| r.group == group && r.series == series && r.op == op && r.x == x)
    }

    /// The median of one measurement.
    pub fn median(&self, group: &str, series: &str, op: &str, x: u64) -> Option<f64> {
        self.get(group, series, op, x).and_then(|r| r.median)
    }

    /// The x values of a group, sorted.
    pub fn xs(&self, group: &str) -> Vec<u64> {
        let set: BTreeSet<u64> = self
            .records
            .iter()
            .filter(|r| r.group == group)
            .map(|r| r.x)
            .collect();
        set.into_iter().collect()
    }

    /// A `meta` fact.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.records
            .iter()
            .find(|r| r.group == "meta" && r.key == key)
            .map(|r| r.value.as_str())
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
    /// With `only`: put the parts' results into this saved full run's
    /// `results.json` (`docs/bench/results.json` unless named) and rewrite
    /// the docs from it.
    merge: Option<PathBuf>,
    /// Run the `trace` part under strace and print the trace (no docs).
    strace: bool,
}

fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts::default();
    let mut it = args.iter().peekable();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--strace" => o.strace = true,
            "--render" => {
                let f = it
                    .next()
                    .ok_or_else(|| Error::Setup("--render needs a results.json".into()))?;
                o.render = Some(PathBuf::from(f));
            }
            "--merge" => {
                let file = it.next_if(|f| !f.starts_with("--")).map_or_else(
                    || workspace_root().join(PLOTS).join("results.json"),
                    PathBuf::from,
                );
                o.merge = Some(file);
            }
            s if s.starts_with("--only=") => o.only = Some(s["--only=".len()..].to_owned()),
            other => return Err(Error::Setup(format!("bench: unknown argument {other:?}"))),
        }
    }
    if o.merge.is_some() && o.only.is_none() {
        return Err(Error::Setup(
            "--merge takes the parts of --only=PARTS into a saved run".into(),
        ));
    }
    Ok(o)
}

/// `base` (a saved full run) with the results of `part`, a run of the
/// parts `only` (comma-separated): every record of the groups `part` has
/// replaces the base's of those groups, its facts whose key starts with a
/// part's name are taken, the rest of its facts (kernel, CPUs, ...) are
/// the base's; a fact `merged:<part>` says when and how each part ran.
pub fn merge_runs(mut base: Results, part: &Results, only: &str) -> Results {
    let parts: Vec<&str> = only.split(',').filter(|p| !p.is_empty()).collect();
    let groups: BTreeSet<&str> = part
        .records
        .iter()
        .filter(|r| r.group != "meta")
        .map(|r| r.group.as_str())
        .collect();
    let taken = |r: &Record| {
        r.group != "meta"
            || parts.iter().any(|p| r.key.starts_with(p))
            || r.key.starts_with("merged:")
    };
    base.records.retain(|r| {
        !groups.contains(r.group.as_str())
            && !(r.group == "meta"
                && (parts.iter().any(|p| r.key.starts_with(p))
                    || parts.iter().any(|p| r.key == format!("merged:{p}"))))
    });
    base.records
        .extend(part.records.iter().filter(|r| taken(r)).cloned());
    let how = format!(
        "{}, {} accel{}, host load (1 min) {}, VM {:.0} s{}",
        part.date,
        part.accel,
        if part.quick { ", --quick" } else { "" },
        part.host_load
            .map_or("unknown".into(), |(a, b)| format!("{a:.2} / {b:.2}")),
        part.vm_seconds,
        part.icount_vm_seconds.map_or(String::new(), |v| format!(
            ", instruction-clock VM {v:.0} s"
        )),
    );
    for p in parts {
        base.records.push(Record {
            group: "meta".into(),
            series: String::new(),
            op: String::new(),
            x: 0,
            unit: String::new(),
            median: None,
            min: None,
            max: None,
            n: 0,
            key: format!("merged:{p}"),
            value: how.clone(),
        });
    }
    base
}

/// `cargo xtask bench [--quick] [--only=PARTS [--merge [FILE]]] [--render FILE]`; returns
/// whether the run succeeded.
pub fn xtask(args: &[String]) -> Result<bool> {
    let opts = parse_opts(args)?;
    if let Some(file) = &opts.render {
        let text = fs::read_to_string(file)
            .map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
        let results: Results = serde_json::from_str(&text)
            .map_err(|e| Error::Setup(format!("{}: {e}", file.display())))?;
        write_docs(&results, &workspace_root())?;
        println!(
            "bench: wrote {DOC} and {PLOTS}/*.svg from {}",
            file.display()
        );
        return Ok(true);
    }
    let start = Instant::now();
    nvme_peer::check_peer_asked(opts.only.as_deref())?;
    deps::ensure_vm_tools()?;
    let load_before = load_average();
    let bench_bin = build_bench()?;

    // The vmm part runs in a VM of its own shape (72 ivshmem devices), on
    // the instruction clock; the other parts in the main VM.
    let wants = |part: &str| {
        opts.only
            .as_deref()
            .is_none_or(|o| o.split(',').any(|p| p == part))
    };
    let main_only: Option<String> = opts.only.as_deref().map(|o| {
        o.split(',')
            .filter(|p| *p != "vmm")
            .collect::<Vec<_>>()
            .join(",")
    });
    let run_main = opts.strace || main_only.as_deref() != Some("");
    let accel = Accel::detect();
    let mut records = Vec::new();
    let mut shape = String::new();
    let mut vm_seconds = 0.0;
    if run_main {
        let job = if opts.strace {
            format!(
                "strace -f -o /tmp/strace.log {GUEST_BENCH} --only=trace; s=$?; cat /tmp/strace.log; exit $s\n"
            )
        } else {
            guest_job(opts.quick, main_only.as_deref())
        };
        let Some(main) = run_vm("bench", job, &bench_bin, opts.strace, false)? else {
            return Ok(false);
        };
        records = main.records;
        shape = main.shape;
        vm_seconds = main.seconds;
    }
    // The overhead and placement parts again on the instruction clock (TCG
    // only: KVM's clock is the real one), and the NVMe part's per-command
    // cost (its queue-depth rows wait for the device, which that clock
    // does not measure).
    let counted_parts: Vec<&str> = [
        ("overhead", "overhead"),
        ("placement", "placement"),
        ("nvmeqd", "nvmeqd_cost"),
    ]
    .into_iter()
    .filter(|(part, _)| run_main && wants(part))
    .map(|(_, job)| job)
    .collect();
    let mut icount_vm_seconds = None;
    if !counted_parts.is_empty() && !opts.strace && accel == Accel::Tcg {
        let job = guest_job(opts.quick, Some(&counted_parts.join(",")));
        let Some(counted) = run_vm("bench-icount", job, &bench_bin, false, true)? else {
            return Ok(false);
        };
        // Only the measurements: the run's facts are the first VM's.
        records.extend(counted.records.into_iter().filter_map(|mut r| {
            r.group = match r.group.as_str() {
                "overhead" => ICOUNT_GROUP,
                "placement" => ICOUNT_PLACEMENT_GROUP,
                nvme_qd::GROUP => nvme_qd::ICOUNT_GROUP,
                _ => return None,
            }
            .to_owned();
            Some(r)
        }));
        icount_vm_seconds = Some(counted.seconds);
    }
    if wants("vmm") && !opts.strace && accel == Accel::Tcg {
        let job = std::env::var("DMABUF_P2P_BENCH_VMM_JOB")
            .unwrap_or_else(|_| guest_job(opts.quick, Some("vmm")));
        let Some(vmm) = run_vmm_vm(job, &bench_bin)? else {
            return Ok(false);
        };
        records.extend(vmm.records.into_iter().filter(|r| r.group != "meta"));
        records.push(Record {
            group: "meta".into(),
            key: "vmm_vm_seconds".into(),
            value: format!("{:.0}", vmm.seconds),
            ..Record::default()
        });
        if !run_main {
            shape = vmm.shape;
            vm_seconds = vmm.seconds;
        }
    }
    let accel = match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let results = Results {
        date: utc_date(),
        accel: accel.to_owned(),
        host_cpu: host_cpu(),
        qemu: qemu_version(),
        vm: shape,
        vm_seconds,
        icount_vm_seconds,
        quick: opts.quick,
        host_load: load_before.zip(load_average()),
        records,
    };
    let json = serde_json::to_string_pretty(&results).map_err(|e| Error::Setup(e.to_string()))?;
    let run_dir = run_dir("bench");
    fs::create_dir_all(&run_dir)
        .map_err(|e| Error::io(format!("creating {}", run_dir.display()), e))?;
    // Partial runs keep their results apart from the last full run's.
    let partial = opts.only.is_some() || opts.strace;
    let saved = run_dir.join(if partial {
        "results-partial.json"
    } else {
        "results.json"
    });
    fs::write(&saved, json).map_err(|e| Error::io(format!("writing {}", saved.display()), e))?;
    if partial {
        write_docs(&results, &run_dir.join("partial"))?;
    } else {
        write_docs(&results, &run_dir)?;
    }
    if let (Some(file), Some(only)) = (&opts.merge, &opts.only) {
        let text = fs::read_to_string(file)
            .map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
        let base: Results = serde_json::from_str(&text)
            .map_err(|e| Error::Setup(format!("{}: {e}", file.display())))?;
        let merged = merge_runs(base, &results, only);
        let json =
            serde_json::to_string_pretty(&merged).map_err(|e| Error::Setup(e.to_string()))?;
        fs::write(file, json).map_err(|e| Error::io(format!("writing {}", file.display()), e))?;
        write_docs(&merged, &workspace_root())?;
        println!(
            "bench: merged {only} into {} and wrote {DOC} and {PLOTS}/*.svg from it",
            file.display()
        );
    } else if !partial {
        write_docs(&results, &workspace_root())?;
        println!("bench: wrote {DOC} and {PLOTS}/*.svg");
    } else {
        println!(
            "bench: partial run: docs written to {} only",
            run_dir.join("partial").display()
        );
    }
    println!(
        "bench: VM {:.0} s, total {:.0} s; results in {}",
        results.vm_seconds,
        start.elapsed().as_secs_f64(),
        saved.display()
    );
    Ok(true)
}

/// The vmm part's VM: no edu or NVMe, 8 ivshmem devices of 64 GiB and 64
/// of 64 KiB as functions on the root bus (9 slots of 8), a 48-bit vIOMMU
/// (the 64 GiB BARs need more than 512 GiB of IOVA), the 64-bit PCI hole
/// widened for them, on the instruction clock.
fn run_vmm_vm(job: String, bench_bin: &Path) -> Result<Option<VmRun>> {
    run_shaped("bench-vmm", job, bench_bin, |c, run_dir| {
        c.ivshmem = Vec::new();
        c.edu = false;
        c.extra_edu = 0;
        c.nvme = Vec::new();
        c.memory_mib = 2048;
        c.hugepages = 0;
        c.iommu_options.push("aw-bits=48".into());
        c.extra_qemu_args = vec![
            "-global".to_owned(),
            format!("q35-pcihost.pci-hole64-size={VMM_PCI_HOLE64}"),
            "-icount".to_owned(),
            ICOUNT.to_owned(),
        ];
        for i in 0..VMM_BIG + VMM_SMALL {
            let (id, size) = if i < VMM_BIG {
                (format!("big{i}"), BIG_BAR)
            } else {
                (format!("sm{}", i - VMM_BIG), 64 << 10)
            };
            let (slot, func) = (4 + i / 8, i % 8);
            c.extra_qemu_args.extend([
                "-object".to_owned(),
                format!(
                    "memory-backend-file,id=mem-{id},mem-path={},size={size},share=on",
                    run_dir.join(format!("{id}.mem")).display()
                ),
                "-device".to_owned(),
                format!(
                    "ivshmem-plain,id={id},memdev=mem-{id},bus=pcie.0,addr={slot:#x}.{func}{}",
                    if func == 0 { ",multifunction=on" } else { "" }
                ),
            ]);
        }
    })
}

/// The vmm part's devices: 64 GiB BARs and 64 KiB ones.
const VMM_BIG: usize = 8;
const VMM_SMALL: usize = 64;
/// Room for 8 BARs of 64 GiB, 64 GiB-aligned, under the TCG CPU's 40
/// physical address bits.
const VMM_PCI_HOLE64: &str = "768G";

/// The guest's command line for a run of the benchmark: `--quick` and
/// `--only=PARTS` as asked.
fn guest_job(quick: bool, only: Option<&str>) -> String {
    let mut job = GUEST_BENCH.to_owned();
    if quick {
        job.push_str(" --quick");
    }
    if let Some(only) = only {
        job.push_str(&format!(" --only={only}"));
    }
    if std::env::var_os(nvme_peer::PEER_ENV).is_some() {
        job.push_str(&format!(" --peer={GUEST_PEER}"));
    }
    job + "\n"
}

/// The records and shape of one benchmark VM run.
struct VmRun {
    records: Vec<Record>,
    /// Guest CPUs, memory and accelerator.
    shape: String,
    /// Wall time of the VM.
    seconds: f64,
}

/// Boots the benchmark VM (run directory `name`) to run `job`; with
/// `instruction_clock`, under `-icount shift=0,sleep=off`, where the guest's
/// clock advances one nanosecond per instruction executed. `None` when the
/// VM run failed (its verdict is printed).
fn run_vm(
    name: &str,
    job: String,
    bench_bin: &Path,
    strace: bool,
    instruction_clock: bool,
) -> Result<Option<VmRun>> {
    let shape = |c: &mut crate::qemu::VmConfig, _: &Path| {
        // Only the device under test: fewer devices, less to boot and bind.
        c.ivshmem = vec![Ivshmem {
            id: BENCH_SHM.into(),
            size: BIG_BAR,
        }];
        c.memory_mib = BENCH_MEMORY_MIB;
        c.hugepages = 0;
        c.extra_qemu_args = vec![
            "-global".to_owned(),
            format!("q35-pcihost.pci-hole64-size={PCI_HOLE64}"),
        ];
        if instruction_clock {
            c.extra_qemu_args
                .extend(["-icount".to_owned(), ICOUNT.to_owned()]);
        }
    };
    run_shaped_with(name, job, bench_bin, strace, shape)
}

/// [`run_vm`] with the VM shaped by `shape` (given the run directory).
fn run_shaped(
    name: &str,
    job: String,
    bench_bin: &Path,
    shape: impl FnOnce(&mut crate::qemu::VmConfig, &Path),
) -> Result<Option<VmRun>> {
    run_shaped_with(name, job, bench_bin, false, shape)
}

fn run_shaped_with(
    name: &str,
    job: String,
    bench_bin: &Path,
    strace: bool,
    shape: impl FnOnce(&mut crate::qemu::VmConfig, &Path),
) -> Result<Option<VmRun>> {
    let mut spec = RunSpec::new(name, job, false);
    // The full run takes longer than a test run may; it is never part of CI.
    if std::env::var_os("DMABUF_P2P_VM_TIMEOUT").is_none() {
        spec.timeout = std::time::Duration::from_secs(BENCH_VM_LIMIT_SECS);
    }
    let run_dir = run_dir(&spec.name);
    fs::create_dir_all(&run_dir)
        .map_err(|e| Error::io(format!("creating {}", run_dir.display()), e))?;
    let initrd = run_dir.join("bench-initramfs.cpio");
    pack(&spec, bench_bin, strace, &initrd)?;
    // suite::run packs its standard initramfs (the CLI slot gets the bench
    // binary, nothing else is built) and the tweak replaces it with ours.
    let bins = GuestBinaries {
        vm_tests: None,
        examples: Vec::new(),
        cli: bench_bin.to_path_buf(),
        kernfs_chain: None,
    };
    let mut vm_shape = String::new();
    let verdict = suite::run(&spec, &bins, |c| {
        shape(c, &run_dir);
        c.initrd = initrd.clone();
        vm_shape = format!(
            "{} vCPUs, {} MiB RAM, {:?} accel",
            c.cpus, c.memory_mib, c.accel
        );
    })?;
    // Remove the sparse backing files of the BARs: nothing checks them.
    if let Ok(dir) = fs::read_dir(&run_dir) {
        for e in dir.flatten() {
            if e.path().extension().is_some_and(|x| x == "mem") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    if !verdict.passed() {
        suite::print_verdict(name, &verdict);
        return Ok(None);
    }
    let mut records = Vec::new();
    for j in &verdict.report.bench {
        records.push(
            serde_json::from_str::<Record>(j)
                .map_err(|e| Error::Setup(format!("bad @@bench record {j}: {e}")))?,
        );
    }
    Ok(Some(VmRun {
        records,
        shape: vm_shape,
        seconds: verdict.elapsed.as_secs_f64(),
    }))
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
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["target"]["name"] == "dmabuf-p2p-bench"
            && let Some(exe) = v["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    Err(Error::Setup(
        "cargo build reported no dmabuf-p2p-bench executable".into(),
    ))
}

/// The benchmark VM's root: the standard layout plus the bench binary.
fn pack(spec: &RunSpec, bench: &Path, strace: bool, dest: &Path) -> Result<()> {
    let mut fs_ = Initramfs::new();
    fs_.host_binary("/bin/busybox", &deps::busybox()?)?;
    fs_.file("/init", 0o755, suite::INIT.as_bytes().to_vec());
    fs_.file("/etc/testbed/job.sh", 0o755, spec.job.as_bytes().to_vec());
    fs_.file(
        "/etc/testbed/pci.sh",
        0o644,
        suite::PCI_SH.as_bytes().to_vec(),
    );
    fs_.file(
        "/etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
    );
    fs_.file("/etc/group", 0o644, b"root:x:0:\n".to_vec());
    for d in ["/proc", "/sys", "/dev", "/tmp", "/root", "/run"] {
        fs_.dir(d);
    }
    fs_.host_binary(GUEST_BENCH, bench)?;
    if let Some(peer) = std::env::var_os(nvme_peer::PEER_ENV) {
        fs_.host_binary(GUEST_PEER, Path::new(&peer))?;
    }
    if strace || std::env::var_os("DMABUF_P2P_BENCH_TOOLS").is_some() {
        fs_.host_binary("/bin/strace", Path::new("/usr/bin/strace"))?;
    }
    if std::env::var_os("DMABUF_P2P_BENCH_TOOLS").is_some() {
        fs_.host_binary("/usr/bin/valgrind", Path::new("/usr/bin/valgrind.bin"))?;
        for f in [
            "callgrind-amd64-linux",
            "vgpreload_core-amd64-linux.so",
            "default.supp",
        ] {
            fs_.host_binary(
                &format!("/usr/libexec/valgrind/{f}"),
                &Path::new("/usr/libexec/valgrind").join(f),
            )?;
        }
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

/// The host's one-minute load average.
fn load_average() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn host_cpu() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

fn qemu_version() -> String {
    crate::qemu_binary::QemuBinary::resolve()
        .map(|q| q.version())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Formatting
// ---------------------------------------------------------------------------

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

/// [`fmt_ns`] with a sign.
fn fmt_signed_ns(ns: f64) -> String {
    if ns < 0.0 {
        format!("−{}", fmt_ns(-ns))
    } else {
        format!("+{}", fmt_ns(ns))
    }
}

pub(super) fn sig3(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `median (min–max)` in the unit of the median.
pub(super) fn cell(r: Option<&Record>) -> String {
    let Some(r) = r else { return "–".into() };
    let (Some(med), Some(min), Some(max)) = (r.median, r.min, r.max) else {
        return "–".into();
    };
    match r.unit.as_str() {
        "ratio" => format!("**{med:.3}** ({min:.2}–{max:.2})"),
        "bytes" | "pages" => format!("{med:.0} ({min:.0}–{max:.0})"),
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
            format!(
                "{} {unit} ({}–{})",
                sig3(med / div),
                sig3(min / div),
                sig3(max / div)
            )
        }
    }
}

/// Least-squares slope of log(median) against log(x) over the last `k`
/// points: about 1 for a cost proportional to size, 0 for a constant one.
pub fn loglog_slope(points: &[(f64, f64, f64, f64)], k: usize) -> Option<f64> {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .rev()
        .take(k)
        .map(|p| (p.0.ln(), p.1.ln()))
        .collect();
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
    (
        "type1",
        "legacy type1, `VFIO_IOMMU_MAP_DMA` of the BAR mmap",
    ),
    ("memfd", "memfd, `IOMMU_IOAS_MAP_FILE`"),
];
const OVERHEAD_OPS: [&str; 5] = ["export", "map", "unmap", "close", "total"];

/// Writes `docs/BENCHMARKS.md` and the plots under `root`.
pub fn write_docs(r: &Results, root: &Path) -> Result<()> {
    let plots = root.join(PLOTS);
    fs::create_dir_all(&plots)
        .map_err(|e| Error::io(format!("creating {}", plots.display()), e))?;
    plot_sweep(r, &plots.join("map-vs-size.svg"))?;
    plot_overhead(r, &plots.join("overhead.svg"))?;
    plot_revoke(r, &plots.join("revocation.svg"))?;
    plot_scale(r, &plots.join("scale.svg"))?;
    // The results beside the plots, so the page can be rendered again
    // from the repository alone.
    let saved = plots.join("results.json");
    let json = serde_json::to_string_pretty(r).map_err(|e| Error::Setup(e.to_string()))?;
    fs::write(&saved, json + "\n")
        .map_err(|e| Error::io(format!("writing {}", saved.display()), e))?;
    let doc = root.join(DOC);
    fs::write(&doc, page(r)).map_err(|e| Error::io(format!("writing {}", doc.display()), e))
}

/// The Markdown page: the run, then each part in order, then how to run it
/// again.
pub fn page(r: &Results) -> String {
    let mut s = String::new();
    let bar = r
        .meta("bar_size")
        .and_then(|v| v.parse().ok())
        .unwrap_or(BIG_BAR);
    heading(&mut s, r);
    run_table(&mut s, r, bar);
    sweep_section(&mut s, r, bar);
    overhead_section(&mut s, r);
    revoke_section(&mut s, r);
    scale_section(&mut s, r);
    placement_section(&mut s, r);
    threads_section(&mut s, r);
    nvme_section(&mut s, r);
    vmm_section(&mut s, r);
    nvme_qd::section(&mut s, r);
    if r.xs(nvme_qd::GROUP).is_empty() {
        nvme_peer::section(&mut s, r);
    }
    first_export::section(&mut s, r);
    reproducing(&mut s);
    s
}

/// The title, and how to read the numbers.
fn heading(s: &mut String, r: &Results) {
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench`; do not edit by hand. `cargo xtask bench --render \
         {PLOTS}/results.json` rewrites this page and its plots from the results saved \
         there.\n"
    );
    let accel = if r.accel == "tcg" {
        "**emulated (QEMU TCG, no KVM)**"
    } else {
        "run under KVM"
    };
    let _ = writeln!(
        s,
        "**Read the numbers as relative ones.** The VM is {accel}: every guest instruction, \
         the kernel's included, is translated by QEMU, and the IOMMU, the PCI config space and \
         the BARs are QEMU models. Absolute times are not hardware times (expect them to be one \
         to two orders of magnitude slower than on a real machine, and not uniformly so). What \
         carries over are the ratios, all taken between measurements interleaved or made in the \
         same VM run, and how costs grow with size and count, with one exception: the \
         library's own user-space code, 50 to 200 instructions per operation, costs microseconds \
         here, 3 to 15 times more per instruction than the kernel's work, so the library / raw \
         time ratios of part 2 overstate its overhead. Part 2 therefore also counts \
         instructions (QEMU's instruction clock), which no emulator cost distorts. Other work on \
         the host adds noise (its load average is in the table).\n"
    );
}

/// What ran where: host, QEMU, kernel, device; and what a figure is.
fn run_table(s: &mut String, r: &Results, bar: u64) {
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| date | {} |", r.date);
    let _ = writeln!(s, "| host CPU | {} |", r.host_cpu);
    let _ = writeln!(s, "| QEMU | {} ({}) |", r.qemu, r.accel);
    let _ = writeln!(s, "| guest kernel | {} |", r.meta("kernel").unwrap_or("?"));
    let _ = writeln!(s, "| VM | {} |", r.vm);
    if let Some((before, after)) = r.host_load {
        let _ = writeln!(
            s,
            "| host load average (1 min), VM start / end | {before:.2} / {after:.2} |"
        );
    }
    let _ = writeln!(
        s,
        "| device under test | ivshmem {} BAR2 ({}), bound to vfio-pci; the same device is attached to the IOAS (or owns the type1 container), so every mapping fills real IOMMU page tables |",
        r.meta("device").unwrap_or("?"),
        human_size(bar)
    );
    if let Some(p) = r.meta("type1_iova_pgsizes") {
        let _ = writeln!(s, "| IOMMU page sizes (type1 `iova_pgsizes`) | `{p}` |");
    }
    let _ = writeln!(
        s,
        "| VM wall time | {:.0} s{} |",
        r.vm_seconds,
        if r.quick { " (`--quick`)" } else { "" }
    );
    if let Some(note) = r.meta("run_note") {
        let _ = writeln!(s, "\n**About this run.** {note}");
    }
    let _ = writeln!(
        s,
        "\nEvery figure is the **median** of repeated runs, with the minimum and maximum in \
         brackets: `median (min–max)`. Repetitions are budgeted by time: at least 3 (the \
         slowest points), up to 31, 41 or 81 (321 batches for the overhead), 1000 for the single steps of the profile; `n` is in \
         `results.json`. The guest binary is \
         `bench/` (`dmabuf-p2p-bench`), built in release mode.\n"
    );
}

/// Part 1: map cost against size, dma-buf against type1 and memfd.
fn sweep_section(s: &mut String, r: &Results, bar: u64) {
    sweep_table(s, r, bar);
    sweep_growth(s, r);
    sweep_summary(s, r, bar);
    s.push_str(SWEEP_NOTES);
}

/// Part 1's table: map and unmap per size and path.
fn sweep_table(s: &mut String, r: &Results, bar: u64) {
    let _ = writeln!(s, "## 1. Map cost against size\n");
    let _ = writeln!(
        s,
        "Mapping and unmapping the first `size` bytes of the {} BAR (or of a memfd) at IOVA \
         64 GiB, for each size. \
         **dma-buf**: a single-range `VFIO_DEVICE_FEATURE_DMA_BUF` export of the BAR (made \
         outside the timing), `IOMMU_IOAS_MAP_FILE` / `IOMMU_IOAS_UNMAP`. **type1**: the path \
         dma-buf export replaces, the device opened through its group in a `/dev/vfio/vfio` \
         type1v2 container, `VFIO_IOMMU_MAP_DMA` of the mmap'd BAR's virtual address / \
         `VFIO_IOMMU_UNMAP_DMA` (the device's cdev closed meanwhile). **memfd**: \
         `IOMMU_IOAS_MAP_FILE` of a memfd, whose pages are pinned on every map (allocated once \
         before timing). All raw ioctls, one untimed warm-up per size.\n",
        human_size(bar)
    );
    let _ = writeln!(
        s,
        "![map and unmap time against size, log-log](bench/map-vs-size.svg)\n"
    );
    let xs = r.xs("sweep");
    let _ = write!(s, "| size |");
    for (_, name) in SWEEP_SERIES {
        let _ = write!(s, " {name}: map | unmap |");
    }
    let _ = writeln!(s, " type1 / dma-buf map |");
    let _ = writeln!(s, "|---|{}", "---|".repeat(SWEEP_SERIES.len() * 2 + 1));
    for &x in &xs {
        let _ = write!(s, "| {} |", human_size(x));
        for (series, _) in SWEEP_SERIES {
            let _ = write!(
                s,
                " {} | {} |",
                cell(r.get("sweep", series, "map", x)),
                cell(r.get("sweep", series, "unmap", x))
            );
        }
        let ratio = match (
            r.median("sweep", "type1", "map", x),
            r.median("sweep", "dmabuf", "map", x),
        ) {
            (Some(a), Some(b)) => format!("{:.2}", a / b),
            _ => "–".into(),
        };
        let _ = writeln!(s, " {ratio} |");
    }
}

/// How each path's cost grows with size.
fn sweep_growth(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "\nHow each cost grows (log-log slope of the median over the four largest sizes: 1 means proportional to size, 0 means flat; and the cost at the largest size over the cost at the smallest):\n"
    );
    let _ = writeln!(
        s,
        "| path | map slope | map growth | unmap slope | unmap growth |\n|---|---|---|---|---|"
    );
    for (series, name) in SWEEP_SERIES {
        let mut row = format!("| {name} |");
        for op in ["map", "unmap"] {
            let p = r.points("sweep", series, op);
            let slope = loglog_slope(&p, 4).map_or("–".into(), |v| format!("{v:.2}"));
            let growth = match (p.first(), p.last()) {
                (Some(a), Some(b)) if p.len() > 1 => {
                    format!(
                        "×{:.0} ({} → {})",
                        b.1 / a.1,
                        human_size(a.0 as u64),
                        human_size(b.0 as u64)
                    )
                }
                _ => "–".into(),
            };
            let _ = write!(row, " {slope} | {growth} |");
        }
        let _ = writeln!(s, "{row}");
    }
}

/// The largest size's type1 / dma-buf ratio, and where the type1 and
/// memfd sweeps stopped.
fn sweep_summary(s: &mut String, r: &Results, bar: u64) {
    let xs = r.xs("sweep");
    if let Some(&top) = xs.last()
        && let (Some(t), Some(d)) = (
            r.median("sweep", "type1", "map", top),
            r.median("sweep", "dmabuf", "map", top),
        )
    {
        let _ = writeln!(
            s,
            "\nAt {}, mapping through type1 takes {} and through the dma-buf {}: ×{:.0}.",
            human_size(top),
            fmt_ns(t),
            fmt_ns(d),
            t / d
        );
    }
    if let Some(stop) = r
        .meta("type1_stopped_before")
        .and_then(|v| v.parse::<u64>().ok())
    {
        let p = r.points("sweep", "type1", "map");
        if let (Some(slope), Some(last)) = (loglog_slope(&p, 4), p.last()) {
            let bar_est = last.1 * (bar as f64 / last.0).powf(slope);
            let _ = writeln!(
                s,
                "\nThe legacy type1 sweep stops at {}: a map of {} would take more than a minute \
                 (the previous size's time scaled by size). Its map time grows with slope {slope:.2} \
                 over the largest sizes measured; at that slope a map of the whole {} BAR would \
                 take about {}, against {} for the dma-buf.",
                human_size(last.0 as u64),
                human_size(stop),
                human_size(bar),
                fmt_ns(bar_est),
                r.median("sweep", "dmabuf", "map", bar)
                    .map_or("–".into(), fmt_ns)
            );
        }
    }
    if let Some(m) = r.meta("memfd_max_size") {
        let _ = writeln!(
            s,
            "\nThe memfd sweep stops at {} (what the guest's memory allows).",
            human_size(m.parse().unwrap_or(0))
        );
    }
}

/// Part 2: the library against raw ioctls, export to close.
fn overhead_section(s: &mut String, r: &Results) {
    overhead_tables(s, r);
    overhead_excess(s, r);
    overhead_control(s, r);
    instruction_clock(s, r);
    profile_steps(s, r);
    s.push_str(OVERHEAD_NOTES);
}

/// Part 2's ratio table and the raw times behind it.
fn overhead_tables(s: &mut String, r: &Results) {
    let _ = writeln!(s, "\n## 2. Library overhead against raw ioctls\n");
    let _ = writeln!(
        s,
        "One cycle is: export the first `size` bytes of the BAR, map the dma-buf at a fixed IOVA, \
         unmap it, close it. **library**: `VfioPciDevice::export_bar`, `Ioas::map_dmabuf`, \
         `IoasMapping::unmap`, dropping the mapping and the export. **raw**: hand-written \
         `libc::ioctl` calls on the bench's own uAPI structs (`bench/src/uapi.rs`, written out from the kernel headers: `VFIO_DEVICE_FEATURE`, \
         `IOMMU_IOAS_MAP_FILE`, `IOMMU_IOAS_UNMAP`) and `close`, in the same binary, on the \
         same device, IOAS and iommufd. A batch runs 8 cycles of each of four paths (these two \
         and the two below) interleaved in a balanced order, every path running after every \
         other equally often; a batch's figure per operation is the median of its 8 cycles, \
         its ratio library / raw; the table gives the median ratio over 321 batches (fewer \
         if time ran out) with min and max. The sizes take turns: each round runs one batch \
         of every size, after one untimed cycle of each path at that size, so every size is \
         measured across the whole run rather than in a window of its own. *total* is the \
         whole cycle.\n"
    );
    let _ = writeln!(
        s,
        "![library / raw time per operation against size](bench/overhead.svg)\n"
    );
    let _ = writeln!(s, "| size | {} |", OVERHEAD_OPS.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(OVERHEAD_OPS.len()));
    let oxs = r.xs("overhead");
    for &x in &oxs {
        let _ = write!(s, "| {} |", human_size(x));
        for op in OVERHEAD_OPS {
            let _ = write!(s, " {} |", cell(r.get("overhead", "ratio", op, x)));
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "\nThe raw times behind the ratios (median per operation):\n"
    );
    let _ = writeln!(
        s,
        "| size | {} |",
        OVERHEAD_OPS
            .map(|o| format!("raw {o} | library {o}"))
            .join(" | ")
    );
    let _ = writeln!(s, "|---|{}", "---|".repeat(OVERHEAD_OPS.len() * 2));
    for &x in &oxs {
        let _ = write!(s, "| {} |", human_size(x));
        for op in OVERHEAD_OPS {
            let f = |series| {
                r.median("overhead", series, op, x)
                    .map_or("–".into(), fmt_ns)
            };
            let _ = write!(s, " {} | {} |", f("raw"), f("library"));
        }
        s.push('\n');
    }
}

/// The verdict per operation, and the excess as time.
fn overhead_excess(s: &mut String, r: &Results) {
    let oxs = r.xs("overhead");
    let _ = writeln!(s);
    verdicts(s, r, "overhead");
    // The excess in time: what the library's own code costs per operation.
    let _ = writeln!(
        s,
        "\nThe same excess as time, library − raw median per operation (median over the sizes, \
         with the smallest and largest):\n"
    );
    for op in OVERHEAD_OPS {
        let v: Vec<f64> = oxs
            .iter()
            .filter_map(|&x| {
                Some(r.median("overhead", "library", op, x)? - r.median("overhead", "raw", op, x)?)
            })
            .collect();
        if let Some(m) = median_of(&v) {
            let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let _ = writeln!(
                s,
                "- {op}: {} ({} to {})",
                fmt_signed_ns(m),
                fmt_signed_ns(lo),
                fmt_signed_ns(hi)
            );
        }
    }
}

/// How fine the measurement is: the control and the library's second copy.
fn overhead_control(s: &mut String, r: &Results) {
    let oxs = r.xs("overhead");
    let _ = writeln!(
        s,
        "\nHow fine the measurement is. The same batches also ran, interleaved with the two \
         above, the raw cycle a second time (the **control**) and a **second copy of the \
         library's cycle**: the same source compiled into a function of its own, so that only \
         its place in the binary differs. Their ratios to raw show how far a ratio moves when \
         nothing in the code changes. Median over the sizes of the per-size medians, with the \
         smallest and largest:\n"
    );
    let _ = writeln!(
        s,
        "| operation | library / raw | library copy / raw | largest gap between the two library copies at one size | control: raw / raw |\n|---|---|---|---|---|"
    );
    for op in OVERHEAD_OPS {
        let per_size = |series: &str| -> Vec<(u64, f64)> {
            oxs.iter()
                .filter_map(|&x| Some((x, r.median("overhead", series, op, x)?)))
                .collect()
        };
        let across = |series: &str| {
            let v: Vec<f64> = per_size(series).into_iter().map(|(_, m)| m).collect();
            across_sizes(&v, 3, 2)
        };
        let copy = per_size("ratio_library_copy");
        let gap = per_size("ratio")
            .into_iter()
            .filter_map(|(x, a)| Some((x, (a - copy.iter().find(|c| c.0 == x)?.1).abs())))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map_or("–".into(), |(x, g)| {
                format!("{g:.3} (at {})", human_size(x))
            });
        let _ = writeln!(
            s,
            "| {op} | {} | {} | {gap} | {} |",
            across("ratio"),
            across("ratio_library_copy"),
            across("ratio_control")
        );
    }
}

/// The `profile` part: each step alone.
fn profile_steps(s: &mut String, r: &Results) {
    let steps: Vec<&Record> = r.records.iter().filter(|x| x.group == "profile").collect();
    if !steps.is_empty() {
        let _ = writeln!(
            s,
            "\nEach step alone (`profile` part: one step repeated, median time; dma-buf of 64 KiB):\n\n| step | what | median (min–max) |\n|---|---|---|"
        );
        for x in steps {
            let what = PROFILE_STEPS
                .iter()
                .find(|(k, _)| *k == x.op)
                .map_or("", |(_, d)| d);
            let _ = writeln!(s, "| `{}` | {what} | {} |", x.op, cell(Some(x)));
        }
    }
}

/// Part 3: revocation and restore against the number of mappings.
fn revoke_section(s: &mut String, r: &Results) {
    revoke_table(s, r);
    revoke_growth(s, r);
    s.push_str(REVOKE_NOTES);
}

/// Part 3's table.
fn revoke_table(s: &mut String, r: &Results) {
    let _ = writeln!(
        s,
        "\n## 3. Revocation and restore against the number of mappings\n"
    );
    let _ = writeln!(
        s,
        "N single-page exports of the BAR, each mapped once at its own IOVA. **library**: each \
         mapped as a `revoke::Attachment` (automatic restore). *revoke* is \
         `VfioPciDevice::set_memory_decode(false)`: the config write with three reads of \
         `PCI_COMMAND` around it (in the write, the kernel revokes every dma-buf of the device and iommufd zaps each \
         mapping's IOMMU entries) and the hub marking every attachment revoked; the dead areas \
         stay allocated, so that their IOVAs stay reserved until the restore. *restore* is \
         `set_memory_decode(true)`: the same config access, then for every attachment an unmap of \
         the dead area and a map at the same IOVA. **raw**: the same done by hand: `pwrite` of \
         `PCI_COMMAND` (revoke), `pwrite` then N × (`IOMMU_IOAS_UNMAP` + \
         `IOMMU_IOAS_MAP_FILE`) (restore). *config write (restore)* is that `pwrite` alone: \
         the kernel's share of the restore. *cycle* is revoke plus restore. A config write \
         revokes every dma-buf of the device, so the two setups cannot coexist: they alternate \
         in 3 rounds (set up N mappings, time 3-8 revoke/restore pairs, tear down); times are \
         medians over all pairs, ratios are medians over the rounds of the round's library \
         median / raw median.\n"
    );
    let _ = writeln!(
        s,
        "![revoke and restore time against the number of mappings](bench/revocation.svg)\n"
    );
    let _ = writeln!(
        s,
        "| N | library revoke | library restore | raw revoke | raw restore | config write (restore) | library / raw revoke | library / raw restore | library / raw cycle |\n|---|---|---|---|---|---|---|---|---|"
    );
    for &x in &r.xs("revoke") {
        let ratio = |op| cell(r.get("revoke", "ratio", op, x));
        let _ = writeln!(
            s,
            "| {x} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(r.get("revoke", "library", "revoke", x)),
            cell(r.get("revoke", "library", "restore", x)),
            cell(r.get("revoke", "raw", "revoke", x)),
            cell(r.get("revoke", "raw", "restore", x)),
            cell(r.get("revoke", "raw", "restore_write", x)),
            ratio("revoke"),
            ratio("restore"),
            ratio("cycle"),
        );
    }
}

/// The library's excess per attachment, and the cost of each extra mapping.
fn revoke_growth(s: &mut String, r: &Results) {
    let rx = r.xs("revoke");
    if let Some(&hi) = rx.last() {
        for op in ["revoke", "restore"] {
            if let (Some(l), Some(w)) = (
                r.median("revoke", "library", op, hi),
                r.median("revoke", "raw", op, hi),
            ) {
                let _ = writeln!(
                    s,
                    "\nlibrary − raw {op} at N={hi}: {} per attachment.",
                    fmt_signed_ns((l - w) / hi as f64)
                );
            }
        }
    }
    if let (Some(&lo), Some(&hi)) = (rx.first(), rx.last()) {
        let _ = writeln!(s);
        for (series, op) in [
            ("library", "revoke"),
            ("library", "restore"),
            ("raw", "revoke"),
            ("raw", "restore"),
        ] {
            if let (Some(a), Some(b)) = (
                r.median("revoke", series, op, lo),
                r.median("revoke", series, op, hi),
            ) {
                let per = (b - a) / (hi - lo) as f64;
                let _ = writeln!(
                    s,
                    "- {series} {op}: {} per extra mapping (from N={lo} to N={hi}).",
                    fmt_ns(per)
                );
            }
        }
    }
}

/// Part 4: export and map scale, time and kernel memory per buffer.
fn scale_section(s: &mut String, r: &Results) {
    scale_table(s, r);
    slab_caches(s, r);
    s.push_str(SCALE_NOTES);
}

/// Part 4's table.
fn scale_table(s: &mut String, r: &Results) {
    let _ = writeln!(s, "\n## 4. Export and map scale\n");
    let _ = writeln!(
        s,
        "N single-page exports of the BAR made and then each mapped at its own IOVA, then all \
         unmapped and closed (*teardown*); time per buffer. **library**: `export_bar` and \
         `Ioas::map_dmabuf` (each mapping holds the dma-buf's fd by reference count); **raw**: raw \
         ioctls. Kernel memory is read from `/proc/meminfo` (`Slab`, `SUnreclaim`) and \
         `/proc/vmstat` (`nr_iommu_pages`, the IOMMU page tables) before the exports and after \
         the mappings; the growth is given per buffer. Small N are dominated by slab noise.\n"
    );
    let _ = writeln!(
        s,
        "![time per buffer against the number of buffers](bench/scale.svg)\n"
    );
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
}

/// Which slab caches a buffer costs.
fn slab_caches(s: &mut String, r: &Results) {
    let mut caches: Vec<&Record> = r
        .records
        .iter()
        .filter(|x| x.group == "slabinfo" && x.series != "total")
        .collect();
    if !caches.is_empty() {
        caches.sort_by(|a, b| b.median.unwrap_or(0.0).total_cmp(&a.median.unwrap_or(0.0)));
        let n = caches[0].x;
        let _ = writeln!(
            s,
            "\nWhich kernel objects a buffer costs: `/proc/slabinfo` (`active_objs × objsize` per \
             cache) before the {n} raw exports and after their mappings, per buffer, caches \
             that grew by at least 16 bytes (SLUB merges caches of like size, so a name can \
             stand for several kinds of object):\n\n| slab cache | bytes per buffer |\n|---|---|"
        );
        for c in caches {
            let _ = writeln!(s, "| `{}` | {} |", c.series, cell(Some(c)));
        }
        if let Some(t) = r.get("slabinfo", "total", "bytes_per_buffer", n) {
            let _ = writeln!(s, "| **total** | {} |", cell(Some(t)));
        }
    }
}

/// How to run the benchmark again.
fn reproducing(s: &mut String) {
    let _ = writeln!(
        s,
        "\n## Reproducing\n\n```sh\ncargo xtask bench\n```\n\n\
         (`DMABUF_P2P_KERNEL=path/to/bzImage` runs a prebuilt kernel instead of building one.) \
         It builds `dmabuf-p2p-bench` in release mode, boots the test VM with one ivshmem \
         device of {} (a sparse backing file; QEMU's q35 64-bit PCI hole widened to {} with \
         `-global q35-pcihost.pci-hole64-size`, the BAR is 64-bit prefetchable) in place of the \
         usual ones and {} MiB of RAM, and runs the parts in \
         order (type1 first, with the device's cdev closed; then everything through the cdev). \
         Under TCG it then boots the same VM again with `-icount {}` and runs the overhead and \
         placement parts and the NVMe part's per-command cost on the instruction clock \
         (`target/testbed/bench-icount[-TAG]/`). \
         The results land in `target/testbed/bench[-TAG]/results.json`. `--quick` cuts the \
         time budgets to a quarter; `--only=sweep,profile,overhead,revoke,scale,placement,threads,nvme,vmm,nvmeqd,firstexport` \
         runs some parts (and leaves `docs/` alone, unless `--merge` puts their results into \
         `docs/bench/results.json` in place of those parts' and writes this page from it); \
         `vmm` runs in a VM of its own (`target/testbed/bench-vmm[-TAG]/`). It is not part of \
         the test suite and nothing asserts a time.",
        human_size(BIG_BAR),
        PCI_HOLE64,
        BENCH_MEMORY_MIB,
        ICOUNT
    );
}

/// Part 7: NVMe reads into host RAM against reads into the BAR.
fn nvme_section(s: &mut String, r: &Results) {
    let xs = r.xs("nvme");
    if xs.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n## 7. NVMe reads into host RAM and into a BAR\n");
    let _ = writeln!(
        s,
        "QEMU's NVMe controller ({}) reads the same blocks of its namespace into a memfd and \
         into the ivshmem BAR through the BAR's dma-buf IOVA (peer-to-peer), alternating which \
         goes first; one command per read, completed by MSI-X. The ratio is per pair of reads.\n",
        r.meta("nvme_device").unwrap_or("first NVMe controller")
    );
    let _ = writeln!(
        s,
        "| size | into host RAM | into the BAR | BAR / RAM |\n|---|---|---|---|"
    );
    for x in xs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            human_size(x),
            cell(r.get("nvme", "ram", "read", x)),
            cell(r.get("nvme", "bar", "read", x)),
            cell(r.get("nvme", "ratio", "read", x)),
        );
    }
    let _ = writeln!(
        s,
        "\nUnder TCG a DMA into the BAR is a write into QEMU's ivshmem RAM like a DMA into \
         guest RAM, both through the emulated IOMMU; on hardware the BAR side crosses the \
         PCIe fabric instead."
    );
}

/// Part 8's account of the extra instructions: counted with callgrind on
/// the bench's `vmm_trace` part (user space; strace showed the syscalls
/// equal), so not in `results.json`; dated, and redone when the map's trap
/// path changes.
const VMM_WHERE: &str = "**Where the extra instructions go** (2026-12-07 23:05 UTC, at the \
     code this table was run with). strace of the bench's `vmm_trace` part shows the map making \
     exactly the raw path's syscalls: decode off one `pwrite`; decode on the `pwrite`, \
     `IOMMU_IOAS_UNMAP` and `IOMMU_IOAS_MAP_FILE`; a move the unmap at the low dword's write \
     and the map at the high one's. So the difference is user space, which callgrind counts \
     on the same part (`DMABUF_P2P_BENCH_TOOLS=1 DMABUF_P2P_BENCH_VMM_JOB='valgrind \
     --tool=callgrind ... dmabuf-p2p-bench --only=vmm_trace=N' cargo xtask bench --only=vmm`): \
     with 1 offered BAR, decode off costs 313 instructions more than the raw path's 35 \
     (two locks the raw path needs none of, the map's and the device's `PCI_COMMAND` \
     transition lock, each with std's poison checks; the device's lookup and hub check; the \
     known-register update; the hub's own lock and state change; the log-level tests); decode \
     on 722 more than 115 (the same, and the dead area's unmap and map in place through its \
     `IoasMapping`, with the IOAS's area set updated under its lock); a BAR move 1184 more \
     than 90, in two trapped writes (lock, lookup, hub check, the BAR register's shadow) and \
     two reconciles: at the low dword the area unmapped (its handle stays in the BAR's slot), \
     the BAR's span released and the half-programmed refusal recorded; at the high dword the \
     GPA checked against the usable ranges, the VMM's mappings and the IOAS's set of mapped \
     areas (one search, under its lock), the same handle (one per part of the BAR) mapped at the new GPA, the span \
     recorded and the refusal dropped. These match the table's differences to within 30 \
     instructions with 1 and 8 BARs; with 64 the kernel's side adds less for the map's BAR \
     among its neighbours than for the raw path's lone one. A move no longer grows with the \
     number of BARs: 1274, 1337 and 1337 user-space instructions with 1, 8 and 64 offered \
     BARs (1301, 1497 and 1783 before this round; 87 of them are the walk over a BAR's \
     parts, added with the BARs mapped around their MSI-X table). The growth was the sorted vector of BAR \
     claims: binary searches for the check, the claim and the release, and its shift when \
     the bench moves the BAR from the lowest GPA past the others and back (memmove: 210 \
     instructions with 64 BARs). The check now asks the IOAS's area set, which the library \
     keeps anyway for automatic placement and which holds every BAR's area; the BARs' spans \
     are kept per (device, BAR), set and cleared in place, and walked only when that set has \
     an area in the way, to name the BAR there. The 63 left between 1 BAR and 8 are that set \
     merging the moved BAR back into its neighbours' span. The bench's BARs sit side by side, \
     so the set holds one span; a guest that leaves gaps between its BARs gives it one span \
     per BAR, and a move from the lowest GPA past the others then shifts that vector (as any \
     map and unmap through the library's handles does, `GuestBarMap` or not). Measured on the way \
     (callgrind, per move with 1 / 8 / 64 BARs): the check on the area set with the moved \
     BAR's unmapped handle kept aside and mapped again, 1324 / 1384 / 1384 (moving the \
     handle in and out of `Option`s cost about 100); the handle kept in place in the \
     BAR's slot, 1187 / 1248 / 1248 (table of 22:28 UTC: 1.0081 / 1.0086 / 1.0075); with \
     the parts, 1274 / 1337 / 1337; `reconcile` forced inline into the trap path, 9 more, not \
     kept. Earlier: claims in reusable slots ordered by an index vector (b64b729, reverted) \
     saved 80 with 64 BARs but cost 62 more with 1 and 81 more with 8. Before the last two \
     rounds (the page of 2026-12-07 15:29) the medians were: decode off 1.014, decode on \
     1.005–1.006, move 1.012–1.014; then 20:30 UTC: decode off 1.0085, decode on \
     1.004–1.005, move 1.0090 / 1.0105 / 1.0115.";

/// Part 8: the `GuestBarMap` against a hand-written VMM path.
fn vmm_section(s: &mut String, r: &Results) {
    let ns = r.xs("vmm_trap");
    if ns.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n## 8. Inside a VMM: `GuestBarMap`\n");
    let _ = writeln!(
        s,
        "In a VM of its own on the instruction clock (`-icount {ICOUNT}`: one guest nanosecond \
         is one instruction, the kernel's included), with 64 ivshmem devices of 64 KiB and 8 of \
         64 GiB as functions on the root bus and a 48-bit vIOMMU{}. Every figure is a median of \
         instructions, with min and max.\n",
        r.meta("merged:vmm")
            .map_or_else(String::new, |v| format!("; run {v}"))
    );
    let _ = writeln!(
        s,
        "**Trapped writes.** N devices are registered with their BAR2 (64 KiB) offered, placed \
         and mapped; on the first, the guest turns decode off, turns it on, and moves BAR2 (its \
         two dwords, decode on), each through `GuestBarMap::config_write`. The raw path is a \
         hand-written VMM on the same device: a `pwrite` of `PCI_COMMAND` for decode off; the \
         `pwrite`, `IOMMU_IOAS_UNMAP` and `IOMMU_IOAS_MAP_FILE` of its dma-buf for decode on \
         (the revoked area stays dead until mapped again); unmap and map at the new address \
         for the move. Rounds alternate which path goes first.\n"
    );
    let _ = writeln!(
        s,
        "| offered BARs | decode off: library / raw | ratio | decode on: library / raw | ratio | BAR move: library / raw | ratio |\n|---|---|---|---|---|---|---|"
    );
    let med = |series: &str, op: &str, x: u64| r.median("vmm_trap", series, op, x);
    let mut worst: f64 = 0.0;
    let mut over = Vec::new();
    for n in &ns {
        let mut row = format!("| {n} |");
        for op in ["decode_off", "decode_on", "move"] {
            let (l, w) = (med("library", op, *n), med("raw", op, *n));
            let ratio = r.get("vmm_trap", "ratio", op, *n);
            if let Some(m) = ratio.and_then(|x| x.median) {
                worst = worst.max(m);
                if m > 1.01 {
                    let extra = l.zip(w).map_or(String::new(), |(l, w)| {
                        format!(", {:.0} instructions over", l - w)
                    });
                    over.push(format!("{} with {n} ({m:.4}{extra})", op.replace('_', " ")));
                }
            }
            let _ = write!(
                row,
                " {} / {} | {} |",
                l.map_or("–".into(), |v| format!("{v:.0}")),
                w.map_or("–".into(), |v| format!("{v:.0}")),
                cell(ratio)
            );
        }
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(
        s,
        "\nWorst median ratio: {worst:.4} ({}). The raw path is the syscalls alone: no \
         lookup of the device, no shadow of its registers, no check of the GPA, no log \
         level test; every instruction the map spends on those is in the ratio.\n",
        if worst <= 1.01 {
            "within 1% of the hand-written path on every row: the goal is met"
        } else {
            "more than 1% over the hand-written path: the goal of 1% is not met on every row"
        }
    );
    if !over.is_empty() {
        let _ = writeln!(s, "Rows over 1%: {}.\n", over.join("; "));
    }
    let _ = writeln!(s, "{VMM_WHERE}\n");
    let profile: Vec<(&str, &str)> = [
        ("not_mine_write", "a trapped write the map leaves to the VMM: its lock, the device's lookup, the hub check, the classification"),
        ("bar_status", "a status query: the lock, the lookup, the reason"),
        ("hub_revoke_restore", "the device hub's revoke and restore, no attachment"),
        ("mutex", "a `std::sync::Mutex` taken and released (the floor: the two clock reads around every step are in it)"),
    ]
    .into_iter()
    .filter(|(op, _)| r.get("vmm_profile", "step", op, 0).is_some())
    .collect();
    if !profile.is_empty() {
        let _ = writeln!(
            s,
            "Where the map's instructions go (one step repeated, median instructions, no syscall in \
             any):\n\n| step | what | instructions |\n|---|---|---|"
        );
        for (op, what) in profile {
            let _ = writeln!(
                s,
                "| `{op}` | {what} | {} |",
                r.median("vmm_profile", "step", op, 0)
                    .map_or("–".into(), |v| format!("{v:.0}"))
            );
        }
        let _ = writeln!(s);
    }
    let sizes = r.xs("vmm_register");
    let lib = |size: u64| r.median("vmm_register", "library", "register_map", size);
    let t1: Vec<(u64, f64)> = sizes
        .iter()
        .filter_map(|&x| Some((x, r.median("vmm_register", "type1", "map", x)?)))
        .collect();
    let _ = writeln!(
        s,
        "**Registering 8 devices.** A fresh map, then per device `register`, `place_bar` and \
         the guest's decode on: read the BAR, export it and map it at its GPA. Against the legacy \
         type1 path (`VFIO_IOMMU_MAP_DMA` of the mmap'd BAR, the device opened through its \
         group), measured on one 64 GiB device at {} and projected to 8 BARs of each size from \
         its cost per byte between the smallest and largest size measured.\n",
        t1.iter()
            .map(|(x, _)| human_size(*x))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        s,
        "| BAR size | 8 devices registered and mapped (`GuestBarMap`), instructions | legacy type1, 8 BARs (projected), instructions | type1 / `GuestBarMap` |\n|---|---|---|---|"
    );
    let mega = |rec: Option<&Record>| -> String {
        match rec.and_then(|r| Some((r.median?, r.min?, r.max?))) {
            Some((m, lo, hi)) => format!("{:.2} M ({:.2}–{:.2})", m / 1e6, lo / 1e6, hi / 1e6),
            None => "–".into(),
        }
    };
    let per_byte = match (t1.first(), t1.last()) {
        (Some((x0, t0)), Some((x1, tt))) if x1 > x0 => {
            Some((t0, (tt - t0) / (x1 - x0) as f64, *x0))
        }
        _ => None,
    };
    for size in [64u64 << 10, 64 << 30] {
        // Below the smallest size measured, its cost bounds the projection.
        let proj = per_byte.map(|(t0, slope, x0)| {
            if size >= x0 {
                (8.0 * (t0 + slope * (size - x0) as f64), "")
            } else {
                (8.0 * t0, "at most ")
            }
        });
        let ratio = match (proj, lib(size)) {
            (Some((p, "")), Some(l)) => format!("{:.0}", p / l),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {ratio} |",
            human_size(size),
            mega(r.get("vmm_register", "library", "register_map", size)),
            proj.map_or("–".into(), |(p, bound)| format!("{bound}{p:.3e}"))
        );
    }
    if let (Some(a), Some(b)) = (lib(64 << 10), lib(64 << 30)) {
        let _ = writeln!(
            s,
            "\n64 GiB / 64 KiB: {:.4}: registering and mapping costs the same whatever the BAR's \
             size (a dma-buf is mapped as one physical range, in 1 GiB IOMMU pages where \
             aligned).",
            b / a
        );
    }
}

/// The placements of the placement part, as named in the table.
const PLACEMENTS: [(&str, &str); 4] = [
    ("kernel", "kernel-placed (`Auto` before)"),
    ("library", "library-placed (`Auto` now)"),
    ("library_fixed", "library, fixed, aligned"),
    ("fixed", "raw, fixed, aligned"),
];

/// Part 5: automatic IOVA placement.
fn placement_section(s: &mut String, r: &Results) {
    let xs = r.xs("placement");
    if xs.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n## 5. Automatic IOVA placement and IOMMU page sizes\n");
    let _ = writeln!(
        s,
        "The first `size` bytes of the BAR (physical address {}), exported once per size and \
         mapped into the IOAS the device is attached to, four ways: \
         **kernel-placed**, `IOMMU_IOAS_MAP_FILE` without a fixed IOVA, which is what \
         `IovaPlacement::Auto` did before (the kernel aligns to at most `PAGE_SIZE`, or 2 MiB \
         with transparent huge pages); **library-placed**, `Ioas::map_dmabuf` with \
         `IovaPlacement::Auto`, which now picks the lowest free IOVA congruent to the BAR's \
         physical start modulo the largest IOMMU page that fits (4 KiB, 2 MiB or 1 GiB) and maps \
         it fixed; **library, fixed, aligned**: `Ioas::map_dmabuf` at the fixed IOVA 64 GiB \
         (the library's code path, so that against it `Auto` differs only in where the IOVA \
         comes from); **raw, fixed, aligned**: raw `IOMMU_IOAS_MAP_FILE` at IOVA 64 GiB. They \
         run as two interleaved pairs, the raw two and then the library's two: the \
         kernel-placed map leaves emptied page-table pages at low IOVAs, which the IOMMU \
         driver keeps until a large page replaces them, and interleaved with it every `Auto` \
         map would pay for freeing them (one untimed `Auto` map clears them before the \
         library's pair). One page (IOVA {}) is mapped first, as something always is. *IOVA alignment* is the largest power of \
         two dividing the IOVA; *IOMMU pages* is the growth of `nr_iommu_pages` (/proc/vmstat, \
         the IOMMU page tables) across the map, in 4 KiB pages, counted in three untimed maps \
         per placement, each made 100 ms after the previous unmap (page-table pages an unmap \
         frees can be freed late, and would otherwise count against the next map).\n",
        r.meta("bar_phys").unwrap_or("?"),
        r.meta("placement_first_iova").unwrap_or("?")
    );
    placement_table(s, r, &xs);
    placement_large_bars(s, r, &xs);
    placement_instructions(s, r);
    s.push_str(PLACEMENT_NOTES);
}

/// Part 5's table: alignment, map, unmap and page-table growth per
/// placement.
fn placement_table(s: &mut String, r: &Results, xs: &[u64]) {
    let _ = write!(s, "| size |");
    for (_, name) in PLACEMENTS {
        let _ = write!(s, " {name}: IOVA alignment | map | unmap | IOMMU pages |");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "|---|{}", "---|".repeat(PLACEMENTS.len() * 4));
    for &x in xs {
        let _ = write!(s, "| {} |", human_size(x));
        for (series, _) in PLACEMENTS {
            let align = r
                .median("placement", series, "alignment", x)
                .map_or("–".into(), |a| human_size(a as u64));
            let _ = write!(
                s,
                " {align} | {} | {} | {} |",
                cell(r.get("placement", series, "map", x)),
                cell(r.get("placement", series, "unmap", x)),
                cell(r.get("placement", series, "iommu_pages", x)),
            );
        }
        let _ = writeln!(s);
    }
}

/// What `Auto` gives a BAR of 1 GiB or more, against the fixed IOVA and
/// the kernel's placement.
fn placement_large_bars(s: &mut String, r: &Results, xs: &[u64]) {
    let _ = writeln!(s);
    for &x in xs.iter().filter(|&&x| x >= 1 << 30) {
        let m = |series, op| r.median("placement", series, op, x);
        if let (Some(la), Some(lm), Some(lu), Some(fm), Some(fu)) = (
            m("library", "alignment"),
            m("library", "map"),
            m("library", "unmap"),
            m("library_fixed", "map"),
            m("library_fixed", "unmap"),
        ) {
            let _ = writeln!(
                s,
                "- {}: the library places it at a {}-aligned IOVA; map {} and unmap {} against {} \
                 and {} through the library at the aligned fixed IOVA (`Auto` / fixed: {:.2} and \
                 {:.2}){}.",
                human_size(x),
                human_size(la as u64),
                fmt_ns(lm),
                fmt_ns(lu),
                fmt_ns(fm),
                fmt_ns(fu),
                lm / fm,
                lu / fu,
                match (m("kernel", "map"), m("kernel", "unmap")) {
                    (Some(km), Some(ku)) => format!(
                        "; placed by the kernel, map {} and unmap {} (kernel-placed / `Auto`: \
                         {:.2} and {:.2})",
                        fmt_ns(km),
                        fmt_ns(ku),
                        km / lm,
                        ku / lu
                    ),
                    _ => String::new(),
                }
            );
            let c = |series, op| r.median(ICOUNT_PLACEMENT_GROUP, series, op, x);
            if let (Some(am), Some(au), Some(fm), Some(fu)) = (
                c("library", "map"),
                c("library", "unmap"),
                c("library_fixed", "map"),
                c("library_fixed", "unmap"),
            ) {
                s.pop();
                let _ = writeln!(
                    s,
                    " On the instruction clock (below), `Auto` / fixed is {:.4} and {:.4}.",
                    am / fm,
                    au / fu
                );
            }
        }
    }
}

/// The placement part on the instruction clock, when it ran: `Auto` against
/// the aligned fixed IOVA, and the kernel's placement against `Auto`, in
/// instructions executed.
fn placement_instructions(s: &mut String, r: &Results) {
    let xs = r.xs(ICOUNT_PLACEMENT_GROUP);
    if xs.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nThe same part on the instruction clock (the second VM of part 2: one guest nanosecond \
         is one instruction executed, kernel and user space alike), median instructions per \
         map and unmap and their ratios:\n\n\
         | size | `Auto`: IOVA alignment | `Auto` map | fixed map | `Auto` / fixed | `Auto` unmap \
         | fixed unmap | `Auto` / fixed | kernel-placed / `Auto`: map | unmap |\n\
         |---|---|---|---|---|---|---|---|---|---|"
    );
    for &x in &xs {
        let m = |series, op| r.median(ICOUNT_PLACEMENT_GROUP, series, op, x);
        let ratio = |a: Option<f64>, b: Option<f64>| {
            a.zip(b)
                .map_or("–".into(), |(a, b)| format!("{:.4}", a / b))
        };
        let count = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            human_size(x),
            m("library", "alignment").map_or("–".into(), |a| human_size(a as u64)),
            count(m("library", "map")),
            count(m("library_fixed", "map")),
            ratio(m("library", "map"), m("library_fixed", "map")),
            count(m("library", "unmap")),
            count(m("library_fixed", "unmap")),
            ratio(m("library", "unmap"), m("library_fixed", "unmap")),
            ratio(m("kernel", "map"), m("library", "map")),
            ratio(m("kernel", "unmap"), m("library", "unmap")),
        );
    }
}

/// Part 6: restore from one thread against two.
fn threads_section(s: &mut String, r: &Results) {
    let Some(&n) = r.xs("threads").first() else {
        return;
    };
    let _ = writeln!(s, "\n## 6. Restoring from several threads\n");
    let _ = writeln!(
        s,
        "After a revocation the restore is N unmaps plus N maps (a revoked mapping stays \
         dead). {n} single-page mappings, revoked and restored by config writes, then unmapped \
         and mapped again from one thread, or from two (one per vCPU, each doing half, the \
         thread's start included); raw ioctls, {} rounds alternating which goes first.\n",
        4
    );
    let _ = writeln!(
        s,
        "| N | one thread | two threads | two / one |\n|---|---|---|---|\n| {n} | {} | {} | {} |",
        cell(r.get("threads", "one", "restore", n)),
        cell(r.get("threads", "two", "restore", n)),
        cell(r.get("threads", "ratio", "restore", n)),
    );
    if let (Some(ratio), Some(one), Some(two)) = (
        r.median("threads", "ratio", "restore", n),
        r.median("threads", "one", "restore", n),
        r.median("threads", "two", "restore", n),
    ) {
        let verdict = if ratio < 0.95 && two < 0.95 * one {
            "two threads are faster"
        } else if ratio < 0.95 || two < 0.95 * one {
            "no clear answer: the per-round ratio and the pooled medians disagree, so the noise \
             is larger than any gain; the library keeps restoring from one thread (the thread \
             that restores the exporter, one attachment after another)"
        } else {
            "two threads are not faster, so the library restores from the thread that \
             restores the exporter, one attachment after another. The kernel takes the IOAS's \
             `iova_rwsem` for writing to insert and to remove every area (the IOMMU page-table \
             updates themselves run under `domains_rwsem` held for reading), and in this VM \
             QEMU runs both vCPUs on one host thread (TCG), so here nothing can overlap; on \
             hardware the page-table part of many maps could"
        };
        let _ = writeln!(s, "\nTwo threads / one: {ratio:.3}: {verdict}.");
    }
}

/// The steps of the `profile` part, described.
const PROFILE_STEPS: [(&str, &str); 20] = [
    (
        "getppid",
        "the cheapest syscall: what entering the kernel costs",
    ),
    ("clock_pair", "two clock reads (the timer's own cost)"),
    (
        "export_ioctl",
        "raw `VFIO_DEVICE_FEATURE(DMA_BUF)` plus `close`",
    ),
    (
        "pread_export_ioctl",
        "the same after a raw `PCI_COMMAND` read: what the library's export did before it knew the register",
    ),
    (
        "lib_export_bar",
        "`VfioPciDevice::export_bar` plus dropping the export",
    ),
    (
        "lib_plan_export",
        "`bar()` (cached) and `plan_export`: the checks before the ioctl",
    ),
    (
        "region_info_ioctl",
        "`VFIO_DEVICE_GET_REGION_INFO` (what `bar()` asked on every export before the cache)",
    ),
    (
        "stat_sysfs_dir",
        "`stat` of the device's sysfs directory (ditto)",
    ),
    ("read_sysfs_resource", "reading sysfs `resource` (ditto)"),
    (
        "config_pread",
        "raw `pread` of `PCI_COMMAND` through the config region",
    ),
    (
        "lib_bar",
        "`VfioPciDevice::bar` now (cached after the first call)",
    ),
    (
        "lib_memory_decode",
        "`VfioPciDevice::memory_decode` (the config read `export_bar` made before)",
    ),
    (
        "fstatfs",
        "`is_dmabuf` (what `map_dmabuf` asked before the fix)",
    ),
    (
        "lseek_end",
        "`lseek(SEEK_END)`: what `DmaBuf::size` asked on every map before the size was recorded",
    ),
    (
        "dup_and_close",
        "`fcntl(F_DUPFD_CLOEXEC)` and `close`: the duplicate a mapping kept before it shared the fd",
    ),
    (
        "unmap_after_raw_map",
        "`IOMMU_IOAS_UNMAP` alone, after a raw map",
    ),
    (
        "unmap_after_library_map",
        "the same ioctl through `IoasMapping::unmap`, after `map_dmabuf`",
    ),
    (
        "bookkeeping_hot",
        "a few lines of user code (an `Arc` clone, a mutex, a vector push and pop), in a loop",
    ),
    (
        "bookkeeping_after_getppid",
        "the same lines right after a `getppid`",
    ),
    (
        "bookkeeping_after_export",
        "the same lines right after a raw export and close: under emulation, user code that \
         follows real kernel work runs slower than in a loop",
    ),
];

fn median_of(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `median (smallest–largest)` of per-size figures, with `digits` decimals
/// for the median and `range_digits` for the range; `–` when there are none.
fn across_sizes(v: &[f64], digits: usize, range_digits: usize) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    median_of(v).map_or("–".into(), |m| {
        format!("{m:.digits$} ({lo:.range_digits$}–{hi:.range_digits$})")
    })
}

/// Per operation, the worst size's median library / raw ratio in `group`
/// against the 5% target.
fn verdicts(s: &mut String, r: &Results, group: &str) {
    for op in OVERHEAD_OPS {
        let worst = r
            .xs(group)
            .into_iter()
            .filter_map(|x| r.median(group, "ratio", op, x).map(|m| (x, m)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((x, m)) = worst {
            let verdict = if m <= 1.05 {
                "within 5%"
            } else {
                "**more than 5%**"
            };
            let _ = writeln!(
                s,
                "- {op}: worst median ratio {m:.4} (at {}), {verdict} of raw ioctls.",
                human_size(x)
            );
        }
    }
}

/// The overhead part on the instruction clock (a second VM under `-icount`),
/// when it ran.
fn instruction_clock(s: &mut String, r: &Results) {
    let xs = r.xs(ICOUNT_GROUP);
    if xs.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n### The same on the instruction clock\n\n\
         The overhead part ran a second time in a VM of its own started with QEMU's \
         `-icount {ICOUNT}`{}. There the guest's clock advances one nanosecond per instruction \
         the vCPU executes, in the kernel and in user space alike, so a guest \"nanosecond\" \
         below is one instruction, whatever the emulator spends translating, looking up or \
         refilling its caches for it. Same cycles, paths, batches and statistics as above. A \
         ratio here is library / raw in instructions executed, the library's extra syscalls \
         included had there been any:\n",
        r.icount_vm_seconds
            .map_or(String::new(), |v| format!(" ({v:.0} s of VM time)"))
    );
    let _ = writeln!(s, "| size | {} |", OVERHEAD_OPS.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(OVERHEAD_OPS.len()));
    let ratio4 = |rec: Option<&Record>| match rec.and_then(|x| Some((x.median?, x.min?, x.max?))) {
        Some((m, lo, hi)) => format!("**{m:.4}** ({lo:.3}–{hi:.3})"),
        None => "–".into(),
    };
    for &x in &xs {
        let _ = write!(s, "| {} |", human_size(x));
        for op in OVERHEAD_OPS {
            let _ = write!(s, " {} |", ratio4(r.get(ICOUNT_GROUP, "ratio", op, x)));
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "\nInstructions per operation (median), raw and library, and the difference:\n"
    );
    let _ = writeln!(s, "| size | {} |", OVERHEAD_OPS.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(OVERHEAD_OPS.len()));
    for &x in &xs {
        let _ = write!(s, "| {} |", human_size(x));
        for op in OVERHEAD_OPS {
            let raw = r.median(ICOUNT_GROUP, "raw", op, x);
            let lib = r.median(ICOUNT_GROUP, "library", op, x);
            let _ = match raw.zip(lib) {
                Some((a, b)) => write!(s, " {a:.0} → {b:.0} ({:+.0}) |", b - a),
                None => write!(s, " – |"),
            };
        }
        s.push('\n');
    }
    let _ = writeln!(
        s,
        "\nThe control and the library's second copy on this clock (median over the sizes of the \
         per-size medians, with the smallest and largest):\n\n\
         | operation | library / raw | library copy / raw | control: raw / raw |\n|---|---|---|---|"
    );
    for op in OVERHEAD_OPS {
        let across = |series: &str| {
            let v: Vec<f64> = xs
                .iter()
                .filter_map(|&x| r.median(ICOUNT_GROUP, series, op, x))
                .collect();
            across_sizes(&v, 4, 4)
        };
        let _ = writeln!(
            s,
            "| {op} | {} | {} | {} |",
            across("ratio"),
            across("ratio_library_copy"),
            across("ratio_control")
        );
    }
    let _ = writeln!(s);
    verdicts(s, r, ICOUNT_GROUP);
}

// ---------------------------------------------------------------------------
// Plots
// ---------------------------------------------------------------------------

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
        for (i, x) in [65536u64, 1 << 20, 16 << 20, 1 << 30]
            .into_iter()
            .enumerate()
        {
            let f = (1u64 << (4 * i)) as f64;
            records.push(rec("sweep", "dmabuf", "map", x, "ns", 2e4));
            records.push(rec("sweep", "dmabuf", "unmap", x, "ns", 1e4));
            records.push(rec("sweep", "type1", "map", x, "ns", 1e4 * f));
            records.push(rec("sweep", "type1", "unmap", x, "ns", 5e3 * f));
            for op in OVERHEAD_OPS {
                records.push(rec("overhead", "ratio", op, x, "ratio", 1.02));
                records.push(rec("overhead", "raw", op, x, "ns", 1e4));
                records.push(rec("overhead", "library", op, x, "ns", 1.02e4));
                records.push(rec(ICOUNT_GROUP, "ratio", op, x, "ratio", 1.004));
                records.push(rec(ICOUNT_GROUP, "raw", op, x, "ns", 4e4));
                records.push(rec(ICOUNT_GROUP, "library", op, x, "ns", 4.016e4));
            }
            for series in ["kernel", "library", "fixed", "library_fixed"] {
                records.push(rec("placement", series, "map", x, "ns", 9e5));
                records.push(rec("placement", series, "unmap", x, "ns", 5e5));
                records.push(rec("placement", series, "alignment", x, "bytes", x as f64));
                records.push(rec("placement", series, "iommu_pages", x, "pages", 0.0));
                records.push(rec(ICOUNT_PLACEMENT_GROUP, series, "map", x, "ns", 9e4));
                records.push(rec(ICOUNT_PLACEMENT_GROUP, series, "unmap", x, "ns", 5e4));
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
            icount_vm_seconds: Some(30.0),
            quick: false,
            host_load: Some((0.5, 1.0)),
            records,
        }
    }

    /// Part 9 renders from its records, and `--merge` puts a part's run
    /// into a saved one: that part's records and facts replaced, the rest
    /// left alone, twice over without duplicates.
    #[test]
    fn nvmeqd_part_renders_and_merges_into_a_saved_run() {
        let base = sample();
        let mut part = sample();
        part.records.clear();
        part.date = "2026-12-01 10:00 UTC".into();
        part.host_load = Some((3.5, 4.0));
        for (op, e, c) in [("latency_polled", 60e3, 58e3), ("q1_qd8_bar", 20e3, 16e3)] {
            part.records
                .push(rec(nvme_qd::GROUP, "engine", op, 4096, "ns", e));
            part.records
                .push(rec(nvme_qd::GROUP, "raw", op, 4096, "ns", c));
            part.records
                .push(rec(nvme_qd::GROUP, "ratio", op, 4096, "ratio", e / c));
        }
        for (op, p, c) in [("latency_polled", 59e3, 58e3), ("q1_qd8_bar", 21e3, 16e3)] {
            part.records
                .push(rec(nvme_qd::GROUP, "prepared", op, 4096, "ns", p));
            part.records.push(rec(
                nvme_qd::GROUP,
                "ratio_prepared",
                op,
                4096,
                "ratio",
                p / c,
            ));
        }
        for (series, sub, reap) in [
            ("engine", 130.0, 90.0),
            ("prepared", 70.0, 60.0),
            ("raw", 120.0, 80.0),
        ] {
            part.records.push(rec(
                nvme_qd::ICOUNT_GROUP,
                series,
                "cost_submit",
                4096,
                "ns",
                sub,
            ));
            part.records.push(rec(
                nvme_qd::ICOUNT_GROUP,
                series,
                "cost_reap",
                4096,
                "ns",
                reap,
            ));
            part.records.push(rec(
                nvme_qd::ICOUNT_GROUP,
                series,
                "cost_total",
                4096,
                "ns",
                sub + reap,
            ));
        }
        let mut fact = rec("meta", "", "", 0, "", 0.0);
        fact.key = "nvmeqd_device".into();
        fact.value = "0000:0f:00.0".into();
        part.records.push(fact.clone());
        fact.key = "bar_size".into();
        fact.value = "4096".into();
        part.records.push(fact);

        for (op, v) in [
            ("open", 3e6),
            ("library_first", 2e5),
            ("library_later", 1.9e5),
        ] {
            part.records
                .push(rec(first_export::GROUP, "library", op, 65536, "ns", v));
        }
        let merged = merge_runs(base.clone(), &part, "nvmeqd,firstexport");
        // The base's parts and facts stay; the part's own fact is taken.
        assert_eq!(merged.meta("bar_size"), base.meta("bar_size"));
        assert_eq!(merged.meta("nvmeqd_device"), Some("0000:0f:00.0"));
        assert_eq!(
            merged
                .records
                .iter()
                .filter(|r| r.group == "overhead")
                .count(),
            base.records
                .iter()
                .filter(|r| r.group == "overhead")
                .count()
        );
        assert!(
            merged
                .meta("merged:nvmeqd")
                .is_some_and(|m| m.contains("2026-12-01 10:00") && m.contains("3.50 / 4.00"))
        );
        // Merging again replaces, not adds.
        let again = merge_runs(merged.clone(), &part, "nvmeqd,firstexport");
        assert_eq!(again.records.len(), merged.records.len());

        let p = page(&merged);
        assert!(p.contains("## 9. NVMe queue depth and latency"), "{p}");
        assert!(
            p.contains("| QD1 latency, polled (spinning) | 4 KiB | 60.0 µs"),
            "{p}"
        );
        assert!(
            p.contains("Checked rows over 1.10 of the control: 1 queue, QD8, BAR, 4 KiB: 1.250."),
            "{p}"
        );
        assert!(
            p.contains("Prepared rows over 1.10 of the control: 1 queue, QD8, BAR, 4 KiB: 1.312."),
            "{p}"
        );
        assert!(
            p.contains(
                "| 4 KiB | 130 | 70 | 120 | 90 | 60 | 80 | 220 | 130 | 200 | **1.100** (+20) | **0.650** (-70) |"
            ),
            "{p}"
        );
        assert!(
            p.contains("measured in a run of its own: 2026-12-01 10:00 UTC"),
            "{p}"
        );
        assert!(p.contains("## 10. The first BAR export of a device"), "{p}");
        assert!(
            p.contains(
                "| `library_first` | the handle's first export, by the library (`export_bar`, \
                 and dropping it) | 200 µs (180–220) |"
            ),
            "{p}"
        );
        // Without the parts, no sections.
        assert!(!page(&base).contains("## 9.") && !page(&base).contains("## 10."));
    }

    #[test]
    fn records_parse_from_guest_json() {
        let j = r#"{"group":"sweep","series":"dmabuf","op":"map","x":65536,"unit":"ns","median":1.5,"min":1.0,"max":2.0,"n":3}"#;
        let r: Record = serde_json::from_str(j).unwrap();
        assert_eq!((r.x, r.median, r.n), (65536, Some(1.5), 3));
        let m: Record =
            serde_json::from_str(r#"{"group":"meta","key":"kernel","value":"7.2.13"}"#).unwrap();
        assert_eq!((m.key.as_str(), m.value.as_str()), ("kernel", "7.2.13"));
    }

    /// `--merge` names a saved run or, alone, `docs/bench/results.json`;
    /// it needs `--only`. A merged vmm run keeps its `vmm_` facts and says
    /// when it ran (`merged:vmm`, which the vmm section prints).
    #[test]
    fn merge_option_and_a_merged_vmm_part() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let o = parse_opts(&args(&["--only=vmm", "--merge"])).unwrap();
        assert_eq!(
            o.merge,
            Some(workspace_root().join(PLOTS).join("results.json"))
        );
        let o = parse_opts(&args(&["--merge", "saved.json", "--only=nvmeqd"])).unwrap();
        assert_eq!(o.merge, Some(PathBuf::from("saved.json")));
        let o = parse_opts(&args(&["--merge", "--quick", "--only=vmm"])).unwrap();
        assert!(o.quick && o.merge.is_some());
        assert!(parse_opts(&args(&["--merge"])).is_err());

        let base = sample();
        let mut part = sample();
        part.records.clear();
        part.quick = true;
        part.date = "2026-12-02 08:00 UTC".into();
        let mut fact = rec("meta", "", "", 0, "", 0.0);
        fact.key = "vmm_vm_seconds".into();
        fact.value = "61".into();
        part.records.push(fact);
        part.records
            .push(rec("vmm_trap", "library", "decode_off", 1, "ns", 9e3));
        let merged = merge_runs(base.clone(), &part, "vmm");
        assert_eq!(merged.meta("vmm_vm_seconds"), Some("61"));
        assert_eq!(merged.meta("bar_size"), base.meta("bar_size"));
        let when = merged.meta("merged:vmm").unwrap();
        assert!(
            when.starts_with("2026-12-02 08:00 UTC, tcg accel, --quick"),
            "{when}"
        );
        assert!(page(&merged).contains(&format!("; run {when}")));
    }

    #[test]
    fn slopes() {
        let lin: Vec<(f64, f64, f64, f64)> = (0..5)
            .map(|i| (2f64.powi(i), 3.0 * 2f64.powi(i), 0.0, 0.0))
            .collect();
        assert!((loglog_slope(&lin, 4).unwrap() - 1.0).abs() < 1e-9);
        let flat: Vec<(f64, f64, f64, f64)> =
            (0..5).map(|i| (2f64.powi(i), 7.0, 0.0, 0.0)).collect();
        assert!(loglog_slope(&flat, 4).unwrap().abs() < 1e-9);
        assert!(loglog_slope(&flat[..1], 4).is_none());
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_ns(1234.0), "1.23 µs");
        assert_eq!(fmt_ns(45_600_000.0), "45.6 ms");
        assert_eq!(plots::axis_number(20000.0), "20k");
        assert_eq!(plots::axis_number(0.5), "0.5");
    }

    #[test]
    fn page_and_plots_render() {
        let r = sample();
        let p = page(&r);
        assert!(p.contains("cargo xtask bench"));
        assert!(p.contains("TCG"));
        assert!(p.contains("| 64 KiB |"));
        assert!(p.contains("within 5%"));
        assert!(p.contains("### The same on the instruction clock"));
        assert!(p.contains("**1.0040**"));
        assert!(p.contains("40000 → 40160 (+160)"));
        assert!(p.contains("| 64 KiB | – | 90000 | 90000 | 1.0000 | 50000 | 50000 | 1.0000 |"));
        assert!(p.contains("- 1 GiB: the library places it at a 1 GiB-aligned IOVA"));
        assert!(
            p.contains("On the instruction clock (below), `Auto` / fixed is 1.0000 and 1.0000.\n")
        );
        let dir = std::env::temp_dir().join(format!("bench-docs-{}", std::process::id()));
        write_docs(&r, &dir).unwrap();
        for f in [
            "map-vs-size.svg",
            "overhead.svg",
            "revocation.svg",
            "scale.svg",
        ] {
            let svg = fs::read_to_string(dir.join(PLOTS).join(f)).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{f}");
        }
        assert!(dir.join(DOC).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
