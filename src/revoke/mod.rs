//! Revocation: what replaces vma zapping.
//!
//! When a VFIO exporter revokes its dma-bufs (memory decode off, reset, close,
//! unplug), the kernel removes every iommufd mapping's IOMMU entries, but on
//! Linux 7.2 the IOVA area stays allocated and **stays dead** after the BAR comes
//! back: only an unmap plus a fresh map restores it (uAPI reference F). This module
//! keeps the importer's side of that contract:
//!
//! * a [`RevocationHub`] belongs to one exporter (a
//!   [`VfioPciDevice`](crate::vfio::VfioPciDevice), or the receiving
//!   end of a buffer passed from another process) and knows every
//!   [`Attachment`] made from its buffers;
//! * when the exporter revokes, each attachment records it, tears its
//!   mapping down and calls its callbacks. When the kernel has done the
//!   revoking ([`RevocationHub::revoked_by_kernel`]: the exporter's own
//!   memory-decode and reset paths), its IOMMU entries are gone already and
//!   the dead area is kept until the restore, so that the IOVA stays reserved:
//!   an automatic placement of another mapping in the same IOAS cannot take it
//!   and make the restore at the same IOVA fail. Any other revocation
//!   ([`RevocationHub::revoke`]), and every permanent one, unmaps at once;
//! * when the exporter is back, each attachment with
//!   [`RestorePolicy::Automatic`] maps the same buffer again at the same IOVA;
//!   the others stay revoked until [`Attachment::restore`];
//! * the exporter's transitions (decode off and on, resets) and the
//!   attachments' own maps and restores are serialised by the hub's
//!   transition lock ([`RevocationHub::lock_transitions`]), so that threads
//!   revoking, restoring and mapping at once leave the attachments in step
//!   with the hub;
//! * anyone else can follow a hub's state with [`RevocationHub::subscribe`]
//!   (how the `share` module, feature `share`, forwards revocations to other
//!   processes).
//!
//! Revocations the library did not cause (another process toggled the device)
//! are found with [`probe_revoked`], which asks the kernel, and
//! [`Attachment::sync_with_kernel`].

mod attachment;
mod hub;
mod member;

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::range::PhysRange;

pub use attachment::{Attachment, Revocable, probe_revoked};
pub(crate) use hub::{HubMember, InCallback};
pub use hub::{RevocationHub, Subscription};
pub(crate) use member::{Listeners, RevocationRecord};

/// Why a buffer was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub enum RevokeReason {
    /// `PCI_COMMAND` memory decode was turned off.
    MemoryDecodeOff,
    /// The device was reset.
    Reset,
    /// The exporting device was closed: permanent.
    DeviceClosed,
    /// The device is being removed (hot-unplug request): permanent.
    Unplug,
    /// The kernel says the buffer is revoked, for a reason this process did
    /// not see (found by [`probe_revoked`]).
    External,
    /// The exporting process said so (buffer passed between processes).
    Remote,
}

impl RevokeReason {
    /// Whether the buffer can never come back after this.
    pub fn is_permanent(self) -> bool {
        matches!(self, Self::DeviceClosed | Self::Unplug)
    }
}

impl fmt::Display for RevokeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::MemoryDecodeOff => "memory decode off",
            Self::Reset => "device reset",
            Self::DeviceClosed => "exporter closed",
            Self::Unplug => "device unplugged",
            Self::External => "revoked outside this process",
            Self::Remote => "revoked by the exporting process",
        })
    }
}

/// The state of an exporter's buffers, as the hub knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum BufferState {
    /// Usable.
    Live,
    /// Revoked; may come back.
    Revoked(RevokeReason),
    /// Revoked for good (the exporter is closed or gone).
    Gone(RevokeReason),
}

/// What an attachment does when its exporter is back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum RestorePolicy {
    /// Unmap and map again at the same IOVA as soon as the exporter is back.
    #[default]
    Automatic,
    /// Stay revoked until [`Attachment::restore`] is called.
    LeaveRevoked,
}

/// What an attachment's callbacks are told.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RevocationEvent {
    /// The mapping was torn down; DMA to its IOVA now faults.
    Revoked(RevokeReason),
    /// The mapping is back at the same IOVA.
    Restored,
    /// The exporter is back but mapping again failed (the attachment stays revoked).
    RestoreFailed(String),
}

/// A change of a hub's [`BufferState`], told to the hub's observers
/// ([`RevocationHub::subscribe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct StateChange {
    /// The state the hub is in after the change.
    pub state: BufferState,
    /// The change's number: 0 for a hub that never changed, then one more per
    /// change. Observers may be called from several threads at once; one that
    /// has handled a higher number already has a newer state than this one.
    pub seq: u64,
}

/// A description of an attachment, handed to callbacks.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct AttachmentInfo {
    /// The exporter's name (e.g. the PCI address).
    pub exporter: String,
    /// The IOAS the buffer is mapped into.
    pub ioas: u32,
    /// The IOVA of the first byte.
    pub iova: u64,
    /// The mapped length.
    pub length: u64,
    /// The physical ranges behind the buffer, when known.
    pub phys: Vec<PhysRange>,
}

/// Locks a mutex, recovering from poisoning: every critical section here leaves
/// the state consistent, so a panic in a caller's callback must not wedge it.
#[inline]
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
