//! Memory that devices see, mapped into this process: [`Mapping`], one type
//! for dma-buf, memfd and BAR mappings, accessed only with volatile loads and
//! stores. This file and the ioctl layer are the only places with `unsafe`:
//! the `mmap`/`munmap` calls and the volatile accesses are here.

use std::fmt;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::Arc;

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use crate::error::{Error, RangeProblem, Result};
use crate::range::ByteRange;
use crate::range::human_size;

/// A shared memory mapping (`mmap` with `MAP_SHARED`) of a dma-buf, a memfd
/// or a PCI BAR, unmapped when dropped. The mapping holds its own reference
/// to the file, so it may outlive the [`DmaBuf`](crate::DmaBuf),
/// [`Memfd`](crate::memfd::Memfd) or [`VfioPciDevice`](crate::VfioPciDevice)
/// it came from.
///
/// **The memory is shared with devices and other mappings.** A device can
/// write it at any moment (that is the point of a dma-buf), and another
/// mapping of the same buffer aliases it. Rust references (`&[u8]`,
/// `&mut [u8]`) to such memory would promise the compiler that it does not
/// change, so `Mapping` hands out none. Access is by copying in and out with
/// volatile loads and stores ([`read`](Self::read), [`write`](Self::write),
/// [`to_vec`](Self::to_vec), [`fill`](Self::fill), and the naturally aligned
/// [`read_u32`](Self::read_u32), [`write_u64`](Self::write_u64), ... for
/// device registers), which the compiler neither elides nor caches, or
/// through the raw pointer ([`as_ptr`](Self::as_ptr)) for callers who take on
/// that reasoning themselves. Offsets are `u64` byte offsets from the start;
/// anything past [`len`](Self::len) is [`Error::InvalidRange`]. Bracket
/// accesses to a dma-buf with
/// [`DmaBuf::begin_cpu_access`](crate::DmaBuf::begin_cpu_access) so caches
/// are coherent with devices.
///
/// A BAR mapping faults (`SIGBUS`) while the device's memory decode is off
/// or it is resetting: VFIO has the pages unmapped then.
///
/// ```no_run
/// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?;
/// let map = buf.mmap()?;
/// assert!(map.to_vec().iter().all(|&b| b == 0)); // heap memory starts zeroed
/// map.fill(0, 4096, 0xa5)?;
/// map.write_u32(8, 0xdead_beef)?;
/// assert_eq!(map.read_u32(8)?, 0xdead_beef);
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub struct Mapping {
    ptr: NonNull<u8>,
    /// What was mapped (whole pages).
    map_len: usize,
    /// What may be accessed (a BAR smaller than a page is mapped as a page).
    len: usize,
    writable: bool,
    label: String,
}

// SAFETY: a Mapping is an address range owned by this value; nothing in it is
// tied to the creating thread, and munmap may run on any thread.
unsafe impl Send for Mapping {}
// SAFETY: shared access is volatile loads and stores only, with no Rust
// references into the memory; devices and other mappings write it
// concurrently anyway, which volatile access tolerates (see the type docs).
unsafe impl Sync for Mapping {}

impl fmt::Debug for Mapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mapping")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .field("of", &self.label)
            .finish()
    }
}

/// The integer widths [`Mapping`] reads and writes as one access.
trait Word: Copy {}
impl Word for u8 {}
impl Word for u16 {}
impl Word for u32 {}
impl Word for u64 {}

impl Mapping {
    /// `mmap(NULL, map_len, PROT_READ[|PROT_WRITE], MAP_SHARED, fd, offset)`,
    /// of which the first `len` bytes may be accessed (`len <= map_len`).
    /// `label` names the mapping in errors.
    pub(crate) fn map_shared(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        map_len: usize,
        writable: bool,
        label: String,
    ) -> io::Result<Self> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let length = NonZeroUsize::new(map_len)
            .filter(|_| len <= map_len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut prot = ProtFlags::PROT_READ;
        if writable {
            prot |= ProtFlags::PROT_WRITE;
        }
        // SAFETY: a fresh mapping at an address the kernel picks (no hint, no
        // MAP_FIXED), so no existing memory is replaced; `fd` is open for the
        // call and the kernel keeps its own reference to the file.
        let p = unsafe { mmap(None, length, prot, MapFlags::MAP_SHARED, fd, off) }?;
        Ok(Self {
            ptr: p.cast(),
            map_len,
            len,
            writable,
            label,
        })
    }

