//! The report of `p2p-test`: its steps, the table it prints (`drm-test`'s
//! too), the test pattern and the host-check directive.

use std::process::ExitCode;
use std::time::Instant;

use dmabuf_p2p::Attachment;
use dmabuf_p2p::range::human_size;
use dmabuf_p2p::topology::Verdict;

use crate::{CliError, fnv1a64, print_json};

/// One verified step.
#[derive(Debug, serde::Serialize)]
pub struct Step {
    /// What was done.
    pub step: String,
    /// Bytes moved (0 for control steps).
    pub bytes: u64,
    /// Whether the check passed.
    pub ok: bool,
    /// What was observed.
    pub detail: String,
    /// Wall time in milliseconds.
    pub millis: u128,
}

/// The whole report.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// Engine device and completion mode.
    pub engine: String,
    /// Target device, BAR and range.
    pub target: String,
    /// Physical range behind the export.
    pub phys: String,
    /// The IOVA the target was mapped at.
    pub iova: u64,
    /// The topology verdict on engine and target, judged before the test.
    pub verdict: Option<Verdict>,
    /// Why there is no verdict.
    pub verdict_unknown: Option<String>,
    /// Why the target was mapped where it was.
    pub placement: String,
    /// For a failed transfer: what the data looked like and the verdict's
    /// likeliest cause.
    pub likely_cause: Option<String>,
    /// The steps.
    pub steps: Vec<Step>,
    /// Whether every step passed.
    pub passed: bool,
}

impl Report {
    /// An empty report of a run of `engine` into `target`, mapped at `iova`.
    pub(crate) fn new(
        engine: String,
        target: String,
        phys: &[dmabuf_p2p::PhysRange],
        iova: u64,
    ) -> Self {
        let phys = phys
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            engine,
            target,
            phys,
            iova,
            verdict: None,
            verdict_unknown: None,
            placement: String::new(),
            likely_cause: None,
            steps: Vec::new(),
            passed: false,
        }
    }

    /// Takes the verdict judged before the test and the placement used.
    pub(crate) fn set_verdict(&mut self, verdict: Result<Verdict, String>, placement: String) {
        match verdict {
            Ok(v) => self.verdict = Some(v),
            Err(e) => self.verdict_unknown = Some(e),
        }
        self.placement = placement;
    }

    /// The detail of a data step: `ok` when it passed, else `failed` with
    /// what the bytes looked like and the likely cause (the first failing
    /// step's is kept as the report's).
    pub(crate) fn data_detail(
        &mut self,
        ok: bool,
        ok_text: &str,
        failed: &str,
        got: &[u8],
        before: &[u8],
    ) -> String {
        if ok {
            return ok_text.to_owned();
        }
        let verdict = self
            .verdict
            .clone()
            .ok_or_else(|| self.verdict_unknown.clone().unwrap_or_default());
        let why = crate::p2p_verdict::diagnose(got, before, &verdict);
        if self.likely_cause.is_none() {
            self.likely_cause = Some(why.clone());
        }
        format!("{failed}: {why}")
    }

    /// Records one step that started at `t`.
    pub(crate) fn push(&mut self, name: &str, bytes: u64, ok: bool, detail: String, t: Instant) {
        self.steps.push(Step {
            step: name.to_owned(),
            bytes,
            ok,
            detail,
            millis: t.elapsed().as_millis(),
        });
    }

    /// The step after the target's memory decode was turned off (at `t`):
    /// `att` must say revoked and refuse DMA.
    pub(crate) fn push_revoked(&mut self, att: &Attachment, t: Instant) {
        let ok = att.is_revoked() && att.ensure_live().is_err();
        self.push(
            "revoke (memory decode off)",
            0,
            ok,
            format!("attachment revoked: {}", att.is_revoked()),
            t,
        );
    }

    /// The step after decode came back on (at `t`): `att` must be live
    /// again at the IOVA it had, `iova`.
    pub(crate) fn push_restored(&mut self, att: &Attachment, iova: u64, t: Instant) {
        let ok = !att.is_revoked() && att.iova() == iova;
        self.push(
            "restore (memory decode on)",
            0,
            ok,
            format!("live again at IOVA {:#x}", att.iova()),
            t,
        );
    }

    /// Judges the run (every step passed), prints the report (as JSON with
    /// `json`) and gives the exit code.
    pub(crate) fn finish(mut self, json: bool) -> Result<ExitCode, CliError> {
        self.passed = self.steps.iter().all(|s| s.ok);
        if json {
            print_json(&self)?;
        } else {
            print_report(&self)?;
        }
        Ok(if self.passed {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }
}

pub(crate) fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(167).wrapping_add(seed) ^ ((i >> 8) as u8))
        .collect()
}

/// Emits a host-check directive when running in the test VM (the host then
/// compares the ivshmem backing file with what the guest saw).
pub(crate) fn host_check(offset: u64, data: &[u8]) -> std::io::Result<()> {
    if let Ok(name) = std::env::var("DMABUF_P2P_HOST_CHECK") {
        outln!(
            "@@host-check {name} {offset:#x} {:#x} fnv1a64={:016x}",
            data.len(),
            fnv1a64(data)
        )?;
    }
    Ok(())
}

/// Prints the report as a table.
pub(crate) fn print_report(report: &Report) -> std::io::Result<()> {
    outln!("engine: {}", report.engine)?;
    outln!(
        "target: {}  phys {}  mapped at IOVA {:#x}",
        report.target,
        report.phys,
        report.iova
    )?;
    if !report.placement.is_empty() {
        outln!("placement: {}", report.placement)?;
    }
    print_steps("p2p-test", &report.steps, report.passed)?;
    if let Some(cause) = &report.likely_cause {
        outln!("p2p-test: the data did not arrive as sent: {cause}")?;
    }
    Ok(())
}

/// Prints `steps` as a table and `command`'s result line.
pub(crate) fn print_steps(command: &str, steps: &[Step], passed: bool) -> std::io::Result<()> {
    outln!(
        "{:<28} {:>9}  {:<6}  {:>7}  detail",
        "step",
        "bytes",
        "result",
        "time"
    )?;
    for s in steps {
        let bytes = if s.bytes == 0 {
            "-".to_owned()
        } else {
            human_size(s.bytes)
        };
        outln!(
            "{:<28} {:>9}  {:<6}  {:>5}ms  {}",
            s.step,
            bytes,
            if s.ok { "ok" } else { "FAILED" },
            s.millis,
            s.detail
        )?;
    }
    let n = steps.iter().filter(|s| s.ok).count();
    outln!(
        "{command}: {} ({n} of {} checks passed)",
        if passed { "PASS" } else { "FAIL" },
        steps.len()
    )
}
