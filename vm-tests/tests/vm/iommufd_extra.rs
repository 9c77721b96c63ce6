//! The iommufd calls beyond map and unmap, against the real kernel: allowed
//! IOVA lists (`IOMMU_IOAS_ALLOW_IOVAS`), copies of memfd and BAR dma-buf
//! areas into a second IOAS (`IOMMU_IOAS_COPY`) with DMA through the copies,
//! the `HUGE_PAGES` and `RLIMIT_MODE` options (`IOMMU_OPTION`), the VFIO
//! dma-buf export probe, and the kernel's mock dma-buf (`IOMMUFD_TEST`)
//! going through the revoke flow of the kernel's own `dmabuf_revoke`
//! selftest. Every bad input gives a typed error naming it and leaves the
//! fd count unchanged.
//!
//! DMA: one test, two edu transfers, into shm1 BAR2 0x3a00000..0x3a01000.

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use dmabuf_p2p::error::AllowedIovaProblem;
use dmabuf_p2p::exporter::mock::{MAX_PAGES, MOCK_EXPORTER, MockDmaBuf};
use dmabuf_p2p::importer::iommufd::{
    Ioas, IoasMapping, Iommufd, IommufdOption, IovaPlacement, IovaRange, MapPerms, OptionId,
    RlimitMode,
};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{Attachment, RestorePolicy, Revocable, RevokeReason, probe_revoked};
use dmabuf_p2p::vfio::VfioPciDevice;
use dmabuf_p2p::{ByteRange, Error, RangeProblem};
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_vm_tests::{
    DMA_TIMEOUT, assert_bytes, bar_read, bar_write, edu_address, open_fd_count, pattern,
    request_host_check, shm_address,
};

const PAGE: u64 = 4096;
/// An IOVA well inside the usable space of the emulated intel-iommu.
const FIXED: u64 = 0x4000_0000;
/// The allowed window of the allow-list tests: 64 KiB at 2 GiB.
const WINDOW: IovaRange = IovaRange::new(0x8000_0000, 0x8000_ffff);
/// The BAR2 area of shm1 the copy test writes (no other test uses it).
const REGION: u64 = 0x3a0_0000;

fn r(start: u64, last: u64) -> IovaRange {
    IovaRange::new(start, last)
}

/// The edu device bound to `iommufd` and attached to `ioas`.
fn attached_edu(iommufd: &Iommufd, ioas: &Ioas) -> VfioPciDevice {
    let mut dev = VfioPciDevice::open(edu_address().parse().unwrap()).unwrap();
    dev.bind(iommufd).unwrap();
    dev.attach(ioas).unwrap();
    dev
}

/// The ivshmem device `name`, bound to `iommufd`, memory decode on.
fn open_shm(name: &str, iommufd: &Iommufd) -> VfioPciDevice {
    let mut dev = VfioPciDevice::open(shm_address(name).parse().unwrap()).unwrap();
    dev.bind(iommufd).unwrap();
    dev.set_memory_decode(true).unwrap();
    dev
}

fn map_memfd(
    ioas: &Ioas,
    memfd: &Memfd,
    range: ByteRange,
    at: IovaPlacement,
) -> dmabuf_p2p::Result<IoasMapping> {
    ioas.map_file(memfd, range, at, MapPerms::ReadWrite)
}

