//! The capabilities the P2P path depends on, decoded from configuration
//! space: the PCI Express port type, Access Control Services (ACS) and
//! Address Translation Services (ATS). Register layouts are those of
//! `include/uapi/linux/pci_regs.h` (`PCI_EXP_FLAGS_TYPE`, `PCI_ACS_*`,
//! `PCI_ATS_*`).

use std::fmt;

use super::config::{CAP_ID_EXP, ConfigSpace, EXT_CAP_ID_ACS, EXT_CAP_ID_ATS};

/// What is known about one capability of one function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case", tag = "state", content = "value")
)]
pub enum Probe<T> {
    /// The function has it.
    Present(T),
    /// The function does not have it (its configuration space was read).
    Absent,
    /// Not known: the configuration space that would hold it could not be
    /// read (sysfs gives a reader without `CAP_SYS_ADMIN` the first 64
    /// bytes only).
    Unreadable,
}

impl<T> Probe<T> {
    /// The value, if present.
    pub fn present(&self) -> Option<&T> {
        match self {
            Self::Present(v) => Some(v),
            Self::Absent | Self::Unreadable => None,
        }
    }

    /// Whether it could not be read.
    pub fn is_unreadable(&self) -> bool {
        matches!(self, Self::Unreadable)
    }
}

/// The PCI Express device/port type (`PCI_EXP_FLAGS_TYPE` of the PCI
/// Express capability).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum PcieType {
    /// `PCI_EXP_TYPE_ENDPOINT`.
    Endpoint,
    /// `PCI_EXP_TYPE_LEG_END`: a legacy endpoint.
    LegacyEndpoint,
    /// `PCI_EXP_TYPE_ROOT_PORT`.
    RootPort,
    /// `PCI_EXP_TYPE_UPSTREAM`: a switch's upstream port.
    SwitchUpstream,
    /// `PCI_EXP_TYPE_DOWNSTREAM`: a switch's downstream port.
    SwitchDownstream,
    /// `PCI_EXP_TYPE_PCI_BRIDGE`: a PCIe-to-PCI/PCI-X bridge.
    PcieToPciBridge,
    /// `PCI_EXP_TYPE_PCIE_BRIDGE`: a PCI/PCI-X-to-PCIe bridge.
    PciToPcieBridge,
    /// `PCI_EXP_TYPE_RC_END`: a root-complex integrated endpoint.
    RootComplexEndpoint,
    /// `PCI_EXP_TYPE_RC_EC`: a root-complex event collector.
    RootComplexEventCollector,
    /// A type value the specification does not define.
    Other(u8),
}

impl PcieType {
    /// The type from the 4-bit field.
    pub fn from_field(v: u8) -> Self {
        match v {
            0x0 => Self::Endpoint,
            0x1 => Self::LegacyEndpoint,
            0x4 => Self::RootPort,
            0x5 => Self::SwitchUpstream,
            0x6 => Self::SwitchDownstream,
            0x7 => Self::PcieToPciBridge,
            0x8 => Self::PciToPcieBridge,
            0x9 => Self::RootComplexEndpoint,
            0xa => Self::RootComplexEventCollector,
            other => Self::Other(other),
        }
    }

    /// A short name for trees and tables.
    pub fn short_name(&self) -> &'static str {
        match self {
            Self::Endpoint => "endpoint",
            Self::LegacyEndpoint => "legacy endpoint",
            Self::RootPort => "root port",
            Self::SwitchUpstream => "switch upstream port",
            Self::SwitchDownstream => "switch downstream port",
            Self::PcieToPciBridge => "PCIe-to-PCI bridge",
            Self::PciToPcieBridge => "PCI-to-PCIe bridge",
            Self::RootComplexEndpoint => "root-complex integrated endpoint",
            Self::RootComplexEventCollector => "root-complex event collector",
            Self::Other(_) => "PCIe function of unknown type",
        }
    }
}

impl fmt::Display for PcieType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(v) => write!(f, "PCIe type {v:#x}"),
            other => f.write_str(other.short_name()),
        }
    }
}

