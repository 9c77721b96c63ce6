//! `cargo xtask`: developer and CI tasks for dmabuf-p2p.
//!
//! * `cargo xtask test` — everything: fmt and clippy checks, host tests, then the
//!   VM suite (the README's test command, called by `.ci/run`).
//! * `cargo xtask vm-test [FILTER..] [--profile=NAME] [--fail-on-purpose]` — only the
//!   VM suite, one VM per profile (`testbed/src/profile.rs`).
//! * `cargo xtask vm-info` — boot the VM and show what it offers.
//! * `cargo xtask kernel [--force] [--drm] [--patch FILE]` — build (or find) the test
//!   kernel (with `--drm`, the one for VMs with a GPU); with `--patch`, a
//!   patched kernel under its own cache key.
//! * `cargo xtask kernfs-chain [MODE] [--readdir-first]` — reproduce the kernel
//!   lockdep chain of docs/KERNEL.md in the VM.
//! * `cargo xtask boot-check [--count N] [--load N]` — boot the VM N times
//!   (N busy host threads meanwhile) and count the failures by kind.
//! * `cargo xtask kernel-selftests` — the kernel's iommufd and udmabuf
//!   selftests, built from the cached source, run in the VM.
//! * `cargo xtask kernel-fits BZIMAGE` — whether a prebuilt kernel's config
//!   has every option of `testbed/kernel/fragment.config` (exit status 0 if so).
//! * `cargo xtask fuzz [TARGET..] [--seconds N]` — fuzz the parsers (`docs/FUZZING.md`).
//! * `cargo xtask bench [--quick] [--only=PARTS] [--render FILE]` — the
//!   in-VM benchmarks; writes `docs/BENCHMARKS.md` and `docs/bench/*.svg`.
//! * `cargo xtask bindings [--check]` — regenerate or check `src/sys/bindings.rs`.
//! * `cargo xtask capture-config-writes [--held-out]` — record the guest
//!   kernel's config-space writes as fixtures (`testbed/src/capture.rs`).

use std::process::{Command, ExitCode};
use std::time::Instant;

use testbed::suite::{self, GuestBinaries, RunSpec};
use testbed::{Result, deps, fuzz, kernel, kernfs_chain, profile, uapi, workspace_root};

