//! The importing side: [`SharedBuffer`].

use std::collections::HashMap;
use std::fmt;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

use super::peer::{AccessPolicy, PeerCred, refuse_fds, sanitize_text};
use super::{
    BufferInfo, Incoming, MAX_READ, Message, RefusalReason, ShareProblem, send_message, wire,
};
use crate::importer::iommufd::{Ioas, IovaPlacement, MapPerms};
use crate::revoke::{Attachment, BufferState, RestorePolicy, RevocationHub, RevokeReason};
use crate::{ByteRange, DmaBuf, Error, RangeProblem, Result};

/// The `exp_name` of a VFIO BAR dma-buf (`KBUILD_MODNAME` of
/// drivers/vfio/pci/vfio_pci_dmabuf.c, built into `vfio-pci-core`).
pub const VFIO_EXP_NAME: &str = "vfio_pci_core";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The time left until `deadline` (`None`: no deadline, a day at a time),
/// or `None` once it has passed.
fn left_until(deadline: Option<Instant>) -> Option<Duration> {
    match deadline {
        None => Some(Duration::from_secs(86_400)),
        Some(at) => Some(at.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero()),
    }
}

/// A buffer received from another process, kept in step with its exporter.
///
/// It owns the dma-buf (checked: a dma-buf of the announced size), what the
/// exporter said about it, and a receiver-side [`RevocationHub`] that a
/// background thread drives from the exporter's messages: `revoked` revokes
/// the hub ([`RevokeReason::Remote`]; the exporter's own reason is in
/// [`remote_state`](Self::remote_state)), `restored` restores it, `gone`
/// closes it. Attachments made with [`attach`](Self::attach) therefore tear
/// down and map again at the same IOVA as they would in the exporting process.
///
/// The attachments' callbacks and the hub's observers run on that background
/// thread: they must not wait for the exporter (e.g. with
/// [`wait_remote`](Self::wait_remote)), which would hold up the next message.
///
/// When the connection ends (the exporter hung up, its process died, it sent
/// something malformed) or this value is dropped, the hub is closed for good:
/// without the exporter's word the buffer cannot be trusted, and its
/// attachments are torn down.
///
/// ```no_run
/// use std::time::Duration;
/// use dmabuf_p2p::revoke::{BufferState, RestorePolicy};
/// use dmabuf_p2p::share::SharedBuffer;
/// use dmabuf_p2p::{Iommufd, IovaPlacement, MapPerms};
///
/// let shared = SharedBuffer::connect("/run/dmabuf-p2p/0000:02:00.0-bar2.sock", Duration::from_secs(10))?;
/// println!("{} bytes of {}", shared.info().size, shared.info().exporter);
/// let ioas = Iommufd::open()?.alloc_ioas()?;
/// let att = shared.attach(&ioas, IovaPlacement::Auto, MapPerms::ReadWrite, RestorePolicy::Automatic)?;
/// // ... DMA to att.iova() after att.ensure_live()?
/// shared.wait_remote(Duration::from_secs(60), |s| s != BufferState::Live)?;
/// assert!(att.is_revoked());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SharedBuffer {
    buf: DmaBuf,
    info: BufferInfo,
    conn: Arc<Conn>,
    pump: Option<JoinHandle<()>>,
}

struct Conn {
    stream: UnixStream,
    peer: String,
    exporter: PeerCred,
    frame_timeout: Duration,
    hub: Arc<RevocationHub>,
    /// One frame at a time on the stream.
    write: Mutex<()>,
    status: Mutex<Status>,
    changed: Condvar,
    next_id: AtomicU64,
    closing: AtomicBool,
}

struct Status {
    /// The exporter's state as it last reported it, after the hub applied it.
    remote: BufferState,
    /// `revoked`/`restored`/`gone` messages applied.
    events: u64,
    /// Why the connection ended, once it has.
    ended: Option<String>,
    /// The exporter's `refused` message, if that is how it ended.
    refused: Option<(RefusalReason, String)>,
    /// Read requests waiting for their reply, and the replies.
    pending: HashMap<u64, Option<std::result::Result<Vec<u8>, String>>>,
}

impl fmt::Debug for SharedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.conn.status);
        f.debug_struct("SharedBuffer")
            .field("peer", &self.conn.peer)
            .field("info", &self.info)
            .field("remote", &st.remote)
            .field("ended", &st.ended)
            .finish()
    }
}