/// The PCI Express type of a function: `Present` with its type, `Absent`
/// for a conventional PCI function (no PCI Express capability),
/// `Unreadable` when only the standard header could be read.
pub fn pcie_type(cfg: &ConfigSpace) -> Probe<PcieType> {
    if !cfg.capabilities_readable() {
        return Probe::Unreadable;
    }
    match cfg.find_capability(CAP_ID_EXP) {
        // PCI_EXP_FLAGS at +2, type in bits 7..4.
        Some(pos) => match cfg.word(usize::from(pos) + 2) {
            Some(flags) => Probe::Present(PcieType::from_field(((flags >> 4) & 0xf) as u8)),
            None => Probe::Unreadable,
        },
        None => Probe::Absent,
    }
}

/// ACS capability or control bits (`PCI_ACS_SV` ... `PCI_ACS_DT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AcsFlags(pub u16);

impl AcsFlags {
    /// `PCI_ACS_SV`: Source Validation.
    pub const SOURCE_VALIDATION: Self = Self(0x0001);
    /// `PCI_ACS_TB`: Translation Blocking.
    pub const TRANSLATION_BLOCKING: Self = Self(0x0002);
    /// `PCI_ACS_RR`: P2P Request Redirect (requests from below go upstream).
    pub const REQUEST_REDIRECT: Self = Self(0x0004);
    /// `PCI_ACS_CR`: P2P Completion Redirect.
    pub const COMPLETION_REDIRECT: Self = Self(0x0008);
    /// `PCI_ACS_UF`: Upstream Forwarding.
    pub const UPSTREAM_FORWARDING: Self = Self(0x0010);
    /// `PCI_ACS_EC`: P2P Egress Control.
    pub const EGRESS_CONTROL: Self = Self(0x0020);
    /// `PCI_ACS_DT`: Direct Translated P2P (ATS-translated requests may go
    /// straight to a peer even with redirect on).
    pub const DIRECT_TRANSLATED: Self = Self(0x0040);

    /// The bits the kernel's `pci_bridge_has_acs_redir` counts as sending
    /// peer-to-peer traffic upstream: RR, CR, EC.
    pub const REDIRECTING: Self = Self(0x0004 | 0x0008 | 0x0020);

    /// The bits the kernel requires for IOMMU group isolation
    /// (`REQ_ACS_FLAGS` in `drivers/iommu/iommu.c`): SV, RR, CR, UF.
    pub const ISOLATING: Self = Self(0x0001 | 0x0004 | 0x0008 | 0x0010);

    const NAMES: [(u16, &'static str); 7] = [
        (0x0001, "SV"),
        (0x0002, "TB"),
        (0x0004, "RR"),
        (0x0008, "CR"),
        (0x0010, "UF"),
        (0x0020, "EC"),
        (0x0040, "DT"),
    ];

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any bit of `other` is set.
    pub fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    /// The bits of both.
    pub fn and(self, other: Self) -> Self {
        Self(self.0 & other.0)
    }

    /// The lspci-style names of the bits that are set (`SV`, `RR`, ...).
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(bit, _)| self.0 & bit != 0)
            .map(|(_, n)| *n)
            .collect()
    }
}

impl fmt::Display for AcsFlags {
    /// The names of the set bits, space-separated, or `-` for none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.names();
        if names.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&names.join(" "))
        }
    }
}

/// A function's ACS extended capability (`PCI_EXT_CAP_ID_ACS`).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Acs {
    /// Where the capability is.
    pub offset: u16,
    /// What the port can do (`PCI_ACS_CAP`).
    pub capability: AcsFlags,
    /// What is enabled (`PCI_ACS_CTRL`).
    pub control: AcsFlags,
    /// The egress control vector's size in bits (`PCI_ACS_EGRESS_BITS`),
    /// meaningful only with EC.
    pub egress_vector_bits: u8,
}

impl Acs {
    /// Whether peer-to-peer requests and completions are sent upstream
    /// instead of across: the kernel's `pci_bridge_has_acs_redir` (any of
    /// RR, CR, EC enabled).
    pub fn redirects(&self) -> bool {
        self.control.intersects(AcsFlags::REDIRECTING)
    }

    /// The enabled bits that redirect (RR, CR, EC), for messages.
    pub fn redirecting_bits(&self) -> AcsFlags {
        self.control.and(AcsFlags::REDIRECTING)
    }

    /// Whether the port isolates what is below it the way the kernel's
    /// `pci_acs_flags_enabled(dev, REQ_ACS_FLAGS)` requires: every one of
    /// SV, RR, CR, UF that the port implements is enabled (a missing one is
    /// taken as hard-wired on, as the kernel takes it).
    pub fn isolates(&self) -> bool {
        let required = self.capability.and(AcsFlags::ISOLATING);
        self.control.contains(required)
    }
}

