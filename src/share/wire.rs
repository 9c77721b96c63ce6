//! The framing of the sharing protocol: the 12-byte header, `sendmsg` with
//! `SCM_RIGHTS`, and `recvmsg` with the fd bookkeeping that makes sure no
//! received fd outlives a refused message.
//!
//! A frame is a [`HEADER_LEN`]-byte header, then `length` bytes of payload:
//!
//! | bytes | field | value |
//! |---|---|---|
//! | 0..4 | magic | [`MAGIC`], `b"DPSH"` |
//! | 4..6 | version | [`VERSION`], little-endian `u16` |
//! | 6..8 | kind | the message kind ([`Kind`](super::Kind)), little-endian `u16` |
//! | 8..12 | length | payload bytes, little-endian `u32`, at most [`MAX_PAYLOAD`] |
//!
//! File descriptors travel as `SCM_RIGHTS` control data on the `sendmsg` that
//! carries the frame's first byte. The receiver reads with `recvmsg`
//! (`MSG_CMSG_CLOEXEC`) for every byte, so fds attached anywhere in a frame
//! are collected with it ([`Frame::fds`]); control data the receiver has no
//! room for (more than [`FD_ROOM`] fds, `MSG_CTRUNC`) fails the frame, and
//! every fd that did arrive is closed.
//!
//! These functions are public for tests and tools that need to put arbitrary
//! bytes and fds on the wire; [`super::send_offer`], [`super::send_message`]
//! and [`super::recv`] are the normal way in.

use std::io;
use std::mem::{MaybeUninit, size_of};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::ShareProblem;
use crate::{Error, Result};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"DPSH";
/// The protocol version this crate speaks; a frame of another version is
/// refused ([`ShareProblem::Version`]).
pub const VERSION: u16 = 1;
/// The size of a frame header.
pub const HEADER_LEN: usize = 12;
/// The largest payload accepted ([`ShareProblem::Oversized`] beyond).
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// How many fds one `recvmsg` has room for. The protocol never sends more
/// than one; more than this many at once is [`ShareProblem::ControlTruncated`].
pub const FD_ROOM: usize = 8;

/// One frame as received: kind, payload and every fd that came with it
/// (owned: dropping the frame closes them).
#[derive(Debug)]
pub struct Frame {
    /// The kind field of the header (not checked against the known kinds yet).
    pub kind: u16,
    /// The payload.
    pub payload: Vec<u8>,
    /// The fds received with the frame's bytes.
    pub fds: Vec<OwnedFd>,
}

