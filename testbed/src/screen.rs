//! The host's side of the guest's screen checks: a QMP `screendump` of a
//! virtio-gpu's scanout, cut to a rectangle and hashed, next to the same
//! rectangle read from an ivshmem backing file; and the new lines of
//! QEMU's trace log.
//!
//! * `@@screendump <gpu> <x> <y> <w> <h> [<shm> <offset> <stride>]`: the
//!   host dumps `<gpu>`'s screen (PPM) into the run directory and answers
//!   `@@screendump-reply {json}` with the screen's size, the FNV-1a 64 of
//!   the rectangle's RGB bytes (row by row) and, when a backing file is
//!   named, the same hash of that file's XRGB8888 pixels at `offset` with
//!   `stride` bytes per row, converted to RGB;
//! * `@@qemu-log`: the host answers `@@qemu-log-reply {"lines": [...]}`
//!   with the lines QEMU's stderr (trace events, guest errors) got
//!   since the last ask.

use std::fs;
use std::path::Path;

use serde_json::{Value, json};

use crate::qemu::{VmConfig, read_range};
use crate::qmp::Qmp;
use crate::report::fnv1a64;
use crate::{Error, Result};

/// One parsed `@@screendump` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScreenRequest {
    /// The virtio-gpu's QEMU id.
    pub gpu: String,
    /// The rectangle: left, top, width, height in pixels.
    pub rect: (u32, u32, u32, u32),
    /// The backing file to compare: ivshmem id, offset of pixel (0, 0),
    /// bytes per row.
    pub backing: Option<(String, u64, u64)>,
}

impl ScreenRequest {
    /// Parses the words after `@@screendump`.
    pub fn parse(words: &str) -> Option<Self> {
        let w: Vec<&str> = words.split_whitespace().collect();
        let num = |s: &str| -> Option<u64> {
            match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        };
        let small = |s: &str| num(s).and_then(|v| u32::try_from(v).ok());
        let (gpu, rest) = w.split_first()?;
        let rect = match rest {
            [x, y, width, height, ..] => (small(x)?, small(y)?, small(width)?, small(height)?),
            _ => return None,
        };
        let backing = match &rest[4..] {
            [] => None,
            [shm, offset, stride] => Some(((*shm).to_owned(), num(offset)?, num(stride)?)),
            _ => return None,
        };
        Some(Self {
            gpu: (*gpu).to_owned(),
            rect,
            backing,
        })
    }
}

