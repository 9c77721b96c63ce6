//! The walk-through of `docs/GUIDE.md`, run against the real kernel: export a
//! BAR, map it for the edu engine, DMA into it, revoke and restore.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{Attachment, RestorePolicy, RevocationEvent, RevokeReason};
use dmabuf_p2p::{ByteRange, Iommufd, IovaPlacement, MapPerms, VfioPciDevice};
use dmabuf_p2p_engine::{DmaEngine, edu::Edu};
use dmabuf_p2p_vm_tests::{EDU_ID, ivshmem_devices, pci_devices};

/// Sections 1 to 5 of the guide, in order, with the guide's calls; the
/// peer of section 4 is the edu engine, as in the engine package's crate
/// documentation.
#[test]
fn guide_walkthrough() {
    let (exporter_bdf, _) = ivshmem_devices()
        .into_iter()
        .find(|(_, s)| *s == 1 << 20)
        .unwrap();
    let engine_bdf = pci_devices(EDU_ID)[0].clone();

    // 1.
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    assert!(!ioas.iova_ranges().unwrap().ranges.is_empty());

    // 2.
    let mut exporter = VfioPciDevice::open(exporter_bdf.parse().unwrap()).unwrap();
    exporter.bind(&iommufd).unwrap();
    exporter.set_memory_decode(true).unwrap();
    let export = exporter
        .export_bar(2, &[ByteRange::new(0, 64 << 10)])
        .unwrap();
    assert_eq!(export.dmabuf().fdinfo().unwrap().exp_name, "vfio_pci_core");

    // 3.
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    assert_eq!(att.length(), 64 << 10);
    assert_eq!(att.phys_ranges().len(), 1);

    // 4.
    let mut edu = Edu::open(engine_bdf.parse().unwrap(), &ioas).unwrap();
    let src = Memfd::new("src", 4096).unwrap();
    src.write_at(0, b"hello, BAR").unwrap();
    let src_map = ioas
        .map_file(
            &src,
            ByteRange::new(0, 4096),
            IovaPlacement::Auto,
            MapPerms::Read,
        )
        .unwrap();
    exporter.map_bar(2).unwrap().write(0, &[0u8; 16]).unwrap();
    att.ensure_live().unwrap();
    edu.memcpy(src_map.iova(), att.iova(), 2048, Duration::from_secs(5))
        .unwrap();
    let mut check = [0u8; 10];
    exporter.map_bar(2).unwrap().read(0, &mut check).unwrap();
    assert_eq!(&check, b"hello, BAR");

    // 5.
    let events: Arc<Mutex<Vec<RevocationEvent>>> = Arc::default();
    let seen = Arc::clone(&events);
    att.on_event(move |_, ev| seen.lock().unwrap().push(ev.clone()));
    let iova = att.iova();
    exporter.set_memory_decode(false).unwrap();
    assert!(att.is_revoked() && att.ensure_live().is_err());
    exporter.set_memory_decode(true).unwrap();
    assert!(!att.is_revoked());
    assert_eq!(att.iova(), iova);
    assert_eq!(
        *events.lock().unwrap(),
        vec![
            RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff),
            RevocationEvent::Restored
        ]
    );
}
