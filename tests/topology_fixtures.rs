//! The topology module on real configuration space: dumps of switches,
//! root ports and endpoints with and without ACS from public sources and
//! from the test VM (`tests/fixtures/topology/`, each file saying where it
//! comes from). Each dump is laid out as a sysfs tree in a temporary
//! directory (config files, link targets, resource files, IOMMU group and
//! driver links) and read through the library's `Sysfs`, as on a machine.

// Failing a test by panicking is what tests do.
#![allow(clippy::panic)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::importer::iommufd::{IovaPlacement, IovaRange, IovaRanges};
use dmabuf_p2p::pci::PciAddress;
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p::topology::{
    AcsFlags, ConfigSpace, Cpu, HostBridgeDevice, HostBridgeSupport, KernelMapType, Outcome,
    PciPath, PcieType, Platform, Probe, Reason, Route, Upstream, Verdict, acs, ats,
    parse_dmar_width, pcie_type,
};

type TestResult = Result<(), Box<dyn std::error::Error>>;

// ------------------------------------------------------------- the fixtures

/// One function of a dump.
#[derive(Debug, Clone, Default)]
struct Dumped {
    config: Vec<u8>,
    /// `@path`: the link target sysfs showed (VM dumps).
    path: Option<String>,
    group: Option<u32>,
    driver: Option<String>,
    /// `@resource` lines (VM dumps), or lines made from lspci's `Region`
    /// lines.
    resource: Vec<String>,
}

fn fixture_text(name: &str) -> Result<String, Box<dyn std::error::Error>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/topology")
        .join(name);
    Ok(fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?)
}

/// Parses a fixture: `lspci -xxxx`-style blocks (a line starting with the
/// address, hex lines `OFF: b0 b1 ...`), with lspci's `Region N: Memory at
/// A (...) [size=S]`, `Kernel driver in use: D` and `IOMMU group: G` lines,
/// or the VM dumps' `@path`, `@iommu_group`, `@driver`, `@resource` lines.
fn load(name: &str) -> Result<BTreeMap<PciAddress, Dumped>, Box<dyn std::error::Error>> {
    let mut out: BTreeMap<PciAddress, Dumped> = BTreeMap::new();
    let mut current: Option<PciAddress> = None;
    let mut regions: BTreeMap<PciAddress, Vec<(u32, u64, u64, u64)>> = BTreeMap::new();
    for line in fixture_text(name)?.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(['\t', ' ']) && !is_hex_line(line) {
            // A device's line, or another block (the DMAR table) to skip.
            let first = line.split_whitespace().next().unwrap_or_default();
            current = first.parse::<PciAddress>().ok();
            if let Some(a) = current {
                out.insert(a, Dumped::default());
            }
            continue;
        }
        let Some(a) = current else {
            continue;
        };
        let dev = out.get_mut(&a).ok_or("no device")?;
        let t = line.trim();
        if let Some((off, bytes)) = t.split_once(": ")
            && off.len() <= 3
            && let Ok(off) = usize::from_str_radix(off, 16)
        {
            let bytes: Vec<u8> = bytes
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16))
                .collect::<Result<_, _>>()?;
            if dev.config.len() < off + bytes.len() {
                dev.config.resize(off + bytes.len(), 0);
            }
            dev.config[off..off + bytes.len()].copy_from_slice(&bytes);
        } else if let Some(p) = t.strip_prefix("@path ") {
            dev.path = Some(p.to_owned());
        } else if let Some(g) = t.strip_prefix("@iommu_group ") {
            dev.group = Some(g.parse()?);
        } else if let Some(g) = t.strip_prefix("IOMMU group: ") {
            dev.group = Some(g.parse()?);
        } else if let Some(d) = t.strip_prefix("@driver ") {
            dev.driver = Some(d.to_owned());
        } else if let Some(d) = t.strip_prefix("Kernel driver in use: ") {
            dev.driver = Some(d.to_owned());
        } else if let Some(r) = t.strip_prefix("@resource ") {
            dev.resource.push(r.to_owned());
        } else if let Some(r) = t.strip_prefix("Region ")
            && r.contains("[size=")
        {
            // (Dumps made without sysfs show no sizes: such BARs stay unknown.)
            regions.entry(a).or_default().push(parse_region(r)?);
        }
    }
    // Resource lines from lspci's regions: start, end, IORESOURCE_MEM
    // (| _PREFETCH, | _MEM_64), as the kernel's resource file shows them.
    for (a, regs) in regions {
        let dev = out.get_mut(&a).ok_or("no device")?;
        let mut lines =
            vec!["0x0000000000000000 0x0000000000000000 0x0000000000000000".to_owned(); 7];
        for (index, start, size, flags) in regs {
            lines[index as usize] =
                format!("{start:#018x} {:#018x} {flags:#018x}", start + size - 1);
        }
        dev.resource = lines;
    }
    Ok(out)
}

