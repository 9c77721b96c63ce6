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

use std::fmt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::unistd::Uid;

use super::events::EventLog;
use super::peer::PeerCred;
use super::serving::Serving;
use super::socket::Listener;
use super::{BufferInfo, RefusalReason, ServerEvent, ShareProblem, wire};
use crate::exporter::bar::BarExport;
use crate::revoke::{Revocable, RevocationHub, Subscription};
use crate::{DmaBuf, Error, Result};

use super::server_options::ServerOptions;
use super::server_state::{Inbox, Latest, Shared, Status, farewell, lock, not_allowed};

/// Serves one exported buffer to importing processes: checks each
/// connection's credentials and whether it has a slot, hands it the
/// dma-buf (an `offer`), then forwards the exporter's state (`revoked`,
/// `restored`, `gone`), pings it when it is quiet and answers
/// `read-request`s if it was given a reader.
///
/// * **Access**: a peer must pass the [`AccessPolicy`](super::AccessPolicy) (same uid, root, or
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
    /// calls it only for ranges inside the buffer, at most [`MAX_READ`](super::MAX_READ)
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

// The CLI shares a server between threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ShareServer>();
};
