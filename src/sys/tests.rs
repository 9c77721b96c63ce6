//! Checks of the raw uAPI layer: the size and field offsets of every struct
//! the crate passes to the kernel, and every ioctl request number it makes.
//!
//! Expected values are the ones in `kernel-uapi.md` (Linux 7.2.13) or, where
//! that document gives none, the C layout of the kernel's uAPI headers
//! written out by hand. Request numbers are checked three ways: the
//! hand-written constant in `sys`, the literal documented value, and the value
//! clang computed from the headers when the bindings were generated
//! (`sys::bindings`).

use std::mem::{align_of, offset_of, size_of};

use super::bindings as generated;
use super::iommufd_test;
use super::{IOC_DIRBITS, IOC_DIRSHIFT, IOC_NRBITS, IOC_NRSHIFT, IOC_SIZEBITS, IOC_SIZESHIFT};
use super::{IOC_TYPEBITS, IOC_TYPESHIFT};
use crate::sys;

/// The direction field of an encoded request (`_IOC_DIR`).
const fn ioc_dir(request: u32) -> u32 {
    (request >> IOC_DIRSHIFT) & ((1 << IOC_DIRBITS) - 1)
}

/// The type field of an encoded request (`_IOC_TYPE`).
const fn ioc_type(request: u32) -> u8 {
    ((request >> IOC_TYPESHIFT) & ((1 << IOC_TYPEBITS) - 1)) as u8
}

/// The number field of an encoded request (`_IOC_NR`).
const fn ioc_nr(request: u32) -> u8 {
    ((request >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)) as u8
}

/// The size field of an encoded request (`_IOC_SIZE`).
const fn ioc_size(request: u32) -> usize {
    ((request >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)) as usize
}

/// `layout!(T, size, align; field => offset, ...)`
macro_rules! layout {
    ($t:ty, $size:expr, $align:expr; $($field:ident => $off:expr),* $(,)?) => {{
        assert_eq!(size_of::<$t>(), $size, "size of {}", stringify!($t));
        assert_eq!(align_of::<$t>(), $align, "alignment of {}", stringify!($t));
        $(
            assert_eq!(
                offset_of!($t, $field),
                $off,
                "offset of {}::{}",
                stringify!($t),
                stringify!($field)
            );
        )*
    }};
}

#[test]
fn dma_buf_structs() {
    layout!(sys::dma_buf_sync, 8, 8; flags => 0);
    layout!(sys::dma_buf_export_sync_file, 8, 4; flags => 0, fd => 4);
    layout!(sys::dma_buf_import_sync_file, 8, 4; flags => 0, fd => 4);
}

#[test]
fn udmabuf_structs() {
    layout!(sys::udmabuf_create, 24, 8; memfd => 0, flags => 4, offset => 8, size => 16);
    layout!(sys::udmabuf_create_item, 24, 8; memfd => 0, __pad => 4, offset => 8, size => 16);
    // 8-byte header, the items follow directly.
    layout!(sys::udmabuf_create_list, 8, 8; flags => 0, count => 4, list => 8);
}

#[test]
fn dma_heap_structs() {
    layout!(sys::dma_heap_allocation_data, 24, 8; len => 0, fd => 8, fd_flags => 12, heap_flags => 16);
}

#[test]
fn vfio_feature_structs() {
    layout!(sys::vfio_device_feature, 8, 4; argsz => 0, flags => 4, data => 8);
    layout!(sys::vfio_device_feature_dma_buf, 16, 8;
        region_index => 0, open_flags => 4, flags => 8, nr_ranges => 12, dma_ranges => 16);
    layout!(sys::vfio_region_dma_range, 16, 8; offset => 0, length => 8);
    // Header (8) + feature (16) + 16 per range, as kernel-uapi.md D.1 says.
    assert_eq!(
        size_of::<sys::vfio_device_feature>() + size_of::<sys::vfio_device_feature_dma_buf>(),
        24
    );
}

