//! The dmabuf-p2p VM test bed.
//!
//! Nothing the library wraps exists in the development machines' kernel, so every
//! real test runs in a QEMU VM: q35 with an emulated intel-iommu, QEMU's `edu`
//! DMA engine and `ivshmem-plain` devices whose BAR2 is host-file-backed memory.
//! This crate builds (or finds) the kernel, packs the guest initramfs, boots the
//! VM, streams the guest's test report back and judges the run.

pub mod bench;
pub mod boot;
pub mod boot_check;
pub mod capture;
pub mod debian;
pub mod deps;
pub mod fuzz;
pub mod initramfs;
pub mod kernel;
pub mod kernel_patch;
pub mod kernfs_chain;
pub mod lockdep;
pub mod private_root;
pub mod profile;
pub mod qemu;
pub mod qemu_binary;
pub mod qmp;
pub mod report;
pub mod runtime_dir;
pub mod screen;
pub mod selftests;
pub mod suite;
pub mod uapi;
pub mod udmabuf_dev;

use std::io;
use std::path::PathBuf;
use std::process::Command;

/// Everything that can go wrong while setting up or running the VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A command ran but exited unsuccessfully.
    #[error("{what} failed ({status}){tail}")]
    Command {
        /// The command, in words.
        what: String,
        /// How it exited.
        status: String,
        /// The last lines it printed, if captured.
        tail: String,
    },
    /// The kernel path given in `DMABUF_P2P_KERNEL` is unusable.
    #[error("DMABUF_P2P_KERNEL={path}: {reason}")]
    KernelPath {
        /// The path from the environment.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// A setup step could not be completed.
    #[error("{0}")]
    Setup(String),
    /// The VM ran but the run failed.
    #[error("VM run failed: {reason} (guest console log: {log})")]
    VmRun {
        /// Why the run counts as failed.
        reason: String,
        /// Where the console log was saved.
        log: PathBuf,
    },
}

impl Error {
    /// An [`Error::Io`] with a description of what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result alias for the test bed.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The test bed's cache directory: `$DMABUF_P2P_CACHE`, else
/// `$XDG_CACHE_HOME/dmabuf-p2p`, else `~/.cache/dmabuf-p2p`.
pub fn cache_dir() -> Result<PathBuf> {
    let dir = if let Some(d) = std::env::var_os("DMABUF_P2P_CACHE") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("dmabuf-p2p")
    } else if let Some(h) = std::env::var_os("HOME") {
        PathBuf::from(h).join(".cache/dmabuf-p2p")
    } else {
        PathBuf::from("/tmp/dmabuf-p2p-cache")
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

/// Runs `cmd` with inherited stdio and fails unless it exits 0.
pub fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd
        .status()
        .map_err(|e| Error::io(format!("starting {what}"), e))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Command {
            what: what.to_owned(),
            status: status.to_string(),
            tail: String::new(),
        })
    }
}

/// Runs `cmd`, capturing its output, and fails unless it exits 0. The error
/// carries the last lines of stderr.
pub fn run_captured(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| Error::io(format!("starting {what}"), e))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        Err(Error::Command {
            what: what.to_owned(),
            status: out.status.to_string(),
            tail: if tail.is_empty() {
                String::new()
            } else {
                format!(":\n{}", tail.join("\n"))
            },
        })
    }
}

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}
