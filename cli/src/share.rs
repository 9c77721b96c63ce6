//! Sharing BARs between processes: `dmabuf-p2p export <target> --serve
//! <socket>` (the exporting side) and `dmabuf-p2p map --from <socket>` (the
//! importing side).
//!
//! The serving process is told to revoke by signals: `SIGUSR1` turns the
//! exporting device's memory decode off (the buffer is revoked, every client
//! is told), `SIGUSR2` turns it on again (restored), `SIGTERM`, `SIGINT` or
//! `SIGHUP` stop it (the device is closed: clients hear `gone`). It prints one
//! line per event (JSON lines with `--json`), the first when it is ready.

use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use dmabuf_p2p::exporter::bar::BarExport;
use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::range::{page_size, parse_size};
use dmabuf_p2p::revoke::{BufferState, RestorePolicy, RevokeReason, StateChange};
use dmabuf_p2p::share::{
    AccessPolicy, BufferInfo, ConnectOptions, PeerCred, ServerEvent, ServerOptions, ShareProblem,
    ShareServer, SharedBuffer, SocketOptions, bind_listener_with, default_socket_path,
};
use dmabuf_p2p::vfio::BarMapping;
use dmabuf_p2p::vfio::VfioPciDevice;
use dmabuf_p2p::{ByteRange, Error, PciAddress};
use dmabuf_p2p_engine::DmaEngine;
use dmabuf_p2p_engine::edu::Edu;

use crate::lines::Lines;
use crate::{CliError, fnv1a64, print_json};
use dmabuf_p2p::range::human_size;

/// One line for `export --serve`'s output: compact JSON with `--json`, else
/// `text`.
fn line_of(json: bool, value: &serde_json::Value, text: &str) -> String {
    if json {
        value.to_string()
    } else {
        text.to_owned()
    }
}

/// Prints one line (blocking; for `map`): compact JSON with `--json`, else
/// `text`.
fn event_line(json: bool, value: &serde_json::Value, text: &str) {
    // A closed stdout is ignored: the export keeps serving its clients when
    // nobody reads the log.
    let _ = if json {
        outln!("{value}")
    } else {
        outln!("{text}")
    };
}

fn state_json(state: BufferState) -> serde_json::Value {
    match state {
        BufferState::Live => serde_json::json!({"state": "live"}),
        BufferState::Revoked(r) => serde_json::json!({"state": "revoked", "reason": r.to_string()}),
        BufferState::Gone(r) => serde_json::json!({"state": "gone", "reason": r.to_string()}),
    }
}

fn state_text(state: BufferState) -> String {
    match state {
        BufferState::Live => "live".to_owned(),
        BufferState::Revoked(r) => format!("revoked ({r})"),
        BufferState::Gone(r) => format!("gone ({r})"),
    }
}

/// How `export --serve` serves.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// The socket; `None`: the default path for the export.
    pub socket: Option<PathBuf>,
    /// Who else may connect, and where the socket may be.
    pub socket_options: SocketOptions,
    /// Answer read-back requests with the BAR's bytes.
    pub read_back: bool,
    /// The most clients at once.
    pub max_clients: usize,
}

