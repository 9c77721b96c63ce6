//! The receiving side of the sharing protocol against every malformed
//! message, over socketpairs on the host: each is refused with its typed
//! problem, and no fd that came with it stays open (the process's fd count is
//! unchanged). The sending side and real dma-bufs are tested in the VM
//! (`vm-tests/tests/vm/share.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dmabuf_p2p::revoke::{BufferState, RevokeReason};
use dmabuf_p2p::share::{
    BufferInfo, ConnectOptions, FD_ROOM, HEADER_LEN, Incoming, Kind, MAGIC, MAX_PAYLOAD, Message,
    ShareProblem, SharedBuffer, VERSION, encode_offer, recv, send_message,
};
use dmabuf_p2p::{ByteRange, Error};

/// Every test counts this process's fds; they must not run at the same time.
static FDS: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    FDS.lock().unwrap_or_else(PoisonError::into_inner)
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

const T: Option<Duration> = Some(Duration::from_secs(5));

/// The attacking peer of the VM tests: frames built by hand, sent with
/// any fds.
#[path = "../vm-tests/src/raw_peer.rs"]
mod raw_peer;
use raw_peer::{frame, send_raw};

fn info(size: u64) -> BufferInfo {
    BufferInfo {
        size,
        exporter: "0000:02:00.0 BAR2".into(),
        device: Some("0000:02:00.0".into()),
        bar: Some(2),
        ranges: vec![ByteRange::new(0, size)],
        phys: vec![],
    }
}

fn offer_frame() -> Vec<u8> {
    encode_offer(&info(0x10000), BufferState::Live).unwrap()
}

fn files(n: usize) -> Vec<File> {
    (0..n).map(|_| File::open("/dev/null").unwrap()).collect()
}

fn fds(files: &[File]) -> Vec<BorrowedFd<'_>> {
    files.iter().map(AsFd::as_fd).collect()
}

/// Sends `data` with `n` fds on one end of a socketpair, closes that end, and
/// returns what `recv` makes of it on the other, checking that the fds that
/// arrived were all closed again by the time it returns.
fn receive(data: &[u8], n: usize) -> Result<Option<Incoming>, Error> {
    let (tx, rx) = UnixStream::pair().unwrap();
    let sent = files(n);
    send_raw(&tx, data, &fds(&sent)).unwrap();
    drop(tx);
    let before = fd_count();
    let got = recv(&rx);
    if got.is_err() {
        assert_eq!(
            fd_count(),
            before,
            "a refused message left received fds open"
        );
    }
    got
}

/// The problem of a refused message.
fn problem(r: Result<Option<Incoming>, Error>) -> ShareProblem {
    match r {
        Err(Error::Share { problem, peer }) => {
            assert!(
                peer.contains("unix socket fd"),
                "the error names the socket: {peer}"
            );
            problem
        }
        other => panic!("expected a sharing-protocol error, got {other:?}"),
    }
}

fn header(magic: [u8; 4], version: u16, kind: u16, len: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&magic);
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h
}

#[test]
fn offer_of_a_non_dmabuf_is_refused_and_its_fd_closed() {
    let _s = serial();
    let base = fd_count();
    match problem(receive(&offer_frame(), 1)) {
        ShareProblem::NotDmaBuf(why) => assert!(why.contains("not a dma-buf"), "{why}"),
        p => panic!("{p:?}"),
    }
    assert_eq!(fd_count(), base);
}

#[test]
fn offer_without_fd() {
    let _s = serial();
    let base = fd_count();
    assert_eq!(
        problem(receive(&offer_frame(), 0)),
        ShareProblem::MissingFd { kind: "offer" }
    );
    assert_eq!(fd_count(), base);
}

#[test]
fn offer_with_several_fds() {
    let _s = serial();
    let base = fd_count();
    assert_eq!(
        problem(receive(&offer_frame(), 3)),
        ShareProblem::TooManyFds { count: 3, max: 1 }
    );
    assert_eq!(fd_count(), base);
}

#[test]
fn event_with_an_fd() {
    let _s = serial();
    let base = fd_count();
    let frame = Message::Revoked(RevokeReason::MemoryDecodeOff)
        .encode()
        .unwrap();
    assert_eq!(
        problem(receive(&frame, 1)),
        ShareProblem::UnexpectedFds {
            kind: "revoked",
            count: 1,
            expected: 0
        }
    );
    assert_eq!(fd_count(), base);
}

