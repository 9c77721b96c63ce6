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

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use crate::dmabuf::DmaBuf;
use crate::error::{Error, Result};
use crate::importer::iommufd::{Ioas, IoasMapping, Iommufd, IovaPlacement, MapPerms};
use crate::pci::PciAddress;
use crate::range::PhysRange;

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

type Callback = Arc<dyn Fn(&AttachmentInfo, &RevocationEvent) + Send + Sync>;

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

type Observer = Arc<dyn Fn(&StateChange) + Send + Sync>;

/// An observer's registration with a [`RevocationHub`]
/// ([`RevocationHub::subscribe`]). Dropping it unsubscribes.
#[must_use = "dropping a Subscription unsubscribes at once"]
pub struct Subscription {
    hub: Weak<RevocationHub>,
    id: u64,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hub = self.hub.upgrade().map(|h| h.name().to_owned());
        f.debug_struct("Subscription")
            .field("hub", &hub)
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            lock(&hub.inner).observers.retain(|(id, _)| *id != self.id);
        }
    }
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

/// One exporter's revocation state and the attachments of its buffers.
///
/// Cheap to share (`Arc`); an exporter keeps one and hands a clone to each
/// export. Its methods are what the exporter calls when it revokes
/// ([`revoke`](Self::revoke)), comes back ([`restore`](Self::restore)) or goes
/// away ([`close`](Self::close)).
pub struct RevocationHub {
    name: String,
    inner: Mutex<HubInner>,
    /// See [`RevocationHub::lock_transitions`].
    transitions: Mutex<()>,
    /// `HubInner::changes`, readable without the lock
    /// ([`RevocationHub::change_count`]).
    changes: AtomicU64,
}

/// What a hub tells each importer's hold on one of its buffers: an
/// iommufd [`Attachment`], or a DRM PRIME import (feature `drm`).
pub(crate) trait HubMember: Send + Sync {
    /// The exporter revoked: tear down, and tell the callbacks if it was
    /// live. `keep_dead` says the kernel has revoked already and the dead
    /// object may stay to keep its name (IOVA, GEM handle) reserved.
    /// Returns whether it was live.
    fn on_revoked(&self, reason: RevokeReason, keep_dead: bool) -> bool;
    /// What it does when the exporter is back.
    fn restore_policy(&self) -> RestorePolicy;
    /// Makes it usable again if it is revoked; `Ok` when it is live now.
    fn try_restore(&self) -> Result<()>;
}

struct HubInner {
    state: BufferState,
    attachments: Vec<Weak<dyn HubMember>>,
    revocations: u64,
    /// State changes so far (the `seq` of the last [`StateChange`]).
    changes: u64,
    observers: Vec<(u64, Observer)>,
    next_observer: u64,
}

impl HubInner {
    /// Sets the state; if it changed, returns the change and the observers to
    /// tell (called once the hub's lock is released). `mirror` is the hub's
    /// lock-free copy of the change count.
    fn set_state(
        &mut self,
        state: BufferState,
        mirror: &AtomicU64,
    ) -> Option<(StateChange, Vec<Observer>)> {
        if self.state == state {
            return None;
        }
        self.state = state;
        self.changes += 1;
        mirror.store(self.changes, Ordering::Release);
        let change = StateChange {
            state,
            seq: self.changes,
        };
        Some((
            change,
            self.observers.iter().map(|(_, o)| Arc::clone(o)).collect(),
        ))
    }
}

impl HubInner {
    /// [`HubInner::set_state`] for a hub with no observer to tell.
    fn set_state_quietly(&mut self, state: BufferState, mirror: &AtomicU64) {
        if self.state != state {
            self.state = state;
            self.changes += 1;
            mirror.store(self.changes, Ordering::Release);
        }
    }
}

