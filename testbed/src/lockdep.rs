//! Lockdep's lock-cycle reports in the kernel log: which known chain a report
//! is, which test was running when it fired, and what it costs the rest of the
//! run.
//!
//! Lockdep switches itself off when it prints a cycle (`print_circular_bug`
//! calls `debug_locks_off_graph_unlock`), so everything after the first report
//! runs unchecked; the failure says so. Which test was running comes from the
//! guest's report: the host notes how long `console.log` was when each
//! `test NAME ... ` line arrived ([`TestStarts`]), and a report belongs to the
//! last test started before its first line. Lockdep names the task that
//! closed the cycle, whose name is the libtest thread's (the test's name cut
//! to 15 bytes); when that name fits the next test and not this one, the next
//! one is taken (the report raced the host's note).

/// The headline of a lock-cycle report.
const CIRCULAR: &str = "WARNING: possible circular locking dependency detected";

/// A lock cycle the test bed knows and names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownChain {
    /// A short name.
    pub name: &'static str,
    /// Its lock classes, as lockdep prints them (any order).
    pub classes: &'static [&'static str],
    /// Where it is explained.
    pub doc: &'static str,
}

/// The cycles the test bed knows.
pub const KNOWN_CHAINS: &[KnownChain] = &[KnownChain {
    name: "kernfs readdir / vfio-pci MSI enable / BAR fault",
    classes: &[
        "&mm->mmap_lock",
        "&vdev->memory_lock",
        "&root->kernfs_rwsem",
    ],
    doc: "docs/KERNEL.md, \"The kernfs readdir lock cycle\"",
}];

/// One lock-cycle report found in a console log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CycleReport {
    /// Byte offset of its headline line in the log.
    pub offset: usize,
    /// The task that closed the cycle (`comm/pid`), if printed.
    pub task: Option<String>,
    /// The lock classes lockdep names in it: the lock being taken and every
    /// `-> #N (class)` of the chain, without lockdep's `#N`/`/N` suffixes,
    /// sorted.
    pub classes: Vec<String>,
}

impl CycleReport {
    /// The known chain with exactly these classes, if any.
    pub fn known(&self) -> Option<&'static KnownChain> {
        KNOWN_CHAINS.iter().find(|k| {
            let mut want: Vec<String> = k.classes.iter().map(|c| (*c).to_owned()).collect();
            want.sort();
            want == self.classes
        })
    }
}

/// Every lock-cycle report in `console`, in order.
pub fn cycle_reports(console: &str) -> Vec<CycleReport> {
    let mut out = Vec::new();
    let mut offset = 0;
    let lines: Vec<(usize, &str)> = console
        .split_inclusive('\n')
        .map(|l| {
            let at = offset;
            offset += l.len();
            (at, l.trim_end_matches(['\r', '\n']))
        })
        .collect();
    for (i, (at, line)) in lines.iter().enumerate() {
        if !line.contains(CIRCULAR) {
            continue;
        }
        let mut task = None;
        let mut classes = Vec::new();
        let mut after_trying = false;
        for (_, l) in lines.iter().skip(i + 1).take(200) {
            if l.contains(CIRCULAR) || l.contains("stack backtrace:") {
                break;
            }
            let text = strip_timestamp(l);
            if let Some(t) = text.strip_suffix(" is trying to acquire lock:") {
                task = Some(t.trim().to_owned());
                after_trying = true;
                continue;
            }
            if after_trying {
                // `ffff8880... (&mm->mmap_lock){++++}-{4:4}, at: ...`
                classes.extend(class_in(text));
                after_trying = false;
            } else if let Some(rest) = text.trim_start().strip_prefix("-> #") {
                classes.extend(class_in(rest));
            }
        }
        classes.sort();
        classes.dedup();
        out.push(CycleReport {
            offset: *at,
            task,
            classes,
        });
    }
    out
}

/// `[   12.345678] text` → `text`.
fn strip_timestamp(line: &str) -> &str {
    match line.trim_start().strip_prefix('[') {
        Some(rest) => rest.split_once("] ").map_or(line, |(_, t)| t),
        None => line,
    }
}

/// The class in `... (CLASS){usage}...`, without lockdep's `#N`/`/N`
/// suffixes (class names may hold parentheses themselves).
fn class_in(text: &str) -> Option<String> {
    let end = text.find("){")?;
    let start = text.get(..end)?.find(" (").map(|i| i + 2).or_else(|| {
        // `2 (&x){...}` after `-> #` has the number first.
        text.get(..end)?.find('(').map(|i| i + 1)
    })?;
    let mut class = text.get(start..end)?;
    for sep in ['#', '/'] {
        if let Some((base, n)) = class.rsplit_once(sep)
            && !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
        {
            class = base;
        }
    }
    Some(class.to_owned())
}

