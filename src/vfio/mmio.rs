//! A BAR mapped into this process, accessed with volatile reads and writes.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use super::VfioPciDevice;
use crate::dmabuf::human_size;
use crate::error::{Error, RangeProblem, Result};
use crate::pci::PciAddress;
use crate::range::{ByteRange, page_size};

impl VfioPciDevice {
    /// Maps BAR `index` into this process (`mmap` of the device fd at the
    /// region offset, shared, with the region's read/write permissions). A
    /// BAR smaller than a page is mapped as one page; accesses are still
    /// bounded by the BAR size. A BAR without `VFIO_REGION_INFO_FLAG_MMAP` is
    /// [`Error::Unsupported`]; an absent BAR is [`Error::InvalidRegion`].
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// dev.set_memory_decode(true)?;
    /// let bar = dev.map_bar(2)?;
    /// bar.write_u32(0, 0xdead_beef)?;
    /// assert_eq!(bar.read_u32(0)?, 0xdead_beef);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn map_bar(&self, index: u32) -> Result<BarMapping> {
        let bar = self.bar(index)?;
        let name = format!("{} BAR{index}", self.address);
        if !bar.is_present() {
            return Err(Error::InvalidRegion {
                device: self.address.to_string(),
                index,
                problem: "BAR not present (size 0)".to_owned(),
            });
        }
        if !bar.region.mmap_supported() {
            return Err(Error::Unsupported {
                target: name,
                operation: "mmap",
                problem: "VFIO does not allow mmap of this region (no VFIO_REGION_INFO_FLAG_MMAP)"
                    .to_owned(),
            });
        }
        let too_big = || Error::InvalidRegion {
            device: self.address.to_string(),
            index,
            problem: "too large to map in this address space".to_owned(),
        };
        let size = usize::try_from(bar.size()).map_err(|_| too_big())?;
        let page = usize::try_from(page_size()).map_err(|_| too_big())?;
        let map_len = size.checked_next_multiple_of(page).ok_or_else(too_big)?;
        let offset = libc::off_t::try_from(bar.region.offset).map_err(|_| too_big())?;
        let mut prot = 0;
        if bar.region.readable() {
            prot |= libc::PROT_READ;
        }
        if bar.region.writable() {
            prot |= libc::PROT_WRITE;
        }
        // SAFETY: a new shared mapping chosen by the kernel (NULL hint), so no
        // existing memory is replaced; the fd is open for the call and the
        // kernel keeps its own reference to the file for the mapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                prot,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::last_os("mmap", || name));
        }
        let Some(ptr) = NonNull::new(ptr.cast::<u8>()) else {
            return Err(Error::sys(
                "mmap",
                name,
                io::Error::from_raw_os_error(libc::EFAULT),
            ));
        };
        Ok(BarMapping {
            ptr,
            map_len,
            size,
            device: self.address,
            index,
        })
    }
}

/// A BAR mapped into this process ([`VfioPciDevice::map_bar`]), unmapped on
/// drop. Access goes through volatile reads and writes, bounded by the BAR
/// size and naturally aligned; anything else is [`Error::InvalidRange`].
///
/// The mapping keeps the device file open in the kernel on its own, so it may
/// outlive the [`VfioPciDevice`]. While the device's memory decode is off (or
/// it is resetting) VFIO has the pages unmapped, and an access raises
/// `SIGBUS`.
///
/// ```no_run
/// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
/// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
/// let bar = dev.map_bar(2)?;
/// bar.write_bytes(0x100, b"hello")?;
/// let mut back = [0u8; 5];
/// bar.read_bytes(0x100, &mut back)?;
/// assert_eq!(&back, b"hello");
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug)]
pub struct BarMapping {
    ptr: NonNull<u8>,
    map_len: usize,
    size: usize,
    device: PciAddress,
    index: u32,
}

// SAFETY: the mapping is device memory owned by this value; it is only
// accessed with volatile operations through `&self` (which MMIO tolerates
// from any thread) and unmapped once, in drop.
unsafe impl Send for BarMapping {}
// SAFETY: as above; shared access is volatile reads and writes only, with no
// Rust references into the memory.
unsafe impl Sync for BarMapping {}

/// The integer widths [`BarMapping`] reads and writes.
trait MmioValue: Copy {}
impl MmioValue for u8 {}
impl MmioValue for u16 {}
impl MmioValue for u32 {}
impl MmioValue for u64 {}