/// Tells `observers` about `change`, if there was one.
fn tell(change: Option<(StateChange, Vec<Observer>)>) {
    if let Some((change, observers)) = change
        && !observers.is_empty()
    {
        let _inside = InCallback::enter();
        for o in observers {
            o(&change);
        }
    }
}

thread_local! {
    /// How deep this thread is in attachment callbacks and hub observers.
    static IN_CALLBACK: Cell<u32> = const { Cell::new(0) };
}

/// Marks this thread as running callbacks while it lives. Callbacks run on
/// the thread that revoked or restored, which holds the exporter's
/// transition lock ([`RevocationHub::lock_transitions`]): what they call must
/// not take it again.
pub(crate) struct InCallback;

impl InCallback {
    pub(crate) fn enter() -> Self {
        IN_CALLBACK.with(|d| d.set(d.get() + 1));
        Self
    }

    fn active() -> bool {
        IN_CALLBACK.with(Cell::get) > 0
    }
}

impl Drop for InCallback {
    fn drop(&mut self) {
        IN_CALLBACK.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

impl fmt::Debug for RevocationHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = lock(&self.inner);
        f.debug_struct("RevocationHub")
            .field("name", &self.name)
            .field("state", &inner.state)
            .field(
                "attachments",
                &inner
                    .attachments
                    .iter()
                    .filter(|w| w.strong_count() > 0)
                    .count(),
            )
            .finish()
    }
}

