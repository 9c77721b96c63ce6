//! A BAR mapped into this process: a [`Mapping`] of the device fd.

use super::VfioPciDevice;
use crate::error::{Error, Result};
use crate::mapping::Mapping;
use crate::range::page_size;

/// A BAR mapped into this process ([`VfioPciDevice::map_bar`]): the one
/// mapping type, [`Mapping`], here of the device fd. Accesses are bounded by
/// the BAR size. The mapping keeps the device file open in the kernel on its
/// own, so it may outlive the [`VfioPciDevice`] (and the kernel does not
/// finish closing the device, or a hot-unplug, until it is dropped).
pub type BarMapping = Mapping;

impl VfioPciDevice {
    /// Maps BAR `index` into this process (`mmap` of the device fd at the
    /// region offset, shared, with the region's read/write permissions). A
    /// BAR smaller than a page is mapped as one page; accesses are still
    /// bounded by the BAR size. A BAR without `VFIO_REGION_INFO_FLAG_MMAP` is
    /// [`Error::Unsupported`]; an absent BAR is [`Error::InvalidRegion`].
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// dev.set_memory_decode(true)?;
    /// let bar = dev.map_bar(2)?;
    /// bar.write_u32(0, 0xdead_beef)?;
    /// assert_eq!(bar.read_u32(0)?, 0xdead_beef);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn map_bar(&self, index: u32) -> Result<BarMapping> {
        let bar = self.bar(index)?;
        let name = format!("{} BAR{index}", self.address);
        if !bar.is_present() {
            return Err(Error::InvalidRegion {
                device: self.address.to_string(),
                index,
                problem: "BAR not present (size 0)".to_owned(),
                source: None,
            });
        }
        if !bar.region.mmap_supported() {
            return Err(Error::Unsupported {
                target: name,
                operation: "mmap",
                problem: "VFIO does not allow mmap of this region (no VFIO_REGION_INFO_FLAG_MMAP)"
                    .to_owned(),
                source: None,
            });
        }
        let too_big = || Error::InvalidRegion {
            device: self.address.to_string(),
            index,
            problem: "too large to map in this address space".to_owned(),
            source: None,
        };
        let size = usize::try_from(bar.size()).map_err(|_| too_big())?;
        let page = usize::try_from(page_size()).map_err(|_| too_big())?;
        let map_len = size.checked_next_multiple_of(page).ok_or_else(too_big)?;
        Mapping::map_shared(
            self.fd(),
            bar.region.offset,
            size,
            map_len,
            bar.region.writable(),
            format!("{name} mapping"),
        )
        .map_err(|e| Error::sys("mmap", name, e))
    }
}
