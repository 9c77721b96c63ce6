//! Sharing exported buffers with other processes: the dma-buf fd travels over
//! a Unix stream socket (`SCM_RIGHTS`), and the exporter's revocations follow
//! it over the same socket.
//!
//! * The exporting process keeps a [`ShareServer`] per buffer (made from a
//!   [`BarExport`]), gives it a listener ([`ShareServer::listen`], bound with
//!   [`bind_listener`]) or hands it connections ([`ShareServer::add_client`]).
//!   The server follows the exporter's
//!   [`RevocationHub`](crate::revoke::RevocationHub) and tells every client
//!   when the buffer is revoked, restored or gone.
//! * The importing process receives it as a [`SharedBuffer`]
//!   ([`SharedBuffer::connect`] or [`SharedBuffer::receive`]): the checked
//!   [`DmaBuf`], what the exporter said about it ([`BufferInfo`]), and a
//!   receiver-side hub that a background thread drives from the exporter's
//!   messages, so that the importer's [`Attachment`](crate::revoke::Attachment)s
//!   ([`SharedBuffer::attach`]) tear down and restore as they would in the
//!   exporting process.
//!
//! The kernel revokes the importer's IOMMU mapping by itself when the exporter
//! revokes (it is the same dma-buf); the messages are what lets the importer
//! know, drop the dead IOVA area and map it again at the same IOVA once the
//! exporter is back (Linux 7.2 does not bring a revoked area back).
//!
//! # Access
//!
//! A BAR dma-buf fd is a capability to device memory. Both sides check who is
//! at the other end with `SO_PEERCRED` ([`AccessPolicy`]): the same effective
//! uid, root, or a uid/gid the user allowed (supplementary groups count,
//! `SO_PEERGROUPS`). The server checks before it sends anything; the client
//! before it believes anything, and it refuses an offer that names a VFIO
//! device but whose dma-buf another exporter made ([`VFIO_EXP_NAME`]).
//!
//! [`bind_listener_with`] makes the socket's permissions say what the peer
//! check says ([`SocketOptions`]: mode 0600; given to one allowed uid; or
//! group-owned 0660 for one allowed gid), on a path nobody else can change:
//! every directory from `/` is opened without following symlinks and must be
//! root's or this user's and writable by nobody else (a sticky `/tmp` only
//! when allowed, and then only through an entry of this user's); the
//! socket's name is removed at the end only if it still is that socket
//! ([`SocketFile`]). [`default_socket_path`] is under `$XDG_RUNTIME_DIR`,
//! else `/run/dmabuf-p2p`. Reading the buffer back is off unless the
//! exporter sets a reader ([`ShareServer::set_read_back`]). Once the offer is
//! in, each side turns `SO_PASSRIGHTS` off (Linux 6.16 and later): the peer
//! can send it no more fds.
//!
//! # Nobody can delay a revocation, or take every slot
//!
//! The server's hub observer only records the newest state; one thread sends
//! it to the clients without blocking, and what the server logs goes through
//! a bounded queue to a thread of its own (rate-limited where a peer can
//! cause it in bulk, counted when lost), so neither a client nor a blocked
//! log can hold it. A client whose messages stay unsent for the send timeout
//! is dropped; so is one whose message does not complete within the frame
//! deadline, or that does not answer a `ping` in time. Slots are shared out
//! ([`ServerOptions`]): a total, a part kept for the exporter's own user, a
//! most per other uid and per process; a client without one is told why (a
//! `refused` message, [`RefusalReason`]) and closed. The server backs off
//! when `accept` runs out of fds. The client bounds the connect and the
//! offer together ([`ConnectOptions::timeout`]).
//!
//! # Never told live while the kernel has revoked
//!
//! An offer in the live state and a `restored` message are sent only while
//! no transition of the exporter is under way (the hub's transition lock,
//! which a revoking thread holds from before it turns the kernel's buffer off
//! until the hub says so): the state they report is the kernel's when they
//! reach the client's socket. An offer carries the number of the state
//! change it reports (`seq`, [`Offer::seq`]).
//!
//! # Wire format (version 2)
//!
//! Every message is a frame: a [`HEADER_LEN`] (12) byte header — magic
//! [`MAGIC`] (`b"DPSH"`), version `u16` ([`VERSION`]), kind `u16`, payload
//! length `u32`, little-endian, length at most [`MAX_PAYLOAD`] (64 KiB) —
//! then a UTF-8 JSON object as payload. Fds travel as `SCM_RIGHTS` control
//! data on the `sendmsg` that carries a frame's first byte; the receiver
//! reads with `MSG_CMSG_CLOEXEC`, never past the end of a frame, with room
//! for [`FD_ROOM`] fds per `recvmsg`. Unknown
//! JSON fields are ignored; an incompatible change gets a new version
//! (version 2 added `ping`, which an importer must answer, `pong` and
//! `refused`).
//!
//! | kind | name | direction | fds | payload |
//! |---|---|---|---|---|
//! | 1 | `offer` | exporter → importer, first | exactly 1: the dma-buf | `{"buffer": BufferInfo, "state": "live"\|"revoked"\|"gone", "reason": R\|null, "seq": n}` (`seq` optional) |
//! | 2 | `revoked` | exporter → importer | 0 | `{"reason": R}` |
//! | 3 | `restored` | exporter → importer | 0 | `{}` |
//! | 4 | `gone` | exporter → importer, last | 0 | `{"reason": R}` |
//! | 5 | `read-request` | importer → exporter | 0 | `{"id": n, "offset": n, "length": n}` |
//! | 6 | `read-reply` | exporter → importer | 0 | `{"id": n, "offset": n, "data": "hex"}` or `{"id": n, "offset": n, "error": "..."}` |
//! | 7 | `ping` | exporter → importer | 0 | `{"id": n}` |
//! | 8 | `pong` | importer → exporter, answering a `ping` | 0 | `{"id": n}` (the ping's) |
//! | 9 | `refused` | exporter → importer, last (instead of the offer, or after it) | 0 | `{"reason": F, "message": "..."}` |
//!
//! `BufferInfo` is `{"size": bytes, "exporter": "0000:02:00.0 BAR2", "device":
//! "0000:02:00.0", "bar": 2, "ranges": [{"offset", "length"}], "phys":
//! [{"start", "length"}]}` (`device`, `bar` optional; `ranges` BAR-relative;
//! `phys` empty when unknown). A reason `R` is one of `"memory-decode-off"`,
//! `"reset"`, `"device-closed"`, `"unplug"`, `"external"`, `"remote"`
//! ([`RevokeReason`]); an unknown one reads as [`RevokeReason::Remote`]. A
//! refusal reason `F` is one of `"not-allowed"`, `"full"`, `"reserved"`,
//! `"uid-share"`, `"process-share"`, `"idle"`, `"stalled"`, `"not-reading"`,
//! `"protocol"` ([`RefusalReason`]); an unknown one reads as
//! [`RefusalReason::Other`], and the message's text is kept printable and at
//! most [`MAX_TEXT_LEN`] bytes.
//!
//! The receiver refuses, with [`Error::Share`] naming the socket and a
//! [`ShareProblem`], a wrong magic or version, a length over the limit, a frame
//! cut short or stalled past its deadline, an unknown kind, a payload that is
//! not the kind's JSON, names over [`MAX_NAME_LEN`] bytes or with control
//! characters, more than [`MAX_RANGES`] ranges, an offer without an fd, a
//! frame with more than [`MAX_FRAME_FDS`] fds, any other message with an
//! fd, control data it has no room for (`MSG_CTRUNC`; [`ShareProblem::FdTableFull`]
//! when the fd table is full), an fd that is not a dma-buf
//! ([`DmaBuf::try_from`]) and a dma-buf whose size is not the announced one,
//! and a frame that started but did not complete within its deadline
//! ([`DEFAULT_FRAME_TIMEOUT`] unless the caller says otherwise).
//! Every fd that arrived with a refused message is closed before the error is
//! returned. A refused message leaves the stream out of step; both sides drop
//! the connection then.
//!
//! `read-request` asks the exporter to read up to [`MAX_READ`] bytes of the
//! buffer and send them back: the importer cannot `mmap` a VFIO dma-buf, so
//! this is how it checks what its DMA wrote. An exporter answers only if it was
//! given a reader ([`ShareServer::set_read_back`]) and its buffer is live.
//!
//! Connection loss is revocation: when the exporter's end closes (its process
//! died, which closes the device and revokes the buffer in the kernel anyway)
//! or sends something malformed, the importer's hub is closed for good.

