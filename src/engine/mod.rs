//! DMA engines: devices that move data to and from IOVAs, used to prove
//! that data really crossed between devices.
//!
//! Two kinds: a copy engine ([`DmaEngine`], e.g. QEMU's `edu`) copies from
//! one IOVA to another; a storage engine ([`StorageEngine`], e.g. an NVMe
//! controller) moves logical blocks between its storage and an IOVA. The
//! copy interface follows the kernel's VFIO selftest drivers: initialise,
//! start a copy, wait for it. Tests and the CLI are written against these
//! traits, so a new engine needs only a driver.

pub mod detect;
pub mod edu;
pub mod nvme;

use std::os::fd::BorrowedFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::{Error, Result};

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
        Err(e) => Err(Error::sys("poll", what.to_owned(), e.into())),
    }
}
