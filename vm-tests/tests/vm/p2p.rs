//! Peer-to-peer DMA, end to end: the edu engine copies through the IOMMU into
//! and out of ivshmem BARs exported as dma-bufs, and every copy's bytes are
//! checked (in the guest through a BAR mmap, and on the host in the ivshmem
//! backing file).

use std::time::Duration;

use dmabuf_p2p::engine::edu::Edu;
use dmabuf_p2p::engine::{Completion, DmaEngine};
use dmabuf_p2p::exporter::vfio::VfioPciDevice;
use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{Attachment, RestorePolicy};
use dmabuf_p2p::ByteRange;
use dmabuf_p2p_vm_tests::{ivshmem_devices, pci_devices, request_host_check, EDU_ID};

const TIMEOUT: Duration = Duration::from_secs(10);

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// The ivshmem device with a BAR2 of `size` bytes, and its test-bed name.
fn shm(size: u64) -> (String, &'static str) {
    let bdf = ivshmem_devices().into_iter().find(|(_, s)| *s == size).map(|(b, _)| b).expect("ivshmem device");
    (bdf, if size == 1 << 20 { "shm0" } else { "shm1" })
}

#[test]
fn host_ram_to_bar() {
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let (bdf, shm_name) = shm(1 << 20);
    let mut target = VfioPciDevice::open(bdf.parse().unwrap()).unwrap();
    target.bind(&iommufd).unwrap();
    target.set_memory_decode(true).unwrap();
    let bar = target.map_bar(2).unwrap();
    bar.write_bytes(0, &[0u8; 8192]).unwrap();
    let export = target.export_bar(2, &[ByteRange::new(0, 0x10000)]).unwrap();
    let att = Attachment::map(&export, &ioas, IovaPlacement::Auto, MapPerms::ReadWrite, RestorePolicy::Automatic).unwrap();

    let mut edu = Edu::open(pci_devices(EDU_ID)[0].parse().unwrap(), &ioas).unwrap();
    assert_eq!(edu.completion(), Completion::Interrupt, "MSI set-up failed: {:?}", edu.polling_reason());

    let data = pattern(7, 4096);
    let src = Memfd::new("src", 0x10000).unwrap();
    src.write_at(0, &data).unwrap();
    let src_map = ioas.map_file(&src, ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::Read).unwrap();

    edu.memcpy(src_map.iova(), att.iova() + 0x1000, 4096, TIMEOUT).unwrap();
    let mut got = vec![0u8; 4096];
    bar.read_bytes(0x1000, &mut got).unwrap();
    assert_eq!(got, data, "the BAR holds what the engine copied");
    request_host_check(shm_name, 0x1000, &data);
}
