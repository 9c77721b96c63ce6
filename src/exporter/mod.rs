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
