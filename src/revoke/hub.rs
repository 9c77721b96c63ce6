//! [`RevocationHub`]: one exporter's revocation state, its observers and the
//! importers' holds it tells.

use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::*;
use crate::error::Result;

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
    #[inline]
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
    #[inline]
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
    #[inline]
    pub fn revoked_by_kernel(&self, reason: RevokeReason) -> usize {
        self.revoke_with(reason, true)
    }

    #[inline]
    fn revoke_with(&self, reason: RevokeReason, kernel_revoked: bool) -> usize {
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
            // alone, without building the lists; inline in the trap path.
            inner.set_state_quietly(state, &self.changes);
            return 0;
        }
        self.revoke_members(inner, state, reason, kernel_revoked)
    }

    /// [`revoke_with`](Self::revoke_with) for a hub with attachments or
    /// observers to tell, its lock held by `inner`.
    #[inline(never)]
    fn revoke_members(
        &self,
        mut inner: MutexGuard<'_, HubInner>,
        state: BufferState,
        reason: RevokeReason,
        kernel_revoked: bool,
    ) -> usize {
        let keep_dead_area = kernel_revoked && !reason.is_permanent();
        let (atts, change) = {
            let change = inner.set_state(state, &self.changes);
            let atts = Self::live_attachments(&mut inner);
            drop(inner);
            (atts, change)
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
    #[inline]
    pub fn restore(&self) -> usize {
        let mut inner = lock(&self.inner);
        let change = match inner.state {
            BufferState::Gone(_) => return 0,
            BufferState::Live => None,
            BufferState::Revoked(_)
                if inner.attachments.is_empty() && inner.observers.is_empty() =>
            {
                // Nobody to tell: inline in the trap path.
                inner.set_state_quietly(BufferState::Live, &self.changes);
                return 0;
            }
            BufferState::Revoked(_) => inner.set_state(BufferState::Live, &self.changes),
        };
        self.restore_members(inner, change)
    }

    /// [`restore`](Self::restore) for a hub with attachments or observers,
    /// its lock held by `inner`.
    #[inline(never)]
    fn restore_members(
        &self,
        mut inner: MutexGuard<'_, HubInner>,
        change: Option<(StateChange, Vec<Observer>)>,
    ) -> usize {
        let atts = Self::live_attachments(&mut inner);
        drop(inner);
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
