//! `cargo xtask kernel-selftests`: the kernel's own iommufd and udmabuf
//! selftests, run in the test VM on the test kernel.
//!
//! They are built from the cached source tree with their own Makefiles
//! (`tools/testing/selftests/iommu`, `.../drivers/dma-buf`), statically
//! (`USERLDFLAGS=-static`), against the tree's uAPI headers (`make headers`).
//! iommufd links libcap, whose static library comes from `libcap-dev`
//! unpacked privately into the cache (nothing is installed). In the VM they
//! run one after the other; each prints TAP and a `# Totals:` line, which the
//! host parses: every case must pass (or be skipped by the test itself).
//! The VM has 3 GiB of RAM for them, so that udmabuf's last two cases (a
//! 2 GiB hugetlb memfd) run; in the standard 1 GiB VM udmabuf stops after
//! its fifth case.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use crate::private_root::PrivateRoot;
use crate::suite::{self, RunSpec};
use crate::{Error, Result, cache_dir, kernel, run_captured};

/// One selftest program.
#[derive(Debug, Clone, Copy)]
pub struct Selftest {
    /// Its directory under `tools/testing/selftests`.
    pub dir: &'static str,
    /// The program's name.
    pub name: &'static str,
}

/// The selftests this command runs.
pub const SELFTESTS: &[Selftest] = &[
    Selftest {
        dir: "iommu",
        name: "iommufd",
    },
    Selftest {
        dir: "iommu",
        name: "iommufd_fail_nth",
    },
    Selftest {
        dir: "drivers/dma-buf",
        name: "udmabuf",
    },
];

/// The VM's memory for the selftests, and its 2 MiB huge pages: udmabuf's
/// last two cases need 1,024 of them at once.
pub const SELFTEST_MEMORY_MIB: u32 = 3072;
/// See [`SELFTEST_MEMORY_MIB`].
pub const SELFTEST_HUGEPAGES: u32 = 1100;

/// Where the selftests live in the guest.
const GUEST_DIR: &str = "/bin/selftests";

/// The counts of a kselftest `# Totals:` line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Passed.
    pub pass: u32,
    /// Failed.
    pub fail: u32,
    /// Expected failures.
    pub xfail: u32,
    /// Unexpected passes.
    pub xpass: u32,
    /// Skipped.
    pub skip: u32,
    /// Errors.
    pub error: u32,
}

impl Totals {
    /// Parses `# Totals: pass:246 fail:0 xfail:0 xpass:0 skip:5 error:0`.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line.trim().strip_prefix("# Totals:")?;
        let mut t = Self::default();
        for field in rest.split_whitespace() {
            let (k, v) = field.split_once(':')?;
            let v: u32 = v.parse().ok()?;
            match k {
                "pass" => t.pass = v,
                "fail" => t.fail = v,
                "xfail" => t.xfail = v,
                "xpass" => t.xpass = v,
                "skip" => t.skip = v,
                "error" => t.error = v,
                _ => return None,
            }
        }
        Some(t)
    }

    /// Cases run.
    pub fn total(&self) -> u32 {
        self.pass + self.fail + self.xfail + self.xpass + self.skip + self.error
    }
}

/// What one selftest printed, as far as the verdict goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The `# Totals:` line, if it got that far.
    pub totals: Option<Totals>,
    /// The `not ok` lines (failed cases).
    pub failed: Vec<String>,
    /// The program's exit status, from the job's `==selftest-exit` line.
    pub exit: Option<i32>,
}

/// Splits the guest's report into each selftest's output: the job prints
/// `==selftest NAME` before one and `==selftest-exit NAME STATUS` after
/// (plain lines: `@@` is the test bed's own directive prefix).
pub fn parse_report(report: &str) -> Vec<(String, Outcome)> {
    let mut out: Vec<(String, Outcome)> = Vec::new();
    for line in report.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(name) = line.strip_prefix("==selftest ") {
            out.push((name.trim().to_owned(), Outcome::default()));
            continue;
        }
        if let Some(rest) = line.strip_prefix("==selftest-exit ") {
            let mut w = rest.split_whitespace();
            if let (Some(name), Some(status)) = (w.next(), w.next())
                && let Some((_, o)) = out.iter_mut().rev().find(|(n, _)| n == name)
            {
                o.exit = status.parse().ok();
            }
            continue;
        }
        let Some((_, current)) = out.last_mut() else {
            continue;
        };
        if let Some(t) = Totals::parse(line) {
            current.totals = Some(t);
        } else if line.starts_with("not ok ") && !line.contains("# SKIP") {
            current.failed.push(line.to_owned());
        }
    }
    out
}

