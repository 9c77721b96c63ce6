//! `dmabuf-p2p`: export PCI BARs as dma-bufs, map them for peer devices through
//! iommufd, and prove peer-to-peer DMA (and its revocation) end to end.
//!
//! Errors print as one line on stderr with a non-zero exit status (2 for bad
//! arguments); with `--json` that line is a JSON object. A closed stdout ends
//! the command quietly with status 0, as for any filter's reader going away.

use std::io;
use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use dmabuf_p2p_cli as cli;

fn main() -> ExitCode {
    // Before parsing, so an argument error honours `--json` too.
    let json = std::env::args_os().skip(1).any(|a| a == "--json");
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => match e.kind() {
            // Help and version are not errors: clap prints them as usual.
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => {
                report("arguments", &one_line(&e.to_string()), json);
                return ExitCode::from(2);
            }
        },
    };
    let json = args.json;
    match cli::run(args) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&*e) => ExitCode::SUCCESS,
        Err(e) => {
            report("command", &e.to_string(), json);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error on stderr: `dmabuf-p2p: error: ...`, or with `--json` an
/// object `{"error": {"kind": ..., "message": ...}}`.
fn report(kind: &str, message: &str, json: bool) {
    if json {
        let value = serde_json::json!({ "error": { "kind": kind, "message": message } });
        eprintln!("{value}");
    } else {
        eprintln!("dmabuf-p2p: error: {message}");
    }
}

/// clap's error text as one line: the message with whatever it lists below it
/// (e.g. the names of missing arguments), without the usage block and hints.
fn one_line(text: &str) -> String {
    let mut parts = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"));
    let first = parts
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    let listed: Vec<&str> = parts.collect();
    if listed.is_empty() {
        format!("{first} (see --help)")
    } else {
        format!("{first} {} (see --help)", listed.join(", "))
    }
}

/// Whether the command failed only because its stdout was closed (`EPIPE`).
fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}
