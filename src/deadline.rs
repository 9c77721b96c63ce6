//! Deadlines from caller-given timeouts: `Instant + Duration` panics on
//! overflow, and a caller may well pass `Duration::MAX` for "no limit".

use std::time::{Duration, Instant};

/// The longest wait a deadline stands for: a century, far past any real
/// wait and far inside what `Instant` can hold.
const LONGEST: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// The instant `timeout` from now, with timeouts beyond a century taken
/// as a century (never a panic).
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout.min(LONGEST)).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_timeouts_do_not_panic() {
        let far = deadline_after(Duration::MAX);
        assert!(far > Instant::now() + Duration::from_secs(365 * 24 * 60 * 60));
    }

    #[test]
    fn ordinary_timeouts_are_exact_enough() {
        let before = Instant::now();
        let d = deadline_after(Duration::from_secs(5));
        assert!(d >= before + Duration::from_secs(5));
        assert!(d <= Instant::now() + Duration::from_secs(5));
    }
}
