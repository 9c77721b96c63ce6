//! `cargo xtask`: developer and CI tasks for dmabuf-p2p.

fn main() {}
