//! Tests for a VM whose edu0 and shm0 sit below one PCIe switch (the
//! `switch` profile): a pcie-root-port, an x3130-upstream port and two
//! xio3130-downstream ports, which in QEMU 7.2 have no ACS capability. The
//! verdict: the traffic turns in the switch, untranslated, so only the
//! identity IOVA (the BAR's bus address) reaches the BAR; the test maps it
//! there and the copy lands.
//!
//! QEMU does not model routing inside a switch: every DMA goes through its
//! vIOMMU, whatever its address. So a copy to an automatic IOVA lands here
//! too, where on hardware it would leave the switch (or hit a sibling);
//! [`qemu_translates_every_dma_whatever_the_switch`] records that.
//!
//! BAR areas of shm0: 0x30000.. (identity copy), 0x40000.. (automatic copy),
//! 0..0x10000 (`p2p-test`).

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::importer::iommufd::IovaPlacement;
use dmabuf_p2p::topology::{Outcome, PcieType, Probe, Reason, Route};
use dmabuf_p2p_vm_tests::{edu_address, request_host_check, shm_address, vm_profile};

use super::topology::{judge, run_cli};

/// The chains meet at the switch's upstream port; no port of the switch
/// has ACS; the verdict is the identity IOVA, and a copy there lands.
#[test]
fn the_switch_turns_the_traffic_and_the_identity_iova_reaches_the_bar() {
    assert_eq!(vm_profile(), "switch");
    let mut j = judge(&edu_address(), &shm_address("shm0"));
    let kinds: Vec<Probe<PcieType>> = j
        .path
        .provider
        .bridges
        .iter()
        .map(|b| b.pcie_type)
        .collect();
    assert_eq!(
        kinds,
        [
            Probe::Present(PcieType::SwitchDownstream),
            Probe::Present(PcieType::SwitchUpstream),
            Probe::Present(PcieType::RootPort)
        ]
    );
    let upstream = j.path.provider.bridges[1].address;
    assert_eq!(j.path.common, Some(upstream));
    assert_eq!(
        j.path.provider.bridges[0].acs,
        Probe::Absent,
        "xio3130-downstream"
    );
    assert_eq!(
        j.path.client.bridges[0].acs,
        Probe::Absent,
        "xio3130-downstream"
    );
    assert_eq!(
        j.path.provider.bridges[1].acs,
        Probe::Absent,
        "x3130-upstream"
    );
    let v = j.verdict.clone();
    assert_eq!(v.route, Route::Direct { common: upstream }, "{v}");
    assert_eq!(v.outcome, Outcome::IdentityOnly, "{v}");
    assert_eq!(v.translated, Some(false));
    assert!(
        v.reasons
            .iter()
            .any(|r| matches!(r, Reason::NoAcsRedirect { .. }))
    );
    let bar = v.bar.expect("BAR2");
    const AREA: u64 = 0x3_0000;
    let advice = v.placement(ByteRange::new(AREA, 0x1000));
    assert_eq!(
        advice.at,
        IovaPlacement::Fixed(bar.bus_address + AREA),
        "{}",
        advice.why
    );
    let (got, want, iova) = j
        .copy_into_bar(ByteRange::new(AREA, 0x1000), advice.at, 61)
        .unwrap();
    assert_eq!(iova, bar.bus_address + AREA);
    assert_eq!(got, want, "the copy to the identity IOVA landed");
    request_host_check("shm0", AREA, &want);
}

/// QEMU sends every DMA through its vIOMMU, even between two functions
/// below one switch without ACS: a copy to an automatic IOVA lands too. On
/// hardware the switch would route such an address by its value, past the
/// IOMMU; this VM cannot show that failure, only that the verdict's IOVA
/// works.
#[test]
fn qemu_translates_every_dma_whatever_the_switch() {
    let mut j = judge(&edu_address(), &shm_address("shm0"));
    const AREA: u64 = 0x4_0000;
    let (got, want, iova) = j
        .copy_into_bar(ByteRange::new(AREA, 0x1000), IovaPlacement::Auto, 62)
        .unwrap();
    let bar = j.verdict.bar.expect("BAR2");
    assert_ne!(
        iova,
        bar.bus_address + AREA,
        "an IOVA other than the bus address"
    );
    assert_eq!(got, want);
    request_host_check("shm0", AREA, &want);
}

/// `p2p-test` prints the verdict first, maps the target at its bus address
/// (the placement it names), and passes.
#[test]
fn p2p_test_maps_the_target_at_its_bus_address() {
    let j = judge(&edu_address(), &shm_address("shm0"));
    let bus = j.verdict.bar.expect("BAR2").bus_address;
    drop(j);
    let (ok, text) = run_cli(
        &[
            "p2p-test",
            "--engine",
            &edu_address(),
            "--target",
            &shm_address("shm0"),
        ],
        None,
    );
    assert!(ok, "{text}");
    assert!(
        text.starts_with("verdict: works at the identity IOVA only (direct through"),
        "{text}"
    );
    assert!(text.contains(&format!("mapped at IOVA {bus:#x}")), "{text}");
    assert!(
        text.contains(&format!("placement: identity IOVA {bus:#x}")),
        "{text}"
    );
    assert!(text.contains("p2p-test: PASS"), "{text}");
}

/// `topology` as root shows the switch and where the paths meet; as an
/// unprivileged user (sysfs gives it 64 bytes of each configuration space)
/// the ACS bits are unreadable and the verdict says so, offering the
/// identity IOVA all the same.
#[test]
fn topology_command_with_and_without_root() {
    let (edu, shm) = (edu_address(), shm_address("shm0"));
    let (ok, text) = run_cli(&["topology", &edu, &shm], None);
    assert!(ok, "{text}");
    for needle in [
        "switch upstream port [no ACS",
        "<- the paths meet here",
        "switch downstream port [no ACS",
        "verdict: works at the identity IOVA only",
        "placement: identity IOVA",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    let (ok, text) = run_cli(&["topology", &edu, &shm], Some(65534));
    assert!(ok, "{text}");
    for needle in [
        "[ACS unreadable",
        "verdict: undetermined",
        "root-only in sysfs",
        "usable IOVAs: unknown",
        "placement: identity IOVA",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
}