#[test]
fn allow_iovas_steers_automatic_placement() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let _edu = attached_edu(&iommufd, &ioas);
    let memfd = Memfd::new("allow", 64 << 10).unwrap();
    let half = ByteRange::new(0, 32 << 10);
    ioas.allow_iovas(&[WINDOW]).unwrap();
    let before = open_fd_count();
    {
        // Automatic placement stays inside the window...
        let a = map_memfd(&ioas, &memfd, half, IovaPlacement::Auto).unwrap();
        let b = map_memfd(&ioas, &memfd, half, IovaPlacement::Auto).unwrap();
        for m in [&a, &b] {
            assert!(
                WINDOW.contains(m.iova(), m.length()),
                "{m} outside the allowed {WINDOW}"
            );
        }
        // ... and runs out when the window is full.
        match map_memfd(&ioas, &memfd, half, IovaPlacement::Auto) {
            Err(Error::InvalidIova {
                ioas: i,
                length,
                problem,
                ..
            }) => {
                assert_eq!((i, length), (ioas.id(), half.length));
                assert!(problem.contains("ENOSPC"), "{problem}");
            }
            other => panic!("automatic map into a full allowed window: {other:?}"),
        }
        assert_eq!(open_fd_count(), before + 2, "a failed map keeps no fd");
        // A fixed IOVA inside the (full) window collides; once b is gone, its
        // IOVA is free again.
        let b_iova = b.iova();
        match map_memfd(&ioas, &memfd, half, IovaPlacement::Fixed(b_iova)) {
            Err(Error::InvalidIova { iova, problem, .. }) => {
                assert_eq!(iova, b_iova);
                assert!(problem.contains("EEXIST"), "{problem}");
            }
            other => panic!("fixed map onto b: {other:?}"),
        }
        drop(b);
        let again = map_memfd(&ioas, &memfd, half, IovaPlacement::Fixed(b_iova)).unwrap();
        assert_eq!(again.iova(), b_iova);
        // The allowed list does not restrict fixed IOVAs (Linux 7.2 checks
        // only reserved regions and existing areas for those).
        let outside = map_memfd(&ioas, &memfd, half, IovaPlacement::Fixed(FIXED)).unwrap();
        assert!(!WINDOW.contains(outside.iova(), outside.length()));
        println!(
            "allowed {WINDOW}: auto {:#x}, fixed inside {b_iova:#x}, fixed outside {:#x}",
            a.iova(),
            outside.iova()
        );

        // Clearing the list lets automatic placement go anywhere again.
        ioas.allow_iovas(&[]).unwrap();
        let anywhere = map_memfd(&ioas, &memfd, half, IovaPlacement::Auto).unwrap();
        assert!(
            !WINDOW.contains(anywhere.iova(), anywhere.length()),
            "{anywhere}"
        );
    }
    assert_eq!(open_fd_count(), before);
}

#[test]
fn allow_iovas_bad_lists_are_refused_and_change_nothing() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let _edu = attached_edu(&iommufd, &ioas);
    ioas.allow_iovas(&[WINDOW]).unwrap();
    let usable = ioas.iova_ranges().unwrap();
    let before = open_fd_count();

    let expect = |what: &str,
                  list: &[IovaRange],
                  want_index: usize,
                  check: &dyn Fn(&AllowedIovaProblem) -> bool| {
        match ioas.allow_iovas(list) {
            Err(e @ Error::InvalidAllowedIova { .. }) => {
                println!("{what}: {e}");
                let Error::InvalidAllowedIova {
                    ioas: i,
                    index,
                    range,
                    problem,
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(
                    (*i, *index, *range),
                    (ioas.id(), want_index, list[want_index]),
                    "{what}"
                );
                assert!(check(problem), "{what}: {problem:?}");
            }
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(open_fd_count(), before, "{what} leaked an fd");
    };
    expect("one byte", &[r(0x9000_0000, 0x9000_0000)], 0, &|p| {
        *p == AllowedIovaProblem::Empty
    });
    expect(
        "inverted",
        &[WINDOW, r(0xa000_0000, 0x9000_0000)],
        1,
        &|p| *p == AllowedIovaProblem::Empty,
    );
    let overlapping = [
        r(0x8000_0000, 0x8fff_ffff),
        r(0x1_0000_0000, 0x1_0fff_ffff),
        r(0x8800_0000, 0x8800_ffff),
    ];
    expect("overlap", &overlapping, 2, &|p| {
        *p == AllowedIovaProblem::Overlaps {
            other: 0,
            with: overlapping[0],
        }
    });
    // The x86 MSI window (0xfee00000..0xfeefffff) is reserved once edu is
    // attached: the kernel refuses with EADDRINUSE, and the library finds
    // which range it was.
    let msi = [WINDOW, r(0xfe00_0000, 0xffff_ffff)];
    expect(
        "reserved",
        &msi,
        1,
        &|p| matches!(p, AllowedIovaProblem::Reserved { usable } if !usable.is_empty()),
    );
    let e = ioas.allow_iovas(&msi).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE));
    assert!(e.to_string().contains("EADDRINUSE"), "{e}");
    assert_eq!(
        ioas.iova_ranges().unwrap(),
        usable,
        "the usable ranges did not change"
    );

    // The first list is still in force: automatic placement lands in it.
    let memfd = Memfd::new("allow-kept", PAGE).unwrap();
    let m = map_memfd(&ioas, &memfd, ByteRange::new(0, PAGE), IovaPlacement::Auto).unwrap();
    assert!(WINDOW.contains(m.iova(), PAGE), "{m}");
}

