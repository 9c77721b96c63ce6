//! The PCI path between two functions, read from sysfs: each one's chain of
//! bridges up to its host bridge, what every function on the way says
//! about ACS and ATS, the IOMMU groups, and the lowest common upstream
//! bridge the kernel's `calc_map_type_and_dist` would find.
//!
//! Only sysfs is read. Its `config` files give everyone the 64-byte
//! standard header (IDs, header type, BAR registers, bus numbers), and
//! everything beyond, where the PCI Express type, ACS and ATS live, only to
//! `CAP_SYS_ADMIN`: without it those are [`Probe::Unreadable`] and the
//! verdict says what they would decide.

use std::path::{Component, Path};

use crate::error::{Error, Result};
use crate::pci::PciAddress;
use crate::sysfs::Sysfs;

use super::capability::{Acs, Ats, PcieType, Probe, acs, ats, pcie_type};
use super::config::ConfigSpace;
use super::host_bridge::{HostBridge, HostBridgeDevice};

/// One PCI function on the path, and what it says about peer-to-peer
/// traffic.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Function {
    /// Its address.
    pub address: PciAddress,
    /// PCI vendor ID.
    pub vendor: u16,
    /// PCI device ID.
    pub device: u16,
    /// The 24-bit class code.
    pub class: u32,
    /// How many bytes of configuration space this process could read (64
    /// without `CAP_SYS_ADMIN`).
    pub config_bytes: usize,
    /// Its PCI Express type; `Absent` for a conventional PCI function.
    pub pcie_type: Probe<PcieType>,
    /// Whether it is one function of a multi-function device.
    pub multifunction: bool,
    /// Its ACS capability and control bits.
    pub acs: Probe<Acs>,
    /// Its ATS capability.
    pub ats: Probe<Ats>,
    /// Its IOMMU group, if an IOMMU translates its DMA.
    pub iommu_group: Option<u32>,
    /// The bound driver.
    pub driver: Option<String>,
    /// The memory BAR registers as configuration space holds them: bus
    /// addresses (the standard header, readable by anyone).
    pub bars: Vec<BarWindow>,
}

impl Function {
    /// What the function is, in a few words: its PCI Express type, or a
    /// conventional PCI function or bridge, or just a bridge or function
    /// when the type could not be read.
    pub fn kind(&self) -> &'static str {
        let bridge = self.class >> 8 == 0x0604;
        match &self.pcie_type {
            Probe::Present(t) => t.short_name(),
            Probe::Absent if bridge => "PCI bridge",
            Probe::Absent => "conventional PCI function",
            Probe::Unreadable if bridge => "bridge",
            Probe::Unreadable => "function",
        }
    }

    /// Its ACS in a few words: `ACS SV RR CR UF` (the enabled bits), `ACS
    /// off` (present, nothing enabled), `no ACS`, or `ACS unreadable`.
    pub fn acs_summary(&self) -> String {
        match &self.acs {
            Probe::Present(a) if a.control.0 == 0 => "ACS off".to_owned(),
            Probe::Present(a) => format!("ACS {}", a.control),
            Probe::Absent => "no ACS".to_owned(),
            Probe::Unreadable => "ACS unreadable".to_owned(),
        }
    }
}

/// A memory BAR: where the function decodes it on the bus, and how big it
/// is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BarWindow {
    /// The BAR index, 0..=5.
    pub index: u32,
    /// The bus address from the BAR register: what a switch routes by, and
    /// the IOVA an untranslated peer request must carry to reach it.
    pub bus_address: u64,
    /// The CPU physical address from sysfs `resource` (equal to the bus
    /// address unless the host bridge translates between them).
    pub cpu_address: u64,
    /// Its size from sysfs `resource`.
    pub size: u64,
}

impl BarWindow {
    /// The last bus address of the BAR (inclusive).
    pub fn bus_last(&self) -> u64 {
        self.bus_address.saturating_add(self.size.saturating_sub(1))
    }
}

/// One function and everything above it.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Upstream {
    /// The function itself.
    pub function: Function,
    /// The bridges above it, the nearest first, up to the one on the root
    /// bus (a root port, usually); empty for a function on the root bus.
    pub bridges: Vec<Function>,
    /// The host bridge (root complex) it is below.
    pub host_bridge: HostBridge,
    /// The other members of its IOMMU group, with their drivers.
    pub group_peers: Vec<GroupPeer>,
}

/// Another function in the same IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GroupPeer {
    /// Its address.
    pub address: PciAddress,
    /// Its driver, if bound.
    pub driver: Option<String>,
}

impl Upstream {
    /// The function then its bridges, nearest first: the chain the kernel's
    /// `pci_upstream_bridge` walks.
    pub fn chain(&self) -> impl Iterator<Item = &Function> {
        std::iter::once(&self.function).chain(self.bridges.iter())
    }

