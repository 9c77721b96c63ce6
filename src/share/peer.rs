//! Who is at the other end of a sharing socket, and whether they may take
//! part: `SO_PEERCRED` and the [`AccessPolicy`] both sides apply before
//! anything is sent or believed; `SO_PASSRIGHTS`; bounding and sanitising
//! the strings a peer sends.

use std::fmt;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::Uid;

use super::ShareProblem;
use crate::{Error, Result};

/// The credentials of the process at the other end of a Unix socket, as the
/// kernel recorded them when it connected (or, for the connecting side, when
/// the server called `listen`): `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PeerCred {
    /// The peer's process id (0 if the kernel does not know it, e.g. across
    /// pid namespaces).
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
}

impl fmt::Display for PeerCred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} uid {} gid {}", self.pid, self.uid, self.gid)
    }
}

impl PeerCred {
    /// The credentials of the other end of `stream`.
    pub fn of(stream: &UnixStream) -> Result<Self> {
        let c = getsockopt(&stream.as_fd(), sockopt::PeerCredentials).map_err(|e| {
            Error::sys(
                "getsockopt(SO_PEERCRED)",
                super::wire::describe_stream(stream),
                e.into(),
            )
        })?;
        Ok(Self {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        })
    }
}

/// Who may take part in sharing a buffer: a process of the same effective
/// uid as this one, root, and whoever is listed. The exporter applies it to
/// each client before it sends anything; the importer applies it to the
/// exporter before it believes anything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessPolicy {
    /// Further uids allowed.
    pub allow_uids: Vec<u32>,
    /// Further gids allowed (the peer's effective gid).
    pub allow_gids: Vec<u32>,
}

impl AccessPolicy {
    /// Same uid or root only.
    pub fn same_user() -> Self {
        Self::default()
    }

    /// Whether `peer` may take part, judging a group by its effective gid
    /// alone; `Err` says why not. [`admit`](Self::admit) counts the peer's
    /// supplementary groups too.
    ///
    /// ```
    /// use dmabuf_p2p::share::{AccessPolicy, PeerCred};
    /// let me = nix::unistd::geteuid().as_raw();
    /// let same = PeerCred { pid: 1, uid: me, gid: 5 };
    /// assert!(AccessPolicy::same_user().check(&same).is_ok());
    /// let other = PeerCred { pid: 1, uid: me.wrapping_add(1), gid: 5 };
    /// let allowed = AccessPolicy { allow_uids: vec![], allow_gids: vec![5] };
    /// assert!(allowed.check(&other).is_ok());
    /// ```
    pub fn check(&self, peer: &PeerCred) -> std::result::Result<(), ShareProblem> {
        self.check_with_groups(peer, &[])
    }

    /// Whether `peer`, whose supplementary groups are `groups`, may take
    /// part: its uid is this process's, root or allowed, or its effective
    /// gid or one of `groups` is allowed (as the kernel grants a socket's
    /// group permission).
    pub fn check_with_groups(
        &self,
        peer: &PeerCred,
        groups: &[u32],
    ) -> std::result::Result<(), ShareProblem> {
        let me = Uid::effective().as_raw();
        let ok = peer.uid == me
            || peer.uid == 0
            || self.allow_uids.contains(&peer.uid)
            || self.allow_gids.contains(&peer.gid)
            || groups.iter().any(|g| self.allow_gids.contains(g));
        if ok {
            return Ok(());
        }
        Err(ShareProblem::PeerRefused {
            pid: peer.pid,
            uid: peer.uid,
            gid: peer.gid,
            why: format!(
                "uid {} is neither this process's uid {me}, nor root, nor allowed (allowed uids {:?}, gids {:?})",
                peer.uid, self.allow_uids, self.allow_gids
            ),
        })
    }

    /// Reads `stream`'s peer credentials (and, when a group could admit
    /// it, its supplementary groups, `SO_PEERGROUPS`) and checks them: the
    /// credentials, or [`Error::Share`] with [`ShareProblem::PeerRefused`].
    pub fn admit(&self, stream: &UnixStream) -> Result<PeerCred> {
        self.admit_as(stream, &super::wire::describe_stream(stream))
    }

    /// [`admit`](Self::admit), naming the other end `peer` in errors.
    pub(crate) fn admit_as(&self, stream: &UnixStream, peer: &str) -> Result<PeerCred> {
        let cred = PeerCred::of(stream)?;
        let refused = |problem| Error::Share {
            peer: peer.to_owned(),
            problem,
        };
        match self.check(&cred) {
            Ok(()) => Ok(cred),
            Err(problem) if self.allow_gids.is_empty() => Err(refused(problem)),
            Err(_) => {
                let groups = super::rights::peer_groups(stream)
                    .map_err(|e| Error::sys("getsockopt(SO_PEERGROUPS)", peer.to_owned(), e))?;
                self.check_with_groups(&cred, &groups).map_err(refused)?;
                Ok(cred)
            }
        }
    }
}

