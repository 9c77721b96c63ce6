//! The Identify Controller and Identify Namespace data structures, parsed
//! from the 4 KiB the controller returns.

/// What the driver needs from Identify Controller.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ControllerIdentity {
    /// PCI vendor ID.
    pub vendor: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum Data Transfer Size as a power of two of the minimum page size
    /// (0: no limit).
    pub mdts: u8,
    /// Number of namespaces (the highest valid NSID).
    pub namespaces: u32,
    /// Optional Admin Command Support (OACS): bit 8, Doorbell Buffer Config.
    pub oacs: u16,
}

impl ControllerIdentity {
    /// Whether the controller takes Doorbell Buffer Config (OACS bit 8).
    pub fn has_doorbell_buffer_config(&self) -> bool {
        self.oacs & (1 << 8) != 0
    }
}

/// What the driver needs from Identify Namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct NamespaceIdentity {
    /// The namespace ID.
    pub nsid: u32,
    /// Size in logical blocks (NSZE).
    pub blocks: u64,
    /// Bytes per logical block of the format in use.
    pub block_size: u64,
    /// Metadata bytes per block of the format in use (the driver supports 0).
    pub metadata_size: u16,
    /// Index of the LBA format in use.
    pub format: u8,
}

impl NamespaceIdentity {
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks.saturating_mul(self.block_size)
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_matches(|c: char| c == ' ' || c == '\0')
        .to_owned()
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from(le_u32(b, at)) | (u64::from(le_u32(b, at + 4)) << 32)
}

/// Parses Identify Controller data.
///
/// ```
/// use dmabuf_p2p_engine::nvme::identify::parse_controller;
/// let mut d = [0u8; 4096];
/// d[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
/// d[4..9].copy_from_slice(b"nvme0");
/// d[77] = 7;
/// d[516] = 1;
/// d[257] = 0x01; // OACS bit 8
/// let c = parse_controller(&d);
/// assert_eq!((c.vendor, c.serial.as_str(), c.mdts, c.namespaces), (0x1b36, "nvme0", 7, 1));
/// assert!(c.has_doorbell_buffer_config());
/// ```
pub fn parse_controller(d: &[u8; 4096]) -> ControllerIdentity {
    ControllerIdentity {
        vendor: le_u16(d, 0),
        serial: text(&d[4..24]),
        model: text(&d[24..64]),
        firmware: text(&d[64..72]),
        mdts: d[77],
        namespaces: le_u32(d, 516),
        oacs: le_u16(d, 256),
    }
}

/// Parses Identify Namespace data for `nsid`; `None` for an inactive
/// namespace (all zero: NSZE 0) or a format whose block size is not a power
/// of two from 512 bytes up.
///
/// ```
/// use dmabuf_p2p_engine::nvme::identify::parse_namespace;
/// let mut d = [0u8; 4096];
/// d[0..8].copy_from_slice(&8192u64.to_le_bytes()); // NSZE
/// d[25] = 1; // two formats
/// d[26] = 1; // the second in use
/// d[128 + 4 + 2] = 12; // LBAF1: 4 KiB blocks
/// let ns = parse_namespace(1, &d).unwrap();
/// assert_eq!((ns.blocks, ns.block_size, ns.format), (8192, 4096, 1));
/// ```
pub fn parse_namespace(nsid: u32, d: &[u8; 4096]) -> Option<NamespaceIdentity> {
    let blocks = le_u64(d, 0);
    if blocks == 0 {
        return None;
    }
    let flbas = d[26];
    // FLBAS bits 3:0, and bits 6:5 as the upper bits when NLBAF > 16.
    let format = (flbas & 0xf) | ((flbas >> 5) & 0x3) << 4;
    let at = 128 + 4 * usize::from(format);
    let lbaf = le_u32(d, at);
    let lbads = (lbaf >> 16) & 0xff;
    if !(9..=20).contains(&lbads) {
        return None;
    }
    Some(NamespaceIdentity {
        nsid,
        blocks,
        block_size: 1 << lbads,
        metadata_size: lbaf as u16,
        format,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inactive_namespace_is_none() {
        assert!(parse_namespace(2, &[0u8; 4096]).is_none());
    }

    #[test]
    fn default_format_512() {
        let mut d = [0u8; 4096];
        d[0..8].copy_from_slice(&0x2000u64.to_le_bytes());
        d[128 + 2] = 9;
        let ns = parse_namespace(1, &d).unwrap();
        assert_eq!(
            (ns.block_size, ns.bytes(), ns.metadata_size),
            (512, 0x40_0000, 0)
        );
    }

    #[test]
    fn nonsense_block_size_is_none() {
        let mut d = [0u8; 4096];
        d[0] = 1;
        d[128 + 2] = 3;
        assert!(parse_namespace(1, &d).is_none());
    }

    #[test]
    fn controller_strings_are_trimmed() {
        let mut d = [0u8; 4096];
        d[24..64].copy_from_slice(&[b' '; 40]);
        d[24..28].copy_from_slice(b"QEMU");
        d[64..72].copy_from_slice(b"7.2.0   ");
        let c = parse_controller(&d);
        assert_eq!((c.model.as_str(), c.firmware.as_str()), ("QEMU", "7.2.0"));
    }
}
