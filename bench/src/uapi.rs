//! The few kernel uAPI structs, request numbers and flags the raw control
//! passes to the kernel, written out here from the Linux 7.2 headers
//! (`linux/vfio.h`, `linux/iommufd.h`, `linux/pci_regs.h`): an independent
//! control shares no definition with the library it is compared against.
//! Every struct's size and field offsets are checked at compile time against
//! the numbers of the kernel's C layout.

use std::mem::{offset_of, size_of};

/// `_IO(';', 100 + n)`, the encoding of every VFIO request.
const fn vfio(n: u32) -> u32 {
    0x3b00 + 100 + n
}

/// `_IO(';', 0x80 + n)`, the encoding of every iommufd request.
const fn iommufd(n: u32) -> u32 {
    0x3b00 + 0x80 + n
}

pub const VFIO_GET_API_VERSION: u32 = vfio(0);
pub const VFIO_SET_IOMMU: u32 = vfio(2);
pub const VFIO_GROUP_GET_STATUS: u32 = vfio(3);
pub const VFIO_GROUP_SET_CONTAINER: u32 = vfio(4);
pub const VFIO_GROUP_GET_DEVICE_FD: u32 = vfio(6);
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = vfio(8);
pub const VFIO_IOMMU_GET_INFO: u32 = vfio(12);
pub const VFIO_IOMMU_MAP_DMA: u32 = vfio(13);
pub const VFIO_IOMMU_UNMAP_DMA: u32 = vfio(14);
pub const VFIO_DEVICE_FEATURE: u32 = vfio(17);
pub const IOMMU_IOAS_UNMAP: u32 = iommufd(6);
pub const IOMMU_IOAS_MAP_FILE: u32 = iommufd(0x0f);

// The numbers the kernel's `_IO` gives (kernel-uapi.md, D and E).
const _: () = {
    assert!(VFIO_GET_API_VERSION == 0x3b64);
    assert!(VFIO_GROUP_GET_DEVICE_FD == 0x3b6a);
    assert!(VFIO_DEVICE_GET_REGION_INFO == 0x3b6c);
    assert!(VFIO_IOMMU_UNMAP_DMA == 0x3b72);
    assert!(VFIO_DEVICE_FEATURE == 0x3b75);
    assert!(IOMMU_IOAS_UNMAP == 0x3b86);
    assert!(IOMMU_IOAS_MAP_FILE == 0x3b8f);
};

pub const VFIO_DEVICE_FEATURE_GET: u32 = 1 << 16;
pub const VFIO_DEVICE_FEATURE_DMA_BUF: u32 = 11;
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;
pub const VFIO_TYPE1V2_IOMMU: usize = 3;
pub const VFIO_DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub const VFIO_DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
pub const VFIO_DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
pub const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
pub const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
pub const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;
/// `PCI_COMMAND_MEMORY`: memory decode, bit 1 of `PCI_COMMAND`.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;

/// `VFIO_DEVICE_FEATURE` GET `DMA_BUF` with one range, as one C struct:
/// `struct vfio_device_feature` (`argsz`, `flags`), then `struct
/// vfio_device_feature_dma_buf` (`region_index`, `open_flags`, `flags`,
/// `nr_ranges`), then the one `struct vfio_region_dma_range`.
#[repr(C)]
pub struct DmaBufRequest {
    pub argsz: u32,
    pub flags: u32,
    pub region_index: u32,
    pub open_flags: u32,
    pub dma_buf_flags: u32,
    pub nr_ranges: u32,
    pub offset: u64,
    pub length: u64,
}

/// `struct iommu_ioas_map_file`.
#[repr(C)]
pub struct IommuIoasMapFile {
    pub size: u32,
    pub flags: u32,
    pub ioas_id: u32,
    pub fd: i32,
    pub start: u64,
    pub length: u64,
    pub iova: u64,
}

/// `struct iommu_ioas_unmap`.
#[repr(C)]
pub struct IommuIoasUnmap {
    pub size: u32,
    pub ioas_id: u32,
    pub iova: u64,
    pub length: u64,
}

/// `struct vfio_region_info` (without capabilities).
#[repr(C)]
#[derive(Default)]
pub struct VfioRegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

/// `struct vfio_group_status`.
#[repr(C)]
pub struct VfioGroupStatus {
    pub argsz: u32,
    pub flags: u32,
}

/// `struct vfio_iommu_type1_info` (without capabilities).
#[repr(C)]
#[derive(Default)]
pub struct VfioIommuType1Info {
    pub argsz: u32,
    pub flags: u32,
    pub iova_pgsizes: u64,
    pub cap_offset: u32,
    pub pad: u32,
}

/// `struct vfio_iommu_type1_dma_map`.
#[repr(C)]
pub struct VfioIommuType1DmaMap {
    pub argsz: u32,
    pub flags: u32,
    pub vaddr: u64,
    pub iova: u64,
    pub size: u64,
}

/// `struct vfio_iommu_type1_dma_unmap`, its fixed part (the dirty bitmap
/// that may follow is not used).
#[repr(C)]
pub struct VfioIommuType1DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

// Sizes and offsets of the kernel's C layout (x86-64, arm64).
const _: () = {
    assert!(size_of::<DmaBufRequest>() == 8 + 16 + 16);
    assert!(offset_of!(DmaBufRequest, region_index) == 8);
    assert!(offset_of!(DmaBufRequest, nr_ranges) == 20);
    assert!(offset_of!(DmaBufRequest, offset) == 24);
    assert!(size_of::<IommuIoasMapFile>() == 40);
    assert!(offset_of!(IommuIoasMapFile, fd) == 12);
    assert!(offset_of!(IommuIoasMapFile, start) == 16);
    assert!(offset_of!(IommuIoasMapFile, iova) == 32);
    assert!(size_of::<IommuIoasUnmap>() == 24);
    assert!(offset_of!(IommuIoasUnmap, iova) == 8);
    assert!(offset_of!(IommuIoasUnmap, length) == 16);
    assert!(size_of::<VfioRegionInfo>() == 32);
    assert!(offset_of!(VfioRegionInfo, size) == 16);
    assert!(offset_of!(VfioRegionInfo, offset) == 24);
    assert!(size_of::<VfioGroupStatus>() == 8);
    assert!(size_of::<VfioIommuType1Info>() == 24);
    assert!(offset_of!(VfioIommuType1Info, iova_pgsizes) == 8);
    assert!(size_of::<VfioIommuType1DmaMap>() == 32);
    assert!(offset_of!(VfioIommuType1DmaMap, vaddr) == 8);
    assert!(offset_of!(VfioIommuType1DmaMap, size) == 24);
    assert!(size_of::<VfioIommuType1DmaUnmap>() == 24);
    assert!(offset_of!(VfioIommuType1DmaUnmap, size) == 16);
};