    /// Length in bytes that may be accessed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: empty mappings are not made.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the mapping was made writable.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The start address, for callers that need raw access. Accesses must be
    /// volatile, within [`len`](Self::len), and only while the mapping lives
    /// (a read-only mapping faults on write).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping (volatile
    /// loads, 8 bytes at a time where aligned).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.check(offset, buf.len(), 1)?;
        // SAFETY: `check` proved `at + buf.len() <= len`; the mapping is live
        // and readable for `len` bytes from `ptr`.
        unsafe { volatile_read(self.ptr.as_ptr().wrapping_add(at), buf) };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset` (volatile stores). A
    /// read-only mapping is [`Error::Sys`] with `EACCES`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        let at = self.check(offset, data.len(), 1)?;
        // SAFETY: in bounds (checked), live, and mapped writable.
        unsafe { volatile_write(self.ptr.as_ptr().wrapping_add(at), data) };
        Ok(())
    }

    /// Sets `len` bytes at `offset` to `byte` (volatile stores).
    pub fn fill(&self, offset: u64, len: usize, byte: u8) -> Result<()> {
        self.check_writable()?;
        let at = self.check(offset, len, 1)?;
        let chunk = [byte; 4096];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len());
            // SAFETY: `at + done + n <= at + len <= self.len` (checked); live
            // and writable.
            unsafe { volatile_write(self.ptr.as_ptr().wrapping_add(at + done), &chunk[..n]) };
            done += n;
        }
        Ok(())
    }

    /// A copy of the whole mapping.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        // SAFETY: exactly `len` bytes from the live, readable mapping.
        unsafe { volatile_read(self.ptr.as_ptr(), &mut v) };
        v
    }

    /// One volatile 8-bit load at `offset`.
    #[inline]
    pub fn read_u8(&self, offset: u64) -> Result<u8> {
        self.load(offset)
    }

    /// One volatile 16-bit load at `offset` (2-byte aligned).
    #[inline]
    pub fn read_u16(&self, offset: u64) -> Result<u16> {
        self.load(offset)
    }

    /// One volatile 32-bit load at `offset` (4-byte aligned).
    #[inline]
    pub fn read_u32(&self, offset: u64) -> Result<u32> {
        self.load(offset)
    }

    /// One volatile 64-bit load at `offset` (8-byte aligned).
    #[inline]
    pub fn read_u64(&self, offset: u64) -> Result<u64> {
        self.load(offset)
    }

    /// One volatile 8-bit store at `offset`.
    #[inline]
    pub fn write_u8(&self, offset: u64, value: u8) -> Result<()> {
        self.store(offset, value)
    }

    /// One volatile 16-bit store at `offset` (2-byte aligned).
    #[inline]
    pub fn write_u16(&self, offset: u64, value: u16) -> Result<()> {
        self.store(offset, value)
    }

    /// One volatile 32-bit store at `offset` (4-byte aligned).
    #[inline]
    pub fn write_u32(&self, offset: u64, value: u32) -> Result<()> {
        self.store(offset, value)
    }

    /// One volatile 64-bit store at `offset` (8-byte aligned).
    #[inline]
    pub fn write_u64(&self, offset: u64, value: u64) -> Result<()> {
        self.store(offset, value)
    }

    /// Volatile 64-bit stores of `words`, in order, from `offset` (8-byte
    /// aligned), after one bounds check for all of them: a device queue
    /// entry, or a list of page addresses, as one call. Stops at the
    /// length the iterator reports.
    ///
    /// ```no_run
    /// # let map = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?.mmap()?;
    /// map.write_u64s(64, (0..4usize).map(|i| 0x1000 * i as u64))?;
    /// assert_eq!(map.read_u64(64 + 3 * 8)?, 0x3000);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    #[inline]
    pub fn write_u64s<I>(&self, offset: u64, words: I) -> Result<()>
    where
        I: IntoIterator<Item = u64>,
        I::IntoIter: ExactSizeIterator,
    {
        self.check_writable()?;
        let words = words.into_iter();
        let n = words.len();
        let at = self.check(offset, n.saturating_mul(8), 8)?;
        let base = self.ptr.as_ptr().wrapping_add(at).cast::<u64>();
        for (i, w) in words.take(n).enumerate() {
            // SAFETY: `check` proved `at + 8 * n` lies inside the live,
            // writable mapping and `at` is 8-byte aligned (the mapping is
            // page-aligned); `i < n`.
            unsafe { base.wrapping_add(i).write_volatile(w) };
        }
        Ok(())
    }

