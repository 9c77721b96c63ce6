//! `dmabuf-p2p drm-test`: a GPU's DRM driver imports a BAR export (PRIME)
//! and scans it out; the screen is checked against the BAR, then the
//! export is revoked (the GPU can no longer be pointed at the BAR) and
//! restored (the library imports it again and the screen follows).

use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use dmabuf_p2p::importer::drm::{DrmDevice, GemImport, ImportForecast};
use dmabuf_p2p::importer::iommufd::Iommufd;
use dmabuf_p2p::revoke::RestorePolicy;
use dmabuf_p2p::topology::{KernelMapType, Verdict};
use dmabuf_p2p::vfio::BarMapping;
use dmabuf_p2p::{ByteRange, PciAddress, VfioPciDevice};

use crate::drm_output::{Card, Output};
use crate::p2p_report::{Step, host_check, pattern, print_steps};
use crate::screen::ScreenObserver;
use crate::target::TargetSpec;
use crate::{CliError, print_json};

/// Options of `drm-test`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The importer: a GPU's PCI address (its `/dev/dri/card*` is found) or
    /// a DRM device node (`/dev/dri/card0`). The command sets its mode, so
    /// it must be the DRM master: no display server may run on it.
    #[arg(long)]
    pub gpu: GpuSpec,
    /// The device whose BAR is shown: `<bdf>[:bar[:offset+len]]` (BAR 2 by
    /// default, from offset 0, one XRGB8888 framebuffer of the screen's
    /// preferred mode).
    #[arg(long)]
    pub target: TargetSpec,
    /// How long a screen check waits for the screen to show what was
    /// written, in seconds (only where an observer checks the screen).
    #[arg(long, default_value_t = 5, value_parser = super::timeout_secs)]
    pub timeout: u64,
}

/// A GPU named by PCI address or by device node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSpec {
    /// A PCI function; its primary node is looked up.
    Pci(PciAddress),
    /// A DRM device node.
    Node(PathBuf),
}

impl FromStr for GpuSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with('/') {
            return Ok(Self::Node(PathBuf::from(s)));
        }
        s.parse().map(Self::Pci).map_err(|e| {
            format!("{s:?} is neither a PCI address nor a device node path (/dev/dri/...): {e}")
        })
    }
}

/// What `drm-test` reports.
#[derive(Debug, serde::Serialize)]
pub struct DrmReport {
    /// The DRM device (node, driver, PCI function).
    pub gpu: String,
    /// How its driver imports, and whether the VFIO exporter accepts that.
    pub importer: Option<String>,
    /// Target device, BAR and range.
    pub target: String,
    /// The output the BAR is shown on.
    pub output: String,
    /// The topology verdict between the GPU and the BAR.
    pub verdict: Option<Verdict>,
    /// What `pci_p2pdma_map_type()` will answer the GPU's driver.
    pub map_type: Option<KernelMapType>,
    /// Why the kernel is expected to refuse, if it is.
    pub forecast_refusal: Option<String>,
    /// Why there is no forecast.
    pub forecast_unknown: Option<String>,
    /// Whether an observer checked the screen (the test VM's host).
    pub screen_checked: bool,
    /// The steps.
    pub steps: Vec<Step>,
    /// Whether every step passed.
    pub passed: bool,
}

impl DrmReport {
    fn push(&mut self, name: &str, ok: bool, detail: String, t: Instant) {
        self.steps.push(Step {
            step: name.to_owned(),
            bytes: 0,
            ok,
            detail,
            millis: t.elapsed().as_millis(),
        });
    }
}

/// Everything a run holds; dropped in this order (framebuffers are
/// removed explicitly before).
struct Run {
    card: Card,
    output: Output,
    window: BarMapping,
    range: ByteRange,
    observer: Option<ScreenObserver>,
    patience: Duration,
}

impl Run {
    /// Writes `pixels` into the BAR's framebuffer area.
    fn paint(&self, pixels: &[u8]) -> Result<(), CliError> {
        Ok(self.window.write(self.range.offset, pixels)?)
    }

    /// The observer's check of `pixels`, or `None` without one.
    fn screen(&self, pixels: &[u8]) -> Option<(bool, String)> {
        let o = self.observer.as_ref()?;
        let (w, h) = self.output.size();
        let c = o.check(w, h, pixels, self.range.offset, self.patience);
        Some((c.ok, c.detail))
    }
}

