//! A peer that puts what it likes on the sharing protocol's wire: frames
//! built from the documented header by hand, sent with any fds attached.
//! The library's own sender checks what it sends; attacks need one that
//! does not. The library's host test (`tests/share_host.rs`) and the
//! `share_wire` fuzz target include this file too.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;

use dmabuf_p2p::share::{MAGIC, VERSION};
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

/// A frame of `kind` with `payload`: magic, version, kind, length (all
/// little-endian), then the payload, as `dmabuf_p2p::share` documents it.
pub fn frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut f = MAGIC.to_vec();
    f.extend_from_slice(&VERSION.to_le_bytes());
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&len.to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Sends all of `data` (blocking), `fds` attached to its first byte
/// (`SCM_RIGHTS`). A closed peer is `EPIPE`, not a `SIGPIPE`; a socket that
/// refuses fds (`SO_PASSRIGHTS` off) is the kernel's `EPERM`.
pub fn send_raw(stream: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    send_raw_with(stream, data, fds, MsgFlags::empty())
}

/// [`send_raw`] with `flags` besides `MSG_NOSIGNAL`: with `MSG_DONTWAIT`, a
/// full socket stops it (`EAGAIN`) after what fitted.
pub fn send_raw_with(
    stream: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: MsgFlags,
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let flags = flags | MsgFlags::MSG_NOSIGNAL;
    let mut sent = 0;
    while sent < data.len() {
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !raw.is_empty() {
            &rights
        } else {
            &[]
        };
        let rest = [IoSlice::new(&data[sent..])];
        sent += sendmsg::<()>(stream.as_raw_fd(), &rest, cmsgs, flags, None)?;
    }
    Ok(())
}
