//! The userspace NVMe driver against QEMU's NVMe controllers: reads into
//! host RAM and into device memory (an ivshmem BAR, the other controller's
//! CMB) through the IOMMU, writes, bad requests, and revocation of the
//! target while reads are queued. Every byte is checked in the guest against
//! the image the test bed wrote at boot, and on the host in the image and
//! ivshmem backing files.
//!
//! | device | area | test |
//! | --- | --- | --- |
//! | nvme0 | LBA 7168..7176 (bytes 0x380000..0x381000) | `nvme_write_reads_back_and_lands_in_the_image` (the only write) |
//! | shm1 | 0x2000000..0x2010000 | `nvme_reads_into_an_ivshmem_bar_match_host_ram` |
//! | shm1 | 0x2100000..0x2140000 | `nvme_revocation_while_reads_are_queued` |
//! | nvme1's PMR | 0x200000..0x208000 | `nvme_pmr_is_a_p2p_target` |
//! | nvme1's PMR | 0x0..0x10000 | `nvme_cli_p2p_test_and_devices` |

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::VfioPciDevice;
use dmabuf_p2p::importer::iommufd::{Ioas, IoasMapping, Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{Attachment, RestorePolicy};
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_engine::nvme::{CommandId, Nvme, NvmeOptions, NvmeProblem};
use dmabuf_p2p_engine::{Completion, DmaEngine, Error, StorageEngine};
use dmabuf_p2p_vm_tests::{
    DMA_TIMEOUT, Kmsg, assert_bytes, bar_read, bar_write, directive, edu_address, nvme_address,
    nvme_image, pattern, request_host_check, shm_address,
};

const BLOCK: u64 = 512;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn open_nvme(name: &str, ioas: &Ioas) -> Nvme {
    let nvme = Nvme::open(nvme_address(name).parse().unwrap(), ioas).unwrap();
    assert_eq!(nvme.identity().serial, name, "serial number of {name}");
    nvme
}

/// `name` (`nvme0`, ...) opened in `ioas` with `io_queues` I/O queues.
pub(crate) fn open_with_queues(name: &str, ioas: &Ioas, io_queues: u16) -> Nvme {
    Nvme::open_with_options(
        nvme_address(name).parse().unwrap(),
        ioas,
        NvmeOptions::new().io_queues(io_queues),
    )
    .unwrap()
}

/// A zeroed memfd of `size` bytes mapped read-write in `ioas`.
pub(crate) fn ram(ioas: &Ioas, size: u64) -> (Memfd, IoasMapping) {
    let mem = Memfd::new("nvme-data", size).unwrap();
    let map = ioas
        .map_file(
            &mem,
            ByteRange::new(0, size),
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
        )
        .unwrap();
    (mem, map)
}

fn read_mem(mem: &Memfd, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_at(offset, &mut v).unwrap();
    v
}

/// Reads `count` blocks from `lba` into the start of `mem` (mapped as `map`)
/// and checks them against the namespace image.
fn read_and_check(
    nvme: &mut Nvme,
    mem: &Memfd,
    map: &IoasMapping,
    lba: u64,
    count: u32,
    what: &str,
) {
    nvme.read_blocks(lba, count, map.iova(), IO_TIMEOUT)
        .unwrap();
    let len = u64::from(count) * BLOCK;
    assert_bytes(
        &read_mem(mem, 0, len as usize),
        &nvme_image(lba * BLOCK, len as usize),
        0,
        what,
    );
}

fn problem(e: &Error) -> &NvmeProblem {
    match e {
        Error::Nvme { problem, .. } => problem,
        other => panic!("expected an NVMe error, got {other:?}"),
    }
}

/// Bring-up: Identify says what the test bed configured, completion is by
/// MSI-X, and reads of one block, two pages (PRP2), a PRP list from an
/// offset start, and a whole MDTS transfer land in host RAM with the image's
/// bytes and nothing around them.
#[test]
fn nvme_identify_and_read_into_host_ram() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut nvme = open_nvme("nvme0", &ioas);
    assert_eq!(
        nvme.completion(),
        Completion::Interrupt,
        "MSI-X set-up failed: {:?}",
        nvme.polling_reason()
    );
    let ns = *nvme.namespace().expect("namespace 1 is active");
    assert_eq!((ns.nsid, ns.block_size, ns.blocks), (1, 512, 8192));
    assert_eq!(nvme.identity().mdts, 5);
    assert_eq!(nvme.max_transfer(), 128 << 10, "MDTS 5 of 4 KiB pages");
    assert!(nvme.identity().namespaces >= 1);
    assert!(nvme.version().0 >= 1);

    let (mem, map) = ram(&ioas, 0x40000);
    mem.write_at(0, &[0xee; 0x40000]).unwrap();
    // (lba, blocks, byte offset in the buffer): one block; two pages through
    // PRP2; 16 KiB from a dword offset (PRP list); the largest transfer.
    let cases = [
        (5u64, 1u32, 0u64),
        (100, 16, 0x4000),
        (1000, 32, 0x8804),
        (2048, 256, 0x10000),
    ];
    for (lba, count, at) in cases {
        nvme.read_blocks(lba, count, map.iova() + at, IO_TIMEOUT)
            .unwrap();
        let len = (u64::from(count) * BLOCK) as usize;
        assert_bytes(
            &read_mem(&mem, at, len),
            &nvme_image(lba * BLOCK, len),
            at,
            &format!("host RAM after reading {count} blocks from LBA {lba}"),
        );
        // The bytes after it are untouched.
        if at + (len as u64) < 0x40000 {
            assert_eq!(read_mem(&mem, at + len as u64, 4), [0xee; 4]);
        }
    }
    // The host agrees on what the image holds there.
    request_host_check("nvme0", 2048 * BLOCK, &nvme_image(2048 * BLOCK, 256 * 512));
}

