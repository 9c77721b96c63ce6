//! Part 9 of the page: the NVMe engine's queues against the benchmark's
//! raw driver loop (`bench/src/nvme_qd.rs`), and the cost of one command
//! on the instruction clock.

use std::fmt::Write as _;

use dmabuf_p2p::range::human_size;

use super::notes::NVMEQD_NOTES;
use super::{Record, Results, fmt_ns, sig3};

/// The records' group.
pub const GROUP: &str = "nvmeqd";
/// The same part's per-command cost on the instruction clock.
pub const ICOUNT_GROUP: &str = "nvmeqd_icount";
/// The goal: the engine within this factor of the control on every row.
const GOAL: f64 = 1.10;

/// The rows in page order: (op, what it is).
const ROWS: [(&str, &str); 14] = [
    ("latency_polled", "QD1 latency, polled (spinning)"),
    ("latency_irq", "QD1 latency, MSI-X"),
    ("q1_qd1_ram", "1 queue, QD1, host RAM"),
    ("q1_qd8_ram", "1 queue, QD8, host RAM"),
    ("q1_qd32_ram", "1 queue, QD32, host RAM"),
    ("q1_qd1_bar", "1 queue, QD1, BAR"),
    ("q1_qd8_bar", "1 queue, QD8, BAR"),
    ("q1_qd32_bar", "1 queue, QD32, BAR"),
    ("q2_qd1_ram", "2 queues, QD1 each, host RAM"),
    ("q2_qd8_ram", "2 queues, QD8 each, host RAM"),
    ("q2_qd32_ram", "2 queues, QD32 each, host RAM"),
    ("q2_qd1_bar", "2 queues, QD1 each, BAR"),
    ("q2_qd8_bar", "2 queues, QD8 each, BAR"),
    ("q2_qd32_bar", "2 queues, QD32 each, BAR"),
];

/// A time per command with its spread, and the rate it means.
fn per_command(r: Option<&Record>, queues: u32) -> String {
    let Some((m, lo, hi)) = r.and_then(|r| Some((r.median?, r.min?, r.max?))) else {
        return "–".into();
    };
    format!(
        "{} ({}–{}); {}/s",
        fmt_ns(m),
        sig3(lo / 1e3),
        sig3(hi / 1e3),
        rate(f64::from(queues) * 1e9 / m)
    )
}

fn rate(per_s: f64) -> String {
    if per_s >= 1e3 {
        format!("{}k", sig3(per_s / 1e3))
    } else {
        sig3(per_s)
    }
}

fn ratio(r: Option<&Record>) -> String {
    match r.and_then(|r| Some((r.median?, r.min?, r.max?))) {
        Some((m, lo, hi)) => format!("**{m:.3}** ({lo:.2}–{hi:.2})"),
        None => "–".into(),
    }
}

