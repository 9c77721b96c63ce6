//! A dma-buf imported into a DRM device as a GEM object, tied to its
//! exporter's revocation hub.
//!
//! What the kernel does (Linux 7.2.13, virtio-gpu with blob resources): the
//! import (`virtgpu_gem_prime_import`) attaches dynamically, maps the buffer
//! and hands the scatterlist's DMA addresses to the host as the backing of
//! a blob resource. When the VFIO exporter revokes (memory decode off, a
//! reset), `invalidate_mappings` (`virtgpu_dma_buf_move_notify`) detaches
//! that backing from the host resource and unmaps the attachment, before
//! the revoking call returns. When decode comes back, the exporter calls
//! `invalidate_mappings` again and virtio-gpu maps nothing by itself: the
//! object gets a backing again only when a plane is next prepared with it
//! (`virtio_gpu_prepare_imported_obj`), which fails with `ENODEV` while the
//! buffer is revoked (seen in the VM suite). A restore here closes the old
//! handle and imports the buffer again (a new GEM object and host
//! resource), so the import is live at once, whatever the driver does
//! lazily; framebuffers are made again from [`GemImport::handle`].

use std::fmt;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::dmabuf::DmaBuf;
use crate::error::{Error, Result};
use crate::ioctl;
use crate::pci::PciAddress;
use crate::range::PhysRange;
use crate::revoke::{
    BufferState, HubMember, Listeners, RestorePolicy, Revocable, RevocationEvent, RevocationHub,
    RevocationRecord, RevokeReason,
};
use crate::sysfs::Sysfs;
use crate::topology::{KernelMapType, PciPath, Platform, Verdict};
use crate::types::ImportRefusal;

use super::device::DrmDevice;
use super::prime::PrimeImporter;

/// What a [`GemImport`]'s callbacks are told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct GemImportInfo {
    /// The DRM device (`/dev/dri/card0 (virtio_gpu, 0000:03:00.0)`).
    pub device: String,
    /// The exporter's name (its hub's).
    pub exporter: String,
    /// The buffer's size in bytes.
    pub size: u64,
}

/// A dma-buf imported into a DRM device (`DRM_IOCTL_PRIME_FD_TO_HANDLE`):
/// a GEM handle that framebuffers (`DRM_IOCTL_MODE_ADDFB2`) and the
/// driver's own ioctls can use, tied to the exporter's
/// [`RevocationHub`] like an iommufd [`Attachment`](crate::revoke::Attachment).
///
/// * When the exporter revokes, the import is revoked: the kernel has
///   already cut the device off the buffer (virtio-gpu detaches the host
///   resource's backing), [`handle`](Self::handle) fails with
///   [`Error::Revoked`] and the callbacks hear it. The dead handle is kept
///   (its number stays taken) until the restore or the drop.
/// * When the exporter is back, an import with [`RestorePolicy::Automatic`]
///   closes the dead handle and imports the buffer again: a new GEM object
///   (often under the same handle number), so [`generation`](Self::generation)
///   grows and framebuffers must be made again.
///
/// Dropping it closes the handle.
///
/// ```no_run
/// use dmabuf_p2p::importer::drm::{DrmDevice, GemImport};
/// use dmabuf_p2p::revoke::RestorePolicy;
/// use dmabuf_p2p::{ByteRange, Iommufd, VfioPciDevice};
///
/// let iommufd = Iommufd::open()?;
/// let mut bar = VfioPciDevice::open("0000:04:00.0".parse()?)?;
/// bar.bind(&iommufd)?;
/// bar.set_memory_decode(true)?;
/// let export = bar.export_bar(2, &[ByteRange::new(0, 1 << 20)])?;
/// let card = DrmDevice::open("/dev/dri/card0")?;
/// let gem = GemImport::import(&card, &export, RestorePolicy::Automatic)?;
/// println!("GEM handle {} on {card}", gem.handle()?);
/// bar.set_memory_decode(false)?; // revoked: the GPU no longer reads the BAR
/// assert!(gem.handle().is_err());
/// bar.set_memory_decode(true)?;  // imported again
/// println!("GEM handle {} (generation {})", gem.handle()?, gem.generation());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct GemImport {
    core: Arc<GemCore>,
}

