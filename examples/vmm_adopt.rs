//! A VMM made of rust-vmm crates, and the library inside it keeping a
//! passed-through device's BAR mapped where its guest puts it
//! (docs/GUIDE.md, "P2P between assigned devices in your VMM").
//!
//! The VMM's half is rust-vmm's, as cloud-hypervisor's is: `iommufd-ioctls`
//! opens `/dev/iommu` and allocates the IOAS, `vfio-ioctls` opens the
//! device's VFIO cdev, binds it and attaches it, and the VMM maps its guest
//! RAM (a memfd) into the IOAS itself. The library adopts those objects by
//! reference (feature `rust-vmm`: no `unsafe` here), and a `GuestBarMap`
//! follows the guest's config-space writes: Linux's sizing of BAR2, its
//! placement, decode on, a move, a placement over guest RAM (refused, with
//! the reason), and decode off. The map's own log lines (the `log` facade)
//! are printed as `log: ...`.
//!
//! Run it as root where the device is bound to `vfio-pci`, e.g. in the test
//! VM: `vmm_adopt 0000:02:00.0` (an ivshmem device with a 64-bit BAR2).
//! It leaves the device's `PCI_COMMAND` as it found it.

use std::error::Error;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::Arc;

use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p::vfio::AdoptOptions;
use dmabuf_p2p::vmm::{GuestBarMap, Offer};
use dmabuf_p2p::{Ioas, Iommufd, VfioPciDevice};
use iommufd_ioctls::{IommuFd, IommufdIoas};
use vfio_ioctls::{VfioDevice, VfioIommufd};

/// Where the VMM maps its guest RAM, and how much.
const RAM_GPA: u64 = 0x4000_0000;
const RAM_SIZE: u64 = 1 << 20;
/// Config-space offsets the guest writes: `PCI_COMMAND`, BAR2's two dwords.
const COMMAND: u64 = 0x04;
const BAR2_LOW: u64 = 0x18;
const BAR2_HIGH: u64 = 0x1c;
const MEMORY: u16 = 0x2;

/// Prints the library's log lines on stdout (not rust-vmm's).
struct StdoutLog;

impl log::Log for StdoutLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Info && m.target().starts_with("dmabuf_p2p")
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            println!("log: {}", r.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StdoutLog = StdoutLog;

fn main() -> Result<(), Box<dyn Error>> {
    let bdf = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0000:02:00.0".to_owned());
    log::set_logger(&LOGGER).map_err(|e| e.to_string())?;
    log::set_max_level(log::LevelFilter::Info);

    // ---- The VMM's own objects (rust-vmm) ----
    let vmm_iommufd = Arc::new(IommuFd::new()?);
    let vmm_ioas = Arc::new(IommufdIoas::new(Arc::clone(&vmm_iommufd))?);
    let vfio = Arc::new(VfioIommufd::new(
        Arc::clone(&vmm_iommufd),
        Some(Arc::clone(&vmm_ioas)),
        None,
    )?);
    // The VMM finds the device's cdev itself: vfio-ioctls' `VfioDevice::new`
    // lists sysfs with `read_dir`, whose buffer the kernel may fault in while
    // it holds a lock vfio-pci's MSI set-up nests under (docs/KERNEL.md);
    // the library's `Sysfs` lists into a buffer that cannot fault.
    let cdev_name = Sysfs::default()
        .vfio_dev(bdf.parse()?)?
        .ok_or("the device has no VFIO cdev (is it bound to vfio-pci?)")?;
    let cdev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(Path::new("/dev/vfio/devices").join(cdev_name))?;
    let vmm_dev = VfioDevice::new_from_fd(cdev, vfio, true)?;
    let ram = Memfd::new("guest-ram", RAM_SIZE)?;
    vmm_ioas.map_file(ram.as_fd().as_raw_fd(), 0, RAM_SIZE, RAM_GPA, true)?;
    println!(
        "VMM: {bdf} bound (devid {}) and attached to IOAS {}; guest RAM at GPA {RAM_GPA:#x}",
        vmm_dev.iommufd_dev_id().unwrap_or_default(),
        vmm_ioas.id()
    );

    // ---- The library, inside the VMM ----
    {
        let iommufd = Iommufd::adopt_rust_vmm(&vmm_iommufd)?;
        let ioas = Ioas::adopt_rust_vmm(&iommufd, &vmm_ioas)?;
        let dev = VfioPciDevice::adopt_rust_vmm(&vmm_dev, &iommufd, AdoptOptions::default())?;
        let command = dev.known_command().unwrap_or_default();
        let map = GuestBarMap::new(&ioas)?;
        map.declare_vmm_mapping(RAM_GPA, RAM_SIZE, "guest RAM")?;
        let id = map.register(dev, Offer::AllMappable)?;
        println!("library: adopted {bdf}, PCI_COMMAND {command:#06x}");
        let write32 = |offset: u64, value: u32| map.config_write(id, offset, &value.to_le_bytes());
        let command_write = |value: u16| map.config_write(id, COMMAND, &value.to_le_bytes());
        let status = || map.bar_status(id, 2);

        // Linux sizes BAR2 with decode off: all ones into each half, read back.
        command_write(command & !MEMORY)?;
        write32(BAR2_LOW, u32::MAX)?;
        let low = map.bar_register_read(id, BAR2_LOW)?.unwrap_or_default();
        write32(BAR2_LOW, 0)?;
        write32(BAR2_HIGH, u32::MAX)?;
        let high = map.bar_register_read(id, BAR2_HIGH)?.unwrap_or_default();
        write32(BAR2_HIGH, 0)?;
        let size = !((u64::from(high) << 32) | u64::from(low & !0xf)) + 1;
        println!("guest: BAR2 sized: {size:#x} bytes, flags {:#x}", low & 0xf);

        // ... places it at 0xc0000000 and turns decode on: mapped there.
        write32(BAR2_LOW, 0xc000_0000)?;
        write32(BAR2_HIGH, 0)?;
        command_write(command | MEMORY)?;
        println!("guest: BAR2 at 0xc0000000, decode on -> {}", status()?);

        // ... moves it above 4 GiB (decode off around the two halves).
        command_write(command & !MEMORY)?;
        write32(BAR2_LOW, 0)?;
        write32(BAR2_HIGH, 0x1)?;
        command_write(command | MEMORY)?;
        println!("guest: BAR2 moved to 0x100000000 -> {}", status()?);

        // ... and then over the VMM's guest RAM: refused, the reason kept.
        command_write(command & !MEMORY)?;
        #[allow(clippy::cast_possible_truncation)]
        write32(BAR2_LOW, RAM_GPA as u32)?;
        write32(BAR2_HIGH, 0)?;
        command_write(command | MEMORY)?;
        println!("guest: BAR2 at {RAM_GPA:#x} -> {}", status()?);
        // Decode back as the VMM found it.
        command_write(command)?;
        for bar in map.report() {
            println!("report: {bar}");
        }
        // Dropping the map unmaps its BARs and closes its duplicates; the
        // device stays bound and attached.
    }

    // ---- The VMM tears down its own objects ----
    vmm_ioas.unmap(RAM_GPA, RAM_SIZE)?;
    let ioas_id = vmm_ioas.id();
    drop(vmm_dev);
    drop(vmm_ioas);
    drop(vmm_iommufd);
    println!("VMM: device closed, IOAS {ioas_id} destroyed");
    Ok(())
}
