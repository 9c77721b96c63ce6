//! Part 7, **nvme**: an NVMe controller's Reads into host RAM against the
//! same Reads into the ivshmem BAR through its dma-buf IOVA, interleaved,
//! as a ratio per transfer size.

use std::time::{Duration, Instant};

use dmabuf_p2p::importer::iommufd::{Ioas, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p::{ByteRange, VfioPciDevice};
use dmabuf_p2p_engine::StorageEngine;
use dmabuf_p2p_engine::nvme::{NVME_CLASS, Nvme};

use crate::stats::{Stats, emit, emit_meta, ns_since};
use crate::{Opts, R};

/// Bytes of the BAR and of the memfd the reads go to.
const AREA: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(20);

/// The first NVMe controller, if the VM has one. Listed by the library's
/// `Sysfs` (never `std::fs::read_dir` on sysfs: docs/KERNEL.md).
pub(crate) fn first_nvme() -> Option<String> {
    let sys = Sysfs::default();
    sys.devices()
        .ok()?
        .into_iter()
        .find(|a| sys.class(*a).ok() == Some(NVME_CLASS))
        .map(|a| a.to_string())
}

/// Reads of each size into RAM and into the BAR, alternating which goes
/// first; emits both times and their ratio (BAR / RAM).
pub fn reads(opts: &Opts, dev: &VfioPciDevice, ioas: &Ioas) -> R<()> {
    let Some(bdf) = first_nvme() else {
        emit_meta("nvme", "no NVMe controller in this VM: part skipped");
        return Ok(());
    };
    let mut nvme = Nvme::open(bdf.parse()?, ioas)?;
    emit_meta("nvme_device", &bdf);
    let export = dev.export_bar(2, &[ByteRange::new(0, AREA)])?;
    let bar_map = ioas.map_dmabuf(export.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite)?;
    let ram = Memfd::new("bench-nvme", AREA)?;
    let ram_map = ioas.map_file(
        &ram,
        ByteRange::new(0, AREA),
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
    )?;
    let bs = nvme.block_size();
    let max = nvme.max_transfer().min(AREA);
    let sizes: Vec<u64> = std::iter::successors(Some(4096u64), |s| Some(s * 4))
        .take_while(|s| *s <= max)
        .collect();
    for &size in &sizes {
        let count = u32::try_from(size / bs)?;
        let budget = opts.budget(5, 41, 3.0);
        let (mut to_ram, mut to_bar) = (Vec::new(), Vec::new());
        budget.repeat(|i| -> R<()> {
            let order = if i % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for into_bar in order {
                let dst = if into_bar {
                    bar_map.iova()
                } else {
                    ram_map.iova()
                };
                let t = Instant::now();
                nvme.read_blocks(0, count, dst, TIMEOUT)?;
                let ns = ns_since(t);
                if into_bar {
                    to_bar.push(ns);
                } else {
                    to_ram.push(ns);
                }
            }
            Ok(())
        })?;
        let ratios: Vec<f64> = to_bar.iter().zip(&to_ram).map(|(b, r)| b / r).collect();
        emit("nvme", "ram", "read", size, "ns", &Stats::of(&to_ram));
        emit("nvme", "bar", "read", size, "ns", &Stats::of(&to_bar));
        emit("nvme", "ratio", "read", size, "ratio", &Stats::of(&ratios));
    }
    Ok(())
}
