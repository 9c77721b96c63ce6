//! Part 8, **vmm**: the `GuestBarMap` against a hand-written VMM path, in a
//! VM of its own (`cargo xtask bench` boots it on the instruction clock with
//! 8 ivshmem devices of 64 GiB and 64 of 64 KiB on the root bus; only
//! `--only=vmm` runs it).
//!
//! 1. **Trapped writes** with 1, 8 and 64 offered BARs registered: on one
//!    device, the guest's decode off, decode on, and a BAR move (its two
//!    dwords, decode on), through `GuestBarMap::config_write`, against the
//!    same work in raw syscalls on the same device (a `pwrite` of
//!    `PCI_COMMAND`; plus `IOMMU_IOAS_UNMAP` and `IOMMU_IOAS_MAP_FILE` of its
//!    dma-buf for decode on and for a move), interleaved.
//! 2. **Registration**: 8 devices registered, placed and mapped (decode on),
//!    with 64 KiB BARs and with 64 GiB BARs; and the legacy type1 path's
//!    cost for the same BARs, projected from its measured cost per byte
//!    (`VFIO_IOMMU_MAP_DMA` of a BAR mmap grows with size).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use dmabuf_p2p::vfio::VfioPciDevice;
use dmabuf_p2p::vmm::{DeviceId, GuestBarMap, Offer};
use dmabuf_p2p::{Ioas, Iommufd};

use crate::stats::{Stats, emit, emit_meta, ns_since};
use crate::{Opts, R, iommu_group, raw, uapi};

const BAR: u32 = 2;
const COMMAND: u64 = 4;
const ON: u16 = 0x6;
const OFF: u16 = 0x4;
/// Where the library's mappings go, and the raw path's (apart).
const LIB_GPA: u64 = 0x100_0000_0000;
const RAW_GPA: u64 = 0x200_0000_0000;
/// The two GPAs a move alternates between, per path (apart from every
/// other BAR's).
const MOVE_STEP: u64 = 0x10_0000_0000;

/// The ivshmem devices (1af4:1110) with a BAR2 of `size`, in address order.
/// Listed by the library's `Sysfs` (never `std::fs::read_dir` on sysfs:
/// docs/KERNEL.md).
fn ivshmem_with(size: u64) -> R<Vec<String>> {
    let mut out = Vec::new();
    for addr in dmabuf_p2p::sysfs::Sysfs::default().devices()? {
        let bdf = addr.to_string();
        let dir = format!("/sys/bus/pci/devices/{bdf}");
        let id = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).unwrap_or_default();
        if id("vendor").trim() != "0x1af4" || id("device").trim() != "0x1110" {
            continue;
        }
        let res = std::fs::read_to_string(format!("{dir}/resource"))?;
        let line = res.lines().nth(BAR as usize).unwrap_or_default();
        let v: Vec<u64> = line
            .split_whitespace()
            .filter_map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).ok())
            .collect();
        if v.len() >= 2 && v[1] > v[0] && v[1] - v[0] + 1 == size {
            out.push(bdf);
        }
    }
    out.sort();
    Ok(out)
}

/// Opens, binds and attaches the devices at `bdfs` to `ioas`.
fn open_all(bdfs: &[String], ioas: &Ioas) -> R<Vec<Arc<VfioPciDevice>>> {
    bdfs.iter()
        .map(|b| -> R<Arc<VfioPciDevice>> {
            let mut d = VfioPciDevice::open(b.parse()?)?;
            d.bind(ioas.iommufd())?;
            d.attach(ioas)?;
            Ok(Arc::new(d))
        })
        .collect()
}

/// The guest's two dword writes of a 64-bit BAR address.
fn write_bar(map: &GuestBarMap, id: DeviceId, gpa: u64) -> R<()> {
    #[allow(clippy::cast_possible_truncation)]
    map.config_write(id, 0x18, &(gpa as u32).to_le_bytes())?;
    map.config_write(id, 0x1c, &((gpa >> 32) as u32).to_le_bytes())?;
    Ok(())
}

/// Runs the part.
pub fn run(opts: &Opts) -> R<()> {
    let small = ivshmem_with(64 << 10)?;
    let big = ivshmem_with(64 << 30)?;
    println!(
        "bench: vmm: {} ivshmem devices of 64 KiB, {} of 64 GiB",
        small.len(),
        big.len()
    );
    if small.len() < 64 || big.len() < 8 {
        return Err("the vmm part needs 64 ivshmem devices of 64 KiB and 8 of 64 GiB".into());
    }
    emit_meta("vmm_small_devices", &small.len().to_string());
    // The legacy path first: its device must not be open through its cdev.
    type1_cost(opts, &big[0])?;
    let iommufd = Iommufd::open()?;
    let ioas = iommufd.alloc_ioas()?;
    let smalls = open_all(&small[..64], &ioas)?;
    let bigs = open_all(&big[..8], &ioas)?;
    for n in [1usize, 8, 64] {
        trapped(opts, &iommufd, &ioas, &smalls[..n], n)?;
    }
    register(opts, &ioas, &smalls[..8], "64 KiB", 64 << 10)?;
    register(opts, &ioas, &bigs, "64 GiB", 64 << 30)?;
    Ok(())
}

