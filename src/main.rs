//! `dmabuf-p2p`: export PCI BARs as dma-bufs, map them for peer devices through
//! iommufd, and prove peer-to-peer DMA (and its revocation) end to end.
//!
//! Errors print as one line on stderr with a non-zero exit status.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dmabuf-p2p: error: {e}");
            ExitCode::FAILURE
        }
    }
}
