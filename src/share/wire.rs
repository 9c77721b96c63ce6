//! The framing of the sharing protocol: the 12-byte header, `sendmsg` with
//! `SCM_RIGHTS`, and a receiver ([`FrameReader`]) that reads one frame at a
//! time without blocking, counts the fds that come with it and makes sure no
//! received fd outlives a refused frame.
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
//! (`MSG_CMSG_CLOEXEC`) for every byte and never past the end of the frame, so
//! fds attached anywhere in a frame are collected with it ([`Frame::fds`]).
//! It refuses a frame with more than [`MAX_FRAME_FDS`] fds, control data it
//! has no room for (`MSG_CTRUNC`; [`ShareProblem::FdTableFull`] when room was
//! left, so the fd table must be full), and a frame that started but does not
//! complete within its deadline ([`ShareProblem::Stalled`]). Every fd that
//! did arrive with a refused frame is closed.
//!
//! Private to the crate: [`super::send_offer`], [`super::send_message`],
//! [`super::recv`] and [`super::recv_timeout`] are the way in, and the
//! protocol's constants are re-exported by [`super`]. The fds themselves
//! travel through [`super::rights`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::ShareProblem;
use super::rights::{self, FD_ROOM};
use crate::{Error, Result};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"DPSH";
/// The protocol version this crate speaks; a frame of another version is
/// refused ([`ShareProblem::Version`]). Version 2 added `ping`, `pong`
/// (which an importer must answer) and `refused`.
pub const VERSION: u16 = 2;
/// The size of a frame header.
pub const HEADER_LEN: usize = 12;
/// The largest payload accepted ([`ShareProblem::Oversized`] beyond).
pub const MAX_PAYLOAD: u32 = 64 << 10;
/// The most fds one frame may carry, over all its `recvmsg`s (the protocol
/// sends one, with the offer): more is [`ShareProblem::TooManyFds`].
pub const MAX_FRAME_FDS: usize = 1;
/// How long a frame may take from its first byte to its last, unless the
/// caller says otherwise.
pub const DEFAULT_FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// One frame as received: kind, payload and every fd that came with it
/// (owned: dropping the frame closes them).
#[derive(Debug)]
pub(crate) struct Frame {
    /// The kind field of the header (not checked against the known kinds yet).
    pub(crate) kind: u16,
    /// The payload.
    pub(crate) payload: Vec<u8>,
    /// The fds received with the frame's bytes.
    pub(crate) fds: Vec<OwnedFd>,
}

/// A header followed by `payload`. The length field is the payload's length
/// (saturated at `u32::MAX`); the [`MAX_PAYLOAD`] limit is checked by the
/// callers that build payloads.
pub(crate) fn encode_frame(kind: u16, payload: &[u8]) -> Vec<u8> {
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
/// peer's path, or ours on the accepting side), else `unix socket fd N`. An
/// address under `/proc/self/fd/` (how [`super::bind_listener`] binds,
/// relative to a directory fd) means nothing to a reader and is not used;
/// the callers that know the path name it themselves.
pub(crate) fn describe_stream(stream: &UnixStream) -> String {
    let path = |a: io::Result<std::os::unix::net::SocketAddr>| {
        a.ok()
            .and_then(|a| a.as_pathname().map(std::path::Path::to_path_buf))
            .filter(|p| !p.starts_with("/proc/self/fd"))
            .map(|p| p.display().to_string())
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

/// Sends all of `data` on `stream`, attaching `fds` (`SCM_RIGHTS`) to the
/// first `sendmsg`. Never blocks in the kernel: while the socket is full it
/// waits with `poll` for at most `timeout` in all (`None`: no limit), then
/// fails with [`Error::Timeout`]. `fds` need at least one byte of `data` to
/// travel with.
pub(crate) fn send_raw(
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
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let mut sent = 0usize;
    while sent < data.len() {
        let with = if sent == 0 { fds } else { &[] };
        match rights::send_some(stream, &data[sent..], with) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !wait_for(stream.as_fd(), PollFlags::POLLOUT, deadline)? {
                    return Err(Error::Timeout {
                        what: format!("sending to {}", describe_stream(stream)),
                        after: timeout.unwrap_or_default(),
                    });
                }
            }
            Err(e) => return Err(Error::sys("sendmsg", describe_stream(stream), e)),
        }
    }
    Ok(())
}

/// The `poll` timeout for the time left until `deadline` (rounded up to a
/// millisecond, so a short rest does not spin); `None` once it has passed.
pub(crate) fn poll_timeout(deadline: Option<Instant>) -> Option<PollTimeout> {
    let Some(at) = deadline else {
        return Some(PollTimeout::NONE);
    };
    let left = at.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return None;
    }
    let ms = left.as_micros().div_ceil(1000);
    Some(PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX))
}

