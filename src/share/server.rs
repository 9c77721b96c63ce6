//! The exporting side: [`ShareServer`].
//!
//! One thread serves every client with `poll`: it accepts (when given a
//! listener), sends offers and state changes, reads requests. The hub's
//! observer only records the newest state and wakes that thread (an
//! eventfd), so revoking never waits for a socket, and a client that stops
//! reading is dropped after a bounded time without holding up anyone else.

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::peer::{AccessPolicy, PeerCred, refuse_fds};
use super::rights;
use super::wire::{self, FrameReader, Progress};
use super::{BufferInfo, Incoming, Kind, MAX_READ, Message, ShareProblem, decode, encode_offer};
use crate::exporter::bar::BarExport;
use crate::revoke::{
    BufferState, Revocable, RevocationHub, RevokeReason, StateChange, Subscription,
};
use crate::{DmaBuf, Error, Result};

/// A reader of the shared buffer's bytes for `read-request`s: fills the slice
/// with the bytes at the buffer offset. See [`ShareServer::set_read_back`].
pub type ReadBack = dyn Fn(u64, &mut [u8]) -> Result<()> + Send + Sync;

type Logger = dyn Fn(&ServerEvent) + Send + Sync;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The limits a [`ShareServer`] keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Who may connect (checked with `SO_PEERCRED` before anything is sent).
    pub policy: AccessPolicy,
    /// The most clients served at once; more are refused.
    pub max_clients: usize,
    /// How long a message to a client may stay unsent (its socket full)
    /// before the client is dropped.
    pub send_timeout: Duration,
    /// How long a client's request may take from its first byte to its last.
    pub frame_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            policy: AccessPolicy::same_user(),
            max_clients: 64,
            send_timeout: Duration::from_secs(1),
            frame_timeout: wire::DEFAULT_FRAME_TIMEOUT,
        }
    }
}

/// What a [`ShareServer`] tells its log ([`ShareServer::set_log`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A client was admitted and offered the buffer.
    Connected {
        /// Its id.
        id: u64,
        /// Who it is.
        peer: PeerCred,
        /// Clients served now.
        clients: usize,
    },
    /// A connection was refused before anything was sent to it. Rate-limited:
    /// `suppressed` refusals were not reported since the last one.
    Refused {
        /// Who it was, if the kernel said.
        peer: Option<PeerCred>,
        /// Why.
        why: String,
        /// Refusals not reported before this one.
        suppressed: u64,
    },
    /// A client was dropped.
    Dropped {
        /// Its id.
        id: u64,
        /// Who it was.
        peer: PeerCred,
        /// Why.
        why: String,
    },
    /// `accept` failed (e.g. `EMFILE`: the fd table is full); the server
    /// backs off before it tries again. Rate-limited like `Refused`.
    AcceptFailed {
        /// The error.
        error: String,
        /// How long the server waits before accepting again.
        backoff: Duration,
        /// Failures not reported before this one.
        suppressed: u64,
    },
}

impl fmt::Display for ServerEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let more = |n: u64| {
            if n > 0 {
                format!(" ({n} more not shown)")
            } else {
                String::new()
            }
        };
        match self {
            Self::Connected { id, peer, clients } => {
                write!(f, "client {id} ({peer}) connected; {clients} connected")
            }
            Self::Refused {
                peer,
                why,
                suppressed,
            } => match peer {
                Some(p) => write!(f, "refused {p}: {why}{}", more(*suppressed)),
                None => write!(f, "refused a connection: {why}{}", more(*suppressed)),
            },
            Self::Dropped { id, peer, why } => write!(f, "client {id} ({peer}) dropped: {why}"),
            Self::AcceptFailed {
                error,
                backoff,
                suppressed,
            } => write!(
                f,
                "accept: {error}; retrying in {backoff:?}{}",
                more(*suppressed)
            ),
        }
    }
}

