//! Reproduces the lockdep chain of docs/KERNEL.md ("kernfs readdir, VFIO
//! MSI enable and a BAR fault") in the test VM, with raw syscalls through
//! libc and no library code.
//!
//! The three edges, each recorded by one step:
//!
//! 1. `&mm->mmap_lock --> &vdev->memory_lock`: the kernel copies from an
//!    mmap'd BAR page that is not mapped yet (`write(2)` to a pipe), so the
//!    page fault runs under `mmap_lock` and `vfio_pci_mmap_huge_fault` takes
//!    `memory_lock`.
//! 2. `&vdev->memory_lock --> &root->kernfs_rwsem`: `VFIO_DEVICE_SET_IRQS`
//!    enables MSI; `vfio_msi_enable` holds `memory_lock` across
//!    `pci_alloc_irq_vectors`, which adds the `msi_irqs` sysfs nodes.
//! 3. `&root->kernfs_rwsem --> &mm->mmap_lock`: `getdents64(2)` on a sysfs
//!    directory; `kernfs_fop_readdir` holds `kernfs_rwsem` while
//!    `filldir64` writes the user buffer. `.` and `..` are written before
//!    the lock is taken, so the buffer starts 64 bytes before the end of a
//!    page that is resident and the first real entry crosses into the next
//!    page. Only a fault that takes `mmap_lock` without a trylock records
//!    the edge, so that next page is chosen by the mode (first argument):
//!    * `growsdown` (default): a hole below a `MAP_GROWSDOWN` mapping, so
//!      the fault grows that mapping under `mmap_write_lock_killable`:
//!      recorded every time;
//!    * `fresh`: an untouched anonymous page: the fault's
//!      `mmap_read_trylock` succeeds, and nothing is recorded;
//!    * `contended`: `fresh` while a second thread keeps `mmap_lock` busy
//!      with mmap/munmap: the trylock sometimes fails and the fault waits in
//!      `mmap_read_lock_killable` (how a multithreaded test process can
//!      record it);
//!    * `resident`: a page written beforehand, so nothing faults.
//!
//! With `--readdir-first` (after the mode), step 3 runs first: lockdep then
//! records the readdir edge without a cycle, and the report fires at step 2,
//! in `kernfs_add_one` under `memory_lock` (the order of the steps does not
//! matter to lockdep, only which edge comes last).
//!
//! It prints the edges lockdep holds among the three lock classes after each
//! step (from `/proc/lockdep`) and whether lockdep is still on
//! (`debug_locks` in `/proc/lockdep_stats`). The run's kernel log then shows
//! the report; `cargo xtask kernfs-chain` boots the VM, runs this and checks
//! that the test bed names the chain.
//!
//! `kernfs-chain check` reproduces nothing: run after the VM suite, it fails
//! if lockdep holds `kernfs_rwsem --> mmap_lock`, which none of our sysfs
//! reads may record, whether or not the rest of the cycle was there to
//! close. (An edge that closes a cycle is reported, not recorded: the report
//! catches that case.)

use std::ffi::CString;
use std::fs;
use std::io;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// `_IO(';', 100 + n)`: the VFIO and iommufd requests have no size bits.
const fn vfio_io(nr: u32) -> libc::Ioctl {
    ((b';' as u32) << 8 | nr) as libc::Ioctl
}
const VFIO_DEVICE_GET_REGION_INFO: libc::Ioctl = vfio_io(100 + 8);
const VFIO_DEVICE_SET_IRQS: libc::Ioctl = vfio_io(100 + 10);
const VFIO_DEVICE_BIND_IOMMUFD: libc::Ioctl = vfio_io(100 + 18);
const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const EDU: (&str, &str) = ("0x1234", "0x11e8");
const PAGE: usize = 4096;
/// The sysfs directory read in step 3.
const SYSFS_DIR: &str = "/sys/bus/pci/devices";
/// The three lock classes of the chain, as lockdep names them.
const CLASSES: [&str; 3] = [
    "&mm->mmap_lock",
    "&vdev->memory_lock",
    "&root->kernfs_rwsem",
];

type Result<T> = std::result::Result<T, String>;

fn os_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// `struct vfio_device_bind_iommufd` (include/uapi/linux/vfio.h).
#[repr(C)]
struct BindIommufd {
    argsz: u32,
    flags: u32,
    iommufd: i32,
    out_devid: u32,
    token_uuid_ptr: u64,
}

