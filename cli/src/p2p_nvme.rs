//! `p2p-test` with an NVMe controller as the engine: the same blocks are read
//! into host RAM and into the target BAR through its dma-buf IOVA and
//! compared, then the export is revoked (reads must not land) and restored
//! (they land again). Nothing is written to the namespace unless
//! `--allow-write <lba>+<count>` names the blocks, and those get their
//! original contents back at the end.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::{BarMapping, ByteRange};
use dmabuf_p2p_engine::StorageEngine;
use dmabuf_p2p_engine::nvme::Nvme;

use super::CliError;
use crate::p2p_args::Args;
use crate::p2p_report::{Report, host_check, pattern};
use crate::p2p_target::{map_target, open_target};

/// The target: a plain device (ivshmem), or an NVMe controller whose CMB or
/// PMR is the target, brought up by the driver to enable them.
pub fn run(args: &Args, json: bool) -> Result<ExitCode, CliError> {
    let timeout = Duration::from_secs(args.timeout);
    let iommufd = Iommufd::open()?;
    let ioas = iommufd.alloc_ioas()?;
    let mut engine = Nvme::open(args.engine, &ioas)?;
    if args.nsid != 1 || engine.namespace().is_none() {
        engine.select_namespace(args.nsid)?;
    }
    let bs = engine.block_size();
    let blocks = match args.blocks {
        Some(b) => b,
        None => args.size.div_ceil(bs).max(1),
    };
    let size = blocks * bs;
    if size > engine.max_transfer() {
        return Err(format!(
            "--blocks {blocks}: {size} bytes is over the controller's {} bytes per command (MDTS)",
            engine.max_transfer()
        )
        .into());
    }
    let count = u32::try_from(blocks)?;
    let (target, default) = open_target(args.target.device, args.target.bar, &iommufd, &ioas)?;
    let dev = target.dev();
    let mapped = map_target(args, dev, default, &ioas, json, |range| {
        if size.checked_mul(2).is_none_or(|two| two > range.length) {
            return Err(format!(
                "{blocks} blocks ({size:#x} bytes): the target range {range} must hold two reads"
            )
            .into());
        }
        Ok(())
    })?;
    let (bar, range) = (mapped.bar, mapped.range);
    let ram = Memfd::new("p2p-test-nvme", 4 * size)?;
    let ram_map = ioas.map_file(
        &ram,
        ByteRange::new(0, 4 * size),
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
    )?;
    let bar_at = |off: u64| range.offset + off;
    let len = usize::try_from(size)?;
    let ns = engine.namespace().copied();

    let mut report = Report::new(
        format!(
            "{} {} ({:?}), namespace {} ({} blocks of {bs} bytes), blocks {}+{blocks}",
            engine.name(),
            args.engine,
            engine.completion(),
            ns.map_or(0, |n| n.nsid),
            engine.blocks(),
            args.lba,
        ),
        format!("{} BAR{bar} {range}", args.target.device),
        mapped.export.phys_ranges(),
        mapped.att.iova(),
    );
    report.set_verdict(mapped.verdict, mapped.placement);
    let read_ram = |off: u64| -> Result<Vec<u8>, CliError> {
        let mut v = vec![0u8; len];
        ram.read_at(off, &mut v)?;
        Ok(v)
    };
    let read_bar = |w: &BarMapping, off: u64| -> Result<Vec<u8>, CliError> {
        let mut v = vec![0u8; len];
        w.read(bar_at(off), &mut v)?;
        Ok(v)
    };

    // 1. storage -> host RAM
    let t = Instant::now();
    engine.read_blocks(args.lba, count, ram_map.iova(), timeout)?;
    let from_disk = read_ram(0)?;
    report.push(
        "storage -> host RAM",
        size,
        true,
        "read completed".into(),
        t,
    );

    // 2. storage -> BAR, compared with host RAM
    let t = Instant::now();
    let sentinel = pattern(0xa5, size);
    mapped.window.write(bar_at(0), &sentinel)?;
    mapped.window.write(bar_at(size), &sentinel)?;
    engine.read_blocks(args.lba, count, mapped.att.iova(), timeout)?;
    let got = read_bar(&mapped.window, 0)?;
    let ok = got == from_disk;
    let detail = report.data_detail(
        ok,
        "BAR bytes equal the host RAM read",
        "BAR bytes differ from the host RAM read",
        &got,
        &sentinel,
    );
    report.push("storage -> BAR", size, ok, detail, t);

    // 3. revoke
    let t = Instant::now();
    let iova = mapped.att.iova();
    dev.set_memory_decode(false)?;
    report.push_revoked(&mapped.att, t);

    // 4. a read into the revoked IOVA must not land
    let t = Instant::now();
    let attempted = engine.read_blocks(args.lba, count, iova + size, timeout);
    dev.set_memory_decode(true)?;
    let after = read_bar(&mapped.window, size)?;
    let changed = sentinel.iter().zip(&after).filter(|(x, y)| x != y).count();
    report.push(
        "read while revoked",
        size,
        changed == 0,
        format!(
            "controller: {}; {changed} BAR bytes changed",
            match &attempted {
                Ok(()) => "completed".to_owned(),
                Err(e) => format!("failed ({e})"),
            }
        ),
        t,
    );

    // 5. restore
    let t = Instant::now();
    report.push_restored(&mapped.att, iova, t);

    // 6. the next read lands
    let t = Instant::now();
    engine.read_blocks(args.lba, count, mapped.att.iova() + size, timeout)?;
    let got = read_bar(&mapped.window, size)?;
    let ok = got == from_disk;
    let detail = report.data_detail(
        ok,
        "BAR bytes equal the host RAM read",
        "BAR bytes differ",
        &got,
        &after,
    );
    report.push("read after restore", size, ok, detail, t);
    host_check(bar_at(size), &got)?;

    // 7. only with --allow-write: write, read back into the BAR, put back.
    if let Some(allow) = args.allow_write {
        let t = Instant::now();
        let inside = args.lba >= allow.lba
            && args
                .lba
                .checked_add(blocks)
                .is_some_and(|end| end <= allow.lba.saturating_add(allow.count));
        if !inside {
            report.push(
                "write (allowed blocks)",
                0,
                false,
                format!(
                    "blocks {}+{blocks} are not inside --allow-write {}+{}: nothing written",
                    args.lba, allow.lba, allow.count
                ),
                t,
            );
        } else {
            let data = pattern(0x3c, size);
            ram.write_at(size, &data)?;
            engine.write_blocks(args.lba, count, ram_map.iova() + size, timeout)?;
            engine.read_blocks(args.lba, count, mapped.att.iova(), timeout)?;
            let back = read_bar(&mapped.window, 0)?;
            // Put the original blocks back and check that they are.
            engine.write_blocks(args.lba, count, ram_map.iova(), timeout)?;
            engine.read_blocks(args.lba, count, ram_map.iova() + 2 * size, timeout)?;
            let restored = read_ram(2 * size)?;
            let ok = back == data && restored == from_disk;
            report.push(
                "write, read back into BAR",
                size,
                ok,
                format!(
                    "written bytes {} in the BAR; original blocks {}",
                    if back == data { "verified" } else { "DIFFER" },
                    if restored == from_disk {
                        "restored"
                    } else {
                        "NOT restored"
                    }
                ),
                t,
            );
        }
    }

    report.finish(json)
}

#[cfg(test)]
mod tests {
    use crate::p2p_args::WriteAllowance;

    #[test]
    fn write_allowance_parses() {
        assert_eq!(
            "2048+8".parse::<WriteAllowance>(),
            Ok(WriteAllowance {
                lba: 2048,
                count: 8
            })
        );
        assert_eq!(
            "0x800+0x10"
                .parse::<WriteAllowance>()
                .map(|w| (w.lba, w.count)),
            Ok((0x800, 16))
        );
        assert!("2048".parse::<WriteAllowance>().is_err());
        assert!("2048+0".parse::<WriteAllowance>().is_err());
        assert!("x+1".parse::<WriteAllowance>().is_err());
    }
}