struct GemCore {
    drm: DrmDevice,
    buf: DmaBuf,
    hub: Arc<RevocationHub>,
    exporter_bar: Option<(PciAddress, u32)>,
    info: GemImportInfo,
    policy: Mutex<RestorePolicy>,
    state: Mutex<GemState>,
    listeners: Listeners<GemImportInfo>,
}

struct GemState {
    /// The GEM handle, while this file holds one.
    handle: Option<u32>,
    /// Imports made: 1 for the first, one more per restore.
    generation: u64,
    record: RevocationRecord,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl fmt::Debug for GemImport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.core.state);
        f.debug_struct("GemImport")
            .field("info", &self.core.info)
            .field("handle", &st.handle)
            .field("revoked", &st.record.revoked())
            .field("generation", &st.generation)
            .finish()
    }
}

/// What the kernel will say to importing a BAR export into a DRM device,
/// worked out before asking it ([`GemImport::forecast`]).
#[derive(Debug, Clone)]
pub struct ImportForecast {
    /// How the device's driver attaches.
    pub importer: PrimeImporter,
    /// The topology verdict between the device's PCI function and the BAR's
    /// (`None` when the device is not a PCI function).
    pub verdict: Option<Verdict>,
    /// What `pci_p2pdma_map_type()` will answer (`None`: not known).
    pub map_type: Option<KernelMapType>,
    /// Why the kernel will refuse, if it will.
    pub refusal: Option<ImportRefusal>,
}

impl GemImport {
    /// Imports `source`'s buffer into `drm` and ties the import to the
    /// exporter's hub.
    ///
    /// Errors: [`Error::Revoked`] while the exporter has its buffers revoked
    /// (or when the kernel says so, `ENODEV`); [`Error::ImportRefused`] when
    /// the kernel refuses the importer (`EOPNOTSUPP`: a static importer) or
    /// the path (`EINVAL` where the topology verdict finds no peer-to-peer
    /// path), with the same reasons [`forecast`](Self::forecast) gives, and
    /// before asking, with [`ImportRefusal::MultiRangeBlob`], a BAR export
    /// of more than one range into virtio-gpu, which the kernel imports and
    /// the host cannot show ([`import_multi_range`](Self::import_multi_range)
    /// skips that check); [`Error::Sys`] for any other answer.
    pub fn import(drm: &DrmDevice, source: &impl Revocable, policy: RestorePolicy) -> Result<Self> {
        let entries = sg_entries(&source.phys_ranges());
        if entries > 1
            && let Some(why) = drm.prime_importer()?.refusal_for_entries(entries)
        {
            return Err(Error::ImportRefused {
                importer: drm.to_string(),
                buffer: source.dmabuf().describe(),
                why,
                source: None,
            });
        }
        Self::import_multi_range(drm, source, policy)
    }

