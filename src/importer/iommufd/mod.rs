//! The iommufd importer: IO address spaces (IOAS) of `/dev/iommu` and the
//! mappings in them.
//!
//! * [`Iommufd`] is an open `/dev/iommu`. Cloning it shares the one fd.
//! * [`Ioas`] is an IO address space (`IOMMU_IOAS_ALLOC`). It is a shared
//!   handle: clones name the same IOAS, and the IOAS is destroyed
//!   (`IOMMU_DESTROY`) when the last handle goes, unless it was adopted from
//!   its owner ([`Ioas::adopt`]: a VMM's IOAS, which the VMM destroys). Every
//!   [`IoasMapping`] and every attached [`VfioPciDevice`](crate::vfio::VfioPciDevice)
//!   holds one, so the IOAS always outlives what uses it and the iommufd
//!   outlives the IOAS, whatever order values are dropped in.
//! * [`IoasMapping`] is one mapped area (`IOMMU_IOAS_MAP` of user memory or
//!   `IOMMU_IOAS_MAP_FILE` of a memfd or a dma-buf). It unmaps on drop and
//!   keeps what is needed to map the same source again at the same IOVA
//!   ([`IoasMapping::remap`]): the file's fd (for a
//!   [`DmaBuf`](crate::DmaBuf), the same fd, shared by reference count; for
//!   other files a duplicate), the offset, the IOVA, the length and the
//!   [`MapPerms`].
//!
//! What iommufd accepts (uAPI reference E.4, E.5): any memfd (shmem or
//! hugetlbfs file), and of the dma-bufs only single-range VFIO PCI ones. A
//! dma-buf from anywhere else, or a VFIO one with several ranges, is refused
//! with [`Error::NotImportable`](crate::Error::NotImportable); a revoked
//! VFIO dma-buf with [`Error::Revoked`](crate::Error::Revoked). IOVA problems
//! (taken, misaligned, reserved, no room) are
//! [`Error::InvalidIova`](crate::Error::InvalidIova).
//!
//! ```no_run
//! use dmabuf_p2p::importer::iommufd::{MapPerms, Iommufd, IovaPlacement};
//! use dmabuf_p2p::ByteRange;
//!
//! let iommufd = Iommufd::open()?;
//! let ioas = iommufd.alloc_ioas()?;
//! println!("usable IOVAs: {:?}", ioas.iova_ranges()?);
//! let memfd = dmabuf_p2p::memfd::Memfd::new("buffer", 0x10000)?;
//! let map = ioas.map_file(&memfd, ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::ReadWrite)?;
//! println!("mapped at IOVA {:#x}", map.iova());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! One file per job: `context` (the iommufd and its options), `iova` (the
//! IOVA values the calls take and return), `ioas` (the address space
//! itself), `ioas_mapping` (making, copying, remapping and unmapping areas).
//! Automatic placement, and what it knows of each IOAS, is
//! [`placement`](super::placement)'s.

mod context;
mod ioas;
mod ioas_mapping;
pub(in crate::importer) mod iova;

pub use context::{IOMMUFD_PATH, Iommufd, IommufdOption, OptionId, RlimitMode};
pub use ioas::Ioas;
pub use ioas_mapping::{IoasMapping, MapPerms};
pub use iova::{IovaPlacement, IovaRange, IovaRanges};