/// Runs the test.
pub fn run(args: &Args, json: bool) -> Result<ExitCode, CliError> {
    let drm = match &args.gpu {
        GpuSpec::Node(p) => DrmDevice::open(p)?,
        GpuSpec::Pci(a) => DrmDevice::for_pci(*a)?,
    };
    let card = Card(drm.clone());
    let output = Output::find(&card)?;
    let bar = args.target.bar.unwrap_or(2);
    let fb_bytes = output.fb_bytes();
    let range = args
        .target
        .range
        .unwrap_or(ByteRange::new(0, fb_bytes.next_multiple_of(0x1000)));
    if range.length < fb_bytes {
        let (w, h) = output.size();
        return Err(format!(
            "the target range {range} is smaller than one {w}x{h} XRGB8888 framebuffer \
             ({fb_bytes:#x} bytes)"
        )
        .into());
    }
    let iommufd = Iommufd::open()?;
    let mut target = VfioPciDevice::open(args.target.device)?;
    target.bind(&iommufd)?;
    target.set_memory_decode(true)?;

    let forecast = GemImport::forecast(&drm, args.target.device, bar);
    let mut report = DrmReport {
        gpu: drm.to_string(),
        importer: None,
        target: format!("{} BAR{bar} {range}", args.target.device),
        output: output.describe(),
        verdict: None,
        map_type: None,
        forecast_refusal: None,
        forecast_unknown: None,
        screen_checked: false,
        steps: Vec::new(),
        passed: false,
    };
    match forecast {
        Ok(ImportForecast {
            importer,
            verdict,
            map_type,
            refusal,
            ..
        }) => {
            report.importer = Some(importer.to_string());
            report.verdict = verdict;
            report.map_type = map_type;
            report.forecast_refusal = refusal.map(|r| r.to_string());
        }
        Err(e) => report.forecast_unknown = Some(e.to_string()),
    }
    if !json {
        print_forecast(&report)?;
    }

    let export = target.export_bar(bar, &[range])?;
    let run = Run {
        card,
        output,
        window: target.map_bar(bar)?,
        range,
        observer: ScreenObserver::from_env(),
        patience: Duration::from_secs(args.timeout),
    };
    report.screen_checked = run.observer.is_some();
    let len = usize::try_from(fb_bytes)?;
    let last = steps(&run, &target, &export, &drm, len, &mut report);
    let restored = run.output.restore(&run.card);
    if let Some(pixels) = last {
        // The host compares the device's backing file after the VM stops.
        host_check(range.offset, &pixels)?;
    }
    report.passed = !report.steps.is_empty() && report.steps.iter().all(|s| s.ok);
    if json {
        print_json(&report)?;
    } else {
        print_steps("drm-test", &report.steps, report.passed)?;
        if !report.screen_checked {
            outln!(
                "drm-test: the screen itself was not checked: no DRM ioctl reads a scanout \
                 back, and no observer was named (DMABUF_P2P_SCREEN, which the VM suite sets)"
            )?;
        }
    }
    restored.map_err(|e| format!("putting the CRTC back as it was: {e}"))?;
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The importer, the verdict and what the kernel will answer, before any
/// ioctl that could fail.
fn print_forecast(r: &DrmReport) -> std::io::Result<()> {
    outln!("gpu: {}", r.gpu)?;
    if let Some(i) = &r.importer {
        outln!("importer: {i}")?;
    }
    outln!("target: {}  shown on {}", r.target, r.output)?;
    if let Some(v) = &r.verdict {
        outln!("path:")?;
        for reason in v.map_type_reasons() {
            outln!("  - {reason}")?;
        }
    }
    match (&r.map_type, &r.forecast_unknown) {
        (Some(m), _) => outln!("kernel: pci_p2pdma_map_type() will answer {m}")?,
        (None, Some(e)) => outln!("kernel: unknown ({e})")?,
        (None, None) => outln!("kernel: unknown (the ACS bits that decide need root)")?,
    }
    if let Some(why) = &r.forecast_refusal {
        outln!("forecast: refused: {why}")?;
        outln!("drm-test: running anyway, to show what the kernel says")?;
    }
    Ok(())
}

/// The steps; stops at the first that leaves nothing to test. Returns the
/// last pixels written into the BAR.
fn steps(
    run: &Run,
    target: &VfioPciDevice,
    export: &dmabuf_p2p::BarExport,
    drm: &DrmDevice,
    len: usize,
    report: &mut DrmReport,
) -> Option<Vec<u8>> {
    let card = &run.card;
    let out = &run.output;

    // 1. the import
    let t = Instant::now();
    let gem = match GemImport::import(drm, export, RestorePolicy::Automatic) {
        Ok(g) => g,
        Err(e) => {
            let as_forecast = match (&e, &report.forecast_refusal) {
                (dmabuf_p2p::Error::ImportRefused { why, .. }, Some(f))
                    if why.to_string() == *f =>
                {
                    " (as forecast)"
                }
                _ => "",
            };
            report.push("import (PRIME)", false, format!("{e}{as_forecast}"), t);
            return None;
        }
    };
    let handle = gem.handle().unwrap_or_default();
    report.push(
        "import (PRIME)",
        true,
        format!("GEM handle {handle} (DRM_IOCTL_PRIME_FD_TO_HANDLE)"),
        t,
    );

    // 2. a framebuffer of the BAR, scanned out
    let t = Instant::now();
    let mut pixels = pattern(0x21, len as u64);
    if let Err(e) = run.paint(&pixels) {
        report.push("scan out", false, format!("writing the BAR: {e}"), t);
        return None;
    }
    let fb = match out.framebuffer(card, handle) {
        Ok(fb) => fb,
        Err(e) => {
            report.push("scan out", false, format!("DRM_IOCTL_MODE_ADDFB2: {e}"), t);
            return Some(pixels);
        }
    };
    if let Err(e) = show(run, fb) {
        report.push("scan out", false, e, t);
        let _ = card_destroy(run, fb);
        return Some(pixels);
    }
    let shown = out.shows(card, fb);
    report.push(
        "scan out",
        shown,
        format!("framebuffer {} on the CRTC: {shown}", u32::from(fb)),
        t,
    );

    // 3. and 4. the screen shows the BAR, and follows a write into it
    let t = Instant::now();
    if let Some((ok, detail)) = run.screen(&pixels) {
        report.push("screen shows the BAR", ok, detail, t);
        let t = Instant::now();
        pixels = pattern(0x42, len as u64);
        match run.paint(&pixels) {
            Ok(()) => {
                let (ok, detail) = run.screen(&pixels).unwrap_or_default();
                report.push("BAR write on screen", ok, detail, t);
            }
            Err(e) => report.push("BAR write on screen", false, e.to_string(), t),
        }
    }

    // 5. revoke: the import is revoked and the GPU cannot be pointed at the BAR
    let t = Instant::now();
    let revoked = match target.set_memory_decode(false) {
        Ok(()) => {
            let refused = out.show(card, fb);
            let ok = gem.is_revoked()
                && gem.handle().is_err()
                && refused
                    .as_ref()
                    .is_err_and(|e| e.raw_os_error() == Some(libc::ENODEV));
            let scanout = match refused {
                Ok(()) => "succeeded".to_owned(),
                Err(e) => e.to_string(),
            };
            (
                ok,
                format!(
                    "import revoked: {}; a scanout of its framebuffer: {scanout}",
                    gem.is_revoked()
                ),
            )
        }
        Err(e) => (false, e.to_string()),
    };
    report.push("revoke (memory decode off)", revoked.0, revoked.1, t);

    // 6. restore: imported again
    let t = Instant::now();
    let restore = target
        .set_memory_decode(true)
        .map_err(|e| e.to_string())
        .and_then(|()| gem.handle().map_err(|e| e.to_string()));
    let new_handle = match restore {
        Ok(h) => {
            report.push(
                "restore (memory decode on)",
                true,
                format!(
                    "imported again: GEM handle {h}, generation {}",
                    gem.generation()
                ),
                t,
            );
            h
        }
        Err(e) => {
            report.push("restore (memory decode on)", false, e, t);
            let _ = card_destroy(run, fb);
            return Some(pixels);
        }
    };

    // 7. a framebuffer of the new import shows the BAR again
    let t = Instant::now();
    pixels = pattern(0x63, len as u64);
    let again = run
        .paint(&pixels)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            out.framebuffer(card, new_handle)
                .map_err(|e| format!("DRM_IOCTL_MODE_ADDFB2: {e}"))
        })
        .and_then(|fb2| {
            show(run, fb2).map(|()| fb2).inspect_err(|_| {
                let _ = card_destroy(run, fb2);
            })
        });
    match again {
        Ok(fb2) => {
            let (ok, detail) = run.screen(&pixels).unwrap_or_else(|| {
                let shown = out.shows(card, fb2);
                (
                    shown,
                    format!("framebuffer {} on the CRTC: {shown}", u32::from(fb2)),
                )
            });
            report.push("scan out after restore", ok, detail, t);
            let _ = out.restore(card);
            let _ = card_destroy(run, fb2);
        }
        Err(e) => report.push("scan out after restore", false, e, t),
    }
    let _ = card_destroy(run, fb);
    Some(pixels)
}

