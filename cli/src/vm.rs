//! `dmabuf-p2p vm ...`: the bundled test VM.

use std::path::PathBuf;
use std::process::ExitCode;

use testbed::suite::{self, GuestBinaries, RunSpec, Verdict};

use crate::{CliError, print_json};

/// VM subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Boot the VM and print what it offers (devices, drivers, device nodes).
    Info,
    /// Boot the VM and run `p2p-test` inside: real device-to-BAR DMA through the IOMMU.
    Demo {
        /// The engine: QEMU's `edu` copy engine, or an NVMe controller reading
        /// blocks (read-only).
        #[arg(long, value_enum, default_value_t = DemoEngine::Edu)]
        engine: DemoEngine,
    },
}

/// The engine of `vm demo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoEngine {
    /// QEMU's edu device.
    Edu,
    /// The VM's first NVMe controller.
    Nvme,
}

/// This very binary goes into the VM, so the demo runs what the user runs.
fn self_binaries() -> Result<GuestBinaries, CliError> {
    let cli: PathBuf = std::env::current_exe()?;
    Ok(GuestBinaries {
        vm_tests: None,
        examples: Vec::new(),
        cli,
        kernfs_chain: None,
    })
}

/// What `--json` prints: the guest command's own JSON and the run's verdict.
#[derive(Debug, serde::Serialize)]
struct JsonRun {
    guest: serde_json::Value,
    passed: bool,
    failures: Vec<String>,
    host_checks: Vec<(String, Result<(), String>)>,
    iommu_blocked: bool,
    vm_seconds: f64,
    run_dir: PathBuf,
}

fn json_run(v: &Verdict) -> JsonRun {
    // The guest's report minus the test bed's directives is the guest command's JSON.
    let text: String = suite::read_log(&v.run_dir.join("report.log"))
        .lines()
        .filter(|l| !l.starts_with("@@"))
        .collect::<Vec<_>>()
        .join("\n");
    JsonRun {
        guest: serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        passed: v.passed(),
        failures: v.failures.clone(),
        host_checks: v.host_checks.clone(),
        iommu_blocked: v.iommu_blocked,
        vm_seconds: v.elapsed.as_secs_f64(),
        run_dir: v.run_dir.clone(),
    }
}

/// Runs a VM subcommand.
pub fn run(cmd: VmCommand, json: bool) -> Result<ExitCode, CliError> {
    let flag = if json { " --json" } else { "" };
    let (name, job) = match cmd {
        VmCommand::Info if json => ("vm-info", format!("{}{flag} devices\n", suite::GUEST_CLI)),
        VmCommand::Info => (
            "vm-info",
            format!("{}\n{} devices\n", suite::INFO_JOB, suite::GUEST_CLI),
        ),
        VmCommand::Demo { engine } => (
            "vm-demo",
            format!(
                "DEMO_JSON={}\nDEMO_ENGINE={}\n{}",
                flag.trim(),
                if engine == DemoEngine::Nvme {
                    "nvme"
                } else {
                    "edu"
                },
                suite::DEMO_JOB
            ),
        ),
    };
    let mut spec = RunSpec::new(name, job, false);
    spec.stream = !json;
    let verdict = suite::run(&spec, &self_binaries()?, |_| {})?;
    if json {
        print_json(&json_run(&verdict))?;
    } else {
        suite::print_verdict(name, &verdict);
    }
    Ok(if verdict.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