mod client;
mod events;
mod peer;
mod rights;
mod server;
mod server_options;
mod server_state;
mod serving;
mod socket;
mod wire;

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

pub use client::{ConnectOptions, DEFAULT_OFFER_TIMEOUT, SharedBuffer, VFIO_EXP_NAME};
pub use events::ServerEvent;
pub use peer::{
    AccessPolicy, MAX_NAME_LEN, MAX_TEXT_LEN, PeerCred, check_name, refuse_fds, sanitize_text,
};
pub use rights::FD_ROOM;
pub use server::ShareServer;
pub use server_options::ServerOptions;
pub use server_state::ReadBack;
pub use socket::{
    Listener, SocketFile, SocketOptions, bind_listener, bind_listener_with, default_socket_dir,
    default_socket_path,
};
pub use wire::{DEFAULT_FRAME_TIMEOUT, HEADER_LEN, MAGIC, MAX_FRAME_FDS, MAX_PAYLOAD, VERSION};

use crate::exporter::bar::BarExport;
use crate::range::{ByteRange, PhysRange};
use crate::revoke::{BufferState, RevokeReason, StateChange};
use crate::{DmaBuf, Error, Result};

// Defined below the error type, which names it (no import cycle).
pub use crate::types::{RefusalReason, ShareProblem};

