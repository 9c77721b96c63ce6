//! Output lines that never make the caller wait: `export --serve` prints
//! from the thread that revokes, and a stdout nobody reads (a full pipe, a
//! stopped terminal) must not hold that thread. Each line goes into a
//! bounded queue; a thread of its own writes them. When the queue is full
//! the line is dropped and counted, and once the writer gets through again
//! it says how many were lost, in one line.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Default)]
struct State {
    queue: VecDeque<String>,
    lost: u64,
    /// Since when the writer has been in one `write` (`None`: not writing).
    writing_since: Option<Instant>,
    /// The output failed (closed): lines are dropped from now on.
    broken: bool,
}

struct Inner {
    state: Mutex<State>,
    changed: Condvar,
    /// The line that reports `n` lost lines.
    lost_line: Box<dyn Fn(u64) -> String + Send + Sync>,
}

/// A non-blocking line printer for one output (stdout or stderr).
#[derive(Clone)]
pub(crate) struct Lines {
    inner: Arc<Inner>,
}

impl Lines {
    /// The most lines waiting; more are dropped and counted.
    pub(crate) const CAPACITY: usize = 256;
    /// A write blocked this long means nobody is reading: a flush stops
    /// waiting for it.
    const STALLED: Duration = Duration::from_millis(100);

    /// Lines to a duplicate of `fd` (so the writer owns what it writes to),
    /// `lost_line(n)` reporting lost ones.
    pub(crate) fn new(
        fd: impl AsFd,
        lost_line: impl Fn(u64) -> String + Send + Sync + 'static,
    ) -> io::Result<Self> {
        let out = File::from(fd.as_fd().try_clone_to_owned()?);
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            lost_line: Box::new(lost_line),
        });
        let writer = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("output".into())
            .spawn(move || write_lines(&writer, out))?;
        Ok(Self { inner })
    }

    /// Queues `line` without waiting; dropped (and counted) when the queue
    /// is full or the output is closed.
    pub(crate) fn line(&self, line: String) {
        let mut st = lock(&self.inner.state);
        if st.broken {
            return;
        }
        if st.queue.len() >= Self::CAPACITY {
            st.lost += 1;
            return;
        }
        st.queue.push_back(line);
        self.inner.changed.notify_all();
    }

    /// Waits up to `timeout` for every queued line to be written; gives up
    /// at once when a write has been blocked for a while (nobody reads).
    /// `true` if all was written.
    pub(crate) fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut st = lock(&self.inner.state);
        loop {
            if st.broken || (st.queue.is_empty() && st.writing_since.is_none()) {
                return !st.broken;
            }
            if st
                .writing_since
                .is_some_and(|t| t.elapsed() >= Self::STALLED)
            {
                return false;
            }
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return false;
            }
            st = self
                .inner
                .changed
                .wait_timeout(st, left.min(Self::STALLED))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The writer thread: blocking writes are fine here, and only here.
fn write_lines(inner: &Inner, mut out: File) {
    loop {
        let (line, lost) = {
            let mut st = lock(&inner.state);
            loop {
                if let Some(l) = st.queue.pop_front() {
                    st.writing_since = Some(Instant::now());
                    break (l, std::mem::take(&mut st.lost));
                }
                st = inner
                    .changed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let mut text = String::new();
        if lost > 0 {
            text.push_str(&(inner.lost_line)(lost));
            text.push('\n');
        }
        text.push_str(&line);
        text.push('\n');
        let written = out.write_all(text.as_bytes());
        let mut st = lock(&inner.state);
        st.writing_since = None;
        if written.is_err() {
            // Closed (EPIPE) or failing: nobody gets these lines.
            st.broken = true;
            st.queue.clear();
        }
        inner.changed.notify_all();
        if st.broken {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A pipe nobody reads: lines queue, then drop and count; nothing waits;
    /// once the reader reads, every queued line arrives, and the lost ones
    /// as counts.
    #[test]
    fn a_stalled_reader_never_blocks_the_caller() {
        let (r, w) = nix::unistd::pipe().unwrap_or_else(|e| panic!("{e}"));
        let lines = Lines::new(&w, |n| format!("lost {n}")).unwrap_or_else(|e| panic!("{e}"));
        drop(w);
        let long = "x".repeat(1000);
        let t = Instant::now();
        let n = 2000;
        for i in 0..n {
            lines.line(format!("{i} {long}"));
        }
        assert!(t.elapsed() < Duration::from_secs(5), "queueing waited");
        // The pipe (64 KiB) is full and a write is blocked: a flush gives up.
        std::thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        assert!(!lines.flush(Duration::from_secs(10)));
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        // Now read (for good: the writer keeps its end open).
        let text = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&text);
        std::thread::spawn(move || {
            let mut f = File::from(r);
            let mut buf = [0u8; 65536];
            while let Ok(k) = f.read(&mut buf) {
                if k == 0 {
                    break;
                }
                lock(&sink).push_str(&String::from_utf8_lossy(&buf[..k]));
            }
        });
        // The blocked write completes and the queue drains; until then a
        // flush gives up at once.
        let drained = |what: &str| {
            let t = Instant::now();
            while !lines.flush(Duration::from_secs(1)) {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "{what}: never drained"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        drained("the queue");
        // One more line, which also reports the last lost ones.
        lines.line("last".into());
        drained("the last line");
        let t = Instant::now();
        while !lock(&text).ends_with("last\n") {
            assert!(t.elapsed() < Duration::from_secs(30), "no last line");
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = lock(&text).clone();
        let written = text.lines().filter(|l| l.ends_with(&long)).count() as u64;
        let lost: u64 = text
            .lines()
            .filter_map(|l| l.strip_prefix("lost ")?.parse::<u64>().ok())
            .sum();
        assert!(lost > 0, "nothing was lost?");
        assert_eq!(written + lost, n, "{written} written, {lost} lost");
    }
}
