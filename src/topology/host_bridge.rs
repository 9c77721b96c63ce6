//! Whether a root complex forwards peer-to-peer traffic from one of its
//! ports to another, by the rule the kernel's p2pdma code applies when the
//! traffic has to pass it (`drivers/pci/p2pdma.c`, Linux 7.2):
//!
//! 1. `cpu_supports_p2pdma`: any AMD CPU of family 0x17 (Zen) or later does;
//! 2. else `host_bridge_whitelist`: the "host bridge device" of each side
//!    (`pci_host_bridge_dev`: the first function on the root bus if it is
//!    at devfn 00.0 or is a root port) must be in `pci_p2pdma_whitelist`;
//!    entries flagged `REQ_SAME_HOST_BRIDGE` count only when both devices
//!    are below the same host bridge.
//!
//! Anything else the kernel refuses (`PCI_P2PDMA_MAP_NOT_SUPPORTED`): the
//! hardware may still forward, but nobody has vouched for it.

use std::fmt;

use crate::pci::PciAddress;

/// The CPU facts `cpu_supports_p2pdma` looks at (x86 only; other
/// architectures never qualify).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Cpu {
    /// `vendor_id` from `/proc/cpuinfo` (`AuthenticAMD`, `GenuineIntel`).
    pub vendor: Option<String>,
    /// `cpu family`, the x86 family number.
    pub family: Option<u32>,
}

impl Cpu {
    /// The first processor's `vendor_id` and `cpu family` from the text of
    /// `/proc/cpuinfo` (the kernel asks `cpu_data(0)`).
    ///
    /// ```
    /// use dmabuf_p2p::topology::Cpu;
    /// let cpu = Cpu::parse_cpuinfo("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n");
    /// assert!(cpu.supports_p2pdma());
    /// ```
    pub fn parse_cpuinfo(text: &str) -> Self {
        let mut cpu = Self::default();
        for line in text.lines() {
            if line.trim().is_empty() && (cpu.vendor.is_some() || cpu.family.is_some()) {
                break; // the end of the first processor's block
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key.trim() {
                "vendor_id" => cpu.vendor = Some(value.trim().to_owned()),
                "cpu family" => cpu.family = value.trim().parse().ok(),
                _ => {}
            }
        }
        cpu
    }

    /// Reads `/proc/cpuinfo`; a machine where it cannot be read counts as
    /// one whose CPU does not vouch for P2P.
    pub fn read() -> Self {
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|t| Self::parse_cpuinfo(&t))
            .unwrap_or_default()
    }

    /// The kernel's `cpu_supports_p2pdma`: an AMD CPU of family 0x17 (Zen)
    /// or later.
    pub fn supports_p2pdma(&self) -> bool {
        self.vendor.as_deref() == Some("AuthenticAMD") && self.family.is_some_and(|f| f >= 0x17)
    }
}

/// A host bridge (root complex) as sysfs names it, and the function the
/// kernel's `pci_host_bridge_dev` takes as its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct HostBridge {
    /// Its sysfs name, `pciDDDD:BB`.
    pub name: String,
    /// The PCI domain (segment).
    pub domain: u32,
    /// Its root bus number.
    pub bus: u8,
    /// The function `pci_host_bridge_dev` picks: the first on the root bus,
    /// when it is at devfn 00.0 or is a root port.
    pub device: HostBridgeDevice,
}

/// What `pci_host_bridge_dev` finds on a root bus.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case", tag = "kind")
)]
pub enum HostBridgeDevice {
    /// This function stands for the host bridge.
    Found {
        /// Its address.
        address: PciAddress,
        /// Its vendor ID.
        vendor: u16,
        /// Its device ID.
        device: u16,
    },
    /// None does: the root bus is empty, or its first function is neither
    /// at 00.0 nor a root port. The kernel then never whitelists it.
    None,
    /// The first function is not at 00.0, and whether it is a root port
    /// takes its PCI Express capability, which only root can read.
    Unreadable {
        /// The first function on the root bus.
        address: PciAddress,
    },
}

/// One entry of the kernel's `pci_p2pdma_whitelist`.
struct Listed {
    vendor: u16,
    /// `None` is `PCI_ANY_ID`.
    device: Option<u16>,
    same_host_bridge_only: bool,
}

const INTEL: u16 = 0x8086;
const GOOGLE: u16 = 0x1ae0;

