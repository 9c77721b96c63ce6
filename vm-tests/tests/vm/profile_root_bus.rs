//! Tests for a VM whose edu0 and shm0 sit on the root bus `pcie.0` (the
//! `root_bus` profile): no bridge between them, so peer-to-peer traffic
//! passes the root complex. BAR areas of shm0: 0x20000..0x21000 (the
//! library's copy, host-checked), 0..0x10000 (`p2p-test`).

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::importer::iommufd::IovaPlacement;
use dmabuf_p2p::topology::{HostBridgeDevice, Outcome, Route};
use dmabuf_p2p_vm_tests::{edu_address, request_host_check, shm_address, vm_profile};

use super::topology::{judge, run_cli};

/// Root-bus functions have no bridge above them; the host bridge is q35's
/// 00:00.0; the route is the root complex, translated by the IOMMU, and the
/// copy at the automatic IOVA the verdict offers lands.
#[test]
fn root_bus_functions_meet_in_the_root_complex() {
    assert_eq!(vm_profile(), "root_bus");
    let (edu, shm) = (edu_address(), shm_address("shm0"));
    assert!(edu.starts_with("0000:00:") && shm.starts_with("0000:00:"));
    let mut j = judge(&edu, &shm);
    assert!(j.path.client.bridges.is_empty() && j.path.provider.bridges.is_empty());
    assert_eq!(j.path.common, None);
    assert!(matches!(
        j.path.client.host_bridge.device,
        HostBridgeDevice::Found {
            vendor: 0x8086,
            device: 0x29c0,
            ..
        }
    ));
    let v = &j.verdict;
    assert!(matches!(v.route, Route::RootComplex { .. }), "{v}");
    assert_eq!(v.outcome, Outcome::Uncertain, "{v}");
    assert_eq!(v.translated, Some(true));
    const AREA: u64 = 0x2_0000;
    let at = v.placement(ByteRange::new(AREA, 0x1000)).at;
    assert_eq!(at, IovaPlacement::Auto);
    let (got, want, _) = j
        .copy_into_bar(ByteRange::new(AREA, 0x1000), at, 51)
        .unwrap();
    assert_eq!(got, want, "the copy through the root complex landed");
    request_host_check("shm0", AREA, &want);
}

/// `p2p-test` prints the verdict before anything else, then passes.
#[test]
fn p2p_test_prints_the_verdict_first() {
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
        text.starts_with("verdict: uncertain (through the root complex, translated by the IOMMU)"),
        "{text}"
    );
    assert!(text.contains("placement: automatic"), "{text}");
    assert!(text.contains("p2p-test: PASS"), "{text}");
}
