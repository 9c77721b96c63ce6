//! Automatic IOVA placement against the real kernel: a BAR range lands at an
//! IOVA congruent to its physical start modulo the largest IOMMU page that
//! fits (so the IOMMU can use 2 MiB pages for the 64 MiB ivshmem BAR, which
//! the kernel's own placement does not promise without THP), an area the
//! library did not make is stepped over (the kernel's `EEXIST`), the
//! allowed list is honoured, and a restore keeps the IOVA.

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::{AsFd, AsRawFd};

use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, IovaRange, MapPerms};
use dmabuf_p2p::importer::placement::IommuPageSizes;
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{Attachment, RestorePolicy};
use dmabuf_p2p::vfio::VfioPciDevice;
use dmabuf_p2p::{ByteRange, PciAddress};
use dmabuf_p2p_vm_tests::ivshmem_devices;

use super::uapi;

const PAGE: u64 = 4096;
const MIB2: u64 = 2 << 20;

/// The 64 MiB ivshmem, bound to a fresh iommufd, attached to a fresh IOAS
/// (so mappings fill real IOMMU page tables), memory decode on.
fn bar_device() -> (Iommufd, dmabuf_p2p::Ioas, VfioPciDevice, u64) {
    let (bdf, size) = ivshmem_devices()
        .into_iter()
        .find(|(_, s)| *s == 64 << 20)
        .expect("a 64 MiB ivshmem");
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut dev = VfioPciDevice::open(bdf.parse::<PciAddress>().unwrap()).unwrap();
    dev.bind(&iommufd).unwrap();
    dev.attach(&ioas).unwrap();
    dev.set_memory_decode(true).unwrap();
    (iommufd, ioas, dev, size)
}

#[test]
fn auto_placement_aligns_a_bar_with_its_physical_start() {
    let (_iommufd, ioas, dev, size) = bar_device();
    assert_eq!(ioas.iommu_page_sizes(), IommuPageSizes::X86);
    let phys = dev.bar(2).unwrap().phys_start();
    // Something small first, so the lowest free IOVA is not aligned by luck.
    let memfd = Memfd::new("placement-small", PAGE).unwrap();
    let small = ioas
        .map_file(
            &memfd,
            ByteRange::new(0, PAGE),
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
        )
        .unwrap();
    println!("small at {:#x}", small.iova());

    // The whole BAR: 2 MiB is the largest IOMMU page of 64 MiB.
    let whole = dev.export_bar(2, &[ByteRange::new(0, size)]).unwrap();
    let att = Attachment::map(
        &whole,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    println!("BAR at {phys:#x}, mapped at IOVA {:#x}", att.iova());
    assert_eq!(att.iova() % MIB2, phys % MIB2);
    assert!(
        att.iova() >= small.iova() + PAGE || att.iova() + size <= small.iova(),
        "overlaps the small mapping"
    );

    // A range starting one page into a 2 MiB block: the IOVA keeps that
    // offset, so the blocks after it still use 2 MiB pages.
    let part = dev
        .export_bar(2, &[ByteRange::new(MIB2 + PAGE, 8 * MIB2)])
        .unwrap();
    let part_phys = part.phys_ranges()[0].start;
    let part_att = Attachment::map(
        &part,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::Read,
        RestorePolicy::Automatic,
    )
    .unwrap();
    println!(
        "part at {part_phys:#x}, mapped at IOVA {:#x}",
        part_att.iova()
    );
    assert_eq!(part_att.iova() % MIB2, part_phys % MIB2);
    assert_eq!(part_att.iova() % MIB2, PAGE);

    // The plain map of the whole buffer (no physical address given) is
    // aligned too: a BAR starts at a multiple of its size.
    let plain = ioas
        .map_dmabuf(whole.dmabuf(), IovaPlacement::Auto, MapPerms::Read)
        .unwrap();
    assert_eq!(plain.iova() % MIB2, 0);
    let areas = [
        (small.iova(), PAGE),
        (att.iova(), size),
        (part_att.iova(), 8 * MIB2),
        (plain.iova(), size),
    ];
    for (i, a) in areas.iter().enumerate() {
        for b in &areas[i + 1..] {
            assert!(
                a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                "{a:x?} and {b:x?} overlap"
            );
        }
    }

    // Restores come back at the same IOVA.
    let iova = att.iova();
    dev.set_memory_decode(false).unwrap();
    assert!(att.is_revoked());
    dev.set_memory_decode(true).unwrap();
    assert!(!att.is_revoked());
    assert_eq!(att.iova(), iova);
}

/// Maps `memfd` at a fixed IOVA with a raw ioctl: an area the library does
/// not know about.
fn raw_map(iommufd: &Iommufd, ioas_id: u32, memfd: &Memfd, iova: u64, length: u64) {
    let arg = uapi::iommu_ioas_map_file {
        size: std::mem::size_of::<uapi::iommu_ioas_map_file>() as u32,
        flags: uapi::IOMMU_IOAS_MAP_FIXED_IOVA
            | uapi::IOMMU_IOAS_MAP_READABLE
            | uapi::IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id,
        fd: memfd.as_fd().as_raw_fd(),
        start: 0,
        length,
        iova,
    };
    // SAFETY: the argument is a valid, initialised `iommu_ioas_map_file`
    // that the kernel reads and writes back; both fds are open.
    let ret = unsafe {
        libc::ioctl(
            iommufd.as_raw_fd(),
            uapi::IOMMU_IOAS_MAP_FILE as libc::c_ulong,
            &arg,
        )
    };
    assert_eq!(ret, 0, "raw map: {}", std::io::Error::last_os_error());
}

#[test]
fn auto_placement_steps_over_areas_it_did_not_make() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let foreign = Memfd::new("placement-foreign", PAGE).unwrap();
    // The first 2 MiB-aligned IOVA placement would pick.
    raw_map(&iommufd, ioas.id(), &foreign, MIB2, PAGE);
    let memfd = Memfd::new("placement-2m", MIB2).unwrap();
    let map = ioas
        .map_file(
            &memfd,
            ByteRange::new(0, MIB2),
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
        )
        .unwrap();
    assert_eq!(map.iova(), 2 * MIB2);
    // The next one goes after it, still 2 MiB-aligned.
    let next = ioas
        .map_file(
            &memfd,
            ByteRange::new(0, MIB2),
            IovaPlacement::Auto,
            MapPerms::Read,
        )
        .unwrap();
    assert_eq!(next.iova(), 3 * MIB2);
}

#[test]
fn auto_placement_honours_the_allowed_list() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let window = IovaRange::new(0x4000_1000, 0x4fff_ffff);
    ioas.allow_iovas(&[window]).unwrap();
    let memfd = Memfd::new("placement-allowed", MIB2).unwrap();
    let map = ioas
        .map_file(
            &memfd,
            ByteRange::new(0, MIB2),
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
        )
        .unwrap();
    assert!(window.contains(map.iova(), MIB2), "{map}");
    assert_eq!(map.iova(), 0x4020_0000);
    let mut map = map;
    map.remap().unwrap();
    assert_eq!(map.iova(), 0x4020_0000);
}
