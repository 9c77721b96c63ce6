//! The dma-buf handle on real buffers (udmabuf, the system heap, the iommufd
//! mock exporter and a VFIO BAR export): TryFrom, fdinfo, names, sync_file
//! round trips, mmap and its refusal, all without fd leaks.

// The buffer-making helpers below fail the calling test by panicking.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use dmabuf_p2p::dmabuf::{Access, MAX_NAME_LEN, SyncFile};
use dmabuf_p2p::exporter::heap::DmaHeap;
use dmabuf_p2p::exporter::mock::MockDmaBuf;
use dmabuf_p2p::exporter::udmabuf::Udmabuf;
use dmabuf_p2p::importer::iommufd::Iommufd;
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::{ByteRange, DmaBuf, Error, RangeProblem, is_dmabuf};
use dmabuf_p2p_vm_tests::{ivshmem_devices, open_fd_count, vfio_cdev};

use super::uapi;

const PAGE: u64 = 4096;

fn heap_buf(len: u64) -> DmaBuf {
    DmaHeap::open("system").unwrap().alloc(len).unwrap()
}

/// A udmabuf and the memfd behind it.
fn udmabuf(len: u64) -> (Memfd, DmaBuf) {
    let memfd = Memfd::new("dmabuf-test", len).unwrap();
    let buf = Udmabuf::open()
        .unwrap()
        .create(memfd.as_fd(), 0, len)
        .unwrap();
    (memfd, buf)
}

/// A mock dma-buf from iommufd's selftest exporter (no mmap, exp_name
/// `iommufd`), and the iommufd it came from.
fn mock_dmabuf(len: u64) -> (Iommufd, OwnedFd) {
    let iommufd = Iommufd::open().unwrap();
    let buf = MockDmaBuf::new(&iommufd, len).unwrap().into_dmabuf();
    (iommufd, buf.into_owned_fd().unwrap())
}

/// `VFIO_DEVICE_FEATURE` with the dma-buf request and one range.
#[repr(C)]
struct DmaBufFeature {
    hdr_argsz: u32,
    hdr_flags: u32,
    req: uapi::vfio_device_feature_dma_buf,
    range: uapi::vfio_region_dma_range,
}

/// A VFIO dma-buf over the first page of the first ivshmem BAR2, with the
/// device and iommufd fds that must stay open meanwhile.
fn vfio_dmabuf() -> (fs::File, fs::File, OwnedFd) {
    let (bdf, _) = ivshmem_devices()
        .into_iter()
        .next()
        .expect("an ivshmem device");
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(vfio_cdev(&bdf).expect("vfio cdev"))
        .unwrap();
    let iommufd = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/iommu")
        .unwrap();
    let mut bind = uapi::vfio_device_bind_iommufd {
        argsz: std::mem::size_of::<uapi::vfio_device_bind_iommufd>() as u32,
        flags: 0,
        iommufd: iommufd.as_raw_fd(),
        out_devid: 0,
        token_uuid_ptr: 0,
    };
    // SAFETY: BIND_IOMMUFD reads and writes back this struct (integers).
    let r = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            uapi::VFIO_DEVICE_BIND_IOMMUFD as libc::Ioctl,
            &mut bind,
        )
    };
    assert_eq!(
        r,
        0,
        "VFIO_DEVICE_BIND_IOMMUFD on {bdf}: {}",
        std::io::Error::last_os_error()
    );
    let mut feat = DmaBufFeature {
        hdr_argsz: std::mem::size_of::<DmaBufFeature>() as u32,
        hdr_flags: uapi::VFIO_DEVICE_FEATURE_GET | uapi::VFIO_DEVICE_FEATURE_DMA_BUF,
        req: uapi::vfio_device_feature_dma_buf {
            region_index: 2,
            open_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
            flags: 0,
            nr_ranges: 1,
            dma_ranges: Default::default(),
        },
        range: uapi::vfio_region_dma_range {
            offset: 0,
            length: PAGE,
        },
    };
    // SAFETY: header, request and one range laid out as the uAPI says;
    // `argsz` covers them all and the kernel reads only them.
    let fd = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            uapi::VFIO_DEVICE_FEATURE as libc::Ioctl,
            &mut feat,
        )
    };
    assert!(
        fd >= 0,
        "VFIO_DEVICE_FEATURE(DMA_BUF) on {bdf}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new fd returned by the kernel, owned by nobody else.
    (dev, iommufd, unsafe { OwnedFd::from_raw_fd(fd) })
}