#[test]
fn allowed_iovas_refuse_an_attach_that_would_narrow_them() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    // No device yet: nothing is reserved, so a window over the MSI range is
    // accepted...
    let msi = r(0xfe00_0000, 0xffff_ffff);
    ioas.allow_iovas(&[msi]).unwrap();
    let mut dev = VfioPciDevice::open(edu_address().parse().unwrap()).unwrap();
    dev.bind(&iommufd).unwrap();
    let before = open_fd_count();
    // ... and then a device that needs it reserved cannot attach.
    match dev.attach(&ioas) {
        Err(e) => {
            println!("attach with {msi} allowed: {e}");
            assert_eq!(e.raw_os_error(), Some(libc::EADDRINUSE), "{e}");
        }
        Ok(hwpt) => panic!("edu attached (HWPT {hwpt}) over an allowed MSI window"),
    }
    assert!(dev.attached_ioas().is_none());
    assert_eq!(open_fd_count(), before);
    ioas.allow_iovas(&[]).unwrap();
    dev.attach(&ioas).unwrap();
    assert!(
        !ioas.iova_ranges().unwrap().contains(0xfee0_0000, PAGE),
        "the MSI window is reserved now"
    );
}

/// Memfd and BAR dma-buf areas of IOAS A, copied into IOAS B where edu is
/// attached; the sources are then unmapped and edu copies through the copies
/// alone: from the memfd copy into its buffer, and from there into the BAR
/// copy (two transfers).
#[test]
fn copies_of_memfd_and_bar_areas_carry_dma() {
    let iommufd = Iommufd::open().unwrap();
    let a = iommufd.alloc_ioas().unwrap();
    let b = iommufd.alloc_ioas().unwrap();
    let mut edu = Edu::open(edu_address().parse().unwrap(), &b).unwrap();
    let shm = open_shm("shm1", &iommufd);
    let bar = shm.map_bar(2).unwrap();
    let background = pattern(90, PAGE as usize);
    bar_write(&bar, REGION, &background);
    let export = shm.export_bar(2, &[ByteRange::new(REGION, PAGE)]).unwrap();
    let data = pattern(91, 0x800);
    let memfd = Memfd::new("copy-src", 2 * PAGE).unwrap();
    memfd.write_at(PAGE, &data).unwrap();
    let before = open_fd_count();
    {
        let mem_a =
            map_memfd(&a, &memfd, ByteRange::new(0, 2 * PAGE), IovaPlacement::Auto).unwrap();
        let bar_a = a
            .map_dmabuf(export.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite)
            .unwrap();
        // The second page of the memfd area, and the whole BAR area.
        let mem_b = b
            .copy_from(
                &mem_a,
                ByteRange::new(PAGE, PAGE),
                IovaPlacement::Auto,
                MapPerms::Read,
            )
            .unwrap();
        let bar_b = b
            .copy_from(
                &bar_a,
                ByteRange::new(0, PAGE),
                IovaPlacement::Fixed(FIXED),
                MapPerms::ReadWrite,
            )
            .unwrap();
        assert_eq!(
            (mem_b.ioas_id(), mem_b.length(), mem_b.source_offset()),
            (b.id(), PAGE, PAGE)
        );
        assert!(mem_b.dmabuf().is_none());
        assert_eq!(
            (bar_b.iova(), bar_b.length(), bar_b.source_offset()),
            (FIXED, PAGE, 0)
        );
        assert!(
            bar_b.dmabuf().is_some(),
            "a copy of a dma-buf area maps that dma-buf"
        );
        println!("{mem_a}\n{bar_a}\ncopied: {mem_b}\ncopied: {bar_b}");
        // The memfd mappings keep a dup each; the dma-buf ones share the
        // export's fd.
        assert_eq!(
            open_fd_count(),
            before + 2,
            "each memfd mapping keeps one dup, dma-buf mappings none"
        );
        drop((mem_a, bar_a)); // the copies stand alone

        edu.load(mem_b.iova(), 0, 0x800, DMA_TIMEOUT).unwrap();
        edu.store(0, bar_b.iova() + 0x400, 0x800, DMA_TIMEOUT)
            .unwrap();
        let mut want = background;
        want[0x400..0xc00].copy_from_slice(&data);
        assert_bytes(
            &bar_read(&bar, REGION, PAGE as usize),
            &want,
            REGION,
            "shm1 BAR2 after DMA through copies",
        );
        request_host_check("shm1", REGION, &want);

        let (mut mem_b, mut bar_b) = (mem_b, bar_b);
        assert_eq!(mem_b.unmap().unwrap(), PAGE);
        assert_eq!(bar_b.unmap().unwrap(), PAGE);
    }
    assert_eq!(open_fd_count(), before);
}

