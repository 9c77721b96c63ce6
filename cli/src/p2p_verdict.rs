//! The topology verdict `p2p-test` prints before it moves a byte, the
//! placement it maps the target at, and the likely cause it names when data
//! does not arrive.

use dmabuf_p2p::importer::iommufd::{Ioas, IovaPlacement};
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p::topology::{Outcome, PciPath, Platform, Verdict};
use dmabuf_p2p::{ByteRange, PciAddress};

/// The verdict on DMA from `engine` into BAR `bar` of `target`, judged
/// against the usable ranges of `ioas` (which the engine is attached to),
/// or why there is none (the path could not be read).
pub(crate) fn judge(
    engine: PciAddress,
    target: PciAddress,
    bar: u32,
    ioas: &Ioas,
) -> Result<Verdict, String> {
    let sysfs = Sysfs::default();
    let path = PciPath::read(&sysfs, engine, target).map_err(|e| e.to_string())?;
    let platform = Platform::read(&sysfs).map_err(|e| e.to_string())?;
    let ranges = ioas.iova_ranges().ok();
    Ok(Verdict::new(&path, &platform, ranges.as_ref(), Some(bar)))
}

/// Prints the verdict (text mode), before the test starts.
pub(crate) fn print(verdict: &Result<Verdict, String>) -> std::io::Result<()> {
    match verdict {
        Ok(v) => {
            outln!("{v}")?;
            if v.outcome == Outcome::Impossible {
                outln!("p2p-test: running anyway, to show what happens")?;
            }
        }
        Err(e) => outln!("verdict: unknown (the PCI path could not be read: {e})")?,
    }
    Ok(())
}

/// Where to map `range` of the target BAR: the verdict's placement (the BAR's
/// bus address where the traffic turns in a switch), else automatic.
pub(crate) fn placement(
    verdict: &Result<Verdict, String>,
    range: ByteRange,
) -> (IovaPlacement, String) {
    match verdict {
        Ok(v) if v.outcome != Outcome::Impossible => {
            let advice = v.placement(range);
            (advice.at, advice.why)
        }
        _ => (IovaPlacement::Auto, "automatic".to_owned()),
    }
}

/// What data that did not arrive looked like, and the verdict's likeliest
/// cause: `all-ones (...); likely cause: ...`.
pub(crate) fn diagnose(got: &[u8], before: &[u8], verdict: &Result<Verdict, String>) -> String {
    let seen = if !got.is_empty() && got.iter().all(|&b| b == 0xff) {
        "all-ones: the request was answered with an error (an unsupported request, or a \
         root complex that does not forward peer-to-peer)"
    } else if got == before {
        "unchanged: nothing arrived (the DMA faulted in the IOMMU, or went elsewhere)"
    } else {
        "other bytes arrived: the DMA reached another place"
    };
    let cause = match verdict {
        Ok(v) => v
            .likely_causes()
            .first()
            .map_or_else(|| "the verdict names none".to_owned(), ToString::to_string),
        Err(_) => "unknown (no verdict)".to_owned(),
    };
    format!("{seen}; likely cause: {cause}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnosis_names_what_was_seen() {
        let none: Result<Verdict, String> = Err("x".into());
        assert!(diagnose(&[0xff; 4], &[0; 4], &none).starts_with("all-ones"));
        assert!(diagnose(&[0; 4], &[0; 4], &none).starts_with("unchanged"));
        assert!(diagnose(&[1, 2, 3, 4], &[0; 4], &none).starts_with("other bytes"));
        assert!(diagnose(&[0; 4], &[0; 4], &none).ends_with("unknown (no verdict)"));
    }
}
