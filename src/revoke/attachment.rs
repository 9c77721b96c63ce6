//! [`Attachment`]: an iommufd importer's hold on a buffer, revoked and
//! restored with its hub; and [`probe_revoked`], which asks the kernel.

use std::fmt;
use std::sync::{Arc, Mutex};

use super::*;
use crate::dmabuf::DmaBuf;
use crate::error::{Error, Result};
use crate::importer::iommufd::{Ioas, IoasMapping, Iommufd, IovaPlacement, MapPerms};
use crate::pci::PciAddress;

/// An importer's hold on an exported buffer: the buffer mapped into an IOAS,
/// tied to its exporter's [`RevocationHub`]. Dropping it unmaps.
///
/// ```no_run
/// use dmabuf_p2p::vfio::VfioPciDevice;
/// use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
/// use dmabuf_p2p::revoke::{Attachment, RestorePolicy};
/// use dmabuf_p2p::ByteRange;
///
/// let iommufd = Iommufd::open()?;
/// let ioas = iommufd.alloc_ioas()?;
/// let mut dev = VfioPciDevice::open("0000:02:00.0".parse()?)?;
/// dev.bind(&iommufd)?;
/// dev.set_memory_decode(true)?;
/// let export = dev.export_bar(2, &[ByteRange::new(0, 0x10000)])?;
/// let att = Attachment::map(&export, &ioas, IovaPlacement::Auto, MapPerms::ReadWrite, RestorePolicy::Automatic)?;
/// att.on_event(|info, ev| eprintln!("{:#x}: {ev:?}", info.iova));
/// dev.set_memory_decode(false)?; // the mapping is torn down
/// assert!(att.is_revoked());
/// dev.set_memory_decode(true)?; // and mapped again at the same IOVA
/// assert!(!att.is_revoked());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Attachment {
    core: Arc<AttachmentCore>,
}

struct AttachmentCore {
    hub: Arc<RevocationHub>,
    info: AttachmentInfo,
    policy: Mutex<RestorePolicy>,
    state: Mutex<AttState>,
    listeners: Listeners<AttachmentInfo>,
}

struct AttState {
    mapping: IoasMapping,
    record: RevocationRecord,
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.core.state);
        f.debug_struct("Attachment")
            .field("info", &self.core.info)
            .field("revoked", &st.record.revoked())
            .field("policy", &*lock(&self.core.policy))
            .finish()
    }
}

/// Something an [`Attachment`] can be made from: a buffer and the hub of its
/// exporter.
pub trait Revocable {
    /// The dma-buf.
    fn dmabuf(&self) -> &DmaBuf;
    /// The exporter's hub.
    fn hub(&self) -> &Arc<RevocationHub>;
    /// The physical ranges behind the buffer, when known.
    fn phys_ranges(&self) -> Vec<PhysRange> {
        Vec::new()
    }
    /// The PCI function and BAR the buffer was exported from, when it is a
    /// BAR export: what a kernel importer's refusal is explained with.
    fn exporter_bar(&self) -> Option<(PciAddress, u32)> {
        None
    }
}

impl Attachment {
    /// Maps `source`'s whole buffer into `ioas` and ties the mapping to the
    /// exporter's hub. Fails with [`Error::Revoked`] while the exporter has its
    /// buffers revoked.
    pub fn map(
        source: &impl Revocable,
        ioas: &Ioas,
        at: IovaPlacement,
        perms: MapPerms,
        policy: RestorePolicy,
    ) -> Result<Self> {
        Self::map_parts(
            source.dmabuf(),
            source.hub(),
            source.phys_ranges(),
            ioas,
            at,
            perms,
            policy,
        )
    }

    /// Like [`map`](Self::map), from the parts: a buffer, its exporter's hub
    /// and what is known of its physical ranges.
    pub fn map_parts(
        buf: &DmaBuf,
        hub: &Arc<RevocationHub>,
        phys: Vec<PhysRange>,
        ioas: &Ioas,
        at: IovaPlacement,
        perms: MapPerms,
        policy: RestorePolicy,
    ) -> Result<Self> {
        // No transition of the exporter between the state check and the
        // registration (for exporters that take the lock).
        let _transition = hub.lock_transitions_outside_callbacks();
        let before = hub.last_change();
        match before.state {
            BufferState::Live => {}
            BufferState::Revoked(_) | BufferState::Gone(_) => {
                return Err(Error::Revoked {
                    buffer: format!("{} (exporter {})", buf.describe(), hub.name()),
                    source: None,
                });
            }
        }
        // A single-range buffer's physical start guides automatic placement.
        let phys_start = match phys.as_slice() {
            [one] => Some(one.start),
            _ => None,
        };
        let mapping = ioas.map_dmabuf_at_phys(buf, at, perms, phys_start)?;
        let info = AttachmentInfo {
            exporter: hub.name().to_owned(),
            ioas: ioas.id(),
            iova: mapping.iova(),
            length: mapping.length(),
            phys,
        };
        let core = Arc::new(AttachmentCore {
            hub: Arc::clone(hub),
            info,
            policy: Mutex::new(policy),
            state: Mutex::new(AttState {
                mapping,
                record: RevocationRecord::default(),
            }),
            listeners: Listeners::default(),
        });
        let member: Arc<dyn HubMember> = core.clone();
        hub.register(Arc::downgrade(&member));
        // The exporter may have revoked between the state check and the
        // registration, which the hub told nobody about this attachment: if
        // it is revoked now, tear down; if it revoked and came back, the new
        // area may be dead (a revoked area stays dead), so map it again.
        let after = hub.last_change();
        if after.seq != before.seq {
            match after.state {
                BufferState::Revoked(r) | BufferState::Gone(r) => {
                    core.on_revoked(r, false);
                }
                BufferState::Live => core.remap_unheard(),
            }
        }
        Ok(Self { core })
    }

