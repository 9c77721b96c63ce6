//! The thread-safety bounds the engines claim, checked at compile time:
//! [`Edu`] and [`Nvme`] are `Send + Sync` (their operations take `&mut self`:
//! one transfer or queue at a time per engine, moved to the thread that
//! drives it), and [`Error`] fits in `Box<dyn std::error::Error + Send + Sync>`.

use dmabuf_p2p_engine::Error;
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_engine::nvme::Nvme;

const fn send_sync<T: Send + Sync>() {}
const fn error_object<T: std::error::Error + Send + Sync + 'static>() {}

// Evaluated at compile time: a missing bound is a build error of this file.
const _: () = {
    send_sync::<Edu>();
    send_sync::<Nvme>();
    error_object::<Error>();
};
