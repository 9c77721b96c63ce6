//! The thread-safety bounds the engines claim, checked at compile time:
//! [`Edu`], [`Nvme`] and an NVMe [`IoQueue`] are `Send + Sync` (their
//! operations take `&mut self`: one transfer or queue at a time, moved to
//! the thread that drives it; a controller's queues go to threads of their
//! own), and [`Error`] fits in `Box<dyn std::error::Error + Send + Sync>`.

use dmabuf_p2p_engine::Error;
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_engine::nvme::{Dma, IoQueue, Nvme};

const fn send_sync<T: Send + Sync>() {}
const fn error_object<T: std::error::Error + Send + Sync + 'static>() {}

// Evaluated at compile time: a missing bound is a build error of this file.
const _: () = {
    send_sync::<Edu>();
    send_sync::<Nvme>();
    send_sync::<IoQueue>();
    send_sync::<Dma>();
    error_object::<Error>();
};