/// Scans `fb` out, naming the likely cause of `EACCES`.
fn show(run: &Run, fb: drm::control::framebuffer::Handle) -> Result<(), String> {
    run.output.show(&run.card, fb).map_err(|e| {
        if e.raw_os_error() == Some(libc::EACCES) {
            format!(
                "DRM_IOCTL_MODE_SETCRTC: {e}: another program (a display server) is the \
                 DRM master of {}",
                run.card.0.path()
            )
        } else {
            format!("DRM_IOCTL_MODE_SETCRTC: {e}")
        }
    })
}

fn card_destroy(run: &Run, fb: drm::control::framebuffer::Handle) -> std::io::Result<()> {
    use drm::control::Device as _;
    run.card.destroy_framebuffer(fb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_is_a_pci_address_or_a_node() {
        assert_eq!(
            "03:00.0".parse::<GpuSpec>(),
            Ok(GpuSpec::Pci(
                "0000:03:00.0".parse().unwrap_or_else(|e| panic!("{e}"))
            ))
        );
        assert_eq!(
            "/dev/dri/card1".parse::<GpuSpec>(),
            Ok(GpuSpec::Node("/dev/dri/card1".into()))
        );
        let e = "card0".parse::<GpuSpec>().unwrap_err();
        assert!(e.contains("neither a PCI address"), "{e}");
    }
}
