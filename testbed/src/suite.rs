//! One VM run from start to verdict: build the guest binaries, pack the
//! initramfs, boot, stream the report, run the host checks and judge.

use std::fs;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::boot::{Boot, console_tail};
use crate::initramfs::Initramfs;
use crate::lockdep::{self, TestStarts};
use crate::qemu::{Accel, Vm, VmConfig, read_range};
use crate::qmp::Qmp;
use crate::report::{Outcome, Report, fnv1a64, kernel_problems};
use crate::{Error, Result, kernel, run_captured, workspace_root};

/// The guest's init, packed as `/init`.
pub const INIT: &str = include_str!("../guest/init.sh");

/// `pci_devices`, the shell function init and the jobs use to find PCI
/// devices without listing sysfs; packed as `/etc/testbed/pci.sh`.
pub const PCI_SH: &str = include_str!("../guest/pci.sh");

/// A guest job that prints what the VM offers.
pub const INFO_JOB: &str = include_str!("../guest/info.sh");

/// The guest job of `dmabuf-p2p vm demo`: `p2p-test` between the edu engine and
/// the first ivshmem device.
pub const DEMO_JOB: &str = include_str!("../guest/demo.sh");

/// Where guest binaries live in the VM.
pub const GUEST_VM_TESTS: &str = "/bin/vm-tests";
/// The CLI inside the VM.
pub const GUEST_CLI: &str = "/bin/dmabuf-p2p";
/// The directory of the library's examples inside the VM
/// (`/bin/examples/export_bar`, ...).
pub const GUEST_EXAMPLES: &str = "/bin/examples";
/// The kernel lockdep chain's reproducer inside the VM (the `kernfs_chain`
/// binary of the `vm-tests` package; docs/KERNEL.md).
pub const GUEST_KERNFS_CHAIN: &str = "/bin/kernfs-chain";

/// Host paths of the binaries that go into the VM.
#[derive(Debug, Clone)]
pub struct GuestBinaries {
    /// The libtest binary of the in-VM suite (`vm-tests` crate), if built.
    pub vm_tests: Option<PathBuf>,
    /// The `dmabuf-p2p` CLI.
    pub cli: PathBuf,
    /// The library's examples (name, executable), built with the in-VM
    /// suite, which runs them; packed under [`GUEST_EXAMPLES`].
    pub examples: Vec<(String, PathBuf)>,
    /// The kernel lockdep chain's reproducer, built with the in-VM suite;
    /// packed as [`GUEST_KERNFS_CHAIN`].
    pub kernfs_chain: Option<PathBuf>,
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Executables of the given kind from cargo's JSON messages, with their
/// target names.
fn executables(json: &str, kind: &str) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for line in json.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["reason"] != "compiler-artifact" {
            continue;
        }
        let kinds = v["target"]["kind"].as_array().cloned().unwrap_or_default();
        if !kinds.iter().any(|k| k == kind) {
            continue;
        }
        if let Some(exe) = v["executable"].as_str() {
            let name = v["target"]["name"].as_str().unwrap_or_default().to_owned();
            out.push((name, PathBuf::from(exe)));
        }
    }
    out
}

/// The names of the library's and the engine's examples (`examples/*.rs`,
/// `engine/examples/*.rs`), which a build of the guest binaries with tests
/// must deliver.
fn example_names() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for dir in ["examples", "engine/examples"] {
        let dir = workspace_root().join(dir);
        let entries =
            fs::read_dir(&dir).map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        names.extend(entries.flatten().filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".rs").map(str::to_owned)
        }));
    }
    names.sort();
    Ok(names)
}

