//! The one place that calls `ioctl(2)`.
//!
//! Two layers:
//!
//! * **Raw, generic:** [`ioctl_none`] (safe: the argument is 0) and the
//!   `unsafe fn`s [`ioctl_with_ref`], [`ioctl_with_mut`], [`ioctl_with_cstr`]
//!   and [`ioctl_with_buf`], whose callers must guarantee
//!   that the argument matches what the request makes the kernel read or write.
//! * **Typed, safe:** one function per request the crate uses
//!   ([`dma_buf_sync`], [`udmabuf_create_list`], [`vfio_device_feature_dma_buf`],
//!   [`iommu_ioas_map_file`], ...). Each pairs a request number with its
//!   argument type once, fills in `argsz`/`size`, builds variable-length
//!   arguments with [`ArgBuf`], turns returned fds into [`OwnedFd`]s and
//!   restarts `DMA_BUF_IOCTL_SYNC` when the kernel says so. The rest of the
//!   crate calls these and needs no `unsafe` of its own for ioctls.
//!
//! Every function returns the ioctl's non-negative return value (several
//! requests return a new fd) or the `errno` as an [`io::Error`].
//!
//! The request that hands process memory to a device for DMA
//! ([`iommu_ioas_map`]) stays `unsafe`: the ioctl itself is harmless, but
//! afterwards a device may write those pages at any time.
//!
//! Only requests the public API uses have a wrapper here (the legacy VFIO
//! group/container requests, for one, have none: their numbers and structs
//! stay in [`crate::sys`]).
//!
//! The few other calls that need raw memory or a raw syscall live here too:
//! receiving fds over `SCM_RIGHTS` (the kernel installs fds), the
//! `SO_PASSRIGHTS` option libc lacks, and [`getdents64`], which nix does not
//! wrap.

use std::ffi::CStr;
use std::io;
use std::mem::{align_of, size_of, size_of_val};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use libc::{c_int, c_ulong, c_void};

use crate::sys;

// ---------------------------------------------------------------------------
// Raw layer
// ---------------------------------------------------------------------------

/// Converts an ioctl return value: negative means `errno` is set.
#[inline]
fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The request number in the type libc's `ioctl` prototype wants (glibc
/// `unsigned long`, musl `int`); the bits are the same.
#[allow(clippy::cast_lossless, clippy::cast_possible_wrap)]
const fn req(request: u32) -> libc::Ioctl {
    request as libc::Ioctl
}

/// `ioctl(fd, request, 0)`: a request without an argument.
///
/// Safe: a request that does take a pointer sees NULL and fails with `EFAULT`.
pub fn ioctl_none(fd: BorrowedFd<'_>, request: u32) -> io::Result<c_int> {
    // SAFETY: the argument is the integer 0, so the kernel cannot read or
    // write any of this process's memory through it; `fd` is open for the
    // duration of the call because it is borrowed.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req(request), 0 as c_ulong) };
    check(ret)
}

/// `ioctl(fd, request, arg)` where the kernel only reads `*arg`.
///
/// # Safety
///
/// `request` must be one whose argument is a pointer to a `T` (the same C
/// layout) that the kernel reads at most `size_of::<T>()` bytes of and never
/// writes. Pointers stored inside `*arg` must be valid for whatever the
/// request does with them.
pub unsafe fn ioctl_with_ref<T>(fd: BorrowedFd<'_>, request: u32, arg: &T) -> io::Result<c_int> {
    let ptr: *const T = arg;
    // SAFETY: `ptr` is valid for reads of `size_of::<T>()` bytes for the call,
    // and the caller guarantees the kernel reads no more and writes nothing.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req(request), ptr.cast::<c_void>()) };
    check(ret)
}

/// `ioctl(fd, request, arg)` where the kernel reads and/or writes `*arg`.
///
/// # Safety
///
/// `request` must be one whose argument is a pointer to a `T` (the same C
/// layout) that the kernel accesses at most `size_of::<T>()` bytes of, and
/// every byte pattern the kernel may write must leave a valid `T` (true for
/// the plain-data uAPI structs of [`crate::sys`]). Pointers stored inside
/// `*arg` must be valid for whatever the request does with them.
pub unsafe fn ioctl_with_mut<T>(
    fd: BorrowedFd<'_>,
    request: u32,
    arg: &mut T,
) -> io::Result<c_int> {
    let ptr: *mut T = arg;
    // SAFETY: `ptr` is valid for reads and writes of `size_of::<T>()` bytes and
    // not otherwise borrowed during the call; the caller guarantees the kernel
    // stays within them and writes only valid `T` contents.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req(request), ptr.cast::<c_void>()) };
    check(ret)
}

/// `ioctl(fd, request, s)` where the argument is a NUL-terminated string.
///
/// # Safety
///
/// `request` must only read a C string through its argument (like
/// `DMA_BUF_SET_NAME` or `VFIO_GROUP_GET_DEVICE_FD`).
pub unsafe fn ioctl_with_cstr(fd: BorrowedFd<'_>, request: u32, s: &CStr) -> io::Result<c_int> {
    // SAFETY: `s` is a valid NUL-terminated string for the call and the caller
    // guarantees the kernel only reads it (up to the NUL).
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req(request), s.as_ptr()) };
    check(ret)
}

/// `ioctl(fd, request, buf)` with a variable-length argument (a header and a
/// trailing array) built in an [`ArgBuf`].
///
/// # Safety
///
/// `request` must access at most `buf.len()` bytes of its argument, which
/// means the header in `buf` (`argsz`, counts) must describe no more than
/// `buf` holds; the kernel may write any bytes there. Pointers stored inside
/// `buf` must be valid for whatever the request does with them.
pub unsafe fn ioctl_with_buf(
    fd: BorrowedFd<'_>,
    request: u32,
    buf: &mut ArgBuf,
) -> io::Result<c_int> {
    let ptr = buf.as_mut_ptr();
    // SAFETY: `ptr` is valid for reads and writes of `buf.len()` bytes (all
    // initialised, 8-byte aligned) and unborrowed during the call; the caller
    // guarantees the kernel stays within them. Any bytes are valid contents.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), req(request), ptr) };
    check(ret)
}

/// Wraps a new fd returned by an ioctl.
#[inline]
fn owned_fd(fd: c_int) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful ioctl that creates and
    // installs a new file descriptor in this process; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// How many times an `EAGAIN` from a restartable request is retried.
pub const EAGAIN_RETRIES: u32 = 1000;

/// Runs `call` again while it fails with `EINTR` (always) or `EAGAIN` (up to
/// [`EAGAIN_RETRIES`] times, yielding the CPU in between): the treatment the
/// kernel asks for with `DMA_BUF_IOCTL_SYNC`.
pub fn retry_interrupted<F>(mut call: F) -> io::Result<c_int>
where
    F: FnMut() -> io::Result<c_int>,
{
    let mut eagain = 0;
    loop {
        match call() {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && eagain < EAGAIN_RETRIES => {
                eagain += 1;
                std::thread::yield_now();
            }
            other => return other,
        }
    }
}

// ---------------------------------------------------------------------------
// Variable-length arguments
// ---------------------------------------------------------------------------

/// Plain old data: a type whose bytes may be copied into and out of an
/// [`ArgBuf`].
///
/// # Safety
///
/// Implementors are `Copy`, have a fixed C layout (`#[repr(C)]` or a
/// primitive), contain **no padding bytes** (so every byte of a value is
/// initialised), no references or other lifetimes, and every bit pattern is a
/// valid value. Alignment must be at most 8.
pub unsafe trait Pod: Copy + 'static {}

macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: a primitive integer or a uAPI struct made only of
            // integers with explicit padding fields (no implicit padding, see
            // src/sys/tests.rs); every bit pattern is valid; align <= 8.
            unsafe impl Pod for $t {}
        )*
    };
}

pod!(u8, u16, u32, u64, i32, i64);
pod!(
    sys::dma_buf_sync,
    sys::dma_buf_export_sync_file,
    sys::dma_buf_import_sync_file,
    sys::udmabuf_create,
    sys::udmabuf_create_item,
    sys::dma_heap_allocation_data,
    sys::vfio_region_dma_range,
    sys::vfio_device_info,
    sys::vfio_region_info,
    sys::vfio_irq_info,
    sys::vfio_device_bind_iommufd,
    sys::vfio_device_attach_iommufd_pt,
    sys::vfio_device_detach_iommufd_pt,
    sys::iommu_destroy,
    sys::iommu_ioas_alloc,
    sys::iommu_iova_range,
    sys::iommu_ioas_allow_iovas,
    sys::iommu_ioas_iova_ranges,
    sys::iommu_ioas_map,
    sys::iommu_ioas_map_file,
    sys::iommu_ioas_copy,
    sys::iommu_ioas_unmap,
    sys::iommu_option,
);

/// A zero-initialised, 8-byte aligned argument buffer for ioctls that take a
/// header followed by a trailing array (`VFIO_DEVICE_FEATURE` with DMA
/// ranges, `UDMABUF_CREATE_LIST`, `VFIO_DEVICE_SET_IRQS`).
///
/// Backed by a `Vec<u64>`, so values are written at naturally aligned offsets
/// with plain copies and nothing is ever transmuted from unaligned bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArgBuf {
    words: Vec<u64>,
    len: usize,
}

impl ArgBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was pushed yet.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Grows the buffer with zero bytes to `len` bytes (never shrinks).
    fn grow_to(&mut self, len: usize) {
        if len > self.len {
            self.words.resize(len.div_ceil(8), 0);
            self.len = len;
        }
    }

    /// Pads with zero bytes up to a multiple of `align` (at most 8).
    pub fn align_to(&mut self, align: usize) {
        assert!(
            align.is_power_of_two() && align <= 8,
            "ArgBuf alignment must be 1, 2, 4 or 8"
        );
        self.grow_to(self.len.next_multiple_of(align));
    }

    /// Appends `value` at the next offset aligned for `T` (zero padding in
    /// between) and returns that offset.
    pub fn push<T: Pod>(&mut self, value: T) -> usize {
        self.push_slice(std::slice::from_ref(&value))
    }

    /// Appends `values` back to back, starting at the next offset aligned for
    /// `T`, and returns that offset.
    pub fn push_slice<T: Pod>(&mut self, values: &[T]) -> usize {
        self.align_to(align_of::<T>());
        let offset = self.len;
        self.grow_to(offset + size_of_val(values));
        self.write_bytes(offset, values);
        offset
    }

    /// Overwrites the `T` at `offset` (which must be aligned for `T` and
    /// inside the buffer), e.g. to patch a size field once the total is known.
    pub fn put<T: Pod>(&mut self, offset: usize, value: T) {
        self.check_range::<T>(offset);
        self.write_bytes(offset, std::slice::from_ref(&value));
    }

    /// Reads back the `T` at `offset` (aligned for `T`, inside the buffer).
    #[cfg(test)]
    pub fn get<T: Pod>(&self, offset: usize) -> T {
        self.check_range::<T>(offset);
        let src = &self.words_as_bytes()[offset..offset + size_of::<T>()];
        // SAFETY: `src` holds `size_of::<T>()` initialised bytes (zero-filled
        // or copied from a `Pod`); it starts at an 8-aligned base plus a
        // multiple of `align_of::<T>() <= 8`, so it is aligned for `T`; every
        // bit pattern is a valid `T` (`Pod`).
        unsafe { src.as_ptr().cast::<T>().read() }
    }

    /// The contents as bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.words_as_bytes()[..self.len]
    }

    /// All of `words` as bytes (`8 * words.len() >= len`).
    fn words_as_bytes(&self) -> &[u8] {
        let n = self.words.len() * 8;
        // SAFETY: `words` owns `n` initialised bytes, any byte is a valid
        // `u8`, and the slice borrows `self` immutably.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), n) }
    }

    /// All of `words` as mutable bytes.
    fn words_as_bytes_mut(&mut self) -> &mut [u8] {
        let n = self.words.len() * 8;
        // SAFETY: as in `words_as_bytes`, and `&mut self` makes the borrow
        // exclusive; writing any byte leaves every `u64` valid.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), n) }
    }

    /// Pointer to the start, for the kernel.
    fn as_mut_ptr(&mut self) -> *mut c_void {
        self.words.as_mut_ptr().cast()
    }

    fn check_range<T: Pod>(&self, offset: usize) {
        assert!(
            offset.is_multiple_of(align_of::<T>()) && offset + size_of::<T>() <= self.len,
            "ArgBuf access of {} bytes at offset {offset} is misaligned or past the end ({} bytes)",
            size_of::<T>(),
            self.len
        );
    }

    /// Copies the bytes of `values` to `offset`; the caller has grown the
    /// buffer and aligned `offset`.
    fn write_bytes<T: Pod>(&mut self, offset: usize, values: &[T]) {
        let n = size_of_val(values);
        // SAFETY: `T: Pod` has no padding, so all `n` bytes of `values` are
        // initialised; the slice covers exactly the memory of `values`.
        let src = unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), n) };
        self.words_as_bytes_mut()[offset..offset + n].copy_from_slice(src);
    }
}

/// `size_of` of a `u32`-headed uAPI struct as the `u32` its `argsz`/`size`
/// field wants.
#[allow(clippy::cast_possible_truncation)]
const fn argsz<T>() -> u32 {
    size_of::<T>() as u32
}

