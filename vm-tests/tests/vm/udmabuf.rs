//! udmabuf on the real kernel: single and list create, contents shared with
//! the memfd both ways, hugetlb memfds, CPU-access sync, and every rule of the
//! kernel refused up front with a typed error and no fd leaked.

// The assertion helpers below fail the calling test by panicking.
#![allow(clippy::panic)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use dmabuf_p2p::dmabuf::Access;
use dmabuf_p2p::exporter::udmabuf::{Udmabuf, UdmabufLimits};
use dmabuf_p2p::memfd::{HUGE_PAGE_SIZE, Memfd, MemfdOptions, Seals};
use dmabuf_p2p::{ByteRange, Error, RangeProblem};
use dmabuf_p2p_vm_tests::open_fd_count;

use super::uapi;

const PAGE: u64 = 4096;

/// A byte pattern that differs per page and per offset.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ ((i / 4096) as u8).wrapping_add(seed))
        .collect()
}

#[test]
fn udmabuf_single_create_shares_pages_with_the_memfd() {
    let before = open_fd_count();
    {
        let len = 64 << 10;
        let memfd = Memfd::new("single", len).unwrap();
        let data = pattern(len as usize, 1);
        memfd.write_at(0, &data).unwrap();

        let dev = Udmabuf::open().unwrap();
        let buf = dev.create(memfd.as_fd(), 0, len).unwrap();
        assert_eq!(buf.size().unwrap(), len);
        let info = buf.fdinfo().unwrap();
        assert_eq!(info.exp_name, "udmabuf");
        assert_eq!(info.size, len);
        assert!(
            info.is_cloexec(),
            "udmabuf fd is not close-on-exec: flags {:#o}",
            info.flags
        );
        assert_eq!(info.flags & libc::O_ACCMODE as u32, libc::O_RDWR as u32);

        // memfd -> dma-buf mapping.
        let map = buf.mmap().unwrap();
        assert_eq!(map.len() as u64, len);
        {
            let _cpu = buf.begin_cpu_access(Access::Read).unwrap();
            assert_eq!(map.to_vec(), data);
        }
        // dma-buf mapping -> memfd.
        {
            let _cpu = buf.begin_cpu_access(Access::Write).unwrap();
            map.write(5000, b"written through the dma-buf").unwrap();
        }
        let mut back = [0u8; 27];
        memfd.read_at(5000, &mut back).unwrap();
        assert_eq!(&back, b"written through the dma-buf");
        // And a later memfd write shows in the existing mapping.
        memfd.write_at(60_000, b"late").unwrap();
        let mut late = [0u8; 4];
        map.read(60_000, &mut late).unwrap();
        assert_eq!(&late, b"late");

        // A sub-range at an offset.
        let part = dev.create(memfd.as_fd(), 16 << 10, 8 << 10).unwrap();
        assert_eq!(part.size().unwrap(), 8 << 10);
        let mut head = vec![0u8; 8 << 10];
        part.mmap().unwrap().read(0, &mut head).unwrap();
        let mut want = vec![0u8; 8 << 10];
        memfd.read_at(16 << 10, &mut want).unwrap();
        assert_eq!(head, want);
    }
    assert_eq!(open_fd_count(), before, "fds leaked");
}

