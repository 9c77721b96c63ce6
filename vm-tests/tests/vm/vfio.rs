//! The VFIO exporter against the real kernel: open by PCI address, bind to an
//! iommufd, attach, region and BAR info, config space, memory decode and bus
//! master, reset, BAR mmap, BAR dma-buf export (one and two ranges), and every
//! bad request refused with a typed error without leaking an fd.

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;

use dmabuf_p2p::importer::iommufd::Iommufd;
use dmabuf_p2p::vfio::{CONFIG_REGION_INDEX, ROM_REGION_INDEX, VfioPciDevice, bind_to_vfio_pci};
use dmabuf_p2p::{ByteRange, Error, PciAddress, RangeProblem};
use dmabuf_p2p_vm_tests::{
    EDU_ID, IVSHMEM_ID, bar_size, driver_of, ivshmem_devices, open_fd_count, pci_devices,
};

const PAGE: u64 = 4096;

fn addr(bdf: &str) -> PciAddress {
    bdf.parse().unwrap()
}

/// The ivshmem device with the 1 MiB BAR2, and that size.
fn small_shm() -> (PciAddress, u64) {
    let (bdf, size) = ivshmem_devices()
        .into_iter()
        .find(|(_, s)| *s == 1 << 20)
        .expect("a 1 MiB ivshmem");
    (addr(&bdf), size)
}

/// The ivshmem device with the 64 MiB BAR2, and that size.
fn big_shm() -> (PciAddress, u64) {
    let (bdf, size) = ivshmem_devices()
        .into_iter()
        .find(|(_, s)| *s == 64 << 20)
        .expect("a 64 MiB ivshmem");
    (addr(&bdf), size)
}

fn edu() -> PciAddress {
    addr(pci_devices(EDU_ID).first().expect("an edu device"))
}

/// Opens `a` and binds it to a new iommufd.
fn open_bound(a: PciAddress) -> (Iommufd, VfioPciDevice) {
    let iommufd = Iommufd::open().unwrap();
    let mut dev = VfioPciDevice::open(a).unwrap();
    dev.bind(&iommufd).unwrap();
    (iommufd, dev)
}