#[test]
fn dmabuf_try_from_real_buffers_succeeds() {
    let before = open_fd_count();
    {
        let (_memfd, u) = udmabuf(4 * PAGE);
        let h = heap_buf(4 * PAGE);
        let (_iommufd, m) = mock_dmabuf(4 * PAGE);
        for (fd, exp) in [
            (u.into_owned_fd().unwrap(), "udmabuf"),
            (h.into_owned_fd().unwrap(), "system"),
            (m, "iommufd"),
        ] {
            assert!(is_dmabuf(fd.as_fd()).unwrap(), "{exp}");
            let raw = fd.as_raw_fd();
            let buf = DmaBuf::try_from(fd).unwrap();
            assert_eq!(buf.as_raw_fd(), raw, "TryFrom keeps the same fd");
            assert_eq!(buf.size().unwrap(), 4 * PAGE, "{exp}");
            assert_eq!(buf.fdinfo().unwrap().exp_name, exp);
        }
        // A memfd next to them is still refused.
        let memfd = Memfd::new("not-a-dmabuf", PAGE).unwrap();
        let raw = memfd.as_raw_fd();
        let back = DmaBuf::try_from(OwnedFd::from(memfd))
            .unwrap_err()
            .into_fd();
        assert_eq!(back.as_raw_fd(), raw);
    }
    assert_eq!(open_fd_count(), before, "fds leaked");
}

#[test]
fn dmabuf_fdinfo_of_udmabuf_and_heap_buffers() {
    let (_memfd, u) = udmabuf(16 * PAGE);
    let h = heap_buf(8 * PAGE);
    for (buf, exp, size) in [(&u, "udmabuf", 16 * PAGE), (&h, "system", 8 * PAGE)] {
        let info = buf.fdinfo().unwrap();
        assert_eq!(info.exp_name, exp);
        assert_eq!(info.size, size);
        assert_eq!(info.name, None);
        assert!(info.is_cloexec());
        assert_eq!(info.flags & libc::O_ACCMODE as u32, libc::O_RDWR as u32);
        // ino is fstat's st_ino.
        let st = fs::metadata(format!("/proc/self/fd/{}", buf.as_raw_fd())).unwrap();
        assert_eq!(info.ino, std::os::unix::fs::MetadataExt::ino(&st), "{exp}");
        // count: fds and mappings hold references.
        let base = info.count;
        let twin = buf.try_clone().unwrap();
        assert_ne!(twin.as_raw_fd(), buf.as_raw_fd());
        assert_eq!(twin.fdinfo().unwrap().ino, info.ino);
        assert!(twin.fdinfo().unwrap().is_cloexec());
        assert_eq!(
            buf.fdinfo().unwrap().count,
            base + 1,
            "{exp}: count with a second fd"
        );
        let map = buf.mmap().unwrap();
        assert_eq!(
            buf.fdinfo().unwrap().count,
            base + 2,
            "{exp}: count with a mapping"
        );
        drop(twin);
        drop(map);
        assert_eq!(
            buf.fdinfo().unwrap().count,
            base,
            "{exp}: count after both are gone"
        );
        assert!(
            buf.describe()
                .starts_with(&format!("{exp} dma-buf fd {}", buf.as_raw_fd())),
            "{}",
            buf.describe()
        );
    }
}

