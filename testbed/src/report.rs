//! The guest's report, line by line, and the verdict on a run.
//!
//! The guest writes its report on its second serial port. Ordinary lines are
//! shown as they are (libtest's `test x ... ok` lines among them); lines starting
//! with `@@` are directives for the host:
//!
//! * `@@booted <uptime>`: init reached userspace and bound the devices;
//! * `@@host-check <shm> <offset> <len> fnv1a64=<hex>`: after the run, the host
//!   hashes that range of the device's backing file and compares;
//! * `@@qmp {json}`: run a QMP command now; the answer goes back to the guest
//!   as `@@qmp-reply {json}` on the same port;
//! * `@@screendump ...`, `@@qemu-log`: a virtio-gpu's screen, QEMU's new
//!   log lines, answered at once (`crate::screen`);
//! * `@@bench {json}`: one benchmark result (`cargo xtask bench`), kept as
//!   the JSON text;
//! * `@@exit <status>`: the guest job finished with this status.

use std::fmt;

/// The outcome of one libtest test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Passed.
    Ok,
    /// Failed.
    Failed,
    /// Ignored (counted, and fails a run that must not skip).
    Ignored,
}

/// A host-side check requested by the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCheck {
    /// ivshmem device id (`shm0`, ...).
    pub shm: String,
    /// Offset into the backing file.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// Expected FNV-1a 64 hash of the bytes.
    pub fnv1a64: u64,
}

impl fmt::Display for HostCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{:#x}+{:#x}", self.shm, self.offset, self.len)
    }
}

/// One parsed report line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `test NAME ... ok|FAILED|ignored`.
    Test(String, Outcome),
    /// `test NAME ... ` followed by the test's own output (a line it wrote
    /// straight to stdout): its outcome comes on a later line.
    Started(String),
    /// `ok`, `FAILED` or `ignored` alone on a line: the outcome of the test
    /// whose line the test's output split.
    Outcome(Outcome),
    /// `@@booted`.
    Booted,
    /// `@@host-check ...`.
    HostCheck(HostCheck),
    /// `@@exit N`.
    Exit(i32),
    /// `@@bench {json}`: a benchmark result, the JSON text as sent.
    Bench(String),
    /// A directive that could not be parsed.
    BadDirective(String),
    /// Anything else.
    Text,
}

fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses one report line.
pub fn parse_line(line: &str) -> Line {
    let line = line.trim_end_matches(['\r', '\n']);
    if let Some(rest) = line.strip_prefix("@@") {
        let mut words = rest.split_whitespace();
        return match words.next() {
            Some("booted") => Line::Booted,
            // Answered by the streaming loop as they arrive.
            Some("qmp" | "screendump" | "qemu-log") => Line::Text,
            Some("exit") => match words.next().and_then(|w| w.parse().ok()) {
                Some(n) => Line::Exit(n),
                None => Line::BadDirective(line.to_owned()),
            },
            Some("bench") => {
                let json = rest
                    .trim_start()
                    .strip_prefix("bench")
                    .unwrap_or_default()
                    .trim();
                match serde_json::from_str::<serde_json::Value>(json) {
                    Ok(v) if v.is_object() => Line::Bench(json.to_owned()),
                    _ => Line::BadDirective(line.to_owned()),
                }
            }
            Some("host-check") => {
                let shm = words.next().map(str::to_owned);
                let offset = words.next().and_then(parse_num);
                let len = words.next().and_then(parse_num);
                let hash = words
                    .next()
                    .and_then(|w| w.strip_prefix("fnv1a64="))
                    .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok());
                match (shm, offset, len, hash) {
                    (Some(shm), Some(offset), Some(len), Some(fnv1a64)) => {
                        Line::HostCheck(HostCheck {
                            shm,
                            offset,
                            len,
                            fnv1a64,
                        })
                    }
                    _ => Line::BadDirective(line.to_owned()),
                }
            }
            _ => Line::BadDirective(line.to_owned()),
        };
    }
    if let Some(rest) = line.strip_prefix("test ")
        && let Some((name, after)) = rest.split_once(" ... ")
        && !name.contains(' ')
    {
        return match outcome(after) {
            Some(o) => Line::Test(name.to_owned(), o),
            None => Line::Started(name.to_owned()),
        };
    }
    match outcome(line) {
        Some(o) => Line::Outcome(o),
        None => Line::Text,
    }
}

/// libtest's word for a test's outcome.
fn outcome(text: &str) -> Option<Outcome> {
    match text.trim() {
        "ok" => Some(Outcome::Ok),
        "FAILED" => Some(Outcome::Failed),
        o if o.starts_with("ignored") => Some(Outcome::Ignored),
        _ => None,
    }
}