    /// [`import`](Self::import) without its check of the ranges: for a
    /// virtio-gpu whose host joins a blob's backing ranges itself (QEMU's
    /// udmabuf path does for guest RAM in memfd memory; QEMU 7.2 does not
    /// for device memory). The kernel imports such a buffer either way;
    /// whether it shows, only the screen says.
    pub fn import_multi_range(
        drm: &DrmDevice,
        source: &impl Revocable,
        policy: RestorePolicy,
    ) -> Result<Self> {
        let hub = source.hub();
        let _transition = hub.lock_transitions_outside_callbacks();
        let before = hub.last_change();
        if before.state != BufferState::Live {
            return Err(Error::Revoked {
                buffer: format!("{} (exporter {})", source.dmabuf().describe(), hub.name()),
                source: None,
            });
        }
        let buf = source.dmabuf().try_clone()?;
        let size = buf.size()?;
        let exporter_bar = source.exporter_bar();
        let handle = import_handle(drm, &buf, exporter_bar)?;
        let core = Arc::new(GemCore {
            drm: drm.clone(),
            buf,
            hub: Arc::clone(hub),
            exporter_bar,
            info: GemImportInfo {
                device: drm.to_string(),
                exporter: hub.name().to_owned(),
                size,
            },
            policy: Mutex::new(policy),
            state: Mutex::new(GemState {
                handle: Some(handle),
                generation: 1,
                record: RevocationRecord::default(),
            }),
            listeners: Listeners::default(),
        });
        let member: Arc<dyn HubMember> = core.clone();
        hub.register(Arc::downgrade(&member));
        // A revocation between the check and the registration was told to
        // nobody here: revoked now, tear down; revoked and back, the GEM
        // object lost its backing (virtio-gpu maps again only at the next
        // plane prepare), so import again, as a restore does.
        let after = hub.last_change();
        if after.seq != before.seq {
            match after.state {
                BufferState::Revoked(r) | BufferState::Gone(r) => {
                    core.on_revoked(r, false);
                }
                BufferState::Live => core.reimport_unheard(),
            }
        }
        Ok(Self { core })
    }

    /// What the kernel will say to importing BAR `bar` of `exporter` into
    /// `drm`: the driver's attach (static importers are refused first), then
    /// what `pci_p2pdma_map_type()` answers for the path (the topology
    /// verdict). Reads sysfs; the ACS bits that decide a path below a
    /// switch need root.
    pub fn forecast(drm: &DrmDevice, exporter: PciAddress, bar: u32) -> Result<ImportForecast> {
        let importer = drm.prime_importer()?;
        let verdict = match drm.pci_address() {
            Some(client) => {
                let sysfs = Sysfs::default();
                let path = PciPath::read(&sysfs, client, exporter)?;
                Some(Verdict::new(
                    &path,
                    &Platform::read(&sysfs)?,
                    None,
                    Some(bar),
                ))
            }
            None => None,
        };
        let map_type = verdict.as_ref().and_then(Verdict::kernel_map_type);
        let refusal = importer.refusal().or_else(|| {
            (map_type == Some(KernelMapType::NotSupported)).then(|| ImportRefusal::NoP2pPath {
                reasons: verdict
                    .as_ref()
                    .map(|v| v.map_type_reasons().map(ToString::to_string).collect())
                    .unwrap_or_default(),
            })
        });
        Ok(ImportForecast {
            importer,
            verdict,
            map_type,
            refusal,
        })
    }

    /// The GEM handle; [`Error::Revoked`] while the import is revoked.
    pub fn handle(&self) -> Result<u32> {
        let st = lock(&self.core.state);
        match (st.record.revoked(), st.handle) {
            (None, Some(h)) => Ok(h),
            (r, _) => Err(Error::Revoked {
                buffer: format!(
                    "GEM import on {} of exporter {} ({})",
                    self.core.info.device,
                    self.core.info.exporter,
                    r.map_or_else(|| "not imported".to_owned(), |r| r.to_string())
                ),
                source: None,
            }),
        }
    }

    /// How many times the buffer was imported: 1, and one more per restore.
    /// A framebuffer made at another generation shows a dead import.
    pub fn generation(&self) -> u64 {
        lock(&self.core.state).generation
    }

    /// The DRM device.
    pub fn device(&self) -> &DrmDevice {
        &self.core.drm
    }

    /// What is imported where.
    pub fn info(&self) -> &GemImportInfo {
        &self.core.info
    }

    /// The exporter's hub.
    pub fn hub(&self) -> &Arc<RevocationHub> {
        &self.core.hub
    }

    /// Whether the import is revoked now.
    pub fn is_revoked(&self) -> bool {
        lock(&self.core.state).record.revoked().is_some()
    }

