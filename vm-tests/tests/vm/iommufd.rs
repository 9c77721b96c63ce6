//! The iommufd importer against the real kernel: IOAS lifetime, IOVA ranges,
//! user-memory and memfd maps, VFIO BAR dma-bufs at fixed and kernel-chosen
//! IOVAs, the dma-bufs iommufd refuses (two ranges, udmabuf, revoked), IOVA
//! collisions, wrong IDs, remapping after a revoke, and drop order. Every
//! error path is checked to leave the fd count unchanged.

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsFd;

use dmabuf_p2p::exporter::bar::BarExport;
use dmabuf_p2p::exporter::udmabuf::Udmabuf;
use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::vfio::VfioPciDevice;
use dmabuf_p2p::{ByteRange, Error, PciAddress, RangeProblem};
use dmabuf_p2p_vm_tests::{EDU_ID, ivshmem_devices, open_fd_count, pci_devices};

const PAGE: u64 = 4096;
/// An IOVA well inside the usable space of the emulated intel-iommu.
const FIXED: u64 = 0x4000_0000;

fn small_shm() -> (PciAddress, u64) {
    let (bdf, size) = ivshmem_devices()
        .into_iter()
        .find(|(_, s)| *s == 1 << 20)
        .expect("a 1 MiB ivshmem");
    (bdf.parse().unwrap(), size)
}

fn edu() -> PciAddress {
    pci_devices(EDU_ID)
        .first()
        .expect("an edu device")
        .parse()
        .unwrap()
}

/// An iommufd with the 1 MiB ivshmem bound, memory decode on.
fn exporter() -> (Iommufd, VfioPciDevice, u64) {
    let (shm, size) = small_shm();
    let iommufd = Iommufd::open().unwrap();
    let mut dev = VfioPciDevice::open(shm).unwrap();
    dev.bind(&iommufd).unwrap();
    dev.set_memory_decode(true).unwrap();
    (iommufd, dev, size)
}

fn export(dev: &VfioPciDevice, ranges: &[ByteRange]) -> BarExport {
    dev.export_bar(2, ranges).unwrap()
}

#[test]
fn ioas_alloc_and_destroy() {
    let before = open_fd_count();
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let id = ioas.id();
    let clone = ioas.clone();
    assert!(clone.same_ioas(&ioas));
    let other = iommufd.alloc_ioas().unwrap();
    assert_ne!(other.id(), id);
    assert!(!other.same_ioas(&ioas));
    drop(ioas);
    // A clone keeps it alive.
    assert!(iommufd.iova_ranges(id).is_ok());
    drop(clone);
    // Destroyed with the last handle: the ID is gone.
    match iommufd.iova_ranges(id) {
        Err(e @ Error::UnknownObject { .. }) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT)),
        other => panic!("IOVA ranges of a destroyed IOAS: {other:?}"),
    }
    drop((other, iommufd));
    assert_eq!(open_fd_count(), before);
}

#[test]
fn iova_ranges_are_non_empty() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let empty = ioas.iova_ranges().unwrap();
    assert!(!empty.ranges.is_empty());
    assert!(
        empty.alignment.is_power_of_two() && empty.alignment <= PAGE,
        "{empty:?}"
    );
    println!(
        "IOAS without devices: {:?}, alignment {:#x}",
        empty
            .ranges
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        empty.alignment
    );

    // Attaching a device behind the intel-iommu narrows the ranges (its
    // aperture and the MSI window are reserved).
    let mut dev = VfioPciDevice::open(edu()).unwrap();
    dev.bind(&iommufd).unwrap();
    dev.attach(&ioas).unwrap();
    let attached = ioas.iova_ranges().unwrap();
    assert!(!attached.ranges.is_empty());
    assert!(attached.contains(FIXED, PAGE), "{attached:?}");
    println!(
        "IOAS with edu: {:?}, alignment {:#x}",
        attached
            .ranges
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        attached.alignment
    );
}

#[test]
fn wrong_ioas_id_is_unknown_object() {
    let iommufd = Iommufd::open().unwrap();
    let before = open_fd_count();
    for id in [0, 0xdead, u32::MAX] {
        match iommufd.iova_ranges(id) {
            Err(Error::UnknownObject { id: got, op, .. }) => {
                assert_eq!((got, op), (id, "IOMMU_IOAS_IOVA_RANGES"))
            }
            other => panic!("IOVA ranges of IOAS {id:#x}: {other:?}"),
        }
    }
    assert_eq!(open_fd_count(), before);
}

