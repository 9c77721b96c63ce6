//! A PCI device bound to `vfio-pci`, opened through its VFIO cdev
//! (`/dev/vfio/devices/vfioN`) and bound to an iommufd: one file per job.
//!
//! * `driver`: binding the device to `vfio-pci` through sysfs;
//! * `device`: [`VfioPciDevice`] itself: open, iommufd bind and IOAS attach, close;
//! * `adopt`: a device a VMM opened and bound itself ([`VfioPciDevice::adopt`]),
//!   and the calls through which the VMM reports its guest's `PCI_COMMAND`
//!   writes;
//! * `known_command`: the last known `PCI_COMMAND`, readable without a config read;
//! * `info`: what VFIO reports about the device, its regions and BARs;
//! * `config`: config space and the `PCI_COMMAND` register (memory decode);
//! * `irq`: interrupt eventfds and the kernel's unplug request;
//! * `reset`: `VFIO_DEVICE_RESET`;
//! * `mmio`: a BAR mapped into this process ([`BarMapping`], a
//!   [`Mapping`](crate::Mapping) of the device fd).
//!
//! Exporting BAR ranges as dma-bufs is the exporter's job:
//! [`crate::exporter::bar`].
//!
//! The flow (uAPI reference E):
//!
//! 1. [`bind_to_vfio_pci`], if the device is not bound to `vfio-pci` yet;
//! 2. [`VfioPciDevice::open`] by PCI address: sysfs
//!    `/sys/bus/pci/devices/<addr>/vfio-dev/vfioN` names the cdev;
//! 3. [`VfioPciDevice::bind`] to an [`Iommufd`](crate::Iommufd). The kernel
//!    refuses every other device ioctl before this (`EINVAL`); this type
//!    refuses them without asking ([`Error::Device`](crate::Error::Device),
//!    "not bound");
//! 4. optionally [`VfioPciDevice::attach`] to an [`Ioas`](crate::Ioas), so the
//!    device's own DMA goes through that address space;
//! 5. [`VfioPciDevice::set_memory_decode`]`(true)`, then
//!    [`VfioPciDevice::export_bar`].
//!
//! **Memory decode and revocation.** VFIO revokes every dma-buf of a device
//! while its memory decode (`PCI_COMMAND` bit 1) is off, while it is in D3,
//! and during a reset; an export made while decode is off is *born revoked*,
//! and importing it gives [`Error::Revoked`](crate::Error::Revoked). Turn
//! decode on before exporting. Closing the device (dropping the
//! [`VfioPciDevice`]) revokes its dma-bufs for good. An iommufd mapping of a
//! revoked dma-buf stays dead even after the exporter restores the buffer,
//! until it is unmapped and mapped again
//! ([`IoasMapping::remap`](crate::importer::iommufd::IoasMapping::remap)).
//!
//! ```no_run
//! use dmabuf_p2p::{ByteRange, Iommufd, VfioPciDevice};
//!
//! let iommufd = Iommufd::open()?;
//! let mut dev = VfioPciDevice::open("0000:00:03.0".parse()?)?;
//! dev.bind(&iommufd)?;
//! println!("{:04x}:{:04x}", dev.config_read_u16(0)?, dev.config_read_u16(2)?);
//! dev.set_memory_decode(true)?;
//! let export = dev.export_bar(2, &[ByteRange::new(0, 0x1000), ByteRange::new(0x4000, 0x2000)])?;
//! assert_eq!(export.size(), 0x3000);
//! for p in export.phys_ranges() {
//!     println!("{p}");
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod adopt;
mod config;
mod device;
mod driver;
mod info;
mod irq;
mod known_command;
mod mmio;
mod reset;

pub use adopt::AdoptOptions;
pub use device::{VFIO_CDEV_DIR, VfioPciDevice};
pub use driver::{VFIO_PCI_DRIVER, bind_to_vfio_pci, bind_to_vfio_pci_in};
pub use info::{Bar, CONFIG_REGION_INDEX, DeviceInfo, ROM_REGION_INDEX, RegionInfo};
pub use irq::{ERR_IRQ_INDEX, INTX_IRQ_INDEX, MSI_IRQ_INDEX, MSIX_IRQ_INDEX, REQ_IRQ_INDEX};
pub use mmio::BarMapping;

pub(crate) use info::check_bar_index;