#[test]
fn vfio_device_structs() {
    layout!(sys::vfio_device_info, 24, 4;
        argsz => 0, flags => 4, num_regions => 8, num_irqs => 12, cap_offset => 16, pad => 20);
    layout!(sys::vfio_region_info, 32, 8;
        argsz => 0, flags => 4, index => 8, cap_offset => 12, size => 16, offset => 24);
    layout!(sys::vfio_irq_info, 16, 4; argsz => 0, flags => 4, index => 8, count => 12);
    layout!(sys::vfio_irq_set, 20, 4;
        argsz => 0, flags => 4, index => 8, start => 12, count => 16, data => 20);
}

#[test]
fn vfio_cdev_structs() {
    layout!(sys::vfio_device_bind_iommufd, 24, 8;
        argsz => 0, flags => 4, iommufd => 8, out_devid => 12, token_uuid_ptr => 16);
    layout!(sys::vfio_device_attach_iommufd_pt, 16, 4; argsz => 0, flags => 4, pt_id => 8, pasid => 12);
    layout!(sys::vfio_device_detach_iommufd_pt, 12, 4; argsz => 0, flags => 4, pasid => 8);
}

#[test]
fn iommufd_structs() {
    layout!(sys::iommu_destroy, 8, 4; size => 0, id => 4);
    layout!(sys::iommu_ioas_alloc, 12, 4; size => 0, flags => 4, out_ioas_id => 8);
    layout!(sys::iommu_iova_range, 16, 8; start => 0, last => 8);
    layout!(sys::iommu_ioas_allow_iovas, 24, 8;
        size => 0, ioas_id => 4, num_iovas => 8, __reserved => 12, allowed_iovas => 16);
    layout!(sys::iommu_ioas_iova_ranges, 32, 8;
        size => 0, ioas_id => 4, num_iovas => 8, __reserved => 12, allowed_iovas => 16,
        out_iova_alignment => 24);
    layout!(sys::iommu_ioas_map, 40, 8;
        size => 0, flags => 4, ioas_id => 8, __reserved => 12, user_va => 16, length => 24, iova => 32);
    layout!(sys::iommu_ioas_map_file, 40, 8;
        size => 0, flags => 4, ioas_id => 8, fd => 12, start => 16, length => 24, iova => 32);
    layout!(sys::iommu_ioas_unmap, 24, 8; size => 0, ioas_id => 4, iova => 8, length => 16);
    layout!(sys::iommu_ioas_copy, 40, 8;
        size => 0, flags => 4, dst_ioas_id => 8, src_ioas_id => 12, length => 16, dst_iova => 24,
        src_iova => 32);
    layout!(sys::iommu_option, 24, 8;
        size => 0, option_id => 4, op => 8, __reserved => 10, object_id => 12, val64 => 16);
}

#[test]
fn iommufd_selftest_cmd() {
    use iommufd_test::*;
    layout!(iommu_test_cmd, 72, 8; size => 0, op => 4, id => 8, __reserved => 12, payload => 16, last => 64);
    assert_eq!(
        size_of::<iommu_test_cmd_payload>(),
        IOMMU_TEST_CMD_PAYLOAD_SIZE
    );
    layout!(iommu_test_dmabuf_get, 8, 4; length => 0, open_flags => 4);
    layout!(iommu_test_dmabuf_revoke, 8, 4; dmabuf_fd => 0, revoked => 4);
    let get = iommu_test_cmd::dmabuf_get(4096, 2);
    assert_eq!(
        (get.size, get.op, get.id, get.__reserved, get.last),
        (72, IOMMU_TEST_OP_DMABUF_GET, 0, 0, 0)
    );
    let revoke = iommu_test_cmd::dmabuf_revoke(5, true);
    assert_eq!((revoke.size, revoke.op), (72, IOMMU_TEST_OP_DMABUF_REVOKE));
    assert_eq!(
        (IOMMU_TEST_OP_DMABUF_GET, IOMMU_TEST_OP_DMABUF_REVOKE),
        (22, 23)
    );
}

