//! Where an exporter listens, and how: the socket file's permissions say who
//! may connect exactly as the peer check does ([`SocketOptions::policy`]),
//! and every step that makes, checks or removes a file goes through
//! directory fds opened without following symlinks, on a path no other user
//! can change.
//!
//! The path is walked from `/` one component at a time with
//! `openat(O_PATH | O_DIRECTORY | O_NOFOLLOW)`, and each directory must
//! belong to root or to this user and be writable by nobody else, as sshd's
//! `StrictModes` asks of a user's files. The one exception is a sticky,
//! world-writable directory such as `/tmp`, and only when the caller allows
//! it ([`SocketOptions::allow_sticky_dir`]): there the entry the path goes
//! through must be this user's (or root's), so nobody else can rename or
//! remove it. The socket is bound through `/proc/self/fd/<dir>/<name>`, its
//! owner, group and mode are set before it listens (nobody can connect
//! before), and its device and inode are kept: [`SocketFile`] removes the
//! name only while it still is that socket, in that directory, wherever the
//! directory has been moved since.

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, openat};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, connect, listen, socket,
};
use nix::sys::stat::{FchmodatFlags, FileStat, Mode, SFlag, fchmodat, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, unlinkat};

use super::peer::AccessPolicy;
use crate::{Error, Result};

/// The directory for sockets: `$XDG_RUNTIME_DIR/dmabuf-p2p` when that is
/// set to an absolute path of a directory this user owns (the XDG rule for
/// it), else `/run/dmabuf-p2p`.
pub fn default_socket_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d)
            if Path::new(&d).is_absolute()
                && std::fs::metadata(&d)
                    .is_ok_and(|m| m.is_dir() && m.uid() == Uid::effective().as_raw()) =>
        {
            Path::new(&d).join("dmabuf-p2p")
        }
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

/// Who besides this user and root may connect to a socket made by
/// [`bind_listener_with`], and where it may be. The file's permissions
/// grant exactly what [`policy`](Self::policy) admits:
///
/// * nobody else: the socket is mode 0600, this user's;
/// * `allow_uid`: the socket belongs to that uid (mode 0600): it may
///   connect, others may not. Only root can give a file away (`CAP_CHOWN`),
///   so another user's exporter is refused this; it can allow a group;
/// * `allow_gid`: the socket's group is that gid, mode 0660: its members
///   may connect (the peer check counts supplementary groups too,
///   `SO_PEERGROUPS`, as the kernel's permission check does).
///
/// One uid and one gid at most: a file has one owner and one group. Every
/// directory on the path must let the allowed uid or gid through (search
/// permission), or the bind is refused, naming the directory; directories
/// the bind creates are made so (0711 for a uid, 0710 of the group for a
/// gid, 0700 otherwise).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SocketOptions {
    /// One further uid that may connect.
    pub allow_uid: Option<u32>,
    /// One further group whose members may connect.
    pub allow_gid: Option<u32>,
    /// Accept a path through a sticky directory that others may write
    /// (`/tmp`, `/var/tmp`, `/dev/shm`), as long as the entry in it is this
    /// user's or root's. Off by default: anyone can take a name there first
    /// (the exporter then refuses to start), tmp cleaners remove files there,
    /// and a service with its own `/tmp` (systemd's `PrivateTmp=`) does not
    /// see the socket at all.
    pub allow_sticky_dir: bool,
}

impl SocketOptions {
    /// Only this user and root.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also lets `uid` connect (see above).
    pub fn allow_uid(mut self, uid: u32) -> Self {
        self.allow_uid = Some(uid);
        self
    }

    /// Also lets members of `gid` connect (see above).
    pub fn allow_gid(mut self, gid: u32) -> Self {
        self.allow_gid = Some(gid);
        self
    }

    /// Sets [`allow_sticky_dir`](Self::allow_sticky_dir).
    pub fn allow_sticky_dir(mut self, allow: bool) -> Self {
        self.allow_sticky_dir = allow;
        self
    }

