//! The queue as a [`StorageEngine`].

use std::time::Duration;

use super::IoQueue;
use super::ids::CommandId;
use crate::{Completion, Result, StorageEngine};

impl StorageEngine for IoQueue {
    fn name(&self) -> &str {
        "nvme"
    }

    fn completion(&self) -> Completion {
        IoQueue::completion(self)
    }

    fn block_size(&self) -> u64 {
        self.namespace.map_or(0, |n| n.block_size)
    }

    fn blocks(&self) -> u64 {
        self.namespace.map_or(0, |n| n.blocks)
    }

    fn max_transfer(&self) -> u64 {
        self.limits.max_transfer
    }

    fn read_blocks(&mut self, lba: u64, count: u32, dst: u64, timeout: Duration) -> Result<()> {
        let id = self.submit_read(lba, count, dst)?;
        self.wait_or_abandon(id, timeout)
    }

    fn write_blocks(&mut self, lba: u64, count: u32, src: u64, timeout: Duration) -> Result<()> {
        let id = self.submit_write(lba, count, src)?;
        self.wait_or_abandon(id, timeout)
    }
}

impl IoQueue {
    /// Waits for `id`; gives it up if the wait fails.
    pub(in crate::nvme) fn wait_or_abandon(
        &mut self,
        id: CommandId,
        timeout: Duration,
    ) -> Result<()> {
        match self.wait(id, timeout) {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = self.abandon(id);
                Err(e)
            }
        }
    }
}
