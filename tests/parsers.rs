//! Host tests for every text parser: PCI addresses, byte ranges
//! and sizes, sysfs `resource` files and a fake sysfs tree, and fdinfo.

// Failing a test by panicking is what tests do.
#![allow(clippy::panic)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use dmabuf_p2p::fdinfo::FdInfo;
use dmabuf_p2p::pci::{PciAddress, parse_resources};
use dmabuf_p2p::range::{PhysRange, parse_size, validate_export_ranges};
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p::{ByteRange, Error, RangeProblem};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Asserts that `r` is `Error::Parse` for `what`, and that both the error's
/// input field and its message contain `needle` (the input or a part of it).
#[track_caller]
fn assert_parse_err<T: std::fmt::Debug>(r: Result<T, Error>, what: &str, needle: &str) {
    match r {
        Err(e @ Error::Parse { .. }) => {
            let msg = e.to_string();
            let Error::Parse { what: w, input, .. } = e else {
                unreachable!()
            };
            assert_eq!(w, what, "wrong `what` in {msg}");
            assert!(
                input.contains(needle),
                "input {input:?} does not contain {needle:?}"
            );
            // The message shows the input Debug-quoted.
            let quoted = format!("{needle:?}");
            let quoted = &quoted[1..quoted.len() - 1];
            assert!(
                msg.contains(quoted),
                "message {msg:?} does not name {needle:?}"
            );
        }
        other => panic!("expected Error::Parse for {what}, got {other:?}"),
    }
}

// ---------------------------------------------------------------- PciAddress

#[test]
fn pci_address_good() -> TestResult {
    let cases = [
        ("0000:00:04.0", (0, 0, 4, 0), "0000:00:04.0"),
        ("00:04.0", (0, 0, 4, 0), "0000:00:04.0"),
        ("0000:3b:1f.7", (0, 0x3b, 0x1f, 7), "0000:3b:1f.7"),
        ("0000:3B:1F.7", (0, 0x3b, 0x1f, 7), "0000:3b:1f.7"),
        ("10000:e1:00.1", (0x10000, 0xe1, 0, 1), "10000:e1:00.1"),
        (
            "ffffffff:ff:1f.7",
            (0xffff_ffff, 0xff, 0x1f, 7),
            "ffffffff:ff:1f.7",
        ),
        ("ff:00.3", (0, 0xff, 0, 3), "0000:ff:00.3"),
    ];
    for (text, (d, b, s, f), shown) in cases {
        let a: PciAddress = text.parse()?;
        assert_eq!(
            (a.domain(), a.bus(), a.device(), a.function()),
            (d, b, s, f),
            "{text}"
        );
        assert_eq!(a.to_string(), shown);
        assert_eq!(shown.parse::<PciAddress>()?, a);
        assert_eq!(PciAddress::new(d, b, s, f)?, a);
    }
    Ok(())
}

#[test]
fn pci_address_bad() {
    let cases = [
        "",
        ":",
        "0000:00:04",
        "00:04",
        "0000:00:04.",
        "0000:00:04.8",
        "0000:00:20.0",
        "0000:00:ff.0",
        "000:00:04.0",
        "123456789:00:04.0",
        "0000:000:04.0",
        "0000:0:04.0",
        "0000:00:4.0",
        "0000:00:04.00",
        "0000:00:04.0 ",
        " 0000:00:04.0",
        "0000:00:04:0",
        "0000:00:04.0.1",
        "0000:00:00:04.0",
        "0000:+1:04.0",
        "0000:-1:04.0",
        "0000:00:+4.0",
        "0000:00:04.+",
        "g000:00:04.0",
        "0000:0g:04.0",
        "0x00:00:04.0",
        "０000:00:04.0",
        "0000:00:04.é",
        "0000:ü:04.0",
        "日本:00:04.0",
        "🦀",
    ];
    for text in cases {
        assert_parse_err(text.parse::<PciAddress>(), "PCI address", text);
    }
}

