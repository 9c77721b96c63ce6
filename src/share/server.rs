//! The exporting side: [`ShareServer`].

use std::fmt;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{BufferInfo, Incoming, MAX_READ, Message, encode_offer, recv, send_message, wire};
use crate::exporter::vfio::BarExport;
use crate::revoke::{BufferState, Revocable, RevocationHub, StateChange, Subscription};
use crate::{DmaBuf, Error, Result};

/// A reader of the shared buffer's bytes for `read-request`s: fills the slice
/// with the bytes at the buffer offset. See [`ShareServer::set_read_back`].
pub type ReadBack = dyn Fn(u64, &mut [u8]) -> Result<()> + Send + Sync;

/// The default bound on one send to a client ([`ShareServer::set_send_timeout`]).
const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Serves one exported buffer to any number of importing processes: hands
/// each connection the dma-buf (an `offer`), then forwards every change of the
/// exporter's hub (`revoked`, `restored`, `gone`) and answers `read-request`s.
///
/// Sending never blocks the exporter for long: sends are non-blocking and
/// `MSG_NOSIGNAL`; a client whose socket stays full for the send timeout
/// (default 1 s), or is closed (`EPIPE`), is dropped. Each client has a thread
/// that reads its requests and drops it when it hangs up. Dropping the server
/// disconnects every client.
///
/// ```no_run
/// use std::os::unix::net::UnixListener;
/// use dmabuf_p2p::share::ShareServer;
/// use dmabuf_p2p::{ByteRange, Iommufd, VfioPciDevice};
///
/// let iommufd = Iommufd::open()?;
/// let mut dev = VfioPciDevice::open("0000:02:00.0".parse()?)?;
/// dev.bind(&iommufd)?;
/// dev.set_memory_decode(true)?;
/// let export = dev.export_bar(2, &[ByteRange::new(0, 64 << 10)])?;
/// let server = ShareServer::new(&export)?;
/// for conn in UnixListener::bind("/tmp/bar.sock")?.incoming() {
///     let id = server.add_client(conn?)?;
///     eprintln!("client {id}: {} connected", server.client_count());
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ShareServer {
    shared: Arc<Shared>,
    _subscription: Subscription,
    readers: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    buf: DmaBuf,
    info: BufferInfo,
    hub: Arc<RevocationHub>,
    clients: Mutex<Clients>,
    send_timeout: Mutex<Duration>,
    read_back: Mutex<Option<Arc<ReadBack>>>,
    dropped: AtomicU64,
}

struct Clients {
    next_id: u64,
    list: Vec<Arc<Client>>,
}

struct Client {
    id: u64,
    stream: UnixStream,
    /// One frame at a time on this stream (events and replies come from
    /// different threads).
    write: Mutex<()>,
    /// The last hub change this client was told about.
    seen: AtomicU64,
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
    /// device's hub.
    pub fn new(export: &BarExport) -> Result<Self> {
        Ok(Self::from_parts(
            export.dmabuf().try_clone()?,
            BufferInfo::from_export(export),
            Arc::clone(export.hub()),
        ))
    }

    /// A server for any buffer: the dma-buf, what importers are told about it
    /// (`info.size` must be its size, or they refuse it) and the hub whose
    /// changes they are told.
    pub fn from_parts(buf: DmaBuf, info: BufferInfo, hub: Arc<RevocationHub>) -> Self {
        let shared = Arc::new(Shared {
            buf,
            info,
            hub: Arc::clone(&hub),
            clients: Mutex::new(Clients {
                next_id: 1,
                list: Vec::new(),
            }),
            send_timeout: Mutex::new(DEFAULT_SEND_TIMEOUT),
            read_back: Mutex::new(None),
            dropped: AtomicU64::new(0),
        });
        let weak: Weak<Shared> = Arc::downgrade(&shared);
        let subscription = hub.subscribe(move |change| {
            if let Some(shared) = weak.upgrade() {
                shared.broadcast(change);
            }
        });
        Self {
            shared,
            _subscription: subscription,
            readers: Mutex::new(Vec::new()),
        }
    }

    /// What importers are told about the buffer.
    pub fn info(&self) -> &BufferInfo {
        &self.shared.info
    }

    /// The hub whose changes are forwarded.
    pub fn hub(&self) -> &Arc<RevocationHub> {
        &self.shared.hub
    }

    /// The clients connected now.
    pub fn client_count(&self) -> usize {
        lock(&self.shared.clients).list.len()
    }

    /// The ids of the clients connected now.
    pub fn client_ids(&self) -> Vec<u64> {
        lock(&self.shared.clients)
            .list
            .iter()
            .map(|c| c.id)
            .collect()
    }

