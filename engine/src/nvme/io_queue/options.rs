//! How to make an I/O queue: its depth, completion and spin budget.

use std::time::Duration;

use crate::Completion;

/// The deepest queue the driver makes (commands in flight at once).
pub const MAX_DEPTH: u16 = 1024;
/// The depth of a queue made with [`QueueOptions::default`].
pub const DEFAULT_DEPTH: u16 = 64;

/// How to make an I/O queue ([`Nvme::create_queue`](crate::nvme::Nvme::create_queue)).
///
/// ```
/// use std::time::Duration;
/// use dmabuf_p2p_engine::Completion;
/// use dmabuf_p2p_engine::nvme::QueueOptions;
/// let polled = QueueOptions::new().depth(32).completion(Completion::Polling).spin(Duration::MAX);
/// assert_eq!(polled.depth_asked(), 32);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    pub(super) depth: u16,
    pub(super) completion: Option<Completion>,
    pub(super) spin: Duration,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            depth: DEFAULT_DEPTH,
            completion: None,
            spin: Duration::ZERO,
        }
    }
}

impl QueueOptions {
    /// Depth 64, completion as the controller was opened with, no spinning.
    pub fn new() -> Self {
        Self::default()
    }

    /// Commands in flight at once, 1..=[`MAX_DEPTH`] and at most what the
    /// controller allows (CAP.MQES); the rings get one entry more.
    pub fn depth(mut self, depth: u16) -> Self {
        self.depth = depth;
        self
    }

    /// The depth asked for.
    pub fn depth_asked(&self) -> u16 {
        self.depth
    }

    /// [`Completion::Interrupt`] (the queue's own MSI-X vector, when the
    /// controller was opened with interrupts and has a vector for it) or
    /// [`Completion::Polling`] (the completion queue is made without
    /// interrupts).
    pub fn completion(mut self, completion: Completion) -> Self {
        self.completion = Some(completion);
        self
    }

    /// How long a wait looks at the completion queue without sleeping
    /// before it blocks on the interrupt or, polling, sleeps between looks
    /// (see [`IoQueue::set_spin`](super::IoQueue::set_spin)). `Duration::MAX`: spin for the whole
    /// timeout.
    pub fn spin(mut self, budget: Duration) -> Self {
        self.spin = budget;
        self
    }
}
