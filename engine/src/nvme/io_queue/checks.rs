//! The checks of a request before it reaches the submission queue.

use super::super::dma::Dma;
use super::super::problem::NvmeProblem;
use super::IoQueue;
use crate::{Error, Result};

impl IoQueue {
    /// The checks of a Read or Write, in one test: namespace, 1 to MDTS
    /// blocks, inside the namespace, a dword-aligned IOVA whose range does
    /// not wrap, and no longer than a held buffer. Returns the byte count.
    #[inline(always)]
    pub(in crate::nvme) fn check_blocks(&self, lba: u64, count: u32, dma: &Dma) -> Result<u64> {
        let l = &self.limits;
        let bytes = u64::from(count) << l.shift;
        let ok = (count.wrapping_sub(1) < l.max_blocks)
            & (lba < l.blocks)
            & (u64::from(count) <= l.blocks.wrapping_sub(lba))
            & (dma.iova & 3 == 0)
            & (bytes <= dma.available)
            & (dma.iova <= u64::MAX - bytes);
        if ok {
            Ok(bytes)
        } else {
            Err(self.blocks_error(lba, count, dma))
        }
    }

    /// Which check of [`check_blocks`](Self::check_blocks) failed.
    #[cold]
    #[inline(never)]
    pub(super) fn blocks_error(&self, lba: u64, count: u32, dma: &Dma) -> Error {
        let l = &self.limits;
        let problem = match self.namespace {
            None => NvmeProblem::NoSuchNamespace { nsid: 1, count: 0 },
            Some(_) if count == 0 => NvmeProblem::EmptyTransfer,
            Some(_) if count > l.max_blocks => NvmeProblem::TransferTooLarge {
                bytes: u64::from(count) << l.shift,
                max: l.max_transfer,
            },
            Some(ns)
                if lba
                    .checked_add(u64::from(count))
                    .is_none_or(|end| end > l.blocks) =>
            {
                NvmeProblem::LbaOutOfRange {
                    nsid: ns.nsid,
                    lba,
                    count,
                    blocks: l.blocks,
                }
            }
            Some(_) => return self.data_error(dma, u64::from(count) << l.shift),
        };
        self.ctrl.error(problem)
    }

    /// The checks of a raw command's data pointer.
    #[inline]
    pub(super) fn check_data(&self, dma: &Dma, len: u64) -> Result<()> {
        let ok = (len <= self.limits.max_transfer)
            & (dma.iova & 3 == 0)
            & (len <= dma.available)
            & (dma.iova <= u64::MAX - len);
        if ok {
            Ok(())
        } else {
            Err(self.data_error(dma, len))
        }
    }

    #[cold]
    #[inline(never)]
    pub(super) fn data_error(&self, dma: &Dma, len: u64) -> Error {
        let problem = if len > self.limits.max_transfer {
            NvmeProblem::TransferTooLarge {
                bytes: len,
                max: self.limits.max_transfer,
            }
        } else if !dma.iova.is_multiple_of(4) {
            NvmeProblem::UnalignedIova {
                iova: dma.iova,
                align: 4,
            }
        } else if dma.iova.checked_add(len).is_none() {
            NvmeProblem::IovaOverflow {
                iova: dma.iova,
                len,
            }
        } else {
            NvmeProblem::BufferOverrun {
                iova: dma.iova,
                bytes: len,
                available: dma.available,
            }
        };
        self.ctrl.error(problem)
    }
}