/// A header followed by `payload`. The length field is the payload's length
/// (saturated at `u32::MAX`); the [`MAX_PAYLOAD`] limit is not checked here, so
/// that tests can build oversized frames.
///
/// ```
/// use dmabuf_p2p::share::wire::{encode_frame, HEADER_LEN};
/// let f = encode_frame(3, b"{}");
/// assert_eq!(f.len(), HEADER_LEN + 2);
/// assert_eq!(&f[..4], b"DPSH");
/// ```
pub fn encode_frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Names the other end of `stream` for messages: `socket /run/x.sock` (the
/// peer's path, or ours on the accepting side), else `unix socket fd N`.
pub fn describe_stream(stream: &UnixStream) -> String {
    let path = |a: io::Result<std::os::unix::net::SocketAddr>| {
        a.ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
    };
    match path(stream.peer_addr()).or_else(|| path(stream.local_addr())) {
        Some(p) => format!("socket {p}"),
        None => format!("unix socket fd {}", stream.as_raw_fd()),
    }
}

fn share_error(peer: &str, problem: ShareProblem) -> Error {
    Error::Share {
        peer: peer.to_owned(),
        problem,
    }
}

/// `CMSG_ALIGN`: control messages are aligned to `size_t`.
const fn cmsg_align(n: usize) -> usize {
    (n + size_of::<usize>() - 1) & !(size_of::<usize>() - 1)
}
/// `CMSG_LEN(0)`: where a control message's data starts.
const CMSG_DATA_AT: usize = cmsg_align(size_of::<libc::cmsghdr>());
/// `CMSG_SPACE(n)`.
const fn cmsg_space(n: usize) -> usize {
    CMSG_DATA_AT + cmsg_align(n)
}
/// The receive control buffer, in `u64`s (for alignment).
const RECV_CONTROL_WORDS: usize = cmsg_space(FD_ROOM * size_of::<RawFd>()).div_ceil(8);

/// A zeroed `msghdr`.
fn empty_msghdr() -> libc::msghdr {
    let m = MaybeUninit::<libc::msghdr>::zeroed();
    // SAFETY: msghdr is plain data (integers and raw pointers); all zeroes is a
    // valid value of it (null pointers, zero lengths).
    unsafe { m.assume_init() }
}

/// Sends all of `data` on `stream` with `MSG_NOSIGNAL` (a closed peer is
/// `EPIPE`, not a `SIGPIPE`), attaching `fds` (`SCM_RIGHTS`) to the first
/// `sendmsg`. Never blocks in the kernel (`MSG_DONTWAIT`): while the socket
/// is full it waits with `poll` for at most `timeout` in all (`None`: no
/// limit), then fails with [`Error::Timeout`]. `fds` need at least one byte of
/// `data` to travel with.
///
/// ```
/// use std::os::unix::net::UnixStream;
/// use std::time::Duration;
/// use dmabuf_p2p::share::wire::{encode_frame, recv_frame, send_raw};
/// let (a, b) = UnixStream::pair()?;
/// send_raw(&a, &encode_frame(3, b"{}"), &[], Some(Duration::from_secs(1)))?;
/// let frame = recv_frame(&b)?.expect("a frame");
/// assert_eq!((frame.kind, frame.payload.as_slice(), frame.fds.len()), (3, &b"{}"[..], 0));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn send_raw(
    stream: &UnixStream,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> Result<()> {
    if data.is_empty() {
        if fds.is_empty() {
            return Ok(());
        }
        return Err(share_error(
            &describe_stream(stream),
            ShareProblem::Malformed {
                kind: "frame",
                problem: "fds need at least one byte of data to travel with".into(),
            },
        ));
    }
    // A timeout too large to add to the clock is no limit.
    let deadline = timeout.and_then(|t| Some((Instant::now().checked_add(t)?, t)));
    let fd_bytes = fds.len() * size_of::<RawFd>();
    // The control message: cmsghdr, then the fds, in a u64-aligned buffer.
    let mut control = vec![0u64; cmsg_space(fd_bytes).div_ceil(8)];
    if !fds.is_empty() {
        let base = control.as_mut_ptr().cast::<u8>();
        let mut hdr = zeroed_cmsghdr();
        hdr.cmsg_len = (CMSG_DATA_AT + fd_bytes) as _;
        hdr.cmsg_level = libc::SOL_SOCKET;
        hdr.cmsg_type = libc::SCM_RIGHTS;
        // SAFETY: `control` holds cmsg_space(fd_bytes) >= size_of::<cmsghdr>()
        // bytes; write_unaligned makes no alignment demand.
        unsafe { std::ptr::write_unaligned(base.cast::<libc::cmsghdr>(), hdr) };
        for (i, fd) in fds.iter().enumerate() {
            let at = base
                .wrapping_add(CMSG_DATA_AT + i * size_of::<RawFd>())
                .cast::<RawFd>();
            // SAFETY: CMSG_DATA_AT + (i + 1) * 4 <= cmsg_space(fd_bytes), inside
            // `control`; write_unaligned makes no alignment demand.
            unsafe { std::ptr::write_unaligned(at, fd.as_raw_fd()) };
        }
    }
    let mut sent = 0usize;
    let mut fds_pending = !fds.is_empty();
    while sent < data.len() {
        let rest = &data[sent..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr().cast_mut().cast(),
            iov_len: rest.len(),
        };
        let mut msg = empty_msghdr();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if fds_pending {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = cmsg_space(fd_bytes) as _;
        }
        // SAFETY: `msg` points at one iovec describing `rest` (valid for reads
        // of its length for the call) and, when set, at `control`, which holds
        // `msg_controllen` initialised bytes; sendmsg only reads them.
        let n = unsafe {
            libc::sendmsg(
                stream.as_raw_fd(),
                &msg,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    wait_writable(stream, deadline)?;
                    continue;
                }
                _ => return Err(Error::sys("sendmsg", describe_stream(stream), e)),
            }
        }
        sent += n.unsigned_abs();
        fds_pending = false;
    }
    Ok(())
}

/// A zeroed `cmsghdr` (its layout has private padding on some libcs, so it
/// cannot be built with a literal).
fn zeroed_cmsghdr() -> libc::cmsghdr {
    let h = MaybeUninit::<libc::cmsghdr>::zeroed();
    // SAFETY: cmsghdr is plain integers; all zeroes is a valid value.
    unsafe { h.assume_init() }
}

/// Waits until `stream` can take more data, or the deadline passes.
fn wait_writable(stream: &UnixStream, deadline: Option<(Instant, Duration)>) -> Result<()> {
    let ms = match deadline {
        None => -1,
        Some((at, total)) => {
            let left = at.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: format!("sending to {}", describe_stream(stream)),
                    after: total,
                });
            }
            i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)
        }
    };
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(Error::sys("poll", describe_stream(stream), e));
        }
    }
    // Ready, interrupted or timed out: the caller tries again and the next
    // round sees the deadline (or the error, e.g. EPIPE).
    Ok(())
}

