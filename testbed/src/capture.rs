//! `cargo xtask capture-config-writes [--held-out]`: records the
//! config-space writes the test VM's own Linux kernel makes to its edu,
//! ivshmem and NVMe functions, as fixtures for the `GuestBarMap` replay tests
//! (`vm-tests/fixtures/config-writes/`).
//!
//! The VM is the standard one plus two empty hot-plug root ports (functions
//! 2 and 3 of slot 0x1e, after the NVMe ports, so no other device moves),
//! started with QEMU's trace events `pci_cfg_write` (device, offset, value)
//! and `memory_region_ops_write` (the size of the ECAM or port access each
//! config write comes from). The guest job marks phases by writing a marker
//! byte to the host bridge's interrupt-line register (`0000:00:00.0`,
//! 0x3c), which the converter finds in the trace:
//!
//! 1. `boot`: the firmware's and the kernel's enumeration, up to userspace;
//! 2. `enable`: `echo 1 > /sys/bus/pci/devices/*/enable` for the functions
//!    (the kernel's `pci_enable_device`: memory decode on);
//! 3. `hotplug`: QMP `device_add` of devices into the empty ports, which
//!    the kernel's pciehp enumerates and assigns BARs to, then enabled;
//! 4. `reset`: `echo 1 > .../reset` of one ivshmem (save, reset, restore).
//!
//! `--held-out` makes the sequence the development never used: the kernel
//! boots with `pci=realloc=on`, and the hot-plug adds other devices in the
//! other order. Each run writes `<name>.txt` with a header saying how it
//! was made.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use crate::suite::{self, RunSpec};
use crate::{Error, Result, workspace_root};

/// Where the fixtures go, relative to the workspace root.
pub const FIXTURES: &str = "vm-tests/fixtures/config-writes";

/// One device hot-plugged by the capture job, and the standard VM device it
/// replays on (same type and BAR sizes).
struct Plug {
    id: &'static str,
    port: &'static str,
    /// `device_add` arguments besides id and bus.
    device: &'static str,
    /// A memory backend to add first (ivshmem), its size in bytes.
    backend: Option<u64>,
    replay_on: &'static str,
}

/// The capture variants.
struct Variant {
    name: &'static str,
    about: &'static str,
    cmdline: &'static str,
    plugs: [Plug; 2],
}

const PRIMARY: Variant = Variant {
    name: "linux-7.2-q35",
    about: "the standard boot; hot-plug of a 1 MiB ivshmem-plain (port hp0) then an edu (port hp1)",
    cmdline: "",
    plugs: [
        Plug {
            id: "hpshm",
            port: "hp0",
            device: "ivshmem-plain",
            backend: Some(1 << 20),
            replay_on: "shm0",
        },
        Plug {
            id: "hpedu",
            port: "hp1",
            device: "edu,dma_mask=0xffffffffffffffff",
            backend: None,
            replay_on: "edu0",
        },
    ],
};

const HELD_OUT: Variant = Variant {
    name: "held-out-realloc",
    about: "boot with pci=realloc=on; hot-plug of an edu (port hp0) then a 64 KiB ivshmem-plain \
            (port hp1): never used while the GuestBarMap was developed",
    cmdline: "pci=realloc=on",
    plugs: [
        Plug {
            id: "hpedu",
            port: "hp0",
            device: "edu,dma_mask=0xffffffffffffffff",
            backend: None,
            replay_on: "edu0",
        },
        Plug {
            id: "hpshm",
            port: "hp1",
            device: "ivshmem-plain",
            backend: Some(64 << 10),
            replay_on: "shm2",
        },
    ],
};

/// The marker values of the phases (written to the host bridge's 0x3c; the
/// job writes them in octal: 0241 is 0xa1).
const PHASES: [(u8, &str); 4] = [
    (0xa1, "enable"),
    (0xa2, "hotplug"),
    (0xa3, "reset"),
    (0xa4, "end"),
];