    /// The peer check that says what the file's permissions say: this
    /// user, root, `allow_uid`, members of `allow_gid`. Give it to the
    /// server ([`ServerOptions::policy`](super::ServerOptions::policy)).
    ///
    /// ```
    /// use dmabuf_p2p::share::SocketOptions;
    /// let p = SocketOptions::new().allow_gid(5).policy();
    /// assert_eq!((p.allow_uids, p.allow_gids), (vec![], vec![5]));
    /// ```
    pub fn policy(&self) -> AccessPolicy {
        AccessPolicy {
            allow_uids: self.allow_uid.into_iter().collect(),
            allow_gids: self.allow_gid.into_iter().collect(),
        }
    }

    /// The socket's mode.
    fn socket_mode(&self) -> u32 {
        if self.allow_gid.is_some() {
            0o660
        } else {
            0o600
        }
    }

    /// The mode of a directory the bind creates.
    fn dir_mode(&self) -> u32 {
        if self.allow_uid.is_some() {
            0o711
        } else if self.allow_gid.is_some() {
            0o710
        } else {
            0o700
        }
    }
}

/// A listening socket for [`ShareServer::listen`](super::ShareServer::listen),
/// with the name messages give it and, when [`bind_listener`] made it, its
/// file (removed when this is dropped, if it is still that socket).
pub struct Listener {
    listener: UnixListener,
    name: String,
    file: Option<SocketFile>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("name", &self.name)
            .field("file", &self.file)
            .finish()
    }
}

impl Listener {
    /// The listening socket.
    pub fn unix(&self) -> &UnixListener {
        &self.listener
    }

    /// How messages name it: `socket <path>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its file, when [`bind_listener`] made it.
    pub fn file(&self) -> Option<&SocketFile> {
        self.file.as_ref()
    }

    /// Its path, when [`bind_listener`] made it.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(SocketFile::path)
    }
}

