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
//! * [`HostBridgeSupport`] is the kernel's rule for traffic through the
//!   root complex (`cpu_supports_p2pdma`, `pci_p2pdma_whitelist`);

mod capability;
mod config;
mod dmar;
mod host_bridge;

pub use capability::{Acs, AcsFlags, Ats, PcieType, Probe, acs, ats, pcie_type};
pub use config::{BarRegister, Capability, ConfigSpace};
pub use dmar::{host_address_width, parse_dmar_width};
pub use host_bridge::{Cpu, HostBridge, HostBridgeDevice, HostBridgeSupport};
