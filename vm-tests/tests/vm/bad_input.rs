//! Every bad input in one table: each row is one distinct mistake made
//! through the public API (or the CLI, or as an unprivileged user), with the
//! error variant it must give, text the message must contain to name the
//! input, and — for every row — an unchanged count of this process's open
//! fds. All rows run; the failures are reported together.

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::{Command, Output};
use std::ptr::NonNull;

use dmabuf_p2p::dmabuf::is_dmabuf;
use dmabuf_p2p::exporter::bar::{BarExport, plan_export};
use dmabuf_p2p::exporter::heap::DmaHeap;
use dmabuf_p2p::exporter::udmabuf::Udmabuf;
use dmabuf_p2p::importer::iommufd::{Ioas, IoasMapping, Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::{Memfd, MemfdOptions, Seals};
use dmabuf_p2p::pci::{IORESOURCE_IO, Resource};
use dmabuf_p2p::vfio::{Bar, RegionInfo, VfioPciDevice, bind_to_vfio_pci};
use dmabuf_p2p::{ByteRange, DmaBuf, Error, PciAddress};
use dmabuf_p2p_vm_tests::{
    EDU_ID, child_exit, driver_of, ivshmem_devices, open_fd_count, pci_devices, pipe,
};

const PAGE: u64 = 4096;
/// An IOVA inside the usable space of the emulated intel-iommu.
const FIXED: u64 = 0x4000_0000;
/// The CLI inside the VM.
const CLI: &str = "/bin/dmabuf-p2p";
/// A PCI address that no device has.
const ABSENT: &str = "0000:7f:1f.7";

/// What a row produced.
enum Outcome {
    /// It worked: the row's input was not refused.
    Ok,
    /// A library error, flattened (so a child process can send it back).
    Err {
        variant: &'static str,
        errno: Option<i32>,
        message: String,
    },
    /// A run of the CLI.
    Cli(Output),
}

/// What a row must produce.
enum Want {
    /// An error of this variant (and errno, if given) whose message contains
    /// every needle.
    Err {
        variant: &'static str,
        errno: Option<i32>,
        needles: Vec<String>,
    },
    /// A CLI failure: non-zero exit, one diagnostic line on stderr that
    /// contains every needle, no panic, no backtrace.
    Cli { needles: Vec<String> },
}

fn want(variant: &'static str, needles: &[&str]) -> Want {
    Want::Err {
        variant,
        errno: None,
        needles: needles.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn want_errno(variant: &'static str, errno: i32, needles: &[&str]) -> Want {
    Want::Err {
        variant,
        errno: Some(errno),
        needles: needles.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn want_cli(needles: &[&str]) -> Want {
    Want::Cli {
        needles: needles.iter().map(|s| (*s).to_owned()).collect(),
    }
}

/// The name of an [`Error`] variant.
fn variant(e: &Error) -> &'static str {
    match e {
        Error::Sys { .. } => "Sys",
        Error::InvalidRange { .. } => "InvalidRange",
        Error::InvalidRegion { .. } => "InvalidRegion",
        Error::Device { .. } => "Device",
        Error::NotDmaBuf { .. } => "NotDmaBuf",
        Error::NotImportable { .. } => "NotImportable",
        Error::Revoked { .. } => "Revoked",
        Error::MmapRefused { .. } => "MmapRefused",
        Error::Memfd { .. } => "Memfd",
        Error::InvalidIova { .. } => "InvalidIova",
        Error::Parse { .. } => "Parse",
        Error::WrongDriver { .. } => "WrongDriver",
        Error::Unsupported { .. } => "Unsupported",
        Error::UnknownObject { .. } => "UnknownObject",
        Error::InvalidName { .. } => "InvalidName",
        Error::HeapNotFound { .. } => "HeapNotFound",
        Error::UdmabufLimit { .. } => "UdmabufLimit",
        Error::Timeout { .. } => "Timeout",
        _ => "(a variant this test does not know)",
    }
}

/// Flattens a library result; a value is dropped (closing what it owns)
/// before the fd count is compared.
fn lib<T>(r: Result<T, Error>) -> Outcome {
    match r {
        Ok(v) => {
            drop(v);
            Outcome::Ok
        }
        Err(e) => Outcome::Err {
            variant: variant(&e),
            errno: e.raw_os_error(),
            message: e.to_string(),
        },
    }
}

/// What the rows share: open devices, an IOAS with the edu engine attached
/// (so the IOMMU's reserved ranges apply) and a mapping to collide with,
/// and a few buffers iommufd must refuse.
struct Ctx {
    shm0: PciAddress,
    shm1: PciAddress,
    iommufd: Iommufd,
    ioas: Ioas,
    _edu: VfioPciDevice,
    dev: VfioPciDevice,
    memfd: Memfd,
    _taken: IoasMapping,
    udmabuf: Udmabuf,
    heap: DmaHeap,
    two_ranges: BarExport,
    udmabuf_buf: DmaBuf,
    heap_buf: DmaBuf,
}

impl Ctx {
    fn new() -> Self {
        let shm = |size: u64| -> PciAddress {
            let (bdf, _) = ivshmem_devices()
                .into_iter()
                .find(|(_, s)| *s == size)
                .expect("the ivshmem device");
            bdf.parse().unwrap()
        };
        let (shm0, shm1) = (shm(1 << 20), shm(64 << 20));
        let edu_addr: PciAddress = pci_devices(EDU_ID)
            .first()
            .expect("an edu device")
            .parse()
            .unwrap();
        let iommufd = Iommufd::open().unwrap();
        let ioas = iommufd.alloc_ioas().unwrap();
        let mut edu = VfioPciDevice::open(edu_addr).unwrap();
        edu.bind(&iommufd).unwrap();
        edu.attach(&ioas).unwrap();
        let mut dev = VfioPciDevice::open(shm0).unwrap();
        dev.bind(&iommufd).unwrap();
        dev.set_memory_decode(true).unwrap();
        let memfd = Memfd::new("bad-input", 64 << 10).unwrap();
        let taken = ioas
            .map_file(
                &memfd,
                ByteRange::new(0, 64 << 10),
                IovaPlacement::Fixed(FIXED),
                MapPerms::ReadWrite,
            )
            .unwrap();
        let udmabuf = Udmabuf::open().unwrap();
        let udmabuf_buf = udmabuf.create(memfd.as_fd(), 0, 16 * PAGE).unwrap();
        let heap = DmaHeap::open("system").unwrap();
        let heap_buf = heap.alloc(16 * PAGE).unwrap();
        let two_ranges = dev
            .export_bar(
                2,
                &[ByteRange::new(0, PAGE), ByteRange::new(4 * PAGE, PAGE)],
            )
            .unwrap();
        Self {
            shm0,
            shm1,
            iommufd,
            ioas,
            _edu: edu,
            dev,
            memfd,
            _taken: taken,
            udmabuf,
            heap,
            two_ranges,
            udmabuf_buf,
            heap_buf,
        }
    }

    fn export(&self, index: u32, ranges: &[ByteRange]) -> Outcome {
        lib(self.dev.export_bar(index, ranges))
    }

    fn map_memfd_at(&self, iova: u64, length: u64) -> Outcome {
        lib(self.ioas.map_file(
            &self.memfd,
            ByteRange::new(0, length),
            IovaPlacement::Fixed(iova),
            MapPerms::ReadWrite,
        ))
    }
}

/// The number of an fd that was open a moment ago and is closed now.
fn closed_fd() -> i32 {
    let raw = Memfd::new("closed", PAGE).unwrap().as_raw_fd(); // dropped: closed
    // SAFETY: F_GETFD on a bare number reads nothing of ours.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    assert_eq!(flags, -1, "fd {raw} is closed");
    raw
}

/// Runs `f` with a closed fd number as a borrowed fd: the kernel is what
/// must say no. An error that does not name the fd (`fd N`) is turned into
/// a failure of the row.
fn with_closed_fd(f: impl FnOnce(BorrowedFd<'_>) -> Outcome) -> Outcome {
    let raw = closed_fd();
    // SAFETY: the number is not open (checked above), and this thread opens
    // nothing before `f` uses it; the libraries only pass it to syscalls,
    // which answer EBADF. Nothing reads memory through it.
    match f(unsafe { BorrowedFd::borrow_raw(raw) }) {
        Outcome::Err { message, .. } if !message.contains(&format!("fd {raw}")) => Outcome::Err {
            variant: "(an error that does not name the closed fd)",
            errno: None,
            message,
        },
        other => other,
    }
}

/// Runs `f` in a forked child as uid/gid 65534 (no capabilities) and
/// brings its error back through a pipe.
fn as_nobody(f: impl FnOnce() -> Outcome) -> Outcome {
    let (read_end, write_end) = pipe();
    // SAFETY: the child runs only `f` and ends in _exit (no unwinding into
    // the harness); the harness's other thread holds no locks it needs.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        drop(read_end);
        let text = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: setgroups with an empty list reads no memory.
            let dropped = unsafe { libc::setgroups(0, std::ptr::null()) } == 0
                // SAFETY: plain syscalls on integers.
                && unsafe { libc::setgid(65534) } == 0
                // SAFETY: as above.
                && unsafe { libc::setuid(65534) } == 0;
            if !dropped {
                return format!(
                    "setup\tcould not become uid 65534: {}",
                    std::io::Error::last_os_error()
                );
            }
            match f() {
                Outcome::Ok => "ok".to_owned(),
                Outcome::Err {
                    variant,
                    errno,
                    message,
                } => {
                    format!("err\t{variant}\t{}\t{message}", errno.map_or(-1, |e| e))
                }
                Outcome::Cli(_) => "setup\tCLI rows do not run as nobody".to_owned(),
            }
        }))
        .unwrap_or_else(|_| "setup\tpanicked".to_owned());
        child_exit(&write_end, &text, 0);
    }
    drop(write_end);
    let mut text = String::new();
    fs::File::from(read_end).read_to_string(&mut text).unwrap();
    let mut status = 0;
    // SAFETY: reaping our own child; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let parts: Vec<&str> = text.splitn(4, '\t').collect();
    match parts.as_slice() {
        ["ok"] => Outcome::Ok,
        ["err", variant, errno, message] => {
            let errno: i32 = errno.parse().unwrap();
            Outcome::Err {
                // The child's variant name is one of `variant`'s literals.
                variant: known_variant(variant),
                errno: (errno >= 0).then_some(errno),
                message: (*message).to_owned(),
            }
        }
        _ => panic!("the unprivileged child said {text:?} (wait status {status:#x})"),
    }
}

/// Maps a variant name back to the `&'static str` [`variant`] uses.
fn known_variant(name: &str) -> &'static str {
    const NAMES: [&str; 19] = [
        "Sys",
        "InvalidRange",
        "InvalidRegion",
        "Device",
        "NotDmaBuf",
        "NotImportable",
        "Revoked",
        "MmapRefused",
        "Memfd",
        "InvalidIova",
        "Parse",
        "WrongDriver",
        "Unsupported",
        "UnknownObject",
        "InvalidName",
        "HeapNotFound",
        "UdmabufLimit",
        "Timeout",
        "Engine",
    ];
    NAMES
        .into_iter()
        .find(|n| *n == name)
        .unwrap_or("(unknown)")
}

