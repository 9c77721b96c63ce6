//! Handing a BAR to another driver: a VFIO BAR export imported into
//! virtio-gpu (DRM PRIME) and scanned out, in the `virtio_gpu` profile:
//! edu0, shm0 (1 MiB BAR2), gpu0 (blob resources) and gpu1 (without) below
//! one switch, gpu2 (blob resources) on the root bus; each GPU's screen is
//! 256x256, so an XRGB8888 framebuffer is 256 KiB of the BAR.
//!
//! The proof is in pixels: the host dumps the screen (QMP `screendump`)
//! and hashes it and the same bytes of shm0's backing file; the guest
//! compares both with what it wrote into the BAR. QEMU's trace log
//! (`@@qemu-log`) shows what the host did with the blob resource: created
//! with the BAR as backing, detached at the revocation.
//!
//! BAR areas of shm0, 256 KiB each: 0x0.. (the multi-range export's two
//! 128 KiB halves), 0x40000.. (the framebuffer), 0x80000.. (a solid
//! framebuffer), 0xc0000.. (`drm-test`'s).

// Failing a test by panicking is what tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::{AsFd, BorrowedFd};

use dmabuf_p2p::importer::drm::{DrmDevice, GemImport};
use dmabuf_p2p::importer::iommufd::{IovaPlacement, MapPerms};
use dmabuf_p2p::revoke::{Attachment, RestorePolicy};
use dmabuf_p2p::topology::{KernelMapType, Route};
use dmabuf_p2p::vfio::BarMapping;
use dmabuf_p2p::{ByteRange, Error, ImportRefusal, Iommufd, Memfd, PciAddress, VfioPciDevice};
use dmabuf_p2p_engine::DmaEngine;
use dmabuf_p2p_engine::edu::Edu;
use dmabuf_p2p_vm_tests::{
    DMA_TIMEOUT, bar_write, edu_address, fnv1a64, pattern, pci_devices, qemu_log,
    request_host_check, screendump, shm_address, vm_profile, xrgb_to_rgb,
};
use drm::buffer::{DrmFourcc, DrmModifier, Handle, PlanarBuffer};
use drm::control::{Device as _, FbCmd2Flags, ModeTypeFlags, connector, crtc, framebuffer};

/// virtio-gpu's PCI IDs (a modern virtio device, 0x1040 + 16).
const VIRTIO_GPU: (u16, u16) = (0x1af4, 0x1050);
/// The screen: 256x256 XRGB8888.
const W: u32 = 256;
const H: u32 = 256;
const STRIDE: u32 = W * 4;
const FB_BYTES: u64 = (STRIDE * H) as u64;
/// Where the framebuffer lives in shm0's BAR2.
const AREA: u64 = 0x4_0000;

/// A DRM device as the drm crate wants it: the library's fd.
struct Card(DrmDevice);