#[test]
fn more_fds_than_room_is_ctrunc_and_all_closed() {
    let _s = serial();
    let base = fd_count();
    let n = FD_ROOM + 5;
    assert_eq!(
        problem(receive(&offer_frame(), n)),
        ShareProblem::ControlTruncated {
            closed: FD_ROOM,
            room: FD_ROOM
        }
    );
    assert_eq!(fd_count(), base);
}

#[test]
fn truncated_header() {
    let _s = serial();
    let base = fd_count();
    let frame = offer_frame();
    assert_eq!(
        problem(receive(&frame[..5], 1)),
        ShareProblem::Truncated {
            what: "header",
            expected: HEADER_LEN as u64,
            got: 5
        }
    );
    assert_eq!(fd_count(), base);
}

#[test]
fn truncated_payload_with_an_fd() {
    let _s = serial();
    let base = fd_count();
    let frame = offer_frame();
    let cut = frame.len() - 3;
    let payload = (frame.len() - HEADER_LEN) as u64;
    assert_eq!(
        problem(receive(&frame[..cut], 1)),
        ShareProblem::Truncated {
            what: "payload",
            expected: payload,
            got: payload - 3
        }
    );
    assert_eq!(fd_count(), base);
}

#[test]
fn bad_magic() {
    let _s = serial();
    let base = fd_count();
    let mut frame = offer_frame();
    frame[..4].copy_from_slice(b"HTTP");
    assert_eq!(
        problem(receive(&frame, 1)),
        ShareProblem::BadMagic { found: *b"HTTP" }
    );
    assert_eq!(fd_count(), base);
}