impl From<UnixListener> for Listener {
    /// A listener bound by the caller: named by its address; its file (if
    /// any) stays the caller's.
    fn from(listener: UnixListener) -> Self {
        let name = match listener.local_addr() {
            Ok(a) => match a.as_pathname() {
                Some(p) => format!("socket {}", p.display()),
                None => format!("unix socket fd {}", listener.as_raw_fd()),
            },
            Err(_) => format!("unix socket fd {}", listener.as_raw_fd()),
        };
        Self {
            listener,
            name,
            file: None,
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

/// A socket's name in the file system, as [`bind_listener`] made it: its
/// directory (an `O_PATH` fd), its name there, and the device and inode it
/// had. [`remove`](Self::remove) (or dropping it) unlinks that name only if
/// it still is that socket: never another file that took its place, and
/// never the same name in another directory that took its directory's path.
pub struct SocketFile {
    dir: OwnedFd,
    name: OsString,
    path: PathBuf,
    dev: u64,
    ino: u64,
    uid: u32,
    gid: u32,
    mode: u32,
    removed: bool,
}

impl fmt::Debug for SocketFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketFile")
            .field("path", &self.path)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

impl SocketFile {
    /// The path it was made at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its permission bits (0600 or 0660).
    pub fn mode(&self) -> u32 {
        self.mode
    }

    /// Its owner and group.
    pub fn owner(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// Removes the name if it still is this socket: `Ok(true)` if removed,
    /// `Ok(false)` if it was gone or is another file now (left alone).
    pub fn remove(&mut self) -> Result<bool> {
        if self.removed {
            return Ok(false);
        }
        self.removed = true;
        match fstatat(
            &self.dir,
            self.name.as_os_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Err(Errno::ENOENT) => return Ok(false),
            Err(e) => return Err(sys("stat", &self.path, e)),
            Ok(st) if !same_file(&st, self.dev, self.ino) => return Ok(false),
            Ok(_) => {}
        }
        unlinkat(&self.dir, self.name.as_os_str(), UnlinkatFlags::NoRemoveDir)
            .map_err(|e| sys("unlink", &self.path, e))?;
        Ok(true)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

fn same_file(st: &FileStat, dev: u64, ino: u64) -> bool {
    st.st_dev == dev && st.st_ino == ino && is_kind(st, SFlag::S_IFSOCK)
}

fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == kind
}

fn sys(op: &'static str, path: &Path, e: Errno) -> Error {
    Error::sys(op, format!("socket {}", path.display()), e.into())
}

/// A failed call on `dir`, a directory on the way to the socket at `path`.
fn sys_dir(op: &'static str, dir: &Path, path: &Path, e: Errno) -> Error {
    Error::sys(
        op,
        format!(
            "{} (a directory of socket {})",
            dir.display(),
            path.display()
        ),
        e.into(),
    )
}

fn refused(path: &Path, problem: String) -> Error {
    Error::Unsupported {
        target: format!("socket {}", path.display()),
        operation: "serve a shared buffer",
        problem,
        source: None,
    }
}

/// Someone the socket's permissions let in besides this user and root,
/// who must be able to search every directory on the path.
#[derive(Debug)]
enum Guest {
    Uid { uid: u32, groups: Vec<u32> },
    Gid(u32),
}

impl Guest {
    fn can_search(&self, st: &FileStat) -> bool {
        let mode = st.st_mode;
        match self {
            Self::Uid { uid, groups } => {
                if st.st_uid == *uid {
                    mode & 0o100 != 0
                } else if groups.contains(&st.st_gid) {
                    mode & 0o010 != 0
                } else {
                    mode & 0o001 != 0
                }
            }
            Self::Gid(g) => (st.st_gid == *g && mode & 0o010 != 0) || mode & 0o001 != 0,
        }
    }
}

impl fmt::Display for Guest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uid { uid, .. } => write!(f, "uid {uid}"),
            Self::Gid(g) => write!(f, "gid {g}"),
        }
    }
}

/// The groups of `uid` (its primary group and the ones the group database
/// lists it in); empty when the user is unknown.
fn groups_of(uid: u32) -> Vec<u32> {
    let Ok(Some(user)) = nix::unistd::User::from_uid(Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = CString::new(user.name.as_bytes()) else {
        return vec![user.gid.as_raw()];
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .map(|g| g.into_iter().map(Gid::as_raw).collect())
        .unwrap_or_else(|_| vec![user.gid.as_raw()])
}

/// The walk from `/` to the socket's directory.
struct Walk<'a> {
    path: &'a Path,
    options: &'a SocketOptions,
    me: u32,
    guests: Vec<Guest>,
}

/// The directory the socket goes in, and what the walk learned of it.
struct Parent {
    fd: OwnedFd,
    /// It is a sticky directory others may write (allowed by the options).
    shared: bool,
}

impl Walk<'_> {
    /// Checks a directory the walk reached (`shown` is its path): this user's
    /// or root's, writable by nobody else unless sticky and allowed, and
    /// searchable by every guest. `Ok(true)` if it is a shared sticky one.
    fn check_dir(&self, st: &FileStat, shown: &Path) -> Result<bool> {
        if !is_kind(st, SFlag::S_IFDIR) {
            return Err(refused(
                self.path,
                format!("{} is not a directory", shown.display()),
            ));
        }
        if st.st_uid != 0 && st.st_uid != self.me {
            return Err(refused(
                self.path,
                format!(
                    "{} belongs to uid {}: another user could replace what is in it",
                    shown.display(),
                    st.st_uid
                ),
            ));
        }
        let mode = st.st_mode & 0o7777;
        let mut shared = false;
        if mode & 0o022 != 0 {
            if mode & 0o1000 == 0 {
                return Err(refused(
                    self.path,
                    format!(
                        "other users may write to {} (mode {mode:04o}): they could replace what is in it",
                        shown.display()
                    ),
                ));
            }
            if !self.options.allow_sticky_dir {
                return Err(refused(
                    self.path,
                    format!(
                        "{} is a shared sticky directory (mode {mode:04o}, like /tmp): other users can take names there first, tmp cleaners remove files, and services with a private /tmp do not see it; use the default directory ($XDG_RUNTIME_DIR/dmabuf-p2p or /run/dmabuf-p2p), or allow sticky directories explicitly",
                        shown.display()
                    ),
                ));
            }
            shared = true;
        }
        for g in &self.guests {
            if !g.can_search(st) {
                return Err(refused(
                    self.path,
                    format!(
                        "{g} may connect but cannot reach the socket: it may not search {} (mode {mode:04o}, owner {}, group {})",
                        shown.display(),
                        st.st_uid,
                        st.st_gid
                    ),
                ));
            }
        }
        Ok(shared)
    }

    /// An entry of a shared sticky directory must be this user's or root's:
    /// then nobody else can rename or remove it.
    fn check_entry_of_shared(&self, st: &FileStat, shown: &Path) -> Result<()> {
        if st.st_uid != self.me && st.st_uid != 0 {
            return Err(refused(
                self.path,
                format!(
                    "{} is in a shared sticky directory and belongs to uid {}",
                    shown.display(),
                    st.st_uid
                ),
            ));
        }
        Ok(())
    }

    /// Opens `name` in `dir` as a directory, without following a symlink;
    /// creates it if it is missing.
    fn open_or_create(&self, dir: &OwnedFd, name: &OsStr, shown: &Path) -> Result<OwnedFd> {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut created = false;
        loop {
            match openat(dir, name, flags, Mode::empty()) {
                Ok(fd) => {
                    if created {
                        self.set_up_created(dir, name, &fd, shown)?;
                    }
                    return Ok(fd);
                }
                Err(Errno::ENOENT) if !created => {
                    match mkdirat(dir, name, Mode::from_bits_truncate(0o700)) {
                        Ok(()) => created = true,
                        // Made meanwhile (by this user: nobody else may
                        // write here): open it as it is.
                        Err(Errno::EEXIST) => {}
                        Err(e) => return Err(sys_dir("mkdir", shown, self.path, e)),
                    }
                }
                Err(Errno::ENOTDIR | Errno::ELOOP) => {
                    let what = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                        Ok(st) if is_kind(&st, SFlag::S_IFLNK) => {
                            "is a symbolic link (give the path it leads to)"
                        }
                        _ => "is not a directory",
                    };
                    return Err(refused(self.path, format!("{} {what}", shown.display())));
                }
                Err(e) => return Err(sys_dir("open", shown, self.path, e)),
            }
        }
    }

    /// A directory the walk created: give it its group and mode exactly
    /// (whatever the umask), then make sure it is the one made.
    fn set_up_created(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        fd: &OwnedFd,
        shown: &Path,
    ) -> Result<()> {
        if let Some(g) = self
            .options
            .allow_gid
            .filter(|_| self.options.allow_uid.is_none())
        {
            fchownat(
                parent,
                name,
                None,
                Some(Gid::from_raw(g)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| sys_dir("chgrp", shown, self.path, e))?;
        }
        let mode = Mode::from_bits_truncate(self.options.dir_mode());
        fchmodat(parent, name, mode, FchmodatFlags::NoFollowSymlink)
            .or_else(|e| match e {
                // Linux before 6.6 has no fchmodat2; `parent` is a directory
                // nobody else may write, so the name is still ours.
                Errno::EOPNOTSUPP | Errno::ENOSYS => {
                    fchmodat(parent, name, mode, FchmodatFlags::FollowSymlink)
                }
                other => Err(other),
            })
            .map_err(|e| sys_dir("chmod", shown, self.path, e))?;
        let st = fstat(fd).map_err(|e| sys_dir("stat", shown, self.path, e))?;
        if st.st_uid != self.me {
            return Err(refused(
                self.path,
                format!(
                    "{} was made by uid {}, not this user",
                    shown.display(),
                    st.st_uid
                ),
            ));
        }
        Ok(())
    }

    /// Walks to the socket's directory: returns it and the socket's name.
    fn parent(&self) -> Result<(Parent, OsString)> {
        let abs = if self.path.is_absolute() {
            self.path.to_path_buf()
        } else {
            std::env::current_dir()
                .map_err(|e| Error::sys("getcwd", format!("socket {}", self.path.display()), e))?
                .join(self.path)
        };
        let mut names = Vec::new();
        for c in abs.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(n) => names.push(n.to_os_string()),
                Component::ParentDir => {
                    return Err(refused(self.path, "the path holds \"..\"".into()));
                }
                Component::Prefix(_) => {
                    return Err(refused(self.path, "not a Unix path".into()));
                }
            }
        }
        let Some(name) = names.pop() else {
            return Err(refused(self.path, "the path names no file".into()));
        };
        let mut shown = PathBuf::from("/");
        let mut fd = nix::fcntl::open(
            "/",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| sys_dir("open", &shown, self.path, e))?;
        let st = fstat(&fd).map_err(|e| sys_dir("stat", &shown, self.path, e))?;
        let mut shared = self.check_dir(&st, &shown)?;
        for n in &names {
            shown.push(n);
            let next = self.open_or_create(&fd, n, &shown)?;
            let st = fstat(&next).map_err(|e| sys_dir("stat", &shown, self.path, e))?;
            if shared {
                self.check_entry_of_shared(&st, &shown)?;
            }
            shared = self.check_dir(&st, &shown)?;
            fd = next;
        }
        Ok((Parent { fd, shared }, name))
    }
}