    /// What is attached where.
    pub fn info(&self) -> &AttachmentInfo {
        &self.core.info
    }

    /// The IOVA devices use.
    pub fn iova(&self) -> u64 {
        self.core.info.iova
    }

    /// The mapped length.
    pub fn length(&self) -> u64 {
        self.core.info.length
    }

    /// The physical (PFN) ranges behind the buffer, when known.
    pub fn phys_ranges(&self) -> &[PhysRange] {
        &self.core.info.phys
    }

    /// The exporter's hub.
    pub fn hub(&self) -> &Arc<RevocationHub> {
        &self.core.hub
    }

    /// Whether the mapping is revoked (torn down) now.
    pub fn is_revoked(&self) -> bool {
        lock(&self.core.state).record.revoked().is_some()
    }

    /// Why the mapping is revoked, if it is.
    pub fn revoked_reason(&self) -> Option<RevokeReason> {
        lock(&self.core.state).record.revoked()
    }

    /// How many times the mapping was revoked and restored.
    pub fn counts(&self) -> (u64, u64) {
        lock(&self.core.state).record.counts()
    }

    /// The last restore error, if a restore failed.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.core.state).record.last_error()
    }

    /// The restore policy.
    pub fn policy(&self) -> RestorePolicy {
        self.core.policy()
    }

    /// Changes the restore policy.
    pub fn set_policy(&self, policy: RestorePolicy) {
        *lock(&self.core.policy) = policy;
    }

    /// Registers a callback for revoke and restore events. It runs on the
    /// thread that revoked or restored, with no lock of this attachment held.
    pub fn on_event(&self, f: impl Fn(&AttachmentInfo, &RevocationEvent) + Send + Sync + 'static) {
        self.core.listeners.push(f);
    }

    /// Fails with [`Error::Revoked`] if the mapping is revoked: the check to
    /// make before starting DMA to [`iova`](Self::iova).
    pub fn ensure_live(&self) -> Result<()> {
        match self.revoked_reason() {
            None => Ok(()),
            Some(r) => Err(Error::Revoked {
                buffer: format!(
                    "IOVA {:#x} of exporter {} ({r})",
                    self.iova(),
                    self.core.info.exporter
                ),
                source: None,
            }),
        }
    }

    /// Maps the buffer again at the same IOVA now, whatever the policy. Fails
    /// with [`Error::Revoked`] while the exporter is revoked; if the remap
    /// itself fails, with its error (naming the ioctl, with the kernel's
    /// errno), and the attachment stays revoked. A remap the kernel refuses
    /// as revoked while the hub says live (the exporter revoked without the
    /// library being told) revokes the hub, so that no attachment of the
    /// exporter goes on saying live.
    pub fn restore(&self) -> Result<()> {
        // The exporter must not revoke between the check and the remap: the
        // remap's unmap would free the IOVA, and its map then fail.
        let _transition = self.core.hub.lock_transitions_outside_callbacks();
        if let BufferState::Revoked(r) | BufferState::Gone(r) = self.core.hub.state() {
            return Err(Error::Revoked {
                buffer: format!("exporter {} ({r})", self.core.hub.name()),
                source: None,
            });
        }
        // A failed remap's own error: it names the ioctl and carries the
        // kernel's errno (ENOMEM under memory pressure), or is
        // [`Error::Revoked`] when the exporter revoked again meanwhile.
        let result = self.core.try_restore();
        self.core.learn_from(&result);
        result
    }

    /// Unmaps and maps again at the same IOVA. On Linux 7.2 this is the only
    /// cure for a mapping that was revoked and un-revoked behind this
    /// process's back, which no uAPI reports. If the map fails, the
    /// attachment is left revoked (it is unmapped), and a refusal as revoked
    /// revokes the hub as [`restore`](Self::restore) does.
    pub fn refresh(&self) -> Result<()> {
        let result = {
            let mut st = lock(&self.core.state);
            let result = st.mapping.remap();
            // Unmapped by a failed remap: not live, whatever the error.
            if result.is_ok() || !st.mapping.is_mapped() {
                st.record.refreshed(result.is_ok());
            }
            result
        };
        self.core.learn_from(&result);
        result
    }

    /// Asks the kernel whether the buffer is revoked now ([`probe_revoked`]
    /// in a scratch IOAS of `iommufd`) and brings the attachment in line:
    /// a revocation nobody reported tears the mapping down; a buffer that is
    /// live again is restored when the policy says so. Returns whether the
    /// buffer is revoked.
    pub fn sync_with_kernel(&self, iommufd: &Iommufd) -> Result<bool> {
        let buf_revoked = {
            let st = lock(&self.core.state);
            let Some(buf) = st.mapping.dmabuf() else {
                return Ok(false);
            };
            probe_revoked(iommufd, buf)?
        };
        if buf_revoked {
            if !self.is_revoked() {
                self.core.hub.revoked_by_kernel(RevokeReason::External);
                // The hub may be gone already; make sure this one is torn down.
                self.core.on_revoked(RevokeReason::External, true);
            }
        } else if self.is_revoked() {
            self.core.hub.restore();
        }
        Ok(buf_revoked)
    }
}

