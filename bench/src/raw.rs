//! The raw-libc baseline: hand-written `libc::ioctl` calls on the bench's own
//! uAPI definitions ([`crate::uapi`]), no library types or bindings.
//! Everything the benchmark compares the library against, and the legacy VFIO
//! type1 container path that dma-buf export replaces, goes through here.

use std::ffi::CString;
use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;

use libc::{c_int, c_void};

use crate::uapi::{self, DmaBufRequest, IommuIoasMapFile, IommuIoasUnmap, VfioRegionInfo};

/// `O_RDWR | O_CLOEXEC` as the `u32` the export request wants.
#[allow(clippy::cast_sign_loss)]
const OPEN_FLAGS: u32 = (libc::O_RDWR | libc::O_CLOEXEC) as u32;

/// Offset of `PCI_COMMAND` in config space and its memory decode bit.
const PCI_COMMAND: u64 = 4;
/// `PCI_COMMAND_MEMORY`.
pub const COMMAND_MEMORY: u16 = uapi::PCI_COMMAND_MEMORY;

fn cvt(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `ioctl(fd, request, arg)`.
///
/// # Safety
///
/// `arg` must be what `request` expects: a pointer to memory the kernel may
/// read and write as that request's argument, or an integer for requests that
/// take one by value.
unsafe fn ioctl<T>(fd: RawFd, request: u32, arg: T) -> io::Result<c_int> {
    // SAFETY: the caller guarantees `arg` suits `request`.
    cvt(unsafe { libc::ioctl(fd, request as libc::Ioctl, arg) })
}

/// `argsz`/`size` of a uAPI struct.
#[allow(clippy::cast_possible_truncation)]
const fn size32<T>() -> u32 {
    size_of::<T>() as u32
}

/// Exports `[offset, offset + length)` of region `bar` as a dma-buf; returns its fd.
pub fn export(device: RawFd, bar: u32, offset: u64, length: u64) -> io::Result<RawFd> {
    let mut req = DmaBufRequest {
        argsz: size32::<DmaBufRequest>(),
        flags: uapi::VFIO_DEVICE_FEATURE_GET | uapi::VFIO_DEVICE_FEATURE_DMA_BUF,
        region_index: bar,
        open_flags: OPEN_FLAGS,
        dma_buf_flags: 0,
        nr_ranges: 1,
        offset,
        length,
    };
    // SAFETY: the kernel reads `argsz` (40) bytes: header, feature and the one
    // range that `nr_ranges` announces; it returns the new fd.
    unsafe {
        ioctl(
            device,
            uapi::VFIO_DEVICE_FEATURE,
            std::ptr::addr_of_mut!(req),
        )
    }
}

/// `IOMMU_IOAS_MAP_FILE` of `[start, start + length)` of `fd` at the fixed `iova`, read-write.
pub fn map_file(
    iommufd: RawFd,
    ioas: u32,
    fd: RawFd,
    start: u64,
    length: u64,
    iova: u64,
) -> io::Result<u64> {
    map_file_flags(
        iommufd,
        ioas,
        fd,
        start,
        length,
        iova,
        uapi::IOMMU_IOAS_MAP_FIXED_IOVA,
    )
}

/// `IOMMU_IOAS_MAP_FILE` read-write at an IOVA the kernel picks; returns it.
pub fn map_file_kernel_placed(
    iommufd: RawFd,
    ioas: u32,
    fd: RawFd,
    start: u64,
    length: u64,
) -> io::Result<u64> {
    map_file_flags(iommufd, ioas, fd, start, length, 0, 0)
}

fn map_file_flags(
    iommufd: RawFd,
    ioas: u32,
    fd: RawFd,
    start: u64,
    length: u64,
    iova: u64,
    placement: u32,
) -> io::Result<u64> {
    let mut arg = IommuIoasMapFile {
        size: size32::<IommuIoasMapFile>(),
        flags: placement | uapi::IOMMU_IOAS_MAP_READABLE | uapi::IOMMU_IOAS_MAP_WRITEABLE,
        ioas_id: ioas,
        fd,
        start,
        length,
        iova,
    };
    // SAFETY: the kernel reads and writes back this struct (integers only).
    unsafe {
        ioctl(
            iommufd,
            uapi::IOMMU_IOAS_MAP_FILE,
            std::ptr::addr_of_mut!(arg),
        )
    }?;
    Ok(arg.iova)
}

/// `IOMMU_IOAS_UNMAP` of `[iova, iova + length)`; returns the bytes unmapped.
pub fn unmap(iommufd: RawFd, ioas: u32, iova: u64, length: u64) -> io::Result<u64> {
    let mut arg = IommuIoasUnmap {
        size: size32::<IommuIoasUnmap>(),
        ioas_id: ioas,
        iova,
        length,
    };
    // SAFETY: the kernel reads and writes back this struct (integers only).
    unsafe { ioctl(iommufd, uapi::IOMMU_IOAS_UNMAP, std::ptr::addr_of_mut!(arg)) }?;
    Ok(arg.length)
}

/// `close(2)`.
pub fn close(fd: RawFd) -> io::Result<()> {
    // SAFETY: closing an fd this program owns and uses no more.
    cvt(unsafe { libc::close(fd) }).map(drop)
}

/// `VFIO_DEVICE_GET_REGION_INFO`: (offset in the device fd, size).
pub fn region_info(device: RawFd, index: u32) -> io::Result<(u64, u64)> {
    let mut arg = VfioRegionInfo {
        argsz: size32::<VfioRegionInfo>(),
        index,
        ..Default::default()
    };
    // SAFETY: the kernel reads `argsz` and writes back at most this struct.
    unsafe {
        ioctl(
            device,
            uapi::VFIO_DEVICE_GET_REGION_INFO,
            std::ptr::addr_of_mut!(arg),
        )
    }?;
    Ok((arg.offset, arg.size))
}

/// Reads `PCI_COMMAND` through the config region at `config_offset`.
pub fn command(device: RawFd, config_offset: u64) -> io::Result<u16> {
    let mut b = [0u8; 2];
    // SAFETY: reads 2 bytes into a 2-byte buffer.
    let n = unsafe {
        libc::pread(
            device,
            b.as_mut_ptr().cast::<c_void>(),
            2,
            off(config_offset + PCI_COMMAND)?,
        )
    };
    if n != 2 {
        return Err(if n < 0 {
            io::Error::last_os_error()
        } else {
            io::Error::other("short config read")
        });
    }
    Ok(u16::from_le_bytes(b))
}

/// Writes `PCI_COMMAND` through the config region at `config_offset`.
pub fn set_command(device: RawFd, config_offset: u64, value: u16) -> io::Result<()> {
    let b = value.to_le_bytes();
    // SAFETY: writes 2 bytes from a 2-byte buffer.
    let n = unsafe {
        libc::pwrite(
            device,
            b.as_ptr().cast::<c_void>(),
            2,
            off(config_offset + PCI_COMMAND)?,
        )
    };
    if n != 2 {
        return Err(if n < 0 {
            io::Error::last_os_error()
        } else {
            io::Error::other("short config write")
        });
    }
    Ok(())
}

fn off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

fn open(path: &str) -> io::Result<RawFd> {
    let c = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid C string; the result is a new fd or -1.
    cvt(unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })
}