    #[inline]
    fn load<T: Word>(&self, offset: u64) -> Result<T> {
        let at = self.check(offset, size_of::<T>(), align_of::<T>())?;
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

    #[inline]
    fn store<T: Word>(&self, offset: u64, value: T) -> Result<()> {
        self.check_writable()?;
        let at = self.check(offset, size_of::<T>(), align_of::<T>())?;
        // SAFETY: `check` proved the value lies inside the live, writable
        // mapping and is naturally aligned; no Rust reference points into it.
        unsafe {
            self.ptr
                .as_ptr()
                .wrapping_add(at)
                .cast::<T>()
                .write_volatile(value)
        };
        Ok(())
    }

    /// Checks `[offset, offset + len)` against the mapping and `align`;
    /// returns `offset` as a `usize`. Inlined: in bounds it is two
    /// comparisons, so that a device queue's per-command accesses cost what
    /// raw pointer accesses do, plus those.
    #[inline]
    fn check(&self, offset: u64, len: usize, align: usize) -> Result<usize> {
        let end = offset.wrapping_add(len as u64);
        let fits = offset.is_multiple_of(align as u64) & (end >= offset) & (end <= self.len as u64);
        if fits {
            // At most `self.len`, a `usize`.
            Ok(offset as usize)
        } else {
            Err(self.range_error(offset, len, align))
        }
    }

    /// What is wrong with `[offset, offset + len)` (which [`check`](Self::check)
    /// refused).
    #[cold]
    #[inline(never)]
    fn range_error(&self, offset: u64, len: usize, align: usize) -> Error {
        let range = ByteRange::new(offset, len as u64);
        let invalid = |problem| Error::InvalidRange {
            target: format!("{} ({})", self.label, human_size(self.len as u64)),
            range,
            problem,
        };
        if !offset.is_multiple_of(align as u64) {
            return invalid(RangeProblem::Unaligned {
                align: align as u64,
            });
        }
        match range.end() {
            None => invalid(RangeProblem::Overflow),
            Some(end) => invalid(RangeProblem::OutOfBounds {
                end,
                size: self.len as u64,
            }),
        }
    }

    #[inline]
    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(self.read_only_error())
        }
    }

    #[cold]
    #[inline(never)]
    fn read_only_error(&self) -> Error {
        Error::sys(
            "write",
            format!("read-only {}", self.label),
            io::Error::from_raw_os_error(libc::EACCES),
        )
    }
}

