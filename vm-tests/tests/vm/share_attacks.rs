//! The attacks of issue 12 on sharing a BAR, each with its bounded outcome:
//! other users cannot connect or are refused before anything is sent, a
//! server of another user is refused by the client, connection floods cost
//! the server nothing, dripped frames and parked clients are dropped,
//! revocation is never held up by a client, the client's connect and offer
//! keep an overall deadline, and an unplug request while serving revokes,
//! tells the clients and closes the device (an unbind through sysfs, and a
//! QMP `device_del` of shm1).
//!
//! "Another user" is uid/gid 1000 in a forked child (the guest has no users).
//! The ivshmem areas used (shm0 at 0x8_0000.., 0xa_0000..; shm1 at
//! 0x290_0000..) are touched by no other test. Bounds are generous (software emulation) but asserted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmabuf_p2p::exporter::udmabuf::Udmabuf;
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{BufferState, RevokeReason};
use dmabuf_p2p::share::{
    BufferInfo, Incoming, Message, RefusalReason, ServerOptions, ShareProblem, ShareServer,
    SharedBuffer, recv, recv_timeout, send_offer,
};
use dmabuf_p2p::{ByteRange, Error, Iommufd, VfioPciDevice};
use dmabuf_p2p_vm_tests::raw_peer::{frame, send_raw};
use dmabuf_p2p_vm_tests::{child_exit, ivshmem_devices, open_fd_count, pipe};

use super::faults::{
    SYSFS_TIMEOUT, Shm1Restorer, bind_replugged, qmp_ok, replug_shm1, shm_with, sysfs_dir,
    wait_until,
};

pub(super) const CLI: &str = "/bin/dmabuf-p2p";
pub(super) const WAIT: Duration = Duration::from_secs(60);
pub(super) const OTHER_UID: u32 = 1000;

pub(super) fn shm0() -> String {
    ivshmem_devices()
        .into_iter()
        .find(|(_, s)| *s == 1 << 20)
        .map(|(b, _)| b)
        .expect("shm0 (1 MiB BAR2)")
}

/// A fresh directory path under /run (removed if it exists).
pub(super) fn fresh_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(format!("/run/dmabuf-p2p-attack-{name}"));
    let _ = fs::remove_dir_all(&d);
    d
}

/// Runs `f` in a forked child as uid/gid 1000 without supplementary groups;
/// returns what it reported.
pub(super) fn as_other_user(f: impl FnOnce() -> String) -> String {
    as_user(OTHER_UID, OTHER_UID, &[], f)
}

/// Runs `f` in a forked child as `uid`, effective gid `gid` and the
/// supplementary `groups`; returns what it reported.
pub(super) fn as_user(uid: u32, gid: u32, groups: &[u32], f: impl FnOnce() -> String) -> String {
    let (read_end, write_end) = pipe();
    // SAFETY: the child runs only `f` and ends in _exit, never returning into
    // the harness; the tests run one at a time.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        drop(read_end);
        // SAFETY: setgroups reads `groups.len()` gids from a live slice;
        // the others are plain syscalls on integers.
        let ok = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) } == 0
            // SAFETY: as above.
            && unsafe { libc::setgid(gid) } == 0
            // SAFETY: as above.
            && unsafe { libc::setuid(uid) } == 0;
        let text = if ok {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| "panicked".to_owned())
        } else {
            format!("setuid: {}", std::io::Error::last_os_error())
        };
        child_exit(&write_end, &text, 0);
    }
    drop(write_end);
    let mut text = String::new();
    fs::File::from(read_end).read_to_string(&mut text).unwrap();
    let mut status = 0;
    // SAFETY: reaping our own child into a local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    text
}

/// The CLI, with its stdout lines on a channel and kept for messages.
pub(super) struct Proc {
    child: Child,
    lines: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub(super) fn spawn_sh(script: &str) -> Self {
        let mut child = Command::new("/bin/sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(vec![format!("$ {script}")]));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let l = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let l = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push(format!("stderr: {line}"));
            }
        });
        Self { child, lines, log }
    }

    pub(super) fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub(super) fn wait_line(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no line with {needle:?} within {within:?}:\n{}", self.log()),
            }
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill() takes no pointers; the child is not reaped yet.
        assert_eq!(unsafe { libc::kill(self.pid() as libc::pid_t, sig) }, 0);
    }

    /// Waits for the exit; `None` if it did not end within `within`.
    pub(super) fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200));
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
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

