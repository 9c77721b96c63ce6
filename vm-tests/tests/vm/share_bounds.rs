//! The attacks of issue 27 on `export --serve`, each refused or bounded:
//!
//! 1. an exporter whose stdout nobody reads, under connect/close churn,
//!    still revokes and exits at once;
//! 2. socket paths another user could change are refused, and the
//!    exit-time unlink removes only the exporter's own socket;
//! 3. clients that never read, never answer or drip, from one process or
//!    one uid, cannot lock out the owner's importers, and are told why;
//! 4. `--allow-gid` and `--allow-uid` let in exactly whom the socket file
//!    lets in;
//! 5. `--serve` without a path serves at the documented default, `/tmp`
//!    is refused unless allowed, errors name the socket;
//! 6. no offer says `live` for a buffer the kernel has revoked.
//!
//! The ivshmem areas used (shm0 at 0x6_0000 and 0x7_0000) are touched by no
//! other test; another user is a forked child with setuid/setgid.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::io::{BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmabuf_p2p::revoke::{BufferState, RevokeReason, probe_revoked};
use dmabuf_p2p::share::{
    Incoming, Message, ServerOptions, ShareProblem, ShareServer, SharedBuffer, recv, recv_timeout,
};
use dmabuf_p2p::{ByteRange, Error, Iommufd};
use dmabuf_p2p_vm_tests::raw_peer::{frame, send_raw};
use dmabuf_p2p_vm_tests::{child_exit, pipe};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};

use super::share_attacks::{
    CLI, OTHER_UID, Proc, WAIT, as_other_user, as_user, fresh_dir, own_export, serve, shm0,
};

const AREA: ByteRange = ByteRange::new(0x6_0000, 0x10000);

/// A measurement for the run's report (libtest keeps a passing test's
/// `eprintln!`; this goes to the report as it is).
macro_rules! note {
    ($($arg:tt)*) => {
        dmabuf_p2p_vm_tests::directive(&format!("share_bounds: {}", format_args!($($arg)*)))
    };
}

