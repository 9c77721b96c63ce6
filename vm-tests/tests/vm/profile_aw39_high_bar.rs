//! Tests for a VM with a 39-bit intel-iommu and a 1 GiB ivshmem BAR the
//! firmware placed above 512 GiB (the `aw39_high_bar` profile: `maxmem`
//! moves q35's 64-bit PCI window to 524 GiB). The IOAS's usable IOVAs end
//! at 2^39 - 1 and the ACPI DMAR table declares a 39-bit host address
//! width: the BAR's own address cannot be an IOVA, and no IOVA can be
//! translated to it (QEMU refuses page-table entries with bits above the
//! width: "non-zero reserved fields in PTE"). The verdict says impossible;
//! mapping at the identity IOVA is refused with a typed error naming the
//! ranges; mapping anywhere else succeeds and the DMA faults, as predicted.

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use dmabuf_p2p::importer::iommufd::IovaPlacement;
use dmabuf_p2p::topology::{Outcome, Reason, Route};
use dmabuf_p2p::{ByteRange, Error};
use dmabuf_p2p_vm_tests::{Kmsg, edu_address, ivshmem_devices, vm_profile};

use super::topology::{judge, run_cli};

/// 512 GiB: the first address a 39-bit IOMMU cannot take.
const LIMIT: u64 = 1 << 39;

/// The one ivshmem device, with its 1 GiB BAR2.
fn shm() -> String {
    let devices = ivshmem_devices();
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0].1, 1 << 30, "a 1 GiB BAR2");
    devices[0].0.clone()
}

/// The BAR lies above 512 GiB, the usable IOVAs end below it, the DMAR
/// table says 39 bits: impossible, and the first likely cause says why.
#[test]
fn the_bar_lies_beyond_the_iommus_width() {
    assert_eq!(vm_profile(), "aw39_high_bar");
    let j = judge(&edu_address(), &shm());
    let bar = j.verdict.bar.expect("BAR2");
    assert!(bar.bus_address >= LIMIT, "BAR2 at {:#x}", bar.bus_address);
    assert_eq!(bar.cpu_address, bar.bus_address);
    assert_eq!(j.platform.host_address_width, Some(39));
    let top = j
        .ioas
        .iova_ranges()
        .unwrap()
        .ranges
        .iter()
        .map(|r| r.last)
        .max();
    assert_eq!(top, Some(LIMIT - 1));
    let v = &j.verdict;
    assert!(matches!(v.route, Route::RootComplex { .. }), "{v}");
    assert_eq!(v.outcome, Outcome::Impossible, "{v}");
    assert!(
        matches!(
            v.likely_causes()[0],
            Reason::BarAboveHostAddressWidth { width: 39, .. }
        ),
        "{v}"
    );
}

/// Mapping the BAR at its own address (the identity IOVA) is refused before
/// anything is mapped, with a typed error naming the usable ranges, whose
/// top is the 39-bit limit.
#[test]
fn mapping_at_the_bars_address_is_a_typed_refusal() {
    let mut j = judge(&edu_address(), &shm());
    let bus = j.verdict.bar.expect("BAR2").bus_address;
    let err = j
        .copy_into_bar(ByteRange::new(0, 0x1000), IovaPlacement::Fixed(bus), 71)
        .expect_err("an IOVA above the IOMMU's width");
    let Error::InvalidIova { iova, problem, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(*iova, bus);
    assert!(
        problem.contains("0x7fffffffff"),
        "names the ranges: {problem}"
    );
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
}

/// Mapped at an automatic IOVA the map succeeds (the kernel checks the
/// IOVA, not the physical address), and the copy faults in the IOMMU: the
/// BAR stays as it was, as the verdict predicted.
#[test]
fn dma_translated_to_the_bar_faults_as_predicted() {
    let mut j = judge(&edu_address(), &shm());
    let mut kmsg = Kmsg::open_at_end().unwrap();
    let (got, want, iova) = j
        .copy_into_bar(ByteRange::new(0x1000, 0x1000), IovaPlacement::Auto, 72)
        .unwrap();
    assert!(iova < LIMIT, "an IOVA the IOMMU takes: {iova:#x}");
    assert_ne!(got, want, "the copy must not land");
    assert!(got.iter().all(|&b| b == 0), "the BAR is unchanged");
    let faults = kmsg.iommu_faults(std::time::Duration::from_secs(2));
    assert!(
        faults
            .iter()
            .any(|f| f.contains("non-zero reserved fields in PTE")),
        "{faults:?}"
    );
}

/// `p2p-test` prints the impossible verdict first, fails, and names the
/// likely cause instead of only FAIL.
#[test]
fn p2p_test_names_the_likely_cause() {
    let (ok, text) = run_cli(
        &["p2p-test", "--engine", &edu_address(), "--target", &shm()],
        None,
    );
    assert!(!ok, "{text}");
    assert!(text.starts_with("verdict: impossible"), "{text}");
    assert!(text.contains("p2p-test: FAIL"), "{text}");
    assert!(
        text.contains("p2p-test: the data did not arrive as sent: unchanged: nothing arrived"),
        "{text}"
    );
    assert!(
        text.contains("likely cause: BAR2 at 0x") && text.contains("39-bit host address width"),
        "{text}"
    );
}

/// `topology` reports the limit: the usable IOVAs, the DMAR width, and the
/// verdict with its reason.
#[test]
fn topology_command_reports_the_limit() {
    let (ok, text) = run_cli(&["topology", &edu_address(), &format!("{}:2", shm())], None);
    assert!(ok, "{text}");
    for needle in [
        "0xfef00000..=0x7fffffffff",
        "IOMMU host address width: 39 bits (ACPI DMAR)",
        "verdict: impossible",
        "above the IOMMU's 39-bit host address width",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    assert!(!text.contains("placement:"), "{text}");
}