/// `requests!(NAME = documented value, ...)`: checks `sys::NAME` (hand-written)
/// and `sys::bindings::NAME` (generated) against the value.
macro_rules! requests {
    ($($name:ident = $value:expr),* $(,)?) => {{
        $(
            let expected: u32 = $value;
            assert_eq!(sys::$name, expected, "sys::{} vs the documented {expected:#x}", stringify!($name));
            assert_eq!(
                generated::$name, expected,
                "sys::bindings::{} (clang's value from the headers) vs {expected:#x}",
                stringify!($name)
            );
        )*
    }};
}

#[test]
fn dma_buf_requests() {
    requests!(
        DMA_BUF_IOCTL_SYNC = 0x4008_6200,
        DMA_BUF_SET_NAME = 0x4008_6201,
        DMA_BUF_IOCTL_EXPORT_SYNC_FILE = 0xc008_6202,
        DMA_BUF_IOCTL_IMPORT_SYNC_FILE = 0x4008_6203,
    );
    // The name ioctl is the `_B` (u64) flavour on 64-bit.
    assert_eq!(sys::DMA_BUF_SET_NAME, generated::DMA_BUF_SET_NAME_B);
    assert_eq!(generated::DMA_BUF_SET_NAME_A, 0x4004_6201);
}

#[test]
fn udmabuf_and_heap_requests() {
    requests!(
        UDMABUF_CREATE = 0x4018_7542,
        UDMABUF_CREATE_LIST = 0x4008_7543,
        DMA_HEAP_IOCTL_ALLOC = 0xc018_4800,
    );
}

#[test]
fn vfio_requests() {
    // `_IO(';', 100 + n)`: 0x3b64 + n.
    requests!(
        VFIO_DEVICE_GET_INFO = 0x3b6b,
        VFIO_DEVICE_GET_REGION_INFO = 0x3b6c,
        VFIO_DEVICE_GET_IRQ_INFO = 0x3b6d,
        VFIO_DEVICE_SET_IRQS = 0x3b6e,
        VFIO_DEVICE_RESET = 0x3b6f,
        VFIO_DEVICE_FEATURE = 0x3b75,
        VFIO_DEVICE_BIND_IOMMUFD = 0x3b76,
        VFIO_DEVICE_ATTACH_IOMMUFD_PT = 0x3b77,
        VFIO_DEVICE_DETACH_IOMMUFD_PT = 0x3b78,
    );
    // kernel-uapi.md D.3 gives VFIO_DEVICE_PCI_HOT_RESET as 0x3b71 too (same
    // number as VFIO_IOMMU_MAP_DMA, on a different fd type).
    assert_eq!(generated::VFIO_DEVICE_PCI_HOT_RESET, 0x3b71);
}

#[test]
fn iommufd_requests() {
    requests!(
        IOMMU_DESTROY = 0x3b80,
        IOMMU_IOAS_ALLOC = 0x3b81,
        IOMMU_IOAS_ALLOW_IOVAS = 0x3b82,
        IOMMU_IOAS_COPY = 0x3b83,
        IOMMU_IOAS_IOVA_RANGES = 0x3b84,
        IOMMU_IOAS_MAP = 0x3b85,
        IOMMU_IOAS_UNMAP = 0x3b86,
        IOMMU_OPTION = 0x3b87,
        IOMMU_IOAS_MAP_FILE = 0x3b8f,
    );
    // Not in the uAPI headers, so hand-written only.
    assert_eq!(iommufd_test::IOMMU_TEST_CMD, 0x3ba0);
}

#[test]
fn ioc_encoding_round_trips() {
    let r = sys::DMA_HEAP_IOCTL_ALLOC;
    assert_eq!(ioc_dir(r), sys::IOC_READ | sys::IOC_WRITE);
    assert_eq!(ioc_type(r), b'H');
    assert_eq!(ioc_nr(r), 0);
    assert_eq!(ioc_size(r), size_of::<sys::dma_heap_allocation_data>());
    assert_eq!(ioc_dir(sys::VFIO_DEVICE_FEATURE), sys::IOC_NONE);
    assert_eq!(ioc_size(sys::VFIO_DEVICE_FEATURE), 0);
    assert_eq!(sys::ioc(sys::IOC_READ, b'x', 1, 4), 0x8004_7801);
    assert_eq!(sys::io(b';', 0), 0x3b00);
}