/// Why one selftest's outcome is not a pass; empty if it is. Every case
/// must pass or be skipped by the test itself, and the program must get to
/// its `# Totals:` line.
pub fn judge(test: &Selftest, outcome: Option<&Outcome>) -> Vec<String> {
    let Some(o) = outcome else {
        return vec![format!("{}: did not run", test.name)];
    };
    let mut problems: Vec<String> = o
        .failed
        .iter()
        .map(|line| format!("{}: {line}", test.name))
        .collect();
    match o.totals {
        None => problems.push(format!(
            "{}: no `# Totals:` line: it stopped early (exit status {:?})",
            test.name, o.exit
        )),
        Some(t) if t.fail > 0 || t.error > 0 || t.xpass > 0 => {
            problems.push(format!("{}: {t:?}", test.name));
        }
        Some(_) => {}
    }
    problems
}

/// The guest job: each selftest in turn, framed by `==selftest` lines.
pub fn job() -> String {
    let mut job = String::from("# The kernel's selftests, one after the other.\ncd /tmp\n");
    for t in SELFTESTS {
        job.push_str(&format!(
            "echo '==selftest {name}'\n{GUEST_DIR}/{name}\nrc=$?\necho \"==selftest-exit {name} $rc\"\n",
            name = t.name
        ));
    }
    // The verdict is the host's (from each program's TAP): the job itself
    // succeeds once every program has run.
    job.push_str("exit 0\n");
    job
}

/// Builds the selftests statically from the kernel source tree into
/// `<cache>/selftests/<version>/`, returning (name, binary) pairs.
pub fn build() -> Result<Vec<(String, PathBuf)>> {
    let src = kernel::source_dir()?;
    let version = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let out = cache_dir()?.join("selftests").join(&version);
    let headers = out.join("headers");
    if !headers.join("usr/include/linux/iommufd.h").is_file() {
        eprintln!("selftests: installing the uAPI headers of {version}");
        let mut make = Command::new("make");
        make.arg("-C")
            .arg(&src)
            .arg(format!("O={}", headers.display()))
            .args(["ARCH=x86", "-s", "headers"])
            .env_remove("MAKEFLAGS");
        run_captured(&mut make, "make headers")?;
    }
    let libcap = PrivateRoot::ensure("libcap-dev", &["libcap-dev"])?.root();
    let mut built = Vec::new();
    for t in SELFTESTS {
        let dir = out.join(t.dir);
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let mut make = Command::new("make");
        make.arg("-C")
            .arg(src.join("tools/testing/selftests").join(t.dir))
            .arg(format!("OUTPUT={}", dir.display()))
            .arg(format!(
                "KHDR_INCLUDES=-isystem {}",
                headers.join("usr/include").display()
            ))
            .arg(format!(
                "USERCFLAGS=-I{}",
                libcap.join("usr/include").display()
            ))
            .arg(format!(
                "USERLDFLAGS=-static -L{}",
                libcap.join("usr/lib/x86_64-linux-gnu").display()
            ))
            .arg(format!("{}/{}", dir.display(), t.name))
            .env_remove("MAKEFLAGS");
        run_captured(&mut make, &format!("make {} ({})", t.name, t.dir))?;
        let bin = dir.join(t.name);
        if !bin.is_file() {
            return Err(Error::Setup(format!(
                "make left no {} in {}",
                t.name,
                dir.display()
            )));
        }
        built.push((t.name.to_owned(), bin));
    }
    Ok(built)
}

