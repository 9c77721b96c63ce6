//! Several commands behind one doorbell.

use super::super::command::{Command, nvm};
use super::super::dma::Dma;
use super::IoQueue;
use super::ids::CommandId;
use crate::Result;

impl IoQueue {
    /// A batch: commands written to the submission queue and announced to
    /// the controller with one doorbell write when the batch is submitted
    /// or dropped.
    ///
    /// ```no_run
    /// # fn f(q: &mut dmabuf_p2p_engine::nvme::IoQueue, iova: u64) -> dmabuf_p2p_engine::Result<()> {
    /// let mut batch = q.batch();
    /// for i in 0..8u64 {
    ///     batch.read(i * 8, 8, iova + i * 4096)?;
    /// }
    /// batch.submit()?; // one doorbell for eight Reads
    /// # Ok(()) }
    /// ```
    pub fn batch(&mut self) -> Batch<'_> {
        Batch {
            queue: self,
            pushed: 0,
        }
    }
}

/// Commands written to a queue's submission ring, announced with one
/// doorbell write by [`submit`](Self::submit) or when dropped
/// ([`IoQueue::batch`]).
#[derive(Debug)]
pub struct Batch<'q> {
    queue: &'q mut IoQueue,
    pushed: usize,
}

impl Batch<'_> {
    /// Adds a Read (see [`IoQueue::submit_read`]).
    #[inline]
    pub fn read(&mut self, lba: u64, count: u32, dst: impl Into<Dma>) -> Result<CommandId> {
        let id = self.queue.push_blocks(nvm::READ, lba, count, dst.into())?;
        self.pushed += 1;
        Ok(id)
    }

    /// Adds a Write (see [`IoQueue::submit_write`]).
    #[inline]
    pub fn write(&mut self, lba: u64, count: u32, src: impl Into<Dma>) -> Result<CommandId> {
        let id = self.queue.push_blocks(nvm::WRITE, lba, count, src.into())?;
        self.pushed += 1;
        Ok(id)
    }

    /// Adds a raw command (see [`IoQueue::submit_raw`]).
    pub fn raw(&mut self, cmd: Command, data: Option<(Dma, u64)>) -> Result<CommandId> {
        let id = self.queue.push_raw(cmd, data)?;
        self.pushed += 1;
        Ok(id)
    }

    /// Commands added and not yet announced.
    pub fn len(&self) -> usize {
        self.pushed
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.pushed == 0
    }

    /// Rings the doorbell once for every command added; how many.
    #[inline]
    pub fn submit(mut self) -> Result<usize> {
        let n = std::mem::take(&mut self.pushed);
        if n > 0 {
            self.queue.ring()?;
        }
        Ok(n)
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if self.pushed > 0 {
            // A write to a mapped register of this queue: cannot fail.
            let _ = self.queue.ring();
        }
    }
}