/// Waits until `fd` has one of `events` (or an error or hang-up), or the
/// deadline passes (`false`). An interrupted wait counts as ready: the
/// caller tries again.
fn wait_for(fd: BorrowedFd<'_>, events: PollFlags, deadline: Option<Instant>) -> Result<bool> {
    let Some(timeout) = poll_timeout(deadline) else {
        return Ok(false);
    };
    let mut fds = [PollFd::new(fd, events)];
    match poll(&mut fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => Ok(true),
        Err(e) => Err(Error::sys(
            "poll",
            format!("socket fd {}", fd.as_raw_fd()),
            e.into(),
        )),
    }
}

/// What one [`FrameReader::read_from`] came to.
#[derive(Debug)]
pub(crate) enum Progress {
    /// Nothing more to read now (the socket is empty); call again when it is
    /// readable.
    Pending,
    /// A whole frame.
    Frame(Frame),
    /// The peer closed the connection between frames.
    Closed,
}

/// Receives frames from a stream socket one `recvmsg` at a time, without
/// blocking: for an event loop that serves many peers, or (through
/// [`recv_frame_within`]) a blocking reader with deadlines.
///
/// It never reads past the end of the current frame, so the next frame's
/// bytes and fds stay in the socket. It notes when the frame's first byte
/// arrived ([`started`](Self::started)): the caller enforces the per-frame
/// deadline.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    header: [u8; HEADER_LEN],
    got: usize,
    kind: u16,
    payload: Option<Vec<u8>>,
    fds: Vec<OwnedFd>,
    started: Option<Instant>,
}

impl FrameReader {
    /// A reader between frames.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// When the current frame's first byte arrived; `None` between frames.
    pub(crate) fn started(&self) -> Option<Instant> {
        self.started
    }

    /// Bytes of the current frame received so far.
    pub(crate) fn received(&self) -> usize {
        self.got
    }

    /// Forgets the current frame, closing its fds.
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }

    /// Reads what the socket has of the current frame (one or more
    /// `recvmsg`s, until it would block or the frame is whole). On an error
    /// the frame's fds are closed and the reader is reset; the stream is out
    /// of step then: drop it.
    pub(crate) fn read_from(&mut self, stream: &UnixStream) -> Result<Progress> {
        let r = self.read_inner(stream);
        if r.is_err() {
            self.reset();
        }
        r
    }

    fn read_inner(&mut self, stream: &UnixStream) -> Result<Progress> {
        let fail = |problem| share_error(&describe_stream(stream), problem);
        loop {
            let in_header = self.got < HEADER_LEN;
            let buf: &mut [u8] = match (&mut self.payload, in_header) {
                (_, true) => &mut self.header[self.got..],
                (Some(p), false) => {
                    let at = self.got - HEADER_LEN;
                    &mut p[at..]
                }
                (None, false) => &mut [],
            };
            if buf.is_empty() {
                // A header that announced an empty payload: whole.
                return Ok(Progress::Frame(self.take()));
            }
            let got = match rights::recv(stream.as_fd(), buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Progress::Pending),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::sys("recvmsg", describe_stream(stream), e)),
            };
            let arrived = got.fds.len();
            self.fds.extend(got.fds);
            if got.truncated {
                let closed = self.fds.len();
                return Err(fail(if arrived < FD_ROOM {
                    ShareProblem::FdTableFull { closed }
                } else {
                    ShareProblem::ControlTruncated {
                        closed,
                        room: FD_ROOM,
                    }
                }));
            }
            if self.fds.len() > MAX_FRAME_FDS {
                return Err(fail(ShareProblem::TooManyFds {
                    count: self.fds.len(),
                    max: MAX_FRAME_FDS,
                }));
            }
            if got.bytes == 0 {
                if self.got == 0 && self.fds.is_empty() {
                    return Ok(Progress::Closed);
                }
                let (what, expected) = if in_header {
                    ("header", HEADER_LEN as u64)
                } else {
                    ("payload", self.payload_len() as u64)
                };
                let done = if in_header {
                    self.got
                } else {
                    self.got - HEADER_LEN
                };
                return Err(fail(ShareProblem::Truncated {
                    what,
                    expected,
                    got: done as u64,
                }));
            }
            if self.started.is_none() {
                self.started = Some(Instant::now());
            }
            self.got += got.bytes;
            if in_header && self.got == HEADER_LEN {
                self.check_header().map_err(fail)?;
            }
            if self.got >= HEADER_LEN && self.got == HEADER_LEN + self.payload_len() {
                return Ok(Progress::Frame(self.take()));
            }
        }
    }

    fn payload_len(&self) -> usize {
        self.payload.as_ref().map_or(0, Vec::len)
    }

    /// Checks the header just completed and makes room for the payload.
    fn check_header(&mut self) -> std::result::Result<(), ShareProblem> {
        let h = &self.header;
        let magic = [h[0], h[1], h[2], h[3]];
        let version = u16::from_le_bytes([h[4], h[5]]);
        let kind = u16::from_le_bytes([h[6], h[7]]);
        let length = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if magic != MAGIC {
            return Err(ShareProblem::BadMagic { found: magic });
        }
        if version != VERSION {
            return Err(ShareProblem::Version {
                found: version,
                supported: VERSION,
            });
        }
        if length > MAX_PAYLOAD {
            return Err(ShareProblem::Oversized {
                length: u64::from(length),
                max: u64::from(MAX_PAYLOAD),
            });
        }
        self.kind = kind;
        // Within MAX_PAYLOAD: fits any usize.
        self.payload = Some(vec![0u8; length as usize]);
        Ok(())
    }

    fn take(&mut self) -> Frame {
        let frame = Frame {
            kind: self.kind,
            payload: self.payload.take().unwrap_or_default(),
            fds: std::mem::take(&mut self.fds),
        };
        self.reset();
        frame
    }
}

