//! What a [`ShareServer`](super::ShareServer) tells its log, and how that
//! never holds up serving: events are rate-limited where a peer can cause
//! them in bulk, queued (bounded; what does not fit is counted, not waited
//! for), and handed to the caller's function on a thread of their own, so a
//! log that blocks (a full pipe, a stopped terminal) delays no message to any
//! client.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::RefusalReason;
use super::peer::PeerCred;
use crate::{Error, Result};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a [`ShareServer`](super::ShareServer) tells its log
/// ([`ShareServer::set_log`](super::ShareServer::set_log)). The kinds a peer
/// can cause in bulk (`Connected`, `Refused`, `Dropped`, `AcceptFailed`) are
/// rate-limited: a burst of 20, then 5 a second; each says how many of its
/// kind were not shown before it, and a [`ServerEvent::Suppressed`] tells
/// the rest once things are quiet.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerEvent {
    /// A client was admitted and will be offered the buffer.
    Connected {
        /// Its id.
        id: u64,
        /// Who it is.
        peer: PeerCred,
        /// Clients served now.
        clients: usize,
        /// Connections not reported before this one.
        suppressed: u64,
    },
    /// A connection was turned away; it was told why (a `refused` message)
    /// and closed, and nothing else was sent to it.
    Refused {
        /// Who it was, if the kernel said.
        peer: Option<PeerCred>,
        /// Why, as a kind.
        reason: RefusalReason,
        /// Why, in words.
        why: String,
        /// Refusals not reported before this one.
        suppressed: u64,
    },
    /// A client was dropped.
    Dropped {
        /// Its id.
        id: u64,
        /// Who it was.
        peer: PeerCred,
        /// The reason it was told (a `refused` message), if the server
        /// dropped it; `None` when it hung up or was told `gone`.
        reason: Option<RefusalReason>,
        /// Why, in words.
        why: String,
        /// Drops not reported before this one.
        suppressed: u64,
    },
    /// `accept` failed (e.g. `EMFILE`: the fd table is full); the server
    /// backs off before it tries again.
    AcceptFailed {
        /// The error.
        error: String,
        /// How long the server waits before accepting again.
        backoff: Duration,
        /// Failures not reported before this one.
        suppressed: u64,
    },
    /// Events of one kind that the rate limit kept back and no later event
    /// of that kind has reported (sent once that kind has been quiet for a
    /// second).
    Suppressed {
        /// The kind: `"connected"`, `"refused"`, `"dropped"` or
        /// `"accept-failed"`.
        what: &'static str,
        /// How many.
        count: u64,
    },
    /// Events the log's queue had no room for, because the log function
    /// did not keep up (it blocked, or was slow): they are lost.
    LogLost {
        /// How many.
        count: u64,
    },
}

impl fmt::Display for ServerEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let more = |n: u64| {
            if n > 0 {
                format!(" ({n} more not shown)")
            } else {
                String::new()
            }
        };
        match self {
            Self::Connected {
                id,
                peer,
                clients,
                suppressed,
            } => write!(
                f,
                "client {id} ({peer}) connected; {clients} connected{}",
                more(*suppressed)
            ),
            Self::Refused {
                peer,
                reason,
                why,
                suppressed,
            } => match peer {
                Some(p) => write!(f, "refused {p} ({reason}): {why}{}", more(*suppressed)),
                None => write!(
                    f,
                    "refused a connection ({reason}): {why}{}",
                    more(*suppressed)
                ),
            },
            Self::Dropped {
                id,
                peer,
                reason,
                why,
                suppressed,
            } => {
                let told = reason.map_or(String::new(), |r| format!(" ({r})"));
                write!(
                    f,
                    "client {id} ({peer}) dropped{told}: {why}{}",
                    more(*suppressed)
                )
            }
            Self::AcceptFailed {
                error,
                backoff,
                suppressed,
            } => write!(
                f,
                "accept: {error}; retrying in {backoff:?}{}",
                more(*suppressed)
            ),
            Self::Suppressed { what, count } => {
                write!(f, "{count} more {what} events not shown (rate limit)")
            }
            Self::LogLost { count } => {
                write!(f, "{count} log events lost: the log did not keep up")
            }
        }
    }
}