    /// Reads the function at `addr` and its bridges.
    pub fn read(sysfs: &Sysfs, addr: PciAddress) -> Result<Self> {
        let (host, bridges) = bridges_above(sysfs, addr)?;
        let function = read_function(sysfs, addr)?;
        let host_bridge = read_host_bridge(sysfs, host)?;
        let group_peers = match function.iommu_group {
            Some(group) => group_peers(sysfs, addr, group)?,
            None => Vec::new(),
        };
        Ok(Self {
            function,
            bridges,
            host_bridge,
            group_peers,
        })
    }
}

/// The bridges above the function at `addr`, the nearest first, and the
/// name of its host bridge (`pciDDDD:BB`): the short form of [`Upstream`],
/// without the host bridge's device or the IOMMU group's members, which
/// take a listing of every PCI device to find.
pub fn upstream_bridges(sysfs: &Sysfs, addr: PciAddress) -> Result<(String, Vec<Function>)> {
    let ((_, _, name), bridges) = bridges_above(sysfs, addr)?;
    Ok((name, bridges))
}

/// The host bridge (domain, bus, name) of `addr` and the bridges above it,
/// the nearest first.
fn bridges_above(sysfs: &Sysfs, addr: PciAddress) -> Result<((u32, u8, String), Vec<Function>)> {
    let link = sysfs.device_tree_path(addr)?;
    let (host, chain) = split_tree_path(addr, &link)?;
    let mut bridges = Vec::with_capacity(chain.len());
    for bridge in chain.iter().rev() {
        bridges.push(read_function(sysfs, *bridge)?);
    }
    Ok((host, bridges))
}

/// The path between a DMA initiator (the *client*, an engine) and the
/// function whose BAR it writes (the *provider*), named as the kernel's
/// p2pdma code names them.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PciPath {
    /// The function that issues the DMA.
    pub client: Upstream,
    /// The function whose BAR is the target.
    pub provider: Upstream,
    /// The lowest function both chains share, as `calc_map_type_and_dist`
    /// finds it (walking up from the provider, the first one that is also
    /// on the client's chain): a switch's upstream port, a root port with a
    /// switch below, or one of the two functions themselves. `None` when
    /// the chains meet only in the root complex.
    pub common: Option<PciAddress>,
}

impl PciPath {
    /// Reads the path between `client` and `provider` from `sysfs`.
    ///
    /// ```no_run
    /// use dmabuf_p2p::sysfs::Sysfs;
    /// use dmabuf_p2p::topology::PciPath;
    ///
    /// let path = PciPath::read(&Sysfs::default(), "0000:01:00.0".parse()?, "0000:02:00.0".parse()?)?;
    /// match path.common {
    ///     Some(bridge) => println!("they meet at {bridge}"),
    ///     None => println!("they meet in the root complex {}", path.provider.host_bridge.name),
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn read(sysfs: &Sysfs, client: PciAddress, provider: PciAddress) -> Result<Self> {
        let client = Upstream::read(sysfs, client)?;
        let provider = Upstream::read(sysfs, provider)?;
        Ok(Self::new(client, provider))
    }

    /// The path from two chains already read.
    pub fn new(client: Upstream, provider: Upstream) -> Self {
        let same_host = client.host_bridge.name == provider.host_bridge.name;
        let common = provider
            .chain()
            .map(|f| f.address)
            .find(|a| same_host && client.chain().any(|c| c.address == *a));
        Self {
            client,
            provider,
            common,
        }
    }

    /// The functions the kernel's `calc_map_type_and_dist` checks for ACS
    /// redirect: the provider's chain up to and including the common
    /// function, then the client's chain below it. Empty without a common
    /// function (the traffic goes through the host bridge anyway).
    pub fn turning_path(&self) -> Vec<&Function> {
        let Some(common) = self.common else {
            return Vec::new();
        };
        let mut out: Vec<&Function> = Vec::new();
        for f in self.provider.chain() {
            out.push(f);
            if f.address == common {
                break;
            }
        }
        out.extend(self.client.chain().take_while(|f| f.address != common));
        out
    }
}

/// Splits a device's link target into its host bridge (the last `pciDDDD:BB`
/// component) and the PCI functions below it, the root-bus one first; the
/// last of those is the device itself, which is not returned.
fn split_tree_path(addr: PciAddress, link: &Path) -> Result<((u32, u8, String), Vec<PciAddress>)> {
    let bad = |problem: &str| Error::Device {
        device: addr.to_string(),
        problem: format!("{problem} in its device tree path {}", link.display()),
        source: None,
    };
    let mut host: Option<(u32, u8, String)> = None;
    let mut chain: Vec<PciAddress> = Vec::new();
    for component in link.components() {
        let Component::Normal(name) = component else {
            continue;
        };
        let Some(name) = name.to_str() else {
            continue;
        };
        if let Some(hb) = parse_host_bridge(name) {
            host = Some((hb.0, hb.1, name.to_owned()));
            chain.clear(); // e.g. a VMD domain: only what is below the last host bridge
        } else if let Ok(a) = name.parse::<PciAddress>()
            && host.is_some()
        {
            chain.push(a);
        }
    }
    let host = host.ok_or_else(|| bad("no host bridge (pciDDDD:BB)"))?;
    if chain.pop() != Some(addr) {
        return Err(bad("the device is not the last component"));
    }
    Ok((host, chain))
}

