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

/// Limits are answers (issue 24, issue 25 §3), behind a 39-bit vIOMMU: a
/// BAR the guest programs at 512 GiB is refused with a typed reason naming
/// the usable ranges and the 39-bit width, and the other BAR, programmed
/// below, is mapped and DMA lands in it; a BAR programmed over the VMM's
/// guest RAM is refused naming the RAM, and the RAM is untouched (its bytes
/// the same, its mapping still there: edu still copies from it). The
/// library's own fixed map at 512 GiB says the same in its error.
#[test]
fn a_bar_above_the_iommu_width_or_over_guest_ram_is_refused_and_the_rest_lands() {
    use dmabuf_p2p::vmm::{BarStatus, Unreachable};
    use dmabuf_p2p::{Error, IovaPlacement, MapPerms};
    use dmabuf_p2p_vm_tests::{ivshmem_devices, pattern, shm_address};

    use super::guest_vmm::{GuestVmm, RAM_GPA, RAM_SIZE};

    assert_eq!(vm_profile(), "aw39");
    let small = ivshmem_devices()
        .into_iter()
        .find(|(_, s)| *s == 64 << 10)
        .unwrap()
        .0;
    let (mut vmm, ids) = GuestVmm::new(&[shm_address("shm0"), small], false);
    let (high, low) = (ids[0], ids[1]);
    vmm.place(high, 2, 1 << 39);
    vmm.place(low, 2, 0x40_0000_0000);
    match vmm.map.bar_status(high, 2).unwrap() {
        BarStatus::Unreachable(
            why @ Unreachable::OutsideIovaRanges {
                address_width: 39, ..
            },
        ) => {
            let text = why.to_string();
            assert!(
                text.contains("0x7fffffffff") && text.contains("39 bits"),
                "{text}"
            );
        }
        other => panic!("BAR2 at 512 GiB: {other:?}"),
    }
    assert_eq!(vmm.mapped_at(low, 2), Some(0x40_0000_0000));
    vmm.copy_lands(
        low,
        2,
        0x8000,
        &pattern(3901, 0x100),
        "the BAR below 512 GiB",
    );

    // The library's own map at a fixed IOVA past the width.
    let dev = vmm.map.vfio_device(high).unwrap();
    let export = dev
        .export_bar(2, &[dmabuf_p2p::ByteRange::new(0, 0x1000)])
        .unwrap();
    match vmm.map.ioas().map_dmabuf(
        export.dmabuf(),
        IovaPlacement::Fixed(1 << 39),
        MapPerms::ReadWrite,
    ) {
        Err(Error::InvalidIova { problem, .. }) => assert!(
            problem.contains("IOMMU address width 39 bits") && problem.contains("0x7fffffffff"),
            "{problem}"
        ),
        other => panic!("a fixed map at 512 GiB: {other:?}"),
    }
    drop(export);

    // Over guest RAM.
    let ram_before = {
        let mut b = vec![0u8; RAM_SIZE as usize];
        vmm.ram.read_at(0, &mut b).unwrap();
        b
    };
    vmm.place(high, 2, RAM_GPA);
    match vmm.map.bar_status(high, 2).unwrap() {
        BarStatus::Unreachable(Unreachable::CollidesWithVmm { label, vmm: r, .. }) => {
            assert_eq!(label, "guest RAM");
            assert_eq!(r.start, RAM_GPA);
        }
        other => panic!("BAR2 over guest RAM: {other:?}"),
    }
    let mut ram_after = vec![0u8; RAM_SIZE as usize];
    vmm.ram.read_at(0, &mut ram_after).unwrap();
    assert!(ram_after == ram_before, "guest RAM changed");
    vmm.copy_lands(
        low,
        2,
        0x8100,
        &pattern(3902, 0x100),
        "from guest RAM, still mapped",
    );
}
