//! DRM PRIME import (feature `drm`): a dma-buf imported into a DRM device
//! as a GEM object, revoked and restored with its exporter.
//!
//! Of the DRM drivers in Linux 7.2.13, three import the way the VFIO BAR
//! exporter accepts (a dynamic attach that allows peer-to-peer and can be
//! revoked): `amdgpu`, `xe`, and `virtio_gpu` with blob resources and
//! without virgl. Every other driver attaches statically and is refused
//! (`EOPNOTSUPP`); and even an accepted importer gets the BAR only where
//! `pci_p2pdma_map_type()` finds a path (`EINVAL` otherwise).
//! [`GemImport::forecast`] says which before asking the kernel.
//!
//! * [`DrmDevice`]: the opened device node, its driver and PCI function;
//! * [`PrimeImporter`]: how its driver attaches;
//! * [`GemImport`]: the imported buffer, tied to the exporter's
//!   [`RevocationHub`](crate::revoke::RevocationHub).
//!
//! Mode setting (framebuffers, CRTCs) is not the library's: use the GEM
//! handle with a DRM crate (the CLI and the VM tests use `drm`).

mod device;
mod gem_import;
mod prime;

pub use device::DrmDevice;
pub use gem_import::{GemImport, GemImportInfo, ImportForecast};
pub use prime::PrimeImporter;
