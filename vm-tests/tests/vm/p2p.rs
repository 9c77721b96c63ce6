//! Peer-to-peer DMA, end to end: the edu engine copies through the IOMMU into
//! and out of ivshmem BARs exported as dma-bufs, and every copy's bytes are
//! checked (in the guest through a BAR mmap, and on the host in the ivshmem
//! backing file).
//!
//! Every edu transfer takes 100 ms of guest time, so the tests count them: a
//! copy ([`DmaEngine::memcpy`]) is two transfers per 2 KiB, while
//! [`Edu::load`] once and [`Edu::store`] many times is one transfer per store.
//!
//! The BAR areas the tests write, chosen apart so that the host checks (made
//! after the whole run) see each test's own bytes:
//!
//! | device | BAR2 offset | test |
//! | --- | --- | --- |
//! | shm0 | 0x1000..0x2000 | `host_ram_to_bar` |
//! | shm0 | 0x2000..0x6000 | `sub_range_export` (export 0x3000+0x2000) |
//! | shm0 | 0x6000..0x7000 | `bar_to_host_ram` |
//! | shm0 | 0x8000..0x9000 | `bar_to_bar` (source) |
//! | shm0 | 0xa000..0xb000 | `read_only_import` |
//! | shm0 | 0x10000..0x60000 | the revocation tests (`revoke.rs`) |
//! | shm1 | 0x100000..0x101000 | `bar_to_bar` (destination) |
//! | shm1 | 0x200000..0x300000 | `many_dmabufs_at_once` |

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::exporter::bar::BarExport;
use dmabuf_p2p::importer::iommufd::{Ioas, Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{Attachment, BufferState, RestorePolicy, RevocationEvent, RevokeReason};
use dmabuf_p2p::vfio::VfioPciDevice;
use dmabuf_p2p_engine::edu::{EDU_BUFFER_USABLE, Edu};
use dmabuf_p2p_engine::{Completion, DmaEngine};
use dmabuf_p2p_vm_tests::{
    DMA_TIMEOUT, EDU_ID, Kmsg, assert_bytes, bar_read, bar_write, check_write_faults, edu_address,
    pattern, pci_devices, request_host_check, shm_address,
};

const PAGE: u64 = 0x1000;

/// The edu engine attached to `ioas`, completing by MSI.
fn open_edu(ioas: &Ioas) -> Edu {
    let edu = Edu::open(edu_address().parse().unwrap(), ioas).unwrap();
    assert_eq!(
        edu.completion(),
        Completion::Interrupt,
        "MSI set-up failed: {:?}",
        edu.polling_reason()
    );
    edu
}

/// The ivshmem device `name`, bound to `iommufd`, with memory decode on.
fn open_shm(name: &str, iommufd: &Iommufd) -> VfioPciDevice {
    let mut dev = VfioPciDevice::open(shm_address(name).parse().unwrap()).unwrap();
    dev.bind(iommufd).unwrap();
    dev.set_memory_decode(true).unwrap();
    dev
}

/// A memfd holding `data` (and zeros up to a whole page), mapped in `ioas`.
fn source(
    ioas: &Ioas,
    data: &[u8],
    perms: MapPerms,
) -> (Memfd, dmabuf_p2p::importer::iommufd::IoasMapping) {
    let size = (data.len() as u64).next_multiple_of(PAGE);
    let mem = Memfd::new("p2p-src", size).unwrap();
    mem.write_at(0, data).unwrap();
    let map = ioas
        .map_file(&mem, ByteRange::new(0, size), IovaPlacement::Auto, perms)
        .unwrap();
    (mem, map)
}

/// Host RAM → BAR: the engine copies a memfd through the IOMMU into shm0's
/// exported BAR2; the guest's BAR mmap and the host's backing file hold the bytes.
#[test]
fn host_ram_to_bar() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut edu = open_edu(&ioas);
    let target = open_shm("shm0", &iommufd);
    let bar = target.map_bar(2).unwrap();
    bar_write(&bar, 0, &[0u8; 8192]);
    let export = target.export_bar(2, &[ByteRange::new(0, 0x10000)]).unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();

    let data = pattern(7, 4096);
    let (_src, src_map) = source(&ioas, &data, MapPerms::Read);
    edu.memcpy(src_map.iova(), att.iova() + 0x1000, 4096, DMA_TIMEOUT)
        .unwrap();
    assert_bytes(
        &bar_read(&bar, 0x1000, 4096),
        &data,
        0x1000,
        "shm0 BAR2 after the copy",
    );
    request_host_check("shm0", 0x1000, &data);
}