/// Applies an exporter's state to the receiver-side hub.
fn apply(hub: &RevocationHub, state: BufferState) {
    match state {
        BufferState::Live => {
            hub.restore();
        }
        BufferState::Revoked(_) => {
            hub.revoke(RevokeReason::Remote);
        }
        BufferState::Gone(r) => {
            hub.close(r);
        }
    }
}

/// How [`SharedBuffer::connect_with`] and [`SharedBuffer::receive_with`]
/// connect: the overall deadline and who may be the exporter.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Connecting and receiving the offer together take at most this long.
    pub timeout: Duration,
    /// Who may serve (`SO_PEERCRED` of the exporter's socket): by default
    /// the same uid as this process, or root.
    pub policy: AccessPolicy,
    /// How long any later message may take from its first byte to its last.
    pub frame_timeout: Duration,
}

impl ConnectOptions {
    /// The defaults, with `timeout` for connecting and the offer.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            policy: AccessPolicy::same_user(),
            frame_timeout: wire::DEFAULT_FRAME_TIMEOUT,
        }
    }
}

/// How long [`SharedBuffer::receive`] waits for the offer.
pub const DEFAULT_OFFER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `path` without blocking past `deadline` (a listener whose
/// backlog is full would otherwise keep `connect` waiting).
fn connect_until(path: &Path, deadline: Option<Instant>, timeout: Duration) -> Result<UnixStream> {
    let target = || format!("socket {}", path.display());
    let addr = UnixAddr::new(path).map_err(|e| Error::sys("connect", target(), e.into()))?;
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| Error::sys("socket", target(), e.into()))?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => return Ok(UnixStream::from(fd)),
            Err(Errno::EINTR) => {}
            // The backlog is full: try again shortly, within the deadline.
            Err(Errno::EAGAIN) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(Error::Timeout {
                        what: format!("connecting to {} (its backlog is full)", target()),
                        after: timeout,
                    });
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(Error::sys("connect", target(), e.into())),
        }
    }
}