/// `cargo xtask kernel-selftests`: builds the selftests, runs them in the
/// VM and prints each one's counts; `Ok(true)` if every outcome is the
/// a pass and the run saw no kernel report.
pub fn xtask() -> Result<bool> {
    crate::deps::ensure_vm_tools()?;
    let built = build()?;
    let bins = suite::build_guest_binaries(false)?;
    let mut spec = RunSpec::new("kernel-selftests", job(), false);
    spec.stream = false;
    spec.extra_binaries = built
        .iter()
        .map(|(name, path)| (format!("{GUEST_DIR}/{name}"), path.clone()))
        .collect();
    if std::env::var_os("DMABUF_P2P_VM_TIMEOUT").is_none() {
        // iommufd_fail_nth fails thousands of allocations one by one: under
        // TCG that takes minutes.
        spec.timeout = std::time::Duration::from_secs(2700);
    }
    let verdict = suite::run(&spec, &bins, |c| {
        // udmabuf's cases 6 and 7 fill a 2 GiB hugetlb memfd: 1,024 huge
        // pages, more than the standard VM's 1 GiB of RAM holds.
        c.memory_mib = SELFTEST_MEMORY_MIB;
        c.hugepages = SELFTEST_HUGEPAGES;
    })?;
    let report = suite::read_log(&verdict.run_dir.join("report.log"));
    let outcomes = parse_report(&report);
    let mut ok = verdict.passed();
    println!("kernel-selftests on {}:", kernel::resolve()?.display());
    for t in SELFTESTS {
        let o = outcomes.iter().find(|(n, _)| n == t.name).map(|(_, o)| o);
        match o.and_then(|o| o.totals) {
            Some(c) => println!(
                "  {:<18} {}/{} ok ({} passed, {} skipped), {} failed, {} error(s)",
                t.name,
                c.pass + c.skip,
                c.total(),
                c.pass,
                c.skip,
                c.fail,
                c.error
            ),
            None => println!("  {:<18} no totals", t.name),
        }
        for p in judge(t, o) {
            ok = false;
            println!("    UNEXPECTED: {p}");
        }
    }
    if !verdict.passed() {
        suite::print_verdict("kernel-selftests", &verdict);
    }
    println!("kernel-selftests: {}", if ok { "ok" } else { "FAILED" });
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_lines_parse() {
        assert_eq!(
            Totals::parse("# Totals: pass:241 fail:0 xfail:0 xpass:0 skip:5 error:0"),
            Some(Totals {
                pass: 241,
                skip: 5,
                ..Totals::default()
            })
        );
        assert_eq!(Totals::parse("# Totals: pass:x"), None);
        assert_eq!(Totals::parse("ok 1 x"), None);
    }

    #[test]
    fn the_report_splits_per_selftest_and_judges_each() {
        // The shape of a real run (iommufd cut to two cases; udmabuf as it
        // ends in a 1 GiB VM, where case 6 cannot map its 2 GiB memfd).
        let report = "@@booted 3.1\n==selftest iommufd\nTAP version 13\n1..2\n\
            ok 1 iommufd.a\nok 2 iommufd.b # SKIP Skipping test for variant no_viommu\n\
            # PASSED: 2 / 2 tests passed.\n\
            # Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:0\n==selftest-exit iommufd 0\n\
            ==selftest udmabuf\nTAP version 13\n1..7\n\
            ok 5 drivers/dma-buf/udmabuf: [PASS,test-5]\n\
            # drivers/dma-buf/udmabuf: ubuf_fd mmap fail\n==selftest-exit udmabuf 1\n\
            ==selftest iommufd_fail_nth\nnot ok 3 basic_fail_nth.map_domain\n\
            # Totals: pass:7 fail:1 xfail:0 xpass:0 skip:0 error:0\n\
            ==selftest-exit iommufd_fail_nth 1\n@@exit 0\n";
        let out = parse_report(report);
        let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["iommufd", "udmabuf", "iommufd_fail_nth"]);
        assert_eq!(out[0].1.totals.map(|t| (t.pass, t.skip)), Some((1, 1)));
        assert!(out[0].1.failed.is_empty(), "a SKIP is not a failure");
        assert_eq!(out[0].1.exit, Some(0));
        let t = |name: &str| SELFTESTS.iter().find(|t| t.name == name).unwrap();
        assert!(judge(t("iommufd"), Some(&out[0].1)).is_empty());
        let p = judge(t("udmabuf"), Some(&out[1].1));
        assert!(
            p.len() == 1 && p[0].contains("stopped early (exit status Some(1))"),
            "{p:?}"
        );
        let p = judge(t("iommufd_fail_nth"), Some(&out[2].1));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("not ok 3 basic_fail_nth.map_domain"), "{p:?}");
        assert!(judge(t("iommufd"), None)[0].contains("did not run"));
    }

    #[test]
    fn the_job_runs_every_selftest_and_reports_each_exit() {
        let j = job();
        for t in SELFTESTS {
            assert!(j.contains(&format!("echo '==selftest {}'", t.name)), "{j}");
            assert!(j.contains(&format!("{GUEST_DIR}/{}\n", t.name)), "{j}");
            assert!(
                j.contains(&format!("==selftest-exit {} $rc", t.name)),
                "{j}"
            );
        }
    }
}
