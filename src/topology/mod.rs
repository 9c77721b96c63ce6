//! Will peer-to-peer DMA work between two PCI functions, and why not: the
//! PCI path between them, Access Control Services (ACS) on it, the IOMMU's
//! reach, and a [`Verdict`] with reasons, before the first byte moves.
//!
//! Everything is read from sysfs (and `/proc/cpuinfo`); nothing is written.
//! Without `CAP_SYS_ADMIN`, sysfs shows only the first 64 bytes of each
//! function's configuration space, so the PCI Express type, ACS and ATS
//! are then [`Probe::Unreadable`] and the verdict says what they would
//! decide; the Intel IOMMU's host address width (the ACPI DMAR table) is
//! root-only too.
//!
//! * [`ConfigSpace`] walks the capability lists of configuration-space
//!   bytes, and [`acs`], [`ats`], [`pcie_type`] decode what the path needs;
//! * [`PciPath`] is the two functions' chains of bridges up to their host
//!   bridges and where the chains meet;
//! * [`HostBridgeSupport`] is the kernel's rule for traffic through the
//!   root complex (`cpu_supports_p2pdma`, `pci_p2pdma_whitelist`);
//! * [`Verdict`] judges a path: the route, whether the IOMMU translates it,
//!   what the IOMMU can reach, where to map the BAR
//!   ([`Verdict::placement`]: its bus address where only that works).
//!
//! ```no_run
//! use dmabuf_p2p::sysfs::Sysfs;
//! use dmabuf_p2p::topology::{PciPath, Platform, Verdict};
//!
//! let sysfs = Sysfs::default();
//! let path = PciPath::read(&sysfs, "0000:01:00.0".parse()?, "0000:02:00.0".parse()?)?;
//! let verdict = Verdict::new(&path, &Platform::read(&sysfs)?, None, None);
//! println!("{verdict}");
//! # Ok::<(), dmabuf_p2p::Error>(())
//! ```

mod capability;
mod config;
mod dmar;
mod host_bridge;
mod path;
mod reason;
mod verdict;

pub use capability::{Acs, AcsFlags, Ats, PcieType, Probe, acs, ats, pcie_type};
pub use config::{BarRegister, Capability, ConfigSpace};
pub use dmar::{host_address_width, parse_dmar_width};
pub use host_bridge::{Cpu, HostBridge, HostBridgeDevice, HostBridgeSupport};
pub use path::{BarWindow, Function, GroupPeer, PciPath, Upstream, upstream_bridges};
pub use reason::Reason;
pub use verdict::{KernelMapType, Outcome, PlacementAdvice, Platform, Route, Verdict};
