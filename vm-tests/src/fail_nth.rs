//! Allocation-failure injection for the sweeps in `tests/vm/fault_injection.rs`.
//!
//! The test kernel has failslab, fail_page_alloc and iommufd's own
//! `fail_iommufd` (see docs/KERNEL.md). Writing N to
//! `/proc/thread-self/fail-nth` makes the Nth fault-injectable call of *this
//! thread* fail, whatever the `probability` (which stays 0, so nothing else in
//! the VM is failed): `should_fail_ex()` in lib/fault-inject.c counts the
//! thread's calls down before looking at any other setting. Reading the file
//! back gives 0 when the failure was injected, the remaining count when the
//! call made fewer than N fault-injectable calls.
//!
//! failslab and fail_page_alloc skip allocations that may sleep
//! (`ignore-gfp-wait`, default Y) and fail_page_alloc skips order 0
//! (`min-order`, default 1) *before* counting, so [`FailNth::open`] sets
//! `ignore-gfp-wait` to N and `min-order` to 0: every GFP_KERNEL slab and page
//! allocation of the call counts. `ignore-gfp-highmem` stays Y: those are user
//! pages (the test process's own page faults), and failing them would make the
//! harness, not the call under test, fail. `verbose` is 0: a stack dump per
//! injected failure would flood the console (and cost seconds under TCG).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

const DEBUGFS: &str = "/sys/kernel/debug";

/// The debugfs settings the sweeps need, as (file, value).
const SETTINGS: &[(&str, &str)] = &[
    ("failslab/ignore-gfp-wait", "N"),
    ("failslab/verbose", "0"),
    ("fail_page_alloc/ignore-gfp-wait", "N"),
    ("fail_page_alloc/min-order", "0"),
    ("fail_page_alloc/verbose", "0"),
    ("fail_iommufd/verbose", "0"),
];

/// This thread's `fail-nth`, with the fault attributes set up for it.
#[derive(Debug)]
pub struct FailNth {
    file: File,
}

impl FailNth {
    /// Configures failslab and fail_page_alloc (see the module docs) and opens
    /// `/proc/thread-self/fail-nth`. Only the calling thread can be armed.
    pub fn open() -> io::Result<Self> {
        for (file, value) in SETTINGS {
            let path = format!("{DEBUGFS}/{file}");
            std::fs::write(&path, value)
                .map_err(|e| io::Error::new(e.kind(), format!("writing {value} to {path}: {e}")))?;
        }
        for attr in ["failslab", "fail_page_alloc", "fail_iommufd"] {
            let path = format!("{DEBUGFS}/{attr}/probability");
            let p = std::fs::read_to_string(&path)?;
            if p.trim() != "0" {
                return Err(io::Error::other(format!(
                    "{path} is {}: something else injects failures VM-wide",
                    p.trim()
                )));
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/proc/thread-self/fail-nth")?;
        let me = Self { file };
        me.prove()?;
        Ok(me)
    }

    /// Checks that injection works: opening a file allocates in the kernel
    /// (the path name, the `struct file`), so with the first such allocation
    /// failing it must fail with ENOMEM, and the read-back must say so. A sweep
    /// that finds nothing to inject then means the call allocates nothing.
    fn prove(&self) -> io::Result<()> {
        let (opened, fired) = self.run(1, || File::open("/dev/null"));
        match opened {
            Err(e) if fired && e.raw_os_error() == Some(libc::ENOMEM) => Ok(()),
            other => Err(io::Error::other(format!(
                "fail-nth does not work: open(/dev/null) with its first allocation failing gave {other:?} (injected: {fired})"
            ))),
        }
    }

    /// Fails the `n`th (1-based) fault-injectable call this thread makes
    /// from now on.
    pub fn arm(&self, n: u32) -> io::Result<()> {
        self.file.write_at(n.to_string().as_bytes(), 0).map(|_| ())
    }

    /// Disarms and returns whether the armed failure was injected.
    pub fn disarm(&self) -> io::Result<bool> {
        let mut buf = [0u8; 16];
        let len = self.file.read_at(&mut buf, 0)?;
        let text = std::str::from_utf8(&buf[..len]).unwrap_or("").trim();
        let left: u32 = text
            .parse()
            .map_err(|_| io::Error::other(format!("fail-nth reads {text:?}")))?;
        self.file.write_at(b"0", 0)?;
        Ok(left == 0)
    }

    /// Runs `op` with the `n`th fault-injectable call failing; returns its
    /// result and whether the failure was injected.
    pub fn run<T>(&self, n: u32, op: impl FnOnce() -> T) -> (T, bool) {
        if let Err(e) = self.arm(n) {
            panic!("arming fail-nth with {n}: {e}");
        }
        let out = op();
        match self.disarm() {
            Ok(fired) => (out, fired),
            Err(e) => panic!("reading fail-nth back: {e}"),
        }
    }
}

impl Drop for FailNth {
    fn drop(&mut self) {
        let _ = self.file.write_at(b"0", 0);
    }
}

/// Which N a sweep tries: every N up to `dense`, then N grows by an eighth
/// each step (at least 1), up to `limit`. A call with K fault-injectable
/// calls is tried at all of them when K <= `dense`.
pub fn sweep_points(dense: u32, limit: u32) -> impl Iterator<Item = u32> {
    std::iter::successors(Some(1u32), move |&n| {
        let next = if n < dense { n + 1 } else { n + (n / 8).max(1) };
        (next <= limit).then_some(next)
    })
}

/// What a sweep saw.
#[derive(Debug, Default, Clone)]
pub struct SweepLog {
    /// The N tried, in order.
    pub tried: Vec<u32>,
    /// Injected failures the call reported as an error: (N, errno).
    pub failed: Vec<(u32, Option<i32>)>,
    /// Injected failures the call absorbed (it succeeded anyway).
    pub absorbed: Vec<u32>,
    /// The first N at which nothing was injected (the call makes fewer
    /// fault-injectable calls), if the sweep got there.
    pub clean_at: Option<u32>,
}

impl SweepLog {
    /// One line for the test output.
    pub fn summary(&self, what: &str) -> String {
        let mut errnos: Vec<String> = self
            .failed
            .iter()
            .map(|(_, e)| e.map_or("no errno".to_owned(), |e| format!("errno {e}")))
            .collect();
        errnos.sort();
        errnos.dedup();
        format!(
            "{what}: tried {} points ({}), {} failed with a typed error [{}], {} absorbed, uninjected at N={}{}",
            self.tried.len(),
            match (self.tried.first(), self.tried.last()) {
                (Some(a), Some(b)) => format!("N={a}..={b}"),
                _ => "none".into(),
            },
            self.failed.len(),
            errnos.join(", "),
            self.absorbed.len(),
            self.clean_at
                .map_or("never (limit reached)".into(), |n| n.to_string()),
            if self.clean_at == Some(1) {
                " (the call makes no fault-injectable kernel call in this thread)"
            } else {
                ""
            },
        )
    }
}
