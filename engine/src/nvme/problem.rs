//! What can go wrong with an NVMe controller or a request to it, named.

use super::command::Status;

/// Why an NVMe request or the controller failed ([`crate::Error::Nvme`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NvmeProblem {
    /// The device is not an NVMe controller (class 0x010802).
    #[error("is not an NVMe controller (class {class:#08x}, expected 0x010802)")]
    NotNvme {
        /// Its PCI class code.
        class: u32,
    },
    /// The controller lacks something the driver needs.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What.
        what: String,
    },
    /// The namespace does not exist or is not active.
    #[error(
        "namespace {nsid} does not exist (the controller has {count} namespace ID(s); an ID may also be inactive)"
    )]
    NoSuchNamespace {
        /// The namespace ID asked for.
        nsid: u32,
        /// The number of namespaces the controller reports (NN).
        count: u32,
    },
    /// Blocks past the end of the namespace.
    #[error("blocks {lba}..{} are past the end of namespace {nsid} ({blocks} blocks)", lba.saturating_add(u64::from(*count)))]
    LbaOutOfRange {
        /// The namespace.
        nsid: u32,
        /// First block asked for.
        lba: u64,
        /// Blocks asked for.
        count: u32,
        /// The namespace's size in blocks.
        blocks: u64,
    },
    /// A transfer larger than one command may move (MDTS, and one PRP list).
    #[error(
        "a transfer of {bytes} bytes is over the controller's maximum of {max} bytes per command (MDTS)"
    )]
    TransferTooLarge {
        /// Bytes asked for.
        bytes: u64,
        /// The most one command moves.
        max: u64,
    },
    /// A transfer of no blocks.
    #[error("a transfer of zero blocks")]
    EmptyTransfer,
    /// A data IOVA the controller cannot take (PRP entries are dword aligned).
    #[error("data IOVA {iova:#x} is not {align}-byte aligned")]
    UnalignedIova {
        /// The IOVA.
        iova: u64,
        /// The alignment needed.
        align: u64,
    },
    /// A data range that wraps the 64-bit IOVA space.
    #[error("data IOVA {iova:#x} + {len:#x} overflows")]
    IovaOverflow {
        /// The IOVA.
        iova: u64,
        /// The length.
        len: u64,
    },
    /// The controller completed the command with an error status.
    #[error("{command} (CID {cid}) failed: {status}")]
    CommandFailed {
        /// The command's name, e.g. `"Read"`.
        command: &'static str,
        /// Its command identifier.
        cid: u16,
        /// The status the controller returned.
        status: Status,
    },
    /// Every command slot or submission queue entry is in use.
    #[error("the I/O queue is full ({in_flight} commands in flight)")]
    QueueFull {
        /// Commands outstanding.
        in_flight: usize,
    },
    /// A wait or a give-up named a command that is not this queue's to
    /// hand out: its completion was taken already, it was given up, it was
    /// never submitted, or it belongs to another queue.
    #[error(
        "command {cid} (use {generation}) of I/O queue {qid} is not in flight on queue {queue}: its completion was taken already, it was given up, or it is another queue's"
    )]
    NotInFlight {
        /// The queue the command's ID names.
        qid: u16,
        /// Its CID.
        cid: u16,
        /// Which use of the CID it was.
        generation: u32,
        /// The queue asked.
        queue: u16,
    },
    /// A wait for any command on a queue with none in flight and no
    /// completion to hand out.
    #[error("no command is in flight on I/O queue {qid} and no completion waits to be taken")]
    NothingInFlight {
        /// The queue.
        qid: u16,
    },
    /// A transfer longer than the buffer it names holds from its offset.
    #[error(
        "a transfer of {bytes} bytes overruns its buffer, which holds {available} bytes from IOVA {iova:#x}"
    )]
    BufferOverrun {
        /// The transfer's IOVA.
        iova: u64,
        /// Its length.
        bytes: u64,
        /// What the buffer holds from there.
        available: u64,
    },
    /// A queue depth the controller or the driver cannot give.
    #[error(
        "a queue of depth {depth} (commands in flight) was asked for; this controller allows 1..={max}"
    )]
    QueueDepth {
        /// The depth asked for.
        depth: u32,
        /// The largest the controller allows (CAP.MQES).
        max: u32,
    },
    /// Every I/O queue the controller granted is in use.
    #[error(
        "every I/O queue the controller granted is in use ({granted}; ask for more with NvmeOptions::io_queues)"
    )]
    NoQueueLeft {
        /// I/O queue pairs the controller granted (Set Features, Number of Queues).
        granted: u16,
    },
    /// Raw access to a queue that still has commands.
    #[error("I/O queue {qid} has {in_use} command(s) in flight or not yet taken")]
    QueueBusy {
        /// The queue.
        qid: u16,
        /// Commands submitted and not yet handed out or dropped.
        in_use: usize,
    },
    /// Prepared buffers for a queue: 1 to its depth.
    #[error("{asked} prepared buffers for an I/O queue of depth {depth} (1 to its depth)")]
    PreparedSlots {
        /// Buffers given (counted up to the first too many).
        asked: usize,
        /// The queue's depth.
        depth: u16,
    },
    /// An I/O queue was deleted while the controller still ran some of its
    /// commands: they completed neither in the wait before the deletion
    /// nor after an Abort of each, so the deletion aborted them.
    #[error(
        "I/O queue {qid} was deleted with {commands} command(s) still running (not completed in the wait, nor after Abort, {aborts} sent): the deletion aborted them, so their data is undefined"
    )]
    AbortedByDeletion {
        /// The queue.
        qid: u16,
        /// Commands the deletion aborted.
        commands: usize,
        /// Abort commands the controller took before the deletion (one for
        /// each command still running after the first wait).
        aborts: usize,
    },
    /// The controller reported a fatal status (CSTS.CFS) or its registers
    /// read as all ones (not reachable: memory decode off, or gone).
    #[error("controller failed: {what}")]
    ControllerFatal {
        /// What was seen.
        what: String,
    },
    /// The controller has no controller memory buffer.
    #[error("has no controller memory buffer (CAP.CMBS is 0 and CMBSZ reads 0)")]
    NoCmb,
    /// The controller has no persistent memory region.
    #[error("has no persistent memory region ({why})")]
    NoPmr {
        /// What the registers said.
        why: String,
    },
}

impl NvmeProblem {
    /// The completion status, when the controller returned one.
    pub fn status(&self) -> Option<Status> {
        match self {
            Self::CommandFailed { status, .. } => Some(*status),
            _ => None,
        }
    }
}