impl BarMapping {
    /// The BAR size in bytes (the accessible length).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// assert_eq!(bar.len() as u64, dev.bar(2)?.size());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.size
    }

    /// Whether the BAR is empty (never, for a mapped BAR).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// assert!(!bar.is_empty());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The device.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// assert_eq!(bar.device(), dev.address());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn device(&self) -> PciAddress {
        self.device
    }

    /// The BAR index.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// assert_eq!(bar.index(), 2);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The start of the mapping, for callers that need raw access (which must
    /// be volatile and within [`BarMapping::len`]).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// // SAFETY: inside the BAR, volatile.
    /// let first = unsafe { bar.as_ptr().read_volatile() };
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Volatile 8-bit read at `offset`.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// let b = bar.read_u8(3)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn read_u8(&self, offset: u64) -> Result<u8> {
        self.read(offset)
    }

    /// Volatile 16-bit read at `offset` (2-byte aligned).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// let h = bar.read_u16(2)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn read_u16(&self, offset: u64) -> Result<u16> {
        self.read(offset)
    }

    /// Volatile 32-bit read at `offset` (4-byte aligned).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// let w = bar.read_u32(4)?;
    /// assert!(bar.read_u32(2).is_err()); // misaligned
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn read_u32(&self, offset: u64) -> Result<u32> {
        self.read(offset)
    }

    /// Volatile 64-bit read at `offset` (8-byte aligned).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// let q = bar.read_u64(8)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn read_u64(&self, offset: u64) -> Result<u64> {
        self.read(offset)
    }

    /// Volatile 8-bit write at `offset`.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// bar.write_u8(3, 0xff)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn write_u8(&self, offset: u64, value: u8) -> Result<()> {
        self.write(offset, value)
    }

    /// Volatile 16-bit write at `offset` (2-byte aligned).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// bar.write_u16(2, 0xbeef)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn write_u16(&self, offset: u64, value: u16) -> Result<()> {
        self.write(offset, value)
    }

    /// Volatile 32-bit write at `offset` (4-byte aligned).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// bar.write_u32(4, 0xdead_beef)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn write_u32(&self, offset: u64, value: u32) -> Result<()> {
        self.write(offset, value)
    }

    /// Volatile 64-bit write at `offset` (8-byte aligned).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// bar.write_u64(8, u64::MAX)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn write_u64(&self, offset: u64, value: u64) -> Result<()> {
        self.write(offset, value)
    }

    /// Reads `buf.len()` bytes from `offset`, one volatile byte read each.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// let mut buf = [0u8; 16];
    /// bar.read_bytes(0, &mut buf)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let start = self.check(offset, buf.len(), 1)?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: `check` proved `start + buf.len() <= size <= map_len`,
            // so every byte read is inside the live mapping.
            *b = unsafe { self.ptr.as_ptr().wrapping_add(start + i).read_volatile() };
        }
        Ok(())
    }

    /// Writes `data` at `offset`, one volatile byte write each.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// # dev.set_memory_decode(true)?;
    /// # let bar = dev.map_bar(2)?;
    /// bar.write_bytes(0, b"hello")?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<()> {
        let start = self.check(offset, data.len(), 1)?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: `check` proved `start + data.len() <= size <= map_len`,
            // so every byte written is inside the live, writable mapping.
            unsafe { self.ptr.as_ptr().wrapping_add(start + i).write_volatile(*b) };
        }
        Ok(())
    }

    fn read<T: MmioValue>(&self, offset: u64) -> Result<T> {
        let at = self.check(offset, std::mem::size_of::<T>(), std::mem::align_of::<T>())?;
        // SAFETY: `check` proved the value lies inside the live mapping and is
        // naturally aligned (the mapping is page-aligned); every bit pattern
        // is a valid integer.
        Ok(unsafe {
            self.ptr
                .as_ptr()
                .wrapping_add(at)
                .cast::<T>()
                .read_volatile()
        })
    }

    fn write<T: MmioValue>(&self, offset: u64, value: T) -> Result<()> {
        let at = self.check(offset, std::mem::size_of::<T>(), std::mem::align_of::<T>())?;
        // SAFETY: `check` proved the value lies inside the live mapping and is
        // naturally aligned; no Rust reference points into device memory.
        unsafe {
            self.ptr
                .as_ptr()
                .wrapping_add(at)
                .cast::<T>()
                .write_volatile(value)
        };
        Ok(())
    }

    /// Checks `[offset, offset + len)` against the BAR and `align`; returns
    /// `offset` as a `usize`.
    fn check(&self, offset: u64, len: usize, align: usize) -> Result<usize> {
        let range = ByteRange::new(offset, len as u64);
        let invalid = |problem| Error::InvalidRange {
            target: format!(
                "{} BAR{} mapping ({})",
                self.device,
                self.index,
                human_size(self.size as u64)
            ),
            range,
            problem,
        };
        if !offset.is_multiple_of(align as u64) {
            return Err(invalid(RangeProblem::Unaligned {
                align: align as u64,
            }));
        }
        let end = range.end().ok_or_else(|| invalid(RangeProblem::Overflow))?;
        if end > self.size as u64 {
            return Err(invalid(RangeProblem::OutOfBounds {
                end,
                size: self.size as u64,
            }));
        }
        usize::try_from(offset).map_err(|_| invalid(RangeProblem::Overflow))
    }
}

impl Drop for BarMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`map_len` describe exactly the mapping made in
        // `map_bar`, unmapped only here; no references into it exist.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}