/// The legacy path: a VFIO type1 container (`/dev/vfio/vfio`) holding the
/// device's group, the device opened through the group, and its BAR mmap'd.
/// Everything is closed on drop.
pub struct Type1 {
    container: RawFd,
    group: RawFd,
    device: RawFd,
    bar: *mut c_void,
    bar_len: usize,
    /// Supported IOMMU page sizes (`VFIO_IOMMU_GET_INFO` `iova_pgsizes`).
    pub iova_pgsizes: u64,
}

impl Type1 {
    /// Opens the container and `group`, sets type1v2, opens device `bdf`,
    /// turns its memory decode on and maps BAR `bar` into this process.
    pub fn open(group: u32, bdf: &str, bar: u32) -> io::Result<Self> {
        let mut t = Self {
            container: -1,
            group: -1,
            device: -1,
            bar: std::ptr::null_mut(),
            bar_len: 0,
            iova_pgsizes: 0,
        };
        t.container = open("/dev/vfio/vfio")?;
        // SAFETY: VFIO_GET_API_VERSION takes no argument.
        let api = unsafe { ioctl(t.container, uapi::VFIO_GET_API_VERSION, 0usize) }?;
        if api != 0 {
            return Err(io::Error::other(format!("VFIO API version {api}")));
        }
        t.group = open(&format!("/dev/vfio/{group}"))?;
        let mut st = uapi::VfioGroupStatus {
            argsz: size32::<uapi::VfioGroupStatus>(),
            flags: 0,
        };
        // SAFETY: the kernel reads `argsz` and writes back the flags.
        unsafe {
            ioctl(
                t.group,
                uapi::VFIO_GROUP_GET_STATUS,
                std::ptr::addr_of_mut!(st),
            )
        }?;
        if st.flags & uapi::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(io::Error::other(format!("group {group} is not viable")));
        }
        let c: c_int = t.container;
        // SAFETY: the argument points at an int holding the container fd.
        unsafe {
            ioctl(
                t.group,
                uapi::VFIO_GROUP_SET_CONTAINER,
                std::ptr::addr_of!(c),
            )
        }?;
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
        unsafe { ioctl(t.container, uapi::VFIO_SET_IOMMU, uapi::VFIO_TYPE1V2_IOMMU) }?;
        let mut info = uapi::VfioIommuType1Info {
            argsz: size32::<uapi::VfioIommuType1Info>(),
            ..Default::default()
        };
        // SAFETY: the kernel writes back at most `argsz` bytes of this struct.
        unsafe {
            ioctl(
                t.container,
                uapi::VFIO_IOMMU_GET_INFO,
                std::ptr::addr_of_mut!(info),
            )
        }?;
        t.iova_pgsizes = info.iova_pgsizes;
        let name = CString::new(bdf).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the argument is a C string the kernel reads; returns the device fd.
        t.device = unsafe { ioctl(t.group, uapi::VFIO_GROUP_GET_DEVICE_FD, name.as_ptr()) }?;
        let (config, _) = region_info(t.device, uapi::VFIO_PCI_CONFIG_REGION_INDEX)?;
        let cmd = command(t.device, config)?;
        if cmd & COMMAND_MEMORY == 0 {
            set_command(t.device, config, cmd | COMMAND_MEMORY)?;
        }
        let (offset, size) = region_info(t.device, bar)?;
        t.bar_len =
            usize::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: a new shared mapping of the BAR chosen by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                t.bar_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                t.device,
                off(offset)?,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        t.bar = p;
        Ok(t)
    }

    /// The BAR's size.
    pub fn bar_len(&self) -> u64 {
        self.bar_len as u64
    }

    /// `VFIO_IOMMU_MAP_DMA` of the first `size` bytes of the BAR mapping at `iova`.
    pub fn map(&self, iova: u64, size: u64) -> io::Result<()> {
        let arg = uapi::VfioIommuType1DmaMap {
            argsz: size32::<uapi::VfioIommuType1DmaMap>(),
            flags: uapi::VFIO_DMA_MAP_FLAG_READ | uapi::VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: self.bar as u64,
            iova,
            size,
        };
        // SAFETY: the kernel reads this struct; the memory it maps is device
        // MMIO mapped by this value, which unmaps all DMA before it goes.
        unsafe {
            ioctl(
                self.container,
                uapi::VFIO_IOMMU_MAP_DMA,
                std::ptr::addr_of!(arg),
            )
        }
        .map(drop)
    }

    /// `VFIO_IOMMU_UNMAP_DMA` of `[iova, iova + size)`; returns the bytes unmapped.
    pub fn unmap(&self, iova: u64, size: u64) -> io::Result<u64> {
        let mut arg = uapi::VfioIommuType1DmaUnmap {
            argsz: size32::<uapi::VfioIommuType1DmaUnmap>(),
            flags: 0,
            iova,
            size,
        };
        // SAFETY: without the dirty-bitmap flag the kernel reads and writes
        // back the 24-byte fixed part only.
        unsafe {
            ioctl(
                self.container,
                uapi::VFIO_IOMMU_UNMAP_DMA,
                std::ptr::addr_of_mut!(arg),
            )
        }?;
        Ok(arg.size)
    }
}