/// Serves one exported buffer to importing processes: checks each
/// connection's credentials, hands it the dma-buf (an `offer`), then forwards
/// the exporter's state (`revoked`, `restored`, `gone`) and answers
/// `read-request`s if it was given a reader.
///
/// * **Access**: a peer must pass the [`AccessPolicy`] (same uid, root, or
///   allowed) before anything is sent to it; at most
///   [`ServerOptions::max_clients`] are served; the server's sockets refuse
///   fds from clients (`SO_PASSRIGHTS` off, where the kernel has it).
/// * **Revocation is never delayed by a client**: the hub's observer only
///   records the newest state; one thread sends it to each client without
///   blocking. Every client hears the newest state, and a revocation it
///   missed while a restore followed it is sent first (`revoked`, then
///   `restored`), so no importer keeps a dead mapping it thinks is live.
/// * **Bounded**: a message unsent for [`ServerOptions::send_timeout`] drops
///   its client, so does a request that does not complete within
///   [`ServerOptions::frame_timeout`], a request with an fd, or anything
///   but a `read-request`.
///
/// Dropping the server disconnects every client.
///
/// ```no_run
/// use dmabuf_p2p::share::{bind_listener, default_socket_path, ShareServer};
/// use dmabuf_p2p::{ByteRange, Iommufd, VfioPciDevice};
///
/// let iommufd = Iommufd::open()?;
/// let mut dev = VfioPciDevice::open("0000:02:00.0".parse()?)?;
/// dev.bind(&iommufd)?;
/// dev.set_memory_decode(true)?;
/// let export = dev.export_bar(2, &[ByteRange::new(0, 64 << 10)])?;
/// let server = ShareServer::new(&export)?;
/// server.set_log(|event| eprintln!("{event}"));
/// server.listen(bind_listener(&default_socket_path("0000:02:00.0-bar2"))?)?;
/// // ... until it is time to stop; dropping the device revokes, then the
/// // server tells the clients.
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ShareServer {
    shared: Arc<Shared>,
    _subscription: Subscription,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    buf: DmaBuf,
    info: BufferInfo,
    hub: Arc<RevocationHub>,
    options: Mutex<ServerOptions>,
    latest: Mutex<Latest>,
    wake: EventFd,
    inbox: Mutex<Inbox>,
    status: Mutex<Status>,
    status_changed: Condvar,
    read_back: Mutex<Option<Arc<ReadBack>>>,
    log: Mutex<Option<Arc<Logger>>>,
}

/// The newest state the hub reported, and its last revocation.
#[derive(Debug, Clone, Copy)]
struct Latest {
    change: StateChange,
    /// The `seq` and reason of the last change to a revoked state.
    last_revocation: Option<(u64, RevokeReason)>,
}

impl Latest {
    fn record(&mut self, change: &StateChange) {
        if change.seq <= self.change.seq && self.change.seq != 0 {
            return;
        }
        self.change = *change;
        if let BufferState::Revoked(r) = change.state {
            self.last_revocation = Some((change.seq, r));
        }
    }

    /// The messages that bring a client told about `told` (`seq`, state) to
    /// the newest state.
    fn catch_up(&self, told: (u64, BufferState)) -> Vec<Message> {
        let (seq, state) = told;
        if self.change.seq <= seq {
            return Vec::new();
        }
        let missed_revocation = self
            .last_revocation
            .filter(|(s, _)| *s > seq && state == BufferState::Live)
            .map(|(_, r)| r);
        let mut out = Vec::new();
        match self.change.state {
            BufferState::Revoked(r) => out.push(Message::Revoked(r)),
            BufferState::Live => {
                if let Some(r) = missed_revocation {
                    out.push(Message::Revoked(r));
                }
                if state != BufferState::Live || missed_revocation.is_some() {
                    out.push(Message::Restored);
                }
            }
            BufferState::Gone(r) => {
                if let Some(m) = missed_revocation {
                    out.push(Message::Revoked(m));
                }
                out.push(Message::Gone(r));
            }
        }
        out
    }
}

#[derive(Default)]
struct Inbox {
    streams: Vec<(u64, UnixStream, PeerCred)>,
    listeners: Vec<UnixListener>,
    next_id: u64,
    stop: bool,
}

#[derive(Debug, Default)]
struct Status {
    clients: Vec<(u64, PeerCred)>,
    /// Admitted but not yet taken by the serving thread.
    pending: usize,
    dropped: u64,
    /// Every client has been sent everything up to this change.
    flushed_seq: u64,
    ended: bool,
}

