//! Host tests for the dma-buf handle and the udmabuf input checks: everything
//! that needs no dma-buf device. (The VM suite covers real buffers.)

#![allow(clippy::panic)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use dmabuf_p2p::dmabuf::{MAX_NAME_LEN, is_dmabuf, validate_name};
use dmabuf_p2p::exporter::heap;
use dmabuf_p2p::exporter::udmabuf::{UdmabufLimits, check_items};
use dmabuf_p2p::memfd::{HUGE_PAGE_SIZE, Memfd, MemfdOptions, Seals};
use dmabuf_p2p::{ByteRange, DmaBuf, Error, RangeProblem};

/// Tests that count open fds must not run alongside tests that open fds.
static FD_LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    FD_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    let r = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let w = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    (r, w)
}

fn limits() -> UdmabufLimits {
    UdmabufLimits::default()
}

#[test]
fn pipes_regular_files_and_memfds_are_not_dmabufs() {
    let _g = lock();
    let (r, w) = pipe();
    assert!(!is_dmabuf(r.as_fd()).unwrap());
    assert!(!is_dmabuf(w.as_fd()).unwrap());
    let f = File::open("Cargo.toml").unwrap();
    assert!(!is_dmabuf(f.as_fd()).unwrap());
    let m = Memfd::new("host", 4096).unwrap();
    assert!(!is_dmabuf(m.as_fd()).unwrap());
}