#[test]
fn copy_bad_inputs_and_remap() {
    let iommufd = Iommufd::open().unwrap();
    let a = iommufd.alloc_ioas().unwrap();
    let b = iommufd.alloc_ioas().unwrap();
    let other = Iommufd::open().unwrap().alloc_ioas().unwrap();
    let memfd = Memfd::new("copy-bad", 64 << 10).unwrap();
    let src = map_memfd(&a, &memfd, ByteRange::new(0, 64 << 10), IovaPlacement::Auto).unwrap();
    let mut gone = map_memfd(&a, &memfd, ByteRange::new(0, PAGE), IovaPlacement::Auto).unwrap();
    gone.unmap().unwrap();
    let user = dmabuf_p2p_vm_tests::AnonPages::new(PAGE as usize);
    // SAFETY: `user` outlives the mapping (declared earlier, dropped later)
    // and Rust never reads or writes it.
    let user_map = unsafe {
        a.map_user(
            user.ptr(),
            user.len(),
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
        )
    }
    .unwrap();
    let before = open_fd_count();

    let unsupported =
        |what: &str, res: dmabuf_p2p::Result<IoasMapping>, needle: &str, source: &IoasMapping| {
            match res {
                Err(Error::Unsupported {
                    target,
                    operation,
                    problem,
                    ..
                }) => {
                    assert_eq!(operation, "IOMMU_IOAS_COPY", "{what}");
                    assert!(
                        target.contains(&format!("IOVA {:#x}", source.iova())),
                        "{what}: {target}"
                    );
                    assert!(problem.contains(needle), "{what}: {problem}");
                    println!("{what}: {target}: {problem}");
                }
                other => panic!("{what}: {other:?}"),
            }
            assert_eq!(open_fd_count(), before, "{what} leaked an fd");
        };
    let page = ByteRange::new(0, PAGE);
    unsupported(
        "other iommufd",
        other.copy_from(&src, page, IovaPlacement::Auto, MapPerms::Read),
        "another iommufd",
        &src,
    );
    unsupported(
        "unmapped source",
        b.copy_from(&gone, page, IovaPlacement::Auto, MapPerms::Read),
        "not mapped",
        &gone,
    );
    unsupported(
        "user memory",
        b.copy_from(&user_map, page, IovaPlacement::Auto, MapPerms::Read),
        "user memory",
        &user_map,
    );
    for (range, want) in [
        (
            ByteRange::new(0x8000, 0x10000),
            RangeProblem::OutOfBounds {
                end: 0x18000,
                size: 0x10000,
            },
        ),
        (ByteRange::new(0, 0), RangeProblem::Empty),
        (ByteRange::new(u64::MAX - 1, 2), RangeProblem::Overflow),
    ] {
        match b.copy_from(&src, range, IovaPlacement::Auto, MapPerms::Read) {
            Err(Error::InvalidRange {
                target,
                range: got,
                problem,
            }) => {
                assert_eq!((got, &problem), (range, &want));
                assert!(target.contains(&format!("IOAS {}", a.id())), "{target}");
            }
            other => panic!("copy of {range}: {other:?}"),
        }
        assert_eq!(open_fd_count(), before, "copy of {range} leaked an fd");
    }
    // A copy is an area like any other: the destination IOVA is checked.
    let mut first = b
        .copy_from(
            &src,
            ByteRange::new(0x4000, 0x4000),
            IovaPlacement::Fixed(FIXED),
            MapPerms::Read,
        )
        .unwrap();
    assert_eq!(
        (first.iova(), first.length(), first.source_offset()),
        (FIXED, 0x4000, 0x4000)
    );
    match b.copy_from(
        &src,
        page,
        IovaPlacement::Fixed(FIXED + PAGE),
        MapPerms::Read,
    ) {
        Err(Error::InvalidIova {
            ioas,
            iova,
            length,
            problem,
            source,
        }) => {
            assert_eq!((ioas, iova, length), (b.id(), FIXED + PAGE, PAGE));
            assert!(problem.contains("EEXIST"), "{problem}");
            assert_eq!(source.and_then(|e| e.raw_os_error()), Some(libc::EEXIST));
        }
        other => panic!("copy onto a taken IOVA: {other:?}"),
    }
    assert_eq!(open_fd_count(), before + 1);
    // Remap maps the recorded file again at the same IOVA.
    first.remap().unwrap();
    assert_eq!(first.iova(), FIXED);
    // Within one IOAS too.
    let twin = a
        .copy_from(&src, page, IovaPlacement::Auto, MapPerms::Read)
        .unwrap();
    assert_ne!(twin.iova(), src.iova());
    drop((first, twin));
    assert_eq!(open_fd_count(), before);
}

