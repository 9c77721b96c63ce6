//! dma-heaps: dma-bufs allocated from a named heap (`/dev/dma_heap/<name>`,
//! uAPI reference C).
//!
//! [`list`] names the heaps, [`DmaHeap::open`] opens one, and
//! [`DmaHeap::alloc`] allocates a buffer (`DMA_HEAP_IOCTL_ALLOC`, file mode
//! `O_RDWR`, fd `O_CLOEXEC`). Its size is the length rounded up to a page.
//! The `system` heap hands out zeroed memory.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::dmabuf::DmaBuf;
use crate::error::{Error, RangeProblem, Result};
use crate::ioctl;
use crate::range::ByteRange;
use crate::range::page_size;

/// Where heaps appear.
pub const HEAP_DIR: &str = "/dev/dma_heap";

/// The names of the heaps in [`HEAP_DIR`], sorted. No directory (no heaps
/// configured) is an empty list; other read errors are [`Error::Sys`].
///
/// ```no_run
/// let heaps = dmabuf_p2p::exporter::heap::list()?;
/// assert!(heaps.iter().any(|h| h == "system"));
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn list() -> Result<Vec<String>> {
    list_in(Path::new(HEAP_DIR))
}

/// As [`list`], for another directory.
///
/// ```
/// let none = dmabuf_p2p::exporter::heap::list_in(std::path::Path::new("/nonexistent"))?;
/// assert!(none.is_empty());
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn list_in(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::sys("read_dir", dir.display().to_string(), e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::sys("read_dir", dir.display().to_string(), e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// An open dma-heap.
///
/// ```no_run
/// use dmabuf_p2p::exporter::heap::DmaHeap;
/// let heap = DmaHeap::open("system")?;
/// let buf = heap.alloc(1 << 20)?;
/// assert_eq!(buf.fdinfo()?.exp_name, "system");
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug)]
pub struct DmaHeap {
    fd: OwnedFd,
    name: String,
    path: PathBuf,
}

impl DmaHeap {
    /// Opens heap `name` in [`HEAP_DIR`]. A heap that does not exist is
    /// [`Error::HeapNotFound`], listing the heaps that do; a name with a `/`
    /// or that is empty, `.` or `..` is refused the same way.
    ///
    /// ```no_run
    /// use dmabuf_p2p::{exporter::heap::DmaHeap, Error};
    /// assert!(matches!(DmaHeap::open("no-such-heap"), Err(Error::HeapNotFound { .. })));
    /// ```
    pub fn open(name: &str) -> Result<Self> {
        Self::open_in(Path::new(HEAP_DIR), name)
    }

    /// As [`DmaHeap::open`], in another directory.
    pub fn open_in(dir: &Path, name: &str) -> Result<Self> {
        let not_found = || Error::HeapNotFound {
            name: name.to_owned(),
            dir: dir.display().to_string(),
            available: list_in(dir).unwrap_or_default(),
        };
        if name.is_empty()
            || name == "."
            || name == ".."
            || name.contains('/')
            || name.contains('\0')
        {
            return Err(not_found());
        }
        let path = dir.join(name);
        match OpenOptions::new().read(true).open(&path) {
            Ok(f) => Ok(Self {
                fd: f.into(),
                name: name.to_owned(),
                path,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(not_found()),
            Err(e) => Err(Error::sys("open", path.display().to_string(), e)),
        }
    }

    /// The heap's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Allocates `len` bytes (rounded up to a page) as a read-write,
    /// close-on-exec dma-buf. A zero `len`, or one that overflows when
    /// rounded, is [`Error::InvalidRange`]; the kernel's refusals (`ENOMEM`,
    /// `EMFILE`) are [`Error::Sys`] naming the heap and length.
    ///
    /// ```no_run
    /// let buf = dmabuf_p2p::exporter::heap::DmaHeap::open("system")?.alloc(100)?;
    /// assert_eq!(buf.size()?, 4096);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn alloc(&self, len: u64) -> Result<DmaBuf> {
        let range = ByteRange::new(0, len);
        let bad = |problem| Error::InvalidRange {
            target: format!("allocation from dma-heap {:?}", self.name),
            range,
            problem,
        };
        if len == 0 {
            return Err(bad(RangeProblem::Empty));
        }
        // The kernel rounds up with PAGE_ALIGN and refuses a length that
        // wraps to 0; check the same thing here.
        let size = len
            .checked_next_multiple_of(page_size())
            .ok_or_else(|| bad(RangeProblem::Overflow))?;
        #[allow(clippy::cast_sign_loss)]
        let fd_flags = (libc::O_RDWR | libc::O_CLOEXEC) as u32;
        ioctl::dma_heap_alloc(self.fd.as_fd(), len, fd_flags, 0)
            .map(|fd| DmaBuf::from_export(fd, size))
            .map_err(|e| {
                Error::sys(
                    "DMA_HEAP_IOCTL_ALLOC",
                    format!("{} ({len:#x} bytes)", self.path.display()),
                    e,
                )
            })
    }
}

impl AsFd for DmaHeap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