/// The most bytes one `read-request` may ask for (the reply carries them as
/// hex, within [`MAX_PAYLOAD`]). [`SharedBuffer::read_back`] splits longer
/// reads.
pub const MAX_READ: u64 = 16 << 10;

/// The most ranges (and physical ranges) an offer may list.
pub const MAX_RANGES: usize = 256;

/// The message kinds (the header's kind field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    /// The buffer, with its description and state; carries the fd.
    Offer = 1,
    /// The exporter revoked the buffer.
    Revoked = 2,
    /// The exporter's buffer is usable again.
    Restored = 3,
    /// The exporter is gone for good.
    Gone = 4,
    /// The importer asks for bytes of the buffer.
    ReadRequest = 5,
    /// The answer.
    ReadReply = 6,
    /// The exporter asks whether the importer is still there.
    Ping = 7,
    /// The importer's answer.
    Pong = 8,
    /// The exporter turns the importer away, and says why; the last message.
    Refused = 9,
}

impl Kind {
    /// The kind with this number.
    ///
    /// ```
    /// use dmabuf_p2p::share::Kind;
    /// assert_eq!(Kind::from_u16(2), Some(Kind::Revoked));
    /// assert_eq!(Kind::from_u16(99), None);
    /// ```
    pub fn from_u16(n: u16) -> Option<Self> {
        Some(match n {
            1 => Self::Offer,
            2 => Self::Revoked,
            3 => Self::Restored,
            4 => Self::Gone,
            5 => Self::ReadRequest,
            6 => Self::ReadReply,
            7 => Self::Ping,
            8 => Self::Pong,
            9 => Self::Refused,
            _ => return None,
        })
    }

    /// The kind's name, as in the table above (`"offer"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Offer => "offer",
            Self::Revoked => "revoked",
            Self::Restored => "restored",
            Self::Gone => "gone",
            Self::ReadRequest => "read-request",
            Self::ReadReply => "read-reply",
            Self::Ping => "ping",
            Self::Pong => "pong",
            Self::Refused => "refused",
        }
    }
}

/// What the exporter says about a shared buffer (the `offer` payload's
/// `buffer`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BufferInfo {
    /// Size in bytes; the receiver checks the dma-buf against it.
    pub size: u64,
    /// The exporter's name for messages, e.g. `0000:02:00.0 BAR2`.
    pub exporter: String,
    /// The PCI address of the exporting device, for a BAR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The BAR, for a BAR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bar: Option<u32>,
    /// The ranges the buffer is made of (BAR-relative for a BAR); their
    /// lengths add up to `size` when given.
    #[serde(default)]
    pub ranges: Vec<ByteRange>,
    /// The physical ranges behind them, when known.
    #[serde(default)]
    pub phys: Vec<PhysRange>,
}

