//! The reasons behind a [`Verdict`](super::Verdict): each one fact about
//! the path, the root complex or the IOMMU, told as a sentence that names
//! the kernel function whose rule it follows and, where there is one, what
//! to change.

use std::fmt;

use crate::pci::PciAddress;

use super::host_bridge::HostBridgeSupport;
use super::path::BarWindow;

/// One reason behind a verdict.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case", tag = "kind")
)]
pub enum Reason {
    /// Engine and target are the same function.
    SameFunction {
        /// The function.
        function: PciAddress,
    },
    /// The two chains share no bridge: the traffic goes up to the root
    /// complex (`calc_map_type_and_dist` finds no common upstream device).
    NoCommonBridge {
        /// The engine's host bridge.
        client_host: String,
        /// The target's host bridge.
        provider_host: String,
    },
    /// The chains meet at `common`, below the root complex.
    MeetAt {
        /// Where.
        common: PciAddress,
        /// What it is (`switch upstream port`, ...), when known.
        what: String,
    },
    /// ACS redirect is on at `function`: peer requests go up to the root
    /// complex (`pci_bridge_has_acs_redir`).
    AcsRedirect {
        /// The function.
        function: PciAddress,
        /// The redirecting bits enabled (`RR CR`, ...).
        bits: String,
    },
    /// No function where the traffic turns redirects it: none has ACS
    /// RR/CR/EC enabled (or any ACS at all).
    NoAcsRedirect {
        /// The functions checked, each with what it has (`no ACS`,
        /// `ACS SV UF`).
        checked: Vec<(PciAddress, String)>,
    },
    /// ACS control could not be read on these functions (configuration
    /// space beyond 64 bytes is root-only in sysfs).
    AcsUnreadable {
        /// The functions.
        functions: Vec<PciAddress>,
    },
    /// What the kernel's rule says of the root complex.
    HostBridge {
        /// The judgment.
        support: HostBridgeSupport,
    },
    /// The engine sends ATS-translated requests, which a port with ACS
    /// Direct Translated P2P forwards straight to a peer.
    AtsEnabled {
        /// The engine.
        function: PciAddress,
    },
    /// The engine's DMA passes no IOMMU: it has no IOMMU group, so it
    /// cannot be attached to an IOAS.
    NoIommu {
        /// The function without a group.
        function: PciAddress,
    },
    /// A function shares its IOMMU group with one whose kernel driver owns
    /// the group's DMA: iommufd cannot claim the group
    /// (`iommu_device_claim_dma_owner`; only drivers with
    /// `driver_managed_dma`, such as vfio-pci, pci-stub and pcieport, leave
    /// it free).
    GroupOwnedByDriver {
        /// The function to be used.
        function: PciAddress,
        /// Its group.
        group: u32,
        /// The other member.
        peer: PciAddress,
        /// Its driver.
        driver: String,
    },
    /// Engine and target are in one IOMMU group: the kernel found nothing
    /// isolating them from each other, and both must use the same IOAS.
    SameGroup {
        /// The group.
        group: u32,
    },
    /// A function is not bound to a VFIO driver yet (the library needs
    /// both on vfio-pci).
    NotOnVfio {
        /// The function.
        function: PciAddress,
        /// Its driver, if any.
        driver: Option<String>,
    },
    /// Only an identity IOVA works here, and the BAR's bus range is not
    /// inside one usable IOVA range of the IOAS.
    BarOutsideIovaRanges {
        /// The BAR.
        bar: BarWindow,
        /// The usable ranges, as `start..=last` text.
        ranges: Vec<String>,
        /// The IOMMU's input address width the ranges imply (bits above
        /// the top usable IOVA).
        width: u32,
    },
    /// The BAR lies above the IOMMU's host address width: a translated
    /// request can never be pointed at it (the IOMMU refuses page-table
    /// entries with those bits, "non-zero reserved fields in PTE").
    BarAboveHostAddressWidth {
        /// The BAR.
        bar: BarWindow,
        /// The width in bits.
        width: u8,
    },
    /// The BAR lies above the IOMMU's input address width (the top of the
    /// usable IOVA ranges) and its host address width is not known: real
    /// IOMMUs still reach it, a virtual one whose host address width is
    /// its input width does not.
    BarAboveIovaWidth {
        /// The BAR.
        bar: BarWindow,
        /// The input width in bits.
        width: u32,
    },
    /// Where to map the BAR so the engine's DMA reaches it on this route.
    Placement {
        /// The BAR.
        bar: u32,
        /// The IOVA for its first byte, or `None` for anywhere usable.
        identity_iova: Option<u64>,
    },
    /// The IOAS's usable ranges are not known (no IOAS with the engine
    /// attached was given): the BAR was not checked against them.
    IovaRangesUnknown,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::SameFunction { function } => write!(
                f,
                "{function} is both the engine and the target: its DMA into its own BAR stays \
                 inside the function"
            ),
            Self::NoCommonBridge {
                client_host,
                provider_host,
            } if client_host == provider_host => write!(
                f,
                "the two share no bridge: traffic goes up into the root complex {client_host} \
                 and down again (calc_map_type_and_dist finds no common upstream device)"
            ),
            Self::NoCommonBridge {
                client_host,
                provider_host,
            } => write!(
                f,
                "the two are below different host bridges ({client_host}, {provider_host}): \
                 traffic crosses between root complexes"
            ),
            Self::MeetAt { common, what } => write!(
                f,
                "their paths meet at {common} ({what}): traffic can turn there without reaching \
                 the root complex"
            ),
            Self::AcsRedirect { function, bits } => write!(
                f,
                "{function} has ACS {bits} enabled: peer-to-peer requests are sent up to the root \
                 complex and the IOMMU (pci_bridge_has_acs_redir); the kernel parameter \
                 pci=disable_acs_redir={function} (or the firmware's ACS setting) turns it off"
            ),
            Self::NoAcsRedirect { checked } => {
                let list: Vec<String> = checked
                    .iter()
                    .map(|(a, what)| format!("{a} ({what})"))
                    .collect();
                write!(
                    f,
                    "no ACS redirect where the traffic turns: {}; a request addressed into the \
                     target's window turns below the root complex, untranslated, so only an IOVA \
                     equal to the BAR's bus address reaches it, and any other IOVA goes up to the \
                     IOMMU or into a sibling whose window it hits",
                    list.join(", ")
                )
            }
            Self::AcsUnreadable { functions } => {
                let list: Vec<String> = functions.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "the ACS control of {} could not be read (configuration space beyond 64 bytes \
                     is root-only in sysfs): run as root to decide whether traffic turns in the \
                     switch",
                    list.join(", ")
                )
            }
            Self::HostBridge { support } => write!(f, "root complex: {support}"),
            Self::AtsEnabled { function } => write!(
                f,
                "{function} has ATS enabled: requests it sends already translated go straight to \
                 a peer where a port has ACS Direct Translated P2P (DT) on"
            ),
            Self::NoIommu { function } => write!(
                f,
                "{function} is in no IOMMU group: no IOMMU translates its DMA, so it cannot be \
                 attached to an IOAS (boot with the IOMMU on: intel_iommu=on or amd_iommu=on)"
            ),
            Self::GroupOwnedByDriver {
                function,
                group,
                peer,
                driver,
            } => write!(
                f,
                "{function} shares IOMMU group {group} with {peer}, bound to {driver}, whose DMA \
                 the kernel owns: iommufd cannot claim the group \
                 (iommu_device_claim_dma_owner) until {peer} is unbound or bound to vfio-pci"
            ),
            Self::SameGroup { group } => write!(
                f,
                "both are in IOMMU group {group}: the kernel found no ACS isolation between them \
                 (pci_device_group), and both must be attached to the same IOAS"
            ),
            Self::NotOnVfio { function, driver } => write!(
                f,
                "{function} is bound to {}, not vfio-pci: bind it before mapping",
                driver.as_deref().unwrap_or("no driver")
            ),
            Self::BarOutsideIovaRanges { bar, ranges, width } => write!(
                f,
                "BAR{} at bus address {:#x}..={:#x} is not inside one usable IOVA range of the \
                 IOAS ({}; a {width}-bit IOMMU): the identity IOVA this route needs cannot be \
                 mapped",
                bar.index,
                bar.bus_address,
                bar.bus_last(),
                ranges.join(", ")
            ),
            Self::BarAboveHostAddressWidth { bar, width } => write!(
                f,
                "BAR{} at {:#x}..={:#x} lies above the IOMMU's {width}-bit host address width \
                 (ACPI DMAR): the IOMMU cannot translate any IOVA to it (\"non-zero reserved \
                 fields in PTE\"), so mapping it succeeds and the DMA faults",
                bar.index,
                bar.cpu_address,
                bar.cpu_address.saturating_add(bar.size.saturating_sub(1)),
            ),
            Self::BarAboveIovaWidth { bar, width } => write!(
                f,
                "BAR{} at {:#x} lies above the IOMMU's {width}-bit input width: a real IOMMU \
                 still translates to it, a virtual one whose host address width is the same \
                 (QEMU's intel-iommu aw-bits, a 39-bit cloud-hypervisor vIOMMU) does not and the \
                 DMA faults; root can read the width from the ACPI DMAR table",
                bar.index, bar.cpu_address,
            ),
            Self::Placement {
                bar,
                identity_iova: Some(iova),
            } => write!(
                f,
                "map BAR{bar} at IOVA {iova:#x}, its bus address (identity placement): the switch \
                 routes that address to the BAR, and should the request go up instead, the IOMMU \
                 maps it to the same BAR"
            ),
            Self::Placement {
                bar,
                identity_iova: None,
            } => write!(
                f,
                "map BAR{bar} anywhere usable (automatic placement): the IOMMU translates every \
                 request on this route"
            ),
            Self::IovaRangesUnknown => f.write_str(
                "the IOAS's usable IOVA ranges are unknown (no IOAS with the engine attached): \
                 the BAR was not checked against them",
            ),
        }
    }
}
