//! Whether the VM booted, and how it failed to: a boot failure is not a test
//! failure, and the report says which (with the console's last lines).

use std::fmt;
use std::process::ExitStatus;

use crate::report::kernel_problems;

/// How far a VM run got towards userspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// init reported `@@booted`.
    Booted,
    /// The kernel reported an Oops, BUG or panic before init ran
    /// (`panic=-1 oops=panic` then ends the VM); the report's first line.
    KernelDied(String),
    /// QEMU exited before init ran and the kernel reported nothing: QEMU
    /// crashed (a signal) or the guest reset; how it exited.
    QemuExited(String),
    /// The kernel console stayed empty until the boot deadline: the guest
    /// froze before the kernel's console came up.
    SilentFreeze,
    /// The kernel printed, but init did not report before the boot deadline;
    /// the console's last line, and the first WARNING before it if any (a
    /// WARNING does not stop the kernel, so it is a clue, not the end).
    Hung(String),
}

impl Boot {
    /// Judges a run from what init reported, the kernel console and how QEMU
    /// ended (`None` if it was still running when the host stopped it).
    pub fn judge(booted: bool, console: &str, qemu_exit: Option<&ExitStatus>) -> Self {
        if booted {
            return Self::Booted;
        }
        let problems = kernel_problems(console);
        let headlines: Vec<&str> = problems
            .iter()
            .map(|p| strip_timestamp(p.lines().next().unwrap_or_default()))
            .collect();
        if let Some(fatal) = headlines.iter().find(|h| !h.starts_with("WARNING:")) {
            return Self::KernelDied((*fatal).to_owned());
        }
        if let Some(status) = qemu_exit {
            return Self::QemuExited(describe_exit(status));
        }
        match (last_line(console), headlines.first()) {
            (None, _) => Self::SilentFreeze,
            (Some(line), None) => Self::Hung(strip_timestamp(line).to_owned()),
            (Some(line), Some(warning)) => {
                Self::Hung(format!("{} (after {warning})", strip_timestamp(line)))
            }
        }
    }

    /// Whether init ran.
    pub fn booted(&self) -> bool {
        *self == Self::Booted
    }

    /// A short name of the kind, for tables and file names.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Booted => "booted",
            Self::KernelDied(_) => "kernel-died-before-init",
            Self::QemuExited(_) => "qemu-exited",
            Self::SilentFreeze => "freeze-no-console",
            Self::Hung(_) => "hung-before-init",
        }
    }
}

impl fmt::Display for Boot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Booted => write!(f, "booted"),
            Self::KernelDied(line) => write!(f, "the kernel died before init: {line}"),
            Self::QemuExited(how) => write!(f, "QEMU exited before init ({how})"),
            Self::SilentFreeze => write!(
                f,
                "the guest froze before the kernel console printed anything"
            ),
            Self::Hung(line) => write!(
                f,
                "the kernel stopped before init; its last console line: {line}"
            ),
        }
    }
}