fn cli(args: &[&str]) -> Outcome {
    Outcome::Cli(
        Command::new(CLI)
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .output()
            .expect("run /bin/dmabuf-p2p"),
    )
}

/// Unbinds `addr` from its driver for the life of the guard, and binds it
/// to vfio-pci again when dropped (even if the row panicked).
struct Unbound {
    addr: PciAddress,
}

impl Unbound {
    fn new(addr: PciAddress) -> Self {
        let bdf = addr.to_string();
        assert_eq!(driver_of(&bdf).as_deref(), Some("vfio-pci"));
        fs::write(format!("/sys/bus/pci/devices/{bdf}/driver/unbind"), &bdf).unwrap();
        assert_eq!(driver_of(&bdf), None);
        Self { addr }
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        if let Err(e) = bind_to_vfio_pci(self.addr) {
            eprintln!("could not rebind {} to vfio-pci: {e}", self.addr);
        }
    }
}

/// Checks one outcome against what was wanted; `Err` says what is wrong.
fn check(want: &Want, got: &Outcome) -> Result<String, String> {
    match (want, got) {
        (
            Want::Err {
                variant,
                errno,
                needles,
            },
            Outcome::Err {
                variant: v,
                errno: en,
                message,
            },
        ) => {
            if v != variant {
                return Err(format!("got Error::{v} ({message}), want Error::{variant}"));
            }
            if errno.is_some() && en != errno {
                return Err(format!("errno {en:?}, want {errno:?} ({message})"));
            }
            let missing: Vec<&String> = needles
                .iter()
                .filter(|n| !message.contains(n.as_str()))
                .collect();
            if !missing.is_empty() {
                return Err(format!("message {message:?} does not name {missing:?}"));
            }
            Ok(format!("Error::{v}: {message}"))
        }
        (Want::Cli { needles }, Outcome::Cli(out)) => check_cli(out, needles),
        (_, Outcome::Ok) => Err("accepted".to_owned()),
        (Want::Err { variant, .. }, Outcome::Cli(_)) => {
            Err(format!("ran the CLI, want Error::{variant}"))
        }
        (
            Want::Cli { .. },
            Outcome::Err {
                variant, message, ..
            },
        ) => Err(format!("got Error::{variant} ({message}), want a CLI run")),
    }
}