impl Drop for Type1 {
    fn drop(&mut self) {
        if !self.bar.is_null() {
            // SAFETY: the BAR mapping made in `open`, unmapped only here.
            unsafe { libc::munmap(self.bar, self.bar_len) };
        }
        if self.container >= 0 {
            let all = uapi::VfioIommuType1DmaUnmap {
                argsz: size32::<uapi::VfioIommuType1DmaUnmap>(),
                flags: uapi::VFIO_DMA_UNMAP_FLAG_ALL,
                iova: 0,
                size: 0,
            };
            // SAFETY: UNMAP_ALL reads the 24-byte fixed part only.
            let _ = unsafe {
                ioctl(
                    self.container,
                    uapi::VFIO_IOMMU_UNMAP_DMA,
                    std::ptr::addr_of!(all),
                )
            };
        }
        for fd in [self.device, self.group, self.container] {
            if fd >= 0 {
                let _ = close(fd);
            }
        }
    }
}

/// A plain memfd of `size` bytes (no seals): `memfd_create` + `ftruncate`.
pub fn memfd(size: u64) -> io::Result<RawFd> {
    // SAFETY: a valid C string literal; the result is a new fd or -1.
    let fd = cvt(unsafe { libc::memfd_create(c"bench".as_ptr(), libc::MFD_CLOEXEC) })?;
    // SAFETY: sizing the memfd just created.
    if unsafe { libc::ftruncate(fd, off(size)?) } != 0 {
        let e = io::Error::last_os_error();
        let _ = close(fd);
        return Err(e);
    }
    Ok(fd)
}