#[test]
fn constants_used_by_the_crate() {
    assert_eq!(sys::DMA_BUF_MAGIC, 0x444d_4142);
    assert_eq!(
        (
            sys::DMA_BUF_SYNC_READ,
            sys::DMA_BUF_SYNC_WRITE,
            sys::DMA_BUF_SYNC_RW,
            sys::DMA_BUF_SYNC_END
        ),
        (1, 2, 3, 4)
    );
    assert_eq!(sys::DMA_BUF_SYNC_VALID_FLAGS_MASK, 7);
    assert_eq!(sys::UDMABUF_FLAGS_CLOEXEC, 1);
    assert_eq!(sys::VFIO_DEVICE_FEATURE_GET, 1 << 16);
    assert_eq!(sys::VFIO_DEVICE_FEATURE_SET, 1 << 17);
    assert_eq!(sys::VFIO_DEVICE_FEATURE_PROBE, 1 << 18);
    assert_eq!(sys::VFIO_DEVICE_FEATURE_DMA_BUF, 11);
    assert_eq!(sys::VFIO_PCI_BAR0_REGION_INDEX, 0);
    assert_eq!(sys::VFIO_PCI_ROM_REGION_INDEX, 6);
    assert_eq!(sys::VFIO_PCI_CONFIG_REGION_INDEX, 7);
    assert_eq!(sys::VFIO_PCI_REQ_IRQ_INDEX, 4);
    assert_eq!(sys::VFIO_DEVICE_BIND_FLAG_TOKEN, 1);
    assert_eq!(
        (
            sys::IOMMU_IOAS_MAP_FIXED_IOVA,
            sys::IOMMU_IOAS_MAP_WRITEABLE,
            sys::IOMMU_IOAS_MAP_READABLE
        ),
        (1, 2, 4)
    );
    assert_eq!(
        (sys::IOMMU_OPTION_RLIMIT_MODE, sys::IOMMU_OPTION_HUGE_PAGES),
        (0, 1)
    );
    assert_eq!((sys::IOMMU_OPTION_OP_SET, sys::IOMMU_OPTION_OP_GET), (0, 1));
    assert_eq!(
        (
            sys::PCI_COMMAND,
            sys::PCI_COMMAND_IO,
            sys::PCI_COMMAND_MEMORY,
            sys::PCI_COMMAND_MASTER
        ),
        (4, 1, 2, 4)
    );
}

#[cfg(feature = "drm")]
#[test]
fn drm_structs() {
    layout!(sys::drm_version, 64, 8; version_major => 0, version_minor => 4,
        version_patchlevel => 8, name_len => 16, name => 24, date_len => 32, date => 40,
        desc_len => 48, desc => 56);
    layout!(sys::drm_gem_close, 8, 4; handle => 0, pad => 4);
    layout!(sys::drm_prime_handle, 12, 4; handle => 0, flags => 4, fd => 8);
    layout!(sys::drm_virtgpu_getparam, 16, 8; param => 0, value => 8);
}

#[cfg(feature = "drm")]
#[test]
fn drm_requests() {
    requests!(
        DRM_IOCTL_VERSION = 0xc040_6400,
        DRM_IOCTL_GEM_CLOSE = 0x4008_6409,
        DRM_IOCTL_PRIME_FD_TO_HANDLE = 0xc00c_642e,
        DRM_IOCTL_VIRTGPU_GETPARAM = 0xc010_6443,
    );
    assert_eq!(sys::DRM_IOCTL_TYPE, generated::DRM_IOCTL_BASE);
    assert_eq!(generated::DRM_COMMAND_BASE, 0x40);
    assert_eq!(
        (
            sys::VIRTGPU_PARAM_3D_FEATURES,
            sys::VIRTGPU_PARAM_RESOURCE_BLOB
        ),
        (1, 3)
    );
}