/// clap's hint after an argument error; not a second diagnostic.
const CLAP_HINT: &str = "For more information, try '--help'.";

/// A failing CLI run: non-zero exit, exactly one diagnostic line (clap's
/// `--help` hint aside) naming the input, nothing that looks like a panic.
fn check_cli(out: &Output, needles: &[String]) -> Result<String, String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        return Err(format!(
            "exit status 0 (stdout {stdout:?}, stderr {stderr:?})"
        ));
    }
    if out.status.code().is_none() {
        return Err(format!("killed by a signal: {:?}", out.status));
    }
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        if stderr.contains(bad) || stdout.contains(bad) {
            return Err(format!("{bad:?} in the output: {stderr}"));
        }
    }
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && l.trim() != CLAP_HINT)
        .collect();
    let [line] = lines.as_slice() else {
        return Err(format!(
            "{} diagnostic lines, want one: {stderr:?}",
            lines.len()
        ));
    };
    if !line.contains("error") {
        return Err(format!("the line does not say error: {line:?}"));
    }
    let missing: Vec<&String> = needles
        .iter()
        .filter(|n| !line.contains(n.as_str()))
        .collect();
    if !missing.is_empty() {
        return Err(format!("{line:?} does not name {missing:?}"));
    }
    Ok(format!("exit {:?}: {line}", out.status.code()))
}