impl AsFd for Card {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
impl drm::Device for Card {}
impl drm::control::Device for Card {}

/// An imported GEM object as a one-plane XRGB8888 framebuffer.
struct Imported(u32);

impl PlanarBuffer for Imported {
    fn size(&self) -> (u32, u32) {
        (W, H)
    }
    fn format(&self) -> DrmFourcc {
        DrmFourcc::Xrgb8888
    }
    fn modifier(&self) -> Option<DrmModifier> {
        None
    }
    fn pitches(&self) -> [u32; 4] {
        [STRIDE, 0, 0, 0]
    }
    fn handles(&self) -> [Option<Handle>; 4] {
        [
            std::num::NonZeroU32::new(self.0).map(Handle::from),
            None,
            None,
            None,
        ]
    }
    fn offsets(&self) -> [u32; 4] {
        [0; 4]
    }
}

/// The GPUs: (PCI address, card) of those below the switch and the one on
/// the root bus (bus 0).
fn gpus() -> Vec<(PciAddress, DrmDevice)> {
    pci_devices(VIRTIO_GPU)
        .iter()
        .map(|b| {
            let addr: PciAddress = b.parse().unwrap();
            let card = DrmDevice::for_pci(addr).unwrap_or_else(|e| {
                panic!(
                    "{e}: this profile needs a kernel with the fragment's DRM block \
                     (CONFIG_DRM_VIRTIO_GPU), which ../shared/vm/bzImage lacks"
                )
            });
            (addr, card)
        })
        .collect()
}

/// gpu0: below the switch, with blob resources.
fn gpu0() -> (PciAddress, DrmDevice) {
    gpus()
        .into_iter()
        .find(|(a, d)| a.bus() != 0 && d.prime_importer().unwrap().accepted_by_vfio())
        .expect("a virtio-gpu with blob resources below the switch")
}

/// The connected connector, the CRTC and the 256x256 mode of a card.
fn output(card: &Card) -> (connector::Handle, crtc::Handle, drm::control::Mode) {
    let res = card.resource_handles().unwrap();
    let conn = res
        .connectors()
        .iter()
        .map(|h| card.get_connector(*h, true).unwrap())
        .find(|c| c.state() == connector::State::Connected)
        .expect("a connected connector");
    let mode = *conn
        .modes()
        .iter()
        .find(|m| {
            m.size() == (W as u16, H as u16) && m.mode_type().contains(ModeTypeFlags::PREFERRED)
        })
        .or_else(|| {
            conn.modes()
                .iter()
                .find(|m| m.size() == (W as u16, H as u16))
        })
        .expect("the 256x256 mode");
    (conn.handle(), res.crtcs()[0], mode)
}

/// Scans framebuffer `fb` out on the card's only output.
fn show(card: &Card, fb: framebuffer::Handle) {
    let (conn, crtc, mode) = output(card);
    card.set_crtc(crtc, Some(fb), (0, 0), &[conn], Some(mode))
        .unwrap();
}

/// The screen's hash, and that of shm0's backing file at the framebuffer.
fn screen(gpu: &str) -> (String, String) {
    let answer = screendump(gpu, (0, 0, W, H), Some(("shm0", AREA, u64::from(STRIDE))));
    let field = |name: &str| {
        let key = format!("\"{name}\":\"");
        let at = answer
            .find(&key)
            .unwrap_or_else(|| panic!("no {name} in the host's answer {answer}"));
        answer[at + key.len()..at + key.len() + 16].to_owned()
    };
    (field("rect_fnv1a64"), field("backing_fnv1a64"))
}

/// The hash a screendump of XRGB8888 pixels `fb` has.
fn expected(fb: &[u8]) -> String {
    format!("{:016x}", fnv1a64(&xrgb_to_rgb(fb)))
}

/// The new lines of QEMU's log.
fn new_log_lines() -> Vec<String> {
    let answer: serde_json::Value = serde_json::from_str(&qemu_log()).unwrap();
    answer["lines"]
        .as_array()
        .unwrap_or_else(|| panic!("no lines in {answer}"))
        .iter()
        .filter_map(|l| l.as_str().map(str::to_owned))
        .collect()
}

/// QEMU's new log lines up to the first that `pred` accepts (the guest's
/// commands are queued; the host logs them a moment later), failing after
/// ten seconds without one.
fn log_until(what: &str, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut all = Vec::new();
    loop {
        all.extend(new_log_lines());
        if all.iter().any(|l| pred(l)) {
            return all;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU's log never showed {what}: {all:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The id of the framebuffer-sized blob resource QEMU creates next
/// (`virtio_gpu_cmd_res_create_blob res 0x5, size 262144`).
fn created_blob() -> String {
    let is_blob = |l: &str| {
        l.contains("virtio_gpu_cmd_res_create_blob") && l.contains(&format!("size {FB_BYTES}"))
    };
    log_until("a new blob resource", is_blob)
        .iter()
        .rev()
        .find(|l| is_blob(l))
        .and_then(|l| l.split("res ").nth(1))
        .map(|r| r.split(',').next().unwrap_or_default().to_owned())
        .unwrap_or_default()
}

/// A framebuffer of another area of the BAR, all `byte`: what the screen
/// shows before the one a test checks. (Dumb buffers will not do: with
/// blob resources virtio-gpu makes them guest blobs of many pages, which
/// QEMU can back only through a real udmabuf.)
fn solid(
    card: &Card,
    shm: &VfioPciDevice,
    bar: &BarMapping,
    area: u64,
    byte: u8,
) -> (GemImport, framebuffer::Handle, Vec<u8>) {
    let bytes = vec![byte; FB_BYTES as usize];
    bar_write(bar, area, &bytes);
    let export = shm
        .export_bar(2, &[ByteRange::new(area, FB_BYTES)])
        .unwrap();
    let gem = GemImport::import(&card.0, &export, RestorePolicy::Automatic).unwrap();
    let fb = card
        .add_planar_framebuffer(&Imported(gem.handle().unwrap()), FbCmd2Flags::empty())
        .unwrap();
    (gem, fb, bytes)
}

/// A second framebuffer area of shm0's BAR (the solid one).
const SOLID_AREA: u64 = 0x8_0000;

/// An exporter (shm0, decode on) and its BAR mapped for the CPU.
fn exporter(iommufd: &Iommufd) -> (VfioPciDevice, BarMapping) {
    let mut dev = VfioPciDevice::open(shm_address("shm0").parse().unwrap()).unwrap();
    dev.bind(iommufd).unwrap();
    dev.set_memory_decode(true).unwrap();
    let bar = dev.map_bar(2).unwrap();
    (dev, bar)
}

/// The whole walk: import, scan out, the pixels are the BAR's (CPU writes
/// and an edu copy show up), revoke detaches the blob and the screen stops
/// following the BAR, restore imports again and it follows again.
#[test]
fn a_bar_imported_into_virtio_gpu_is_on_screen_revoked_and_back() {
    assert_eq!(vm_profile(), "virtio_gpu");
    let iommufd = Iommufd::open().unwrap();
    let (shm, bar) = exporter(&iommufd);
    let (gpu_addr, drm) = gpu0();
    let shm_addr: PciAddress = shm_address("shm0").parse().unwrap();

    // The verdict predicts the kernel's answer: bus addresses below the switch.
    let forecast = GemImport::forecast(&drm, shm_addr, 2).unwrap();
    assert_eq!(
        forecast.map_type,
        Some(KernelMapType::BusAddr),
        "{forecast:?}"
    );
    assert_eq!(forecast.refusal, None);

    let mut fb_bytes = pattern(80, FB_BYTES as usize);
    bar_write(&bar, AREA, &fb_bytes);
    let export = shm
        .export_bar(2, &[ByteRange::new(AREA, FB_BYTES)])
        .unwrap();
    let _ = new_log_lines();
    let gem = GemImport::import(&drm, &export, RestorePolicy::LeaveRevoked).unwrap();
    let card = Card(drm.clone());
    let fb = card
        .add_planar_framebuffer(&Imported(gem.handle().unwrap()), FbCmd2Flags::empty())
        .unwrap();
    show(&card, fb);
    // The import queues the host's RESOURCE_CREATE_BLOB without a kick
    // (virtgpu_dma_buf_init_obj calls no virtio_gpu_notify): the host sees
    // it with the next command that kicks, here the scanout's.
    let blob = created_blob();
    assert_eq!(
        screen("gpu0"),
        (expected(&fb_bytes), expected(&fb_bytes)),
        "the screen shows the BAR, and the BAR is shm0's memory ({gpu_addr} scanning out {blob})"
    );

    // CPU writes through the BAR mmap appear on screen.
    fb_bytes = pattern(81, FB_BYTES as usize);
    bar_write(&bar, AREA, &fb_bytes);
    assert_eq!(screen("gpu0").0, expected(&fb_bytes), "CPU writes");

    // So does an engine's DMA: edu copies a page into the BAR, mapped at its
    // bus address (the switch routes it).
    {
        let ioas = iommufd.alloc_ioas().unwrap();
        let mut edu = Edu::open(edu_address().parse().unwrap(), &ioas).unwrap();
        let page = shm.export_bar(2, &[ByteRange::new(AREA, 0x1000)]).unwrap();
        let bus = forecast.verdict.as_ref().unwrap().bar.unwrap().bus_address;
        let att = Attachment::map(
            &page,
            &ioas,
            IovaPlacement::Fixed(bus + AREA),
            MapPerms::ReadWrite,
            RestorePolicy::Automatic,
        )
        .unwrap();
        let data = pattern(82, 0x1000);
        let src = Memfd::new("gpu-src", 0x1000).unwrap();
        src.write_at(0, &data).unwrap();
        let src_map = ioas
            .map_file(
                &src,
                ByteRange::new(0, 0x1000),
                IovaPlacement::Auto,
                MapPerms::Read,
            )
            .unwrap();
        edu.memcpy(src_map.iova(), att.iova(), 0x1000, DMA_TIMEOUT)
            .unwrap();
        fb_bytes[..0x1000].copy_from_slice(&data);
        assert_eq!(screen("gpu0").0, expected(&fb_bytes), "edu's copy");
    }

    // Revoke: the blob's backing is detached before the call returns.
    shm.set_memory_decode(false).unwrap();
    assert!(gem.is_revoked());
    assert!(matches!(gem.handle(), Err(Error::Revoked { .. })));
    log_until(&format!("the detach of {blob}"), |l| {
        l.contains("virtio_gpu_cmd_res_back_detach") && l.ends_with(&format!("res {blob}"))
    });

    // While revoked, the device cannot be pointed at the BAR again: a
    // scanout of the old framebuffer maps the attachment again
    // (virtio_gpu_prepare_imported_obj), which the exporter refuses.
    let (conn, crtc, mode) = output(&card);
    let err = card
        .set_crtc(crtc, Some(fb), (0, 0), &[conn], Some(mode))
        .unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::ENODEV),
        "a revoked scanout: {err}"
    );
    shm.set_memory_decode(true).unwrap();
    assert!(gem.is_revoked(), "LeaveRevoked");
    fb_bytes = pattern(83, FB_BYTES as usize);
    bar_write(&bar, AREA, &fb_bytes);
    // The BAR is back and the write landed in shm0; the import is still
    // revoked and the host was told to detach the blob's backing (above).
    // QEMU 7.2 shows the write all the same: the CRTC set before the revoke
    // keeps its display surface over the blob's memory, which the detach
    // does not take away (the guest cannot set a scanout of it again:
    // ENODEV above). So on this host the screen is no proof of a revoke;
    // the detach in the trace and the refused scanout are. Should a QEMU
    // drop the surface at the detach, this fails and the test can say so.
    let (now, backing) = screen("gpu0");
    assert_eq!(backing, expected(&fb_bytes), "the write reached shm0");
    assert_eq!(
        now,
        expected(&fb_bytes),
        "QEMU 7.2 keeps scanning out a detached blob"
    );

    // Restore: a new import (a new host resource); a framebuffer of it
    // shows the BAR again, and follows it.
    gem.restore().unwrap();
    assert_eq!(gem.generation(), 2);
    let fb2 = card
        .add_planar_framebuffer(&Imported(gem.handle().unwrap()), FbCmd2Flags::empty())
        .unwrap();
    show(&card, fb2);
    let blob2 = created_blob();
    assert_ne!(blob2, blob);
    assert_eq!(screen("gpu0").0, expected(&fb_bytes), "restored");
    fb_bytes = pattern(84, FB_BYTES as usize);
    bar_write(&bar, AREA, &fb_bytes);
    assert_eq!(screen("gpu0"), (expected(&fb_bytes), expected(&fb_bytes)));
    request_host_check("shm0", AREA, &fb_bytes);
    assert_eq!(gem.counts(), (1, 1));

    for f in [fb, fb2] {
        card.destroy_framebuffer(f).unwrap();
    }
}

/// With RestorePolicy::Automatic the import comes back with decode.
#[test]
fn an_automatic_import_is_imported_again_when_decode_is_back() {
    let iommufd = Iommufd::open().unwrap();
    let (shm, _bar) = exporter(&iommufd);
    let (_, drm) = gpu0();
    let export = shm
        .export_bar(2, &[ByteRange::new(AREA, FB_BYTES)])
        .unwrap();
    let gem = GemImport::import(&drm, &export, RestorePolicy::Automatic).unwrap();
    shm.set_memory_decode(false).unwrap();
    assert!(gem.is_revoked());
    shm.set_memory_decode(true).unwrap();
    assert!(!gem.is_revoked(), "{:?}", gem.last_error());
    assert_eq!((gem.generation(), gem.counts()), (2, (1, 1)));
    gem.handle().unwrap();
}

/// gpu1 has no blob resources: its import is static, which the VFIO
/// exporter refuses (EOPNOTSUPP), as the forecast says.
#[test]
fn virtio_gpu_without_blob_is_a_static_importer_and_refused() {
    let iommufd = Iommufd::open().unwrap();
    let (shm, _bar) = exporter(&iommufd);
    let shm_addr: PciAddress = shm_address("shm0").parse().unwrap();
    let (_, drm) = gpus()
        .into_iter()
        .find(|(a, d)| a.bus() != 0 && !d.prime_importer().unwrap().accepted_by_vfio())
        .expect("gpu1");
    let forecast = GemImport::forecast(&drm, shm_addr, 2).unwrap();
    let export = shm
        .export_bar(2, &[ByteRange::new(AREA, FB_BYTES)])
        .unwrap();
    match GemImport::import(&drm, &export, RestorePolicy::Automatic) {
        Err(e @ Error::ImportRefused { .. }) => {
            assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}");
            let Error::ImportRefused { why, .. } = &e else {
                unreachable!()
            };
            assert!(matches!(why, ImportRefusal::NotPeerToPeer { .. }), "{e}");
            assert_eq!(Some(why.clone()), forecast.refusal, "{e}");
            assert!(e.to_string().contains("no blob resources"), "{e}");
        }
        other => panic!("expected a static importer's refusal, got {other:?}"),
    }
}

/// gpu2 sits on the root bus: the path to shm0 passes q35's host bridge,
/// which the kernel does not vouch for with the default CPU, so
/// pci_p2pdma_map_type says NOT_SUPPORTED and the exporter's map fails
/// (EINVAL), with the verdict's reasons, as the forecast says.
#[test]
fn a_gpu_on_the_root_bus_has_no_p2p_path() {
    let iommufd = Iommufd::open().unwrap();
    let (shm, _bar) = exporter(&iommufd);
    let shm_addr: PciAddress = shm_address("shm0").parse().unwrap();
    let (_, drm) = gpus()
        .into_iter()
        .find(|(a, _)| a.bus() == 0)
        .expect("gpu2 on the root bus");
    assert!(drm.prime_importer().unwrap().accepted_by_vfio());
    let forecast = GemImport::forecast(&drm, shm_addr, 2).unwrap();
    assert_eq!(
        forecast.map_type,
        Some(KernelMapType::NotSupported),
        "{forecast:?}"
    );
    assert!(
        matches!(
            forecast.verdict.as_ref().map(|v| &v.route),
            Some(Route::RootComplex { .. })
        ),
        "{forecast:?}"
    );
    let export = shm
        .export_bar(2, &[ByteRange::new(AREA, FB_BYTES)])
        .unwrap();
    match GemImport::import(&drm, &export, RestorePolicy::Automatic) {
        Err(e @ Error::ImportRefused { .. }) => {
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
            let Error::ImportRefused { why, .. } = &e else {
                unreachable!()
            };
            assert_eq!(Some(why.clone()), forecast.refusal, "{e}");
            let text = e.to_string();
            assert!(text.contains("PCI_P2PDMA_MAP_NOT_SUPPORTED"), "{text}");
            assert!(text.contains("root complex"), "{text}");
        }
        other => panic!("expected no p2p path, got {other:?}"),
    }
}

/// A multi-range export into virtio-gpu: the library refuses it before
/// the kernel is asked (the kernel would import it, and the host could not
/// show it: the next test), with the typed reason and no errno.
#[test]
fn a_multi_range_export_is_refused_for_virtio_gpu() {
    let iommufd = Iommufd::open().unwrap();
    let (shm, _bar) = exporter(&iommufd);
    let (_, drm) = gpu0();
    // Two ranges, even adjacent ones, are two scatterlist entries.
    let half = FB_BYTES / 2;
    let export = shm
        .export_bar(2, &[ByteRange::new(0, half), ByteRange::new(half, half)])
        .unwrap();
    let _ = new_log_lines();
    match GemImport::import(&drm, &export, RestorePolicy::Automatic) {
        Err(e @ Error::ImportRefused { .. }) => {
            let Error::ImportRefused { why, source, .. } = &e else {
                unreachable!()
            };
            assert!(
                matches!(why, ImportRefusal::MultiRangeBlob { entries: 2, .. }),
                "{e}"
            );
            assert!(source.is_none(), "refused before the kernel: {e}");
            assert_eq!(e.raw_os_error(), None);
            assert!(e.to_string().contains("2 backing ranges"), "{e}");
        }
        other => panic!("expected a multi-range refusal, got {other:?}"),
    }
    // Nothing reached the host: no blob was created. (A one-range import
    // after it kicks the queue, so anything queued would show up now.)
    let one = shm
        .export_bar(2, &[ByteRange::new(AREA, FB_BYTES)])
        .unwrap();
    let gem = GemImport::import(&drm, &one, RestorePolicy::Automatic).unwrap();
    let card = Card(drm.clone());
    let fb = card
        .add_planar_framebuffer(&Imported(gem.handle().unwrap()), FbCmd2Flags::empty())
        .unwrap();
    show(&card, fb);
    let lines = log_until("the one-range blob", |l| {
        l.contains("virtio_gpu_cmd_res_create_blob")
    });
    let blobs: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("virtio_gpu_cmd_res_create_blob"))
        .collect();
    assert_eq!(blobs.len(), 1, "only the one-range blob: {lines:?}");
    assert!(blobs[0].contains(&format!("size {FB_BYTES}")), "{lines:?}");
    card.destroy_framebuffer(fb).unwrap();
}