impl Mapping {
    /// A ring of `entries` entries of `W` 64-bit words each, from `offset`
    /// (8-byte aligned) of this writable mapping, with its cursor at entry
    /// 0 ([`MappedRing`]: a device queue). Bounds, alignment and write
    /// permission are checked here, once; the ring keeps the mapping alive.
    /// No entries, or a ring past the end, is [`Error::InvalidRange`]; a
    /// read-only mapping, [`Error::Sys`] with `EACCES`.
    ///
    /// ```no_run
    /// # use std::sync::Arc;
    /// # let map = Arc::new(dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(4096)?.mmap()?);
    /// let mut sq = map.ring::<8>(0, 4)?; // four 64-byte entries
    /// sq.write(&[1, 2, 3, 4, 5, 6, 7, 8]);
    /// assert_eq!(sq.read_u32::<2>(), 2);
    /// assert_eq!(sq.advance(), 1);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn ring<const W: usize>(
        self: &Arc<Self>,
        offset: u64,
        entries: u16,
    ) -> Result<MappedRing<W>> {
        self.check_writable()?;
        let bytes = usize::from(entries).saturating_mul(W.saturating_mul(8));
        if bytes == 0 {
            return Err(Error::InvalidRange {
                target: format!("{} ({})", self.label, human_size(self.len as u64)),
                range: ByteRange::new(offset, 0),
                problem: RangeProblem::Empty,
            });
        }
        let at = self.check(offset, bytes, 8)?;
        Ok(MappedRing {
            base: self.ptr.as_ptr().wrapping_add(at).cast::<u64>(),
            entries,
            at: 0,
            lap: false,
            _map: Arc::clone(self),
        })
    }

    /// The 32-bit register at `offset` (4-byte aligned) of this writable
    /// mapping, checked once ([`MappedRegister`]: a doorbell); it keeps the
    /// mapping alive.
    pub fn register_u32(self: &Arc<Self>, offset: u64) -> Result<MappedRegister> {
        self.check_writable()?;
        let at = self.check(offset, 4, 4)?;
        Ok(MappedRegister {
            ptr: self.ptr.as_ptr().wrapping_add(at).cast::<u32>(),
            _map: Arc::clone(self),
        })
    }
}

/// A ring of fixed-size entries inside a [`Mapping`] (a device's
/// submission or completion queue), with a cursor: `W` 64-bit words per
/// entry. Made by [`Mapping::ring`], which checks the whole ring against the
/// mapping once; every access after that is to the entry at the cursor,
/// which only the ring moves and keeps below [`entries`](Self::entries), so
/// no access can leave the ring and none is checked again. Accesses are
/// volatile, as [`Mapping`]'s are.
pub struct MappedRing<const W: usize> {
    /// Entry 0; `entries * W` words from here lie inside the mapping.
    base: *mut u64,
    entries: u16,
    /// The cursor, below `entries`.
    at: u16,
    /// Flips each time the cursor wraps to entry 0.
    lap: bool,
    /// Keeps the memory mapped.
    _map: Arc<Mapping>,
}

// SAFETY: the ring is an address range inside a mapping it keeps alive
// (which is Send); nothing in it is tied to a thread.
unsafe impl<const W: usize> Send for MappedRing<W> {}
// SAFETY: shared access is volatile loads and stores only (see `Mapping`'s
// Sync); the cursor moves only through `&mut self`.
unsafe impl<const W: usize> Sync for MappedRing<W> {}

impl<const W: usize> fmt::Debug for MappedRing<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedRing")
            .field("words", &W)
            .field("entries", &self.entries)
            .field("at", &self.at)
            .field("lap", &self.lap)
            .finish_non_exhaustive()
    }
}

impl<const W: usize> MappedRing<W> {
    /// Entries of the ring.
    #[inline]
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// The entry the cursor is at.
    #[inline]
    pub fn position(&self) -> u16 {
        self.at
    }

    /// False on the first pass over the ring, flipped at each wrap.
    #[inline]
    pub fn lap(&self) -> bool {
        self.lap
    }

    /// Moves the cursor to entry `at` (modulo the entries) of lap `lap`.
    pub fn set_position(&mut self, at: u16, lap: bool) {
        self.at = at % self.entries;
        self.lap = lap;
    }

    /// Moves the cursor to the next entry (wrapping to 0 and flipping the
    /// lap); the new position.
    #[inline(always)]
    pub fn advance(&mut self) -> u16 {
        // Without a branch: a wrap costs what another step does.
        let next = self.at + 1;
        let wrap = next == self.entries;
        self.at = if wrap { 0 } else { next };
        self.lap ^= wrap;
        self.at
    }