impl fmt::Debug for ShareServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShareServer")
            .field("buffer", &self.shared.info)
            .field("state", &self.shared.hub.state())
            .field("clients", &self.client_count())
            .finish()
    }
}

impl ShareServer {
    /// A server for `export` (a duplicate of its dma-buf fd), following its
    /// device's hub, with the default [`ServerOptions`].
    pub fn new(export: &BarExport) -> Result<Self> {
        Self::from_parts(
            export.dmabuf().try_clone()?,
            BufferInfo::from_export(export),
            Arc::clone(export.hub()),
        )
    }

    /// A server for any buffer: the dma-buf, what importers are told about it
    /// (`info.size` must be its size, or they refuse it) and the hub whose
    /// changes they are told. Starts the serving thread.
    pub fn from_parts(buf: DmaBuf, info: BufferInfo, hub: Arc<RevocationHub>) -> Result<Self> {
        let wake = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
            .map_err(|e| Error::sys("eventfd", "share server", e.into()))?;
        let shared = Arc::new(Shared {
            buf,
            info,
            hub: Arc::clone(&hub),
            options: Mutex::new(ServerOptions::default()),
            latest: Mutex::new(Latest {
                change: StateChange {
                    state: BufferState::Live,
                    seq: 0,
                },
                last_revocation: None,
            }),
            wake,
            inbox: Mutex::new(Inbox {
                next_id: 1,
                ..Inbox::default()
            }),
            status: Mutex::new(Status::default()),
            status_changed: Condvar::new(),
            read_back: Mutex::new(None),
            log: Mutex::new(None),
        });
        // Subscribe first, then read the state: no change falls in between.
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        let subscription = hub.subscribe(move |change| {
            if let Some(shared) = weak.upgrade() {
                shared.record(change);
            }
        });
        shared.record(&hub.last_change());
        let serving = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("share-server".into())
            .spawn(move || Serving::new(serving).run())
            .map_err(|e| Error::sys("spawn thread", "share server", e))?;
        Ok(Self {
            shared,
            _subscription: subscription,
            thread: Some(thread),
        })
    }

    /// What importers are told about the buffer.
    pub fn info(&self) -> &BufferInfo {
        &self.shared.info
    }

    /// The hub whose changes are forwarded.
    pub fn hub(&self) -> &Arc<RevocationHub> {
        &self.shared.hub
    }

    /// The limits in force.
    pub fn options(&self) -> ServerOptions {
        lock(&self.shared.options).clone()
    }

    /// Sets the limits (for clients from now on; the send and frame
    /// timeouts apply to all at once).
    pub fn set_options(&self, options: ServerOptions) {
        *lock(&self.shared.options) = options;
        self.shared.wake();
    }

    /// Bounds how long a message to a client may stay unsent
    /// ([`ServerOptions::send_timeout`]).
    pub fn set_send_timeout(&self, timeout: Duration) {
        lock(&self.shared.options).send_timeout = timeout;
        self.shared.wake();
    }

    /// Calls `f` for every connection, refusal, drop and accept failure
    /// (on the serving thread: keep it short).
    pub fn set_log(&self, f: impl Fn(&ServerEvent) + Send + Sync + 'static) {
        *lock(&self.shared.log) = Some(Arc::new(f));
    }

    /// The clients served now.
    pub fn client_count(&self) -> usize {
        let st = lock(&self.shared.status);
        st.clients.len() + st.pending
    }

    /// The ids and credentials of the clients served now.
    pub fn clients(&self) -> Vec<(u64, PeerCred)> {
        lock(&self.shared.status).clients.clone()
    }

    /// The ids of the clients served now.
    pub fn client_ids(&self) -> Vec<u64> {
        self.clients().into_iter().map(|(id, _)| id).collect()
    }

    /// How many clients were dropped so far (hung up, stopped reading,
    /// broke the protocol).
    pub fn dropped_count(&self) -> u64 {
        lock(&self.shared.status).dropped
    }

