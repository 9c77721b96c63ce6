//! The sharing protocol's receive path (`share::recv`: frame reader, fd
//! bookkeeping, decoding of every message kind, `ping`, `pong` and
//! `refused` with its reasons included) on any bytes with 0 to 9 fds
//! attached: no panic, no fd outlives the messages (this process's fd count
//! is the same afterwards), and every message accepted means the same when
//! sent again: encoded and received once more, it is equal (a `refused`
//! message's text is kept printable and bounded, and stays so).
//!
//! Input: the first byte picks the number of fds (`% 10`) and where the
//! bytes are split in two `sendmsg`s (`/ 10`); the fds travel with the
//! second part.

#![no_main]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use dmabuf_p2p::share::{Incoming, MAX_TEXT_LEN, Message, RefusalReason, recv};
use libfuzzer_sys::fuzz_target;
use nix::sys::socket::MsgFlags;

/// The VM tests' attacking peer: `sendmsg` with any fds.
#[path = "../../vm-tests/src/raw_peer.rs"]
#[allow(dead_code)]
mod raw_peer;

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

/// Sends `data` with `fds` on the first `sendmsg`, as much as the socket
/// takes without blocking.
fn send(tx: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) {
    let _ = raw_peer::send_raw_with(tx, data, fds, MsgFlags::MSG_DONTWAIT);
}

/// `msg` encoded, sent and received again.
fn again(msg: &Message) -> Message {
    let frame = msg
        .encode()
        .unwrap_or_else(|e| panic!("{msg:?} was received but cannot be sent: {e}"));
    let (tx, rx) = UnixStream::pair().unwrap_or_else(|e| panic!("socketpair: {e}"));
    send(&tx, &frame, &[]);
    drop(tx);
    match recv(&rx) {
        Ok(Some(Incoming::Message(m))) => m,
        other => panic!("{msg:?} sent again came back as {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&head, bytes)) = data.split_first() else {
        return;
    };
    let nfds = usize::from(head % 10);
    let at = usize::from(head / 10) * bytes.len() / 25;
    let (first, second) = bytes.split_at(at.min(bytes.len()));
    let before = fd_count();
    let mut received = Vec::new();
    {
        let Ok((tx, rx)) = UnixStream::pair() else {
            return;
        };
        let files: Vec<File> = (0..nfds)
            .filter_map(|_| File::open("/dev/null").ok())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
        if second.is_empty() {
            send(&tx, first, &fds);
        } else {
            send(&tx, first, &[]);
            send(&tx, second, &fds);
        }
        drop(files);
        drop(tx);
        // Every message until the end or the first refusal.
        while let Ok(Some(m)) = recv(&rx) {
            if let Incoming::Message(m) = m {
                received.push(m);
            }
        }
    }
    assert_eq!(fd_count(), before, "an fd outlived the messages");
    for m in received {
        if let Message::Refused { reason, message } = &m {
            assert!(message.len() <= MAX_TEXT_LEN, "{} bytes kept", message.len());
            assert!(!message.chars().any(char::is_control), "{message:?}");
            assert_eq!(RefusalReason::from_name(reason.name()), *reason);
        }
        assert_eq!(again(&m), m);
    }
});