    /// Volatile stores of `words` into the entry at the cursor, in order.
    #[inline(always)]
    pub fn write(&self, words: &[u64; W]) {
        let entry = self.entry();
        for (i, &w) in words.iter().enumerate() {
            // SAFETY: `at < entries`, so the entry's `W` words lie inside
            // the ring, which `Mapping::ring` checked to be inside the live,
            // writable mapping and 8-byte aligned; `i < W`.
            unsafe { entry.wrapping_add(i).write_volatile(w) };
        }
    }

    /// A volatile 32-bit load of dword `I` of the entry at the cursor.
    #[inline(always)]
    pub fn read_u32<const I: usize>(&self) -> u32 {
        const { assert!(I < 2 * W, "dword past the entry") };
        // SAFETY: `at < entries` and `I < 2 * W` (checked when compiled):
        // inside the checked ring, 4-byte aligned.
        unsafe { self.entry().cast::<u32>().wrapping_add(I).read_volatile() }
    }

    /// The address of entry 0, for callers that take on raw access (see
    /// [`Mapping::as_ptr`]).
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.cast()
    }

    /// Volatile loads of the entry at the cursor.
    pub fn read(&self) -> [u64; W] {
        let entry = self.entry();
        // SAFETY: as in `write`, for loads.
        std::array::from_fn(|i| unsafe { entry.wrapping_add(i).read_volatile() })
    }

    #[inline(always)]
    fn entry(&self) -> *mut u64 {
        self.base.wrapping_add(usize::from(self.at) * W)
    }
}

/// A 32-bit register inside a [`Mapping`] (a doorbell), checked once by
/// [`Mapping::register_u32`]; accessed with volatile loads and stores.
pub struct MappedRegister {
    /// Inside the mapping, 4-byte aligned.
    ptr: *mut u32,
    /// Keeps the memory mapped.
    _map: Arc<Mapping>,
}

// SAFETY: as for `MappedRing`.
unsafe impl Send for MappedRegister {}
// SAFETY: as for `MappedRing`: volatile accesses only.
unsafe impl Sync for MappedRegister {}

impl fmt::Debug for MappedRegister {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedRegister")
            .field("ptr", &self.ptr)
            .finish_non_exhaustive()
    }
}

impl MappedRegister {
    /// One volatile 32-bit store.
    #[inline(always)]
    pub fn write(&self, value: u32) {
        // SAFETY: `register_u32` checked the register inside the live,
        // writable mapping and aligned.
        unsafe { self.ptr.write_volatile(value) };
    }

    /// The register's address, for callers that take on raw access (see
    /// [`Mapping::as_ptr`]).
    pub fn as_ptr(&self) -> *mut u32 {
        self.ptr
    }