type Run = Box<dyn Fn(&Ctx) -> Outcome>;

fn r(offset: u64, length: u64) -> ByteRange {
    ByteRange::new(offset, length)
}

/// The table: (what is wrong, what must come out, how to do it).
#[allow(clippy::too_many_lines)]
fn rows(ctx: &Ctx) -> Vec<(&'static str, Want, Run)> {
    let s0 = ctx.shm0.to_string();
    let s1 = ctx.shm1.to_string();
    let s0 = s0.as_str();
    let s1 = s1.as_str();
    let udmabuf_limit = ctx.udmabuf.limits().list_limit;
    let size_limit = ctx.udmabuf.limits().size_limit_mb;
    let too_many = (udmabuf_limit + 1).to_string();
    let too_big = (size_limit + 1).to_string();
    let proc_status = format!("/proc/{}/status", std::process::id());
    vec![
        // --- VFIO export: ranges ---
        (
            "export: unaligned offset",
            want("InvalidRange", &[s0, "BAR2", "0x800+0x1000", "not aligned"]),
            Box::new(move |c: &Ctx| c.export(2, &[r(0x800, PAGE)])),
        ),
        (
            "export: unaligned length",
            want("InvalidRange", &[s0, "0x0+0x1001", "not aligned"]),
            Box::new(move |c: &Ctx| c.export(2, &[r(0, PAGE + 1)])),
        ),
        (
            "export: zero length",
            want("InvalidRange", &[s0, "0x1000+0x0", "length is zero"]),
            Box::new(move |c: &Ctx| c.export(2, &[r(0, PAGE), r(PAGE, 0)])),
        ),
        (
            "export: overflowing range",
            want(
                "InvalidRange",
                &[s0, "0xfffffffffffff000+0x2000", "overflows"],
            ),
            Box::new(move |c: &Ctx| c.export(2, &[r(u64::MAX - PAGE + 1, 2 * PAGE)])),
        ),
        (
            "export: past the BAR end",
            want("InvalidRange", &[s0, "0xff000+0x2000", "past the end"]),
            Box::new(move |c: &Ctx| c.export(2, &[r(0, PAGE), r(0xff000, 2 * PAGE)])),
        ),
        (
            "export: no ranges",
            want("InvalidRange", &[s0, "BAR2", "no ranges"]),
            Box::new(move |c: &Ctx| c.export(2, &[])),
        ),
        (
            "export: a page of the 256-byte register BAR0",
            want(
                "InvalidRange",
                &[s0, "BAR0", "0x0+0x1000", "0x1000 > 0x100"],
            ),
            Box::new(move |c: &Ctx| c.export(0, &[r(0, PAGE)])),
        ),
        // --- VFIO export: regions ---
        (
            "export: absent BAR1",
            want("InvalidRegion", &[s0, "region 1", "not present"]),
            Box::new(move |c: &Ctx| c.export(1, &[r(0, PAGE)])),
        ),
        (
            "export: BAR3, the upper half of 64-bit BAR2",
            want("InvalidRegion", &[s0, "region 3", "not present"]),
            Box::new(move |c: &Ctx| c.export(3, &[r(0, PAGE)])),
        ),
        (
            "export: the ROM region",
            want("InvalidRegion", &[s0, "region 6", "ROM"]),
            Box::new(move |c: &Ctx| c.export(6, &[r(0, PAGE)])),
        ),
        (
            "export: the config region",
            want("InvalidRegion", &[s0, "region 7", "config space"]),
            Box::new(move |c: &Ctx| c.export(7, &[r(0, PAGE)])),
        ),
        (
            "export: the VGA region",
            want("InvalidRegion", &[s0, "region 8", "VGA"]),
            Box::new(move |c: &Ctx| c.export(8, &[r(0, PAGE)])),
        ),
        (
            "export: a region index that does not exist",
            want("InvalidRegion", &[s0, "region 42", "not a VFIO PCI region"]),
            Box::new(move |c: &Ctx| c.export(42, &[r(0, PAGE)])),
        ),
        (
            "plan_export: an I/O-port (non-memory) BAR",
            want("InvalidRegion", &[s0, "region 4", "I/O-port"]),
            Box::new(move |c: &Ctx| {
                let bar = Bar::new(
                    4,
                    RegionInfo::new(4, 3, 0x100, 4 << 40),
                    Resource::new(4, 0xc000, 0x100, IORESOURCE_IO),
                );
                lib(plan_export(c.shm0, &bar, &[r(0, 0x100)], PAGE))
            }),
        ),
        (
            "region_info: past the device's regions",
            want("InvalidRegion", &[s0, "region 9", "no such region"]),
            Box::new(|c: &Ctx| lib(c.dev.region_info(9))),
        ),
        (
            "map_bar: absent BAR1",
            want("InvalidRegion", &[s0, "region 1", "not present"]),
            Box::new(|c: &Ctx| lib(c.dev.map_bar(1))),
        ),
        (
            "config_read: past the end of config space",
            want("InvalidRange", &[s0, "config space", "past the end"]),
            Box::new(|c: &Ctx| {
                let size = c
                    .dev
                    .region_info(dmabuf_p2p::vfio::CONFIG_REGION_INDEX)
                    .unwrap()
                    .size;
                let mut four = [0u8; 4];
                lib(c.dev.config_read(size - 2, &mut four))
            }),
        ),
        // --- VFIO devices ---
        (
            "open: a device not bound to vfio-pci",
            want("WrongDriver", &[s1, "no driver", "vfio-pci"]),
            Box::new(|c: &Ctx| {
                let _unbound = Unbound::new(c.shm1);
                lib(VfioPciDevice::open(c.shm1))
            }),
        ),
        (
            "open: a device that is not present",
            want("Device", &[ABSENT, "not present"]),
            Box::new(|_: &Ctx| lib(VfioPciDevice::open(ABSENT.parse().unwrap()))),
        ),
        (
            "bind_to_vfio_pci: a device that is not present",
            want("Device", &["0000:7f:1e.0", "not present"]),
            Box::new(|_: &Ctx| lib(bind_to_vfio_pci("0000:7f:1e.0".parse().unwrap()))),
        ),
        (
            "export: before the bind",
            want("Device", &[s1, "not bound"]),
            Box::new(|c: &Ctx| {
                let dev = VfioPciDevice::open(c.shm1).unwrap();
                lib(dev.export_bar(2, &[r(0, PAGE)]))
            }),
        ),
        (
            "bind: a second time",
            want("Device", &[s1, "already bound"]),
            Box::new(|c: &Ctx| {
                let mut dev = VfioPciDevice::open(c.shm1).unwrap();
                dev.bind(&c.iommufd).unwrap();
                lib(dev.bind(&c.iommufd))
            }),
        ),
        (
            "attach: an IOAS of another iommufd",
            want("Device", &[s1, "another iommufd"]),
            Box::new(|c: &Ctx| {
                let mut dev = VfioPciDevice::open(c.shm1).unwrap();
                dev.bind(&c.iommufd).unwrap();
                let foreign = Iommufd::open().unwrap().alloc_ioas().unwrap();
                lib(dev.attach(&foreign))
            }),
        ),
        (
            "attach_pt: a wrong IOAS id",
            want_errno(
                "UnknownObject",
                libc::ENOENT,
                &[s1, "57005", "VFIO_DEVICE_ATTACH_IOMMUFD_PT"],
            ),
            Box::new(|c: &Ctx| {
                let mut dev = VfioPciDevice::open(c.shm1).unwrap();
                dev.bind(&c.iommufd).unwrap();
                lib(dev.attach_pt(0xdead))
            }),
        ),
        // --- fds ---
        (
            "DmaBuf::try_from: a regular file",
            want("NotDmaBuf", &[&proc_status, "filesystem magic 0x9fa0"]),
            Box::new(|_: &Ctx| {
                let fd: OwnedFd = fs::File::open("/proc/self/status").unwrap().into();
                match DmaBuf::try_from(fd) {
                    Ok(b) => lib(Ok::<_, Error>(b)),
                    Err(e) => Outcome::Err {
                        variant: variant(e.error()),
                        errno: None,
                        message: e.error().to_string(),
                    },
                }
            }),
        ),
        (
            "DmaBuf::try_from: a memfd",
            want("NotDmaBuf", &["memfd:not-a-dmabuf", "tmpfs"]),
            Box::new(|_: &Ctx| {
                let fd: OwnedFd = Memfd::new("not-a-dmabuf", PAGE).unwrap().into();
                match DmaBuf::try_from(fd) {
                    Ok(b) => lib(Ok::<_, Error>(b)),
                    Err(e) => Outcome::Err {
                        variant: variant(e.error()),
                        errno: None,
                        message: e.error().to_string(),
                    },
                }
            }),
        ),
        (
            "is_dmabuf: an fd already closed",
            want_errno("Sys", libc::EBADF, &["fstatfs"]),
            Box::new(|_: &Ctx| with_closed_fd(|fd| lib(is_dmabuf(fd)))),
        ),
        (
            "map_file: an fd already closed",
            want_errno("Sys", libc::EBADF, &["F_DUPFD_CLOEXEC"]),
            Box::new(|c: &Ctx| {
                with_closed_fd(|fd| {
                    lib(c
                        .ioas
                        .map_file(fd, r(0, PAGE), IovaPlacement::Auto, MapPerms::Read))
                })
            }),
        ),
        (
            "udmabuf: a memfd fd already closed",
            want_errno("Sys", libc::EBADF, &["fstat", "memfd fd"]),
            Box::new(|c: &Ctx| with_closed_fd(|fd| lib(c.udmabuf.create(fd, 0, PAGE)))),
        ),
        // --- iommufd import ---
        (
            "map_dmabuf: a two-range VFIO dma-buf",
            want_errno(
                "NotImportable",
                libc::EOPNOTSUPP,
                &["vfio_pci_core", "more than one range"],
            ),
            Box::new(|c: &Ctx| {
                lib(c.ioas.map_dmabuf(
                    c.two_ranges.dmabuf(),
                    IovaPlacement::Auto,
                    MapPerms::ReadWrite,
                ))
            }),
        ),
        (
            "map_dmabuf: a udmabuf",
            want_errno(
                "NotImportable",
                libc::EOPNOTSUPP,
                &["udmabuf dma-buf fd", "exported by udmabuf"],
            ),
            Box::new(|c: &Ctx| {
                lib(c
                    .ioas
                    .map_dmabuf(&c.udmabuf_buf, IovaPlacement::Auto, MapPerms::ReadWrite))
            }),
        ),
        (
            "map_dmabuf: a system-heap dma-buf",
            want_errno(
                "NotImportable",
                libc::EOPNOTSUPP,
                &["system dma-buf fd", "exported by system"],
            ),
            Box::new(|c: &Ctx| {
                lib(c
                    .ioas
                    .map_dmabuf(&c.heap_buf, IovaPlacement::Auto, MapPerms::ReadWrite))
            }),
        ),
        (
            "map_dmabuf: an export born revoked (memory decode off)",
            want_errno("Revoked", libc::ENODEV, &["vfio_pci_core dma-buf"]),
            Box::new(|c: &Ctx| {
                let mut dev = VfioPciDevice::open(c.shm1).unwrap();
                dev.bind(&c.iommufd).unwrap();
                dev.set_memory_decode(false).unwrap();
                let export = dev.export_bar(2, &[r(0, PAGE)]).unwrap();
                lib(c
                    .ioas
                    .map_dmabuf(export.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite))
            }),
        ),
        (
            "iova_ranges: a wrong IOAS id",
            want_errno(
                "UnknownObject",
                libc::ENOENT,
                &["48879", "IOMMU_IOAS_IOVA_RANGES"],
            ),
            Box::new(|c: &Ctx| lib(c.iommufd.iova_ranges(0xbeef))),
        ),
        (
            "map_file: a misaligned fixed IOVA",
            want_errno(
                "InvalidIova",
                libc::EINVAL,
                &["IOVA 0x40100800", "multiples of"],
            ),
            Box::new(|c: &Ctx| c.map_memfd_at(FIXED + (1 << 20) + 0x800, PAGE)),
        ),
        (
            "map_file: an IOVA outside the allowed ranges",
            want_errno(
                "InvalidIova",
                libc::EINVAL,
                &["IOVA 0xffffffffffffe000", "EINVAL"],
            ),
            Box::new(|c: &Ctx| c.map_memfd_at(u64::MAX - 2 * PAGE + 1, PAGE)),
        ),
        (
            "map_file: an IOVA colliding with an existing mapping",
            want_errno("InvalidIova", libc::EEXIST, &["IOVA 0x40008000", "EEXIST"]),
            Box::new(|c: &Ctx| c.map_memfd_at(FIXED + 0x8000, 64 << 10)),
        ),
        (
            "map_file: an IOVA in the reserved MSI window",
            want("InvalidIova", &["IOVA 0xfee00000"]),
            Box::new(|c: &Ctx| c.map_memfd_at(0xfee0_0000, PAGE)),
        ),
        (
            "map_file: a range past the end of the memfd",
            want(
                "InvalidRange",
                &["file fd", "(64 KiB)", "0x8000+0x10000", "past the end"],
            ),
            Box::new(|c: &Ctx| {
                lib(c.ioas.map_file(
                    &c.memfd,
                    r(0x8000, 64 << 10),
                    IovaPlacement::Auto,
                    MapPerms::Read,
                ))
            }),
        ),
        (
            "map_user: zero length",
            want("InvalidRange", &["user memory", "length is zero"]),
            Box::new(|c: &Ctx| {
                // SAFETY: a zero-length request is refused before any ioctl;
                // no memory is handed to a device.
                lib(unsafe {
                    c.ioas
                        .map_user(NonNull::dangling(), 0, IovaPlacement::Auto, MapPerms::Read)
                })
            }),
        ),
        (
            "Iommufd::open_path: /dev/iommu missing",
            want_errno("Sys", libc::ENOENT, &["/nonexistent/dev/iommu"]),
            Box::new(|_: &Ctx| lib(Iommufd::open_path("/nonexistent/dev/iommu"))),
        ),
        // --- memfd and udmabuf ---
        (
            "udmabuf: a memfd without F_SEAL_SHRINK",
            want("Memfd", &["memfd:no-shrink", "lacks the F_SEAL_SHRINK"]),
            Box::new(|c: &Ctx| {
                let m = MemfdOptions::new()
                    .seal_shrink(false)
                    .create("no-shrink", PAGE)
                    .unwrap();
                lib(c.udmabuf.create(m.as_fd(), 0, PAGE))
            }),
        ),
        (
            "udmabuf: a memfd with F_SEAL_WRITE",
            want("Memfd", &["memfd:write-sealed", "F_SEAL_WRITE"]),
            Box::new(|c: &Ctx| {
                let m = Memfd::new("write-sealed", PAGE).unwrap();
                m.add_seals(Seals::WRITE).unwrap();
                lib(c.udmabuf.create(m.as_fd(), 0, PAGE))
            }),
        ),
        (
            "udmabuf: a memfd with F_SEAL_FUTURE_WRITE",
            want("Memfd", &["memfd:future-sealed", "F_SEAL_FUTURE_WRITE"]),
            Box::new(|c: &Ctx| {
                let m = Memfd::new("future-sealed", PAGE).unwrap();
                m.add_seals(Seals::FUTURE_WRITE).unwrap();
                lib(c.udmabuf.create(m.as_fd(), 0, PAGE))
            }),
        ),
        (
            "udmabuf: a memfd of unaligned size",
            want(
                "InvalidRange",
                &["memfd:odd-size", "0x0+0x1388", "not aligned"],
            ),
            Box::new(|c: &Ctx| {
                let m = Memfd::new("odd-size", 5000).unwrap();
                lib(c.udmabuf.create(m.as_fd(), 0, 5000))
            }),
        ),
        (
            "udmabuf: a range past the end of the memfd",
            want(
                "InvalidRange",
                &["memfd:short", "0x1000+0x2000", "past the end"],
            ),
            Box::new(|c: &Ctx| {
                let m = Memfd::new("short", 2 * PAGE).unwrap();
                lib(c.udmabuf.create(m.as_fd(), PAGE, 2 * PAGE))
            }),
        ),
        (
            "udmabuf: a file that is not shmem",
            want("Memfd", &[&proc_status, "not a shmem"]),
            Box::new(|c: &Ctx| {
                let f = fs::File::open("/proc/self/status").unwrap();
                lib(c.udmabuf.create(f.as_fd(), 0, PAGE))
            }),
        ),
        (
            "udmabuf: a list over the kernel's list_limit",
            want("UdmabufLimit", &["list_limit", &too_many]),
            Box::new(move |c: &Ctx| {
                let n = usize::try_from(udmabuf_limit + 1).unwrap();
                let items = vec![(c.memfd.as_fd(), 0, PAGE); n];
                lib(c.udmabuf.create_list(&items))
            }),
        ),
        (
            "udmabuf: a buffer over size_limit_mb",
            want("UdmabufLimit", &["size_limit_mb", &too_big]),
            Box::new(move |c: &Ctx| {
                let m = Memfd::new("huge", (size_limit + 1) << 20).unwrap(); // sparse: no memory used
                lib(c.udmabuf.create(m.as_fd(), 0, (size_limit + 1) << 20))
            }),
        ),
        (
            "udmabuf: an empty list",
            want("InvalidRange", &["udmabuf item list", "empty"]),
            Box::new(|c: &Ctx| lib(c.udmabuf.create_list(&[]))),
        ),
        (
            "Udmabuf::open_path: the device missing",
            want_errno("Sys", libc::ENOENT, &["/nonexistent/dev/udmabuf"]),
            Box::new(|_: &Ctx| lib(Udmabuf::open_path("/nonexistent/dev/udmabuf"))),
        ),
        // --- dma-heap and dma-buf names ---
        (
            "dma-heap: a heap that does not exist",
            want(
                "HeapNotFound",
                &["\"no-such-heap\"", "/dev/dma_heap", "system"],
            ),
            Box::new(|_: &Ctx| lib(DmaHeap::open("no-such-heap"))),
        ),
        (
            "dma-heap: a zero-length allocation",
            want("InvalidRange", &["dma-heap \"system\"", "length is zero"]),
            Box::new(|c: &Ctx| lib(c.heap.alloc(0))),
        ),
        (
            "dma-heap: a length that overflows when rounded",
            want(
                "InvalidRange",
                &["dma-heap \"system\"", "0x0+0xffffffffffffffff", "overflows"],
            ),
            Box::new(|c: &Ctx| lib(c.heap.alloc(u64::MAX))),
        ),
        (
            "set_name: a 32-byte name",
            want(
                "InvalidName",
                &["\"abcdefghijklmnopqrstuvwxyz012345\"", "at most 31"],
            ),
            Box::new(|c: &Ctx| lib(c.heap_buf.set_name("abcdefghijklmnopqrstuvwxyz012345"))),
        ),
        // --- without privileges ---
        (
            "uid 65534: open /dev/iommu",
            want_errno("Sys", libc::EACCES, &["open", "/dev/iommu"]),
            Box::new(|_: &Ctx| as_nobody(|| lib(Iommufd::open()))),
        ),
        (
            "uid 65534: open a VFIO cdev",
            want_errno("Sys", libc::EACCES, &["open", s0, "/dev/vfio/devices/vfio"]),
            Box::new(|c: &Ctx| {
                let shm0 = c.shm0;
                as_nobody(move || lib(VfioPciDevice::open(shm0)))
            }),
        ),
        // --- the CLI ---
        (
            "cli export: a malformed PCI address",
            want_cli(&["0000:zz:00.0", "bus"]),
            Box::new(|_: &Ctx| cli(&["export", "0000:zz:00.0"])),
        ),
        (
            "cli export: a BAR index out of range",
            want_cli(&[&format!("{s0}:9"), "0..=5"]),
            Box::new(|c: &Ctx| cli(&["export", &format!("{}:9", c.shm0)])),
        ),
        (
            "cli export: a range without a length",
            want_cli(&["0x1000", "OFFSET+LEN"]),
            Box::new(|c: &Ctx| cli(&["export", &format!("{}:2:0x1000", c.shm0)])),
        ),
        (
            "cli export: a range with a bad length",
            want_cli(&["4Q", "not a number"]),
            Box::new(|c: &Ctx| cli(&["export", &format!("{}:2:0+4Q", c.shm0)])),
        ),
        (
            "cli export: an unaligned range",
            want_cli(&[s1, "0x800+0x1000", "not aligned"]),
            Box::new(|c: &Ctx| cli(&["export", &format!("{}:2:0x800+4K", c.shm1)])),
        ),
        (
            "cli export: a device that is not present",
            want_cli(&[ABSENT, "not present"]),
            Box::new(|_: &Ctx| cli(&["export", ABSENT])),
        ),
        (
            "cli p2p-test: a malformed --size",
            want_cli(&["12Q", "--size"]),
            Box::new(|c: &Ctx| {
                cli(&[
                    "p2p-test",
                    "--engine",
                    "0000:01:00.0",
                    "--target",
                    &c.shm1.to_string(),
                    "--size",
                    "12Q",
                ])
            }),
        ),
    ]
}

