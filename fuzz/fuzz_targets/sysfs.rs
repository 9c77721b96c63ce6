//! Everything that parses sysfs text, on a fake sysfs tree the fuzzer writes:
//! `Sysfs` (the `vendor`, `device` and `class` files, the `resource` file, the
//! `driver` and `iommu_group` links, the `vfio-dev` directory, the device
//! listing), `pci::parse_resources` directly, and the udmabuf module
//! parameters (`UdmabufLimits::read_from`). No panic, and every answer agrees
//! with a plain model of the format; `parse_resources` round-trips through the
//! kernel's printing of the file.

#![no_main]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dmabuf_p2p::Error;
use dmabuf_p2p::exporter::udmabuf::UdmabufLimits;
use dmabuf_p2p::pci::{BAR_COUNT, PciAddress, Resource, parse_resources};
use dmabuf_p2p::sysfs::Sysfs;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Tree {
    vendor: String,
    device: String,
    class: String,
    resource: String,
    driver: Option<String>,
    group: Option<String>,
    vfio: Vec<String>,
    /// Names of other entries in `bus/pci/devices`.
    listing: Vec<String>,
    list_limit: String,
    size_limit_mb: String,
}

/// The device every tree describes.
const ADDR: &str = "0000:00:04.0";

/// A directory of this process for the fake trees.
fn base() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let tmp = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        tmp.join(format!("dmabuf-p2p-fuzz-sysfs-{}", std::process::id()))
    })
}

/// Whether `name` can be one path component.
fn component(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0'])
}

/// The model of an attribute holding a `0x`-prefixed hex number.
fn hex_attr(text: &str) -> Option<u64> {
    let h = text.trim().strip_prefix("0x")?;
    (!h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| u64::from_str_radix(h, 16).ok())?
}

/// The `resource` file as the kernel prints it.
fn render(resources: &[Resource]) -> String {
    let mut s = String::new();
    for r in resources {
        let end = if r.size == 0 {
            0
        } else {
            r.start + (r.size - 1)
        };
        s.push_str(&format!(
            "{:#018x} {:#018x} {:#018x}\n",
            r.start, end, r.flags
        ));
    }
    s
}

fn check_resources(text: &str) {
    let Ok(res) = parse_resources(text) else {
        return;
    };
    assert_eq!(
        res.len(),
        text.lines().filter(|l| !l.trim().is_empty()).count(),
        "one resource per line"
    );
    for (i, r) in res.iter().enumerate() {
        assert_eq!(r.index as usize, i);
        if r.size == 0 {
            assert_eq!(r.start, 0, "an unused resource starts at 0: {r:?}");
        } else {
            assert!(
                r.start.checked_add(r.size - 1).is_some(),
                "end overflows: {r:?}"
            );
        }
        assert_eq!(r.is_unused(), r.size == 0);
        assert_eq!(r.as_range().length, r.size);
    }
    assert_eq!(
        parse_resources(&render(&res)).expect("the kernel's printing parses"),
        res
    );
}

fn build(t: &Tree) -> std::io::Result<PathBuf> {
    let root = base().join("root");
    let _ = fs::remove_dir_all(&root);
    let devices = root.join("bus/pci/devices");
    let dev = devices.join(ADDR);
    fs::create_dir_all(&dev)?;
    fs::write(dev.join("vendor"), &t.vendor)?;
    fs::write(dev.join("device"), &t.device)?;
    fs::write(dev.join("class"), &t.class)?;
    fs::write(dev.join("resource"), &t.resource)?;
    if let Some(d) = t.driver.as_deref().filter(|d| component(d)) {
        symlink(format!("../../../bus/pci/drivers/{d}"), dev.join("driver"))?;
    }
    if let Some(g) = t.group.as_deref().filter(|g| component(g)) {
        symlink(
            format!("../../../kernel/iommu_groups/{g}"),
            dev.join("iommu_group"),
        )?;
    }
    if !t.vfio.is_empty() {
        fs::create_dir(dev.join("vfio-dev"))?;
        for v in t.vfio.iter().filter(|v| component(v)) {
            let _ = fs::create_dir(dev.join("vfio-dev").join(v));
        }
    }
    for name in t.listing.iter().filter(|n| component(n)) {
        let _ = fs::create_dir(devices.join(name));
    }
    let params = root.join("module/udmabuf/parameters");
    fs::create_dir_all(&params)?;
    fs::write(params.join("list_limit"), &t.list_limit)?;
    fs::write(params.join("size_limit_mb"), &t.size_limit_mb)?;
    Ok(root)
}