    /// How many clients were dropped so far (hung up, dead, stuck, or broke
    /// the protocol).
    pub fn dropped_count(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Bounds each send to a client (default 1 s): a client whose socket
    /// stays full that long is dropped.
    pub fn set_send_timeout(&self, timeout: Duration) {
        *lock(&self.shared.send_timeout) = timeout;
    }

    /// Answers `read-request`s with `f(offset, buf)`, which fills `buf` with
    /// the buffer's bytes at `offset` (a BAR exporter reads its BAR mapping).
    /// The server calls it only for ranges inside the buffer, at most
    /// [`MAX_READ`] bytes, and only while the hub is live; it runs on the
    /// client's thread, so if the buffer can be revoked meanwhile (a BAR
    /// mapping faults while memory decode is off) `f` must exclude that
    /// itself.
    pub fn set_read_back(&self, f: impl Fn(u64, &mut [u8]) -> Result<()> + Send + Sync + 'static) {
        *lock(&self.shared.read_back) = Some(Arc::new(f));
    }

    /// Takes a connection: sends it the `offer` (the dma-buf and the hub's
    /// current state), then forwards every later change to it, and starts
    /// its reader thread. Returns the client's id. On error the connection
    /// is closed and not kept.
    pub fn add_client(&self, stream: UnixStream) -> Result<u64> {
        let peer = wire::describe_stream(&stream);
        stream
            .set_nonblocking(false)
            .map_err(|e| Error::sys("fcntl(O_NONBLOCK off)", peer.clone(), e))?;
        let timeout = self.shared.send_timeout();
        let client = {
            // Under the clients lock, so no change is broadcast between the
            // state read here and the client joining the list.
            let mut clients = lock(&self.shared.clients);
            let change = self.shared.hub.last_change();
            let frame = encode_offer(&self.shared.info, change.state)
                .map_err(|problem| Error::Share { peer, problem })?;
            wire::send_raw(&stream, &frame, &[self.shared.buf.as_fd()], Some(timeout))?;
            let id = clients.next_id;
            clients.next_id += 1;
            let client = Arc::new(Client {
                id,
                stream,
                write: Mutex::new(()),
                seen: AtomicU64::new(change.seq),
            });
            clients.list.push(Arc::clone(&client));
            client
        };
        let shared = Arc::clone(&self.shared);
        let reader = Arc::clone(&client);
        let spawned = std::thread::Builder::new()
            .name(format!("share-client-{}", client.id))
            .spawn(move || shared.serve_client(&reader));
        match spawned {
            Ok(handle) => {
                let mut readers = lock(&self.readers);
                readers.retain(|h| !h.is_finished());
                readers.push(handle);
                Ok(client.id)
            }
            Err(e) => {
                self.shared.drop_client(client.id);
                Err(Error::sys(
                    "spawn thread",
                    wire::describe_stream(&client.stream),
                    e,
                ))
            }
        }
    }
}

impl Drop for ShareServer {
    fn drop(&mut self) {
        let clients: Vec<Arc<Client>> = std::mem::take(&mut lock(&self.shared.clients).list);
        for c in &clients {
            // Wakes its reader thread (end of stream).
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        let readers = std::mem::take(&mut *lock(&self.readers));
        for h in readers {
            let _ = h.join();
        }
    }
}

impl Shared {
    fn send_timeout(&self) -> Duration {
        *lock(&self.send_timeout)
    }

    /// Tells every client that has not heard of it yet about `change`;
    /// drops the clients that cannot be told.
    fn broadcast(&self, change: &StateChange) {
        let msg = Message::for_state(change.state);
        let Ok(frame) = msg.encode() else { return };
        let timeout = self.send_timeout();
        // The clients lock is held while sending, so clients hear the changes
        // in order; every send is bounded by `timeout`.
        let mut clients = lock(&self.clients);
        let mut dead = Vec::new();
        for c in &clients.list {
            if c.seen.load(Ordering::Relaxed) >= change.seq {
                continue;
            }
            c.seen.store(change.seq, Ordering::Relaxed);
            let sent = {
                let _w = lock(&c.write);
                wire::send_raw(&c.stream, &frame, &[], Some(timeout))
            };
            if sent.is_err() {
                let _ = c.stream.shutdown(Shutdown::Both);
                dead.push(c.id);
            }
        }
        if !dead.is_empty() {
            clients.list.retain(|c| !dead.contains(&c.id));
            self.dropped.fetch_add(dead.len() as u64, Ordering::Relaxed);
        }
    }

    fn drop_client(&self, id: u64) {
        let mut clients = lock(&self.clients);
        let before = clients.list.len();
        clients.list.retain(|c| c.id != id);
        if clients.list.len() < before {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A client's thread: answers its read requests until it hangs up or
    /// breaks the protocol, then drops it.
    fn serve_client(&self, client: &Client) {
        // Until it hangs up, errs, or sends something an importer must not.
        while let Ok(Some(Incoming::Message(Message::ReadRequest { id, offset, length }))) =
            recv(&client.stream)
        {
            let reply = Message::ReadReply {
                id,
                offset,
                result: self.read(offset, length),
            };
            let sent = {
                let _w = lock(&client.write);
                send_message(&client.stream, &reply, Some(self.send_timeout()))
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = client.stream.shutdown(Shutdown::Both);
        self.drop_client(client.id);
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
        let state = self.hub.state();
        if state != BufferState::Live {
            return Err(format!("the buffer is not live ({state:?})"));
        }
        let Some(f) = lock(&self.read_back).clone() else {
            return Err("this exporter does not offer read-back".into());
        };
        let mut data = vec![0u8; usize::try_from(length).map_err(|e| e.to_string())?];
        f(offset, &mut data).map_err(|e| e.to_string())?;
        Ok(data)
    }
}

// The CLI shares a server between its accept thread and its main thread.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ShareServer>();
};