/// A binary PPM (`P6`, maxval 255): width, height, RGB bytes.
pub fn parse_ppm(data: &[u8]) -> Result<(u32, u32, &[u8])> {
    let bad = |why: &str| Error::Setup(format!("screendump is not a P6 PPM: {why}"));
    let mut fields = Vec::new();
    let mut i = 0;
    while fields.len() < 4 {
        while i < data.len() && data[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < data.len() && !data[i].is_ascii_whitespace() {
            i += 1;
        }
        if start == i {
            return Err(bad("header cut short"));
        }
        fields.push(String::from_utf8_lossy(&data[start..i]).into_owned());
    }
    i += 1; // the one whitespace byte after maxval
    if fields[0] != "P6" || fields[3] != "255" {
        return Err(bad(&format!("header {fields:?}")));
    }
    let w: u32 = fields[1].parse().map_err(|_| bad("width"))?;
    let h: u32 = fields[2].parse().map_err(|_| bad("height"))?;
    let len = (w as usize) * (h as usize) * 3;
    let pixels = data
        .get(i..i + len)
        .ok_or_else(|| bad("pixels cut short"))?;
    Ok((w, h, pixels))
}

/// The RGB bytes of a rectangle of an RGB image `width` pixels wide.
pub fn rgb_rect(pixels: &[u8], width: u32, rect: (u32, u32, u32, u32)) -> Option<Vec<u8>> {
    let (x, y, w, h) = rect;
    let mut out = Vec::with_capacity((w * h * 3) as usize);
    for row in y..y + h {
        let start = ((row * width + x) * 3) as usize;
        out.extend_from_slice(pixels.get(start..start + (w * 3) as usize)?);
    }
    Some(out)
}

/// XRGB8888 (little-endian: B, G, R, X) to RGB.
pub fn xrgb_to_rgb(xrgb: &[u8]) -> Vec<u8> {
    xrgb.chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect()
}

/// Answers one `@@screendump` request (the words after the directive).
pub fn answer_screendump(config: &VmConfig, qmp: &mut Qmp, words: &str, n: usize) -> String {
    match screendump(config, qmp, words, n) {
        Ok(v) => v.to_string(),
        Err(e) => json!({ "error": e.to_string() }).to_string(),
    }
}

fn screendump(config: &VmConfig, qmp: &mut Qmp, words: &str, n: usize) -> Result<Value> {
    let req = ScreenRequest::parse(words)
        .ok_or_else(|| Error::Setup(format!("bad @@screendump request {words:?}")))?;
    let file = config.run_dir.join(format!("screen-{n}-{}.ppm", req.gpu));
    let _ = fs::remove_file(&file);
    qmp.execute(
        "screendump",
        json!({ "filename": file.display().to_string(), "device": req.gpu }),
    )?;
    let data = fs::read(&file).map_err(|e| Error::io(format!("reading {}", file.display()), e))?;
    let (width, height, pixels) = parse_ppm(&data)?;
    let rect = rgb_rect(pixels, width, req.rect).ok_or_else(|| {
        Error::Setup(format!(
            "rectangle {:?} is outside the {width}x{height} screen",
            req.rect
        ))
    })?;
    let backing = match &req.backing {
        None => Value::Null,
        Some((shm, offset, stride)) => {
            let (x, y, w, h) = req.rect;
            let mut rgb = Vec::new();
            for row in y..y + h {
                let at = offset + u64::from(row) * stride + u64::from(x) * 4;
                rgb.extend(xrgb_to_rgb(&read_range(
                    &config.backing_file(shm),
                    at,
                    u64::from(w) * 4,
                )?));
            }
            json!(format!("{:016x}", fnv1a64(&rgb)))
        }
    };
    Ok(json!({
        "width": width,
        "height": height,
        "file": file.display().to_string(),
        "rect_fnv1a64": format!("{:016x}", fnv1a64(&rect)),
        "backing_fnv1a64": backing,
    }))
}

/// Follows QEMU's log file: each call gives the lines added since the last.
#[derive(Debug, Default)]
pub struct LogTail {
    offset: usize,
}

impl LogTail {
    /// The complete lines of `path` after the last call's end.
    pub fn new_lines(&mut self, path: &Path) -> Vec<String> {
        let text = fs::read(path).unwrap_or_default();
        let Some(end) = text.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let from = self.offset.min(end + 1);
        self.offset = end + 1;
        String::from_utf8_lossy(&text[from..=end])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_and_without_a_backing_file() {
        assert_eq!(
            ScreenRequest::parse("gpu0 0 0 64 32"),
            Some(ScreenRequest {
                gpu: "gpu0".into(),
                rect: (0, 0, 64, 32),
                backing: None
            })
        );
        assert_eq!(
            ScreenRequest::parse("gpu0 8 2 16 16 shm0 0x1000 5120").and_then(|r| r.backing),
            Some(("shm0".into(), 0x1000, 5120))
        );
        assert_eq!(ScreenRequest::parse("gpu0 0 0 64"), None);
        assert_eq!(ScreenRequest::parse("gpu0 0 0 64 32 shm0"), None);
    }

    #[test]
    fn a_ppm_rectangle_and_xrgb_pixels_agree() {
        // A 2x2 image: red, green / blue, white.
        let mut ppm = b"P6\n2 2\n255\n".to_vec();
        ppm.extend_from_slice(&[255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255]);
        let (w, h, px) = parse_ppm(&ppm).unwrap();
        assert_eq!((w, h), (2, 2));
        assert_eq!(
            rgb_rect(px, w, (1, 0, 1, 2)).unwrap(),
            [0, 255, 0, 255, 255, 255]
        );
        assert_eq!(rgb_rect(px, w, (1, 1, 2, 1)), None);
        // The same two pixels as the guest writes them (XRGB8888 LE).
        assert_eq!(
            xrgb_to_rgb(&[0, 255, 0, 0, 255, 255, 255, 0]),
            [0, 255, 0, 255, 255, 255]
        );
        assert!(parse_ppm(b"P3\n2 2\n255\n").is_err());
    }

    #[test]
    fn the_log_tail_gives_each_complete_line_once() {
        let dir = std::env::temp_dir().join(format!("screen-log-{}", std::process::id()));
        fs::write(&dir, "a\nb\npart").unwrap();
        let mut t = LogTail::default();
        assert_eq!(t.new_lines(&dir), ["a", "b"]);
        fs::write(&dir, "a\nb\npartial\nc\n").unwrap();
        assert_eq!(t.new_lines(&dir), ["partial", "c"]);
        assert!(t.new_lines(&dir).is_empty());
        let _ = fs::remove_file(&dir);
    }
}