/// BAR → host RAM: the engine reads shm0's exported BAR2 and writes a memfd
/// mapped writable in the IOAS; the memfd holds exactly the BAR's bytes at
/// the destination and nothing else changed.
#[test]
fn bar_to_host_ram() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut edu = open_edu(&ioas);
    let dev = open_shm("shm0", &iommufd);
    let bar = dev.map_bar(2).unwrap();
    let data = pattern(21, 0x800);
    bar_write(&bar, 0x6000, &data);
    let export = dev.export_bar(2, &[ByteRange::new(0x6000, PAGE)]).unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::Read,
        RestorePolicy::Automatic,
    )
    .unwrap();

    let dst = Memfd::new("p2p-dst", 0x4000).unwrap();
    dst.write_at(0, &[0xee; 0x4000]).unwrap();
    let dst_map = ioas
        .map_file(
            &dst,
            ByteRange::new(0, 0x4000),
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
        )
        .unwrap();
    edu.memcpy(att.iova(), dst_map.iova() + 0x1230, 0x800, DMA_TIMEOUT)
        .unwrap();

    let mut got = vec![0u8; 0x4000];
    dst.read_at(0, &mut got).unwrap();
    let mut want = vec![0xee; 0x4000];
    want[0x1230..0x1a30].copy_from_slice(&data);
    assert_bytes(&got, &want, 0, "memfd after the BAR → RAM copy");
    request_host_check("shm0", 0x6000, &data);
}

/// BAR → BAR: with shm0's and shm1's BAR2 exported as dma-bufs and mapped
/// in one IOAS, the engine copies from one to the other; shm1's BAR mmap and
/// backing file hold the bytes, the bytes around them untouched.
#[test]
fn bar_to_bar() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut edu = open_edu(&ioas);

    let src_dev = open_shm("shm0", &iommufd);
    let src_bar = src_dev.map_bar(2).unwrap();
    let data = pattern(33, 0x800);
    bar_write(&src_bar, 0x8100, &data);
    let src_export = src_dev
        .export_bar(2, &[ByteRange::new(0x8000, PAGE)])
        .unwrap();
    let src = Attachment::map(
        &src_export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::Read,
        RestorePolicy::Automatic,
    )
    .unwrap();

    let dst_dev = open_shm("shm1", &iommufd);
    let dst_bar = dst_dev.map_bar(2).unwrap();
    let background = pattern(34, PAGE as usize);
    bar_write(&dst_bar, 0x10_0000, &background);
    let dst_export = dst_dev
        .export_bar(2, &[ByteRange::new(0x10_0000, PAGE)])
        .unwrap();
    let dst = Attachment::map(
        &dst_export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    assert_ne!(src.info().exporter, dst.info().exporter, "two exporters");

    edu.memcpy(src.iova() + 0x100, dst.iova() + 0x300, 0x800, DMA_TIMEOUT)
        .unwrap();

    let mut want = background;
    want[0x300..0xb00].copy_from_slice(&data);
    assert_bytes(
        &bar_read(&dst_bar, 0x10_0000, PAGE as usize),
        &want,
        0x10_0000,
        "shm1 BAR2 after the copy",
    );
    assert_bytes(
        &bar_read(&src_bar, 0x8100, data.len()),
        &data,
        0x8100,
        "shm0 BAR2 (the source) after the copy",
    );
    request_host_check("shm1", 0x10_0000, &want);
}