impl AttachmentCore {
    fn policy(&self) -> RestorePolicy {
        *lock(&self.policy)
    }

    /// Tears the mapping down; returns whether it was live before. With
    /// `keep_dead_area` (the kernel has revoked the area already) the area
    /// stays, reserving the IOVA; otherwise it is unmapped.
    fn on_revoked(&self, reason: RevokeReason, keep_dead_area: bool) -> bool {
        let was_live = {
            let mut st = lock(&self.state);
            let was_live = st.record.revoke(reason);
            // Unmapping cannot fail for a revoked dma-buf area; a failure
            // leaves it for the restore's remap or for drop.
            if !keep_dead_area
                && st.mapping.is_mapped()
                && let Err(e) = st.mapping.unmap()
            {
                st.record.note_error(format!("unmap after revoke: {e}"));
            }
            was_live
        };
        if was_live {
            self.listeners
                .notify(&self.info, &RevocationEvent::Revoked(reason));
        }
        was_live
    }

    /// Maps again at the same IOVA, right after the attachment was made, for
    /// a revocation that happened while it was being made (the new area may
    /// be dead). Nobody has heard of the attachment yet, so there is no
    /// event; a failure leaves it revoked with the error recorded.
    fn remap_unheard(&self) {
        let mut st = lock(&self.state);
        if st.record.revoked().is_none()
            && let Err(e) = st.mapping.remap()
        {
            st.record.revoke(RevokeReason::External);
            st.record
                .note_error(format!("remap after a revocation during the map: {e}"));
        }
    }

    /// Maps again at the same IOVA if revoked; `Ok` when it is live now,
    /// else the remap's error (the attachment stays revoked).
    /// A remap the kernel refused as revoked while the hub says live: the
    /// exporter revoked without the library being told (a VMM's untold
    /// decode-off). The hub records it, so that no attachment of the
    /// exporter goes on saying live over a dead area.
    fn learn_from(&self, remap: &Result<()>) {
        if matches!(remap, Err(Error::Revoked { .. })) && self.hub.state() == BufferState::Live {
            self.hub.revoked_by_kernel(RevokeReason::External);
        }
    }

    fn try_restore(&self) -> Result<()> {
        let (ev, result) = {
            let mut st = lock(&self.state);
            if st.record.revoked().is_none() {
                return Ok(());
            }
            let remap = st.mapping.remap();
            st.record.settle_restore(remap)
        };
        self.listeners.notify(&self.info, &ev);
        result
    }
}

impl HubMember for AttachmentCore {
    fn on_revoked(&self, reason: RevokeReason, keep_dead: bool) -> bool {
        AttachmentCore::on_revoked(self, reason, keep_dead)
    }

    fn restore_policy(&self) -> RestorePolicy {
        self.policy()
    }

    fn try_restore(&self) -> Result<()> {
        AttachmentCore::try_restore(self)
    }
}

/// Asks the kernel whether `buf` is revoked right now: maps it into a scratch
/// IOAS of `iommufd` (`IOMMU_IOAS_MAP_FILE`), where a revoked VFIO dma-buf gives
/// `ENODEV`, and unmaps again. No uAPI reports the state directly.
///
/// Returns [`Error::NotImportable`] for buffers iommufd cannot map (udmabuf,
/// heaps, multi-range VFIO exports): their state cannot be probed this way.
pub fn probe_revoked(iommufd: &Iommufd, buf: &DmaBuf) -> Result<bool> {
    let scratch = iommufd.alloc_ioas()?;
    match scratch.map_dmabuf(buf, IovaPlacement::Auto, MapPerms::Read) {
        Ok(mut m) => {
            m.unmap()?;
            Ok(false)
        }
        Err(Error::Revoked { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}

// A hub and attachments are shared across threads (a VMM revokes on its
// config-write path while its DMA threads hold attachments).
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RevocationHub>();
    assert_send_sync::<Attachment>();
};
