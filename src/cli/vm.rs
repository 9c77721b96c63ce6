//! `dmabuf-p2p vm ...`: the bundled test VM.

use std::path::PathBuf;
use std::process::ExitCode;

use testbed::suite::{self, GuestBinaries, RunSpec};

use super::CliError;

/// VM subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Boot the VM and print what it offers (devices, drivers, device nodes).
    Info,
    /// Boot the VM and run `p2p-test` inside: real device-to-BAR DMA through the IOMMU.
    Demo,
}

/// This very binary goes into the VM, so the demo runs what the user runs.
fn self_binaries() -> Result<GuestBinaries, CliError> {
    let cli: PathBuf = std::env::current_exe()?;
    Ok(GuestBinaries { vm_tests: None, cli })
}

/// Runs a VM subcommand.
pub fn run(cmd: VmCommand, _json: bool) -> Result<ExitCode, CliError> {
    testbed::deps::ensure(testbed::deps::VM_TOOLS)?;
    let (name, job) = match cmd {
        VmCommand::Info => ("vm-info", format!("{}\n{} devices\n", testbed::suite::INFO_JOB, suite::GUEST_CLI)),
        VmCommand::Demo => ("vm-demo", testbed::suite::DEMO_JOB.to_owned()),
    };
    let spec = RunSpec::new(name, job, false);
    let verdict = suite::run(&spec, &self_binaries()?, |_| {})?;
    suite::print_verdict(name, &verdict);
    Ok(if verdict.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