/// FNV-1a, 64 bit: the hash both sides use for host checks.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, data);
    std::hash::Hasher::finish(&h)
}

/// Most lines of one report kept after its headline (a lockdep report of a
/// three-lock cycle with its stack dump runs to about 130).
const MAX_TRACE_LINES: usize = 200;

/// The kernel reports that fail a run (warnings, bugs, oopses, panics; lockdep
/// and atomic-sleep reports start with `WARNING:` / `BUG:`), each as its
/// headline line followed by the rest of the report, indented: the lines up to
/// the end of its stack dump (`</TASK>` or `---[ end trace`), the next report,
/// or 200 lines.
pub fn kernel_problems(console: &str) -> Vec<String> {
    const BAD: &[&str] = &[
        "WARNING:",
        "BUG:",
        "Oops",
        "Kernel panic",
        "general protection fault",
        "UBSAN:",
        "KASAN:",
    ];
    let is_headline = |l: &str| BAD.iter().any(|b| l.contains(b));
    let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
    let mut problems = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if !is_headline(lines[i]) {
            i += 1;
            continue;
        }
        let mut text = lines[i].to_owned();
        i += 1;
        let mut kept = 0;
        while i < lines.len() && !is_headline(lines[i]) && kept < MAX_TRACE_LINES {
            let line = lines[i];
            text.push_str("\n    ");
            text.push_str(line);
            kept += 1;
            i += 1;
            if line.contains("</TASK>") || line.contains("---[ end trace") {
                break;
            }
        }
        problems.push(text);
    }
    problems
}

/// Everything the host learned from one run's report.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Whether init reported that it booted.
    pub booted: bool,
    /// Tests in the order they finished.
    pub tests: Vec<(String, Outcome)>,
    /// Host checks requested.
    pub host_checks: Vec<HostCheck>,
    /// The guest job's exit status.
    pub exit: Option<i32>,
    /// Directives that did not parse.
    pub bad_directives: Vec<String>,
    /// Benchmark results (`@@bench`), the JSON objects as sent.
    pub bench: Vec<String>,
    /// A test whose line its own output split, until its outcome comes.
    started: Option<String>,
}

impl Report {
    /// Folds one line into the report.
    pub fn add(&mut self, line: &str) {
        match parse_line(line) {
            Line::Test(n, o) => {
                self.started = None;
                self.tests.push((n, o));
            }
            Line::Started(n) => self.started = Some(n),
            Line::Outcome(o) => {
                if let Some(n) = self.started.take() {
                    self.tests.push((n, o));
                }
            }
            Line::Booted => self.booted = true,
            Line::HostCheck(c) => self.host_checks.push(c),
            Line::Exit(n) => self.exit = Some(n),
            Line::Bench(j) => self.bench.push(j),
            Line::BadDirective(d) => self.bad_directives.push(d),
            Line::Text => {}
        }
    }