/// Turns off `SO_PASSRIGHTS` on `stream`: the peer can send no fds to it
/// from now on (its `sendmsg` fails with `EPERM`). `Ok(false)` if the kernel
/// has no such option (before 6.16).
pub fn refuse_fds(stream: &UnixStream) -> Result<bool> {
    match super::rights::set_pass_rights(stream, false) {
        Ok(()) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT | libc::EINVAL)) => Ok(false),
        Err(e) => Err(Error::sys(
            "setsockopt(SO_PASSRIGHTS, 0)",
            super::wire::describe_stream(stream),
            e,
        )),
    }
}

/// The longest string a peer may send in a name field.
pub const MAX_NAME_LEN: usize = 128;
/// The longest error text kept from a peer (longer ones are cut).
pub const MAX_TEXT_LEN: usize = 512;

/// Checks a name a peer sent: at most [`MAX_NAME_LEN`] bytes, printable
/// characters only (no control characters that could rewrite a terminal
/// or a log line).
pub fn check_name(field: &str, s: &str) -> std::result::Result<(), String> {
    if s.len() > MAX_NAME_LEN {
        return Err(format!(
            "{field} is {} bytes long, over the {MAX_NAME_LEN}-byte limit",
            s.len()
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!("{field} holds the control character {c:?}"));
    }
    Ok(())
}

/// A peer's free text made safe to print: control characters escaped, cut
/// to at most [`MAX_TEXT_LEN`] bytes (ending in `...` when cut). Safe text
/// comes back unchanged, so sanitising twice is sanitising once.
///
/// ```
/// use dmabuf_p2p::share::{sanitize_text, MAX_TEXT_LEN};
/// assert_eq!(sanitize_text("a\x1b[2Jb"), "a\\u{1b}[2Jb");
/// let long = sanitize_text(&"y".repeat(10_000));
/// assert!(long.len() <= MAX_TEXT_LEN && long.ends_with("..."));
/// assert_eq!(sanitize_text(&long), long);
/// ```
pub fn sanitize_text(s: &str) -> String {
    let escaped = |c: char| -> String {
        if c.is_control() {
            c.escape_unicode().to_string()
        } else {
            c.to_string()
        }
    };
    let whole: usize = s.chars().map(|c| escaped(c).len()).sum();
    let room = if whole <= MAX_TEXT_LEN {
        MAX_TEXT_LEN
    } else {
        MAX_TEXT_LEN - 3
    };
    let mut out = String::new();
    for c in s.chars() {
        let e = escaped(c);
        if out.len() + e.len() > room {
            break;
        }
        out.push_str(&e);
    }
    if whole > MAX_TEXT_LEN {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socketpair_peer_is_this_process() {
        let (a, _b) = UnixStream::pair().unwrap_or_else(|e| unreachable!("{e}"));
        let cred = AccessPolicy::same_user().admit(&a);
        assert_eq!(
            cred.ok().map(|c| (c.pid, c.uid)),
            Some((
                i32::try_from(std::process::id()).unwrap_or(0),
                Uid::effective().as_raw()
            ))
        );
    }

    #[test]
    fn other_users_are_refused_unless_allowed() {
        let me = Uid::effective().as_raw();
        let stranger = PeerCred {
            pid: 7,
            uid: me.wrapping_add(1000),
            gid: 4242,
        };
        if me != 0 || stranger.uid != 0 {
            assert!(matches!(
                AccessPolicy::same_user().check(&stranger),
                Err(ShareProblem::PeerRefused { pid: 7, .. })
            ));
        }
        let by_group = AccessPolicy {
            allow_uids: vec![],
            allow_gids: vec![77],
        };
        assert!(by_group.check(&stranger).is_err() || me == 0 && stranger.uid == 0);
        assert!(by_group.check_with_groups(&stranger, &[5, 77]).is_ok());
        let by_uid = AccessPolicy {
            allow_uids: vec![stranger.uid],
            allow_gids: vec![],
        };
        assert!(by_uid.check(&stranger).is_ok());
        let root = PeerCred {
            pid: 1,
            uid: 0,
            gid: 0,
        };
        assert!(AccessPolicy::same_user().check(&root).is_ok());
    }

    #[test]
    fn names_and_texts() {
        assert!(check_name("exporter", "0000:02:00.0 BAR2").is_ok());
        assert!(check_name("exporter", "a\nb").is_err());
        assert!(check_name("exporter", &"x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(sanitize_text(&"y".repeat(10_000)).len() <= MAX_TEXT_LEN);
        let exact = "z".repeat(MAX_TEXT_LEN);
        assert_eq!(sanitize_text(&exact), exact);
    }
}