/// `pci_p2pdma_whitelist` of Linux 7.2.13, in its order (the kernel stops at
/// the first entry whose vendor and device match).
const WHITELIST: [Listed; 21] = [
    // Intel Xeon E5/Core i7
    listed(INTEL, 0x3c00, true),
    listed(INTEL, 0x3c01, true),
    // Intel Xeon E7 v3/Xeon E5 v3/Core i7
    listed(INTEL, 0x2f00, true),
    listed(INTEL, 0x2f01, true),
    // Intel Skylake-E
    listed(INTEL, 0x2030, false),
    listed(INTEL, 0x2031, false),
    listed(INTEL, 0x2032, false),
    listed(INTEL, 0x2033, false),
    listed(INTEL, 0x2020, false),
    listed(INTEL, 0x09a2, false),
    // PCI_DEVICE_ID_INTEL_DSA_SPR0, IAX_SPR0, DSA_GNRD, DSA_DMR, IAA_DMR
    listed(INTEL, 0x0b25, false),
    listed(INTEL, 0x0cfe, false),
    listed(INTEL, 0x11fb, false),
    listed(INTEL, 0x1212, false),
    listed(INTEL, 0x1216, false),
    // PCI_DEVICE_ID_INTEL_QAT_4XXX, 401XX, 402XX, 420XX, 6XXX
    listed(INTEL, 0x4940, false),
    listed(INTEL, 0x4942, false),
    listed(INTEL, 0x4944, false),
    listed(INTEL, 0x4946, false),
    listed(INTEL, 0x4948, false),
    // Google SoCs: any device.
    Listed {
        vendor: GOOGLE,
        device: None,
        same_host_bridge_only: false,
    },
];

const fn listed(vendor: u16, device: u16, same_host_bridge_only: bool) -> Listed {
    Listed {
        vendor,
        device: Some(device),
        same_host_bridge_only,
    }
}

/// What the kernel's rule says about peer-to-peer traffic through the root
/// complex between two devices.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case", tag = "kind")
)]
pub enum HostBridgeSupport {
    /// `cpu_supports_p2pdma`: an AMD CPU of family 0x17 or later.
    Cpu {
        /// The CPU family.
        family: u32,
    },
    /// Every host bridge on the way is in `pci_p2pdma_whitelist`.
    Listed {
        /// The host bridge device's vendor ID.
        vendor: u16,
        /// Its device ID.
        device: u16,
    },
    /// Known bad: the host bridge is listed only for traffic within one
    /// host bridge (`REQ_SAME_HOST_BRIDGE`), and the two devices are below
    /// different ones.
    OnlyWithinOneHostBridge {
        /// The host bridge device's vendor ID.
        vendor: u16,
        /// Its device ID.
        device: u16,
    },
    /// Unknown: a host bridge device that is not in the list (the kernel
    /// warns "Host bridge not in P2PDMA whitelist").
    NotListed {
        /// The host bridge that is not listed.
        name: String,
        /// Its device's vendor ID.
        vendor: u16,
        /// Its device ID.
        device: u16,
    },
    /// Unknown: the root bus has no function that stands for the host
    /// bridge, so the kernel cannot list it.
    NoHostBridgeDevice {
        /// The host bridge.
        name: String,
    },
    /// Not determined: whether the root bus's first function is a root port
    /// takes root to read.
    Unreadable {
        /// The function whose type could not be read.
        address: PciAddress,
    },
}

impl HostBridgeSupport {
    /// The kernel's `cpu_supports_p2pdma() || host_bridge_whitelist(...)`
    /// for two devices below host bridges `a` and `b`.
    pub fn judge(cpu: &Cpu, a: &HostBridge, b: &HostBridge) -> Self {
        if cpu.supports_p2pdma() {
            return Self::Cpu {
                family: cpu.family.unwrap_or(0),
            };
        }
        let same = a.domain == b.domain && a.bus == b.bus;
        let first = one_side(a, same);
        if same || !matches!(first, Self::Listed { .. }) {
            return first;
        }
        one_side(b, same)
    }

    /// Whether the kernel would let peer-to-peer DMA through the root
    /// complex.
    pub fn supported(&self) -> bool {
        matches!(self, Self::Cpu { .. } | Self::Listed { .. })
    }

    /// Whether the kernel's list says it does not work.
    pub fn known_bad(&self) -> bool {
        matches!(self, Self::OnlyWithinOneHostBridge { .. })
    }
}

/// `__host_bridge_whitelist` for one host bridge.
fn one_side(host: &HostBridge, same_host_bridge: bool) -> HostBridgeSupport {
    let (vendor, device) = match &host.device {
        HostBridgeDevice::Found { vendor, device, .. } => (*vendor, *device),
        HostBridgeDevice::None => {
            return HostBridgeSupport::NoHostBridgeDevice {
                name: host.name.clone(),
            };
        }
        HostBridgeDevice::Unreadable { address } => {
            return HostBridgeSupport::Unreadable { address: *address };
        }
    };
    let entry = WHITELIST
        .iter()
        .find(|e| e.vendor == vendor && e.device.is_none_or(|d| d == device));
    match entry {
        Some(e) if e.same_host_bridge_only && !same_host_bridge => {
            HostBridgeSupport::OnlyWithinOneHostBridge { vendor, device }
        }
        Some(_) => HostBridgeSupport::Listed { vendor, device },
        None => HostBridgeSupport::NotListed {
            name: host.name.clone(),
            vendor,
            device,
        },
    }
}