const USAGE: &str = "usage: cargo xtask <test | vm-test [FILTER..] [--profile=NAME] [--fail-on-purpose] | vm-info | kernel [--force] [--drm] [--patch FILE] | kernel-fits BZIMAGE | kernel-selftests | boot-check [--count N] [--load N] | kernfs-chain [MODE] [--readdir-first] | bindings [--check] | bench [--quick] [--only=PARTS] [--render FILE] | fuzz [TARGET..] [--seconds N] | capture-config-writes [--held-out]>";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let result = match cmd.as_str() {
        "test" => test_all(),
        "vm-test" => vm_test(rest),
        "vm-info" => vm_info(),
        "kernfs-chain" => kernfs_chain(rest),
        "bench" => testbed::bench::xtask(rest),
        "capture-config-writes" => testbed::capture::xtask(rest),
        "kernel" => kernel_task(rest),
        "kernel-fits" => match rest {
            [image] => kernel::xtask_fits(std::path::Path::new(image)),
            _ => {
                eprintln!("usage: cargo xtask kernel-fits BZIMAGE");
                return ExitCode::from(2);
            }
        },
        "boot-check" => testbed::boot_check::xtask(rest),
        "kernel-selftests" => testbed::selftests::xtask(),
        "bindings" => uapi::run_bindings(rest.iter().any(|a| a == "--check")).map(|()| true),
        "fuzz" => fuzz::xtask(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(true)
        }
        other => {
            eprintln!("unknown task {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask {cmd}: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The guest job of one suite run: the libtest binary with `args`, in a VM
/// of the profile named `profile`.
fn tests_job(profile: &str, args: &[String], fail_on_purpose: bool) -> String {
    let mut job = String::from("export RUST_BACKTRACE=1\n");
    job.push_str(&format!(
        "export DMABUF_P2P_VM_PROFILE={}\n",
        shell_quote(profile)
    ));
    if fail_on_purpose {
        job.push_str("export DMABUF_P2P_FAIL_ON_PURPOSE=1\n");
    }
    // The seed of the property tests, so that a failure's seed replays
    // (checked before any VM boots, in run_suite).
    if let Ok(Some(seed)) = replay_seed() {
        job.push_str(&format!("export DMABUF_P2P_SEED={seed}\n"));
    }
    job.push_str(suite::GUEST_VM_TESTS);
    job.push_str(" --test-threads=1");
    for a in args {
        job.push(' ');
        job.push_str(&shell_quote(a));
    }
    job.push('\n');
    job.push_str(&kernfs_chain::check_after_job());
    job
}

/// `DMABUF_P2P_SEED`, the seed the guest's property tests replay: unset, or
/// a decimal u64 as a property test prints it (anything else is refused, so
/// that a mistyped seed never runs a random one).
fn replay_seed() -> Result<Option<u64>> {
    match std::env::var("DMABUF_P2P_SEED") {
        Err(_) => Ok(None),
        Ok(s) => s.trim().parse().map(Some).map_err(|_| {
            testbed::Error::Setup(format!(
                "DMABUF_P2P_SEED={s:?} is not a seed (a decimal u64, as a property test prints it)"
            ))
        }),
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs the VM suite, one VM per profile that `filters` concern (every
/// profile when there are none; only `only` when given); returns whether
/// every run passed.
fn run_suite(
    bins: &GuestBinaries,
    filters: &[String],
    only: Option<&str>,
    fail_on_purpose: bool,
    name: &str,
) -> Result<bool> {
    replay_seed()?;
    let mut all_ok = true;
    let mut ran = 0;
    for p in profile::all() {
        if only.is_some_and(|o| o != p.name) {
            continue;
        }
        let Some(args) = p.test_args(filters) else {
            continue;
        };
        ran += 1;
        let (run_name, label) = if p.is_standard() {
            (name.to_owned(), "vm-suite".to_owned())
        } else {
            eprintln!("testbed: profile {}: {}", p.name, p.about);
            (
                format!("{name}-{}", p.name),
                format!("vm-suite ({})", p.name),
            )
        };
        let spec = RunSpec::new(&run_name, tests_job(p.name, &args, fail_on_purpose), true);
        let verdict = suite::run(&spec, bins, p.shape)?;
        suite::print_verdict(&label, &verdict);
        all_ok &= verdict.passed();
    }
    if ran == 0 {
        eprintln!("testbed: no VM profile has tests matching {filters:?}");
        return Ok(false);
    }
    Ok(all_ok)
}

fn vm_test(args: &[String]) -> Result<bool> {
    deps::ensure_vm_tools()?;
    let fail = args.iter().any(|a| a == "--fail-on-purpose");
    let only = args
        .iter()
        .find_map(|a| a.strip_prefix("--profile="))
        .map(str::to_owned);
    if let Some(o) = &only
        && profile::named(o).is_none()
    {
        let names: Vec<&str> = profile::all().iter().map(|p| p.name).collect();
        return Err(testbed::Error::Setup(format!(
            "no VM profile {o:?} (profiles: {})",
            names.join(", ")
        )));
    }
    let filters: Vec<String> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .collect();
    let bins = suite::build_guest_binaries(true)?;
    run_suite(&bins, &filters, only.as_deref(), fail, "vm-test")
}

fn vm_info() -> Result<bool> {
    deps::ensure_vm_tools()?;
    let bins = suite::build_guest_binaries(false)?;
    let job = suite::INFO_JOB.to_owned();
    let spec = RunSpec::new("vm-info", job, false);
    let verdict = suite::run(&spec, &bins, |_| {})?;
    if !verdict.passed() {
        suite::print_verdict("vm-info", &verdict);
    }
    Ok(verdict.passed())
}

/// `cargo xtask kernel [--force] [--drm] [--patch FILE]`.
fn kernel_task(args: &[String]) -> Result<bool> {
    let force = args.iter().any(|a| a == "--force");
    let flavor = if args.iter().any(|a| a == "--drm") {
        kernel::Flavor::Drm
    } else {
        kernel::Flavor::Base
    };
    let patch = args
        .iter()
        .position(|a| a == "--patch")
        .map(|i| args.get(i + 1).map(std::path::PathBuf::from));
    match patch {
        Some(None) => {
            eprintln!("--patch needs a file\n{USAGE}");
            Ok(false)
        }
        // kernel::xtask prints the path.
        Some(Some(file)) => kernel::xtask(force, flavor, Some(&file)).map(|_| true),
        None => kernel::xtask(force, flavor, None).map(|_| true),
    }
}

/// `cargo xtask kernfs-chain [MODE] [--readdir-first]`: boots the VM, runs the kernel lockdep
/// chain's reproducer (docs/KERNEL.md) and checks the outcome.
fn kernfs_chain(args: &[String]) -> Result<bool> {
    deps::ensure_vm_tools()?;
    let bins = suite::build_guest_binaries(true)?;
    let mode = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map_or("growsdown", String::as_str);
    let readdir_first = args.iter().any(|a| a == "--readdir-first");
    kernfs_chain::run(&bins, mode, readdir_first, true)
}

/// The README's test command: host tests, then the VM suite, then a check that
/// the test bed itself notices a failing guest test.
fn test_all() -> Result<bool> {
    let start = Instant::now();
    deps::ensure_vm_tools()?;
    // Resolve the kernels first: a bad DMABUF_P2P_KERNEL should fail fast.
    let k = kernel::resolve()?;
    eprintln!("testbed: kernel {}", k.display());
    let drm = kernel::resolve_for(kernel::Flavor::Drm)?;
    if drm != k {
        eprintln!("testbed: kernel for VMs with a GPU {}", drm.display());
    }

    // Habits first, then the host tests (which also build the examples). The
    // library alone, without features, is linted too: feature gates must not
    // leave dead code behind.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // (name, cargo's arguments, RUSTDOCFLAGS)
    let host_steps = [
        ("format", "fmt --all --check", None),
        (
            "clippy",
            "clippy --workspace --all-targets -- -D warnings",
            None,
        ),
        (
            "clippy (library, no features)",
            "clippy --package dmabuf-p2p --all-targets -- -D warnings",
            None,
        ),
        (
            "clippy (library, rust-vmm)",
            "clippy --package dmabuf-p2p --all-targets --features rust-vmm -- -D warnings",
            None,
        ),
        (
            "host tests",
            "test --workspace --exclude dmabuf-p2p-vm-tests --features dmabuf-p2p/rust-vmm",
            None,
        ),
        // The API docs with the features docs.rs builds, and every other
        // package's (libraries only: the CLI's binary has the library's
        // name): a broken intra-doc link or bad doc markup fails the run.
        (
            "API docs",
            "doc --no-deps --workspace --lib \
             --features dmabuf-p2p/serde,dmabuf-p2p/share,dmabuf-p2p/drm",
            Some("-D warnings"),
        ),
    ];
    for (name, args, rustdocflags) in host_steps {
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(workspace_root())
            .args(args.split_whitespace());
        if let Some(flags) = rustdocflags {
            cmd.env("RUSTDOCFLAGS", flags);
            eprintln!("testbed: {name}: RUSTDOCFLAGS='{flags}' cargo {args}");
        } else {
            eprintln!("testbed: {name}: cargo {args}");
        }
        let ok = cmd.status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            eprintln!("testbed: {name} failed");
            return Ok(false);
        }
    }

    // A short run of every fuzz target (parsers and range checks).
    eprintln!("testbed: fuzz smoke run");
    let fuzz_ok = fuzz::smoke()?;

    // The committed bindings must match a fresh bindgen run (needs libclang,
    // which the test command installs).
    deps::ensure(deps::BINDGEN_TOOLS)?;
    let bindings_ok = match uapi::run_bindings(true) {
        Ok(()) => {
            println!("test bindings::committed_bindings_match_a_fresh_generation ... ok");
            true
        }
        Err(e @ testbed::Error::Command { .. }) if e.to_string().contains("apt-get") => {
            // The pinned header package could not be fetched (the archive moved
            // on): that says nothing about the bindings, so say so loudly and go on.
            eprintln!("testbed: WARNING: bindings freshness check not run: {e}");
            true
        }
        Err(e) => {
            println!("test bindings::committed_bindings_match_a_fresh_generation ... FAILED\n{e}");
            false
        }
    };

    let bins = suite::build_guest_binaries(true)?;
    let vm_ok = run_suite(&bins, &[], None, false, "vm-test")?;

    // The test bed must be able to fail: one test that fails on purpose.
    eprintln!("testbed: self-check: a guest test that fails on purpose must fail the run");
    let spec = RunSpec {
        stream: false,
        ..RunSpec::new(
            "self-check",
            tests_job(
                profile::STANDARD,
                &["testbed::fails_on_purpose".to_owned()],
                true,
            ),
            true,
        )
    };
    let v = suite::run(&spec, &bins, |_| {})?;
    let self_ok = !v.passed()
        && v.failures
            .iter()
            .any(|f| f.contains("testbed::fails_on_purpose"));
    if self_ok {
        println!("test testbed-self-check::failing_guest_test_fails_the_run ... ok");
    } else {
        println!(
            "test testbed-self-check::failing_guest_test_fails_the_run ... FAILED (failures: {:?})",
            v.failures
        );
    }

    // The known kernel lock cycle (docs/KERNEL.md): reproduced, it must fail
    // its run with the chain named (on a kernel with the fix, not reported).
    eprintln!("testbed: self-check: the kernel lock cycle's reproducer must be named");
    let chain_ok = kernfs_chain::run(&bins, "growsdown", true, false)?;
    println!(
        "test testbed-self-check::known_kernel_lock_cycle_is_named ... {}",
        if chain_ok { "ok" } else { "FAILED" }
    );

    println!(
        "xtask test: finished in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(fuzz_ok && bindings_ok && vm_ok && self_ok && chain_ok)
}
