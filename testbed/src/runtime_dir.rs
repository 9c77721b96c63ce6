//! A short private directory for a VM's Unix sockets.
//!
//! A Unix socket path must fit in `sun_path` (108 bytes with its NUL), so
//! sockets under a deep checkout's `target/testbed/<run>/` make QEMU refuse to
//! start. Each VM gets a fresh `dp2p-XXXXXX` directory (mode 0700, made by
//! `mkdtemp`) under `$XDG_RUNTIME_DIR` when that is short, else `/tmp`, and the
//! directory is removed when the VM is dropped.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Longest base directory used, so that `<base>/dp2p-XXXXXX/report.sock`
/// stays far below the 107 usable bytes of `sun_path`.
const MAX_BASE_LEN: usize = 64;

/// A directory made by `mkdtemp`, removed (with its contents) on drop.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

impl RuntimeDir {
    /// Makes a fresh private directory under [`base`].
    pub fn new() -> Result<Self> {
        Self::under(&base())
    }

    /// Makes a fresh private directory under `base`.
    pub fn under(base: &Path) -> Result<Self> {
        let template = base.join("dp2p-XXXXXX");
        let template = CString::new(template.as_os_str().as_bytes())
            .map_err(|_| Error::Setup(format!("{} contains a NUL byte", base.display())))?;
        let mut bytes = template.into_bytes_with_nul();
        // SAFETY: `bytes` is a writable NUL-terminated buffer ending in
        // "XXXXXX", as mkdtemp requires; it rewrites those six bytes in place.
        let made = unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) };
        if made.is_null() {
            return Err(Error::io(
                format!("creating a private directory under {}", base.display()),
                std::io::Error::last_os_error(),
            ));
        }
        bytes.pop();
        Ok(Self {
            path: PathBuf::from(OsString::from_vec(bytes)),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `$XDG_RUNTIME_DIR` if it is set, absolute and short, else `/tmp`.
pub fn base() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() && d.as_os_str().len() <= MAX_BASE_LEN && d.is_dir() => d,
        _ => PathBuf::from("/tmp"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_short_and_removed_on_drop() {
        let dir = RuntimeDir::under(Path::new("/tmp")).unwrap();
        let path = dir.path().to_owned();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{} has mode {mode:o}", path.display());
        assert!(path.join("report.sock").as_os_str().len() < 40);
        let other = RuntimeDir::under(Path::new("/tmp")).unwrap();
        assert_ne!(other.path(), path);
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn socket_paths_fit_whatever_the_base() {
        let base = base();
        assert!(base.as_os_str().len() <= MAX_BASE_LEN);
        // base + "/dp2p-XXXXXX" + "/report.sock" + NUL
        assert!(base.as_os_str().len() + 12 + 12 < 108);
    }
}
