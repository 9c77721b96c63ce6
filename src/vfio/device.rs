//! [`VfioPciDevice`]: opening the VFIO cdev, binding it to an iommufd,
//! attaching it to an IO address space, and closing it.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use super::driver::{VFIO_PCI_DRIVER, ensure_present};
use super::info::{Bar, RegionInfo};
use super::irq::RequestChannel;
use super::known_command::KnownCommand;
use crate::error::{Error, Result};
use crate::importer::iommufd::{Ioas, Iommufd};
use crate::ioctl;
use crate::pci::{BAR_COUNT, PciAddress, Resource, parse_resources};
use crate::revoke::{RevocationHub, RevokeReason};
use crate::sysfs::Sysfs;

/// Where VFIO cdevs live: `/dev/vfio/devices`.
///
/// ```
/// assert_eq!(dmabuf_p2p::vfio::VFIO_CDEV_DIR, "/dev/vfio/devices");
/// ```
pub const VFIO_CDEV_DIR: &str = "/dev/vfio/devices";

/// A PCI device opened through its VFIO cdev.
///
/// Open it with [`VfioPciDevice::open`], then [`VfioPciDevice::bind`] it to
/// an [`Iommufd`]; every other operation needs the binding. Dropping it closes
/// the cdev, which detaches and unbinds the device and permanently revokes
/// its dma-bufs.
///
/// The device holds a clone of its iommufd and of the [`Ioas`] it is attached
/// to, and closes its own fd before dropping them, so the kernel detaches
/// before the IOAS is destroyed, whatever the caller's drop order.
///
/// **Close order.** Dropping the device closes its fd first, so the kernel
/// revokes its dma-bufs (unless a [`BarMapping`](super::BarMapping) still
/// holds the device file open), and only then closes the [hub](Self::hub):
/// attachments unmap and importers, in this process or another, hear that
/// the device is gone after the kernel has already cut the buffers off.
///
/// **Hot-unplug.** The bind also registers an eventfd for VFIO's device
/// request (`VFIO_PCI_REQ_IRQ_INDEX`): the kernel signals it when it wants
/// the device back and waits for the device to be closed.
/// [`unplug_requested`](VfioPciDevice::unplug_requested) (non-blocking),
/// [`wait_unplug_request`](VfioPciDevice::wait_unplug_request) or
/// [`unplug_request_fd`](VfioPciDevice::unplug_request_fd) (for an event
/// loop) notice it, revoke every export with
/// [`RevokeReason::Unplug`], and the
/// owner then drops the device.
///
/// ```no_run
/// use dmabuf_p2p::vfio::VfioPciDevice;
/// use dmabuf_p2p::importer::iommufd::Iommufd;
///
/// let iommufd = Iommufd::open()?;
/// let ioas = iommufd.alloc_ioas()?;
/// let mut dev = VfioPciDevice::open("0000:00:03.0".parse()?)?;
/// let devid = dev.bind(&iommufd)?;
/// let hwpt = dev.attach(&ioas)?;
/// println!("device {devid} in IOAS {} (HWPT {hwpt})", ioas.id());
/// dev.detach()?;
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug)]
pub struct VfioPciDevice {
    // Fields drop in declaration order: the fd is closed first (the kernel
    // revokes), then the hub is told, then the iommufd and IOAS clones go.
    pub(super) file: File,
    /// Every attachment of this device's exports; told when the device
    /// revokes, and closed when the device is dropped.
    pub(super) hub: ClosingHub,
    pub(super) address: PciAddress,
    pub(super) sysfs: Sysfs,
    pub(super) cdev: PathBuf,
    pub(super) bound: Option<Bound>,
    pub(super) attached: Option<Attached>,
    pub(super) config: OnceLock<RegionInfo>,
    /// BARs 0..=5 as first read by [`VfioPciDevice::bar`]: they cannot move or
    /// change size while vfio-pci holds the device (a resize or reassignment
    /// needs it unbound), so every export after the first reads no sysfs.
    pub(super) bars: [OnceLock<Bar>; BAR_COUNT as usize],
    /// The device's sysfs `resource` lines, read by `open` with its other
    /// sysfs reads, so that the first export of a BAR reads no sysfs
    /// either (only `VFIO_DEVICE_GET_REGION_INFO`); `None` if that read
    /// failed, or for an adopted device: [`VfioPciDevice::bar`] then reads
    /// sysfs itself.
    pub(super) resources: Option<Vec<Resource>>,
    /// The eventfd registered for `VFIO_PCI_REQ_IRQ_INDEX` at bind time (the
    /// kernel's "give the device back" request), or why there is none.
    pub(super) request: RequestChannel,
    /// Set once the kernel has asked for the device back.
    pub(super) unplug_requested: AtomicBool,
    /// `PCI_COMMAND` as last read, written or told of.
    pub(super) known: KnownCommand,
    /// Made by [`VfioPciDevice::adopt`] from a VMM's fd.
    pub(super) adopted: bool,
}

