//! Binding a PCI device to `vfio-pci` through sysfs.

use std::fs;
use std::path::Path;

use crate::error::{Error, Result};
use crate::pci::PciAddress;
use crate::sysfs::Sysfs;

/// The driver a device must be bound to: `vfio-pci`.
///
/// ```
/// assert_eq!(dmabuf_p2p::vfio::VFIO_PCI_DRIVER, "vfio-pci");
/// ```
pub const VFIO_PCI_DRIVER: &str = "vfio-pci";

/// Binds a PCI device to `vfio-pci` (uAPI reference E.1): writes
/// `driver_override`, unbinds the current driver if there is one, and asks
/// the bus to probe (`drivers_probe`). A device already bound to `vfio-pci` is
/// left alone. Needs root. Fails with [`Error::Device`] if the device does
/// not exist and [`Error::WrongDriver`] if it ends up bound elsewhere.
///
/// ```no_run
/// use dmabuf_p2p::vfio::{bind_to_vfio_pci, VfioPciDevice};
///
/// let addr = "0000:01:00.0".parse()?;
/// bind_to_vfio_pci(addr)?;
/// let dev = VfioPciDevice::open(addr)?;
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn bind_to_vfio_pci(addr: PciAddress) -> Result<()> {
    bind_to_vfio_pci_in(&Sysfs::default(), addr)
}

/// [`bind_to_vfio_pci`] in the sysfs tree `sysfs`.
///
/// ```no_run
/// use dmabuf_p2p::{vfio::bind_to_vfio_pci_in, sysfs::Sysfs};
/// bind_to_vfio_pci_in(&Sysfs::new("/sys"), "0000:01:00.0".parse()?)?;
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn bind_to_vfio_pci_in(sysfs: &Sysfs, addr: PciAddress) -> Result<()> {
    ensure_present(sysfs, addr)?;
    let old = sysfs.driver(addr)?;
    if old.as_deref() == Some(VFIO_PCI_DRIVER) {
        return Ok(());
    }
    let dir = sysfs.device_dir(addr);
    let name = addr.to_string();
    write_attr(addr, &dir.join("driver_override"), VFIO_PCI_DRIVER)?;
    if old.is_some() {
        write_attr(addr, &dir.join("driver/unbind"), &name)?;
    }
    write_attr(addr, &sysfs.root().join("bus/pci/drivers_probe"), &name)?;
    match sysfs.driver(addr)? {
        Some(d) if d == VFIO_PCI_DRIVER => Ok(()),
        driver => Err(Error::WrongDriver {
            device: name,
            driver,
            expected: VFIO_PCI_DRIVER.to_owned(),
        }),
    }
}

fn write_attr(addr: PciAddress, path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| Error::sys("write", format!("{addr} {}", path.display()), e))
}

pub(super) fn ensure_present(sysfs: &Sysfs, addr: PciAddress) -> Result<()> {
    if sysfs.exists(addr) {
        Ok(())
    } else {
        Err(Error::Device {
            device: addr.to_string(),
            problem: format!("not present (no {})", sysfs.device_dir(addr).display()),
            source: None,
        })
    }
}