/// Every row of the table, reported together.
#[test]
fn every_bad_input_is_refused_with_a_typed_error_naming_it() {
    let ctx = Ctx::new();
    let table = rows(&ctx);
    let mut names = std::collections::HashSet::new();
    for (name, _, _) in &table {
        assert!(names.insert(*name), "row {name:?} appears twice");
    }
    let mut failures = Vec::new();
    for (name, want, run) in &table {
        let before = open_fd_count();
        let got = catch_unwind(AssertUnwindSafe(|| run(&ctx)));
        let after = open_fd_count();
        let verdict = match got {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()));
                Err(format!("panicked: {}", msg.unwrap_or_default()))
            }
            Ok(got) => check(want, &got),
        };
        let verdict = verdict.and_then(|ok| {
            if after == before {
                Ok(ok)
            } else {
                Err(format!("open fds {before} -> {after} ({ok})"))
            }
        });
        match verdict {
            Ok(what) => println!("ok   {name}: {what}"),
            Err(why) => {
                println!("FAIL {name}: {why}");
                failures.push(format!("{name}: {why}"));
            }
        }
    }
    assert!(
        driver_of(&ctx.shm1.to_string()).as_deref() == Some("vfio-pci"),
        "shm1 is bound to vfio-pci again"
    );
    println!(
        "{} distinct bad inputs, {} failed",
        table.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n  {}",
        failures.len(),
        table.len(),
        failures.join("\n  ")
    );
    assert!(
        table.len() >= 30,
        "the table must list at least 30 distinct bad inputs, it has {}",
        table.len()
    );
}