/// A sub-range export (shm0 BAR2 0x3000+0x2000) maps with its IOVA start at
/// exactly BAR offset 0x3000: DMA to IOVA+0x10 lands at BAR 0x3010, DMA to
/// its last bytes lands just below 0x5000, and no byte around changes.
#[test]
fn sub_range_export() {
    const AREA: u64 = 0x2000; // what the test checks: the export and a page either side
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut edu = open_edu(&ioas);
    let dev = open_shm("shm0", &iommufd);
    let bar = dev.map_bar(2).unwrap();
    let background = pattern(40, 0x4000);
    bar_write(&bar, AREA, &background);

    let export = dev
        .export_bar(2, &[ByteRange::new(0x3000, 0x2000)])
        .unwrap();
    assert_eq!(export.size(), 0x2000);
    let bar_start = dev.bar(2).unwrap().resource.start;
    assert_eq!(
        export.phys_ranges()[0].start,
        bar_start + 0x3000,
        "the export's physical start"
    );
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    assert_eq!(att.length(), 0x2000);

    let data = pattern(41, 0x40);
    let (_src, src_map) = source(&ioas, &data, MapPerms::Read);
    edu.load(src_map.iova(), 0, 0x40, DMA_TIMEOUT).unwrap();
    edu.store(0, att.iova() + 0x10, 0x40, DMA_TIMEOUT).unwrap();
    edu.store(0, att.iova() + 0x2000 - 0x30, 0x30, DMA_TIMEOUT)
        .unwrap();

    let mut want = background;
    let at = |bar_off: u64| (bar_off - AREA) as usize;
    want[at(0x3010)..at(0x3050)].copy_from_slice(&data);
    want[at(0x4fd0)..at(0x5000)].copy_from_slice(&data[..0x30]);
    assert_bytes(
        &bar_read(&bar, AREA, 0x4000),
        &want,
        AREA,
        "shm0 BAR2 0x2000..0x6000",
    );
    request_host_check("shm0", AREA, &want);
}

/// A read-only import (`MapPerms::Read`): the engine's write through it
/// faults in the IOMMU and changes no byte of the BAR, and its read through
/// it returns the BAR's bytes.
#[test]
fn read_only_import() {
    const AT: u64 = 0xa000;
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut edu = open_edu(&ioas);
    let dev = open_shm("shm0", &iommufd);
    let bar = dev.map_bar(2).unwrap();
    let old = pattern(50, PAGE as usize);
    bar_write(&bar, AT, &old);
    let export = dev.export_bar(2, &[ByteRange::new(AT, PAGE)]).unwrap();
    let ro = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::Read,
        RestorePolicy::Automatic,
    )
    .unwrap();

    // The memfd: new bytes in its first half, a marked second half to read into.
    let mut init = pattern(51, 0x800);
    init.resize(0x2000, 0xee);
    let (mem, mem_map) = source(&ioas, &init, MapPerms::ReadWrite);

    let mut kmsg = Kmsg::open_at_end().unwrap();
    edu.load(mem_map.iova(), 0, 0x800, DMA_TIMEOUT).unwrap();
    Kmsg::mark(&format!(
        "edu store of 0x800 bytes to read-only IOVA {:#x}",
        ro.iova() + 0x100
    ));
    edu.store(0, ro.iova() + 0x100, 0x800, DMA_TIMEOUT).unwrap();
    let faults = kmsg.iommu_faults(Duration::from_millis(200));
    let records = check_write_faults(&faults, &edu_address());
    println!(
        "{records} IOMMU fault record(s) logged for the write through the read-only import: {faults:#?}"
    );
    assert_bytes(
        &bar_read(&bar, AT, PAGE as usize),
        &old,
        AT,
        "BAR after a DMA write through a read-only import",
    );

    edu.load(ro.iova() + 0x100, 0, 0x800, DMA_TIMEOUT).unwrap();
    edu.store(0, mem_map.iova() + 0x1000, 0x800, DMA_TIMEOUT)
        .unwrap();
    let mut got = vec![0u8; 0x1000];
    mem.read_at(0x1000, &mut got).unwrap();
    let mut want = old[0x100..0x900].to_vec();
    want.resize(0x1000, 0xee);
    assert_bytes(
        &got,
        &want,
        0x1000,
        "memfd after reading through the read-only import",
    );
    request_host_check("shm0", AT, &old);
}

