//! What a queue hands out for a command: its ID, and its completion.

use super::super::command::{self, Status};
use super::super::problem::NvmeProblem;

/// A command submitted to an [`IoQueue`](super::IoQueue): its queue (which queue of the
/// process, not only its queue ID, which a later queue may reuse), its
/// CID, and which use of that CID it is. A CID is given out again only
/// after the command's completion was taken (or dropped, for a command
/// given up), and then with the next use, so the ID of a finished command
/// stays stale: waiting for it is [`NvmeProblem::NotInFlight`], never
/// another command's completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CommandId {
    pub(super) queue: u32,
    pub(super) qid: u16,
    pub(super) cid: u16,
    pub(super) generation: u32,
}

impl CommandId {
    /// The I/O queue's ID.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// The command identifier the controller sees.
    pub fn cid(&self) -> u16 {
        self.cid
    }

    /// Which use of the CID this command is.
    pub fn generation(&self) -> u32 {
        self.generation
    }
}

/// A command's completion, handed to the caller once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Which command.
    pub id: CommandId,
    /// Its opcode.
    pub opcode: u8,
    /// The status the controller returned.
    pub status: Status,
    /// Dword 0 of the completion (command specific).
    pub result: u32,
}

impl Done {
    /// Whether the command succeeded.
    #[inline]
    pub fn is_success(&self) -> bool {
        self.status.is_success()
    }

    /// What went wrong, if the command failed: the problem an
    /// [`Error::Nvme`](crate::Error::Nvme) carries ([`IoQueue::check`](super::IoQueue::check) makes the error).
    pub fn problem(&self) -> Option<NvmeProblem> {
        (!self.is_success()).then(|| NvmeProblem::CommandFailed {
            command: command::opcode_name(self.opcode, false),
            cid: self.id.cid,
            status: self.status,
        })
    }
}
