//! What the tests need to make raw ioctls behind the library's back: the
//! structs from rust-vmm's binding crates (independent of the library's own
//! bindings), and the request numbers and the one struct those crates lack,
//! written out from the Linux 7.2 headers and checked against the kernel's
//! numbers.

pub use iommufd_bindings::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA as IOMMU_IOAS_MAP_FIXED_IOVA;
pub use iommufd_bindings::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE as IOMMU_IOAS_MAP_READABLE;
pub use iommufd_bindings::iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE as IOMMU_IOAS_MAP_WRITEABLE;
pub use iommufd_bindings::{iommu_destroy, iommu_ioas_map_file};
pub use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_BUF, VFIO_DEVICE_FEATURE_GET, vfio_device_bind_iommufd,
    vfio_device_feature_dma_buf, vfio_region_dma_range,
};

/// `_IO(';', nr)`: every VFIO (`100 + n`) and iommufd (`0x80 + n`) request.
const fn io(nr: u32) -> u32 {
    (b';' as u32) << 8 | nr
}

/// `VFIO_DEVICE_FEATURE`.
pub const VFIO_DEVICE_FEATURE: u32 = io(100 + 17);
/// `VFIO_DEVICE_BIND_IOMMUFD`.
pub const VFIO_DEVICE_BIND_IOMMUFD: u32 = io(100 + 18);
/// `IOMMU_DESTROY`.
pub const IOMMU_DESTROY: u32 = io(0x80);
/// `IOMMU_IOAS_MAP_FILE`.
pub const IOMMU_IOAS_MAP_FILE: u32 = io(0x80 + 0x0f);
/// `UDMABUF_CREATE`: `_IOW('u', 0x42, struct udmabuf_create)`.
pub const UDMABUF_CREATE: u32 =
    1 << 30 | (size_of::<UdmabufCreate>() as u32) << 16 | (b'u' as u32) << 8 | 0x42;
/// `UDMABUF_FLAGS_CLOEXEC`.
pub const UDMABUF_FLAGS_CLOEXEC: u32 = 1;

/// `struct udmabuf_create`.
#[repr(C)]
pub struct UdmabufCreate {
    pub memfd: u32,
    pub flags: u32,
    pub offset: u64,
    pub size: u64,
}

// The kernel's numbers (kernel-uapi.md B and E) and C layout.
const _: () = {
    assert!(VFIO_DEVICE_FEATURE == 0x3b75);
    assert!(VFIO_DEVICE_BIND_IOMMUFD == 0x3b76);
    assert!(IOMMU_DESTROY == 0x3b80);
    assert!(IOMMU_IOAS_MAP_FILE == 0x3b8f);
    assert!(UDMABUF_CREATE == 0x4018_7542);
    assert!(size_of::<UdmabufCreate>() == 24);
    assert!(std::mem::offset_of!(UdmabufCreate, offset) == 8);
    assert!(std::mem::offset_of!(UdmabufCreate, size) == 16);
    assert!(size_of::<vfio_device_bind_iommufd>() == 24);
    assert!(size_of::<vfio_device_feature_dma_buf>() == 16);
    assert!(size_of::<iommu_ioas_map_file>() == 40);
    assert!(size_of::<iommu_destroy>() == 8);
};
