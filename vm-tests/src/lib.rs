//! Helpers for the in-VM test suite: finding the test bed's devices, counting
//! open fds, and asking the host to check an ivshmem backing file.
//!
//! These tests only make sense inside the test VM (`cargo xtask vm-test`); on
//! any other machine they fail loudly, because the devices are not there.
//!
//! Sysfs directories are listed through the library's [`Sysfs`], which reads
//! them into a buffer that cannot fault, never with `std::fs::read_dir`: a
//! sysfs readdir whose buffer faults can record the lockdep edge that closes
//! the kernfs / vfio-pci cycle of docs/KERNEL.md and switch lockdep off for
//! the rest of the run.

// Test helpers fail a test by panicking.
#![allow(clippy::panic)]

pub mod fail_nth;
pub mod raw_peer;

use std::fs;
use std::hash::Hasher;
use std::path::PathBuf;

use dmabuf_p2p::sysfs::Sysfs;

/// QEMU's `edu` device.
pub const EDU_ID: (u16, u16) = (0x1234, 0x11e8);
/// QEMU's `ivshmem-plain` device.
pub const IVSHMEM_ID: (u16, u16) = (0x1af4, 0x1110);

/// PCI addresses (`0000:01:00.0`) of all devices with this vendor:device, sorted.
pub fn pci_devices(id: (u16, u16)) -> Vec<String> {
    let sys = Sysfs::default();
    sys.devices()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| sys.vendor(*a).ok() == Some(id.0) && sys.device_id(*a).ok() == Some(id.1))
        .map(|a| a.to_string())
        .collect()
}

/// The driver a PCI device is bound to, if any.
pub fn driver_of(bdf: &str) -> Option<String> {
    let link = fs::read_link(format!("/sys/bus/pci/devices/{bdf}/driver")).ok()?;
    link.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// `/dev/vfio/devices/vfioN` of a device bound to vfio-pci.
pub fn vfio_cdev(bdf: &str) -> Option<PathBuf> {
    let name = Sysfs::default().vfio_dev(bdf.parse().ok()?).ok()??;
    Some(PathBuf::from("/dev/vfio/devices").join(name))
}

/// Size of BAR `bar` from sysfs `resource`.
pub fn bar_size(bdf: &str, bar: usize) -> Option<u64> {
    let text = fs::read_to_string(format!("/sys/bus/pci/devices/{bdf}/resource")).ok()?;
    let line = text.lines().nth(bar)?;
    let mut it = line
        .split_whitespace()
        .map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok());
    let (start, end) = (it.next()??, it.next()??);
    if end == 0 {
        Some(0)
    } else {
        Some(end - start + 1)
    }
}

/// The ivshmem devices with their BAR2 sizes, in PCI address order. The test
/// bed gives them distinct sizes (1 MiB for `shm0`, 64 MiB for `shm1`).
pub fn ivshmem_devices() -> Vec<(String, u64)> {
    pci_devices(IVSHMEM_ID)
        .into_iter()
        .map(|b| {
            let s = bar_size(&b, 2).unwrap_or(0);
            (b, s)
        })
        .collect()
}

/// The number of open fds of this process.
pub fn open_fd_count() -> usize {
    fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// FNV-1a 64, the hash the host uses for host checks.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(data);
    h.finish()
}

/// Asks the host to check, after the VM has stopped, that bytes
/// `[offset, offset + data.len())` of ivshmem device `shm`'s backing file equal `data`.
pub fn request_host_check(shm: &str, offset: u64, data: &[u8]) {
    directive(&format!(
        "@@host-check {shm} {offset:#x} {:#x} fnv1a64={:016x}",
        data.len(),
        fnv1a64(data)
    ));
}

