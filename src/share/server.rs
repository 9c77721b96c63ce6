//! The exporting side: [`ShareServer`], its limits ([`ServerOptions`]) and
//! who gets a slot.
//!
//! One thread serves every client with `poll` ([`super::serving`]): it
//! accepts (when given a listener), sends offers and state changes, pings
//! idle clients, reads requests. The hub's observer only records the newest
//! state and wakes that thread (an eventfd), so revoking never waits for a
//! socket, and a client that stops reading is dropped after a bounded time
//! without holding up anyone else. What the server logs goes through a
//! bounded queue to a thread of its own ([`super::events`]).

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::unistd::Uid;

use super::events::EventLog;
use super::peer::{AccessPolicy, PeerCred, refuse_fds};
use super::serving::Serving;
use super::socket::Listener;
use super::{
    BufferInfo, MAX_READ, Message, RefusalReason, ServerEvent, ShareProblem, rights, wire,
};
use crate::exporter::bar::BarExport;
use crate::revoke::{
    BufferState, Revocable, RevocationHub, RevokeReason, StateChange, Subscription,
};
use crate::{DmaBuf, Error, Result};

/// A reader of the shared buffer's bytes for `read-request`s: fills the slice
/// with the bytes at the buffer offset. See [`ShareServer::set_read_back`].
pub type ReadBack = dyn Fn(u64, &mut [u8]) -> Result<()> + Send + Sync;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The limits a [`ShareServer`] keeps. Slots are shared out so that no one
/// can take them all: at most [`max_clients`](Self::max_clients) in all, of
/// which [`owner_reserved`](Self::owner_reserved) only the exporter's own
/// user may take; at most [`max_per_uid`](Self::max_per_uid) for any other
/// uid, and [`max_per_process`](Self::max_per_process) for any one process.
/// A client that does not answer a ping, read its messages or finish a
/// request in time loses its slot.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerOptions {
    /// Who may connect (checked with `SO_PEERCRED` before anything is sent).
    pub policy: AccessPolicy,
    /// The most clients served at once.
    pub max_clients: usize,
    /// Slots only processes of the exporter's own effective uid may take:
    /// other users together get at most `max_clients - owner_reserved`.
    pub owner_reserved: usize,
    /// The most clients of one uid other than the exporter's.
    pub max_per_uid: usize,
    /// The most clients of one process (by the pid `SO_PEERCRED` gives;
    /// peers whose pid the kernel does not know, 0, are not counted).
    pub max_per_process: usize,
    /// How long a message to a client may stay unsent (its socket full)
    /// before the client is dropped.
    pub send_timeout: Duration,
    /// How long a client's message may take from its first byte to its last.
    pub frame_timeout: Duration,
    /// A client the server has heard nothing from for this long is sent a
    /// `ping`.
    pub ping_interval: Duration,
    /// And dropped if its `pong` does not arrive within this.
    pub ping_timeout: Duration,
}

impl Default for ServerOptions {
    /// 64 clients, 16 of them kept for the exporter's own user, 16 per other
    /// uid, 8 per process; 1 s to take a message, 5 s to send one, a ping
    /// after 10 s of silence, answered within 10 s.
    fn default() -> Self {
        Self {
            policy: AccessPolicy::same_user(),
            max_clients: 64,
            owner_reserved: 16,
            max_per_uid: 16,
            max_per_process: 8,
            send_timeout: Duration::from_secs(1),
            frame_timeout: wire::DEFAULT_FRAME_TIMEOUT,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(10),
        }
    }
}

impl ServerOptions {
    /// These options for `n` clients, the shares scaled to it: a quarter
    /// kept for the owner, a quarter per other uid, an eighth per process
    /// (at least one each).
    ///
    /// ```
    /// use dmabuf_p2p::share::ServerOptions;
    /// let o = ServerOptions::default().with_max_clients(1000);
    /// assert_eq!((o.owner_reserved, o.max_per_uid, o.max_per_process), (250, 250, 125));
    /// ```
    pub fn with_max_clients(mut self, n: usize) -> Self {
        self.max_clients = n;
        self.owner_reserved = n / 4;
        self.max_per_uid = (n / 4).max(1);
        self.max_per_process = (n / 8).max(1);
        self
    }
}

