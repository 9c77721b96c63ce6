//! What every kind of hub member (an iommufd [`Attachment`](super::Attachment),
//! a DRM `GemImport`) keeps of its revocations, and its event listeners: one
//! home, so that their counts and events mean the same.

use std::sync::{Arc, Mutex};

use super::{InCallback, RevocationEvent, RevokeReason, lock};
use crate::error::Result;

/// A member's revocation record: why it is revoked, if it is, and its counts.
#[derive(Debug, Default)]
pub(crate) struct RevocationRecord {
    revoked: Option<RevokeReason>,
    revocations: u64,
    restores: u64,
    last_error: Option<String>,
}

impl RevocationRecord {
    /// Why the member is revoked, if it is.
    pub(crate) fn revoked(&self) -> Option<RevokeReason> {
        self.revoked
    }

    /// Revoked and restored counts.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.revocations, self.restores)
    }

    /// The last restore (or teardown) error.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error.clone()
    }

    /// Marks the member revoked for `reason`; returns whether it was live
    /// (only then is it a new revocation, counted and told).
    pub(crate) fn revoke(&mut self, reason: RevokeReason) -> bool {
        let was_live = self.revoked.is_none();
        if was_live {
            self.revocations += 1;
        }
        self.revoked = Some(reason);
        was_live
    }

    /// After an unmap and map outside the hub's revoke and restore (a
    /// refresh): live again, or, when the area is gone, revoked as
    /// [`External`](RevokeReason::External) if it was not already. No hub
    /// transition happened, so nothing is counted or told.
    pub(crate) fn refreshed(&mut self, live: bool) {
        if live {
            self.revoked = None;
        } else if self.revoked.is_none() {
            self.revoked = Some(RevokeReason::External);
        }
    }

    /// Keeps `error` as the last error.
    pub(crate) fn note_error(&mut self, error: String) {
        self.last_error = Some(error);
    }

    /// Takes a restore's outcome: live again, or still revoked with the
    /// error kept. Returns the event to tell the listeners and the outcome.
    pub(crate) fn settle_restore(&mut self, outcome: Result<()>) -> (RevocationEvent, Result<()>) {
        match outcome {
            Ok(()) => {
                self.revoked = None;
                self.restores += 1;
                self.last_error = None;
                (RevocationEvent::Restored, Ok(()))
            }
            Err(e) => {
                let msg = e.to_string();
                self.last_error = Some(msg.clone());
                (RevocationEvent::RestoreFailed(msg), Err(e))
            }
        }
    }
}

/// A listener of a member's revoke and restore events, given the member's
/// `I`nfo.
type Listener<I> = Arc<dyn Fn(&I, &RevocationEvent) + Send + Sync>;

/// A member's event listeners.
pub(crate) struct Listeners<I> {
    list: Mutex<Vec<Listener<I>>>,
}

impl<I> Default for Listeners<I> {
    fn default() -> Self {
        Self {
            list: Mutex::new(Vec::new()),
        }
    }
}

impl<I> Listeners<I> {
    pub(crate) fn push(&self, f: impl Fn(&I, &RevocationEvent) + Send + Sync + 'static) {
        lock(&self.list).push(Arc::new(f));
    }

    /// Calls every listener with `info` and `ev`, with no lock held, so that
    /// a listener may register another; the thread counts as in a callback.
    pub(crate) fn notify(&self, info: &I, ev: &RevocationEvent) {
        let listeners: Vec<Listener<I>> = lock(&self.list).clone();
        let _inside = InCallback::enter();
        for f in listeners {
            f(info, ev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn a_revocation_counts_once_and_a_restore_clears_it() {
        let mut r = RevocationRecord::default();
        assert!(r.revoke(RevokeReason::MemoryDecodeOff));
        assert!(!r.revoke(RevokeReason::Reset));
        assert_eq!(r.revoked(), Some(RevokeReason::Reset));
        assert_eq!(r.counts(), (1, 0));
        let failed = Error::Revoked {
            buffer: "test".into(),
            source: None,
        };
        let (ev, out) = r.settle_restore(Err(failed));
        assert!(matches!(ev, RevocationEvent::RestoreFailed(_)) && out.is_err());
        assert_eq!(r.revoked(), Some(RevokeReason::Reset));
        assert!(r.last_error().is_some());
        let (ev, out) = r.settle_restore(Ok(()));
        assert_eq!(ev, RevocationEvent::Restored);
        assert!(out.is_ok());
        assert_eq!(
            (r.revoked(), r.counts(), r.last_error()),
            (None, (1, 1), None)
        );
    }
}