/// Writes a line for the host straight to stdout: libtest captures `println!`
/// of passing tests, but not writes to the stdout handle.
pub fn directive(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Asks the host to run a QMP command on this VM's QEMU (for example
/// `device_del` to hot-unplug a device) and returns the host's JSON answer:
/// `{"return": ...}` or `{"error": "..."}`. The answer comes back on stdin,
/// which the test bed connects to the same serial port as stdout.
pub fn qmp(execute: &str, arguments: &str) -> String {
    ask(
        &format!("@@qmp {{\"execute\":\"{execute}\",\"arguments\":{arguments}}}"),
        "@@qmp-reply ",
    )
}

/// Sends a directive the host answers at once and returns the answer: the
/// text after `reply_prefix` on the first line that starts with it.
pub fn ask(line_out: &str, reply_prefix: &str) -> String {
    use std::io::BufRead;
    directive(line_out);
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => return "{\"error\":\"no answer from the host\"}".to_owned(),
            Ok(_) => {}
        }
        if let Some(answer) = line.trim_end().strip_prefix(reply_prefix) {
            return answer.to_owned();
        }
    }
}

/// Asks the host for a screendump of virtio-gpu `gpu` (its QEMU id) and
/// returns the host's JSON answer (`testbed/src/screen.rs`): the FNV-1a 64
/// of the rectangle's RGB bytes and, with `backing` (ivshmem id, offset of
/// the rectangle's first pixel, bytes per row), the same of that backing
/// file's XRGB8888 pixels.
pub fn screendump(
    gpu: &str,
    rect: (u32, u32, u32, u32),
    backing: Option<(&str, u64, u64)>,
) -> String {
    let (x, y, w, h) = rect;
    let tail = backing.map_or(String::new(), |(shm, off, stride)| {
        format!(" {shm} {off:#x} {stride}")
    });
    ask(
        &format!("@@screendump {gpu} {x} {y} {w} {h}{tail}"),
        "@@screendump-reply ",
    )
}

/// The lines QEMU's log got since the last call (trace events, guest
/// errors), as the host's JSON answer.
pub fn qemu_log() -> String {
    ask("@@qemu-log", "@@qemu-log-reply ")
}

/// The RGB bytes of XRGB8888 pixels (little-endian B, G, R, X), as a
/// screendump holds them.
pub fn xrgb_to_rgb(xrgb: &[u8]) -> Vec<u8> {
    xrgb.chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect()
}

