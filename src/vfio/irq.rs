//! Interrupt eventfds (`VFIO_DEVICE_SET_IRQS`) and the kernel's request to
//! have the device back (hot-unplug).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::VfioPciDevice;
use crate::deadline::deadline_after;
use crate::error::{Error, Result};
use crate::ioctl;
use crate::revoke::RevokeReason;
use crate::sys;

/// VFIO interrupt index of legacy INTx, for [`VfioPciDevice::irq_eventfd`].
pub const INTX_IRQ_INDEX: u32 = sys::VFIO_PCI_INTX_IRQ_INDEX;
/// VFIO interrupt index of MSI.
pub const MSI_IRQ_INDEX: u32 = sys::VFIO_PCI_MSI_IRQ_INDEX;
/// VFIO interrupt index of MSI-X.
pub const MSIX_IRQ_INDEX: u32 = sys::VFIO_PCI_MSIX_IRQ_INDEX;
/// VFIO interrupt index of the error (AER) interrupt.
pub const ERR_IRQ_INDEX: u32 = sys::VFIO_PCI_ERR_IRQ_INDEX;
/// VFIO interrupt index of the kernel's device request (see
/// [`VfioPciDevice::unplug_requested`]).
pub const REQ_IRQ_INDEX: u32 = sys::VFIO_PCI_REQ_IRQ_INDEX;

/// The device-request channel of a [`VfioPciDevice`].
#[derive(Debug)]
pub(super) enum RequestChannel {
    /// Not bound yet: VFIO refuses `VFIO_DEVICE_SET_IRQS` before the bind.
    NotBound,
    /// An eventfd the kernel signals when it wants the device back.
    Armed(OwnedFd),
    /// Registering failed; the text says why.
    Unavailable(String),
}

impl VfioPciDevice {
    /// Whether the kernel's request for the device back has been seen: then
    /// no new exports are made from it.
    #[inline]
    pub(crate) fn removal_requested(&self) -> bool {
        self.unplug_requested.load(Ordering::Acquire)
    }

    /// Registers a fresh eventfd as the trigger of `VFIO_PCI_REQ_IRQ_INDEX`.
    pub(super) fn arm_request_channel(&self) -> Result<OwnedFd> {
        self.irq_eventfd(sys::VFIO_PCI_REQ_IRQ_INDEX, "device request IRQ")
    }