/// The ACS capability of a function, from its extended configuration space.
pub fn acs(cfg: &ConfigSpace) -> Probe<Acs> {
    extended(cfg, EXT_CAP_ID_ACS, |pos| {
        Some(Acs {
            offset: pos as u16,
            capability: AcsFlags(cfg.word(pos + 4)?),
            control: AcsFlags(cfg.word(pos + 6)?),
            // PCI_ACS_EGRESS_BITS: the byte at +5 (the capability
            // register's upper half).
            egress_vector_bits: cfg.byte(pos + 5)?,
        })
    })
}

/// A function's ATS extended capability (`PCI_EXT_CAP_ID_ATS`).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Ats {
    /// Where the capability is.
    pub offset: u16,
    /// `PCI_ATS_CTRL_ENABLE`: the function asks the IOMMU for translations
    /// and may then send already-translated requests.
    pub enabled: bool,
    /// `PCI_ATS_CTRL_STU`: the smallest translation unit, as a power of two
    /// of 4 KiB pages.
    pub smallest_translation_unit: u8,
}

/// The ATS capability of a function, from its extended configuration space.
pub fn ats(cfg: &ConfigSpace) -> Probe<Ats> {
    extended(cfg, EXT_CAP_ID_ATS, |pos| {
        let ctrl = cfg.word(pos + 6)?;
        Some(Ats {
            offset: pos as u16,
            enabled: ctrl & 0x8000 != 0,
            smallest_translation_unit: (ctrl & 0x1f) as u8,
        })
    })
}

/// Finds an extended capability and decodes it: `Unreadable` when the
/// extended space was not read (a 64-byte unprivileged read), `Absent` when
/// the function has none (no such capability, or a 256-byte conventional
/// function, which has no extended space at all).
fn extended<T>(cfg: &ConfigSpace, id: u16, decode: impl FnOnce(usize) -> Option<T>) -> Probe<T> {
    if !cfg.capabilities_readable() {
        return Probe::Unreadable;
    }
    if !cfg.extended_readable() {
        return Probe::Absent;
    }
    match cfg.find_extended_capability(id) {
        Some(pos) => decode(usize::from(pos)).map_or(Probe::Unreadable, Probe::Present),
        None => Probe::Absent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acs_flags_name_their_bits_as_lspci_does() {
        assert_eq!(AcsFlags(0x1d).to_string(), "SV RR CR UF");
        assert_eq!(AcsFlags(0).to_string(), "-");
        assert_eq!(AcsFlags(0x7f).names().len(), 7);
    }

    #[test]
    fn redirect_follows_pci_bridge_has_acs_redir() {
        let acs = |ctrl| Acs {
            offset: 0x148,
            capability: AcsFlags(0x7f),
            control: AcsFlags(ctrl),
            egress_vector_bits: 0,
        };
        assert!(!acs(0x01).redirects());
        assert!(!acs(0x12).redirects());
        assert!(acs(0x04).redirects());
        assert!(acs(0x08).redirects());
        assert!(acs(0x20).redirects());
        assert_eq!(acs(0x2d).redirecting_bits().to_string(), "RR CR EC");
    }

    #[test]
    fn isolation_follows_pci_acs_flags_enabled() {
        // A port without UF in its capability needs only SV RR CR.
        let acs = Acs {
            offset: 0x100,
            capability: AcsFlags(0x0f),
            control: AcsFlags(0x0d),
            egress_vector_bits: 0,
        };
        assert!(acs.isolates());
        let off = Acs {
            control: AcsFlags(0x05),
            ..acs
        };
        assert!(!off.isolates());
    }

    #[test]
    fn a_64_byte_read_makes_everything_unreadable() {
        let cfg = ConfigSpace::new(vec![0; 64]);
        assert!(pcie_type(&cfg).is_unreadable());
        assert!(acs(&cfg).is_unreadable());
        assert!(ats(&cfg).is_unreadable());
    }

    #[test]
    fn a_conventional_function_has_no_extended_capabilities() {
        let cfg = ConfigSpace::new(vec![0; 256]);
        assert_eq!(pcie_type(&cfg), Probe::Absent);
        assert_eq!(acs(&cfg), Probe::Absent);
        assert_eq!(ats(&cfg), Probe::Absent);
    }
}