/// One server event as a line.
fn server_event_line(json: bool, e: &ServerEvent) -> String {
    let v = match e {
        ServerEvent::Connected {
            id,
            peer,
            clients,
            suppressed,
        } => serde_json::json!({
            "event": "client", "id": id, "pid": peer.pid, "uid": peer.uid, "gid": peer.gid,
            "clients": clients, "suppressed": suppressed,
        }),
        ServerEvent::Refused {
            peer,
            reason,
            why,
            suppressed,
        } => serde_json::json!({
            "event": "refused", "pid": peer.map(|p| p.pid), "uid": peer.map(|p| p.uid),
            "gid": peer.map(|p| p.gid), "reason": reason.name(), "why": why,
            "suppressed": suppressed,
        }),
        ServerEvent::Dropped {
            id,
            peer,
            reason,
            why,
            suppressed,
        } => serde_json::json!({
            "event": "dropped", "id": id, "pid": peer.pid, "uid": peer.uid,
            "reason": reason.map(|r| r.name()), "why": why, "suppressed": suppressed,
        }),
        ServerEvent::Suppressed { what, count } => serde_json::json!({
            "event": "suppressed", "what": what, "count": count,
        }),
        ServerEvent::LogLost { count } => serde_json::json!({
            "event": "log-lost", "count": count,
        }),
        ServerEvent::AcceptFailed {
            error,
            backoff,
            suppressed,
        } => serde_json::json!({
            "event": "accept-failed", "error": error, "backoff_ms": backoff.as_millis(),
            "suppressed": suppressed,
        }),
        other => serde_json::json!({"event": "server", "what": other.to_string()}),
    };
    line_of(json, &v, &e.to_string())
}

/// The BAR window read-backs use, and whether memory decode is on. Read-backs
/// hold it shared; revoking holds it exclusively, so no read touches the BAR
/// while memory decode is off (that would be SIGBUS). Emptied before the
/// device is closed: a BAR mmap keeps the device file open.
struct ReadWindow {
    decode_on: bool,
    window: Option<BarMapping>,
}

/// Why serving stopped.
enum Stop {
    Signal(Signal),
    Unplug,
}

