//! Tests for a VM whose `nvme0` reads its image throttled (the
//! `nvme_throttled` profile): reads stay in flight long enough for a queue
//! closed at once to meet them.

use std::sync::Arc;
use std::time::Duration;

use dmabuf_p2p::importer::iommufd::Iommufd;
use dmabuf_p2p_engine::nvme::{Dma, NvmeProblem, QueueOptions};
use dmabuf_p2p_engine::{Error, StorageEngine};
use dmabuf_p2p_vm_tests::{Kmsg, nvme_image, vm_profile};

const BLOCK: u64 = 512;

/// `IoQueue::close` with a zero timeout while eight 128 KiB reads into
/// host RAM are in flight (the profile throttles them to about two
/// seconds in all): the close's first wait ends at once, so it sends an
/// Abort for each command still running (QEMU 7.2 aborts none), waits
/// again, and deletes the queue, and says so: `AbortedByDeletion`, naming
/// the commands the deletion met and the Aborts sent. Every read either
/// landed (its bytes are the image's) or is one of those the error counts;
/// the queue lets go of the buffer, and the controller goes on serving a
/// new queue. Never into the BAR or a CMB: deleting a queue with DMA to
/// MMIO in flight freezes QEMU 7.2 (docs/TESTBED.md).
#[test]
fn a_queue_closed_at_once_aborts_its_running_reads_and_says_so() {
    const READS: u64 = 8;
    const LEN: u64 = 128 << 10;
    assert_eq!(vm_profile(), "nvme_throttled");
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut nvme = super::nvme::open_with_queues("nvme0", &ioas, 2);
    let (mem, map) = super::nvme::ram(&ioas, READS * LEN);
    mem.write_at(0, &vec![0xa5; (READS * LEN) as usize])
        .unwrap();
    let map = Arc::new(map);
    let lba = |i: u64| 512 + i * 256;
    let mut q = nvme.create_queue(QueueOptions::new().depth(8)).unwrap();
    for i in 0..READS {
        q.submit_read(lba(i), (LEN / BLOCK) as u32, Dma::held(&map, i * LEN))
            .unwrap();
    }
    let e = q.close(Duration::ZERO).unwrap_err();
    let (commands, aborts) = match &e {
        Error::Nvme {
            problem:
                NvmeProblem::AbortedByDeletion {
                    commands, aborts, ..
                },
            ..
        } => (*commands, *aborts),
        other => panic!("close with reads in flight: {other}"),
    };
    assert!(
        commands >= 1 && aborts >= commands && aborts <= READS as usize,
        "{e}"
    );
    let mut landed = 0;
    for i in 0..READS {
        let mut got = vec![0u8; LEN as usize];
        mem.read_at(i * LEN, &mut got).unwrap();
        // An aborted read's bytes are undefined: only what landed counts.
        if got == nvme_image(lba(i) * BLOCK, LEN as usize) {
            landed += 1;
        }
    }
    assert!(
        landed + commands >= READS as usize,
        "{landed} reads landed and {commands} were aborted, of {READS}: {e}"
    );
    assert_eq!(
        Arc::strong_count(&map),
        1,
        "the closed queue still holds the buffer"
    );
    // The controller serves a new queue (and its own).
    let mut q = nvme.create_queue(QueueOptions::new().depth(2)).unwrap();
    let (m2, m2map) = super::nvme::ram(&ioas, 4096);
    let id = q.submit_read(7, 8, m2map.iova()).unwrap();
    q.wait(id, Duration::from_secs(20)).unwrap();
    let mut got = vec![0u8; 4096];
    m2.read_at(0, &mut got).unwrap();
    assert_eq!(got, nvme_image(7 * BLOCK, 4096));
    nvme.read_blocks(9, 8, m2map.iova(), Duration::from_secs(20))
        .unwrap();
    m2.read_at(0, &mut got).unwrap();
    assert_eq!(got, nvme_image(9 * BLOCK, 4096));
    q.close(Duration::from_secs(20)).unwrap();
    Kmsg::mark(&format!(
        "nvme close at once: {commands} reads aborted by the deletion, {aborts} Aborts sent, {landed} of {READS} landed"
    ));
}