#[test]
fn pci_address_new_checks_ranges() {
    assert!(matches!(
        PciAddress::new(0, 0, 32, 0),
        Err(Error::Parse { .. })
    ));
    assert!(matches!(
        PciAddress::new(0, 0, 0, 8),
        Err(Error::Parse { .. })
    ));
}

#[cfg(feature = "serde")]
#[test]
fn pci_address_serde_is_a_string() -> TestResult {
    let a: PciAddress = "00:04.0".parse()?;
    let json = serde_json::to_string(&a)?;
    assert_eq!(json, "\"0000:00:04.0\"");
    assert_eq!(serde_json::from_str::<PciAddress>(&json)?, a);
    assert!(serde_json::from_str::<PciAddress>("\"00:40.0\"").is_err());
    Ok(())
}

#[test]
fn pci_address_orders_by_parts() -> TestResult {
    let a: PciAddress = "0000:00:1f.0".parse()?;
    let b: PciAddress = "0000:01:00.0".parse()?;
    let c: PciAddress = "0001:00:00.0".parse()?;
    assert!(a < b && b < c);
    Ok(())
}

// ---------------------------------------------------------------- ByteRange

#[test]
fn byte_range_good() -> TestResult {
    let cases = [
        ("0x1000+0x2000", 0x1000, 0x2000),
        ("0X1000+0XfF", 0x1000, 0xff),
        ("4096+8192", 4096, 8192),
        ("0+4K", 0, 4096),
        ("4k+2m", 4096, 2 << 20),
        ("1G+1GiB", 1 << 30, 1 << 30),
        ("0x1M+0x2K", 0x10_0000, 0x800),
        (" 0+1 ", 0, 1),
        ("0+0", 0, 0),
        ("0xffffffffffffffff+0xffffffffffffffff", u64::MAX, u64::MAX),
        ("18446744073709551615+0", u64::MAX, 0),
        ("16777215T+0", 16_777_215 << 40, 0),
    ];
    for (text, offset, length) in cases {
        assert_eq!(
            text.parse::<ByteRange>()?,
            ByteRange::new(offset, length),
            "{text}"
        );
    }
    Ok(())
}

#[test]
fn byte_range_bad() {
    let cases = [
        "",
        "+",
        "0x1000",
        "0x1000-0x2000",
        "+0x1000",
        "0x1000+",
        "0x+1",
        "0x1000++1",
        "1+2+3",
        "-1+1",
        "0x10000000000000000+0",
        "18446744073709551616+0",
        "16777216T+0",
        "4X+1",
        "4KB+1",
        "4 K+1",
        "1.5M+1",
        "0b101+1",
        "ab+1",
        "١٢+1",
        "1+２",
        "K+1",
    ];
    for text in cases {
        assert_parse_err(text.parse::<ByteRange>(), "byte range", text);
    }
}

#[test]
fn parse_size_good_and_bad() -> TestResult {
    assert_eq!(parse_size("0")?, 0);
    assert_eq!(parse_size("64M")?, 64 << 20);
    assert_eq!(parse_size("0x40000")?, 0x40000);
    assert_eq!(parse_size("2MiB")?, 2 << 20);
    for bad in ["", "M", "iB", "2iB", "0x", "-4K", "4Ki", "1e6", "十"] {
        assert_parse_err(parse_size(bad), "size", bad);
    }
    Ok(())
}

#[test]
fn long_inputs_are_shortened_in_errors() {
    let long = "x".repeat(10_000);
    match long.parse::<ByteRange>() {
        Err(Error::Parse { input, .. }) => assert!(input.chars().count() <= 81, "{}", input.len()),
        other => panic!("{other:?}"),
    }
}

// ------------------------------------------------- range validation messages

