//! Will peer-to-peer DMA from one function into another's BAR work, and
//! why not: the route the traffic takes (the rule of the kernel's
//! `calc_map_type_and_dist` in `drivers/pci/p2pdma.c`), whether the IOMMU
//! translates it, and what the IOMMU can reach.
//!
//! The routes:
//!
//! * **through a switch**: the two functions share a bridge below the root
//!   complex and no function on the way has ACS redirect (RR, CR or EC)
//!   enabled (`pci_bridge_has_acs_redir`). The switch routes a request by
//!   its address, so the IOMMU never sees it: only an IOVA equal to the
//!   BAR's *bus* address reaches the BAR (the kernel maps such pairs with
//!   `PCI_P2PDMA_MAP_BUS_ADDR`). Any other IOVA leaves the switch (to the
//!   IOMMU and the root complex) or lands in whichever sibling's window it
//!   falls in. Map the BAR at its bus address (identity placement) and both
//!   ways end at the BAR.
//! * **through the root complex**: no shared bridge, or ACS redirect on the
//!   way. The IOMMU translates the request, so any usable IOVA works, if
//!   the root complex forwards peer-to-peer traffic between its ports: the
//!   kernel trusts only AMD Zen CPUs (`cpu_supports_p2pdma`) and the host
//!   bridges of `pci_p2pdma_whitelist` (`host_bridge_whitelist`).
//! * **impossible** here: the engine has no IOMMU (no IOMMU group, so no
//!   IOAS to join), a group is shared with a function whose kernel driver
//!   owns its DMA (iommufd cannot claim the group), the BAR's bus address is
//!   outside the IOAS's usable IOVA ranges where only an identity IOVA
//!   works, or the BAR lies above the IOMMU's host address width where the
//!   IOMMU must translate to it.

use std::fmt;

use crate::error::Result;
use crate::importer::iommufd::{IovaPlacement, IovaRanges};
use crate::pci::PciAddress;
use crate::range::ByteRange;
use crate::sysfs::Sysfs;

use super::capability::Probe;
use super::dmar::host_address_width;
use super::host_bridge::{Cpu, HostBridgeSupport};
use super::path::{BarWindow, PciPath};
use super::reason::Reason;

/// What the machine tells about P2P beyond the two functions' path.
///
/// ```no_run
/// let platform = dmabuf_p2p::topology::Platform::read(&dmabuf_p2p::sysfs::Sysfs::default())?;
/// println!("IOMMU host address width: {:?}", platform.host_address_width);
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Platform {
    /// The CPU, for `cpu_supports_p2pdma`.
    pub cpu: Cpu,
    /// The Intel IOMMU's host address width in bits (the ACPI DMAR table;
    /// root only), the highest physical address its page tables reach.
    pub host_address_width: Option<u8>,
}

impl Platform {
    /// The CPU from `/proc/cpuinfo` and the host address width from the
    /// DMAR table under `sysfs` (`None` without one, or without root).
    pub fn read(sysfs: &Sysfs) -> Result<Self> {
        Ok(Self {
            cpu: Cpu::read(),
            host_address_width: host_address_width(sysfs)?.present().copied(),
        })
    }
}

/// The headline of a [`Verdict`].
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Outcome {
    /// Works through the IOMMU at any usable IOVA: a root complex the
    /// kernel vouches for, or one function DMAing into its own BAR.
    Works,
    /// Works, directly through a switch and untranslated, at an IOVA equal
    /// to the BAR's bus address only.
    IdentityOnly,
    /// Through a root complex the kernel does not vouch for: it may
    /// forward, or the data may come back as all-ones. Try it.
    Uncertain,
    /// Through a root complex the kernel's list says does not forward
    /// between these devices.
    KnownBad,
    /// Cannot work as the machine is set up (the reasons say what to
    /// change).
    Impossible,
    /// Depends on ACS control bits this process could not read (run as
    /// root).
    Undetermined,
}