/// What the refusal above spares: with the check skipped
/// (`import_multi_range`), the kernel imports the two-range export
/// (virtio-gpu hands the host one backing entry per range), but QEMU uses
/// a blob in place only when its backing is one range; for more it needs a
/// real udmabuf over memfd memory, which the ivshmem file backing is not.
/// The framebuffer is then refused by the host ("no backing storage") and
/// the guest sees the error response: an import that succeeds and shows
/// nothing, which only pixels (or the host's log) reveal.
#[test]
fn a_multi_range_export_imports_but_the_host_cannot_scan_it_out() {
    let iommufd = Iommufd::open().unwrap();
    let (shm, bar) = exporter(&iommufd);
    let (_, drm) = gpu0();
    let card = Card(drm.clone());
    // Two 128 KiB halves of a framebuffer, side by side in the BAR: two
    // ranges all the same, so two backing entries for the host.
    let half = FB_BYTES / 2;
    let ranges = [ByteRange::new(0, half), ByteRange::new(half, half)];
    let fb_bytes = pattern(85, FB_BYTES as usize);
    bar_write(&bar, ranges[0].offset, &fb_bytes[..half as usize]);
    bar_write(&bar, ranges[1].offset, &fb_bytes[half as usize..]);
    let export = shm.export_bar(2, &ranges).unwrap();
    // Something else on screen first.
    let (white_gem, white_fb, white) = solid(&card, &shm, &bar, SOLID_AREA, 0xff);
    show(&card, white_fb);
    assert_eq!(screendump_hash(), expected(&white));
    let _ = new_log_lines();
    let gem = GemImport::import_multi_range(&drm, &export, RestorePolicy::Automatic).unwrap();
    let fb = card
        .add_planar_framebuffer(&Imported(gem.handle().unwrap()), FbCmd2Flags::empty())
        .unwrap();
    show(&card, fb);
    log_until("the two-range blob refused", |l| {
        l.contains("no backing storage")
    });
    assert_eq!(
        screendump_hash(),
        expected(&white),
        "nothing of the BAR on screen"
    );
    card.destroy_framebuffer(fb).unwrap();
    card.destroy_framebuffer(white_fb).unwrap();
    drop((gem, white_gem));
}