    /// Answers `read-request`s with `f(offset, buf)`, which fills `buf` with
    /// the buffer's bytes at `offset` (a BAR exporter reads its BAR mapping).
    /// Without it, every read is refused: reading back is opt-in. The server
    /// calls it only for ranges inside the buffer, at most [`MAX_READ`]
    /// bytes, only while the hub is live, on its serving thread (keep it
    /// short); if the buffer can be revoked meanwhile (a BAR mapping faults
    /// while memory decode is off) `f` must exclude that itself.
    pub fn set_read_back(&self, f: impl Fn(u64, &mut [u8]) -> Result<()> + Send + Sync + 'static) {
        *lock(&self.shared.read_back) = Some(Arc::new(f));
    }

    /// Takes a connection the caller accepted: checks the peer's
    /// credentials and the client limit, then hands it to the serving thread,
    /// which sends the `offer` (the dma-buf and the newest state) and every
    /// later change. Returns the client's id. A refused connection is closed
    /// before anything is sent ([`ShareProblem::PeerRefused`],
    /// [`ShareProblem::Busy`]).
    pub fn add_client(&self, stream: UnixStream) -> Result<u64> {
        let options = self.options();
        let cred = options.policy.admit(&stream)?;
        self.shared.admit(stream, cred, &options)
    }