/// Builds the CLI and (if `with_tests`) the in-VM suite and the library's
/// and the engine's examples with cargo, on the host. The examples come
/// from the CLI's cargo invocation (same profile; `share` is on for the
/// library there anyway, through the CLI, and `rust-vmm` through the VM
/// tests), so they cost their own compile and link only.
pub fn build_guest_binaries(with_tests: bool) -> Result<GuestBinaries> {
    eprintln!("testbed: building the guest binaries");
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "dmabuf-p2p-cli",
        "--bin",
        "dmabuf-p2p",
        "--message-format=json-render-diagnostics",
    ]);
    if with_tests {
        cmd.args([
            "--package",
            "dmabuf-p2p",
            "--package",
            "dmabuf-p2p-engine",
            "--examples",
            "--features",
            "dmabuf-p2p/share,dmabuf-p2p/rust-vmm",
        ]);
    }
    let what = if with_tests {
        "cargo build (dmabuf-p2p CLI and the library's and the engine's examples)"
    } else {
        "cargo build (dmabuf-p2p CLI)"
    };
    let out = run_captured(&mut cmd, what)?;
    let cli = executables(&out, "bin")
        .into_iter()
        .find(|(name, _)| name == "dmabuf-p2p")
        .map(|(_, exe)| exe)
        .ok_or_else(|| Error::Setup("cargo build reported no dmabuf-p2p executable".into()))?;
    let mut examples = Vec::new();
    if with_tests {
        examples = executables(&out, "example");
        for name in example_names()? {
            if !examples.iter().any(|(n, _)| *n == name) {
                return Err(Error::Setup(format!(
                    "cargo build reported no executable for example {name}"
                )));
            }
        }
    }
    let (vm_tests, kernfs_chain) = if with_tests {
        let mut cmd = cargo();
        cmd.args([
            "build",
            "--package",
            "dmabuf-p2p-vm-tests",
            "--bin",
            "kernfs_chain",
            "--message-format=json-render-diagnostics",
        ]);
        let out = run_captured(&mut cmd, "cargo build (kernfs_chain)")?;
        let kernfs_chain = executables(&out, "bin")
            .into_iter()
            .find(|(name, _)| name == "kernfs_chain")
            .map(|(_, exe)| exe)
            .ok_or_else(|| {
                Error::Setup("cargo build reported no kernfs_chain executable".into())
            })?;
        let mut cmd = cargo();
        cmd.args([
            "test",
            "--package",
            "dmabuf-p2p-vm-tests",
            "--test",
            "vm",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ]);
        let out = run_captured(&mut cmd, "cargo test --no-run (vm-tests)")?;
        let vm_tests = executables(&out, "test")
            .into_iter()
            .next()
            .map(|(_, exe)| exe)
            .ok_or_else(|| {
                Error::Setup("cargo test --no-run reported no vm-tests executable".into())
            })?;
        (Some(vm_tests), Some(kernfs_chain))
    } else {
        (None, None)
    };
    Ok(GuestBinaries {
        vm_tests,
        cli,
        examples,
        kernfs_chain,
    })
}

/// What one run should do.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// A short name; the run directory is `target/testbed/<name>`.
    pub name: String,
    /// Shell script run by the guest's init, with the report port as stdio.
    pub job: String,
    /// Whether this run is a test run: it then must report at least one test
    /// and no test may fail or be ignored.
    pub expect_tests: bool,
    /// Longest time the VM may run.
    pub timeout: Duration,
    /// Longest time init may take to report that it booted; past it the run
    /// is a boot failure (a guest that hangs while booting is not left to
    /// run into [`RunSpec::timeout`]).
    pub boot_timeout: Duration,
    /// Print the guest's report lines as they arrive.
    pub stream: bool,
    /// More host binaries for the guest: (guest path, host path).
    pub extra_binaries: Vec<(String, PathBuf)>,
}

impl RunSpec {
    /// A run of `job` named `name` with the default timeouts
    /// (`DMABUF_P2P_VM_TIMEOUT` seconds, else 900, for the run;
    /// `DMABUF_P2P_BOOT_TIMEOUT` seconds, else [`BOOT_TIMEOUT`], to boot).
    pub fn new(name: &str, job: String, expect_tests: bool) -> Self {
        let secs = |var: &str| {
            std::env::var(var)
                .ok()
                .and_then(|s| s.parse().ok())
                .map(Duration::from_secs)
        };
        Self {
            name: name.to_owned(),
            job,
            expect_tests,
            timeout: secs("DMABUF_P2P_VM_TIMEOUT").unwrap_or(Duration::from_secs(900)),
            boot_timeout: secs("DMABUF_P2P_BOOT_TIMEOUT").unwrap_or(BOOT_TIMEOUT),
            stream: true,
            extra_binaries: Vec::new(),
        }
    }
}

/// The verdict on a run.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Whether the guest booted, and if not, how it failed to: a boot
    /// failure, not a test failure.
    pub boot: Boot,
    /// The parsed report.
    pub report: Report,
    /// Host checks run, with their outcome.
    pub host_checks: Vec<(String, std::result::Result<(), String>)>,
    /// Why the run failed; empty when it passed.
    pub failures: Vec<String>,
    /// The run directory (logs, backing files).
    pub run_dir: PathBuf,
    /// Wall time of the VM.
    pub elapsed: Duration,
    /// Whether QEMU's emulated IOMMU reported a translation failure (it says
    /// so once per run): evidence that DMA to a revoked or unmapped IOVA was
    /// blocked.
    pub iommu_blocked: bool,
    /// DMAR fault records the guest kernel logged (rate-limited by the
    /// kernel, so a lower bound).
    pub dmar_faults: usize,
}