/// When each guest test started, as the length of `console.log` at the moment
/// the host read its `test NAME ... ` line.
#[derive(Debug, Default, Clone)]
pub struct TestStarts {
    starts: Vec<(String, u64)>,
}

impl TestStarts {
    /// Notes that `name` started when the console log was `console_len` bytes
    /// long; a name noted last already is not noted again.
    pub fn note(&mut self, name: &str, console_len: u64) {
        if self.starts.last().is_some_and(|(n, _)| n == name) {
            return;
        }
        self.starts.push((name.to_owned(), console_len));
    }

    /// The test name in a line or partial line `test NAME ... ` (with or
    /// without the outcome after it).
    pub fn test_in(line: &str) -> Option<&str> {
        let rest = line.strip_prefix("test ")?;
        let (name, _) = rest.split_once(" ... ")?;
        Some(name.trim()).filter(|n| !n.is_empty())
    }

    /// The test that was running when a report at `offset` of the console log
    /// was printed; `task` is the reporting task's name (`comm/pid`).
    pub fn running_at(&self, offset: usize, task: Option<&str>) -> Option<&str> {
        let offset = offset as u64;
        let i = self.starts.iter().rposition(|(_, at)| *at <= offset)?;
        let here = self.starts[i].0.as_str();
        let comm = task.and_then(|t| t.rsplit_once('/').map(|(c, _)| c));
        if let (Some(comm), Some((next, _))) = (comm, self.starts.get(i + 1))
            && !here.starts_with(comm)
            && next.starts_with(comm)
        {
            return Some(next);
        }
        Some(here)
    }
}

