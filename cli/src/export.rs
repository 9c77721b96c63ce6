//! `dmabuf-p2p export`: export a BAR range as a dma-buf and show what it is.

use std::process::ExitCode;

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::importer::iommufd::Iommufd;
use dmabuf_p2p::share::SocketOptions;
use dmabuf_p2p::vfio::VfioPciDevice;

use crate::target::TargetSpec;
use crate::{CliError, print_json};
use dmabuf_p2p::range::human_size;

/// Options of `export`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to export: `<bdf>[:bar[:offset+len]]`, e.g. `0000:02:00.0:2:0x1000+64K`.
    /// The BAR defaults to 2, the range to the whole BAR.
    pub target: TargetSpec,
    /// Leave memory decode as it is (an export made while it is off is born revoked).
    #[arg(long)]
    pub keep_decode: bool,
    /// Keep the export alive and hand it to every allowed process that
    /// connects to this Unix socket, forwarding revocations (SIGUSR1: memory
    /// decode off, SIGUSR2: on, SIGTERM: stop; an unplug request closes the
    /// device). Without a path: `$XDG_RUNTIME_DIR/dmabuf-p2p/<bdf>-bar<n>.sock`,
    /// else `/run/dmabuf-p2p/<bdf>-bar<n>.sock`. The socket is mode 0600
    /// (this uid and root may connect) unless `--allow-uid`/`--allow-gid`
    /// say more; every directory on its path must be root's or this user's
    /// and writable by nobody else (no symlinks; no /tmp unless
    /// `--allow-sticky-dir`). See `dmabuf-p2p map --from`.
    #[arg(long, value_name = "SOCKET", num_args = 0..=1)]
    pub serve: Option<Option<std::path::PathBuf>>,
    /// With --serve: also let this uid connect. The socket file is given to
    /// it (mode 0600), so that its permissions let in exactly who the peer
    /// check does; needs root. One uid at most (a file has one owner).
    #[arg(long = "allow-uid", value_name = "UID", requires = "serve")]
    pub allow_uid: Option<u32>,
    /// With --serve: also let members of this group connect (effective or
    /// supplementary gid). The socket's group becomes this gid, mode 0660.
    /// One gid at most (a file has one group).
    #[arg(long = "allow-gid", value_name = "GID", requires = "serve")]
    pub allow_gid: Option<u32>,
    /// With --serve: accept a socket path through a sticky directory others
    /// may write, such as /tmp (refused by default: others can take the name
    /// first, tmp cleaners remove it, services with a private /tmp do not see
    /// it). The entry in it must still be this user's or root's.
    #[arg(long, requires = "serve")]
    pub allow_sticky_dir: bool,
    /// With --serve: answer clients' read-back requests with the BAR's bytes
    /// (off by default).
    #[arg(long, requires = "serve")]
    pub read_back: bool,
    /// With --serve: the most clients served at once (a quarter of them kept
    /// for this user's own importers, a quarter at most per other uid, an
    /// eighth per process).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000), requires = "serve")]
    pub max_clients: u32,
}

/// The facts printed about an export.
#[derive(Debug, serde::Serialize)]
pub struct ExportReport {
    /// The device.
    pub device: String,
    /// The BAR.
    pub bar: u32,
    /// BAR-relative ranges.
    pub ranges: Vec<ByteRange>,
    /// Physical ranges behind them.
    pub phys: Vec<dmabuf_p2p::range::PhysRange>,
    /// Memory decode when exported.
    pub memory_decode: Option<bool>,
    /// The buffer's fdinfo.
    pub fdinfo: dmabuf_p2p::dmabuf::DmaBufFdInfo,
}

/// Exports and prints.
pub fn run(args: &Args, json: bool) -> Result<ExitCode, CliError> {
    let iommufd = Iommufd::open()?;
    let mut dev = VfioPciDevice::open(args.target.device)?;
    dev.bind(&iommufd)?;
    if !args.keep_decode {
        dev.set_memory_decode(true)?;
    }
    let bar = args.target.bar.unwrap_or(2);
    let range = match args.target.range {
        Some(r) => r,
        None => ByteRange::new(0, dev.bar(bar)?.size()),
    };
    let export = dev.export_bar(bar, &[range])?;
    if let Some(socket) = &args.serve {
        let mut socket_options = SocketOptions::new().allow_sticky_dir(args.allow_sticky_dir);
        socket_options.allow_uid = args.allow_uid;
        socket_options.allow_gid = args.allow_gid;
        let opts = super::share::ServeOptions {
            socket: socket.clone(),
            socket_options,
            read_back: args.read_back,
            max_clients: args.max_clients as usize,
        };
        return super::share::serve(dev, export, &opts, json);
    }
    let report = ExportReport {
        device: dev.address().to_string(),
        bar,
        ranges: export.ranges().to_vec(),
        phys: export.phys_ranges().to_vec(),
        memory_decode: export.memory_decode_at_export(),
        fdinfo: export.dmabuf().fdinfo()?,
    };
    if json {
        print_json(&report)?;
    } else {
        outln!(
            "exported {} BAR{} as dma-buf fd {}",
            report.device,
            bar,
            std::os::fd::AsRawFd::as_raw_fd(export.dmabuf())
        )?;
        for (r, p) in report.ranges.iter().zip(&report.phys) {
            outln!("  range {r}  ({})  phys {p}", human_size(r.length))?;
        }
        let fi = &report.fdinfo;
        outln!(
            "  fdinfo: exp_name {}  size {}  count {}  ino {}  flags {:o}",
            fi.exp_name,
            fi.size,
            fi.count,
            fi.ino,
            fi.flags
        )?;
        if report.memory_decode == Some(false) {
            outln!("  note: memory decode was off, so the buffer was born revoked")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