/// `/proc/self/fd/<dir>/<name>`: the name in the directory `dir`, for the
/// calls that take no directory fd (`bind`, `connect`). The kernel follows
/// the magic link to the directory itself, whatever its path is now.
fn via_dir(dir: &OwnedFd, name: &OsStr, path: &Path) -> Result<UnixAddr> {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(name);
    UnixAddr::new(&p).map_err(|e| {
        refused(
            path,
            format!("the socket's name is too long ({e}): keep it under 90 bytes"),
        )
    })
}

/// [`bind_listener_with`] with the default [`SocketOptions`]: only this user
/// and root may connect, and no sticky directory is accepted on the path.
pub fn bind_listener(path: &Path) -> Result<Listener> {
    bind_listener_with(path, &SocketOptions::default())
}

/// Binds a listening socket at `path` that exactly the users
/// [`SocketOptions::policy`] admits can connect to, on a path no other user
/// can change:
///
/// * each directory from `/` down is opened without following symlinks
///   (a symlink on the path is refused) and must be this user's or root's
///   and writable by nobody else; a sticky directory others may write
///   (`/tmp`) only with [`SocketOptions::allow_sticky_dir`], and then the
///   entry in it must be this user's or root's; missing directories are
///   created (mode 0700, or as [`SocketOptions`] says);
/// * every allowed uid or gid must be able to search each directory;
/// * an existing socket is replaced only if nobody listens on it (a stale
///   one) and it is this user's (or the allowed uid's, whom a previous run
///   gave it); anything else there is refused;
/// * the socket is bound, given its owner, group and mode, and only then
///   listens: nobody can connect with the umask's mode.
///
/// Errors name `path`. The returned [`Listener`] removes the socket when it
/// is dropped, if the name still is that socket.
pub fn bind_listener_with(path: &Path, options: &SocketOptions) -> Result<Listener> {
    let me = Uid::effective().as_raw();
    if options.allow_uid.is_some_and(|u| u != me) && me != 0 {
        return Err(refused(
            path,
            format!(
                "allowing uid {} means giving it the socket file, which only root may do (CAP_CHOWN); allow a group you share instead",
                options.allow_uid.unwrap_or_default()
            ),
        ));
    }
    let mut guests = Vec::new();
    if let Some(uid) = options.allow_uid.filter(|u| *u != me && *u != 0) {
        guests.push(Guest::Uid {
            uid,
            groups: groups_of(uid),
        });
    }
    if let Some(g) = options.allow_gid {
        guests.push(Guest::Gid(g));
    }
    let walk = Walk {
        path,
        options,
        me,
        guests,
    };
    let (parent, name) = walk.parent()?;
    let dir = parent.fd;
    let addr = via_dir(&dir, &name, path)?;
    match fstatat(&dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(sys("stat", path, e)),
        Ok(st) => {
            if !is_kind(&st, SFlag::S_IFSOCK) {
                return Err(refused(path, "exists and is not a socket".into()));
            }
            let ours = st.st_uid == me || (!parent.shared && Some(st.st_uid) == options.allow_uid);
            if !ours {
                return Err(refused(
                    path,
                    format!("a socket of uid {} is there already", st.st_uid),
                ));
            }
            let probe = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )
            .map_err(|e| sys("socket", path, e))?;
            match connect(probe.as_raw_fd(), &addr) {
                Ok(()) | Err(Errno::EAGAIN) => {
                    return Err(refused(path, "another process is serving there".into()));
                }
                Err(Errno::ECONNREFUSED) => {}
                Err(e) => return Err(sys("connect (to check for a server)", path, e)),
            }
            unlinkat(&dir, name.as_os_str(), UnlinkatFlags::NoRemoveDir)
                .map_err(|e| sys("unlink the stale socket", path, e))?;
        }
    }
    let sock = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| sys("socket", path, e))?;
    bind(sock.as_raw_fd(), &addr).map_err(|e| match e {
        Errno::ENOENT if !Path::new("/proc/self/fd").is_dir() => refused(
            path,
            "binding relative to the directory needs /proc (is it mounted?)".into(),
        ),
        e => sys("bind", path, e),
    })?;
    let mut file = SocketFile {
        dir,
        name,
        path: path.to_path_buf(),
        dev: 0,
        ino: 0,
        uid: me,
        gid: 0,
        mode: options.socket_mode(),
        removed: false,
    };
    // Until the device and inode are known, nothing is removed: a failure
    // below unlinks the fresh name itself (nobody else may write here).
    let set_up = set_up_socket(&mut file, options, path);
    if let Err(e) = set_up {
        let _ = unlinkat(&file.dir, file.name.as_os_str(), UnlinkatFlags::NoRemoveDir);
        file.removed = true;
        return Err(e);
    }
    listen(&sock, Backlog::MAXCONN).map_err(|e| sys("listen", path, e))?;
    Ok(Listener {
        listener: UnixListener::from(sock),
        name: format!("socket {}", path.display()),
        file: Some(file),
    })
}