/// A copy of a mock dma-buf area goes dead with the source when the buffer
/// is revoked; remapping it fails while revoked and works after a restore.
#[test]
fn copy_of_a_mock_area_follows_its_revocation() {
    let iommufd = Iommufd::open().unwrap();
    let a = iommufd.alloc_ioas().unwrap();
    let b = iommufd.alloc_ioas().unwrap();
    let mock = MockDmaBuf::new(&iommufd, 4 * PAGE).unwrap();
    let src = a
        .map_dmabuf(mock.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite)
        .unwrap();
    let mut copy = b
        .copy_from(
            &src,
            ByteRange::new(0, 4 * PAGE),
            IovaPlacement::Fixed(FIXED),
            MapPerms::ReadWrite,
        )
        .unwrap();
    let before = open_fd_count();
    mock.revoke(true).unwrap();
    // The kernel copies a revoked area without complaint (an area that maps
    // nothing).
    let late = b
        .copy_from(
            &src,
            ByteRange::new(0, PAGE),
            IovaPlacement::Auto,
            MapPerms::Read,
        )
        .unwrap();
    drop(late);
    match copy.remap() {
        Err(e @ Error::Revoked { .. }) => {
            assert!(e.to_string().contains(MOCK_EXPORTER), "{e}");
            assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "the kernel's answer");
        }
        other => panic!("remap of a copy while revoked: {other:?}"),
    }
    assert!(!copy.is_mapped());
    mock.revoke(false).unwrap();
    copy.remap().unwrap();
    assert_eq!(copy.iova(), FIXED);
    assert_eq!(open_fd_count(), before);
}

#[test]
fn huge_pages_option() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    assert!(ioas.huge_pages().unwrap(), "on by default");
    ioas.set_huge_pages(false).unwrap();
    assert!(!ioas.huge_pages().unwrap());
    assert_eq!(
        iommufd
            .option(OptionId::HugePages { ioas: ioas.id() })
            .unwrap(),
        IommufdOption::HugePages {
            ioas: ioas.id(),
            enabled: false
        }
    );
    iommufd
        .set_option(IommufdOption::HugePages {
            ioas: ioas.id(),
            enabled: true,
        })
        .unwrap();
    assert!(ioas.huge_pages().unwrap());

    // Off is refused once a device is attached and something is mapped.
    let busy = iommufd.alloc_ioas().unwrap();
    let _edu = attached_edu(&iommufd, &busy);
    let memfd = Memfd::new("huge", 64 << 10).unwrap();
    let _m = map_memfd(
        &busy,
        &memfd,
        ByteRange::new(0, 64 << 10),
        IovaPlacement::Auto,
    )
    .unwrap();
    let before_busy = open_fd_count();
    match busy.set_huge_pages(false) {
        Err(e @ Error::OptionRefused { .. }) => {
            println!("{e}");
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
            let Error::OptionRefused { option, target, .. } = &e else {
                unreachable!()
            };
            assert_eq!(option, &format!("HUGE_PAGES of IOAS {} = off", busy.id()));
            assert!(target.starts_with("iommufd (fd "), "{target}");
        }
        other => panic!("huge pages off with mappings: {other:?}"),
    }
    assert!(busy.huge_pages().unwrap(), "unchanged");
    busy.set_huge_pages(true).unwrap();
    assert_eq!(open_fd_count(), before_busy);

    // An ID that is no IOAS.
    for id in [0, 0xdead] {
        match iommufd.option(OptionId::HugePages { ioas: id }) {
            Err(Error::UnknownObject { op, id: got, .. }) => {
                assert_eq!((op, got), ("IOMMU_OPTION", id))
            }
            other => panic!("HUGE_PAGES of IOAS {id}: {other:?}"),
        }
        match iommufd.set_option(IommufdOption::HugePages {
            ioas: id,
            enabled: true,
        }) {
            Err(Error::UnknownObject { id: got, .. }) => assert_eq!(got, id),
            other => panic!("set HUGE_PAGES of IOAS {id}: {other:?}"),
        }
    }
    assert_eq!(open_fd_count(), before_busy);
}