/// The device's revocation hub, closed ([`RevokeReason::DeviceClosed`]) when
/// dropped: a field after the device fd, so the kernel has closed the device
/// by then.
#[derive(Debug)]
pub(super) struct ClosingHub(pub(super) Arc<RevocationHub>);

impl std::ops::Deref for ClosingHub {
    type Target = Arc<RevocationHub>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for ClosingHub {
    fn drop(&mut self) {
        // A permanent reason: attachments unmap their (now dead) areas at
        // once, whatever state the hub was in.
        self.0.close(RevokeReason::DeviceClosed);
    }
}

#[derive(Debug)]
pub(crate) struct Bound {
    pub(super) iommufd: Iommufd,
    pub(super) devid: u32,
}

#[derive(Debug)]
pub(super) struct Attached {
    pt_id: u32,
    hwpt_id: u32,
    ioas: Option<Ioas>,
}

impl VfioPciDevice {
    /// Opens the VFIO cdev of the device at `address`: sysfs
    /// `/sys/bus/pci/devices/<address>/vfio-dev/vfioN` names
    /// `/dev/vfio/devices/vfioN`.
    ///
    /// Errors: [`Error::Device`] if the device does not exist, has no VFIO
    /// cdev although bound to `vfio-pci` (a kernel without
    /// `CONFIG_VFIO_DEVICE_CDEV`), or the cdev node is missing;
    /// [`Error::WrongDriver`] naming the driver if it is not bound to a VFIO
    /// driver ([`bind_to_vfio_pci`](super::bind_to_vfio_pci) fixes that); [`Error::Sys`] if `open`
    /// fails (e.g. `EBUSY`, `EACCES`).
    ///
    /// ```no_run
    /// use dmabuf_p2p::{vfio::VfioPciDevice, Error};
    /// match VfioPciDevice::open("0000:00:03.0".parse()?) {
    ///     Ok(dev) => println!("opened {}", dev.cdev_path().display()),
    ///     Err(Error::WrongDriver { driver, .. }) => println!("bound to {driver:?}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn open(address: PciAddress) -> Result<Self> {
        Self::open_in(&Sysfs::default(), VFIO_CDEV_DIR, address)
    }