/// Gives the fresh socket file its owner, group and mode, and records what
/// it is.
fn set_up_socket(file: &mut SocketFile, options: &SocketOptions, path: &Path) -> Result<()> {
    let name = file.name.as_os_str();
    if options.allow_uid.is_some() || options.allow_gid.is_some() {
        fchownat(
            &file.dir,
            name,
            options.allow_uid.map(Uid::from_raw),
            options.allow_gid.map(Gid::from_raw),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| sys("chown", path, e))?;
    }
    let mode = Mode::from_bits_truncate(options.socket_mode());
    fchmodat(&file.dir, name, mode, FchmodatFlags::NoFollowSymlink)
        .or_else(|e| match e {
            Errno::EOPNOTSUPP | Errno::ENOSYS => {
                fchmodat(&file.dir, name, mode, FchmodatFlags::FollowSymlink)
            }
            other => Err(other),
        })
        .map_err(|e| sys("chmod", path, e))?;
    let st =
        fstatat(&file.dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| sys("stat", path, e))?;
    if !is_kind(&st, SFlag::S_IFSOCK) || st.st_mode & 0o7777 != options.socket_mode() {
        return Err(refused(
            path,
            format!("the new socket is mode {:o}, not what was set", st.st_mode),
        ));
    }
    file.dev = st.st_dev;
    file.ino = st.st_ino;
    file.uid = st.st_uid;
    file.gid = st.st_gid;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let base = std::env::var_os("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        let d = base.join(format!("socket-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p)
            .map(|m| m.mode() & 0o7777)
            .unwrap_or(0)
    }

    #[test]
    fn the_socket_is_0600_in_a_0700_directory() {
        let d = scratch("mode");
        let path = d.join("sub").join("x.sock");
        let l = bind_listener(&path);
        assert!(l.is_ok(), "{l:?}");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&d.join("sub")), 0o700);
        // Served: a second bind is refused; once closed (and its file
        // removed with it), the path is free again.
        assert!(bind_listener(&path).is_err());
        drop(l);
        assert!(!path.exists(), "the listener removed its socket");
        assert!(bind_listener(&path).is_ok());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_stale_socket_of_ours_is_replaced() {
        let d = scratch("stale");
        assert!(fs::create_dir_all(&d).is_ok());
        let path = d.join("x.sock");
        // A socket nobody listens on (bound by std, then closed).
        drop(UnixListener::bind(&path));
        assert!(path.exists());
        let l = bind_listener(&path);
        assert!(l.is_ok(), "{l:?}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn writable_directories_symlinks_and_non_sockets_are_refused() {
        let d = scratch("open");
        assert!(fs::create_dir_all(&d).is_ok());
        assert!(fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).is_ok());
        let e = bind_listener(&d.join("x.sock"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("other users may write"), "{e}");
        assert!(e.contains("x.sock"), "the error names the socket: {e}");
        assert!(fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).is_ok());
        let e = bind_listener(&d.join("x.sock"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("shared sticky directory"), "{e}");
        let opts = SocketOptions::new().allow_sticky_dir(true);
        assert!(bind_listener_with(&d.join("x.sock"), &opts).is_ok());
        assert!(fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).is_ok());
        assert!(fs::write(d.join("f"), b"").is_ok());
        let e = bind_listener(&d.join("f"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert!(std::os::unix::fs::symlink(&d, d.join("link")).is_ok());
        let e = bind_listener(&d.join("link").join("x.sock"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let e = bind_listener(&d.join("..").join("x.sock"))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains(".."), "{e}");
        let _ = fs::remove_dir_all(&d);
    }

    /// The exit-time removal goes through the directory fd and checks the
    /// inode: a directory moved away and replaced by another of the same
    /// path keeps its socket-of-the-same-name, and a socket put in our
    /// socket's place is left alone.
    #[test]
    fn removal_hits_only_our_own_socket() {
        let d = scratch("swap");
        let path = d.join("a").join("x.sock");
        let l = bind_listener(&path);
        assert!(l.is_ok(), "{l:?}");
        // Move our directory away, and put another one with a socket of the
        // same name where it was.
        assert!(fs::rename(d.join("a"), d.join("moved")).is_ok());
        assert!(fs::create_dir(d.join("a")).is_ok());
        let theirs = UnixListener::bind(&path);
        assert!(theirs.is_ok());
        drop(l);
        assert!(path.exists(), "the other directory's socket was removed");
        assert!(!d.join("moved").join("x.sock").exists(), "ours was kept");
        // A socket that took our socket's name: left alone.
        let p2 = d.join("b").join("y.sock");
        let l2 = bind_listener(&p2);
        assert!(l2.is_ok(), "{l2:?}");
        assert!(fs::remove_file(&p2).is_ok());
        let other = UnixListener::bind(&p2);
        assert!(other.is_ok());
        let mut parts = l2.ok().and_then(|l| l.file);
        assert_eq!(
            parts.as_mut().map(SocketFile::remove).and_then(Result::ok),
            Some(false)
        );
        assert!(p2.exists());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn default_paths() {
        let p = default_socket_path("0000:02:00.0 BAR2/../x");
        assert!(p.ends_with("0000:02:00.0_BAR2_.._x.sock"), "{p:?}");
    }
}