#[test]
fn dmabuf_set_name_shows_in_fdinfo_and_proc() {
    let (_memfd, u) = udmabuf(PAGE);
    let h = heap_buf(PAGE);
    for buf in [&u, &h] {
        let before = open_fd_count();
        buf.set_name("frames-0").unwrap();
        assert_eq!(buf.fdinfo().unwrap().name.as_deref(), Some("frames-0"));
        let link = fs::read_link(format!("/proc/self/fd/{}", buf.as_raw_fd())).unwrap();
        assert_eq!(link.to_string_lossy(), "/dmabuf:frames-0");
        assert!(
            buf.describe().contains("\"frames-0\""),
            "{}",
            buf.describe()
        );
        // Renaming is allowed; 31 bytes is the longest.
        let longest = "n".repeat(MAX_NAME_LEN);
        buf.set_name(&longest).unwrap();
        assert_eq!(
            buf.fdinfo().unwrap().name.as_deref(),
            Some(longest.as_str())
        );
        buf.set_name("with spaces and ünïcode").unwrap();
        assert_eq!(
            buf.fdinfo().unwrap().name.as_deref(),
            Some("with spaces and ünïcode")
        );

        let too_long = "x".repeat(MAX_NAME_LEN + 1);
        match buf.set_name(&too_long) {
            Err(Error::InvalidName {
                buffer,
                name,
                problem,
            }) => {
                assert_eq!(name, too_long);
                assert!(
                    buffer.contains(&format!("fd {}", buf.as_raw_fd())),
                    "{buffer}"
                );
                assert!(problem.contains("32 bytes"), "{problem}");
            }
            other => panic!("unexpected {other:?}"),
        }
        match buf.set_name("nul\0inside") {
            Err(Error::InvalidName { problem, .. }) => {
                assert!(problem.contains("NUL"), "{problem}")
            }
            other => panic!("unexpected {other:?}"),
        }
        // Refused names left the old one in place.
        assert_eq!(
            buf.fdinfo().unwrap().name.as_deref(),
            Some("with spaces and ünïcode")
        );
        assert_eq!(open_fd_count(), before, "fds leaked");
    }
}