/// The physical start of BAR `bar` from sysfs.
fn sysfs_bar_start(a: PciAddress, bar: usize) -> u64 {
    let text = fs::read_to_string(format!("/sys/bus/pci/devices/{a}/resource")).unwrap();
    let first = text
        .lines()
        .nth(bar)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    u64::from_str_radix(first.trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn open_of_a_missing_device_names_it() {
    let before = open_fd_count();
    match VfioPciDevice::open(addr("0000:7f:1f.7")) {
        Err(Error::Device {
            device, problem, ..
        }) => {
            assert_eq!(device, "0000:7f:1f.7");
            assert!(problem.contains("not present"), "{problem}");
        }
        other => panic!("expected Error::Device, got {other:?}"),
    }
    assert_eq!(open_fd_count(), before);
}

#[test]
fn open_bind_attach_detach() {
    let before = open_fd_count();
    {
        let iommufd = Iommufd::open().unwrap();
        let mut dev = VfioPciDevice::open(edu()).unwrap();
        assert!(
            dev.cdev_path().starts_with("/dev/vfio/devices"),
            "{}",
            dev.cdev_path().display()
        );

        // Before the bind nothing else is allowed (the kernel would say EINVAL).
        match dev.region_info(0) {
            Err(Error::Device { problem, .. }) => {
                assert!(problem.contains("not bound"), "{problem}")
            }
            other => panic!("region_info before bind: {other:?}"),
        }
        assert!(matches!(
            dev.export_bar(0, &[ByteRange::new(0, PAGE)]),
            Err(Error::Device { .. })
        ));

        let devid = dev.bind(&iommufd).unwrap();
        assert_eq!(dev.devid(), Some(devid));
        assert!(dev.iommufd().is_some_and(|i| i.same_context(&iommufd)));
        match dev.bind(&iommufd) {
            Err(Error::Device { problem, .. }) => {
                assert!(problem.contains("already bound"), "{problem}")
            }
            other => panic!("second bind: {other:?}"),
        }

        let ioas = iommufd.alloc_ioas().unwrap();
        let hwpt = dev.attach(&ioas).unwrap();
        assert_eq!(dev.attached_pt(), Some((ioas.id(), hwpt)));
        assert!(dev.attached_ioas().is_some_and(|a| a.same_ioas(&ioas)));
        println!("edu: devid {devid}, IOAS {}, HWPT {hwpt}", ioas.id());

        // Re-attaching to another IOAS replaces the attachment.
        let ioas2 = iommufd.alloc_ioas().unwrap();
        dev.attach(&ioas2).unwrap();
        assert!(dev.attached_ioas().is_some_and(|a| a.same_ioas(&ioas2)));

        dev.detach().unwrap();
        assert!(dev.attached_pt().is_none());
        dev.detach().unwrap(); // nothing attached: no-op

        // An IOAS of another iommufd is refused before the ioctl.
        let other = Iommufd::open().unwrap().alloc_ioas().unwrap();
        match dev.attach(&other) {
            Err(Error::Device { problem, .. }) => {
                assert!(problem.contains("another iommufd"), "{problem}")
            }
            r => panic!("attach to a foreign IOAS: {r:?}"),
        }
    }
    assert_eq!(open_fd_count(), before);
}

#[test]
fn attach_to_a_wrong_id_is_unknown_object() {
    let (iommufd, mut dev) = open_bound(edu());
    let before = open_fd_count();
    for id in [u32::MAX, 0xdead] {
        match dev.attach_pt(id) {
            Err(e @ Error::UnknownObject { .. }) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
                let Error::UnknownObject { id: got, .. } = e else {
                    unreachable!()
                };
                assert_eq!(got, id);
            }
            other => panic!("attach_pt({id:#x}): {other:?}"),
        }
    }
    // The device's own ID is not an IOAS or HWPT.
    let devid = dev.devid().unwrap();
    assert!(matches!(
        dev.attach_pt(devid),
        Err(Error::UnknownObject { .. }) | Err(Error::Sys { .. })
    ));
    assert!(dev.attached_pt().is_none());
    assert_eq!(open_fd_count(), before);
    drop((iommufd, dev));
}

#[test]
fn a_second_open_of_the_same_device() {
    // Facts: what the kernel does with two cdev fds of one device.
    let (iommufd, _dev) = open_bound(edu());
    match VfioPciDevice::open(edu()) {
        Ok(mut second) => match second.bind(&iommufd) {
            Ok(id) => println!("second cdev fd of edu: bind succeeded (devid {id})"),
            Err(e) => println!("second cdev fd of edu: open ok, bind fails: {e}"),
        },
        Err(e) => println!("second cdev open of edu: {e}"),
    }
}

#[test]
fn region_and_bar_info_match_sysfs() {
    for (bdf, _) in ivshmem_devices() {
        let (_iommufd, dev) = open_bound(addr(&bdf));
        let info = dev.info().unwrap();
        assert!(info.is_pci(), "{bdf}: {info:?}");
        assert_eq!(info.num_regions, 9, "{bdf}: {info:?}");
        for bar in [0u32, 2] {
            let b = dev.bar(bar).unwrap();
            assert_eq!(
                b.size(),
                bar_size(&bdf, bar as usize).unwrap(),
                "{bdf} BAR{bar}"
            );
            assert_eq!(b.resource.size, b.size(), "{bdf} BAR{bar}");
            assert_eq!(b.phys_start(), sysfs_bar_start(addr(&bdf), bar as usize));
            assert!(b.resource.is_mem());
            assert!(
                b.region.readable() && b.region.writable(),
                "{bdf} BAR{bar} flags {:#x}",
                b.region.flags
            );
            println!(
                "{bdf} BAR{bar}: {} bytes at {:#x}, fd offset {:#x}, flags {:#x}",
                b.size(),
                b.phys_start(),
                b.region.offset,
                b.region.flags
            );
        }
        assert_eq!(dev.bar(0).unwrap().size(), 256);
        assert!(dev.bar(2).unwrap().region.mmap_supported());
        // BAR1 is unused and BAR3 is the upper half of the 64-bit BAR2: size 0.
        for absent in [1u32, 3] {
            let b = dev.bar(absent).unwrap();
            assert!(!b.is_present(), "{bdf} BAR{absent}: {b:?}");
        }
        let cfg = dev.region_info(CONFIG_REGION_INDEX).unwrap();
        assert!(
            cfg.size == 256 || cfg.size == 4096,
            "config size {}",
            cfg.size
        );
        // The ROM and config are not BARs; index 9 is not a region at all.
        for index in [ROM_REGION_INDEX, CONFIG_REGION_INDEX, 8, 100] {
            match dev.bar(index) {
                Err(Error::InvalidRegion {
                    index: i, device, ..
                }) => {
                    assert_eq!((i, device.as_str()), (index, bdf.as_str()));
                }
                other => panic!("bar({index}): {other:?}"),
            }
        }
        assert!(matches!(
            dev.region_info(9),
            Err(Error::InvalidRegion { index: 9, .. })
        ));
    }
    let (_iommufd, dev) = open_bound(edu());
    let b = dev.bar(0).unwrap();
    assert_eq!(b.size(), bar_size(&edu().to_string(), 0).unwrap());
    println!("edu BAR0: {} bytes, flags {:#x}", b.size(), b.region.flags);
}

#[test]
fn config_space_reads_the_ids() {
    for (a, id) in [
        (edu(), EDU_ID),
        (small_shm().0, IVSHMEM_ID),
        (big_shm().0, IVSHMEM_ID),
    ] {
        let (_iommufd, dev) = open_bound(a);
        assert_eq!(dev.config_read_u16(0).unwrap(), id.0, "{a} vendor");
        assert_eq!(dev.config_read_u16(2).unwrap(), id.1, "{a} device");
        assert_eq!(
            dev.config_read_u32(0).unwrap(),
            u32::from(id.0) | (u32::from(id.1) << 16)
        );
        let mut four = [0u8; 4];
        dev.config_read(0, &mut four).unwrap();
        assert_eq!(u16::from_le_bytes([four[0], four[1]]), id.0);
        // Past the end of config space: typed, before any pread.
        let size = dev.region_info(CONFIG_REGION_INDEX).unwrap().size;
        match dev.config_read(size - 2, &mut four) {
            Err(Error::InvalidRange {
                problem: RangeProblem::OutOfBounds { .. },
                range,
                ..
            }) => {
                assert_eq!(range, ByteRange::new(size - 2, 4));
            }
            other => panic!("read past config end: {other:?}"),
        }
    }
}

#[test]
fn memory_decode_and_bus_master_round_trip() {
    let (shm, _) = small_shm();
    let (_iommufd, dev) = open_bound(shm);
    println!(
        "{shm} PCI_COMMAND after open: {:#06x}",
        dev.command().unwrap()
    );
    for on in [true, false, true] {
        dev.set_memory_decode(on).unwrap();
        assert_eq!(dev.memory_decode().unwrap(), on);
        assert_eq!(dev.command().unwrap() & 0x2 != 0, on);
    }
    for on in [true, false] {
        dev.set_bus_master(on).unwrap();
        assert_eq!(dev.bus_master().unwrap(), on);
    }
    // Memory decode is untouched by the bus-master writes.
    assert!(dev.memory_decode().unwrap());
}

#[test]
fn reset_where_supported_and_typed_error_where_not() {
    for a in [edu(), small_shm().0, big_shm().0] {
        let (_iommufd, dev) = open_bound(a);
        let supported = dev.supports_reset().unwrap();
        println!("{a}: VFIO_DEVICE_FLAGS_RESET = {supported}");
        match dev.reset() {
            Ok(()) => assert!(supported, "{a}: reset worked without the RESET flag"),
            Err(Error::Unsupported {
                operation, target, ..
            }) => {
                assert!(!supported);
                assert_eq!((operation, target), ("VFIO_DEVICE_RESET", a.to_string()));
            }
            Err(e) => panic!("{a}: reset: {e}"),
        }
    }
}

#[test]
fn bar_mmap_write_then_read_back() {
    let (shm, size) = small_shm();
    let (_iommufd, dev) = open_bound(shm);
    dev.set_memory_decode(true).unwrap();
    let before = open_fd_count();
    {
        let bar = dev.map_bar(2).unwrap();
        assert_eq!(bar.len() as u64, size);
        bar.write_u32(0, 0xdead_beef).unwrap();
        bar.write_u64(8, 0x0123_4567_89ab_cdef).unwrap();
        bar.write_u16(0x10, 0x55aa).unwrap();
        bar.write_u8(0x12, 0x7e).unwrap();
        bar.write(size - 5, b"tail!").unwrap();
        assert_eq!(bar.read_u32(0).unwrap(), 0xdead_beef);
        assert_eq!(bar.read_u64(8).unwrap(), 0x0123_4567_89ab_cdef);
        assert_eq!(bar.read_u16(0x10).unwrap(), 0x55aa);
        assert_eq!(bar.read_u8(0x12).unwrap(), 0x7e);
        let mut back = [0u8; 5];
        bar.read(size - 5, &mut back).unwrap();
        assert_eq!(&back, b"tail!");

        // A second mapping sees the same memory.
        let again = dev.map_bar(2).unwrap();
        assert_eq!(again.read_u32(0).unwrap(), 0xdead_beef);

        // Bounds and alignment are checked.
        assert!(matches!(
            bar.read_u32(size),
            Err(Error::InvalidRange {
                problem: RangeProblem::OutOfBounds { .. },
                ..
            })
        ));
        assert!(matches!(
            bar.read_u32(size - 2),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            bar.write_u32(2, 0),
            Err(Error::InvalidRange {
                problem: RangeProblem::Unaligned { align: 4 },
                ..
            })
        ));
        assert!(matches!(
            bar.read(u64::MAX, &mut back),
            Err(Error::InvalidRange {
                problem: RangeProblem::Overflow,
                ..
            })
        ));
        // BAR1 is absent, the ROM is not a BAR.
        assert!(matches!(
            dev.map_bar(1),
            Err(Error::InvalidRegion { index: 1, .. })
        ));
        assert!(matches!(
            dev.map_bar(6),
            Err(Error::InvalidRegion { index: 6, .. })
        ));
    }
    assert_eq!(open_fd_count(), before, "BAR mappings keep no fds");
}

#[test]
fn bar_mmap_of_the_register_bar() {
    // ivshmem BAR0 is 256 bytes of registers (sub-page).
    let (shm, _) = small_shm();
    let (_iommufd, dev) = open_bound(shm);
    dev.set_memory_decode(true).unwrap();
    let b = dev.bar(0).unwrap();
    match dev.map_bar(0) {
        Ok(map) => {
            assert_eq!(map.len(), 256);
            // Register 0 is the interrupt mask; reading it is harmless.
            println!(
                "{shm} BAR0 mmap ok, INTRMASK = {:#x}",
                map.read_u32(0).unwrap()
            );
            assert!(matches!(map.read_u32(256), Err(Error::InvalidRange { .. })));
        }
        Err(Error::Unsupported { .. }) => {
            assert!(!b.region.mmap_supported());
            println!(
                "{shm} BAR0: no VFIO_REGION_INFO_FLAG_MMAP (flags {:#x})",
                b.region.flags
            );
        }
        Err(e) => panic!("map_bar(0): {e}"),
    }
}

#[test]
fn export_one_range_of_bar2() {
    for (shm, size) in [small_shm(), big_shm()] {
        let (_iommufd, dev) = open_bound(shm);
        dev.set_memory_decode(true).unwrap();
        let before = open_fd_count();
        {
            let export = dev.export_bar(2, &[ByteRange::new(0, size)]).unwrap();
            assert_eq!(open_fd_count(), before + 1);
            assert_eq!(export.size(), size);
            assert_eq!(export.dmabuf().size().unwrap(), size);
            assert_eq!((export.device(), export.bar()), (shm, 2));
            assert_eq!(export.memory_decode_at_export(), Some(true));
            let start = sysfs_bar_start(shm, 2);
            assert_eq!(export.phys_ranges().len(), 1);
            assert_eq!(
                (
                    export.phys_ranges()[0].start,
                    export.phys_ranges()[0].length
                ),
                (start, size)
            );
            let info = export.dmabuf().fdinfo().unwrap();
            assert_eq!(info.exp_name, "vfio_pci_core");
            assert_eq!(info.size, size);
            assert!(info.is_cloexec());
            assert_eq!(info.flags & libc::O_ACCMODE as u32, libc::O_RDWR as u32);
            println!("{export}");
        }
        assert_eq!(open_fd_count(), before);
    }
}

#[test]
fn export_two_ranges_of_bar2() {
    let (shm, size) = small_shm();
    let (_iommufd, dev) = open_bound(shm);
    dev.set_memory_decode(true).unwrap();
    let ranges = [ByteRange::new(0, PAGE), ByteRange::new(0x4000, 2 * PAGE)];
    let export = dev.export_bar(2, &ranges).unwrap();
    assert_eq!(export.size(), 3 * PAGE);
    assert_eq!(export.dmabuf().size().unwrap(), 3 * PAGE);
    assert_eq!(export.ranges(), &ranges);
    let start = sysfs_bar_start(shm, 2);
    let phys: Vec<(u64, u64)> = export
        .phys_ranges()
        .iter()
        .map(|p| (p.start, p.length))
        .collect();
    assert_eq!(phys, vec![(start, PAGE), (start + 0x4000, 2 * PAGE)]);
    assert_eq!(export.dmabuf().fdinfo().unwrap().exp_name, "vfio_pci_core");

    // Overlapping, repeated and unordered ranges are what the kernel allows too.
    let odd = [
        ByteRange::new(size - PAGE, PAGE),
        ByteRange::new(0, 2 * PAGE),
        ByteRange::new(PAGE, PAGE),
    ];
    let e2 = dev.export_bar(2, &odd).unwrap();
    assert_eq!(e2.dmabuf().size().unwrap(), 4 * PAGE);
}

#[test]
fn mmap_of_a_vfio_dmabuf_is_refused() {
    let (shm, _) = small_shm();
    let (_iommufd, dev) = open_bound(shm);
    dev.set_memory_decode(true).unwrap();
    let export = dev.export_bar(2, &[ByteRange::new(0, PAGE)]).unwrap();
    let before = open_fd_count();
    match export.dmabuf().mmap() {
        Err(e @ Error::MmapRefused { .. }) => {
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
            let Error::MmapRefused { exporter, .. } = e else {
                unreachable!()
            };
            assert_eq!(exporter, "vfio_pci_core");
        }
        other => panic!("mmap of a VFIO dma-buf: {other:?}"),
    }
    assert_eq!(open_fd_count(), before);
}

#[test]
fn bad_export_requests_are_typed_and_leak_nothing() {
    let (shm, size) = small_shm();
    let (_iommufd, dev) = open_bound(shm);
    dev.set_memory_decode(true).unwrap();
    let before = open_fd_count();

    let range_cases: [(&str, Vec<ByteRange>, usize, RangeProblem); 6] = [
        (
            "unaligned offset",
            vec![ByteRange::new(0x800, PAGE)],
            0,
            RangeProblem::Unaligned { align: PAGE },
        ),
        (
            "unaligned length",
            vec![ByteRange::new(0, PAGE + 1)],
            0,
            RangeProblem::Unaligned { align: PAGE },
        ),
        (
            "zero length",
            vec![ByteRange::new(0, PAGE), ByteRange::new(PAGE, 0)],
            1,
            RangeProblem::Empty,
        ),
        (
            "overflow",
            vec![ByteRange::new(u64::MAX - PAGE + 1, 2 * PAGE)],
            0,
            RangeProblem::Overflow,
        ),
        (
            "past the end",
            vec![
                ByteRange::new(0, PAGE),
                ByteRange::new(size - PAGE, 2 * PAGE),
            ],
            1,
            RangeProblem::OutOfBounds {
                end: size + PAGE,
                size,
            },
        ),
        (
            "no ranges",
            vec![],
            0,
            RangeProblem::Count("no ranges given".to_owned()),
        ),
    ];
    for (what, ranges, bad, want) in range_cases {
        match dev.export_bar(2, &ranges) {
            Err(Error::InvalidRange {
                target,
                range,
                problem,
            }) => {
                assert_eq!(problem, want, "{what}");
                if let Some(r) = ranges.get(bad) {
                    assert_eq!(range, *r, "{what}: wrong range named");
                }
                assert!(
                    target.contains(&shm.to_string()) && target.contains("BAR2"),
                    "{what}: target {target}"
                );
            }
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(open_fd_count(), before, "{what} leaked an fd");
    }

    // BAR0 of ivshmem is 256 bytes: no page-sized range fits.
    match dev.export_bar(0, &[ByteRange::new(0, PAGE)]) {
        Err(Error::InvalidRange {
            problem: RangeProblem::OutOfBounds { end, size },
            target,
            ..
        }) => {
            assert_eq!((end, size), (PAGE, 256));
            assert!(target.contains("BAR0"), "{target}");
        }
        other => panic!("BAR0 export: {other:?}"),
    }
    assert!(matches!(
        dev.export_bar(0, &[ByteRange::new(0, 256)]),
        Err(Error::InvalidRange {
            problem: RangeProblem::Unaligned { .. },
            ..
        })
    ));
    // The ROM, config space, the VGA region and nonsense are not BARs.
    for index in [6u32, 7, 8, 42] {
        match dev.export_bar(index, &[ByteRange::new(0, PAGE)]) {
            Err(Error::InvalidRegion {
                index: i,
                device,
                problem,
                source,
            }) => {
                assert_eq!((i, device), (index, shm.to_string()));
                assert!(problem.contains("not a BAR"), "{problem}");
                assert!(source.is_none(), "refused before any ioctl");
            }
            other => panic!("export of region {index}: {other:?}"),
        }
    }
    // BAR1 is unused, BAR3 the upper half of BAR2.
    for index in [1u32, 3] {
        match dev.export_bar(index, &[ByteRange::new(0, PAGE)]) {
            Err(Error::InvalidRegion {
                index: i, problem, ..
            }) => {
                assert_eq!(i, index);
                assert!(problem.contains("not present"), "{problem}");
            }
            other => panic!("export of absent BAR{index}: {other:?}"),
        }
    }
    assert_eq!(open_fd_count(), before);
}

#[test]
fn export_made_while_decode_is_off_records_it() {
    let (shm, _) = small_shm();
    let (_iommufd, dev) = open_bound(shm);
    dev.set_memory_decode(false).unwrap();
    let export = dev.export_bar(2, &[ByteRange::new(0, PAGE)]).unwrap();
    assert_eq!(export.memory_decode_at_export(), Some(false));
    // The fd itself is a normal dma-buf; only importers see the revocation.
    assert_eq!(export.dmabuf().size().unwrap(), PAGE);
}

#[test]
fn bind_to_vfio_pci_rebinds_an_unbound_device() {
    let (shm, _) = big_shm();
    let bdf = shm.to_string();
    // Already bound: nothing to do.
    bind_to_vfio_pci(shm).unwrap();
    assert_eq!(driver_of(&bdf).as_deref(), Some("vfio-pci"));

    fs::write(format!("/sys/bus/pci/devices/{bdf}/driver/unbind"), &bdf).unwrap();
    assert_eq!(driver_of(&bdf), None);
    let before = open_fd_count();
    match VfioPciDevice::open(shm) {
        Err(Error::WrongDriver {
            device,
            driver,
            expected,
        }) => {
            assert_eq!(
                (device, driver, expected.as_str()),
                (bdf.clone(), None, "vfio-pci")
            );
        }
        other => panic!("open of an unbound device: {other:?}"),
    }
    assert_eq!(open_fd_count(), before);

    bind_to_vfio_pci(shm).unwrap();
    assert_eq!(driver_of(&bdf).as_deref(), Some("vfio-pci"));
    let (_iommufd, dev) = open_bound(shm);
    assert_eq!(dev.config_read_u16(0).unwrap(), IVSHMEM_ID.0);

    // A device that does not exist.
    assert!(matches!(
        bind_to_vfio_pci(addr("0000:7f:1f.7")),
        Err(Error::Device { .. })
    ));
}

#[test]
fn reset_revokes_and_restores_exports() {
    use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
    let (shm, size) = small_shm();
    let (iommufd, dev) = open_bound(shm);
    dev.set_memory_decode(true).unwrap();
    let bar = dev.map_bar(2).unwrap();
    bar.write_u32(0x40, 0x1234_5678).unwrap();
    let export = dev.export_bar(2, &[ByteRange::new(0, size)]).unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut map = ioas
        .map_dmabuf(
            export.dmabuf(),
            IovaPlacement::Fixed(0x4000_0000),
            MapPerms::ReadWrite,
        )
        .unwrap();
    let before = open_fd_count();
    if !dev.supports_reset().unwrap() {
        println!("{shm}: no reset, nothing to check");
        return;
    }
    dev.reset().unwrap();
    // PCI_COMMAND is restored after the reset, so the buffer is live again
    // for new importers; the old area was revoked and needs a remap.
    println!(
        "{shm} PCI_COMMAND after reset: {:#06x}",
        dev.command().unwrap()
    );
    assert!(dev.memory_decode().unwrap());
    let again = ioas
        .map_dmabuf(export.dmabuf(), IovaPlacement::Auto, MapPerms::Read)
        .unwrap();
    assert!(again.is_mapped());
    map.remap().unwrap();
    assert_eq!(map.iova(), 0x4000_0000);
    // The BAR mmap faults its pages back in; ivshmem memory survives a reset.
    assert_eq!(bar.read_u32(0x40).unwrap(), 0x1234_5678);
    drop(again);
    assert_eq!(open_fd_count(), before);
}
