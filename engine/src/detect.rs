//! Which devices can serve as engines and which BARs are peer-to-peer
//! targets, from what sysfs says about a device (no device access).

use dmabuf_p2p::pci::Resource;
use dmabuf_p2p::sysfs::PciDeviceInfo;

use crate::edu::EDU_ID;
use crate::nvme::NVME_CLASS;

/// QEMU's `ivshmem-plain` (its BAR2 is shared memory).
pub const IVSHMEM_ID: (u16, u16) = (0x1af4, 0x1110);

/// A kind of engine this package has a driver for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub enum EngineKind {
    /// QEMU's `edu`: a copy engine ([`DmaEngine`](crate::DmaEngine)).
    Edu,
    /// An NVMe controller: a storage engine ([`StorageEngine`](crate::StorageEngine)).
    Nvme,
}

impl EngineKind {
    /// The engine kind of a device with this vendor, device ID and class code.
    ///
    /// ```
    /// use dmabuf_p2p_engine::detect::EngineKind;
    /// assert_eq!(EngineKind::detect(0x1234, 0x11e8, 0x00ff00), Some(EngineKind::Edu));
    /// assert_eq!(EngineKind::detect(0x144d, 0xa808, 0x010802), Some(EngineKind::Nvme));
    /// assert_eq!(EngineKind::detect(0x1af4, 0x1110, 0x050000), None);
    /// ```
    pub fn detect(vendor: u16, device: u16, class: u32) -> Option<Self> {
        if (vendor, device) == EDU_ID {
            Some(Self::Edu)
        } else if class == NVME_CLASS {
            Some(Self::Nvme)
        } else {
            None
        }
    }

    /// A short name: `"edu"` or `"nvme"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Edu => "edu",
            Self::Nvme => "nvme",
        }
    }
}

/// A BAR that other devices can DMA into.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct TargetBar {
    /// The BAR index.
    pub bar: u32,
    /// What it is, e.g. `"ivshmem shared memory"`.
    pub what: &'static str,
    /// Whether that is certain from the device's identity, or only likely
    /// (an NVMe BAR that may hold a CMB or PMR: the controller's registers
    /// say, see [`Nvme::enable_cmb`](crate::nvme::Nvme::enable_cmb) and
    /// [`Nvme::enable_pmr`](crate::nvme::Nvme::enable_pmr)).
    pub certain: bool,
}

/// The BARs of a device that serve as peer-to-peer DMA targets: ivshmem's
/// BAR2, and an NVMe controller's prefetchable memory BARs other than BAR0
/// (where controllers put a controller memory buffer or persistent memory
/// region; MSI-X tables sit in non-prefetchable BARs).
pub fn target_bars(info: &PciDeviceInfo) -> Vec<TargetBar> {
    target_bars_of((info.vendor, info.device), info.class, &info.resources)
}

/// [`target_bars`] of a device with this vendor and device ID, class code
/// and `resource` lines.
fn target_bars_of(id: (u16, u16), class: u32, resources: &[Resource]) -> Vec<TargetBar> {
    if id == IVSHMEM_ID {
        return resources
            .iter()
            .filter(|r| r.index == 2 && !r.is_unused() && r.is_mem())
            .map(|_| TargetBar {
                bar: 2,
                what: "ivshmem shared memory",
                certain: true,
            })
            .collect();
    }
    if class == NVME_CLASS {
        return resources
            .iter()
            .take(6)
            .filter(|r| r.index > 0 && !r.is_unused() && r.is_mem() && r.is_prefetch())
            .map(|r| TargetBar {
                bar: r.index,
                what: "NVMe CMB or PMR",
                certain: false,
            })
            .collect();
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmabuf_p2p::pci::parse_resources;

    fn bars(vendor: u16, device: u16, class: u32, resources: &str) -> Vec<TargetBar> {
        let resources = parse_resources(resources).unwrap_or_default();
        target_bars_of((vendor, device), class, &resources)
    }

    // mem64 = 0x140204, prefetchable mem64 = 0x14220c, io = 0x40101.
    const NVME_QEMU: &str = "0x00000000fe000000 0x00000000fe003fff 0x0000000000140204\n\
         0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
         0x0000000800000000 0x0000000800ffffff 0x000000000014220c\n\
         0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
         0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
         0x0000000000000000 0x0000000000000000 0x0000000000000000\n";

    #[test]
    fn nvme_prefetchable_bar2_is_a_likely_target() {
        assert_eq!(
            bars(0x1b36, 0x0010, NVME_CLASS, NVME_QEMU),
            vec![TargetBar {
                bar: 2,
                what: "NVMe CMB or PMR",
                certain: false
            }]
        );
    }

    #[test]
    fn ivshmem_bar2_is_a_target_and_others_are_not() {
        assert_eq!(bars(0x1af4, 0x1110, 0x050000, NVME_QEMU)[0].bar, 2);
        assert!(bars(0x8086, 0x10d3, 0x020000, NVME_QEMU).is_empty());
    }
}
