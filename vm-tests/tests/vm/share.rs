//! Sharing a BAR between processes (`dmabuf_p2p::share`): the exporter is the
//! CLI (`/bin/dmabuf-p2p export ... --serve <socket>`, revoked with SIGUSR1 and
//! restored with SIGUSR2), the importer the CLI (`map --from`) or this test
//! process; the dma-buf fd travels over the socket and its revocations follow
//! it. Also: bad messages carrying a real dma-buf fd, the server's handling
//! of dead and stuck clients, and the walk-through of `docs/GUIDE.md`'s
//! "Sharing BARs between processes", as written there.
//!
//! The ivshmem areas used here (shm1 at 48 MiB, shm0 at 768 KiB and up) are
//! touched by no other test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{BufferState, RestorePolicy, RevocationHub, RevokeReason};
use dmabuf_p2p::share::FD_ROOM;
use dmabuf_p2p::share::{
    BufferInfo, Incoming, Message, ServerOptions, ShareProblem, ShareServer, SharedBuffer,
    encode_offer, recv, send_message, send_offer,
};
use dmabuf_p2p::{BarExport, ByteRange, Error, Iommufd, IovaPlacement, MapPerms, VfioPciDevice};
use dmabuf_p2p_engine::DmaEngine;
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_vm_tests::raw_peer::{frame, send_raw};
use dmabuf_p2p_vm_tests::{
    EDU_ID, fnv1a64, ivshmem_devices, open_fd_count, pci_devices, request_host_check,
};

const CLI: &str = "/bin/dmabuf-p2p";
/// Generous: everything runs under software emulation.
const WAIT: Duration = Duration::from_secs(60);
/// Bytes per engine copy: one edu transfer each way.
const COPY: u64 = 2048;

fn shm(size: u64) -> String {
    ivshmem_devices()
        .into_iter()
        .find(|(_, s)| *s == size)
        .map(|(b, _)| b)
        .expect("ivshmem device of that BAR2 size")
}

fn edu() -> String {
    pci_devices(EDU_ID)
        .into_iter()
        .next()
        .expect("an edu device")
}

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(73).wrapping_add(seed) ^ ((i >> 7) as u8))
        .collect()
}

/// A socket path in a directory only root can enter (the server makes it
/// 0700), never /tmp.
fn socket(name: &str) -> PathBuf {
    let p = PathBuf::from(format!("/run/dmabuf-p2p-test/share-{name}.sock"));
    let _ = std::fs::remove_file(&p);
    p
}