impl Outcome {
    /// A few words for tables.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Works => "works",
            Self::IdentityOnly => "works at the identity IOVA only",
            Self::Uncertain => "uncertain",
            Self::KnownBad => "known bad",
            Self::Impossible => "impossible",
            Self::Undetermined => "undetermined",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The way the traffic goes.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case", tag = "kind")
)]
pub enum Route {
    /// The engine and the BAR are one function.
    SameFunction,
    /// It turns at `common` below the root complex (a switch, or the port
    /// above two functions of one device), routed by address and not
    /// translated (the kernel's `PCI_P2PDMA_MAP_BUS_ADDR`).
    Direct {
        /// Where the two chains meet.
        common: PciAddress,
    },
    /// Up to the root complex and down again, translated by the IOMMU (the
    /// kernel's `PCI_P2PDMA_MAP_THRU_HOST_BRIDGE`, or
    /// `PCI_P2PDMA_MAP_NOT_SUPPORTED` when `support` does not vouch).
    RootComplex {
        /// What the kernel's rule says of the root complex.
        support: HostBridgeSupport,
        /// Functions whose ACS redirect sends the traffic up although the
        /// chains meet below the root complex; empty when they do not.
        redirected_by: Vec<PciAddress>,
    },
    /// Turns at `common` unless one of `unreadable` redirects: their ACS
    /// control needs root to read.
    Undetermined {
        /// Where the two chains meet.
        common: PciAddress,
        /// The functions whose ACS could not be read.
        unreadable: Vec<PciAddress>,
    },
}

impl Route {
    /// Whether the IOMMU translates the traffic on this route (`None`:
    /// not determined).
    pub fn translated(&self) -> Option<bool> {
        match self {
            Self::SameFunction | Self::Direct { .. } => Some(false),
            Self::RootComplex { .. } => Some(true),
            Self::Undetermined { .. } => None,
        }
    }
}

/// What the kernel's `pci_p2pdma_map_type()` answers for a kernel importer
/// (a DRM driver, an RDMA device) that maps a VFIO BAR dma-buf through its
/// own DMA API (`dma_buf_phys_vec_to_sgt`). iommufd does not ask it; every
/// other importer does, and `NotSupported` makes the exporter's map fail
/// with `EINVAL`.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum KernelMapType {
    /// `PCI_P2PDMA_MAP_BUS_ADDR`: the importer gets the BAR's bus address
    /// (the traffic turns below the root complex).
    BusAddr,
    /// `PCI_P2PDMA_MAP_THRU_HOST_BRIDGE`: the importer maps the BAR through
    /// its IOMMU, and the root complex is trusted to forward.
    ThruHostBridge,
    /// `PCI_P2PDMA_MAP_NOT_SUPPORTED`: the kernel refuses the pair.
    NotSupported,
}

impl fmt::Display for KernelMapType {
    /// The kernel's name: `PCI_P2PDMA_MAP_BUS_ADDR`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BusAddr => "PCI_P2PDMA_MAP_BUS_ADDR",
            Self::ThruHostBridge => "PCI_P2PDMA_MAP_THRU_HOST_BRIDGE",
            Self::NotSupported => "PCI_P2PDMA_MAP_NOT_SUPPORTED",
        })
    }
}

/// Where to map a BAR range so that the engine's DMA reaches it, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementAdvice {
    /// The placement to pass to the map call.
    pub at: IovaPlacement,
    /// Why.
    pub why: String,
}

/// The verdict on peer-to-peer DMA from a client (engine) into a BAR of a
/// provider (target).
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Verdict {
    /// The headline.
    pub outcome: Outcome,
    /// The way the traffic goes.
    pub route: Route,
    /// Whether the IOMMU translates it (`None`: not determined).
    pub translated: Option<bool>,
    /// The target BAR the verdict is about.
    pub bar: Option<BarWindow>,
    /// Where the BAR's first byte must be mapped, when the route needs the
    /// identity IOVA (the BAR's bus address) and the IOAS can take it (or
    /// its usable ranges are not known); `None` where any usable IOVA does.
    pub identity_iova: Option<u64>,
    /// Why, in the order they were found.
    pub reasons: Vec<Reason>,
}

