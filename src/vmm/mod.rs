//! Peer-to-peer DMA between the assigned devices of a VMM: [`GuestBarMap`]
//! keeps every offered BAR of every registered device mapped in the VMM's
//! IOAS at the guest-physical address the guest programmed, through BAR
//! moves, decode toggles, resets and unplug, and answers why a BAR is not
//! reachable when it is not ([`Unreachable`]).
//!
//! One file per job: `bar_register` (the guest's virtual BAR registers:
//! probes, halves, addresses), `config_space` (where the registers it
//! follows are), `limits` (usable IOVA ranges, the VMM's mappings, the
//! BARs' claims), `unreachable` (the typed reasons), `guest_bar_map` (the
//! object, and every kernel call it makes).
//!
//! `docs/GUIDE.md` ("P2P between assigned devices in your VMM") walks
//! through it and maps cloud-hypervisor's and openvmm's patterns to it.

mod bar_register;
mod config_space;
mod guest_bar_map;
mod limits;
mod status;
mod unreachable;

pub use bar_register::{BarAddress, BarRegister};
pub use guest_bar_map::{GuestBarMap, Offer};
pub use status::{BarReport, BarStatus, ConfigWrite, DeviceId, Drift};
pub use unreachable::{Unreachable, address_width};