/// `exit status 1`, `killed by signal 11 (SIGSEGV)`, ...
pub fn describe_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
        _ => status.to_string(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// `[    1.234567] text` → `text`.
fn strip_timestamp(line: &str) -> &str {
    let t = line.trim();
    if t.starts_with('[')
        && let Some((_, rest)) = t.split_once("] ")
    {
        return rest.trim();
    }
    t
}

fn last_line(console: &str) -> Option<&str> {
    console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .rfind(|l| !l.trim().is_empty())
}

/// The last `n` non-empty lines of a console log.
pub fn console_tail(console: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// The guest's uptime when init reported (`@@booted <uptime>` in the report
/// log), in seconds.
pub fn boot_uptime(report_log: &str) -> Option<f64> {
    report_log
        .lines()
        .find_map(|l| l.trim().strip_prefix("@@booted "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    /// Lines 1, 2 and 85 of a real console of the lean test kernel under TCG
    /// (target/testbed/vm-test/console.log, 2026-12-07, a build without
    /// PRINTK_TIME), as if a boot had stopped there.
    const EARLY: &str = "Linux version 7.2.13 (root@vm) (gcc (Debian 12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT Mon Dec  7 13:43:13 UTC 2026\r\n\
Command line: console=ttyS0 intel_iommu=on panic=-1 oops=panic no_timer_check hugepages=64 \r\n\
DMAR: IOMMU enabled\r\n";

    #[test]
    fn a_reported_boot_is_booted_whatever_else_happened() {
        let st = ExitStatus::from_raw(11);
        assert_eq!(Boot::judge(true, "", Some(&st)), Boot::Booted);
        assert!(Boot::judge(true, "", None).booted());
    }

    #[test]
    fn an_oops_before_init_is_the_kernel_dying() {
        // Headlines as x86's die() and panic() print them; the issue's
        // early-boot oops was an int3 in sched_clock_cpu.
        let console = format!(
            "{EARLY}[    1.020000] Oops: int3: 0000 [#1] SMP\r\n[    1.020001] RIP: 0010:sched_clock_cpu+0x5/0x1c0\r\n\
             [    1.100000] Kernel panic - not syncing: Fatal exception\r\n"
        );
        // panic=-1 with -no-reboot: QEMU exits 0 after the panic.
        let b = Boot::judge(false, &console, Some(&ExitStatus::from_raw(0)));
        assert_eq!(b, Boot::KernelDied("Oops: int3: 0000 [#1] SMP".into()));
        assert_eq!(b.kind(), "kernel-died-before-init");
        assert!(b.to_string().contains("died before init"), "{b}");
    }

    #[test]
    fn qemu_dying_without_a_kernel_report_is_a_qemu_crash() {
        // A raw wait status of 11: killed by SIGSEGV.
        let b = Boot::judge(false, EARLY, Some(&ExitStatus::from_raw(11)));
        assert_eq!(b, Boot::QemuExited("killed by signal 11 (SIGSEGV)".into()));
        let b = Boot::judge(false, "", Some(&ExitStatus::from_raw(1 << 8)));
        assert_eq!(b, Boot::QemuExited("exit status 1".into()));
    }

    #[test]
    fn silence_and_a_stopped_console_are_told_apart() {
        assert_eq!(Boot::judge(false, "", None), Boot::SilentFreeze);
        assert_eq!(Boot::judge(false, "\r\n\n", None), Boot::SilentFreeze);
        assert_eq!(
            Boot::judge(false, EARLY, None),
            Boot::Hung("DMAR: IOMMU enabled".into())
        );
    }

    #[test]
    fn a_warning_before_a_hang_is_no_death() {
        // From a boot of ../shared/vm/bzImage under multi-threaded TCG
        // (2026-12-07, docs/KERNEL.md "Boots that never fail"): RCU Tasks
        // stalled, its boot-time self-test warned, and init never came.
        let console = format!(
            "{EARLY}[    6.568144] netconsole: network logging started\r\n\
             [   31.508673] call_rcu_tasks() has failed boot-time tests.\r\n\
             [   31.526653] ------------[ cut here ]------------\r\n\
             [   31.526978] WARNING: kernel/rcu/tasks.h:1531 at rcu_tasks_verify_work_fn+0xc0/0xf0, CPU#0: kworker/0:0/9\r\n\
             [   31.555716] ---[ end trace 0000000000000000 ]---\r\n"
        );
        let b = Boot::judge(false, &console, None);
        assert_eq!(b.kind(), "hung-before-init", "{b}");
        assert_eq!(
            b,
            Boot::Hung(
                "---[ end trace 0000000000000000 ]--- (after WARNING: kernel/rcu/tasks.h:1531 at rcu_tasks_verify_work_fn+0xc0/0xf0, CPU#0: kworker/0:0/9)".into()
            )
        );
        // An oops after a warning is still the kernel dying.
        let died = format!("{console}[   32.000000] Oops: int3: 0000 [#1] SMP\r\n");
        assert_eq!(
            Boot::judge(false, &died, None),
            Boot::KernelDied("Oops: int3: 0000 [#1] SMP".into())
        );
    }

    #[test]
    fn tails_and_uptimes() {
        assert_eq!(
            console_tail(EARLY, 2),
            vec![
                "Command line: console=ttyS0 intel_iommu=on panic=-1 oops=panic no_timer_check hugepages=64 ",
                "DMAR: IOMMU enabled"
            ]
        );
        assert_eq!(console_tail("", 5), Vec::<&str>::new());
        assert_eq!(boot_uptime("x\n@@booted 3.25\n@@exit 0\n"), Some(3.25));
        assert_eq!(boot_uptime("@@exit 0\n"), None);
    }
}
