//! The screen check of `drm-test`. No DRM ioctl gives back what a CRTC
//! shows, so the check needs an observer outside the machine: in the
//! bundled test VM, the host dumps the virtio-gpu's screen over QMP. The
//! command asks it on stdout (`@@screendump <gpu> 0 0 <w> <h> [<shm>
//! <offset> <stride>]`) and reads the answer on stdin (`@@screendump-reply
//! {json}`: the FNV-1a 64 of the screen's RGB bytes, and of the same
//! pixels in the ivshmem device's backing file), as `testbed/src/screen.rs`
//! describes.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use crate::fnv1a64;

/// The host that can see the screen, named by the environment.
#[derive(Debug, Clone)]
pub(crate) struct ScreenObserver {
    /// `DMABUF_P2P_SCREEN`: the GPU's QEMU id (`gpu0`).
    gpu: String,
    /// `DMABUF_P2P_HOST_CHECK`: the target's QEMU id (`shm0`), whose
    /// backing file the host reads too.
    backing: Option<String>,
}

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScreenCheck {
    /// Whether the screen and (when asked) the backing file show the
    /// pixels written.
    pub(crate) ok: bool,
    /// What was compared.
    pub(crate) detail: String,
}

impl ScreenObserver {
    /// The observer the environment names, if any (the test VM's jobs set
    /// `DMABUF_P2P_SCREEN`).
    pub(crate) fn from_env() -> Option<Self> {
        let gpu = std::env::var("DMABUF_P2P_SCREEN")
            .ok()
            .filter(|g| !g.is_empty())?;
        let backing = std::env::var("DMABUF_P2P_HOST_CHECK")
            .ok()
            .filter(|s| !s.is_empty());
        Some(Self { gpu, backing })
    }

    /// Asks the host for the `width` x `height` screen and compares it with
    /// `xrgb` (XRGB8888 pixels, `width * 4` bytes a row); the backing file
    /// is read at `offset`. The host applies a scanout after the guest's
    /// ioctl returns (virtio-gpu waits at most 50 ms for the flush), so a
    /// screen that differs is dumped again, until `patience` has passed.
    pub(crate) fn check(
        &self,
        width: u32,
        height: u32,
        xrgb: &[u8],
        offset: u64,
        patience: Duration,
    ) -> ScreenCheck {
        let want = format!("{:016x}", fnv1a64(&xrgb_to_rgb(xrgb)));
        let tail = self.backing.as_ref().map_or(String::new(), |shm| {
            format!(" {shm} {offset:#x} {}", u64::from(width) * 4)
        });
        let request = format!("@@screendump {} 0 0 {width} {height}{tail}", self.gpu);
        let deadline = Instant::now() + patience;
        let mut dumps = 0;
        loop {
            dumps += 1;
            let mut check = match ask(&request) {
                Ok(answer) => judge(&answer, &want, self.backing.is_some()),
                Err(e) => ScreenCheck {
                    ok: false,
                    detail: format!("no screendump: {e}"),
                },
            };
            if check.ok || Instant::now() >= deadline {
                if dumps > 1 {
                    check.detail = format!("{} ({dumps} dumps)", check.detail);
                }
                return check;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The verdict on one `@@screendump-reply` against the hash `want`.
fn judge(answer: &str, want: &str, backing_asked: bool) -> ScreenCheck {
    let parsed: serde_json::Value = match serde_json::from_str(answer) {
        Ok(v) => v,
        Err(e) => {
            return ScreenCheck {
                ok: false,
                detail: format!("unreadable answer {answer:?}: {e}"),
            };
        }
    };
    if let Some(e) = parsed["error"].as_str() {
        return ScreenCheck {
            ok: false,
            detail: format!("no screendump: {e}"),
        };
    }
    let screen = parsed["rect_fnv1a64"].as_str().unwrap_or_default();
    let backing = parsed["backing_fnv1a64"].as_str();
    let screen_ok = screen == want;
    let backing_ok = !backing_asked || backing == Some(want);
    let detail = match (screen_ok, backing_asked, backing_ok) {
        (true, true, true) => "screen = BAR = device memory (host screendump)".to_owned(),
        (true, false, _) => "screen = BAR (host screendump)".to_owned(),
        (true, true, false) => format!(
            "screen = BAR, but the device memory differs (backing file {})",
            backing.unwrap_or("unread")
        ),
        (false, ..) => format!("screen differs: fnv1a64 {screen}, the BAR's {want}"),
    };
    ScreenCheck {
        ok: screen_ok && backing_ok,
        detail,
    }
}

/// Writes `line` to stdout and returns the answer that comes back on stdin.
fn ask(line: &str) -> std::io::Result<String> {
    const REPLY: &str = "@@screendump-reply ";
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    let mut stdin = std::io::stdin().lock();
    let mut got = String::new();
    loop {
        got.clear();
        if stdin.read_line(&mut got)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "stdin ended before the observer answered",
            ));
        }
        if let Some(answer) = got.trim_end().strip_prefix(REPLY) {
            return Ok(answer.to_owned());
        }
    }
}

/// XRGB8888 pixels (little-endian B, G, R, X) as RGB, as a screendump
/// holds them.
fn xrgb_to_rgb(xrgb: &[u8]) -> Vec<u8> {
    xrgb.chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_judged_by_both_hashes() {
        let want = "0123456789abcdef";
        let both = format!(r#"{{"rect_fnv1a64":"{want}","backing_fnv1a64":"{want}"}}"#);
        assert!(judge(&both, want, true).ok);
        let stale = format!(r#"{{"rect_fnv1a64":"{want}","backing_fnv1a64":"ffff"}}"#);
        assert!(!judge(&stale, want, true).ok);
        assert!(judge(&stale, want, false).ok, "backing not asked");
        let other = r#"{"rect_fnv1a64":"1111","backing_fnv1a64":null}"#;
        let c = judge(other, want, false);
        assert!(!c.ok && c.detail.starts_with("screen differs"), "{c:?}");
        let err = judge(r#"{"error":"no QMP"}"#, want, false);
        assert!(!err.ok && err.detail.contains("no QMP"), "{err:?}");
        assert!(!judge("not json", want, false).ok);
    }

    #[test]
    fn pixels_turn_from_xrgb_to_rgb() {
        assert_eq!(xrgb_to_rgb(&[1, 2, 3, 0, 4, 5, 6, 0]), [3, 2, 1, 6, 5, 4]);
    }
}