/// `struct vfio_region_info`.
#[repr(C)]
#[derive(Default)]
struct RegionInfo {
    argsz: u32,
    flags: u32,
    index: u32,
    cap_offset: u32,
    size: u64,
    offset: u64,
}

/// `struct vfio_irq_set` with room for one eventfd.
#[repr(C)]
struct IrqSet {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fd: i32,
}

/// A file descriptor closed on drop.
struct Fd(libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned by this value and closed once.
        unsafe { libc::close(self.0) };
    }
}

fn open(path: &str, flags: libc::c_int) -> Result<Fd> {
    let c = CString::new(path).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(os_err(&format!("open {path}")));
    }
    Ok(Fd(fd))
}

/// `ioctl(fd, request, arg)` for a request whose argument is a `T`.
fn ioctl<T>(fd: &Fd, request: libc::Ioctl, arg: &mut T, what: &str) -> Result<()> {
    let ptr: *mut T = arg;
    // SAFETY: each caller pairs `request` with the struct the kernel reads and
    // writes for it; `arg` is valid for that size for the whole call.
    let ret = unsafe { libc::ioctl(fd.0, request, ptr) };
    if ret < 0 {
        return Err(os_err(what));
    }
    Ok(())
}

/// The VFIO cdev of the first edu device, found without listing sysfs: each
/// `/dev/vfio/devices/vfioN` names its device through `/sys/dev/char/M:m`.
fn edu_cdev() -> Result<String> {
    for n in 0..64 {
        let cdev = format!("/dev/vfio/devices/vfio{n}");
        let Ok(meta) = fs::metadata(&cdev) else {
            continue;
        };
        let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
        let link = format!("/sys/dev/char/{}:{}", libc::major(rdev), libc::minor(rdev));
        // .../0000:01:00.0/vfio-dev/vfio0: the device is two levels up.
        let dev = format!("{link}/../..");
        let id = |f: &str| fs::read_to_string(format!("{dev}/{f}")).unwrap_or_default();
        if id("vendor").trim() == EDU.0 && id("device").trim() == EDU.1 {
            return Ok(cdev);
        }
    }
    Err("no edu device bound to vfio-pci (/dev/vfio/devices/vfio0..63)".into())
}

fn region(dev: &Fd, index: u32) -> Result<RegionInfo> {
    let mut info = RegionInfo {
        argsz: size_of::<RegionInfo>() as u32,
        index,
        ..RegionInfo::default()
    };
    ioctl(
        dev,
        VFIO_DEVICE_GET_REGION_INFO,
        &mut info,
        "VFIO_DEVICE_GET_REGION_INFO",
    )?;
    Ok(info)
}

/// Turns memory decode on (a BAR fault with decode off is a SIGBUS).
fn enable_memory_decode(dev: &Fd) -> Result<()> {
    let at = (region(dev, VFIO_PCI_CONFIG_REGION_INDEX)?.offset + PCI_COMMAND) as libc::off_t;
    let mut cmd = [0u8; 2];
    // SAFETY: `cmd` is valid for writes of 2 bytes.
    if unsafe { libc::pread(dev.0, cmd.as_mut_ptr().cast(), 2, at) } != 2 {
        return Err(os_err("reading PCI_COMMAND"));
    }
    let cmd = (u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY).to_le_bytes();
    // SAFETY: `cmd` is valid for reads of 2 bytes.
    if unsafe { libc::pwrite(dev.0, cmd.as_ptr().cast(), 2, at) } != 2 {
        return Err(os_err("writing PCI_COMMAND"));
    }
    Ok(())
}

/// Step 1: a kernel copy from a BAR page that is not mapped yet.
fn bar_fault_under_mmap_lock(dev: &Fd) -> Result<()> {
    let bar = region(dev, VFIO_PCI_BAR0_REGION_INDEX)?;
    // SAFETY: a new shared mapping of the device fd; nothing else uses it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ,
            libc::MAP_SHARED,
            dev.0,
            bar.offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err("mmap BAR0"));
    }
    let mut pipe = [0; 2];
    // SAFETY: `pipe` is valid for writes of two ints.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("pipe2"));
    }
    let (r, w) = (Fd(pipe[0]), Fd(pipe[1]));
    // write(2) reads the BAR page in the kernel: copy_from_user faults with
    // FAULT_FLAG_USER clear, which takes mmap_lock (not the per-VMA lock).
    // SAFETY: `p` is a readable mapping of PAGE bytes.
    let n = unsafe { libc::write(w.0, p, 4) };
    let err = (n != 4).then(|| os_err("write(pipe, BAR page)"));
    drop((r, w));
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(p, PAGE) };
    err.map_or(Ok(()), Err)
}

