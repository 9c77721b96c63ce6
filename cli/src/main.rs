//! `dmabuf-p2p`: export PCI BARs as dma-bufs, map them for peer devices through
//! iommufd, and prove peer-to-peer DMA (and its revocation) end to end.
//!
//! Errors print as one line on stderr with a non-zero exit status.

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use dmabuf_p2p_cli as cli;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => match e.kind() {
            // Help and version are not errors: clap prints them as usual.
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            // One line, like every other error (clap would add a usage block).
            _ => {
                let text = e.to_string();
                let first = text
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("invalid arguments");
                eprintln!(
                    "dmabuf-p2p: error: {} (see --help)",
                    first.trim_start_matches("error: ")
                );
                return ExitCode::from(2);
            }
        },
    };
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dmabuf-p2p: error: {e}");
            ExitCode::FAILURE
        }
    }
}
