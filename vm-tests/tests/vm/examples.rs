//! The library's examples (`examples/*.rs`) and the engine's
//! (`engine/examples/*.rs`), run as the programs they are against the real
//! kernel: the test bed builds them with the CLI and packs them as
//! `/bin/examples/<name>`. Each test runs one with arguments valid
//! in this VM (shm0, the 1 MiB ivshmem BAR2, is the `0000:02:00.0` their
//! docs name), checks its exit status and the facts it prints, and that the
//! device it used is left as it was found: still bound to `vfio-pci`, with
//! the same `PCI_COMMAND` (memory decode included).
//!
//! The examples read BAR2 of shm0 at most (its first 64 KiB); they write
//! no BAR. The NVMe example only reads nvme0 (its first 2 MiB).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dmabuf_p2p_vm_tests::{driver_of, fnv1a64, nvme_address, nvme_image, shm_address};

/// Where the test bed packs the examples.
const EXAMPLES: &str = "/bin/examples";
/// Generous: everything runs under software emulation. An example still
/// running then is killed and the test fails.
const WAIT: Duration = Duration::from_secs(120);
/// The length every BAR example exports.
const EXPORT_LEN: u64 = 0x1_0000;
const PCI_COMMAND: usize = 4;

/// What one run of an example did.
struct Run {
    what: String,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Everything the example printed, for failure messages.
    fn log(&self) -> String {
        format!(
            "$ {}\n{}--- stderr ---\n{}",
            self.what, self.stdout, self.stderr
        )
    }

    /// Position of the first stdout line that starts with `prefix`, and the
    /// line; fails the test if there is none.
    fn line(&self, prefix: &str) -> (usize, &str) {
        self.stdout
            .lines()
            .enumerate()
            .find(|(_, l)| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}:\n{}", self.log()))
    }