impl Verdict {
    /// Judges `path` for DMA into BAR `bar` of the provider (the largest
    /// memory BAR when `None`), on `platform`, into an IOAS with `ranges`
    /// usable (`None`: not known).
    pub fn new(
        path: &PciPath,
        platform: &Platform,
        ranges: Option<&IovaRanges>,
        bar: Option<u32>,
    ) -> Self {
        let mut reasons = Vec::new();
        let route = route(path, platform, &mut reasons);
        // Without an IOMMU group nothing translates the engine's DMA.
        let translated = match path.client.function.iommu_group {
            Some(_) => route.translated(),
            None => Some(false),
        };
        let bar = pick_bar(&path.provider.function.bars, bar);
        let mut impossible = iommu_reasons(path, &mut reasons);

        let identity = matches!(route, Route::Direct { .. } | Route::Undetermined { .. });
        let mut identity_iova = None;
        if let Some(bar) = bar {
            if identity {
                match ranges {
                    Some(r) if !r.contains(bar.bus_address, bar.size) => {
                        // Where the route is only possibly direct, the IOMMU
                        // may yet translate: not impossible, not certain.
                        impossible |= matches!(route, Route::Direct { .. });
                        reasons.push(outside(bar, r));
                    }
                    Some(_) => identity_iova = Some(bar.bus_address),
                    None => {
                        identity_iova = Some(bar.bus_address);
                        reasons.push(Reason::IovaRangesUnknown);
                    }
                }
            }
            if translated != Some(false) {
                let last = bar.cpu_address.saturating_add(bar.size.saturating_sub(1));
                match platform.host_address_width {
                    Some(width) if width < 64 && last >> width != 0 => {
                        impossible = true;
                        reasons.push(Reason::BarAboveHostAddressWidth { bar, width });
                    }
                    Some(_) => {}
                    None => {
                        if let Some(r) = ranges
                            && !r.contains(bar.bus_address, bar.size)
                            && let Reason::BarOutsideIovaRanges { width, .. } = outside(bar, r)
                        {
                            reasons.push(Reason::BarAboveIovaWidth { bar, width });
                        }
                    }
                }
            }
            if !impossible && route != Route::SameFunction && (!identity || identity_iova.is_some())
            {
                reasons.push(Reason::Placement {
                    bar: bar.index,
                    identity_iova,
                });
            }
        }

        let outcome = if impossible {
            Outcome::Impossible
        } else {
            match &route {
                Route::SameFunction => Outcome::Works,
                Route::Direct { .. } => Outcome::IdentityOnly,
                Route::Undetermined { .. } => Outcome::Undetermined,
                Route::RootComplex { support, .. } if support.supported() => Outcome::Works,
                Route::RootComplex { support, .. } if support.known_bad() => Outcome::KnownBad,
                Route::RootComplex { .. } => Outcome::Uncertain,
            }
        };
        Self {
            outcome,
            route,
            translated,
            bar,
            identity_iova,
            reasons,
        }
    }

    /// What `pci_p2pdma_map_type()` answers for a kernel importer on this
    /// route (`calc_map_type_and_dist`: a shared bridge without ACS
    /// redirect is `BusAddr`; the root complex is `ThruHostBridge` only
    /// where `cpu_supports_p2pdma` or `host_bridge_whitelist` vouches);
    /// `None` where the ACS bits that decide could not be read.
    pub fn kernel_map_type(&self) -> Option<KernelMapType> {
        match &self.route {
            Route::SameFunction | Route::Direct { .. } => Some(KernelMapType::BusAddr),
            Route::RootComplex { support, .. } if support.supported() => {
                Some(KernelMapType::ThruHostBridge)
            }
            Route::RootComplex { .. } => Some(KernelMapType::NotSupported),
            Route::Undetermined { .. } => None,
        }
    }

    /// The reasons that decide [`kernel_map_type`](Self::kernel_map_type):
    /// where the two chains meet, ACS redirect on the way (or none), and
    /// the root complex's standing (not those about an IOAS, which a kernel
    /// importer does not use).
    pub fn map_type_reasons(&self) -> impl Iterator<Item = &Reason> {
        self.reasons.iter().filter(|r| {
            matches!(
                r,
                Reason::SameFunction { .. }
                    | Reason::NoCommonBridge { .. }
                    | Reason::MeetAt { .. }
                    | Reason::AcsRedirect { .. }
                    | Reason::NoAcsRedirect { .. }
                    | Reason::AcsUnreadable { .. }
                    | Reason::HostBridge { .. }
            )
        })
    }

    /// Whether only an IOVA equal to the BAR's bus address reaches it (or
    /// is the safe choice, when the route is not determined).
    pub fn needs_identity(&self) -> bool {
        matches!(
            self.route,
            Route::Direct { .. } | Route::Undetermined { .. }
        )
    }

