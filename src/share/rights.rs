//! File descriptors over the socket (`SCM_RIGHTS`): sending them with a
//! frame's first byte, receiving them so that every fd the kernel installs
//! in this process is owned (and so closed) whatever else goes wrong, and
//! refusing them once the offer is in (`SO_PASSRIGHTS`).
//!
//! The receive is nix's `recvmsg` and its [`ControlMessageOwned::ScmRights`].
//! One case nix does not decode: control data the kernel marked truncated
//! (`MSG_CTRUNC`, when a peer sends more fds than there is room for, or the
//! fd table fills up), where `RecvMsg::cmsgs` answers `ENOBUFS`. Linux has
//! installed the fds that fit all the same (`scm_detach_fds`), so they are
//! read from the one message the kernel wrote, to be closed.
//!
//! Also the two socket options libc and nix do not know here:
//! `SO_PASSRIGHTS` and `SO_PEERGROUPS`.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::errno::Errno;
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// How many fds one `recvmsg` has room for.
pub const FD_ROOM: usize = 8;

/// `SO_PASSRIGHTS` (Linux 6.16, commit 77cbe1a6d873): 83 in
/// include/uapi/asm-generic/socket.h, the header x86-64 and arm64 use.
/// libc 0.2.191 does not define it yet.
const SO_PASSRIGHTS: libc::c_int = 83;

/// `SO_PEERGROUPS` (Linux 4.13): 59 in include/uapi/asm-generic/socket.h.
/// libc 0.2.191 defines it only for some architectures, nix not at all.
const SO_PEERGROUPS: libc::c_int = 59;

/// One non-blocking `sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT)` of `data` with
/// `fds` attached (`SCM_RIGHTS`). Returns the bytes the socket took;
/// [`io::ErrorKind::WouldBlock`] when it is full. A closed peer is `EPIPE`,
/// not a `SIGPIPE`.
pub(crate) fn send_some(
    stream: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(data)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Err(Errno::EINTR) => {}
            other => return other.map_err(io::Error::from),
        }
    }
}

/// What one [`recv`] got.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes read into the buffer (0: end of stream).
    pub(crate) bytes: usize,
    /// Every fd that came with them, owned (also when the control data was
    /// truncated).
    pub(crate) fds: Vec<OwnedFd>,
    /// `MSG_CTRUNC`: the kernel had more fds than there was room for, or
    /// could not install one (the fd table is full).
    pub(crate) truncated: bool,
}