/// The failure text for one kernel problem (a report from
/// [`crate::report::kernel_problems`]): for a lock cycle, the known chain's
/// name or the classes, the test that was running, and that lockdep was off
/// from there on; for anything else, the problem as it is.
pub fn describe(problem: &str, console: &str, starts: &TestStarts) -> String {
    let Some(report) = cycle_reports(console)
        .into_iter()
        .find(|r| console[r.offset..].starts_with(first_line(problem)))
    else {
        return format!("kernel log: {problem}");
    };
    let what = match report.known() {
        Some(k) => format!(
            "the known lock cycle \"{}\" ({}; see {})",
            k.name,
            report.classes.join(", "),
            k.doc
        ),
        None => format!(
            "a lock cycle the test bed does not know ({})",
            report.classes.join(", ")
        ),
    };
    let task = report
        .task
        .as_deref()
        .map_or(String::new(), |t| format!(" in task {t}"));
    let when = match starts.running_at(report.offset, report.task.as_deref()) {
        Some(test) => format!(
            " while test {test} was running; lockdep switched itself off at this report, so \
             locking from {test} to the end of the run went unchecked"
        ),
        None => " before any test started; lockdep switched itself off at this report, so \
                 locking from there to the end of the run went unchecked"
            .to_owned(),
    };
    format!("kernel log: lockdep reported {what}{task}{when}:\n{problem}")
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::kernel_problems;

    /// A real report of the known cycle: lines 794-930 of the console.log of
    /// `cargo xtask kernfs-chain growsdown` on the shared 7.2.13 kernel
    /// (/work/shared/vm/bzImage), 2026-12-07, from the device reset before
    /// it to the power-off after it.
    const KERNFS_CHAIN: &str = include_str!("../tests/data/lockdep-kernfs-chain.txt");
    /// The same cycle closed by its other edge: the console.log of
    /// `cargo xtask kernfs-chain growsdown --readdir-first` (lines 791-930),
    /// same kernel and day: the report fires in `kernfs_add_one` under
    /// `memory_lock`, as in the report on the kernel list.
    const KERNFS_CHAIN_MSI_LAST: &str =
        include_str!("../tests/data/lockdep-kernfs-chain-msi-last.txt");
    /// The older fixture of report.rs: another cycle (iommufd's `iova_rwsem`
    /// and vfio's `memory_lock`), not the kernfs one.
    const OTHER_CYCLE: &str = include_str!("../tests/data/lockdep-circular.txt");

    #[test]
    fn the_kernfs_chain_is_named() {
        let reports = cycle_reports(KERNFS_CHAIN);
        assert_eq!(reports.len(), 1, "{reports:#?}");
        let r = &reports[0];
        assert_eq!(
            r.classes,
            [
                "&mm->mmap_lock",
                "&root->kernfs_rwsem",
                "&vdev->memory_lock"
            ]
        );
        assert_eq!(r.task.as_deref(), Some("kernfs-chain/223"));
        assert_eq!(r.known(), Some(&KNOWN_CHAINS[0]));
    }

    #[test]
    fn the_kernfs_chain_is_named_whichever_edge_closes_it() {
        let reports = cycle_reports(KERNFS_CHAIN_MSI_LAST);
        assert_eq!(reports.len(), 1, "{reports:#?}");
        assert_eq!(reports[0].task.as_deref(), Some("kernfs-chain/226"));
        assert_eq!(reports[0].known(), Some(&KNOWN_CHAINS[0]));
        assert!(KERNFS_CHAIN_MSI_LAST.contains("at: kernfs_add_one"));
    }

    #[test]
    fn another_cycle_is_not_the_known_chain() {
        let reports = cycle_reports(OTHER_CYCLE);
        assert_eq!(reports.len(), 1);
        assert_eq!(
            reports[0].classes,
            ["&iopt->iova_rwsem", "&vdev->memory_lock"]
        );
        assert_eq!(reports[0].task.as_deref(), Some("vm-tests/187"));
        assert_eq!(reports[0].known(), None);
    }

    #[test]
    fn classes_lose_lockdep_suffixes_but_keep_their_parentheses() {
        assert_eq!(
            class_in("ffff888 (&mm->mmap_lock#2){++++}-{4:4}, at: x").as_deref(),
            Some("&mm->mmap_lock")
        );
        assert_eq!(
            class_in("1 (&vdev->memory_lock/1){++++}-{4:4}:").as_deref(),
            Some("&vdev->memory_lock")
        );
        assert_eq!(
            class_in("2 ((work_completion)(&x->work)){+.+.}-{0:0}:").as_deref(),
            Some("(work_completion)(&x->work)")
        );
        assert_eq!(class_in("no class here"), None);
    }

    #[test]
    fn the_test_running_at_a_report() {
        let mut s = TestStarts::default();
        assert_eq!(s.running_at(10, None), None);
        s.note("smoke::iommu", 100);
        s.note("smoke::iommu", 150);
        s.note("share_attacks::a_peer_cannot_slow_revocation", 200);
        s.note("vfio::reset", 300);
        assert_eq!(s.running_at(50, None), None);
        assert_eq!(s.running_at(120, None), Some("smoke::iommu"));
        assert_eq!(
            s.running_at(250, Some("share_attacks::/414")),
            Some("share_attacks::a_peer_cannot_slow_revocation")
        );
        // Printed before the host noted the start of the test whose thread
        // closed the cycle: the next test is the one.
        assert_eq!(
            s.running_at(199, Some("share_attacks::/414")),
            Some("share_attacks::a_peer_cannot_slow_revocation")
        );
        assert_eq!(
            s.running_at(199, Some("kernfs-chain/223")),
            Some("smoke::iommu")
        );
        assert_eq!(TestStarts::test_in("test a::b ... "), Some("a::b"));
        assert_eq!(TestStarts::test_in("test a::b ... ok"), Some("a::b"));
        assert_eq!(TestStarts::test_in("test result: ok."), None);
    }

    #[test]
    fn the_failure_names_the_chain_the_test_and_the_end_of_lockdep() {
        let console = format!("[    1.0] boot\n{KERNFS_CHAIN}");
        let problems = kernel_problems(&console);
        assert_eq!(problems.len(), 1);
        let mut s = TestStarts::default();
        s.note("vfio::msi_on_and_off", 5);
        let text = describe(&problems[0], &console, &s);
        for needle in [
            "lockdep reported the known lock cycle \"kernfs readdir / vfio-pci MSI enable / BAR fault\"",
            "docs/KERNEL.md",
            "in task kernfs-chain/223",
            "while test vfio::msi_on_and_off was running",
            "lockdep switched itself off at this report",
            "went unchecked",
            // The whole report follows.
            "Chain exists of:",
            "</TASK>",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        let other = kernel_problems(OTHER_CYCLE);
        let text = describe(&other[0], OTHER_CYCLE, &TestStarts::default());
        assert!(
            text.contains(
                "a lock cycle the test bed does not know (&iopt->iova_rwsem, &vdev->memory_lock)"
            ) && text.contains("before any test started"),
            "{text}"
        );
        let warn = "[ 1.0] WARNING: CPU: 0 PID: 7 at drivers/x.c:10 f+0x1/0x2\n";
        let p = kernel_problems(warn);
        assert_eq!(describe(&p[0], warn, &s), format!("kernel log: {}", p[0]));
    }
}