/// Registers `devs` with `map`, each offering its BARs, BAR2 placed at
/// `LIB_GPA` plus 64 KiB per device and decode on: mapped, as a guest
/// leaves them.
fn register_offered(map: &GuestBarMap, devs: &[Arc<VfioPciDevice>]) -> R<Vec<DeviceId>> {
    let mut ids = Vec::with_capacity(devs.len());
    for (i, d) in devs.iter().enumerate() {
        let id = map.register(Arc::clone(d), Offer::AllMappable)?;
        map.place_bar(id, BAR, Some(LIB_GPA + 0x1_0000 * i as u64))?;
        map.config_write(id, COMMAND, &ON.to_le_bytes())?;
        ids.push(id);
    }
    Ok(ids)
}

/// The hand-written VMM's side of `dev`: its config region's offset, and
/// the first 64 KiB of BAR2 exported (the dma-buf's fd) and mapped at
/// `RAW_GPA`; returns (config offset, dma-buf fd, length).
fn raw_path(dev: &VfioPciDevice, iommufd: &Iommufd, ioas: &Ioas) -> R<(u64, i32, u64)> {
    let fd = dev.as_raw_fd();
    let (config, _) = raw::region_info(fd, uapi::VFIO_PCI_CONFIG_REGION_INDEX)?;
    let len = 64 << 10;
    let buf = raw::export(fd, BAR, 0, len)?;
    raw::map_file(iommufd.as_raw_fd(), ioas.id(), buf, 0, len, RAW_GPA)?;
    Ok((config, buf, len))
}

/// Table 1 for `n` offered BARs: the map and the raw path, interleaved.
fn trapped(
    opts: &Opts,
    iommufd: &Iommufd,
    ioas: &Ioas,
    devs: &[Arc<VfioPciDevice>],
    n: usize,
) -> R<()> {
    const OPS: [&str; 3] = ["decode_off", "decode_on", "move"];
    let map = GuestBarMap::new(ioas)?;
    let ids = register_offered(&map, devs)?;
    let (id, dev) = (ids[0], &devs[0]);
    let fd = dev.as_raw_fd();
    let (config, buf, len) = raw_path(dev, iommufd, ioas)?;
    let (ifd, ioas_id) = (iommufd.as_raw_fd(), ioas.id());
    let mut lib_at = LIB_GPA;
    let mut raw_at = RAW_GPA;
    let lib_round = |lib_at: &mut u64| -> R<[f64; 3]> {
        let t = Instant::now();
        map.config_write(id, COMMAND, &OFF.to_le_bytes())?;
        let off = ns_since(t);
        let t = Instant::now();
        map.config_write(id, COMMAND, &ON.to_le_bytes())?;
        let on = ns_since(t);
        let next = *lib_at ^ MOVE_STEP;
        let t = Instant::now();
        write_bar(&map, id, next)?;
        let mv = ns_since(t);
        *lib_at = next;
        Ok([off, on, mv])
    };
    let raw_round = |raw_at: &mut u64| -> R<[f64; 3]> {
        let t = Instant::now();
        raw::set_command(fd, config, OFF)?;
        let off = ns_since(t);
        let t = Instant::now();
        raw::set_command(fd, config, ON)?;
        raw::unmap(ifd, ioas_id, *raw_at, len)?;
        raw::map_file(ifd, ioas_id, buf, 0, len, *raw_at)?;
        let on = ns_since(t);
        let next = *raw_at ^ MOVE_STEP;
        let t = Instant::now();
        raw::unmap(ifd, ioas_id, *raw_at, len)?;
        raw::map_file(ifd, ioas_id, buf, 0, len, next)?;
        let mv = ns_since(t);
        *raw_at = next;
        Ok([off, on, mv])
    };
    // Warm both paths up, then alternate which goes first.
    lib_round(&mut lib_at)?;
    raw_round(&mut raw_at)?;
    let (mut lib, mut rawv): (Vec<[f64; 3]>, Vec<[f64; 3]>) = (Vec::new(), Vec::new());
    opts.budget(9, 101, 20.0).repeat(|k| -> R<()> {
        if k % 2 == 0 {
            lib.push(lib_round(&mut lib_at)?);
            rawv.push(raw_round(&mut raw_at)?);
        } else {
            rawv.push(raw_round(&mut raw_at)?);
            lib.push(lib_round(&mut lib_at)?);
        }
        Ok(())
    })?;
    let mut line = format!("bench: vmm trapped writes, {n:2} offered BARs:");
    for (i, op) in OPS.iter().enumerate() {
        let l: Vec<f64> = lib.iter().map(|r| r[i]).collect();
        let r: Vec<f64> = rawv.iter().map(|r| r[i]).collect();
        let ratio: Vec<f64> = l.iter().zip(&r).map(|(a, b)| a / b).collect();
        emit("vmm_trap", "library", op, n as u64, "ns", &Stats::of(&l));
        emit("vmm_trap", "raw", op, n as u64, "ns", &Stats::of(&r));
        emit(
            "vmm_trap",
            "ratio",
            op,
            n as u64,
            "ratio",
            &Stats::of(&ratio),
        );
        line.push_str(&format!(
            " {op} {:.0} / {:.0} ({:.4})",
            Stats::of(&l).median,
            Stats::of(&r).median,
            Stats::of(&ratio).median
        ));
    }
    println!("{line} (n={})", lib.len());
    if n == 1 {
        profile(opts, &map, id, dev)?;
    }
    raw::unmap(ifd, ioas_id, raw_at, len)?;
    raw::close(buf)?;
    drop(map);
    Ok(())
}

