//! Faults survived: hot-unplug of an exporting device while its dma-buf is
//! mapped (and while a copy is in flight), SIGKILL of a process holding
//! exports and mappings, the exporter closed before the importer, the IOAS
//! destroyed before the dma-buf is closed, and a device reset while mapped.
//!
//! Every test leaves the devices as it found them: `shm1` present and bound
//! to vfio-pci, nothing open.

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::revoke::{Attachment, BufferState, RestorePolicy, RevocationEvent, RevokeReason};
use dmabuf_p2p::vfio::{VfioPciDevice, bind_to_vfio_pci};
use dmabuf_p2p::{ByteRange, Error, PciAddress};
use dmabuf_p2p_engine::DmaEngine;
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_vm_tests::{
    EDU_ID, Kmsg, child_exit, driver_of, ivshmem_devices, open_fd_count, pattern, pci_devices,
    pipe, qmp, request_host_check,
};

const PAGE: u64 = 4096;
/// One edu copy (two 100 ms transfers) takes well under this.
const DMA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the kernel may take to ask for a device back after `device_del`
/// (pciehp waits 5 s after the attention button before it powers the slot
/// off; under TCG everything is slower).
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a removal or a hot-add may take to show in sysfs.
pub(super) const SYSFS_TIMEOUT: Duration = Duration::from_secs(60);

/// Offsets in shm1's BAR2 that only these tests touch (other tests use the
/// low megabytes), so host checks stay valid whatever runs later.
const UNPLUG_BASE: u64 = 0x3e0_0000;
const REPLUG_BASE: u64 = 0x3d0_0000;
const INFLIGHT_BASE: u64 = 0x3c0_0000;

fn edu_addr() -> PciAddress {
    pci_devices(EDU_ID)
        .first()
        .expect("an edu device")
        .parse()
        .unwrap()
}

/// The ivshmem device with a BAR2 of `size` bytes.
pub(super) fn shm_with(size: u64) -> PciAddress {
    let (bdf, _) = ivshmem_devices()
        .into_iter()
        .find(|(_, s)| *s == size)
        .expect("the ivshmem device");
    bdf.parse().unwrap()
}

fn shm0() -> PciAddress {
    shm_with(1 << 20)
}

pub(super) fn sysfs_dir(a: PciAddress) -> String {
    format!("/sys/bus/pci/devices/{a}")
}