/// `export <shm0>:2:<area> --serve <sock> --json <extra>` under `prefix`
/// (shell commands, e.g. `umask 000;`), once ready.
pub(super) fn serve(area: ByteRange, sock: &Path, prefix: &str, extra: &str) -> Proc {
    serve_bar_of(&shm0(), area, sock, prefix, extra)
}

/// [`serve`] of the BAR2 `area` of the device at `bdf`.
fn serve_bar_of(bdf: &str, area: ByteRange, sock: &Path, prefix: &str, extra: &str) -> Proc {
    let script = format!(
        "{prefix} exec {CLI} --json export {bdf}:2:{:#x}+{:#x} --serve {} {extra}",
        area.offset,
        area.length,
        sock.display()
    );
    let p = Proc::spawn_sh(&script);
    p.wait_line("\"event\":\"ready\"", WAIT);
    p
}

/// Opens the socket's directory and the socket to everyone, as a careless
/// service setup would: what stops other users then is the peer check.
fn open_up(sock: &Path) {
    let dir = sock.parent().unwrap();
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(sock, fs::Permissions::from_mode(0o666)).unwrap();
}

fn proc_status(pid: u32, key: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn proc_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the name.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

pub(super) fn count_lines(p: &Proc, needle: &str) -> usize {
    p.log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Issue 12, attacks 1 and part of 3: under umask 000 the socket is still
/// 0600 in a 0700 directory, so another user cannot connect; with the modes
/// opened up by hand, the server refuses that user before sending anything
/// but its reason (issue 27: a `refused` message, `not-allowed`, that does
/// not list who is allowed) and logs its pid and uid; the owner gets the
/// buffer, and reading it back is refused unless the exporter opted in.
#[test]
fn other_users_cannot_connect_and_are_refused_by_the_server() {
    let dir = fresh_dir("umask");
    let sock = dir.join("bar.sock");
    let exporter = serve(ByteRange::new(0x8_0000, 0x10000), &sock, "umask 000;", "");
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&sock), 0o600, "socket mode under umask 000");
    assert_eq!(mode(&dir), 0o700, "directory mode under umask 000");

    let s = sock.clone();
    let denied = as_other_user(move || match UnixStream::connect(&s) {
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
        Ok(_) => "connected".to_owned(),
    });
    assert_eq!(
        denied,
        format!("errno {}", libc::EACCES),
        "uid {OTHER_UID} connect"
    );

    open_up(&sock);
    let s = sock.clone();
    let refused = as_other_user(move || {
        let stream = match UnixStream::connect(&s) {
            Ok(st) => st,
            Err(e) => return format!("connect: {e}"),
        };
        let first = match recv_timeout(&stream, Duration::from_secs(30)) {
            Ok(None) => "closed".to_owned(),
            Ok(Some(Incoming::Message(Message::Refused { reason, message }))) => {
                format!("refused {reason}: {message}")
            }
            Ok(Some(m)) => format!("got {m:?}"),
            Err(e) => format!("error: {e}"),
        };
        let then = match recv_timeout(&stream, Duration::from_secs(30)) {
            Ok(None) => "closed".to_owned(),
            other => format!("{other:?}"),
        };
        format!("{first}; then {then}")
    });
    assert_eq!(
        refused,
        format!(
            "refused not-allowed: uid {OTHER_UID} may not connect to this exporter; then closed"
        )
    );
    let line = exporter.wait_line("\"event\":\"refused\"", WAIT);
    assert!(line.contains(&format!("\"uid\":{OTHER_UID}")), "{line}");
    assert!(line.contains("\"reason\":\"not-allowed\""), "{line}");
    assert!(line.contains("\"pid\":"), "{line}");

    // The owner (root here) is served; read-back was not asked for.
    let shared = SharedBuffer::connect(&sock, WAIT).unwrap();
    assert_eq!(shared.exporter().uid, 0);
    assert_eq!(shared.exporter().pid, exporter.pid() as i32);
    match shared.read_back(0, 16, WAIT) {
        Err(Error::Share {
            problem: ShareProblem::Refused(why),
            ..
        }) => assert!(why.contains("does not offer read-back"), "{why}"),
        other => panic!("read-back without --read-back: {other:?}"),
    }
    let line = exporter.wait_line("\"event\":\"client\"", WAIT);
    assert!(line.contains("\"uid\":0"), "{line}");
    drop(shared);
    drop(exporter);
    let _ = fs::remove_dir_all(&dir);
}

