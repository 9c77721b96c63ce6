//! Importers: what maps a dma-buf for a device. [`iommufd`] maps it into an
//! iommufd IO address space at an IOVA; [`mock`] is the kernel's selftest
//! dma-buf, a revocable buffer for testing revocation handling without
//! hardware.

pub mod iommufd;
pub mod mock;
pub mod placement;
