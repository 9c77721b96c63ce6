//! `cargo fuzz` for the parsers and range checks (the `fuzz/` crate, see
//! `docs/FUZZING.md`): installing cargo-fuzz, the short smoke run that
//! `cargo xtask test` makes of every target, and longer sessions
//! (`cargo xtask fuzz`).
//!
//! cargo-fuzz needs nightly compiler flags (`-Zsanitizer`, coverage
//! instrumentation); `RUSTC_BOOTSTRAP=1` lets the stable toolchain take them,
//! so every command here sets it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Error, Result, cache_dir, run_captured, run_checked, workspace_root};

/// Seconds each target runs in the smoke run, unless
/// `DMABUF_P2P_FUZZ_SECONDS` says otherwise.
pub const SMOKE_SECONDS: u64 = 3;

/// The `fuzz/` crate.
pub fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// Where cargo-fuzz is installed: `<cache>/tools` (its binary in `bin/`), not
/// the user's global `~/.cargo/bin`.
pub fn tools_root() -> Result<PathBuf> {
    Ok(cache_dir()?.join("tools"))
}

/// `cargo`, as the one running us names it, with `<cache>/tools/bin` first on
/// `PATH` (so `cargo fuzz` finds the cached cargo-fuzz) and `RUSTC_BOOTSTRAP=1`.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    if let Ok(root) = tools_root() {
        let mut dirs = vec![root.join("bin")];
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        if let Ok(path) = std::env::join_paths(dirs) {
            cmd.env("PATH", path);
        }
    }
    cmd.env("RUSTC_BOOTSTRAP", "1").current_dir(fuzz_dir());
    cmd
}

/// Installs cargo-fuzz from crates.io into the project's cache
/// (`cargo install --root <cache>/tools cargo-fuzz --locked`) unless `cargo
/// fuzz` already works.
pub fn ensure_cargo_fuzz() -> Result<()> {
    let works = cargo()
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works {
        return Ok(());
    }
    let root = tools_root()?;
    eprintln!(
        "testbed: installing cargo-fuzz into the project's cache (cargo install --root {} cargo-fuzz --locked)",
        root.display()
    );
    run_checked(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["install", "--locked", "--root"])
            .arg(&root)
            .arg("cargo-fuzz"),
        "cargo install cargo-fuzz",
    )
}

/// The fuzz targets (`cargo fuzz list`).
pub fn targets() -> Result<Vec<String>> {
    let out = run_captured(cargo().args(["fuzz", "list"]), "cargo fuzz list")?;
    let list: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if list.is_empty() {
        return Err(Error::Setup("cargo fuzz list names no target".into()));
    }
    Ok(list)
}

/// How every target is built and run: release with debug assertions (so
/// arithmetic overflow panics), no sanitizer (the code under test is safe
/// Rust; without ASan the build is shorter and each run does more inputs).
const BUILD_FLAGS: [&str; 4] = ["--release", "--debug-assertions", "--sanitizer", "none"];

/// Builds every target.
pub fn build() -> Result<()> {
    run_checked(
        cargo().args(["fuzz", "build"]).args(BUILD_FLAGS),
        "cargo fuzz build",
    )
}

/// Fuzzes `target` for `seconds`, starting from its seeds
/// (`fuzz/seeds/<target>`, when there are any) and keeping what it finds in
/// `corpus`. A crash is written to `fuzz/artifacts/<target>/`, and the run
/// fails.
pub fn run(target: &str, seconds: u64, corpus: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(corpus)
        .map_err(|e| Error::io(format!("creating {}", corpus.display()), e))?;
    let mut cmd = cargo();
    cmd.args(["fuzz", "run"])
        .args(BUILD_FLAGS)
        .arg(target)
        .arg(corpus);
    let seeds = fuzz_dir().join("seeds").join(target);
    if seeds.is_dir() {
        cmd.arg(seeds);
    }
    cmd.args([
        "--",
        &format!("-max_total_time={seconds}"),
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
    ]);
    run_checked(&mut cmd, &format!("cargo fuzz run {target}"))
}

/// The smoke run of `cargo xtask test`: builds every target and fuzzes each
/// for a few seconds ([`SMOKE_SECONDS`], or `DMABUF_P2P_FUZZ_SECONDS`; 0
/// skips the runs but still builds), printing a libtest-style line per target.
/// The corpora go to `target/fuzz-smoke/` and are thrown away with it.
/// Returns whether every target ran clean.
pub fn smoke() -> Result<bool> {
    let started = Instant::now();
    let seconds = std::env::var("DMABUF_P2P_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SMOKE_SECONDS);
    ensure_cargo_fuzz()?;
    let targets = targets()?;
    eprintln!("testbed: fuzz: building {} targets", targets.len());
    build()?;
    let built = started.elapsed();
    let mut ok = true;
    if seconds > 0 {
        for t in &targets {
            let corpus = workspace_root().join("target/fuzz-smoke").join(t);
            let _ = std::fs::remove_dir_all(&corpus);
            match run(t, seconds, &corpus) {
                Ok(()) => println!("test fuzz::{t} ... ok"),
                Err(e) => {
                    println!(
                        "test fuzz::{t} ... FAILED ({e}; the crashing input is in fuzz/artifacts/{t}/)"
                    );
                    ok = false;
                }
            }
        }
    }
    eprintln!(
        "testbed: fuzz: {} targets, build {:.1} s, {} s each, {:.1} s in all",
        targets.len(),
        built.as_secs_f64(),
        seconds,
        started.elapsed().as_secs_f64()
    );
    Ok(ok)
}

/// `cargo xtask fuzz [TARGET..] [--seconds N]`: a longer session of each
/// named target (all by default), `N` seconds each (default 300), keeping the
/// corpus in `fuzz/corpus/<target>` (not committed) for the next session.
pub fn xtask(args: &[String]) -> Result<bool> {
    let mut seconds = 300u64;
    let mut named = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--seconds" {
            seconds = it
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| Error::Setup("--seconds needs a number".into()))?;
        } else {
            named.push(a.clone());
        }
    }
    ensure_cargo_fuzz()?;
    let all = targets()?;
    if let Some(bad) = named.iter().find(|n| !all.contains(n)) {
        return Err(Error::Setup(format!(
            "no fuzz target {bad:?}; the targets are {}",
            all.join(", ")
        )));
    }
    let chosen = if named.is_empty() { all } else { named };
    build()?;
    let mut ok = true;
    for t in &chosen {
        let t0 = Instant::now();
        let result = run(t, seconds, &fuzz_dir().join("corpus").join(t));
        let took = Duration::from_secs(t0.elapsed().as_secs());
        match result {
            Ok(()) => println!("test fuzz::{t} ... ok ({took:?})"),
            Err(e) => {
                println!(
                    "test fuzz::{t} ... FAILED ({e}; the crashing input is in fuzz/artifacts/{t}/)"
                );
                ok = false;
            }
        }
    }
    Ok(ok)
}