    /// Count of tests with `outcome`.
    pub fn count(&self, outcome: Outcome) -> usize {
        self.tests.iter().filter(|(_, o)| *o == outcome).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_lines() {
        assert_eq!(
            parse_line("test smoke::iommu ... ok\r"),
            Line::Test("smoke::iommu".into(), Outcome::Ok)
        );
        assert_eq!(
            parse_line("test a::b ... FAILED"),
            Line::Test("a::b".into(), Outcome::Failed)
        );
        assert_eq!(
            parse_line("test a::b ... ignored, slow"),
            Line::Test("a::b".into(), Outcome::Ignored)
        );
        assert_eq!(
            parse_line("test result: ok. 3 passed; 0 failed"),
            Line::Text
        );
        assert_eq!(parse_line("running 3 tests"), Line::Text);
        assert_eq!(
            parse_line("test nvme_queue::random ... nvme queue property test: seed 7 ... more"),
            Line::Started("nvme_queue::random".into())
        );
        assert_eq!(parse_line("ok"), Line::Outcome(Outcome::Ok));
        assert_eq!(parse_line("FAILED\r"), Line::Outcome(Outcome::Failed));
    }

    #[test]
    fn a_test_line_split_by_the_tests_output_still_counts() {
        let mut r = Report::default();
        for line in [
            "ok",
            "test a::lone ... seed 42 (DMABUF_P2P_SEED=42 replays it)",
            "vmm property test: 24 steps",
            "ok",
            "ok",
            "test a::next ... FAILED",
            "test a::split ... seed 1",
            "FAILED",
        ] {
            r.add(line);
        }
        assert_eq!(
            r.tests,
            [
                ("a::lone".to_owned(), Outcome::Ok),
                ("a::next".to_owned(), Outcome::Failed),
                ("a::split".to_owned(), Outcome::Failed),
            ]
        );
    }

    #[test]
    fn directives() {
        assert_eq!(parse_line("@@exit 101"), Line::Exit(101));
        assert_eq!(parse_line("@@booted 1.23"), Line::Booted);
        assert_eq!(
            parse_line("@@host-check shm0 0x1000 4096 fnv1a64=00ff"),
            Line::HostCheck(HostCheck {
                shm: "shm0".into(),
                offset: 0x1000,
                len: 4096,
                fnv1a64: 0xff
            })
        );
        assert!(matches!(parse_line("@@exit x"), Line::BadDirective(_)));
        assert!(matches!(
            parse_line("@@host-check shm0 1"),
            Line::BadDirective(_)
        ));
        assert!(matches!(parse_line("@@nonsense"), Line::BadDirective(_)));
        assert_eq!(
            parse_line("@@qmp {\"execute\":\"query-status\"}"),
            Line::Text
        );
    }

    #[test]
    fn bench_directives() {
        let j = r#"{"group":"sweep","x":65536,"median":1.5}"#;
        assert_eq!(
            parse_line(&format!("@@bench {j}\r")),
            Line::Bench(j.to_owned())
        );
        assert!(matches!(parse_line("@@bench"), Line::BadDirective(_)));
        assert!(matches!(
            parse_line("@@bench {not json"),
            Line::BadDirective(_)
        ));
        assert!(matches!(parse_line("@@bench [1,2]"), Line::BadDirective(_)));
        let mut r = Report::default();
        r.add(&format!("@@bench {j}"));
        assert_eq!(r.bench, vec![j.to_owned()]);
        assert!(r.bad_directives.is_empty());
    }

    #[test]
    fn fnv_known_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn kernel_problems_found() {
        let log = "ok line\n[ 1.0] WARNING: CPU: 0 PID: 1 at x.c:1\r\n[ 2.0] BUG: kernel NULL pointer\nfine\n";
        assert_eq!(kernel_problems(log).len(), 2);
        assert!(kernel_problems("all good\n").is_empty());
    }

    /// A lockdep report as `print_circular_bug()` prints it, between ordinary
    /// console lines.
    const LOCKDEP_SPLAT: &str = include_str!("../tests/data/lockdep-circular.txt");
    /// An atomic-sleep report as `__might_resched()` prints it.
    const ATOMIC_SLEEP: &str = include_str!("../tests/data/sleeping-in-atomic.txt");

    #[test]
    fn a_lockdep_splat_fails_the_run_with_its_trace() {
        let problems = kernel_problems(LOCKDEP_SPLAT);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        let p = &problems[0];
        assert!(
            p.starts_with("[   41.822145] WARNING: possible circular locking dependency detected"),
            "{p}"
        );
        // The report carries the locks, the chain and the stack, up to </TASK>.
        for needle in [
            "is trying to acquire lock:",
            "-> #1 (&vdev->memory_lock",
            "*** DEADLOCK ***",
            "Call Trace:",
            "check_noncircular",
            "</TASK>",
        ] {
            assert!(
                p.contains(needle),
                "the reported trace lacks {needle:?}:\n{p}"
            );
        }
        assert!(!p.contains("vm-tests: next line after the report"), "{p}");
    }

    #[test]
    fn an_atomic_sleep_report_fails_the_run_with_its_trace() {
        let problems = kernel_problems(ATOMIC_SLEEP);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        let p = &problems[0];
        assert!(
            p.contains(
                "BUG: sleeping function called from invalid context at kernel/locking/mutex.c"
            ),
            "{p}"
        );
        for needle in [
            "in_atomic(): 1",
            "Preemption disabled at:",
            "__might_resched",
            "</TASK>",
        ] {
            assert!(
                p.contains(needle),
                "the reported trace lacks {needle:?}:\n{p}"
            );
        }
    }

    #[test]
    fn the_failure_message_shows_the_trace() {
        // suite::run turns each problem into a failure line; the trace must be
        // in it, not only the headline.
        let both = format!("{LOCKDEP_SPLAT}{ATOMIC_SLEEP}");
        let problems = kernel_problems(&both);
        assert_eq!(problems.len(), 2);
        assert!(problems[0].lines().count() > 20);
        assert!(problems[1].lines().any(|l| l.contains("__mutex_lock")));
        // A WARN's report ends at its end-of-trace marker.
        let warn = "[ 1.0] WARNING: CPU: 0 PID: 7 at drivers/x.c:10 f+0x1/0x2\n[ 1.0] RIP: f\n\
                    [ 1.0] ---[ end trace 0000000000000000 ]---\n[ 1.1] later, unrelated\n";
        let p = kernel_problems(warn);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("end trace") && !p[0].contains("unrelated"),
            "{}",
            p[0]
        );
    }
}