#[test]
fn try_from_a_non_dmabuf_fails_without_leaking() {
    let _g = lock();
    let before = open_fd_count();
    for _ in 0..20 {
        let (r, w) = pipe();
        let raw = r.as_raw_fd();
        // Dropped error: the fd is closed.
        let err = DmaBuf::try_from(r).unwrap_err();
        match err.error() {
            Error::NotDmaBuf { fd, problem } => {
                assert_eq!(*fd, raw);
                assert!(problem.contains("pipe"), "{problem}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains(&format!("fd {raw}")), "{err}");
        drop(err);
        // Converted into the crate error: closed too.
        let e: Error = DmaBuf::try_from(w).unwrap_err().into();
        assert!(matches!(e, Error::NotDmaBuf { .. }));
        // Given back: still open and usable.
        let f: OwnedFd = File::open("Cargo.toml").unwrap().into();
        let back = DmaBuf::try_from(f).unwrap_err().into_fd();
        assert!(!is_dmabuf(back.as_fd()).unwrap());
    }
    assert_eq!(open_fd_count(), before, "fds leaked");
}

#[test]
fn is_dmabuf_of_a_closed_fd_is_a_sys_error() {
    let _g = lock();
    let (r, _w) = pipe();
    let raw = r.as_raw_fd();
    drop(r);
    // SAFETY: only used for fstatfs, which fails cleanly on a closed fd; the
    // lock keeps other tests from reusing the number meanwhile.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) };
    match is_dmabuf(fd) {
        Err(e @ Error::Sys { .. }) => assert_eq!(e.raw_os_error(), Some(libc::EBADF)),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn names_longer_than_31_bytes_or_with_nul_are_refused() {
    assert_eq!(MAX_NAME_LEN, 31);
    validate_name(&"a".repeat(31)).unwrap();
    validate_name("").unwrap();
    let long = "b".repeat(32);
    match validate_name(&long) {
        Err(Error::InvalidName { name, problem, .. }) => {
            assert_eq!(name, long);
            assert!(problem.contains("32 bytes"), "{problem}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Multi-byte characters count in bytes: 11 x 3 = 33.
    assert!(matches!(
        validate_name(&"€".repeat(11)),
        Err(Error::InvalidName { .. })
    ));
    match validate_name("ab\0cd") {
        Err(e @ Error::InvalidName { .. }) => assert!(e.to_string().contains("NUL"), "{e}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn memfd_defaults_are_ready_for_udmabuf() {
    let _g = lock();
    let m = Memfd::new("ready", 16384).unwrap();
    assert_eq!(m.size(), 16384);
    assert_eq!(m.seals().unwrap(), Seals::SHRINK);
    assert_eq!(
        check_items(&[(m.as_fd(), 0, 16384)], &limits()).unwrap(),
        16384
    );
    assert_eq!(
        check_items(&[(m.as_fd(), 4096, 8192), (m.as_fd(), 0, 4096)], &limits()).unwrap(),
        12288
    );
    let link = std::fs::read_link(format!("/proc/self/fd/{}", m.as_raw_fd())).unwrap();
    assert!(
        link.to_string_lossy().starts_with("/memfd:ready"),
        "{link:?}"
    );
    // Close-on-exec.
    // SAFETY: F_GETFD takes no argument.
    let fdflags = unsafe { libc::fcntl(m.as_raw_fd(), libc::F_GETFD) };
    assert_eq!(fdflags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
}

#[test]
fn memfd_read_write_and_mmap_agree() {
    let _g = lock();
    let before = open_fd_count();
    {
        let m = Memfd::new("rw", 8192).unwrap();
        m.write_at(4000, b"across the page").unwrap();
        let map = m.mmap().unwrap();
        let mut got = [0u8; 15];
        map.read(4000, &mut got).unwrap();
        assert_eq!(&got, b"across the page");
        map.write(0, b"mapped").unwrap();
        let mut back = [0u8; 6];
        m.read_at(0, &mut back).unwrap();
        assert_eq!(&back, b"mapped");
        // Out of range, both ways.
        assert!(matches!(
            map.read(8190, &mut got),
            Err(Error::InvalidRange { .. })
        ));
        assert!(matches!(
            m.write_at(8190, b"abc"),
            Err(Error::InvalidRange { .. })
        ));
        drop(m); // the mapping keeps the pages
        map.fill(8000, 192, 7).unwrap();
        assert!(map.to_vec()[8000..].iter().all(|&b| b == 7));
    }
    assert_eq!(open_fd_count(), before);
}

/// The word accessors' one-compare bounds check against every edge: the
/// last word in, one byte past, unaligned, an offset that wraps, and
/// `write_u64s` of a list that ends exactly at the end or one word past it.
#[test]
fn mapping_word_accessors_check_every_edge() {
    let _g = lock();
    let m = Memfd::new("words", 8192).unwrap();
    let map = m.mmap().unwrap();
    let problem = |r: dmabuf_p2p::Result<()>| match r {
        Err(Error::InvalidRange { problem, .. }) => problem,
        other => panic!("unexpected {other:?}"),
    };
    map.write_u64(8184, 0x0102_0304_0506_0708).unwrap();
    assert_eq!(map.read_u64(8184).unwrap(), 0x0102_0304_0506_0708);
    assert_eq!(map.read_u32(8188).unwrap(), 0x0102_0304);
    assert_eq!(
        problem(map.write_u32(8190, 1)),
        RangeProblem::Unaligned { align: 4 }
    );
    assert_eq!(
        problem(map.write_u64(8192, 1)),
        RangeProblem::OutOfBounds {
            end: 8200,
            size: 8192
        }
    );
    assert_eq!(
        problem(map.write_u64(u64::MAX - 7, 1)),
        RangeProblem::Overflow
    );
    assert!(matches!(
        map.read_u16(u64::MAX - 1),
        Err(Error::InvalidRange {
            problem: RangeProblem::Overflow,
            ..
        })
    ));

    map.write_u64s(8192 - 64, (0..8usize).map(|i| i as u64 * 3))
        .unwrap();
    assert_eq!(map.read_u64(8192 - 8).unwrap(), 21);
    assert_eq!(
        problem(map.write_u64s(8192 - 56, [9u64; 8])),
        RangeProblem::OutOfBounds {
            end: 8200,
            size: 8192
        }
    );
    assert_eq!(
        problem(map.write_u64s(4, [9u64; 2])),
        RangeProblem::Unaligned { align: 8 }
    );
    // The refused list wrote nothing.
    assert_eq!(map.read_u64(8192 - 56).unwrap(), 3);
    map.write_u64s(0, std::iter::empty::<u64>()).unwrap();
}

#[test]
fn memfd_without_shrink_seal_is_refused_naming_the_seal() {
    let _g = lock();
    let m = MemfdOptions::new()
        .seal_shrink(false)
        .create("unsealed", 4096)
        .unwrap();
    match check_items(&[(m.as_fd(), 0, 4096)], &limits()) {
        Err(Error::Memfd { problem }) => {
            assert!(problem.contains("F_SEAL_SHRINK"), "{problem}");
            assert!(
                problem.contains(&format!("fd {}", m.as_raw_fd())),
                "{problem}"
            );
            assert!(problem.contains("/memfd:unsealed"), "{problem}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn memfd_with_write_seals_is_refused_naming_the_seal() {
    let _g = lock();
    for (seal, name) in [
        (Seals::WRITE, "F_SEAL_WRITE"),
        (Seals::FUTURE_WRITE, "F_SEAL_FUTURE_WRITE"),
    ] {
        let m = Memfd::new("sealed", 4096).unwrap();
        m.add_seals(seal).unwrap();
        match check_items(&[(m.as_fd(), 0, 4096)], &limits()) {
            Err(Error::Memfd { problem }) => assert!(problem.contains(name), "{problem}"),
            other => panic!("unexpected {other:?} for {name}"),
        }
    }
}

#[test]
fn memfd_without_allow_sealing_is_refused() {
    let _g = lock();
    // SAFETY: a valid C string and flags; the result is checked.
    let raw = unsafe { libc::memfd_create(c"nosealing".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(raw >= 0);
    // SAFETY: just created, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: ftruncate on our fd.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
    match check_items(&[(fd.as_fd(), 0, 4096)], &limits()) {
        Err(Error::Memfd { problem }) => {
            assert!(
                problem.contains("F_SEAL_SHRINK") && problem.contains("F_SEAL_SEAL"),
                "{problem}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn non_shmem_files_are_refused() {
    let _g = lock();
    let (r, _w) = pipe();
    assert!(matches!(
        check_items(&[(r.as_fd(), 0, 4096)], &limits()),
        Err(Error::Memfd { .. })
    ));
    let f = File::open("Cargo.toml").unwrap();
    match check_items(&[(f.as_fd(), 0, 4096)], &limits()) {
        // Cargo.toml could live on tmpfs; then it is the seal that is missing.
        Err(Error::Memfd { problem }) => assert!(problem.contains("Cargo.toml"), "{problem}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn unaligned_empty_and_out_of_bounds_ranges_are_refused() {
    let _g = lock();
    let m = Memfd::new("ranges", 16384).unwrap();
    let fd = m.as_fd();
    let check = |offset, size| check_items(&[(fd, offset, size)], &limits());
    let expect = |r: dmabuf_p2p::Result<u64>, want: RangeProblem, range: ByteRange| match r {
        Err(Error::InvalidRange {
            target,
            range: got,
            problem,
        }) => {
            assert_eq!(problem, want);
            assert_eq!(got, range);
            assert!(
                target.contains(&format!("fd {}", fd.as_raw_fd())),
                "{target}"
            );
        }
        other => panic!("unexpected {other:?}"),
    };
    let page = dmabuf_p2p::range::page_size();
    expect(check(0, 0), RangeProblem::Empty, ByteRange::new(0, 0));
    expect(
        check(100, 4096),
        RangeProblem::Unaligned { align: page },
        ByteRange::new(100, 4096),
    );
    expect(
        check(0, 4097),
        RangeProblem::Unaligned { align: page },
        ByteRange::new(0, 4097),
    );
    expect(
        check(8192, 12288),
        RangeProblem::OutOfBounds {
            end: 20480,
            size: 16384,
        },
        ByteRange::new(8192, 12288),
    );
    let last_page = u64::MAX - 4095;
    expect(
        check(last_page, 8192),
        RangeProblem::Overflow,
        ByteRange::new(last_page, 8192),
    );
    // The list names the item.
    match check_items(&[(fd, 0, 4096), (fd, 4096, 100)], &limits()) {
        Err(Error::InvalidRange { target, .. }) => assert!(target.contains("item 1"), "{target}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn list_count_and_total_limits() {
    let _g = lock();
    let m = Memfd::new("limits", 3 << 20).unwrap();
    let fd = m.as_fd();
    match check_items(&[], &limits()) {
        Err(Error::InvalidRange {
            problem: RangeProblem::Count(_),
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    let small = UdmabufLimits::new(2, 2);
    match check_items(&[(fd, 0, 4096); 3], &small) {
        Err(Error::UdmabufLimit {
            limit: "list_limit",
            max: 2,
            requested: 3,
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(check_items(&[(fd, 0, 2 << 20)], &small).unwrap(), 2 << 20);
    match check_items(&[(fd, 0, 2 << 20), (fd, 0, 4096)], &small) {
        Err(
            e @ Error::UdmabufLimit {
                limit: "size_limit_mb",
                max: 2,
                requested: 3,
            },
        ) => {
            assert!(e.to_string().contains("size_limit_mb"), "{e}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn limits_are_read_from_sysfs_with_defaults() {
    let _g = lock();
    let dir = std::env::temp_dir().join(format!("udmabuf-params-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    assert_eq!(UdmabufLimits::read_from(&dir), UdmabufLimits::default());
    std::fs::write(dir.join("list_limit"), "7\n").unwrap();
    std::fs::write(dir.join("size_limit_mb"), "garbage\n").unwrap();
    assert_eq!(UdmabufLimits::read_from(&dir), UdmabufLimits::new(7, 64));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn memfd_creation_errors() {
    let _g = lock();
    let before = open_fd_count();
    assert!(matches!(Memfd::new("a\0b", 4096), Err(Error::Memfd { .. })));
    match Memfd::new_hugetlb("odd", HUGE_PAGE_SIZE + 4096) {
        Err(Error::Memfd { problem }) => assert!(problem.contains("huge page"), "{problem}"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        Memfd::new("huge", u64::MAX),
        Err(Error::Memfd { .. })
    ));
    assert_eq!(open_fd_count(), before);
}

#[test]
fn seals_display_and_bits() {
    assert_eq!(
        (Seals::SHRINK | Seals::WRITE).to_string(),
        "F_SEAL_SHRINK|F_SEAL_WRITE"
    );
    assert_eq!(
        Seals::from_bits(0x1000 | 2).to_string(),
        "F_SEAL_SHRINK|0x1000"
    );
    assert!(Seals::empty().is_empty());
}

#[test]
fn missing_heaps_are_named() {
    let _g = lock();
    let dir = std::env::temp_dir().join(format!("heaps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("system"), "").unwrap();
    assert_eq!(heap::list_in(&dir).unwrap(), vec!["system".to_owned()]);
    for bad in ["nope", "", "..", "a/b"] {
        match heap::DmaHeap::open_in(&dir, bad) {
            Err(e @ Error::HeapNotFound { .. }) => {
                let Error::HeapNotFound {
                    ref name,
                    ref available,
                    ..
                } = e
                else {
                    unreachable!()
                };
                assert_eq!(name, bad);
                assert_eq!(available, &vec!["system".to_owned()]);
                assert!(e.to_string().contains("system"), "{e}");
            }
            other => panic!("unexpected {other:?} for {bad:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