/// Step 2: MSI on with one eventfd, then off again.
fn msi_on_and_off(dev: &Fd) -> Result<()> {
    // SAFETY: plain syscall, no pointers.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(os_err("eventfd"));
    }
    let efd = Fd(efd);
    let mut on = IrqSet {
        argsz: size_of::<IrqSet>() as u32,
        flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        index: VFIO_PCI_MSI_IRQ_INDEX,
        start: 0,
        count: 1,
        fd: efd.0,
    };
    ioctl(
        dev,
        VFIO_DEVICE_SET_IRQS,
        &mut on,
        "VFIO_DEVICE_SET_IRQS (MSI on)",
    )?;
    let mut off = IrqSet {
        argsz: (size_of::<IrqSet>() - 4) as u32,
        flags: VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        count: 0,
        fd: -1,
        ..on
    };
    ioctl(
        dev,
        VFIO_DEVICE_SET_IRQS,
        &mut off,
        "VFIO_DEVICE_SET_IRQS (MSI off)",
    )
}

fn anon(len: usize, extra: libc::c_int) -> Result<*mut u8> {
    // SAFETY: a new private anonymous mapping; nothing else uses it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(os_err("mmap (anonymous)"));
    }
    Ok(p.cast())
}

/// Bytes of the buffer before the page boundary: room for `.` and `..`
/// (24 bytes each), not for the next entry.
const HEAD: usize = 64;

/// `getdents64(2)` of [`SYSFS_DIR`] into `HEAD + PAGE` bytes starting
/// [`HEAD`] bytes before `boundary`; returns the bytes written.
fn getdents(boundary: *mut u8) -> Result<usize> {
    let dir = open(SYSFS_DIR, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let buf = boundary.wrapping_sub(HEAD);
    // SAFETY: the caller passes a boundary with HEAD writable bytes below it
    // and PAGE bytes above that the process may write once they fault in;
    // the kernel writes at most HEAD + PAGE bytes from `buf`.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, dir.0, buf, HEAD + PAGE) };
    if n < 0 {
        return Err(os_err(&format!("getdents64 {SYSFS_DIR}")));
    }
    Ok(n as usize)
}

/// A resident page followed by an untouched one; returns the boundary.
fn resident_then_untouched() -> Result<*mut u8> {
    let p = anon(2 * PAGE, 0)?;
    // SAFETY: `p` is a writable mapping of 2 * PAGE bytes.
    unsafe { p.write_bytes(0xa5, PAGE) };
    Ok(p.wrapping_add(PAGE))
}

/// Step 3 with the page after the boundary the mode asks for.
fn readdir_step(mode: &str) -> Result<()> {
    let what = match mode {
        "growsdown" => {
            // Two MAP_GROWSDOWN pages with a hole between: the fault in the
            // hole grows the upper one down, under mmap_write_lock_killable
            // (a growing mapping may touch another growing one: no guard gap).
            let p = anon(3 * PAGE, libc::MAP_GROWSDOWN)?;
            // SAFETY: unmaps the middle page of the mapping just made.
            if unsafe { libc::munmap(p.wrapping_add(PAGE).cast(), PAGE) } != 0 {
                return Err(os_err("munmap (hole)"));
            }
            // SAFETY: the lower page is a writable mapping of PAGE bytes.
            unsafe { p.write_bytes(0xa5, PAGE) };
            let n = getdents(p.wrapping_add(PAGE))?;
            format!("{n} bytes, the entries in a hole below a MAP_GROWSDOWN mapping")
        }
        "fresh" => {
            let n = getdents(resident_then_untouched()?)?;
            format!("{n} bytes, the entries in an untouched anonymous page")
        }
        "resident" => {
            let b = resident_then_untouched()?;
            // SAFETY: `b` starts a writable page of the mapping.
            unsafe { b.write_bytes(0xa5, PAGE) };
            let n = getdents(b)?;
            format!("{n} bytes, into pages written beforehand")
        }
        "contended" => contended()?,
        other => return Err(format!("unknown mode {other:?}")),
    };
    println!("kernfs-chain: getdents64 {SYSFS_DIR}: {what}");
    Ok(())
}

/// `fresh` while another thread takes `mmap_lock` for writing over and
/// over, until lockdep reports or 2000 tries pass.
fn contended() -> Result<String> {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let churn = std::thread::spawn(move || {
        while !stop2.load(Ordering::Relaxed) {
            if let Ok(p) = anon(PAGE, 0) {
                // SAFETY: the mapping just made, unused elsewhere.
                unsafe { libc::munmap(p.cast(), PAGE) };
            }
        }
    });
    let mut tries = 0;
    while tries < 2000 && lockdep_on() {
        tries += 1;
        let boundary = resident_then_untouched()?;
        getdents(boundary)?;
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(boundary.wrapping_sub(PAGE).cast(), 2 * PAGE) };
    }
    stop.store(true, Ordering::Relaxed);
    let _ = churn.join();
    Ok(format!(
        "{tries} tries, the entries in untouched pages while another thread ran mmap/munmap"
    ))
}

