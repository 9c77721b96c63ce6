//! The serving thread of a [`ShareServer`](super::ShareServer): one `poll`
//! loop that accepts, offers, forwards state changes, pings, reads requests
//! and drops whoever breaks a limit, never blocking on a client.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, poll};

use super::events::{Churn, Limits};
use super::peer::PeerCred;
use super::server_options::ServerOptions;
use super::server_state::{Admitted, Latest, Shared, farewell, lock, not_allowed};
use super::socket::Listener;
use super::wire::{self, FrameReader, Progress};
use super::{
    Incoming, Kind, Message, RefusalReason, ServerEvent, ShareProblem, decode, encode_offer_at,
    rights,
};
use crate::Error;
use crate::revoke::BufferState;

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
    /// Sent its offer (queued, at least).
    offered: bool,
    /// The change it was last told of, and the state it was told.
    told: (u64, BufferState),
    /// Told `gone`: closed once that is sent.
    finished: bool,
    /// When its last whole message arrived (or it was taken on).
    heard: Instant,
    /// The ping it owes an answer to, and when that was queued.
    ping: Option<(u64, Instant)>,
    next_ping: u64,
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

    /// When its next ping is due, or its pong overdue.
    fn ping_due(&self, options: &ServerOptions) -> Option<Instant> {
        match self.ping {
            Some((_, at)) => at.checked_add(options.ping_timeout),
            None if self.offered && self.out.is_empty() && !self.finished => {
                self.heard.checked_add(options.ping_interval)
            }
            None => None,
        }
    }
}

/// Why a client is dropped: the reason it is told (none when it hung up or
/// was told `gone`) and the words for the log.
struct Dropping {
    at: usize,
    reason: Option<RefusalReason>,
    why: String,
}