/// Serves one exported buffer to importing processes: checks each
/// connection's credentials and whether it has a slot, hands it the
/// dma-buf (an `offer`), then forwards the exporter's state (`revoked`,
/// `restored`, `gone`), pings it when it is quiet and answers
/// `read-request`s if it was given a reader.
///
/// * **Access**: a peer must pass the [`AccessPolicy`] (same uid, root, or
///   allowed) and find a slot ([`ServerOptions`]: a total, a share per uid
///   and per process, room kept for the exporter's own user) before the
///   offer is sent; one that does not is told why (a `refused` message) and
///   closed. The server's sockets refuse fds from clients (`SO_PASSRIGHTS`
///   off, where the kernel has it).
/// * **Never told live while revoking**: an offer, and every `restored`,
///   is sent while no state change of the exporter is under way (the hub's
///   transition lock, taken without waiting), and says the state it was
///   sent in, with its number.
/// * **Revocation is never delayed by a client**: the hub's observer only
///   records the newest state; one thread sends it to each client without
///   blocking. Every client hears the newest state, and a revocation it
///   missed while a restore followed it is sent first (`revoked`, then
///   `restored`), so no importer keeps a dead mapping it thinks is live.
///   The log is fed through a bounded queue, so not even a log that blocks
///   can hold that thread.
/// * **Bounded**: a message unsent for [`ServerOptions::send_timeout`]
///   drops its client, so does a message that does not complete within
///   [`ServerOptions::frame_timeout`], a ping not answered within
///   [`ServerOptions::ping_timeout`], a message with an fd, or anything but
///   a `read-request` or a `pong`.
///
/// Dropping the server disconnects every client and removes the sockets
/// [`bind_listener`](super::bind_listener) made for it.
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
/// server.set_log(|event| eprintln!("{event}"))?;
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

pub(super) struct Shared {
    pub(super) buf: DmaBuf,
    pub(super) info: BufferInfo,
    pub(super) hub: Arc<RevocationHub>,
    /// The exporter's effective uid: whose importers the reserve is for.
    pub(super) me: u32,
    pub(super) options: Mutex<ServerOptions>,
    pub(super) latest: Mutex<Latest>,
    pub(super) wake: EventFd,
    pub(super) inbox: Mutex<Inbox>,
    pub(super) status: Mutex<Status>,
    pub(super) status_changed: Condvar,
    read_back: Mutex<Option<Arc<ReadBack>>>,
    pub(super) log: Arc<EventLog>,
}

/// The newest state the hub reported, and its last revocation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Latest {
    pub(super) change: StateChange,
    /// The `seq` and reason of the last change to a revoked state.
    last_revocation: Option<(u64, RevokeReason)>,
}

impl Latest {
    fn new() -> Self {
        Self {
            change: StateChange {
                state: BufferState::Live,
                seq: 0,
            },
            last_revocation: None,
        }
    }

