//! Importers: what maps a dma-buf for a device. [`iommufd`] maps it into an
//! iommufd IO address space at an IOVA; [`placement`] picks automatic IOVAs;
//! `drm` (feature `drm`) imports it into a DRM device as a GEM object.

#[cfg(feature = "drm")]
pub mod drm;
pub mod iommufd;
pub mod placement;