#[test]
fn map_user_memory_and_unmap() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mem = dmabuf_p2p_vm_tests::AnonPages::new(64 << 10);
    let before = open_fd_count();
    {
        // SAFETY: `mem` outlives the mapping (dropped at the end of this
        // block) and is not accessed by Rust while mapped.
        let mut map = unsafe {
            ioas.map_user(
                mem.ptr(),
                mem.len(),
                IovaPlacement::Auto,
                MapPerms::ReadWrite,
            )
        }
        .unwrap();
        assert_ne!(map.iova(), 0);
        assert_eq!(map.length(), 64 << 10);
        assert_eq!(map.ioas_id(), ioas.id());
        assert_eq!(map.source_offset(), mem.ptr().as_ptr() as u64);
        assert!(map.source_fd().is_none());
        assert_eq!(map.unmap().unwrap(), 64 << 10);
        assert!(!map.is_mapped());
        assert_eq!(map.unmap().unwrap(), 0);

        // SAFETY: as above.
        let fixed = unsafe {
            ioas.map_user(
                mem.ptr(),
                mem.len(),
                IovaPlacement::Fixed(FIXED),
                MapPerms::Read,
            )
        }
        .unwrap();
        assert_eq!(fixed.iova(), FIXED);
        // SAFETY: as above; this one must fail (same IOVA).
        let clash = unsafe {
            ioas.map_user(
                mem.ptr(),
                4096,
                IovaPlacement::Fixed(FIXED + PAGE),
                MapPerms::Read,
            )
        };
        match clash {
            Err(Error::InvalidIova {
                ioas: i,
                iova,
                length,
                problem,
                source,
            }) => {
                assert_eq!((i, iova, length), (ioas.id(), FIXED + PAGE, PAGE));
                assert!(problem.contains("EEXIST"), "{problem}");
                assert_eq!(source.and_then(|e| e.raw_os_error()), Some(libc::EEXIST));
            }
            other => panic!("overlapping user map: {other:?}"),
        }
        // SAFETY: a zero-length request is refused before the ioctl.
        let empty = unsafe { ioas.map_user(mem.ptr(), 0, IovaPlacement::Auto, MapPerms::Read) };
        assert!(matches!(
            empty,
            Err(Error::InvalidRange {
                problem: RangeProblem::Empty,
                ..
            })
        ));
    }
    assert_eq!(open_fd_count(), before);
}

#[test]
fn map_file_of_a_memfd() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    // With a device attached, MAP_FILE pins and checks the pages at once.
    let mut dev = VfioPciDevice::open(edu()).unwrap();
    dev.bind(&iommufd).unwrap();
    dev.attach(&ioas).unwrap();
    let memfd = Memfd::new("iommufd-test", 256 << 10).unwrap();
    let before = open_fd_count();
    {
        let auto = ioas
            .map_file(
                &memfd,
                ByteRange::new(0, 256 << 10),
                IovaPlacement::Auto,
                MapPerms::ReadWrite,
            )
            .unwrap();
        assert_ne!(auto.iova(), 0);
        assert!(auto.dmabuf().is_none());
        assert_eq!(
            open_fd_count(),
            before + 1,
            "the mapping keeps a dup of the memfd"
        );
        let fixed = ioas
            .map_file(
                memfd.as_fd(),
                ByteRange::new(64 << 10, 64 << 10),
                IovaPlacement::Fixed(FIXED),
                MapPerms::Read,
            )
            .unwrap();
        assert_eq!(
            (fixed.iova(), fixed.length(), fixed.source_offset()),
            (FIXED, 64 << 10, 64 << 10)
        );
        println!("{auto}\n{fixed}");
    }
    assert_eq!(open_fd_count(), before);

    // Past the end of the memfd: refused before the ioctl, naming the range.
    let bad = ByteRange::new(192 << 10, 128 << 10);
    match ioas.map_file(&memfd, bad, IovaPlacement::Auto, MapPerms::Read) {
        Err(Error::InvalidRange {
            range,
            problem: RangeProblem::OutOfBounds { .. },
            ..
        }) => assert_eq!(range, bad),
        other => panic!("memfd range past the end: {other:?}"),
    }
    assert!(matches!(
        ioas.map_file(
            &memfd,
            ByteRange::new(0, 0),
            IovaPlacement::Auto,
            MapPerms::Read
        ),
        Err(Error::InvalidRange {
            problem: RangeProblem::Empty,
            ..
        })
    ));
    assert_eq!(open_fd_count(), before);
}

