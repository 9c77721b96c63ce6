//! Where an exporter listens, and how the socket is made so that only its
//! owner can connect: mode 0600, in a 0700 directory when it creates one, put
//! in place by `rename` only once its mode is set.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::unistd::Uid;

use crate::{Error, Result};

/// The directory for sockets: `$XDG_RUNTIME_DIR/dmabuf-p2p` when that is set
/// (a per-user 0700 directory), else `/run/dmabuf-p2p`.
pub fn default_socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() && Path::new(&d).is_absolute() => Path::new(&d).join("dmabuf-p2p"),
        _ => PathBuf::from("/run/dmabuf-p2p"),
    }
}

/// The default socket for a buffer called `name` (e.g. `0000:02:00.0-bar2`)
/// in [`default_socket_dir`]. Characters other than letters, digits, `.`,
/// `-`, `_` and `:` become `_`.
///
/// ```
/// let p = dmabuf_p2p::share::default_socket_path("0000:02:00.0 BAR2");
/// assert!(p.ends_with("0000:02:00.0_BAR2.sock"));
/// ```
pub fn default_socket_path(name: &str) -> PathBuf {
    let clean: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    default_socket_dir().join(format!("{clean}.sock"))
}

fn sys(op: &'static str, path: &Path, e: io::Error) -> Error {
    Error::sys(op, path.display().to_string(), e)
}

fn refused(path: &Path, problem: String) -> Error {
    Error::Unsupported {
        target: path.display().to_string(),
        operation: "serve a shared buffer",
        problem,
        source: None,
    }
}

/// Makes sure `dir` exists and is fit to hold a socket: created with mode
/// 0700 if missing; otherwise a real directory (not a symlink) owned by this
/// user or root, that nobody else can write to unless it is sticky (like
/// `/tmp`, where only the owner of a name can remove it).
fn prepare_dir(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| sys("mkdir", dir, e)),
        Err(e) => Err(sys("stat", dir, e)),
        Ok(meta) => {
            let me = Uid::effective().as_raw();
            if !meta.file_type().is_dir() {
                return Err(refused(dir, "not a directory".into()));
            }
            if meta.uid() != me && meta.uid() != 0 {
                return Err(refused(
                    dir,
                    format!(
                        "the directory belongs to uid {}, not to this user",
                        meta.uid()
                    ),
                ));
            }
            let mode = meta.mode();
            if mode & 0o022 != 0 && mode & 0o1000 == 0 {
                return Err(refused(
                    dir,
                    format!(
                        "others may write to the directory (mode {:o})",
                        mode & 0o7777
                    ),
                ));
            }
            Ok(())
        }
    }
}

/// Binds a listening socket at `path` that only this user (and root) can
/// connect to:
///
/// * the parent directory is created with mode 0700 if it is missing, and
///   refused if another user owns it or may write to it (unless sticky);
/// * an existing socket file is replaced only if it is this user's and
///   nobody listens on it (a stale one); anything else there is refused;
/// * the socket is bound under a temporary name, given mode 0600, and only
///   then renamed to `path`, so it is never reachable with the umask's mode.
///
/// The peer credential check ([`super::AccessPolicy`]) is the real gate; the
/// mode keeps other users from connecting at all.
pub fn bind_listener(path: &Path) -> Result<UnixListener> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    prepare_dir(&dir)?;
    if let Ok(meta) = fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(refused(path, "exists and is not a socket".into()));
        }
        if meta.uid() != Uid::effective().as_raw() {
            return Err(refused(
                path,
                format!("a socket of uid {} is there already", meta.uid()),
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(refused(path, "another process is serving there".into()));
        }
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(|e| sys("bind", &tmp, e))?;
    let placed = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
        .map_err(|e| sys("chmod 0600", &tmp, e))
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| sys("rename", path, e)));
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dmabuf-p2p-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_socket_is_0600_in_a_0700_directory() {
        let d = scratch("mode");
        let path = d.join("sub").join("x.sock");
        let l = bind_listener(&path);
        assert!(l.is_ok(), "{l:?}");
        let m = fs::metadata(&path).map(|m| m.mode() & 0o777).unwrap_or(0);
        assert_eq!(m, 0o600);
        let dm = fs::metadata(d.join("sub"))
            .map(|m| m.mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(dm, 0o700);
        // Served: a second bind is refused; once closed, the stale socket
        // is replaced.
        assert!(bind_listener(&path).is_err());
        drop(l);
        assert!(bind_listener(&path).is_ok());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_writable_directory_and_a_non_socket_are_refused() {
        let d = scratch("open");
        assert!(DirBuilder::new().recursive(true).create(&d).is_ok());
        assert!(fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).is_ok());
        assert!(bind_listener(&d.join("x.sock")).is_err());
        assert!(fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).is_ok());
        assert!(fs::write(d.join("f"), b"").is_ok());
        assert!(bind_listener(&d.join("f")).is_err());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn default_paths() {
        let p = default_socket_path("0000:02:00.0 BAR2/../x");
        assert!(p.ends_with("0000:02:00.0_BAR2_.._x.sock"), "{p:?}");
    }
}
