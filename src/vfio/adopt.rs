//! Inside an existing VMM: a [`VfioPciDevice`] made from a VFIO cdev that the
//! VMM opened and bound itself, and the calls through which the VMM tells the
//! device what the guest (or the VMM) did to its command register.
//!
//! A VMM opens, binds and attaches its devices with its own code (rust-vmm
//! `vfio-ioctls`, its own ioctls), and VFIO refuses a second bind of a cdev,
//! so the library cannot open the device again. It adopts a duplicate of the
//! VMM's fd instead ([`VfioPciDevice::adopt`]): both fds name the same
//! device file, each side closes its own, and the VMM's binding and
//! attachment stay the VMM's.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::VfioPciDevice;
use super::config::COMMAND_MEMORY;
use super::device::{Bound, ClosingHub, VFIO_CDEV_DIR};
use super::irq::RequestChannel;
use super::known_command::KnownCommand;
use crate::error::{Error, Result};
use crate::importer::iommufd::Iommufd;
use crate::ioctl;
use crate::pci::PciAddress;
use crate::revoke::{BufferState, RevocationHub, RevokeReason};
use crate::sysfs::Sysfs;

/// How [`VfioPciDevice::adopt`] treats what the VMM set up.
///
/// ```
/// use dmabuf_p2p::vfio::AdoptOptions;
/// let opts = AdoptOptions::default();
/// assert!(!opts.takes_device_request_irq());
/// assert!(opts.take_device_request_irq(true).takes_device_request_irq());
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AdoptOptions {
    take_device_request_irq: bool,
}

impl AdoptOptions {
    /// Whether the library registers its own eventfd for VFIO's device
    /// request (`VFIO_PCI_REQ_IRQ_INDEX`, see
    /// [`VfioPciDevice::unplug_requested`]). VFIO keeps one trigger per
    /// device, so this **replaces** the VMM's, if it has one. Off by
    /// default: the VMM keeps its trigger and calls
    /// [`VfioPciDevice::note_unplug_request`] when it fires.
    #[must_use]
    pub const fn take_device_request_irq(mut self, take: bool) -> Self {
        self.take_device_request_irq = take;
        self
    }

    /// See [`take_device_request_irq`](Self::take_device_request_irq).
    pub const fn takes_device_request_irq(&self) -> bool {
        self.take_device_request_irq
    }
}

