//! Which `qemu-system-x86_64` runs the VM, and with what environment. Every
//! QEMU launch of the test bed goes through [`QemuBinary::command`].
//!
//! In order: `$DMABUF_P2P_QEMU` (a path to a `qemu-system-x86_64`), the
//! machine's own `qemu-system-x86_64` on `PATH`, else the machine suite's QEMU
//! (Debian bookworm: 7.2) unpacked privately into `<cache>/qemu-system`
//! ([`crate::private_root`]): nothing is installed and nothing removed.
//!
//! The private QEMU finds its libraries through `LD_LIBRARY_PATH`, its modules
//! (Debian builds TCG itself as a module, `accel-tcg-x86_64.so`) through
//! `QEMU_MODULE_DIR`, and its firmware (SeaBIOS, option ROMs) through `-L`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::private_root::PrivateRoot;
use crate::{Error, Result};

/// Environment variable naming the QEMU binary to use.
pub const QEMU_ENV: &str = "DMABUF_P2P_QEMU";

/// The package unpacked when the machine has no QEMU.
const PACKAGE: &str = "qemu-system-x86";

/// A QEMU binary and what it needs to run.
#[derive(Debug, Clone)]
pub struct QemuBinary {
    /// The executable.
    pub path: PathBuf,
    /// Environment variables set for it.
    pub env: Vec<(&'static str, OsString)>,
    /// Arguments that come before the VM's own (firmware search paths).
    pub leading_args: Vec<String>,
    /// Where it came from, for messages.
    pub origin: String,
}

impl QemuBinary {
    /// Finds the QEMU to use (see the module docs), unpacking the private one
    /// on first use.
    pub fn resolve() -> Result<Self> {
        if let Some(p) = std::env::var_os(QEMU_ENV) {
            let path = PathBuf::from(p);
            if !path.is_file() {
                return Err(Error::Setup(format!(
                    "{QEMU_ENV}={} is not a file",
                    path.display()
                )));
            }
            return Ok(Self::system(path, QEMU_ENV.to_owned()));
        }
        if let Some(path) = on_path("qemu-system-x86_64") {
            return Ok(Self::system(path, "the machine's QEMU".into()));
        }
        let root = PrivateRoot::ensure("qemu-system", &[PACKAGE])?.root();
        Self::unpacked(&root)
    }

    fn system(path: PathBuf, origin: String) -> Self {
        Self {
            path,
            env: Vec::new(),
            leading_args: Vec::new(),
            origin,
        }
    }

    /// The QEMU unpacked under `root`.
    fn unpacked(root: &Path) -> Result<Self> {
        let path = root.join("usr/bin/qemu-system-x86_64");
        if !path.is_file() {
            return Err(Error::Setup(format!(
                "{PACKAGE} unpacked into {} has no usr/bin/qemu-system-x86_64",
                root.display()
            )));
        }
        let mut libs = OsString::new();
        libs.push(root.join("usr/lib/x86_64-linux-gnu"));
        libs.push(":");
        libs.push(root.join("lib/x86_64-linux-gnu"));
        if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
            libs.push(":");
            libs.push(old);
        }
        let env = vec![
            ("LD_LIBRARY_PATH", libs),
            (
                "QEMU_MODULE_DIR",
                root.join("usr/lib/x86_64-linux-gnu/qemu").into_os_string(),
            ),
        ];
        let leading_args = ["usr/share/qemu", "usr/share/seabios"]
            .iter()
            .flat_map(|d| ["-L".to_owned(), root.join(d).display().to_string()])
            .collect();
        Ok(Self {
            path,
            env,
            leading_args,
            origin: format!("{PACKAGE} unpacked in {}", root.display()),
        })
    }

    /// A command running this QEMU with its environment and leading arguments;
    /// the caller adds the VM's arguments.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.path);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.args(&self.leading_args);
        cmd
    }

    /// The first line of `--version` (e.g. "QEMU emulator version 7.2.22 ..."),
    /// or empty if it cannot be run.
    pub fn version(&self) -> String {
        let mut cmd = Command::new(&self.path);
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd.arg("--version")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
            .unwrap_or_default()
    }
}

/// The first executable file called `name` in `$PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