/// The lines of `/proc/interrupts` that name a VFIO MSI-X vector of `bdf`
/// (the kernel names them `vfio-msix[N](<bdf>)`).
fn vfio_msix_lines(bdf: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/interrupts")
        .unwrap()
        .lines()
        .filter(|l| l.contains("vfio-msix") && l.contains(bdf))
        .map(str::to_owned)
        .collect()
}

/// Completion by polling, asked for: no MSI-X vector is set up (none in
/// /proc/interrupts, where the default open shows one), and single reads and
/// eight queued reads complete and land as with interrupts.
#[test]
fn nvme_polled_completion_reads_the_same() {
    let bdf = nvme_address("nvme0");
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut nvme = Nvme::open_with(bdf.parse().unwrap(), &ioas, Completion::Polling).unwrap();
    assert_eq!(nvme.completion(), Completion::Polling);
    assert!(
        nvme.polling_reason()
            .is_some_and(|r| r.contains("asked for")),
        "{:?}",
        nvme.polling_reason()
    );
    assert_eq!(vfio_msix_lines(&bdf), Vec::<String>::new());

    let (mem, map) = ram(&ioas, 0x40000);
    read_and_check(
        &mut nvme,
        &mem,
        &map,
        300,
        64,
        "host RAM after a polled read",
    );
    // Eight reads in flight at once, reaped by polling in any order.
    let ids: Vec<CommandId> = (0..8u64)
        .map(|i| {
            nvme.submit_read(600 + i * 16, 16, map.iova() + i * 0x2000)
                .unwrap()
        })
        .collect();
    for id in ids {
        nvme.wait(id, IO_TIMEOUT).unwrap();
    }
    assert_eq!(nvme.in_flight(), 0);
    assert_bytes(
        &read_mem(&mem, 0, 0x10000),
        &nvme_image(600 * BLOCK, 0x10000),
        0,
        "host RAM after eight polled reads",
    );
    drop(nvme);

    // The same device opened the default way has its MSI-X vector listed,
    // so the check above can fail.
    let nvme = open_nvme("nvme0", &ioas);
    assert_eq!(nvme.completion(), Completion::Interrupt);
    assert!(
        !vfio_msix_lines(&bdf).is_empty(),
        "no vfio-msix line for {bdf}"
    );
}

