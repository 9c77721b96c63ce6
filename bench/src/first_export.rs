//! Part 10, **firstexport**: what the first BAR export of a freshly opened
//! device costs against a later one, and whose cost it is. The device
//! under test is opened (`VfioPciDevice::open`, which reads the device's
//! sysfs directory, its `resource` lines included), bound, decode turned
//! on, and the same range exported three times; then the handle is closed.
//! Repetitions alternate who exports first: the library (`export_bar`),
//! then a raw `VFIO_DEVICE_FEATURE(DMA_BUF)` on the same fd, then the
//! library again; or the raw export first, then the library twice. So the
//! kernel's own first-export cost (raw first against raw after) is told
//! from the library's (its first export after a raw one against its
//! second). It runs before the other parts open the device (a device is
//! bound once at a time).

use std::os::fd::AsRawFd;
use std::time::Instant;

use dmabuf_p2p::importer::iommufd::Iommufd;
use dmabuf_p2p::vfio::VfioPciDevice;
use dmabuf_p2p::{ByteRange, PciAddress};

use crate::stats::{Stats, emit, ns_since};
use crate::{BAR, Opts, R, raw};

/// The records' group.
const GROUP: &str = "firstexport";
/// The exported range: the first 64 KiB.
const LEN: u64 = 64 << 10;

pub fn first_export(opts: &Opts, iommufd: &Iommufd, bdf: &str) -> R<()> {
    let address: PciAddress = bdf.parse()?;
    let (mut open, mut bind, mut decode, mut close) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Library first (then raw, then library); raw first (then library twice).
    let (mut lib_first, mut raw_after, mut lib_second) = (Vec::new(), Vec::new(), Vec::new());
    let (mut raw_first, mut lib_after_raw) = (Vec::new(), Vec::new());
    let lib = |dev: &VfioPciDevice| -> R<f64> {
        let t = Instant::now();
        drop(dev.export_bar(BAR, &[ByteRange::new(0, LEN)])?);
        Ok(ns_since(t))
    };
    let raw = |dev: &VfioPciDevice| -> R<f64> {
        let t = Instant::now();
        let fd = raw::export(dev.as_raw_fd(), BAR, 0, LEN)?;
        raw::close(fd)?;
        Ok(ns_since(t))
    };
    opts.budget(20, 80, 10.0).repeat(|i| -> R<()> {
        let t = Instant::now();
        let mut dev = VfioPciDevice::open(address)?;
        open.push(ns_since(t));
        let t = Instant::now();
        dev.bind(iommufd)?;
        bind.push(ns_since(t));
        // As the library's docs ask before an export.
        let t = Instant::now();
        dev.set_memory_decode(true)?;
        decode.push(ns_since(t));
        if i % 2 == 0 {
            lib_first.push(lib(&dev)?);
            raw_after.push(raw(&dev)?);
        } else {
            raw_first.push(raw(&dev)?);
            lib_after_raw.push(lib(&dev)?);
        }
        lib_second.push(lib(&dev)?);
        let t = Instant::now();
        drop(dev);
        close.push(ns_since(t));
        Ok(())
    })?;
    for (name, c) in [
        ("open", &open),
        ("bind", &bind),
        ("decode_on", &decode),
        ("library_first", &lib_first),
        ("raw_after_library", &raw_after),
        ("raw_first", &raw_first),
        ("library_after_raw", &lib_after_raw),
        ("library_later", &lib_second),
        ("close", &close),
    ] {
        emit(GROUP, "library", name, LEN, "ns", &Stats::of(c));
    }
    Ok(())
}
