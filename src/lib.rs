//! Safe peer-to-peer DMA on Linux, the dma-buf way.
//!
//! * **Exporters** ([`exporter`]) turn memory into dma-buf fds: a VFIO PCI BAR
//!   range (`VFIO_DEVICE_FEATURE_DMA_BUF`), memfd pages (udmabuf), or a dma-heap
//!   allocation.
//! * The **handle** [`DmaBuf`] owns one dma-buf fd.
//! * **Importers** ([`importer`]) map a dma-buf into an iommufd IO address space
//!   (`IOMMU_IOAS_MAP_FILE`) at an IOVA that devices then DMA to.
//! * **Topology** ([`topology`]) says beforehand whether DMA between two PCI
//!   functions can work, which way it goes (through a switch or the root
//!   complex), whether the IOMMU translates it, and why not.
//! * **Inside a VMM** ([`vmm`]), [`GuestBarMap`](vmm::GuestBarMap) keeps every
//!   assigned device's offered BARs mapped at their guest-physical addresses,
//!   following the guest's config-space writes.
//!
//! See `docs/ARCHITECTURE.md` for the layers and which kernel object each type owns.

mod deadline;
mod dir;
pub mod dmabuf;
pub mod error;
pub mod exporter;
pub mod fdinfo;
pub mod importer;
mod ioctl;
pub mod mapping;
pub mod memfd;
pub mod pci;
pub mod range;
pub mod revoke;
#[cfg(feature = "rust-vmm")]
pub mod rust_vmm;
#[cfg(feature = "share")]
pub mod share;
mod shared_fd;
// The uAPI bindings, for the ioctl layer: not API.
mod sys;
pub mod sysfs;
pub mod topology;
mod types;
pub mod vfio;
pub mod vmm;

pub use dmabuf::{Access, DmaBuf, SyncFile, is_dmabuf};
#[cfg(feature = "drm")]
pub use error::ImportRefusal;
pub use error::{AllowedIovaProblem, Error, RangeProblem, Result};
pub use exporter::bar::BarExport;
pub use exporter::heap::DmaHeap;
pub use exporter::mock::MockDmaBuf;
pub use exporter::udmabuf::Udmabuf;
pub use importer::iommufd::{
    Ioas, IoasMapping, Iommufd, IovaPlacement, IovaRange, IovaRanges, MapPerms,
};
pub use mapping::{MappedRegister, MappedRing, Mapping};
pub use memfd::{Memfd, MemfdOptions, Seals};
pub use pci::PciAddress;
pub use range::{ByteRange, PhysRange};
pub use revoke::{Attachment, BufferState, RestorePolicy, RevocationHub, RevokeReason};
#[cfg(feature = "share")]
pub use types::ShareProblem;
pub use vfio::{Bar, BarMapping, DeviceInfo, RegionInfo, VfioPciDevice};

/// The VMM author's guide (`docs/GUIDE.md`), here so its snippets compile as
/// doctests. It walks through sharing, rust-vmm interop and DRM import too,
/// hence the features (the test command turns all three on).
#[cfg(all(feature = "share", feature = "rust-vmm", feature = "drm"))]
#[doc = include_str!("../docs/GUIDE.md")]
pub mod guide {}