/// Where the map's instructions go, step by step (no syscall in any):
/// a trapped write the map leaves to the VMM (its lock, the device's lookup,
/// the hub check, the classification), a status query, the device hub's
/// revoke and restore with no attachment, and a mutex taken and released.
fn profile(opts: &Opts, map: &GuestBarMap, id: DeviceId, dev: &VfioPciDevice) -> R<()> {
    use dmabuf_p2p::revoke::RevokeReason;
    let hub = dev.hub();
    let m = std::sync::Mutex::new(0u64);
    let mut steps: Vec<(&str, crate::Step<'_>)> = vec![
        (
            "not_mine_write",
            Box::new(|| {
                map.config_write(id, 0x3c, &[0x0b])?;
                Ok(())
            }),
        ),
        (
            "bar_status",
            Box::new(|| {
                std::hint::black_box(map.bar_status(id, BAR)?);
                Ok(())
            }),
        ),
        (
            "hub_revoke_restore",
            Box::new(|| {
                hub.revoked_by_kernel(RevokeReason::MemoryDecodeOff);
                hub.restore();
                Ok(())
            }),
        ),
        (
            "mutex",
            Box::new(|| {
                *m.lock().map_err(|_| "poisoned")? += 1;
                Ok(())
            }),
        ),
    ];
    for (name, f) in &mut steps {
        f()?;
        let mut v = Vec::new();
        opts.budget(50, 201, 2.0).repeat(|_| -> R<()> {
            let t = Instant::now();
            f()?;
            v.push(ns_since(t));
            Ok(())
        })?;
        let s = Stats::of(&v);
        emit("vmm_profile", "step", name, 0, "ns", &s);
        println!("bench: vmm profile {name:20} {:.0}", s.median);
    }
    let t = Instant::now();
    let empty = ns_since(t);
    emit_meta("vmm_clock_pair", &format!("{empty:.0}"));
    Ok(())
}

/// Table 2: registering `devs` (8), placing and mapping their BAR2s.
fn register(
    opts: &Opts,
    ioas: &Ioas,
    devs: &[Arc<VfioPciDevice>],
    label: &str,
    size: u64,
) -> R<()> {
    let once = || -> R<f64> {
        let t = Instant::now();
        let map = GuestBarMap::new(ioas)?;
        for (i, d) in devs.iter().enumerate() {
            let id = map.register(Arc::clone(d), Offer::AllMappable)?;
            map.place_bar(id, BAR, Some(LIB_GPA + size.max(1 << 30) * i as u64))?;
            map.config_write(id, COMMAND, &ON.to_le_bytes())?;
        }
        let ns = ns_since(t);
        let mapped = map
            .report()
            .iter()
            .filter(|r| matches!(r.status, dmabuf_p2p::vmm::BarStatus::Mapped { .. }))
            .count();
        if mapped != devs.len() {
            return Err(
                format!("{mapped} of {} BARs mapped: {:?}", devs.len(), map.report()).into(),
            );
        }
        Ok(ns)
    };
    once()?;
    let mut v = Vec::new();
    opts.budget(5, 21, 20.0).repeat(|_| -> R<()> {
        v.push(once()?);
        Ok(())
    })?;
    let s = Stats::of(&v);
    emit("vmm_register", "library", "register_map", size, "ns", &s);
    println!(
        "bench: vmm registration of {} devices with {label} BARs, mapped: {:.0} (n={})",
        devs.len(),
        s.median,
        s.n
    );
    Ok(())
}