/// `pciDDDD:BB` (a domain of 4 or more hex digits and a bus) as (domain, bus).
fn parse_host_bridge(name: &str) -> Option<(u32, u8)> {
    let rest = name.strip_prefix("pci")?;
    let (domain, bus) = rest.split_once(':')?;
    if domain.len() < 4 || bus.len() != 2 {
        return None;
    }
    let domain = u32::from_str_radix(domain, 16).ok()?;
    let bus = u8::from_str_radix(bus, 16).ok()?;
    Some((domain, bus))
}

/// Reads one function's sysfs attributes and configuration space.
fn read_function(sysfs: &Sysfs, addr: PciAddress) -> Result<Function> {
    let cfg = ConfigSpace::new(sysfs.config(addr)?);
    let resources = sysfs.resources(addr)?;
    let bars = cfg
        .bars()
        .into_iter()
        .filter(|b| b.memory)
        .filter_map(|b| {
            let r = resources.iter().find(|r| r.index == b.index)?;
            (!r.is_unused() && r.is_mem()).then_some(BarWindow {
                index: b.index,
                bus_address: b.bus_address,
                cpu_address: r.start,
                size: r.size,
            })
        })
        .collect();
    Ok(Function {
        address: addr,
        vendor: sysfs.vendor(addr)?,
        device: sysfs.device_id(addr)?,
        class: sysfs.class(addr)?,
        config_bytes: cfg.len(),
        pcie_type: pcie_type(&cfg),
        multifunction: cfg.multifunction(),
        acs: acs(&cfg),
        ats: ats(&cfg),
        iommu_group: sysfs.iommu_group(addr)?,
        driver: sysfs.driver(addr)?,
        bars,
    })
}

/// The host bridge `pciDDDD:BB` and the function `pci_host_bridge_dev`
/// takes for it: the first on its root bus, if at 00.0 or a root port.
fn read_host_bridge(sysfs: &Sysfs, (domain, bus, name): (u32, u8, String)) -> Result<HostBridge> {
    let first = sysfs
        .devices()?
        .into_iter()
        .filter(|a| a.domain() == domain && a.bus() == bus)
        .min_by_key(|a| (a.device(), a.function()));
    let device = match first {
        None => HostBridgeDevice::None,
        Some(address) => {
            let is_host = if address.device() == 0 && address.function() == 0 {
                Probe::Present(true)
            } else {
                match pcie_type(&ConfigSpace::new(sysfs.config(address)?)) {
                    Probe::Present(t) => Probe::Present(t == PcieType::RootPort),
                    Probe::Absent => Probe::Present(false),
                    Probe::Unreadable => Probe::Unreadable,
                }
            };
            match is_host {
                Probe::Present(true) => HostBridgeDevice::Found {
                    address,
                    vendor: sysfs.vendor(address)?,
                    device: sysfs.device_id(address)?,
                },
                Probe::Present(false) | Probe::Absent => HostBridgeDevice::None,
                Probe::Unreadable => HostBridgeDevice::Unreadable { address },
            }
        }
    };
    Ok(HostBridge {
        name,
        domain,
        bus,
        device,
    })
}

/// The other PCI functions of IOMMU group `group`, with their drivers.
fn group_peers(sysfs: &Sysfs, addr: PciAddress, group: u32) -> Result<Vec<GroupPeer>> {
    let mut out = Vec::new();
    for a in sysfs.devices()? {
        if a != addr && sysfs.iommu_group(a)? == Some(group) {
            out.push(GroupPeer {
                address: a,
                driver: sysfs.driver(a)?,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn tree_paths_split_into_host_bridge_and_bridges() {
        let link = Path::new(
            "../../../devices/pci0000:00/0000:00:10.0/0000:01:00.0/0000:02:01.0/0000:04:00.0",
        );
        let ((domain, bus, name), chain) = split_tree_path(a("0000:04:00.0"), link).unwrap();
        assert_eq!((domain, bus, name.as_str()), (0, 0, "pci0000:00"));
        assert_eq!(
            chain,
            [a("0000:00:10.0"), a("0000:01:00.0"), a("0000:02:01.0")]
        );
    }

    #[test]
    fn a_vmd_domain_starts_a_new_chain() {
        let link = Path::new(
            "../../../devices/pci0000:00/0000:00:0e.0/pci10000:e0/10000:e0:06.0/10000:e1:00.0",
        );
        let ((domain, bus, _), chain) = split_tree_path(a("10000:e1:00.0"), link).unwrap();
        assert_eq!((domain, bus), (0x10000, 0xe0));
        assert_eq!(chain, [a("10000:e0:06.0")]);
    }

    #[test]
    fn a_link_that_does_not_end_in_the_device_is_refused() {
        let link = Path::new("../../../devices/pci0000:00/0000:00:10.0");
        assert!(split_tree_path(a("0000:01:00.0"), link).is_err());
        let link = Path::new("../../../devices/platform/0000:01:00.0");
        assert!(split_tree_path(a("0000:01:00.0"), link).is_err());
    }
}