/// Non-destructive P2P: the same blocks read into host RAM and into shm1's
/// BAR2 through its dma-buf IOVA are the same bytes, in the guest's BAR mmap
/// and in the host's ivshmem backing file.
#[test]
fn nvme_reads_into_an_ivshmem_bar_match_host_ram() {
    const AREA: u64 = 0x200_0000;
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut nvme = open_nvme("nvme0", &ioas);
    let mut shm = VfioPciDevice::open(shm_address("shm1").parse().unwrap()).unwrap();
    shm.bind(&iommufd).unwrap();
    shm.set_memory_decode(true).unwrap();
    let bar = shm.map_bar(2).unwrap();
    bar_write(&bar, AREA, &[0x5a; 0x10000]);
    let export = shm.export_bar(2, &[ByteRange::new(AREA, 0x10000)]).unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    let (mem, map) = ram(&ioas, 0x10000);

    // 40 KiB (a PRP list) from LBA 300, to both places.
    let (lba, count) = (300u64, 80u32);
    let len = (u64::from(count) * BLOCK) as usize;
    nvme.read_blocks(lba, count, map.iova(), IO_TIMEOUT)
        .unwrap();
    nvme.read_blocks(lba, count, att.iova() + 0x1000, IO_TIMEOUT)
        .unwrap();
    let in_ram = read_mem(&mem, 0, len);
    let in_bar = bar_read(&bar, AREA + 0x1000, len);
    assert_bytes(&in_ram, &nvme_image(lba * BLOCK, len), 0, "host RAM");
    assert_bytes(
        &in_bar,
        &in_ram,
        AREA + 0x1000,
        "shm1 BAR2 against host RAM",
    );
    assert_eq!(
        bar_read(&bar, AREA, 0x1000),
        vec![0x5a; 0x1000],
        "BAR before the read's area"
    );
    request_host_check("shm1", AREA + 0x1000, &in_ram);
}

/// A write (the one test that writes, to its own blocks) reads back, and the
/// host sees it in the image file.
#[test]
fn nvme_write_reads_back_and_lands_in_the_image() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut nvme = open_nvme("nvme0", &ioas);
    let (mem, map) = ram(&ioas, 0x4000);
    let data = pattern(1400, 0x1000);
    mem.write_at(0x800, &data).unwrap();
    nvme.write_blocks(7168, 8, map.iova() + 0x800, IO_TIMEOUT)
        .unwrap();
    mem.write_at(0x2000, &[0; 0x1000]).unwrap();
    nvme.read_blocks(7168, 8, map.iova() + 0x2000, IO_TIMEOUT)
        .unwrap();
    assert_bytes(
        &read_mem(&mem, 0x2000, 0x1000),
        &data,
        0,
        "blocks read back",
    );
    request_host_check("nvme0", 7168 * BLOCK, &data);
    // The blocks either side kept the image's bytes.
    read_and_check(&mut nvme, &mem, &map, 7167, 1, "LBA 7167");
    read_and_check(&mut nvme, &mem, &map, 7176, 1, "LBA 7176");
}