/// `OFF: b0 b1 ...`, a line of a hex dump.
fn is_hex_line(line: &str) -> bool {
    line.split_once(": ").is_some_and(|(off, _)| {
        (2..=3).contains(&off.len()) && off.chars().all(|c| c.is_ascii_hexdigit())
    })
}

/// `N: Memory at A (32-bit|64-bit, [non-]prefetchable) [size=S]`.
fn parse_region(r: &str) -> Result<(u32, u64, u64, u64), Box<dyn std::error::Error>> {
    let (index, rest) = r
        .split_once(": Memory at ")
        .ok_or_else(|| format!("region {r}"))?;
    let (addr, rest) = rest.split_once(' ').ok_or_else(|| format!("region {r}"))?;
    let size = rest
        .rsplit_once("[size=")
        .and_then(|(_, s)| s.strip_suffix(']'))
        .ok_or_else(|| format!("region {r}"))?;
    let (num, unit) = size.split_at(size.len() - 1);
    let size = match unit {
        "K" => num.parse::<u64>()? << 10,
        "M" => num.parse::<u64>()? << 20,
        "G" => num.parse::<u64>()? << 30,
        _ => size.parse::<u64>()?,
    };
    let mut flags = 0x200;
    if rest.contains("64-bit") {
        flags |= 0x10_0000;
    }
    if rest.contains(", prefetchable") {
        flags |= 0x2000;
    }
    Ok((index.parse()?, u64::from_str_radix(addr, 16)?, size, flags))
}

