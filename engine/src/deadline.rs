//! When a caller-given timeout ends. `Instant + Duration` panics on
//! overflow, and a caller may well pass `Duration::MAX` for "no limit".

use std::time::{Duration, Instant};

/// The end of a wait: `None` when the timeout reaches past what `Instant`
/// can hold, which is never.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline(Option<Instant>);

impl Deadline {
    /// `timeout` from now.
    pub(crate) fn after(timeout: Duration) -> Self {
        Self(Instant::now().checked_add(timeout))
    }

    /// The time left (zero once it has passed).
    pub(crate) fn left(self) -> Duration {
        self.0.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        })
    }

    /// Whether it has passed.
    pub(crate) fn passed(self) -> bool {
        self.0.is_some_and(|d| Instant::now() > d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_limit_never_passes() {
        let d = Deadline::after(Duration::MAX);
        assert!(!d.passed());
        assert!(d.left() > Duration::from_secs(365 * 24 * 3600));
    }

    #[test]
    fn a_short_wait_passes() {
        let d = Deadline::after(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert!(d.passed());
        assert_eq!(d.left(), Duration::ZERO);
    }
}