impl fmt::Display for HostBridgeSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu { family } => write!(
                f,
                "supported: an AMD CPU of family {family:#x} forwards P2P between its root ports \
                 (cpu_supports_p2pdma)"
            ),
            Self::Listed { vendor, device } => write!(
                f,
                "supported: host bridge {vendor:04x}:{device:04x} is in the kernel's \
                 pci_p2pdma_whitelist (host_bridge_whitelist)"
            ),
            Self::OnlyWithinOneHostBridge { vendor, device } => write!(
                f,
                "known bad: host bridge {vendor:04x}:{device:04x} forwards P2P only within one \
                 host bridge (REQ_SAME_HOST_BRIDGE in pci_p2pdma_whitelist), and these devices \
                 are below different ones"
            ),
            Self::NotListed {
                name,
                vendor,
                device,
            } => write!(
                f,
                "unknown: host bridge {name} ({vendor:04x}:{device:04x}) is not in the kernel's \
                 pci_p2pdma_whitelist and the CPU is not an AMD Zen (cpu_supports_p2pdma), so \
                 the kernel's p2pdma refuses it; the hardware may still forward"
            ),
            Self::NoHostBridgeDevice { name } => write!(
                f,
                "unknown: the root bus of {name} has no function at 00.0 and no root port first \
                 (pci_host_bridge_dev), so the kernel's p2pdma refuses it"
            ),
            Self::Unreadable { address } => write!(
                f,
                "not determined: whether {address} (first on its root bus) is a root port is in \
                 its PCI Express capability, which only root can read"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(bus: u8, vendor: u16, device: u16) -> HostBridge {
        HostBridge {
            name: format!("pci0000:{bus:02x}"),
            domain: 0,
            bus,
            device: HostBridgeDevice::Found {
                address: PciAddress::new(0, bus, 0, 0).unwrap(),
                vendor,
                device,
            },
        }
    }

    #[test]
    fn zen_cpus_vouch_for_every_host_bridge() {
        let zen = Cpu::parse_cpuinfo("vendor_id\t: AuthenticAMD\ncpu family\t: 23\n");
        let s =
            HostBridgeSupport::judge(&zen, &host(0, 0x1022, 0x1480), &host(0x40, 0x1022, 0x1480));
        assert_eq!(s, HostBridgeSupport::Cpu { family: 23 });
        // QEMU's TCG CPU says AuthenticAMD family 15: not Zen.
        let tcg = Cpu::parse_cpuinfo("vendor_id\t: AuthenticAMD\ncpu family\t: 15\n");
        assert!(!tcg.supports_p2pdma());
        let intel = Cpu::parse_cpuinfo("vendor_id\t: GenuineIntel\ncpu family\t: 6\n");
        assert!(!intel.supports_p2pdma());
    }

    #[test]
    fn only_the_first_processor_counts() {
        let text = "processor : 0\nvendor_id : GenuineIntel\ncpu family : 6\n\n\
                    processor : 1\nvendor_id : AuthenticAMD\ncpu family : 25\n";
        assert_eq!(
            Cpu::parse_cpuinfo(text).vendor.as_deref(),
            Some("GenuineIntel")
        );
    }

    #[test]
    fn same_host_bridge_entries_are_bad_across_host_bridges() {
        let cpu = Cpu::default();
        let a = host(0, INTEL, 0x2f00);
        let b = host(0x80, INTEL, 0x2f00);
        assert!(HostBridgeSupport::judge(&cpu, &a, &a).supported());
        let across = HostBridgeSupport::judge(&cpu, &a, &b);
        assert!(across.known_bad(), "{across}");
    }

    #[test]
    fn skylake_e_is_listed_across_host_bridges_and_q35_is_not() {
        let cpu = Cpu::default();
        let a = host(0, INTEL, 0x2020);
        let b = host(0x17, INTEL, 0x2030);
        assert!(HostBridgeSupport::judge(&cpu, &a, &b).supported());
        let q35 = host(0, INTEL, 0x29c0);
        let s = HostBridgeSupport::judge(&cpu, &q35, &q35);
        assert!(
            matches!(s, HostBridgeSupport::NotListed { device: 0x29c0, .. }),
            "{s:?}"
        );
        assert!(!s.supported() && !s.known_bad());
        // Across host bridges, both sides must be listed.
        let q35_80 = host(0x80, INTEL, 0x29c0);
        assert!(!HostBridgeSupport::judge(&cpu, &a, &q35_80).supported());
        assert!(!HostBridgeSupport::judge(&cpu, &q35_80, &a).supported());
    }

    #[test]
    fn google_is_listed_for_any_device() {
        let s = HostBridgeSupport::judge(
            &Cpu::default(),
            &host(0, GOOGLE, 0x1234),
            &host(0, GOOGLE, 0x1234),
        );
        assert!(s.supported());
    }
}