#[test]
fn export_range_errors_name_target_and_range() {
    let bar = 0x10_0000;
    let page = 0x1000;
    let cases: [(&[ByteRange], ByteRange, RangeProblem); 5] = [
        (
            &[],
            ByteRange::new(0, 0),
            RangeProblem::Count("no ranges given".into()),
        ),
        (
            &[ByteRange::new(0, 0)],
            ByteRange::new(0, 0),
            RangeProblem::Empty,
        ),
        (
            &[ByteRange::new(0, page), ByteRange::new(0x800, page)],
            ByteRange::new(0x800, page),
            RangeProblem::Unaligned { align: page },
        ),
        (
            &[ByteRange::new(0xf_f000, 0x2000)],
            ByteRange::new(0xf_f000, 0x2000),
            RangeProblem::OutOfBounds {
                end: 0x10_1000,
                size: bar,
            },
        ),
        (
            &[ByteRange::new(u64::MAX - 0xfff, 0x1000)],
            ByteRange::new(u64::MAX - 0xfff, 0x1000),
            RangeProblem::Overflow,
        ),
    ];
    for (ranges, want_range, want_problem) in cases {
        match validate_export_ranges("0000:00:04.0 BAR2", ranges, bar, page) {
            Err(e @ Error::InvalidRange { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("0000:00:04.0 BAR2"), "{msg}");
                assert!(msg.contains(&want_range.to_string()), "{msg}");
                let Error::InvalidRange { range, problem, .. } = e else {
                    unreachable!()
                };
                assert_eq!((range, problem), (want_range, want_problem));
            }
            other => panic!("{ranges:?}: {other:?}"),
        }
    }
    // Overlapping and repeated ranges are allowed; the total is their sum.
    let ranges = [
        ByteRange::new(0, 0x8_0000),
        ByteRange::new(0x8_0000, 0x8_0000),
        ByteRange::new(0, 0x3000),
    ];
    assert_eq!(
        validate_export_ranges("bar", &ranges, bar, page).ok(),
        Some(0x10_3000)
    );
}

#[test]
fn export_total_limits() {
    let huge = 1u64 << 62;
    let bar = !0xfff_u64;
    let ranges = [ByteRange::new(0, huge), ByteRange::new(0, huge)];
    match validate_export_ranges("bar", &ranges, bar, 0x1000) {
        Err(Error::InvalidRange {
            range,
            problem: RangeProblem::TotalTooLarge { total },
            ..
        }) => {
            assert_eq!((range, total), (ranges[1], 1 << 63));
        }
        other => panic!("{other:?}"),
    }
    // Just below the limit is fine.
    let ok = [ByteRange::new(0, huge), ByteRange::new(0, huge - 0x1000)];
    assert_eq!(
        validate_export_ranges("bar", &ok, bar, 0x1000).ok(),
        Some((1 << 63) - 0x1000)
    );
}

#[test]
fn phys_range_display() {
    assert_eq!(
        PhysRange::new(0xfe00_0000, 0x1000).to_string(),
        "0xfe000000..0xfe001000"
    );
    assert_eq!(
        PhysRange::new(u64::MAX, 1).to_string(),
        "0xffffffffffffffff..0x10000000000000000"
    );
}

// ---------------------------------------------------------------- resource

const RESOURCE: &str = "\
0x00000000fea00000 0x00000000fea000ff 0x0000000000040200
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000800000000 0x00000008000fffff 0x000000000014220c
0x000000000000c000 0x000000000000c01f 0x0000000000040101
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x00000000fe800000 0x00000000fe83ffff 0x0000000000046200
";

#[test]
fn resource_good() -> TestResult {
    let r = parse_resources(RESOURCE)?;
    assert_eq!(r.len(), 7);
    assert_eq!((r[0].index, r[0].start, r[0].size), (0, 0xfea0_0000, 0x100));
    assert!(r[0].is_mem() && !r[0].is_mem64() && !r[0].is_prefetch() && !r[0].is_io());
    assert!(r[1].is_unused() && !r[1].is_mem());
    assert_eq!((r[2].start, r[2].size), (0x8_0000_0000, 0x10_0000));
    assert!(r[2].is_mem() && r[2].is_mem64() && r[2].is_prefetch());
    assert!(r[3].is_io() && !r[3].is_mem());
    assert_eq!(r[3].size, 0x20);
    assert_eq!(r[6].index, 6);
    assert_eq!(
        r[2].to_string(),
        "[2] mem64 prefetchable at 0x800000000 size 0x100000"
    );
    assert_eq!(r[1].to_string(), "[1] unused");
    assert_eq!(r[2].as_range(), ByteRange::new(0, 0x10_0000));
    // Blank lines are skipped, CRLF and extra spacing tolerated.
    let r = parse_resources("\n0x0 0x0 0x0\r\n  0x1000   0x1fff 0x200\n")?;
    assert_eq!(r.len(), 2);
    assert_eq!(r[1].size, 0x1000);
    assert!(parse_resources("")?.is_empty());
    Ok(())
}