#[test]
fn wrong_version() {
    let _s = serial();
    let base = fd_count();
    let mut frame = offer_frame();
    frame[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
    assert_eq!(
        problem(receive(&frame, 1)),
        ShareProblem::Version {
            found: VERSION + 1,
            supported: VERSION
        }
    );
    assert_eq!(fd_count(), base);
}

#[test]
fn oversized_length_is_refused_before_reading() {
    let _s = serial();
    let base = fd_count();
    // Only the header is sent: the receiver must not wait for 4 GiB.
    let h = header(MAGIC, VERSION, Kind::Offer as u16, u32::MAX);
    assert_eq!(
        problem(receive(&h, 1)),
        ShareProblem::Oversized {
            length: u64::from(u32::MAX),
            max: u64::from(MAX_PAYLOAD)
        }
    );
    let h = header(MAGIC, VERSION, Kind::Restored as u16, MAX_PAYLOAD + 1);
    assert!(matches!(
        problem(receive(&h, 0)),
        ShareProblem::Oversized { .. }
    ));
    assert_eq!(fd_count(), base);
}

#[test]
fn unknown_kind() {
    let _s = serial();
    let base = fd_count();
    assert_eq!(
        problem(receive(&frame(99, b"{}"), 1)),
        ShareProblem::UnknownKind(99)
    );
    assert_eq!(fd_count(), base);
}

#[test]
fn malformed_payloads() {
    let _s = serial();
    let base = fd_count();
    let offer = Kind::Offer as u16;
    let cases: Vec<(u16, Vec<u8>, usize)> = vec![
        (offer, b"not json".to_vec(), 1),
        (offer, br#"{"buffer": {"size": 4096}, "state": "live"}"#.to_vec(), 1),
        (offer, br#"{"buffer": {"size": 4096, "exporter": "x"}, "state": "sideways"}"#.to_vec(), 1),
        (offer, br#"{"buffer": {"size": 0, "exporter": "x"}, "state": "live"}"#.to_vec(), 1),
        (
            offer,
            br#"{"buffer": {"size": 8192, "exporter": "x", "ranges": [{"offset": 0, "length": 4096}]}, "state": "live"}"#
                .to_vec(),
            1,
        ),
        (Kind::Revoked as u16, br#"{"why": 1}"#.to_vec(), 0),
        (Kind::Restored as u16, b"[]".to_vec(), 0),
        (Kind::ReadRequest as u16, b"[1, 0, 4]".to_vec(), 0),
        (Kind::ReadRequest as u16, br#"{"id": 1, "offset": -1, "length": 4}"#.to_vec(), 0),
        (Kind::ReadReply as u16, br#"{"id": 1, "offset": 0}"#.to_vec(), 0),
        (Kind::ReadReply as u16, br#"{"id": 1, "offset": 0, "data": "zz"}"#.to_vec(), 0),
        (Kind::ReadReply as u16, br#"{"id": 1, "offset": 0, "data": "00", "error": "x"}"#.to_vec(), 0),
        (Kind::Gone as u16, vec![0xff, 0xfe], 0),
    ];
    for (kind, payload, n) in cases {
        let text = String::from_utf8_lossy(&payload).into_owned();
        match problem(receive(&frame(kind, &payload), n)) {
            ShareProblem::Malformed { kind: k, .. } => {
                assert_eq!(Some(k), Kind::from_u16(kind).map(Kind::name), "{text}")
            }
            p => panic!("{text}: {p:?}"),
        }
    }
    assert_eq!(fd_count(), base);
}

#[test]
fn closed_before_the_offer_and_events_before_it() {
    let _s = serial();
    let base = fd_count();
    let (tx, rx) = UnixStream::pair().unwrap();
    drop(tx);
    assert!(matches!(recv(&rx), Ok(None)));
    match SharedBuffer::receive(rx) {
        Err(Error::Share {
            problem: ShareProblem::Closed,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let (tx, rx) = UnixStream::pair().unwrap();
    send_message(&tx, &Message::Restored, T).unwrap();
    match SharedBuffer::receive(rx) {
        Err(Error::Share {
            problem: ShareProblem::Unexpected {
                kind: "restored", ..
            },
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    drop(tx);
    assert_eq!(fd_count(), base);
}

#[test]
fn offer_timeout_is_typed() {
    let _s = serial();
    let (_tx, rx) = UnixStream::pair().unwrap();
    let t = std::time::Instant::now();
    match SharedBuffer::receive_with(rx, &ConnectOptions::new(Duration::from_millis(50))) {
        Err(Error::Timeout { after, .. }) => assert_eq!(after, Duration::from_millis(50)),
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn well_formed_messages_pass_and_frames_split_anywhere_reassemble() {
    let _s = serial();
    let (tx, rx) = UnixStream::pair().unwrap();
    let msgs = [
        Message::Revoked(RevokeReason::Reset),
        Message::Restored,
        Message::ReadReply {
            id: 3,
            offset: 16,
            result: Ok(vec![0xde, 0xad]),
        },
        Message::Gone(RevokeReason::DeviceClosed),
    ];
    let mut bytes = Vec::new();
    for m in &msgs {
        bytes.extend(m.encode().unwrap());
    }
    // One byte per send: the receiver must put frames together.
    for b in &bytes {
        send_raw(&tx, std::slice::from_ref(b), &[]).unwrap();
    }
    drop(tx);
    for m in &msgs {
        match recv(&rx).unwrap() {
            Some(Incoming::Message(got)) => assert_eq!(&got, m),
            other => panic!("{other:?}"),
        }
    }
    assert!(recv(&rx).unwrap().is_none());
}

#[test]
fn unknown_reason_reads_as_remote() {
    let _s = serial();
    let (tx, rx) = UnixStream::pair().unwrap();
    send_raw(
        &tx,
        &frame(
            Kind::Revoked as u16,
            br#"{"reason": "cosmic-ray", "extra": 1}"#,
        ),
        &[],
    )
    .unwrap();
    match recv(&rx).unwrap() {
        Some(Incoming::Message(Message::Revoked(RevokeReason::Remote))) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn send_to_a_closed_peer_is_epipe_not_sigpipe() {
    let _s = serial();
    // SAFETY: restores the default action, so a send without MSG_NOSIGNAL
    // would kill this test process.
    let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let (tx, rx) = UnixStream::pair().unwrap();
    drop(rx);
    let r = send_message(&tx, &Message::Restored, T);
    // SAFETY: puts back the previous action.
    unsafe { libc::signal(libc::SIGPIPE, old) };
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EPIPE));
}

#[test]
fn send_to_a_full_socket_times_out() {
    let _s = serial();
    let (tx, _rx) = UnixStream::pair().unwrap();
    let t = std::time::Instant::now();
    let err = loop {
        let wait = Some(Duration::from_millis(100));
        if let Err(e) = send_message(&tx, &Message::Restored, wait) {
            break e;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the socket never filled"
        );
    };
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
}

/// The observer API the server is built on: numbered changes, only real
/// changes, and nothing after the subscription is dropped.
#[test]
fn hub_observers_see_numbered_changes() {
    use dmabuf_p2p::revoke::{RevocationHub, StateChange};
    use std::sync::Arc;
    let hub = RevocationHub::new("observed");
    assert_eq!(
        hub.last_change(),
        StateChange {
            state: BufferState::Live,
            seq: 0
        }
    );
    let seen: Arc<Mutex<Vec<StateChange>>> = Arc::default();
    let log = Arc::clone(&seen);
    let sub = hub.subscribe(move |c| log.lock().unwrap().push(*c));
    hub.revoke(RevokeReason::MemoryDecodeOff);
    hub.revoke(RevokeReason::MemoryDecodeOff); // no change
    hub.revoke(RevokeReason::Reset); // the reason changes
    hub.restore();
    hub.restore(); // no change
    hub.close(RevokeReason::Unplug);
    hub.revoke(RevokeReason::Reset); // gone stays gone
    hub.restore();
    let want = [
        BufferState::Revoked(RevokeReason::MemoryDecodeOff),
        BufferState::Revoked(RevokeReason::Reset),
        BufferState::Live,
        BufferState::Gone(RevokeReason::Unplug),
    ];
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.iter().map(|c| c.state).collect::<Vec<_>>(), want);
    assert_eq!(got.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
    assert_eq!(
        hub.last_change(),
        StateChange {
            state: BufferState::Gone(RevokeReason::Unplug),
            seq: 4
        }
    );
    drop(sub);
    let other = RevocationHub::new("again");
    let log = Arc::clone(&seen);
    drop(other.subscribe(move |c| log.lock().unwrap().push(*c)));
    other.revoke(RevokeReason::Reset);
    assert_eq!(
        seen.lock().unwrap().len(),
        4,
        "a dropped subscription is not called"
    );
}

/// With this process's fd table full, the kernel cannot install a passed
/// fd: the receiver says so (not "control data truncated").
#[test]
fn a_full_fd_table_is_its_own_error() {
    let _s = serial();
    let r = with_free_slots(0, 1);
    assert!(
        matches!(
            r,
            Err(Error::Share {
                problem: ShareProblem::FdTableFull { closed: 0 },
                ..
            })
        ),
        "{r:?}"
    );
}

/// With one slot left in the fd table and three fds passed, the kernel
/// installs one and truncates: that one is closed too (nix does not decode
/// truncated control data; the library reads it itself).
#[test]
fn fds_installed_before_the_table_filled_are_closed() {
    let _s = serial();
    let base = fd_count();
    let r = with_free_slots(1, 3);
    assert!(
        matches!(
            r,
            Err(Error::Share {
                problem: ShareProblem::FdTableFull { closed: 1 },
                ..
            })
        ),
        "{r:?}"
    );
    assert_eq!(fd_count(), base);
}

/// Sends an offer with `passed` fds, then receives it with only `free`
/// slots left in this process's fd table (a small `RLIMIT_NOFILE`, filled
/// with duplicates of /dev/null), and puts the table and the limit back.
fn with_free_slots(free: usize, passed: usize) -> Result<Option<Incoming>, Error> {
    let (tx, rx) = UnixStream::pair().unwrap();
    {
        let f = files(passed);
        send_raw(&tx, &offer_frame(), &fds(&f)).unwrap();
    }
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `old`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
    // A small table, so filling it takes few fds.
    let small = libc::rlimit {
        rlim_cur: (fd_count() as u64 + 64).min(old.rlim_cur),
        rlim_max: old.rlim_max,
    };
    // SAFETY: setrlimit reads one rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &small) }, 0);
    let null = File::open("/dev/null").unwrap();
    let mut filler = Vec::new();
    let full = loop {
        match null.try_clone() {
            Ok(d) => filler.push(d),
            Err(e) => break e.raw_os_error(),
        }
        if filler.len() > 100_000 {
            break None;
        }
    };
    filler.truncate(filler.len().saturating_sub(free));
    let r = recv(&rx);
    drop(filler);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) }, 0);
    assert_eq!(full, Some(libc::EMFILE));
    r
}