/// `cargo xtask capture-config-writes [--held-out]`.
pub fn xtask(args: &[String]) -> Result<bool> {
    let variant = if args.iter().any(|a| a == "--held-out") {
        &HELD_OUT
    } else {
        &PRIMARY
    };
    crate::deps::ensure_vm_tools()?;
    let bins = suite::build_guest_binaries(false)?;
    let name = format!("capture-{}", variant.name);
    let run_dir = workspace_root().join("target/testbed").join(&name);
    let trace = run_dir.join("trace.log");
    let _ = fs::remove_file(&trace);
    let mut spec = RunSpec::new(&name, job(variant, &run_dir), false);
    spec.stream = true;
    let verdict = suite::run(&spec, &bins, |c| {
        for (i, port) in ["hp0", "hp1"].iter().enumerate() {
            let chassis = 0x50 + i;
            c.extra_qemu_args.push("-device".into());
            c.extra_qemu_args.push(format!(
                "pcie-root-port,id={port},bus=pcie.0,chassis={chassis},slot={chassis},addr=0x1e.{}",
                i + 2
            ));
        }
        for ev in ["pci_cfg_write", "memory_region_ops_write"] {
            c.extra_qemu_args.push("-trace".into());
            c.extra_qemu_args.push(ev.into());
        }
        c.extra_qemu_args.push("-D".into());
        c.extra_qemu_args.push(trace.display().to_string());
        c.extra_cmdline = variant.cmdline.to_owned();
    })?;
    if !verdict.passed() {
        suite::print_verdict(&name, &verdict);
        return Ok(false);
    }
    let text = fs::read_to_string(&trace)
        .map_err(|e| Error::io(format!("reading {}", trace.display()), e))?;
    // The kernel the guest booted, from its own banner.
    let console = fs::read_to_string(run_dir.join("console.log")).unwrap_or_default();
    let kernel = console
        .split("Linux version ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("unknown")
        .to_owned();
    let qemu = crate::qemu_binary::QemuBinary::resolve()?.version();
    let fixture = convert(&text, variant, &kernel, &qemu)?;
    let dest = workspace_root()
        .join(FIXTURES)
        .join(format!("{}.txt", variant.name));
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    fs::write(&dest, fixture).map_err(|e| Error::io(format!("writing {}", dest.display()), e))?;
    println!("capture: wrote {}", dest.display());
    Ok(true)
}

/// The guest job: marker, phase, marker, ...
fn job(v: &Variant, run_dir: &Path) -> String {
    let mut j = String::from(
        "set -e\n\
         mark() { printf \"\\\\$1\" | dd of=/sys/bus/pci/devices/0000:00:00.0/config bs=1 seek=60 count=1 conv=notrunc 2>/dev/null; }\n\
         qmp() { echo \"@@qmp $1\"; read -r reply; case \"$reply\" in *error*) echo \"capture: $reply\"; exit 1;; esac; }\n\
         # The functions to follow: edu, ivshmem, NVMe. The standard VM's are\n\
         # on buses 1..0x10, the hot-plug ports' on 0x11 and 0x12; no sysfs\n\
         # directory is listed (kernel lock order, see docs/TESTBED.md).\n\
         list() { : > /tmp/functions; for b in 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f 10 11 12; do p=/sys/bus/pci/devices/0000:$b:00.0; [ -e $p/vendor ] || continue; case \"$(cat $p/vendor):$(cat $p/device):$(cat $p/class)\" in 0x1234:0x11e8:*|0x1af4:0x1110:*|*:0x010802) echo 0000:$b:00.0 >> /tmp/functions;; esac; done; }\n\
         # `enable` refuses a device with a driver (EBUSY): unbind vfio-pci first.\n\
         enable_all() { for d in $(cat /tmp/functions); do p=/sys/bus/pci/devices/$d; [ -e $p/driver ] && echo $d > $p/driver/unbind; echo 1 > $p/enable; done; }\n\
         list\n",
    );
    let _ = writeln!(j, "mark 241\nenable_all");
    let _ = writeln!(j, "mark 242");
    for p in &v.plugs {
        if let Some(size) = p.backend {
            let path = run_dir.join(format!("{}.mem", p.id));
            let _ = writeln!(
                j,
                "qmp '{{\"execute\":\"object-add\",\"arguments\":{{\"qom-type\":\"memory-backend-file\",\"id\":\"mem-{}\",\"mem-path\":\"{}\",\"size\":{size},\"share\":true}}}}'",
                p.id,
                path.display()
            );
        }
        let (driver, props) = p.device.split_once(',').unwrap_or((p.device, ""));
        let mut args = format!(
            "\"driver\":\"{driver}\",\"id\":\"{}\",\"bus\":\"{}\"",
            p.id, p.port
        );
        for kv in props.split(',').filter(|s| !s.is_empty()) {
            if let Some((k, val)) = kv.split_once('=') {
                let _ = write!(args, ",\"{k}\":\"{val}\"");
            }
        }
        if p.backend.is_some() {
            let _ = write!(args, ",\"memdev\":\"mem-{}\"", p.id);
        }
        let _ = writeln!(
            j,
            "qmp '{{\"execute\":\"device_add\",\"arguments\":{{{args}}}}}'"
        );
        // pciehp enumerates after the slot's attention: wait for the count to grow.
        let _ = writeln!(
            j,
            "n=$(wc -l < /tmp/functions); i=0; while list; [ $(wc -l < /tmp/functions) -le $n ]; do i=$((i+1)); [ $i -lt 300 ] || {{ echo 'capture: {} never appeared'; exit 1; }}; sleep 0.1; done",
            p.id
        );
    }
    let _ = writeln!(j, "enable_all");
    let _ = writeln!(
        j,
        "mark 243\necho 1 > /sys/bus/pci/devices/0000:02:00.0/reset\nmark 244\necho capture: done"
    );
    j
}

/// One config write found in the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Write {
    name: String,
    bdf: String,
    offset: u32,
    size: u32,
    value: u32,
}

