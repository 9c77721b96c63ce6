//! A `/dev/udmabuf` for QEMU on hosts without one.
//!
//! QEMU 7.2 refuses `virtio-gpu-pci,blob=true` unless it can open
//! `/dev/udmabuf` read-write and some memory backend is a sealed memfd
//! (`virtio_gpu_have_udmabuf`, hw/display/virtio-gpu-udmabuf.c). It uses
//! the udmabuf device only for a blob whose backing is more than one
//! guest range (`virtio_gpu_init_udmabuf`: one range is used in place),
//! and a VFIO BAR export of one range below a switch is one range. Many
//! hosts (CI machines, this one) have no udmabuf driver, and making
//! `/dev/udmabuf` there would change the host.
//!
//! So QEMU runs in a private mount namespace (inside a private user
//! namespace when the test bed is not root) whose `/dev` is a tmpfs with
//! every entry of the real `/dev` bound into it, plus an empty regular
//! file `/dev/udmabuf`: the open succeeds, and a multi-range blob's
//! `UDMABUF_CREATE_LIST` fails on it (`ENOTTY`), which QEMU reports and
//! survives. Nothing outside QEMU's namespace changes, and it ends with
//! QEMU.
//!
//! The child's setup runs between `fork` and `exec`, so it only makes
//! system calls on strings prepared before the fork.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::{Error, Result};

/// Whether this host's `/dev/udmabuf` opens read-write, as QEMU opens it.
pub fn host_has_udmabuf() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/udmabuf")
        .is_ok()
}

/// One entry of the real `/dev`, to be bound into (or, for a symlink,
/// made again in) the private one.
#[derive(Debug)]
enum Entry {
    /// A directory (`pts`, `shm`, ...): made, then the original bound on it.
    Dir { staged: CString, target: CString },
    /// A device node or other file: an empty file made, then bound over.
    File { staged: CString, target: CString },
    /// A symlink (`fd -> /proc/self/fd`): made again.
    Symlink { link: CString, target: CString },
}

/// Everything the child needs, as C strings made before the fork.
#[derive(Debug)]
struct Plan {
    root: bool,
    uid_map: CString,
    gid_map: CString,
    staging: CString,
    entries: Vec<Entry>,
    udmabuf: CString,
}

fn cstr(bytes: &[u8]) -> Result<CString> {
    CString::new(bytes).map_err(|_| Error::Setup(format!("a NUL byte in {bytes:?}")))
}

/// Makes `cmd` run in a private mount namespace whose `/dev` has an empty
/// `/dev/udmabuf` besides the host's entries. `staging` is an existing
/// private directory (mode 0700) where the real `/dev` is bound for a
/// moment inside that namespace.
pub fn run_with_placeholder(cmd: &mut Command, staging: &Path) -> Result<()> {
    let dev = Path::new("/dev");
    let listing = fs::read_dir(dev).map_err(|e| Error::io("listing /dev", e))?;
    let mut entries = Vec::new();
    for e in listing.flatten() {
        let name = e.file_name();
        if name.as_bytes() == b"udmabuf" {
            continue;
        }
        let target = cstr(dev.join(&name).as_os_str().as_bytes())?;
        let staged = cstr(staging.join(&name).as_os_str().as_bytes())?;
        let Ok(meta) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        let ft = meta.file_type();
        entries.push(if ft.is_symlink() {
            let link = fs::read_link(e.path())
                .map_err(|err| Error::io(format!("reading {}", e.path().display()), err))?;
            Entry::Symlink {
                link: cstr(link.as_os_str().as_bytes())?,
                target,
            }
        } else if ft.is_dir() {
            Entry::Dir { staged, target }
        } else {
            Entry::File { staged, target }
        });
    }
    // SAFETY: geteuid cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    // SAFETY: as above.
    let gid = unsafe { libc::getegid() };
    let plan = Plan {
        root: uid == 0,
        uid_map: cstr(format!("{uid} {uid} 1").as_bytes())?,
        gid_map: cstr(format!("{gid} {gid} 1").as_bytes())?,
        staging: cstr(staging.as_os_str().as_bytes())?,
        entries,
        udmabuf: cstr(b"/dev/udmabuf")?,
    };
    // SAFETY: the closure runs in the forked child before exec; it only
    // makes system calls (unshare, open, write, mkdir, symlink, mount,
    // umount2, close) on pointers to strings made above, allocates nothing
    // and takes no lock.
    unsafe {
        cmd.pre_exec(move || plan.apply());
    }
    Ok(())
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Writes `data` to the file `path` (for `/proc/self/*_map`).
fn write_file(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: a valid C string path; the fd is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    check(fd)?;
    // SAFETY: writes from a live buffer to the fd just opened.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `mount(source, target, fstype, flags, data)` with optional strings.
fn mount(
    source: Option<&std::ffi::CStr>,
    target: &std::ffi::CStr,
    fstype: Option<&std::ffi::CStr>,
    flags: libc::c_ulong,
    data: Option<&std::ffi::CStr>,
) -> io::Result<()> {
    let p = |s: Option<&std::ffi::CStr>| s.map_or(std::ptr::null(), std::ffi::CStr::as_ptr);
    // SAFETY: every pointer is null or a valid C string for the call.
    check(unsafe { libc::mount(p(source), target.as_ptr(), p(fstype), flags, p(data).cast()) })
}

impl Plan {
    /// The child's side: new namespaces, `/dev` replaced, `udmabuf` added.
    fn apply(&self) -> io::Result<()> {
        if self.root {
            // SAFETY: unshare takes flags only.
            check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
        } else {
            // SAFETY: as above; the child is single-threaded.
            check(unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) })?;
            write_file(c"/proc/self/setgroups", b"deny")?;
            write_file(c"/proc/self/uid_map", self.uid_map.as_bytes())?;
            write_file(c"/proc/self/gid_map", self.gid_map.as_bytes())?;
        }
        // Nothing done here may reach the host's mount namespace.
        mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
        mount(
            Some(c"/dev"),
            &self.staging,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
        mount(
            Some(c"tmpfs"),
            c"/dev",
            Some(c"tmpfs"),
            libc::MS_NOSUID,
            Some(c"mode=755"),
        )?;
        for e in &self.entries {
            match e {
                Entry::Dir { staged, target } => {
                    // SAFETY: a valid C string path.
                    check(unsafe { libc::mkdir(target.as_ptr(), 0o755) })?;
                    mount(
                        Some(staged),
                        target,
                        None,
                        libc::MS_BIND | libc::MS_REC,
                        None,
                    )?;
                }
                Entry::File { staged, target } => {
                    make_empty_file(target)?;
                    mount(
                        Some(staged),
                        target,
                        None,
                        libc::MS_BIND | libc::MS_REC,
                        None,
                    )?;
                }
                Entry::Symlink { link, target } => {
                    // SAFETY: valid C strings.
                    check(unsafe { libc::symlink(link.as_ptr(), target.as_ptr()) })?;
                }
            }
        }
        make_empty_file(&self.udmabuf)?;
        // SAFETY: a valid C string path.
        check(unsafe { libc::umount2(self.staging.as_ptr(), libc::MNT_DETACH) })
    }
}

fn make_empty_file(path: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: a valid C string path; the fd is closed at once.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o600,
        )
    };
    check(fd)?;
    // SAFETY: closing the fd just opened.
    unsafe { libc::close(fd) };
    Ok(())
}
