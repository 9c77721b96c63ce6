//! Device reset (`VFIO_DEVICE_RESET`), which revokes the device's dma-bufs
//! for its duration.

use super::VfioPciDevice;
use super::config::COMMAND_MEMORY;
use crate::error::{Error, Result};
use crate::ioctl;
use crate::revoke::RevokeReason;

impl VfioPciDevice {
    /// Whether the device supports [`VfioPciDevice::reset`].
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// println!("reset: {}", dev.supports_reset()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn supports_reset(&self) -> Result<bool> {
        Ok(self.info()?.supports_reset())
    }

    /// Resets the device (`VFIO_DEVICE_RESET`). Its dma-bufs are revoked for
    /// the reset and restored after it if memory decode is on; iommufd areas
    /// of them stay dead until remapped. A device without a reset method
    /// (`VFIO_DEVICE_FLAGS_RESET` clear) is [`Error::Unsupported`], checked
    /// before the ioctl.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// if dev.supports_reset()? {
    ///     dev.reset()?;
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn reset(&self) -> Result<()> {
        if !self.info()?.supports_reset() {
            return Err(Error::Unsupported {
                target: self.address.to_string(),
                operation: "VFIO_DEVICE_RESET",
                problem:
                    "the device has no reset method VFIO can use (VFIO_DEVICE_FLAGS_RESET is clear)"
                        .to_owned(),
                source: None,
            });
        }
        let held = self.lock_command();
        let reset = ioctl::vfio_device_reset(self.fd())
            .map_err(|e| Error::sys("VFIO_DEVICE_RESET", self.address.to_string(), e));
        // The kernel revoked for the reset and un-revoked if memory decode is
        // on; the iommufd areas are dead either way, so tear down, then
        // restore if the buffers are usable again.
        self.hub.revoked_by_kernel(RevokeReason::Reset);
        match self.read_command_held(&held) {
            Ok(command) if command & COMMAND_MEMORY != 0 => self.restore_if_revoked(),
            Ok(_) => {}
            Err(_) => self.known.forget(),
        }
        reset
    }
}