    /// Why the import is revoked, if it is.
    pub fn revoked_reason(&self) -> Option<RevokeReason> {
        lock(&self.core.state).record.revoked()
    }

    /// How many times the import was revoked and restored.
    pub fn counts(&self) -> (u64, u64) {
        lock(&self.core.state).record.counts()
    }

    /// The last restore error, if a restore failed.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.core.state).record.last_error()
    }

    /// The restore policy.
    pub fn policy(&self) -> RestorePolicy {
        *lock(&self.core.policy)
    }

    /// Changes the restore policy.
    pub fn set_policy(&self, policy: RestorePolicy) {
        *lock(&self.core.policy) = policy;
    }

    /// Registers a callback for revoke and restore events. It runs on the
    /// thread that revoked or restored, with no lock of this import held.
    pub fn on_event(&self, f: impl Fn(&GemImportInfo, &RevocationEvent) + Send + Sync + 'static) {
        self.core.listeners.push(f);
    }

    /// Imports the buffer again now, whatever the policy. Fails with
    /// [`Error::Revoked`] while the exporter is revoked; if the import
    /// itself fails, with its error, and the import stays revoked.
    pub fn restore(&self) -> Result<()> {
        let _transition = self.core.hub.lock_transitions_outside_callbacks();
        if let BufferState::Revoked(r) | BufferState::Gone(r) = self.core.hub.state() {
            return Err(Error::Revoked {
                buffer: format!("exporter {} ({r})", self.core.hub.name()),
                source: None,
            });
        }
        let result = self.core.try_restore();
        if matches!(result, Err(Error::Revoked { .. }))
            && self.core.hub.state() == BufferState::Live
        {
            self.core.hub.revoked_by_kernel(RevokeReason::External);
        }
        result
    }
}

impl Drop for GemImport {
    fn drop(&mut self) {
        self.core.close_handle();
    }
}

impl GemCore {
    fn close_handle(&self) {
        let mut st = lock(&self.state);
        if let Some(h) = st.handle.take()
            && let Err(e) = ioctl::drm_gem_close(self.drm.as_fd(), h)
        {
            st.record
                .note_error(format!("DRM_IOCTL_GEM_CLOSE({h}): {e}"));
        }
    }

    /// Closes the dead handle (the prime lookup would hand it back) and
    /// imports again.
    fn reimport(&self, st: &mut GemState) -> Result<()> {
        if let Some(h) = st.handle.take() {
            ioctl::drm_gem_close(self.drm.as_fd(), h)
                .map_err(|e| Error::sys("DRM_IOCTL_GEM_CLOSE", self.info.device.clone(), e))?;
        }
        let h = import_handle(&self.drm, &self.buf, self.exporter_bar)?;
        st.handle = Some(h);
        st.generation += 1;
        Ok(())
    }

    fn reimport_unheard(&self) {
        let mut st = lock(&self.state);
        if st.record.revoked().is_none()
            && let Err(e) = self.reimport(&mut st)
        {
            st.record.revoke(RevokeReason::External);
            st.record
                .note_error(format!("import after a revocation during the import: {e}"));
        }
    }
}

impl HubMember for GemCore {
    fn on_revoked(&self, reason: RevokeReason, keep_dead: bool) -> bool {
        let was_live = { lock(&self.state).record.revoke(reason) };
        // The kernel has not cut the device off (a revocation only the hub
        // knows of), or never will again (permanent): drop the handle, so
        // the GEM object goes with the last framebuffer made from it.
        if !keep_dead {
            self.close_handle();
        }
        if was_live {
            self.listeners
                .notify(&self.info, &RevocationEvent::Revoked(reason));
        }
        was_live
    }

    fn restore_policy(&self) -> RestorePolicy {
        *lock(&self.policy)
    }

