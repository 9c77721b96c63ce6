//! A small VMM for the `GuestBarMap` tests (`guest_bar_map.rs`, the
//! `profile_aw39` limits): rust-vmm's crates open `/dev/iommu`, allocate
//! the IOAS, open, bind and attach the devices and map guest RAM (a memfd);
//! the library adopts them by reference and a `GuestBarMap` registers the
//! targets. `edu0` is the guest's DMA engine (its source is guest RAM);
//! `nvme0`, when asked for, the second one (it reads blocks into a BAR).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use iommufd_ioctls::{IommuFd, IommufdIoas};
use vfio_ioctls::{VfioDevice, VfioIommufd};

use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p::vfio::{AdoptOptions, BarMapping, VfioPciDevice};
use dmabuf_p2p::vmm::{BarStatus, DeviceId, GuestBarMap, Offer};
use dmabuf_p2p::{Ioas, Iommufd};
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_engine::nvme::Nvme;
use dmabuf_p2p_engine::{DmaEngine, StorageEngine};
use dmabuf_p2p_vm_tests::{
    DMA_TIMEOUT, Kmsg, assert_bytes, bar_read, check_write_faults, edu_address, nvme_address,
    nvme_image,
};

/// Where the VMM maps its guest RAM, and how much.
pub(crate) const RAM_GPA: u64 = 0x1000_0000;
pub(crate) const RAM_SIZE: u64 = 0x1_0000;
/// Config offsets.
pub(crate) const COMMAND: u64 = 0x04;
pub(crate) const MEMORY: u16 = 0x2;
pub(crate) const MASTER: u16 = 0x4;

/// The VMM: its rust-vmm objects, the library's handles, the map.
pub(crate) struct GuestVmm {
    // The library's side first: dropped before the VMM's objects.
    pub(crate) map: GuestBarMap,
    pub(crate) edu: Edu,
    pub(crate) nvme: Option<Nvme>,
    /// Held so that the IOAS handle outlives the engines' mappings.
    _ioas: Ioas,
    pub(crate) iommufd: Iommufd,
    /// The VMM's devices, by PCI address.
    pub(crate) vmm_devices: Vec<(String, VfioDevice)>,
    /// The VMM's IOAS and iommufd, destroyed and closed last.
    _vmm_ioas: Arc<IommufdIoas>,
    _vmm_iommufd: Arc<IommuFd>,
    pub(crate) ram: Memfd,
}

/// The VFIO cdev of `bdf`, opened read-write, found through the library's
/// `Sysfs` (which lists into a buffer that cannot fault).
fn open_cdev(bdf: &str) -> File {
    let name = Sysfs::default()
        .vfio_dev(bdf.parse().unwrap())
        .unwrap()
        .unwrap_or_else(|| panic!("{bdf} has no VFIO cdev"));
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/vfio/devices/{name}"))
        .unwrap_or_else(|e| panic!("opening the VFIO cdev of {bdf}: {e}"))
}

impl GuestVmm {
    /// Opens edu0 (and nvme0 with `with_nvme`) and every target in
    /// `targets`, maps guest RAM, adopts it all, and registers the targets
    /// (all mappable BARs offered). Returns the VMM and the targets' ids, in
    /// order.
    pub(crate) fn new(targets: &[String], with_nvme: bool) -> (Self, Vec<DeviceId>) {
        let vmm_iommufd = Arc::new(IommuFd::new().unwrap());
        let vmm_ioas = Arc::new(IommufdIoas::new(Arc::clone(&vmm_iommufd)).unwrap());
        let vfio = Arc::new(
            VfioIommufd::new(Arc::clone(&vmm_iommufd), Some(Arc::clone(&vmm_ioas)), None).unwrap(),
        );
        let ram = Memfd::new("guest-ram", RAM_SIZE).unwrap();
        vmm_ioas
            .map_file(ram.as_fd().as_raw_fd(), 0, RAM_SIZE, RAM_GPA, true)
            .unwrap();
        let mut opened = vec![edu_address()];
        if with_nvme {
            opened.push(nvme_address("nvme0"));
        }
        opened.extend(targets.iter().cloned());
        let vmm_devices: Vec<(String, VfioDevice)> = opened
            .iter()
            .map(|bdf| {
                // Not `VfioDevice::new`: it lists sysfs with `read_dir`, which
                // can record the lockdep edge of docs/KERNEL.md.
                let dev = VfioDevice::new_from_fd(open_cdev(bdf), vfio.clone(), true)
                    .unwrap_or_else(|e| panic!("the VMM opening {bdf}: {e}"));
                (bdf.clone(), dev)
            })
            .collect();
        let iommufd = Iommufd::adopt_rust_vmm(&vmm_iommufd).unwrap();
        let ioas = Ioas::adopt_rust_vmm(&iommufd, &vmm_ioas).unwrap();
        let adopt = |i: usize| {
            VfioPciDevice::adopt_rust_vmm(&vmm_devices[i].1, &iommufd, AdoptOptions::default())
                .unwrap()
        };
        let map = GuestBarMap::new(&ioas).unwrap();
        map.declare_vmm_mapping(RAM_GPA, RAM_SIZE, "guest RAM")
            .unwrap();
        let edu = Edu::from_device(adopt(0)).unwrap();
        // The NVMe engine's queues go where automatic placement finds room
        // in the VMM's IOAS: around guest RAM (declared) and the BARs.
        let nvme = with_nvme.then(|| Nvme::from_device(adopt(1), &ioas).unwrap());
        let first = 1 + usize::from(with_nvme);
        let ids = (first..vmm_devices.len())
            .map(|i| map.register(adopt(i), Offer::AllMappable).unwrap())
            .collect();
        (
            Self {
                map,
                edu,
                nvme,
                _ioas: ioas,
                iommufd,
                vmm_devices,
                _vmm_ioas: vmm_ioas,
                _vmm_iommufd: vmm_iommufd,
                ram,
            },
            ids,
        )
    }

