//! The thread-safety bounds the crate claims for its public types, checked at
//! compile time: if a change makes one of these types lose `Send` or `Sync`
//! (a raw pointer, an `Rc`, a `Cell` added to it), this file stops compiling.
//!
//! What is claimed, and why it is sound:
//!
//! * **Handles of kernel objects** — [`DmaBuf`], [`SyncFile`], [`Memfd`],
//!   [`Udmabuf`], [`DmaHeap`], [`Iommufd`], [`Ioas`], [`IoasMapping`],
//!   [`BarExport`]: `Send + Sync`. Each owns file descriptors; every `&self`
//!   method is an ioctl, `pread`/`pwrite` or `fstat`, which the kernel
//!   serialises. [`Ioas`] and [`Iommufd`] are shared handles meant to be
//!   cloned into threads.
//! * **[`VfioPciDevice`]**: `Send + Sync`. Config-space access, memory decode,
//!   bus master, reset, BAR export and BAR mmap take `&self`, so a VMM can
//!   forward config writes on one thread while others export and map; the
//!   methods that change the binding (`bind`, `attach`, `detach`) take
//!   `&mut self`.
//! * **Revocation** — [`RevocationHub`] and [`Attachment`]: `Send + Sync`.
//!   A VMM revokes on its config-write path while its DMA threads hold the
//!   attachments; all state is behind mutexes, and callbacks must be
//!   `Send + Sync` themselves.
//! * **CPU mappings** — [`Mapping`] (also as [`BarMapping`]): `Send + Sync`.
//!   An address range owned by the value and accessed only with volatile
//!   operations through `&self` (devices write it concurrently anyway).
//! * **Plain data** (addresses, ranges, parsed sysfs and fdinfo) and the
//!   error types: `Send + Sync`, and [`Error`] is `'static` too, so it fits in
//!   `Box<dyn std::error::Error + Send + Sync>`.
//!
//! The VM suite's concurrency test (`vm-tests/tests/vm/concurrency.rs`) shares
//! these types between real threads.

#![allow(clippy::unwrap_used)]

use dmabuf_p2p::exporter::bar::{BarExport, ExportPlan};
use dmabuf_p2p::exporter::heap::DmaHeap;
use dmabuf_p2p::exporter::udmabuf::Udmabuf;
use dmabuf_p2p::fdinfo::{DmaBufInfo, FdInfo};
use dmabuf_p2p::importer::iommufd::{IovaPlacement, IovaRange, IovaRanges, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::pci::Resource;
use dmabuf_p2p::range::PhysRange;
use dmabuf_p2p::revoke::{
    Attachment, AttachmentInfo, BufferState, RestorePolicy, RevocationEvent, RevocationHub,
    RevokeReason,
};
use dmabuf_p2p::sysfs::{PciDeviceInfo, Sysfs};
use dmabuf_p2p::vfio::{Bar, BarMapping, DeviceInfo, RegionInfo, VfioPciDevice};
use dmabuf_p2p::{
    ByteRange, DmaBuf, Error, Ioas, IoasMapping, Iommufd, Mapping, PciAddress, RangeProblem,
    SyncFile,
};

const fn send_sync<T: Send + Sync>() {}
const fn error_object<T: std::error::Error + Send + Sync + 'static>() {}

// Evaluated at compile time: a missing bound is a build error of this file.
const _: () = {
    // Handles of kernel objects.
    send_sync::<DmaBuf>();
    send_sync::<SyncFile>();
    send_sync::<Memfd>();
    send_sync::<Udmabuf>();
    send_sync::<DmaHeap>();
    send_sync::<Iommufd>();
    send_sync::<Ioas>();
    send_sync::<IoasMapping>();
    send_sync::<BarExport>();
    send_sync::<VfioPciDevice>();
    // Revocation.
    send_sync::<RevocationHub>();
    send_sync::<std::sync::Arc<RevocationHub>>();
    send_sync::<Attachment>();
    send_sync::<AttachmentInfo>();
    send_sync::<RevocationEvent>();
    send_sync::<RevokeReason>();
    send_sync::<BufferState>();
    send_sync::<RestorePolicy>();
    // CPU mappings.
    send_sync::<BarMapping>();
    send_sync::<Mapping>();
    // Plain data.
    send_sync::<ByteRange>();
    send_sync::<PhysRange>();
    send_sync::<PciAddress>();
    send_sync::<Resource>();
    send_sync::<Sysfs>();
    send_sync::<PciDeviceInfo>();
    send_sync::<FdInfo>();
    send_sync::<DmaBufInfo>();
    send_sync::<IovaRange>();
    send_sync::<IovaRanges>();
    send_sync::<IovaPlacement>();
    send_sync::<MapPerms>();
    send_sync::<Bar>();
    send_sync::<RegionInfo>();
    send_sync::<DeviceInfo>();
    send_sync::<ExportPlan>();
    // Errors.
    send_sync::<RangeProblem>();
    error_object::<Error>();
};

/// The bounds above also hold where it matters at run time: the shared
/// handles move into threads and come back.
#[test]
fn shared_values_cross_threads() {
    let hub = RevocationHub::new("send-sync");
    let range = ByteRange::new(0x1000, 0x1000);
    let err: Box<dyn std::error::Error + Send + Sync> = Box::new(Error::Parse {
        what: "test",
        input: "x".to_owned(),
        problem: "y".to_owned(),
    });
    let (name, r, e) = std::thread::scope(|s| {
        s.spawn(|| (hub.name().to_owned(), range, err.to_string()))
            .join()
            .unwrap()
    });
    assert_eq!((name.as_str(), r), ("send-sync", range));
    assert!(e.contains('x'));
}