/// Part 9, when it ran.
pub fn section(s: &mut String, r: &Results) {
    if r.xs(GROUP).is_empty() {
        return;
    }
    let _ = writeln!(s, "\n## 9. NVMe queue depth and latency\n");
    let when = r.meta("merged:nvmeqd").map_or(String::new(), |m| {
        format!(" This part was measured in a run of its own: {m}.")
    });
    let _ = writeln!(
        s,
        "QEMU's NVMe controller ({}), namespace 1, Reads of 4 KiB and 128 KiB into host RAM (a \
         memfd) and into the ivshmem BAR (its dma-buf mapped in the IOAS), through the engine's \
         I/O queues (`dmabuf-p2p-engine`'s `IoQueue`: its checked `submit_read`/`wait_any`, \
         and its **prepared** commands, `IoQueue::prepare`: the row's buffers registered once \
         per round, outside the timed span, each command its slot's ready entry with the LBA \
         filled in) and through a **control**: a raw driver loop in the benchmark that drives the same queue pair by hand (`IoQueue::with_raw`: the \
         64-byte entries and PRP lists written into the queue's own memory, the doorbells rung, \
         the completion queue's phase tag watched). Each row runs the three in rounds, rotating \
         which goes first; a round is 64 commands (QD1 latency, 128 KiB) or \
         256 (4 KiB) per queue, resubmitting into a command's slot after its completion is \
         taken (`wait_any`; prepared: `Prepared::wait`, which rings the head doorbell for each \
         completion it takes; the control: reap every new entry with one head \
         doorbell, then take them one by one). Polled rows spin on the completion queue without a PAUSE \
         between looks, all three (queues made with interrupts off, `spin(Duration::MAX)`); the MSI-X row blocks on the queue's \
         eventfd. Two queues: a thread each, on the 2 vCPUs. Cells are time per command \
         (median over rounds, min–max in µs) and the rate it means (both queues together); the \
         ratios are per round, to the control, so above 1 the engine is slower.{when}\n",
        r.meta("nvmeqd_device")
            .unwrap_or("the first NVMe controller"),
    );
    let _ = writeln!(
        s,
        "| row | size | engine | prepared | control | engine / control | prepared / control |\n|---|---|---|---|---|---|---|"
    );
    let mut over = Vec::new();
    let mut over_prepared = Vec::new();
    let mut worst: Option<(f64, String)> = None;
    for (op, what) in ROWS {
        let queues = if op.starts_with("q2") { 2 } else { 1 };
        for x in r.xs(GROUP) {
            let Some(ratio_rec) = r.get(GROUP, "ratio", op, x) else {
                continue;
            };
            let label = format!("{what}, {}", human_size(x));
            if let Some(m) = ratio_rec.median {
                if m > GOAL {
                    over.push(format!("{label}: {m:.3}"));
                }
                if worst.as_ref().is_none_or(|(w, _)| m > *w) {
                    worst = Some((m, label.clone()));
                }
            }
            let prepared_ratio = r.get(GROUP, "ratio_prepared", op, x);
            if let Some(m) = prepared_ratio.and_then(|p| p.median)
                && m > GOAL
            {
                over_prepared.push(format!("{label}: {m:.3}"));
            }
            let _ = writeln!(
                s,
                "| {what} | {} | {} | {} | {} | {} | {} |",
                human_size(x),
                per_command(r.get(GROUP, "engine", op, x), queues),
                per_command(r.get(GROUP, "prepared", op, x), queues),
                per_command(r.get(GROUP, "raw", op, x), queues),
                ratio(Some(ratio_rec)),
                ratio(prepared_ratio),
            );
        }
    }
    let _ = writeln!(s);
    match (&worst, over.is_empty()) {
        (Some((w, at)), true) => {
            let _ = writeln!(
                s,
                "Every checked row within {GOAL:.2} of the control (the worst median ratio {w:.3}, {at})."
            );
        }
        (_, false) => {
            let _ = writeln!(
                s,
                "Checked rows over {GOAL:.2} of the control: {}.",
                over.join("; ")
            );
        }
        (None, true) => {}
    }
    if !over_prepared.is_empty() {
        let _ = writeln!(
            s,
            "\nPrepared rows over {GOAL:.2} of the control: {}.",
            over_prepared.join("; ")
        );
    }
    super::nvme_peer::section(s, r);
    s.push_str(super::shadow_doorbells::SHADOW_DOORBELL_NOTES);
    cost_table(s, r);
    s.push_str(NVMEQD_NOTES);
}

/// The cost of one command's submit and reap: on the instruction clock if
/// that VM ran, else as time under TCG.
fn cost_table(s: &mut String, r: &Results) {
    let (group, unit, clock) = if r.xs(ICOUNT_GROUP).is_empty() {
        (GROUP, "time under TCG", "the wall clock")
    } else {
        (
            ICOUNT_GROUP,
            "instructions",
            "the instruction clock (a second VM under `-icount`, where one guest nanosecond is one instruction)",
        )
    };
    let sizes: std::collections::BTreeSet<u64> = r
        .records
        .iter()
        .filter(|x| x.group == group && x.op == "cost_total")
        .map(|x| x.x)
        .collect();
    if sizes.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\nThe cost of one command alone, on {clock}: a QD1 Read into host RAM on a polled queue; \
         the span of the submit call, and of the wait for a completion that is already in the \
         completion queue (the clock stopped while the device works), each less an empty timed \
         span ({unit}, medians):\n"
    );
    let _ = writeln!(
        s,
        "| size | submit: engine | prepared | control | reap: engine | prepared | control | submit + reap: engine | prepared | control | engine / control | prepared / control |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let fmt = |v: Option<f64>| match (v, group == ICOUNT_GROUP) {
        (Some(v), true) => format!("{v:.0}"),
        (Some(v), false) => fmt_ns(v),
        (None, _) => "–".into(),
    };
    for x in sizes {
        let get = |series: &str, op: &str| r.median(group, series, op, x);
        let to_control = |series: &str| {
            get(series, "cost_total")
                .zip(get("raw", "cost_total"))
                .map_or("–".into(), |(e, c)| {
                    format!("**{:.3}** ({:+.0})", e / c, e - c)
                })
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            human_size(x),
            fmt(get("engine", "cost_submit")),
            fmt(get("prepared", "cost_submit")),
            fmt(get("raw", "cost_submit")),
            fmt(get("engine", "cost_reap")),
            fmt(get("prepared", "cost_reap")),
            fmt(get("raw", "cost_reap")),
            fmt(get("engine", "cost_total")),
            fmt(get("prepared", "cost_total")),
            fmt(get("raw", "cost_total")),
            to_control("engine"),
            to_control("prepared"),
        );
    }
}
