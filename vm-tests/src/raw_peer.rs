//! A peer that puts what it likes on the sharing protocol's wire: frames
//! built from the documented header by hand, sent with any fds attached.
//! The library's own sender checks what it sends; attacks need one that
//! does not.

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
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let mut sent = 0;
    while sent < data.len() {
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 && !raw.is_empty() {
            &rights
        } else {
            &[]
        };
        let rest = [IoSlice::new(&data[sent..])];
        sent += sendmsg::<()>(
            stream.as_raw_fd(),
            &rest,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
    }
    Ok(())
}
