//! `dmabuf-p2p devices`.

use std::process::ExitCode;

use dmabuf_p2p::sysfs::{PciDeviceInfo, Sysfs};

use crate::{CliError, human_size, print_json};

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
    if json {
        print_json(&infos)?;
        return Ok(ExitCode::SUCCESS);
    }
    for info in &infos {
        println!(
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
        );
        for r in info.resources.iter().take(6).filter(|r| !r.is_unused()) {
            let kind = if r.is_io() {
                "io"
            } else if r.is_mem64() {
                "mem64"
            } else {
                "mem32"
            };
            let pref = if r.is_prefetch() { " prefetchable" } else { "" };
            println!(
                "    BAR{}  {:>8}  {kind}{pref}  {:#x}..{:#x}",
                r.index,
                human_size(r.size),
                r.start,
                r.start.saturating_add(r.size)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
