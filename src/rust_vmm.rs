//! Adopting a VMM's rust-vmm objects (feature `rust-vmm`): the iommufd, IOAS
//! and VFIO cdev devices a VMM made with `iommufd-ioctls` and `vfio-ioctls`
//! (what cloud-hypervisor uses), handed over by reference, with no `unsafe`
//! on the caller's side. The library takes duplicates of their fds (the
//! only `unsafe` is in its ioctl layer: rust-vmm's types give raw fds), so
//! each side closes its own, as with [`VfioPciDevice::adopt`].
//!
//! ```no_run
//! use std::fs::OpenOptions;
//! use std::path::Path;
//! use std::sync::Arc;
//! use dmabuf_p2p::sysfs::Sysfs;
//! use dmabuf_p2p::vfio::AdoptOptions;
//! use dmabuf_p2p::{Ioas, Iommufd, VfioPciDevice};
//! use iommufd_ioctls::{IommuFd, IommufdIoas};
//! use vfio_ioctls::{VfioDevice, VfioIommufd};
//!
//! // The VMM's own objects.
//! let vmm_iommufd = Arc::new(IommuFd::new()?);
//! let vmm_ioas = Arc::new(IommufdIoas::new(Arc::clone(&vmm_iommufd))?);
//! let vfio = Arc::new(VfioIommufd::new(Arc::clone(&vmm_iommufd), Some(Arc::clone(&vmm_ioas)), None)?);
//! // The cdev found through `Sysfs` rather than `VfioDevice::new`, which lists
//! // sysfs with `read_dir` (docs/KERNEL.md: a kernel lock cycle).
//! let cdev = Sysfs::default().vfio_dev("0000:02:00.0".parse()?)?.ok_or("no VFIO cdev")?;
//! let cdev = OpenOptions::new().read(true).write(true).open(Path::new("/dev/vfio/devices").join(cdev))?;
//! let vmm_dev = VfioDevice::new_from_fd(cdev, vfio, true)?;
//!
//! // The library's handles of them.
//! let iommufd = Iommufd::adopt_rust_vmm(&vmm_iommufd)?;
//! let ioas = Ioas::adopt_rust_vmm(&iommufd, &vmm_ioas)?;
//! let dev = VfioPciDevice::adopt_rust_vmm(&vmm_dev, &iommufd, AdoptOptions::default())?;
//! println!("{} in IOAS {}", dev.address(), ioas.id());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use iommufd_ioctls::{IommuFd, IommufdIoas};
use vfio_ioctls::VfioDevice;

use crate::error::{Error, Result};
use crate::importer::iommufd::{Ioas, Iommufd};
use crate::ioctl;
use crate::vfio::{AdoptOptions, VfioPciDevice};

impl Iommufd {
    /// The library's handle of a VMM's `iommufd_ioctls::IommuFd`: a
    /// duplicate of its fd (the same iommufd context).
    pub fn adopt_rust_vmm(iommufd: &IommuFd) -> Result<Self> {
        let fd = ioctl::dup_iommufd(iommufd)
            .map_err(|e| Error::sys("fcntl(F_DUPFD_CLOEXEC)", "the VMM's iommufd", e))?;
        Ok(Self::from_fd(fd))
    }
}

impl Ioas {
    /// The library's handle of a VMM's `iommufd_ioctls::IommufdIoas` in
    /// `iommufd` (made with [`Iommufd::adopt_rust_vmm`] from the same
    /// `IommuFd`): [`Ioas::adopt`] of its id, never destroyed by the
    /// library.
    pub fn adopt_rust_vmm(iommufd: &Iommufd, ioas: &IommufdIoas) -> Result<Self> {
        Self::adopt(iommufd, ioas.id())
    }
}

impl VfioPciDevice {
    /// The library's handle of a VMM's `vfio_ioctls::VfioDevice`, opened
    /// through its VFIO cdev and bound to the iommufd `iommufd` adopted
    /// ([`VfioPciDevice::adopt`] of a duplicate of its fd, with the devid
    /// the VMM's bind returned). A device opened through a VFIO group (no
    /// iommufd devid) is [`Error::Device`].
    pub fn adopt_rust_vmm(
        device: &VfioDevice,
        iommufd: &Iommufd,
        options: AdoptOptions,
    ) -> Result<Self> {
        let Some(devid) = device.iommufd_dev_id() else {
            return Err(Error::Device {
                device: "the VMM's VfioDevice".to_owned(),
                problem: "has no iommufd device id: it was opened through a VFIO group, not its \
                          cdev bound to an iommufd (vfio-ioctls' VfioIommufd)"
                    .to_owned(),
                source: None,
            });
        };
        let fd = ioctl::dup_vfio_device(device)
            .map_err(|e| Error::sys("fcntl(F_DUPFD_CLOEXEC)", "the VMM's VFIO device", e))?;
        Self::adopt(fd, devid, iommufd, options)
    }
}