impl VfioPciDevice {
    /// Adopts a VFIO cdev that the caller (a VMM) has opened and bound to
    /// `iommufd` itself (`VFIO_DEVICE_BIND_IOMMUFD`, which returned `devid`).
    ///
    /// Give it a duplicate of the VMM's fd (`OwnedFd::try_clone`) and an
    /// [`Iommufd`] made from a duplicate of the VMM's iommufd fd
    /// (`Iommufd::from`): the library closes only its duplicates, the
    /// device stays open, bound and attached as the VMM left it, and VFIO
    /// revokes nothing when the adopted device is dropped (the VMM's fd
    /// still holds the device file). Dropping it does tear down this
    /// process's attachments of its exports, as for any device.
    ///
    /// The PCI address is found from the fd (its character device's sysfs
    /// node); `PCI_COMMAND` is read once, so [`known_command`](Self::known_command)
    /// is current from the start. If memory decode is off then, the hub
    /// starts revoked and exports are born revoked until the guest (or the
    /// VMM) turns decode on through [`guest_config_write`](Self::guest_config_write)
    /// or [`note_memory_decode`](Self::note_memory_decode).
    /// The device-request IRQ is left to the VMM unless `options` say
    /// otherwise ([`AdoptOptions::take_device_request_irq`]).
    ///
    /// Errors: [`Error::Device`] if `fd` is not a VFIO cdev of a PCI device,
    /// or is not bound to an iommufd yet (VFIO answers `EINVAL` before the
    /// bind); [`Error::Sys`] if sysfs cannot be read. `devid` and
    /// `iommufd` are taken as given: the kernel offers no way to check them.
    ///
    /// ```no_run
    /// use std::os::fd::OwnedFd;
    /// use dmabuf_p2p::vfio::{AdoptOptions, VfioPciDevice};
    /// use dmabuf_p2p::importer::iommufd::Iommufd;
    ///
    /// # fn vmm_fds() -> (OwnedFd, OwnedFd, u32) { unimplemented!() }
    /// let (vmm_iommufd, vmm_device, devid) = vmm_fds(); // opened and bound by the VMM
    /// let iommufd = Iommufd::from(vmm_iommufd.try_clone()?);
    /// let dev = VfioPciDevice::adopt(vmm_device.try_clone()?, devid, &iommufd, AdoptOptions::default())?;
    /// println!("adopted {} (devid {devid})", dev.address());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn adopt(
        fd: OwnedFd,
        devid: u32,
        iommufd: &Iommufd,
        options: AdoptOptions,
    ) -> Result<Self> {
        Self::adopt_in(&Sysfs::default(), fd, devid, iommufd, options)
    }

    /// [`VfioPciDevice::adopt`] with another sysfs tree.
    ///
    /// ```no_run
    /// # use std::os::fd::OwnedFd;
    /// # use dmabuf_p2p::{vfio::{AdoptOptions, VfioPciDevice}, importer::iommufd::Iommufd, sysfs::Sysfs};
    /// # fn vmm_fds() -> (OwnedFd, OwnedFd, u32) { unimplemented!() }
    /// # let (vmm_iommufd, vmm_device, devid) = vmm_fds();
    /// let iommufd = Iommufd::from(vmm_iommufd.try_clone()?);
    /// let dev = VfioPciDevice::adopt_in(&Sysfs::new("/sys"), vmm_device.try_clone()?, devid, &iommufd, AdoptOptions::default())?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn adopt_in(
        sysfs: &Sysfs,
        fd: OwnedFd,
        devid: u32,
        iommufd: &Iommufd,
        options: AdoptOptions,
    ) -> Result<Self> {
        let file = File::from(fd);
        let (address, cdev_name) = cdev_address(sysfs, &file)?;
        let device = address.to_string();
        let info = ioctl::vfio_device_get_info(file.as_fd()).map_err(|e| {
            if e.raw_os_error() == Some(libc::EINVAL) {
                Error::Device {
                    device: device.clone(),
                    problem: format!(
                        "its VFIO cdev is not bound to an iommufd (VFIO_DEVICE_GET_INFO: {e}); \
                         bind it (VFIO_DEVICE_BIND_IOMMUFD) before adopting it"
                    ),
                    source: Some(e),
                }
            } else {
                Error::sys("VFIO_DEVICE_GET_INFO", device.clone(), e)
            }
        })?;
        if info.flags & crate::sys::VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(Error::Device {
                device,
                problem: "its VFIO device is not a PCI device (VFIO_DEVICE_FLAGS_PCI clear)"
                    .to_owned(),
                source: None,
            });
        }
        let mut dev = Self {
            file,
            address,
            sysfs: sysfs.clone(),
            cdev: Path::new(VFIO_CDEV_DIR).join(cdev_name),
            bound: Some(Bound {
                iommufd: iommufd.clone(),
                devid,
            }),
            attached: None,
            config: OnceLock::new(),
            bars: Default::default(),
            resources: None,
            hub: ClosingHub(RevocationHub::new(device)),
            request: RequestChannel::NotBound,
            unplug_requested: AtomicBool::new(false),
            known: KnownCommand::unknown(),
            adopted: true,
        };
        dev.request = if options.take_device_request_irq {
            match dev.arm_request_channel() {
                Ok(efd) => RequestChannel::Armed(efd),
                Err(e) => RequestChannel::Unavailable(e.to_string()),
            }
        } else {
            RequestChannel::Unavailable(
                "the device-request IRQ is left to the VMM that adopted the device out \
                 (AdoptOptions::take_device_request_irq is off); it calls note_unplug_request()"
                    .to_owned(),
            )
        };
        {
            let held = dev.lock_command();
            dev.read_command_held(&held)?;
        }
        Ok(dev)
    }

    /// Whether the device was adopted ([`adopt`](Self::adopt)) rather than
    /// opened by the library.
    ///
    /// ```no_run
    /// let dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// assert!(!dev.is_adopted());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn is_adopted(&self) -> bool {
        self.adopted
    }

    /// The VMM trapped a guest write of `data` to config space at `offset`:
    /// performs it and keeps the device's exports in step, exactly as the
    /// library's own writes ([`config_write`](Self::config_write)) do. A
    /// write that turns `PCI_COMMAND` memory decode off revokes every
    /// attachment of the device's exports (DMA to their IOVAs faults from
    /// then on); one that turns it on maps every attachment with
    /// [`RestorePolicy::Automatic`](crate::revoke::RestorePolicy::Automatic)
    /// again at the same IOVA (its guest-physical address) before this
    /// returns. If decode was found off while the hub still said live (the
    /// VMM changed it some other way without telling), that revocation is
    /// recorded first, so the restore really restores.
    ///
    /// Writes to other registers are passed through; a VMM may send every
    /// trapped config write here, or only those that overlap `PCI_COMMAND`
    /// (offsets 4 and 5). Attachment callbacks run inside, on this thread;
    /// see [`config_write`](Self::config_write) for what they must not do.
    ///
    /// ```no_run
    /// # let dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// // The guest wrote 0x0006 (memory decode and bus master on) to PCI_COMMAND.
    /// dev.guest_config_write(4, &0x0006u16.to_le_bytes())?;
    /// assert_eq!(dev.known_memory_decode(), Some(true));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn guest_config_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.config_write(offset, data)
    }

    /// The VMM changed `PCI_COMMAND` from `old` to `new` by other means than
    /// this device (its own `pwrite` on its fd): the hub follows as if the
    /// write had gone through [`guest_config_write`](Self::guest_config_write).
    /// Decode off revokes; off to on restores (recording the missed
    /// revocation first if the hub still said live); on to on restores a
    /// hub that was revoked. Call it after the write, and not from an
    /// attachment callback.
    ///
    /// ```no_run
    /// # let dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// dev.note_command_change(0x0006, 0x0004); // the VMM turned decode off itself
    /// assert_eq!(dev.known_memory_decode(), Some(false));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn note_command_change(&self, old: u16, new: u16) {
        let _held = self.lock_command();
        self.known.set(new);
        let (was_on, on) = (old & COMMAND_MEMORY != 0, new & COMMAND_MEMORY != 0);
        if !on {
            self.hub.revoked_by_kernel(RevokeReason::MemoryDecodeOff);
            return;
        }
        if !was_on && self.hub.state() == BufferState::Live {
            // The off half of the cycle went unseen: the kernel revoked then,
            // and the areas it left are dead.
            self.hub.revoked_by_kernel(RevokeReason::MemoryDecodeOff);
        }
        self.restore_if_revoked();
    }

    /// The VMM turned memory decode on or off by other means than this
    /// device; like [`note_command_change`](Self::note_command_change) when
    /// only the bit is at hand. Only a real transition costs anything: off
    /// revokes every attachment; on, when the library knew decode was off
    /// (or knew nothing), maps every attachment with
    /// [`RestorePolicy::Automatic`](crate::revoke::RestorePolicy::Automatic)
    /// again at the same IOVA. A call that repeats what the library knows
    /// (on while known on and live) does nothing, so a VMM may call it for
    /// every write it makes to `PCI_COMMAND`.
    ///
    /// An off-and-on cycle the VMM made with only the *on* told leaves the
    /// attachments' areas dead while the library knows decode was on:
    /// report such a cycle with `note_command_change(old, new)` where `old`
    /// has decode off.
    ///
    /// ```no_run
    /// # let dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// dev.note_memory_decode(false);
    /// dev.note_memory_decode(true);
    /// dev.note_memory_decode(true); // no transition: nothing is remapped
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn note_memory_decode(&self, enabled: bool) {
        let _held = self.lock_command();
        let was = self.known.memory_decode();
        self.known.set_memory_decode(enabled);
        let live = self.hub.state() == BufferState::Live;
        if !enabled {
            if was != Some(false) || live {
                self.hub.revoked_by_kernel(RevokeReason::MemoryDecodeOff);
            }
            return;
        }
        if was != Some(true) && live {
            // Off (or unknown) to on while the hub says live: the off went
            // unseen, the kernel revoked then, and the areas are dead.
            self.hub.revoked_by_kernel(RevokeReason::External);
        }
        self.restore_if_revoked();
    }

    /// The VMM reset the device by other means (`VFIO_DEVICE_RESET` on its
    /// own fd): every attachment's area is dead (VFIO revokes across a
    /// reset), so the hub revokes; `PCI_COMMAND` is read again and, if
    /// memory decode is on, the attachments are restored, as after
    /// [`reset`](Self::reset). A failed read leaves them revoked.
    ///
    /// ```no_run
    /// # let dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// dev.note_reset()?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn note_reset(&self) -> Result<()> {
        let held = self.lock_command();
        self.hub.revoked_by_kernel(RevokeReason::Reset);
        let command = self.read_command_held(&held);
        if command.is_err() {
            self.known.forget();
        }
        if command? & COMMAND_MEMORY != 0 {
            self.restore_if_revoked();
        }
        Ok(())
    }

    /// The VMM's own device-request eventfd fired (the kernel wants the
    /// device back): as [`unplug_requested`](Self::unplug_requested) does on
    /// its own channel, revokes every export for good
    /// ([`RevokeReason::Unplug`]) and refuses new exports. The VMM then
    /// drops this device with its own fd.
    ///
    /// ```no_run
    /// # let dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// dev.note_unplug_request();
    /// assert!(dev.unplug_requested()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn note_unplug_request(&self) {
        if !self.unplug_requested.swap(true, Ordering::AcqRel) {
            self.hub.revoke(RevokeReason::Unplug);
        }
    }
}

