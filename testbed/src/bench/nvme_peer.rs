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
const ROWS: [(&str, u64, &str, bool); 5] = [
    ("iops", 1, "QD1, Reads per second", true),
    ("latency", 1, "QD1, mean latency", false),
    ("fastest", 1, "QD1, the round's fastest command", false),
    ("iops", 32, "QD32, Reads per second", true),
    (
        "latency",
        32,
        "QD32, mean latency (queueing included)",
        false,
    ),
];

/// The engine's ways, the table's columns: (series, ratio series, name,
/// how it is driven).
const WAYS: [(&str, &str, &str, &str); 3] = [
    (
        "engine",
        "ratio",
        "`wait_any` + `submit_read`",
        "the engine driven as part 9 drives it (`wait_any`, then `submit_read`: a doorbell per \
         command)",
    ),
    (
        "engine_batched",
        "ratio_batched",
        "`poll` + `batch`",
        "the engine driven as the peer's loop is (every completion there taken with `poll`, then \
         as many Reads in one `batch`: one doorbell each way per pass)",
    ),
    (
        "engine_prepared",
        "ratio_prepared",
        "prepared `wait` + `submit`",
        "the engine's prepared commands (`IoQueue::prepare`, a slot per page: `wait`, then \
         `submit` on the slot it hands back: a doorbell per command)",
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
         resubmitting after each completion. The engine runs three ways (the table's columns), \
         the peer one way; each round runs the four for one second each, in an order that rotates from round to round; each engine \
         run opens its own `/dev/iommu`, the controller (`Nvme::open_with_options`, \
         `Completion::Polling`, its queue `depth(QD)`, `spin(Duration::MAX)`), a memfd buffer, \
         and closes them all before the next run starts \
         (checked: no fd of the process left on `/dev/iommu` or `/dev/vfio`); the peer's round \
         ends when its process has exited. Cells: median over rounds (min–max); latency is \
         the mean from submit to the completion taken, as `perf` reports it (`lavg`; the fastest \
         command: its `lmin`); the \
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
    let _ = write!(s, "\n| row | peer |");
    for (_, _, name, _) in WAYS {
        let _ = write!(s, " ours: {name} | ours / peer |");
    }
    let _ = writeln!(s, "\n|---|---|{}", "---|---|".repeat(WAYS.len()));
    let mut below: [Vec<String>; WAYS.len()] = Default::default();
    let mut measured = [false; WAYS.len()];
    for (op, qd, what, higher_better) in ROWS {
        let _ = write!(
            s,
            "| {what} | {} |",
            value(r.get(GROUP, "peer", op, qd), op)
        );
        for (k, (series, ratio, _, _)) in WAYS.into_iter().enumerate() {
            let cell = match r
                .get(GROUP, ratio, op, qd)
                .and_then(|x| Some((x.median?, x.min?, x.max?)))
            {
                Some((m, lo, hi)) => {
                    measured[k] = true;
                    if (higher_better && m < 1.0) || (!higher_better && m > 1.0) {
                        below[k].push(format!("{what}: {m:.3}"));
                    }
                    format!("**{m:.3}** ({lo:.2}–{hi:.2})")
                }
                None => "–".into(),
            };
            let _ = write!(s, " {} | {cell} |", value(r.get(GROUP, series, op, qd), op));
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s);
    for (k, (_, _, _, how)) in WAYS.into_iter().enumerate() {
        if !measured[k] {
            let _ = writeln!(s, "- {how}: not in this run.");
        } else if below[k].is_empty() {
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
/// the peer-style loop.
fn diagnostics(s: &mut String, r: &Results) {
    let cells: Vec<String> = ROWS
        .iter()
        .filter_map(|(op, qd, what, _)| {
            let x = r.get(GROUP, "plain_over_batched", op, *qd)?;
            Some(format!(
                "{what} **{:.3}** ({:.2}–{:.2})",
                x.median?, x.min?, x.max?
            ))
        })
        .collect();
    if cells.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nWithin the engine, the same rounds, ratio per round (median, min–max), \
         `wait_any` + `submit_read` / `poll` + `batch`: {}.",
        cells.join("; ")
    );
}

/// How the peer was obtained and built, and what the run says.
const PEER_NOTES: &str = r#"
**The peer, and how it was built.** libvfn
(<https://github.com/SamsungDS/libvfn>), commit
`c2acee36bf05d86c40febe840f2f0317a9acf1af` (2026-07-30, "nvme/util: don't
chain a PRP list page that isn't actually needed"; version 5.1.0). Nothing
of it, and no script that builds it, is in this repository. It was built
on the host (Debian 12, gcc 12.2.0, glibc 2.36) in a directory beside the
worktree: meson 1.12.1 and ninja 1.13.2 from PyPI in a virtualenv there;
Linux 7.2.13's uAPI headers (Debian's `linux-libc-dev` 7.2.13-1, unpacked)
given as its `linux-headers` option, so its iommufd backend is compiled in
(`VFIO_DEVICE_BIND_IOMMUFD` found); libnvme's headers from Debian 12's
`libnvme-dev` 1.3-1+deb12u1, fetched with a private apt list and unpacked
with `dpkg-deb -x`, nothing installed (`perf` uses only libnvme's
`nvme/types.h`, so a hand-written pkg-config file gave the include
directory and no library); a release build with static libraries and a
static link (`-Ddefault_library=static -Dc_link_args=-static`, werror
off), only the `examples/perf` target: a 1 MB static executable, handed
to the VM with `DMABUF_P2P_BENCH_PEER`. At run time libvfn takes the
iommufd backend when `/dev/vfio/devices` and `/dev/iommu` exist, as they
do here; its open fds (above) confirm it.

**What the peer's loop does that the engine's part-9 loop does not**
(from its source): after the first fill it rings the submission doorbell
once per pass of its reap loop, after every completion found has been
resubmitted, and the completion doorbell once per pass; its queue is 2048
entries deep (CAP.MQES + 1); it sets up the controller's shadow doorbells
(Doorbell Buffer Config, when OACS says the controller has them; QEMU's
NVMe model has advertised them since 7.1, and ours is 7.2), so a doorbell is first a write to memory and an MMIO write
only when the controller's event index asks for one; it times with the
TSC. It reads no data back; the engine's runs check that the last Read
into page 0 holds that block.

**The verdict (2026-12-08): still not at or above the peer on every
row; level with it at QD32, below it at QD1.** The run on the page
(01:29 UTC, host load 1.3-2.3), after the two changes below: QD32 Reads
per second 0.988 (part-9 loop), 0.920 (batched) and 1.018 (prepared) of
the peer, medians within the rounds' spread around 1 (0.73-1.36); QD1 0.852, 0.774 and 0.754, below it, with the fastest
QD1 command 18.4-19.1 µs against the peer's 15.3 µs. Five full runs
before (2026-12-07 22:19 to 2026-12-08 00:07, with the PAUSE) had the
part-9 loop at QD1 0.62-0.87 and QD32 0.33-0.87, and the batched loop at
QD1 0.71-1.00 and QD32 0.92-0.98. The rounds spread widely (0.45-1.46
per round on this run), so only medians over 30 rounds and the
agreement of runs mean anything here.

**What changed on 2026-12-08.**

- **No PAUSE in a spinning wait.** The engine's waits (`wait`,
  `wait_any`, `Prepared::wait`) put an x86 PAUSE (`spin_loop`) between
  their looks at the completion queue. Under TCG a PAUSE ends the
  translated block and returns to QEMU's CPU loop (with
  `-accel tcg,thread=single`, through the round-robin over the vCPUs and
  QEMU's big lock). A diagnostic run (2026-12-08 00:58 UTC, not merged;
  20 rounds, the part-9 loop four ways against the peer): with the
  PAUSE and the clock every 64 looks, the fastest QD1 command 25.0 µs
  and QD32 0.83 of the peer's Reads per second; without the PAUSE, 18.8
  µs and 0.98; a clock read every look changed little. The earlier
  diagnostic that cleared the PAUSE had put it in the batched loop,
  which read the clock on every look, so the PAUSE was rare there. libvfn's
  loop does not pause either. The control of part 9 lost its PAUSE too.
- **A prepared wait rings the head doorbell for each completion.** It
  rang it once a run of completions was drained. A caller resubmitting
  between waits then sent new commands while the controller still
  counted the taken entries, and a queue as deep as its ring (depth + 1
  entries) looked full to the controller, which held completions back:
  the prepared way was 0.67 of the peer at QD32 in a run of 01:08 UTC,
  and is 1.018 on the page.

**What is left at QD1, looked at and not found.** All three ways of the
engine are below the peer by about the same (0.75-0.85, the fastest
command 3-4 µs slower), though their submit and reap cost 70 to 330
instructions (part 9): the gap is not in the engine's code. Diagnostic
runs (2026-12-08 01:15 to 01:35 UTC, not merged):

- part 9's own raw loop (entries written by hand into the engine's
  queue, its doorbells, a spin on the phase tag), run as a fourth way
  at QD1, was as far below the peer: 0.69, fastest 21.3 µs against 16.0;
- the queue 1024 deep (the peer's is 2048) or shadow doorbells off:
  Reads per second 0.96 of the 1-deep queue each; a completion ring one
  entry deeper than the submission ring, so that it never looks full to
  QEMU: the fastest command 21.6 µs against 18-19 before (not kept);
- the engine's loop without a clock read per command: 0.90 of the same
  loop with them;
- the doorbells: the engine writes both over MMIO for every command at
  QD1 (13,126 MMIO writes of 13,127 updates each way in one round), as
  the event indices QEMU 7.2 publishes ask, and as libvfn's check does;
- a host profile of QEMU (perf, 20 s of the engine's prepared loop and
  20 s of the peer, one boot): the vCPU thread spends about twice as
  many samples waiting for QEMU's big lock, and wakes the main loop more
  often, in the engine's run than in the peer's, while its translated
  code runs the same share. Why the engine's loop meets the main loop
  on that lock more often was not found.

Run it again with the peer built as above:
`DMABUF_P2P_BENCH_PEER=/path/to/libvfn/build/examples/perf cargo xtask
bench --only=peer --merge` (about 6 minutes under TCG; without the
variable `--only=peer` is refused and nothing else changes).
"#;

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
