//! A VMM that owns its device and IOAS, and the library adopting them
//! (docs/GUIDE.md, "Inside an existing VMM").
//!
//! The first half is the VMM's own code, in raw ioctls: it opens
//! `/dev/iommu`, allocates an IOAS, opens the device's VFIO cdev, binds it
//! and attaches it. The library then adopts duplicates of those fds,
//! exports BAR2 and maps it at a fixed guest-physical IOVA, and a
//! "guest" turns memory decode off and on through the trap API. The
//! library lets go first; then the VMM detaches, destroys its IOAS and
//! closes its fds.
//!
//! Run it as root where the device is bound to `vfio-pci`, e.g. in the
//! test VM: `vmm_adopt 0000:02:00.0` (an ivshmem device).

use std::error::Error;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use dmabuf_p2p::revoke::{Attachment, RestorePolicy};
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p::vfio::AdoptOptions;
use dmabuf_p2p::{ByteRange, Ioas, Iommufd, IovaPlacement, MapPerms, VfioPciDevice, sys};

/// Where the guest placed the BAR: the IOVA of the export's mapping.
const BAR2_GPA: u64 = 0xc000_0000;
/// `PCI_COMMAND` memory decode.
const MEMORY: u16 = 0x2;

fn main() -> Result<(), Box<dyn Error>> {
    let bdf = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0000:02:00.0".to_owned());

    // ---- The VMM's own code ----
    let vmm_iommufd = open_rw(Path::new("/dev/iommu"))?;
    let mut alloc = sys::iommu_ioas_alloc {
        size: size_of::<sys::iommu_ioas_alloc>() as u32,
        ..Default::default()
    };
    vmm_ioctl(vmm_iommufd.as_fd(), sys::IOMMU_IOAS_ALLOC, &mut alloc)?;
    let ioas_id = alloc.out_ioas_id;
    // Sysfs lists directories into a buffer that cannot fault (see
    // dmabuf_p2p::sysfs), unlike `fs::read_dir`.
    let cdev_name = Sysfs::default()
        .vfio_dev(bdf.parse()?)?
        .ok_or("the device has no VFIO cdev (is it bound to vfio-pci?)")?;
    let vmm_cdev = open_rw(&Path::new("/dev/vfio/devices").join(cdev_name))?;
    let mut bind = sys::vfio_device_bind_iommufd {
        argsz: size_of::<sys::vfio_device_bind_iommufd>() as u32,
        iommufd: vmm_iommufd.as_raw_fd(),
        ..Default::default()
    };
    vmm_ioctl(vmm_cdev.as_fd(), sys::VFIO_DEVICE_BIND_IOMMUFD, &mut bind)?;
    let mut attach = sys::vfio_device_attach_iommufd_pt {
        argsz: size_of::<sys::vfio_device_attach_iommufd_pt>() as u32,
        pt_id: ioas_id,
        ..Default::default()
    };
    vmm_ioctl(
        vmm_cdev.as_fd(),
        sys::VFIO_DEVICE_ATTACH_IOMMUFD_PT,
        &mut attach,
    )?;
    println!(
        "VMM: {bdf} bound (devid {}) and attached to IOAS {ioas_id}",
        bind.out_devid
    );

    // ---- The library, inside the VMM ----
    {
        let iommufd = Iommufd::from(vmm_iommufd.try_clone()?);
        let ioas = Ioas::adopt(&iommufd, ioas_id)?;
        let dev = VfioPciDevice::adopt(
            vmm_cdev.try_clone()?,
            bind.out_devid,
            &iommufd,
            AdoptOptions::default(),
        )?;
        let command = dev.known_command().unwrap_or_default();
        println!(
            "library: adopted {}, PCI_COMMAND {command:#06x}",
            dev.address()
        );

        // The guest turns memory decode on (a trapped config write).
        dev.guest_config_write(4, &(command | MEMORY).to_le_bytes())?;
        let export = dev.export_bar(2, &[ByteRange::new(0, 0x10000)])?;
        let att = Attachment::map(
            &export,
            &ioas,
            IovaPlacement::Fixed(BAR2_GPA),
            MapPerms::ReadWrite,
            RestorePolicy::Automatic,
        )?;
        att.on_event(|info, ev| println!("  attachment at {:#x}: {ev:?}", info.iova));
        println!("library: BAR2 mapped at guest-physical {:#x}", att.iova());

        dev.guest_config_write(4, &(command & !MEMORY).to_le_bytes())?;
        println!("guest: decode off -> revoked: {}", att.is_revoked());
        dev.guest_config_write(4, &(command | MEMORY).to_le_bytes())?;
        println!(
            "guest: decode on -> revoked: {}, IOVA {:#x}",
            att.is_revoked(),
            att.iova()
        );
        // Dropping the library's objects unmaps its mapping and closes its
        // duplicates; the device stays bound and attached.
    }

    // ---- The VMM tears down its own objects ----
    let mut detach = sys::vfio_device_detach_iommufd_pt {
        argsz: size_of::<sys::vfio_device_detach_iommufd_pt>() as u32,
        ..Default::default()
    };
    vmm_ioctl(
        vmm_cdev.as_fd(),
        sys::VFIO_DEVICE_DETACH_IOMMUFD_PT,
        &mut detach,
    )?;
    let mut destroy = sys::iommu_destroy {
        size: size_of::<sys::iommu_destroy>() as u32,
        id: ioas_id,
    };
    vmm_ioctl(vmm_iommufd.as_fd(), sys::IOMMU_DESTROY, &mut destroy)?;
    drop(vmm_cdev);
    drop(vmm_iommufd);
    println!("VMM: detached, IOAS {ioas_id} destroyed, fds closed");
    Ok(())
}

fn open_rw(path: &Path) -> io::Result<OwnedFd> {
    Ok(OpenOptions::new().read(true).write(true).open(path)?.into())
}

/// One ioctl of the VMM's own code, with `arg` the struct `request` takes.
fn vmm_ioctl<T>(fd: BorrowedFd<'_>, request: u32, arg: &mut T) -> io::Result<()> {
    // SAFETY: every call passes the argument struct its request number
    // names, with its size field set; it lives across the call.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::c_ulong::from(request),
            std::ptr::from_mut(arg),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