/// The serving thread's state.
pub(super) struct Serving {
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
    clients: Vec<Client>,
    accept_paused_until: Option<Instant>,
    backoff: Duration,
    limits: Limits,
    /// A state message waits for the exporter's transition to end.
    state_retry: bool,
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Accepts per round, so a flood of connections cannot starve the clients.
const ACCEPTS_PER_ROUND: usize = 32;
/// How soon to try again when the exporter is in a transition.
const STATE_RETRY: Duration = Duration::from_millis(1);

impl Serving {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            listeners: Vec::new(),
            clients: Vec::new(),
            accept_paused_until: None,
            backoff: MIN_BACKOFF,
            limits: Limits::default(),
            state_retry: false,
        }
    }

    pub(super) fn run(mut self) {
        loop {
            let now = Instant::now();
            let options = lock(&self.shared.options).clone();
            if self.take_inbox(now) {
                break;
            }
            self.tell_state(now);
            self.keep_alive(&options, now);
            self.flush_all(&options, now);
            self.publish();
            for e in self.limits.overdue(now) {
                self.shared.log.push(e);
            }
            self.wait(&options);
            let now = Instant::now();
            self.accept(&options, now);
            self.read_all(&options, now);
        }
        // Stopping: close every client (their importers see the end).
        self.clients.clear();
        self.listeners.clear();
        let mut st = lock(&self.shared.status);
        st.admitted.clear();
        st.ended = true;
        self.shared.status_changed.notify_all();
    }

    fn log(&mut self, kind: Churn, now: Instant, event: impl FnOnce(u64) -> ServerEvent) {
        if let Some(suppressed) = self.limits.allow(kind, now) {
            self.shared.log.push(event(suppressed));
        }
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
        if streams.is_empty() {
            return stop;
        }
        let taken = streams.len();
        for Admitted { id, stream, cred } in streams {
            self.clients.push(Client {
                id,
                stream,
                cred,
                reader: FrameReader::new(),
                out: VecDeque::new(),
                out_since: None,
                offered: false,
                told: (0, BufferState::Live),
                finished: false,
                heard: now,
                ping: None,
                next_ping: 1,
            });
            let clients = self.clients.len();
            self.log(Churn::Connected, now, |suppressed| ServerEvent::Connected {
                id,
                peer: cred,
                clients,
                suppressed,
            });
        }
        let mut st = lock(&self.shared.status);
        st.pending = st.pending.saturating_sub(taken);
        stop
    }

    /// Sends each new client its offer, and each idle one the state changes
    /// it has not heard. What says the buffer is live (an offer in the live
    /// state, `restored`) is sent only while no transition of the exporter
    /// is under way: with the hub's transition lock, taken without waiting
    /// (else tried again in a millisecond). A revoking thread holds that
    /// lock from before it changes what the kernel does until the hub (and
    /// so `latest`) says so; under it the state read here is the kernel's,
    /// and a message saying `live` is in the client's socket before any
    /// later revocation starts. What says "not live" needs no lock: at worst
    /// it is a moment early, and the `restored` that follows says so. Only
    /// non-blocking sends of a client's first frames happen under the lock.
    fn tell_state(&mut self, now: Instant) {
        self.state_retry = false;
        let seen = *lock(&self.shared.latest);
        let needed = self
            .clients
            .iter()
            .any(|c| !c.offered || (c.out.is_empty() && !c.finished && c.told.0 < seen.change.seq));
        if !needed {
            return;
        }
        let hub = Arc::clone(&self.shared.hub);
        let transition = if seen.change.state == BufferState::Live {
            match hub.try_lock_transitions() {
                Some(g) => Some(g),
                None => {
                    self.state_retry = true;
                    return;
                }
            }
        } else {
            None
        };
        // Under the lock, the newest state (it cannot change meanwhile);
        // without it, the not-live state seen (a newer one may be live).
        let latest: Latest = if transition.is_some() {
            *lock(&self.shared.latest)
        } else {
            seen
        };
        let buf = self.shared.buf.as_fd();
        let mut dead = Vec::new();
        for (i, c) in self.clients.iter_mut().enumerate() {
            if !c.offered {
                match encode_offer_at(&self.shared.info, latest.change) {
                    Ok(f) => c.push(f, true, now),
                    Err(problem) => {
                        dead.push(Dropping {
                            at: i,
                            reason: Some(RefusalReason::Other),
                            why: format!("its offer could not be made: {problem}"),
                        });
                        continue;
                    }
                }
                c.offered = true;
                c.finished = matches!(latest.change.state, BufferState::Gone(_));
            } else if c.out.is_empty() && !c.finished {
                for msg in latest.catch_up(c.told) {
                    if matches!(msg, Message::Gone(_)) {
                        c.finished = true;
                    }
                    if let Ok(f) = msg.encode() {
                        c.push(f, false, now);
                    }
                }
            } else {
                continue;
            }
            c.told = (latest.change.seq, latest.change.state);
            if let Err(why) = flush_client(c, buf, now) {
                dead.push(Dropping {
                    at: i,
                    reason: None,
                    why,
                });
            }
        }
        drop(transition);
        self.drop_clients(dead, now);
    }

    /// Pings the clients that have been quiet; drops the ones that did not
    /// answer in time.
    fn keep_alive(&mut self, options: &ServerOptions, now: Instant) {
        let mut dead = Vec::new();
        for (i, c) in self.clients.iter_mut().enumerate() {
            let Some(due) = c.ping_due(options) else {
                continue;
            };
            if now < due {
                continue;
            }
            if c.ping.is_some() {
                dead.push(Dropping {
                    at: i,
                    reason: Some(RefusalReason::Idle),
                    why: format!("did not answer a ping within {:?}", options.ping_timeout),
                });
                continue;
            }
            let id = c.next_ping;
            c.next_ping += 1;
            if let Ok(f) = (Message::Ping { id }).encode() {
                c.push(f, false, now);
                c.ping = Some((id, now));
            }
        }
        self.drop_clients(dead, now);
    }

    /// Sends what each client's socket takes now; drops those whose oldest
    /// message waited too long, or whose socket failed.
    fn flush_all(&mut self, options: &ServerOptions, now: Instant) {
        let buf = self.shared.buf.as_fd();
        let mut dead = Vec::new();
        for (i, c) in self.clients.iter_mut().enumerate() {
            if let Err(why) = flush_client(c, buf, now) {
                dead.push(Dropping {
                    at: i,
                    reason: None,
                    why,
                });
                continue;
            }
            if c.out.is_empty() && c.finished {
                dead.push(Dropping {
                    at: i,
                    reason: None,
                    why: "told gone".to_owned(),
                });
            } else if c
                .out_since
                .is_some_and(|t| now.duration_since(t) >= options.send_timeout)
            {
                dead.push(Dropping {
                    at: i,
                    reason: Some(RefusalReason::NotReading),
                    why: format!(
                        "did not read its messages for {:?} (send timeout)",
                        options.send_timeout
                    ),
                });
            }
        }
        self.drop_clients(dead, now);
    }

    fn drop_clients(&mut self, mut dead: Vec<Dropping>, now: Instant) {
        if dead.is_empty() {
            return;
        }
        dead.sort_by_key(|d| std::cmp::Reverse(d.at));
        dead.dedup_by_key(|d| d.at);
        let mut count = 0;
        let mut gone = Vec::with_capacity(dead.len());
        for d in dead {
            let c = self.clients.swap_remove(d.at);
            if let Some(reason) = d.reason {
                // Only between frames: a `refused` inside a half-sent frame
                // would be garbage to the client.
                if c.out.front().is_none_or(|h| h.sent == 0) {
                    farewell(&c.stream, reason, &d.why);
                }
            }
            if !(c.finished && c.out.is_empty()) {
                count += 1;
            }
            gone.push(c.id);
            let (id, peer) = (c.id, c.cred);
            self.log(Churn::Dropped, now, |suppressed| ServerEvent::Dropped {
                id,
                peer,
                reason: d.reason,
                why: d.why,
                suppressed,
            });
        }
        let mut st = lock(&self.shared.status);
        for id in gone {
            st.admitted.remove(&id);
        }
        st.dropped += count;
    }

    /// Tells the other threads how far every client was told.
    fn publish(&self) {
        let flushed = self
            .clients
            .iter()
            .map(|c| {
                if c.offered && c.out.is_empty() {
                    c.told.0
                } else {
                    0
                }
            })
            .min()
            .unwrap_or_else(|| lock(&self.shared.latest).change.seq);
        let mut st = lock(&self.shared.status);
        st.flushed_seq = flushed;
        self.shared.status_changed.notify_all();
    }

    /// Waits for the wake-up eventfd, a listener, a client, or the next
    /// deadline.
    fn wait(&mut self, options: &ServerOptions) {
        let now = Instant::now();
        let accepting = self.accept_paused_until.is_none_or(|t| now >= t);
        let mut deadline: Option<Instant> = self.accept_paused_until.filter(|t| *t > now);
        let mut at = |t: Option<Instant>| {
            if let Some(t) = t {
                deadline = Some(deadline.map_or(t, |x| x.min(t)));
            }
        };
        if self.state_retry {
            at(now.checked_add(STATE_RETRY));
        }
        at(self.limits.next_due());
        for c in &self.clients {
            at(c.out_since
                .and_then(|t| t.checked_add(options.send_timeout)));
            at(c.reader
                .started()
                .and_then(|t| t.checked_add(options.frame_timeout)));
            at(c.ping_due(options));
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
                match l.unix().accept() {
                    Ok((s, _)) => accepted.push((s, l.name().to_owned())),
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
            self.log(Churn::AcceptFailed, now, |suppressed| {
                ServerEvent::AcceptFailed {
                    error: e.to_string(),
                    backoff,
                    suppressed,
                }
            });
        } else if !accepted.is_empty() {
            self.backoff = MIN_BACKOFF;
        }
        for (stream, name) in accepted {
            let cred = match options.policy.admit_as(&stream, &name) {
                Ok(c) => c,
                Err(Error::Share {
                    problem: ShareProblem::PeerRefused { pid, uid, gid, why },
                    ..
                }) => {
                    farewell(&stream, RefusalReason::NotAllowed, &not_allowed(uid));
                    let peer = Some(PeerCred { pid, uid, gid });
                    self.refusal(peer, RefusalReason::NotAllowed, why, now);
                    continue;
                }
                Err(e) => {
                    self.refusal(None, RefusalReason::Other, e.to_string(), now);
                    continue;
                }
            };
            if let Err(e) = self.shared.admit(stream, cred, name, options) {
                let (reason, why) = match e {
                    Error::Share {
                        problem: ShareProblem::NotServed { reason, message },
                        ..
                    } => (reason, message),
                    other => (RefusalReason::Other, other.to_string()),
                };
                self.refusal(Some(cred), reason, why, now);
            }
        }
        // The admitted ones are in the inbox: take them now.
        let _ = self.take_inbox(now);
    }

    fn refusal(
        &mut self,
        peer: Option<PeerCred>,
        reason: RefusalReason,
        why: String,
        now: Instant,
    ) {
        self.log(Churn::Refused, now, |suppressed| ServerEvent::Refused {
            peer,
            reason,
            why,
            suppressed,
        });
    }

    /// Reads what the clients sent; answers read requests and pongs; drops
    /// the ones that hung up, broke the protocol or took too long over a
    /// message.
    fn read_all(&mut self, options: &ServerOptions, now: Instant) {
        let mut dead = Vec::new();
        for i in 0..self.clients.len() {
            // Nothing is read from a client that has messages waiting.
            if self.clients[i].out.is_empty()
                && let Err((reason, why)) = self.read_client(i, now)
            {
                dead.push(Dropping { at: i, reason, why });
                continue;
            }
            let c = &self.clients[i];
            if c.reader
                .started()
                .is_some_and(|t| now.duration_since(t) >= options.frame_timeout)
            {
                dead.push(Dropping {
                    at: i,
                    reason: Some(RefusalReason::Stalled),
                    why: format!(
                        "a message stalled after {} bytes for {:?}",
                        c.reader.received(),
                        options.frame_timeout
                    ),
                });
            }
        }
        self.drop_clients(dead, now);
    }

    fn read_client(
        &mut self,
        i: usize,
        now: Instant,
    ) -> std::result::Result<(), (Option<RefusalReason>, String)> {
        let protocol = |why: String| (Some(RefusalReason::Protocol), why);
        let progress = {
            let c = &mut self.clients[i];
            c.reader
                .read_from(&c.stream)
                .map_err(|e| protocol(e.to_string()))?
        };
        let frame = match progress {
            Progress::Pending => return Ok(()),
            Progress::Closed => return Err((None, "hung up".into())),
            Progress::Frame(f) => f,
        };
        self.clients[i].heard = now;
        let allowed = frame.kind == Kind::ReadRequest as u16 || frame.kind == Kind::Pong as u16;
        if !allowed || !frame.fds.is_empty() {
            return Err(protocol(format!(
                "sent a frame of kind {} with {} fds; a client may only send read-requests and pongs",
                frame.kind,
                frame.fds.len()
            )));
        }
        let reply = match decode(frame) {
            Ok(Incoming::Message(Message::Pong { id })) => {
                let c = &mut self.clients[i];
                if c.ping.is_none_or(|(p, _)| p != id) {
                    return Err(protocol(format!("sent a pong {id} to no ping")));
                }
                c.ping = None;
                return Ok(());
            }
            Ok(Incoming::Message(Message::ReadRequest { id, offset, length })) => {
                Message::ReadReply {
                    id,
                    offset,
                    result: self.shared.read(offset, length),
                }
            }
            Ok(_) => return Err(protocol("sent a message a client may not send".into())),
            Err(problem) => return Err(protocol(format!("sent a malformed message: {problem}"))),
        };
        let bytes = reply.encode().map_err(|e| protocol(e.to_string()))?;
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