    /// One volatile 32-bit load.
    #[inline]
    pub fn read(&self) -> u32 {
        // SAFETY: as in `write`, for a load.
        unsafe { self.ptr.read_volatile() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`map_len` are exactly the range mmap returned; no Rust
        // reference into it exists (none is ever handed out), and it is
        // unmapped once.
        let _ = unsafe { munmap(self.ptr.cast(), self.map_len) };
    }
}

/// Copies `dst.len()` bytes from `src` with volatile loads, 8 bytes at a time
/// where aligned.
///
/// # Safety
/// `src` must be valid for reads of `dst.len()` bytes.
unsafe fn volatile_read(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let mut i = 0;
    while i < n && (src as usize).wrapping_add(i) % 8 != 0 {
        // SAFETY: `i < n`, so in bounds by the caller's guarantee.
        dst[i] = unsafe { src.wrapping_add(i).read_volatile() };
        i += 1;
    }
    while n - i >= 8 {
        let p = src.wrapping_add(i).cast::<u64>();
        // SAFETY: `i + 8 <= n`, in bounds; `p` is 8-byte aligned (the loop
        // above aligned it and `i` advances by 8).
        let w = unsafe { p.read_volatile() };
        dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`, in bounds.
        dst[i] = unsafe { src.wrapping_add(i).read_volatile() };
        i += 1;
    }
}

/// Copies `src` to `dst` with volatile stores, 8 bytes at a time where
/// aligned.
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes.
unsafe fn volatile_write(dst: *mut u8, src: &[u8]) {
    let n = src.len();
    let mut i = 0;
    while i < n && (dst as usize).wrapping_add(i) % 8 != 0 {
        // SAFETY: `i < n`, in bounds by the caller's guarantee.
        unsafe { dst.wrapping_add(i).write_volatile(src[i]) };
        i += 1;
    }
    while n - i >= 8 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&src[i..i + 8]);
        let p = dst.wrapping_add(i).cast::<u64>();
        // SAFETY: `i + 8 <= n`, in bounds; `p` is 8-byte aligned.
        unsafe { p.write_volatile(u64::from_ne_bytes(w)) };
        i += 8;
    }
    while i < n {
        // SAFETY: `i < n`, in bounds.
        unsafe { dst.wrapping_add(i).write_volatile(src[i]) };
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd_map(len: u64) -> Arc<Mapping> {
        let m = crate::memfd::Memfd::new("ring-test", len).unwrap();
        Arc::new(m.mmap().unwrap())
    }

    #[test]
    fn a_ring_is_checked_once_and_its_cursor_wraps() {
        let map = memfd_map(4096);
        // 4 entries of 64 bytes from 3840: ends at 4096, fits; one more
        // byte of offset, or a fifth entry, does not.
        assert!(map.ring::<8>(3840, 4).is_ok());
        assert!(matches!(
            map.ring::<8>(3848, 4),
            Err(Error::InvalidRange {
                problem: RangeProblem::OutOfBounds { .. },
                ..
            })
        ));
        assert!(map.ring::<8>(3840, 5).is_err());
        assert!(matches!(
            map.ring::<2>(4, 4),
            Err(Error::InvalidRange {
                problem: RangeProblem::Unaligned { align: 8 },
                ..
            })
        ));
        assert!(matches!(
            map.ring::<2>(0, 0),
            Err(Error::InvalidRange {
                problem: RangeProblem::Empty,
                ..
            })
        ));
        let mut r = map.ring::<2>(64, 3).unwrap();
        for i in 0..7u64 {
            r.write(&[i, i << 32 | 0xabcd]);
            assert_eq!(r.read(), [i, i << 32 | 0xabcd]);
            assert_eq!(r.read_u32::<2>(), 0xabcd);
            assert_eq!(r.read_u32::<3>(), i as u32);
            r.advance();
        }
        // 7 entries on a ring of 3: at 1, two wraps.
        assert_eq!((r.position(), r.lap()), (1, false));
        assert_eq!(map.read_u64(64).unwrap(), 6);
        r.set_position(5, true);
        assert_eq!((r.position(), r.lap()), (2, true));
        let reg = map.register_u32(4092).unwrap();
        reg.write(0xfeed);
        assert_eq!((reg.read(), map.read_u32(4092).unwrap()), (0xfeed, 0xfeed));
        assert!(map.register_u32(4094).is_err());
        assert!(map.register_u32(4096).is_err());
        drop(map);
        // The ring and the register keep the memory mapped.
        reg.write(1);
        r.write(&[1, 2]);
    }

    #[test]
    fn volatile_copies_round_trip_at_every_alignment() {
        let src: Vec<u8> = (0..64u8).collect();
        for start in 0..9 {
            for len in [0, 1, 7, 8, 9, 17, 40] {
                let mut dst = vec![0u8; len];
                // SAFETY: `start + len <= 49 < 64`.
                unsafe { volatile_read(src.as_ptr().wrapping_add(start), &mut dst) };
                assert_eq!(dst, &src[start..start + len]);
                let mut out = vec![0xffu8; 64];
                // SAFETY: same bounds, in `out`.
                unsafe { volatile_write(out.as_mut_ptr().wrapping_add(start), &dst) };
                assert_eq!(&out[start..start + len], &src[start..start + len]);
                assert!(
                    out[..start]
                        .iter()
                        .chain(&out[start + len..])
                        .all(|&b| b == 0xff)
                );
            }
        }
    }
}