/// Bad requests get errors naming what is wrong, before anything is
/// submitted; the queue pair works afterwards.
#[test]
fn nvme_bad_inputs_are_typed_errors() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut nvme = open_nvme("nvme0", &ioas);
    let (mem, map) = ram(&ioas, 0x40000);
    let blocks = nvme.blocks();

    let e = nvme
        .read_blocks(blocks - 1, 2, map.iova(), IO_TIMEOUT)
        .unwrap_err();
    assert!(
        matches!(problem(&e), NvmeProblem::LbaOutOfRange { lba, count: 2, blocks: b, nsid: 1 } if *lba == blocks - 1 && *b == blocks),
        "{e}"
    );
    assert!(e.to_string().contains("past the end of namespace 1"), "{e}");

    let over = u32::try_from(nvme.max_transfer() / BLOCK).unwrap() + 1;
    let e = nvme
        .read_blocks(0, over, map.iova(), IO_TIMEOUT)
        .unwrap_err();
    assert!(
        matches!(problem(&e), NvmeProblem::TransferTooLarge { max, .. } if *max == 128 << 10),
        "{e}"
    );
    assert!(e.to_string().contains("MDTS"), "{e}");

    let e = nvme
        .read_blocks(0, 1, map.iova() + 2, IO_TIMEOUT)
        .unwrap_err();
    assert!(
        matches!(problem(&e), NvmeProblem::UnalignedIova { align: 4, .. }),
        "{e}"
    );

    let e = nvme.read_blocks(0, 0, map.iova(), IO_TIMEOUT).unwrap_err();
    assert!(matches!(problem(&e), NvmeProblem::EmptyTransfer), "{e}");

    for nsid in [0, 2, 77, u32::MAX] {
        let e = nvme.select_namespace(nsid).unwrap_err();
        assert!(
            matches!(problem(&e), NvmeProblem::NoSuchNamespace { nsid: n, .. } if *n == nsid),
            "namespace {nsid}: {e}"
        );
        assert!(
            e.to_string()
                .contains(&format!("namespace {nsid} does not exist"))
        );
    }
    // The selection did not change and the queue pair still works.
    assert_eq!(nvme.namespace().unwrap().nsid, 1);
    assert_eq!(nvme.in_flight(), 0);
    read_and_check(&mut nvme, &mem, &map, 42, 8, "read after the bad requests");
}

/// A read into an IOVA the IOAS does not map completes (the IOMMU refuses
/// the DMA): it does not hang, lands nowhere, and the queue pair works after.
#[test]
fn nvme_read_into_an_unmapped_iova_completes() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut nvme = open_nvme("nvme0", &ioas);
    let (mem, map) = ram(&ioas, 0x2000);
    let mut kmsg = Kmsg::open_at_end().unwrap();
    // Just past the buffer: nothing is mapped there.
    let hole = map.iova() + 0x10_0000;
    let outcome = nvme.read_blocks(8, 8, hole, IO_TIMEOUT);
    match &outcome {
        Ok(()) => directive(
            "nvme: read into an unmapped IOVA completed with success (data dropped by the IOMMU)",
        ),
        Err(e) => {
            assert!(
                problem(e).status().is_some(),
                "a completion status, not {e}"
            );
            directive(&format!("nvme: read into an unmapped IOVA failed: {e}"));
        }
    }
    let faults = kmsg.iommu_faults(Duration::from_secs(2));
    directive(&format!("nvme: {} DMAR fault line(s) logged", faults.len()));
    read_and_check(&mut nvme, &mem, &map, 9, 4, "read after the refused one");
}