impl Verdict {
    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Packs the initramfs for `spec` with `bins`.
pub fn pack_initramfs(spec: &RunSpec, bins: &GuestBinaries, dest: &Path) -> Result<()> {
    let mut fs_ = Initramfs::new();
    fs_.host_binary("/bin/busybox", &crate::deps::busybox()?)?;
    fs_.file("/init", 0o755, INIT.as_bytes().to_vec());
    fs_.file("/etc/testbed/job.sh", 0o755, spec.job.as_bytes().to_vec());
    fs_.file("/etc/testbed/pci.sh", 0o644, PCI_SH.as_bytes().to_vec());
    fs_.file(
        "/etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n".to_vec(),
    );
    fs_.file(
        "/etc/group",
        0o644,
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
    );
    for d in ["/proc", "/sys", "/dev", "/tmp", "/root", "/run"] {
        fs_.dir(d);
    }
    fs_.host_binary(GUEST_CLI, &bins.cli)?;
    if let Some(t) = &bins.vm_tests {
        fs_.host_binary(GUEST_VM_TESTS, t)?;
    }
    for (name, exe) in &bins.examples {
        fs_.host_binary(&format!("{GUEST_EXAMPLES}/{name}"), exe)?;
    }
    for (guest, host) in &spec.extra_binaries {
        fs_.host_binary(guest, host)?;
    }
    if let Some(exe) = &bins.kernfs_chain {
        fs_.host_binary(GUEST_KERNFS_CHAIN, exe)?;
    }
    fs_.write_to(dest)
}

/// Boots the VM for `spec`, streams the report and judges the run. A VM that
/// cannot be started is an `Err`; a run that fails is a [`Verdict`] with failures.
pub fn run(
    spec: &RunSpec,
    bins: &GuestBinaries,
    tweak: impl FnOnce(&mut VmConfig),
) -> Result<Verdict> {
    // DMABUF_P2P_RUN_TAG keeps concurrent runs (e.g. two developers' suites)
    // out of each other's run directories.
    let dir_name = match std::env::var("DMABUF_P2P_RUN_TAG") {
        Ok(tag) if !tag.is_empty() => format!("{}-{tag}", spec.name),
        _ => spec.name.clone(),
    };
    let run_dir = workspace_root().join("target/testbed").join(dir_name);
    fs::create_dir_all(&run_dir)
        .map_err(|e| Error::io(format!("creating {}", run_dir.display()), e))?;
    let initrd = run_dir.join("initramfs.cpio");
    let mut config = VmConfig::standard(PathBuf::new(), initrd.clone(), run_dir.clone());
    tweak(&mut config);
    // The VM's devices decide the kernel. QEMU and busybox are fetched while
    // a first run's kernel build fetches its source (cores idle otherwise).
    config.kernel = kernel::resolve_alongside(
        kernel::Flavor::for_vm(!config.gpus.is_empty()),
        crate::deps::ensure_vm_tools,
    )?;
    pack_initramfs(spec, bins, &initrd)?;
    let mut report;
    let mut starts;
    let mut failures = Vec::new();
    let (config, stderr, elapsed, qemu_exit) = loop {
        eprintln!(
            "testbed: booting {} ({:?}, {} MiB, {} ivshmem) — logs in {}",
            config.kernel.display(),
            config.accel,
            config.memory_mib,
            config.ivshmem.len(),
            run_dir.display()
        );
        let accel = config.accel;
        let mut vm = Vm::start(config.clone())?;
        report = Report::default();
        starts = TestStarts::default();
        // A KVM that boots slower than software emulation is no use: give it
        // a deadline to reach userspace, then fall back to TCG for good.
        let boot_deadline = (accel == Accel::Kvm).then_some(KVM_BOOT_DEADLINE);
        let outcome = stream(&mut vm, spec, &mut report, &mut starts, boot_deadline);
        let elapsed = vm.elapsed();
        // Some(..) if QEMU ended by itself (a poweroff, a crash), not by us.
        let qemu_exit = vm.try_wait().ok().flatten();
        vm.kill();
        let stderr = vm.stderr_text();
        drop(vm);
        match outcome {
            Err(StreamError::KvmUnusable) => {
                eprintln!(
                    "testbed: KVM did not boot the guest (QEMU failed, or no userspace within {} s); using software emulation (TCG) for this run",
                    KVM_BOOT_DEADLINE.as_secs()
                );
                config.accel = Accel::Tcg;
                continue;
            }
            Err(StreamError::Failed(why)) => failures.push(why),
            Ok(()) => {}
        }
        break (config, stderr, elapsed, qemu_exit);
    };

    let console = fs::read_to_string(config.console_log()).unwrap_or_default();
    let boot = Boot::judge(report.booted, &console, qemu_exit.as_ref());
    if !boot.booted() {
        // First, so that a boot failure is never read as a test failure.
        failures.insert(0, format!("BOOT FAILURE (not a test failure): {boot}"));
    }
    for problem in kernel_problems(&console) {
        failures.push(lockdep::describe(&problem, &console, &starts));
    }
    match report.exit {
        // Without a boot there is no job: the boot failure says it all.
        None if !boot.booted() => {}
        None => failures
            .push("the guest job did not finish (no exit status: timeout, panic or crash)".into()),
        Some(0) => {}
        Some(n) => failures.push(format!("the guest job exited with status {n}")),
    }
    for d in &report.bad_directives {
        failures.push(format!("malformed report directive: {d}"));
    }
    if spec.expect_tests && boot.booted() {
        if report.tests.is_empty() {
            failures.push("the guest suite reported no tests".into());
        }
        for (name, o) in &report.tests {
            match o {
                Outcome::Failed => failures.push(format!("test failed: {name}")),
                Outcome::Ignored => failures.push(format!(
                    "test ignored (the VM suite must run everything): {name}"
                )),
                Outcome::Ok => {}
            }
        }
    }
    let mut host_checks = Vec::new();
    for c in &report.host_checks {
        let path = config.backing_file(&c.shm);
        let res = read_range(&path, c.offset, c.len)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                let got = fnv1a64(&bytes);
                if got == c.fnv1a64 {
                    Ok(())
                } else {
                    Err(format!(
                        "backing file hash {got:016x}, guest expected {:016x}",
                        c.fnv1a64
                    ))
                }
            });
        if let Err(e) = &res {
            failures.push(format!("host check {c}: {e}"));
        }
        host_checks.push((c.to_string(), res));
    }
    let iommu_blocked = stderr.contains("detected translation failure");
    let dmar_faults = console
        .lines()
        .filter(|l| l.contains("DMAR: [DMA "))
        .count();
    // QEMU's own notice that it waits for the report socket is not news.
    let stderr: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("QEMU waiting for connection"))
        .collect();
    if !failures.is_empty() && !stderr.is_empty() {
        failures.push(format!("qemu stderr: {}", stderr.join("\n")));
    }
    Ok(Verdict {
        boot,
        report,
        host_checks,
        failures,
        run_dir,
        elapsed,
        iommu_blocked,
        dmar_faults,
    })
}

