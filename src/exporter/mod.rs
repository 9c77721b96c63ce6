//! Exporters: what turns memory into a dma-buf fd.
//!
//! * [`vfio`]: a VFIO PCI device's BAR ranges (`VFIO_DEVICE_FEATURE_DMA_BUF`);
//! * [`udmabuf`]: memfd pages (`/dev/udmabuf`);
//! * [`heap`]: dma-heap allocations (`/dev/dma_heap/<name>`).

pub mod heap;
pub mod udmabuf;
pub mod vfio;