/// Prints a line of the fault's story (timings, what the kernel said).
/// libtest shows it when the test fails; writing past its capture would
/// split the `test NAME ... ok` line that the test bed reads.
pub(super) fn note(line: &str) {
    println!("  faults: {line}");
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns
/// how long it took, or `None`.
pub(super) fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    loop {
        if cond() {
            return Some(t.elapsed());
        }
        if t.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The kernel log from the moment of opening: what the kernel said during a
/// fault, for the test output.
struct KernelLog {
    kmsg: Kmsg,
}

impl KernelLog {
    fn open() -> Self {
        Self {
            kmsg: Kmsg::open_at_end().expect("/dev/kmsg"),
        }
    }

    /// New messages as `[seconds] text`.
    fn read_new(&mut self) -> Vec<String> {
        self.kmsg
            .read_records()
            .into_iter()
            .map(|(usec, msg)| {
                format!(
                    "[{:>5}.{:03}] {msg}",
                    usec / 1_000_000,
                    (usec / 1000) % 1000
                )
            })
            .collect()
    }

    fn print_new(&mut self, what: &str) {
        for line in self.read_new() {
            note(&format!("kernel ({what}): {line}"));
        }
    }
}

/// Sends a QMP command through the host and returns its answer, failing
/// the test on a QMP error.
pub(super) fn qmp_ok(execute: &str, arguments: &str) -> String {
    let answer = qmp(execute, arguments);
    assert!(
        answer.contains("\"return\""),
        "QMP {execute} {arguments}: {answer}"
    );
    answer
}

const SHM1_ADD: &str = r#"{"driver":"ivshmem-plain","id":"shm1","memdev":"mem-shm1","bus":"rp2"}"#;

/// The string a QMP command returned (`{"return":"..."}`; no escapes in the
/// values asked for here).
fn qmp_string(answer: &str) -> Option<String> {
    let rest = answer.split_once(r#""return":""#)?.1;
    Some(rest.split_once('"')?.0.to_owned())
}

/// Plugs `shm1` back in and waits for it in sysfs; returns how long the
/// device took to appear.
///
/// QEMU 7.2's ivshmem leaves its memory backend's RAM block registered when
/// it is unplugged from a powered-off slot (`ivshmem_exit` unregisters it
/// only while BAR2 is still mapped), and a `device_add` with the same
/// `memdev` then aborts QEMU (`qemu_ram_set_idstr: Assertion
/// '!new_block->idstr[0]' failed`). So the backend is replaced first: the
/// same file, the same id, a fresh RAM block. A deleted backend's RAM block
/// (still named after the old device) leaves QEMU's list only when the last
/// reference to its memory region goes, which an old flat view drops in an
/// RCU callback some time after `object-del` returns; a `device_add` before
/// that aborts QEMU too (`RAMBlock "…/mem-shm1" already registered`), so
/// the list (`info ramblock`) is watched until the old block is gone.
pub(super) fn replug_shm1(addr: PciAddress) -> Duration {
    let t = Instant::now();
    let path = qmp_string(&qmp_ok(
        "qom-get",
        r#"{"path":"/objects/mem-shm1","property":"mem-path"}"#,
    ))
    .expect("mem-path of mem-shm1");
    // The old device may still be finalizing in QEMU: its backend is "in use".
    loop {
        let answer = qmp("object-del", r#"{"id":"mem-shm1"}"#);
        if answer.contains("\"return\"") {
            break;
        }
        assert!(
            t.elapsed() < SYSFS_TIMEOUT,
            "object-del of mem-shm1 kept failing: {answer}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut block_polls = 0;
    loop {
        block_polls += 1;
        let blocks = qmp_ok(
            "human-monitor-command",
            r#"{"command-line":"info ramblock"}"#,
        );
        assert!(blocks.contains("Block Name"), "info ramblock: {blocks}");
        if !blocks.contains("/mem-shm1") {
            break;
        }
        assert!(
            t.elapsed() < SYSFS_TIMEOUT,
            "the deleted mem-shm1's RAM block stayed registered: {blocks}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    if block_polls > 1 {
        Kmsg::mark(&format!(
            "faults: the deleted mem-shm1's RAM block lingered for {} checks ({:?} since the replug began)",
            block_polls - 1,
            t.elapsed()
        ));
    }
    qmp_ok(
        "object-add",
        &format!(
            r#"{{"qom-type":"memory-backend-file","id":"mem-shm1","mem-path":"{path}","size":{},"share":true}}"#,
            64u64 << 20
        ),
    );
    loop {
        let answer = qmp("device_add", SHM1_ADD);
        if answer.contains("\"return\"") {
            break;
        }
        // "Duplicate device ID": the old device is not finalized yet.
        assert!(
            t.elapsed() < SYSFS_TIMEOUT,
            "device_add of shm1 kept failing: {answer}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let added = t.elapsed();
    let shown =
        wait_until(SYSFS_TIMEOUT, || Path::new(&sysfs_dir(addr)).exists()).unwrap_or_else(|| {
            panic!("{addr} did not appear in sysfs within {SYSFS_TIMEOUT:?} after device_add")
        });
    note(&format!(
        "backend replaced (the old RAM block gone at check {block_polls}) and device_add accepted after {added:?}; {addr} in sysfs {shown:?} later"
    ));
    added + shown
}

/// Binds a freshly hot-added device to vfio-pci. Its sysfs directory shows up
/// a moment before the PCI core lets drivers bind it (`is_added`), and a
/// probe in that gap binds nothing, so retry until a deadline.
pub(super) fn bind_replugged(addr: PciAddress) {
    let t = Instant::now();
    loop {
        match bind_to_vfio_pci(addr) {
            Ok(()) => break,
            Err(e) => assert!(
                t.elapsed() < SYSFS_TIMEOUT,
                "{addr} would not bind to vfio-pci: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    note(&format!(
        "{addr} bound to vfio-pci {:?} after it appeared",
        t.elapsed()
    ));
}

/// Puts `shm1` back the way the suite expects it (present, bound to
/// vfio-pci) when dropped, even if the test failed half-way.
pub(super) struct Shm1Restorer {
    pub(super) addr: PciAddress,
}

impl Drop for Shm1Restorer {
    fn drop(&mut self) {
        if !Path::new(&sysfs_dir(self.addr)).exists() {
            let gone = wait_until(SYSFS_TIMEOUT, || !Path::new(&sysfs_dir(self.addr)).exists());
            if gone.is_some() {
                let _ = std::panic::catch_unwind(|| replug_shm1(self.addr));
            }
        }
        if Path::new(&sysfs_dir(self.addr)).exists()
            && driver_of(&self.addr.to_string()).as_deref() != Some("vfio-pci")
        {
            let _ = std::panic::catch_unwind(|| bind_replugged(self.addr));
        }
    }
}

/// Opens `addr`, binds it to `iommufd` and turns memory decode on.
fn open_exporter(addr: PciAddress, iommufd: &Iommufd) -> VfioPciDevice {
    let mut dev = VfioPciDevice::open(addr).unwrap();
    dev.bind(iommufd).unwrap();
    dev.set_memory_decode(true).unwrap();
    dev
}

/// [`open_exporter`] for a device that was just hot-added and bound. For a
/// moment after the driver bind the device is not ready: its VFIO cdev
/// (`vfio-dev/vfioN`) may not be in sysfs yet, and `VFIO_DEVICE_BIND_IOMMUFD`
/// has answered EAGAIN (both seen in VM runs), so those two are retried until
/// the sysfs deadline; any other error fails at once.
pub(super) fn open_replugged_exporter(addr: PciAddress, iommufd: &Iommufd) -> VfioPciDevice {
    let t = Instant::now();
    loop {
        let mut dev = match VfioPciDevice::open(addr) {
            Ok(dev) => dev,
            Err(e @ dmabuf_p2p::Error::Device { .. }) if t.elapsed() < SYSFS_TIMEOUT => {
                note(&format!(
                    "{addr}: not ready to open after {:?}: {e}",
                    t.elapsed()
                ));
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => panic!("{addr}: open after replug: {e}"),
        };
        match dev.bind(iommufd) {
            Ok(_devid) => {
                note(&format!(
                    "{addr} bound to the iommufd {:?} after opening",
                    t.elapsed()
                ));
                dev.set_memory_decode(true).unwrap();
                return dev;
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && t.elapsed() < SYSFS_TIMEOUT => {
                note(&format!(
                    "{addr}: bind answered EAGAIN after {:?}; retrying",
                    t.elapsed()
                ));
            }
            Err(e) => panic!("{addr}: bind after replug: {e}"),
        }
        drop(dev);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Collects an attachment's events.
fn record_events(att: &Attachment) -> Arc<Mutex<Vec<RevocationEvent>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    att.on_event(move |_, ev| sink.lock().unwrap().push(ev.clone()));
    events
}

/// Hot-unplug of the exporting ivshmem while its dma-buf is mapped: the
/// kernel's request arrives, the attachment is revoked, the device is
/// closed and leaves, a copy to the old IOVA lands nowhere (host check of
/// the backing file), and after a hot-add a fresh export, map and copy work.
#[test]
fn hot_unplug_of_a_mapped_exporter() {
    let shm1 = shm_with(64 << 20);
    let _restore = Shm1Restorer { addr: shm1 };
    let mut klog = KernelLog::open();
    let fds_at_start = open_fd_count();

    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut edu = Edu::open(edu_addr(), &ioas).unwrap();
    let src = Memfd::new("unplug-src", 4 * PAGE).unwrap();
    let before_unplug = pattern(0x31, PAGE as usize);
    let after_unplug = pattern(0x32, PAGE as usize);
    src.write_at(0, &before_unplug).unwrap();
    src.write_at(PAGE, &after_unplug).unwrap();
    let src_map = ioas
        .map_file(
            &src,
            ByteRange::new(0, 4 * PAGE),
            IovaPlacement::Auto,
            MapPerms::Read,
        )
        .unwrap();

    let exporter = open_exporter(shm1, &iommufd);
    assert!(
        exporter.unplug_request_fd().is_some(),
        "bind registers the device-request eventfd"
    );
    assert!(!exporter.unplug_requested().unwrap());
    let export = exporter
        .export_bar(2, &[ByteRange::new(UNPLUG_BASE, 16 * PAGE)])
        .unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    let events = record_events(&att);
    let old_iova = att.iova();

    // The path works before the fault.
    edu.memcpy(src_map.iova(), old_iova, PAGE, DMA_TIMEOUT)
        .unwrap();
    {
        let bar = exporter.map_bar(2).unwrap();
        let mut got = vec![0u8; PAGE as usize];
        bar.read(UNPLUG_BASE, &mut got).unwrap();
        assert_eq!(got, before_unplug, "the copy before the unplug landed");
    } // a BAR mmap holds the device open too: none may outlive the request

    let t0 = Instant::now();
    qmp_ok("device_del", r#"{"id":"shm1"}"#);
    let asked = exporter.wait_unplug_request(REQUEST_TIMEOUT).unwrap();
    klog.print_new("device_del");
    assert!(
        asked,
        "no device request within {REQUEST_TIMEOUT:?} of device_del"
    );
    let request_after = t0.elapsed();
    note(&format!(
        "device request {request_after:?} after device_del"
    ));

    // The hub revoked everything; the device is still there, waiting for us.
    assert!(
        exporter.unplug_requested().unwrap(),
        "the request is remembered"
    );
    assert_eq!(
        exporter.hub().state(),
        BufferState::Gone(RevokeReason::Unplug)
    );
    assert!(att.is_revoked());
    assert_eq!(att.revoked_reason(), Some(RevokeReason::Unplug));
    assert!(matches!(att.ensure_live(), Err(Error::Revoked { .. })));
    assert_eq!(
        events.lock().unwrap().as_slice(),
        &[RevocationEvent::Revoked(RevokeReason::Unplug)]
    );
    assert!(
        Path::new(&sysfs_dir(shm1)).exists(),
        "the kernel waits for the device to be closed"
    );
    match exporter.export_bar(2, &[ByteRange::new(0, PAGE)]) {
        Err(Error::Device {
            device, problem, ..
        }) => {
            assert_eq!(device, shm1.to_string());
            assert!(problem.contains("being removed"), "{problem}");
        }
        other => panic!("export after the unplug request: {other:?}"),
    }
    assert!(matches!(
        Attachment::map(
            &export,
            &ioas,
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
            RestorePolicy::Automatic
        ),
        Err(Error::Revoked { .. })
    ));

    // A raw copy to the old IOVA must not reach the BAR: the IOMMU entries
    // are gone. The engine itself completes (the IOMMU drops the writes).
    let raw = edu.memcpy(src_map.iova() + PAGE, old_iova, PAGE, DMA_TIMEOUT);
    note(&format!(
        "raw copy to the revoked IOVA {old_iova:#x}: {raw:?}"
    ));
    klog.print_new("copy to the revoked IOVA");

    // Close the device: the kernel finishes the removal.
    let t1 = Instant::now();
    drop(exporter);
    let gone = wait_until(SYSFS_TIMEOUT, || !Path::new(&sysfs_dir(shm1)).exists());
    klog.print_new("close");
    let gone =
        gone.unwrap_or_else(|| panic!("{shm1} still in sysfs {SYSFS_TIMEOUT:?} after closing it"));
    note(&format!(
        "{shm1} left sysfs {gone:?} after the close ({:?} after device_del)",
        t1.elapsed() + request_after
    ));
    assert!(att.is_revoked());
    // What the engine wrote after the revoke is not in the device's memory:
    // the host checks the backing file (the first copy is still there).
    request_host_check("shm1", UNPLUG_BASE, &before_unplug);
    drop((att, export));

    // Hot-add it again, bind it, and a fresh export, map and copy work.
    replug_shm1(shm1);
    klog.print_new("device_add");
    // virtio-pci matches every device of vendor 0x1af4 and refuses ivshmem in
    // its probe; while that probe runs, sysfs shows it as the driver. Once
    // the probes are over, no driver may hold the device.
    let unbound = wait_until(SYSFS_TIMEOUT, || driver_of(&shm1.to_string()).is_none());
    assert!(
        unbound.is_some(),
        "a hot-added ivshmem has no driver once probing is over, but {:?} still holds it {SYSFS_TIMEOUT:?} later",
        driver_of(&shm1.to_string())
    );
    bind_replugged(shm1);
    assert_eq!(driver_of(&shm1.to_string()).as_deref(), Some("vfio-pci"));
    let exporter = open_replugged_exporter(shm1, &iommufd);
    {
        let bar = exporter.map_bar(2).unwrap();
        let mut got = vec![0u8; PAGE as usize];
        bar.read(UNPLUG_BASE, &mut got).unwrap();
        assert_eq!(
            got, before_unplug,
            "the device memory survived unplug and replug; nothing later landed"
        );
    }
    let export = exporter
        .export_bar(2, &[ByteRange::new(REPLUG_BASE, 16 * PAGE)])
        .unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    edu.memcpy(src_map.iova() + PAGE, att.iova(), PAGE, DMA_TIMEOUT)
        .unwrap();
    let bar = exporter.map_bar(2).unwrap();
    let mut got = vec![0u8; PAGE as usize];
    bar.read(REPLUG_BASE, &mut got).unwrap();
    assert_eq!(
        got, after_unplug,
        "a copy into the re-plugged device landed"
    );
    request_host_check("shm1", REPLUG_BASE, &after_unplug);
    drop((bar, att, export, exporter, edu, src_map, src, ioas, iommufd));
    klog.print_new("end");
    assert_eq!(open_fd_count(), fds_at_start, "no fd leaked");
}

/// Hot-unplug while a copy into the exporter is half done: the engine has
/// read the source, the write into the BAR is still to come when the kernel
/// asks for the device back. The revoke tears the IOVA range down first, so
/// the write is dropped by the IOMMU; every earlier copy is in the device's
/// memory. Then the device comes back and exports again.
#[test]
fn hot_unplug_during_a_copy() {
    const CHUNK: u64 = 2048;
    let shm1 = shm_with(64 << 20);
    let _restore = Shm1Restorer { addr: shm1 };
    let mut klog = KernelLog::open();
    let fds_at_start = open_fd_count();

    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut edu = Edu::open(edu_addr(), &ioas).unwrap();
    let data = pattern(0x41, 2 * CHUNK as usize);
    let src = Memfd::new("inflight-src", PAGE).unwrap();
    src.write_at(0, &data).unwrap();
    let src_map = ioas
        .map_file(
            &src,
            ByteRange::new(0, PAGE),
            IovaPlacement::Auto,
            MapPerms::Read,
        )
        .unwrap();

    let exporter = open_replugged_exporter(shm1, &iommufd);
    {
        let bar = exporter.map_bar(2).unwrap();
        bar.write(INFLIGHT_BASE, &[0u8; 2 * CHUNK as usize])
            .unwrap();
    }
    let export = exporter
        .export_bar(2, &[ByteRange::new(INFLIGHT_BASE, 16 * PAGE)])
        .unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();

    // Copy 0 lands; copy 1 is started (source read into the engine) and
    // left half done while the device is taken away.
    edu.memcpy(src_map.iova(), att.iova(), CHUNK, DMA_TIMEOUT)
        .unwrap();
    att.ensure_live().unwrap();
    edu.memcpy_start(src_map.iova() + CHUNK, att.iova() + CHUNK, CHUNK)
        .unwrap();
    let t0 = Instant::now();
    qmp_ok("device_del", r#"{"id":"shm1"}"#);
    assert!(
        exporter.wait_unplug_request(REQUEST_TIMEOUT).unwrap(),
        "no device request after device_del"
    );
    note(&format!(
        "device request {:?} after device_del, with a copy in flight",
        t0.elapsed()
    ));
    assert_eq!(att.revoked_reason(), Some(RevokeReason::Unplug));
    // The engine finishes the copy: its write goes to a torn-down IOVA.
    edu.memcpy_wait(DMA_TIMEOUT).unwrap();
    klog.print_new("copy finished after the revoke");

    drop(exporter);
    let gone = wait_until(SYSFS_TIMEOUT, || !Path::new(&sysfs_dir(shm1)).exists())
        .unwrap_or_else(|| panic!("{shm1} still in sysfs after closing it"));
    note(&format!("{shm1} left sysfs {gone:?} after the close"));
    // In the backing file: copy 0, then zeros where the half-done copy
    // would have written.
    let mut want = data[..CHUNK as usize].to_vec();
    want.extend_from_slice(&[0u8; CHUNK as usize]);
    request_host_check("shm1", INFLIGHT_BASE, &want);
    drop((att, export));

    replug_shm1(shm1);
    bind_replugged(shm1);
    let exporter = open_replugged_exporter(shm1, &iommufd);
    let bar = exporter.map_bar(2).unwrap();
    let mut got = vec![0u8; 2 * CHUNK as usize];
    bar.read(INFLIGHT_BASE, &mut got).unwrap();
    assert_eq!(got, want, "copy 0 is there, the half-done copy is not");
    let export = exporter
        .export_bar(2, &[ByteRange::new(INFLIGHT_BASE, 16 * PAGE)])
        .unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    assert!(!att.is_revoked());
    drop((bar, att, export, exporter, edu, src_map, src, ioas, iommufd));
    klog.print_new("end");
    assert_eq!(open_fd_count(), fds_at_start, "no fd leaked");
}

/// `pid/fd` of every fd in the system that is a VFIO dma-buf (fdinfo's
/// `exp_name:\tvfio_pci_core`).
fn vfio_dmabuf_fds() -> Vec<String> {
    let mut found = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            if fs::read_to_string(fd.path()).is_ok_and(|t| t.contains("exp_name:\tvfio_pci_core")) {
                found.push(format!("{pid}/{}", fd.file_name().to_string_lossy()));
            }
        }
    }
    found
}

/// The VFIO dma-bufs the kernel still has, from debugfs
/// (`/sys/kernel/debug/dma_buf/bufinfo`), or `None` without debugfs.
fn vfio_dmabufs_in_debugfs() -> Option<usize> {
    let text = fs::read_to_string("/sys/kernel/debug/dma_buf/bufinfo").ok()?;
    Some(text.lines().filter(|l| l.contains("vfio_pci_core")).count())
}

/// What the killed child does: open the engine and the exporter, export,
/// map, start a copy into the export, say so on `ready`, and wait to die.
fn child_hold_and_wait(ready: &OwnedFd) -> Result<(), dmabuf_p2p_engine::Error> {
    let iommufd = Iommufd::open()?;
    let ioas = iommufd.alloc_ioas()?;
    let mut edu = Edu::open(edu_addr(), &ioas)?;
    let dev = open_exporter(shm0(), &iommufd);
    let export = dev.export_bar(2, &[ByteRange::new(0, 16 * PAGE)])?;
    let second = dev.export_bar(2, &[ByteRange::new(16 * PAGE, 16 * PAGE)])?;
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )?;
    let src = Memfd::new("sigkill-src", PAGE)?;
    let src_map = ioas.map_file(
        &src,
        ByteRange::new(0, PAGE),
        IovaPlacement::Auto,
        MapPerms::Read,
    )?;
    edu.memcpy_start(src_map.iova(), att.iova(), 2048)?;
    // SAFETY: writes one byte from a local to the pipe's write end, open
    // for the call.
    unsafe { libc::write(ready.as_raw_fd(), b"R".as_ptr().cast(), 1) };
    loop {
        // SAFETY: pause() takes no arguments; SIGKILL ends it.
        unsafe { libc::pause() };
        let _ = (&dev, &export, &second, &att, &src_map);
    }
}

/// A process holding an engine, an exporter, two exports, a mapping and a
/// copy in flight is killed with SIGKILL: afterwards no VFIO dma-buf is left
/// anywhere (fdinfo of every process, and debugfs), and both devices open,
/// export, map and copy again.
#[test]
fn sigkill_of_a_process_holding_exports_and_mappings() {
    let fds_at_start = open_fd_count();
    assert_eq!(
        vfio_dmabuf_fds(),
        Vec::<String>::new(),
        "VFIO dma-bufs open before the test"
    );
    let (read_end, write_end) = pipe();

    // SAFETY: the child runs only this test's code (no unwinding back into
    // the harness: every path ends in _exit). The other threads of this
    // process (the harness waiting for this test) hold no locks the child
    // needs.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        drop(read_end);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            child_hold_and_wait(&write_end)
        }));
        let msg = match result {
            Ok(Err(e)) => format!("E{e}"),
            Ok(Ok(())) => "Ereturned".to_owned(),
            Err(_) => "Epanicked".to_owned(),
        };
        child_exit(&write_end, &msg, 1);
    }
    drop(write_end);
    let mut pipe = fs::File::from(read_end);
    let mut first = [0u8; 1];
    let n = pipe.read(&mut first).unwrap();
    if n == 0 || first[0] != b'R' {
        let mut rest = String::new();
        let _ = pipe.read_to_string(&mut rest);
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        panic!(
            "the child failed to set up: {}{rest}",
            String::from_utf8_lossy(&first[..n])
        );
    }
    let held: Vec<String> = vfio_dmabuf_fds()
        .into_iter()
        .filter(|f| f.starts_with(&format!("{pid}/")))
        .collect();
    // Two exports; the mapping of the first holds that same fd (shared by
    // reference count, not duplicated).
    if held.len() != 2 {
        // SAFETY: signalling our own child, so that it does not keep the
        // devices open for the tests after this one.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        panic!("the child's VFIO dma-buf fds: {held:?}, expected 2");
    }
    let in_debugfs = vfio_dmabufs_in_debugfs();
    note(&format!(
        "child {pid} holds VFIO dma-bufs {held:?}; debugfs lists {in_debugfs:?}"
    ));

    let t = Instant::now();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let mut status = 0;
    // SAFETY: reaping our own child; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "wait status {status:#x}"
    );
    note(&format!("child killed and reaped in {:?}", t.elapsed()));

    let left = wait_until(Duration::from_secs(10), || {
        vfio_dmabuf_fds().is_empty() && vfio_dmabufs_in_debugfs().unwrap_or(0) == 0
    });
    assert!(
        left.is_some(),
        "VFIO dma-bufs outlive the killed process: fds {:?}, debugfs {:?}",
        vfio_dmabuf_fds(),
        vfio_dmabufs_in_debugfs()
    );
    if in_debugfs.is_some() {
        assert_eq!(
            in_debugfs,
            Some(2),
            "debugfs listed the child's two buffers while it lived"
        );
    }

    // Both devices are free again and work. (Let the engine finish the
    // transfer the child started: QEMU's edu runs it to the end.)
    std::thread::sleep(Duration::from_millis(300));
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut edu = Edu::open(edu_addr(), &ioas).unwrap();
    let dev = open_exporter(shm0(), &iommufd);
    let export = dev.export_bar(2, &[ByteRange::new(0, 16 * PAGE)]).unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    let data = pattern(0x51, 2048);
    let src = Memfd::new("after-kill", PAGE).unwrap();
    src.write_at(0, &data).unwrap();
    let src_map = ioas
        .map_file(
            &src,
            ByteRange::new(0, PAGE),
            IovaPlacement::Auto,
            MapPerms::Read,
        )
        .unwrap();
    edu.memcpy(src_map.iova(), att.iova() + PAGE, 2048, DMA_TIMEOUT)
        .unwrap();
    let mut got = vec![0u8; 2048];
    dev.map_bar(2).unwrap().read(PAGE, &mut got).unwrap();
    assert_eq!(got, data, "a copy after the kill lands");
    drop((src_map, src, att, export, dev, edu, ioas, iommufd, pipe));
    assert_eq!(open_fd_count(), fds_at_start);
}

/// The exporter is closed while an importer's attachment lives: the
/// attachment is revoked for good, the buffer cannot be mapped again, a
/// copy to the old IOVA lands nowhere, and everything drops cleanly
/// afterwards in the "wrong" order.
#[test]
fn exporter_closed_before_the_importer() {
    let fds_at_start = open_fd_count();
    let shm = shm0();
    const OFF: u64 = 0x8_0000;
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut edu = Edu::open(edu_addr(), &ioas).unwrap();
    let first = pattern(0x61, 2048);
    let second = pattern(0x62, 2048);
    let src = Memfd::new("close-src", PAGE).unwrap();
    src.write_at(0, &first).unwrap();
    src.write_at(2048, &second).unwrap();
    let src_map = ioas
        .map_file(
            &src,
            ByteRange::new(0, PAGE),
            IovaPlacement::Auto,
            MapPerms::Read,
        )
        .unwrap();

    let dev = open_exporter(shm, &iommufd);
    let export = dev
        .export_bar(2, &[ByteRange::new(OFF, 16 * PAGE)])
        .unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    let events = record_events(&att);
    let hub = Arc::clone(dev.hub());
    edu.memcpy(src_map.iova(), att.iova(), 2048, DMA_TIMEOUT)
        .unwrap();

    drop(dev);
    assert_eq!(hub.state(), BufferState::Gone(RevokeReason::DeviceClosed));
    assert_eq!(att.revoked_reason(), Some(RevokeReason::DeviceClosed));
    assert_eq!(
        events.lock().unwrap().as_slice(),
        &[RevocationEvent::Revoked(RevokeReason::DeviceClosed)]
    );
    assert!(matches!(att.restore(), Err(Error::Revoked { .. })));
    assert!(matches!(att.ensure_live(), Err(Error::Revoked { .. })));
    // The dma-buf fd is still a dma-buf, revoked for good in the kernel.
    assert_eq!(export.dmabuf().size().unwrap(), 16 * PAGE);
    assert!(matches!(
        Attachment::map(
            &export,
            &ioas,
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
            RestorePolicy::Automatic
        ),
        Err(Error::Revoked { .. })
    ));
    match ioas.map_dmabuf(export.dmabuf(), IovaPlacement::Auto, MapPerms::ReadWrite) {
        Err(Error::Revoked { .. }) => {}
        other => panic!("the kernel maps a buffer of a closed exporter: {other:?}"),
    }
    edu.memcpy(src_map.iova() + 2048, att.iova(), 2048, DMA_TIMEOUT)
        .unwrap();
    // Importer side last, in the "wrong" order: the IOAS handle and the
    // iommufd before the attachment that maps into them.
    drop(iommufd);
    drop(ioas);
    drop(export);
    drop(att);
    drop((src_map, src, edu));
    assert_eq!(open_fd_count(), fds_at_start);

    // The device memory holds the first copy, not the one after the close.
    let iommufd = Iommufd::open().unwrap();
    let dev = open_exporter(shm, &iommufd);
    let mut got = vec![0u8; 2048];
    dev.map_bar(2).unwrap().read(OFF, &mut got).unwrap();
    assert_eq!(got, first, "nothing landed after the exporter was closed");
}

/// `IOMMU_DESTROY` of an IOAS by its ID, behind the library's back.
fn destroy_ioas_raw(iommufd: &Iommufd, id: u32) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let arg = super::uapi::iommu_destroy {
        size: std::mem::size_of::<super::uapi::iommu_destroy>() as u32,
        id,
    };
    // SAFETY: IOMMU_DESTROY reads an 8-byte `iommu_destroy`, which `arg` is,
    // for the duration of the call; the iommufd is open.
    let r = unsafe {
        libc::ioctl(
            iommufd.as_fd().as_raw_fd(),
            super::uapi::IOMMU_DESTROY as libc::Ioctl,
            &arg,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The IOAS goes away before the dma-buf mapped into it is closed: once in
/// the library's order (attachment, then the last IOAS handle), and once
/// destroyed by ID behind the library's back while the attachment still
/// maps it. Revoking and restoring the exporter afterwards, and closing
/// everything, is clean.
#[test]
fn ioas_destroyed_before_the_dmabuf_is_closed() {
    let fds_at_start = open_fd_count();
    let iommufd = Iommufd::open().unwrap();
    let dev = open_exporter(shm0(), &iommufd);
    let export = dev.export_bar(2, &[ByteRange::new(0, 16 * PAGE)]).unwrap();
    let refs_alone = export.dmabuf().fdinfo().unwrap().count;

    // In order: the attachment, then the last IOAS handle (IOMMU_DESTROY).
    let ioas = iommufd.alloc_ioas().unwrap();
    let id = ioas.id();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    assert!(
        export.dmabuf().fdinfo().unwrap().count > refs_alone,
        "the mapping holds the buffer"
    );
    drop(att);
    drop(ioas);
    assert!(
        matches!(iommufd.iova_ranges(id), Err(Error::UnknownObject { .. })),
        "IOAS {id} is destroyed"
    );
    assert_eq!(
        export.dmabuf().fdinfo().unwrap().count,
        refs_alone,
        "nothing holds the buffer but its fd"
    );
    dev.set_memory_decode(false).unwrap();
    dev.set_memory_decode(true).unwrap();

    // Behind the library's back: the IOAS is destroyed while the
    // attachment maps the buffer into it.
    let ioas = iommufd.alloc_ioas().unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    let events = record_events(&att);
    destroy_ioas_raw(&iommufd, ioas.id()).unwrap();
    assert!(matches!(
        iommufd.iova_ranges(ioas.id()),
        Err(Error::UnknownObject { .. })
    ));
    // The exporter revokes and restores: the attachment cannot unmap or map
    // into the vanished IOAS, and says so instead of failing loudly.
    // (A kernel revoke keeps the dead area reserved until the restore, so the
    // failing unmap is the restore's.)
    dev.set_memory_decode(false).unwrap();
    assert_eq!(att.revoked_reason(), Some(RevokeReason::MemoryDecodeOff));
    dev.set_memory_decode(true).unwrap();
    assert!(att.is_revoked(), "nothing to restore into");
    assert!(
        att.last_error()
            .is_some_and(|e| e.contains("IOMMU_IOAS_UNMAP")),
        "{:?}",
        att.last_error()
    );
    let evs = events.lock().unwrap().clone();
    assert!(
        matches!(
            evs.as_slice(),
            [
                RevocationEvent::Revoked(RevokeReason::MemoryDecodeOff),
                RevocationEvent::RestoreFailed(_)
            ]
        ),
        "{evs:?}"
    );
    note(&format!("attachment into a destroyed IOAS: {evs:?}"));
    // The dma-buf is closed first, then the attachment and the IOAS handle
    // (their unmap and destroy find nothing), then the exporter.
    drop(export);
    drop(att);
    drop(ioas);
    drop(dev);
    drop(iommufd);
    assert_eq!(open_fd_count(), fds_at_start);
}

/// A device reset while its BAR is mapped for an engine: the attachment is
/// revoked and restored automatically at the same IOVA, the bytes in the
/// BAR survive, and the next copy lands (checked in the guest and in the
/// backing file).
#[test]
fn reset_while_mapped_revokes_and_restores() {
    const RESET_BASE: u64 = 0x3b0_0000;
    let fds_at_start = open_fd_count();
    let shm1 = shm_with(64 << 20);
    let iommufd = Iommufd::open().unwrap();
    let ioas = iommufd.alloc_ioas().unwrap();
    let mut edu = Edu::open(edu_addr(), &ioas).unwrap();
    let before = pattern(0x71, 2048);
    let after = pattern(0x72, 2048);
    let src = Memfd::new("reset-src", PAGE).unwrap();
    src.write_at(0, &before).unwrap();
    src.write_at(2048, &after).unwrap();
    let src_map = ioas
        .map_file(
            &src,
            ByteRange::new(0, PAGE),
            IovaPlacement::Auto,
            MapPerms::Read,
        )
        .unwrap();

    let dev = open_exporter(shm1, &iommufd);
    assert!(dev.supports_reset().unwrap(), "ivshmem resets here");
    let export = dev
        .export_bar(2, &[ByteRange::new(RESET_BASE, 16 * PAGE)])
        .unwrap();
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )
    .unwrap();
    let events = record_events(&att);
    let iova = att.iova();
    edu.memcpy(src_map.iova(), iova, 2048, DMA_TIMEOUT).unwrap();
    let bar = dev.map_bar(2).unwrap();

    dev.reset().unwrap();
    assert_eq!(
        events.lock().unwrap().as_slice(),
        &[
            RevocationEvent::Revoked(RevokeReason::Reset),
            RevocationEvent::Restored
        ]
    );
    assert!(!att.is_revoked());
    assert_eq!(att.iova(), iova, "restored at the same IOVA");
    assert_eq!(att.counts(), (1, 1));
    assert!(
        dev.memory_decode().unwrap(),
        "VFIO restores PCI_COMMAND after the reset"
    );
    let mut got = vec![0u8; 2048];
    bar.read(RESET_BASE, &mut got).unwrap();
    assert_eq!(got, before, "the BAR's bytes survive the reset");

    edu.memcpy(src_map.iova() + 2048, iova + 2048, 2048, DMA_TIMEOUT)
        .unwrap();
    bar.read(RESET_BASE + 2048, &mut got).unwrap();
    assert_eq!(got, after, "the first copy after the reset lands");
    let mut both = before.clone();
    both.extend_from_slice(&after);
    request_host_check("shm1", RESET_BASE, &both);
    drop((bar, att, export, dev, src_map, src, edu, ioas, iommufd));
    assert_eq!(open_fd_count(), fds_at_start);
}