/// How long KVM may take to reach userspace before the run falls back to TCG
/// (TCG itself boots in about 4 s).
const KVM_BOOT_DEADLINE: Duration = Duration::from_secs(20);

/// How long init may take to report that it booted, by default: far more
/// than a boot takes under TCG even on a loaded host (measured with `cargo
/// xtask boot-check`, docs/KERNEL.md), so a boot that takes longer has hung.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug)]
enum StreamError {
    /// KVM failed, or had not booted the guest by its deadline.
    KvmUnusable,
    /// The run failed, for the reason given.
    Failed(String),
}

/// Connects to the report socket, then reads lines until the guest exits,
/// QEMU stops or the timeout passes. Answers `@@qmp`, `@@screendump` and
/// `@@qemu-log` requests, and notes in `starts` how long the console log was
/// when each test started.
fn stream(
    vm: &mut Vm,
    spec: &RunSpec,
    report: &mut Report,
    starts: &mut TestStarts,
    boot_deadline: Option<Duration>,
) -> Result<(), StreamError> {
    let sock_path = vm.config().report_socket();
    let deadline = Instant::now() + spec.timeout;
    let sock = loop {
        match UnixStream::connect(&sock_path) {
            Ok(s) => break s,
            Err(e) => {
                if let Ok(Some(st)) = vm.try_wait() {
                    return Err(StreamError::Failed(format!(
                        "qemu exited before the VM started ({st}): {}",
                        vm.stderr_text().trim()
                    )));
                }
                if Instant::now() > deadline || vm.elapsed() > Duration::from_secs(30) {
                    return Err(StreamError::Failed(format!(
                        "cannot connect to the report socket {}: {e}",
                        sock_path.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
    let mut writer = sock
        .try_clone()
        .map_err(|e| StreamError::Failed(format!("cloning report socket: {e}")))?;
    let mut log = fs::File::create(vm.config().report_log())
        .map_err(|e| StreamError::Failed(format!("creating report log: {e}")))?;
    let console_log = vm.config().console_log();
    let console_len = || fs::metadata(&console_log).map_or(0, |m| m.len());
    let mut reader = BufReader::new(sock);
    let mut pending: Vec<u8> = Vec::new();
    let mut qmp: Option<Qmp> = None;
    let mut screendumps = 0;
    let mut qemu_log = crate::screen::LogTail::default();
    let mut prefix_carry: Option<String> = None;
    loop {
        let mut buf = [0u8; 4096];
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                return Err(StreamError::Failed(format!(
                    "reading the report socket: {e}"
                )));
            }
        }
        while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=pos).collect();
            let mut line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            // libtest prints "test NAME ... " before running a test and the
            // outcome after, so a directive the test writes lands mid-line:
            // take it out and glue the prefix to the outcome.
            if let Some(prefix) = prefix_carry.take() {
                line = format!("{prefix}{line}");
            }
            if let Some(pos) = line.find(" ... @@") {
                let directive = line.split_off(pos + 5);
                prefix_carry = Some(line);
                line = directive;
            }
            if let Some(test) = TestStarts::test_in(&line) {
                starts.note(test, console_len());
            }
            let _ = writeln!(log, "{line}");
            if spec.stream && !line.starts_with("@@") {
                println!("{line}");
            }
            if let Some(req) = line.strip_prefix("@@qmp ") {
                let answer = answer_qmp(vm, &mut qmp, req);
                let _ = writeln!(writer, "@@qmp-reply {answer}");
            }
            if let Some(req) = line.strip_prefix("@@screendump ") {
                screendumps += 1;
                let answer = match qmp_session(vm, &mut qmp) {
                    Ok(q) => crate::screen::answer_screendump(vm.config(), q, req, screendumps),
                    Err(e) => serde_json::json!({ "error": e }).to_string(),
                };
                let _ = writeln!(writer, "@@screendump-reply {answer}");
            }
            if line == "@@qemu-log" {
                let lines = qemu_log.new_lines(&vm.config().qemu_log());
                let answer = serde_json::json!({ "lines": lines });
                let _ = writeln!(writer, "@@qemu-log-reply {answer}");
            }
            report.add(&line);
        }
        // libtest prints `test NAME ... ` when the test starts and the
        // outcome when it ends.
        if let Some(test) = TestStarts::test_in(&String::from_utf8_lossy(&pending)) {
            starts.note(test, console_len());
        }
        if report.exit.is_some() {
            // Let init power off; QEMU exits shortly.
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = vm.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            return Ok(());
        }
        if let Ok(Some(st)) = vm.try_wait() {
            if boot_deadline.is_some() && !report.booted {
                return Err(StreamError::KvmUnusable);
            }
            return Err(StreamError::Failed(format!(
                "qemu exited ({st}) before the guest job finished"
            )));
        }
        if let Some(b) = boot_deadline
            && !report.booted
            && vm.elapsed() > b
        {
            return Err(StreamError::KvmUnusable);
        }
        if !report.booted && vm.elapsed() > spec.boot_timeout {
            return Err(StreamError::Failed(format!(
                "boot timeout: init did not report within {} s",
                spec.boot_timeout.as_secs()
            )));
        }
        if Instant::now() > deadline {
            return Err(StreamError::Failed(format!(
                "timeout: the VM ran longer than {} s",
                spec.timeout.as_secs()
            )));
        }
    }
    // The socket reached its end: QEMU is exiting. The kernel closes a dying
    // process's files before its parent can reap it, so wait for the exit
    // status: without it a QEMU crash would be judged a hung guest.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if let Ok(Some(_)) = vm.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if report.exit.is_some() {
        Ok(())
    } else if boot_deadline.is_some() && !report.booted {
        Err(StreamError::KvmUnusable)
    } else {
        Err(StreamError::Failed(
            "the report socket closed before the guest job finished".into(),
        ))
    }
}

/// Runs one QMP command for the guest: `req` is `{"execute":..,"arguments":..}`.
fn answer_qmp(vm: &Vm, qmp: &mut Option<Qmp>, req: &str) -> String {
    let parsed: serde_json::Value = match serde_json::from_str(req) {
        Ok(v) => v,
        Err(e) => return serde_json::json!({ "error": format!("bad request: {e}") }).to_string(),
    };
    let q = match qmp_session(vm, qmp) {
        Ok(q) => q,
        Err(e) => return serde_json::json!({ "error": e }).to_string(),
    };
    let cmd = parsed["execute"].as_str().unwrap_or_default().to_owned();
    match q.execute(&cmd, parsed["arguments"].clone()) {
        Ok(v) => serde_json::json!({ "return": v }).to_string(),
        Err(e) => serde_json::json!({ "error": e.to_string() }).to_string(),
    }
}

/// The run's QMP session, connected on first use.
fn qmp_session<'a>(vm: &Vm, qmp: &'a mut Option<Qmp>) -> Result<&'a mut Qmp, String> {
    if qmp.is_none() {
        *qmp = Some(Qmp::connect(&vm.config().qmp_socket()).map_err(|e| e.to_string())?);
    }
    qmp.as_mut().ok_or_else(|| "no QMP".to_owned())
}

