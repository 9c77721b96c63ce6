//! The guest kernel: taken from `DMABUF_P2P_KERNEL`, from the cache, or built.
//! (Stub: being written.)

use std::path::PathBuf;

use crate::{Error, Result};

/// Environment variable naming a prebuilt bzImage; when set, nothing is built.
pub const KERNEL_ENV: &str = "DMABUF_P2P_KERNEL";

/// Returns the bzImage to boot.
pub fn resolve() -> Result<PathBuf> {
    match std::env::var_os(KERNEL_ENV) {
        Some(p) => Ok(PathBuf::from(p)),
        None => Err(Error::Setup("kernel build not written yet".into())),
    }
}