#[test]
fn map_single_range_bar_dmabuf_fixed_and_auto() {
    let (iommufd, dev, size) = exporter();
    let ioas = iommufd.alloc_ioas().unwrap();
    let e = export(&dev, &[ByteRange::new(0, size)]);
    let before = open_fd_count();
    {
        let mut fixed = ioas
            .map_dmabuf(e.dmabuf(), IovaPlacement::Fixed(FIXED), MapPerms::ReadWrite)
            .unwrap();
        assert_eq!((fixed.iova(), fixed.length()), (FIXED, size));
        assert!(fixed.dmabuf().is_some());
        // An importer reference shows in fdinfo's count.
        let count = e.dmabuf().fdinfo().unwrap().count;
        println!("dma-buf count with one mapping: {count}");

        let auto = ioas
            .map_dmabuf(e.dmabuf(), IovaPlacement::Auto, MapPerms::Read)
            .unwrap();
        assert_ne!(auto.iova(), FIXED);
        assert_ne!(auto.iova(), 0);
        println!("{fixed}\n{auto}");
        assert_eq!(fixed.unmap().unwrap(), size);
        // The freed IOVA can be used again, by a part of the buffer.
        let part = ioas
            .map_file(
                e.dmabuf(),
                ByteRange::new(PAGE, 2 * PAGE),
                IovaPlacement::Fixed(FIXED),
                MapPerms::ReadWrite,
            )
            .unwrap();
        assert_eq!(
            (part.iova(), part.length(), part.source_offset()),
            (FIXED, 2 * PAGE, PAGE)
        );
    }
    assert_eq!(open_fd_count(), before);
}

#[test]
fn map_bar_dmabuf_into_an_ioas_with_a_device_attached() {
    let (iommufd, dev, size) = exporter();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut edu_dev = VfioPciDevice::open(edu()).unwrap();
    edu_dev.bind(&iommufd).unwrap();
    edu_dev.attach(&ioas).unwrap();
    let e = export(&dev, &[ByteRange::new(0, size)]);
    let map = ioas
        .map_dmabuf(e.dmabuf(), IovaPlacement::Fixed(FIXED), MapPerms::ReadWrite)
        .unwrap();
    assert_eq!(map.iova(), FIXED);
    // The exporter's dma-buf can be closed: the mapping holds its own.
    drop(e);
    assert!(map.is_mapped());
}

#[test]
fn two_range_dmabuf_is_not_importable() {
    let (iommufd, dev, _) = exporter();
    let ioas = iommufd.alloc_ioas().unwrap();
    let e = export(
        &dev,
        &[ByteRange::new(0, PAGE), ByteRange::new(0x4000, PAGE)],
    );
    let before = open_fd_count();
    for at in [IovaPlacement::Auto, IovaPlacement::Fixed(FIXED)] {
        match ioas.map_dmabuf(e.dmabuf(), at, MapPerms::ReadWrite) {
            Err(err @ Error::NotImportable { .. }) => {
                assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP));
                let Error::NotImportable {
                    buffer, problem, ..
                } = err
                else {
                    unreachable!()
                };
                assert!(problem.contains("more than one range"), "{problem}");
                assert!(buffer.contains("vfio_pci_core"), "{buffer}");
            }
            other => panic!("two-range dma-buf at {at:?}: {other:?}"),
        }
        assert_eq!(open_fd_count(), before);
    }
}

#[test]
fn udmabuf_is_not_importable() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let memfd = Memfd::new("udmabuf-src", 64 << 10).unwrap();
    let buf = Udmabuf::open()
        .unwrap()
        .create(memfd.as_fd(), 0, 64 << 10)
        .unwrap();
    let before = open_fd_count();
    match ioas.map_dmabuf(&buf, IovaPlacement::Auto, MapPerms::ReadWrite) {
        Err(err @ Error::NotImportable { .. }) => {
            assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP));
            let Error::NotImportable {
                buffer, problem, ..
            } = err
            else {
                unreachable!()
            };
            assert!(problem.contains("udmabuf"), "{problem}");
            assert!(buffer.contains("udmabuf"), "{buffer}");
        }
        other => panic!("udmabuf: {other:?}"),
    }
    assert_eq!(open_fd_count(), before);
    // Its memfd maps fine.
    ioas.map_file(
        &memfd,
        ByteRange::new(0, 64 << 10),
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
    )
    .unwrap();
}

#[test]
fn export_made_with_decode_off_is_revoked() {
    let (iommufd, dev, _) = exporter();
    let ioas = iommufd.alloc_ioas().unwrap();
    dev.set_memory_decode(false).unwrap();
    let e = export(&dev, &[ByteRange::new(0, PAGE)]);
    assert_eq!(e.memory_decode_at_export(), Some(false));
    let before = open_fd_count();
    match ioas.map_dmabuf(e.dmabuf(), IovaPlacement::Fixed(FIXED), MapPerms::ReadWrite) {
        Err(e @ Error::Revoked { .. }) => {
            assert!(e.to_string().contains("vfio_pci_core"), "{e}");
            assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "the kernel's answer");
        }
        other => panic!("born-revoked dma-buf: {other:?}"),
    }
    assert_eq!(open_fd_count(), before);
    // Turning decode on un-revokes the exporter's buffers, this one too.
    dev.set_memory_decode(true).unwrap();
    let map = ioas
        .map_dmabuf(e.dmabuf(), IovaPlacement::Fixed(FIXED), MapPerms::ReadWrite)
        .unwrap();
    assert_eq!(map.iova(), FIXED);
}

