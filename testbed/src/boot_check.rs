//! `cargo xtask boot-check`: boots the standard VM many times with a job that
//! does nothing and counts the outcomes by kind ([`Boot`]), optionally with
//! the host's cores kept busy, as CI's are by other work. `docs/KERNEL.md`
//! has the table and the cause of each kind seen.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::boot::{Boot, boot_uptime};
use crate::suite::{self, RunSpec};
use crate::{Error, Result, workspace_root};

/// Options of `cargo xtask boot-check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckArgs {
    /// Boots to do.
    pub count: u32,
    /// Busy threads kept running on the host meanwhile (0: none).
    pub load: u32,
}

impl CheckArgs {
    /// Parses `--count N` and `--load N` (also `--count=N`).
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut me = Self { count: 50, load: 0 };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) => (f, Some(v.to_owned())),
                None => (a.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| format!("{flag} needs a number"))
                    .and_then(|v| {
                        v.parse::<u32>()
                            .map_err(|_| format!("{flag}: {v:?} is not a number"))
                    })
            };
            match flag {
                "--count" => me.count = value()?,
                "--load" => me.load = value()?,
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        if me.count == 0 {
            return Err("--count must be at least 1".into());
        }
        Ok(me)
    }
}

/// The outcome of one boot of `boot-check`.
#[derive(Debug, Clone)]
pub struct BootRun {
    /// How far it got.
    pub boot: Boot,
    /// The run's other failures (a kernel report after init, the job's status).
    pub failures: Vec<String>,
    /// Guest uptime at `@@booted`.
    pub uptime: Option<f64>,
    /// Wall time of the VM.
    pub wall: Duration,
    /// Where its console log was kept, if it failed.
    pub kept: Option<PathBuf>,
    /// The host's 1-minute load average when the boot ended.
    pub load: Option<f64>,
}

impl BootRun {
    /// The kind for the table: the boot kind, or `failed-after-boot`.
    pub fn kind(&self) -> &'static str {
        if self.boot.booted() && !self.failures.is_empty() {
            "failed-after-boot"
        } else {
            self.boot.kind()
        }
    }
}

/// Counts per kind, in a fixed order, with the runs of each.
pub fn tally(runs: &[BootRun]) -> Vec<(&'static str, Vec<usize>)> {
    let kinds = [
        "booted",
        "failed-after-boot",
        "kernel-died-before-init",
        "qemu-exited",
        "freeze-no-console",
        "hung-before-init",
    ];
    kinds
        .iter()
        .map(|k| {
            let which: Vec<usize> = runs
                .iter()
                .enumerate()
                .filter(|(_, r)| r.kind() == *k)
                .map(|(i, _)| i + 1)
                .collect();
            (*k, which)
        })
        .collect()
}

/// The host's 1-minute load average (`/proc/loadavg`), to say how busy the
/// host was during a boot.
pub fn host_load() -> Option<f64> {
    let text = fs::read_to_string("/proc/loadavg").ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Busy threads that keep the host's cores loaded until dropped.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Starts `n` threads, each spinning on arithmetic and a 4 MiB buffer
    /// (so the caches are contended too, as by a compiler).
    pub fn start(n: u32) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u64; 512 * 1024];
                    let mut x = u64::from(i) + 1;
                    while !stop.load(Ordering::Relaxed) {
                        for slot in buf.iter_mut().step_by(8) {
                            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                            *slot ^= x;
                        }
                    }
                    std::hint::black_box(&buf);
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Prints the table of a boot-check.
pub fn print_table(kernel: &Path, args: &CheckArgs, runs: &[BootRun], elapsed: Duration) {
    println!(
        "boot-check: {} boots of {} with {} busy host thread(s), {:.0} s",
        runs.len(),
        kernel.display(),
        args.load,
        elapsed.as_secs_f64()
    );
    for (kind, which) in tally(runs) {
        if which.is_empty() && kind != "booted" {
            continue;
        }
        let list = if kind == "booted" || which.is_empty() {
            String::new()
        } else {
            let runs_list: Vec<String> = which.iter().map(usize::to_string).collect();
            format!("  (boots {})", runs_list.join(", "))
        };
        println!("  {kind:<24} {:>4}{list}", which.len());
    }
    let mut up: Vec<f64> = runs.iter().filter_map(|r| r.uptime).collect();
    up.sort_by(f64::total_cmp);
    let mut wall: Vec<f64> = runs.iter().map(|r| r.wall.as_secs_f64()).collect();
    wall.sort_by(f64::total_cmp);
    if let (Some(umax), Some(wmax)) = (up.last(), wall.last()) {
        println!(
            "  guest uptime at init: median {:.1} s, max {umax:.1} s; VM wall time: median {:.1} s, max {wmax:.1} s",
            up[up.len() / 2],
            wall[wall.len() / 2]
        );
    }
    let mut load: Vec<f64> = runs.iter().filter_map(|r| r.load).collect();
    load.sort_by(f64::total_cmp);
    if let (Some(lmin), Some(lmax)) = (load.first(), load.last()) {
        println!(
            "  host load (1-minute average at each boot's end): min {lmin:.1}, median {:.1}, max {lmax:.1}",
            load[load.len() / 2]
        );
    }
    for (i, r) in runs.iter().enumerate() {
        if r.kind() != "booted" {
            println!(
                "  boot {}: {}{}{}",
                i + 1,
                r.boot,
                if r.failures.is_empty() {
                    String::new()
                } else {
                    format!("; {}", r.failures.join("; "))
                },
                r.kept
                    .as_ref()
                    .map(|p| format!(" (console: {})", p.display()))
                    .unwrap_or_default()
            );
        }
    }
}