    /// Where to map `range` of the verdict's BAR so that the engine's DMA
    /// reaches it: at its bus address (identity placement) where the
    /// traffic turns in a switch, anywhere usable where the IOMMU
    /// translates it.
    ///
    /// ```no_run
    /// use dmabuf_p2p::sysfs::Sysfs;
    /// use dmabuf_p2p::topology::{Platform, PciPath, Verdict};
    /// use dmabuf_p2p::ByteRange;
    ///
    /// let sysfs = Sysfs::default();
    /// let path = PciPath::read(&sysfs, "0000:03:00.0".parse()?, "0000:04:00.0".parse()?)?;
    /// let verdict = Verdict::new(&path, &Platform::read(&sysfs)?, None, Some(2));
    /// let advice = verdict.placement(ByteRange::new(0, 0x10000));
    /// println!("{:?}: {}", advice.at, advice.why);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn placement(&self, range: ByteRange) -> PlacementAdvice {
        match (self.bar, self.identity_iova) {
            (Some(bar), Some(base)) => {
                let iova = base.saturating_add(range.offset);
                PlacementAdvice {
                    at: IovaPlacement::Fixed(iova),
                    why: format!(
                        "identity IOVA {iova:#x} (BAR{} bus address {:#x} + {:#x}): {}",
                        bar.index,
                        bar.bus_address,
                        range.offset,
                        match self.route {
                            Route::Undetermined { .. } =>
                                "the traffic may turn below the root complex, where only the bus \
                                 address reaches the BAR",
                            _ => "the traffic turns below the root complex, untranslated",
                        }
                    ),
                }
            }
            (None, _) if self.needs_identity() => PlacementAdvice {
                at: IovaPlacement::Auto,
                why: "automatic, for want of better: this route needs the BAR's bus address, and \
                      the BAR is not known (sysfs lists no memory BAR of that index)"
                    .to_owned(),
            },
            (Some(_), None) if self.needs_identity() => PlacementAdvice {
                at: IovaPlacement::Auto,
                why: "automatic, for want of better: the BAR's bus address is outside the IOAS's \
                      usable IOVAs, so the DMA reaches the BAR only if the IOMMU translates it"
                    .to_owned(),
            },
            _ => PlacementAdvice {
                at: IovaPlacement::Auto,
                why: "automatic: the IOMMU translates this route".to_owned(),
            },
        }
    }

    /// The reasons that explain data that did not arrive (or came back as
    /// all-ones), the likeliest cause first: what makes it impossible, then
    /// an IOMMU that may not reach the BAR, a root complex nobody vouches
    /// for, ACS that could not be read, and a switch that routes by
    /// address.
    pub fn likely_causes(&self) -> Vec<&Reason> {
        let rank = |r: &Reason| match r {
            Reason::NoIommu { .. }
            | Reason::GroupOwnedByDriver { .. }
            | Reason::BarAboveHostAddressWidth { .. }
            | Reason::BarOutsideIovaRanges { .. } => Some(0),
            Reason::BarAboveIovaWidth { .. } => Some(1),
            Reason::HostBridge { support } if !support.supported() => Some(2),
            Reason::AcsUnreadable { .. } => Some(3),
            Reason::NoAcsRedirect { .. } => Some(4),
            _ => None,
        };
        let mut out: Vec<(u8, &Reason)> = self
            .reasons
            .iter()
            .filter_map(|r| rank(r).map(|k| (k, r)))
            .collect();
        out.sort_by_key(|(k, _)| *k);
        out.into_iter().map(|(_, r)| r).collect()
    }
}

impl fmt::Display for Verdict {
    /// The headline, then one reason per line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match &self.route {
            Route::SameFunction => "within one function".to_owned(),
            Route::Direct { common } => {
                format!("direct through {common}, untranslated")
            }
            Route::RootComplex { .. } if self.translated == Some(true) => {
                "through the root complex, translated by the IOMMU".to_owned()
            }
            Route::RootComplex { .. } => "through the root complex".to_owned(),
            Route::Undetermined { common, .. } => {
                format!("direct through {common} or through the root complex (not determined)")
            }
        };
        write!(f, "verdict: {} ({how})", self.outcome)?;
        for r in &self.reasons {
            write!(f, "\n  - {r}")?;
        }
        Ok(())
    }
}