/// The fds of the `SCM_RIGHTS` messages in `control` (the bytes the kernel
/// filled in).
fn rights_in(control: &[u8]) -> Vec<RawFd> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + size_of::<libc::cmsghdr>() <= control.len() {
        // SAFETY: `at + size_of::<cmsghdr>() <= control.len()`, so the read is
        // in bounds; read_unaligned makes no alignment demand; cmsghdr is plain
        // integers, valid for any bytes.
        let hdr = unsafe {
            std::ptr::read_unaligned(control.as_ptr().wrapping_add(at).cast::<libc::cmsghdr>())
        };
        // `cmsg_len` is a size_t on glibc, a socklen_t on musl.
        #[allow(clippy::useless_conversion)]
        let len = usize::try_from(hdr.cmsg_len).unwrap_or(usize::MAX);
        if len < CMSG_DATA_AT {
            break;
        }
        let end = at.saturating_add(len).min(control.len());
        if hdr.cmsg_level == libc::SOL_SOCKET
            && hdr.cmsg_type == libc::SCM_RIGHTS
            && at + CMSG_DATA_AT <= end
        {
            for chunk in control[at + CMSG_DATA_AT..end].chunks_exact(size_of::<RawFd>()) {
                let mut b = [0u8; size_of::<RawFd>()];
                b.copy_from_slice(chunk);
                out.push(RawFd::from_ne_bytes(b));
            }
        }
        at = at.saturating_add(cmsg_align(len));
    }
    out
}

/// One `recvmsg` into `buf`: returns the bytes read (0 at end of stream) and
/// adds the fds that came with them to `fds`, owned.
fn recv_some(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize> {
    let mut control = [0u64; RECV_CONTROL_WORDS];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg = empty_msghdr();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: `msg` points at one iovec describing `buf` (valid for writes
        // of its length) and at `control` (valid for writes of
        // `msg_controllen` bytes); both outlive the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => Err(Error::Timeout {
                    what: format!("a message from {}", describe_stream(stream)),
                    after: stream.read_timeout().ok().flatten().unwrap_or_default(),
                }),
                _ => Err(Error::sys("recvmsg", describe_stream(stream), e)),
            };
        }
        // Own every fd that arrived before anything else, so that every path
        // from here on closes them.
        #[allow(clippy::useless_conversion)]
        let filled = usize::try_from(msg.msg_controllen)
            .unwrap_or(0)
            .min(std::mem::size_of_val(&control));
        let bytes: Vec<u8> = control
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .take(filled)
            .collect();
        for raw in rights_in(&bytes) {
            // SAFETY: the kernel just installed `raw` in this process's fd
            // table for us (SCM_RIGHTS); nothing else owns it.
            fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            let closed = fds.len();
            fds.clear();
            return Err(share_error(
                &describe_stream(stream),
                ShareProblem::ControlTruncated {
                    closed,
                    room: FD_ROOM,
                },
            ));
        }
        return Ok(n.unsigned_abs());
    }
}

/// Fills `buf` unless the stream ends first; returns the bytes read.
fn recv_exact(stream: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = recv_some(stream, &mut buf[got..], fds)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Receives one frame. `Ok(None)` when the peer closed the connection between
/// frames. The header is checked (magic, version, length limit) before the
/// payload is read; a failed check, a frame cut short, or control data that
/// did not fit is an [`Error::Share`], and every fd received with the frame
/// is closed by then. After an error the stream is out of step: drop it.
///
/// Blocks as the stream does (its read timeout gives [`Error::Timeout`]).
pub fn recv_frame(stream: &UnixStream) -> Result<Option<Frame>> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    let got = recv_exact(stream, &mut header, &mut fds)?;
    let fail = |problem| Err(share_error(&describe_stream(stream), problem));
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return fail(ShareProblem::Truncated {
            what: "header",
            expected: HEADER_LEN as u64,
            got: got as u64,
        });
    }
    let mut magic = [0u8; 4];
    magic.copy_from_slice(&header[0..4]);
    let version = u16::from_le_bytes([header[4], header[5]]);
    let kind = u16::from_le_bytes([header[6], header[7]]);
    let length = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if magic != MAGIC {
        return fail(ShareProblem::BadMagic { found: magic });
    }
    if version != VERSION {
        return fail(ShareProblem::Version {
            found: version,
            supported: VERSION,
        });
    }
    if length > MAX_PAYLOAD {
        return fail(ShareProblem::Oversized {
            length: u64::from(length),
            max: u64::from(MAX_PAYLOAD),
        });
    }
    let mut payload = vec![0u8; length as usize];
    let got = recv_exact(stream, &mut payload, &mut fds)?;
    if got < payload.len() {
        return fail(ShareProblem::Truncated {
            what: "payload",
            expected: u64::from(length),
            got: got as u64,
        });
    }
    Ok(Some(Frame { kind, payload, fds }))
}