    /// The VMM's own handle of the device at `bdf`.
    pub(crate) fn vmm_device(&self, bdf: &str) -> &VfioDevice {
        &self
            .vmm_devices
            .iter()
            .find(|(b, _)| b == bdf)
            .unwrap_or_else(|| panic!("the VMM has no {bdf}"))
            .1
    }

    /// A guest config write of `value` (`len` bytes) at `offset` of `id`.
    pub(crate) fn write(&self, id: DeviceId, offset: u64, len: usize, value: u32) {
        self.map
            .config_write(id, offset, &value.to_le_bytes()[..len])
            .unwrap_or_else(|e| panic!("config write {offset:#x} <- {value:#x} ({len}): {e}"));
    }

    /// The guest places 64-bit BAR `bar` of `id` at `gpa` the way Linux
    /// does: decode off, both halves, decode on (bus master too).
    pub(crate) fn place(&self, id: DeviceId, bar: u32, gpa: u64) {
        let at = 0x10 + 4 * u64::from(bar);
        self.write(id, COMMAND, 2, 0);
        #[allow(clippy::cast_possible_truncation)]
        self.write(id, at, 4, gpa as u32);
        self.write(id, at + 4, 4, (gpa >> 32) as u32);
        self.write(id, COMMAND, 2, u32::from(MEMORY | MASTER));
    }

    /// BAR `bar` of `id` mapped through the library (for checks).
    pub(crate) fn bar(&self, id: DeviceId, bar: u32) -> BarMapping {
        self.map.vfio_device(id).unwrap().map_bar(bar).unwrap()
    }

    /// Where BAR `bar` of `id` is mapped, if it is.
    pub(crate) fn mapped_at(&self, id: DeviceId, bar: u32) -> Option<u64> {
        match self.map.bar_status(id, bar).unwrap() {
            BarStatus::Mapped { gpa, .. } | BarStatus::MappedAroundMsix { gpa, .. } => Some(gpa),
            BarStatus::Unreachable(_) => None,
        }
    }

    /// The guest's edu copies `bytes` (from guest RAM) to `gpa`, whatever
    /// the map says; IOMMU faults it causes are checked to be edu's writes.
    pub(crate) fn edu_copy(&mut self, bytes: &[u8], gpa: u64, what: &str) {
        self.ram.write_at(0, bytes).unwrap();
        let mut kmsg = Kmsg::open_at_end().unwrap();
        Kmsg::mark(&format!(
            "{what}: edu copy of {:#x} bytes to GPA {gpa:#x}",
            bytes.len()
        ));
        self.edu
            .memcpy(RAM_GPA, gpa, bytes.len() as u64, DMA_TIMEOUT)
            .unwrap();
        check_write_faults(
            &kmsg.iommu_faults(Duration::from_millis(50)),
            &edu_address(),
        );
    }

    /// The edu copy lands: BAR `bar` of `id` at `offset` holds `bytes`
    /// afterwards (read through the BAR mmap).
    pub(crate) fn copy_lands(
        &mut self,
        id: DeviceId,
        bar: u32,
        offset: u64,
        bytes: &[u8],
        what: &str,
    ) {
        let gpa = self.mapped_at(id, bar).unwrap_or_else(|| {
            panic!(
                "{what}: BAR{bar} not mapped: {:?}",
                self.map.bar_status(id, bar)
            )
        });
        self.edu_copy(bytes, gpa + offset, what);
        let m = self.bar(id, bar);
        assert_bytes(&bar_read(&m, offset, bytes.len()), bytes, offset, what);
    }

    /// An edu copy to `gpa` changes nothing at `offset` of BAR `bar` of
    /// `id` (the BAR is read before and after).
    pub(crate) fn copy_blocked(
        &mut self,
        id: DeviceId,
        bar: u32,
        offset: u64,
        gpa: u64,
        bytes: &[u8],
        what: &str,
    ) {
        let before = bar_read(&self.bar(id, bar), offset, bytes.len());
        self.edu_copy(bytes, gpa, what);
        let after = bar_read(&self.bar(id, bar), offset, bytes.len());
        assert_bytes(&after, &before, offset, what);
    }

    /// nvme0 reads `blocks` 512-byte blocks from `lba` into BAR `bar` of `id`
    /// at `offset`; the BAR holds the image's bytes afterwards.
    pub(crate) fn nvme_read_lands(
        &mut self,
        id: DeviceId,
        bar: u32,
        offset: u64,
        lba: u64,
        blocks: u32,
        what: &str,
    ) -> Vec<u8> {
        let gpa = self
            .mapped_at(id, bar)
            .unwrap_or_else(|| panic!("{what}: BAR{bar} not mapped"));
        let nvme = self.nvme.as_mut().expect("the VMM has nvme0");
        let bs = nvme.block_size();
        nvme.read_blocks(lba, blocks, gpa + offset, DMA_TIMEOUT)
            .unwrap();
        let want = nvme_image(lba * bs, (u64::from(blocks) * bs) as usize);
        let m = self.bar(id, bar);
        assert_bytes(&bar_read(&m, offset, want.len()), &want, offset, what);
        want
    }
}