/// Whether lockdep is still checking (`debug_locks: 1`).
fn lockdep_on() -> bool {
    fs::read_to_string("/proc/lockdep_stats")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["debug_locks:", "1"])
}

/// The dependencies lockdep recorded among [`CLASSES`] (`/proc/lockdep`
/// lists each class followed by ` -> [addr] class` lines).
fn edges() -> Vec<String> {
    let text = fs::read_to_string("/proc/lockdep").unwrap_or_default();
    let mut out = Vec::new();
    let mut from: Option<&str> = None;
    for line in text.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("-> ") {
            let to = rest.split_once("] ").map_or(rest, |(_, n)| n).trim();
            if let Some(f) = from
                && CLASSES.contains(&to)
            {
                out.push(format!("{f} --> {to}"));
            }
        } else {
            let name = line.rsplit(": ").next().unwrap_or("").trim();
            from = CLASSES.iter().copied().find(|c| *c == name);
        }
    }
    out.sort();
    out.dedup();
    out
}

fn show(step: &str) {
    let e = edges();
    println!(
        "kernfs-chain: after {step}: lockdep {}, edges among the three: {}",
        if lockdep_on() {
            "on"
        } else {
            "OFF (it reported)"
        },
        if e.is_empty() {
            "none".to_owned()
        } else {
            e.join(", ")
        }
    );
}

fn run(mode: &str, readdir_first: bool) -> Result<()> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("kernfs-chain: kernel {}", release.trim());
    show("boot");
    let cdev = edu_cdev()?;
    let dev = open(&cdev, libc::O_RDWR)?;
    let iommufd = open("/dev/iommu", libc::O_RDWR)?;
    let mut bind = BindIommufd {
        argsz: size_of::<BindIommufd>() as u32,
        flags: 0,
        iommufd: iommufd.0,
        out_devid: 0,
        token_uuid_ptr: 0,
    };
    ioctl(
        &dev,
        VFIO_DEVICE_BIND_IOMMUFD,
        &mut bind,
        "VFIO_DEVICE_BIND_IOMMUFD",
    )?;
    enable_memory_decode(&dev)?;
    println!("kernfs-chain: {cdev} (edu) bound to /dev/iommu, memory decode on");
    if readdir_first {
        readdir_step(mode)?;
        show(&format!("step 3 first (sysfs readdir, {mode})"));
    }
    bar_fault_under_mmap_lock(&dev)?;
    show("step 1 (BAR fault under mmap_lock)");
    msi_on_and_off(&dev)?;
    show("step 2 (MSI on and off)");
    if !readdir_first {
        readdir_step(mode)?;
        show(&format!("step 3 (sysfs readdir, {mode})"));
    }
    Ok(())
}

/// The edge no sysfs readdir of ours may record.
const READDIR_EDGE: &str = "&root->kernfs_rwsem --> &mm->mmap_lock";

/// `check`: fails if lockdep recorded [`READDIR_EDGE`].
fn check() -> Result<()> {
    let e = edges();
    if e.iter().any(|x| x == READDIR_EDGE) {
        return Err(format!(
            "lockdep recorded {READDIR_EDGE} during this run: a sysfs readdir's buffer \
             faulted and waited for mmap_lock (docs/KERNEL.md, \"The kernfs readdir lock cycle\")"
        ));
    }
    println!(
        "kernfs-chain: check: {READDIR_EDGE} never recorded (edges among the three: {})",
        if e.is_empty() {
            "none".to_owned()
        } else {
            e.join(", ")
        }
    );
    Ok(())
}

fn main() -> ExitCode {
    let mode = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "growsdown".into());
    let readdir_first = std::env::args().nth(2).as_deref() == Some("--readdir-first");
    let result = if mode == "check" {
        check()
    } else {
        run(&mode, readdir_first)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kernfs-chain: error: {e}");
            ExitCode::FAILURE
        }
    }
}
