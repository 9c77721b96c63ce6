//! What can be wrong with a message of the buffer-sharing protocol
//! ([`crate::share`]). A leaf: the error type names it.

use std::time::Duration;

/// What is wrong with a message of the sharing protocol, or with the
/// connection ([`Error::Share`](crate::Error::Share)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ShareProblem {
    /// The peer closed the connection where a message was expected.
    #[error("the peer closed the connection")]
    Closed,
    /// The connection ended in the middle of a frame.
    #[error("truncated {what}: the connection ended after {got} of {expected} bytes")]
    Truncated {
        /// `"header"` or `"payload"`.
        what: &'static str,
        /// Bytes the frame needed.
        expected: u64,
        /// Bytes that arrived.
        got: u64,
    },
    /// The frame does not start with [`MAGIC`](crate::share::MAGIC).
    #[error("bad magic {found:02x?} (expected \"DPSH\")")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// The frame is of another protocol version.
    #[error("protocol version {found}, this side speaks version {supported}")]
    Version {
        /// The frame's version.
        found: u16,
        /// [`VERSION`](crate::share::VERSION).
        supported: u16,
    },
    /// The payload length is over the limit.
    #[error("a payload of {length} bytes is over the {max}-byte limit")]
    Oversized {
        /// The announced length.
        length: u64,
        /// [`MAX_PAYLOAD`](crate::share::MAX_PAYLOAD).
        max: u64,
    },
    /// The kind field names no known message.
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    /// The payload is not what the kind says.
    #[error("malformed {kind} message: {problem}")]
    Malformed {
        /// The message kind.
        kind: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// An offer came without an fd.
    #[error("{kind} message carries no fd")]
    MissingFd {
        /// The message kind.
        kind: &'static str,
    },
    /// A message came with more fds than it may carry (all were closed).
    #[error("{kind} message carries {count} fds, expected {expected} (all closed)")]
    UnexpectedFds {
        /// The message kind.
        kind: &'static str,
        /// How many arrived.
        count: usize,
        /// How many it may carry.
        expected: usize,
    },
    /// More fds arrived at once than there was room for (`MSG_CTRUNC`); the
    /// kernel dropped the rest and the ones that arrived were closed.
    #[error(
        "control data truncated (MSG_CTRUNC): more fds than the {room} this side takes; the {closed} that arrived were closed"
    )]
    ControlTruncated {
        /// Fds that arrived and were closed.
        closed: usize,
        /// [`FD_ROOM`](crate::share::FD_ROOM).
        room: usize,
    },
    /// The offered fd is not a dma-buf (it was closed).
    #[error("the offered fd is not a dma-buf: {0}")]
    NotDmaBuf(String),
    /// The offered dma-buf is not of the announced size (it was closed).
    #[error("the offered dma-buf is {actual} bytes, the offer announces {announced}")]
    SizeMismatch {
        /// The size in the offer.
        announced: u64,
        /// The dma-buf's size.
        actual: u64,
    },
    /// A well-formed message that does not belong here (an event before the
    /// offer, a second offer, a request from the exporter).
    #[error("unexpected {kind} message {context}")]
    Unexpected {
        /// The message kind.
        kind: &'static str,
        /// Where it came.
        context: &'static str,
    },
    /// The exporter answered a read request with an error.
    #[error("the exporter refused: {0}")]
    Refused(String),
    /// The connection is over; what ended it.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// The peer's credentials (`SO_PEERCRED`) are not allowed
    /// ([`AccessPolicy`](crate::share::AccessPolicy)); nothing was sent to it or taken from it.
    #[error("peer pid {pid} uid {uid} gid {gid} refused: {why}")]
    PeerRefused {
        /// Its process id.
        pid: i32,
        /// Its effective uid.
        uid: u32,
        /// Its effective gid.
        gid: u32,
        /// Why.
        why: String,
    },
    /// An offer that names a VFIO device came with a dma-buf some other
    /// exporter made (it was closed). The message names
    /// [`VFIO_EXP_NAME`](crate::share::VFIO_EXP_NAME) literally: this leaf
    /// imports nothing of the crate.
    #[error(
        "the offer names a VFIO device but its dma-buf was exported by {exp_name:?}, not \"vfio_pci_core\" (closed)"
    )]
    NotVfio {
        /// The dma-buf's `exp_name`.
        exp_name: String,
    },
    /// A frame came with more fds than any message may carry (all closed).
    #[error("a frame carries {count} fds, at most {max} allowed (all closed)")]
    TooManyFds {
        /// How many arrived (at least).
        count: usize,
        /// [`MAX_FRAME_FDS`](crate::share::MAX_FRAME_FDS).
        max: usize,
    },
    /// The kernel could not install a passed fd because this process's fd
    /// table is full (`MSG_CTRUNC` with room left; `EMFILE`); the fds that
    /// arrived were closed.
    #[error(
        "this process's fd table is full (RLIMIT_NOFILE): a passed fd could not be received; the {closed} that arrived were closed"
    )]
    FdTableFull {
        /// Fds that arrived and were closed.
        closed: usize,
    },
    /// A frame started but did not complete in time.
    #[error("a frame stalled: {got} bytes arrived, then nothing more for {after:?}")]
    Stalled {
        /// Bytes of the frame that arrived.
        got: u64,
        /// The per-frame deadline.
        after: Duration,
    },
    /// The exporter turned this client away and said why: a `refused`
    /// message on the client's side, or on the exporter's the reason
    /// [`ShareServer::add_client`](crate::share::ShareServer::add_client)
    /// gives (the client was told the same before its socket was closed).
    #[error("the exporter does not serve this client ({reason}): {message}")]
    NotServed {
        /// Why, as a kind.
        reason: RefusalReason,
        /// Why, in words (a peer's text: control characters escaped).
        message: String,
    },
}