    pub(super) fn record(&mut self, change: &StateChange) {
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
    pub(super) fn catch_up(&self, told: (u64, BufferState)) -> Vec<Message> {
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

/// A connection admitted but not yet taken by the serving thread.
pub(super) struct Admitted {
    pub(super) id: u64,
    pub(super) stream: UnixStream,
    pub(super) cred: PeerCred,
}

#[derive(Default)]
pub(super) struct Inbox {
    pub(super) streams: Vec<Admitted>,
    pub(super) listeners: Vec<Listener>,
    pub(super) stop: bool,
}

#[derive(Debug, Default)]
pub(super) struct Status {
    /// Every client holding a slot (admitted and not dropped), by id.
    pub(super) admitted: BTreeMap<u64, PeerCred>,
    pub(super) next_id: u64,
    /// Admitted but not yet taken by the serving thread.
    pub(super) pending: usize,
    pub(super) dropped: u64,
    /// Every client has been sent everything up to this change.
    pub(super) flushed_seq: u64,
    pub(super) ended: bool,
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
            me: Uid::effective().as_raw(),
            options: Mutex::new(ServerOptions::default()),
            latest: Mutex::new(Latest::new()),
            wake,
            inbox: Mutex::new(Inbox::default()),
            status: Mutex::new(Status {
                next_id: 1,
                ..Status::default()
            }),
            status_changed: Condvar::new(),
            read_back: Mutex::new(None),
            log: Arc::new(EventLog::default()),
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

    /// Sets the limits (the slot limits for clients from now on; the
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

    /// Calls `f` for every connection, refusal, drop and accept failure,
    /// rate-limited ([`ServerEvent`]), on a thread of its own: `f` may block
    /// (a log pipe nobody reads) without delaying any message to a client.
    /// Events that arrive while 256 are waiting for `f` are lost and
    /// counted ([`ServerEvent::LogLost`]).
    pub fn set_log(&self, f: impl Fn(&ServerEvent) + Send + Sync + 'static) -> Result<()> {
        self.shared.log.set(Arc::new(f))
    }

    /// The clients served now.
    pub fn client_count(&self) -> usize {
        lock(&self.shared.status).admitted.len()
    }

    /// The ids and credentials of the clients served now.
    pub fn clients(&self) -> Vec<(u64, PeerCred)> {
        lock(&self.shared.status)
            .admitted
            .iter()
            .map(|(id, c)| (*id, *c))
            .collect()
    }

    /// The ids of the clients served now.
    pub fn client_ids(&self) -> Vec<u64> {
        self.clients().into_iter().map(|(id, _)| id).collect()
    }

    /// How many clients were dropped so far (hung up, stopped reading or
    /// answering, broke the protocol).
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
    /// credentials and whether it has a slot, then hands it to the serving
    /// thread, which sends the `offer` (the dma-buf and the newest state)
    /// and every later change. Returns the client's id. A refused
    /// connection is told why (a `refused` message, nothing else) and
    /// closed: [`ShareProblem::PeerRefused`], [`ShareProblem::NotServed`].
    pub fn add_client(&self, stream: UnixStream) -> Result<u64> {
        let options = self.options();
        let name = wire::describe_stream(&stream);
        let cred = match options.policy.admit_as(&stream, &name) {
            Ok(c) => c,
            Err(e) => {
                if let Error::Share {
                    problem: ShareProblem::PeerRefused { uid, .. },
                    ..
                } = &e
                {
                    farewell(&stream, RefusalReason::NotAllowed, &not_allowed(*uid));
                }
                return Err(e);
            }
        };
        self.shared.admit(stream, cred, name, &options)
    }

    /// Serves connections on `listener` (made by
    /// [`bind_listener`](super::bind_listener), or any `UnixListener`)
    /// from the serving thread: each is checked as by
    /// [`add_client`](Self::add_client). When `accept` fails for want of fds
    /// (`EMFILE`, `ENFILE`) the server backs off (up to a second). The
    /// server keeps the listener; a socket file `bind_listener` made is
    /// removed when the server is dropped.
    pub fn listen(&self, listener: impl Into<Listener>) -> Result<()> {
        let listener = listener.into();
        listener
            .unix()
            .set_nonblocking(true)
            .map_err(|e| Error::sys("fcntl(O_NONBLOCK)", listener.name().to_owned(), e))?;
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
        // What is queued is delivered if the log keeps up; a stuck log is
        // left behind (it holds no fd of the server).
        self.shared.log.stop(Duration::from_millis(200));
    }
}

/// The text a peer that may not connect is told: its uid, not who may.
pub(super) fn not_allowed(uid: u32) -> String {
    format!("uid {uid} may not connect to this exporter")
}

/// Tells a client it is turned away, without waiting: one non-blocking
/// `sendmsg` of a `refused` message (a fresh socket has room for it; a full
/// one is not waited for).
pub(super) fn farewell(stream: &UnixStream, reason: RefusalReason, message: &str) {
    let msg = Message::Refused {
        reason,
        message: message.to_owned(),
    };
    if let Ok(frame) = msg.encode() {
        let _ = rights::send_some(stream, &frame, &[]);
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

    pub(super) fn wake(&self) {
        // Non-blocking; a full counter means a wake-up is pending anyway.
        let _ = self.wake.write(1);
    }

    /// Whether `cred` gets a slot besides the clients in `admitted`; if not,
    /// why.
    fn slot_for(
        &self,
        cred: &PeerCred,
        admitted: &BTreeMap<u64, PeerCred>,
        options: &ServerOptions,
    ) -> std::result::Result<(), (RefusalReason, String)> {
        slot_for(self.me, cred, admitted, options)
    }

    /// Gives an allowed connection a slot and queues it for the serving
    /// thread; one without a slot is told why and closed.
    pub(super) fn admit(
        &self,
        stream: UnixStream,
        cred: PeerCred,
        name: String,
        options: &ServerOptions,
    ) -> Result<u64> {
        let verdict = {
            let mut st = lock(&self.status);
            match self.slot_for(&cred, &st.admitted, options) {
                Err(why) => Err(why),
                Ok(()) => {
                    let id = st.next_id;
                    st.next_id += 1;
                    st.admitted.insert(id, cred);
                    st.pending += 1;
                    Ok(id)
                }
            }
        };
        let id = match verdict {
            Ok(id) => id,
            Err((reason, message)) => {
                farewell(&stream, reason, &message);
                return Err(Error::Share {
                    peer: name,
                    problem: ShareProblem::NotServed { reason, message },
                });
            }
        };
        let prepared = refuse_fds(&stream).and_then(|_| {
            stream
                .set_nonblocking(true)
                .map_err(|e| Error::sys("fcntl(O_NONBLOCK)", name.clone(), e))
        });
        if let Err(e) = prepared {
            let mut st = lock(&self.status);
            st.admitted.remove(&id);
            st.pending -= 1;
            return Err(e);
        }
        lock(&self.inbox)
            .streams
            .push(Admitted { id, stream, cred });
        self.wake();
        Ok(id)
    }

    pub(super) fn read(&self, offset: u64, length: u64) -> std::result::Result<Vec<u8>, String> {
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

/// Whether `cred` gets a slot besides the clients in `admitted`, on a
/// server of uid `me`; if not, why.
fn slot_for(
    me: u32,
    cred: &PeerCred,
    admitted: &BTreeMap<u64, PeerCred>,
    options: &ServerOptions,
) -> std::result::Result<(), (RefusalReason, String)> {
    let count = |f: &dyn Fn(&PeerCred) -> bool| admitted.values().filter(|c| f(c)).count();
    if admitted.len() >= options.max_clients {
        return Err((
            RefusalReason::Full,
            format!("all {} slots are taken", options.max_clients),
        ));
    }
    if cred.uid != me {
        let open = options.max_clients.saturating_sub(options.owner_reserved);
        if count(&|c| c.uid != me) >= open {
            return Err((
                RefusalReason::Reserved,
                format!(
                    "the slots left are kept for uid {}'s own importers ({open} of {} are for other users, all taken)",
                    me, options.max_clients
                ),
            ));
        }
        if count(&|c| c.uid == cred.uid) >= options.max_per_uid {
            return Err((
                RefusalReason::UidShare,
                format!(
                    "uid {} has {} clients, the most one uid may have",
                    cred.uid, options.max_per_uid
                ),
            ));
        }
    }
    if cred.pid > 0 && count(&|c| c.pid == cred.pid) >= options.max_per_process {
        return Err((
            RefusalReason::ProcessShare,
            format!(
                "pid {} has {} clients, the most one process may have",
                cred.pid, options.max_per_process
            ),
        ));
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
        let mut l = Latest::new();
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

    /// The shares: the total, the owner's reserve, per uid, per process.
    #[test]
    fn slots_are_shared_out() {
        let me = Uid::effective().as_raw();
        let other = me.wrapping_add(1000);
        let options = ServerOptions {
            max_clients: 8,
            owner_reserved: 2,
            max_per_uid: 4,
            max_per_process: 3,
            ..ServerOptions::default()
        };
        let mut admitted = BTreeMap::new();
        let slot = |admitted: &BTreeMap<u64, PeerCred>, uid: u32, pid: i32| {
            slot_for(me, &PeerCred { pid, uid, gid: 0 }, admitted, &options)
                .err()
                .map(|(r, _)| r)
        };
        // Another uid: 4 of it, from two processes (3 + 1).
        for (i, pid) in [10, 10, 10].into_iter().enumerate() {
            assert_eq!(slot(&admitted, other, pid), None);
            admitted.insert(
                i as u64,
                PeerCred {
                    pid,
                    uid: other,
                    gid: 0,
                },
            );
        }
        assert_eq!(
            slot(&admitted, other, 10),
            Some(RefusalReason::ProcessShare)
        );
        assert_eq!(slot(&admitted, other, 11), None);
        admitted.insert(
            3,
            PeerCred {
                pid: 11,
                uid: other,
                gid: 0,
            },
        );
        assert_eq!(slot(&admitted, other, 12), Some(RefusalReason::UidShare));
        // A third uid gets the 2 slots left for others, then the reserve
        // holds; the owner still gets in, up to the total.
        let third = me.wrapping_add(2000);
        for i in 4..6 {
            assert_eq!(slot(&admitted, third, 20 + i), None);
            admitted.insert(
                i as u64,
                PeerCred {
                    pid: 20 + i,
                    uid: third,
                    gid: 0,
                },
            );
        }
        assert_eq!(slot(&admitted, third, 30), Some(RefusalReason::Reserved));
        for i in 6..8 {
            assert_eq!(slot(&admitted, me, 40 + i), None);
            admitted.insert(
                i as u64,
                PeerCred {
                    pid: 40 + i,
                    uid: me,
                    gid: 0,
                },
            );
        }
        assert_eq!(slot(&admitted, me, 50), Some(RefusalReason::Full));
    }
}