/// The route, by `calc_map_type_and_dist`'s rule, with its reasons.
fn route(path: &PciPath, platform: &Platform, reasons: &mut Vec<Reason>) -> Route {
    let client = &path.client;
    let provider = &path.provider;
    if client.function.address == provider.function.address {
        reasons.push(Reason::SameFunction {
            function: client.function.address,
        });
        return Route::SameFunction;
    }
    let support =
        || HostBridgeSupport::judge(&platform.cpu, &client.host_bridge, &provider.host_bridge);
    let Some(common) = path.common else {
        reasons.push(Reason::NoCommonBridge {
            client_host: client.host_bridge.name.clone(),
            provider_host: provider.host_bridge.name.clone(),
        });
        let support = support();
        reasons.push(Reason::HostBridge {
            support: support.clone(),
        });
        return Route::RootComplex {
            support,
            redirected_by: Vec::new(),
        };
    };
    let turning = path.turning_path();
    let what = turning
        .iter()
        .find(|f| f.address == common)
        .map_or_else(|| "a bridge".to_owned(), |f| f.kind().to_owned());
    reasons.push(Reason::MeetAt { common, what });

    let mut redirected = Vec::new();
    let mut unreadable = Vec::new();
    let mut checked = Vec::new();
    for f in &turning {
        match &f.acs {
            Probe::Present(acs) if acs.redirects() => {
                reasons.push(Reason::AcsRedirect {
                    function: f.address,
                    bits: acs.redirecting_bits().to_string(),
                });
                redirected.push(f.address);
            }
            Probe::Present(_) | Probe::Absent => checked.push((f.address, f.acs_summary())),
            Probe::Unreadable => unreadable.push(f.address),
        }
    }
    if client.function.ats.present().is_some_and(|a| a.enabled) {
        reasons.push(Reason::AtsEnabled {
            function: client.function.address,
        });
    }
    if !redirected.is_empty() {
        let support = support();
        reasons.push(Reason::HostBridge {
            support: support.clone(),
        });
        return Route::RootComplex {
            support,
            redirected_by: redirected,
        };
    }
    if !unreadable.is_empty() {
        reasons.push(Reason::AcsUnreadable {
            functions: unreadable.clone(),
        });
        return Route::Undetermined { common, unreadable };
    }
    reasons.push(Reason::NoAcsRedirect { checked });
    Route::Direct { common }
}

/// The reasons the IOMMU side gives; whether one of them makes it
/// impossible.
fn iommu_reasons(path: &PciPath, reasons: &mut Vec<Reason>) -> bool {
    let mut impossible = false;
    let client = &path.client.function;
    if client.iommu_group.is_none() {
        reasons.push(Reason::NoIommu {
            function: client.address,
        });
        impossible = true;
    }
    let same = client.address == path.provider.function.address;
    let sides = if same {
        vec![&path.client]
    } else {
        vec![&path.client, &path.provider]
    };
    for side in sides {
        let f = &side.function;
        if let Some(group) = f.iommu_group {
            for peer in &side.group_peers {
                if let Some(driver) = &peer.driver
                    && !leaves_dma_to_vfio(driver)
                {
                    reasons.push(Reason::GroupOwnedByDriver {
                        function: f.address,
                        group,
                        peer: peer.address,
                        driver: driver.clone(),
                    });
                    impossible = true;
                }
            }
        }
        if !f.driver.as_deref().is_some_and(|d| d.contains("vfio")) {
            reasons.push(Reason::NotOnVfio {
                function: f.address,
                driver: f.driver.clone(),
            });
        }
    }
    if let (Some(a), Some(b)) = (client.iommu_group, path.provider.function.iommu_group)
        && a == b
        && !same
    {
        reasons.push(Reason::SameGroup { group: a });
    }
    impossible
}

/// Whether a driver leaves its IOMMU group's DMA to VFIO: the kernel's
/// drivers with `driver_managed_dma` (vfio-pci and its variant drivers,
/// pci-stub, pcieport).
fn leaves_dma_to_vfio(driver: &str) -> bool {
    matches!(driver, "pci-stub" | "pcieport") || driver.contains("vfio")
}

/// The BAR the verdict is about: `index` if the provider has it, else the
/// largest memory BAR.
fn pick_bar(bars: &[BarWindow], index: Option<u32>) -> Option<BarWindow> {
    match index {
        Some(i) => bars.iter().find(|b| b.index == i).copied(),
        None => bars.iter().max_by_key(|b| (b.size, b.index)).copied(),
    }
}

/// [`Reason::BarOutsideIovaRanges`] for `bar` and `ranges`.
fn outside(bar: BarWindow, ranges: &IovaRanges) -> Reason {
    let top = ranges.ranges.iter().map(|r| r.last).max().unwrap_or(0);
    Reason::BarOutsideIovaRanges {
        bar,
        ranges: ranges.ranges.iter().map(ToString::to_string).collect(),
        width: 64 - top.leading_zeros(),
    }
}
