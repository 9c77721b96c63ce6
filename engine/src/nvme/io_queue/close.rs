//! Closing a queue: its commands waited for, then aborted, then the queue
//! deleted.

use std::time::Duration;

use super::super::command::Command;
use super::super::problem::NvmeProblem;
use super::IoQueue;
use crate::{Error, Result};

/// How long dropping an [`IoQueue`] waits for its commands to complete
/// before it sends an Abort for each still running, and again after (see
/// [`IoQueue::close`]).
pub const DROP_WAIT: Duration = Duration::from_secs(10);

impl IoQueue {
    /// Deletes the queue pair on the controller once its commands are done
    /// (see the type's documentation, "Closing a queue with commands in
    /// flight"): waits up to `timeout` for them, then sends an Abort for
    /// each still running and waits up to `timeout` again, then deletes the
    /// queues. Completions not taken are dropped; every buffer the commands
    /// held is let go of. A command the deletion had to abort is
    /// [`NvmeProblem::AbortedByDeletion`] (its data is undefined); a failed
    /// deletion, the admin command's error.
    pub fn close(mut self, timeout: Duration) -> Result<()> {
        self.shut_down(timeout)
    }

    pub(super) fn shut_down(&mut self, timeout: Duration) -> Result<()> {
        self.deleted = true;
        // A controller that is gone or failed finishes nothing: no wait.
        let mut running = self.running();
        let mut aborts = 0;
        if running > 0 && self.ctrl.check_alive().is_ok() {
            running = self.settle(timeout);
            if running > 0 && self.ctrl.check_alive().is_ok() {
                let cids: Vec<u16> = self.table.running().collect();
                for cid in cids {
                    // An Abort may be refused or not abort (QEMU 7.2
                    // answers every one "not aborted"): the wait after it
                    // says. No answer, or a controller gone: stop asking.
                    match self.ctrl.admin_command(Command::abort(self.qid, cid)) {
                        Ok(_)
                        | Err(Error::Nvme {
                            problem: NvmeProblem::CommandFailed { .. },
                            ..
                        }) => aborts += 1,
                        Err(_) => break,
                    }
                }
                running = self.settle(timeout);
            }
        }
        // The submission queue first: the controller completes or aborts
        // its commands before it answers, so after both deletions nothing
        // touches the queue's memory or a command's buffer, and what the
        // commands kept alive can go.
        let sq = self
            .ctrl
            .admin_command(Command::delete_io_queue(true, self.qid));
        let cq = self
            .ctrl
            .admin_command(Command::delete_io_queue(false, self.qid));
        if sq.is_ok() && cq.is_ok() {
            self.ctrl.release_qid(self.qid);
        }
        self.table.clear();
        sq?;
        cq?;
        if running > 0 {
            return Err(self.ctrl.error(NvmeProblem::AbortedByDeletion {
                qid: self.qid,
                commands: running,
                aborts,
            }));
        }
        Ok(())
    }

    /// Waits up to `timeout` for the controller to finish every command
    /// here; how many it still runs.
    pub(super) fn settle(&mut self, timeout: Duration) -> usize {
        // A timeout or a dead controller: the count says what is left.
        let _ = self.quiesce(timeout);
        self.running()
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        if !self.deleted {
            let _ = self.shut_down(DROP_WAIT);
        }
    }
}