impl SharedBuffer {
    /// Connects to the exporter's socket at `path` and receives the buffer
    /// ([`connect_with`](Self::connect_with) with
    /// [`ConnectOptions::new`]`(timeout)`): `timeout` bounds the connect and
    /// the offer together.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        Self::connect_with(path, &ConnectOptions::new(timeout))
    }

    /// Connects to the exporter's socket at `path` and receives the buffer
    /// ([`receive_with`](Self::receive_with)), all within `options.timeout`.
    pub fn connect_with(path: impl AsRef<Path>, options: &ConnectOptions) -> Result<Self> {
        let deadline = Instant::now().checked_add(options.timeout);
        let stream = connect_until(path.as_ref(), deadline, options.timeout)?;
        let peer = format!("socket {}", path.as_ref().display());
        Self::receive_until(stream, peer, options, deadline)
    }

    /// [`receive_with`](Self::receive_with) with the default options and
    /// [`DEFAULT_OFFER_TIMEOUT`].
    pub fn receive(stream: UnixStream) -> Result<Self> {
        Self::receive_with(stream, &ConnectOptions::new(DEFAULT_OFFER_TIMEOUT))
    }

    /// Checks who is at the other end of `stream` (`options.policy`: by
    /// default the same uid or root), receives the `offer` within
    /// `options.timeout`, checks it (as [`recv`](super::recv) does; an offer that names a
    /// VFIO device must be a `vfio_pci_core` dma-buf), stops accepting fds
    /// on the stream (`SO_PASSRIGHTS` off, where the kernel has it), and
    /// starts following the exporter: a background thread reads its
    /// messages from then on.
    ///
    /// Errors: [`Error::Share`] for an exporter that is not allowed
    /// ([`ShareProblem::PeerRefused`]), a refused offer (every fd that came
    /// with it closed), a connection closed before it
    /// ([`ShareProblem::Closed`]) or another message first
    /// ([`ShareProblem::Unexpected`]); [`Error::Timeout`] when the time is up.
    pub fn receive_with(stream: UnixStream, options: &ConnectOptions) -> Result<Self> {
        let deadline = Instant::now().checked_add(options.timeout);
        let peer = wire::describe_stream(&stream);
        Self::receive_until(stream, peer, options, deadline)
    }

    /// Receives the offer on `stream`, whose other end messages call `peer`.
    fn receive_until(
        stream: UnixStream,
        peer: String,
        options: &ConnectOptions,
        deadline: Option<Instant>,
    ) -> Result<Self> {
        let share_err = |problem| Error::Share {
            peer: peer.clone(),
            problem,
        };
        let cred = options.policy.admit_as(&stream, &peer)?;
        let frame = match wire::recv_frame_within(&stream, deadline, options.frame_timeout) {
            Err(Error::Timeout { what, .. }) => {
                return Err(Error::Timeout {
                    what,
                    after: options.timeout,
                });
            }
            other => other?,
        };
        let offer = match frame.map(super::decode).transpose().map_err(share_err)? {
            None => return Err(share_err(ShareProblem::Closed)),
            Some(Incoming::Offer(o)) => o,
            Some(Incoming::Message(Message::Refused { reason, message })) => {
                return Err(share_err(ShareProblem::NotServed { reason, message }));
            }
            Some(Incoming::Message(m)) => {
                return Err(share_err(ShareProblem::Unexpected {
                    kind: m.kind().name(),
                    context: "before the offer",
                }));
            }
        };
        if offer.info.device.is_some() || offer.info.bar.is_some() {
            let exp_name = offer.buf.fdinfo()?.exp_name;
            if exp_name != VFIO_EXP_NAME {
                return Err(share_err(ShareProblem::NotVfio {
                    exp_name: sanitize_text(&exp_name),
                }));
            }
        }
        refuse_fds(&stream)?;
        let hub = RevocationHub::new(format!("{} (shared over {peer})", offer.info.exporter));
        apply(&hub, offer.state);
        let conn = Arc::new(Conn {
            stream,
            peer: peer.clone(),
            exporter: cred,
            frame_timeout: options.frame_timeout,
            hub,
            write: Mutex::new(()),
            status: Mutex::new(Status {
                remote: offer.state,
                events: 0,
                ended: None,
                refused: None,
                pending: HashMap::new(),
            }),
            changed: Condvar::new(),
            next_id: AtomicU64::new(1),
            closing: AtomicBool::new(false),
        });
        let pumped = Arc::clone(&conn);
        let pump = std::thread::Builder::new()
            .name("share-importer".into())
            .spawn(move || pumped.pump())
            .map_err(|e| Error::sys("spawn thread", peer, e))?;
        Ok(Self {
            buf: offer.buf,
            info: offer.info,
            conn,
            pump: Some(pump),
        })
    }

    /// Who serves the buffer (`SO_PEERCRED` of the exporter's socket).
    pub fn exporter(&self) -> PeerCred {
        self.conn.exporter
    }

    /// The received dma-buf.
    pub fn dmabuf(&self) -> &DmaBuf {
        &self.buf
    }

    /// What the exporter said about it.
    pub fn info(&self) -> &BufferInfo {
        &self.info
    }

    /// The receiver-side hub, driven by the exporter's messages. Its name is
    /// the exporter's plus the socket.
    pub fn hub(&self) -> &Arc<RevocationHub> {
        &self.conn.hub
    }

    /// The other end, e.g. `socket /run/dmabuf-p2p/bar.sock`.
    pub fn peer(&self) -> &str {
        &self.conn.peer
    }

    /// The exporter's state as it last reported it, with its own reason
    /// (the hub's is [`RevokeReason::Remote`]). `Gone` once the connection
    /// has ended.
    pub fn remote_state(&self) -> BufferState {
        lock(&self.conn.status).remote
    }

    /// How many `revoked`, `restored` and `gone` messages were applied.
    pub fn events(&self) -> u64 {
        lock(&self.conn.status).events
    }

    /// Whether the exporter is still connected.
    pub fn is_connected(&self) -> bool {
        lock(&self.conn.status).ended.is_none()
    }

    /// Why the connection ended, once it has.
    pub fn end_reason(&self) -> Option<String> {
        lock(&self.conn.status).ended.clone()
    }

    /// Why the exporter dropped this importer, if it said so (a `refused`
    /// message: e.g. [`RefusalReason::Idle`] when the pings went unanswered).
    pub fn refusal(&self) -> Option<(RefusalReason, String)> {
        lock(&self.conn.status).refused.clone()
    }

    /// Maps the buffer into `ioas` as an [`Attachment`] tied to the
    /// receiver-side hub ([`Attachment::map_parts`], with the physical ranges
    /// the exporter announced). Fails with [`Error::Revoked`] while the
    /// exporter has the buffer revoked.
    pub fn attach(
        &self,
        ioas: &Ioas,
        at: IovaPlacement,
        perms: MapPerms,
        policy: RestorePolicy,
    ) -> Result<Attachment> {
        Attachment::map_parts(
            &self.buf,
            &self.conn.hub,
            self.info.phys.clone(),
            ioas,
            at,
            perms,
            policy,
        )
    }

    /// Waits until the exporter's reported state (applied to the hub and its
    /// attachments) satisfies `pred`, and returns it. [`Error::Timeout`] after
    /// `timeout` (one too large to add to the clock is no limit);
    /// [`ShareProblem::Disconnected`] if the connection ended with a state
    /// that does not satisfy it.
    pub fn wait_remote(
        &self,
        timeout: Duration,
        pred: impl Fn(BufferState) -> bool,
    ) -> Result<BufferState> {
        let deadline = Instant::now().checked_add(timeout);
        let mut st = lock(&self.conn.status);
        loop {
            if pred(st.remote) {
                return Ok(st.remote);
            }
            if let Some((reason, message)) = &st.refused {
                return Err(self.conn.error(ShareProblem::NotServed {
                    reason: *reason,
                    message: message.clone(),
                }));
            }
            if let Some(why) = &st.ended {
                return Err(self.conn.error(ShareProblem::Disconnected(why.clone())));
            }
            let Some(left) = left_until(deadline) else {
                return Err(Error::Timeout {
                    what: format!(
                        "a state change from {} (it is {:?})",
                        self.conn.peer, st.remote
                    ),
                    after: timeout,
                });
            };
            st = self
                .conn
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Asks the exporter for `length` bytes of the buffer at `offset` and
    /// waits up to `timeout` for each answer (`read-request`, at most
    /// [`MAX_READ`] bytes each). The importer cannot map a VFIO dma-buf; this
    /// is how it checks what its DMA wrote. The exporter refuses
    /// ([`ShareProblem::Refused`]) while the buffer is revoked or if it offers
    /// no read-back.
    pub fn read_back(&self, offset: u64, length: u64, timeout: Duration) -> Result<Vec<u8>> {
        let range = ByteRange::new(offset, length);
        range
            .check_in(self.info.size, 1)
            .map_err(|problem| Error::InvalidRange {
                target: format!(
                    "shared buffer of {} ({} bytes)",
                    self.info.exporter, self.info.size
                ),
                range,
                problem,
            })?;
        let total = usize::try_from(length).map_err(|_| Error::InvalidRange {
            target: format!("shared buffer of {}", self.info.exporter),
            range,
            problem: RangeProblem::Overflow,
        })?;
        let mut out = Vec::with_capacity(total);
        let mut done = 0u64;
        while done < length {
            let n = (length - done).min(MAX_READ);
            let chunk = self.read_chunk(offset + done, n, timeout)?;
            if chunk.len() as u64 != n {
                return Err(self.conn.error(ShareProblem::Malformed {
                    kind: "read-reply",
                    problem: format!("{} bytes for a read of {n}", chunk.len()),
                }));
            }
            out.extend_from_slice(&chunk);
            done += n;
        }
        Ok(out)
    }

    fn read_chunk(&self, offset: u64, length: u64, timeout: Duration) -> Result<Vec<u8>> {
        let id = self.conn.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = lock(&self.conn.status);
            if let Some(why) = &st.ended {
                return Err(self.conn.error(ShareProblem::Disconnected(why.clone())));
            }
            st.pending.insert(id, None);
        }
        let sent = {
            let _w = lock(&self.conn.write);
            send_message(
                &self.conn.stream,
                &Message::ReadRequest { id, offset, length },
                Some(timeout),
            )
        };
        let deadline = Instant::now().checked_add(timeout);
        let mut st = lock(&self.conn.status);
        if let Err(e) = sent {
            st.pending.remove(&id);
            return Err(e);
        }
        loop {
            if let Some(Some(_)) = st.pending.get(&id) {
                let result = st.pending.remove(&id).flatten();
                return match result {
                    Some(Ok(data)) => Ok(data),
                    Some(Err(why)) => Err(self.conn.error(ShareProblem::Refused(why))),
                    None => Err(self.conn.error(ShareProblem::Closed)),
                };
            }
            if let Some(why) = &st.ended {
                let why = why.clone();
                st.pending.remove(&id);
                return Err(self.conn.error(ShareProblem::Disconnected(why)));
            }
            let Some(left) = left_until(deadline) else {
                st.pending.remove(&id);
                return Err(Error::Timeout {
                    what: format!("a read-reply from {}", self.conn.peer),
                    after: timeout,
                });
            };
            st = self
                .conn
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for SharedBuffer {
    fn drop(&mut self) {
        self.conn.closing.store(true, Ordering::Relaxed);
        // Wakes the pump (end of stream); it closes the hub on its way out.
        let _ = self.conn.stream.shutdown(Shutdown::Both);
        if let Some(h) = self.pump.take() {
            let _ = h.join();
        }
        self.conn.hub.close(RevokeReason::DeviceClosed);
    }
}

impl Conn {
    fn error(&self, problem: ShareProblem) -> Error {
        Error::Share {
            peer: self.peer.clone(),
            problem,
        }
    }

    /// The background thread: applies the exporter's messages until the
    /// connection ends, then closes the hub.
    fn pump(&self) {
        let end = loop {
            let received = wire::recv_frame_within(&self.stream, None, self.frame_timeout)
                .and_then(|f| {
                    f.map(super::decode)
                        .transpose()
                        .map_err(|problem| self.error(problem))
                });
            match received {
                Ok(None) => break "the exporter closed the connection".to_owned(),
                Ok(Some(Incoming::Message(m))) => match m {
                    Message::Revoked(_) | Message::Restored | Message::Gone(_) => {
                        let state = match m {
                            Message::Revoked(r) => BufferState::Revoked(r),
                            Message::Gone(r) => BufferState::Gone(r),
                            _ => BufferState::Live,
                        };
                        apply(&self.hub, state);
                        let mut st = lock(&self.status);
                        if !matches!(st.remote, BufferState::Gone(_)) {
                            st.remote = state;
                        }
                        st.events += 1;
                        self.changed.notify_all();
                    }
                    Message::ReadReply { id, result, .. } => {
                        let result = result.map_err(|why| sanitize_text(&why));
                        let mut st = lock(&self.status);
                        if let Some(slot) = st.pending.get_mut(&id) {
                            *slot = Some(result);
                            self.changed.notify_all();
                        }
                    }
                    Message::Ping { id } => {
                        // The exporter's socket takes a pong at once unless
                        // it stopped reading; then it is waited for no
                        // longer than any message.
                        let sent = {
                            let _w = lock(&self.write);
                            send_message(
                                &self.stream,
                                &Message::Pong { id },
                                Some(self.frame_timeout),
                            )
                        };
                        if let Err(e) = sent {
                            break format!("answering a ping: {e}");
                        }
                    }
                    Message::Refused { reason, message } => {
                        let text = self
                            .error(ShareProblem::NotServed {
                                reason,
                                message: message.clone(),
                            })
                            .to_string();
                        lock(&self.status).refused = Some((reason, message));
                        break text;
                    }
                    Message::ReadRequest { .. } | Message::Pong { .. } => {
                        break self
                            .error(ShareProblem::Unexpected {
                                kind: m.kind().name(),
                                context: "from the exporter",
                            })
                            .to_string();
                    }
                },
                Ok(Some(Incoming::Offer(_))) => {
                    // The offer's fd is closed here, with the offer.
                    break self
                        .error(ShareProblem::Unexpected {
                            kind: "offer",
                            context: "after the first",
                        })
                        .to_string();
                }
                Err(e) => break e.to_string(),
            }
        };
        let end = if self.closing.load(Ordering::Relaxed) {
            "closed by this process".to_owned()
        } else {
            end
        };
        // No word from the exporter from now on: the buffer cannot be trusted.
        self.hub.close(RevokeReason::DeviceClosed);
        let _ = self.stream.shutdown(Shutdown::Both);
        let mut st = lock(&self.status);
        if !matches!(st.remote, BufferState::Gone(_)) {
            st.remote = BufferState::Gone(RevokeReason::DeviceClosed);
        }
        st.ended = Some(end);
        self.changed.notify_all();
    }
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SharedBuffer>();
};
