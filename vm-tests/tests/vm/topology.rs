//! The topology verdict in the standard VM, where edu0 and every ivshmem
//! device sit on pcie-root-ports of their own: QEMU 7.2's root ports have an
//! ACS capability (SV TB RR CR UF DT), which the kernel turns on (SV RR CR
//! UF, `pci_std_enable_acs`); the two functions share no bridge, so the
//! traffic passes the root complex, q35's host bridge 8086:29c0, which the
//! kernel's `pci_p2pdma_whitelist` does not list (and QEMU's TCG CPU is
//! AuthenticAMD family 15, not a Zen): the verdict is "uncertain", and the
//! copy lands, because QEMU forwards everything.
//!
//! The helpers here are the other topology tests' too (`profile_root_bus`,
//! `profile_switch`, `profile_aw39_high_bar`).
//!
//! BAR area: shm1's BAR2 0x390_0000..0x390_1000 (host-checked; faults.rs owns 0x3c0_0000).

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::importer::iommufd::{Ioas, Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{Attachment, RestorePolicy};
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p::topology::{
    AcsFlags, HostBridgeSupport, Outcome, PciPath, Platform, Reason, Route, Verdict,
};
use dmabuf_p2p::vfio::VfioPciDevice;
use dmabuf_p2p::{PciAddress, Result};
use dmabuf_p2p_engine::DmaEngine;
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_vm_tests::{
    DMA_TIMEOUT, bar_read, bar_write, edu_address, pattern, request_host_check, shm_address,
    vm_profile,
};

/// The CLI inside the VM.
const CLI: &str = "/bin/dmabuf-p2p";

/// Runs the CLI as root (or as `uid`): whether it succeeded, and stdout then
/// stderr.
pub(super) fn run_cli(args: &[&str], uid: Option<u32>) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(CLI);
    cmd.args(args);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().expect("run /bin/dmabuf-p2p");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// An engine attached to a new IOAS, the target bound to the same iommufd
/// with memory decode on, and the verdict on the pair for BAR2, judged with
/// that IOAS's usable ranges, as root sees the machine.
pub(super) struct Judged {
    pub(super) ioas: Ioas,
    pub(super) engine: Edu,
    pub(super) target: VfioPciDevice,
    pub(super) path: PciPath,
    pub(super) verdict: Verdict,
    pub(super) platform: Platform,
    // Last: the device and the IOAS go first.
    _iommufd: Iommufd,
}

pub(super) fn judge(engine: &str, target: &str) -> Judged {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let engine_addr: PciAddress = engine.parse().unwrap();
    let target_addr: PciAddress = target.parse().unwrap();
    let edu = Edu::open(engine_addr, &ioas).unwrap();
    let mut dev = VfioPciDevice::open(target_addr).unwrap();
    dev.bind(&iommufd).unwrap();
    dev.set_memory_decode(true).unwrap();
    let sysfs = Sysfs::default();
    let path = PciPath::read(&sysfs, engine_addr, target_addr).unwrap();
    let platform = Platform::read(&sysfs).unwrap();
    let ranges = ioas.iova_ranges().unwrap();
    let verdict = Verdict::new(&path, &platform, Some(&ranges), Some(2));
    Judged {
        ioas,
        engine: edu,
        target: dev,
        path,
        verdict,
        platform,
        _iommufd: iommufd,
    }
}

impl Judged {
    /// Maps `range` of the target's BAR2 at `at` and has the engine copy a
    /// page of a pattern to its start; what the BAR holds there afterwards,
    /// and the IOVA it was mapped at. A refused map is returned as the error.
    pub(super) fn copy_into_bar(
        &mut self,
        range: ByteRange,
        at: IovaPlacement,
        seed: u64,
    ) -> Result<(Vec<u8>, Vec<u8>, u64)> {
        let bar = self.target.map_bar(2).unwrap();
        bar_write(&bar, range.offset, &[0u8; 4096]);
        let export = self.target.export_bar(2, &[range]).unwrap();
        let att = Attachment::map(
            &export,
            &self.ioas,
            at,
            MapPerms::ReadWrite,
            RestorePolicy::Automatic,
        )?;
        let data = pattern(seed, 4096);
        let src = Memfd::new("topology-src", 4096).unwrap();
        src.write_at(0, &data).unwrap();
        let src_map = self
            .ioas
            .map_file(
                &src,
                ByteRange::new(0, 4096),
                IovaPlacement::Auto,
                MapPerms::Read,
            )
            .unwrap();
        self.engine
            .memcpy(src_map.iova(), att.iova(), 4096, DMA_TIMEOUT)
            .unwrap();
        Ok((bar_read(&bar, range.offset, 4096), data, att.iova()))
    }
}

/// Both root ports have ACS with redirect on, the functions share no
/// bridge, and the root complex is q35's unlisted host bridge: through the
/// root complex, translated, uncertain. The copy lands at the automatic IOVA
/// the verdict offers.
#[test]
fn root_ports_send_the_traffic_through_the_root_complex() {
    assert_eq!(vm_profile(), "standard");
    let mut j = judge(&edu_address(), &shm_address("shm1"));
    for up in [&j.path.client, &j.path.provider] {
        let rp = &up.bridges[0];
        assert_eq!(rp.kind(), "root port", "{rp:?}");
        let acs = rp.acs.present().expect("QEMU's root ports have ACS");
        assert_eq!(acs.capability, AcsFlags(0x5f), "SV TB RR CR UF DT");
        assert!(acs.control.contains(AcsFlags::ISOLATING), "{}", acs.control);
        assert!(acs.redirects());
        assert!(up.bridges.len() == 1, "one root port above each device");
    }
    assert_eq!(j.path.common, None);
    let v = &j.verdict;
    let Route::RootComplex { support, .. } = &v.route else {
        panic!("{v}");
    };
    assert!(
        matches!(
            support,
            HostBridgeSupport::NotListed {
                vendor: 0x8086,
                device: 0x29c0,
                ..
            }
        ),
        "{support:?}"
    );
    assert!(!j.platform.cpu.supports_p2pdma(), "{:?}", j.platform.cpu);
    assert_eq!(v.outcome, Outcome::Uncertain, "{v}");
    assert_eq!(v.translated, Some(true));
    assert!(
        !v.reasons
            .iter()
            .any(|r| matches!(r, Reason::SameGroup { .. }))
    );
    const AREA: u64 = 0x390_0000;
    let advice = v.placement(ByteRange::new(AREA, 0x1000));
    assert_eq!(advice.at, IovaPlacement::Auto);
    let (got, want, _) = j
        .copy_into_bar(ByteRange::new(AREA, 0x1000), advice.at, 41)
        .unwrap();
    assert_eq!(got, want, "the copy through the root complex landed");
    request_host_check("shm1", AREA, &want);
}

/// `topology` prints the tree (host bridge, root ports with their ACS, the
/// two functions), the usable IOVAs of an IOAS with the engine attached,
/// and the verdict; `--json` has the same verdict.
#[test]
fn topology_command_prints_the_tree_and_the_verdict() {
    let (edu, shm) = (edu_address(), shm_address("shm1"));
    let (ok, text) = run_cli(&["topology", &edu, &format!("{shm}:2")], None);
    assert!(ok, "{text}");
    for needle in [
        "pci0000:00 host bridge (root complex), 0000:00:00.0 8086:29c0",
        "root port [ACS SV RR CR UF",
        &format!("engine: {edu} 1234:11e8 conventional PCI function"),
        &format!("target: {shm} 1af4:1110"),
        "BAR2 at bus address",
        "usable IOVAs (IOAS with the engine attached): 0x0..=0xfedfffff",
        "verdict: uncertain (through the root complex, translated by the IOMMU)",
        "pci_p2pdma_whitelist",
        "placement: automatic",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    let (ok, json) = run_cli(&["--json", "topology", &edu, &shm, "--no-ioas"], None);
    assert!(ok, "{json}");
    assert!(json.contains("\"outcome\": \"uncertain\""), "{json}");
    assert!(
        json.contains("\"iova_ranges_unknown\": \"not asked (--no-ioas)\""),
        "{json}"
    );
}

/// `devices` shows each function's path up to its host bridge.
#[test]
fn devices_shows_each_functions_upstream_path() {
    let (ok, text) = run_cli(&["devices"], None);
    assert!(ok, "{text}");
    let edu = edu_address();
    let block: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with(&edu))
        .take(3)
        .collect();
    assert!(
        block
            .iter()
            .any(|l| l.contains("upstream: 0000:00:10.0 root port (ACS SV RR CR UF) > pci0000:00")),
        "{block:?}"
    );
    assert!(
        text.lines()
            .skip_while(|l| !l.starts_with("0000:00:10.0"))
            .nth(1)
            .is_some_and(|l| l.contains("upstream: on the root bus of pci0000:00")),
        "{text}"
    );
}