/// The stderr lines of a [`Proc`] log.
fn stderr_of(log: &str) -> String {
    log.lines()
        .filter(|l| l.starts_with("stderr:"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Bytes waiting in a socket's or pipe's receive queue (`FIONREAD`).
fn queued(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to `n`, which outlives the call.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &raw mut n) };
    assert_eq!(rc, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    usize::try_from(n).unwrap()
}

/// A child process killed if the test ends while it runs (a failed test
/// must not leave an exporter holding the device for the next).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Polls `done` every millisecond until it holds; how long that took.
fn time_until(within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < within, "not within {within:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
    t.elapsed()
}

/// How long an exporter under churn took for each step, from its signal.
#[derive(Debug)]
struct Timings {
    /// The kernel revoked the importer's dma-buf (`probe_revoked`).
    revoked: Duration,
    /// The importer heard `revoked`.
    told: Duration,
    /// The importer heard `restored`.
    restored: Duration,
    /// The importer heard `gone`.
    gone: Duration,
    /// The exporter exited.
    exited: Duration,
    /// Connections the churn made meanwhile.
    connects: usize,
}

/// Serves shm0's `AREA` from the CLI with its stdout on a one-page pipe,
/// read up to the ready line and then, if `stall`, never again (else read
/// to the end by a thread); a thread connects and hangs up as fast as it
/// can meanwhile (same uid: the per-process share refuses most, so there is
/// plenty to log). Then SIGUSR1, SIGUSR2 and SIGTERM, each timed.
fn revoke_under_churn(stall: bool) -> Timings {
    let dir = fresh_dir("stall");
    let sock = dir.join("bar.sock");
    let (read_end, write_end) = pipe();
    // SAFETY: F_SETPIPE_SZ takes an int; the pipe is empty.
    let size = unsafe { libc::fcntl(read_end.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(
        size >= 4096,
        "F_SETPIPE_SZ: {}",
        std::io::Error::last_os_error()
    );
    let size = usize::try_from(size).unwrap();
    let target = format!("{}:2:{:#x}+{:#x}", shm0(), AREA.offset, AREA.length);
    let mut child = Killed(
        Command::new(CLI)
            .args([
                "--json",
                "export",
                &target,
                "--serve",
                sock.to_str().unwrap(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let err_text = std::thread::spawn(move || {
        let mut t = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut t);
        t
    });
    // Read up to the ready line, one byte at a time (nothing after it is
    // taken from the pipe).
    let mut out = fs::File::from(read_end);
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("\"event\":\"ready\"")
        || seen.last() != Some(&b'\n')
    {
        assert_eq!(out.read(&mut b).unwrap(), 1, "the exporter ended");
        seen.push(b[0]);
    }
    let pid = libc::pid_t::try_from(child.0.id()).unwrap();
    let kill = |sig| {
        // SAFETY: kill() takes no pointers; the child is not reaped yet.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    };

    let shared = SharedBuffer::connect(&sock, WAIT).unwrap();
    let iommufd = Iommufd::open().unwrap();
    assert!(!probe_revoked(&iommufd, shared.dmabuf()).unwrap());

    let stop = Arc::new(AtomicBool::new(false));
    let connects = Arc::new(AtomicUsize::new(0));
    let churn = {
        let (stop, connects) = (Arc::clone(&stop), Arc::clone(&connects));
        let addr = UnixAddr::new(&sock).unwrap();
        std::thread::spawn(move || {
            // Non-blocking connects: a server that stopped accepting cannot
            // hang this thread (a full backlog is EAGAIN).
            while !stop.load(Ordering::Relaxed) {
                let fd = socket(
                    AddressFamily::Unix,
                    SockType::Stream,
                    SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .unwrap();
                if connect(fd.as_raw_fd(), &addr).is_ok() {
                    connects.fetch_add(1, Ordering::Relaxed);
                } else {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    let reader = if stall {
        let filled = time_until(WAIT, || queued(out.as_raw_fd()) + 512 >= size);
        // And long enough for the exporter's own queues to fill behind it.
        std::thread::sleep(Duration::from_secs(3));
        note!(
            "stdout pipe full after {filled:?} ({} bytes queued); {} connects so far",
            queued(out.as_raw_fd()),
            connects.load(Ordering::Relaxed)
        );
        None
    } else {
        std::thread::sleep(Duration::from_secs(3));
        Some(std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            text
        }))
    };

    let t = Instant::now();
    kill(libc::SIGUSR1);
    let revoked = time_until(WAIT, || probe_revoked(&iommufd, shared.dmabuf()).unwrap());
    let state = shared
        .wait_remote(WAIT, |s| s != BufferState::Live)
        .unwrap();
    let told = t.elapsed();
    assert_eq!(state, BufferState::Revoked(RevokeReason::MemoryDecodeOff));

    let t = Instant::now();
    kill(libc::SIGUSR2);
    shared
        .wait_remote(WAIT, |s| s == BufferState::Live)
        .unwrap();
    let restored = t.elapsed();
    assert!(!probe_revoked(&iommufd, shared.dmabuf()).unwrap());

    let t = Instant::now();
    kill(libc::SIGTERM);
    let gone_state = shared
        .wait_remote(WAIT, |s| matches!(s, BufferState::Gone(_)))
        .unwrap();
    let gone = t.elapsed();
    let exited = time_until(WAIT, || child.0.try_wait().unwrap().is_some());
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(gone_state, BufferState::Gone(RevokeReason::DeviceClosed));
    assert!(status.success(), "{status}: {}", err_text.join().unwrap());
    if let Some(r) = reader {
        let text = r.join().unwrap();
        assert!(text.contains("\"event\":\"stopped\""), "{text}");
    }
    assert!(!sock.exists(), "the socket was left behind");
    let _ = fs::remove_dir_all(&dir);
    Timings {
        revoked,
        told,
        restored,
        gone,
        exited,
        connects: connects.load(Ordering::Relaxed),
    }
}

/// Issue 27, attack 1. An exporter whose stdout reader stopped reading
/// (a one-page pipe, full), under connect/close churn: SIGUSR1 must still
/// revoke the buffer in the kernel (the importer's dma-buf maps no more)
/// and the importer must hear `revoked`; SIGUSR2 restores; SIGTERM closes
/// the device and exits, and the importer hears `gone`. Before, each waited
/// more than 8 s, until the reader died. The same run with the stdout read
/// is the control; the bound is generous (software emulation).
#[test]
fn a_stalled_stdout_never_delays_revocation_or_exit() {
    let read = revoke_under_churn(false);
    let stalled = revoke_under_churn(true);
    note!("stdout read (control): {read:?}");
    note!("stdout stalled:        {stalled:?}");
    assert!(
        read.connects > 100 && stalled.connects > 100,
        "too little churn to tell"
    );
    for (what, took) in [
        ("the kernel revoke", stalled.revoked),
        ("the revoked message", stalled.told),
        ("the restore", stalled.restored),
        ("gone", stalled.gone),
        ("the exit", stalled.exited),
    ] {
        assert!(took < Duration::from_secs(3), "{what} took {took:?}");
    }
}

/// Issue 27, attack 2, first half: root is asked to serve on paths another
/// user could change, and refuses each, naming the directory: the issue's
/// own (a directory of uid 1000 higher up), a symlink on the path, a
/// directory others may write, and (even when sticky directories are
/// allowed) an entry of another user in a sticky one.
#[test]
fn socket_paths_another_user_could_change_are_refused() {
    let base = fresh_dir("paths");
    fs::create_dir_all(&base).unwrap();
    let refused = |sock: &Path, extra: &str, want: &str| {
        let mut p = Proc::spawn_sh(&format!(
            "exec {CLI} --json export {}:2:{:#x}+{:#x} --serve {} {extra}",
            shm0(),
            AREA.offset,
            AREA.length,
            sock.display()
        ));
        let st = p.wait_exit(WAIT).expect("the exporter gives up");
        assert!(!st.success(), "{}", p.log());
        let log = p.log();
        let error = stderr_of(&log);
        assert!(error.contains(want), "wanted {want:?}:\n{log}");
        assert!(
            error.contains(&format!("socket {}", sock.display())),
            "the error names the socket:\n{log}"
        );
        assert!(!sock.exists(), "{} was made", sock.display());
    };
    // The issue's setup: a directory uid 1000 controls, higher up.
    let theirs = base.join("u1000");
    fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(OTHER_UID), Some(OTHER_UID)).unwrap();
    refused(
        &theirs.join("sub").join("bar.sock"),
        "",
        &format!("{} belongs to uid {OTHER_UID}", theirs.display()),
    );
    assert!(!theirs.join("sub").exists(), "a directory was made in it");
    // A symlink on the path (to a root directory): not followed.
    let real = base.join("real");
    fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, base.join("link")).unwrap();
    refused(
        &base.join("link").join("bar.sock"),
        "",
        "is a symbolic link",
    );
    // A directory others may write.
    let open = base.join("open");
    fs::create_dir(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
    refused(&open.join("bar.sock"), "", "other users may write");
    let group = base.join("group");
    fs::create_dir(&group).unwrap();
    fs::set_permissions(&group, fs::Permissions::from_mode(0o770)).unwrap();
    refused(&group.join("bar.sock"), "", "other users may write");
    // A sticky directory, allowed: another user's entry in it is refused.
    let sticky = base.join("sticky");
    fs::create_dir(&sticky).unwrap();
    fs::set_permissions(&sticky, fs::Permissions::from_mode(0o1777)).unwrap();
    let s = sticky.clone();
    let made = as_other_user(move || match fs::create_dir(s.join("mine")) {
        Ok(()) => "made".into(),
        Err(e) => e.to_string(),
    });
    assert_eq!(made, "made");
    refused(
        &sticky.join("mine").join("bar.sock"),
        "--allow-sticky-dir",
        "in a shared sticky directory and belongs to uid 1000",
    );
    let _ = fs::remove_dir_all(&base);
}

/// Issue 27, attack 2, second half: while root serves, the socket's
/// directory is moved away and a symlink to another directory holding a
/// socket of the same name takes its path (root does it here: only root
/// could, on a path the exporter accepts). On SIGTERM the exporter removes
/// its own socket, in the moved directory, and leaves the other alone. Then
/// the same with our socket's name taken by another socket in place.
#[test]
fn the_exit_time_unlink_removes_only_our_socket() {
    let base = fresh_dir("swap");
    let victim = base.join("victim");
    fs::create_dir_all(&victim).unwrap();
    let victims = UnixListener::bind(victim.join("bar.sock")).unwrap();
    let ours = base.join("a").join("bar.sock");
    let mut exporter = serve(AREA, &ours, "", "");
    fs::rename(base.join("a"), base.join("moved")).unwrap();
    std::os::unix::fs::symlink(&victim, base.join("a")).unwrap();
    exporter.signal(libc::SIGTERM);
    let st = exporter.wait_exit(WAIT).expect("the exporter exits");
    assert!(st.success(), "{}", exporter.log());
    assert!(
        victim.join("bar.sock").exists(),
        "the other directory's socket was removed:\n{}",
        exporter.log()
    );
    assert!(
        !base.join("moved").join("bar.sock").exists(),
        "our socket was left behind"
    );
    drop(victims);

    // Our socket's name taken by another socket: left alone.
    let ours = base.join("b").join("bar.sock");
    let mut exporter = serve(AREA, &ours, "", "");
    fs::remove_file(&ours).unwrap();
    let other = UnixListener::bind(&ours).unwrap();
    exporter.signal(libc::SIGTERM);
    let st = exporter.wait_exit(WAIT).expect("the exporter exits");
    assert!(st.success(), "{}", exporter.log());
    assert!(ours.exists(), "a socket that is not ours was removed");
    drop(other);
    let _ = fs::remove_dir_all(&base);
}

/// What a connection got first: `offer`, `refused <reason>`, or what else.
fn first_message(s: &UnixStream) -> String {
    match recv_timeout(s, Duration::from_secs(30)) {
        Ok(Some(Incoming::Offer(_))) => "offer".into(),
        Ok(Some(Incoming::Message(Message::Refused { reason, .. }))) => format!("refused {reason}"),
        other => format!("{other:?}"),
    }
}

/// Counts the words of `firsts` (e.g. `offer: 8, refused process-share: 56`).
fn tally(firsts: &[String]) -> String {
    let mut kinds: Vec<(String, usize)> = Vec::new();
    for f in firsts {
        match kinds.iter_mut().find(|(k, _)| k == f) {
            Some((_, n)) => *n += 1,
            None => kinds.push((f.clone(), 1)),
        }
    }
    kinds.sort();
    kinds
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A forked child that opened connections and keeps them, never reading or
/// sending more, until it is killed ([`release`](Self::release)).
struct Holder {
    pid: libc::pid_t,
    /// What each connection got first, tallied.
    report: String,
}

impl Holder {
    /// Forks a child of `uid` (effective gid the same, no other groups)
    /// that opens `n` connections to `sock`, reads what each gets first,
    /// reports the tally and then holds them.
    fn spawn(sock: &Path, uid: u32, n: usize) -> Self {
        let (report_read, report_write) = pipe();
        // SAFETY: the child runs only the code below and never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            drop(report_read);
            // SAFETY: plain syscalls on integers; an empty group list.
            let ok = unsafe { libc::setgroups(0, std::ptr::null()) } == 0
                // SAFETY: as above.
                && unsafe { libc::setgid(uid) } == 0
                // SAFETY: as above.
                && unsafe { libc::setuid(uid) } == 0;
            let conns: Vec<UnixStream> = if ok {
                (0..n)
                    .filter_map(|_| UnixStream::connect(sock).ok())
                    .collect()
            } else {
                Vec::new()
            };
            let firsts: Vec<String> = conns.iter().map(first_message).collect();
            let report = tally(&firsts);
            // SAFETY: a write from a live buffer to an open pipe.
            unsafe {
                libc::write(
                    report_write.as_raw_fd(),
                    report.as_ptr().cast(),
                    report.len(),
                )
            };
            drop(report_write);
            loop {
                // SAFETY: pause takes nothing; SIGKILL ends it.
                unsafe { libc::pause() };
            }
        }
        drop(report_write);
        let mut report = String::new();
        fs::File::from(report_read)
            .read_to_string(&mut report)
            .unwrap();
        Self { pid, report }
    }

    /// Kills the child (its connections close with it).
    fn release(self) {
        // SAFETY: kill and waitpid on our own child, into a local.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let mut status = 0;
        // SAFETY: as above.
        assert_eq!(unsafe { libc::waitpid(self.pid, &mut status, 0) }, self.pid);
    }
}

/// Issue 27, attack 3, with the CLI (64 slots: 16 kept for root's own
/// importers, 16 per other uid, 8 per process): one root process opens 64
/// connections and never reads; four processes of uid 1000 (allowed) open
/// 8 each; a root process drips 100 connections. Each process gets its
/// share and every other connection is told why (`process-share`,
/// `uid-share`); the owner's importer (this process) is served at once;
/// the dripping ones are dropped as stalled (told so) within the frame
/// deadline.
#[test]
fn no_process_or_uid_can_lock_out_the_owners_importers() {
    let dir = fresh_dir("lockout");
    let sock = dir.join("bar.sock");
    let exporter = serve(AREA, &sock, "", &format!("--allow-uid {OTHER_UID}"));
    let idle = Holder::spawn(&sock, 0, 64);
    assert_eq!(
        idle.report,
        "offer: 8, refused process-share: 56",
        "{}",
        exporter.log()
    );
    // Four processes of uid 1000, 8 connections each, all held at once.
    let others: Vec<Holder> = (0..4).map(|_| Holder::spawn(&sock, OTHER_UID, 8)).collect();
    let (mut offers, mut uid_share) = (0, 0);
    for h in &others {
        for part in h.report.split(", ") {
            let (kind, n) = part.rsplit_once(": ").unwrap();
            let n: usize = n.parse().unwrap();
            match kind {
                "offer" => offers += n,
                "refused uid-share" => uid_share += n,
                other => panic!("uid {OTHER_UID} got {other}: {}", h.report),
            }
        }
    }
    assert_eq!((offers, uid_share), (16, 16), "{}", exporter.log());

    // A dripper: 100 connections from one root process, each sending a
    // byte of a request now and then.
    let (report_read, report_write) = pipe();
    let s = sock.clone();
    // SAFETY: the child runs only the code below and ends in _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        drop(report_read);
        let conns: Vec<UnixStream> = (0..100)
            .filter_map(|_| UnixStream::connect(&s).ok())
            .collect();
        let request = frame(5, br#"{"id":1,"offset":0,"length":16}"#);
        let t = Instant::now();
        for (i, b) in request.iter().enumerate().take(8) {
            for c in &conns {
                let _ = send_raw(c, std::slice::from_ref(b), &[]);
            }
            if i < 7 {
                std::thread::sleep(Duration::from_millis(700));
            }
        }
        // What each got: the first message, then whether it was closed.
        let mut firsts = Vec::new();
        for c in &conns {
            let _ = c.set_read_timeout(Some(Duration::from_secs(20)));
            let mut all = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = (&*c).read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&all);
            firsts.push(if text.contains("\"reason\":\"stalled\"") {
                "offer, then stalled".to_owned()
            } else if text.contains("\"reason\":\"process-share\"") {
                "refused process-share".to_owned()
            } else {
                format!("{} bytes", all.len())
            });
        }
        child_exit(
            &report_write,
            &format!("{} after {:?}", tally(&firsts), t.elapsed()),
            0,
        );
    }
    drop(report_write);
    // Meanwhile the owner's importer is served.
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let shared = SharedBuffer::connect(&sock, WAIT).unwrap();
    let served_after = t.elapsed();
    let mut dripped = String::new();
    fs::File::from(report_read)
        .read_to_string(&mut dripped)
        .unwrap();
    let mut status = 0;
    // SAFETY: reaping our own child into a local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    note!(
        "idle root process: {}; uid {OTHER_UID}: {offers} offers, {uid_share} told uid-share; dripper: {dripped}; owner served after {served_after:?}",
        idle.report
    );
    assert!(
        dripped.starts_with("offer, then stalled: 8, refused process-share: 92"),
        "{dripped}\n{}",
        exporter.log()
    );
    assert!(served_after < Duration::from_secs(10), "{served_after:?}");
    assert!(shared.is_connected());
    drop(shared);
    idle.release();
    for h in others {
        h.release();
    }
    drop(exporter);
    let _ = fs::remove_dir_all(&dir);
}

/// Issue 27, attack 3, the deadlines: a client that never reads and one
/// that reads but never answers a ping are dropped within the ping interval
/// plus the ping timeout, each told `idle` (in its socket, for whoever
/// reads); an importer that answers (a `SharedBuffer`) stays, and still
/// hears a revocation.
#[test]
fn clients_that_never_read_or_answer_are_dropped_and_told_why() {
    let (dev, export) = own_export(ByteRange::new(0x7_0000, 0x10000));
    let server = ShareServer::new(&export).unwrap();
    let mut options = ServerOptions::default();
    options.ping_interval = Duration::from_millis(500);
    options.ping_timeout = Duration::from_millis(500);
    server.set_options(options);
    let (ours, never_reads) = UnixStream::pair().unwrap();
    server.add_client(ours).unwrap();
    let (ours, never_answers) = UnixStream::pair().unwrap();
    server.add_client(ours).unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        loop {
            match recv(&never_answers) {
                Ok(Some(Incoming::Offer(_))) => got.push("offer".to_owned()),
                Ok(Some(Incoming::Message(Message::Ping { .. }))) => got.push("ping".into()),
                Ok(Some(Incoming::Message(Message::Refused { reason, .. }))) => {
                    got.push(format!("refused {reason}"))
                }
                Ok(Some(Incoming::Message(m))) => got.push(format!("{m:?}")),
                Ok(None) => break,
                Err(e) => {
                    got.push(e.to_string());
                    break;
                }
            }
        }
        got
    });
    let (ours, theirs) = UnixStream::pair().unwrap();
    server.add_client(ours).unwrap();
    let good = SharedBuffer::receive(theirs).unwrap();
    let dropped = time_until(WAIT, || server.client_count() == 1);
    let heard = reader.join().unwrap();
    assert_eq!(heard, ["offer", "ping", "refused idle"]);
    let mut never_read = Vec::new();
    loop {
        match recv(&never_reads) {
            Ok(Some(Incoming::Offer(_))) => never_read.push("offer".to_owned()),
            Ok(Some(Incoming::Message(Message::Ping { .. }))) => never_read.push("ping".into()),
            Ok(Some(Incoming::Message(Message::Refused { reason, .. }))) => {
                never_read.push(format!("refused {reason}"))
            }
            Ok(Some(Incoming::Message(m))) => never_read.push(format!("{m:?}")),
            Ok(None) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(never_read, ["offer", "ping", "refused idle"]);
    // The answering importer is still served after several pings.
    std::thread::sleep(Duration::from_secs(2));
    assert!(good.is_connected(), "{:?}", good.end_reason());
    assert_eq!(server.client_count(), 1);
    dev.set_memory_decode(false).unwrap();
    good.wait_remote(WAIT, |s| s != BufferState::Live).unwrap();
    note!(
        "the silent clients were dropped after {dropped:?} (ping every 500 ms, answer within 500 ms)"
    );
    assert!(dropped < Duration::from_secs(5), "{dropped:?}");
    assert_eq!(server.dropped_count(), 2);
}

/// Issue 27, attack 4: `--allow-gid 1000` makes the socket root:1000 mode
/// 0660 in a directory the group may search (0710): a process of uid 1001
/// with 1000 among its supplementary groups connects and gets the offer (the
/// peer check counts supplementary groups, as the kernel's permission check
/// does); uid 1002 without it cannot connect. `--allow-uid 1000` gives the
/// socket to uid 1000 (mode 0600, directory 0711): it is served, uid 1001 is
/// not, root is. With the socket opened to everyone by hand, the peer check
/// still refuses uid 1002 and tells it so.
#[test]
fn allow_gid_and_allow_uid_admit_whom_the_socket_file_admits() {
    let connect_as = |sock: &Path, uid: u32, groups: &[u32]| {
        let s = sock.to_path_buf();
        as_user(uid, uid, groups, move || match UnixStream::connect(&s) {
            Ok(c) => first_message(&c),
            Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
        })
    };
    let eacces = format!("errno {}", libc::EACCES);

    let dir = fresh_dir("allow-gid");
    let sock = dir.join("bar.sock");
    let exporter = serve(AREA, &sock, "umask 077;", "--allow-gid 1000");
    let line = exporter.log();
    assert!(line.contains("\"mode\":\"0660\""), "{line}");
    assert_eq!(mode(&sock), 0o660);
    assert_eq!(fs::metadata(&sock).unwrap().gid(), 1000);
    assert_eq!(
        (mode(&dir), fs::metadata(&dir).unwrap().gid()),
        (0o710, 1000)
    );
    assert_eq!(connect_as(&sock, 1001, &[1000]), "offer");
    assert_eq!(connect_as(&sock, 1002, &[]), eacces);
    // Opened to everyone by hand: the peer check still says no, and why.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o711)).unwrap();
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(connect_as(&sock, 1002, &[]), "refused not-allowed");
    drop(exporter);

    let dir = fresh_dir("allow-uid");
    let sock = dir.join("bar.sock");
    let exporter = serve(
        AREA,
        &sock,
        "umask 077;",
        &format!("--allow-uid {OTHER_UID}"),
    );
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(fs::metadata(&sock).unwrap().uid(), OTHER_UID);
    assert_eq!(mode(&dir), 0o711);
    assert_eq!(connect_as(&sock, OTHER_UID, &[]), "offer");
    assert_eq!(connect_as(&sock, 1001, &[]), eacces);
    assert!(SharedBuffer::connect(&sock, WAIT).is_ok(), "root");
    drop(exporter);

    // A directory the allowed group cannot search: refused, and said why.
    let dir = fresh_dir("allow-closed");
    fs::create_dir_all(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
    let mut p = Proc::spawn_sh(&format!(
        "exec {CLI} export {}:2:{:#x}+{:#x} --serve {} --allow-gid 1000",
        shm0(),
        AREA.offset,
        AREA.length,
        dir.join("bar.sock").display()
    ));
    assert!(!p.wait_exit(WAIT).expect("it gives up").success());
    assert!(
        stderr_of(&p.log()).contains(&format!(
            "gid 1000 may connect but cannot reach the socket: it may not search {}",
            dir.display()
        )),
        "{}",
        p.log()
    );
    let _ = fs::remove_dir_all(&dir);
}

/// Issue 27, attack 5: `--serve` without a path serves at
/// `/run/dmabuf-p2p/<bdf>-bar2.sock` (no `XDG_RUNTIME_DIR` here), and at
/// `$XDG_RUNTIME_DIR/dmabuf-p2p/` when that is root's; errors name that
/// socket (never a temporary or `/proc/self/fd` name); `/tmp` is refused
/// unless `--allow-sticky-dir`.
#[test]
fn serve_without_a_path_uses_the_default_and_tmp_needs_consent() {
    let bdf = shm0();
    let area = format!("{bdf}:2:{:#x}+{:#x}", AREA.offset, AREA.length);
    let default = format!("/run/dmabuf-p2p/{bdf}-bar2.sock");
    let p = Proc::spawn_sh(&format!("exec {CLI} --json export {area} --serve"));
    let ready = p.wait_line("\"event\":\"ready\"", WAIT);
    assert!(
        ready.contains(&format!("\"socket\":\"{default}\"")),
        "{ready}"
    );
    let shared = SharedBuffer::connect(&default, WAIT).unwrap();
    assert_eq!(shared.peer(), format!("socket {default}"));
    match shared.read_back(0, 16, WAIT) {
        Err(
            e @ Error::Share {
                problem: ShareProblem::Refused(_),
                ..
            },
        ) => {
            let text = e.to_string();
            assert!(text.contains(&default), "{text}");
        }
        other => panic!("{other:?}"),
    }
    drop(shared);
    p.signal(libc::SIGTERM);
    let mut p = p;
    assert!(p.wait_exit(WAIT).expect("it stops").success());
    assert!(!Path::new(&default).exists(), "left behind");

    let xdg = fresh_dir("xdg");
    fs::create_dir_all(&xdg).unwrap();
    fs::set_permissions(&xdg, fs::Permissions::from_mode(0o700)).unwrap();
    let mut p = Proc::spawn_sh(&format!(
        "XDG_RUNTIME_DIR={} exec {CLI} --json export {area} --serve",
        xdg.display()
    ));
    let ready = p.wait_line("\"event\":\"ready\"", WAIT);
    let want = xdg.join("dmabuf-p2p").join(format!("{bdf}-bar2.sock"));
    assert!(
        ready.contains(&format!("\"socket\":\"{}\"", want.display())),
        "{ready}"
    );
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(WAIT).expect("it stops").success());

    // /tmp: a shared sticky directory.
    let tmp = Path::new("/tmp/dmabuf-p2p-bounds");
    let _ = fs::remove_dir_all(tmp);
    let sock = tmp.join("bar.sock");
    let mut p = Proc::spawn_sh(&format!(
        "exec {CLI} export {area} --serve {}",
        sock.display()
    ));
    assert!(!p.wait_exit(WAIT).expect("it gives up").success());
    let error = stderr_of(&p.log());
    assert!(
        error.contains("/tmp is a shared sticky directory"),
        "{error}"
    );
    assert!(
        error.contains(&format!("socket {}", sock.display())),
        "{error}"
    );
    assert!(
        !error.contains("/proc/self/fd") && !error.contains(".tmp"),
        "{error}"
    );
    let mut p = Proc::spawn_sh(&format!(
        "exec {CLI} --json export {area} --serve {} --allow-sticky-dir",
        sock.display()
    ));
    p.wait_line("\"event\":\"ready\"", WAIT);
    assert_eq!(mode(tmp), 0o700);
    assert!(SharedBuffer::connect(&sock, WAIT).is_ok());
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(WAIT).expect("it stops").success());
    let _ = fs::remove_dir_all(tmp);
    let _ = fs::remove_dir_all(&xdg);
}

/// Issue 27, attack 6: a thread toggles memory decode off and on as fast as
/// it can while clients connect one after another. A hub observer (which
/// runs after the kernel revoked, with the transition lock held) notes, for
/// every client whose offer has not reached its socket yet, the number of
/// that revocation. An offer that then says `live` with an older number
/// told an importer "live" after the kernel had revoked: there must be none.
#[test]
fn no_offer_says_live_after_the_kernel_revoked() {
    const CLIENTS: usize = 1000;
    let (dev, export) = own_export(ByteRange::new(0x7_0000, 0x10000));
    let server = ShareServer::new(&export).unwrap();
    let mut options = ServerOptions::default();
    options.max_per_process = CLIENTS;
    options.max_clients = CLIENTS;
    server.set_options(options);
    type Waiting = Vec<(RawFd, Arc<AtomicU64>)>;
    let waiting: Arc<Mutex<Waiting>> = Arc::default();
    let w = Arc::clone(&waiting);
    let _sub = dev.hub().subscribe(move |c| {
        if matches!(c.state, BufferState::Revoked(_)) {
            for (fd, mark) in w.lock().unwrap().iter() {
                if queued(*fd) == 0 {
                    mark.fetch_max(c.seq, Ordering::SeqCst);
                }
            }
        }
    });
    let stop = AtomicBool::new(false);
    let toggles = AtomicU64::new(0);
    let (mut violations, mut contested, mut live, mut said_revoked) = (0, 0, 0, 0);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            // Off and on with pauses of 0 to 1.9 ms (a fixed sequence).
            let mut on = false;
            let mut pause = 0u64;
            while !stop.load(Ordering::Relaxed) {
                dev.set_memory_decode(on).unwrap();
                on = !on;
                toggles.fetch_add(1, Ordering::Relaxed);
                pause = (pause * 7 + 3) % 20;
                std::thread::sleep(Duration::from_micros(pause * 100));
            }
            dev.set_memory_decode(true).unwrap();
        });
        for _ in 0..CLIENTS {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let mark = Arc::new(AtomicU64::new(0));
            waiting
                .lock()
                .unwrap()
                .push((theirs.as_raw_fd(), Arc::clone(&mark)));
            server.add_client(ours).unwrap();
            // Once the offer's bytes are in the socket, later revocations
            // do not concern it: stop watching, then read it.
            let mut pfd = [PollFd::new(theirs.as_fd(), PollFlags::POLLIN)];
            let ready = poll(&mut pfd, PollTimeout::from(60_000u16)).unwrap();
            assert_eq!(ready, 1, "no offer within 60 s");
            let revoked_before = {
                let mut w = waiting.lock().unwrap();
                w.retain(|(fd, _)| *fd != theirs.as_raw_fd());
                mark.load(Ordering::SeqCst)
            };
            let offer = match recv_timeout(&theirs, WAIT) {
                Ok(Some(Incoming::Offer(o))) => o,
                other => panic!("{other:?}"),
            };
            if revoked_before > 0 {
                contested += 1;
            }
            match offer.state {
                BufferState::Live => {
                    live += 1;
                    if offer.seq < revoked_before {
                        violations += 1;
                    }
                }
                _ => said_revoked += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    note!(
        "{CLIENTS} offers during {} decode toggles: {live} live, {said_revoked} revoked; {contested} waited through a kernel revoke; {violations} said live after it",
        toggles.load(Ordering::Relaxed)
    );
    assert_eq!(violations, 0);
    assert!(contested >= 10, "too few offers met a revocation to tell");
    assert!(live > 0 && said_revoked > 0);
    drop(server);
}