/// The PMR as an exporter target: nvme1's persistent memory region, enabled
/// and exported as a dma-buf, receives nvme0's Read; the bytes are in the
/// guest's mmap of the PMR's BAR and in its backing file on the host.
/// nvme0 has no PMR, which is a typed error.
#[test]
fn nvme_pmr_is_a_p2p_target() {
    const OFF: u64 = 0x20_0000;
    const LEN: u64 = 0x8000;
    const LBA: u64 = 1200;
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut reader = open_nvme("nvme0", &ioas);
    let e = reader.enable_pmr().unwrap_err();
    assert!(matches!(problem(&e), NvmeProblem::NoPmr { .. }), "{e}");
    assert!(e.to_string().contains("CAP.PMRS is 0"), "{e}");

    let owner = open_nvme("nvme1", &ioas);
    let pmr = owner.enable_pmr().unwrap();
    assert_eq!((pmr.bar, pmr.size), (4, 16 << 20), "{pmr:?}");
    let bar = owner.device().map_bar(pmr.bar).unwrap();
    bar_write(&bar, OFF, &[0x33; LEN as usize]);
    assert_eq!(
        bar_read(&bar, OFF, 8),
        [0x33; 8],
        "the enabled PMR keeps writes"
    );
    let export = owner
        .device()
        .export_bar(pmr.bar, &[ByteRange::new(OFF, LEN)])
        .unwrap();
    let map = ioas
        .map_dmabuf(export.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite)
        .unwrap();
    reader
        .read_blocks(LBA, (LEN / BLOCK) as u32, map.iova(), IO_TIMEOUT)
        .unwrap();
    let want = nvme_image(LBA * BLOCK, LEN as usize);
    assert_bytes(
        &bar_read(&bar, OFF, LEN as usize),
        &want,
        OFF,
        "nvme1's PMR after nvme0 read into it",
    );
    // The bytes before the range are untouched.
    assert_eq!(bar_read(&bar, OFF - 8, 8), [0; 8]);
    request_host_check("nvme1-pmr", OFF, &want);
}

/// The CMB as an exporter target: nvme1's controller memory buffer, enabled
/// and exported as a dma-buf, receives DMA from edu and from nvme0's Read;
/// with nvme1's memory decode off both are blocked, and after it is back
/// (and the attachment restored) both land again.
#[test]
fn nvme_cmb_is_a_p2p_target_for_edu_and_nvme() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut reader = open_nvme("nvme0", &ioas);
    let owner = open_nvme("nvme1", &ioas);
    let cmb = owner.enable_cmb().unwrap();
    assert_eq!((cmb.bar, cmb.offset, cmb.size), (2, 0, 16 << 20), "{cmb:?}");
    let mut edu = Edu::open(edu_address().parse().unwrap(), &ioas).unwrap();

    let bar = owner.device().map_bar(cmb.bar).unwrap();
    const OFF: u64 = 0x10_0000;
    bar_write(&bar, OFF, &[0x11; 0x4000]);
    let export = owner
        .device()
        .export_bar(cmb.bar, &[ByteRange::new(cmb.offset + OFF, 0x4000)])
        .unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    let data = pattern(1401, 0x800);
    let (src, src_map) = ram(&ioas, 0x1000);
    src.write_at(0, &data).unwrap();

    // Live: both land.
    edu.memcpy(src_map.iova(), att.iova(), 0x800, DMA_TIMEOUT)
        .unwrap();
    reader
        .read_blocks(64, 8, att.iova() + 0x1000, IO_TIMEOUT)
        .unwrap();
    assert_bytes(
        &bar_read(&bar, OFF, 0x800),
        &data,
        OFF,
        "CMB after the edu copy",
    );
    assert_bytes(
        &bar_read(&bar, OFF + 0x1000, 0x1000),
        &nvme_image(64 * BLOCK, 0x1000),
        OFF + 0x1000,
        "CMB after nvme0's read",
    );

    // Revoked: neither lands.
    owner.device().set_memory_decode(false).unwrap();
    assert!(att.is_revoked());
    edu.memcpy(src_map.iova(), att.iova() + 0x2000, 0x800, DMA_TIMEOUT)
        .unwrap();
    let revoked_read = reader.read_blocks(128, 8, att.iova() + 0x3000, IO_TIMEOUT);
    match &revoked_read {
        Ok(()) => {
            directive("nvme: nvme0's read into the revoked CMB export completed with success")
        }
        Err(e) => {
            assert!(problem(e).status().is_some(), "{e}");
            directive(&format!(
                "nvme: nvme0's read into the revoked CMB export failed: {e}"
            ));
        }
    }
    owner.device().set_memory_decode(true).unwrap();
    assert!(!att.is_revoked(), "restored: {:?}", att.last_error());
    assert_eq!(
        bar_read(&bar, OFF + 0x2000, 0x2000),
        vec![0x11; 0x2000],
        "nothing landed in the CMB while its export was revoked (read: {revoked_read:?})"
    );

    // Restored: both land again.
    edu.memcpy(src_map.iova(), att.iova() + 0x2000, 0x800, DMA_TIMEOUT)
        .unwrap();
    reader
        .read_blocks(128, 8, att.iova() + 0x3000, IO_TIMEOUT)
        .unwrap();
    assert_bytes(
        &bar_read(&bar, OFF + 0x2000, 0x800),
        &data,
        OFF + 0x2000,
        "CMB after the restore (edu)",
    );
    assert_bytes(
        &bar_read(&bar, OFF + 0x3000, 0x1000),
        &nvme_image(128 * BLOCK, 0x1000),
        OFF + 0x3000,
        "CMB after the restore (nvme0)",
    );
}

