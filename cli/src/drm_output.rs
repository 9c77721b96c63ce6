//! Mode setting for `drm-test`, with Smithay's `drm` crate (kept up by
//! the Wayland compositor people; the library only imports): the first
//! connected connector, its preferred mode, a CRTC that can drive it, and
//! XRGB8888 framebuffers of imported GEM objects.

use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsFd, BorrowedFd};

use dmabuf_p2p::importer::drm::DrmDevice;
use drm::buffer::{DrmFourcc, DrmModifier, Handle, PlanarBuffer};
use drm::control::{Device as _, FbCmd2Flags, Mode, ModeTypeFlags, connector, crtc, framebuffer};

use crate::CliError;

/// A DRM device as the `drm` crate wants it: the library's fd.
pub(crate) struct Card(pub(crate) DrmDevice);

impl AsFd for Card {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
impl drm::Device for Card {}
impl drm::control::Device for Card {}

/// A GEM object as a one-plane XRGB8888 framebuffer.
struct Xrgb {
    handle: u32,
    size: (u32, u32),
}

impl PlanarBuffer for Xrgb {
    fn size(&self) -> (u32, u32) {
        self.size
    }
    fn format(&self) -> DrmFourcc {
        DrmFourcc::Xrgb8888
    }
    fn modifier(&self) -> Option<DrmModifier> {
        None
    }
    fn pitches(&self) -> [u32; 4] {
        [self.size.0 * 4, 0, 0, 0]
    }
    fn handles(&self) -> [Option<Handle>; 4] {
        [
            NonZeroU32::new(self.handle).map(Handle::from),
            None,
            None,
            None,
        ]
    }
    fn offsets(&self) -> [u32; 4] {
        [0; 4]
    }
}

/// Where the test shows the BAR: a connected connector, its mode and a
/// CRTC, with what that CRTC showed before (put back at the end).
pub(crate) struct Output {
    conn: connector::Handle,
    crtc: crtc::Handle,
    mode: Mode,
    before: crtc::Info,
}

impl Output {
    /// The first connected connector with a mode (its preferred one) and a
    /// CRTC for it: the one driving it now, else the first its encoders
    /// can use.
    pub(crate) fn find(card: &Card) -> Result<Self, CliError> {
        let res = card
            .resource_handles()
            .map_err(|e| format!("{}: DRM_IOCTL_MODE_GETRESOURCES: {e}", card.0))?;
        let mut connected = None;
        for h in res.connectors() {
            let c = card
                .get_connector(*h, true)
                .map_err(|e| format!("{}: DRM_IOCTL_MODE_GETCONNECTOR: {e}", card.0))?;
            if c.state() == connector::State::Connected && !c.modes().is_empty() {
                connected = Some(c);
                break;
            }
        }
        let conn = connected.ok_or_else(|| format!("{}: no connected connector", card.0))?;
        let mode = *conn
            .modes()
            .iter()
            .find(|m| m.mode_type().contains(ModeTypeFlags::PREFERRED))
            .unwrap_or(&conn.modes()[0]);
        let mut crtc = None;
        if let Some(e) = conn.current_encoder() {
            crtc = card.get_encoder(e).ok().and_then(|e| e.crtc());
        }
        if crtc.is_none() {
            for e in conn.encoders() {
                if let Ok(info) = card.get_encoder(*e)
                    && let Some(c) = res.filter_crtcs(info.possible_crtcs()).first()
                {
                    crtc = Some(*c);
                    break;
                }
            }
        }
        let crtc = crtc.ok_or_else(|| format!("{}: no CRTC can drive {:?}", card.0, conn))?;
        let before = card
            .get_crtc(crtc)
            .map_err(|e| format!("{}: DRM_IOCTL_MODE_GETCRTC: {e}", card.0))?;
        Ok(Self {
            conn: conn.handle(),
            crtc,
            mode,
            before,
        })
    }

    /// The mode's size in pixels.
    pub(crate) fn size(&self) -> (u32, u32) {
        let (w, h) = self.mode.size();
        (u32::from(w), u32::from(h))
    }

    /// The bytes of one XRGB8888 framebuffer of the mode.
    pub(crate) fn fb_bytes(&self) -> u64 {
        let (w, h) = self.size();
        u64::from(w) * u64::from(h) * 4
    }

    /// What it is, e.g. `connector 35, CRTC 34, 256x256@75`.
    pub(crate) fn describe(&self) -> String {
        let (w, h) = self.size();
        format!(
            "connector {}, CRTC {}, {w}x{h}@{}",
            u32::from(self.conn),
            u32::from(self.crtc),
            self.mode.vrefresh()
        )
    }

    /// A framebuffer (`DRM_IOCTL_MODE_ADDFB2`) of GEM object `handle`, the
    /// mode's size.
    pub(crate) fn framebuffer(&self, card: &Card, handle: u32) -> io::Result<framebuffer::Handle> {
        card.add_planar_framebuffer(
            &Xrgb {
                handle,
                size: self.size(),
            },
            FbCmd2Flags::empty(),
        )
    }

    /// Scans `fb` out (`DRM_IOCTL_MODE_SETCRTC`; needs DRM master).
    pub(crate) fn show(&self, card: &Card, fb: framebuffer::Handle) -> io::Result<()> {
        card.set_crtc(self.crtc, Some(fb), (0, 0), &[self.conn], Some(self.mode))
    }

    /// Whether the CRTC scans `fb` out now (`DRM_IOCTL_MODE_GETCRTC`).
    pub(crate) fn shows(&self, card: &Card, fb: framebuffer::Handle) -> bool {
        card.get_crtc(self.crtc)
            .is_ok_and(|i| i.framebuffer() == Some(fb))
    }

    /// Puts back what the CRTC showed before (or turns it off).
    pub(crate) fn restore(&self, card: &Card) -> io::Result<()> {
        match self.before.framebuffer() {
            Some(fb) => card.set_crtc(
                self.crtc,
                Some(fb),
                self.before.position(),
                &[self.conn],
                self.before.mode(),
            ),
            None => card.set_crtc(self.crtc, None, (0, 0), &[], None),
        }
    }
}
