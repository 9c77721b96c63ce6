//! `dmabuf-p2p devices`.

use std::process::ExitCode;

use dmabuf_p2p::sysfs::{PciDeviceInfo, Sysfs};
use dmabuf_p2p::topology::upstream_bridges;
use dmabuf_p2p_engine::detect::{EngineKind, TargetBar, target_bars};

use crate::{CliError, print_json};
use dmabuf_p2p::range::human_size;

/// Options of `devices`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only devices bound to this driver (e.g. `vfio-pci`).
    #[arg(long)]
    pub driver: Option<String>,
    /// Root of the sysfs tree to read.
    #[arg(long, default_value = "/sys", hide = true)]
    pub sysfs: String,
}

/// One device as `--json` prints it: sysfs's facts, the engine driver that
/// can drive it, its BARs that are peer-to-peer DMA targets, and the
/// bridges above it.
#[derive(Debug, serde::Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    info: &'a PciDeviceInfo,
    engine: Option<EngineKind>,
    p2p_targets: Vec<TargetBar>,
    upstream: Option<UpstreamBrief>,
    /// Why `upstream` could not be read.
    upstream_unknown: Option<String>,
}

/// The bridges above a device, nearest first, and its host bridge.
#[derive(Debug, serde::Serialize)]
struct UpstreamBrief {
    bridges: Vec<BridgeBrief>,
    host_bridge: String,
}

/// One bridge above a device: what it is and its ACS.
#[derive(Debug, serde::Serialize)]
struct BridgeBrief {
    address: dmabuf_p2p::PciAddress,
    kind: &'static str,
    acs: String,
}

impl UpstreamBrief {
    /// Reads it; what went wrong becomes text (a device whose path cannot
    /// be read is still listed).
    fn read(sysfs: &Sysfs, addr: dmabuf_p2p::PciAddress) -> Result<Self, String> {
        let (host_bridge, bridges) = upstream_bridges(sysfs, addr).map_err(|e| e.to_string())?;
        Ok(Self {
            bridges: bridges
                .iter()
                .map(|b| BridgeBrief {
                    address: b.address,
                    kind: b.kind(),
                    acs: b.acs_summary(),
                })
                .collect(),
            host_bridge,
        })
    }

    /// `0000:02:00.0 switch downstream port (no ACS) > ... > pci0000:00`.
    fn line(&self) -> String {
        if self.bridges.is_empty() {
            return format!("on the root bus of {}", self.host_bridge);
        }
        let mut parts: Vec<String> = self
            .bridges
            .iter()
            .map(|b| format!("{} {} ({})", b.address, b.kind, b.acs))
            .collect();
        parts.push(self.host_bridge.clone());
        parts.join(" > ")
    }
}

/// Lists the devices.
pub fn run(args: &Args, json: bool) -> Result<ExitCode, CliError> {
    let sysfs = Sysfs::new(&args.sysfs);
    let mut infos: Vec<PciDeviceInfo> = Vec::new();
    for addr in sysfs.devices()? {
        let info = sysfs.info(addr)?;
        if args
            .driver
            .as_deref()
            .is_none_or(|d| info.driver.as_deref() == Some(d))
        {
            infos.push(info);
        }
    }
    let listed: Vec<Listed<'_>> = infos
        .iter()
        .map(|info| {
            let upstream = UpstreamBrief::read(&sysfs, info.address);
            Listed {
                info,
                engine: EngineKind::detect(info.vendor, info.device, info.class),
                p2p_targets: target_bars(info),
                upstream_unknown: upstream.as_ref().err().cloned(),
                upstream: upstream.ok(),
            }
        })
        .collect();
    if json {
        print_json(&listed)?;
        return Ok(ExitCode::SUCCESS);
    }
    for Listed {
        info,
        engine,
        p2p_targets,
        upstream,
        upstream_unknown,
    } in &listed
    {
        outln!(
            "{}  {:04x}:{:04x}  class {:06x}  driver {}  iommu_group {}  vfio {}",
            info.address,
            info.vendor,
            info.device,
            info.class,
            info.driver.as_deref().unwrap_or("-"),
            info.iommu_group.map_or("-".to_owned(), |g| g.to_string()),
            info.vfio_dev
                .as_deref()
                .map_or("-".to_owned(), |v| format!("/dev/vfio/devices/{v}")),
        )?;
        match (upstream, upstream_unknown) {
            (Some(u), _) => outln!("    upstream: {}", u.line())?,
            (None, e) => outln!("    upstream: unknown ({})", e.as_deref().unwrap_or("?"))?,
        }
        if let Some(kind) = engine {
            let what = match kind {
                EngineKind::Edu => "copy engine",
                _ => "storage engine",
            };
            outln!(
                "    engine: {} ({what}; p2p-test --engine {})",
                kind.name(),
                info.address
            )?;
        }
        for r in info.resources.iter().take(6).filter(|r| !r.is_unused()) {
            let kind = if r.is_io() {
                "io"
            } else if r.is_mem64() {
                "mem64"
            } else {
                "mem32"
            };
            let pref = if r.is_prefetch() { " prefetchable" } else { "" };
            let target = p2p_targets
                .iter()
                .find(|t| t.bar == r.index)
                .map_or(String::new(), |t| {
                    format!(
                        "  P2P target: {}{}",
                        t.what,
                        if t.certain {
                            ""
                        } else {
                            " (if the controller has one)"
                        }
                    )
                });
            outln!(
                "    BAR{}  {:>8}  {kind}{pref}  {:#x}..{:#x}{target}",
                r.index,
                human_size(r.size),
                r.start,
                r.start.saturating_add(r.size)
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