/// `export <target> --serve [socket]`: serves `export` to every allowed
/// client until a stop signal or an unplug request.
///
/// Nothing on the way from a signal to the kernel's revoke waits for output:
/// every line goes through [`Lines`] (queued, written by a thread of its
/// own, dropped and counted when nobody reads), and the server's log
/// through its own bounded queue.
pub fn serve(
    dev: VfioPciDevice,
    export: BarExport,
    opts: &ServeOptions,
    json: bool,
) -> Result<ExitCode, CliError> {
    // First, before any thread exists: every thread inherits the mask, and
    // the signals arrive on the signalfd only.
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask.thread_block()?;
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
    let out = Lines::new(std::io::stdout(), move |n| {
        line_of(
            json,
            &serde_json::json!({"event": "output-lost", "lines": n}),
            &format!("{n} output lines lost: stdout was not read"),
        )
    })?;
    let errors = Lines::new(std::io::stderr(), |n| {
        format!("dmabuf-p2p: {n} error lines lost: stderr was not read")
    })?;
    let bar = export.bar();
    let base = export.ranges().first().map_or(0, |r| r.offset);
    let info = BufferInfo::from_export(&export);
    let socket = opts.socket.clone().unwrap_or_else(|| {
        default_socket_path(&format!("{}-bar{}", export.device(), export.bar()))
    });
    let listener = bind_listener_with(&socket, &opts.socket_options)?;
    let (mode, (owner, group)) = listener
        .file()
        .map_or((0o600, (0, 0)), |f| (f.mode(), f.owner()));
    // An export made with memory decode off (`--keep-decode`) is born
    // revoked; the hub does not know that yet.
    let on = dev.memory_decode()?;
    if !on {
        dev.hub().revoke(RevokeReason::MemoryDecodeOff);
    }
    let window = Arc::new(RwLock::new(ReadWindow {
        decode_on: on,
        window: if opts.read_back {
            Some(dev.map_bar(bar)?)
        } else {
            None
        },
    }));
    let server = ShareServer::new(&export)?;
    let mut options = ServerOptions::default().with_max_clients(opts.max_clients);
    options.policy = opts.socket_options.policy();
    server.set_options(options);
    if opts.read_back {
        let window = Arc::clone(&window);
        let name = info.exporter.clone();
        server.set_read_back(move |offset, buf| {
            let w = window.read().unwrap_or_else(PoisonError::into_inner);
            match (&w.window, w.decode_on) {
                (Some(m), true) => m.read(base + offset, buf),
                _ => Err(Error::Revoked {
                    buffer: format!("{name} (memory decode off or closing)"),
                    source: None,
                }),
            }
        });
    }
    let log = out.clone();
    server.set_log(move |e| log.line(server_event_line(json, e)))?;
    // The hub's observer only records the newest change; this thread queues
    // the line.
    let state_wake = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
    let state_wake = Arc::new(state_wake);
    let newest: Arc<Mutex<Option<StateChange>>> = Arc::new(Mutex::new(None));
    let printer = {
        let wake = Arc::clone(&state_wake);
        let newest = Arc::clone(&newest);
        dev.hub().subscribe(move |change| {
            let mut n = newest.lock().unwrap_or_else(PoisonError::into_inner);
            if n.is_none_or(|old| old.seq < change.seq) {
                *n = Some(*change);
            }
            let _ = wake.write(1);
        })
    };
    let print_state = |server: &ShareServer| {
        let _ = state_wake.read();
        let change = newest.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(change) = change {
            let clients = server.client_count();
            let mut v = state_json(change.state);
            v["event"] = "state".into();
            v["clients"] = clients.into();
            out.line(line_of(
                json,
                &v,
                &format!("state: {} ({clients} clients)", state_text(change.state)),
            ));
        }
    };
    server.listen(listener)?;
    let unplug_watched = dev.unplug_request_fd().is_some();
    let so = &opts.socket_options;
    let ready = serde_json::json!({
        "event": "ready",
        "socket": socket.display().to_string(),
        "mode": format!("{mode:04o}"),
        "owner": owner,
        "group": group,
        "pid": std::process::id(),
        "uid": nix::unistd::geteuid().as_raw(),
        "allow_uid": so.allow_uid,
        "allow_gid": so.allow_gid,
        "read_back": opts.read_back,
        "max_clients": opts.max_clients,
        "unplug_watched": unplug_watched,
        "buffer": info,
        "dmabuf_fd": export.dmabuf().as_raw_fd(),
    });
    out.line(line_of(
        json,
        &ready,
        &format!(
            "serving {} {} ({}) on {} (mode {mode:04o}, owner {owner}, group {group}; pid {}); SIGUSR1: memory decode off, SIGUSR2: on, SIGTERM: stop",
            info.exporter,
            info.ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            human_size(info.size),
            socket.display(),
            std::process::id()
        ),
    ));
    let result: Result<Stop, CliError> = 'serving: loop {
        let unplug_ready = {
            let mut fds = vec![
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
                PollFd::new(state_wake.as_fd(), PollFlags::POLLIN),
            ];
            if let Some(fd) = dev.unplug_request_fd() {
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => break 'serving Err(format!("poll: {e}").into()),
            }
            fds.get(2)
                .and_then(PollFd::revents)
                .is_some_and(|r| r.intersects(PollFlags::POLLIN))
        };
        print_state(&server);
        if unplug_ready {
            match dev.unplug_requested() {
                // The hub revoked with reason Unplug.
                Ok(true) => {
                    out.line(line_of(
                        json,
                        &serde_json::json!({"event": "unplug"}),
                        "the kernel asks for the device back (unplug): closing it",
                    ));
                    break 'serving Ok(Stop::Unplug);
                }
                Ok(false) => {}
                Err(e) => break 'serving Err(e.into()),
            }
        }
        loop {
            let sig = match signals.read_signal() {
                Ok(Some(info)) => info.ssi_signo,
                Ok(None) => break,
                Err(e) => break 'serving Err(format!("signalfd: {e}").into()),
            };
            let sig = i32::try_from(sig)
                .ok()
                .and_then(|s| Signal::try_from(s).ok());
            let on = match sig {
                Some(Signal::SIGUSR1) => false,
                Some(Signal::SIGUSR2) => true,
                Some(s) => break 'serving Ok(Stop::Signal(s)),
                None => continue,
            };
            let mut w = window.write().unwrap_or_else(PoisonError::into_inner);
            match dev.set_memory_decode(on) {
                Ok(()) => w.decode_on = on,
                Err(e) => errors.line(format!(
                    "dmabuf-p2p: memory decode {}: {e}",
                    if on { "on" } else { "off" }
                )),
            }
        }
    };
    // Close the device first: the kernel revokes the dma-buf for every
    // importer at once. Only then are the clients told (bounded). The
    // transition lock is held across the close, so the server sends no
    // offer while the kernel has revoked and the hub does not know yet.
    window
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .window = None;
    {
        let hub = Arc::clone(dev.hub());
        let _transition = hub.lock_transitions();
        drop(export);
        drop(dev);
    }
    let told = server.flush(Duration::from_secs(2));
    print_state(&server);
    drop(printer);
    // Removes the socket, if it still is ours.
    drop(server);
    let why = match &result {
        Ok(Stop::Signal(s)) => s.as_str().to_owned(),
        Ok(Stop::Unplug) => "unplug".to_owned(),
        Err(e) => e.to_string(),
    };
    out.line(line_of(
        json,
        &serde_json::json!({"event": "stopped", "why": why, "clients_told": told}),
        &format!("stopped ({why})"),
    ));
    // Written if stdout is read; not waited for if it is not.
    out.flush(Duration::from_secs(2));
    errors.flush(Duration::from_secs(2));
    result.map(|_| ExitCode::SUCCESS)
}