    /// Serves connections on `listener` from the serving thread: each is
    /// checked as by [`add_client`](Self::add_client). When `accept` fails
    /// for want of fds (`EMFILE`, `ENFILE`) the server backs off (up to a
    /// second) and logs it at most once a second.
    pub fn listen(&self, listener: UnixListener) -> Result<()> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::sys("fcntl(O_NONBLOCK)", "share listener", e))?;
        lock(&self.shared.inbox).listeners.push(listener);
        self.shared.wake();
        Ok(())
    }

    /// Waits up to `timeout` until every client has been sent the hub's
    /// current state (or dropped); `true` if so. For a clean exit after the
    /// device is closed: the clients hear `gone` before the process ends.
    pub fn flush(&self, timeout: Duration) -> bool {
        let target = lock(&self.shared.latest).change.seq;
        self.shared.wake();
        let deadline = Instant::now().checked_add(timeout);
        let mut st = lock(&self.shared.status);
        loop {
            if st.ended || (st.flushed_seq >= target && st.pending == 0) {
                return true;
            }
            let left = match deadline {
                None => Duration::from_secs(3600),
                Some(d) => d.saturating_duration_since(Instant::now()),
            };
            if left.is_zero() {
                return false;
            }
            st = self
                .shared
                .status_changed
                .wait_timeout(st, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for ShareServer {
    fn drop(&mut self) {
        lock(&self.shared.inbox).stop = true;
        self.shared.wake();
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}

impl Shared {
    /// The hub's observer: records the newest state and wakes the serving
    /// thread. No socket I/O, no lock but `latest`'s: it runs on the
    /// revoking thread, which holds the device's transition lock.
    fn record(&self, change: &StateChange) {
        lock(&self.latest).record(change);
        self.wake();
    }

    fn wake(&self) {
        // Non-blocking; a full counter means a wake-up is pending anyway.
        let _ = self.wake.write(1);
    }

    fn log(&self, event: &ServerEvent) {
        let f = lock(&self.log).clone();
        if let Some(f) = f {
            f(event);
        }
    }

    /// Queues an admitted connection for the serving thread, unless the
    /// server is full.
    fn admit(&self, stream: UnixStream, cred: PeerCred, options: &ServerOptions) -> Result<u64> {
        let busy = |stream: &UnixStream| Error::Share {
            peer: wire::describe_stream(stream),
            problem: ShareProblem::Busy {
                max: options.max_clients,
            },
        };
        {
            let mut st = lock(&self.status);
            if st.clients.len() + st.pending >= options.max_clients {
                return Err(busy(&stream));
            }
            st.pending += 1;
        }
        let prepared = refuse_fds(&stream).and_then(|_| {
            stream
                .set_nonblocking(true)
                .map_err(|e| Error::sys("fcntl(O_NONBLOCK)", wire::describe_stream(&stream), e))
        });
        if let Err(e) = prepared {
            lock(&self.status).pending -= 1;
            return Err(e);
        }
        let mut inbox = lock(&self.inbox);
        let id = inbox.next_id;
        inbox.next_id += 1;
        inbox.streams.push((id, stream, cred));
        drop(inbox);
        self.wake();
        Ok(id)
    }

    fn read(&self, offset: u64, length: u64) -> std::result::Result<Vec<u8>, String> {
        if length == 0 || length > MAX_READ {
            return Err(format!(
                "read of {length} bytes: 1 to {MAX_READ} bytes per request"
            ));
        }
        if offset
            .checked_add(length)
            .is_none_or(|end| end > self.info.size)
        {
            return Err(format!(
                "read of {length} bytes at {offset:#x}: past the end of the {}-byte buffer",
                self.info.size
            ));
        }
        let Some(f) = lock(&self.read_back).clone() else {
            return Err("this exporter does not offer read-back".into());
        };
        let state = self.hub.state();
        if state != BufferState::Live {
            return Err(format!("the buffer is not live ({state:?})"));
        }
        let mut data = vec![0u8; usize::try_from(length).map_err(|e| e.to_string())?];
        f(offset, &mut data).map_err(|e| e.to_string())?;
        Ok(data)
    }
}

/// Reports at most a few events a second, counting the rest.
#[derive(Debug, Default)]
struct RateLimit {
    window: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    const PER_SECOND: u32 = 5;

    /// `Some(suppressed so far)` if this one may be reported.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.in_window = 0;
        }
        if self.in_window < Self::PER_SECOND {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// A frame waiting to be sent; the offer's carries the dma-buf.
struct Outgoing {
    bytes: Vec<u8>,
    sent: usize,
    with_fd: bool,
}

struct Client {
    id: u64,
    stream: UnixStream,
    cred: PeerCred,
    reader: FrameReader,
    out: VecDeque<Outgoing>,
    /// Since when the head of `out` has been waiting.
    out_since: Option<Instant>,
    /// The change it was last told of, and the state it was told.
    told: (u64, BufferState),
    /// Told `gone`: closed once that is sent.
    finished: bool,
}

impl Client {
    fn push(&mut self, bytes: Vec<u8>, with_fd: bool, now: Instant) {
        if self.out.is_empty() {
            self.out_since = Some(now);
        }
        self.out.push_back(Outgoing {
            bytes,
            sent: 0,
            with_fd,
        });
    }
}

/// The serving thread's state.
struct Serving {
    shared: Arc<Shared>,
    listeners: Vec<UnixListener>,
    clients: Vec<Client>,
    accept_paused_until: Option<Instant>,
    backoff: Duration,
    refusals: RateLimit,
    accept_failures: RateLimit,
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Accepts per round, so a flood of connections cannot starve the clients.
const ACCEPTS_PER_ROUND: usize = 32;

impl Serving {
    fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            listeners: Vec::new(),
            clients: Vec::new(),
            accept_paused_until: None,
            backoff: MIN_BACKOFF,
            refusals: RateLimit::default(),
            accept_failures: RateLimit::default(),
        }
    }

    fn run(mut self) {
        loop {
            let now = Instant::now();
            let options = lock(&self.shared.options).clone();
            if self.take_inbox(now) {
                break;
            }
            let latest = *lock(&self.shared.latest);
            self.catch_up(&latest, now);
            self.flush_all(&options, now);
            self.publish(&latest);
            self.wait(&options);
            let now = Instant::now();
            self.accept(&options, now);
            self.read_all(&options, now);
        }
        // Stopping: close every client (their importers see the end).
        self.clients.clear();
        let mut st = lock(&self.shared.status);
        st.clients.clear();
        st.ended = true;
        self.shared.status_changed.notify_all();
    }

    /// Takes new connections and listeners; `true` when told to stop.
    fn take_inbox(&mut self, now: Instant) -> bool {
        let (streams, listeners, stop) = {
            let mut inbox = lock(&self.shared.inbox);
            (
                std::mem::take(&mut inbox.streams),
                std::mem::take(&mut inbox.listeners),
                inbox.stop,
            )
        };
        self.listeners.extend(listeners);
        if !streams.is_empty() {
            let taken = streams.len();
            let latest = *lock(&self.shared.latest);
            for (id, stream, cred) in streams {
                self.offer(id, stream, cred, &latest, now);
            }
            // Published before `pending` goes down, so the count never dips.
            self.publish(&latest);
            let mut st = lock(&self.shared.status);
            st.pending = st.pending.saturating_sub(taken);
        }
        stop
    }

    /// Queues the offer for a new client.
    fn offer(
        &mut self,
        id: u64,
        stream: UnixStream,
        cred: PeerCred,
        latest: &Latest,
        now: Instant,
    ) {
        let frame = match encode_offer(&self.shared.info, latest.change.state) {
            Ok(f) => f,
            Err(problem) => {
                self.shared.log(&ServerEvent::Refused {
                    peer: Some(cred),
                    why: problem.to_string(),
                    suppressed: 0,
                });
                return;
            }
        };
        let mut client = Client {
            id,
            stream,
            cred,
            reader: FrameReader::new(),
            out: VecDeque::new(),
            out_since: None,
            told: (latest.change.seq, latest.change.state),
            finished: false,
        };
        client.push(frame, true, now);
        self.clients.push(client);
        let clients = self.clients.len();
        self.shared.log(&ServerEvent::Connected {
            id,
            peer: cred,
            clients,
        });
    }

    /// Queues, for each client that is idle, what it has not heard yet.
    fn catch_up(&mut self, latest: &Latest, now: Instant) {
        for c in &mut self.clients {
            if !c.out.is_empty() || c.finished {
                continue;
            }
            for msg in latest.catch_up(c.told) {
                if matches!(msg, Message::Gone(_)) {
                    c.finished = true;
                }
                if let Ok(f) = msg.encode() {
                    c.push(f, false, now);
                }
            }
            c.told = (latest.change.seq, latest.change.state);
        }
    }

    /// Sends what each client's socket takes now; drops those whose oldest
    /// message waited too long, or whose socket failed.
    fn flush_all(&mut self, options: &ServerOptions, now: Instant) {
        let buf = self.shared.buf.as_fd();
        let mut dead = Vec::new();
        for (i, c) in self.clients.iter_mut().enumerate() {
            match flush_client(c, buf, now) {
                Ok(()) => {}
                Err(why) => {
                    dead.push((i, why));
                    continue;
                }
            }
            if c.out.is_empty() && c.finished {
                dead.push((i, "told gone".to_owned()));
            } else if c
                .out_since
                .is_some_and(|t| now.duration_since(t) >= options.send_timeout)
            {
                dead.push((
                    i,
                    format!(
                        "did not read its messages for {:?} (send timeout)",
                        options.send_timeout
                    ),
                ));
            }
        }
        self.drop_clients(dead);
    }

    fn drop_clients(&mut self, mut dead: Vec<(usize, String)>) {
        if dead.is_empty() {
            return;
        }
        dead.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        let mut count = 0;
        for (i, why) in dead {
            let c = self.clients.swap_remove(i);
            let told_gone = c.finished && why == "told gone";
            if !told_gone {
                count += 1;
            }
            self.shared.log(&ServerEvent::Dropped {
                id: c.id,
                peer: c.cred,
                why,
            });
        }
        lock(&self.shared.status).dropped += count;
    }

    /// Tells the other threads who is served and how far they were told.
    fn publish(&self, latest: &Latest) {
        let flushed = self
            .clients
            .iter()
            .map(|c| if c.out.is_empty() { c.told.0 } else { 0 })
            .min()
            .unwrap_or(latest.change.seq);
        let mut st = lock(&self.shared.status);
        st.clients = self.clients.iter().map(|c| (c.id, c.cred)).collect();
        st.clients.sort_by_key(|c| c.0);
        st.flushed_seq = flushed;
        self.shared.status_changed.notify_all();
    }

    /// Waits for the wake-up eventfd, a listener, a client, or the next
    /// deadline.
    fn wait(&mut self, options: &ServerOptions) {
        let now = Instant::now();
        let accepting = self.accept_paused_until.is_none_or(|t| now >= t);
        let mut deadline: Option<Instant> = self.accept_paused_until.filter(|t| *t > now);
        for c in &self.clients {
            let d = c
                .out_since
                .and_then(|t| t.checked_add(options.send_timeout))
                .into_iter()
                .chain(
                    c.reader
                        .started()
                        .and_then(|t| t.checked_add(options.frame_timeout)),
                );
            for t in d {
                deadline = Some(deadline.map_or(t, |x| x.min(t)));
            }
        }
        let mut fds = Vec::with_capacity(1 + self.listeners.len() + self.clients.len());
        fds.push(PollFd::new(self.shared.wake.as_fd(), PollFlags::POLLIN));
        if accepting {
            for l in &self.listeners {
                fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
            }
        }
        for c in &self.clients {
            let events = if c.out.is_empty() {
                PollFlags::POLLIN
            } else {
                PollFlags::POLLOUT
            };
            fds.push(PollFd::new(c.stream.as_fd(), events));
        }
        let Some(timeout) = wire::poll_timeout(deadline) else {
            return;
        };
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
        drop(fds);
        // Drain the wake-up counter (non-blocking).
        let _ = self.shared.wake.read();
    }

    fn accept(&mut self, options: &ServerOptions, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| now < t) {
            return;
        }
        self.accept_paused_until = None;
        let mut accepted = Vec::new();
        let mut failure = None;
        'listeners: for l in &self.listeners {
            for _ in 0..ACCEPTS_PER_ROUND {
                match l.accept() {
                    Ok((s, _)) => accepted.push(s),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                        failure = Some(e);
                        break 'listeners;
                    }
                    // ECONNABORTED and the like: that connection only.
                    Err(_) => {}
                }
            }
        }
        if let Some(e) = failure {
            let backoff = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            self.accept_paused_until = now.checked_add(backoff);
            if let Some(suppressed) = self.accept_failures.allow(now) {
                self.shared.log(&ServerEvent::AcceptFailed {
                    error: e.to_string(),
                    backoff,
                    suppressed,
                });
            }
        } else if !accepted.is_empty() {
            self.backoff = MIN_BACKOFF;
        }
        for stream in accepted {
            let cred = match PeerCred::of(&stream) {
                Ok(c) => c,
                Err(e) => {
                    self.report_refusal(None, e.to_string(), now);
                    continue;
                }
            };
            if let Err(problem) = options.policy.check(&cred) {
                self.report_refusal(Some(cred), problem.to_string(), now);
                continue;
            }
            if let Err(e) = self.shared.admit(stream, cred, options) {
                let why = match e {
                    Error::Share { problem, .. } => problem.to_string(),
                    other => other.to_string(),
                };
                self.report_refusal(Some(cred), why, now);
            }
        }
        // The admitted ones are in the inbox: take them now.
        let _ = self.take_inbox(now);
    }

    fn report_refusal(&mut self, peer: Option<PeerCred>, why: String, now: Instant) {
        if let Some(suppressed) = self.refusals.allow(now) {
            self.shared.log(&ServerEvent::Refused {
                peer,
                why,
                suppressed,
            });
        }
    }

    /// Reads what the clients sent; answers read requests; drops the ones
    /// that hung up, broke the protocol or took too long over a request.
    fn read_all(&mut self, options: &ServerOptions, now: Instant) {
        let mut dead = Vec::new();
        for i in 0..self.clients.len() {
            // Nothing is read from a client that has replies waiting.
            if self.clients[i].out.is_empty()
                && let Err(why) = self.read_client(i, now)
            {
                dead.push((i, why));
                continue;
            }
            let c = &self.clients[i];
            if c.reader
                .started()
                .is_some_and(|t| now.duration_since(t) >= options.frame_timeout)
            {
                dead.push((
                    i,
                    format!(
                        "a request stalled after {} bytes for {:?}",
                        c.reader.received(),
                        options.frame_timeout
                    ),
                ));
            }
        }
        self.drop_clients(dead);
    }

    fn read_client(&mut self, i: usize, now: Instant) -> std::result::Result<(), String> {
        let progress = {
            let c = &mut self.clients[i];
            c.reader.read_from(&c.stream).map_err(|e| e.to_string())?
        };
        let frame = match progress {
            Progress::Pending => return Ok(()),
            Progress::Closed => return Err("hung up".into()),
            Progress::Frame(f) => f,
        };
        if frame.kind != Kind::ReadRequest as u16 || !frame.fds.is_empty() {
            return Err(format!(
                "sent a frame of kind {} with {} fds; a client may only send read-requests",
                frame.kind,
                frame.fds.len()
            ));
        }
        let Ok(Incoming::Message(Message::ReadRequest { id, offset, length })) = decode(frame)
        else {
            return Err("sent a malformed read-request".into());
        };
        let reply = Message::ReadReply {
            id,
            offset,
            result: self.shared.read(offset, length),
        };
        let bytes = reply.encode().map_err(|e| e.to_string())?;
        self.clients[i].push(bytes, false, now);
        Ok(())
    }
}

/// Sends what `c`'s socket takes now, without blocking.
fn flush_client(
    c: &mut Client,
    buf: BorrowedFd<'_>,
    now: Instant,
) -> std::result::Result<(), String> {
    while let Some(head) = c.out.front_mut() {
        let fds = [buf];
        let with: &[BorrowedFd<'_>] = if head.with_fd && head.sent == 0 {
            &fds
        } else {
            &[]
        };
        match rights::send_some(&c.stream, &head.bytes[head.sent..], with) {
            Ok(n) => {
                head.sent += n;
                if head.sent == head.bytes.len() {
                    c.out.pop_front();
                    c.out_since = if c.out.is_empty() { None } else { Some(now) };
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => return Err("hung up".into()),
            Err(e) => return Err(format!("sendmsg: {e}")),
        }
    }
    Ok(())
}

// The CLI shares a server between threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ShareServer>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn latest(changes: &[BufferState]) -> Latest {
        let mut l = Latest {
            change: StateChange {
                state: BufferState::Live,
                seq: 0,
            },
            last_revocation: None,
        };
        for (i, s) in changes.iter().enumerate() {
            l.record(&StateChange {
                state: *s,
                seq: i as u64 + 1,
            });
        }
        l
    }

    const OFF: BufferState = BufferState::Revoked(RevokeReason::MemoryDecodeOff);

    #[test]
    fn a_missed_revocation_is_never_coalesced_away() {
        let l = latest(&[OFF, BufferState::Live]);
        assert_eq!(
            l.catch_up((0, BufferState::Live)),
            [
                Message::Revoked(RevokeReason::MemoryDecodeOff),
                Message::Restored
            ]
        );
        assert_eq!(l.catch_up((1, OFF)), [Message::Restored]);
        assert_eq!(l.catch_up((2, BufferState::Live)), []);
    }

    #[test]
    fn newest_state_wins() {
        let l = latest(&[
            OFF,
            BufferState::Live,
            BufferState::Revoked(RevokeReason::Reset),
        ]);
        assert_eq!(
            l.catch_up((0, BufferState::Live)),
            [Message::Revoked(RevokeReason::Reset)]
        );
        let l = latest(&[
            BufferState::Revoked(RevokeReason::Unplug),
            BufferState::Gone(RevokeReason::DeviceClosed),
        ]);
        assert_eq!(
            l.catch_up((0, BufferState::Live)),
            [
                Message::Revoked(RevokeReason::Unplug),
                Message::Gone(RevokeReason::DeviceClosed)
            ]
        );
    }

    #[test]
    fn stale_changes_are_ignored() {
        let mut l = latest(&[OFF, BufferState::Live]);
        l.record(&StateChange { state: OFF, seq: 1 });
        assert_eq!(l.change.state, BufferState::Live);
    }

    #[test]
    fn rate_limit_counts_what_it_hides() {
        let mut r = RateLimit::default();
        let t = Instant::now();
        let shown = (0..100).filter(|_| r.allow(t).is_some()).count();
        assert_eq!(shown, RateLimit::PER_SECOND as usize);
        assert_eq!(r.allow(t + Duration::from_secs(2)), Some(95));
    }
}