/// The kinds of event a peer can cause in bulk, each rate-limited on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Churn {
    Connected,
    Refused,
    Dropped,
    AcceptFailed,
}

impl Churn {
    const ALL: [Self; 4] = [
        Self::Connected,
        Self::Refused,
        Self::Dropped,
        Self::AcceptFailed,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Refused => "refused",
            Self::Dropped => "dropped",
            Self::AcceptFailed => "accept-failed",
        }
    }
}

/// A token bucket: [`BURST`](Self::BURST) events at once, then
/// [`PER_SECOND`](Self::PER_SECOND); the rest are counted.
#[derive(Debug, Default)]
pub(super) struct RateLimit {
    tokens: u32,
    /// When the bucket was last topped up (`None`: never used, full).
    refilled: Option<Instant>,
    suppressed: u64,
    /// When an event of this kind, or the count of the suppressed ones, was
    /// last reported.
    reported: Option<Instant>,
}

impl RateLimit {
    pub(super) const BURST: u32 = 20;
    pub(super) const PER_SECOND: u32 = 5;
    const QUIET: Duration = Duration::from_secs(1);

    fn refill(&mut self, now: Instant) {
        let Some(at) = self.refilled else {
            self.tokens = Self::BURST;
            self.refilled = Some(now);
            return;
        };
        let step = Duration::from_secs(1) / Self::PER_SECOND;
        let steps = now.saturating_duration_since(at).as_nanos() / step.as_nanos();
        if steps > 0 {
            let add = u32::try_from(steps).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(add).min(Self::BURST);
            // Whole steps only, so no fraction of a token is lost.
            self.refilled = Some(if self.tokens == Self::BURST {
                now
            } else {
                at + step * add
            });
        }
    }