#[test]
fn udmabuf_list_create_concatenates_the_items() {
    let before = open_fd_count();
    {
        let a = Memfd::new("list-a", 4 * PAGE).unwrap();
        let b = Memfd::new("list-b", 2 * PAGE).unwrap();
        let da = pattern(4 * PAGE as usize, 10);
        let db = pattern(2 * PAGE as usize, 20);
        a.write_at(0, &da).unwrap();
        b.write_at(0, &db).unwrap();

        let dev = Udmabuf::open().unwrap();
        let items = [
            (a.as_fd(), PAGE, 2 * PAGE),
            (b.as_fd(), 0, 2 * PAGE),
            (a.as_fd(), 0, PAGE),
        ];
        let buf = dev.create_list(&items).unwrap();
        assert_eq!(buf.size().unwrap(), 5 * PAGE);
        assert_eq!(buf.fdinfo().unwrap().size, 5 * PAGE);

        let mut want = Vec::new();
        want.extend_from_slice(&da[PAGE as usize..3 * PAGE as usize]);
        want.extend_from_slice(&db);
        want.extend_from_slice(&da[..PAGE as usize]);
        let map = buf.mmap().unwrap();
        assert_eq!(map.to_vec(), want);

        // Writing the third item lands in page 0 of `a`.
        map.write(4 * PAGE + 8, b"third item").unwrap();
        let mut back = [0u8; 10];
        a.read_at(8, &mut back).unwrap();
        assert_eq!(&back, b"third item");

        // A one-item list is the same as create.
        let one = dev.create_list(&[(b.as_fd(), PAGE, PAGE)]).unwrap();
        let mut page = vec![0u8; PAGE as usize];
        one.mmap().unwrap().read(0, &mut page).unwrap();
        assert_eq!(page, &db[PAGE as usize..]);
    }
    assert_eq!(open_fd_count(), before, "fds leaked");
}

#[test]
fn udmabuf_from_hugetlb_memfd() {
    let before = open_fd_count();
    {
        let len = 2 * HUGE_PAGE_SIZE;
        let memfd = Memfd::new_hugetlb("huge", len).unwrap();
        assert!(memfd.is_hugetlb());
        assert!(memfd.seals().unwrap().contains(Seals::SHRINK));
        let data = pattern(len as usize, 7);
        // hugetlbfs has no write(2): fill it through a mapping.
        memfd.mmap().unwrap().write(0, &data).unwrap();

        let dev = Udmabuf::open().unwrap();
        let whole = dev.create(memfd.as_fd(), 0, len).unwrap();
        assert_eq!(whole.size().unwrap(), len);
        let map = whole.mmap().unwrap();
        assert_eq!(map.to_vec(), data);

        // Base-page alignment is enough inside a huge page.
        let off = HUGE_PAGE_SIZE - PAGE;
        let cross = dev
            .create_list(&[(memfd.as_fd(), off, 2 * PAGE), (memfd.as_fd(), PAGE, PAGE)])
            .unwrap();
        assert_eq!(cross.size().unwrap(), 3 * PAGE);
        let got = cross.mmap().unwrap().to_vec();
        assert_eq!(
            &got[..2 * PAGE as usize],
            &data[off as usize..(off + 2 * PAGE) as usize]
        );
        assert_eq!(
            &got[2 * PAGE as usize..],
            &data[PAGE as usize..2 * PAGE as usize]
        );

        // dma-buf -> memfd.
        map.write(HUGE_PAGE_SIZE + 3, b"huge").unwrap();
        let mut back = [0u8; 4];
        memfd.read_at(HUGE_PAGE_SIZE + 3, &mut back).unwrap();
        assert_eq!(&back, b"huge");
    }
    assert_eq!(open_fd_count(), before, "fds leaked");
}

#[test]
fn udmabuf_pins_pages_until_the_buffer_is_gone() {
    // Created before the memfd is populated: the pin allocates the pages.
    let memfd = Memfd::new("pin", 4 * PAGE).unwrap();
    let dev = Udmabuf::open().unwrap();
    let buf = dev.create(memfd.as_fd(), 0, 4 * PAGE).unwrap();
    memfd.write_at(3 * PAGE, b"after").unwrap();
    let mut got = [0u8; 5];
    buf.mmap().unwrap().read(3 * PAGE, &mut got).unwrap();
    assert_eq!(&got, b"after");
    // The memfd fd may go; the buffer keeps the pages.
    drop(memfd);
    let mut again = [0u8; 5];
    buf.mmap().unwrap().read(3 * PAGE, &mut again).unwrap();
    assert_eq!(&again, b"after");
}