#[test]
fn rlimit_mode_option() {
    let iommufd = Iommufd::open().unwrap();
    let before = open_fd_count();
    assert_eq!(
        iommufd.option(OptionId::RlimitMode).unwrap(),
        IommufdOption::RlimitMode(RlimitMode::User)
    );
    // The tests run as root (CAP_SYS_RESOURCE), and the iommufd is fresh.
    iommufd
        .set_option(IommufdOption::RlimitMode(RlimitMode::Mm))
        .unwrap();
    assert_eq!(
        iommufd.option(OptionId::RlimitMode).unwrap(),
        IommufdOption::RlimitMode(RlimitMode::Mm)
    );
    iommufd
        .set_option(IommufdOption::RlimitMode(RlimitMode::User))
        .unwrap();

    // Not once it holds an object.
    let ioas = iommufd.alloc_ioas().unwrap();
    match iommufd.set_option(IommufdOption::RlimitMode(RlimitMode::Mm)) {
        Err(e @ Error::OptionRefused { .. }) => {
            println!("{e}");
            assert_eq!(e.raw_os_error(), Some(libc::EBUSY));
            let Error::OptionRefused {
                option, problem, ..
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(option, "RLIMIT_MODE = mm");
            assert!(problem.contains("fresh iommufd"), "{problem}");
        }
        other => panic!("RLIMIT_MODE with an IOAS: {other:?}"),
    }
    assert_eq!(
        iommufd.option(OptionId::RlimitMode).unwrap(),
        IommufdOption::RlimitMode(RlimitMode::User)
    );
    drop(ioas);
    assert_eq!(open_fd_count(), before);
}

#[test]
fn dma_buf_export_probe() {
    let iommufd = Iommufd::open().unwrap();
    let before = open_fd_count();
    for name in ["shm0", "shm1"] {
        let dev = open_shm(name, &iommufd);
        assert!(dev.supports_dma_buf_export().unwrap(), "{name}");
    }
    // edu is driven by vfio-pci as well, which implements the feature.
    let mut edu = VfioPciDevice::open(edu_address().parse().unwrap()).unwrap();
    match edu.supports_dma_buf_export() {
        Err(Error::Device {
            device, problem, ..
        }) => {
            assert_eq!(device, edu_address());
            assert!(problem.contains("not bound"), "{problem}");
        }
        other => panic!("probe before bind: {other:?}"),
    }
    edu.bind(&iommufd).unwrap();
    println!(
        "edu supports dma-buf export: {}",
        edu.supports_dma_buf_export().unwrap()
    );
    drop(edu);
    assert_eq!(open_fd_count(), before);
}

/// The kernel's `dmabuf_revoke` selftest flow through the library: map,
/// revoke through the mock, a second map is `Revoked`, a device attaching
/// meanwhile is fine, restore, a new map works, and unmap plus map at the
/// old IOVA brings the first area back.
#[test]
fn mock_dmabuf_revoke_flow() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let before = open_fd_count();
    {
        let mock = MockDmaBuf::new(&iommufd, 4 * PAGE).unwrap();
        assert_eq!(open_fd_count(), before + 1);
        assert_eq!(mock.dmabuf().size().unwrap(), 4 * PAGE);
        assert_eq!(mock.dmabuf().fdinfo().unwrap().exp_name, MOCK_EXPORTER);
        assert!(mock.iommufd().same_context(&iommufd));
        let mut first = ioas
            .map_dmabuf(
                mock.dmabuf(),
                IovaPlacement::Fixed(FIXED),
                MapPerms::ReadWrite,
            )
            .unwrap();
        assert!(!probe_revoked(&iommufd, mock.dmabuf()).unwrap());

        mock.revoke(true).unwrap();
        mock.revoke(true).unwrap(); // again: no change
        let mid = open_fd_count();
        match ioas.map_dmabuf(mock.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite) {
            Err(e @ Error::Revoked { .. }) => {
                assert!(e.to_string().contains(MOCK_EXPORTER), "{e}");
                assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "the kernel's answer");
            }
            other => panic!("map while revoked: {other:?}"),
        }
        assert_eq!(open_fd_count(), mid, "a refused map keeps no fd");
        assert!(probe_revoked(&iommufd, mock.dmabuf()).unwrap());
        assert!(first.is_mapped(), "the dead area stays until unmapped");
        // A device attaching to an IOAS with a revoked area: accepted.
        let _edu = attached_edu(&iommufd, &ioas);

        mock.revoke(false).unwrap();
        let second = ioas
            .map_dmabuf(mock.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite)
            .unwrap();
        assert_ne!(second.iova(), FIXED);
        assert_eq!(first.unmap().unwrap(), 4 * PAGE);
        let again = ioas
            .map_dmabuf(
                mock.dmabuf(),
                IovaPlacement::Fixed(FIXED),
                MapPerms::ReadWrite,
            )
            .unwrap();
        assert_eq!(again.iova(), FIXED);
        // remap is the same unmap + map in one call.
        drop(again);
        first.remap().unwrap();
        assert_eq!(first.iova(), FIXED);
    }
    assert_eq!(open_fd_count(), before);
}

