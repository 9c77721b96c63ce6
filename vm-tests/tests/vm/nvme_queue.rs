//! The NVMe driver's queues driven the way users drive them: commands
//! resubmitted between waits, completions taken out of order.
//!
//! | device | area | test |
//! | --- | --- | --- |
//! | nvme0 | reads only | `nvme_command_ids_are_not_reused_before_their_completion_is_taken` |

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::importer::iommufd::{Ioas, IoasMapping, Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p_engine::nvme::{Nvme, NvmeProblem};
use dmabuf_p2p_engine::{Completion, Error};
use dmabuf_p2p_vm_tests::{assert_bytes, nvme_address, nvme_image};

const BLOCK: u64 = 512;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A memfd of `size` bytes filled with `fill`, mapped read-write in `ioas`.
fn ram(ioas: &Ioas, size: u64, fill: u8) -> (Memfd, IoasMapping) {
    let mem = Memfd::new("nvme-queue-data", size).unwrap();
    mem.write_at(0, &vec![fill; size as usize]).unwrap();
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

fn problem(e: &Error) -> &NvmeProblem {
    match e {
        Error::Nvme { problem, .. } => problem,
        other => panic!("expected an NVMe error, got {other:?}"),
    }
}

fn read_mem(mem: &Memfd, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_at(offset, &mut v).unwrap();
    v
}

/// Issue 26's reproduction: reads A and B complete, the caller waits for B
/// only, then submits C. C must not get A's id while A's completion is
/// still the caller's to take; `wait(C)` must return only once C's blocks
/// are in C's buffer, and `wait(A)` must still give A's. Twenty rounds,
/// with interrupts and with polling.
#[test]
fn nvme_command_ids_are_not_reused_before_their_completion_is_taken() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let bdf = nvme_address("nvme0");
    for completion in [Completion::Interrupt, Completion::Polling] {
        let mut nvme = Nvme::open_with(bdf.parse().unwrap(), &ioas, completion).unwrap();
        let (mem, map) = ram(&ioas, 0x30000, 0xee);
        // A, B and C read different blocks into their own 64 KiB.
        let (a_lba, b_lba, c_lba) = (2400u64, 2600u64, 2800u64);
        let blocks = 128u32;
        let len = (u64::from(blocks) * BLOCK) as usize;
        for round in 0..20 {
            mem.write_at(0, &vec![0xee; 0x30000]).unwrap();
            let a = nvme.submit_read(a_lba, blocks, map.iova()).unwrap();
            let b = nvme
                .submit_read(b_lba, blocks, map.iova() + 0x10000)
                .unwrap();
            // Both complete meanwhile (a 64 KiB read takes well under 50 ms).
            std::thread::sleep(Duration::from_millis(50));
            nvme.wait(b, IO_TIMEOUT).unwrap();
            let c = nvme
                .submit_read(c_lba, blocks, map.iova() + 0x20000)
                .unwrap();
            assert_ne!(
                c, a,
                "{completion:?} round {round}: C got the id of A, whose completion was not taken"
            );
            nvme.wait(c, IO_TIMEOUT).unwrap();
            assert_bytes(
                &read_mem(&mem, 0x20000, len),
                &nvme_image(c_lba * BLOCK, len),
                0x20000,
                &format!("{completion:?} round {round}: C's buffer when wait(C) returned"),
            );
            nvme.wait(a, IO_TIMEOUT).unwrap();
            assert_bytes(
                &read_mem(&mem, 0, len),
                &nvme_image(a_lba * BLOCK, len),
                0,
                &format!("{completion:?} round {round}: A's buffer when wait(A) returned"),
            );
            assert_bytes(
                &read_mem(&mem, 0x10000, len),
                &nvme_image(b_lba * BLOCK, len),
                0x10000,
                &format!("{completion:?} round {round}: B's buffer"),
            );
            assert_eq!(nvme.in_flight(), 0, "{completion:?} round {round}");
            // Nothing is left to hand out: every completion went to its
            // waiter once, and the IDs of finished commands are stale.
            for id in [a, b, c] {
                let e = nvme.wait(id, Duration::ZERO).unwrap_err();
                assert!(
                    matches!(problem(&e), NvmeProblem::NotInFlight { .. }),
                    "{completion:?} round {round}: waiting again for {id:?}: {e}"
                );
            }
            assert!(nvme.poll().unwrap().is_none());
            let e = nvme.wait_any(Duration::ZERO).unwrap_err();
            assert!(
                matches!(problem(&e), NvmeProblem::NothingInFlight { .. }),
                "{completion:?} round {round}: an extra completion: {e}"
            );
        }
    }
}
