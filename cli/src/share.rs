//! Sharing BARs between processes: `dmabuf-p2p export <target> --serve
//! <socket>` (the exporting side) and `dmabuf-p2p map --from <socket>` (the
//! importing side).
//!
//! The serving process is told to revoke by signals: `SIGUSR1` turns the
//! exporting device's memory decode off (the buffer is revoked, every client
//! is told), `SIGUSR2` turns it on again (restored), `SIGTERM`, `SIGINT` or
//! `SIGHUP` stop it (the device is closed: clients hear `gone`). It prints one
//! line per event (JSON lines with `--json`), the first when it is ready.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use dmabuf_p2p::engine::DmaEngine;
use dmabuf_p2p::engine::edu::Edu;
use dmabuf_p2p::exporter::vfio::{BarExport, VfioPciDevice};
use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::range::{page_size, parse_size};
use dmabuf_p2p::revoke::{BufferState, RestorePolicy, RevokeReason};
use dmabuf_p2p::share::{BufferInfo, ShareProblem, ShareServer, SharedBuffer};
use dmabuf_p2p::{ByteRange, Error, PciAddress};

use crate::{CliError, human_size, print_json};

/// Prints one line: compact JSON with `--json`, else `text`.
fn event_line(json: bool, value: &serde_json::Value, text: &str) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
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

/// Blocks `signals` in this thread and every thread it starts afterwards, so
/// that they wait for [`wait_signal`] instead of killing the process.
fn block_signals(signals: &[libc::c_int]) -> io::Result<libc::sigset_t> {
    let set = MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: sigset_t is plain data; all zeroes is a valid (empty) set, and
    // sigemptyset below makes it one by the book.
    let mut set = unsafe { set.assume_init() };
    // SAFETY: `set` is a valid sigset_t for the call.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in signals {
        // SAFETY: as above; `s` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    // SAFETY: `set` is valid for reads; the old mask is not asked for.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(set)
}

