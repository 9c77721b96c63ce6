//! DMA engines: devices that copy between IOVAs, used to prove that data
//! really crossed between devices.
//!
//! The interface follows the kernel's VFIO selftest drivers: initialise, start
//! a copy, wait for it. Tests and the CLI are written against [`DmaEngine`], so
//! a new engine (a real DSA or IOAT, say) needs only a driver.

pub mod edu;

use std::time::Duration;

use crate::Result;

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