/// One non-blocking `recvmsg(MSG_CMSG_CLOEXEC | MSG_DONTWAIT)` on `sock`
/// into `buf`, with room for [`FD_ROOM`] fds. Every fd that arrived is
/// owned by the result, whatever the flags say, so none can leak. `EAGAIN`
/// comes back as [`io::ErrorKind::WouldBlock`].
pub(crate) fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut control = nix::cmsg_space!([RawFd; FD_ROOM]);
    let (bytes, truncated, decoded) = {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        let decoded: Option<Vec<RawFd>> = msg.cmsgs().ok().map(|cmsgs| {
            cmsgs
                .flat_map(|c| match c {
                    ControlMessageOwned::ScmRights(fds) => fds,
                    _ => Vec::new(),
                })
                .collect()
        });
        (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC), decoded)
    };
    let raw = decoded.unwrap_or_else(|| installed_before_truncation(&control));
    let fds = raw
        .into_iter()
        .map(|fd| {
            // SAFETY: `fd` is a number the kernel just installed in this
            // process for this recvmsg (SCM_RIGHTS); nothing else knows it,
            // so this is its only owner.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect();
    Ok(Received {
        bytes,
        fds,
        truncated,
    })
}

/// Where a `struct cmsghdr`'s data starts (`CMSG_LEN(0)`): the header,
/// rounded up to the alignment of `size_t`.
const CMSG_DATA_AT: usize = size_of::<libc::cmsghdr>().next_multiple_of(size_of::<usize>());

/// The fds the kernel installed before it truncated the control data. This
/// side asks for no other control message (no `SO_PASSCRED`, `SO_PASSSEC`
/// or `SO_PASSPIDFD`), so the kernel's one message, if any, is `SCM_RIGHTS`
/// at the start of `control`, its length counting the fds it installed
/// (`CMSG_LEN(n * sizeof(int))`). `control` was zeroed before the call: an
/// unwritten header reads as no message.
fn installed_before_truncation(control: &[u8]) -> Vec<RawFd> {
    let int = |at: usize| {
        control
            .get(at..at + size_of::<libc::c_int>())
            .and_then(|b| b.try_into().ok())
            .map(libc::c_int::from_ne_bytes)
    };
    let len = control
        .get(..size_of::<usize>())
        .and_then(|b| b.try_into().ok())
        .map_or(0, usize::from_ne_bytes);
    let level = int(offset_of!(libc::cmsghdr, cmsg_level));
    let kind = int(offset_of!(libc::cmsghdr, cmsg_type));
    if level != Some(libc::SOL_SOCKET) || kind != Some(libc::SCM_RIGHTS) {
        return Vec::new();
    }
    let end = len.min(control.len());
    control
        .get(CMSG_DATA_AT..end)
        .unwrap_or_default()
        .chunks_exact(size_of::<RawFd>())
        .filter_map(|b| b.try_into().ok().map(RawFd::from_ne_bytes))
        .collect()
}

/// `setsockopt(sock, SOL_SOCKET, SO_PASSRIGHTS, on)`: whether the peer may
/// send this socket fds. Off, the kernel refuses a peer's `SCM_RIGHTS` with
/// `EPERM` (net/unix/af_unix.c). Kernels before 6.16 answer `ENOPROTOOPT`.
pub(crate) fn set_pass_rights(sock: &impl AsFd, on: bool) -> io::Result<()> {
    let value = libc::c_int::from(on);
    // SAFETY: the option value is a c_int the kernel reads, of the length
    // given; `value` outlives the call.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            (&raw const value).cast::<libc::c_void>(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `getsockopt(sock, SOL_SOCKET, SO_PEERGROUPS)`: the supplementary groups
/// the peer had when it connected (the kernel's own permission checks count
/// them, so the peer check must too).
pub(crate) fn peer_groups(sock: &impl AsFd) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * size_of::<libc::gid_t>())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the kernel writes at most `len` bytes into `groups`, a
        // live buffer of that size, and sets `len` to what it wrote or, on
        // ERANGE, to what it needs.
        let ret = unsafe {
            libc::getsockopt(
                sock.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast::<libc::c_void>(),
                &raw mut len,
            )
        };
        let n = usize::try_from(len).unwrap_or(0) / size_of::<libc::gid_t>();
        if ret == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            return Err(e);
        }
        groups.resize(n, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    /// The layout `installed_before_truncation` reads, against libc's
    /// `struct cmsghdr` and the kernel's `CMSG_LEN`.
    #[test]
    fn cmsghdr_layout() {
        assert_eq!(offset_of!(libc::cmsghdr, cmsg_len), 0);
        assert_eq!(size_of::<libc::cmsghdr>(), 16);
        assert_eq!(offset_of!(libc::cmsghdr, cmsg_level), 8);
        assert_eq!(offset_of!(libc::cmsghdr, cmsg_type), 12);
        // SAFETY: CMSG_LEN is arithmetic on its argument.
        assert_eq!(unsafe { libc::CMSG_LEN(0) } as usize, CMSG_DATA_AT);
    }

    /// More fds than there is room for: nix refuses to decode, and the ones
    /// that fit are owned all the same (closed with the result; the host
    /// test `share_host` counts this process's fds around it).
    #[test]
    fn truncated_rights_are_owned() {
        let (tx, rx) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let files: Vec<File> = (0..FD_ROOM + 3)
            .filter_map(|_| File::open("/dev/null").ok())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
        assert_eq!(send_some(&tx, b"x", &fds).ok(), Some(1));
        drop(fds);
        drop(files);
        let mut buf = [0u8; 4];
        let got = recv(rx.as_fd(), &mut buf).unwrap_or_else(|e| panic!("{e}"));
        assert!(got.truncated);
        assert_eq!((got.bytes, got.fds.len()), (1, FD_ROOM));
    }

    /// A socket pair's peer is this process: its groups are this process's.
    #[test]
    fn peer_groups_are_this_processes() {
        let (a, _b) = UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let mut got = peer_groups(&a).unwrap_or_else(|e| panic!("{e}"));
        let mut want: Vec<u32> = nix::unistd::getgroups()
            .unwrap_or_default()
            .into_iter()
            .map(nix::unistd::Gid::as_raw)
            .collect();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
    }

    /// An unwritten control buffer holds no fds.
    #[test]
    fn no_message_no_fds() {
        assert!(installed_before_truncation(&[0u8; 64]).is_empty());
        assert!(installed_before_truncation(&[]).is_empty());
    }
}
