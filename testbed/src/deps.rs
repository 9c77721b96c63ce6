//! Host tools the test bed needs, installed from the machine's own Debian
//! suite when missing.

use std::path::Path;
use std::process::Command;

use crate::{Result, run_checked};

/// A program the test bed runs and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// Absolute path that must exist afterwards.
    pub path: &'static str,
    /// Debian package providing it.
    pub package: &'static str,
}

/// Tools for booting the VM.
pub const VM_TOOLS: &[Tool] = &[
    Tool {
        path: "/usr/bin/qemu-system-x86_64",
        package: "qemu-system-x86",
    },
    Tool {
        path: "/bin/busybox",
        package: "busybox-static",
    },
];

/// Tools for regenerating (or checking) the uAPI bindings with bindgen.
pub const BINDGEN_TOOLS: &[Tool] = &[Tool {
    path: "/usr/lib/llvm-14/lib/libclang.so",
    package: "libclang-dev",
}];

/// Installs the packages of the `tools` that are missing (one `apt-get update`
/// first, only if something is missing).
pub fn ensure(tools: &[Tool]) -> Result<()> {
    let missing: Vec<&Tool> = tools
        .iter()
        .filter(|t| !Path::new(t.path).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let pkgs: Vec<&str> = missing.iter().map(|t| t.package).collect();
    eprintln!(
        "testbed: installing {} (missing: {})",
        pkgs.join(" "),
        missing.iter().map(|t| t.path).collect::<Vec<_>>().join(" ")
    );
    run_checked(
        Command::new("apt-get").args(["-q", "update"]),
        "apt-get update",
    )?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("apt-get install {}", pkgs.join(" ")),
    )
}