    /// Registers a fresh non-blocking eventfd as the trigger of vector 0 of
    /// the VFIO interrupt `index` (`VFIO_DEVICE_SET_IRQS`, action TRIGGER):
    /// e.g. `VFIO_PCI_MSI_IRQ_INDEX` for a DMA engine's completion interrupt.
    /// The eventfd becomes readable each time the interrupt fires. An index
    /// the device has no vector for is [`Error::Unsupported`]; `what` names
    /// the interrupt in errors. [`disable_irq`](Self::disable_irq) undoes it.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:01:00.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let msi = dev.irq_eventfd(dmabuf_p2p::vfio::MSI_IRQ_INDEX, "MSI")?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn irq_eventfd(&self, index: u32, what: &'static str) -> Result<OwnedFd> {
        let mut fds = self.irq_eventfds(index, 1, what)?;
        // One vector asked for, one eventfd made.
        Ok(fds.swap_remove(0))
    }

    /// The number of vectors of VFIO interrupt `index`
    /// (`VFIO_DEVICE_GET_IRQ_INFO`): for MSI-X, the size of the device's
    /// MSI-X table.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:01:00.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let n = dev.irq_vectors(dmabuf_p2p::vfio::MSIX_IRQ_INDEX)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn irq_vectors(&self, index: u32) -> Result<u32> {
        let info = ioctl::vfio_device_get_irq_info(self.fd(), index).map_err(|e| {
            Error::sys(
                "VFIO_DEVICE_GET_IRQ_INFO",
                format!("{} IRQ index {index}", self.address),
                e,
            )
        })?;
        Ok(info.count)
    }

    /// Registers `count` fresh non-blocking eventfds as the triggers of
    /// vectors `0..count` of VFIO interrupt `index`, in one
    /// `VFIO_DEVICE_SET_IRQS`: element `i` of the result becomes readable
    /// when vector `i` fires (an NVMe controller's MSI-X vector per queue).
    /// More vectors than the device has ([`irq_vectors`](Self::irq_vectors))
    /// or none at all is [`Error::Unsupported`]; `what` names the interrupt
    /// in errors. [`disable_irq`](Self::disable_irq) undoes it.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:01:00.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let vectors = dev.irq_eventfds(dmabuf_p2p::vfio::MSIX_IRQ_INDEX, 3, "MSI-X")?;
    /// assert_eq!(vectors.len(), 3);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn irq_eventfds(&self, index: u32, count: u32, what: &'static str) -> Result<Vec<OwnedFd>> {
        let target = self.address.to_string();
        let info = ioctl::vfio_device_get_irq_info(self.fd(), index)
            .map_err(|e| Error::sys("VFIO_DEVICE_GET_IRQ_INFO", format!("{target} {what}"), e))?;
        if info.count == 0 || count == 0 || count > info.count {
            return Err(Error::Unsupported {
                target,
                operation: what,
                problem: format!(
                    "{count} vector(s) asked for IRQ index {index}, for which VFIO reports {}",
                    info.count
                ),
                source: None,
            });
        }
        let mut fds = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let efd: OwnedFd =
                EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                    .map_err(|e| Error::sys("eventfd", format!("{target} {what}"), e.into()))?
                    .into();
            fds.push(efd);
        }
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        ioctl::vfio_device_set_irqs(
            self.fd(),
            sys::VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            0,
            ioctl::IrqData::Eventfd(&raw),
        )
        .map_err(|e| {
            Error::sys(
                "VFIO_DEVICE_SET_IRQS(eventfd)",
                format!("{target} {what}"),
                e,
            )
        })?;
        Ok(fds)
    }

    /// Unregisters every trigger of VFIO interrupt `index` (`VFIO_DEVICE_SET_IRQS`
    /// with no data and count 0), e.g. before closing an eventfd from
    /// [`irq_eventfd`](Self::irq_eventfd).
    pub fn disable_irq(&self, index: u32) -> Result<()> {
        ioctl::vfio_device_set_irqs(
            self.fd(),
            sys::VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            0,
            ioctl::IrqData::None { count: 0 },
        )
        .map_err(|e| {
            Error::sys(
                "VFIO_DEVICE_SET_IRQS(disable)",
                format!("{} IRQ index {index}", self.address),
                e,
            )
        })
    }

    /// The eventfd the kernel signals when it asks for the device back
    /// (`VFIO_PCI_REQ_IRQ_INDEX`, registered by [`bind`](Self::bind)), for
    /// an event loop: when it is readable, call
    /// [`unplug_requested`](Self::unplug_requested). `None` before the bind
    /// or if registering failed. VFIO keeps one request trigger per device:
    /// if the same device is opened and bound twice, only the later bind's
    /// eventfd is signalled.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:02:00.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let fd = dev.unplug_request_fd().expect("request channel");
    /// // add `fd` to an epoll set with EPOLLIN ...
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn unplug_request_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.request {
            RequestChannel::Armed(efd) => Some(efd.as_fd()),
            RequestChannel::NotBound | RequestChannel::Unavailable(_) => None,
        }
    }

    /// Whether the kernel has asked for the device back, without blocking.
    ///
    /// When a device bound to `vfio-pci` is being removed (hot-unplug, or
    /// an unbind from the driver), the kernel signals the device-request
    /// eventfd and then **waits until every fd of the device is closed**,
    /// repeating the request every 10 seconds. The first time this sees the
    /// request it revokes every export through the [`hub`](Self::hub) with
    /// [`RevokeReason::Unplug`] (attachments tear their IOVA ranges down, so
    /// peer DMA to them faults instead of reaching a vanishing BAR); from
    /// then on it keeps answering `true`, and
    /// [`export_bar`](Self::export_bar) refuses new exports.
    ///
    /// The owner must then **drop the device**, and every [`BarMapping`](super::BarMapping) of
    /// it (a BAR `mmap` holds the device file open too), so the kernel can
    /// finish the removal. Dma-buf fds of its exports may stay open; they
    /// are dead for good.
    ///
    /// Errors: [`Error::Device`] before [`bind`](Self::bind);
    /// [`Error::Unsupported`] if the request channel could not be set up at
    /// bind time (the message says why); [`Error::Sys`] if reading the
    /// eventfd fails.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:02:00.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// if dev.unplug_requested()? {
    ///     drop(dev); // let the kernel remove it
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn unplug_requested(&self) -> Result<bool> {
        if self.unplug_requested.load(Ordering::Acquire) {
            return Ok(true);
        }
        let efd = self.request_eventfd()?;
        let mut count = [0u8; 8];
        match nix::unistd::read(efd, &mut count) {
            Ok(8) if u64::from_ne_bytes(count) != 0 => {}
            Ok(_) | Err(Errno::EAGAIN | Errno::EINTR) => return Ok(false),
            Err(e) => {
                return Err(Error::sys(
                    "read",
                    format!("{} device-request eventfd", self.address),
                    e.into(),
                ));
            }
        }
        if !self.unplug_requested.swap(true, Ordering::AcqRel) {
            self.hub.revoke(RevokeReason::Unplug);
        }
        Ok(true)
    }

    /// Waits up to `timeout` for the kernel to ask for the device back; then
    /// as [`unplug_requested`](Self::unplug_requested) (which this calls).
    /// Returns `false` if the time passed without a request.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:02:00.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// if dev.wait_unplug_request(Duration::from_secs(30))? {
    ///     assert!(dev.hub().state() != dmabuf_p2p::revoke::BufferState::Live);
    ///     drop(dev);
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn wait_unplug_request(&self, timeout: Duration) -> Result<bool> {
        let deadline = deadline_after(timeout);
        loop {
            if self.unplug_requested()? {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let efd = self.request_eventfd()?;
            let mut pfd = [PollFd::new(efd.as_fd(), PollFlags::POLLIN)];
            // Round up, so a sub-millisecond rest does not spin.
            let ms =
                PollTimeout::try_from(left.as_micros().div_ceil(1000)).unwrap_or(PollTimeout::MAX);
            match poll(&mut pfd, ms) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    return Err(Error::sys(
                        "poll",
                        format!("{} device-request eventfd", self.address),
                        e.into(),
                    ));
                }
            }
        }
    }

    fn request_eventfd(&self) -> Result<&OwnedFd> {
        match &self.request {
            RequestChannel::Armed(efd) => Ok(efd),
            RequestChannel::NotBound => Err(self.device_error(
                "not bound to an iommufd yet; call bind() first (the device-request channel is set up by the bind)",
            )),
            RequestChannel::Unavailable(why) => Err(Error::Unsupported {
                target: self.address.to_string(),
                operation: "device request IRQ",
                problem: format!("no device-request channel: {why}"),
                source: None,
            }),
        }
    }
}