#[test]
fn udmabuf_sync_guard_and_raw_end_before_start() {
    let memfd = Memfd::new("sync", 2 * PAGE).unwrap();
    let buf = Udmabuf::open()
        .unwrap()
        .create(memfd.as_fd(), 0, 2 * PAGE)
        .unwrap();
    // udmabuf refuses an END before the first START.
    match buf.sync_end(Access::ReadWrite) {
        Err(e @ Error::Sys { .. }) => {
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
            let msg = e.to_string();
            assert!(msg.contains("END") && msg.contains("udmabuf"), "{msg}");
        }
        other => panic!("unexpected {other:?}"),
    }
    for access in [Access::Read, Access::Write, Access::ReadWrite] {
        let guard = buf.begin_cpu_access(access).unwrap();
        assert_eq!(guard.access(), access);
        guard.end().unwrap();
        // Dropped instead of ended.
        let _g = buf.begin_cpu_access(access).unwrap();
    }
    // After a START, raw END works.
    buf.sync_start(Access::Write).unwrap();
    buf.sync_end(Access::Write).unwrap();
}

/// Asserts `r` failed with `Error::InvalidRange` with this problem and range.
#[track_caller]
fn expect_range<T: std::fmt::Debug>(
    r: dmabuf_p2p::Result<T>,
    problem: RangeProblem,
    range: ByteRange,
    memfd: BorrowedFd<'_>,
) {
    match r {
        Err(Error::InvalidRange {
            target,
            range: got,
            problem: p,
        }) => {
            assert_eq!(p, problem, "problem for {target}");
            assert_eq!(got, range);
            assert!(
                target.contains(&format!("fd {}", memfd.as_raw_fd())),
                "target does not name the memfd: {target}"
            );
        }
        other => panic!("expected InvalidRange {problem:?}, got {other:?}"),
    }
}

/// Asserts `r` failed with `Error::Memfd` whose problem mentions `needle`.
#[track_caller]
fn expect_memfd<T: std::fmt::Debug>(r: dmabuf_p2p::Result<T>, needle: &str) {
    match r {
        Err(Error::Memfd { problem }) => {
            assert!(problem.contains(needle), "{needle:?} not in {problem:?}")
        }
        other => panic!("expected Error::Memfd about {needle}, got {other:?}"),
    }
}

