//! What a [`ShareServer`](super::ShareServer)'s handle, its hub observer and
//! its serving thread share: the buffer, the newest state, the admitted
//! connections, the status; and who gets a slot.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use nix::sys::eventfd::EventFd;

use super::events::EventLog;
use super::peer::{PeerCred, refuse_fds};
use super::server_options::ServerOptions;
use super::socket::Listener;
use super::{BufferInfo, MAX_READ, Message, RefusalReason, ShareProblem, rights};
use crate::revoke::{BufferState, RevocationHub, RevokeReason, StateChange};
use crate::{DmaBuf, Error, Result};

/// A reader of the shared buffer's bytes for `read-request`s: fills the slice
/// with the bytes at the buffer offset. See [`ShareServer::set_read_back`](super::ShareServer::set_read_back).
pub type ReadBack = dyn Fn(u64, &mut [u8]) -> Result<()> + Send + Sync;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
    pub(super) read_back: Mutex<Option<Arc<ReadBack>>>,
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
    pub(super) fn new() -> Self {
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
    pub(super) fn record(&self, change: &StateChange) {
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

#[cfg(test)]
mod tests {
    use nix::unistd::Uid;

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