#[test]
fn revoked_mapping_is_restored_by_remap() {
    let (iommufd, dev, _) = exporter();
    let ioas = iommufd.alloc_ioas().unwrap();
    let e = export(&dev, &[ByteRange::new(0, 4 * PAGE)]);
    let mut map = ioas
        .map_dmabuf(e.dmabuf(), IovaPlacement::Fixed(FIXED), MapPerms::ReadWrite)
        .unwrap();
    let before = open_fd_count();
    dev.set_memory_decode(false).unwrap(); // revokes
    // While revoked, a remap unmaps and then fails: the handle ends unmapped.
    match map.remap() {
        Err(Error::Revoked { .. }) => {}
        other => panic!("remap while revoked: {other:?}"),
    }
    assert!(!map.is_mapped());
    dev.set_memory_decode(true).unwrap();
    map.remap().unwrap();
    assert!(map.is_mapped());
    assert_eq!(map.iova(), FIXED);
    // Remap of a live mapping: unmap + map at the same IOVA.
    map.remap().unwrap();
    assert_eq!(open_fd_count(), before);
}

#[test]
fn iova_collisions_and_bad_fixed_iovas() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut dev = VfioPciDevice::open(edu()).unwrap();
    dev.bind(&iommufd).unwrap();
    dev.attach(&ioas).unwrap();
    let memfd = Memfd::new("collide", 64 << 10).unwrap();
    let whole = ByteRange::new(0, 64 << 10);
    let _first = ioas
        .map_file(
            &memfd,
            whole,
            IovaPlacement::Fixed(FIXED),
            MapPerms::ReadWrite,
        )
        .unwrap();
    let before = open_fd_count();

    let cases = [
        ("same IOVA", FIXED, whole, "EEXIST"),
        ("overlapping tail", FIXED + (32 << 10), whole, "EEXIST"),
        ("overlapping head", FIXED - (32 << 10), whole, "EEXIST"),
        (
            "misaligned",
            FIXED + (1 << 20) + 0x800,
            ByteRange::new(0, PAGE),
            "multiples of",
        ),
        (
            "outside the aperture",
            u64::MAX - (2 * PAGE) + 1,
            ByteRange::new(0, PAGE),
            "EINVAL",
        ),
    ];
    for (what, iova, range, needle) in cases {
        match ioas.map_file(
            &memfd,
            range,
            IovaPlacement::Fixed(iova),
            MapPerms::ReadWrite,
        ) {
            Err(Error::InvalidIova {
                ioas: i,
                iova: got,
                length,
                problem,
                ..
            }) => {
                assert_eq!((i, got, length), (ioas.id(), iova, range.length), "{what}");
                assert!(problem.contains(needle), "{what}: {problem}");
                println!("{what}: {problem}");
            }
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(open_fd_count(), before, "{what} leaked an fd");
    }
    // The MSI window of x86 (0xfee00000) is reserved once a device is attached.
    match ioas.map_file(
        &memfd,
        ByteRange::new(0, PAGE),
        IovaPlacement::Fixed(0xfee0_0000),
        MapPerms::ReadWrite,
    ) {
        Err(Error::InvalidIova { problem, .. }) => println!("MSI window: {problem}"),
        other => panic!("map into the MSI window: {other:?}"),
    }
    assert_eq!(open_fd_count(), before);
}

#[test]
fn drop_order_does_not_matter() {
    let before = open_fd_count();
    {
        let (iommufd, dev, size) = exporter();
        let ioas = iommufd.alloc_ioas().unwrap();
        let mut edu_dev = VfioPciDevice::open(edu()).unwrap();
        edu_dev.bind(&iommufd).unwrap();
        edu_dev.attach(&ioas).unwrap();
        let e = export(&dev, &[ByteRange::new(0, size)]);
        let map = ioas
            .map_dmabuf(e.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite)
            .unwrap();
        let memfd = Memfd::new("order", 64 << 10).unwrap();
        let map2 = ioas
            .map_file(
                &memfd,
                ByteRange::new(0, 64 << 10),
                IovaPlacement::Auto,
                MapPerms::Read,
            )
            .unwrap();
        // Everything "owning" first, the dependants last.
        drop(iommufd);
        drop(ioas);
        drop(dev); // closes the exporter: its dma-bufs are revoked for good
        drop(e);
        drop(edu_dev);
        drop(memfd);
        assert!(map.is_mapped() && map2.is_mapped());
        drop(map);
        drop(map2);
    }
    assert_eq!(
        open_fd_count(),
        before,
        "everything was closed, iommufd included"
    );
}