    /// [`VfioPciDevice::open`] with another sysfs tree and cdev directory.
    ///
    /// ```no_run
    /// use dmabuf_p2p::{vfio::VfioPciDevice, sysfs::Sysfs};
    /// let dev = VfioPciDevice::open_in(&Sysfs::default(), "/dev/vfio/devices", "0000:00:03.0".parse()?)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn open_in(sysfs: &Sysfs, cdev_dir: impl AsRef<Path>, address: PciAddress) -> Result<Self> {
        ensure_present(sysfs, address)?;
        let device = address.to_string();
        let Some(name) = sysfs.vfio_dev(address)? else {
            return Err(match sysfs.driver(address)? {
                Some(d) if d == VFIO_PCI_DRIVER => Error::Device {
                    device,
                    problem:
                        "bound to vfio-pci but has no VFIO cdev (vfio-dev/vfioN): the kernel needs \
                              CONFIG_VFIO_DEVICE_CDEV and CONFIG_IOMMUFD"
                            .to_owned(),
                    source: None,
                },
                driver => Error::WrongDriver {
                    device,
                    driver,
                    expected: VFIO_PCI_DRIVER.to_owned(),
                },
            });
        };
        let cdev = cdev_dir.as_ref().join(&name);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cdev)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Error::Device {
                        device: device.clone(),
                        problem: format!("no VFIO cdev node {}", cdev.display()),
                        source: Some(e),
                    }
                } else {
                    Error::sys("open", format!("{device} {}", cdev.display()), e)
                }
            })?;
        // One read of the whole file, no stat (the device was found above).
        let resources = fs::read_to_string(sysfs.device_dir(address).join("resource"))
            .ok()
            .and_then(|text| parse_resources(&text).ok());
        Ok(Self {
            file,
            address,
            sysfs: sysfs.clone(),
            cdev,
            bound: None,
            attached: None,
            config: OnceLock::new(),
            bars: Default::default(),
            resources,
            hub: ClosingHub(RevocationHub::new(address.to_string())),
            request: RequestChannel::NotBound,
            unplug_requested: AtomicBool::new(false),
            known: KnownCommand::unknown(),
            adopted: false,
        })
    }

    /// The revocation hub of this device's exports: every
    /// [`Attachment`](crate::revoke::Attachment) made from them is registered
    /// here. Memory decode off ([`set_memory_decode`](Self::set_memory_decode),
    /// or a [`config_write`](Self::config_write) of `PCI_COMMAND`), a
    /// [`reset`](Self::reset) and closing the device revoke through it.
    #[inline]
    pub fn hub(&self) -> &Arc<RevocationHub> {
        &self.hub.0
    }

    /// The PCI address.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// assert_eq!(dev.address().to_string(), "0000:00:03.0");
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    #[inline]
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The cdev path, e.g. `/dev/vfio/devices/vfio0`.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// println!("{}", dev.cdev_path().display());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn cdev_path(&self) -> &Path {
        &self.cdev
    }

    /// Binds the device to `iommufd` (`VFIO_DEVICE_BIND_IOMMUFD`) and returns
    /// its iommufd device ID. Needed once, before anything else; a second
    /// bind is [`Error::Device`]. The device keeps a clone of `iommufd`.
    ///
    /// The bind also registers an eventfd for the kernel's device request
    /// (`VFIO_PCI_REQ_IRQ_INDEX`, see
    /// [`unplug_requested`](Self::unplug_requested)): one more fd, closed
    /// with the device. If that fails the bind still succeeds, and
    /// `unplug_requested` says why there is no channel.
    ///
    /// ```no_run
    /// # use dmabuf_p2p::{vfio::VfioPciDevice, importer::iommufd::Iommufd};
    /// let mut dev = VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// let devid = dev.bind(&Iommufd::open()?)?;
    /// assert_eq!(dev.devid(), Some(devid));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn bind(&mut self, iommufd: &Iommufd) -> Result<u32> {
        if self.bound.is_some() {
            return Err(self.device_error("already bound to an iommufd"));
        }
        let devid = ioctl::vfio_device_bind_iommufd(self.fd(), iommufd.as_fd()).map_err(|e| {
            Error::sys(
                "VFIO_DEVICE_BIND_IOMMUFD",
                format!("{} to {}", self.address, iommufd.name()),
                e,
            )
        })?;
        self.bound = Some(Bound {
            iommufd: iommufd.clone(),
            devid,
        });
        // The kernel refuses SET_IRQS before the bind, so the request channel
        // is set up here. A device without one still works; it just cannot
        // hear unplug requests (`unplug_requested` then says why).
        self.request = match self.arm_request_channel() {
            Ok(efd) => RequestChannel::Armed(efd),
            Err(e) => RequestChannel::Unavailable(e.to_string()),
        };
        Ok(devid)
    }

    /// Whether [`VfioPciDevice::bind`] succeeded.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// assert!(dev.is_bound());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    #[inline]
    pub fn is_bound(&self) -> bool {
        self.bound.is_some()
    }

    /// The iommufd device ID from the bind.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// println!("iommufd device ID {:?}", dev.devid());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn devid(&self) -> Option<u32> {
        self.bound.as_ref().map(|b| b.devid)
    }

    /// The iommufd the device is bound to.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// assert!(dev.iommufd().is_some_and(|i| i.same_context(&iommufd)));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn iommufd(&self) -> Option<&Iommufd> {
        self.bound.as_ref().map(|b| &b.iommufd)
    }

    /// Attaches the device to `ioas` (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`), so its
    /// DMA is translated by that IOAS; returns the HWPT ID the kernel
    /// created. Attaching again replaces the previous attachment. The IOAS
    /// must belong to the iommufd the device is bound to ([`Error::Device`]
    /// otherwise). The device keeps a clone of `ioas` until detached.
    ///
    /// ```no_run
    /// # use dmabuf_p2p::{vfio::VfioPciDevice, importer::iommufd::Iommufd};
    /// let iommufd = Iommufd::open()?;
    /// let mut dev = VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// dev.bind(&iommufd)?;
    /// let ioas = iommufd.alloc_ioas()?;
    /// dev.attach(&ioas)?;
    /// assert!(dev.attached_ioas().is_some_and(|a| a.same_ioas(&ioas)));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn attach(&mut self, ioas: &Ioas) -> Result<u32> {
        let bound = self.bound()?;
        if !bound.iommufd.same_context(ioas.iommufd()) {
            return Err(self.device_error(&format!(
                "IOAS {} belongs to another iommufd than the one the device is bound to",
                ioas.id()
            )));
        }
        let hwpt_id = self.attach_raw(ioas.id())?;
        self.attached = Some(Attached {
            pt_id: ioas.id(),
            hwpt_id,
            ioas: Some(ioas.clone()),
        });
        Ok(hwpt_id)
    }

    /// Attaches to an IOAS or HWPT given by raw ID (for objects this crate
    /// did not allocate); returns the HWPT ID. An ID that does not exist in
    /// the bound iommufd is [`Error::UnknownObject`].
    ///
    /// ```no_run
    /// # use dmabuf_p2p::{vfio::VfioPciDevice, importer::iommufd::Iommufd, Error};
    /// # let mut dev = VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&Iommufd::open()?)?;
    /// assert!(matches!(dev.attach_pt(u32::MAX), Err(Error::UnknownObject { id: u32::MAX, .. })));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn attach_pt(&mut self, pt_id: u32) -> Result<u32> {
        self.bound()?;
        let hwpt_id = self.attach_raw(pt_id)?;
        self.attached = Some(Attached {
            pt_id,
            hwpt_id,
            ioas: None,
        });
        Ok(hwpt_id)
    }

    fn attach_raw(&self, pt_id: u32) -> Result<u32> {
        const OP: &str = "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
        ioctl::vfio_device_attach_iommufd_pt(self.fd(), pt_id).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                Error::UnknownObject {
                    op: OP,
                    target: self.address.to_string(),
                    id: pt_id,
                    source: e,
                }
            } else {
                Error::sys(OP, format!("{} to {pt_id}", self.address), e)
            }
        })
    }

    /// Detaches the device from its IOAS or HWPT
    /// (`VFIO_DEVICE_DETACH_IOMMUFD_PT`) and drops the device's clone of the
    /// IOAS. Does nothing if it is not attached.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// let ioas = iommufd.alloc_ioas()?;
    /// dev.attach(&ioas)?;
    /// dev.detach()?;
    /// assert!(dev.attached_ioas().is_none());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn detach(&mut self) -> Result<()> {
        self.bound()?;
        if self.attached.is_none() {
            return Ok(());
        }
        ioctl::vfio_device_detach_iommufd_pt(self.fd()).map_err(|e| {
            Error::sys("VFIO_DEVICE_DETACH_IOMMUFD_PT", self.address.to_string(), e)
        })?;
        self.attached = None;
        Ok(())
    }

    /// The IOAS the device is attached to (through [`VfioPciDevice::attach`]).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// let ioas = iommufd.alloc_ioas()?;
    /// dev.attach(&ioas)?;
    /// assert_eq!(dev.attached_ioas().map(|a| a.id()), Some(ioas.id()));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn attached_ioas(&self) -> Option<&Ioas> {
        self.attached.as_ref().and_then(|a| a.ioas.as_ref())
    }

    /// The IOAS/HWPT ID given to the attach and the HWPT ID the kernel
    /// reported, if attached.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// let ioas = iommufd.alloc_ioas()?;
    /// let hwpt = dev.attach(&ioas)?;
    /// assert_eq!(dev.attached_pt(), Some((ioas.id(), hwpt)));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn attached_pt(&self) -> Option<(u32, u32)> {
        self.attached.as_ref().map(|a| (a.pt_id, a.hwpt_id))
    }

    #[inline]
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub(crate) fn bound(&self) -> Result<&Bound> {
        self.bound
            .as_ref()
            .ok_or_else(|| self.device_error("not bound to an iommufd yet; call bind() first"))
    }

    pub(crate) fn device_error(&self, problem: &str) -> Error {
        Error::Device {
            device: self.address.to_string(),
            problem: problem.to_owned(),
            source: None,
        }
    }
}

impl Drop for VfioPciDevice {
    fn drop(&mut self) {
        // An adopted device's file stays open in the VMM: take back the
        // device-request trigger this library registered, if it did, while
        // this fd is still open. The fields then close the fd and, after it,
        // the hub (see `ClosingHub`).
        if self.adopted && matches!(self.request, RequestChannel::Armed(_)) {
            let _ = self.disable_irq(crate::sys::VFIO_PCI_REQ_IRQ_INDEX);
        }
    }
}

impl AsFd for VfioPciDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for VfioPciDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