fuzz_target!(|t: Tree| {
    check_resources(&t.resource);
    let Ok(root) = build(&t) else { return };
    let sys = Sysfs::new(&root);
    let addr: PciAddress = ADDR.parse().expect("a valid address");
    assert!(sys.exists(addr));

    // IDs and class: hex with 0x, in range.
    let vendor = hex_attr(&t.vendor).filter(|&v| v <= 0xffff);
    assert_eq!(
        sys.vendor(addr).ok().map(u64::from),
        vendor,
        "vendor {:?}",
        t.vendor
    );
    let device = hex_attr(&t.device).filter(|&v| v <= 0xffff);
    assert_eq!(
        sys.device_id(addr).ok().map(u64::from),
        device,
        "device {:?}",
        t.device
    );
    let class = hex_attr(&t.class).filter(|&v| v <= 0xff_ffff);
    assert_eq!(
        sys.class(addr).ok().map(u64::from),
        class,
        "class {:?}",
        t.class
    );
    for bad in [sys.vendor(addr).err(), sys.class(addr).err()]
        .into_iter()
        .flatten()
    {
        assert!(
            matches!(bad, Error::Parse { .. }),
            "a bad attribute is a parse error: {bad:?}"
        );
    }

    // Resources, and BARs out of them.
    let parsed = parse_resources(&t.resource).ok();
    assert_eq!(sys.resources(addr).ok(), parsed);
    for index in 0..=BAR_COUNT {
        match sys.bar(addr, index) {
            Ok(r) => {
                assert!(index < BAR_COUNT);
                assert_eq!(
                    Some(r),
                    parsed.as_ref().and_then(|p| p.get(index as usize).copied())
                );
            }
            Err(Error::InvalidRegion { index: i, .. }) => {
                assert_eq!(i, index);
                assert!(
                    index >= BAR_COUNT
                        || parsed.as_ref().is_some_and(|p| p.len() <= index as usize)
                );
            }
            Err(_) => assert!(parsed.is_none() && index < BAR_COUNT),
        }
    }

    // Links: the last component, and a number for the IOMMU group.
    let driver = t.driver.clone().filter(|d| component(d));
    assert_eq!(sys.driver(addr).ok(), Some(driver));
    let group = t.group.as_deref().filter(|g| component(g));
    let want_group = match group {
        None => Some(None),
        Some(g) if !g.is_empty() && g.chars().all(|c| c.is_ascii_digit()) => g
            .parse::<u64>()
            .ok()
            .and_then(|v| u32::try_from(v).ok())
            .map(Some),
        Some(_) => None,
    };
    assert_eq!(sys.iommu_group(addr).ok(), want_group, "group {group:?}");

    // The VFIO cdev: the lowest-numbered vfioN entry.
    let best = t
        .vfio
        .iter()
        .filter(|v| component(v))
        .filter_map(|v| {
            let n = v.strip_prefix("vfio")?;
            (!n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
                .then(|| n.parse::<u64>().ok().map(|n| (n, v)))?
        })
        .min_by_key(|(n, _)| *n);
    // (Entries with the same number, vfio1 and vfio01, may come in any order.)
    let number = |name: &str| {
        name.strip_prefix("vfio")
            .and_then(|n| n.parse::<u64>().ok())
    };
    match sys.vfio_dev(addr).expect("vfio-dev reads") {
        Some(name) => assert_eq!(number(&name), best.map(|(n, _)| n), "picked {name:?}"),
        None => assert!(best.is_none()),
    }

    // The device listing: the entries that are addresses, sorted.
    let listed = sys.devices().expect("the listing reads");
    assert!(listed.windows(2).all(|w| w[0] <= w[1]), "sorted");
    assert!(listed.contains(&addr));
    for name in t.listing.iter().filter(|n| component(n)) {
        if let Ok(a) = name.parse::<PciAddress>() {
            assert!(listed.contains(&a), "{name:?} is not listed");
        }
    }

    // Everything at once agrees with the single reads.
    if let Ok(info) = sys.info(addr) {
        assert_eq!(Some(u64::from(info.vendor)), vendor);
        assert_eq!(Some(info.resources), parsed);
    }

    // udmabuf's module parameters: an int, negative meaning 0; else the default.
    let param = |text: &str, default: u64| {
        text.trim()
            .parse::<i64>()
            .map_or(default, |v| u64::try_from(v).unwrap_or(0))
    };
    let limits = UdmabufLimits::read_from(&root.join("module/udmabuf/parameters"));
    let d = UdmabufLimits::default();
    assert_eq!(limits.list_limit, param(&t.list_limit, d.list_limit));
    assert_eq!(
        limits.size_limit_mb,
        param(&t.size_limit_mb, d.size_limit_mb)
    );
    assert_eq!(
        limits.size_limit_bytes(),
        limits.size_limit_mb.saturating_mul(1 << 20)
    );
});