/// How long one engine copy may take (edu takes 100 ms of guest time per
/// transfer).
pub const DMA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The seed of a property test: `DMABUF_P2P_SEED` when the host set it (a
/// replay; the test bed refuses one that is not a u64), else one from the
/// clock. Odd, so that an xorshift generator seeded with it never sticks at
/// zero. The test prints it.
pub fn property_seed() -> u64 {
    std::env::var("DMABUF_P2P_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        })
}

/// `len` bytes of a pattern that differs with `seed` and has no short period
/// (so a copy landing at the wrong offset does not look right by accident).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ seed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (0..len)
        .map(|_| {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// The VM profile this suite runs in (`standard`, `aw39`, ...: the test
/// bed's `testbed/src/profile.rs`), from the job's environment.
pub fn vm_profile() -> String {
    std::env::var("DMABUF_P2P_VM_PROFILE").unwrap_or_else(|_| {
        panic!("DMABUF_P2P_VM_PROFILE is not set: run the suite through the test bed")
    })
}

/// The PCI address of the test bed's edu engine.
pub fn edu_address() -> String {
    pci_devices(EDU_ID)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no edu device (1234:11e8) in this VM"))
}

/// The ivshmem device the test bed calls `name` (`"shm0"`: the 1 MiB BAR2,
/// `"shm1"`: the 64 MiB one): its PCI address.
pub fn shm_address(name: &str) -> String {
    let size = match name {
        "shm0" => 1 << 20,
        "shm1" => 64 << 20,
        other => panic!("unknown ivshmem device {other}"),
    };
    ivshmem_devices()
        .into_iter()
        .find(|(_, s)| *s == size)
        .map(|(b, _)| b)
        .unwrap_or_else(|| panic!("no ivshmem device with a {size:#x}-byte BAR2 ({name})"))
}

/// Asserts that `got == want`, naming `what`, the first differing offset
/// (plus `base`, for BAR offsets) and how many bytes differ, instead of
/// printing two long byte arrays.
#[track_caller]
pub fn assert_bytes(got: &[u8], want: &[u8], base: u64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(first) = got.iter().zip(want).position(|(a, b)| a != b) {
        let differ = got.iter().zip(want).filter(|(a, b)| a != b).count();
        let end = (first + 16).min(got.len());
        panic!(
            "{what}: {differ} of {} bytes differ, the first at {:#x}: got {:02x?}, want {:02x?}",
            got.len(),
            base + first as u64,
            &got[first..end],
            &want[first..end]
        );
    }
}

/// A reader of the kernel log (`/dev/kmsg`) that sees only what is logged
/// after it was opened.
#[derive(Debug)]
pub struct Kmsg {
    file: fs::File,
}

impl Kmsg {
    /// Opens `/dev/kmsg` (non-blocking) positioned at its end.
    pub fn open_at_end() -> std::io::Result<Self> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        file.seek(SeekFrom::End(0))?;
        Ok(Self { file })
    }

    /// Writes `text` into the kernel log, so that `console.log` shows what
    /// the test did next to what the kernel said about it.
    pub fn mark(text: &str) {
        use std::io::Write;
        // One write is one record.
        let line = format!("vm-test: {text}\n");
        if let Ok(mut f) = fs::OpenOptions::new().write(true).open("/dev/kmsg") {
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// The messages logged since the last call (or since opening), without
    /// the record headers.
    pub fn read_new(&mut self) -> Vec<String> {
        self.read_records()
            .into_iter()
            .map(|(_, msg)| msg)
            .collect()
    }

    /// Like [`read_new`](Self::read_new), with each record's timestamp in
    /// microseconds since boot.
    pub fn read_records(&mut self) -> Vec<(u64, String)> {
        use std::io::Read;
        let mut out = Vec::new();
        let mut rec = vec![0u8; 8192];
        loop {
            match self.file.read(&mut rec) {
                Ok(0) => break,
                Ok(n) => {
                    // "prio,seq,usec,flags;message\n" then continuation lines.
                    let text = String::from_utf8_lossy(&rec[..n]);
                    let first = text.lines().next().unwrap_or_default();
                    if let Some((head, msg)) = first.split_once(';') {
                        let usec = head
                            .split(',')
                            .nth(2)
                            .and_then(|u| u.parse().ok())
                            .unwrap_or(0);
                        out.push((usec, msg.to_owned()));
                    }
                }
                // EPIPE: records were overwritten before we read them; go on.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break, // EAGAIN: nothing more
            }
        }
        out
    }

    /// Waits up to `wait` for kernel messages that report an IOMMU (DMAR)
    /// fault and returns all of them that arrived (the kernel logs a fault
    /// from its interrupt handler, just after the faulting DMA; it also
    /// rate-limits them, so none may come).
    pub fn iommu_faults(&mut self, wait: std::time::Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + wait;
        let mut faults = Vec::new();
        loop {
            faults.extend(self.read_new().into_iter().filter(|l| is_iommu_fault(l)));
            if !faults.is_empty() || std::time::Instant::now() >= deadline {
                return faults;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Checks the IOMMU fault messages logged during a DMA *write* by the
/// engine at `engine` (a PCI address) that must not land: every fault record
/// among them must be a DMA write by that device. On this kernel a record
/// reads `DMAR: [DMA Write NO_PASID] Request device [0000:01:00.0] fault addr
/// 0x10007f000 [fault reason 0x05] PTE Write access is not set` (QEMU reports
/// reason 5 for a missing entry too). The address is not checked: under
/// QEMU 7.2 it was once logged as 0x0. Returns how many records there were
/// (possibly none: the kernel rate-limits them, and QEMU drops a fault while
/// the previous one is still pending).
#[track_caller]
pub fn check_write_faults(faults: &[String], engine: &str) -> usize {
    let records: Vec<&String> = faults
        .iter()
        .filter(|l| l.contains("Request device ["))
        .collect();
    for r in &records {
        assert!(
            r.contains(&format!("Request device [{engine}]")) && r.contains("DMA Write"),
            "an IOMMU fault that is not the engine's refused write: {r}"
        );
    }
    records.len()
}

/// Whether a kernel message is about an IOMMU (Intel DMAR) fault.
pub fn is_iommu_fault(line: &str) -> bool {
    line.contains("DMAR") && line.to_ascii_lowercase().contains("fault")
}

/// Reads `len` bytes of a BAR mapping from `offset`, eight bytes per access
/// where alignment allows: under TCG a byte-wise read of 1 MiB takes about a
/// second.
pub fn bar_read(bar: &dmabuf_p2p::vfio::BarMapping, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let words = if offset & 7 == 0 { len / 8 } else { 0 };
    for (i, chunk) in out[..words * 8].chunks_exact_mut(8).enumerate() {
        let v = bar
            .read_u64(offset + 8 * i as u64)
            .unwrap_or_else(|e| panic!("BAR read: {e}"));
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    let done = words * 8;
    if done < len {
        bar.read(offset + done as u64, &mut out[done..])
            .unwrap_or_else(|e| panic!("BAR read: {e}"));
    }
    out
}

/// Writes `data` to a BAR mapping at `offset`, eight bytes per access where
/// alignment allows (see [`bar_read`]).
pub fn bar_write(bar: &dmabuf_p2p::vfio::BarMapping, offset: u64, data: &[u8]) {
    let words = if offset & 7 == 0 { data.len() / 8 } else { 0 };
    for (i, chunk) in data[..words * 8].chunks_exact(8).enumerate() {
        let v = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        bar.write_u64(offset + 8 * i as u64, v)
            .unwrap_or_else(|e| panic!("BAR write: {e}"));
    }
    let done = words * 8;
    if done < data.len() {
        bar.write(offset + done as u64, &data[done..])
            .unwrap_or_else(|e| panic!("BAR write: {e}"));
    }
}

/// A close-on-exec pipe: (read end, write end), for reports from forked children.
pub fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 returns.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: pipe2 just returned this fd, owned by nobody else.
    let read_end = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let write_end = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) };
    (read_end, write_end)
}

/// In a forked child: writes `text` to `fd` and ends the process at once,
/// running none of the parent's destructors.
pub fn child_exit(fd: &std::os::fd::OwnedFd, text: &str, code: i32) -> ! {
    use std::os::fd::AsRawFd;
    // SAFETY: a write from a live buffer to an open pipe.
    unsafe { libc::write(fd.as_raw_fd(), text.as_ptr().cast(), text.len()) };
    // SAFETY: _exit takes an int and never returns.
    unsafe { libc::_exit(code) }
}

/// Anonymous private pages, unmapped on drop (user memory for `map_user`).
#[derive(Debug)]
pub struct AnonPages {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl AnonPages {
    /// Maps `len` bytes; a test helper, so a failed `mmap` fails the test.
    #[allow(clippy::expect_used)]
    pub fn new(len: usize) -> Self {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {len} anonymous bytes");
        Self {
            ptr: std::ptr::NonNull::new(p.cast()).expect("mmap returned null"),
            len,
        }
    }

    /// The first byte.
    pub fn ptr(&self) -> std::ptr::NonNull<u8> {
        self.ptr
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: `mmap` refuses length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonPages {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The PCI class code of an NVMe controller.
pub const NVME_CLASS: u64 = 0x01_08_02;

/// The PCI address of the NVMe controller the test bed calls `name`
/// (`"nvme0"`: 4 MiB namespace, MDTS 128 KiB; `"nvme1"`: 1 MiB namespace
/// and a 16 MiB CMB). They are the only NVMe controllers, in this order.
pub fn nvme_address(name: &str) -> String {
    let index = match name {
        "nvme0" => 0,
        "nvme1" => 1,
        other => panic!("unknown NVMe controller {other}"),
    };
    let sys = Sysfs::default();
    let all: Vec<String> = sys
        .devices()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| sys.class(*a).ok().map(u64::from) == Some(NVME_CLASS))
        .map(|a| a.to_string())
        .collect();
    all.get(index)
        .cloned()
        .unwrap_or_else(|| panic!("no NVMe controller {name} (found {all:?})"))
}

/// The byte at `offset` of the test bed's NVMe images (the same function as
/// the test bed's `nvme_image_byte`, which fills them at boot).
pub fn nvme_image_byte(offset: u64) -> u8 {
    let mut z = (offset / 8).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    z.to_le_bytes()[(offset % 8) as usize]
}

/// `len` bytes of a test bed NVMe image from byte `offset`, as booted.
pub fn nvme_image(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64).map(nvme_image_byte).collect()
}