impl BufferInfo {
    /// The description of a BAR export: `"<bdf> BAR<n>"`, its size, ranges and
    /// physical ranges.
    pub fn from_export(export: &BarExport) -> Self {
        Self {
            size: export.size(),
            exporter: format!("{} BAR{}", export.device(), export.bar()),
            device: Some(export.device().to_string()),
            bar: Some(export.bar()),
            ranges: export.ranges().to_vec(),
            phys: export.phys_ranges().to_vec(),
        }
    }

    /// Checks what a receiver relies on: a non-zero size, a printable name
    /// of at most [`MAX_NAME_LEN`] bytes, at most [`MAX_RANGES`] ranges
    /// that add up to the size.
    fn check(&self) -> std::result::Result<(), String> {
        if self.size == 0 {
            return Err("size 0".into());
        }
        if self.exporter.is_empty() {
            return Err("no exporter name".into());
        }
        check_name("exporter", &self.exporter)?;
        if let Some(d) = &self.device {
            check_name("device", d)?;
        }
        if self.ranges.len() > MAX_RANGES || self.phys.len() > MAX_RANGES {
            return Err(format!(
                "{} ranges and {} physical ranges: at most {MAX_RANGES} each",
                self.ranges.len(),
                self.phys.len()
            ));
        }
        if !self.ranges.is_empty() {
            let total = self
                .ranges
                .iter()
                .try_fold(0u64, |t, r| t.checked_add(r.length));
            if total != Some(self.size) {
                return Err(format!(
                    "the ranges add up to {total:?} bytes, not the size {}",
                    self.size
                ));
            }
        }
        Ok(())
    }
}

/// A received offer: the checked buffer, its description and the exporter's
/// state when it sent it.
#[derive(Debug)]
pub struct Offer {
    /// The dma-buf (checked: a dma-buf of `info.size` bytes).
    pub buf: DmaBuf,
    /// What the exporter said about it.
    pub info: BufferInfo,
    /// The exporter's state at the handoff.
    pub state: BufferState,
    /// The number of the exporter's state change that `state` is
    /// ([`StateChange::seq`](crate::revoke::StateChange::seq); 0 if the
    /// exporter did not say).
    pub seq: u64,
}

/// A message without an fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The exporter revoked the buffer, for this reason.
    Revoked(RevokeReason),
    /// The buffer is usable again.
    Restored,
    /// The exporter is gone for good, for this reason.
    Gone(RevokeReason),
    /// Read `length` bytes at `offset` of the buffer.
    ReadRequest {
        /// Matches the reply to the request.
        id: u64,
        /// Byte offset in the buffer.
        offset: u64,
        /// Bytes, at most [`MAX_READ`].
        length: u64,
    },
    /// The answer to a [`Message::ReadRequest`].
    ReadReply {
        /// The request's id.
        id: u64,
        /// The request's offset.
        offset: u64,
        /// The bytes, or why not.
        result: std::result::Result<Vec<u8>, String>,
    },
    /// Is the importer still there? It answers with a [`Message::Pong`] of
    /// the same id, or is dropped ([`RefusalReason::Idle`]).
    Ping {
        /// Matches the answer to the question.
        id: u64,
    },
    /// The answer to a [`Message::Ping`].
    Pong {
        /// The ping's id.
        id: u64,
    },
    /// The exporter turns the importer away (before the offer) or drops it,
    /// and says why; it closes the connection after it.
    Refused {
        /// Why, as a kind.
        reason: RefusalReason,
        /// Why, in words (at most [`MAX_TEXT_LEN`] bytes are kept).
        message: String,
    },
}

/// What [`recv`] returns.
#[derive(Debug)]
pub enum Incoming {
    /// An offer, with its fd.
    Offer(Offer),
    /// Any other message.
    Message(Message),
}

fn reason_name(r: RevokeReason) -> &'static str {
    match r {
        RevokeReason::MemoryDecodeOff => "memory-decode-off",
        RevokeReason::Reset => "reset",
        RevokeReason::DeviceClosed => "device-closed",
        RevokeReason::Unplug => "unplug",
        RevokeReason::External => "external",
        RevokeReason::Remote => "remote",
    }
}