    /// `Some(suppressed so far)` if this event may be reported.
    pub(super) fn allow(&mut self, now: Instant) -> Option<u64> {
        self.refill(now);
        if self.tokens > 0 {
            self.tokens -= 1;
            self.reported = Some(now);
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// The count of suppressed events once none has been reported for a
    /// second (then it is reset).
    fn overdue(&mut self, now: Instant) -> Option<u64> {
        let due = self.due()?;
        if now < due {
            return None;
        }
        self.reported = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// When [`overdue`](Self::overdue) will have something to say.
    fn due(&self) -> Option<Instant> {
        if self.suppressed == 0 {
            return None;
        }
        Some(
            self.reported
                .and_then(|r| r.checked_add(Self::QUIET))
                .unwrap_or_else(Instant::now),
        )
    }
}

/// One [`RateLimit`] per kind of [`Churn`].
#[derive(Debug, Default)]
pub(super) struct Limits([RateLimit; 4]);

impl Limits {
    pub(super) fn allow(&mut self, kind: Churn, now: Instant) -> Option<u64> {
        self.0[kind as usize].allow(now)
    }

    /// The [`ServerEvent::Suppressed`] events due now.
    pub(super) fn overdue(&mut self, now: Instant) -> Vec<ServerEvent> {
        Churn::ALL
            .into_iter()
            .filter_map(|k| {
                self.0[k as usize]
                    .overdue(now)
                    .map(|count| ServerEvent::Suppressed {
                        what: k.name(),
                        count,
                    })
            })
            .collect()
    }

    /// When the next [`overdue`](Self::overdue) is due.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.0.iter().filter_map(RateLimit::due).min()
    }
}

type Logger = dyn Fn(&ServerEvent) + Send + Sync;

/// Events waiting for the log thread.
#[derive(Default)]
struct Queue {
    events: VecDeque<ServerEvent>,
    lost: u64,
    f: Option<Arc<Logger>>,
    thread: bool,
    stop: bool,
}

/// The bounded queue between the serving thread and the log function, and
/// the thread that calls it. It holds nothing of the server (no fd), so a
/// log function that never returns keeps only itself alive.
#[derive(Default)]
pub(super) struct EventLog {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl EventLog {
    /// The most events waiting; beyond, they are counted as lost.
    pub(super) const CAPACITY: usize = 256;

    /// Sets the function the log thread calls (starting that thread).
    pub(super) fn set(self: &Arc<Self>, f: Arc<Logger>) -> Result<()> {
        let start = {
            let mut q = lock(&self.queue);
            q.f = Some(f);
            !std::mem::replace(&mut q.thread, true)
        };
        if start {
            let log = Arc::clone(self);
            if let Err(e) = std::thread::Builder::new()
                .name("share-log".into())
                .spawn(move || log.run())
            {
                lock(&self.queue).thread = false;
                return Err(Error::sys("spawn thread", "share server log", e));
            }
        }
        Ok(())
    }

    /// Queues `event` without waiting: dropped (and counted) if the queue
    /// is full, ignored if there is no log.
    pub(super) fn push(&self, event: ServerEvent) {
        let mut q = lock(&self.queue);
        if q.f.is_none() || q.stop {
            return;
        }
        if q.events.len() >= Self::CAPACITY {
            q.lost += 1;
            return;
        }
        q.events.push_back(event);
        self.changed.notify_all();
    }

    /// Stops the log thread once it has delivered what is queued; waits up
    /// to `drain` for that, never longer (a log function may be stuck).
    pub(super) fn stop(&self, drain: Duration) {
        let deadline = Instant::now().checked_add(drain);
        let mut q = lock(&self.queue);
        q.stop = true;
        self.changed.notify_all();
        while q.thread && !q.events.is_empty() {
            let left = deadline.map_or(drain, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                break;
            }
            q = self
                .changed
                .wait_timeout(q, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn run(&self) {
        loop {
            let (f, lost, event) = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some(e) = q.events.pop_front() {
                        break (q.f.clone(), std::mem::take(&mut q.lost), e);
                    }
                    if q.stop {
                        q.thread = false;
                        self.changed.notify_all();
                        return;
                    }
                    q = self.changed.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
            };
            self.changed.notify_all();
            if let Some(f) = f {
                if lost > 0 {
                    f(&ServerEvent::LogLost { count: lost });
                }
                f(&event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_counts_what_it_hides() {
        let mut r = RateLimit::default();
        let t = Instant::now();
        let shown = (0..100).filter(|_| r.allow(t).is_some()).count();
        assert_eq!(shown, RateLimit::BURST as usize);
        // Quiet for a second: the rest is due as a count.
        assert_eq!(r.overdue(t + Duration::from_millis(500)), None);
        assert_eq!(r.overdue(t + Duration::from_secs(1)), Some(80));
        assert_eq!(r.overdue(t + Duration::from_secs(5)), None);
        // Refilled at PER_SECOND: after 2 s, 10 more pass.
        let later = t + Duration::from_secs(2);
        let shown = (0..100).filter(|_| r.allow(later).is_some()).count();
        assert_eq!(shown, 2 * RateLimit::PER_SECOND as usize);
        assert_eq!(r.allow(later + Duration::from_secs(1)), Some(90));
    }

    #[test]
    fn a_stuck_log_loses_events_but_never_blocks() {
        let log = Arc::new(EventLog::default());
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new(gate_rx);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = Arc::clone(&seen);
        let set = log.set(Arc::new(move |e: &ServerEvent| {
            // The first event blocks until the test opens the gate.
            let _ = lock(&gate).recv();
            lock(&s).push(e.clone());
        }));
        assert!(set.is_ok());
        let t = Instant::now();
        let n = EventLog::CAPACITY as u64 + 100;
        for count in 0..n {
            log.push(ServerEvent::Suppressed {
                what: "test",
                count,
            });
        }
        assert!(t.elapsed() < Duration::from_secs(5), "pushing waited");
        drop(gate_tx);
        log.stop(Duration::from_secs(10));
        let seen = lock(&seen).clone();
        let lost: u64 = seen
            .iter()
            .filter_map(|e| match e {
                ServerEvent::LogLost { count } => Some(*count),
                _ => None,
            })
            .sum();
        let delivered = seen.len()
            - seen
                .iter()
                .filter(|e| matches!(e, ServerEvent::LogLost { .. }))
                .count();
        // The log thread took the first before the queue filled, or not yet.
        assert!((99..=100).contains(&lost), "{lost} reported lost");
        assert_eq!(delivered as u64 + lost, n, "{seen:?}");
    }
}