fn screendump_hash() -> String {
    let answer = screendump("gpu0", (0, 0, W, H), None);
    let key = "\"rect_fnv1a64\":\"";
    let at = answer.find(key).unwrap_or_else(|| panic!("{answer}"));
    answer[at + key.len()..at + key.len() + 16].to_owned()
}

/// Where `drm-test` shows shm0's BAR.
const CLI_AREA: u64 = 0xc_0000;

/// Runs the CLI with the host as its screen observer: `DMABUF_P2P_SCREEN`
/// names the GPU, `DMABUF_P2P_HOST_CHECK` shm0; its `@@` lines go on to
/// the host through this test's stdout, and the host's answers come back on
/// the stdin it inherits. Whether it succeeded, and stdout then stderr.
fn run_cli_observed(gpu: &str, args: &[&str]) -> (bool, String) {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let mut child = Command::new("/bin/dmabuf-p2p")
        .args(args)
        .env("DMABUF_P2P_SCREEN", gpu)
        .env("DMABUF_P2P_HOST_CHECK", "shm0")
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run /bin/dmabuf-p2p");
    let mut text = String::new();
    let stdout = child.stdout.take().expect("the CLI's stdout");
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("a line of the CLI's output");
        if line.starts_with("@@") {
            dmabuf_p2p_vm_tests::directive(&line);
        }
        text.push_str(&line);
        text.push('\n');
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).expect("the CLI's stderr");
    }
    let status = child.wait().expect("the CLI's exit");
    (status.success(), text + &err)
}