/// Options of `map`.
#[derive(Debug, clap::Args)]
pub struct MapArgs {
    /// The exporter's socket (`dmabuf-p2p export <target> --serve <socket>`).
    #[arg(long = "from", value_name = "SOCKET")]
    pub from: PathBuf,
    /// A DMA engine (QEMU `edu`, 1234:11e8) to attach to this process's IOAS and
    /// copy into the received buffer with.
    #[arg(long)]
    pub engine: Option<PciAddress>,
    /// Bytes to copy (`2K`, `0x1000`, ...).
    #[arg(long, default_value = "4K", value_parser = parse_size_arg)]
    pub size: u64,
    /// Where in the buffer the copy goes.
    #[arg(long, default_value = "0", value_parser = parse_size_arg)]
    pub offset: u64,
    /// Seed of the byte pattern copied.
    #[arg(long, default_value_t = 1)]
    pub seed: u8,
    /// Then keep the mapping and print the exporter's state changes as they
    /// come, until it is gone.
    #[arg(long)]
    pub watch: bool,
    /// Longest wait for the exporter (connecting and its offer together),
    /// and for one copy, in seconds.
    #[arg(long, default_value_t = 10, value_parser = super::timeout_secs)]
    pub timeout: u64,
    /// Also accept an exporter running as this uid (by default only this
    /// process's uid or root may serve). Repeatable.
    #[arg(long = "allow-uid", value_name = "UID")]
    pub allow_uids: Vec<u32>,
    /// Also accept an exporter whose effective gid is this. Repeatable.
    #[arg(long = "allow-gid", value_name = "GID")]
    pub allow_gids: Vec<u32>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// The bytes copied for `seed`.
fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(151).wrapping_add(seed) ^ ((i >> 8) as u8).rotate_left(3))
        .collect()
}

/// One check of `map`.
#[derive(Debug, serde::Serialize)]
pub struct Step {
    /// What was done.
    pub step: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
    /// Wall time in milliseconds.
    pub millis: u128,
}

/// What was copied where.
#[derive(Debug, serde::Serialize)]
pub struct CopyReport {
    /// Buffer offset.
    pub offset: u64,
    /// Bytes.
    pub size: u64,
    /// The pattern's seed.
    pub seed: u8,
    /// FNV-1a 64 of the bytes copied (hex).
    pub fnv1a64: String,
}