/// The legacy type1 map of `size` bytes of the BAR of `bdf`, at a few sizes:
/// the cost per byte the projection uses.
fn type1_cost(opts: &Opts, bdf: &str) -> R<()> {
    let group = iommu_group(bdf)?;
    let t1 = raw::Type1::open(group, bdf, BAR)?;
    for size in [1u64 << 20, 16 << 20, 64 << 20] {
        t1.map(LIB_GPA, size)?;
        t1.unmap(LIB_GPA, size)?;
        let mut v = Vec::new();
        opts.budget(3, 5, 10.0).repeat(|_| -> R<()> {
            let t = Instant::now();
            t1.map(LIB_GPA, size)?;
            v.push(ns_since(t));
            t1.unmap(LIB_GPA, size)?;
            Ok(())
        })?;
        let s = Stats::of(&v);
        emit("vmm_register", "type1", "map", size, "ns", &s);
        println!(
            "bench: vmm legacy type1 map of {} MiB: {:.0}",
            size >> 20,
            s.median
        );
    }
    Ok(())
}

/// Part `vmm_trace` (only when asked, in the vmm VM; for strace or
/// callgrind): one device's trapped writes through the map and by hand,
/// each kind in a function of its own, between marks (`write(-1, label)`).
pub fn trace(rounds: usize, offered: usize) -> R<()> {
    let small = ivshmem_with(64 << 10)?;
    if small.len() < offered.max(1) {
        return Err(format!("vmm_trace needs {offered} ivshmem devices of 64 KiB").into());
    }
    let iommufd = Iommufd::open()?;
    let ioas = iommufd.alloc_ioas()?;
    let devs = open_all(&small[..offered.max(1)], &ioas)?;
    let dev = &devs[0];
    let map = GuestBarMap::new(&ioas)?;
    // As the trapped-writes table places them.
    let id = register_offered(&map, &devs)?[0];
    let fd = dev.as_raw_fd();
    let (config, buf, len) = raw_path(dev, &iommufd, &ioas)?;
    let (ifd, ioas_id) = (iommufd.as_raw_fd(), ioas.id());
    let mark = |label: &str| {
        // SAFETY: writes from a valid buffer to an invalid fd (fails, EBADF).
        unsafe { libc::write(-1, label.as_ptr().cast(), label.len()) };
    };
    let (mut lib_at, mut raw_at) = (LIB_GPA, RAW_GPA);
    for _ in 0..rounds {
        mark("library decode off");
        lib_decode_off(&map, id)?;
        mark("library decode on");
        lib_decode_on(&map, id)?;
        mark("library move");
        lib_at = lib_move(&map, id, lib_at)?;
        mark("raw decode off");
        raw_decode_off(fd, config)?;
        mark("raw decode on");
        raw_decode_on(fd, config, ifd, ioas_id, buf, raw_at)?;
        mark("raw move");
        raw_at = raw_move(ifd, ioas_id, buf, raw_at)?;
        mark("end");
    }
    raw::unmap(ifd, ioas_id, raw_at, len)?;
    raw::close(buf)?;
    println!("bench: vmm_trace: {rounds} rounds, {offered} offered BARs");
    Ok(())
}

#[inline(never)]
fn lib_decode_off(map: &GuestBarMap, id: DeviceId) -> R<()> {
    map.config_write(id, COMMAND, &OFF.to_le_bytes())?;
    Ok(())
}

#[inline(never)]
fn lib_decode_on(map: &GuestBarMap, id: DeviceId) -> R<()> {
    map.config_write(id, COMMAND, &ON.to_le_bytes())?;
    Ok(())
}

#[inline(never)]
fn lib_move(map: &GuestBarMap, id: DeviceId, at: u64) -> R<u64> {
    let next = at ^ MOVE_STEP;
    write_bar(map, id, next)?;
    Ok(next)
}

#[inline(never)]
fn raw_decode_off(fd: i32, config: u64) -> R<()> {
    raw::set_command(fd, config, OFF)?;
    Ok(())
}

#[inline(never)]
fn raw_decode_on(fd: i32, config: u64, ifd: i32, ioas: u32, buf: i32, at: u64) -> R<()> {
    raw::set_command(fd, config, ON)?;
    raw::unmap(ifd, ioas, at, 64 << 10)?;
    raw::map_file(ifd, ioas, buf, 0, 64 << 10, at)?;
    Ok(())
}

#[inline(never)]
fn raw_move(ifd: i32, ioas: u32, buf: i32, at: u64) -> R<u64> {
    let next = at ^ MOVE_STEP;
    raw::unmap(ifd, ioas, at, 64 << 10)?;
    raw::map_file(ifd, ioas, buf, 0, 64 << 10, next)?;
    Ok(next)
}
