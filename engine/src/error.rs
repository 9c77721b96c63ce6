//! The engines' error type: what the library reported, as it is, and what
//! the engines themselves refuse or see go wrong.

use std::time::Duration;

use crate::nvme::NvmeProblem;

/// Errors of the engines.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The library refused or the kernel did: opening, binding or
    /// attaching the device, mapping memory, config space or BAR access;
    /// also a system call an engine makes itself (waiting on its interrupt
    /// eventfd), as the library's [`Sys`](dmabuf_p2p::Error::Sys).
    #[error(transparent)]
    Lib(#[from] dmabuf_p2p::Error),

    /// A DMA engine refused a request (a copy too large, one still
    /// running) or is not the device its driver drives.
    #[error("DMA engine {engine}: {problem}")]
    Engine {
        /// The engine, e.g. `"edu 0000:01:00.0"`.
        engine: String,
        /// What went wrong.
        problem: String,
    },

    /// An NVMe controller refused a request (a bad namespace, LBA range,
    /// size or IOVA, checked before submission) or completed it with an
    /// error status.
    #[error("NVMe controller {controller}: {problem}")]
    Nvme {
        /// The controller's PCI address.
        controller: String,
        /// What went wrong.
        problem: NvmeProblem,
    },

    /// A transfer, a command or a controller state change did not finish
    /// in time.
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long.
        after: Duration,
    },
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The errno behind this error, when the kernel answered (the
    /// library's, [`dmabuf_p2p::Error::raw_os_error`]); `None` for what an
    /// engine refused or saw itself.
    ///
    /// ```
    /// use dmabuf_p2p_engine::Error;
    /// let ebadf = std::io::Error::from_raw_os_error(9);
    /// let e = Error::Lib(dmabuf_p2p::Error::Sys { op: "poll", target: "edu MSI eventfd".into(), source: ebadf });
    /// assert_eq!(e.raw_os_error(), Some(9));
    /// let refused = Error::Engine { engine: "edu 0000:01:00.0".into(), problem: "busy".into() };
    /// assert_eq!(refused.raw_os_error(), None);
    /// ```
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::Lib(e) => e.raw_os_error(),
            Self::Engine { .. } | Self::Nvme { .. } | Self::Timeout { .. } => None,
        }
    }
}