/// Reads a whole file into a string, for callers printing logs.
pub fn read_log(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// Prints a short account of a verdict: host checks, the closing count and the
/// reasons for failure with the paths of the saved logs.
pub fn print_verdict(label: &str, v: &Verdict) {
    for (name, res) in &v.host_checks {
        match res {
            Ok(()) => println!("test host-check::{name} ... ok"),
            Err(e) => println!("test host-check::{name} ... FAILED ({e})"),
        }
    }
    let passed =
        v.report.count(Outcome::Ok) + v.host_checks.iter().filter(|(_, r)| r.is_ok()).count();
    let failed =
        v.report.count(Outcome::Failed) + v.host_checks.iter().filter(|(_, r)| r.is_err()).count();
    println!(
        "{label}: VM run took {:.1} s (logs: {})",
        v.elapsed.as_secs_f64(),
        v.run_dir.display()
    );
    if v.iommu_blocked || v.dmar_faults > 0 {
        println!(
            "{label}: the emulated IOMMU blocked DMA to revoked or unmapped IOVAs (QEMU reported translation \
             failures; the guest logged {} DMAR fault record(s), rate-limited)",
            v.dmar_faults
        );
    }
    if !v.passed() {
        if v.boot.booted() {
            println!("{label}: the guest booted; the run FAILED because:");
        } else {
            println!("{label}: BOOT FAILURE, not a test failure: {}", v.boot);
        }
        for f in &v.failures {
            println!("  - {f}");
        }
        let log = v.run_dir.join("console.log");
        if !v.boot.booted() {
            println!("{label}: the kernel console's last lines:");
            for line in console_tail(&read_log(&log), 25) {
                println!("  | {line}");
            }
        }
        println!("{label}: kernel console log: {}", log.display());
    }
    if !v.report.tests.is_empty() || !v.host_checks.is_empty() {
        println!("{label}: {passed} passed, {failed} failed");
    } else if v.passed() {
        println!("{label}: ok");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_are_picked_by_kind_with_their_names() {
        let json = [
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"dmabuf_p2p"},"executable":null}"#,
            r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"dmabuf-p2p"},"executable":"/t/debug/dmabuf-p2p"}"#,
            r#"{"reason":"compiler-artifact","target":{"kind":["example"],"name":"export_bar"},"executable":"/t/debug/examples/export_bar"}"#,
            r#"{"reason":"compiler-message","target":{"kind":["example"],"name":"vmm_adopt"},"executable":"/x"}"#,
            "not json",
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        assert_eq!(
            executables(&json, "example"),
            vec![(
                "export_bar".to_owned(),
                PathBuf::from("/t/debug/examples/export_bar")
            )]
        );
        assert_eq!(
            executables(&json, "bin"),
            vec![(
                "dmabuf-p2p".to_owned(),
                PathBuf::from("/t/debug/dmabuf-p2p")
            )]
        );
    }

    #[test]
    fn every_example_file_is_named() {
        let names = example_names().unwrap_or_default();
        for want in ["export_bar", "share_buffer", "udmabuf_memfd", "vmm_adopt"] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
    }
}