/// Issue 12, attack 2: another user binds the well-known path first. The
/// exporter refuses to replace that user's socket, and an importer (root)
/// refuses to take anything from that user's server.
#[test]
fn a_server_of_another_user_is_refused_by_the_client() {
    let dir = fresh_dir("squat");
    fs::create_dir_all(&dir).unwrap();
    // World-writable and sticky, like /tmp.
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
    let sock = dir.join("bar.sock");
    let (stop_read, stop_write) = pipe();
    let (ready_read, ready_write) = pipe();
    let s = sock.clone();
    // The squatter: listens until the pipe is closed. Forked without waiting.
    // SAFETY: the child runs only the code below and ends in _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        drop(stop_write);
        drop(ready_read);
        // SAFETY: plain syscalls on integers.
        let ok = unsafe { libc::setgroups(0, std::ptr::null()) } == 0
            // SAFETY: as above.
            && unsafe { libc::setgid(OTHER_UID) } == 0
            // SAFETY: as above.
            && unsafe { libc::setuid(OTHER_UID) } == 0;
        let listener = ok.then(|| UnixListener::bind(&s).ok()).flatten();
        let msg = if listener.is_some() {
            "ready"
        } else {
            "failed"
        };
        // SAFETY: a write from a live buffer to an open pipe.
        unsafe { libc::write(ready_write.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
        // The parent reads up to the end of the pipe.
        drop(ready_write);
        let mut b = [0u8; 1];
        let _ = fs::File::from(stop_read).read(&mut b);
        drop(listener);
        // SAFETY: _exit takes an int and never returns; no destructors of the
        // parent's state run in this child.
        unsafe { libc::_exit(0) };
    }
    drop(stop_read);
    drop(ready_write);
    let mut ready = String::new();
    fs::File::from(ready_read)
        .read_to_string(&mut ready)
        .unwrap();
    assert_eq!(ready, "ready", "the squatter's listener");

    // Refused twice over: the directory is a shared sticky one, and even
    // when that is allowed, the name is another user's socket.
    let mut exporter = Proc::spawn_sh(&format!(
        "exec {CLI} --json export {}:2:0xa0000+0x10000 --serve {}",
        shm0(),
        sock.display()
    ));
    let st = exporter.wait_exit(WAIT).expect("the exporter gives up");
    assert!(!st.success(), "{}", exporter.log());
    assert!(
        exporter.log().contains("is a shared sticky directory"),
        "{}",
        exporter.log()
    );
    let mut exporter = Proc::spawn_sh(&format!(
        "exec {CLI} --json export {}:2:0xa0000+0x10000 --serve {} --allow-sticky-dir",
        shm0(),
        sock.display()
    ));
    let st = exporter.wait_exit(WAIT).expect("the exporter gives up");
    assert!(!st.success(), "{}", exporter.log());
    assert!(
        exporter
            .log()
            .contains(&format!("a socket of uid {OTHER_UID} is there already")),
        "{}",
        exporter.log()
    );

    let t = Instant::now();
    match SharedBuffer::connect(&sock, WAIT) {
        Err(Error::Share {
            problem: ShareProblem::PeerRefused { uid, .. },
            ..
        }) => assert_eq!(uid, OTHER_UID),
        other => panic!("connecting to another user's server: {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let mut map = Proc::spawn_sh(&format!("exec {CLI} map --from {}", sock.display()));
    let st = map.wait_exit(WAIT).expect("map gives up");
    assert!(!st.success());
    assert!(
        map.log().contains(&format!("uid {OTHER_UID}")),
        "{}",
        map.log()
    );

    drop(stop_write);
    let mut status = 0;
    // SAFETY: reaping our own child into a local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let _ = fs::remove_dir_all(&dir);
}

/// Opens `n` connections to `sock` as they come, holds them `hold`, and
/// reports how many connected and how many the server closed by then.
fn flood(sock: &Path, n: usize, hold: Duration) -> String {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one local rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    let mut conns = Vec::new();
    let mut failed = 0;
    for _ in 0..n {
        match UnixStream::connect(sock) {
            Ok(s) => conns.push(s),
            Err(_) => failed += 1,
        }
    }
    std::thread::sleep(hold);
    // Closed: the end of the stream after at most the `refused` message.
    let closed = conns
        .iter()
        .filter(|s| {
            let _ = s.set_nonblocking(true);
            let mut b = [0u8; 512];
            loop {
                match (&**s).read(&mut b) {
                    Ok(0) => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        })
        .count();
    format!("connected {} failed {failed} closed {closed}", conns.len())
}

/// Issue 12, attack 3: 1,100 idle connections from another user. Each is
/// refused at once (closed, nothing sent); the server keeps one thread per
/// job, not per connection, a handful of fds, and a rate-limited log; the
/// owner's client is served meanwhile.
#[test]
fn a_connection_flood_from_another_user_costs_the_server_nothing() {
    let dir = fresh_dir("flood");
    let sock = dir.join("bar.sock");
    let exporter = serve(ByteRange::new(0x9_0000, 0x10000), &sock, "", "");
    open_up(&sock);
    let pid = exporter.pid();
    let threads_before = proc_status(pid, "Threads:");
    let s = sock.clone();
    let t = Instant::now();
    let flooder =
        std::thread::spawn(move || as_other_user(move || flood(&s, 1100, Duration::from_secs(8))));
    // Served while the flood goes on.
    std::thread::sleep(Duration::from_secs(2));
    let t_client = Instant::now();
    let shared = SharedBuffer::connect(&sock, WAIT).unwrap();
    let served_after = t_client.elapsed();
    let threads = proc_status(pid, "Threads:");
    let fds = proc_fds(pid);
    let report = flooder.join().unwrap();
    let elapsed = t.elapsed();
    eprintln!(
        "flood: {report}; owner served after {served_after:?}; server threads {threads_before} -> {threads}, fds {fds}"
    );
    assert!(served_after < Duration::from_secs(20), "{served_after:?}");
    assert!(
        threads <= threads_before + 1,
        "{threads_before} -> {threads}"
    );
    assert!(fds < 64, "the server holds {fds} fds");
    let connected: usize = report
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(connected > 0, "{report}");
    assert!(
        report.ends_with(&format!("closed {connected}")),
        "every connection of uid {OTHER_UID} was closed by the server: {report}"
    );
    let refusals = count_lines(&exporter, "\"event\":\"refused\"");
    // The rate limit: a burst of 20, then 5 a second.
    let bound = 20 + 5 * (elapsed.as_secs() as usize + 2);
    assert!(
        refusals > 0 && refusals <= bound,
        "{refusals} refusal lines in {elapsed:?} (at most {bound})"
    );
    drop(shared);
    drop(exporter);
    let _ = fs::remove_dir_all(&dir);
}

/// Issue 12, attack 3 with an allowed user and a small fd table: `accept`
/// fails with EMFILE; the server backs off (no spinning: little CPU), logs
/// it at a bounded rate, and serves again once the flood is gone.
#[test]
fn accept_backs_off_when_the_fd_table_is_full() {
    let dir = fresh_dir("emfile");
    let sock = dir.join("bar.sock");
    let exporter = serve(
        ByteRange::new(0x9_0000, 0x10000),
        &sock,
        "ulimit -n 48;",
        &format!("--allow-uid {OTHER_UID} --max-clients 1000"),
    );
    // No chmod: --allow-uid gave the socket to that uid.
    let pid = exporter.pid();
    let s = sock.clone();
    let flooder =
        std::thread::spawn(move || as_other_user(move || flood(&s, 300, Duration::from_secs(10))));
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu_ticks(pid);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let used = cpu_ticks(pid) - ticks;
    // SAFETY: sysconf takes an integer.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let cpu = Duration::from_millis(used * 1000 / hz);
    let report = flooder.join().unwrap();
    eprintln!(
        "emfile flood: {report}; server CPU {cpu:?} in {:?}",
        t.elapsed()
    );
    assert!(
        exporter.log().contains("\"event\":\"accept-failed\""),
        "{}",
        exporter.log()
    );
    assert!(
        cpu < Duration::from_secs(2),
        "the server spun: {cpu:?} of CPU in 4 s"
    );
    let failures = count_lines(&exporter, "\"event\":\"accept-failed\"");
    assert!(failures <= 20 + 5 * 20, "{failures} accept-failed lines");
    // The flood is gone: the owner is served.
    let shared = SharedBuffer::connect(&sock, WAIT);
    assert!(shared.is_ok(), "{shared:?}\n{}", exporter.log());
    drop(shared);
    drop(exporter);
    let _ = fs::remove_dir_all(&dir);
}

/// Opens shm0 here and exports `area` of its BAR2.
pub(super) fn own_export(area: ByteRange) -> (VfioPciDevice, dmabuf_p2p::BarExport) {
    let iommufd = Iommufd::open().unwrap();
    let mut dev = VfioPciDevice::open(shm0().parse().unwrap()).unwrap();
    dev.bind(&iommufd).unwrap();
    dev.set_memory_decode(true).unwrap();
    let export = dev.export_bar(2, &[area]).unwrap();
    (dev, export)
}

/// Issue 12, attack 4: a client drips a request one byte at a time, trying
/// to pass fds with each byte. The server's sockets take no fds
/// (`SO_PASSRIGHTS` off: EPERM), the frame misses its deadline, the client is
/// dropped, and the server holds no more fds than before. The same on the
/// importer's side once it has the offer. And past `max_clients`, a
/// connection is refused before anything is sent to it.
#[test]
fn dripped_frames_and_passed_fds_are_refused() {
    let (_dev, export) = own_export(ByteRange::new(0xa_0000, 0x10000));
    let fds_before = open_fd_count();
    let server = ShareServer::new(&export).unwrap();
    let mut options = ServerOptions::default();
    options.frame_timeout = Duration::from_secs(1);
    options.max_clients = 2;
    server.set_options(options);
    let (ours, theirs) = UnixStream::pair().unwrap();
    server.add_client(ours).unwrap();
    assert!(matches!(recv(&theirs).unwrap(), Some(Incoming::Offer(_))));
    // An fd to the server: refused by the kernel.
    let junk = fs::File::open("/dev/null").unwrap();
    match send_raw(&theirs, b"D", &[junk.as_fd()]) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        Ok(()) => panic!("the server's socket took an fd"),
    }
    // Drip a read-request one byte every 300 ms.
    let frame = frame(5, br#"{"id":1,"offset":0,"length":16}"#);
    let t = Instant::now();
    let mut dropped_after = None;
    for b in &frame {
        if send_raw(&theirs, std::slice::from_ref(b), &[]).is_err() {
            dropped_after = Some(t.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        if server.client_count() == 0 {
            dropped_after = Some(t.elapsed());
            break;
        }
    }
    let after = dropped_after.expect("the dripping client was never dropped");
    assert!(after < Duration::from_secs(10), "{after:?}");
    assert!(server.dropped_count() >= 1);

    // The client limit: two served, the third refused before anything is sent.
    {
        let (a, _a) = UnixStream::pair().unwrap();
        let (b, _b) = UnixStream::pair().unwrap();
        let (c, c_peer) = UnixStream::pair().unwrap();
        server.add_client(a).unwrap();
        server.add_client(b).unwrap();
        match server.add_client(c) {
            Err(Error::Share {
                problem:
                    ShareProblem::NotServed {
                        reason: RefusalReason::Full,
                        ..
                    },
                ..
            }) => {}
            other => panic!("a third client: {other:?}"),
        }
        // Told why, and nothing else.
        match recv(&c_peer) {
            Ok(Some(Incoming::Message(Message::Refused {
                reason: RefusalReason::Full,
                message,
            }))) => assert!(message.contains("all 2 slots"), "{message}"),
            other => panic!("the refused client got {other:?}"),
        }
        assert!(matches!(recv(&c_peer), Ok(None)), "then the end");
    }

    // The importer's side: once the offer is in, no more fds.
    let (tx, rx) = UnixStream::pair().unwrap();
    let info = BufferInfo::from_export(&export);
    send_offer(&tx, export.dmabuf(), &info, BufferState::Live, Some(WAIT)).unwrap();
    let shared = SharedBuffer::receive(rx).unwrap();
    match send_raw(&tx, b"X", &[export.dmabuf().as_fd()]) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        Ok(()) => panic!("the importer's socket took a second fd"),
    }
    drop(shared);
    drop(tx);
    drop(theirs);
    drop(junk);
    drop(server);
    assert_eq!(open_fd_count(), fds_before, "fds left behind");
}

/// An offer that names a VFIO device but carries another exporter's dma-buf
/// (a udmabuf) is refused, and its fd closed.
#[test]
fn an_offer_naming_a_vfio_device_must_be_a_vfio_dmabuf() {
    let memfd = Memfd::new("not-a-bar", 0x10000).unwrap();
    let udmabuf = Udmabuf::open().unwrap();
    let buf = udmabuf.create(memfd.as_fd(), 0, 0x10000).unwrap();
    let info = BufferInfo {
        size: 0x10000,
        exporter: "0000:00:05.0 BAR2".into(),
        device: Some("0000:00:05.0".into()),
        bar: Some(2),
        ranges: vec![ByteRange::new(0, 0x10000)],
        phys: vec![],
    };
    let fds = open_fd_count();
    let (tx, rx) = UnixStream::pair().unwrap();
    send_offer(&tx, &buf, &info, BufferState::Live, Some(WAIT)).unwrap();
    match SharedBuffer::receive(rx) {
        Err(Error::Share {
            problem: ShareProblem::NotVfio { exp_name },
            ..
        }) => assert_eq!(exp_name, "udmabuf"),
        other => panic!("{other:?}"),
    }
    drop(tx);
    assert_eq!(open_fd_count(), fds, "the offered fd was closed");
}

/// Issue 12, attack 5: six clients that stopped reading (their sockets
/// full) cannot hold up a revocation: turning memory decode off returns at
/// once every time, a reading client hears each revocation within a bound,
/// and the stuck ones are dropped after the send timeout.
#[test]
fn parked_clients_never_delay_a_revocation() {
    const STUCK: usize = 6;
    let (dev, export) = own_export(ByteRange::new(0xb_0000, 0x10000));
    let server = ShareServer::new(&export).unwrap();
    let mut parked = Vec::new();
    for _ in 0..STUCK {
        let (ours, theirs) = UnixStream::pair().unwrap();
        // A small send buffer (the kernel's minimum), so a few messages
        // fill it.
        let one: libc::c_int = 1;
        // SAFETY: SO_SNDBUF reads one c_int from `one`, which outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                ours.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        server.add_client(ours).unwrap();
        parked.push(theirs);
    }
    let (ours, theirs) = UnixStream::pair().unwrap();
    server.add_client(ours).unwrap();
    let good = SharedBuffer::receive(theirs).unwrap();
    let mut slowest = Duration::ZERO;
    let mut slowest_delivery = Duration::ZERO;
    let t = Instant::now();
    let mut rounds = 0;
    while server.dropped_count() < STUCK as u64 || rounds < 3 {
        assert!(
            t.elapsed() < WAIT,
            "stuck clients still served after {rounds} rounds"
        );
        let t0 = Instant::now();
        dev.set_memory_decode(false).unwrap();
        slowest = slowest.max(t0.elapsed());
        let st = good
            .wait_remote(Duration::from_secs(10), |s| s != BufferState::Live)
            .unwrap();
        assert_eq!(st, BufferState::Revoked(RevokeReason::MemoryDecodeOff));
        slowest_delivery = slowest_delivery.max(t0.elapsed());
        let t1 = Instant::now();
        dev.set_memory_decode(true).unwrap();
        slowest = slowest.max(t1.elapsed());
        good.wait_remote(Duration::from_secs(10), |s| s == BufferState::Live)
            .unwrap();
        rounds += 1;
    }
    eprintln!(
        "{rounds} rounds; slowest decode change {slowest:?}, slowest delivery {slowest_delivery:?}; dropped {}",
        server.dropped_count()
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a revocation waited {slowest:?}"
    );
    assert!(
        slowest_delivery < Duration::from_secs(5),
        "{slowest_delivery:?}"
    );
    assert_eq!(server.client_count(), 1, "only the reading client is left");
    drop(parked);
}

/// Issue 12, attack 5 on SIGTERM: with five parked clients the exporter
/// closes the device (the kernel revokes) and exits within a bound, and a
/// reading client hears `gone` within it.
#[test]
fn sigterm_with_parked_clients_closes_at_once() {
    let dir = fresh_dir("sigterm");
    let sock = dir.join("bar.sock");
    let mut exporter = serve(ByteRange::new(0xc_0000, 0x10000), &sock, "", "");
    let parked: Vec<UnixStream> = (0..5)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    let good = SharedBuffer::connect(&sock, WAIT).unwrap();
    for _ in 0..6 {
        exporter.wait_line("\"event\":\"client\"", WAIT);
    }
    let t = Instant::now();
    exporter.signal(libc::SIGTERM);
    let gone = good
        .wait_remote(Duration::from_secs(10), |s| {
            matches!(s, BufferState::Gone(_))
        })
        .unwrap();
    let heard = t.elapsed();
    let st = exporter
        .wait_exit(Duration::from_secs(10))
        .expect("the exporter exits");
    let exited = t.elapsed();
    eprintln!("gone heard after {heard:?}, exporter exited after {exited:?}");
    assert!(st.success(), "{}", exporter.log());
    assert_eq!(gone, BufferState::Gone(RevokeReason::DeviceClosed));
    assert!(heard < Duration::from_secs(5), "{heard:?}");
    assert!(exited < Duration::from_secs(6), "{exited:?}");
    drop(parked);
    let _ = fs::remove_dir_all(&dir);
}

/// Issue 12, attack 6: a server that drips its header cannot stretch the
/// client's connect-and-offer deadline.
#[test]
fn the_connect_deadline_holds_against_a_dripping_server() {
    let dir = fresh_dir("drip");
    let sock = dir.join("drip.sock");
    let listener = dmabuf_p2p::share::bind_listener(&sock).unwrap();
    let dripper = std::thread::spawn(move || {
        let (conn, _) = listener.unix().accept().unwrap();
        let frame = frame(1, b"{}");
        for b in frame {
            if send_raw(&conn, &[b], &[]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let t = Instant::now();
    let r = SharedBuffer::connect(&sock, Duration::from_secs(2));
    let took = t.elapsed();
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    assert!(
        took < Duration::from_secs(4),
        "connect(.., 2 s) took {took:?}"
    );
    dripper.join().unwrap();
    let _ = fs::remove_dir_all(&dir);
}

/// Serves `area` of BAR2 of `bdf` from a fresh directory `name`, checks that
/// the server watches the device request, and connects a client.
fn serve_and_connect(bdf: &str, area: ByteRange, name: &str) -> (Proc, SharedBuffer, PathBuf) {
    let dir = fresh_dir(name);
    let sock = dir.join("bar.sock");
    let exporter = serve_bar_of(bdf, area, &sock, "", "");
    assert!(
        exporter.log().contains("\"unplug_watched\":true"),
        "{}",
        exporter.log()
    );
    let client = SharedBuffer::connect(&sock, WAIT).unwrap();
    (exporter, client, dir)
}

/// After a device request made at `since`: the server reports the unplug,
/// the client hears within 30 s that the buffer is gone, and the server
/// exits cleanly, having revoked with reason Unplug. Returns how long the
/// client took to hear.
fn expect_unplug_served(exporter: &mut Proc, client: &SharedBuffer, since: Instant) -> Duration {
    exporter.wait_line("\"event\":\"unplug\"", WAIT);
    let gone = client
        .wait_remote(WAIT, |s| matches!(s, BufferState::Gone(_)))
        .unwrap();
    let heard = since.elapsed();
    assert!(matches!(gone, BufferState::Gone(_)), "{gone:?}");
    assert!(heard < Duration::from_secs(30), "{heard:?}");
    let st = exporter.wait_exit(WAIT).expect("the exporter exits");
    assert!(st.success(), "{}", exporter.log());
    let log = exporter.log();
    assert!(log.contains("\"why\":\"unplug\""), "{log}");
    heard
}

/// Issue 12, attack 7: the device is unbound from vfio-pci (the kernel sends
/// the device request) while it is served. The exporter revokes with reason
/// Unplug, closes the device, tells the client, and exits; the unbind
/// completes. Then the device is bound to vfio-pci again for later tests.
#[test]
fn an_unplug_request_while_serving_revokes_and_closes() {
    let bdf = shm0();
    let (mut exporter, client, dir) =
        serve_and_connect(&bdf, ByteRange::new(0xd_0000, 0x10000), "unplug");
    let t = Instant::now();
    let b = bdf.clone();
    let unbind = std::thread::spawn(move || {
        fs::write("/sys/bus/pci/drivers/vfio-pci/unbind", &b).map_err(|e| e.to_string())
    });
    let heard = expect_unplug_served(&mut exporter, &client, t);
    unbind.join().unwrap().expect("the unbind completes");
    let unbound = t.elapsed();
    eprintln!("unplug: gone heard after {heard:?}, unbind done after {unbound:?}");
    assert!(unbound < Duration::from_secs(30), "{unbound:?}");
    dmabuf_p2p::vfio::bind_to_vfio_pci(bdf.parse().unwrap()).unwrap();
    let _ = fs::remove_dir_all(&dir);
}

/// The same with a real hot-unplug: QMP `device_del` of shm1 while serving
/// a range of its BAR. QEMU asks the guest for the device, vfio-pci raises
/// the device request, and the server revokes with reason Unplug, tells the
/// client, closes the device and exits, so the kernel can finish the
/// removal: shm1 leaves sysfs while the client still holds its dma-buf.
/// shm1 is plugged back in and bound to vfio-pci for later tests.
#[test]
fn a_device_del_while_serving_revokes_and_closes() {
    /// shm1's BAR2 area this test serves (no other test uses it).
    const AREA: u64 = 0x290_0000;
    let shm1 = shm_with(64 << 20);
    let _restore = Shm1Restorer { addr: shm1 };
    let (mut exporter, client, dir) = serve_and_connect(
        &shm1.to_string(),
        ByteRange::new(AREA, 0x10000),
        "device-del",
    );
    assert_eq!(client.remote_state(), BufferState::Live);
    let t = Instant::now();
    qmp_ok("device_del", r#"{"id":"shm1"}"#);
    let heard = expect_unplug_served(&mut exporter, &client, t);
    let removed = wait_until(SYSFS_TIMEOUT, || !Path::new(&sysfs_dir(shm1)).exists());
    let removed = removed.unwrap_or_else(|| {
        panic!("{shm1} still in sysfs {SYSFS_TIMEOUT:?} after the server closed it")
    });
    eprintln!("device_del: gone heard after {heard:?}, removed {removed:?} after the exit");
    drop(client);

    replug_shm1(shm1);
    // virtio-pci's refusing probe shows as the driver until it ends.
    let unbound = wait_until(SYSFS_TIMEOUT, || {
        dmabuf_p2p_vm_tests::driver_of(&shm1.to_string()).is_none()
    });
    assert!(unbound.is_some(), "a driver kept the replugged {shm1}");
    bind_replugged(shm1);
    let _ = fs::remove_dir_all(&dir);
}
