//! dma-heaps on the real kernel: listing, opening by name, allocation sizes,
//! zeroed memory written and read back, and typed errors without fd leaks.

use dmabuf_p2p::dmabuf::Access;
use dmabuf_p2p::exporter::heap::{self, DmaHeap};
use dmabuf_p2p::{ByteRange, Error, RangeProblem};
use dmabuf_p2p_vm_tests::open_fd_count;

#[test]
fn heap_list_has_the_system_heap() {
    let heaps = heap::list().unwrap();
    assert!(heaps.iter().any(|h| h == "system"), "heaps: {heaps:?}");
    let mut sorted = heaps.clone();
    sorted.sort();
    assert_eq!(heaps, sorted);
}

#[test]
fn heap_alloc_is_zeroed_then_written_and_read_back() {
    let before = open_fd_count();
    {
        let heap = DmaHeap::open("system").unwrap();
        assert_eq!(heap.name(), "system");
        let len: u64 = (1 << 20) + 4096 * 3;
        let buf = heap.alloc(len).unwrap();
        assert_eq!(buf.size().unwrap(), len);
        let info = buf.fdinfo().unwrap();
        assert_eq!(info.exp_name, "system");
        assert_eq!(info.size, len);
        assert!(
            info.is_cloexec(),
            "heap fd not close-on-exec: flags {:#o}",
            info.flags
        );
        assert_eq!(info.flags & libc::O_ACCMODE as u32, libc::O_RDWR as u32);

        let map = buf.mmap().unwrap();
        {
            let _cpu = buf.begin_cpu_access(Access::Read).unwrap();
            assert!(
                map.to_vec().iter().all(|&b| b == 0),
                "fresh heap memory is not zeroed"
            );
        }
        let data: Vec<u8> = (0..len as usize).map(|i| (i % 251) as u8).collect();
        {
            let _cpu = buf.begin_cpu_access(Access::Write).unwrap();
            map.write(0, &data).unwrap();
        }
        // A second, read-only mapping sees the same bytes.
        let ro = buf.mmap_range(ByteRange::new(0, len), false).unwrap();
        let cpu = buf.begin_cpu_access(Access::Read).unwrap();
        assert_eq!(ro.to_vec(), data);
        assert_eq!(map.to_vec(), data);
        cpu.end().unwrap();
    }
    assert_eq!(open_fd_count(), before, "fds leaked");
}

#[test]
fn heap_alloc_rounds_up_to_a_page() {
    let heap = DmaHeap::open("system").unwrap();
    for (len, size) in [
        (1, 4096),
        (4095, 4096),
        (4096, 4096),
        (4097, 8192),
        (100_000, 102_400),
    ] {
        let buf = heap.alloc(len).unwrap();
        assert_eq!(buf.size().unwrap(), size, "alloc({len})");
        assert_eq!(
            buf.fdinfo().unwrap().size,
            size,
            "fdinfo size of alloc({len})"
        );
    }
}

#[test]
fn heap_bad_inputs_give_typed_errors_and_leak_no_fd() {
    let heap = DmaHeap::open("system").unwrap();
    let before = open_fd_count();
    match DmaHeap::open("no-such-heap") {
        Err(e @ Error::HeapNotFound { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("no-such-heap") && msg.contains("system"),
                "{msg}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        DmaHeap::open("../udmabuf"),
        Err(Error::HeapNotFound { .. })
    ));
    match heap.alloc(0) {
        Err(Error::InvalidRange {
            target,
            problem: RangeProblem::Empty,
            ..
        }) => assert!(target.contains("system"), "{target}"),
        other => panic!("unexpected {other:?}"),
    }
    match heap.alloc(u64::MAX - 10) {
        Err(Error::InvalidRange {
            problem: RangeProblem::Overflow,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(open_fd_count(), before, "a refused allocation leaked an fd");
}
