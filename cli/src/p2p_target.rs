//! The target side of `p2p-test`: the device opened (an NVMe controller's
//! CMB or PMR, else a plain BAR), its BAR range exported as a dma-buf and
//! mapped where the topology verdict says, with a BAR mmap to check it
//! through. Shared by the edu and the NVMe engine's runs.

use dmabuf_p2p::importer::iommufd::{Ioas, Iommufd, MapPerms};
use dmabuf_p2p::revoke::{Attachment, RestorePolicy};
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p::topology::Verdict;
use dmabuf_p2p::{BarExport, BarMapping, ByteRange, PciAddress, VfioPciDevice};
use dmabuf_p2p_engine::nvme::{NVME_CLASS, Nvme, NvmeProblem};

use crate::CliError;
use crate::p2p_args::Args;
use crate::p2p_verdict;

/// The BAR a plain device's test uses unless asked for another.
const DEFAULT_BAR: u32 = 2;

pub(crate) enum Target {
    Plain(Box<VfioPciDevice>),
    Nvme(Box<Nvme>),
}

impl Target {
    pub(crate) fn dev(&self) -> &VfioPciDevice {
        match self {
            Self::Plain(d) => d,
            Self::Nvme(n) => n.device(),
        }
    }
}

/// `Ok(None)` for an NVMe controller that lacks the region asked for.
fn region<T>(asked: dmabuf_p2p_engine::Result<T>) -> Result<Option<T>, CliError> {
    match asked {
        Ok(info) => Ok(Some(info)),
        Err(dmabuf_p2p_engine::Error::Nvme {
            problem: NvmeProblem::NoCmb | NvmeProblem::NoPmr { .. },
            ..
        }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Opens the target device: an NVMe controller is brought up and its CMB
/// enabled; its PMR too when `bar` names another BAR than the CMB's, or
/// there is no CMB. The CMB, or else the PMR, is the default target range.
pub(crate) fn open_target(
    address: PciAddress,
    bar: Option<u32>,
    iommufd: &Iommufd,
    ioas: &Ioas,
) -> Result<(Target, Option<(u32, ByteRange)>), CliError> {
    let sysfs = Sysfs::default();
    let mut dev = VfioPciDevice::open(address)?;
    dev.bind(iommufd)?;
    if sysfs.class(address)? == NVME_CLASS {
        dev.attach(ioas)?;
        let nvme = Nvme::from_device(dev, ioas)?;
        let cmb = region(nvme.enable_cmb())?;
        let cmb_is_target = cmb.is_some_and(|c| bar.is_none_or(|b| b == c.bar));
        let pmr = if cmb_is_target {
            None
        } else {
            region(nvme.enable_pmr())?
        };
        // The first 64 KiB of the region.
        let first =
            |bar: u32, offset: u64, size: u64| (bar, ByteRange::new(offset, size.min(0x10000)));
        let default = match (cmb, pmr) {
            (Some(cmb), _) if cmb_is_target => first(cmb.bar, cmb.offset, cmb.size),
            (_, Some(pmr)) => first(pmr.bar, 0, pmr.size),
            (Some(cmb), None) => first(cmb.bar, cmb.offset, cmb.size),
            (None, None) => {
                return Err(format!(
                    "NVMe controller {address} has neither a controller memory buffer nor a \
                     persistent memory region to be the target"
                )
                .into());
            }
        };
        return Ok((Target::Nvme(Box::new(nvme)), Some(default)));
    }
    dev.set_memory_decode(true)?;
    Ok((Target::Plain(Box::new(dev)), None))
}

/// Runs the NVMe flavour of the test.
/// The target's BAR range, exported and mapped in the IOAS.
pub(crate) struct MappedTarget {
    pub(crate) bar: u32,
    pub(crate) range: ByteRange,
    /// The topology verdict, or why there is none.
    pub(crate) verdict: Result<Verdict, String>,
    /// Why the range is mapped where it is.
    pub(crate) placement: String,
    // Dropped in this order: the mmap, the mapping, then the export.
    pub(crate) window: BarMapping,
    pub(crate) att: Attachment,
    pub(crate) export: BarExport,
}

/// Picks the BAR and range (as asked, else `default`, else BAR 2 from its
/// start), lets `fits` refuse a range too small for the test, prints the
/// verdict (text mode), and exports and maps the range where the verdict
/// says, restored automatically after a revoke.
pub(crate) fn map_target(
    args: &Args,
    target: &VfioPciDevice,
    default: Option<(u32, ByteRange)>,
    ioas: &Ioas,
    json: bool,
    fits: impl FnOnce(ByteRange) -> Result<(), CliError>,
) -> Result<MappedTarget, CliError> {
    let (default_bar, default_range) = match default {
        Some((bar, range)) => (bar, Some(range)),
        None => (DEFAULT_BAR, None),
    };
    let bar = args.target.bar.unwrap_or(default_bar);
    let bar_size = target.bar(bar)?.size();
    let range = args
        .target
        .range
        .or(default_range)
        .unwrap_or(ByteRange::new(0, bar_size.min(0x10000)));
    fits(range)?;
    let verdict = p2p_verdict::judge(args.engine, args.target.device, bar, ioas);
    if !json {
        p2p_verdict::print(&verdict)?;
    }
    let (at, placement) = p2p_verdict::placement(&verdict, range);
    let export = target.export_bar(bar, &[range])?;
    let att = Attachment::map(
        &export,
        ioas,
        at,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )?;
    let window = target.map_bar(bar)?;
    Ok(MappedTarget {
        bar,
        range,
        verdict,
        placement,
        window,
        att,
        export,
    })
}