/// Locks a mutex, recovering from poisoning: every critical section here leaves
/// the state consistent, so a panic in a caller's callback must not wedge it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RevocationHub {
    /// A hub for the exporter called `name`, whose buffers are live.
    ///
    /// ```
    /// use dmabuf_p2p::revoke::{BufferState, RevocationHub};
    /// let hub = RevocationHub::new("0000:02:00.0");
    /// assert_eq!(hub.state(), BufferState::Live);
    /// ```
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            transitions: Mutex::new(()),
            changes: AtomicU64::new(0),
            inner: Mutex::new(HubInner {
                state: BufferState::Live,
                attachments: Vec::new(),
                revocations: 0,
                changes: 0,
                observers: Vec::new(),
                next_observer: 0,
            }),
        })
    }

    /// Serialises the exporter's state transitions with the attachments'
    /// own maps and restores. An exporter holds it from the moment it changes
    /// what the kernel does with its buffers (memory decode off or on, a
    /// reset) until it has told the hub ([`revoked_by_kernel`](Self::revoked_by_kernel),
    /// [`restore`](Self::restore)); [`Attachment::map`] and
    /// [`Attachment::restore`] hold it too. Without it, a restore that runs
    /// while another thread turns decode off fails after unmapping the dead
    /// area, and the freed IOVA can go to another mapping; and a map can land
    /// between a revoke and a restore it never hears of.
    /// [`VfioPciDevice`](crate::vfio::VfioPciDevice) takes it for
    /// every change of `PCI_COMMAND` and every reset.
    ///
    /// Attachment callbacks and hub observers run with it held (on the
    /// exporter's thread); [`Attachment::map`] and [`Attachment::restore`]
    /// called from one do not take it again.
    ///
    /// ```
    /// use dmabuf_p2p::revoke::{RevocationHub, RevokeReason};
    /// let hub = RevocationHub::new("dev");
    /// {
    ///     let _transition = hub.lock_transitions();
    ///     // ... turn the exporter's buffers off in the kernel, then:
    ///     hub.revoked_by_kernel(RevokeReason::MemoryDecodeOff);
    /// }
    /// ```
    pub fn lock_transitions(&self) -> MutexGuard<'_, ()> {
        lock(&self.transitions)
    }

    /// [`lock_transitions`](Self::lock_transitions) if no transition is
    /// under way, else `None` at once: for a thread that must never wait for
    /// the exporter, but reports its state only while no change of it is in
    /// progress (the sharing server's offers).
    pub fn try_lock_transitions(&self) -> Option<MutexGuard<'_, ()>> {
        match self.transitions.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// [`lock_transitions`](Self::lock_transitions), unless this thread is
    /// running callbacks (then the exporter's thread holds it already).
    pub(crate) fn lock_transitions_outside_callbacks(&self) -> Option<MutexGuard<'_, ()>> {
        (!InCallback::active()).then(|| self.lock_transitions())
    }

    /// The exporter's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current state.
    pub fn state(&self) -> BufferState {
        lock(&self.inner).state
    }

    /// How many times the buffers were revoked.
    pub fn revocations(&self) -> u64 {
        lock(&self.inner).revocations
    }

    /// The current state with the number of the change that made it (0 if
    /// the hub never changed), read together.
    pub fn last_change(&self) -> StateChange {
        let inner = lock(&self.inner);
        StateChange {
            state: inner.state,
            seq: inner.changes,
        }
    }

    /// The number of the hub's last change ([`StateChange::seq`]), read
    /// without the hub's lock: a cheap way to see whether anything changed
    /// since a number was taken.
    ///
    /// ```
    /// use dmabuf_p2p::revoke::{RevocationHub, RevokeReason};
    /// let hub = RevocationHub::new("dev");
    /// let before = hub.change_count();
    /// hub.revoke(RevokeReason::Reset);
    /// assert_eq!(hub.change_count(), before + 1);
    /// ```
    #[inline]
    pub fn change_count(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Calls `f` after every change of the hub's [`state`](Self::state)
    /// (revoked, restored, gone, or a revoked hub's reason changing), until
    /// the returned [`Subscription`] is dropped: the way to follow an exporter
    /// without an attachment (e.g. to forward its revocations to another
    /// process, `dmabuf_p2p::share`).
    ///
    /// `f` runs on the thread that changed the state, after the hub's
    /// attachments were torn down or restored, with no lock of the hub held
    /// (it may call the hub). Calls for concurrent changes may overlap or
    /// arrive out of order; [`StateChange::seq`] orders them.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use dmabuf_p2p::revoke::{BufferState, RevocationHub, RevokeReason};
    ///
    /// let hub = RevocationHub::new("dev");
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = Arc::clone(&seen);
    /// let sub = hub.subscribe(move |change| log.lock().unwrap().push(change.state));
    /// hub.revoke(RevokeReason::MemoryDecodeOff);
    /// hub.restore();
    /// hub.restore(); // no change, no call
    /// drop(sub);
    /// hub.revoke(RevokeReason::Reset); // unsubscribed
    /// assert_eq!(*seen.lock().unwrap(), [BufferState::Revoked(RevokeReason::MemoryDecodeOff), BufferState::Live]);
    /// ```
    pub fn subscribe(
        self: &Arc<Self>,
        f: impl Fn(&StateChange) + Send + Sync + 'static,
    ) -> Subscription {
        let mut inner = lock(&self.inner);
        let id = inner.next_observer;
        inner.next_observer += 1;
        inner.observers.push((id, Arc::new(f)));
        Subscription {
            hub: Arc::downgrade(self),
            id,
        }
    }

    /// The attachments still alive.
    pub fn attachment_count(&self) -> usize {
        lock(&self.inner)
            .attachments
            .iter()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    fn live_attachments(inner: &mut HubInner) -> Vec<Arc<dyn HubMember>> {
        inner.attachments.retain(|w| w.strong_count() > 0);
        inner.attachments.iter().filter_map(Weak::upgrade).collect()
    }

    /// The exporter has revoked its buffers: every attachment unmaps its IOVA
    /// range and is told. Returns how many attachments were torn down.
    ///
    /// A permanent `reason` ([`RevokeReason::is_permanent`]) makes the hub
    /// [`BufferState::Gone`]. Revoking a revoked hub only updates the reason.
    ///
    /// ```
    /// use dmabuf_p2p::revoke::{BufferState, RevocationHub, RevokeReason};
    /// let hub = RevocationHub::new("dev");
    /// hub.revoke(RevokeReason::MemoryDecodeOff);
    /// assert_eq!(hub.state(), BufferState::Revoked(RevokeReason::MemoryDecodeOff));
    /// ```
    pub fn revoke(&self, reason: RevokeReason) -> usize {
        self.revoke_with(reason, false)
    }

    /// Like [`revoke`](Self::revoke), for when the **kernel** has already
    /// revoked the buffers (memory decode went off, a reset ran): their IOMMU
    /// entries are gone, so DMA to the attachments' IOVAs faults already.
    /// Attachments then keep their dead areas until they are restored
    /// (unmapped and mapped again) or dropped, which keeps their IOVAs
    /// reserved: no mapping placed automatically in the same IOAS meanwhile
    /// can take one and make the restore fail. A permanent `reason` unmaps at
    /// once, as [`revoke`](Self::revoke) does.
    ///
    /// Call it only when the kernel has revoked: a live area kept this way
    /// would still let DMA through.
    ///
    /// ```
    /// use dmabuf_p2p::revoke::{BufferState, RevocationHub, RevokeReason};
    /// let hub = RevocationHub::new("dev");
    /// hub.revoked_by_kernel(RevokeReason::Reset);
    /// assert_eq!(hub.state(), BufferState::Revoked(RevokeReason::Reset));
    /// ```
    pub fn revoked_by_kernel(&self, reason: RevokeReason) -> usize {
        self.revoke_with(reason, true)
    }

    fn revoke_with(&self, reason: RevokeReason, kernel_revoked: bool) -> usize {
        let keep_dead_area = kernel_revoked && !reason.is_permanent();
        let (atts, change) = {
            let mut inner = lock(&self.inner);
            if matches!(inner.state, BufferState::Gone(_)) {
                return 0;
            }
            if inner.state == BufferState::Live {
                inner.revocations += 1;
            }
            let state = if reason.is_permanent() {
                BufferState::Gone(reason)
            } else {
                BufferState::Revoked(reason)
            };
            if inner.attachments.is_empty() && inner.observers.is_empty() {
                // Nobody to tell (a VMM's map keeps its own areas): the state
                // alone, without building the lists.
                inner.set_state_quietly(state, &self.changes);
                return 0;
            }
            let change = inner.set_state(state, &self.changes);
            (Self::live_attachments(&mut inner), change)
        };
        let n = atts
            .iter()
            .filter(|a| a.on_revoked(reason, keep_dead_area))
            .count();
        tell(change);
        n
    }

    /// The exporter's buffers are usable again: attachments with
    /// [`RestorePolicy::Automatic`] map again. Returns how many were restored.
    /// Does nothing once the hub is [`BufferState::Gone`].
    pub fn restore(&self) -> usize {
        let (atts, change) = {
            let mut inner = lock(&self.inner);
            let change = match inner.state {
                BufferState::Gone(_) => return 0,
                BufferState::Live => None,
                BufferState::Revoked(_)
                    if inner.attachments.is_empty() && inner.observers.is_empty() =>
                {
                    inner.set_state_quietly(BufferState::Live, &self.changes);
                    return 0;
                }
                BufferState::Revoked(_) => inner.set_state(BufferState::Live, &self.changes),
            };
            (Self::live_attachments(&mut inner), change)
        };
        let n = atts
            .iter()
            .filter(|a| a.restore_policy() == RestorePolicy::Automatic && a.try_restore().is_ok())
            .count();
        tell(change);
        n
    }

    /// The exporter is gone for good (closed, unplugged).
    pub fn close(&self, reason: RevokeReason) -> usize {
        let reason = if reason.is_permanent() {
            reason
        } else {
            RevokeReason::DeviceClosed
        };
        self.revoke(reason)
    }

    pub(crate) fn register(&self, member: Weak<dyn HubMember>) {
        let mut inner = lock(&self.inner);
        // Forget dropped attachments here too, or a hub that is never revoked
        // would keep one entry per attachment ever made.
        inner.attachments.retain(|w| w.strong_count() > 0);
        inner.attachments.push(member);
    }
}

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
    callbacks: Mutex<Vec<Callback>>,
}