/// `drm-test` on gpu0 with shm0's BAR: the importer, the verdict and the
/// kernel's answer first, then every step passes, the screen and shm0's
/// memory checked by the host.
#[test]
fn drm_test_command_shows_the_bar_and_checks_the_screen() {
    // The address only: the command must be the card's DRM master.
    let gpu = gpu0().0.to_string();
    let target = format!("{}:2:{CLI_AREA:#x}+{FB_BYTES:#x}", shm_address("shm0"));
    let (ok, text) = run_cli_observed("gpu0", &["drm-test", "--gpu", &gpu, "--target", &target]);
    assert!(ok, "{text}");
    assert!(text.starts_with("gpu: /dev/dri/card"), "{text}");
    for want in [
        "importer: virtio_gpu (blob resources, 2D): dynamic attach, peer-to-peer, revocable",
        "path:\n  - their paths meet at ",
        "kernel: pci_p2pdma_map_type() will answer PCI_P2PDMA_MAP_BUS_ADDR",
        "import (PRIME)",
        "screen shows the BAR",
        "BAR write on screen",
        "a scanout of its framebuffer: No such device",
        "imported again: GEM handle",
        "screen = BAR = device memory (host screendump)",
        "drm-test: PASS (7 of 7 checks passed)",
    ] {
        assert!(text.contains(want), "no {want:?} in\n{text}");
    }
    assert!(
        !text.contains("the screen itself was not checked"),
        "{text}"
    );
    assert!(!text.contains("FAILED"), "{text}");
}

/// `drm-test` on gpu2 (the root bus): the forecast says the kernel will
/// refuse (no p2p path) and the import step fails with that reason.
#[test]
fn drm_test_command_names_the_refusal_it_forecast() {
    let gpu = gpus()
        .into_iter()
        .find(|(a, _)| a.bus() == 0)
        .expect("gpu2 on the root bus")
        .0
        .to_string();
    let target = format!("{}:2:{CLI_AREA:#x}+{FB_BYTES:#x}", shm_address("shm0"));
    let (ok, text) = run_cli_observed("gpu2", &["drm-test", "--gpu", &gpu, "--target", &target]);
    assert!(!ok, "{text}");
    for want in [
        "kernel: pci_p2pdma_map_type() will answer PCI_P2PDMA_MAP_NOT_SUPPORTED",
        "forecast: refused: no peer-to-peer path",
        "drm-test: running anyway",
        "(as forecast)",
        "drm-test: FAIL (0 of 1 checks passed)",
    ] {
        assert!(text.contains(want), "no {want:?} in\n{text}");
    }
}