/// The report of `map`.
#[derive(Debug, serde::Serialize)]
pub struct MapReport {
    /// The socket.
    pub socket: String,
    /// Who serves it (`SO_PEERCRED`).
    pub exporter: PeerCred,
    /// What the exporter said about the buffer.
    pub buffer: BufferInfo,
    /// The received dma-buf's exporter (fdinfo).
    pub exp_name: String,
    /// The IOAS it is mapped into.
    pub ioas: u32,
    /// Its IOVA.
    pub iova: u64,
    /// The engine, if one was used.
    pub engine: Option<String>,
    /// The copy, if one was made.
    pub copy: Option<CopyReport>,
    /// The checks.
    pub steps: Vec<Step>,
    /// Whether every check passed.
    pub passed: bool,
}

/// `map --from <socket>`: receive, map into this process's IOAS, optionally
/// copy with an engine and verify (through the exporter's read-back and by
/// copying back out), optionally watch.
pub fn run_map(args: &MapArgs, json: bool) -> Result<ExitCode, CliError> {
    let timeout = Duration::from_secs(args.timeout);
    let mut connect = ConnectOptions::new(timeout);
    connect.policy = AccessPolicy {
        allow_uids: args.allow_uids.clone(),
        allow_gids: args.allow_gids.clone(),
    };
    let shared = SharedBuffer::connect_with(&args.from, &connect)?;
    let iommufd = Iommufd::open()?;
    let ioas = iommufd.alloc_ioas()?;
    let att = shared.attach(
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )?;
    let fdinfo = shared.dmabuf().fdinfo()?;
    let mut report = MapReport {
        socket: args.from.display().to_string(),
        exporter: shared.exporter(),
        buffer: shared.info().clone(),
        exp_name: fdinfo.exp_name.clone(),
        ioas: ioas.id(),
        iova: att.iova(),
        engine: None,
        copy: None,
        steps: Vec::new(),
        passed: false,
    };
    let step = |report: &mut MapReport, name: &str, ok: bool, detail: String, t: Instant| {
        report.steps.push(Step {
            step: name.to_owned(),
            ok,
            detail,
            millis: t.elapsed().as_millis(),
        });
    };
    let t = Instant::now();
    step(
        &mut report,
        "receive and map",
        true,
        format!(
            "{} dma-buf of {} at IOVA {:#x} in IOAS {}",
            fdinfo.exp_name,
            human_size(fdinfo.size),
            att.iova(),
            ioas.id()
        ),
        t,
    );
    let mut engine_and_ram = None;
    if let Some(bdf) = args.engine {
        let size = args.size;
        if size == 0
            || args
                .offset
                .checked_add(size)
                .is_none_or(|end| end > shared.info().size)
        {
            return Err(format!(
                "--offset {:#x} --size {size:#x}: not inside the {}-byte buffer",
                args.offset,
                shared.info().size
            )
            .into());
        }
        let mut engine = Edu::open(bdf, &ioas)?;
        report.engine = Some(format!("{} {bdf}", engine.name()));
        let page = page_size();
        let ram_len = (2 * size).div_ceil(page) * page;
        let ram = Memfd::new("map-copy", ram_len)?;
        let ram_map = ioas.map_file(
            &ram,
            ByteRange::new(0, ram_len),
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
        )?;
        let data = pattern(args.seed, size);
        ram.write_at(0, &data)?;
        report.copy = Some(CopyReport {
            offset: args.offset,
            size,
            seed: args.seed,
            fnv1a64: format!("{:016x}", fnv1a64(&data)),
        });

        // 1. The engine copies the pattern into the buffer.
        let t = Instant::now();
        let copied = att
            .ensure_live()
            .map_err(dmabuf_p2p_engine::Error::from)
            .and_then(|()| engine.memcpy(ram_map.iova(), att.iova() + args.offset, size, timeout));
        let ok = copied.is_ok();
        let detail = match &copied {
            Ok(()) => format!(
                "{} from host RAM to IOVA {:#x}",
                human_size(size),
                att.iova() + args.offset
            ),
            Err(e) => e.to_string(),
        };
        step(&mut report, "copy into the buffer", ok, detail, t);

        // 2. The exporter reads its BAR and sends the bytes back.
        let t = Instant::now();
        match shared.read_back(args.offset, size, timeout) {
            Ok(got) => {
                let same = got == data;
                let detail = if same {
                    "the exporter read the pattern from its BAR".to_owned()
                } else {
                    let differ = got.iter().zip(&data).filter(|(a, b)| a != b).count();
                    format!("{differ} of {size} bytes differ in the exporter's BAR")
                };
                step(&mut report, "check by the exporter", same, detail, t);
            }
            Err(Error::Share {
                problem: ShareProblem::Refused(why),
                ..
            }) if why.contains("read-back") => {
                step(
                    &mut report,
                    "check by the exporter",
                    true,
                    format!("skipped: {why}"),
                    t,
                );
            }
            Err(e) => step(
                &mut report,
                "check by the exporter",
                false,
                e.to_string(),
                t,
            ),
        }

        // 3. The engine copies the buffer back out into host RAM.
        let t = Instant::now();
        let back = att
            .ensure_live()
            .map_err(dmabuf_p2p_engine::Error::from)
            .and_then(|()| {
                engine.memcpy(
                    att.iova() + args.offset,
                    ram_map.iova() + size,
                    size,
                    timeout,
                )
            });
        let (ok, detail) = match back {
            Ok(()) => {
                let mut got = vec![0u8; usize::try_from(size)?];
                ram.read_at(size, &mut got)?;
                if got == data {
                    (
                        true,
                        "copied back out by the engine: the pattern".to_owned(),
                    )
                } else {
                    let differ = got.iter().zip(&data).filter(|(a, b)| a != b).count();
                    (
                        false,
                        format!("copied back out by the engine: {differ} of {size} bytes differ"),
                    )
                }
            }
            Err(e) => (false, e.to_string()),
        };
        step(&mut report, "copy back out", ok, detail, t);
        engine_and_ram = Some((engine, ram, ram_map));
    }
    report.passed = report.steps.iter().all(|s| s.ok);
    if json {
        if args.watch {
            outln!("{}", serde_json::to_string(&report)?)?;
        } else {
            print_json(&report)?;
        }
    } else {
        outln!(
            "buffer: {} ({}), over {} (exporter {})",
            report.buffer.exporter,
            human_size(report.buffer.size),
            report.socket,
            report.exporter
        )?;
        outln!(
            "mapped at IOVA {:#x} in IOAS {}{}",
            report.iova,
            report.ioas,
            report
                .engine
                .as_ref()
                .map_or(String::new(), |e| format!("; engine {e}"))
        )?;
        for s in &report.steps {
            outln!(
                "{:<24} {:<6} {:>5}ms  {}",
                s.step,
                if s.ok { "ok" } else { "FAILED" },
                s.millis,
                s.detail
            )?;
        }
        outln!("map: {}", if report.passed { "PASS" } else { "FAIL" })?;
    }
    if args.watch {
        event_line(
            json,
            &serde_json::json!({"event": "watching", "iova": att.iova()}),
            "watching the exporter",
        );
        let mut last = shared.remote_state();
        loop {
            match shared.wait_remote(Duration::from_secs(3600), |s| s != last) {
                Ok(s) => {
                    last = s;
                    let mut v = state_json(s);
                    v["event"] = "state".into();
                    v["attachment_revoked"] = att.is_revoked().into();
                    v["iova"] = att.iova().into();
                    event_line(
                        json,
                        &v,
                        &format!(
                            "exporter: {}; IOVA {:#x} {}",
                            state_text(s),
                            att.iova(),
                            if att.is_revoked() {
                                "torn down"
                            } else {
                                "mapped"
                            }
                        ),
                    );
                    if matches!(s, BufferState::Gone(_)) {
                        break;
                    }
                }
                Err(Error::Timeout { .. }) => {}
                Err(e) => {
                    event_line(
                        json,
                        &serde_json::json!({"event": "ended", "why": e.to_string()}),
                        &format!("ended: {e}"),
                    );
                    break;
                }
            }
        }
    }
    drop(engine_and_ram);
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