struct AttState {
    mapping: IoasMapping,
    revoked: Option<RevokeReason>,
    revocations: u64,
    restores: u64,
    last_error: Option<String>,
}

impl fmt::Debug for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.core.state);
        f.debug_struct("Attachment")
            .field("info", &self.core.info)
            .field("revoked", &st.revoked)
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
                revoked: None,
                revocations: 0,
                restores: 0,
                last_error: None,
            }),
            callbacks: Mutex::new(Vec::new()),
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
        lock(&self.core.state).revoked.is_some()
    }

    /// Why the mapping is revoked, if it is.
    pub fn revoked_reason(&self) -> Option<RevokeReason> {
        lock(&self.core.state).revoked
    }

    /// How many times the mapping was revoked and restored.
    pub fn counts(&self) -> (u64, u64) {
        let st = lock(&self.core.state);
        (st.revocations, st.restores)
    }

    /// The last restore error, if a restore failed.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.core.state).last_error.clone()
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
        lock(&self.core.callbacks).push(Arc::new(f));
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
            if result.is_ok() {
                st.revoked = None;
            } else if !st.mapping.is_mapped() && st.revoked.is_none() {
                // Unmapped by the failed remap: not live, whatever the error.
                st.revoked = Some(RevokeReason::External);
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

    fn notify(&self, ev: &RevocationEvent) {
        // Call without the lock, so a callback may register another.
        let cbs: Vec<Callback> = lock(&self.callbacks).clone();
        let _inside = InCallback::enter();
        for cb in cbs {
            cb(&self.info, ev);
        }
    }

    /// Tears the mapping down; returns whether it was live before. With
    /// `keep_dead_area` (the kernel has revoked the area already) the area
    /// stays, reserving the IOVA; otherwise it is unmapped.
    fn on_revoked(&self, reason: RevokeReason, keep_dead_area: bool) -> bool {
        let was_live = {
            let mut st = lock(&self.state);
            let was_live = st.revoked.is_none();
            if was_live {
                st.revocations += 1;
            }
            st.revoked = Some(reason);
            // Unmapping cannot fail for a revoked dma-buf area; a failure
            // leaves it for the restore's remap or for drop.
            if !keep_dead_area
                && st.mapping.is_mapped()
                && let Err(e) = st.mapping.unmap()
            {
                st.last_error = Some(format!("unmap after revoke: {e}"));
            }
            was_live
        };
        if was_live {
            self.notify(&RevocationEvent::Revoked(reason));
        }
        was_live
    }

    /// Maps again at the same IOVA, right after the attachment was made, for
    /// a revocation that happened while it was being made (the new area may
    /// be dead). Nobody has heard of the attachment yet, so there is no
    /// event; a failure leaves it revoked with the error recorded.
    fn remap_unheard(&self) {
        let mut st = lock(&self.state);
        if st.revoked.is_none()
            && let Err(e) = st.mapping.remap()
        {
            st.revoked = Some(RevokeReason::External);
            st.revocations += 1;
            st.last_error = Some(format!("remap after a revocation during the map: {e}"));
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
            if st.revoked.is_none() {
                return Ok(());
            }
            match st.mapping.remap() {
                Ok(()) => {
                    st.revoked = None;
                    st.restores += 1;
                    st.last_error = None;
                    (RevocationEvent::Restored, Ok(()))
                }
                Err(e) => {
                    let msg = e.to_string();
                    st.last_error = Some(msg.clone());
                    (RevocationEvent::RestoreFailed(msg), Err(e))
                }
            }
        };
        self.notify(&ev);
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