    /// How many stdout lines start with `prefix`.
    fn count(&self, prefix: &str) -> usize {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// Asserts that these lines (given by prefix) come once each, in this order.
    fn assert_in_order(&self, prefixes: &[&str]) {
        let mut last = None;
        for p in prefixes {
            assert_eq!(
                self.count(p),
                1,
                "lines starting with {p:?}:\n{}",
                self.log()
            );
            let (at, _) = self.line(p);
            assert!(
                last.is_none_or(|l| l < at),
                "{p:?} out of order:\n{}",
                self.log()
            );
            last = Some(at);
        }
    }
}

/// Runs `/bin/examples/<name> <args>`; the test fails unless it exits with
/// status 0 within [`WAIT`] and prints nothing on stderr.
fn run_example(name: &str, args: &[&str]) -> Run {
    let exe = Path::new(EXAMPLES).join(name);
    assert!(
        exe.exists(),
        "{} is missing: the test bed packs the examples",
        exe.display()
    );
    let what = format!("{} {}", exe.display(), args.join(" "));
    let mut child = Command::new(&exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    // Read in threads: share_buffer's importer inherits the pipes and may
    // outlive a failed exporter.
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let run = Run {
        what,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    match status {
        None => panic!("still running after {WAIT:?}, killed:\n{}", run.log()),
        Some(st) => assert!(st.success(), "exit status {st}:\n{}", run.log()),
    }
    assert!(
        run.stderr.is_empty(),
        "unexpected output on stderr:\n{}",
        run.log()
    );
    run
}

/// The device's driver and `PCI_COMMAND` (from sysfs config space).
fn device_state(bdf: &str) -> (Option<String>, u16) {
    let config = fs::read(format!("/sys/bus/pci/devices/{bdf}/config")).unwrap();
    (
        driver_of(bdf),
        u16::from_le_bytes([config[PCI_COMMAND], config[PCI_COMMAND + 1]]),
    )
}

/// Runs `f` on shm0 and checks that the device is bound to `vfio-pci`
/// before, and left so, with its `PCI_COMMAND` as it was.
fn on_shm0(f: impl FnOnce(&str)) {
    let bdf = shm_address("shm0");
    let before = device_state(&bdf);
    assert_eq!(before.0.as_deref(), Some("vfio-pci"), "{bdf} before");
    f(&bdf);
    let after = device_state(&bdf);
    assert_eq!(
        after, before,
        "{bdf}: (driver, PCI_COMMAND) after the example, and before"
    );
}

/// BAR2's physical start, from sysfs `resource`.
fn bar2_start(bdf: &str) -> u64 {
    let text = fs::read_to_string(format!("/sys/bus/pci/devices/{bdf}/resource")).unwrap();
    let first = text
        .lines()
        .nth(2)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    u64::from_str_radix(first.trim_start_matches("0x"), 16).unwrap()
}

/// The hex number (`0x...`) that follows `after` in `line`.
fn hex_after(line: &str, after: &str) -> u64 {
    number_after(line, after, 16)
}

/// The decimal number that follows `after` in `line`.
fn dec_after(line: &str, after: &str) -> u64 {
    number_after(line, after, 10)
}

/// The number in `radix` (hex may start with `0x`) that follows `after`.
fn number_after(line: &str, after: &str, radix: u32) -> u64 {
    let at = line
        .find(after)
        .unwrap_or_else(|| panic!("no {after:?} in {line:?}"))
        + after.len();
    let rest = if radix == 16 {
        line[at..].trim_start_matches("0x")
    } else {
        &line[at..]
    };
    let digits: String = rest.chars().take_while(|c| c.is_digit(radix)).collect();
    u64::from_str_radix(&digits, radix).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// `export_bar <bdf> 2`: exports 64 KiB of BAR2 at its physical start, maps
/// it at an IOVA, and reports the revocation (memory decode off) and the
/// restore at that same IOVA, in that order.
#[test]
fn export_bar_maps_revokes_and_restores() {
    on_shm0(|bdf| {
        let phys = bar2_start(bdf);
        let run = run_example("export_bar", &[bdf, "2"]);
        let (_, exported) = run.line("exported: ");
        let want = format!(
            "= {bdf} BAR2 [0x0+0x10000 @ {phys:#x}..{:#x}] (64 KiB)",
            phys + EXPORT_LEN
        );
        assert!(exported.contains(&want), "want {want:?}:\n{}", run.log());
        let (_, mapped) = run.line("peer devices reach it at IOVA ");
        let iova = hex_after(mapped, "IOVA ");
        assert!(
            mapped.contains(&format!(
                "(physical [PhysRange {{ start: {phys}, length: {EXPORT_LEN} }}])"
            )),
            "physical range of {bdf} BAR2 at {phys:#x}:\n{}",
            run.log()
        );
        run.assert_in_order(&[
            "exported: ",
            "peer devices reach it at IOVA ",
            &format!("IOVA {iova:#x} revoked: memory decode off"),
            &format!("IOVA {iova:#x} live again"),
        ]);
        assert_eq!(run.stdout.lines().count(), 4, "{}", run.log());
    });
}

/// `udmabuf_memfd`: the udmabuf module's limits as its parameters say, a
/// dma-buf of the udmabuf exporter, and the memfd's bytes read through the
/// dma-buf's mapping.
#[test]
fn udmabuf_memfd_reads_the_memfds_bytes() {
    let param = |p: &str| -> u64 {
        fs::read_to_string(format!("/sys/module/udmabuf/parameters/{p}"))
            .unwrap_or_else(|e| panic!("udmabuf parameter {p}: {e}"))
            .trim()
            .parse()
            .unwrap()
    };
    let limits = format!(
        "udmabuf limits: UdmabufLimits {{ list_limit: {}, size_limit_mb: {} }}",
        param("list_limit"),
        param("size_limit_mb")
    );
    let run = run_example("udmabuf_memfd", &[]);
    run.assert_in_order(&[
        &limits,
        "dma-buf: udmabuf",
        "the dma-buf shows the memfd's bytes",
    ]);
    assert_eq!(run.stdout.lines().count(), 3, "{}", run.log());
}

/// `share_buffer <bdf>`: the exporter serves 64 KiB of BAR2 and starts
/// itself as the importer, which receives the size and the exporter's name,
/// maps the buffer, sees the exporter's revocation and has it live again at
/// the same IOVA; the exporter then ends and removes its socket.
#[test]
fn share_buffer_revocation_reaches_the_importer() {
    on_shm0(|bdf| {
        // default_socket_path: XDG_RUNTIME_DIR is not set here.
        let socket = format!("/run/dmabuf-p2p/{bdf}_BAR2_example.sock");
        let run = run_example("share_buffer", &[bdf]);
        run.assert_in_order(&[
            &format!("importer: {EXPORT_LEN} bytes of {bdf} BAR2"),
            "importer: mapped at IOVA 0x",
            "importer: revoked by the exporter",
            "importer: live again at the same IOVA",
            "exporter: done",
        ]);
        assert_eq!(run.stdout.lines().count(), 5, "{}", run.log());
        assert!(!Path::new(&socket).exists(), "{socket} left behind");
    });
}

/// `vmm_adopt <bdf>`: a VMM of rust-vmm crates binds and attaches the
/// device and maps its guest RAM; the library adopts them by reference and
/// a `GuestBarMap` follows the guest's writes: BAR2 sized (1 MiB, 64-bit
/// prefetchable), mapped at 0xc0000000 once decode is on, moved above 4 GiB,
/// refused over the guest RAM with the reason; the map's log lines (the
/// `log` facade) say the same in order; the VMM then destroys the very IOAS
/// it allocated.
#[test]
fn vmm_adopt_follows_the_guests_bar_and_decode_writes() {
    on_shm0(|bdf| {
        let run = run_example("vmm_adopt", &[bdf]);
        let bound = format!("VMM: {bdf} bound (devid ");
        let (_, vmm) = run.line(&bound);
        let ioas = dec_after(vmm, "attached to IOAS ");
        let (_, adopted) = run.line("library: adopted ");
        assert!(
            adopted.starts_with(&format!("library: adopted {bdf}, PCI_COMMAND 0x")),
            "{}",
            run.log()
        );
        let command = hex_after(adopted, "PCI_COMMAND 0x");
        let ram = "GPA 0x40000000..0x40100000 (1 MiB) overlaps the VMM's mapping guest RAM at \
                   0x40000000..=0x400fffff";
        run.assert_in_order(&[
            &bound,
            &format!("log: IOAS {ioas}: registered {bdf}, offering BARs [2] for P2P"),
            "library: adopted ",
            "guest: BAR2 sized: 0x100000 bytes, flags 0xc",
            &format!("log: {bdf} BAR2 (1 MiB) mapped at GPA 0xc0000000"),
            "guest: BAR2 at 0xc0000000, decode on -> mapped at GPA 0xc0000000",
            &format!("log: {bdf} BAR2 at GPA 0xc0000000: revoked: memory decode off"),
            &format!("log: {bdf} BAR2 (1 MiB) moved: GPA 0xc0000000 -> 0x100000000"),
            "guest: BAR2 moved to 0x100000000 -> mapped at GPA 0x100000000",
            &format!("log: {bdf} BAR2 at GPA 0x100000000: revoked: memory decode off"),
            &format!(
                "log: {bdf} BAR2 (1 MiB) refused at GPA 0x40000000 (unmapped from GPA \
                 0x100000000): {ram}"
            ),
            &format!("guest: BAR2 at 0x40000000 -> not reachable: {ram}"),
            &format!(
                "report: BAR 0 of {bdf} (256 bytes): not reachable: not offered for P2P: \
                 smaller than a page (256 bytes)"
            ),
            &format!("report: BAR 2 of {bdf} (1 MiB): not reachable: "),
            &format!("VMM: device closed, IOAS {ioas} destroyed"),
        ]);
        // BAR2 as the guest left it: decode as the VMM found it.
        let (_, bar2) = run.line(&format!("report: BAR 2 of {bdf}"));
        if command & 0x2 == 0 {
            assert!(
                bar2.ends_with("the guest has memory decode off"),
                "{}",
                run.log()
            );
        } else {
            assert!(bar2.ends_with(ram), "{}", run.log());
        }
        assert_eq!(run.count("guest: "), 4, "{}", run.log());
        assert_eq!(run.count("log: "), 6, "{}", run.log());
    });
}

/// The NVMe engine's example (`engine/examples/nvme_queues.rs`, the code
/// the README and the guide show): two queues at depth 32 from two threads
/// read the first 2 MiB of nvme0, and what they read hashes as the image
/// does; then the same with the reads made again, into cleared memory,
/// with prepared commands (`read_prepared`), whose bytes are then hashed.
#[test]
fn nvme_queues_reads_the_namespace_on_two_queues() {
    let bdf = nvme_address("nvme0");
    let want = format!("fnv1a64 {:016x}", fnv1a64(&nvme_image(0, 2 << 20)));
    for extra in [None, Some("prepared")] {
        let mut args = vec![bdf.as_str(), "2", "32"];
        args.extend(extra);
        let run = run_example("nvme_queues", &args);
        let (_, line) = run.line("read 2 MiB with 2 queue(s) at depth 32 in ");
        assert!(line.ends_with(" ms"), "{}", run.log());
        assert_eq!(run.line("fnv1a64 ").1, want, "{extra:?}: {}", run.log());
    }
    assert_eq!(driver_of(&bdf).as_deref(), Some("vfio-pci"));
}
