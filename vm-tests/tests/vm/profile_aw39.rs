//! Tests for a VM whose intel-iommu is 39 bits wide (the `aw39` profile).

use dmabuf_p2p::Iommufd;
use dmabuf_p2p::vfio::VfioPciDevice;

use dmabuf_p2p_vm_tests::{edu_address, vm_profile};

/// The IOMMU's address width bounds the IOAS: once a device behind a 39-bit
/// intel-iommu is attached, no usable IOVA range reaches 512 GiB.
#[test]
fn the_iommu_address_width_bounds_the_usable_iovas() {
    assert_eq!(vm_profile(), "aw39");
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let before = ioas.iova_ranges().unwrap();
    let top_before = before.ranges.iter().map(|r| r.last).max();
    assert_eq!(top_before, Some(u64::MAX), "an empty IOAS: {before:?}");
    let mut edu = VfioPciDevice::open(edu_address().parse().unwrap()).unwrap();
    edu.bind(&iommufd).unwrap();
    edu.attach(&ioas).unwrap();
    let after = ioas.iova_ranges().unwrap();
    let top = after.ranges.iter().map(|r| r.last).max();
    assert_eq!(top, Some((1u64 << 39) - 1), "usable ranges: {after:?}");
}
