//! PCI configuration space as bytes: the header fields the path needs, the
//! BAR registers (bus addresses), and the two capability lists, walked the
//! way the kernel walks them.
//!
//! The bytes are what sysfs's `config` file gave: 64 of them for a process
//! without `CAP_SYS_ADMIN` (the kernel's `pci_read_config` in
//! `drivers/pci/pci-sysfs.c` cuts every other reader off there, 128 for a
//! CardBus bridge), 256 for a conventional PCI function, 4096 for a PCI
//! Express one. The standard capabilities start above 64 bytes and the
//! extended ones at 256, so without root neither list can be read:
//! [`ConfigSpace::capabilities_readable`] says whether they could.

/// Where the standard header ends and the capability list may begin
/// (`PCI_STD_HEADER_SIZEOF`).
pub const STD_HEADER_SIZE: usize = 64;
/// Conventional PCI configuration space (`PCI_CFG_SPACE_SIZE`); extended
/// capabilities start here.
pub const CFG_SPACE_SIZE: usize = 256;
/// PCI Express configuration space (`PCI_CFG_SPACE_EXP_SIZE`).
pub const CFG_SPACE_EXP_SIZE: usize = 4096;

/// `PCI_CAP_ID_EXP`: the PCI Express capability.
pub const CAP_ID_EXP: u8 = 0x10;
/// `PCI_EXT_CAP_ID_ACS`: Access Control Services.
pub const EXT_CAP_ID_ACS: u16 = 0x0d;
/// `PCI_EXT_CAP_ID_ATS`: Address Translation Services.
pub const EXT_CAP_ID_ATS: u16 = 0x0f;

/// How many standard capabilities the walk follows at most (the kernel's
/// `PCI_FIND_CAP_TTL`): a list that loops ends there, as in the kernel.
const CAP_TTL: usize = 48;
/// How many extended capabilities the walk follows at most: one per 8 bytes
/// of extended space, the bound of the kernel's `PCI_FIND_NEXT_EXT_CAP`.
const EXT_CAP_TTL: usize = (CFG_SPACE_EXP_SIZE - CFG_SPACE_SIZE) / 8;

/// `PCI_STATUS_CAP_LIST`: the function has a capability list.
const STATUS_CAP_LIST: u16 = 0x10;

/// One function's configuration space, as far as it could be read.
///
/// ```
/// use dmabuf_p2p::topology::ConfigSpace;
///
/// // The first 64 bytes, as an unprivileged reader of sysfs gets them.
/// let mut bytes = vec![0u8; 64];
/// bytes[..4].copy_from_slice(&[0x86, 0x80, 0x30, 0x20]); // 8086:2030
/// bytes[0x0e] = 0x01; // a bridge
/// let cfg = ConfigSpace::new(bytes);
/// assert_eq!((cfg.vendor(), cfg.device()), (Some(0x8086), Some(0x2030)));
/// assert!(cfg.is_bridge());
/// assert!(!cfg.capabilities_readable()); // beyond 64 bytes needs root
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
}

/// One entry of a capability list: its ID and where it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// The capability ID (`PCI_CAP_ID_*`, or `PCI_EXT_CAP_ID_*` for an
    /// extended one).
    pub id: u16,
    /// Its offset in configuration space.
    pub offset: u16,
}

/// One BAR register as configuration space holds it: a **bus** address
/// (what the function decodes on its link, and what a switch routes by),
/// which is the CPU's physical address unless the host bridge translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRegister {
    /// The BAR index, 0..=5.
    pub index: u32,
    /// The bus address the register holds (its low flag bits cleared).
    pub bus_address: u64,
    /// A memory BAR (else an I/O-port one).
    pub memory: bool,
    /// A 64-bit memory BAR (it takes the next register too).
    pub mem64: bool,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

impl ConfigSpace {
    /// Configuration space from the bytes that could be read (at most 4096
    /// are kept).
    pub fn new(mut bytes: Vec<u8>) -> Self {
        bytes.truncate(CFG_SPACE_EXP_SIZE);
        Self { bytes }
    }

    /// The bytes that were read.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// How many bytes were read.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether nothing was read.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The byte at `offset`, if it was read.
    pub fn byte(&self, offset: usize) -> Option<u8> {
        self.bytes.get(offset).copied()
    }

    /// The little-endian 16-bit word at `offset`, if it was read.
    pub fn word(&self, offset: usize) -> Option<u16> {
        let b = self.bytes.get(offset..offset.checked_add(2)?)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }

    /// The little-endian 32-bit dword at `offset`, if it was read.
    pub fn dword(&self, offset: usize) -> Option<u32> {
        let b = self.bytes.get(offset..offset.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// `PCI_VENDOR_ID`.
    pub fn vendor(&self) -> Option<u16> {
        self.word(0x00)
    }

    /// `PCI_DEVICE_ID`.
    pub fn device(&self) -> Option<u16> {
        self.word(0x02)
    }

    /// The 24-bit class code (`PCI_CLASS_REVISION >> 8`).
    pub fn class(&self) -> Option<u32> {
        self.dword(0x08).map(|v| v >> 8)
    }

    /// `PCI_HEADER_TYPE` without the multi-function bit: 0 for a function,
    /// 1 for a PCI-to-PCI bridge, 2 for a CardBus bridge.
    pub fn header_type(&self) -> Option<u8> {
        self.byte(0x0e).map(|h| h & 0x7f)
    }

    /// Whether the device has several functions (`PCI_HEADER_TYPE_MFD`).
    pub fn multifunction(&self) -> bool {
        self.byte(0x0e).is_some_and(|h| h & 0x80 != 0)
    }

    /// Whether this is a PCI-to-PCI bridge (header type 1): a root port, a
    /// switch port or a PCIe-to-PCI bridge.
    pub fn is_bridge(&self) -> bool {
        self.header_type() == Some(1)
    }

    /// A bridge's secondary and subordinate bus numbers (the buses below it).
    pub fn bridge_buses(&self) -> Option<(u8, u8)> {
        if !self.is_bridge() {
            return None;
        }
        Some((self.byte(0x19)?, self.byte(0x1a)?))
    }

    /// The BAR registers of a function (6) or bridge (2) that hold an
    /// address; unused (zero) registers are left out. No BAR is sized here:
    /// that takes writes, and sysfs's `resource` file has the sizes.
    pub fn bars(&self) -> Vec<BarRegister> {
        let count = match self.header_type() {
            Some(0) => 6,
            Some(1) => 2,
            _ => 0,
        };
        let mut out = Vec::new();
        let mut index = 0u32;
        while index < count {
            let Some(low) = self.dword(0x10 + 4 * index as usize) else {
                break;
            };
            let memory = low & 1 == 0;
            let mem64 = memory && (low >> 1) & 3 == 2;
            let address = if !memory {
                u64::from(low & !3)
            } else if mem64 {
                let high = self.dword(0x14 + 4 * index as usize).unwrap_or(0);
                u64::from(low & !0xf) | (u64::from(high) << 32)
            } else {
                u64::from(low & !0xf)
            };
            if address != 0 {
                out.push(BarRegister {
                    index,
                    bus_address: address,
                    memory,
                    mem64,
                    prefetchable: memory && low & 8 != 0,
                });
            }
            index += if mem64 { 2 } else { 1 };
        }
        out
    }

    /// Whether the capability lists could be read: more than the standard
    /// header is here, which for sysfs means the reader had
    /// `CAP_SYS_ADMIN`.
    pub fn capabilities_readable(&self) -> bool {
        self.len() > STD_HEADER_SIZE
    }

    /// Whether extended configuration space (offset 256 and up) was read.
    pub fn extended_readable(&self) -> bool {
        self.len() >= CFG_SPACE_EXP_SIZE
    }

    /// The standard capability list, in list order, walked as the kernel's
    /// `PCI_FIND_NEXT_CAP` walks it: from the pointer at `PCI_CAPABILITY_LIST`
    /// (0x34; 0x14 for a CardBus bridge) if the status register says there
    /// is a list, each pointer's low two bits ignored, ending at a pointer
    /// into the header, an ID of 0xff, bytes that were not read, or after 48
    /// entries (a list that loops).
    pub fn capabilities(&self) -> Vec<Capability> {
        let mut out = Vec::new();
        if self.word(0x06).is_none_or(|s| s & STATUS_CAP_LIST == 0) {
            return out;
        }
        let start = if self.header_type() == Some(2) {
            0x14
        } else {
            0x34
        };
        let Some(mut pos) = self.byte(start) else {
            return out;
        };
        for _ in 0..CAP_TTL {
            if usize::from(pos) < STD_HEADER_SIZE {
                break;
            }
            pos &= !3;
            let Some(entry) = self.word(usize::from(pos)) else {
                break;
            };
            let id = (entry & 0xff) as u8;
            if id == 0xff {
                break;
            }
            out.push(Capability {
                id: u16::from(id),
                offset: u16::from(pos),
            });
            pos = (entry >> 8) as u8;
        }
        out
    }

    /// The extended capability list, in list order, walked as the kernel's
    /// `PCI_FIND_NEXT_EXT_CAP` walks it: from offset 256, ending at a zero
    /// header, a next pointer below 256, bytes that were not read, or after
    /// 480 entries. A header of all ones (a function that went away) ends it
    /// too.
    pub fn extended_capabilities(&self) -> Vec<Capability> {
        let mut out = Vec::new();
        let mut pos = CFG_SPACE_SIZE;
        for _ in 0..EXT_CAP_TTL {
            if pos < CFG_SPACE_SIZE {
                break;
            }
            let Some(header) = self.dword(pos) else {
                break;
            };
            if header == 0 || header == u32::MAX {
                break;
            }
            out.push(Capability {
                id: (header & 0xffff) as u16,
                offset: pos as u16,
            });
            // PCI_EXT_CAP_NEXT: bits 31..20, dword-aligned.
            pos = ((header >> 20) & 0xffc) as usize;
        }
        out
    }

    /// The offset of the first standard capability with this ID.
    pub fn find_capability(&self, id: u8) -> Option<u16> {
        self.capabilities()
            .into_iter()
            .find(|c| c.id == u16::from(id))
            .map(|c| c.offset)
    }

    /// The offset of the first extended capability with this ID.
    pub fn find_extended_capability(&self, id: u16) -> Option<u16> {
        self.extended_capabilities()
            .into_iter()
            .find(|c| c.id == id)
            .map(|c| c.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(vendor: u16, device: u16, header_type: u8) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[0..2].copy_from_slice(&vendor.to_le_bytes());
        b[2..4].copy_from_slice(&device.to_le_bytes());
        b[0x0e] = header_type;
        b
    }

    #[test]
    fn a_looping_capability_list_ends_after_48_entries() {
        let mut b = header(0x1234, 0x5678, 0);
        b.resize(256, 0);
        b[0x06] = STATUS_CAP_LIST as u8;
        b[0x34] = 0x40;
        // 0x40 -> 0x50 -> 0x40 -> ...
        b[0x40] = 0x05;
        b[0x41] = 0x50;
        b[0x50] = 0x10;
        b[0x51] = 0x40;
        let caps = ConfigSpace::new(b).capabilities();
        assert_eq!(caps.len(), CAP_TTL);
        assert_eq!(caps[1].offset, 0x50);
    }

    #[test]
    fn no_capability_list_without_the_status_bit() {
        let mut b = header(0x1234, 0x5678, 0);
        b.resize(256, 0);
        b[0x34] = 0x40;
        b[0x40] = 0x10;
        assert!(ConfigSpace::new(b).capabilities().is_empty());
    }

    #[test]
    fn pointers_into_the_header_or_past_the_read_bytes_end_the_walk() {
        let mut b = header(0x1234, 0x5678, 0);
        b.resize(128, 0);
        b[0x06] = STATUS_CAP_LIST as u8;
        b[0x34] = 0x43; // low bits ignored
        b[0x40] = 0x01;
        b[0x41] = 0xf0; // past the 128 bytes read
        let caps = ConfigSpace::new(b).capabilities();
        assert_eq!(
            caps,
            [Capability {
                id: 1,
                offset: 0x40
            }]
        );
    }

    #[test]
    fn a_looping_extended_list_ends_at_the_kernels_bound() {
        let mut b = header(0x1234, 0x5678, 0);
        b.resize(4096, 0);
        // 0x100 (ACS) -> 0x100
        b[0x100..0x104].copy_from_slice(&(0x1000_000d_u32 | (0x100 << 20)).to_le_bytes());
        let caps = ConfigSpace::new(b).extended_capabilities();
        assert_eq!(caps.len(), EXT_CAP_TTL);
        assert!(caps.iter().all(|c| c.id == EXT_CAP_ID_ACS));
    }

    #[test]
    fn bar_registers_give_bus_addresses() {
        let mut b = header(0x1af4, 0x1110, 0);
        // BAR0: 32-bit memory at 0xfe600000.
        b[0x10..0x14].copy_from_slice(&0xfe60_0000_u32.to_le_bytes());
        // BAR2+3: 64-bit prefetchable memory at 0x83_0000_0000.
        b[0x18..0x1c].copy_from_slice(&0x0000_000c_u32.to_le_bytes());
        b[0x1c..0x20].copy_from_slice(&0x83_u32.to_le_bytes());
        // BAR4: I/O ports at 0xc040.
        b[0x20..0x24].copy_from_slice(&0xc041_u32.to_le_bytes());
        let bars = ConfigSpace::new(b).bars();
        assert_eq!(bars.len(), 3);
        assert_eq!((bars[0].index, bars[0].bus_address), (0, 0xfe60_0000));
        assert!(bars[0].memory && !bars[0].mem64 && !bars[0].prefetchable);
        assert_eq!((bars[1].index, bars[1].bus_address), (2, 0x83_0000_0000));
        assert!(bars[1].mem64 && bars[1].prefetchable);
        assert_eq!((bars[2].index, bars[2].bus_address), (4, 0xc040));
        assert!(!bars[2].memory);
    }

    #[test]
    fn short_reads_answer_none_instead_of_panicking() {
        let cfg = ConfigSpace::new(vec![0x86, 0x80, 0x30]);
        assert_eq!(cfg.vendor(), Some(0x8086));
        assert_eq!(cfg.device(), None);
        assert!(cfg.bars().is_empty());
        assert!(cfg.capabilities().is_empty());
        assert!(cfg.extended_capabilities().is_empty());
        assert_eq!(cfg.word(usize::MAX), None);
    }
}