/// Decode off on the target while reads into it are queued: every command
/// completes; each page it targets holds either the right bytes (it landed
/// while the mapping was live) or the old ones; reads submitted while
/// revoked land nowhere; the queue pair stays usable; after the restore the
/// reads land again.
#[test]
fn nvme_revocation_while_reads_are_queued() {
    const AREA: u64 = 0x210_0000;
    const READS: u64 = 16;
    const EACH: u64 = 0x2000; // 16 blocks
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut nvme = open_nvme("nvme0", &ioas);
    let shm = {
        let mut d = VfioPciDevice::open(shm_address("shm1").parse().unwrap()).unwrap();
        d.bind(&iommufd).unwrap();
        d.set_memory_decode(true).unwrap();
        d
    };
    let bar = shm.map_bar(2).unwrap();
    let len = 2 * READS * EACH;
    bar_write(&bar, AREA, &vec![0x5a; len as usize]);
    let export = shm.export_bar(2, &[ByteRange::new(AREA, len)]).unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    let lba_of = |i: u64| 4096 + i * (EACH / BLOCK);

    let ids: Vec<CommandId> = (0..READS)
        .map(|i| {
            nvme.submit_read(lba_of(i), (EACH / BLOCK) as u32, att.iova() + i * EACH)
                .unwrap()
        })
        .collect();
    shm.set_memory_decode(false).unwrap();
    assert!(att.is_revoked());
    let mut failed = 0;
    for id in &ids {
        if let Err(e) = nvme.wait(*id, IO_TIMEOUT) {
            assert!(problem(&e).status().is_some(), "{e}");
            failed += 1;
        }
    }
    // Reads submitted while revoked: into the second half.
    for i in 0..READS {
        let r = nvme.read_blocks(
            lba_of(i),
            (EACH / BLOCK) as u32,
            att.iova() + (READS + i) * EACH,
            IO_TIMEOUT,
        );
        if let Err(e) = r {
            assert!(problem(&e).status().is_some(), "{e}");
        }
    }
    assert_eq!(nvme.in_flight(), 0);
    shm.set_memory_decode(true).unwrap();
    assert!(!att.is_revoked(), "restored: {:?}", att.last_error());

    let mut landed = 0;
    for i in 0..READS {
        let want = nvme_image(lba_of(i) * BLOCK, EACH as usize);
        let got = bar_read(&bar, AREA + i * EACH, EACH as usize);
        for page in 0..(EACH / 0x1000) as usize {
            let r = page * 0x1000..(page + 1) * 0x1000;
            let ok = got[r.clone()] == want[r.clone()] || got[r.clone()].iter().all(|&b| b == 0x5a);
            assert!(
                ok,
                "read {i} page {page}: neither the image's bytes nor the old ones"
            );
        }
        if got == want {
            landed += 1;
        }
    }
    directive(&format!(
        "nvme: of {READS} queued reads, {landed} landed whole before the revocation, {failed} failed"
    ));
    assert_eq!(
        bar_read(&bar, AREA + READS * EACH, (READS * EACH) as usize),
        vec![0x5a; (READS * EACH) as usize],
        "reads submitted while revoked landed"
    );

    // After the restore the reads land again, on the same queue pair.
    for i in 0..READS {
        nvme.read_blocks(
            lba_of(i),
            (EACH / BLOCK) as u32,
            att.iova() + (READS + i) * EACH,
            IO_TIMEOUT,
        )
        .unwrap();
    }
    let want: Vec<u8> = (0..READS)
        .flat_map(|i| nvme_image(lba_of(i) * BLOCK, EACH as usize))
        .collect();
    assert_bytes(
        &bar_read(&bar, AREA + READS * EACH, (READS * EACH) as usize),
        &want,
        AREA + READS * EACH,
        "BAR after the restore",
    );
    request_host_check("shm1", AREA + READS * EACH, &want);
}

