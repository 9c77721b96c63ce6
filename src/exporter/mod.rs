//! Exporters: what turns memory into a dma-buf fd.
//!
//! * [`bar`]: ranges of a VFIO PCI device's BARs (`VFIO_DEVICE_FEATURE_DMA_BUF`;
//!   the device itself is [`crate::vfio`]);
//! * [`udmabuf`]: memfd pages (`/dev/udmabuf`);
//! * [`heap`]: dma-heap allocations (`/dev/dma_heap/<name>`);
//! * [`mock`]: the kernel's iommufd selftest dma-buf, a revocable buffer for
//!   testing revocation handling without hardware.

pub mod bar;
pub mod heap;
pub mod mock;
pub mod udmabuf;

/// The old home of the VFIO device and BAR export, kept so code written
/// against it keeps compiling while it moves to [`crate::vfio`] and [`bar`].
#[doc(hidden)]
pub mod vfio {
    pub use super::bar::{BarExport, EXPORT_OPEN_FLAGS, ExportPlan, export_request, plan_export};
    pub use crate::vfio::*;
}
