//! [`ServerOptions`]: the limits a [`ShareServer`](super::ShareServer) keeps
//! (slots, shares, and how long a client may stay silent).

use std::time::Duration;

use super::peer::AccessPolicy;
use super::wire;

/// The limits a [`ShareServer`](super::ShareServer) keeps. Slots are shared out so that no one
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