const CLI: &str = "/bin/dmabuf-p2p";

fn run_cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(CLI)
        .args(args)
        .output()
        .expect("run /bin/dmabuf-p2p");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The CLI detects the NVMe engine from the device and passes its read-only
/// P2P test into an ivshmem BAR and into nvme1's CMB; `devices` marks both
/// controllers as engines and nvme1's BAR2 as a P2P target.
#[test]
fn nvme_cli_p2p_test_and_devices() {
    let engine = nvme_address("nvme0");
    let cmb_owner = nvme_address("nvme1");
    let shm = shm_address("shm0");
    // shm0 BAR2 0xc0000.. is clear of the other tests' areas.
    let target = format!("{shm}:2:0xc0000+0x10000");
    let (ok, text) = run_cli(&[
        "--json", "p2p-test", "--engine", &engine, "--target", &target, "--lba", "16", "--blocks",
        "16",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("\"passed\": true"), "{text}");
    assert!(text.contains("read while revoked"), "{text}");
    assert!(
        !text.contains("write, read back"),
        "no write without --allow-write: {text}"
    );

    let (ok, text) = run_cli(&[
        "p2p-test", "--engine", &engine, "--target", &cmb_owner, "--blocks", "8",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("target: {cmb_owner} BAR2")),
        "{text}"
    );
    assert!(text.contains("PASS"), "{text}");

    // BAR4 of the same controller is its PMR, which the CLI enables too.
    let pmr_target = format!("{cmb_owner}:4");
    let (ok, text) = run_cli(&[
        "p2p-test",
        "--engine",
        &engine,
        "--target",
        &pmr_target,
        "--blocks",
        "8",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("target: {cmb_owner} BAR4")),
        "{text}"
    );
    assert!(text.contains("PASS"), "{text}");

    // Blocks past the end of the namespace: refused, naming them.
    let (ok, text) = run_cli(&[
        "p2p-test", "--engine", &engine, "--target", &target, "--lba", "8190", "--blocks", "8",
    ]);
    assert!(!ok);
    assert!(text.contains("past the end of namespace 1"), "{text}");

    let (ok, text) = run_cli(&["--json", "devices"]);
    assert!(ok, "{text}");
    for bdf in [&engine, &cmb_owner] {
        let at = text
            .find(&format!("\"address\": \"{bdf}\""))
            .unwrap_or_else(|| panic!("{bdf} in {text}"));
        let entry = &text[at..];
        let entry = &entry[..entry.find("\"address\"").map_or(entry.len(), |_| {
            entry[1..]
                .find("\"address\"")
                .map_or(entry.len(), |e| e + 1)
        })];
        assert!(entry.contains("\"engine\": \"Nvme\""), "{entry}");
        if bdf == &cmb_owner {
            assert!(entry.contains("\"what\": \"NVMe CMB or PMR\""), "{entry}");
        }
    }
}