/// `cargo xtask boot-check [--count N] [--load N]`: boots the standard VM
/// (the suite's devices and command line) `count` times with a job that does
/// nothing, prints the outcomes by kind and keeps each failed boot's logs in
/// `target/testbed/boot-check-failures/`. `Ok(true)` if every boot passed.
pub fn xtask(args: &[String]) -> Result<bool> {
    let args = CheckArgs::parse(args).map_err(|e| Error::Setup(format!("boot-check: {e}")))?;
    crate::deps::ensure_vm_tools()?;
    let kernel = crate::kernel::resolve()?;
    let bins = suite::build_guest_binaries(false)?;
    let spec = RunSpec {
        stream: false,
        ..RunSpec::new("boot-check", "true\n".to_owned(), false)
    };
    // Named like the run directory, so concurrent checks keep apart.
    let kept_dir = workspace_root().join(match std::env::var("DMABUF_P2P_RUN_TAG") {
        Ok(tag) if !tag.is_empty() => format!("target/testbed/boot-check-failures-{tag}"),
        _ => "target/testbed/boot-check-failures".to_owned(),
    });
    if kept_dir.exists() {
        fs::remove_dir_all(&kept_dir)
            .map_err(|e| Error::io(format!("removing {}", kept_dir.display()), e))?;
    }
    let load = Load::start(args.load);
    let start = Instant::now();
    let mut runs = Vec::new();
    for i in 1..=args.count {
        let v = suite::run(&spec, &bins, |_| {})?;
        let report_log = suite::read_log(&v.run_dir.join("report.log"));
        let mut run = BootRun {
            boot: v.boot.clone(),
            failures: if v.boot.booted() {
                v.failures.clone()
            } else {
                Vec::new()
            },
            uptime: boot_uptime(&report_log),
            wall: v.elapsed,
            kept: None,
            load: host_load(),
        };
        if run.kind() != "booted" {
            let dir = kept_dir.join(format!("{i:03}-{}", run.kind()));
            fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            for name in ["console.log", "report.log", "qemu.stderr"] {
                let _ = fs::copy(v.run_dir.join(name), dir.join(name));
            }
            run.kept = Some(dir.join("console.log"));
        }
        eprintln!(
            "boot-check: {i}/{}: {} (init at {} s guest time, VM {:.1} s, host load {}; {:.0} s elapsed)",
            args.count,
            run.kind(),
            run.uptime.map_or("?".to_owned(), |u| format!("{u:.1}")),
            run.wall.as_secs_f64(),
            run.load.map_or("?".to_owned(), |l| format!("{l:.1}")),
            start.elapsed().as_secs_f64()
        );
        runs.push(run);
    }
    drop(load);
    print_table(&kernel, &args, &runs, start.elapsed());
    Ok(runs.iter().all(|r| r.kind() == "booted"))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_check_arguments() {
        let a =
            |v: &[&str]| CheckArgs::parse(&v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(a(&[]).unwrap(), CheckArgs { count: 50, load: 0 });
        assert_eq!(
            a(&["--count", "7", "--load=2"]).unwrap(),
            CheckArgs { count: 7, load: 2 }
        );
        assert!(a(&["--count"]).unwrap_err().contains("needs a number"));
        assert!(a(&["--count", "x"]).unwrap_err().contains("not a number"));
        assert!(a(&["--count", "0"]).is_err());
        assert!(a(&["--fast"]).unwrap_err().contains("--fast"));
    }

    #[test]
    fn the_tally_counts_each_kind_once() {
        let run = |boot: Boot, failures: Vec<String>| BootRun {
            boot,
            failures,
            uptime: Some(3.0),
            wall: Duration::from_secs(6),
            kept: None,
            load: Some(2.0),
        };
        let runs = vec![
            run(Boot::Booted, vec![]),
            run(Boot::SilentFreeze, vec![]),
            run(Boot::Booted, vec!["kernel log: WARNING: x".into()]),
            run(Boot::Booted, vec![]),
        ];
        let t = tally(&runs);
        let get = |k: &str| t.iter().find(|(kind, _)| *kind == k).unwrap().1.clone();
        assert_eq!(get("booted"), vec![1, 4]);
        assert_eq!(get("freeze-no-console"), vec![2]);
        assert_eq!(get("failed-after-boot"), vec![3]);
        assert_eq!(t.iter().map(|(_, v)| v.len()).sum::<usize>(), runs.len());
    }
}