/// Receives one frame, waiting as long as it takes for it to start and
/// [`DEFAULT_FRAME_TIMEOUT`] for it to complete
/// ([`recv_frame_within`]).
pub(crate) fn recv_frame(stream: &UnixStream) -> Result<Option<Frame>> {
    recv_frame_within(stream, None, DEFAULT_FRAME_TIMEOUT)
}

/// Receives one frame. `Ok(None)` when the peer closed the connection between
/// frames. The header is checked (magic, version, length limit) before the
/// payload is read; a failed check, a frame cut short, too many fds, or
/// control data that did not fit is an [`Error::Share`], and every fd
/// received with the frame is closed by then. After an error the stream is
/// out of step: drop it.
///
/// Waits until `deadline` at most ([`Error::Timeout`]; `None`: no limit), and
/// `per_frame` from the frame's first byte to its last
/// ([`ShareProblem::Stalled`]), whatever the stream's blocking mode and read
/// timeout.
pub(crate) fn recv_frame_within(
    stream: &UnixStream,
    deadline: Option<Instant>,
    per_frame: Duration,
) -> Result<Option<Frame>> {
    let mut reader = FrameReader::new();
    let started_at = Instant::now();
    loop {
        match reader.read_from(stream)? {
            Progress::Frame(f) => return Ok(Some(f)),
            Progress::Closed => return Ok(None),
            Progress::Pending => {}
        }
        let frame_deadline = reader.started().and_then(|s| s.checked_add(per_frame));
        let until = match (deadline, frame_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if !wait_for(stream.as_fd(), PollFlags::POLLIN, until)? {
            if frame_deadline.is_some_and(|f| Instant::now() >= f) {
                let got = reader.received();
                reader.reset();
                return Err(share_error(
                    &describe_stream(stream),
                    ShareProblem::Stalled {
                        got: got as u64,
                        after: per_frame,
                    },
                ));
            }
            reader.reset();
            return Err(Error::Timeout {
                what: format!("a message from {}", describe_stream(stream)),
                after: started_at.elapsed(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe whose write end is only ever passed away: once every copy of
    /// the write end is closed, its read end sees the end of the stream.
    /// What a test that sends the write end checks instead of counting the
    /// process's fds, which the tests running beside it open and close.
    struct Witness {
        read: std::fs::File,
        write: Option<OwnedFd>,
    }

    impl Witness {
        fn new() -> Self {
            let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .unwrap_or_else(|e| unreachable!("pipe2: {e}"));
            nix::fcntl::fcntl(
                &read,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            )
            .unwrap_or_else(|e| unreachable!("O_NONBLOCK: {e}"));
            Self {
                read: read.into(),
                write: Some(write),
            }
        }

        /// The write end, while this side still holds it.
        fn write_end(&self) -> BorrowedFd<'_> {
            self.write
                .as_ref()
                .map(AsFd::as_fd)
                .unwrap_or_else(|| unreachable!("the write end was given away"))
        }

        /// Closes this side's write end: from now on only passed copies hold it.
        fn give_away(&mut self) {
            self.write = None;
        }

        /// Whether every copy of the write end is closed (end of stream),
        /// rather than held open somewhere (`EAGAIN`).
        fn all_closed(&mut self) -> bool {
            use std::io::Read;
            let mut b = [0u8; 1];
            matches!(self.read.read(&mut b), Ok(0))
        }
    }

    #[test]
    fn frames_in_pieces_and_back_to_back() {
        let (a, b) = UnixStream::pair().unwrap_or_else(|e| unreachable!("{e}"));
        let one = encode_frame(3, b"{}");
        let two = encode_frame(2, br#"{"reason":"reset"}"#);
        for piece in one.chunks(5) {
            send_raw(&a, piece, &[], None).unwrap_or_else(|e| unreachable!("{e}"));
        }
        send_raw(&a, &two, &[], None).unwrap_or_else(|e| unreachable!("{e}"));
        drop(a);
        let f1 = recv_frame(&b).ok().flatten().map(|f| (f.kind, f.payload));
        assert_eq!(f1, Some((3, b"{}".to_vec())));
        let f2 = recv_frame(&b).ok().flatten().map(|f| f.kind);
        assert_eq!(f2, Some(2));
        assert!(matches!(recv_frame(&b), Ok(None)));
    }

    /// The refused frame's fds are closed: the test passes the write ends
    /// of two pipes and sees each pipe's end of stream afterwards. (It does
    /// not count the process's fds: the other unit tests open and close fds
    /// in parallel threads of the same process.)
    #[test]
    fn fds_over_the_frame_limit_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap_or_else(|e| unreachable!("{e}"));
        let (mut x, mut y) = (Witness::new(), Witness::new());
        let frame = encode_frame(1, b"{}");
        // Two fds on the first byte, then the rest: over MAX_FRAME_FDS.
        send_raw(&a, &frame[..1], &[x.write_end(), y.write_end()], None)
            .unwrap_or_else(|e| unreachable!("{e}"));
        x.give_away();
        y.give_away();
        assert!(!x.all_closed(), "the passed copies are in flight");
        send_raw(&a, &frame[1..], &[], None).unwrap_or_else(|e| unreachable!("{e}"));
        let r = recv_frame(&b);
        assert!(
            matches!(
                r,
                Err(Error::Share {
                    problem: ShareProblem::TooManyFds { count: 2, max: 1 },
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(x.all_closed(), "the first passed fd is still open");
        assert!(y.all_closed(), "the second passed fd is still open");
    }

    #[test]
    fn a_dripping_frame_misses_its_deadline() {
        let (a, b) = UnixStream::pair().unwrap_or_else(|e| unreachable!("{e}"));
        send_raw(&a, &encode_frame(3, b"{}")[..3], &[], None)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let t = Instant::now();
        let r = recv_frame_within(&b, None, Duration::from_millis(200));
        assert!(
            matches!(
                r,
                Err(Error::Share {
                    problem: ShareProblem::Stalled { got: 3, .. },
                    ..
                })
            ),
            "{r:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        drop(a);
    }

    #[test]
    fn the_overall_deadline_holds_while_nothing_comes() {
        let (_a, b) = UnixStream::pair().unwrap_or_else(|e| unreachable!("{e}"));
        let t = Instant::now();
        let r = recv_frame_within(
            &b,
            Some(Instant::now() + Duration::from_millis(100)),
            Duration::from_secs(60),
        );
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    /// A frame keeps the fds that came with it, received close-on-exec
    /// (`MSG_CMSG_CLOEXEC`).
    #[test]
    fn frames_keep_their_fds_close_on_exec() {
        let (a, b) = UnixStream::pair().unwrap_or_else(|e| unreachable!("{e}"));
        let file = std::fs::File::open("/dev/null").unwrap_or_else(|e| unreachable!("{e}"));
        send_raw(&a, &encode_frame(42, b"xy"), &[file.as_fd()], None)
            .unwrap_or_else(|e| unreachable!("{e}"));
        let f = recv_frame(&b).ok().flatten();
        let f = f.unwrap_or_else(|| unreachable!("no frame"));
        assert_eq!(
            (f.kind, f.payload.as_slice(), f.fds.len()),
            (42, &b"xy"[..], 1)
        );
        let flags = nix::fcntl::fcntl(&f.fds[0], nix::fcntl::FcntlArg::F_GETFD);
        let flags = flags.unwrap_or_else(|e| unreachable!("{e}"));
        assert!(flags & libc::FD_CLOEXEC != 0);
    }

    #[test]
    fn bad_headers_are_refused() {
        for (bytes, want) in [
            (b"XXXX\x02\x00\x01\x00\x00\x00\x00\x00".to_vec(), "magic"),
            (b"DPSH\x01\x00\x01\x00\x00\x00\x00\x00".to_vec(), "version"),
            (b"DPSH\x02\x00\x01\x00\xff\xff\xff\xff".to_vec(), "limit"),
            (b"DPSH\x02".to_vec(), "truncated header"),
            (
                b"DPSH\x02\x00\x01\x00\x05\x00\x00\x00ab".to_vec(),
                "truncated payload",
            ),
        ] {
            let (a, b) = UnixStream::pair().unwrap_or_else(|e| unreachable!("{e}"));
            send_raw(&a, &bytes, &[], None).unwrap_or_else(|e| unreachable!("{e}"));
            drop(a);
            let r = recv_frame(&b);
            let text = r.map(|_| String::new()).unwrap_or_else(|e| e.to_string());
            assert!(text.contains(want), "{want}: {text}");
        }
    }
}