    fn try_restore(&self) -> Result<()> {
        let (ev, result) = {
            let mut st = lock(&self.state);
            if st.record.revoked().is_none() {
                return Ok(());
            }
            let reimport = self.reimport(&mut st);
            st.record.settle_restore(reimport)
        };
        self.listeners.notify(&self.info, &ev);
        result
    }
}

/// `DRM_IOCTL_PRIME_FD_TO_HANDLE`, its errno turned into what it means for
/// a VFIO BAR export.
fn import_handle(
    drm: &DrmDevice,
    buf: &DmaBuf,
    exporter_bar: Option<(PciAddress, u32)>,
) -> Result<u32> {
    let err = match ioctl::drm_prime_fd_to_handle(drm.as_fd(), buf.as_fd()) {
        Ok(h) => return Ok(h),
        Err(e) => e,
    };
    let refused = |why: ImportRefusal, source: std::io::Error| Error::ImportRefused {
        importer: drm.to_string(),
        buffer: buf.describe(),
        why,
        source: Some(source),
    };
    match err.raw_os_error() {
        Some(libc::ENODEV) => Err(Error::Revoked {
            buffer: buf.describe(),
            source: Some(err),
        }),
        Some(libc::EOPNOTSUPP) => {
            let why = match drm.prime_importer() {
                Ok(i) => i.refusal(),
                Err(_) => None,
            }
            .unwrap_or_else(|| ImportRefusal::NotPeerToPeerOrNotRevocable {
                importer: drm.driver().to_owned(),
            });
            Err(refused(why, err))
        }
        Some(libc::EINVAL) => {
            // EINVAL is the exporter's answer to PCI_P2PDMA_MAP_NOT_SUPPORTED;
            // say so only where the verdict agrees.
            let forecast =
                exporter_bar.and_then(|(dev, bar)| GemImport::forecast(drm, dev, bar).ok());
            match forecast.and_then(|f| f.refusal) {
                Some(why @ ImportRefusal::NoP2pPath { .. }) => Err(refused(why, err)),
                _ => Err(Error::sys(
                    "DRM_IOCTL_PRIME_FD_TO_HANDLE",
                    drm.to_string(),
                    err,
                )),
            }
        }
        _ => Err(Error::sys(
            "DRM_IOCTL_PRIME_FD_TO_HANDLE",
            drm.to_string(),
            err,
        )),
    }
}

/// The largest scatterlist entry the dma-buf mapping helper makes
/// (`MAX_SG_ENT_SZ` in `dma-buf-mapping.c`: `ALIGN_DOWN(UINT_MAX,
/// PAGE_SIZE)`, 4 KiB pages).
const MAX_SG_ENTRY: u64 = 0xffff_f000;

/// The scatterlist entries a kernel importer gets for a BAR export of
/// `ranges` where it is handed bus addresses or direct DMA addresses
/// (`dma_buf_phys_vec_to_sgt`: each range filled by `fill_sg_entry`, split
/// at [`MAX_SG_ENTRY`]); 0 when the ranges are not known.
fn sg_entries(ranges: &[PhysRange]) -> usize {
    ranges
        .iter()
        .map(|r| usize::try_from(r.length.div_ceil(MAX_SG_ENTRY)).unwrap_or(usize::MAX))
        .fold(0, usize::saturating_add)
}

// An import is shared across threads like an attachment.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GemImport>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_entry_per_range_and_per_4_gib_of_a_longer_one() {
        let r = |len: u64| PhysRange::new(0x1_0000_0000, len);
        assert_eq!(sg_entries(&[]), 0);
        assert_eq!(sg_entries(&[r(0x1000)]), 1);
        assert_eq!(sg_entries(&[r(0x1000), r(0x2000)]), 2);
        assert_eq!(sg_entries(&[r(MAX_SG_ENTRY)]), 1);
        assert_eq!(sg_entries(&[r(MAX_SG_ENTRY + 0x1000)]), 2);
        assert_eq!(sg_entries(&[r(16 << 30), r(0x1000)]), 6);
    }
}