/// The PCI address and cdev name (`vfioN`) of the VFIO cdev open as `file`:
/// its character device's sysfs node `/sys/dev/char/<major>:<minor>` is
/// `<pci device>/vfio-dev/vfioN`.
fn cdev_address(sysfs: &Sysfs, file: &File) -> Result<(PciAddress, String)> {
    let not_vfio = |problem: String| Error::Device {
        device: format!("fd {}", std::os::fd::AsRawFd::as_raw_fd(file)),
        problem,
        source: None,
    };
    let meta = file
        .metadata()
        .map_err(|e| Error::sys("fstat", "VFIO cdev to adopt", e))?;
    if !meta.file_type().is_char_device() {
        return Err(not_vfio(
            "is not a character device, so not a VFIO cdev".to_owned(),
        ));
    }
    let rdev = meta.rdev();
    let node = sysfs.root().join(format!(
        "dev/char/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    let real = std::fs::canonicalize(&node)
        .map_err(|e| Error::sys("readlink", node.display().to_string(), e))?;
    let name = real.file_name().map(|n| n.to_string_lossy().into_owned());
    let class = real.parent().and_then(Path::file_name);
    let pci = real
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned());
    match (name, class, pci) {
        (Some(name), Some(class), Some(pci)) if class == "vfio-dev" => {
            let address = pci.parse().map_err(|_| {
                not_vfio(format!(
                    "is VFIO cdev {name} of {pci}, which is not a PCI device"
                ))
            })?;
            Ok((address, name))
        }
        _ => Err(not_vfio(format!(
            "is character device {} ({}), not a VFIO cdev",
            node.display(),
            real.display()
        ))),
    }
}