fn reason_from_name(s: &str) -> RevokeReason {
    match s {
        "memory-decode-off" => RevokeReason::MemoryDecodeOff,
        "reset" => RevokeReason::Reset,
        "device-closed" => RevokeReason::DeviceClosed,
        "unplug" => RevokeReason::Unplug,
        "external" => RevokeReason::External,
        _ => RevokeReason::Remote,
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct OfferBody {
    buffer: BufferInfo,
    state: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    seq: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(serde::Serialize, serde::Deserialize)]
struct IdBody {
    id: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RefusedBody {
    reason: String,
    message: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ReasonBody {
    reason: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct EmptyBody {}

#[derive(serde::Serialize, serde::Deserialize)]
struct ReadRequestBody {
    id: u64,
    offset: u64,
    length: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ReadReplyBody {
    id: u64,
    offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn hex(data: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(data.len() * 2);
    for b in data {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn unhex(s: &str) -> std::result::Result<Vec<u8>, String> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    if !s.len().is_multiple_of(2) {
        return Err(format!("hex data of odd length {}", s.len()));
    }
    s.as_bytes()
        .chunks_exact(2)
        .enumerate()
        .map(|(i, p)| match (digit(p[0]), digit(p[1])) {
            (Some(h), Some(l)) => Ok(h << 4 | l),
            _ => Err(format!("not a hex digit at {}", 2 * i)),
        })
        .collect()
}

/// A frame of `kind` with `body` as JSON; refuses a payload over the limit.
fn encode_json<T: serde::Serialize>(
    kind: Kind,
    body: &T,
) -> std::result::Result<Vec<u8>, ShareProblem> {
    let payload = serde_json::to_vec(body).map_err(|e| ShareProblem::Malformed {
        kind: kind.name(),
        problem: format!("cannot encode: {e}"),
    })?;
    if payload.len() as u64 > u64::from(MAX_PAYLOAD) {
        return Err(ShareProblem::Oversized {
            length: payload.len() as u64,
            max: u64::from(MAX_PAYLOAD),
        });
    }
    Ok(wire::encode_frame(kind as u16, &payload))
}

/// The `offer` frame for `info` in `state` (the fd travels beside it).
///
/// ```
/// use dmabuf_p2p::revoke::BufferState;
/// use dmabuf_p2p::share::{encode_offer, BufferInfo};
/// let info = BufferInfo { size: 4096, exporter: "test".into(), device: None, bar: None, ranges: vec![], phys: vec![] };
/// let frame = encode_offer(&info, BufferState::Live)?;
/// assert_eq!(&frame[..4], b"DPSH");
/// # Ok::<(), dmabuf_p2p::share::ShareProblem>(())
/// ```
pub fn encode_offer(
    info: &BufferInfo,
    state: BufferState,
) -> std::result::Result<Vec<u8>, ShareProblem> {
    encode_offer_at(info, StateChange { state, seq: 0 })
}

/// The `offer` frame for `info` in the state `change` made, with its number
/// (`seq`), as [`ShareServer`] sends it.
///
/// ```
/// use dmabuf_p2p::revoke::{BufferState, StateChange};
/// use dmabuf_p2p::share::{encode_offer_at, BufferInfo};
/// let info = BufferInfo { size: 4096, exporter: "test".into(), device: None, bar: None, ranges: vec![], phys: vec![] };
/// let frame = encode_offer_at(&info, StateChange { state: BufferState::Live, seq: 7 })?;
/// assert!(String::from_utf8_lossy(&frame).contains(r#""seq":7"#));
/// # Ok::<(), dmabuf_p2p::share::ShareProblem>(())
/// ```
pub fn encode_offer_at(
    info: &BufferInfo,
    change: StateChange,
) -> std::result::Result<Vec<u8>, ShareProblem> {
    let (state, reason) = match change.state {
        BufferState::Live => ("live", None),
        BufferState::Revoked(r) => ("revoked", Some(reason_name(r).to_owned())),
        BufferState::Gone(r) => ("gone", Some(reason_name(r).to_owned())),
    };
    encode_json(
        Kind::Offer,
        &OfferBody {
            buffer: info.clone(),
            state: state.to_owned(),
            reason,
            seq: change.seq,
        },
    )
}

impl Message {
    /// The message's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Revoked(_) => Kind::Revoked,
            Self::Restored => Kind::Restored,
            Self::Gone(_) => Kind::Gone,
            Self::ReadRequest { .. } => Kind::ReadRequest,
            Self::ReadReply { .. } => Kind::ReadReply,
            Self::Ping { .. } => Kind::Ping,
            Self::Pong { .. } => Kind::Pong,
            Self::Refused { .. } => Kind::Refused,
        }
    }

    /// The message for a hub's new state: `revoked`, `restored` or `gone`.
    pub fn for_state(state: BufferState) -> Self {
        match state {
            BufferState::Live => Self::Restored,
            BufferState::Revoked(r) => Self::Revoked(r),
            BufferState::Gone(r) => Self::Gone(r),
        }
    }

    /// The whole frame.
    ///
    /// ```
    /// use dmabuf_p2p::revoke::RevokeReason;
    /// use dmabuf_p2p::share::Message;
    /// let f = Message::Revoked(RevokeReason::MemoryDecodeOff).encode()?;
    /// assert_eq!(&f[12..], br#"{"reason":"memory-decode-off"}"#);
    /// # Ok::<(), dmabuf_p2p::share::ShareProblem>(())
    /// ```
    pub fn encode(&self) -> std::result::Result<Vec<u8>, ShareProblem> {
        let kind = self.kind();
        match self {
            Self::Revoked(r) | Self::Gone(r) => encode_json(
                kind,
                &ReasonBody {
                    reason: reason_name(*r).to_owned(),
                },
            ),
            Self::Restored => encode_json(kind, &EmptyBody {}),
            Self::ReadRequest { id, offset, length } => encode_json(
                kind,
                &ReadRequestBody {
                    id: *id,
                    offset: *offset,
                    length: *length,
                },
            ),
            Self::ReadReply { id, offset, result } => {
                let (data, error) = match result {
                    Ok(d) => (Some(hex(d)), None),
                    Err(e) => (None, Some(e.clone())),
                };
                encode_json(
                    kind,
                    &ReadReplyBody {
                        id: *id,
                        offset: *offset,
                        data,
                        error,
                    },
                )
            }
            Self::Ping { id } | Self::Pong { id } => encode_json(kind, &IdBody { id: *id }),
            Self::Refused { reason, message } => encode_json(
                kind,
                &RefusedBody {
                    reason: reason.name().to_owned(),
                    message: message.clone(),
                },
            ),
        }
    }
}

/// Parses a payload: a JSON object (serde would take an array for a struct
/// too), then the kind's fields.
fn parse<T: serde::de::DeserializeOwned>(
    kind: Kind,
    payload: &[u8],
) -> std::result::Result<T, ShareProblem> {
    let malformed = |problem: String| ShareProblem::Malformed {
        kind: kind.name(),
        problem,
    };
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| malformed(e.to_string()))?;
    if !value.is_object() {
        let what = match value {
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::Bool(_) => "a boolean",
            _ => "null",
        };
        return Err(malformed(format!(
            "the payload is {what}, not a JSON object"
        )));
    }
    serde_json::from_value(value).map_err(|e| malformed(e.to_string()))
}

/// Checks a received frame and turns it into a message. Every fd of a
/// refused frame is closed (dropped) before the error is returned.
pub(crate) fn decode(frame: wire::Frame) -> std::result::Result<Incoming, ShareProblem> {
    let wire::Frame { kind, payload, fds } = frame;
    let kind = Kind::from_u16(kind).ok_or(ShareProblem::UnknownKind(kind))?;
    if kind == Kind::Offer {
        return decode_offer(&payload, fds).map(Incoming::Offer);
    }
    if !fds.is_empty() {
        return Err(ShareProblem::UnexpectedFds {
            kind: kind.name(),
            count: fds.len(),
            expected: 0,
        });
    }
    let msg = match kind {
        Kind::Revoked => Message::Revoked(reason_from_name(
            &parse::<ReasonBody>(kind, &payload)?.reason,
        )),
        Kind::Gone => Message::Gone(reason_from_name(
            &parse::<ReasonBody>(kind, &payload)?.reason,
        )),
        Kind::Restored => {
            parse::<EmptyBody>(kind, &payload)?;
            Message::Restored
        }
        Kind::ReadRequest => {
            let b: ReadRequestBody = parse(kind, &payload)?;
            Message::ReadRequest {
                id: b.id,
                offset: b.offset,
                length: b.length,
            }
        }
        Kind::Ping => Message::Ping {
            id: parse::<IdBody>(kind, &payload)?.id,
        },
        Kind::Pong => Message::Pong {
            id: parse::<IdBody>(kind, &payload)?.id,
        },
        Kind::Refused => {
            let b: RefusedBody = parse(kind, &payload)?;
            Message::Refused {
                reason: RefusalReason::from_name(&b.reason),
                message: sanitize_text(&b.message),
            }
        }
        Kind::ReadReply | Kind::Offer => {
            let b: ReadReplyBody = parse(kind, &payload)?;
            let result = match (b.data, b.error) {
                (Some(d), None) => Ok(unhex(&d).map_err(|problem| ShareProblem::Malformed {
                    kind: kind.name(),
                    problem,
                })?),
                (None, Some(e)) => Err(e),
                _ => {
                    return Err(ShareProblem::Malformed {
                        kind: kind.name(),
                        problem: "needs exactly one of \"data\" and \"error\"".into(),
                    });
                }
            };
            Message::ReadReply {
                id: b.id,
                offset: b.offset,
                result,
            }
        }
    };
    Ok(Incoming::Message(msg))
}

/// Checks an `offer`: exactly one fd, the JSON, then the fd (a dma-buf of the
/// announced size). `fds` are closed on every error path (dropped).
fn decode_offer(
    payload: &[u8],
    mut fds: Vec<std::os::fd::OwnedFd>,
) -> std::result::Result<Offer, ShareProblem> {
    let kind = Kind::Offer;
    if fds.len() > 1 {
        return Err(ShareProblem::UnexpectedFds {
            kind: kind.name(),
            count: fds.len(),
            expected: 1,
        });
    }
    let Some(fd) = fds.pop() else {
        return Err(ShareProblem::MissingFd { kind: kind.name() });
    };
    let body: OfferBody = parse(kind, payload)?;
    body.buffer
        .check()
        .map_err(|problem| ShareProblem::Malformed {
            kind: kind.name(),
            problem,
        })?;
    let reason = || {
        body.reason
            .as_deref()
            .map_or(RevokeReason::Remote, reason_from_name)
    };
    let state = match body.state.as_str() {
        "live" => BufferState::Live,
        "revoked" => BufferState::Revoked(reason()),
        "gone" => BufferState::Gone(reason()),
        other => {
            return Err(ShareProblem::Malformed {
                kind: kind.name(),
                problem: format!("state {other:?} (expected \"live\", \"revoked\" or \"gone\")"),
            });
        }
    };
    let buf = DmaBuf::try_from(fd).map_err(|e| ShareProblem::NotDmaBuf(e.error().to_string()))?;
    let actual = buf
        .size()
        .map_err(|e| ShareProblem::NotDmaBuf(e.to_string()))?;
    if actual != body.buffer.size {
        return Err(ShareProblem::SizeMismatch {
            announced: body.buffer.size,
            actual,
        });
    }
    Ok(Offer {
        buf,
        info: body.buffer,
        state,
        seq: body.seq,
    })
}

/// Receives and checks one message, waiting as long as it takes for it to
/// start and [`DEFAULT_FRAME_TIMEOUT`] for it to complete. `Ok(None)` when
/// the peer closed the connection between messages. After an error the
/// stream is out of step: drop it.
///
/// ```no_run
/// use std::os::unix::net::UnixStream;
/// use dmabuf_p2p::share::{recv, Incoming};
/// let stream = UnixStream::connect("/run/dmabuf-p2p/0000:02:00.0-bar2.sock")?;
/// if let Some(Incoming::Offer(offer)) = recv(&stream)? {
///     println!("{} bytes of {}", offer.info.size, offer.info.exporter);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn recv(stream: &UnixStream) -> Result<Option<Incoming>> {
    match wire::recv_frame(stream)? {
        None => Ok(None),
        Some(frame) => decode(frame).map(Some).map_err(|problem| Error::Share {
            peer: wire::describe_stream(stream),
            problem,
        }),
    }
}

/// [`recv`], waiting at most `timeout` for a message to start
/// ([`Error::Timeout`] after that).
///
/// ```no_run
/// use std::os::unix::net::UnixStream;
/// use std::time::Duration;
/// use dmabuf_p2p::share::recv_timeout;
/// let stream = UnixStream::connect("/run/dmabuf-p2p/0000:02:00.0-bar2.sock")?;
/// match recv_timeout(&stream, Duration::from_secs(5)) {
///     Ok(Some(message)) => println!("{message:?}"),
///     Ok(None) => println!("the exporter hung up"),
///     Err(e) => println!("{e}"),
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn recv_timeout(stream: &UnixStream, timeout: Duration) -> Result<Option<Incoming>> {
    // A timeout too large to add to the clock is no limit.
    let deadline = Instant::now().checked_add(timeout);
    match wire::recv_frame_within(stream, deadline, DEFAULT_FRAME_TIMEOUT)? {
        None => Ok(None),
        Some(frame) => decode(frame).map(Some).map_err(|problem| Error::Share {
            peer: wire::describe_stream(stream),
            problem,
        }),
    }
}

/// Sends `buf` with an `offer` describing it as `info`, in `state`.
/// `timeout` bounds the wait while the socket is full ([`Error::Timeout`]).
///
/// ```no_run
/// use std::os::unix::net::UnixStream;
/// use dmabuf_p2p::revoke::BufferState;
/// use dmabuf_p2p::share::{recv, send_offer, BufferInfo, Incoming};
/// # let iommufd = dmabuf_p2p::Iommufd::open()?;
/// # let mut dev = dmabuf_p2p::VfioPciDevice::open("0000:02:00.0".parse()?)?;
/// # dev.bind(&iommufd)?;
/// # let export = dev.export_bar(2, &[dmabuf_p2p::ByteRange::new(0, 4096)])?;
/// let (a, b) = UnixStream::pair()?;
/// send_offer(&a, export.dmabuf(), &BufferInfo::from_export(&export), BufferState::Live, None)?;
/// if let Some(Incoming::Offer(offer)) = recv(&b)? {
///     assert_eq!(offer.buf.size()?, export.size());
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn send_offer(
    stream: &UnixStream,
    buf: &DmaBuf,
    info: &BufferInfo,
    state: BufferState,
    timeout: Option<Duration>,
) -> Result<()> {
    let frame = encode_offer(info, state).map_err(|problem| Error::Share {
        peer: wire::describe_stream(stream),
        problem,
    })?;
    wire::send_raw(stream, &frame, &[buf.as_fd()], timeout)
}

/// Sends a message without an fd. `timeout` bounds the wait while the socket
/// is full ([`Error::Timeout`]).
pub fn send_message(stream: &UnixStream, msg: &Message, timeout: Option<Duration>) -> Result<()> {
    let frame = msg.encode().map_err(|problem| Error::Share {
        peer: wire::describe_stream(stream),
        problem,
    })?;
    wire::send_raw(stream, &frame, &[], timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let data: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&data)), Ok(data));
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
    }

    #[test]
    fn messages_round_trip() {
        let msgs = [
            Message::Revoked(RevokeReason::Reset),
            Message::Restored,
            Message::Gone(RevokeReason::Unplug),
            Message::ReadRequest {
                id: 7,
                offset: 0x1000,
                length: 64,
            },
            Message::ReadReply {
                id: 7,
                offset: 0x1000,
                result: Ok(vec![1, 2, 0xff]),
            },
            Message::ReadReply {
                id: 8,
                offset: 0,
                result: Err("revoked".into()),
            },
            Message::Ping { id: 9 },
            Message::Pong { id: 9 },
            Message::Refused {
                reason: RefusalReason::ProcessShare,
                message: "pid 7 has 8 clients".into(),
            },
        ];
        for m in msgs {
            let f = m.encode().unwrap_or_default();
            let frame = wire::Frame {
                kind: u16::from_le_bytes([f[6], f[7]]),
                payload: f[wire::HEADER_LEN..].to_vec(),
                fds: Vec::new(),
            };
            match decode(frame) {
                Ok(Incoming::Message(got)) => assert_eq!(got, m),
                other => unreachable!("{m:?} decoded as {other:?}"),
            }
        }
    }
}
