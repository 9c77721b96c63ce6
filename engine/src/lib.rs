//! DMA engines over [`dmabuf_p2p`]: devices that move data to and from
//! IOVAs, used to prove that data really crossed between devices.
//!
//! Two kinds: a copy engine ([`DmaEngine`], e.g. QEMU's `edu`,
//! [`edu::Edu`]) copies from one IOVA to another; a storage engine
//! ([`StorageEngine`], e.g. an NVMe controller, [`nvme::Nvme`]) moves
//! logical blocks between its storage and an IOVA. The copy interface
//! follows the kernel's VFIO selftest drivers: initialise, start a copy,
//! wait for it. Tests and the CLI are written against these traits, so a new
//! engine needs only a driver; [`detect`] tells from sysfs which devices
//! have one.
//!
//! The engines are written against the library's public API alone: a device
//! is a [`VfioPciDevice`](dmabuf_p2p::VfioPciDevice) attached to an
//! [`Ioas`](dmabuf_p2p::Ioas), and every IOVA they are given is in that IOAS.
//! Here the edu engine copies host memory into a BAR exported as a dma-buf
//! and mapped as an attachment (the walk-through of the library's guide,
//! `docs/GUIDE.md`, with a real engine):
//!
//! ```no_run
//! use std::time::Duration;
//! use dmabuf_p2p::memfd::Memfd;
//! use dmabuf_p2p::revoke::{Attachment, RestorePolicy};
//! use dmabuf_p2p::{ByteRange, Iommufd, IovaPlacement, MapPerms, VfioPciDevice};
//! use dmabuf_p2p_engine::{DmaEngine, edu::Edu};
//!
//! let iommufd = Iommufd::open()?;
//! let ioas = iommufd.alloc_ioas()?;
//! let mut exporter = VfioPciDevice::open("0000:02:00.0".parse()?)?;
//! exporter.bind(&iommufd)?;
//! exporter.set_memory_decode(true)?;
//! let export = exporter.export_bar(2, &[ByteRange::new(0, 64 << 10)])?;
//! let att = Attachment::map(&export, &ioas, IovaPlacement::Auto, MapPerms::ReadWrite, RestorePolicy::Automatic)?;
//!
//! let mut edu = Edu::open("0000:01:00.0".parse()?, &ioas)?;   // bound + attached to `ioas`
//! let src = Memfd::new("src", 4096)?;
//! src.write_at(0, b"hello, BAR")?;
//! let src_map = ioas.map_file(&src, ByteRange::new(0, 4096), IovaPlacement::Auto, MapPerms::Read)?;
//!
//! att.ensure_live()?;                                          // don't DMA into a revoked buffer
//! edu.memcpy(src_map.iova(), att.iova(), 4096, Duration::from_secs(5))?;
//!
//! let mut check = [0u8; 10];
//! exporter.map_bar(2)?.read(0, &mut check)?;
//! assert_eq!(&check, b"hello, BAR");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod deadline;
pub mod detect;
pub mod edu;
mod error;
pub mod nvme;

pub use error::{Error, Result};

use std::os::fd::BorrowedFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// How a copy's completion is observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub enum Completion {
    /// An MSI delivered through a VFIO eventfd.
    Interrupt,
    /// Polling the device's status register.
    Polling,
}

/// A device that copies `len` bytes from one IOVA to another.
pub trait DmaEngine {
    /// A short name of the driver, e.g. `"edu"`.
    fn name(&self) -> &str;

    /// Largest copy one [`start`](Self::memcpy_start) may be given.
    fn max_copy(&self) -> u64;

    /// How completion is observed.
    fn completion(&self) -> Completion;

    /// Starts copying `len` (at most [`max_copy`](Self::max_copy)) bytes from
    /// `src` to `dst`, both IOVAs in the engine's IO address space.
    fn memcpy_start(&mut self, src: u64, dst: u64, len: u64) -> Result<()>;

    /// Waits for the copy started last; a copy that has not finished after
    /// `timeout` is an error.
    fn memcpy_wait(&mut self, timeout: Duration) -> Result<()>;

    /// Copies `len` bytes, split into chunks the engine accepts.
    fn memcpy(&mut self, src: u64, dst: u64, len: u64, timeout: Duration) -> Result<()> {
        let max = self.max_copy().max(1);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(max);
            self.memcpy_start(src + done, dst + done, n)?;
            self.memcpy_wait(timeout)?;
            done += n;
        }
        Ok(())
    }
}

/// A device that moves logical blocks between its storage and IOVAs in its
/// IO address space: it reads blocks *to* an IOVA and writes blocks *from*
/// one, but does not copy IOVA to IOVA.
pub trait StorageEngine {
    /// A short name of the driver, e.g. `"nvme"`.
    fn name(&self) -> &str;

    /// How completion is observed.
    fn completion(&self) -> Completion;

    /// Bytes per logical block.
    fn block_size(&self) -> u64;

    /// Number of logical blocks.
    fn blocks(&self) -> u64;

    /// Largest transfer, in bytes, that one [`read_blocks`](Self::read_blocks)
    /// or [`write_blocks`](Self::write_blocks) may be given.
    fn max_transfer(&self) -> u64;

    /// Reads `count` blocks from `lba` into IOVA `dst`, and waits for it.
    fn read_blocks(&mut self, lba: u64, count: u32, dst: u64, timeout: Duration) -> Result<()>;

    /// Writes `count` blocks at `lba` from IOVA `src`, and waits for it.
    fn write_blocks(&mut self, lba: u64, count: u32, src: u64, timeout: Duration) -> Result<()>;

    /// Reads `count` blocks from `lba` into `dst`, split into transfers of
    /// at most [`max_transfer`](Self::max_transfer) bytes.
    fn read(&mut self, lba: u64, count: u64, dst: u64, timeout: Duration) -> Result<()> {
        let bs = self.block_size().max(1);
        let step = (self.max_transfer() / bs).clamp(1, u64::from(u16::MAX) + 1);
        let mut done = 0u64;
        while done < count {
            let n = (count - done).min(step);
            // `n` is at most 65536.
            let n32 = u32::try_from(n).unwrap_or(u32::MAX);
            self.read_blocks(lba + done, n32, dst + done * bs, timeout)?;
            done += n;
        }
        Ok(())
    }
}

/// Waits up to `timeout` for `fd` (an interrupt eventfd) to become readable;
/// `what` names it in errors. An interrupted wait returns early.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration, what: &str) -> Result<()> {
    // Round up, so a sub-millisecond rest does not spin.
    let ms = u32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(u32::MAX);
    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(Error::Lib(dmabuf_p2p::Error::Sys {
            op: "poll",
            target: what.to_owned(),
            source: e.into(),
        })),
    }
}
