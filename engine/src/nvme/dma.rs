//! The memory a command's data goes to or comes from: a bare IOVA, or a
//! buffer the queue keeps mapped until the controller is done with it.

use std::fmt;
use std::sync::Arc;

use dmabuf_p2p::IoasMapping;
use dmabuf_p2p::revoke::Attachment;

/// Memory in the queue's IO address space that commands move data to or
/// from, kept mapped for as long as a command may use it: hand a command
/// an `Arc` of it ([`Dma::held`]) and the queue keeps a clone until the
/// controller has completed the command, even if the caller gives the
/// command up ([`IoQueue::abandon`](super::IoQueue::abandon)) and drops its own.
pub trait DmaMemory: Send + Sync + 'static {
    /// Its first IOVA.
    fn iova(&self) -> u64;
    /// Its length in bytes.
    fn length(&self) -> u64;
}

impl DmaMemory for IoasMapping {
    fn iova(&self) -> u64 {
        IoasMapping::iova(self)
    }
    fn length(&self) -> u64 {
        IoasMapping::length(self)
    }
}

impl DmaMemory for Attachment {
    fn iova(&self) -> u64 {
        Attachment::iova(self)
    }
    fn length(&self) -> u64 {
        Attachment::length(self)
    }
}

/// Where a command's data is: an IOVA (`u64`), which the caller keeps
/// mapped until the command's completion is taken, or a held buffer
/// ([`Dma::held`]), which the queue keeps mapped until the controller is
/// done with it.
#[derive(Clone, Default)]
pub struct Dma {
    pub(super) iova: u64,
    /// Bytes the memory holds from `iova`.
    pub(super) available: u64,
    pub(super) keep: Option<Arc<dyn DmaMemory>>,
}

impl Dma {
    /// A bare IOVA: nothing checks the transfer's length against the
    /// memory there, and nothing keeps it mapped.
    #[inline]
    pub fn at(iova: u64) -> Self {
        Self {
            iova,
            available: u64::MAX,
            keep: None,
        }
    }

    /// `offset` bytes into `buf`, which the queue holds (a clone of the
    /// `Arc`, no allocation) until the command's completion arrives. A
    /// transfer past the end of `buf` is refused
    /// ([`NvmeProblem::BufferOverrun`](super::NvmeProblem::BufferOverrun)).
    #[inline]
    pub fn held<T: DmaMemory>(buf: &Arc<T>, offset: u64) -> Self {
        Self {
            iova: buf.iova().saturating_add(offset),
            available: buf.length().saturating_sub(offset),
            keep: Some(Arc::clone(buf) as Arc<dyn DmaMemory>),
        }
    }

    /// The IOVA.
    pub fn iova(&self) -> u64 {
        self.iova
    }
}

impl From<u64> for Dma {
    #[inline]
    fn from(iova: u64) -> Self {
        Self::at(iova)
    }
}

impl<T: DmaMemory> From<&Arc<T>> for Dma {
    #[inline]
    fn from(buf: &Arc<T>) -> Self {
        Self::held(buf, 0)
    }
}

impl fmt::Debug for Dma {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dma")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("available", &self.available)
            .field("held", &self.keep.is_some())
            .finish()
    }
}
