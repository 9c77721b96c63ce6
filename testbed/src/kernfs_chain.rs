//! The kernfs / vfio-pci lock cycle in the VM (docs/KERNEL.md, "The kernfs
//! readdir lock cycle"): running its reproducer (`vm-tests`'s `kernfs_chain`
//! binary, packed as [`GUEST_KERNFS_CHAIN`]) and judging the run, and the
//! check every suite run ends with.

use crate::kernel_patch::Patch;
use crate::suite::{self, GUEST_KERNFS_CHAIN, GuestBinaries, RunSpec};
use crate::{Error, Result, workspace_root};

/// The reproducer's modes: where the sysfs readdir's entries land (see the
/// binary's documentation).
pub const MODES: &[&str] = &["growsdown", "fresh", "contended", "resident"];

/// The proposed fix; a kernel built with it has a release ending in its name.
pub const PATCH: &str = "testbed/kernel/patches/kernfs-readdir-without-rwsem.patch";

/// What ends a suite job (after the suite's command): `kernfs-chain check`,
/// which fails the job if lockdep recorded the sysfs readdir edge of the
/// cycle at any time of the run, keeping the suite's exit status otherwise.
pub fn check_after_job() -> String {
    format!("rc=$?\n{GUEST_KERNFS_CHAIN} check || rc=1\nexit $rc\n")
}

/// Runs the reproducer in `mode` (its readdir step first or last), then
/// `kernfs-chain check`, and judges the run. `growsdown` on the stock kernel
/// must fail the run with the known chain and the running test named; with
/// the readdir first, lockdep records its edge before the cycle closes and the
/// check must catch it (job exit 2); with the readdir last, its edge is the
/// one that closes the cycle, reported and not recorded, so the check passes.
/// On a kernel built with [`PATCH`] `growsdown` must pass; `fresh` and
/// `resident` must pass anywhere; `contended` is only shown. Returns whether
/// the run went as expected.
pub fn run(bins: &GuestBinaries, mode: &str, readdir_first: bool, stream: bool) -> Result<bool> {
    if !MODES.contains(&mode) {
        return Err(Error::Setup(format!(
            "unknown kernfs-chain mode {mode:?} (modes: {})",
            MODES.join(", ")
        )));
    }
    // Announced as libtest announces a test, so that the run also shows the
    // host naming the test that was running when the report fired.
    let test = format!("kernfs_chain::{mode}");
    let first = if readdir_first {
        " --readdir-first"
    } else {
        ""
    };
    let job = format!(
        "rc=0\nprintf 'test %s ... ' {test}\n\
         {GUEST_KERNFS_CHAIN} {mode}{first} && echo ok || rc=1\n\
         {GUEST_KERNFS_CHAIN} check || rc=$((rc + 2))\nexit $rc\n"
    );
    let spec = RunSpec {
        stream,
        ..RunSpec::new("kernfs-chain", job, false)
    };
    let v = suite::run(&spec, bins, |_| {})?;
    let suffix = Patch::load(&workspace_root().join(PATCH))?.localversion();
    let log = suite::read_log(&v.run_dir.join("report.log"));
    let release = log
        .lines()
        .find_map(|l| l.split_once("kernfs-chain: kernel ").map(|(_, r)| r))
        .unwrap_or_default()
        .to_owned();
    let patched = release.ends_with(&suffix);
    let named = |f: &String| {
        f.starts_with("kernel log: lockdep reported the known lock cycle \"kernfs readdir")
            && f.contains(&format!("while test {test} was running"))
    };
    let ok = match mode {
        "growsdown" if !patched => {
            let caught = log.contains("lockdep recorded &root->kernfs_rwsem --> &mm->mmap_lock");
            let others: Vec<&String> = v.failures.iter().filter(|f| !named(f)).collect();
            let one_named = v.failures.iter().filter(|f| named(f)).count() == 1;
            if readdir_first {
                v.report.exit == Some(2)
                    && caught
                    && one_named
                    && others == ["the guest job exited with status 2"]
            } else {
                v.report.exit == Some(0) && !caught && one_named && others.is_empty()
            }
        }
        "contended" => {
            suite::print_verdict("kernfs-chain", &v);
            return Ok(v.report.exit == Some(0));
        }
        _ => v.passed(),
    };
    // The self-check's expected failure is not news; anything else is.
    if stream || !ok {
        suite::print_verdict("kernfs-chain", &v);
    }
    let outcome = match (ok, v.passed()) {
        (true, true) => "no lockdep report, as expected",
        (true, false) if readdir_first => {
            "the test bed named the known chain and the running test, the check caught the \
             readdir edge, and the run failed, as expected"
        }
        (true, false) => {
            "the test bed named the known chain and the running test, and the run failed, as \
             expected"
        }
        (false, true) => "UNEXPECTED: no lockdep report",
        (false, false) => "UNEXPECTED failures (see above)",
    };
    let kernel = if patched {
        "with the kernfs patch"
    } else {
        "stock"
    };
    println!("kernfs-chain: kernel {release} ({kernel}), mode {mode}{first}: {outcome}");
    Ok(ok)
}