/// A free, 2 MiB-aligned IOVA range of `len` bytes in `ioas`, above 4 GiB
/// when the IOMMU allows it.
fn free_iova(ioas: &Ioas, len: u64) -> u64 {
    const ALIGN: u64 = 2 << 20;
    let ranges = ioas.iova_ranges().unwrap();
    for floor in [1u64 << 32, ALIGN] {
        for r in &ranges.ranges {
            let start = r.start.max(floor).next_multiple_of(ALIGN);
            if start
                .checked_add(len - 1)
                .is_some_and(|last| last <= r.last)
            {
                return start;
            }
        }
    }
    panic!("no free IOVA range of {len:#x} bytes in {ranges:?}");
}

/// 256 single-page dma-bufs of shm1's BAR2, mapped at once at adjacent
/// IOVAs in shuffled order, are each reached by DMA (one store across each
/// pair of neighbours, after one load per edu engine) and each lands in its
/// own BAR page; revoking shm1 tears all 256 down, a store then changes
/// nothing, and all come back at the same IOVAs, where the next store lands.
#[test]
fn many_dmabufs_at_once() {
    const N: usize = 256;
    const REGION: u64 = 0x20_0000;
    const HALF: usize = 32; // bytes each store puts on either side of a boundary
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    // Every edu engine the VM has: each runs its transfers on its own timer,
    // so the 128 stores (100 ms each) are shared out among them.
    let mut engines: Vec<Edu> = pci_devices(EDU_ID)
        .iter()
        .map(|a| {
            let edu = Edu::open(a.parse().unwrap(), &ioas).unwrap();
            assert_eq!(
                edu.completion(),
                Completion::Interrupt,
                "{a}: MSI set-up failed: {:?}",
                edu.polling_reason()
            );
            edu
        })
        .collect();
    let dev = open_shm("shm1", &iommufd);
    let bar = dev.map_bar(2).unwrap();
    let background = pattern(60, N * PAGE as usize);
    bar_write(&bar, REGION, &background);

    // Slot s (IOVA base + s pages) maps BAR page page_of(s): a bijection, so
    // a store reaching the wrong buffer shows.
    let page_of = |s: usize| (s * 77 + 13) % N;
    let base = free_iova(&ioas, N as u64 * PAGE);
    let exports: Vec<BarExport> = (0..N)
        .map(|p| {
            dev.export_bar(2, &[ByteRange::new(REGION + p as u64 * PAGE, PAGE)])
                .unwrap()
        })
        .collect();
    let revoked = Arc::new(AtomicUsize::new(0));
    let restored = Arc::new(AtomicUsize::new(0));
    let atts: Vec<Attachment> = (0..N)
        .map(|s| {
            let at = IovaPlacement::Fixed(base + s as u64 * PAGE);
            let att = Attachment::map(
                &exports[page_of(s)],
                &ioas,
                at,
                MapPerms::ReadWrite,
                RestorePolicy::Automatic,
            )
            .unwrap_or_else(|e| panic!("mapping dma-buf {s}: {e}"));
            let (rv, rs) = (Arc::clone(&revoked), Arc::clone(&restored));
            att.on_event(move |_, ev| match ev {
                RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff) => {
                    rv.fetch_add(1, Ordering::SeqCst);
                }
                RevocationEvent::Restored => {
                    rs.fetch_add(1, Ordering::SeqCst);
                }
                other => panic!("unexpected event {other:?}"),
            });
            att
        })
        .collect();
    assert_eq!(dev.hub().attachment_count(), N);
    for (s, att) in atts.iter().enumerate() {
        assert_eq!(att.iova(), base + s as u64 * PAGE);
    }

    let data = pattern(61, EDU_BUFFER_USABLE as usize);
    let (_src, src_map) = source(&ioas, &data, MapPerms::Read);

    // A store of 2*HALF bytes across the boundary in front of slot `b`: the
    // last HALF bytes of slot b-1 and the first HALF of slot b, from
    // buffer offset `o`. Records what should land in `want`.
    let mut want = background.clone();
    let boundary = |b: usize| base + b as u64 * PAGE - HALF as u64;
    let buffer_offset = |k: usize| (k * 29) % (EDU_BUFFER_USABLE as usize - 2 * HALF);
    let expect = |want: &mut Vec<u8>, b: usize, o: usize| {
        let tail = page_of(b - 1) * PAGE as usize + PAGE as usize - HALF;
        want[tail..tail + HALF].copy_from_slice(&data[o..o + HALF]);
        let head = page_of(b) * PAGE as usize;
        want[head..head + HALF].copy_from_slice(&data[o + HALF..o + 2 * HALF]);
    };
    // Engine e loads the data once, then does stores e, e + E, e + 2E, ...
    let count = engines.len();
    std::thread::scope(|scope| {
        for (e, edu) in engines.iter_mut().enumerate() {
            let src = src_map.iova();
            scope.spawn(move || {
                edu.load(src, 0, EDU_BUFFER_USABLE, DMA_TIMEOUT).unwrap();
                for j in (e..N / 2).step_by(count) {
                    edu.store(
                        buffer_offset(j) as u64,
                        boundary(2 * j + 1),
                        2 * HALF as u64,
                        DMA_TIMEOUT,
                    )
                    .unwrap();
                }
            });
        }
    });
    for j in 0..N / 2 {
        expect(&mut want, 2 * j + 1, buffer_offset(j));
    }
    assert_bytes(
        &bar_read(&bar, REGION, N * PAGE as usize),
        &want,
        REGION,
        "shm1 BAR2 after the 128 stores",
    );

    // Revoke all 256 at once; a store across slots 127|128 must change nothing.
    let (b, o) = (N / 2, buffer_offset(N / 2));
    dev.set_memory_decode(false).unwrap();
    assert_eq!(
        revoked.load(Ordering::SeqCst),
        N,
        "every attachment told of the revocation"
    );
    assert!(
        atts.iter()
            .all(|a| a.revoked_reason() == Some(RevokeReason::MemoryDecodeOff))
    );
    let edu = &mut engines[0];
    Kmsg::mark(&format!(
        "edu store of {:#x} bytes to revoked IOVA {:#x}",
        2 * HALF,
        boundary(b)
    ));
    edu.store(o as u64, boundary(b), 2 * HALF as u64, DMA_TIMEOUT)
        .unwrap();
    dev.set_memory_decode(true).unwrap();
    assert_eq!(dev.hub().state(), BufferState::Live);
    assert_eq!(
        restored.load(Ordering::SeqCst),
        N,
        "every attachment restored"
    );
    for (s, att) in atts.iter().enumerate() {
        assert!(
            !att.is_revoked(),
            "slot {s} still revoked: {:?}",
            att.last_error()
        );
        assert_eq!(att.iova(), base + s as u64 * PAGE);
    }
    // That store could only reach the pages behind slots b-1 and b (the
    // host check below covers the whole region).
    let check_pages = |want: &[u8], what: &str| {
        for page in [page_of(b - 1), page_of(b)] {
            let at = page * PAGE as usize;
            let off = REGION + at as u64;
            assert_bytes(
                &bar_read(&bar, off, PAGE as usize),
                &want[at..at + PAGE as usize],
                off,
                what,
            );
        }
    };
    check_pages(&want, "shm1 BAR2 after a store into 256 revoked dma-bufs");

    edu.store(o as u64, boundary(b), 2 * HALF as u64, DMA_TIMEOUT)
        .unwrap();
    expect(&mut want, b, o);
    check_pages(&want, "shm1 BAR2 after a store into the restored dma-bufs");
    request_host_check("shm1", REGION, &want);
    drop(atts);
    assert_eq!(dev.hub().attachment_count(), 0);
}