/// Waits for one of the (blocked) signals in `set`.
fn wait_signal(set: &libc::sigset_t) -> io::Result<libc::c_int> {
    loop {
        // SAFETY: `set` is a valid sigset_t; no siginfo is asked for.
        let r = unsafe { libc::sigwaitinfo(set, std::ptr::null_mut()) };
        if r >= 0 {
            return Ok(r);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Binds `socket`, replacing a stale socket file nobody listens on.
fn bind(socket: &Path) -> Result<UnixListener, CliError> {
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(format!("{}: exists and is not a socket", socket.display()).into());
        }
        if UnixStream::connect(socket).is_ok() {
            return Err(format!("{}: another process is serving there", socket.display()).into());
        }
        std::fs::remove_file(socket)
            .map_err(|e| format!("{}: removing the stale socket: {e}", socket.display()))?;
    }
    UnixListener::bind(socket).map_err(|e| format!("{}: bind: {e}", socket.display()).into())
}

/// `export <target> --serve <socket>`: serves `export` to every client until
/// a stop signal.
pub fn serve(
    dev: VfioPciDevice,
    export: BarExport,
    socket: &Path,
    json: bool,
) -> Result<ExitCode, CliError> {
    // First, before any thread exists: every thread inherits the mask.
    let signals = block_signals(&[
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
    ])?;
    let listener = bind(socket)?;
    let bar = export.bar();
    let base = export.ranges().first().map_or(0, |r| r.offset);
    let info = BufferInfo::from_export(&export);
    let window = Arc::new(dev.map_bar(bar)?);
    // An export made with memory decode off (`--keep-decode`) is born
    // revoked; the hub does not know that yet.
    let on = dev.memory_decode()?;
    if !on {
        dev.hub().revoke(RevokeReason::MemoryDecodeOff);
    }
    // Read-backs hold it shared; revoking holds it exclusively, so no read
    // touches the BAR while memory decode is off (that would be SIGBUS).
    let decode_on = Arc::new(RwLock::new(on));
    let server = Arc::new(ShareServer::new(&export)?);
    {
        let window = Arc::clone(&window);
        let decode_on = Arc::clone(&decode_on);
        let name = info.exporter.clone();
        server.set_read_back(move |offset, buf| {
            let on = decode_on.read().unwrap_or_else(PoisonError::into_inner);
            if !*on {
                return Err(Error::Revoked {
                    buffer: format!("{name} (memory decode off)"),
                });
            }
            window.read_bytes(base + offset, buf)
        });
    }
    // Told after the server has forwarded the change (observers run in order).
    let printer = {
        let server = Arc::clone(&server);
        dev.hub().subscribe(move |change| {
            let clients = server.client_count();
            let mut v = state_json(change.state);
            v["event"] = "state".into();
            v["clients"] = clients.into();
            event_line(
                json,
                &v,
                &format!(
                    "state: {} (told {clients} clients)",
                    state_text(change.state)
                ),
            );
        })
    };
    {
        let server = Arc::clone(&server);
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let added = match conn {
                        Ok(c) => server.add_client(c).map_err(|e| e.to_string()),
                        Err(e) => Err(format!("accept: {e}")),
                    };
                    match added {
                        Ok(id) => {
                            let n = server.client_count();
                            event_line(
                                json,
                                &serde_json::json!({"event": "client", "id": id, "clients": n}),
                                &format!("client {id} connected ({n} connected)"),
                            );
                        }
                        Err(e) => eprintln!("dmabuf-p2p: a client was refused: {e}"),
                    }
                }
            })?;
    }
    let ready = serde_json::json!({
        "event": "ready",
        "socket": socket.display().to_string(),
        "pid": std::process::id(),
        "buffer": info,
        "dmabuf_fd": export.dmabuf().as_raw_fd(),
    });
    event_line(
        json,
        &ready,
        &format!(
            "serving {} {} ({}) on {} (pid {}); SIGUSR1: memory decode off, SIGUSR2: on, SIGTERM: stop",
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
    );
    let result = loop {
        let sig = match wait_signal(&signals) {
            Ok(s) => s,
            Err(e) => break Err(CliError::from(format!("sigwaitinfo: {e}"))),
        };
        let on = match sig {
            libc::SIGUSR1 => false,
            libc::SIGUSR2 => true,
            _ => break Ok(()),
        };
        let mut flag = decode_on.write().unwrap_or_else(PoisonError::into_inner);
        match dev.set_memory_decode(on) {
            Ok(()) => *flag = on,
            Err(e) => eprintln!(
                "dmabuf-p2p: memory decode {}: {e}",
                if on { "on" } else { "off" }
            ),
        }
    };
    let _ = std::fs::remove_file(socket);
    drop(window);
    drop(export);
    // Closing the device revokes for good: clients hear `gone`.
    drop(dev);
    drop(printer);
    event_line(json, &serde_json::json!({"event": "stopped"}), "stopped");
    result.map(|()| ExitCode::SUCCESS)
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
    /// Longest wait for the exporter, and for one copy, in seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
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

fn fnv1a64(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
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
    let shared = SharedBuffer::connect(&args.from, timeout)?;
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
            fnv1a64: fnv1a64(&data),
        });

        // 1. The engine copies the pattern into the buffer.
        let t = Instant::now();
        let copied = att
            .ensure_live()
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
        let back = att.ensure_live().and_then(|()| {
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
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print_json(&report)?;
        }
    } else {
        println!(
            "buffer: {} ({}), over {}",
            report.buffer.exporter,
            human_size(report.buffer.size),
            report.socket
        );
        println!(
            "mapped at IOVA {:#x} in IOAS {}{}",
            report.iova,
            report.ioas,
            report
                .engine
                .as_ref()
                .map_or(String::new(), |e| format!("; engine {e}"))
        );
        for s in &report.steps {
            println!(
                "{:<24} {:<6} {:>5}ms  {}",
                s.step,
                if s.ok { "ok" } else { "FAILED" },
                s.millis,
                s.detail
            );
        }
        println!("map: {}", if report.passed { "PASS" } else { "FAIL" });
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
