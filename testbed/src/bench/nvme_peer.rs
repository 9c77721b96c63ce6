//! The outside peer check of issue 26, a subsection right after part 9's
//! table: libvfn's `perf` against the engine on the same NVMe controller
//! (`bench/src/nvme_peer.rs`). Only run when asked: the peer is built
//! outside the repository and handed over in [`PEER_ENV`].

use std::fmt::Write as _;

use super::{Record, Results, fmt_ns, sig3};
use crate::{Error, Result};

/// The records' group.
pub const GROUP: &str = "nvmepeer";
/// The environment variable naming the peer's prebuilt binary on the host
/// (libvfn's `examples/perf`); without it nothing of the peer is packed.
pub const PEER_ENV: &str = "DMABUF_P2P_BENCH_PEER";

/// `--only=peer` without [`PEER_ENV`] is refused before anything boots.
pub fn check_peer_asked(only: Option<&str>) -> Result<()> {
    check_peer_given(only, std::env::var_os(PEER_ENV).is_some())
}

fn check_peer_given(only: Option<&str>, given: bool) -> Result<()> {
    let asked = only.is_some_and(|o| o.split(',').any(|p| p == "peer"));
    if asked && !given {
        return Err(Error::Setup(format!(
            "--only=peer needs {PEER_ENV}=/path/to/perf (libvfn's examples/perf, built outside \
             this repository: docs/BENCHMARKS.md, part 9)"
        )));
    }
    Ok(())
}

/// The rows: (op, queue depth, what, whether higher is better).
const ROWS: [(&str, u64, &str, bool); 4] = [
    ("iops", 1, "QD1, Reads per second", true),
    ("latency", 1, "QD1, mean latency", false),
    ("iops", 32, "QD32, Reads per second", true),
    (
        "latency",
        32,
        "QD32, mean latency (queueing included)",
        false,
    ),
];

fn value(r: Option<&Record>, op: &str) -> String {
    let Some((m, lo, hi)) = r.and_then(|r| Some((r.median?, r.min?, r.max?))) else {
        return "–".into();
    };
    if op == "iops" {
        format!("{}/s ({}–{})", sig3(m), sig3(lo), sig3(hi))
    } else {
        format!("{} ({}–{})", fmt_ns(m), sig3(lo / 1e3), sig3(hi / 1e3))
    }
}

