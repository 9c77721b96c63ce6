//! What a [`GuestBarMap`](super::GuestBarMap) answers: a registered
//! device's id, where a BAR stands, the whole map's report, what a trapped
//! write did, and drift found against the kernel.

use std::fmt;

use super::unreachable::Unreachable;
use crate::pci::PciAddress;
use crate::range::{ByteRange, human_size};
use crate::revoke::BufferState;

/// A registered device, as
/// [`GuestBarMap::register`](super::GuestBarMap::register) names it. Stale
/// once the device is removed: a later device in the same slot has another
/// id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceId {
    pub(super) slot: u32,
    pub(super) generation: u32,
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device #{}.{}", self.slot, self.generation)
    }
}

/// Where one BAR stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BarStatus {
    /// Mapped, live, at its guest-physical address: peers can DMA to it.
    Mapped {
        /// The guest-physical address (the IOVA).
        gpa: u64,
        /// The BAR's size.
        size: u64,
    },
    /// Mapped, live, at its guest-physical address, but for the pages of
    /// the MSI-X table and PBA it holds: peers reach the rest, each part at
    /// its offset from `gpa`.
    MappedAroundMsix {
        /// The guest-physical address (the IOVA of the BAR's first byte).
        gpa: u64,
        /// The BAR's size.
        size: u64,
        /// The BAR's ranges that are not mapped (offsets in the BAR).
        not_mapped: Vec<ByteRange>,
        /// Why not ([`Unreachable::HoldsMsix`]).
        why: Unreachable,
    },
    /// Not reachable, and why.
    Unreachable(Unreachable),
}

impl fmt::Display for BarStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mapped { gpa, .. } => write!(f, "mapped at GPA {gpa:#x}"),
            Self::MappedAroundMsix {
                gpa,
                not_mapped,
                why,
                ..
            } => {
                let holes: Vec<String> = not_mapped.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "mapped at GPA {gpa:#x} except BAR bytes {}: {why}",
                    holes.join(", ")
                )
            }
            Self::Unreachable(why) => write!(f, "not reachable: {why}"),
        }
    }
}

/// One BAR of one device, for
/// [`GuestBarMap::report`](super::GuestBarMap::report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarReport {
    /// The device's id.
    pub id: DeviceId,
    /// Its PCI address.
    pub device: PciAddress,
    /// The BAR index.
    pub bar: u32,
    /// The BAR's size.
    pub size: u64,
    /// Where it stands.
    pub status: BarStatus,
}

impl fmt::Display for BarReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "BAR {} of {} ({}): {}",
            self.bar,
            self.device,
            human_size(self.size),
            self.status
        )
    }
}

/// How [`GuestBarMap::config_write`](super::GuestBarMap::config_write)
/// handled a trapped write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigWrite {
    /// It touched `PCI_COMMAND`: written to the device, memory decode
    /// followed.
    Command,
    /// It touched BAR registers: recorded (BARs are virtual), nothing
    /// written to the device.
    Bars,
    /// It set Initiate Function-Level Reset: written to the device (VFIO
    /// resets it); the BARs are unassigned and decode is off, as after any
    /// reset.
    Reset,
    /// It wrote the power state: written to the device.
    PowerState,
    /// None of the registers above: not performed. The VMM handles it
    /// as it would without this map.
    NotMine,
    /// The device is gone (unplug requested): ignored.
    Ignored,
}

/// A difference between what the map expected and what the kernel had,
/// found and repaired by
/// [`GuestBarMap::sync_with_kernel`](super::GuestBarMap::sync_with_kernel)
/// (or found on the way by any call).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Drift {
    /// The device's revocation hub changed by other means than this map
    /// (another user of the same [`VfioPciDevice`](crate::vfio::VfioPciDevice)): the map's areas may
    /// have been revoked, so they were mapped again.
    HubChanged {
        /// The device.
        device: PciAddress,
        /// The hub's state when found.
        state: BufferState,
    },
    /// The device's memory decode was off while the guest's was on: it was
    /// turned on, and the BARs mapped again.
    DecodeDiffers {
        /// The device.
        device: PciAddress,
        /// The guest's bit.
        guest: bool,
        /// The device's bit as read.
        device_bit: bool,
    },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HubChanged { device, state } => write!(
                f,
                "{device}: its revocation hub changed behind the map ({state:?}); BARs mapped again"
            ),
            Self::DecodeDiffers {
                device,
                guest,
                device_bit,
            } => write!(
                f,
                "{device}: memory decode is {} on the device but {} for the guest; set to the guest's",
                on_off(*device_bit),
                on_off(*guest)
            ),
        }
    }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}
