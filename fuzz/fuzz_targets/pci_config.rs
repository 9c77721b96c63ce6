//! Configuration-space bytes (what a sysfs `config` file gives, up to 4096)
//! to `topology::ConfigSpace` and the capability decoders, and any bytes to
//! the DMAR table's width. No panic, and every answer keeps the walks'
//! bounds: standard capabilities dword-aligned between 0x40 and the bytes
//! read, at most 48; extended ones dword-aligned from 0x100, at most 480,
//! the first at 0x100; a decoded ACS or ATS sits where the list says.

#![no_main]

use dmabuf_p2p::topology::{ConfigSpace, Probe, acs, ats, parse_dmar_width, pcie_type};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(width) = parse_dmar_width(data) {
        assert!((12..=64).contains(&width), "width {width}");
        assert!(data.starts_with(b"DMAR") && data.len() > 36);
    }
    let cfg = ConfigSpace::new(data.to_vec());
    let len = cfg.len();
    assert!(len <= 4096);

    let caps = cfg.capabilities();
    assert!(caps.len() <= 48);
    for c in &caps {
        let at = usize::from(c.offset);
        assert!(at >= 0x40 && at % 4 == 0 && at + 2 <= len, "{c:?} in {len} bytes");
        assert!(c.id < 0xff);
    }
    let ext = cfg.extended_capabilities();
    assert!(ext.len() <= 480);
    if let Some(first) = ext.first() {
        assert_eq!(first.offset, 0x100);
    }
    for c in &ext {
        let at = usize::from(c.offset);
        assert!(at >= 0x100 && at % 4 == 0 && at + 4 <= len, "{c:?} in {len} bytes");
    }

    for bar in cfg.bars() {
        assert!(bar.index < 6 && bar.bus_address != 0);
        assert!(!bar.mem64 || bar.memory);
        if !bar.memory {
            assert_eq!(bar.bus_address & 3, 0);
        } else {
            assert_eq!(bar.bus_address & 0xf, 0);
        }
    }

    let readable = cfg.capabilities_readable();
    for (probe, id) in [
        (acs(&cfg).map_offset(), 0x0d),
        (ats(&cfg).map_offset(), 0x0f),
    ] {
        match probe {
            Probe::Unreadable => assert!(!readable || ext.iter().any(|c| c.id == id)),
            Probe::Absent => assert!(!cfg.extended_readable() || !ext.iter().any(|c| c.id == id)),
            Probe::Present(at) => {
                assert_eq!(ext.iter().find(|c| c.id == id).map(|c| c.offset), Some(at));
            }
        }
    }
    if !readable {
        assert!(pcie_type(&cfg).is_unreadable());
    }
});

/// The offset of a decoded capability, for comparing probes of two kinds.
trait MapOffset {
    fn map_offset(self) -> Probe<u16>;
}

impl MapOffset for Probe<dmabuf_p2p::topology::Acs> {
    fn map_offset(self) -> Probe<u16> {
        match self {
            Probe::Present(a) => Probe::Present(a.offset),
            Probe::Absent => Probe::Absent,
            Probe::Unreadable => Probe::Unreadable,
        }
    }
}

impl MapOffset for Probe<dmabuf_p2p::topology::Ats> {
    fn map_offset(self) -> Probe<u16> {
        match self {
            Probe::Present(a) => Probe::Present(a.offset),
            Probe::Absent => Probe::Absent,
            Probe::Unreadable => Probe::Unreadable,
        }
    }
}