/// A CLI process with its stdout lines on a channel and everything it printed
/// kept for failure messages. Killed if still running when dropped.
struct Proc {
    name: String,
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(name: &str, args: &[&str]) -> Self {
        let mut child = Command::new(CLI)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {CLI} {args:?}: {e}"));
        let log = Arc::new(Mutex::new(vec![format!("$ {CLI} {}", args.join(" "))]));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let l = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let l = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(err).read_to_string(&mut text);
            l.lock()
                .unwrap()
                .extend(text.lines().map(|s| format!("stderr: {s}")));
        });
        Self {
            name: name.to_owned(),
            child,
            lines,
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The next stdout line with `needle` in it (earlier lines are skipped).
    fn wait_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => panic!(
                    "{}: no line with {needle:?} within {WAIT:?}:\n{}",
                    self.name,
                    self.log()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(100));
                    panic!(
                        "{}: ended without a line with {needle:?}:\n{}",
                        self.name,
                        self.log()
                    )
                }
            }
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill() takes no pointers; `pid` is our child, not reaped yet.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill {pid}");
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the process to exit; returns its status and all it printed.
    fn wait(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the reader threads take the last lines.
                std::thread::sleep(Duration::from_millis(200));
                return (st, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {WAIT:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `export <bdf>:2:<range> --serve <socket> --read-back --json`, once it is
/// ready.
fn serve(bdf: &str, range: ByteRange, sock: &std::path::Path) -> Proc {
    serve_with(bdf, range, sock, &["--read-back"])
}

/// `export <bdf>:2:<range> --serve <socket> --json <extra>`, once it is ready.
fn serve_with(bdf: &str, range: ByteRange, sock: &std::path::Path, extra: &[&str]) -> Proc {
    let target = format!("{bdf}:2:{:#x}+{:#x}", range.offset, range.length);
    let mut args = vec![
        "--json",
        "export",
        &target,
        "--serve",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let p = Proc::spawn("exporter", &args);
    p.wait_line("\"event\":\"ready\"");
    p
}

/// Stops the exporter with SIGTERM and checks it ends cleanly.
fn stop(exporter: Proc) -> String {
    exporter.signal(libc::SIGTERM);
    let (st, log) = exporter.wait();
    assert!(st.success(), "the exporter failed: {st}\n{log}");
    assert!(log.contains("\"event\":\"stopped\""), "{log}");
    log
}

/// The string value of `"key": "..."` in JSON text.
fn json_str(text: &str, key: &str) -> Option<String> {
    let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = text[at..].trim_start().strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}

/// (a) The CLI exporter serves shm1's BAR2 area, the CLI importer maps it into
/// its own IOAS, its edu copies a pattern in, and the bytes are checked three
/// ways: by the exporter's read-back and by a copy back out (both inside
/// `map`), then here through a BAR mmap once the exporter is gone, and by the
/// host in the backing file.
#[test]
fn cli_importer_copy_lands_in_the_exporters_bar() {
    const AREA: u64 = 0x300_0000;
    const AT: u64 = 0x1000;
    let shm1 = shm(64 << 20);
    let sock = socket("a");
    let exporter = serve(&shm1, ByteRange::new(AREA, 0x10000), &sock);

    let edu = edu();
    let importer = Proc::spawn(
        "importer",
        &[
            "--json",
            "map",
            "--from",
            sock.to_str().unwrap(),
            "--engine",
            &edu,
            "--size",
            "2K",
            "--offset",
            "0x1000",
            "--seed",
            "90",
        ],
    );
    let (st, out) = importer.wait();
    assert!(
        st.success(),
        "map failed ({st}):\n{out}\nexporter:\n{}",
        exporter.log()
    );
    assert!(out.contains("\"passed\": true"), "{out}");
    assert!(
        out.contains("the exporter read the pattern from its BAR"),
        "{out}"
    );
    assert!(
        out.contains("copied back out by the engine: the pattern"),
        "{out}"
    );
    assert_eq!(
        json_str(&out, "exp_name").as_deref(),
        Some("vfio_pci_core"),
        "{out}"
    );
    let want = json_str(&out, "fnv1a64").expect("the copy's hash");
    exporter.wait_line("\"event\":\"client\"");
    stop(exporter);

    // The exporter is gone; look at the BAR ourselves.
    let iommufd = Iommufd::open().unwrap();
    let mut dev = VfioPciDevice::open(shm1.parse().unwrap()).unwrap();
    dev.bind(&iommufd).unwrap();
    dev.set_memory_decode(true).unwrap();
    let mut got = vec![0u8; COPY as usize];
    dev.map_bar(2).unwrap().read(AREA + AT, &mut got).unwrap();
    assert_eq!(
        format!("{:016x}", fnv1a64(&got)),
        want,
        "the BAR holds what the importer's engine copied"
    );
    request_host_check("shm1", AREA + AT, &got);
}

/// (b) The CLI exporter revokes (SIGUSR1): this process, the importer, sees
/// its attachment torn down, and an engine copy to the old IOVA changes no
/// byte of the BAR; the exporter restores (SIGUSR2): the attachment is mapped
/// again at the same IOVA and the next copy lands. Then the exporter stops and
/// the buffer is gone here too.
#[test]
fn revocation_follows_the_buffer_to_the_importer() {
    const AREA: u64 = 0x301_0000;
    const AT: u64 = 0x800;
    let shm1 = shm(64 << 20);
    let sock = socket("b");
    let mut exporter = serve(&shm1, ByteRange::new(AREA, 0x10000), &sock);

    let shared = SharedBuffer::connect(&sock, WAIT).unwrap();
    let info = shared.info().clone();
    assert_eq!(info.size, 0x10000);
    assert_eq!(
        (info.device.as_deref(), info.bar),
        (Some(shm1.as_str()), Some(2))
    );
    assert_eq!(info.ranges, vec![ByteRange::new(AREA, 0x10000)]);
    assert_eq!(info.phys.len(), 1);
    assert_eq!(shared.dmabuf().fdinfo().unwrap().exp_name, "vfio_pci_core");
    assert_eq!(shared.remote_state(), BufferState::Live);

    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let att = shared
        .attach(
            &ioas,
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
            RestorePolicy::Automatic,
        )
        .unwrap();
    assert_eq!(att.phys_ranges(), info.phys.as_slice());
    let mut engine = Edu::open(edu().parse().unwrap(), &ioas).unwrap();
    let src = Memfd::new("share-src", 0x3000).unwrap();
    let (a, b, c) = (pattern(1, COPY), pattern(2, COPY), pattern(3, COPY));
    src.write_at(0, &a).unwrap();
    src.write_at(0x1000, &b).unwrap();
    src.write_at(0x2000, &c).unwrap();
    let src_map = ioas
        .map_file(
            &src,
            ByteRange::new(0, 0x3000),
            IovaPlacement::Auto,
            MapPerms::Read,
        )
        .unwrap();
    let iova = att.iova();

    // Live: the copy lands, as the exporter's read-back shows.
    att.ensure_live().unwrap();
    engine
        .memcpy(src_map.iova(), iova + AT, COPY, WAIT)
        .unwrap();
    assert_eq!(
        shared.read_back(AT, COPY, WAIT).unwrap(),
        a,
        "the first copy landed"
    );

    // Revoked by the exporter.
    exporter.signal(libc::SIGUSR1);
    let state = shared
        .wait_remote(WAIT, |s| s != BufferState::Live)
        .unwrap();
    assert_eq!(state, BufferState::Revoked(RevokeReason::MemoryDecodeOff));
    assert!(att.is_revoked());
    assert_eq!(att.revoked_reason(), Some(RevokeReason::Remote));
    assert!(matches!(att.ensure_live(), Err(Error::Revoked { .. })));
    assert_eq!(
        shared.hub().state(),
        BufferState::Revoked(RevokeReason::Remote)
    );
    match shared.read_back(AT, COPY, WAIT) {
        Err(Error::Share {
            problem: ShareProblem::Refused(why),
            ..
        }) => assert!(why.contains("not live"), "{why}"),
        other => panic!("a read-back of a revoked buffer: {other:?}"),
    }
    let line = exporter.wait_line("\"state\":\"revoked\"");
    assert!(line.contains("\"clients\":1"), "{line}");
    // A raw copy to the old IOVA: faults in the IOMMU, lands nowhere.
    let blocked = engine.memcpy(src_map.iova() + 0x1000, iova + AT, COPY, WAIT);
    eprintln!("copy to the revoked IOVA: {blocked:?}");

    // Restored by the exporter: same IOVA, and the blocked copy left no trace.
    exporter.signal(libc::SIGUSR2);
    assert_eq!(
        shared
            .wait_remote(WAIT, |s| s == BufferState::Live)
            .unwrap(),
        BufferState::Live
    );
    assert!(!att.is_revoked());
    assert_eq!(att.iova(), iova, "restored at the same IOVA");
    assert_eq!(att.counts(), (1, 1));
    exporter.wait_line("\"state\":\"live\"");
    let after = shared.read_back(AT, COPY, WAIT).unwrap();
    let changed = after.iter().zip(&a).filter(|(x, y)| x != y).count();
    assert_eq!(
        changed, 0,
        "the copy to the revoked IOVA changed {changed} bytes of the BAR"
    );

    // And the next copy lands.
    att.ensure_live().unwrap();
    engine
        .memcpy(src_map.iova() + 0x2000, iova + AT, COPY, WAIT)
        .unwrap();
    assert_eq!(
        shared.read_back(AT, COPY, WAIT).unwrap(),
        c,
        "the copy after the restore landed"
    );
    request_host_check("shm1", AREA + AT, &c);
    assert_eq!(shared.events(), 2);

    // The exporter stops: gone here too.
    assert!(exporter.running());
    stop(exporter);
    let gone = shared
        .wait_remote(WAIT, |s| matches!(s, BufferState::Gone(_)))
        .unwrap();
    assert_eq!(gone, BufferState::Gone(RevokeReason::DeviceClosed));
    assert!(att.is_revoked());
    assert!(matches!(shared.hub().state(), BufferState::Gone(_)));
}

/// (c) An importer (the CLI, mapped and watching) is killed with SIGKILL: the
/// exporter carries on, revokes and restores without it, and serves a new
/// client whose copy lands.
#[test]
fn killed_importer_leaves_the_exporter_serving() {
    const AREA: u64 = 0xc_0000;
    let shm0 = shm(1 << 20);
    let sock = socket("c");
    let mut exporter = serve(&shm0, ByteRange::new(AREA, 0x10000), &sock);

    let mut first = Proc::spawn(
        "importer",
        &["--json", "map", "--from", sock.to_str().unwrap(), "--watch"],
    );
    first.wait_line("\"event\":\"watching\"");
    exporter.wait_line("\"event\":\"client\"");
    first.child.kill().unwrap();
    let (st, _) = first.wait();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(st.signal(), Some(libc::SIGKILL));

    // Revocations find a dead client (or none, once its thread saw the hang-up).
    exporter.signal(libc::SIGUSR1);
    exporter.wait_line("\"state\":\"revoked\"");
    exporter.signal(libc::SIGUSR2);
    let line = exporter.wait_line("\"state\":\"live\"");
    assert!(
        line.contains("\"clients\":0"),
        "the dead client was dropped: {line}"
    );
    assert!(
        exporter.running(),
        "the exporter survived its client:\n{}",
        exporter.log()
    );

    // A new client.
    let shared = SharedBuffer::connect(&sock, WAIT).unwrap();
    let ioas = Iommufd::open().unwrap().alloc_ioas().unwrap();
    let att = shared
        .attach(
            &ioas,
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
            RestorePolicy::Automatic,
        )
        .unwrap();
    let mut engine = Edu::open(edu().parse().unwrap(), &ioas).unwrap();
    let data = pattern(9, COPY);
    let src = Memfd::new("share-src", 0x1000).unwrap();
    src.write_at(0, &data).unwrap();
    let src_map = ioas
        .map_file(
            &src,
            ByteRange::new(0, 0x1000),
            IovaPlacement::Auto,
            MapPerms::Read,
        )
        .unwrap();
    engine
        .memcpy(src_map.iova(), att.iova(), COPY, WAIT)
        .unwrap();
    assert_eq!(shared.read_back(0, COPY, WAIT).unwrap(), data);
    let line = exporter.wait_line("\"event\":\"client\"");
    assert!(line.contains("\"clients\":1"), "{line}");
    stop(exporter);
    request_host_check("shm0", AREA, &data);
}

/// Opens shm0 in this process and exports `range` of its BAR2.
fn own_export(range: ByteRange) -> (VfioPciDevice, BarExport) {
    let iommufd = Iommufd::open().unwrap();
    let mut dev = VfioPciDevice::open(shm(1 << 20).parse().unwrap()).unwrap();
    dev.bind(&iommufd).unwrap();
    dev.set_memory_decode(true).unwrap();
    let export = dev.export_bar(2, &[range]).unwrap();
    (dev, export)
}

/// (d) Bad messages that carry a real dma-buf fd are refused with their typed
/// problem, and neither an fd nor a reference to the buffer is left behind
/// (this process's fd count and the dma-buf's file count are unchanged). A
/// good offer then passes.
#[test]
fn bad_messages_with_a_real_dmabuf_leave_nothing_behind() {
    use std::os::fd::AsFd;
    let (_dev, export) = own_export(ByteRange::new(0xd_0000, 0x10000));
    let buf = export.dmabuf();
    let info = BufferInfo::from_export(&export);
    let fds = open_fd_count();
    let refs = buf.fdinfo().unwrap().count;
    let unchanged = |what: &str| {
        assert_eq!(open_fd_count(), fds, "{what}: an fd was left open");
        assert_eq!(
            buf.fdinfo().unwrap().count,
            refs,
            "{what}: a reference to the dma-buf was left"
        );
    };
    let refused = |what: &str, data: &[u8], n: usize| -> ShareProblem {
        let (tx, rx) = UnixStream::pair().unwrap();
        let many: Vec<_> = (0..n).map(|_| buf.as_fd()).collect();
        send_raw(&tx, data, &many).unwrap();
        drop(tx);
        let r = SharedBuffer::receive(rx);
        let p = match r {
            Err(Error::Share { problem, .. }) => problem,
            other => panic!("{what}: {other:?}"),
        };
        unchanged(what);
        p
    };

    let mut wrong = info.clone();
    wrong.size = 0x20000;
    wrong.ranges = vec![ByteRange::new(0xd_0000, 0x20000)];
    assert_eq!(
        refused(
            "wrong size",
            &encode_offer(&wrong, BufferState::Live).unwrap(),
            1
        ),
        ShareProblem::SizeMismatch {
            announced: 0x20000,
            actual: 0x10000
        }
    );
    let offer = encode_offer(&info, BufferState::Live).unwrap();
    assert_eq!(
        refused("two fds", &offer, 2),
        ShareProblem::TooManyFds { count: 2, max: 1 }
    );
    assert_eq!(
        refused("too many fds", &offer, FD_ROOM + 3),
        ShareProblem::ControlTruncated {
            closed: FD_ROOM,
            room: FD_ROOM
        }
    );
    assert!(matches!(
        refused("cut short", &offer[..offer.len() - 1], 1),
        ShareProblem::Truncated {
            what: "payload",
            ..
        }
    ));
    let mut bad = offer.clone();
    bad[0] = b'X';
    assert!(matches!(
        refused("bad magic", &bad, 1),
        ShareProblem::BadMagic { .. }
    ));
    assert_eq!(
        refused("unknown kind", &frame(77, b"{}"), 1),
        ShareProblem::UnknownKind(77)
    );
    assert_eq!(
        refused(
            "not an offer",
            &Message::Revoked(RevokeReason::Reset).encode().unwrap(),
            1
        ),
        ShareProblem::UnexpectedFds {
            kind: "revoked",
            count: 1,
            expected: 0
        }
    );

    // A good offer passes, and it is the same buffer.
    let (tx, rx) = UnixStream::pair().unwrap();
    send_offer(&tx, buf, &info, BufferState::Live, Some(WAIT)).unwrap();
    let shared = SharedBuffer::receive(rx).unwrap();
    assert_eq!(
        shared.dmabuf().fdinfo().unwrap().ino,
        buf.fdinfo().unwrap().ino
    );
    assert_eq!(shared.info(), &info);
    drop(shared);
    drop(tx);
    unchanged("a received and dropped buffer");
}

/// The server with a real dma-buf: offers and events in order, read requests
/// without a reader refused, a dead client dropped without a SIGPIPE, a stuck
/// client dropped after the send timeout instead of blocking the exporter.
#[test]
fn server_forwards_events_and_drops_dead_and_stuck_clients() {
    let (dev, export) = own_export(ByteRange::new(0xe_0000, 0x10000));
    let server = ShareServer::new(&export).unwrap();
    // The first client reads only what this test asks for: no pings.
    let mut options = ServerOptions::default();
    options.ping_interval = Duration::from_secs(3600);
    server.set_options(options);
    let (ours, theirs) = UnixStream::pair().unwrap();
    server.add_client(ours).unwrap();
    match recv(&theirs).unwrap() {
        Some(Incoming::Offer(o)) => {
            assert_eq!((o.info.size, o.state), (0x10000, BufferState::Live));
            assert_eq!(
                o.buf.fdinfo().unwrap().ino,
                export.dmabuf().fdinfo().unwrap().ino
            );
        }
        other => panic!("{other:?}"),
    }
    dev.set_memory_decode(false).unwrap();
    dev.set_memory_decode(true).unwrap();
    for want in [
        Message::Revoked(RevokeReason::MemoryDecodeOff),
        Message::Restored,
    ] {
        match recv(&theirs).unwrap() {
            Some(Incoming::Message(m)) => assert_eq!(m, want),
            other => panic!("{other:?}"),
        }
    }
    send_message(
        &theirs,
        &Message::ReadRequest {
            id: 5,
            offset: 0,
            length: 16,
        },
        Some(WAIT),
    )
    .unwrap();
    match recv(&theirs).unwrap() {
        Some(Incoming::Message(Message::ReadReply {
            id: 5,
            result: Err(why),
            ..
        })) => assert!(why.contains("read-back"), "{why}"),
        other => panic!("{other:?}"),
    }
    server.set_read_back(|offset, buf| {
        buf.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (offset as u8).wrapping_add(i as u8));
        Ok(())
    });
    send_message(
        &theirs,
        &Message::ReadRequest {
            id: 6,
            offset: 3,
            length: 4,
        },
        Some(WAIT),
    )
    .unwrap();
    match recv(&theirs).unwrap() {
        Some(Incoming::Message(Message::ReadReply {
            id: 6,
            result: Ok(d),
            ..
        })) => assert_eq!(d, [3, 4, 5, 6]),
        other => panic!("{other:?}"),
    }

    // A dead client: hung up before the next event. With SIGPIPE's default
    // action, a send without MSG_NOSIGNAL would kill this process.
    let (ours, dead) = UnixStream::pair().unwrap();
    server.add_client(ours).unwrap();
    drop(dead);
    // SAFETY: sets the default action for SIGPIPE; restored below.
    let old = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    dev.set_memory_decode(false).unwrap();
    dev.set_memory_decode(true).unwrap();
    // SAFETY: puts the previous action back.
    unsafe { libc::signal(libc::SIGPIPE, old) };
    let t = Instant::now();
    while server.client_count() > 1 {
        assert!(t.elapsed() < WAIT, "the dead client is still there");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(server.dropped_count() >= 1);

    // A stuck client, on a hub of its own (revoking in userspace only): it
    // never reads, its socket fills, and it is dropped.
    let stuck_server = ShareServer::from_parts(
        export.dmabuf().try_clone().unwrap(),
        BufferInfo::from_export(&export),
        RevocationHub::new("stuck-client test"),
    )
    .unwrap();
    stuck_server.set_send_timeout(Duration::from_millis(50));
    let (ours, _stuck) = UnixStream::pair().unwrap();
    stuck_server.add_client(ours).unwrap();
    let t = Instant::now();
    let mut changes = 0u32;
    while stuck_server.client_count() > 0 {
        assert!(
            t.elapsed() < WAIT,
            "the stuck client is still there after {changes} changes"
        );
        let round = Instant::now();
        stuck_server.hub().revoke(RevokeReason::Reset);
        stuck_server.hub().restore();
        assert!(
            round.elapsed() < Duration::from_secs(5),
            "a change blocked for {:?}",
            round.elapsed()
        );
        changes += 2;
    }
    eprintln!(
        "the stuck client was dropped after {changes} changes, {:?}",
        t.elapsed()
    );
    drop(stuck_server);
    drop(server);
    // The first client hears what it has not read yet, then the end.
    let mut tail = Vec::new();
    loop {
        match recv(&theirs) {
            Ok(Some(Incoming::Message(m))) => tail.push(m),
            Ok(None) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        tail,
        [
            Message::Revoked(RevokeReason::MemoryDecodeOff),
            Message::Restored
        ]
    );
}

/// The snippet of `docs/GUIDE.md`, "Sharing BARs between processes", as
/// written there (with this VM's device address). Keep the two in step.
#[test]
fn guide_sharing_walkthrough() -> Result<(), Box<dyn std::error::Error>> {
    let exporter_bdf = shm(1 << 20);
    // --- from docs/GUIDE.md ---
    use dmabuf_p2p::revoke::{BufferState, RestorePolicy};
    use dmabuf_p2p::share::{ShareServer, SharedBuffer};
    use dmabuf_p2p::{ByteRange, Iommufd, IovaPlacement, MapPerms, VfioPciDevice};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    // The exporting process: export a BAR range and serve it.
    let iommufd = Iommufd::open()?;
    let mut exporter = VfioPciDevice::open(exporter_bdf.parse()?)?;
    exporter.bind(&iommufd)?;
    exporter.set_memory_decode(true)?;
    let export = exporter.export_bar(2, &[ByteRange::new(0, 64 << 10)])?;
    let server = ShareServer::new(&export)?;
    let (to_importer, from_exporter) = UnixStream::pair()?; // or UnixListener::accept / UnixStream::connect
    server.add_client(to_importer)?;

    // The importing process: receive the buffer, map it into its own IOAS.
    let shared = SharedBuffer::receive(from_exporter)?;
    println!("{} bytes of {}", shared.info().size, shared.info().exporter);
    let ioas = Iommufd::open()?.alloc_ioas()?;
    let att = shared.attach(
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )?;
    let iova = att.iova();

    // The exporter revokes: the importer's attachment follows...
    exporter.set_memory_decode(false)?;
    shared.wait_remote(Duration::from_secs(5), |s| s != BufferState::Live)?;
    assert!(att.is_revoked());
    // ... and comes back, at the same IOVA.
    exporter.set_memory_decode(true)?;
    shared.wait_remote(Duration::from_secs(5), |s| s == BufferState::Live)?;
    assert!(!att.is_revoked() && att.iova() == iova);
    // --- end ---
    Ok(())
}