#[test]
fn mock_dmabuf_bad_lengths() {
    let iommufd = Iommufd::open().unwrap();
    let before = open_fd_count();
    let max = MAX_PAGES * PAGE;
    for (len, want) in [
        (0, RangeProblem::Empty),
        (100, RangeProblem::Unaligned { align: PAGE }),
        (PAGE + 1, RangeProblem::Unaligned { align: PAGE }),
        (
            max + PAGE,
            RangeProblem::OutOfBounds {
                end: max + PAGE,
                size: max,
            },
        ),
        (
            1 << 40,
            RangeProblem::OutOfBounds {
                end: 1 << 40,
                size: max,
            },
        ),
    ] {
        match MockDmaBuf::new(&iommufd, len) {
            Err(Error::InvalidRange {
                target,
                range,
                problem,
            }) => {
                assert_eq!(
                    (range, problem),
                    (ByteRange::new(0, len), want),
                    "length {len:#x}"
                );
                assert!(target.contains("mock dma-buf"), "{target}");
            }
            other => panic!("mock dma-buf of {len:#x} bytes: {other:?}"),
        }
        assert_eq!(open_fd_count(), before, "length {len:#x} leaked an fd");
    }
    // The largest one is fine.
    let big = MockDmaBuf::new(&iommufd, max).unwrap();
    assert_eq!(big.dmabuf().size().unwrap(), max);
    drop(big);
    assert_eq!(open_fd_count(), before);
}

/// What the mock is for: exercising revocation handling built on
/// attachments. Unreported, the revocation is found by asking the kernel;
/// reported through the hub, the attachment tears down and comes back.
#[test]
fn mock_dmabuf_drives_attachments() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mock = MockDmaBuf::new(&iommufd, 2 * PAGE).unwrap();
    let att = Attachment::map(
        &mock,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    let iova = att.iova();
    let before = open_fd_count();

    // Behind the library's back: only the kernel knows.
    mock.revoke(true).unwrap();
    assert!(!att.is_revoked());
    assert!(att.sync_with_kernel(&iommufd).unwrap());
    assert_eq!(att.revoked_reason(), Some(RevokeReason::External));
    mock.revoke(false).unwrap();
    assert!(!att.sync_with_kernel(&iommufd).unwrap());
    assert!(!att.is_revoked());
    assert_eq!(att.iova(), iova);

    // Reported, as an exporter does for its own revocations.
    mock.revoke(true).unwrap();
    assert_eq!(
        mock.hub().revoked_by_kernel(RevokeReason::MemoryDecodeOff),
        1
    );
    assert!(att.is_revoked());
    assert!(matches!(att.ensure_live(), Err(Error::Revoked { .. })));
    mock.revoke(false).unwrap();
    assert_eq!(mock.hub().restore(), 1);
    assert!(!att.is_revoked());
    assert_eq!(att.counts(), (2, 2));
    assert!(!probe_revoked(&iommufd, mock.dmabuf()).unwrap());
    assert_eq!(open_fd_count(), before);
}
