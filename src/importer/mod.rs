//! Importers: what maps a dma-buf for a device. [`iommufd`] maps it into an
//! iommufd IO address space at an IOVA; [`placement`] picks automatic IOVAs.

pub mod iommufd;
pub mod placement;

/// The old home of the selftest mock dma-buf, now [`crate::exporter::mock`];
/// kept so code written against it keeps compiling.
#[doc(hidden)]
pub mod mock {
    pub use crate::exporter::mock::*;
}