/// The subsection, when the part ran.
pub fn section(s: &mut String, r: &Results) {
    if !r.records.iter().any(|x| x.group == GROUP) {
        return;
    }
    let _ = writeln!(s, "\n### The outside peer: libvfn's `perf` (issue 26)\n");
    let when = r.meta("merged:peer").map_or(String::new(), |m| {
        format!(" This part was measured in a run of its own: {m}.")
    });
    let block = r.meta("peer_block_size").unwrap_or("?");
    let _ = writeln!(
        s,
        "A userspace NVMe driver written by others in C over VFIO, libvfn's `examples/perf` \
         (a polled read loop over one I/O queue), run as a child process in the same boot, \
         against the engine on the same controller ({}) and namespace 1: sequential Reads of \
         one logical block ({block} bytes, the namespace's format; `perf` reads one block per \
         command) into a 4 KiB page of host RAM per command, polled, spinning, one I/O queue, \
         resubmitting after each completion. The engine runs two ways (columns below), the \
         peer one; each round runs the three for one second each, in an order that rotates \
         from round to round; each engine run opens its own `/dev/iommu`, the controller \
         (`Nvme::open_with_options`, `Completion::Polling`, its queue `depth(QD)`, \
         `spin(Duration::MAX)`), a memfd buffer, and closes them all before the peer starts \
         (checked: no fd of the process left on `/dev/iommu` or `/dev/vfio`); the peer's round \
         ends when its process has exited. Cells: median over rounds (min–max); latency is \
         the mean from submit to the completion taken, as `perf` reports it (`lavg`); the \
         ratio is ours / peer per round: at or above the peer is a ratio of at least 1 for \
         Reads per second and at most 1 for latency.{when}\n",
        r.meta("peer_device").unwrap_or("the first NVMe controller"),
    );
    for qd in [1, 32] {
        if let Some(c) = r.meta(&format!("peer_command_qd{qd}")) {
            let _ = writeln!(s, "- QD{qd}: `{c}`");
        }
    }
    if let Some(b) = r.meta("peer_backend") {
        let _ = writeln!(s, "- the peer's IOMMU interface, seen in its open fds: {b}");
    }
    let _ = writeln!(
        s,
        "\n| row | peer | ours: `wait_any` + `submit_read` | ours / peer | ours: `poll` + `batch` | \
         ours / peer |\n|---|---|---|---|---|---|"
    );
    let mut below: [Vec<String>; 2] = Default::default();
    for (op, qd, what, higher_better) in ROWS {
        let mut ratios = [String::new(), String::new()];
        for (k, series) in ["ratio", "ratio_batched"].into_iter().enumerate() {
            ratios[k] = match r
                .get(GROUP, series, op, qd)
                .and_then(|x| Some((x.median?, x.min?, x.max?)))
            {
                Some((m, lo, hi)) => {
                    if (higher_better && m < 1.0) || (!higher_better && m > 1.0) {
                        below[k].push(format!("{what}: {m:.3}"));
                    }
                    format!("**{m:.3}** ({lo:.2}–{hi:.2})")
                }
                None => "–".into(),
            };
        }
        let _ = writeln!(
            s,
            "| {what} | {} | {} | {} | {} | {} |",
            value(r.get(GROUP, "peer", op, qd), op),
            value(r.get(GROUP, "engine", op, qd), op),
            ratios[0],
            value(r.get(GROUP, "engine_batched", op, qd), op),
            ratios[1],
        );
    }
    let _ = writeln!(s);
    for (k, how) in [
        "the engine driven as part 9 drives it (`wait_any`, then `submit_read`: a doorbell per \
         command)",
        "the engine driven as the peer's loop is (every completion there taken with `poll`, then \
         as many Reads in one `batch`: one doorbell each way per pass)",
    ]
    .into_iter()
    .enumerate()
    {
        if below[k].is_empty() {
            let _ = writeln!(s, "- {how}: at or above the peer on every row.");
        } else {
            let _ = writeln!(
                s,
                "- {how}: below the peer on {} (median ratio).",
                below[k].join("; ")
            );
        }
    }
    diagnostics(s, r);
    let walls: Vec<String> = [1u64, 32]
        .iter()
        .filter_map(|qd| {
            let w = r.get(GROUP, "peer", "wall", *qd)?;
            Some(format!("QD{qd} {} s", sig3(w.median? / 1e9)))
        })
        .collect();
    if !walls.is_empty() {
        let _ = writeln!(
            s,
            "\nThe peer's process, start to exit, per one-second run (its start-up, controller \
             reset and queue creation, the run, the drain): {} (medians).",
            walls.join(", ")
        );
    }
    s.push_str(PEER_NOTES);
}

/// Within the engine, per round (median, min–max): the part-9 loop against
/// the peer-style loop, and the peer-style loop with a PAUSE in its spin
/// against without.
fn diagnostics(s: &mut String, r: &Results) {
    let line = |series: &str| {
        let cells: Vec<String> = ROWS
            .iter()
            .filter_map(|(op, qd, what, _)| {
                let x = r.get(GROUP, series, op, *qd)?;
                Some(format!(
                    "{what} **{:.3}** ({:.2}–{:.2})",
                    x.median?, x.min?, x.max?
                ))
            })
            .collect();
        cells.join("; ")
    };
    let plain = line("plain_over_batched");
    let paused = line("paused_over_batched");
    if plain.is_empty() && paused.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nWithin the engine, the same rounds, ratio per round (median, min–max):\n\n\
         - `wait_any` + `submit_read` / `poll` + `batch`: {plain}.\n\
         - `poll` + `batch` with a `std::hint::spin_loop()` (x86 PAUSE) after each empty look \
         at the completion queue, as the engine's spinning wait has / without: {paused}."
    );
}

/// How the peer was obtained and built, and what the run says.
const PEER_NOTES: &str = "";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_needs_its_binary() {
        let e = check_peer_given(Some("nvmeqd,peer"), false).unwrap_err();
        assert!(e.to_string().contains(PEER_ENV), "{e}");
        assert!(check_peer_given(Some("peer"), true).is_ok());
        assert!(check_peer_given(Some("nvmeqd"), false).is_ok());
        assert!(check_peer_given(None, false).is_ok());
    }
}