#[test]
fn resource_bad() {
    let cases = [
        "0x0 0x0",
        "0x0 0x0 0x0 0x0",
        "0 0 0",
        "0x1000 0x0fff 0x200",
        "0x0 0xffffffffffffffff 0x200",
        "0xg 0x0 0x0",
        "0x0 0x0 0x+1",
        "0x0 0x0 0x10000000000000000",
        "0x0 0x0 0xé",
    ];
    for text in cases {
        assert_parse_err(parse_resources(text), "sysfs resource line", text);
    }
    // The offending line is named, not the whole file.
    let text = format!("{RESOURCE}0x1 0x2\n");
    assert_parse_err(parse_resources(&text), "sysfs resource line", "0x1 0x2");
}

// ---------------------------------------------------------------- fake sysfs

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("dmabuf-p2p-parsers-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Builds a fake device the way sysfs lays it out: the real directory under
/// `devices/pci0000:00/`, a symlink to it under `bus/pci/devices/`.
fn fake_device(root: &Path, name: &str, files: &[(&str, &str)]) -> std::io::Result<PathBuf> {
    let real = root.join("devices/pci0000:00").join(name);
    fs::create_dir_all(&real)?;
    for (file, content) in files {
        fs::write(real.join(file), content)?;
    }
    let bus = root.join("bus/pci/devices");
    fs::create_dir_all(&bus)?;
    symlink(
        format!("../../../devices/pci0000:00/{name}"),
        bus.join(name),
    )?;
    Ok(real)
}

#[test]
fn fake_sysfs() -> TestResult {
    let tmp = TempDir::new()?;
    let root = &tmp.0;
    let ivshmem = fake_device(
        root,
        "0000:00:04.0",
        &[
            ("vendor", "0x1af4\n"),
            ("device", "0x1110\n"),
            ("class", "0x050000\n"),
            ("resource", RESOURCE),
        ],
    )?;
    fs::create_dir_all(root.join("bus/pci/drivers/vfio-pci"))?;
    fs::create_dir_all(root.join("kernel/iommu_groups/7"))?;
    symlink("../../../bus/pci/drivers/vfio-pci", ivshmem.join("driver"))?;
    symlink(
        "../../../kernel/iommu_groups/7",
        ivshmem.join("iommu_group"),
    )?;
    fs::create_dir_all(ivshmem.join("vfio-dev/vfio3"))?;
    fs::create_dir_all(ivshmem.join("vfio-dev/vfio12"))?;
    fs::create_dir_all(ivshmem.join("vfio-dev/other"))?;

    let bare = fake_device(
        root,
        "0000:00:03.0",
        &[
            ("vendor", "0x1234\n"),
            ("device", "0x11e8\n"),
            ("class", "0x00ff00\n"),
        ],
    )?;
    fs::write(bare.join("resource"), "0x0 0x0 0x0\n")?;
    // Entries that are not PCI addresses are skipped when listing.
    fs::create_dir_all(root.join("bus/pci/devices/not-a-device"))?;

    let sys = Sysfs::new(root);
    assert_eq!(sys.root(), root.as_path());
    let a: PciAddress = "00:04.0".parse()?;
    let b: PciAddress = "00:03.0".parse()?;
    assert_eq!(sys.devices()?, vec![b, a]);
    assert!(sys.exists(a));

    assert_eq!(sys.vendor(a)?, 0x1af4);
    assert_eq!(sys.device_id(a)?, 0x1110);
    assert_eq!(sys.class(a)?, 0x05_0000);
    assert_eq!(sys.driver(a)?.as_deref(), Some("vfio-pci"));
    assert_eq!(sys.iommu_group(a)?, Some(7));
    assert_eq!(sys.vfio_dev(a)?.as_deref(), Some("vfio3"));
    let bar2 = sys.bar(a, 2)?;
    assert_eq!((bar2.start, bar2.size), (0x8_0000_0000, 0x10_0000));
    assert!(sys.bar(a, 1)?.is_unused());

    let info = sys.info(b)?;
    assert_eq!(
        (info.vendor, info.device, info.class),
        (0x1234, 0x11e8, 0xff00)
    );
    assert_eq!(
        (info.driver, info.iommu_group, info.vfio_dev),
        (None, None, None)
    );
    assert_eq!(info.resources.len(), 1);

    // A BAR the file does not list, and a non-BAR index.
    for idx in [1, 6] {
        match sys.bar(b, idx) {
            Err(Error::InvalidRegion { device, index, .. }) => {
                assert_eq!((device.as_str(), index), ("0000:00:03.0", idx))
            }
            other => panic!("{other:?}"),
        }
    }
    Ok(())
}

#[test]
fn fake_sysfs_errors_name_device_and_file() -> TestResult {
    let tmp = TempDir::new()?;
    let root = &tmp.0;
    let dev = fake_device(
        root,
        "0000:00:05.0",
        &[
            ("vendor", "1af4\n"),
            ("device", "0x10000\n"),
            ("class", "0x1000000\n"),
            ("resource", "0x0 0x0\n"),
        ],
    )?;
    symlink("../../../kernel/iommu_groups/abc", dev.join("iommu_group"))?;
    let sys = Sysfs::new(root);
    let a: PciAddress = "0000:00:05.0".parse()?;

    // Malformed content: Error::Parse whose message names the file.
    for (r, file) in [
        (sys.vendor(a).map(|_| ()), "vendor"),
        (sys.device_id(a).map(|_| ()), "device"),
        (sys.class(a).map(|_| ()), "class"),
        (sys.iommu_group(a).map(|_| ()), "iommu_group"),
        (sys.resources(a).map(|_| ()), "resource"),
    ] {
        match r {
            Err(e @ Error::Parse { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("0000:00:05.0") && msg.contains(file), "{msg}");
            }
            other => panic!("{file}: {other:?}"),
        }
    }

    // A missing file: Error::Sys naming device and path, with the errno.
    let b: PciAddress = "0000:00:06.0".parse()?;
    fake_device(root, "0000:00:06.0", &[])?;
    match sys.vendor(b) {
        Err(e @ Error::Sys { .. }) => {
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
            let msg = e.to_string();
            assert!(
                msg.contains("0000:00:06.0") && msg.contains("vendor"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }

    // A missing device: Error::Device naming it.
    let c: PciAddress = "0000:00:07.0".parse()?;
    assert!(!sys.exists(c));
    match sys.info(c) {
        Err(Error::Device { device, .. }) => assert_eq!(device, "0000:00:07.0"),
        other => panic!("{other:?}"),
    }

    // No tree at all.
    let none = Sysfs::new(root.join("nope"));
    assert!(matches!(none.devices(), Err(Error::Sys { .. })));
    Ok(())
}

// ---------------------------------------------------------------- fdinfo

const VFIO_DMABUF: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2061\n\
size:\t1048576\ncount:\t2\nexp_name:\tvfio_pci_core\n";

#[test]
fn fdinfo_dmabuf() -> TestResult {
    let info = FdInfo::parse(VFIO_DMABUF)?;
    assert_eq!(
        (info.pos, info.flags, info.mnt_id, info.ino),
        (0, 0o2_000_002, 15, 2061)
    );
    assert!(info.is_dmabuf() && info.is_cloexec());
    assert_eq!(info.access_mode(), libc::O_RDWR as u32);
    let buf = info.dmabuf.ok_or("no dmabuf")?;
    assert_eq!((buf.size, buf.count), (1 << 20, 2));
    assert_eq!(buf.exp_name, "vfio_pci_core");
    assert_eq!(buf.name, None);
    Ok(())
}

#[test]
fn fdinfo_named_dmabuf_with_extra_lines() -> TestResult {
    let text = "pos:\t0\nflags:\t0100002\nmnt_id:\t15\nino:\t7\nlock:\t1: FLOCK  ADVISORY  WRITE 1 00:0f:7 0 EOF\n\
size:\t4096\ncount:\t1\nexp_name:\tsystem\nname:\tmy buffer \nfuture_key:\twhatever\nno colon here\n";
    let info: FdInfo = text.parse()?;
    assert!(!info.is_cloexec());
    let buf = info.dmabuf.ok_or("no dmabuf")?;
    assert_eq!(buf.exp_name, "system");
    assert_eq!(buf.name.as_deref(), Some("my buffer "));
    Ok(())
}

#[test]
fn fdinfo_not_a_dmabuf() -> TestResult {
    // An eventfd: no exp_name, so no dma-buf, and its own lines are ignored.
    let text = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1057\neventfd-count:                0\neventfd-id: 3\n";
    let info = FdInfo::parse(text)?;
    assert_eq!(info.dmabuf, None);
    assert!(!info.is_dmabuf());
    // A regular file with a large position; size/count alone do not make a dma-buf.
    let text = "pos:\t-5\nflags:\t0100000\nmnt_id:\t30\nino:\t99\nsize:\tnot checked\n";
    let info = FdInfo::parse(text)?;
    assert_eq!((info.pos, info.dmabuf), (-5, None));
    Ok(())
}

#[test]
fn fdinfo_bad() {
    let base = "pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t7\n";
    let cases = [
        ("pos:\tx\nflags:\t02\nmnt_id:\t15\nino:\t7\n", "pos"),
        ("pos:\t+1\nflags:\t02\nmnt_id:\t15\nino:\t7\n", "pos"),
        ("pos:\t0\nflags:\t08\nmnt_id:\t15\nino:\t7\n", "flags"),
        ("pos:\t0\nflags:\t0x2\nmnt_id:\t15\nino:\t7\n", "flags"),
        (
            "pos:\t0\nflags:\t77777777777\nmnt_id:\t15\nino:\t7\n",
            "flags",
        ),
        ("pos:\t0\nflags:\t02\nmnt_id:\t-1\nino:\t7\n", "mnt_id"),
        ("pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t\n", "ino"),
        ("pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t٣\n", "ino"),
        ("flags:\t02\nmnt_id:\t15\nino:\t7\n", "pos"),
        ("pos:\t0\nmnt_id:\t15\nino:\t7\n", "flags"),
        (
            "pos:\t0\npos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t7\n",
            "pos",
        ),
        ("", "pos"),
    ];
    for (text, key) in cases {
        match FdInfo::parse(text) {
            Err(e @ Error::Parse { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(key), "{msg}");
                let Error::Parse { what, input, .. } = e else {
                    unreachable!()
                };
                assert_eq!(what, "fdinfo");
                assert_eq!(input, text);
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
    // dma-buf lines malformed or missing.
    for (extra, key) in [
        ("size:\t12k\ncount:\t1\nexp_name:\tudmabuf\n", "size"),
        ("size:\t4096\ncount:\t-1\nexp_name:\tudmabuf\n", "count"),
        ("count:\t1\nexp_name:\tudmabuf\n", "size"),
        ("size:\t4096\nexp_name:\tudmabuf\n", "count"),
    ] {
        let text = format!("{base}{extra}");
        match FdInfo::parse(&text) {
            Err(e @ Error::Parse { .. }) => assert!(e.to_string().contains(key), "{e}"),
            other => panic!("{text:?}: {other:?}"),
        }
    }
}

#[test]
fn fdinfo_of_real_fd() -> TestResult {
    let f = fs::File::open("/proc/self/status")?;
    let info = FdInfo::of_fd(&f)?;
    assert!(info.dmabuf.is_none());
    assert!(info.is_cloexec());
    assert_eq!(info.access_mode(), libc::O_RDONLY as u32);
    match FdInfo::read_path("/proc/self/fdinfo/999999") {
        Err(e @ Error::Sys { .. }) => {
            assert!(e.to_string().contains("/proc/self/fdinfo/999999"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}