#[test]
fn udmabuf_bad_inputs_give_typed_errors_and_leak_no_fd() {
    let dev = Udmabuf::open().unwrap();
    let good = Memfd::new("good", 4 * PAGE).unwrap();
    let unsealed = MemfdOptions::new()
        .seal_shrink(false)
        .create("unsealed", 4 * PAGE)
        .unwrap();
    let write_sealed = Memfd::new("write-sealed", 4 * PAGE).unwrap();
    write_sealed.add_seals(Seals::WRITE).unwrap();
    let future_sealed = Memfd::new("future-write-sealed", 4 * PAGE).unwrap();
    future_sealed.add_seals(Seals::FUTURE_WRITE).unwrap();
    // SAFETY: a valid C string and flags; checked below.
    let raw = unsafe { libc::memfd_create(c"no-sealing".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: just created, owned by nobody else.
    let no_sealing = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on our own fd.
    let r = unsafe { libc::ftruncate(no_sealing.as_raw_fd(), (4 * PAGE) as libc::off_t) };
    assert_eq!(r, 0);
    let regular = File::open("/proc/self/status").unwrap();
    let mut pipe = [0; 2];
    // SAFETY: room for two fds.
    let r = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0);
    // SAFETY: just created, owned by nobody else.
    let pr = unsafe { OwnedFd::from_raw_fd(pipe[0]) };
    // SAFETY: as above.
    let _pw = unsafe { OwnedFd::from_raw_fd(pipe[1]) };
    let limits = dev.limits();
    assert_eq!(limits, UdmabufLimits::read());
    let big = Memfd::new("big", (limits.size_limit_mb << 20) + PAGE).unwrap();

    let before = open_fd_count();
    let g = good.as_fd();

    // Range shape and bounds.
    expect_range(
        dev.create(g, PAGE / 2, PAGE),
        RangeProblem::Unaligned { align: PAGE },
        ByteRange::new(PAGE / 2, PAGE),
        g,
    );
    expect_range(
        dev.create(g, 0, PAGE / 2),
        RangeProblem::Unaligned { align: PAGE },
        ByteRange::new(0, PAGE / 2),
        g,
    );
    expect_range(
        dev.create(g, 0, 0),
        RangeProblem::Empty,
        ByteRange::new(0, 0),
        g,
    );
    expect_range(
        dev.create(g, 2 * PAGE, 3 * PAGE),
        RangeProblem::OutOfBounds {
            end: 5 * PAGE,
            size: 4 * PAGE,
        },
        ByteRange::new(2 * PAGE, 3 * PAGE),
        g,
    );
    expect_range(
        dev.create(g, 4 * PAGE, PAGE),
        RangeProblem::OutOfBounds {
            end: 5 * PAGE,
            size: 4 * PAGE,
        },
        ByteRange::new(4 * PAGE, PAGE),
        g,
    );
    expect_range(
        dev.create(g, u64::MAX - PAGE + 1, PAGE),
        RangeProblem::Overflow,
        ByteRange::new(u64::MAX - PAGE + 1, PAGE),
        g,
    );

    // Seals and file kinds.
    expect_memfd(dev.create(unsealed.as_fd(), 0, PAGE), "F_SEAL_SHRINK");
    expect_memfd(dev.create(write_sealed.as_fd(), 0, PAGE), "F_SEAL_WRITE");
    expect_memfd(
        dev.create(future_sealed.as_fd(), 0, PAGE),
        "F_SEAL_FUTURE_WRITE",
    );
    expect_memfd(dev.create(no_sealing.as_fd(), 0, PAGE), "F_SEAL_SEAL");
    expect_memfd(dev.create(regular.as_fd(), 0, PAGE), "not a shmem");
    expect_memfd(dev.create(pr.as_fd(), 0, PAGE), "not a regular file");
    // The memfd is named in the message.
    expect_memfd(dev.create(unsealed.as_fd(), 0, PAGE), "/memfd:unsealed");

    // Lists: empty, the bad item named, too many, too large.
    match dev.create_list(&[]) {
        Err(Error::InvalidRange {
            problem: RangeProblem::Count(_),
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    match dev.create_list(&[
        (g, 0, PAGE),
        (g, PAGE, PAGE),
        (write_sealed.as_fd(), 0, PAGE),
    ]) {
        Err(Error::Memfd { problem }) => assert!(
            problem.contains("item 2") && problem.contains("F_SEAL_WRITE"),
            "{problem}"
        ),
        other => panic!("unexpected {other:?}"),
    }
    let many = vec![(g, 0, PAGE); usize::try_from(limits.list_limit).unwrap() + 1];
    match dev.create_list(&many) {
        Err(Error::UdmabufLimit {
            limit: "list_limit",
            max,
            requested,
        }) => {
            assert_eq!((max, requested), (limits.list_limit, limits.list_limit + 1));
        }
        other => panic!("unexpected {other:?}"),
    }
    match dev.create(big.as_fd(), 0, big.size()) {
        Err(Error::UdmabufLimit {
            limit: "size_limit_mb",
            max,
            requested,
        }) => {
            assert_eq!(
                (max, requested),
                (limits.size_limit_mb, limits.size_limit_mb + 1)
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    match dev.create_list(&[(big.as_fd(), 0, limits.size_limit_mb << 20), (g, 0, PAGE)]) {
        Err(Error::UdmabufLimit {
            limit: "size_limit_mb",
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }

    assert_eq!(open_fd_count(), before, "a refused create leaked an fd");

    // The limits themselves are inclusive: exactly list_limit items and
    // exactly size_limit_mb MiB are accepted by the kernel.
    let at_limit = vec![(g, 0, PAGE); usize::try_from(limits.list_limit).unwrap()];
    let buf = dev.create_list(&at_limit).unwrap();
    assert_eq!(buf.size().unwrap(), limits.list_limit * PAGE);
    drop(buf);
    let buf = dev
        .create(big.as_fd(), PAGE, limits.size_limit_mb << 20)
        .unwrap();
    assert_eq!(buf.size().unwrap(), limits.size_limit_mb << 20);
    drop(buf);
    assert_eq!(open_fd_count(), before, "fds leaked");
}

/// `UDMABUF_CREATE` straight to the kernel, bypassing the library's checks.
fn raw_create(
    dev: &Udmabuf,
    memfd: BorrowedFd<'_>,
    offset: u64,
    size: u64,
) -> std::io::Result<OwnedFd> {
    let arg = uapi::UdmabufCreate {
        memfd: memfd.as_raw_fd() as u32,
        flags: uapi::UDMABUF_FLAGS_CLOEXEC,
        offset,
        size,
    };
    // SAFETY: UDMABUF_CREATE reads one `udmabuf_create` and writes nothing.
    let fd = unsafe {
        libc::ioctl(
            dev.as_fd().as_raw_fd(),
            uapi::UDMABUF_CREATE as libc::Ioctl,
            &arg,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[test]
fn udmabuf_rules_checked_up_front_are_the_kernels() {
    // What the library refuses up front, the kernel refuses too (so the
    // checks are not stricter than the real rules), with the errno of the
    // uAPI reference (B.4).
    let dev = Udmabuf::open().unwrap();
    let good = Memfd::new("good", 4 * PAGE).unwrap();
    let unsealed = MemfdOptions::new()
        .seal_shrink(false)
        .create("unsealed", 4 * PAGE)
        .unwrap();
    let sealed = Memfd::new("sealed", 4 * PAGE).unwrap();
    sealed.add_seals(Seals::WRITE).unwrap();
    let regular = File::open("/proc/self/status").unwrap();
    let errno = |r: std::io::Result<OwnedFd>| r.map(drop).unwrap_err().raw_os_error();

    let before = open_fd_count();
    assert_eq!(
        errno(raw_create(&dev, good.as_fd(), PAGE / 2, PAGE)),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(raw_create(&dev, good.as_fd(), 0, PAGE / 2)),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(raw_create(&dev, good.as_fd(), 0, 0)),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(raw_create(&dev, good.as_fd(), 2 * PAGE, 3 * PAGE)),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(raw_create(&dev, unsealed.as_fd(), 0, PAGE)),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(raw_create(&dev, sealed.as_fd(), 0, PAGE)),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(raw_create(&dev, regular.as_fd(), 0, PAGE)),
        Some(libc::EBADFD)
    );
    assert_eq!(open_fd_count(), before);
    // And what it accepts, the kernel accepts.
    let ok = raw_create(&dev, good.as_fd(), 3 * PAGE, PAGE).unwrap();
    assert!(dmabuf_p2p::is_dmabuf(ok.as_fd()).unwrap());
}

#[test]
fn udmabuf_pins_refuse_a_later_write_seal() {
    // uAPI reference B.3: while a udmabuf pins the pages, F_SEAL_WRITE
    // cannot be added (EBUSY).
    let memfd = Memfd::new("pinned", 2 * PAGE).unwrap();
    let buf = Udmabuf::open()
        .unwrap()
        .create(memfd.as_fd(), 0, 2 * PAGE)
        .unwrap();
    match memfd.add_seals(Seals::WRITE) {
        Err(e @ Error::Sys { .. }) => assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "{e}"),
        other => panic!("unexpected {other:?}"),
    }
    drop(buf);
}
