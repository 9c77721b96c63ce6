//! Importers: what maps a dma-buf for a device. [`iommufd`] maps it into an
//! iommufd IO address space at an IOVA; [`placement`] picks automatic IOVAs.

pub mod iommufd;
pub mod placement;
