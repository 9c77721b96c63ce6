//! Memory of the engine's own that a controller reaches by DMA (queue
//! rings, PRP lists, shadow doorbells): one home, used by the controller,
//! its I/O queues and the shadow doorbell buffers.

use std::sync::Arc;

use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::{ByteRange, Ioas, IoasMapping, IovaPlacement, MapPerms, Mapping};

use crate::Result;

/// Memory the controller reaches by DMA: a memfd, its CPU mapping and its
/// IOAS mapping (unmapped from the IOAS before the memfd closes).
#[derive(Debug)]
pub(super) struct DmaArea {
    pub(super) cpu: Arc<Mapping>,
    pub(super) iova: IoasMapping,
    _memfd: Memfd,
}

impl DmaArea {
    pub(super) fn new(ioas: &Ioas, name: &str, size: u64) -> Result<Self> {
        let memfd = Memfd::new(name, size)?;
        let cpu = Arc::new(memfd.mmap()?);
        let iova = ioas.map_file(
            &memfd,
            ByteRange::new(0, size),
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
        )?;
        Ok(Self {
            cpu,
            iova,
            _memfd: memfd,
        })
    }

    pub(super) fn iova(&self, offset: u64) -> u64 {
        self.iova.iova() + offset
    }
}
