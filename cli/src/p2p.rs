//! `dmabuf-p2p p2p-test`: a DMA engine copies into and out of another device's
//! BAR through the IOMMU, every transfer is verified, and then the export is
//! revoked to show that DMA stops and comes back.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p_engine::DmaEngine;
use dmabuf_p2p_engine::detect::EngineKind;
use dmabuf_p2p_engine::edu::Edu;

use crate::CliError;
use crate::p2p_args::Args;
use crate::p2p_report::{Report, host_check, pattern};
use crate::p2p_target;

/// Runs the test.
pub fn run(args: &Args, json: bool) -> Result<ExitCode, CliError> {
    let timeout = Duration::from_secs(args.timeout);
    let sysfs = Sysfs::default();
    let (v, d) = (sysfs.vendor(args.engine)?, sysfs.device_id(args.engine)?);
    let class = sysfs.class(args.engine)?;
    match EngineKind::detect(v, d, class) {
        Some(EngineKind::Edu) => {}
        Some(EngineKind::Nvme) => return super::p2p_nvme::run(args, json),
        _ => {
            return Err(format!(
                "no engine driver for {} ({v:04x}:{d:04x}, class {class:06x}); supported: edu (1234:11e8), \
                 NVMe controllers (class 010802)",
                args.engine
            )
            .into());
        }
    }
    if args.allow_write.is_some() {
        return Err("--allow-write is for an NVMe engine; edu writes only the target range".into());
    }
    let iommufd = Iommufd::open()?;
    let ioas = iommufd.alloc_ioas()?;
    // The engine first: the verdict judges the target against the usable
    // IOVAs of an IOAS it is attached to.
    let mut engine = Edu::open(args.engine, &ioas)?;
    let (target_dev, default) =
        p2p_target::open_target(args.target.device, args.target.bar, &iommufd, &ioas)?;
    let target = target_dev.dev();
    let size = args.size;
    let mapped = p2p_target::map_target(args, target, default, &ioas, json, |range| {
        if size == 0 || size.checked_mul(2).is_none_or(|two| two > range.length) {
            return Err(format!(
                "--size {size:#x}: the target range {range} must hold two transfers"
            )
            .into());
        }
        Ok(())
    })?;
    let (bar, range) = (mapped.bar, mapped.range);
    let ram = Memfd::new("p2p-test", range.length)?;
    let ram_map = ioas.map_file(
        &ram,
        ByteRange::new(0, range.length),
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
    )?;
    let bar_at = |off: u64| range.offset + off;

    let mut report = Report::new(
        format!(
            "{} {} ({:?})",
            engine.name(),
            args.engine,
            engine.completion()
        ),
        format!("{} BAR{bar} {range}", args.target.device),
        mapped.export.phys_ranges(),
        mapped.att.iova(),
    );
    report.set_verdict(mapped.verdict, mapped.placement);
    let len = usize::try_from(size)?;

    // 1. host RAM -> BAR
    let t = Instant::now();
    let a = pattern(0x11, size);
    mapped.window.write(bar_at(0), &vec![0u8; len])?;
    ram.write_at(0, &a)?;
    engine.memcpy(ram_map.iova(), mapped.att.iova(), size, timeout)?;
    let mut got = vec![0u8; len];
    mapped.window.read(bar_at(0), &mut got)?;
    let ok = got == a;
    let detail = report.data_detail(
        ok,
        "verified through a BAR mmap",
        "BAR contents differ",
        &got,
        &vec![0u8; len],
    );
    report.push("host RAM -> BAR", size, ok, detail, t);

    // 2. BAR -> host RAM
    let t = Instant::now();
    let b = pattern(0x5a, size);
    mapped.window.write(bar_at(size), &b)?;
    ram.write_at(size, &vec![0u8; len])?;
    engine.memcpy(
        mapped.att.iova() + size,
        ram_map.iova() + size,
        size,
        timeout,
    )?;
    let mut got = vec![0u8; len];
    ram.read_at(size, &mut got)?;
    let ok = got == b;
    let detail = report.data_detail(
        ok,
        "verified in host memory",
        "host memory differs",
        &got,
        &vec![0u8; len],
    );
    report.push("BAR -> host RAM", size, ok, detail, t);

    // 3. revoke: memory decode off tears the mapping down
    let t = Instant::now();
    let mut before = vec![0u8; len];
    mapped.window.read(bar_at(0), &mut before)?;
    let iova = mapped.att.iova();
    target.set_memory_decode(false)?;
    report.push_revoked(&mapped.att, t);

    // 4. a copy to the revoked IOVA must not land
    let t = Instant::now();
    let c = pattern(0xc3, size);
    ram.write_at(0, &c)?;
    let attempted = engine.memcpy(ram_map.iova(), iova, size, timeout);
    target.set_memory_decode(true)?;
    let mut after = vec![0u8; len];
    mapped.window.read(bar_at(0), &mut after)?;
    let changed = before.iter().zip(&after).filter(|(x, y)| x != y).count();
    let ok = changed == 0;
    report.push(
        "copy while revoked",
        size,
        ok,
        format!(
            "engine: {}; {changed} BAR bytes changed",
            if attempted.is_ok() {
                "completed"
            } else {
                "failed"
            }
        ),
        t,
    );

    // 5. decode on restored the mapping at the same IOVA
    let t = Instant::now();
    report.push_restored(&mapped.att, iova, t);

    // 6. and the next copy lands
    let t = Instant::now();
    let before_copy = after.clone();
    engine.memcpy(ram_map.iova(), mapped.att.iova(), size, timeout)?;
    mapped.window.read(bar_at(0), &mut after)?;
    let ok = after == c;
    let detail = report.data_detail(
        ok,
        "verified through a BAR mmap",
        "BAR contents differ",
        &after,
        &before_copy,
    );
    report.push("copy after restore", size, ok, detail, t);
    // The host compares the device's backing file after the VM stops: the last
    // write to each place is what it sees.
    host_check(bar_at(0), &c)?;

    report.finish(json)
}
