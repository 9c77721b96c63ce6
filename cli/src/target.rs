//! What a command is pointed at: `<bdf>[:<bar>[:<offset>+<len>]]`.

use std::fmt;
use std::str::FromStr;

use dmabuf_p2p::pci::BAR_COUNT;
use dmabuf_p2p::{ByteRange, PciAddress};

/// What the CLI is pointed at: a device, optionally one of its BARs, and
/// optionally a byte range inside that BAR.
///
/// Syntax: `<bdf>[:<bar>[:<offset>+<len>]]`, where `<bdf>` is a [`PciAddress`]
/// (full or short), `<bar>` is a BAR index 0..=5 (also written `bar2` or
/// `BAR2`), and the range is a [`ByteRange`] (`0x1000+4K`). Displayed in the
/// same syntax, with the full address.
///
/// ```
/// use dmabuf_p2p::ByteRange;
/// use dmabuf_p2p_cli::target::TargetSpec;
///
/// let t: TargetSpec = "00:04.0:2:0x1000+8K".parse()?;
/// assert_eq!(t.device.to_string(), "0000:00:04.0");
/// assert_eq!(t.bar, Some(2));
/// assert_eq!(t.range, Some(ByteRange::new(0x1000, 0x2000)));
/// assert_eq!(t.to_string(), "0000:00:04.0:2:0x1000+0x2000");
///
/// let whole: TargetSpec = "0000:01:00.0".parse()?;
/// assert_eq!((whole.bar, whole.range), (None, None));
/// # Ok::<(), dmabuf_p2p_cli::target::TargetSpecError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TargetSpec {
    /// The PCI device.
    pub device: PciAddress,
    /// The BAR index (0..=5), if given.
    pub bar: Option<u32>,
    /// The range inside the BAR, if given (only with a BAR).
    pub range: Option<ByteRange>,
}

/// A target spec that does not parse: the text (shortened if very long) and
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot parse target {input:?}: {problem}")]
pub struct TargetSpecError {
    /// The text given, at most 80 characters of it.
    pub input: String,
    /// What is wrong with it.
    pub problem: String,
}

impl TargetSpecError {
    fn new(input: &str, problem: String) -> Self {
        const MAX: usize = 80;
        let input = if input.chars().count() > MAX {
            let mut short: String = input.chars().take(MAX).collect();
            short.push('…');
            short
        } else {
            input.to_owned()
        };
        Self { input, problem }
    }
}

/// The library's parse errors say what and where; only the problem is kept.
fn problem_of(e: dmabuf_p2p::Error) -> String {
    match e {
        dmabuf_p2p::Error::Parse { problem, .. } => problem,
        other => other.to_string(),
    }
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.device)?;
        if let Some(bar) = self.bar {
            write!(f, ":{bar}")?;
            if let Some(range) = self.range {
                write!(f, ":{range}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for TargetSpec {
    type Err = TargetSpecError;

    /// Parses `<bdf>[:<bar>[:<offset>+<len>]]`; see the type's documentation.
    fn from_str(s: &str) -> Result<Self, TargetSpecError> {
        let err = |problem: String| TargetSpecError::new(s, problem);
        let t = s.trim();
        // The address ends at the function digit after its '.', so the first ':'
        // after the first '.' starts the BAR part.
        let split = t
            .find('.')
            .and_then(|dot| t[dot..].find(':').map(|c| dot + c));
        let (bdf, rest) = match split {
            Some(i) => (&t[..i], Some(&t[i + 1..])),
            None => (t, None),
        };
        let device: PciAddress = bdf
            .parse()
            .map_err(|e| err(format!("address {bdf:?}: {}", problem_of(e))))?;
        let Some(rest) = rest else {
            return Ok(Self {
                device,
                bar: None,
                range: None,
            });
        };
        let (bar_txt, range_txt) = match rest.split_once(':') {
            Some((b, r)) => (b, Some(r)),
            None => (rest, None),
        };
        let digits = bar_txt
            .strip_prefix("bar")
            .or_else(|| bar_txt.strip_prefix("BAR"))
            .unwrap_or(bar_txt);
        let bar = Some(digits)
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u32>().ok())
            .filter(|&b| b < BAR_COUNT)
            .ok_or_else(|| err(format!("BAR {bar_txt:?} must be 0..=5")))?;
        let range = match range_txt {
            None => None,
            Some(r) => Some(
                r.parse::<ByteRange>()
                    .map_err(|e| err(format!("range {r:?}: {}", problem_of(e))))?,
            ),
        };
        Ok(Self {
            device,
            bar: Some(bar),
            range,
        })
    }
}