/// A byte count as a `u32` header field, or `EINVAL` if it does not fit.
fn len_u32(n: usize) -> io::Result<u32> {
    u32::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

// ---------------------------------------------------------------------------
// dma-buf
// ---------------------------------------------------------------------------

/// `DMA_BUF_IOCTL_SYNC` with `flags` (`DMA_BUF_SYNC_{READ,WRITE,RW}` |
/// `DMA_BUF_SYNC_{START,END}`), restarted on `EINTR`/`EAGAIN` as the kernel
/// asks.
pub fn dma_buf_sync(dmabuf: BorrowedFd<'_>, flags: u64) -> io::Result<()> {
    let arg = sys::dma_buf_sync { flags };
    retry_interrupted(|| {
        // SAFETY: DMA_BUF_IOCTL_SYNC is `_IOW('b', 0, struct dma_buf_sync)`:
        // the kernel reads one `dma_buf_sync` and writes nothing.
        unsafe { ioctl_with_ref(dmabuf, sys::DMA_BUF_IOCTL_SYNC, &arg) }
    })
    .map(drop)
}

/// `DMA_BUF_SET_NAME`: names the buffer (at most 31 bytes, else `EINVAL`).
pub fn dma_buf_set_name(dmabuf: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: DMA_BUF_SET_NAME takes a pointer to a C string the kernel only
    // reads (`strndup_user`).
    unsafe { ioctl_with_cstr(dmabuf, sys::DMA_BUF_SET_NAME, name) }.map(drop)
}

/// `DMA_BUF_IOCTL_EXPORT_SYNC_FILE`: a sync_file fd (always close-on-exec)
/// for the buffer's current fences (`flags`: `DMA_BUF_SYNC_READ`/`WRITE`).
pub fn dma_buf_export_sync_file(dmabuf: BorrowedFd<'_>, flags: u32) -> io::Result<OwnedFd> {
    let mut arg = sys::dma_buf_export_sync_file { flags, fd: -1 };
    // SAFETY: `_IOWR('b', 2, struct dma_buf_export_sync_file)`: the kernel
    // reads and writes back exactly this struct (plain integers).
    unsafe { ioctl_with_mut(dmabuf, sys::DMA_BUF_IOCTL_EXPORT_SYNC_FILE, &mut arg) }?;
    Ok(owned_fd(arg.fd))
}

/// `DMA_BUF_IOCTL_IMPORT_SYNC_FILE`: adds the fence of `sync_file` as a read
/// or write fence (`flags`).
pub fn dma_buf_import_sync_file(
    dmabuf: BorrowedFd<'_>,
    flags: u32,
    sync_file: BorrowedFd<'_>,
) -> io::Result<()> {
    let arg = sys::dma_buf_import_sync_file {
        flags,
        fd: sync_file.as_raw_fd(),
    };
    // SAFETY: `_IOW('b', 3, struct dma_buf_import_sync_file)`: the kernel only
    // reads this struct.
    unsafe { ioctl_with_ref(dmabuf, sys::DMA_BUF_IOCTL_IMPORT_SYNC_FILE, &arg) }.map(drop)
}

// ---------------------------------------------------------------------------
// udmabuf
// ---------------------------------------------------------------------------

/// `UDMABUF_CREATE` on `/dev/udmabuf`: a dma-buf of one memfd range.
pub fn udmabuf_create(
    udmabuf_dev: BorrowedFd<'_>,
    arg: &sys::udmabuf_create,
) -> io::Result<OwnedFd> {
    // SAFETY: `_IOW('u', 0x42, struct udmabuf_create)`: the kernel reads this
    // struct (integers only) and writes nothing.
    let fd = unsafe { ioctl_with_ref(udmabuf_dev, sys::UDMABUF_CREATE, arg) }?;
    Ok(owned_fd(fd))
}

/// The argument of `UDMABUF_CREATE_LIST`: the header (`flags`, `count =
/// items.len()`) followed by the items.
pub fn udmabuf_create_list_arg(
    flags: u32,
    items: &[sys::udmabuf_create_item],
) -> io::Result<ArgBuf> {
    let mut buf = ArgBuf::new();
    buf.push::<u32>(flags);
    buf.push::<u32>(len_u32(items.len())?);
    buf.push_slice(items);
    Ok(buf)
}

/// `UDMABUF_CREATE_LIST` on `/dev/udmabuf`: one dma-buf over several memfd
/// ranges.
pub fn udmabuf_create_list(
    udmabuf_dev: BorrowedFd<'_>,
    flags: u32,
    items: &[sys::udmabuf_create_item],
) -> io::Result<OwnedFd> {
    let mut buf = udmabuf_create_list_arg(flags, items)?;
    // SAFETY: the kernel reads the 8-byte header, then `count * 24` bytes of
    // items; `count` is `items.len()` and the buffer holds exactly that many
    // items after the header. Nothing is written back.
    let fd = unsafe { ioctl_with_buf(udmabuf_dev, sys::UDMABUF_CREATE_LIST, &mut buf) }?;
    Ok(owned_fd(fd))
}

// ---------------------------------------------------------------------------
// dma-heap
// ---------------------------------------------------------------------------

/// `DMA_HEAP_IOCTL_ALLOC` on `/dev/dma_heap/<name>`: allocates `len` bytes
/// (rounded up to a page); `fd_flags` are `O_RDWR | O_CLOEXEC` and the like.
pub fn dma_heap_alloc(
    heap: BorrowedFd<'_>,
    len: u64,
    fd_flags: u32,
    heap_flags: u64,
) -> io::Result<OwnedFd> {
    let mut arg = sys::dma_heap_allocation_data {
        len,
        fd: 0,
        fd_flags,
        heap_flags,
    };
    // SAFETY: `_IOWR('H', 0, struct dma_heap_allocation_data)`: the kernel
    // reads and writes back exactly this struct (integers only).
    unsafe { ioctl_with_mut(heap, sys::DMA_HEAP_IOCTL_ALLOC, &mut arg) }?;
    let fd = c_int::try_from(arg.fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    Ok(owned_fd(fd))
}

// ---------------------------------------------------------------------------
// VFIO: device
// ---------------------------------------------------------------------------

/// `VFIO_DEVICE_GET_INFO`.
pub fn vfio_device_get_info(device: BorrowedFd<'_>) -> io::Result<sys::vfio_device_info> {
    let mut arg = sys::vfio_device_info {
        argsz: argsz::<sys::vfio_device_info>(),
        ..Default::default()
    };
    // SAFETY: the kernel writes back at most `argsz` bytes, i.e. this struct
    // (integers only); capability chains beyond it are not requested.
    unsafe { ioctl_with_mut(device, sys::VFIO_DEVICE_GET_INFO, &mut arg) }?;
    Ok(arg)
}

/// `VFIO_DEVICE_GET_REGION_INFO` for region `index` (fixed part only; the
/// `CAPS` flag may say a capability chain exists that was not fetched).
pub fn vfio_device_get_region_info(
    device: BorrowedFd<'_>,
    index: u32,
) -> io::Result<sys::vfio_region_info> {
    let mut arg = sys::vfio_region_info {
        argsz: argsz::<sys::vfio_region_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: the kernel writes back at most `argsz` bytes, i.e. this struct
    // (integers only).
    unsafe { ioctl_with_mut(device, sys::VFIO_DEVICE_GET_REGION_INFO, &mut arg) }?;
    Ok(arg)
}

/// `VFIO_DEVICE_GET_IRQ_INFO` for IRQ `index`.
pub fn vfio_device_get_irq_info(
    device: BorrowedFd<'_>,
    index: u32,
) -> io::Result<sys::vfio_irq_info> {
    let mut arg = sys::vfio_irq_info {
        argsz: argsz::<sys::vfio_irq_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: the kernel reads and writes back this struct (integers only).
    unsafe { ioctl_with_mut(device, sys::VFIO_DEVICE_GET_IRQ_INFO, &mut arg) }?;
    Ok(arg)
}

/// The data part of `VFIO_DEVICE_SET_IRQS`; it also decides the
/// `VFIO_IRQ_SET_DATA_*` flag and the `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqData<'a> {
    /// `DATA_NONE` for `count` vectors (`count == 0` with `ACTION_TRIGGER`
    /// disables the index).
    None {
        /// Number of vectors from `start`.
        count: u32,
    },
    /// `DATA_EVENTFD`: one eventfd per vector, `-1` to unregister it.
    Eventfd(&'a [RawFd]),
}

/// The argument of `VFIO_DEVICE_SET_IRQS`: the `vfio_irq_set` header with
/// `argsz`, `count` and the data flag derived from `data`, then the data.
pub fn vfio_irq_set_arg(
    action: u32,
    index: u32,
    start: u32,
    data: IrqData<'_>,
) -> io::Result<ArgBuf> {
    let mut buf = ArgBuf::new();
    let (data_flag, count) = match data {
        IrqData::None { count } => (sys::VFIO_IRQ_SET_DATA_NONE, count),
        IrqData::Eventfd(v) => (sys::VFIO_IRQ_SET_DATA_EVENTFD, len_u32(v.len())?),
    };
    let argsz_at = buf.push::<u32>(0);
    buf.push::<u32>((action & sys::VFIO_IRQ_SET_ACTION_TYPE_MASK) | data_flag);
    buf.push::<u32>(index);
    buf.push::<u32>(start);
    buf.push::<u32>(count);
    match data {
        IrqData::None { .. } => {}
        IrqData::Eventfd(v) => {
            buf.push_slice::<i32>(v);
        }
    }
    let total = len_u32(buf.len())?;
    buf.put::<u32>(argsz_at, total);
    Ok(buf)
}

/// `VFIO_DEVICE_SET_IRQS`: `action` is one of `VFIO_IRQ_SET_ACTION_{MASK,
/// UNMASK,TRIGGER}`.
pub fn vfio_device_set_irqs(
    device: BorrowedFd<'_>,
    action: u32,
    index: u32,
    start: u32,
    data: IrqData<'_>,
) -> io::Result<()> {
    let mut buf = vfio_irq_set_arg(action, index, start, data)?;
    // SAFETY: the kernel reads the 20-byte header, checks `argsz` against
    // header + `count` * data size, and reads that much; `argsz` is the
    // buffer's length and `count` the number of data elements in it. Eventfd
    // numbers are looked up by the kernel, not dereferenced here.
    unsafe { ioctl_with_buf(device, sys::VFIO_DEVICE_SET_IRQS, &mut buf) }.map(drop)
}

/// `VFIO_DEVICE_RESET` (revokes and restores the device's dma-bufs).
pub fn vfio_device_reset(device: BorrowedFd<'_>) -> io::Result<()> {
    ioctl_none(device, sys::VFIO_DEVICE_RESET).map(drop)
}

/// `VFIO_DEVICE_FEATURE` with `VFIO_DEVICE_FEATURE_PROBE | feature | get_set`
/// (`get_set` holds `VFIO_DEVICE_FEATURE_GET` and/or `_SET`): `Ok` if the
/// device supports that use of the feature.
pub fn vfio_device_feature_probe(
    device: BorrowedFd<'_>,
    feature: u32,
    get_set: u32,
) -> io::Result<()> {
    let mut buf = ArgBuf::new();
    buf.push::<u32>(argsz::<sys::vfio_device_feature>());
    buf.push::<u32>(
        sys::VFIO_DEVICE_FEATURE_PROBE | (feature & sys::VFIO_DEVICE_FEATURE_MASK) | get_set,
    );
    // SAFETY: with PROBE the kernel reads the 8-byte header (argsz = 8) and
    // touches no feature data.
    unsafe { ioctl_with_buf(device, sys::VFIO_DEVICE_FEATURE, &mut buf) }.map(drop)
}

/// The argument of `VFIO_DEVICE_FEATURE` GET `VFIO_DEVICE_FEATURE_DMA_BUF`:
/// `vfio_device_feature` header, `vfio_device_feature_dma_buf` with
/// `nr_ranges = ranges.len()` and `flags = 0`, then the ranges.
pub fn vfio_dma_buf_feature_arg(
    region_index: u32,
    open_flags: u32,
    ranges: &[sys::vfio_region_dma_range],
) -> io::Result<ArgBuf> {
    let mut buf = ArgBuf::new();
    let argsz_at = buf.push::<u32>(0);
    buf.push::<u32>(sys::VFIO_DEVICE_FEATURE_GET | sys::VFIO_DEVICE_FEATURE_DMA_BUF);
    buf.push::<u32>(region_index);
    buf.push::<u32>(open_flags);
    buf.push::<u32>(0);
    buf.push::<u32>(len_u32(ranges.len())?);
    buf.push_slice(ranges);
    let total = len_u32(buf.len())?;
    buf.put::<u32>(argsz_at, total);
    Ok(buf)
}

/// `VFIO_DEVICE_FEATURE` GET `VFIO_DEVICE_FEATURE_DMA_BUF`: exports `ranges`
/// (offsets within BAR `region_index`) as one dma-buf; `open_flags` such as
/// `O_RDWR | O_CLOEXEC`.
pub fn vfio_device_feature_dma_buf(
    device: BorrowedFd<'_>,
    region_index: u32,
    open_flags: u32,
    ranges: &[sys::vfio_region_dma_range],
) -> io::Result<OwnedFd> {
    let mut buf = vfio_dma_buf_feature_arg(region_index, open_flags, ranges)?;
    // SAFETY: the kernel reads the 8-byte header, the 16-byte feature struct
    // and `nr_ranges * 16` bytes of ranges; `nr_ranges` is `ranges.len()` and
    // all of them are in the buffer, whose length is `argsz`. The DMA_BUF GET
    // writes nothing back; the return value is the new dma-buf fd.
    let fd = unsafe { ioctl_with_buf(device, sys::VFIO_DEVICE_FEATURE, &mut buf) }?;
    Ok(owned_fd(fd))
}

/// The argument of a one-range DMA_BUF export, laid out as the kernel reads
/// it (40 bytes): built on the stack, so the common export allocates nothing.
#[repr(C)]
#[derive(Debug)]
pub struct DmaBufOneRangeArg {
    hdr: sys::vfio_device_feature,
    feat: sys::vfio_device_feature_dma_buf,
    range: sys::vfio_region_dma_range,
}

impl DmaBufOneRangeArg {
    /// GET `VFIO_DEVICE_FEATURE_DMA_BUF` of `range` of BAR `region_index`.
    pub fn new(region_index: u32, open_flags: u32, range: sys::vfio_region_dma_range) -> Self {
        Self {
            hdr: sys::vfio_device_feature {
                argsz: argsz::<Self>(),
                flags: sys::VFIO_DEVICE_FEATURE_GET | sys::VFIO_DEVICE_FEATURE_DMA_BUF,
                data: sys::__IncompleteArrayField::new(),
            },
            feat: sys::vfio_device_feature_dma_buf {
                region_index,
                open_flags,
                flags: 0,
                nr_ranges: 1,
                dma_ranges: sys::__IncompleteArrayField::new(),
            },
            range,
        }
    }
}

/// [`vfio_device_feature_dma_buf`] of exactly one range, its argument on the
/// stack: the hot path of a BAR export.
#[inline]
pub fn vfio_device_feature_dma_buf_one(
    device: BorrowedFd<'_>,
    region_index: u32,
    open_flags: u32,
    range: sys::vfio_region_dma_range,
) -> io::Result<OwnedFd> {
    let mut arg = DmaBufOneRangeArg::new(region_index, open_flags, range);
    // SAFETY: `argsz` is the struct's 40 bytes: the header, the feature part
    // with `nr_ranges = 1` and that one range, which is all the kernel reads;
    // it writes nothing back and returns the new dma-buf fd.
    let fd = unsafe { ioctl_with_mut(device, sys::VFIO_DEVICE_FEATURE, &mut arg) }?;
    Ok(owned_fd(fd))
}

/// `VFIO_DEVICE_BIND_IOMMUFD` (cdev): binds the device to `iommufd`; returns
/// the iommufd device ID (`out_devid`).
pub fn vfio_device_bind_iommufd(
    device: BorrowedFd<'_>,
    iommufd: BorrowedFd<'_>,
) -> io::Result<u32> {
    let mut arg = sys::vfio_device_bind_iommufd {
        argsz: argsz::<sys::vfio_device_bind_iommufd>(),
        flags: 0,
        iommufd: iommufd.as_raw_fd(),
        out_devid: 0,
        token_uuid_ptr: 0,
    };
    // SAFETY: the kernel reads this struct and writes `out_devid` back; the
    // token pointer is not used because `flags` lacks BIND_FLAG_TOKEN.
    unsafe { ioctl_with_mut(device, sys::VFIO_DEVICE_BIND_IOMMUFD, &mut arg) }?;
    Ok(arg.out_devid)
}

/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` (cdev): attaches to IOAS or HWPT `pt_id`;
/// returns the ID written back (the auto-created HWPT when given an IOAS).
pub fn vfio_device_attach_iommufd_pt(device: BorrowedFd<'_>, pt_id: u32) -> io::Result<u32> {
    let mut arg = sys::vfio_device_attach_iommufd_pt {
        argsz: argsz::<sys::vfio_device_attach_iommufd_pt>(),
        flags: 0,
        pt_id,
        pasid: 0,
    };
    // SAFETY: the kernel reads and writes back this struct (integers only).
    unsafe { ioctl_with_mut(device, sys::VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut arg) }?;
    Ok(arg.pt_id)
}

/// `VFIO_DEVICE_DETACH_IOMMUFD_PT` (cdev).
pub fn vfio_device_detach_iommufd_pt(device: BorrowedFd<'_>) -> io::Result<()> {
    let arg = sys::vfio_device_detach_iommufd_pt {
        argsz: argsz::<sys::vfio_device_detach_iommufd_pt>(),
        flags: 0,
        pasid: 0,
    };
    // SAFETY: the kernel only reads this struct (integers only).
    unsafe { ioctl_with_ref(device, sys::VFIO_DEVICE_DETACH_IOMMUFD_PT, &arg) }.map(drop)
}

// ---------------------------------------------------------------------------
// iommufd
// ---------------------------------------------------------------------------

/// `IOMMU_DESTROY`: destroys object `id` (IOAS, HWPT, ...).
pub fn iommu_destroy(iommufd: BorrowedFd<'_>, id: u32) -> io::Result<()> {
    let arg = sys::iommu_destroy {
        size: argsz::<sys::iommu_destroy>(),
        id,
    };
    // SAFETY: the kernel only reads this struct (integers only).
    unsafe { ioctl_with_ref(iommufd, sys::IOMMU_DESTROY, &arg) }.map(drop)
}

/// `IOMMU_IOAS_ALLOC`: returns the new IOAS ID.
pub fn iommu_ioas_alloc(iommufd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut arg = sys::iommu_ioas_alloc {
        size: argsz::<sys::iommu_ioas_alloc>(),
        flags: 0,
        out_ioas_id: 0,
    };
    // SAFETY: the kernel reads and writes back this struct (integers only).
    unsafe { ioctl_with_mut(iommufd, sys::IOMMU_IOAS_ALLOC, &mut arg) }?;
    Ok(arg.out_ioas_id)
}

/// `IOMMU_IOAS_ALLOW_IOVAS`: replaces the IOAS's allowed IOVA list with
/// `ranges` (inclusive `start..=last`).
pub fn iommu_ioas_allow_iovas(
    iommufd: BorrowedFd<'_>,
    ioas_id: u32,
    ranges: &[sys::iommu_iova_range],
) -> io::Result<()> {
    let arg = sys::iommu_ioas_allow_iovas {
        size: argsz::<sys::iommu_ioas_allow_iovas>(),
        ioas_id,
        num_iovas: len_u32(ranges.len())?,
        __reserved: 0,
        allowed_iovas: ranges.as_ptr() as u64,
    };
    // SAFETY: the kernel reads this struct and `num_iovas` ranges from
    // `allowed_iovas`, which points at exactly that many live ranges; it
    // writes nothing.
    unsafe { ioctl_with_ref(iommufd, sys::IOMMU_IOAS_ALLOW_IOVAS, &arg) }.map(drop)
}

/// `IOMMU_IOAS_IOVA_RANGES`: fills `out` with the IOAS's usable IOVA ranges
/// and returns how many the IOAS has and the required alignment
/// (`out_iova_alignment`). The kernel's `EMSGSIZE` (more ranges than `out`
/// holds) is reported as `Ok` with a count larger than `out.len()`: only
/// `out.len()` were written; ask again with a larger slice.
pub fn iommu_ioas_iova_ranges(
    iommufd: BorrowedFd<'_>,
    ioas_id: u32,
    out: &mut [sys::iommu_iova_range],
) -> io::Result<(u32, u64)> {
    let mut arg = sys::iommu_ioas_iova_ranges {
        size: argsz::<sys::iommu_ioas_iova_ranges>(),
        ioas_id,
        num_iovas: len_u32(out.len())?,
        __reserved: 0,
        allowed_iovas: out.as_mut_ptr() as u64,
        out_iova_alignment: 0,
    };
    // SAFETY: the kernel writes at most `num_iovas` ranges to `allowed_iovas`,
    // which points at `out`, exclusively borrowed and exactly that long;
    // `iommu_iova_range` is two `u64`s, valid for any bytes. It reads and
    // writes back the struct itself (integers only).
    let ret = unsafe { ioctl_with_mut(iommufd, sys::IOMMU_IOAS_IOVA_RANGES, &mut arg) };
    match ret {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {}
        Err(e) => return Err(e),
    }
    Ok((arg.num_iovas, arg.out_iova_alignment))
}

/// `IOMMU_IOAS_MAP`: maps `arg.length` bytes of this process's memory at
/// `arg.user_va` into IOAS `arg.ioas_id`; returns the IOVA used. `size` is
/// filled in.
///
/// # Safety
///
/// After this returns, devices attached to the IOAS may read and write that
/// memory at any time until it is unmapped; the caller must keep it alive
/// that long and must not let Rust code hold references into it that such
/// writes would invalidate.
pub unsafe fn iommu_ioas_map(
    iommufd: BorrowedFd<'_>,
    arg: &sys::iommu_ioas_map,
) -> io::Result<u64> {
    let mut arg = sys::iommu_ioas_map {
        size: argsz::<sys::iommu_ioas_map>(),
        ..*arg
    };
    // SAFETY: the kernel reads and writes back this struct (integers only;
    // `user_va` is pinned, not written, by the ioctl); device access to that
    // memory is the caller's responsibility (see `# Safety`).
    unsafe { ioctl_with_mut(iommufd, sys::IOMMU_IOAS_MAP, &mut arg) }?;
    Ok(arg.iova)
}

/// `IOMMU_IOAS_MAP_FILE`: maps `arg.length` bytes at `arg.start` of the memfd
/// or dma-buf `arg.fd` into IOAS `arg.ioas_id`; returns the IOVA used.
/// `size` is filled in.
#[inline]
pub fn iommu_ioas_map_file(
    iommufd: BorrowedFd<'_>,
    arg: &sys::iommu_ioas_map_file,
) -> io::Result<u64> {
    let mut arg = sys::iommu_ioas_map_file {
        size: argsz::<sys::iommu_ioas_map_file>(),
        ..*arg
    };
    // SAFETY: the kernel reads and writes back this struct (integers only);
    // `fd` is looked up in the fd table, no process memory is involved.
    unsafe { ioctl_with_mut(iommufd, sys::IOMMU_IOAS_MAP_FILE, &mut arg) }?;
    Ok(arg.iova)
}

/// `IOMMU_IOAS_COPY`: maps an existing area of one IOAS into another;
/// returns the destination IOVA. `size` is filled in.
pub fn iommu_ioas_copy(iommufd: BorrowedFd<'_>, arg: &sys::iommu_ioas_copy) -> io::Result<u64> {
    let mut arg = sys::iommu_ioas_copy {
        size: argsz::<sys::iommu_ioas_copy>(),
        ..*arg
    };
    // SAFETY: the kernel reads and writes back this struct (integers only).
    unsafe { ioctl_with_mut(iommufd, sys::IOMMU_IOAS_COPY, &mut arg) }?;
    Ok(arg.dst_iova)
}

/// `IOMMU_IOAS_UNMAP`: unmaps whole areas within `iova..iova+length`
/// (`iova = 0, length = u64::MAX` unmaps all); returns the bytes unmapped.
#[inline]
pub fn iommu_ioas_unmap(
    iommufd: BorrowedFd<'_>,
    ioas_id: u32,
    iova: u64,
    length: u64,
) -> io::Result<u64> {
    let mut arg = sys::iommu_ioas_unmap {
        size: argsz::<sys::iommu_ioas_unmap>(),
        ioas_id,
        iova,
        length,
    };
    // SAFETY: the kernel reads and writes back this struct (integers only).
    unsafe { ioctl_with_mut(iommufd, sys::IOMMU_IOAS_UNMAP, &mut arg) }?;
    Ok(arg.length)
}

/// `IOMMU_OPTION`: gets or sets an option; the result (for GET) is in the
/// returned struct's `val64`. `size` is filled in.
pub fn iommu_option(
    iommufd: BorrowedFd<'_>,
    arg: &sys::iommu_option,
) -> io::Result<sys::iommu_option> {
    let mut arg = sys::iommu_option {
        size: argsz::<sys::iommu_option>(),
        ..*arg
    };
    // SAFETY: the kernel reads and writes back this struct (integers only).
    unsafe { ioctl_with_mut(iommufd, sys::IOMMU_OPTION, &mut arg) }?;
    Ok(arg)
}

/// `IOMMU_TEST_CMD` / `IOMMU_TEST_OP_DMABUF_GET` (kernels with
/// `CONFIG_IOMMUFD_TEST` only): a mock, revocable dma-buf of `length` bytes.
pub fn iommu_test_dmabuf_get(
    iommufd: BorrowedFd<'_>,
    length: u32,
    open_flags: u32,
) -> io::Result<OwnedFd> {
    let mut cmd = sys::iommufd_test::iommu_test_cmd::dmabuf_get(length, open_flags);
    // SAFETY: the selftest command reads this struct (`size` is its full
    // size) and may write it back; it is plain integers in a union whose
    // every member is plain integers.
    let fd = unsafe { ioctl_with_mut(iommufd, sys::iommufd_test::IOMMU_TEST_CMD, &mut cmd) }?;
    Ok(owned_fd(fd))
}

/// `IOMMU_TEST_CMD` / `IOMMU_TEST_OP_DMABUF_REVOKE`: revokes or restores a
/// mock dma-buf from [`iommu_test_dmabuf_get`].
pub fn iommu_test_dmabuf_revoke(
    iommufd: BorrowedFd<'_>,
    dmabuf: BorrowedFd<'_>,
    revoked: bool,
) -> io::Result<()> {
    let mut cmd = sys::iommufd_test::iommu_test_cmd::dmabuf_revoke(dmabuf.as_raw_fd(), revoked);
    // SAFETY: as in `iommu_test_dmabuf_get`: a plain-integer struct of the
    // full selftest command size.
    unsafe { ioctl_with_mut(iommufd, sys::iommufd_test::IOMMU_TEST_CMD, &mut cmd) }.map(drop)
}

// ---------------------------------------------------------------------------
// rust-vmm handles (feature `rust-vmm`)
// ---------------------------------------------------------------------------

/// A duplicate (close-on-exec) of the VFIO cdev fd a rust-vmm
/// `VfioDevice` owns. Not an ioctl, but the one other place that must name
/// an fd by number: rust-vmm's types offer `AsRawFd` only.
#[cfg(feature = "rust-vmm")]
pub fn dup_vfio_device(device: &vfio_ioctls::VfioDevice) -> io::Result<OwnedFd> {
    // SAFETY: `VfioDevice` owns the `File` whose fd `as_raw_fd` returns and
    // closes it only when dropped; `device` is borrowed for this whole
    // call, so the fd is open and names that file while it is duplicated.
    let fd = unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) };
    fd.try_clone_to_owned()
}

/// A duplicate (close-on-exec) of the `/dev/iommu` fd a rust-vmm `IommuFd`
/// owns (see [`dup_vfio_device`]).
#[cfg(feature = "rust-vmm")]
pub fn dup_iommufd(iommufd: &iommufd_ioctls::IommuFd) -> io::Result<OwnedFd> {
    // SAFETY: `IommuFd` owns the `File` whose fd `as_raw_fd` returns and
    // closes it only when dropped; `iommufd` is borrowed for this whole
    // call, so the fd is open and names that file while it is duplicated.
    let fd = unsafe { BorrowedFd::borrow_raw(iommufd.as_raw_fd()) };
    fd.try_clone_to_owned()
}

// ---------------------------------------------------------------------------
// DRM (feature `drm`)
// ---------------------------------------------------------------------------

/// `DRM_IOCTL_VERSION`: the name of the driver behind a DRM fd
/// (`virtio_gpu`, `amdgpu`, ...). Asks for the length first, then the name.
#[cfg(feature = "drm")]
pub fn drm_driver_name(drm: BorrowedFd<'_>) -> io::Result<String> {
    let mut arg = sys::drm_version::default();
    // SAFETY: `DRM_IOWR(0x00, struct drm_version)`: with every length 0 the
    // kernel copies no string (`drm_copy_field` copies at most the given
    // length) and writes back the struct's integers, including the lengths.
    unsafe { ioctl_with_mut(drm, sys::DRM_IOCTL_VERSION, &mut arg) }?;
    // A driver name is a few bytes; refuse an absurd length.
    let len = usize::try_from(arg.name_len)
        .ok()
        .filter(|n| *n <= 4096)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let mut name = vec![0u8; len];
    let mut arg = sys::drm_version {
        name_len: arg.name_len,
        name: name.as_mut_ptr().cast(),
        ..sys::drm_version::default()
    };
    // SAFETY: as above; now the kernel also writes at most `name_len` bytes
    // to `name`, which `name` has room for; date and desc stay 0 and null.
    unsafe { ioctl_with_mut(drm, sys::DRM_IOCTL_VERSION, &mut arg) }?;
    name.truncate(usize::try_from(arg.name_len).map_or(len, |n| n.min(len)));
    Ok(String::from_utf8_lossy(&name).into_owned())
}

/// `DRM_IOCTL_PRIME_FD_TO_HANDLE`: imports `dmabuf` into the DRM device as a
/// GEM object (or finds this file's handle for it) and returns the handle.
#[cfg(feature = "drm")]
pub fn drm_prime_fd_to_handle(drm: BorrowedFd<'_>, dmabuf: BorrowedFd<'_>) -> io::Result<u32> {
    let mut arg = sys::drm_prime_handle {
        handle: 0,
        flags: 0,
        fd: dmabuf.as_raw_fd(),
    };
    // SAFETY: `DRM_IOWR(0x2e, struct drm_prime_handle)`: the kernel reads and
    // writes back exactly this struct of integers.
    unsafe { ioctl_with_mut(drm, sys::DRM_IOCTL_PRIME_FD_TO_HANDLE, &mut arg) }?;
    Ok(arg.handle)
}

/// `DRM_IOCTL_GEM_CLOSE`: drops GEM handle `handle` of this DRM file.
#[cfg(feature = "drm")]
pub fn drm_gem_close(drm: BorrowedFd<'_>, handle: u32) -> io::Result<()> {
    let arg = sys::drm_gem_close { handle, pad: 0 };
    // SAFETY: `DRM_IOW(0x09, struct drm_gem_close)`: the kernel only reads it.
    unsafe { ioctl_with_ref(drm, sys::DRM_IOCTL_GEM_CLOSE, &arg) }.map(drop)
}

/// `DRM_IOCTL_VIRTGPU_GETPARAM`: one of virtio-gpu's `VIRTGPU_PARAM_*`
/// values (`EINVAL` for a parameter the driver does not know).
#[cfg(feature = "drm")]
pub fn virtgpu_getparam(drm: BorrowedFd<'_>, param: u32) -> io::Result<i32> {
    let mut value: c_int = 0;
    let ptr: *mut c_int = &mut value;
    let mut arg = sys::drm_virtgpu_getparam {
        param: u64::from(param),
        value: ptr as u64,
    };
    // SAFETY: `DRM_IOWR(0x43, struct drm_virtgpu_getparam)`: the kernel reads
    // the struct and writes one `int` through `value`, which points at
    // `value`, live and unborrowed for the call.
    unsafe { ioctl_with_mut(drm, sys::DRM_IOCTL_VIRTGPU_GETPARAM, &mut arg) }?;
    Ok(value)
}

// ---------------------------------------------------------------------------
// Directory entries (getdents64)
// ---------------------------------------------------------------------------
//
// Not an ioctl: a syscall nix does not wrap. nix's `Dir` (like std's
// `read_dir`) reads through libc's `readdir`, into a buffer libc allocates
// and the kernel may fault in while it writes; `crate::dir` needs the
// kernel to write into a buffer the caller has already written (see there
// why).

/// One `getdents64(2)` of `dir` into `buf`: the bytes of whole
/// `struct linux_dirent64` records written (0 at the end of the directory).
pub fn getdents64(dir: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes at `buf`, which is
    // valid for writes for the whole call; `dir` stays open because it is
    // borrowed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            dir.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::mem::offset_of;
    use std::os::fd::AsFd;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(ret, 0, "pipe2: {}", io::Error::last_os_error());
        (owned_fd(fds[0]), owned_fd(fds[1]))
    }

    fn errno(r: io::Result<impl std::fmt::Debug>) -> Option<i32> {
        r.expect_err("ioctl unexpectedly succeeded").raw_os_error()
    }

    #[test]
    fn unknown_requests_on_a_pipe_give_enotty() {
        let (r, _w) = pipe();
        let fd = r.as_fd();
        assert_eq!(
            errno(ioctl_none(fd, sys::VFIO_DEVICE_RESET)),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            errno(vfio_device_feature_probe(
                fd,
                sys::VFIO_DEVICE_FEATURE_DMA_BUF,
                sys::VFIO_DEVICE_FEATURE_GET
            )),
            Some(libc::ENOTTY)
        );
        let option = sys::iommu_option {
            option_id: sys::IOMMU_OPTION_RLIMIT_MODE,
            op: 1,
            ..Default::default()
        };
        assert_eq!(errno(iommu_option(fd, &option)), Some(libc::ENOTTY));
        assert_eq!(
            errno(iommu_ioas_allow_iovas(
                fd,
                1,
                &[sys::iommu_iova_range {
                    start: 0x1000,
                    last: 0x1fff
                }]
            )),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            errno(iommu_ioas_copy(fd, &sys::iommu_ioas_copy::default())),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            errno(dma_buf_sync(
                fd,
                u64::from(sys::DMA_BUF_SYNC_START | sys::DMA_BUF_SYNC_RW)
            )),
            Some(libc::ENOTTY)
        );
        assert_eq!(errno(dma_buf_set_name(fd, c"name")), Some(libc::ENOTTY));
        assert_eq!(
            errno(dma_buf_export_sync_file(fd, sys::DMA_BUF_SYNC_READ)),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            errno(udmabuf_create_list(
                fd,
                0,
                &[sys::udmabuf_create_item::default(); 3]
            )),
            Some(libc::ENOTTY)
        );
        assert_eq!(errno(dma_heap_alloc(fd, 4096, 0, 0)), Some(libc::ENOTTY));
        let ranges = [sys::vfio_region_dma_range {
            offset: 0,
            length: 4096,
        }];
        assert_eq!(
            errno(vfio_device_feature_dma_buf(fd, 2, 0, &ranges)),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            errno(vfio_device_set_irqs(
                fd,
                sys::VFIO_IRQ_SET_ACTION_TRIGGER,
                4,
                0,
                IrqData::Eventfd(&[-1])
            )),
            Some(libc::ENOTTY)
        );
        let mut out = [sys::iommu_iova_range::default(); 2];
        assert_eq!(
            errno(iommu_ioas_iova_ranges(fd, 1, &mut out)),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            errno(iommu_test_dmabuf_get(fd, 4096, 0)),
            Some(libc::ENOTTY)
        );
        assert_eq!(
            errno(iommu_test_dmabuf_revoke(fd, fd, true)),
            Some(libc::ENOTTY)
        );
    }

    #[test]
    fn with_mut_reads_back_what_the_kernel_wrote() {
        // FIONREAD is a real ioctl on pipes: the kernel writes an int.
        let (r, w) = pipe();
        // SAFETY: writing 5 bytes from a live 5-byte buffer.
        let n = unsafe { libc::write(w.as_raw_fd(), b"hello".as_ptr().cast(), 5) };
        assert_eq!(n, 5);
        let mut avail: c_int = -1;
        #[allow(clippy::cast_possible_truncation)]
        let fionread = libc::FIONREAD as u32;
        // SAFETY: FIONREAD writes one `int` through its pointer argument.
        let ret = unsafe { ioctl_with_mut(r.as_fd(), fionread, &mut avail) }.unwrap();
        assert_eq!(ret, 0);
        assert_eq!(avail, 5);
    }

    #[test]
    fn retry_restarts_on_eintr_and_eagain_only() {
        let calls = Cell::new(0);
        let result = retry_interrupted(|| {
            calls.set(calls.get() + 1);
            match calls.get() {
                1 => Err(io::Error::from_raw_os_error(libc::EINTR)),
                2 => Err(io::Error::from_raw_os_error(libc::EAGAIN)),
                3 => Err(io::Error::from_raw_os_error(libc::EINTR)),
                _ => Ok(7),
            }
        });
        assert_eq!(result.unwrap(), 7);
        assert_eq!(calls.get(), 4);

        let calls = Cell::new(0);
        let result = retry_interrupted(|| {
            calls.set(calls.get() + 1);
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        });
        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EINVAL));
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn retry_gives_up_on_endless_eagain() {
        let calls = Cell::new(0u32);
        let result = retry_interrupted(|| {
            calls.set(calls.get() + 1);
            Err(io::Error::from_raw_os_error(libc::EAGAIN))
        });
        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EAGAIN));
        assert_eq!(calls.get(), EAGAIN_RETRIES + 1);
    }

    #[test]
    fn argbuf_aligns_and_zero_pads() {
        let mut b = ArgBuf::new();
        assert!(b.is_empty());
        assert_eq!(b.push::<u8>(0xaa), 0);
        assert_eq!(b.push::<u32>(0x1122_3344), 4);
        assert_eq!(b.push::<u64>(u64::MAX), 8);
        assert_eq!(b.push::<u16>(7), 16);
        assert_eq!(b.len(), 18);
        assert_eq!(&b.as_bytes()[..4], &[0xaa, 0, 0, 0]);
        assert_eq!(b.get::<u32>(4), 0x1122_3344);
        assert_eq!(b.get::<u64>(8), u64::MAX);
        b.put::<u32>(4, 9);
        assert_eq!(b.get::<u32>(4), 9);
        b.align_to(8);
        assert_eq!(b.len(), 24);
        assert!(b.as_bytes()[18..].iter().all(|&x| x == 0));
        assert_eq!(b.as_mut_ptr() as usize % 8, 0);
    }

    #[test]
    #[should_panic(expected = "misaligned or past the end")]
    fn argbuf_rejects_misaligned_reads() {
        let mut b = ArgBuf::new();
        b.push::<u64>(1);
        let _ = b.get::<u32>(2);
    }

    #[test]
    #[should_panic(expected = "misaligned or past the end")]
    fn argbuf_rejects_reads_past_the_end() {
        let mut b = ArgBuf::new();
        b.push::<u32>(1);
        let _ = b.get::<u64>(0);
    }

    #[test]
    fn udmabuf_list_matches_the_c_layout() {
        let items = [
            sys::udmabuf_create_item {
                memfd: 3,
                __pad: 0,
                offset: 0,
                size: 4096,
            },
            sys::udmabuf_create_item {
                memfd: 4,
                __pad: 0,
                offset: 8192,
                size: 8192,
            },
        ];
        let b = udmabuf_create_list_arg(sys::UDMABUF_FLAGS_CLOEXEC, &items).unwrap();
        let hdr = size_of::<sys::udmabuf_create_list>();
        let item = size_of::<sys::udmabuf_create_item>();
        assert_eq!(b.len(), hdr + 2 * item);
        assert_eq!(
            b.get::<u32>(offset_of!(sys::udmabuf_create_list, flags)),
            sys::UDMABUF_FLAGS_CLOEXEC
        );
        assert_eq!(b.get::<u32>(offset_of!(sys::udmabuf_create_list, count)), 2);
        assert_eq!(offset_of!(sys::udmabuf_create_list, list), hdr);
        assert_eq!(b.get::<sys::udmabuf_create_item>(hdr), items[0]);
        assert_eq!(b.get::<sys::udmabuf_create_item>(hdr + item), items[1]);
        assert_eq!(
            b.get::<u64>(hdr + item + offset_of!(sys::udmabuf_create_item, offset)),
            8192
        );
    }

    #[test]
    fn one_range_dma_buf_argument_has_the_bytes_of_the_general_one() {
        let range = sys::vfio_region_dma_range {
            offset: 0x4000,
            length: 0x2000,
        };
        let flags = (libc::O_RDWR | libc::O_CLOEXEC) as u32;
        let one = DmaBufOneRangeArg::new(5, flags, range);
        assert_eq!(size_of::<DmaBufOneRangeArg>(), 40);
        // SAFETY: reading the bytes of a plain repr(C) struct of integers
        // with no padding (8 + 16 + 16 bytes, 8-aligned).
        let bytes = unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(&one).cast::<u8>(),
                size_of::<DmaBufOneRangeArg>(),
            )
        };
        let general = vfio_dma_buf_feature_arg(5, flags, &[range]).unwrap();
        assert_eq!(bytes, general.as_bytes());
    }

    #[test]
    fn vfio_dma_buf_feature_matches_the_c_layout() {
        let ranges = [
            sys::vfio_region_dma_range {
                offset: 0,
                length: 0x1000,
            },
            sys::vfio_region_dma_range {
                offset: 0x4000,
                length: 0x2000,
            },
        ];
        let flags = (libc::O_RDWR | libc::O_CLOEXEC) as u32;
        let b = vfio_dma_buf_feature_arg(2, flags, &ranges).unwrap();
        let hdr = offset_of!(sys::vfio_device_feature, data);
        let feat = size_of::<sys::vfio_device_feature_dma_buf>();
        assert_eq!(hdr, 8);
        assert_eq!(
            b.len(),
            hdr + feat + 2 * size_of::<sys::vfio_region_dma_range>()
        );
        assert_eq!(
            b.get::<u32>(offset_of!(sys::vfio_device_feature, argsz)) as usize,
            b.len()
        );
        assert_eq!(
            b.get::<u32>(offset_of!(sys::vfio_device_feature, flags)),
            sys::VFIO_DEVICE_FEATURE_GET | sys::VFIO_DEVICE_FEATURE_DMA_BUF
        );
        assert_eq!(
            b.get::<u32>(hdr + offset_of!(sys::vfio_device_feature_dma_buf, region_index)),
            2
        );
        assert_eq!(
            b.get::<u32>(hdr + offset_of!(sys::vfio_device_feature_dma_buf, open_flags)),
            flags
        );
        assert_eq!(
            b.get::<u32>(hdr + offset_of!(sys::vfio_device_feature_dma_buf, flags)),
            0
        );
        assert_eq!(
            b.get::<u32>(hdr + offset_of!(sys::vfio_device_feature_dma_buf, nr_ranges)),
            2
        );
        let at = hdr + offset_of!(sys::vfio_device_feature_dma_buf, dma_ranges);
        assert_eq!(b.get::<sys::vfio_region_dma_range>(at), ranges[0]);
        assert_eq!(b.get::<sys::vfio_region_dma_range>(at + 16), ranges[1]);
    }

    #[test]
    fn vfio_irq_set_matches_the_c_layout() {
        let b = vfio_irq_set_arg(
            sys::VFIO_IRQ_SET_ACTION_TRIGGER,
            4,
            0,
            IrqData::Eventfd(&[5, -1]),
        )
        .unwrap();
        let data = offset_of!(sys::vfio_irq_set, data);
        assert_eq!(data, 20);
        assert_eq!(b.len(), data + 8);
        assert_eq!(
            b.get::<u32>(offset_of!(sys::vfio_irq_set, argsz)) as usize,
            b.len()
        );
        assert_eq!(
            b.get::<u32>(offset_of!(sys::vfio_irq_set, flags)),
            sys::VFIO_IRQ_SET_ACTION_TRIGGER | sys::VFIO_IRQ_SET_DATA_EVENTFD
        );
        assert_eq!(b.get::<u32>(offset_of!(sys::vfio_irq_set, index)), 4);
        assert_eq!(b.get::<u32>(offset_of!(sys::vfio_irq_set, count)), 2);
        assert_eq!(b.get::<i32>(data), 5);
        assert_eq!(b.get::<i32>(data + 4), -1);

        let off = vfio_irq_set_arg(
            sys::VFIO_IRQ_SET_ACTION_TRIGGER,
            4,
            0,
            IrqData::None { count: 0 },
        )
        .unwrap();
        assert_eq!(off.len(), data);
        assert_eq!(
            off.get::<u32>(offset_of!(sys::vfio_irq_set, flags)),
            sys::VFIO_IRQ_SET_ACTION_TRIGGER | sys::VFIO_IRQ_SET_DATA_NONE
        );
    }
}
