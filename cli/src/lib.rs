//! The `dmabuf-p2p` command: parsing and dispatch. The binary (`main.rs`)
//! only prints what [`run`] returns; [`target`] is the syntax commands are
//! pointed at.

/// `println!` that hands back the write error instead of panicking: a closed
/// stdout (`dmabuf-p2p devices | head -1`) is `EPIPE`, which `main` turns
/// into a clean exit.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod devices;
mod drm_output;
mod drm_test;
mod export;
mod lines;
mod manual;
mod p2p;
mod p2p_args;
mod p2p_nvme;
mod p2p_report;
mod p2p_target;
mod p2p_verdict;
mod screen;
mod share;
pub mod target;
mod topology;
#[cfg(feature = "vm")]
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Any error a command can end with; printed as one line.
pub type CliError = Box<dyn std::error::Error>;

/// Safe peer-to-peer DMA on Linux: VFIO BAR dma-bufs, iommufd import, revocation.
#[derive(Debug, Parser)]
#[command(name = "dmabuf-p2p", version, about)]
pub struct Cli {
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List PCI devices with driver, IOMMU group, vfio cdev and BARs.
    Devices(devices::Args),
    /// Export a BAR range as a dma-buf and show its fdinfo and physical ranges.
    Export(export::Args),
    /// Will P2P DMA from an engine into a target's BAR work here, and why
    /// not: the PCI path as a tree (bridges, ACS, IOMMU groups), the route
    /// (through a switch or the root complex), the IOMMU's reach, the verdict.
    Topology(topology::Args),
    /// Copy into and out of a BAR with a DMA engine through the IOMMU, verify
    /// every transfer, then revoke and restore.
    P2pTest(p2p_args::Args),
    /// Hand a BAR to a GPU's DRM driver (PRIME import), scan it out, check
    /// the screen against the BAR, then revoke and restore.
    DrmTest(drm_test::Args),
    /// Receive a BAR buffer from `export --serve <socket>`, map it into this
    /// process's IOAS, optionally copy into it with a DMA engine and verify.
    Map(share::MapArgs),
    /// The bundled test VM (QEMU, intel-iommu, edu, ivshmem).
    #[cfg(feature = "vm")]
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Print a shell completion script (e.g. `dmabuf-p2p completions bash >
    /// /etc/bash_completion.d/dmabuf-p2p`).
    Completions(manual::CompletionsArgs),
    /// Print the manual page (roff; `dmabuf-p2p man | man -l -`).
    Man,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Devices(a) => devices::run(&a, cli.json),
        Command::Export(a) => export::run(&a, cli.json),
        Command::Topology(a) => topology::run(&a, cli.json),
        Command::P2pTest(a) => p2p::run(&a, cli.json),
        Command::DrmTest(a) => drm_test::run(&a, cli.json),
        Command::Map(a) => share::run_map(&a, cli.json),
        #[cfg(feature = "vm")]
        Command::Vm(c) => vm::run(c, cli.json),
        Command::Completions(a) => manual::completions(&a),
        Command::Man => manual::man(),
    }
}

/// The longest timeout a command takes, in seconds (a week).
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// Parses a timeout in seconds: 1 to [`MAX_TIMEOUT_SECS`], so that adding it
/// to the clock can never overflow.
pub fn timeout_secs(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    if n == 0 || n > MAX_TIMEOUT_SECS {
        return Err(format!("{n} seconds: 1 to {MAX_TIMEOUT_SECS} allowed"));
    }
    std::time::Instant::now()
        .checked_add(std::time::Duration::from_secs(n))
        .map(|_| n)
        .ok_or_else(|| format!("{n} seconds: too far in the future"))
}

/// Prints `value` as pretty JSON.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<(), CliError> {
    outln!("{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// FNV-1a 64 of `data`: the hash of the test bed's host checks
/// (`@@host-check ... fnv1a64=`) and of `map`'s copy report.
pub(crate) fn fnv1a64(data: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, data);
    std::hash::Hasher::finish(&h)
}
