//! Helpers for the in-VM test suite: finding the test bed's devices, counting
//! open fds, and asking the host to check an ivshmem backing file.
//!
//! These tests only make sense inside the test VM (`cargo xtask vm-test`); on
//! any other machine they fail loudly, because the devices are not there.

use std::fs;
use std::path::{Path, PathBuf};

/// QEMU's `edu` device.
pub const EDU_ID: (u16, u16) = (0x1234, 0x11e8);
/// QEMU's `ivshmem-plain` device.
pub const IVSHMEM_ID: (u16, u16) = (0x1af4, 0x1110);

fn read_hex(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    u64::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// PCI addresses (`0000:01:00.0`) of all devices with this vendor:device, sorted.
pub fn pci_devices(id: (u16, u16)) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/sys/bus/pci/devices") else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if read_hex(&p.join("vendor")) == Some(u64::from(id.0)) && read_hex(&p.join("device")) == Some(u64::from(id.1)) {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

/// The driver a PCI device is bound to, if any.
pub fn driver_of(bdf: &str) -> Option<String> {
    let link = fs::read_link(format!("/sys/bus/pci/devices/{bdf}/driver")).ok()?;
    link.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// `/dev/vfio/devices/vfioN` of a device bound to vfio-pci.
pub fn vfio_cdev(bdf: &str) -> Option<PathBuf> {
    let dir = fs::read_dir(format!("/sys/bus/pci/devices/{bdf}/vfio-dev")).ok()?;
    dir.flatten().map(|e| PathBuf::from("/dev/vfio/devices").join(e.file_name())).next()
}

/// Size of BAR `bar` from sysfs `resource`.
pub fn bar_size(bdf: &str, bar: usize) -> Option<u64> {
    let text = fs::read_to_string(format!("/sys/bus/pci/devices/{bdf}/resource")).ok()?;
    let line = text.lines().nth(bar)?;
    let mut it = line.split_whitespace().map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok());
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
    pci_devices(IVSHMEM_ID).into_iter().map(|b| {
        let s = bar_size(&b, 2).unwrap_or(0);
        (b, s)
    }).collect()
}

/// The number of open fds of this process.
pub fn open_fd_count() -> usize {
    fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// FNV-1a 64, the hash the host uses for host checks.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Asks the host to check, after the VM has stopped, that bytes
/// `[offset, offset + data.len())` of ivshmem device `shm`'s backing file equal `data`.
pub fn request_host_check(shm: &str, offset: u64, data: &[u8]) {
    directive(&format!("@@host-check {shm} {offset:#x} {:#x} fnv1a64={:016x}", data.len(), fnv1a64(data)));
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
    use std::io::BufRead;
    directive(&format!("@@qmp {{\"execute\":\"{execute}\",\"arguments\":{arguments}}}"));
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => return "{\"error\":\"no answer from the host\"}".to_owned(),
            Ok(_) => {}
        }
        if let Some(answer) = line.trim_end().strip_prefix("@@qmp-reply ") {
            return answer.to_owned();
        }
    }
}