#[test]
fn dmabuf_sync_file_export_import_round_trip() {
    let before = open_fd_count();
    {
        let (_memfd, u) = udmabuf(2 * PAGE);
        let h = heap_buf(2 * PAGE);
        for access in [Access::Read, Access::Write, Access::ReadWrite] {
            // No fences yet: a signalled stub.
            let fence = h.export_sync_file(access).unwrap();
            assert!(fence.is_signaled().unwrap(), "{access:?}");
            assert!(
                fence
                    .wait(Some(std::time::Duration::from_millis(1)))
                    .unwrap()
            );
            // The exported fd is close-on-exec.
            // SAFETY: F_GETFD takes no argument.
            let fdflags = unsafe { libc::fcntl(fence.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(fdflags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
            // Into the other buffer and back into the same one, every way.
            for into in [Access::Read, Access::Write, Access::ReadWrite] {
                u.import_sync_file(into, &fence).unwrap();
                h.import_sync_file(into, &fence).unwrap();
            }
            // The imported (signalled) fence shows up in the next export.
            let again = u.export_sync_file(Access::ReadWrite).unwrap();
            assert!(again.wait(None).unwrap());
            // Still usable for CPU access.
            let _cpu = u.begin_cpu_access(Access::ReadWrite).unwrap();
        }
        // Not a sync_file: the kernel says EINVAL.
        let not_a_fence = SyncFile::from(OwnedFd::from(Memfd::new("not-a-fence", PAGE).unwrap()));
        match u.import_sync_file(Access::Write, &not_a_fence) {
            Err(e @ Error::Sys { .. }) => {
                assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
                assert!(e.to_string().contains("IMPORT_SYNC_FILE"), "{e}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(open_fd_count(), before, "fds leaked");
}

#[test]
fn dmabuf_mmap_ranges_are_checked() {
    let h = heap_buf(4 * PAGE);
    let before = open_fd_count();
    let expect = |r: dmabuf_p2p::Result<dmabuf_p2p::Mapping>, want: RangeProblem| match r {
        Err(Error::InvalidRange {
            problem, target, ..
        }) => {
            assert_eq!(problem, want);
            assert!(target.contains("system dma-buf"), "{target}");
        }
        other => panic!("expected {want:?}, got {other:?}"),
    };
    expect(
        h.mmap_range(ByteRange::new(100, PAGE), true),
        RangeProblem::Unaligned { align: PAGE },
    );
    expect(
        h.mmap_range(ByteRange::new(0, 0), true),
        RangeProblem::Empty,
    );
    expect(
        h.mmap_range(ByteRange::new(3 * PAGE, 2 * PAGE), true),
        RangeProblem::OutOfBounds {
            end: 5 * PAGE,
            size: 4 * PAGE,
        },
    );
    // A partial mapping at an offset sees the right bytes.
    let all = h.mmap().unwrap();
    all.write(2 * PAGE, b"third page").unwrap();
    let part = h
        .mmap_range(ByteRange::new(2 * PAGE, PAGE + 10), true)
        .unwrap();
    assert_eq!(part.len() as u64, PAGE + 10);
    let mut got = [0u8; 10];
    part.read(0, &mut got).unwrap();
    assert_eq!(&got, b"third page");
    // Accesses past the mapping's end are refused, not performed.
    assert!(matches!(
        part.read(PAGE + 5, &mut got),
        Err(Error::InvalidRange { .. })
    ));
    assert!(matches!(
        part.write(PAGE + 1, &[0; 10]),
        Err(Error::InvalidRange { .. })
    ));
    // A read-only mapping refuses writes.
    let ro = h.mmap_range(ByteRange::new(0, PAGE), false).unwrap();
    assert!(!ro.is_writable());
    match ro.write(0, b"no") {
        Err(e @ Error::Sys { .. }) => assert_eq!(e.raw_os_error(), Some(libc::EACCES)),
        other => panic!("unexpected {other:?}"),
    }
    drop((all, part, ro));
    assert_eq!(open_fd_count(), before);
}

#[test]
fn dmabuf_mmap_refused_by_exporters_without_mmap() {
    let before = open_fd_count();
    {
        // The iommufd mock exporter has no mmap.
        let (_iommufd, fd) = mock_dmabuf(2 * PAGE);
        let mock = DmaBuf::try_from(fd).unwrap();
        match mock.mmap() {
            Err(e @ Error::MmapRefused { .. }) => {
                assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
                let Error::MmapRefused {
                    buffer, exporter, ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(exporter, "iommufd");
                assert!(
                    buffer.contains(&format!("fd {}", mock.as_raw_fd())),
                    "{buffer}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }

        // Nor has VFIO in Linux 7.2 (uAPI reference D.5), whose CPU-access
        // sync is a no-op that succeeds.
        let (_dev, _iommufd, fd) = vfio_dmabuf();
        let vfio = DmaBuf::try_from(fd).unwrap();
        assert_eq!(vfio.size().unwrap(), PAGE);
        assert_eq!(vfio.fdinfo().unwrap().exp_name, "vfio_pci_core");
        match vfio.mmap() {
            Err(Error::MmapRefused {
                exporter, source, ..
            }) => {
                assert_eq!(exporter, "vfio_pci_core");
                assert_eq!(source.raw_os_error(), Some(libc::EINVAL));
            }
            other => panic!("unexpected {other:?}"),
        }
        vfio.begin_cpu_access(Access::ReadWrite)
            .unwrap()
            .end()
            .unwrap();
        vfio.sync_end(Access::Read).unwrap();
        vfio.set_name("bar2").unwrap();
        assert_eq!(vfio.fdinfo().unwrap().name.as_deref(), Some("bar2"));
    }
    assert_eq!(open_fd_count(), before, "fds leaked");
}