/// The sysfs path of a function of an lspci dump (which records no paths),
/// from the bridges' secondary bus numbers in the same dump: the bridge
/// whose secondary bus is the function's bus is its parent; a function on a
/// bus no bridge leads to is on a root bus.
fn derived_path(dump: &BTreeMap<PciAddress, Dumped>, a: PciAddress) -> String {
    let parent = dump.iter().find(|(b, d)| {
        b.domain() == a.domain()
            && ConfigSpace::new(d.config.clone())
                .bridge_buses()
                .is_some_and(|(secondary, _)| secondary == a.bus())
    });
    match parent {
        Some((p, _)) => format!("{}/{a}", derived_path(dump, *p)),
        None => format!("pci{:04x}:{:02x}/{a}", a.domain(), a.bus()),
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("dmabuf-p2p-topology-{}-{n}", std::process::id()));
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

/// How to lay a dump out.
#[derive(Default)]
struct Layout {
    /// Config files hold only the 64-byte header, as sysfs gives them to a
    /// reader without `CAP_SYS_ADMIN`.
    unprivileged: bool,
    /// IOMMU groups for dumps that record none (the test's assumption, not
    /// the dump's).
    groups: Vec<(&'static str, u32)>,
}

/// Lays `dump` out as a sysfs tree under a new temporary directory.
fn sysfs_of(
    dump: &BTreeMap<PciAddress, Dumped>,
    layout: &Layout,
) -> Result<(TempDir, Sysfs), Box<dyn std::error::Error>> {
    let tmp = TempDir::new()?;
    let root = tmp.0.clone();
    let bus_dir = root.join("bus/pci/devices");
    fs::create_dir_all(&bus_dir)?;
    for (a, d) in dump {
        let rel = match &d.path {
            Some(p) => p
                .strip_prefix("../../../devices/")
                .ok_or_else(|| format!("{a}: odd path {p}"))?
                .to_owned(),
            None => derived_path(dump, *a),
        };
        let dir = root.join("devices").join(&rel);
        fs::create_dir_all(&dir)?;
        let cfg = ConfigSpace::new(d.config.clone());
        let vendor = cfg.vendor().ok_or("no vendor")?;
        let device = cfg.device().ok_or("no device")?;
        let class = cfg.class().ok_or("no class")?;
        fs::write(dir.join("vendor"), format!("{vendor:#06x}\n"))?;
        fs::write(dir.join("device"), format!("{device:#06x}\n"))?;
        fs::write(dir.join("class"), format!("{class:#08x}\n"))?;
        let mut config = d.config.clone();
        if layout.unprivileged {
            config.truncate(64);
        }
        fs::write(dir.join("config"), config)?;
        let mut resource = d.resource.join("\n");
        if resource.is_empty() {
            resource = ["0x0000000000000000 0x0000000000000000 0x0000000000000000"; 7].join("\n");
        }
        fs::write(dir.join("resource"), resource + "\n")?;
        let group = d.group.or_else(|| {
            layout
                .groups
                .iter()
                .find(|(g, _)| g.parse::<PciAddress>().ok() == Some(*a))
                .map(|(_, n)| *n)
        });
        if let Some(g) = group {
            symlink(
                format!("../../../../kernel/iommu_groups/{g}"),
                dir.join("iommu_group"),
            )?;
        }
        if let Some(drv) = &d.driver {
            symlink(
                format!("../../../../bus/pci/drivers/{drv}"),
                dir.join("driver"),
            )?;
        }
        symlink(
            format!("../../../devices/{rel}"),
            bus_dir.join(a.to_string()),
        )?;
    }
    let sysfs = Sysfs::new(&root);
    Ok((tmp, sysfs))
}

fn addr(s: &str) -> PciAddress {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// A machine whose CPU does not vouch for P2P (QEMU's TCG CPU, an Intel
/// one) and whose IOMMU's host address width is not known.
fn plain() -> Platform {
    Platform {
        cpu: Cpu::parse_cpuinfo("vendor_id\t: AuthenticAMD\ncpu family\t: 15\n"),
        host_address_width: None,
    }
}

fn has(v: &Verdict, pred: impl Fn(&Reason) -> bool) -> bool {
    v.reasons.iter().any(pred)
}

// ------------------------------------------------- decoding real functions

#[test]
fn haswell_e_root_port_has_acs_redirect_on() -> TestResult {
    let dump = load("pciutils-cap-aer-root.txt")?;
    let rp = ConfigSpace::new(dump[&addr("00:02.0")].config.clone());
    assert_eq!(pcie_type(&rp), Probe::Present(PcieType::RootPort));
    let Probe::Present(a) = acs(&rp) else {
        panic!("no ACS on 00:02.0: {:?}", acs(&rp));
    };
    // lspci: ACSCap SrcValid+ TransBlk+ ReqRedir+ CmpltRedir+ UpstreamFwd+
    //        ACSCtl SrcValid+ TransBlk+ ReqRedir+ CmpltRedir+ UpstreamFwd+
    assert_eq!(a.capability, AcsFlags(0x1f));
    assert_eq!(a.control, AcsFlags(0x1f));
    assert!(a.redirects() && a.isolates());
    assert_eq!(a.redirecting_bits().to_string(), "RR CR");
    let nic = ConfigSpace::new(dump[&addr("03:00.0")].config.clone());
    assert_eq!(pcie_type(&nic), Probe::Present(PcieType::Endpoint));
    assert_eq!(acs(&nic), Probe::Absent);
    Ok(())
}

#[test]
fn laptop_root_port_and_thunderbolt_switch_port() -> TestResult {
    let dump = load("pciutils-cap-exp-lnkcap2.txt")?;
    let rp = ConfigSpace::new(dump[&addr("00:1c.0")].config.clone());
    let Probe::Present(a) = acs(&rp) else {
        panic!("no ACS on 00:1c.0");
    };
    // ACSCap SrcValid+ TransBlk+ ReqRedir+ CmpltRedir+; ACSCtl all off.
    assert_eq!((a.capability, a.control), (AcsFlags(0x0f), AcsFlags(0)));
    assert!(!a.redirects() && !a.isolates());
    let dsp = ConfigSpace::new(dump[&addr("08:00.0")].config.clone());
    assert_eq!(pcie_type(&dsp), Probe::Present(PcieType::SwitchDownstream));
    assert_eq!(
        acs(&dsp),
        Probe::Absent,
        "JHL6240 downstream ports have no ACS"
    );
    let gpu = ConfigSpace::new(dump[&addr("02:00.0")].config.clone());
    assert_eq!(pcie_type(&gpu), Probe::Present(PcieType::Endpoint));
    Ok(())
}

#[test]
fn plx_switch_downstream_port_has_no_acs() -> TestResult {
    let dump = load("pciutils-cap-vc-pat.txt")?;
    let dsp = ConfigSpace::new(dump[&addr("0000:12:08.0")].config.clone());
    assert_eq!((dsp.vendor(), dsp.device()), (Some(0x10b5), Some(0x8532)));
    assert_eq!(pcie_type(&dsp), Probe::Present(PcieType::SwitchDownstream));
    assert_eq!(acs(&dsp), Probe::Absent);
    assert!(
        dsp.extended_capabilities().len() >= 2,
        "{:?}",
        dsp.extended_capabilities()
    );
    Ok(())
}

#[test]
fn ats_enabled_and_disabled_endpoints() -> TestResult {
    let dsa = load("pciutils-pri-pasid.txt")?;
    let dsa = &dsa[&addr("6a:01.0")];
    let cfg = ConfigSpace::new(dsa.config.clone());
    assert_eq!(
        pcie_type(&cfg),
        Probe::Present(PcieType::RootComplexEndpoint)
    );
    let Probe::Present(a) = ats(&cfg) else {
        panic!("no ATS on the DSA");
    };
    assert!(a.enabled);
    assert_eq!((a.offset, a.smallest_translation_unit), (0x220, 0));
    assert_eq!(dsa.group, Some(38));
    let myri = load("pciutils-cap-address-xlation.txt")?;
    let cfg = ConfigSpace::new(myri[&addr("02:00.0")].config.clone());
    let Probe::Present(a) = ats(&cfg) else {
        panic!("no ATS on the Myri-10G");
    };
    assert!(!a.enabled);
    assert_eq!(a.offset, 0x1c4);
    Ok(())
}

#[test]
fn qemu_ports_root_ports_have_acs_switch_ports_none() -> TestResult {
    let dump = load("vm-switch.txt")?;
    let rp = ConfigSpace::new(dump[&addr("00:10.0")].config.clone());
    let Probe::Present(a) = acs(&rp) else {
        panic!("QEMU's pcie-root-port has ACS");
    };
    // QEMU offers SV TB RR CR UF DT; the guest kernel enabled SV RR CR UF
    // (pci_std_enable_acs).
    assert_eq!((a.capability, a.control), (AcsFlags(0x5f), AcsFlags(0x1d)));
    for port in ["01:00.0", "02:00.0", "02:01.0"] {
        let cfg = ConfigSpace::new(dump[&addr(port)].config.clone());
        assert_eq!(acs(&cfg), Probe::Absent, "{port}");
    }
    let cfg = |a: &str| ConfigSpace::new(dump[&addr(a)].config.clone());
    assert_eq!(
        pcie_type(&cfg("01:00.0")),
        Probe::Present(PcieType::SwitchUpstream)
    );
    assert_eq!(
        pcie_type(&cfg("02:01.0")),
        Probe::Present(PcieType::SwitchDownstream)
    );
    // edu and ivshmem are conventional PCI functions (256 bytes, no PCI
    // Express capability) even below PCI Express ports.
    assert_eq!(pcie_type(&cfg("03:00.0")), Probe::Absent);
    assert_eq!(cfg("04:00.0").len(), 256);
    Ok(())
}

// -------------------------------------------------------------- real paths

#[test]
fn x58_tree_chains_follow_the_bridges_bus_numbers() -> TestResult {
    let dump = load("pciutils-tree-asus-p6t6.txt")?;
    let (_tmp, sysfs) = sysfs_of(&dump, &Layout::default())?;
    let sas = Upstream::read(&sysfs, addr("04:00.0"))?;
    let chain: Vec<String> = sas.chain().map(|f| f.address.to_string()).collect();
    assert_eq!(
        chain,
        [
            "0000:04:00.0",
            "0000:03:00.0",
            "0000:02:00.0",
            "0000:00:03.0"
        ],
        "the SAS controller is below the NF200 below X58 root port 3"
    );
    let kinds: Vec<Probe<PcieType>> = sas.bridges.iter().map(|b| b.pcie_type).collect();
    assert_eq!(
        kinds,
        [
            Probe::Present(PcieType::SwitchDownstream),
            Probe::Present(PcieType::SwitchUpstream),
            Probe::Present(PcieType::RootPort)
        ]
    );
    // NF200 ports have no ACS; X58 root ports can, but it is off.
    assert_eq!(sas.bridges[0].acs, Probe::Absent);
    assert_eq!(sas.bridges[1].acs, Probe::Absent);
    let rp = sas.bridges[2].acs.present().ok_or("no ACS on 00:03.0")?;
    assert_eq!((rp.capability, rp.control), (AcsFlags(0x1f), AcsFlags(0)));
    // pci_host_bridge_dev: 00:00.0, the X58's ESI port, 8086:3405.
    assert!(matches!(
        sas.host_bridge.device,
        HostBridgeDevice::Found {
            vendor: 0x8086,
            device: 0x3405,
            ..
        }
    ));
    Ok(())
}

#[test]
fn across_x58_root_ports_the_host_bridge_is_not_listed() -> TestResult {
    let dump = load("pciutils-tree-asus-p6t6.txt")?;
    let layout = Layout {
        groups: vec![("04:00.0", 10), ("06:00.0", 11)],
        ..Layout::default()
    };
    let (_tmp, sysfs) = sysfs_of(&dump, &layout)?;
    // The SAS controller (below the NF200, root port 3) writes into the
    // GeForce (root port 7).
    let path = PciPath::read(&sysfs, addr("04:00.0"), addr("06:00.0"))?;
    assert_eq!(path.common, None);
    let v = Verdict::new(&path, &plain(), None, None);
    let Route::RootComplex {
        support,
        redirected_by,
    } = &v.route
    else {
        panic!("{v}");
    };
    assert!(redirected_by.is_empty());
    assert_eq!(
        *support,
        HostBridgeSupport::NotListed {
            name: "pci0000:00".into(),
            vendor: 0x8086,
            device: 0x3405
        }
    );
    assert_eq!(v.outcome, Outcome::Uncertain, "{v}");
    assert_eq!(v.translated, Some(true));
    assert_eq!(
        v.placement(ByteRange::new(0, 0x1000)).at,
        IovaPlacement::Auto
    );
    assert!(v.to_string().contains("pci_p2pdma_whitelist"), "{v}");
    // On an AMD Zen CPU the kernel would vouch for it.
    let zen = Platform {
        cpu: Cpu::parse_cpuinfo("vendor_id : AuthenticAMD\ncpu family : 25\n"),
        host_address_width: None,
    };
    assert_eq!(
        Verdict::new(&path, &zen, None, None).outcome,
        Outcome::Works
    );
    Ok(())
}

#[test]
fn two_functions_of_one_device_turn_at_their_root_port() -> TestResult {
    let dump = load("pciutils-tree-asus-p6t6.txt")?;
    let layout = Layout {
        groups: vec![("06:00.0", 11), ("06:00.1", 11)],
        ..Layout::default()
    };
    let (_tmp, sysfs) = sysfs_of(&dump, &layout)?;
    // The GeForce's audio function and its VGA function, below X58 root
    // port 7 with ACS off: the kernel's PCI_P2PDMA_MAP_BUS_ADDR case.
    let path = PciPath::read(&sysfs, addr("06:00.1"), addr("06:00.0"))?;
    assert_eq!(path.common, Some(addr("00:07.0")));
    assert!(path.provider.function.multifunction);
    let v = Verdict::new(&path, &plain(), None, None);
    assert_eq!(
        v.route,
        Route::Direct {
            common: addr("00:07.0")
        }
    );
    assert_eq!(v.outcome, Outcome::IdentityOnly, "{v}");
    assert!(has(
        &v,
        |r| matches!(r, Reason::NoAcsRedirect { checked } if checked.len() == 3)
    ));
    assert!(has(&v, |r| matches!(r, Reason::SameGroup { group: 11 })));
    Ok(())
}

#[test]
fn without_root_acs_is_unreadable_and_identity_is_offered() -> TestResult {
    let dump = load("pciutils-tree-asus-p6t6.txt")?;
    let layout = Layout {
        unprivileged: true,
        groups: vec![("06:00.0", 11), ("06:00.1", 11)],
    };
    let (_tmp, sysfs) = sysfs_of(&dump, &layout)?;
    let path = PciPath::read(&sysfs, addr("06:00.1"), addr("06:00.0"))?;
    assert!(
        path.provider
            .chain()
            .all(|f| f.acs.is_unreadable() && f.config_bytes == 64)
    );
    let v = Verdict::new(&path, &plain(), None, None);
    let Route::Undetermined { common, unreadable } = &v.route else {
        panic!("{v}");
    };
    assert_eq!(*common, addr("00:07.0"));
    assert_eq!(unreadable.len(), 3);
    assert_eq!(v.outcome, Outcome::Undetermined);
    assert!(v.needs_identity());
    assert!(v.to_string().contains("root-only in sysfs"), "{v}");
    // The host bridge is 00:00.0: its IDs need no root.
    assert!(matches!(
        path.provider.host_bridge.device,
        HostBridgeDevice::Found { device: 0x3405, .. }
    ));
    Ok(())
}

#[test]
fn a_machine_without_iommu_groups_is_impossible_for_the_library() -> TestResult {
    // The dump records no IOMMU groups: as on a machine booted without an
    // IOMMU, no IOAS can take the engine.
    let dump = load("pciutils-tree-asus-p6t6.txt")?;
    let (_tmp, sysfs) = sysfs_of(&dump, &Layout::default())?;
    let path = PciPath::read(&sysfs, addr("04:00.0"), addr("06:00.0"))?;
    let v = Verdict::new(&path, &plain(), None, None);
    assert_eq!(v.outcome, Outcome::Impossible);
    assert!(has(
        &v,
        |r| matches!(r, Reason::NoIommu { function } if *function == addr("04:00.0"))
    ));
    assert!(matches!(v.likely_causes()[0], Reason::NoIommu { .. }));
    Ok(())
}

#[test]
fn skylake_sp_root_port_stands_for_a_listed_host_bridge() -> TestResult {
    let dump = load("pcics-8086-2030.txt")?;
    let (_tmp, sysfs) = sysfs_of(&dump, &Layout::default())?;
    let rp = Upstream::read(&sysfs, addr("ae:00.0"))?;
    assert_eq!(rp.function.pcie_type, Probe::Present(PcieType::RootPort));
    let Probe::Present(a) = rp.function.acs else {
        panic!("no ACS");
    };
    assert_eq!((a.capability, a.control), (AcsFlags(0x1f), AcsFlags(0)));
    let support = HostBridgeSupport::judge(&Cpu::default(), &rp.host_bridge, &rp.host_bridge);
    assert_eq!(
        support,
        HostBridgeSupport::Listed {
            vendor: 0x8086,
            device: 0x2030
        }
    );
    Ok(())
}

#[test]
fn vm_root_ports_go_through_the_q35_host_bridge() -> TestResult {
    let dump = load("vm-root-ports.txt")?;
    let (_tmp, sysfs) = sysfs_of(&dump, &Layout::default())?;
    let path = PciPath::read(&sysfs, addr("01:00.0"), addr("02:00.0"))?;
    assert_eq!(path.common, None);
    assert_eq!(path.client.bridges[0].address, addr("00:10.0"));
    let v = Verdict::new(&path, &plain(), None, Some(2));
    assert!(
        matches!(
            &v.route,
            Route::RootComplex {
                support: HostBridgeSupport::NotListed { device: 0x29c0, .. },
                ..
            }
        ),
        "{v}"
    );
    assert_eq!(v.outcome, Outcome::Uncertain);
    let bar = v.bar.ok_or("no BAR2")?;
    assert_eq!(
        (bar.index, bar.bus_address, bar.size),
        (2, 0xfb80_0000, 1 << 20)
    );
    assert!(!has(&v, |r| matches!(r, Reason::NotOnVfio { .. })));
    Ok(())
}

#[test]
fn vm_chipset_group_is_owned_by_its_kernel_drivers() -> TestResult {
    let dump = load("vm-root-ports.txt")?;
    let (_tmp, sysfs) = sysfs_of(&dump, &Layout::default())?;
    // The AHCI controller shares group 17 with the SMBus controller (i801_smbus).
    let path = PciPath::read(&sysfs, addr("00:1f.2"), addr("02:00.0"))?;
    let v = Verdict::new(&path, &plain(), None, Some(2));
    assert_eq!(v.outcome, Outcome::Impossible, "{v}");
    assert!(has(
        &v,
        |r| matches!(r, Reason::GroupOwnedByDriver { peer, driver, .. }
        if *peer == addr("00:1f.3") && driver == "i801_smbus")
    ));
    assert!(has(
        &v,
        |r| matches!(r, Reason::NotOnVfio { driver: Some(d), .. } if d == "ahci")
    ));
    Ok(())
}

#[test]
fn vm_root_bus_functions_share_no_bridge() -> TestResult {
    let dump = load("vm-root-bus.txt")?;
    let (_tmp, sysfs) = sysfs_of(&dump, &Layout::default())?;
    let path = PciPath::read(&sysfs, addr("00:10.0"), addr("00:11.0"))?;
    assert!(path.client.bridges.is_empty() && path.provider.bridges.is_empty());
    assert_eq!(path.common, None);
    let v = Verdict::new(&path, &plain(), None, Some(2));
    assert_eq!(v.outcome, Outcome::Uncertain, "{v}");
    assert_eq!(v.translated, Some(true));
    Ok(())
}

#[test]
fn vm_switch_needs_the_identity_iova() -> TestResult {
    let dump = load("vm-switch.txt")?;
    let (_tmp, sysfs) = sysfs_of(&dump, &Layout::default())?;
    let path = PciPath::read(&sysfs, addr("03:00.0"), addr("04:00.0"))?;
    let ranges = IovaRanges::new(
        vec![
            IovaRange::new(0, 0xfedf_ffff),
            IovaRange::new(0xfef0_0000, 0xff_ffff_ffff_ffff),
        ],
        4096,
    );
    let v = Verdict::new(&path, &plain(), Some(&ranges), Some(2));
    assert_eq!(
        v.route,
        Route::Direct {
            common: addr("01:00.0")
        }
    );
    assert_eq!(v.outcome, Outcome::IdentityOnly, "{v}");
    assert_eq!(
        v.placement(ByteRange::new(0, 0x10000)).at,
        IovaPlacement::Fixed(0xfe80_0000)
    );
    // Different groups although nothing in the switch has ACS: the kernel
    // gave each downstream port its own group (pci_device_group checks the
    // ports above a downstream port, not the port itself).
    assert!(!has(&v, |r| matches!(r, Reason::SameGroup { .. })));
    // Without root, the same machine is undetermined.
    let (_tmp2, sysfs) = sysfs_of(
        &dump,
        &Layout {
            unprivileged: true,
            ..Layout::default()
        },
    )?;
    let path = PciPath::read(&sysfs, addr("03:00.0"), addr("04:00.0"))?;
    let v = Verdict::new(&path, &plain(), Some(&ranges), Some(2));
    assert_eq!(v.outcome, Outcome::Undetermined);
    Ok(())
}

#[test]
fn vm_aw39_bar_above_512_gib_is_out_of_the_iommus_reach() -> TestResult {
    let dump = load("vm-aw39-high-bar.txt")?;
    let (_tmp, sysfs) = sysfs_of(&dump, &Layout::default())?;
    let path = PciPath::read(&sysfs, addr("01:00.0"), addr("02:00.0"))?;
    // What IOMMU_IOAS_IOVA_RANGES answered in that VM with edu attached.
    let ranges = IovaRanges::new(
        vec![
            IovaRange::new(0, 0xfedf_ffff),
            IovaRange::new(0xfef0_0000, 0x7f_ffff_ffff),
        ],
        4096,
    );
    let mut platform = plain();
    // Without the DMAR table (not root): a warning, not a verdict.
    let v = Verdict::new(&path, &platform, Some(&ranges), Some(2));
    assert_eq!(v.outcome, Outcome::Uncertain, "{v}");
    assert!(has(&v, |r| matches!(
        r,
        Reason::BarAboveIovaWidth { width: 39, .. }
    )));
    // With it: the IOMMU cannot reach the BAR.
    platform.host_address_width = Some(parse_dmar_width(&dump_dmar()?)?);
    let v = Verdict::new(&path, &platform, Some(&ranges), Some(2));
    assert_eq!(v.outcome, Outcome::Impossible, "{v}");
    let bar = v.bar.ok_or("no BAR2")?;
    assert_eq!(bar.bus_address, 0x83_0000_0000);
    assert!(matches!(
        v.likely_causes()[0],
        Reason::BarAboveHostAddressWidth { width: 39, .. }
    ));
    assert!(v.to_string().contains("39-bit host address width"), "{v}");
    Ok(())
}

/// The DMAR table bytes of the aw39 VM, from the fixture's `DMAR` block.
fn dump_dmar() -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let text = fixture_text("vm-aw39-high-bar.txt")?;
    let mut bytes = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("DMAR ") {
            inside = true;
            continue;
        }
        if inside {
            let Some((_, hex)) = line.split_once(": ") else {
                break;
            };
            for b in hex.split_whitespace() {
                bytes.push(u8::from_str_radix(b, 16)?);
            }
        }
    }
    Ok(bytes)
}

#[test]
fn vm_switch_with_the_bar_in_a_reserved_iova_hole() -> TestResult {
    // The switch VM's BAR2 at bus 0xfe800000, and an IOAS whose usable
    // ranges leave a hole there (as a reserved region would): below the
    // switch only that address works, and it cannot be mapped.
    let dump = load("vm-switch.txt")?;
    let holed = IovaRanges::new(
        vec![
            IovaRange::new(0, 0xfe7f_ffff),
            IovaRange::new(0xff00_0000, 0x7f_ffff_ffff),
        ],
        4096,
    );
    let (_tmp, sysfs) = sysfs_of(&dump, &Layout::default())?;
    let path = PciPath::read(&sysfs, addr("03:00.0"), addr("04:00.0"))?;
    let v = Verdict::new(&path, &plain(), Some(&holed), Some(2));
    assert_eq!(v.outcome, Outcome::Impossible, "{v}");
    assert_eq!(v.identity_iova, None);
    assert!(matches!(
        v.likely_causes()[0],
        Reason::BarOutsideIovaRanges { width: 39, .. }
    ));
    // Without root the route is undetermined: the IOMMU may yet translate,
    // so it is not impossible, and the placement falls back to automatic.
    let (_tmp2, sysfs) = sysfs_of(
        &dump,
        &Layout {
            unprivileged: true,
            ..Layout::default()
        },
    )?;
    let path = PciPath::read(&sysfs, addr("03:00.0"), addr("04:00.0"))?;
    let v = Verdict::new(&path, &plain(), Some(&holed), Some(2));
    assert_eq!(v.outcome, Outcome::Undetermined, "{v}");
    let advice = v.placement(ByteRange::new(0, 0x1000));
    assert_eq!(advice.at, IovaPlacement::Auto);
    assert!(
        advice.why.contains("outside the IOAS's usable IOVAs"),
        "{}",
        advice.why
    );
    Ok(())
}

// ------------------------------------------- what a kernel importer is told

/// An AMD Zen CPU: `cpu_supports_p2pdma` vouches for its root complex.
fn zen() -> Platform {
    Platform {
        cpu: Cpu::parse_cpuinfo("vendor_id : AuthenticAMD\ncpu family : 25\n"),
        host_address_width: None,
    }
}

/// The verdict on importer `client` and the BAR's function `provider` of
/// dump `name` on `platform`, read as root or not.
fn kernel_verdict(
    name: &str,
    client: &str,
    provider: &str,
    platform: &Platform,
    unprivileged: bool,
) -> Result<Verdict, Box<dyn std::error::Error>> {
    let dump = load(name)?;
    let layout = Layout {
        unprivileged,
        ..Layout::default()
    };
    let (_tmp, sysfs) = sysfs_of(&dump, &layout)?;
    let path = PciPath::read(&sysfs, addr(client), addr(provider))?;
    Ok(Verdict::new(&path, platform, None, None))
}

/// `Verdict::kernel_map_type` of the same.
fn map_type(
    name: &str,
    client: &str,
    provider: &str,
    platform: &Platform,
    unprivileged: bool,
) -> Result<Option<KernelMapType>, Box<dyn std::error::Error>> {
    Ok(kernel_verdict(name, client, provider, platform, unprivileged)?.kernel_map_type())
}

/// What `pci_p2pdma_map_type()` answers a kernel importer (a DRM driver
/// mapping a VFIO BAR dma-buf) on each real topology, as
/// `calc_map_type_and_dist` works it out: bus addresses where the two
/// chains meet below the root complex with no ACS redirect on the way;
/// through the host bridge only where the kernel vouches for it (an AMD
/// Zen CPU, a listed host bridge), else not supported (the exporter's map
/// fails with EINVAL); no answer where the ACS bits are root-only.
#[test]
fn kernel_map_type_follows_calc_map_type_and_dist() -> TestResult {
    use KernelMapType::{BusAddr, NotSupported, ThruHostBridge};
    let cases: [(&str, &str, &str, Platform, Option<KernelMapType>); 9] = [
        // The test VM's switch: xio3130 ports without ACS (the virtio_gpu
        // profile's gpu0 and shm0 sit so).
        (
            "vm-switch.txt",
            "03:00.0",
            "04:00.0",
            plain(),
            Some(BusAddr),
        ),
        ("vm-switch.txt", "03:00.0", "04:00.0", zen(), Some(BusAddr)),
        // QEMU root ports, and the root bus (gpu2): through q35's host
        // bridge 8086:29c0, which is not listed.
        (
            "vm-root-ports.txt",
            "01:00.0",
            "02:00.0",
            plain(),
            Some(NotSupported),
        ),
        (
            "vm-root-ports.txt",
            "01:00.0",
            "02:00.0",
            zen(),
            Some(ThruHostBridge),
        ),
        (
            "vm-root-bus.txt",
            "00:10.0",
            "00:11.0",
            plain(),
            Some(NotSupported),
        ),
        (
            "vm-root-bus.txt",
            "00:10.0",
            "00:11.0",
            zen(),
            Some(ThruHostBridge),
        ),
        // The X58 board: a GeForce's two functions below root port 7 (ACS
        // off), and the SAS controller below the NF200 to the GeForce
        // across the ESI port's root complex.
        (
            "pciutils-tree-asus-p6t6.txt",
            "06:00.1",
            "06:00.0",
            plain(),
            Some(BusAddr),
        ),
        (
            "pciutils-tree-asus-p6t6.txt",
            "04:00.0",
            "06:00.0",
            plain(),
            Some(NotSupported),
        ),
        (
            "pciutils-tree-asus-p6t6.txt",
            "04:00.0",
            "06:00.0",
            zen(),
            Some(ThruHostBridge),
        ),
    ];
    for (name, client, provider, platform, want) in cases {
        let got = map_type(name, client, provider, &platform, false)?;
        assert_eq!(
            got, want,
            "{name}: {client} -> {provider} on {:?}",
            platform.cpu
        );
    }
    // Without root the switch's ACS bits are unreadable: no answer, as the
    // kernel's depends on them. Through the root complex, ACS does not
    // matter (every such route goes through the host bridge).
    assert_eq!(
        map_type("vm-switch.txt", "03:00.0", "04:00.0", &plain(), true)?,
        None
    );
    assert_eq!(
        map_type("vm-root-ports.txt", "01:00.0", "02:00.0", &plain(), true)?,
        Some(NotSupported)
    );
    Ok(())
}

/// What a kernel importer's refusal names: the reasons about the route
/// (where the chains meet, ACS, the host bridge), not those about an IOAS
/// or the placement in one; and the kernel's name for its answer.
#[test]
fn a_kernel_importer_is_told_the_routes_reasons() -> TestResult {
    // The variant of each reason, in order.
    let kinds = |v: &Verdict| -> Vec<String> {
        v.map_type_reasons()
            .map(|r| {
                format!("{r:?}")
                    .split([' ', '{'])
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    let answer = |v: &Verdict| v.kernel_map_type().map(|m| m.to_string());
    // gpu2 on the root bus: through q35's unlisted host bridge. The
    // verdict's placement reason is left out.
    let v = kernel_verdict("vm-root-bus.txt", "00:10.0", "00:11.0", &plain(), false)?;
    assert_eq!(kinds(&v), ["NoCommonBridge", "HostBridge"], "{v:?}");
    assert!(v.reasons.len() > 2, "{v:?}");
    assert_eq!(answer(&v).as_deref(), Some("PCI_P2PDMA_MAP_NOT_SUPPORTED"));
    // gpu0 and shm0 below the switch: where they meet, and no redirect on
    // the way; the IOVA-range and placement reasons are left out.
    let v = kernel_verdict("vm-switch.txt", "03:00.0", "04:00.0", &plain(), false)?;
    assert_eq!(kinds(&v), ["MeetAt", "NoAcsRedirect"], "{v:?}");
    assert!(v.reasons.len() > 2, "{v:?}");
    assert_eq!(answer(&v).as_deref(), Some("PCI_P2PDMA_MAP_BUS_ADDR"));
    Ok(())
}
