//! Host tools the test bed needs and how they get onto the machine without
//! harming it.
//!
//! The VM's programs (QEMU, busybox) are never installed: they are taken from
//! the machine if it has them, else unpacked privately into the cache
//! ([`crate::private_root`]). What must be installed system-wide (libclang for
//! bindgen, the kernel build's tools) goes through [`install_packages`]: the
//! list is printed first, apt simulates the install, and if apt would remove or
//! replace any package nothing is done and the run stops with an error.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::private_root::{PrivateRoot, simulate_install};
use crate::{Error, Result, run_checked};

/// A program the test bed runs and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// Absolute path that must exist afterwards.
    pub path: &'static str,
    /// Debian package providing it.
    pub package: &'static str,
}

/// Tools for regenerating (or checking) the uAPI bindings with bindgen.
pub const BINDGEN_TOOLS: &[Tool] = &[Tool {
    path: "/usr/lib/llvm-14/lib/libclang.so",
    package: "libclang-dev",
}];

/// The static busybox packed into the guest initramfs: the machine's
/// `/bin/busybox` if it has one, else `busybox-static` unpacked privately.
pub fn busybox() -> Result<PathBuf> {
    let system = Path::new("/bin/busybox");
    if system.is_file() {
        return Ok(system.to_owned());
    }
    let root = PrivateRoot::ensure("busybox-static", &["busybox-static"])?.root();
    let bin = root.join("bin/busybox");
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(Error::Setup(format!(
            "busybox-static unpacked into {} has no bin/busybox",
            root.display()
        )))
    }
}

/// Makes sure the VM's programs are available (QEMU and busybox; see
/// [`crate::qemu_binary`]), so that a missing one fails before any build.
pub fn ensure_vm_tools() -> Result<()> {
    crate::qemu_binary::QemuBinary::resolve()?;
    busybox()?;
    Ok(())
}

/// Installs the packages of the `tools` that are missing, system-wide, with
/// [`install_packages`].
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
        "testbed: missing {}",
        missing.iter().map(|t| t.path).collect::<Vec<_>>().join(" ")
    );
    install_packages(&pkgs)
}

/// Installs `packages` from the machine's own suite, without recommends,
/// never removing anything: needs root; prints what apt will install; refuses
/// (installing nothing) if the simulation shows any removal; and passes
/// `--no-remove` to the real install as a second guard.
pub fn install_packages(packages: &[&str]) -> Result<()> {
    let list = packages.join(" ");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(Error::Setup(format!(
            "the test bed needs the packages {list}; installing them needs root: run \
             `sudo apt-get install --no-install-recommends --no-remove {list}` (check first that apt removes nothing)"
        )));
    }
    let plan = simulate_install(packages)?;
    if !plan.remove.is_empty() {
        return Err(Error::Setup(format!(
            "refusing to install {list}: apt would remove {} (nothing was changed)",
            plan.remove.join(" ")
        )));
    }
    if plan.install.is_empty() {
        return Ok(());
    }
    eprintln!(
        "testbed: installing with apt-get (system-wide, nothing removed): {}",
        plan.install
            .iter()
            .map(|p| format!("{}={}", p.name, p.version))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut install = Command::new("apt-get");
    install
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "--no-remove",
        ])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive")
        // apt's chatter goes to stderr: some tasks print a result on stdout.
        .stdout(std::io::stderr());
    run_checked(&mut install, &format!("apt-get install {list}"))
}