/// Why an exporter turned a client away or dropped it: the `reason` of the
/// sharing protocol's `refused` message, sent before the socket is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalReason {
    /// `not-allowed`: the client's credentials are not allowed.
    NotAllowed,
    /// `full`: every slot is taken.
    Full,
    /// `reserved`: the slots left are kept for the exporter's own user.
    Reserved,
    /// `uid-share`: the client's uid has all the slots one uid may have.
    UidShare,
    /// `process-share`: the client's process has all the slots one process
    /// may have.
    ProcessShare,
    /// `idle`: the client did not answer a `ping` in time.
    Idle,
    /// `stalled`: a message of the client did not complete in time.
    Stalled,
    /// `not-reading`: messages to the client stayed unsent (it does not
    /// read).
    NotReading,
    /// `protocol`: the client sent something a client may not send.
    Protocol,
    /// A reason this side does not know (a newer peer's).
    Other,
}

impl RefusalReason {
    /// Every reason but [`Other`](Self::Other), for tables and tests.
    pub const KNOWN: [Self; 9] = [
        Self::NotAllowed,
        Self::Full,
        Self::Reserved,
        Self::UidShare,
        Self::ProcessShare,
        Self::Idle,
        Self::Stalled,
        Self::NotReading,
        Self::Protocol,
    ];

    /// The name on the wire (`"not-allowed"`, ...; `"other"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::NotAllowed => "not-allowed",
            Self::Full => "full",
            Self::Reserved => "reserved",
            Self::UidShare => "uid-share",
            Self::ProcessShare => "process-share",
            Self::Idle => "idle",
            Self::Stalled => "stalled",
            Self::NotReading => "not-reading",
            Self::Protocol => "protocol",
            Self::Other => "other",
        }
    }

    /// The reason with this wire name; an unknown name is
    /// [`Other`](Self::Other).
    ///
    /// ```
    /// use dmabuf_p2p::share::RefusalReason;
    /// for r in RefusalReason::KNOWN {
    ///     assert_eq!(RefusalReason::from_name(r.name()), r);
    /// }
    /// assert_eq!(RefusalReason::from_name("cosmic-ray"), RefusalReason::Other);
    /// ```
    pub fn from_name(name: &str) -> Self {
        Self::KNOWN
            .into_iter()
            .find(|r| r.name() == name)
            .unwrap_or(Self::Other)
    }
}

impl std::fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