/// `pci_cfg_write <name> <bus>:<slot>.<func> @0x<off> <- 0x<val>` (QEMU
/// 7.2's format, all in hex).
fn parse_cfg_write(line: &str) -> Option<(String, String, u32, u32)> {
    let rest = &line[line.find("pci_cfg_write ")? + "pci_cfg_write ".len()..];
    let mut w = rest.split_whitespace();
    let name = w.next()?.to_owned();
    let addr = w.next()?;
    let off = w.next()?.strip_prefix("@0x")?;
    let _arrow = w.next()?;
    let val = w.next()?.strip_prefix("0x")?;
    let (bus, rest) = addr.split_once(':')?;
    let (slot, func) = rest.split_once('.')?;
    let bus = u8::from_str_radix(bus, 16).ok()?;
    let slot = u8::from_str_radix(slot, 16).ok()?;
    let func = u8::from_str_radix(func, 16).ok()?;
    let bdf = format!("0000:{bus:02x}:{slot:02x}.{func}");
    Some((
        name,
        bdf,
        u32::from_str_radix(off, 16).ok()?,
        u32::from_str_radix(val, 16).ok()?,
    ))
}

/// The size of a `memory_region_ops_write` to the config space (ECAM or
/// port 0xcfc), if the line is one.
fn parse_access_size(line: &str) -> Option<u32> {
    let rest = &line[line.find("memory_region_ops_write ")?..];
    let name = rest.split("name '").nth(1)?.split('\'').next()?;
    if name != "pcie-mmcfg-mmio" && name != "pci-conf-data" {
        return None;
    }
    rest.split(" size ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The fixture text from a trace.
fn convert(trace: &str, v: &Variant, kernel: &str, qemu: &str) -> Result<String> {
    let mut size = None;
    let mut phases: Vec<(&str, Vec<Write>)> = vec![("boot", Vec::new())];
    let mut devices: Vec<(String, String)> = Vec::new();
    for line in trace.lines() {
        if let Some(s) = parse_access_size(line) {
            size = Some(s);
            continue;
        }
        let Some((name, bdf, offset, value)) = parse_cfg_write(line) else {
            continue;
        };
        let Some(size) = size.take() else {
            return Err(Error::Setup(format!(
                "capture: a config write without the access before it: {line}"
            )));
        };
        if bdf == "0000:00:00.0" && offset == 0x3c && size == 1 {
            if let Some((_, phase)) = PHASES.iter().find(|(m, _)| u32::from(*m) == value) {
                phases.push((phase, Vec::new()));
            }
            continue;
        }
        if !matches!(name.as_str(), "edu" | "ivshmem-plain" | "nvme") {
            continue;
        }
        if !devices.iter().any(|(b, _)| *b == bdf) {
            devices.push((bdf.clone(), name.clone()));
        }
        if let Some((_, writes)) = phases.last_mut() {
            writes.push(Write {
                name,
                bdf,
                offset,
                size,
                value,
            });
        }
    }
    let found: Vec<&str> = phases.iter().map(|(p, _)| *p).collect();
    if found != ["boot", "enable", "hotplug", "reset", "end"] {
        return Err(Error::Setup(format!(
            "capture: phase markers missing from the trace (found {found:?})"
        )));
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Config-space writes of the test VM's own Linux kernel (Linux {kernel}), one line per\n\
         # write to an edu, ivshmem-plain or NVMe function: `w <bdf> <offset> <size> <value>`.\n\
         # Made by `cargo xtask capture-config-writes{}` ({}, TCG): {}.\n\
         # QEMU's trace events pci_cfg_write (device, offset, value) and\n\
         # memory_region_ops_write (the size of the ECAM or 0xcfc access each one\n\
         # came from); phases split by the capture job's marker writes to\n\
         # 0000:00:00.0 @0x3c (testbed/src/capture.rs). `boot` includes the\n\
         # firmware's (SeaBIOS) writes before the kernel's.\n\
         # `device <bdf> <qemu type> <bdf in the standard test VM it replays on>`.",
        if v.name == HELD_OUT.name {
            " --held-out"
        } else {
            ""
        },
        qemu,
        v.about
    );
    for (bdf, name) in &devices {
        let plug = plugged(v, bdf);
        let on = match plug {
            Some(p) => format!("@{}", p.replay_on),
            None => bdf.clone(),
        };
        let _ = writeln!(out, "device {bdf} {name} {on}");
    }
    for (phase, writes) in &phases {
        if *phase == "end" {
            continue;
        }
        let _ = writeln!(out, "phase {phase}");
        for w in writes {
            let _ = writeln!(
                out,
                "w {} {:#04x} {} {:#x}",
                w.bdf, w.offset, w.size, w.value
            );
        }
    }
    Ok(out)
}

/// The hot-plugged device at `bdf`: the ports' buses follow every standard
/// device's (17 and 18 in the standard VM).
fn plugged<'v>(v: &'v Variant, bdf: &str) -> Option<&'v Plug> {
    match bdf {
        "0000:11:00.0" => Some(&v.plugs[0]),
        "0000:12:00.0" => Some(&v.plugs[1]),
        _ => None,
    }
}

/// The fixtures' directory.
pub fn fixtures_dir() -> PathBuf {
    workspace_root().join(FIXTURES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines_parse() {
        let w = "pci_cfg_write ivshmem-plain 02:00.0 @0x18 <- 0xc000000c";
        assert_eq!(
            parse_cfg_write(w),
            Some((
                "ivshmem-plain".into(),
                "0000:02:00.0".into(),
                0x18,
                0xc000_000c
            ))
        );
        let a = "12@1.2:memory_region_ops_write cpu 0 mr 0x5 addr 0x200018 value 0xc000000c size 4 name 'pcie-mmcfg-mmio'";
        assert_eq!(parse_access_size(a), Some(4));
        let other =
            "memory_region_ops_write cpu 0 mr 0x5 addr 0x3f8 value 0x41 size 1 name 'serial'";
        assert_eq!(parse_access_size(other), None);
    }
}
