//! [`GuestBarMap`]: every offered BAR of every registered device, exported
//! and mapped in one IOAS at the guest-physical address the guest gave it.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use log::{debug, info, warn};

use super::bar_register::{BarAddress, BarRegister};
use super::config_space::{
    BAR0, COMMAND, COMMAND_MEMORY, DEVCTL_FLR, Layout, PM_STATE_D3HOT, PM_STATE_MASK, merge,
    overlaps,
};
use super::limits::{BarKey, Limits};
use super::status::{BarReport, BarStatus, ConfigWrite, DeviceId, Drift};
use super::unreachable::Unreachable;
use crate::error::{Error, Result};
use crate::exporter::bar::BarExport;
use crate::importer::iommufd::{Ioas, IoasMapping, IovaPlacement, IovaRange, MapPerms};
use crate::pci::{BAR_COUNT, PciAddress};
use crate::range::{ByteRange, human_size, page_size};
use crate::revoke::{BufferState, RevokeReason};
use crate::vfio::VfioPciDevice;

/// Which BARs a device offers for peer-to-peer DMA.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Offer {
    /// Every memory BAR of at least one page; one that holds the MSI-X
    /// table or PBA is offered around their pages (up to three parts, each
    /// its own export, mapped at its offset from the BAR's GPA), and not at
    /// all if nothing else is left.
    #[default]
    AllMappable,
    /// These BARs only (each must be mappable as above). Huge BARs a guest
    /// never uses for P2P need not cost an export (cloud-hypervisor #7991).
    Bars(Vec<u32>),
}

/// P2P between the assigned devices of one IOAS, as a VMM needs it: every
/// offered BAR of every registered device exported as a dma-buf and mapped
/// at the guest-physical address (GPA) the guest programmed, so that any
/// device attached to the IOAS reaches it at that address; and nothing else.
///
/// The VMM registers each assigned device ([`register`](Self::register),
/// adopted or opened) with the BARs it offers, and forwards its guest's
/// config-space writes ([`config_write`](Self::config_write)). What each
/// write does:
///
/// * **BAR registers are virtual**: recorded, never written to the device.
///   A sizing probe (all ones) never maps; a 64-bit BAR maps once both
///   halves hold the new address (or the guest writes `PCI_COMMAND`); a
///   move unmaps the old GPA and maps the new one; address 0 is unassigned
///   ([`BarRegister`]). While the guest's decode is off, writes are only
///   recorded.
/// * **`PCI_COMMAND` is written to the device.** Decode off: the kernel
///   revokes the BARs' dma-bufs; the map marks its areas dead and keeps them
///   (their GPAs stay reserved), no ioctl. Decode on: the physical bit is
///   set first, then each BAR is mapped where the guest now has it (the dead
///   area unmapped and mapped again at the same GPA, or moved, or mapped for
///   the first time): never `ENODEV` from ordering. A write that leaves the
///   guest's decode bit as it was costs no remap.
/// * **Function-level reset** (a write of Initiate FLR, or the VMM's own
///   reset told with [`note_reset`](Self::note_reset)): the device's areas
///   are unmapped; its BARs are unassigned and decode off, as the guest
///   finds them after a reset. **D3** (`PMCSR`): areas dead until D0.
/// * **Unplug** ([`note_unplug_request`](Self::note_unplug_request)) and
///   **removal** ([`remove`](Self::remove)): unmapped and exports closed.
/// * **VMM-side changes**: [`place_bar`](Self::place_bar) (a VMM that
///   places BARs itself, as cloud-hypervisor does),
///   [`note_command_change`](Self::note_command_change).
/// * **Limits are answers**: before a map, the GPA range is checked against
///   the IOAS's usable IOVA ranges (address width, reserved windows such as
///   the MSI window), the mappings the VMM declared
///   ([`declare_vmm_mapping`](Self::declare_vmm_mapping): guest RAM) and the
///   other BARs. A BAR that fails is not mapped and keeps a typed
///   [`Unreachable`] reason ([`bar_status`](Self::bar_status),
///   [`why_unreachable`](Self::why_unreachable)); the others are not
///   affected. A refusal that depends on others (an overlap, the VMM's
///   mapping, the ranges) is tried again when they change.
/// * **The kernel is checked**: a change of the device's revocation hub made
///   by other means is found at the next call and the areas mapped again;
///   [`sync_with_kernel`](Self::sync_with_kernel) also reads each device's
///   `PCI_COMMAND` and repairs a difference. A dead area is never reported
///   live.
///
/// Each BAR is known by (device, BAR index) from registration to removal:
/// it has at most one mapping and one export at any time, whatever the moves
/// and decode cycles. Every map, unmap, move, revocation, restore and
/// refusal is logged through the `log` facade (targets under
/// `dmabuf_p2p::vmm`), with device, BAR, GPA and reason.
///
/// Calls are serialised by one lock; they are meant for the VMM's
/// config-space trap path and its device management.
///
/// ```no_run
/// use dmabuf_p2p::vmm::{GuestBarMap, Offer};
/// use dmabuf_p2p::{Ioas, Iommufd, VfioPciDevice};
///
/// let iommufd = Iommufd::open()?;
/// let ioas = iommufd.alloc_ioas()?; // a VMM adopts its own: Ioas::adopt
/// let mut dev = VfioPciDevice::open("0000:02:00.0".parse()?)?;
/// dev.bind(&iommufd)?;
/// dev.attach(&ioas)?;
/// let map = GuestBarMap::new(&ioas)?;
/// map.declare_vmm_mapping(0, 1 << 30, "guest RAM")?;
/// let id = map.register(dev, Offer::AllMappable)?;
/// // The guest's writes, as the VMM traps them: BAR2 (64-bit) at 0x80_0000_0000.
/// map.config_write(id, 0x18, &0x0000_000cu32.to_le_bytes())?;
/// map.config_write(id, 0x1c, &0x80u32.to_le_bytes())?;
/// map.config_write(id, 0x04, &0x0006u16.to_le_bytes())?; // decode and bus master on
/// println!("{:?}", map.bar_status(id, 2)?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct GuestBarMap {
    ioas: Ioas,
    perms: MapPerms,
    state: Mutex<State>,
}

impl fmt::Debug for GuestBarMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestBarMap")
            .field("ioas", &self.ioas.id())
            .field("devices", &self.lock().slots.iter().flatten().count())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    /// Devices by slot; a slot's generation counts its occupants.
    slots: Vec<Option<Device>>,
    generations: Vec<u32>,
    limits: Limits,
}

/// A registered device.
struct Device {
    dev: Arc<VfioPciDevice>,
    address: PciAddress,
    generation: u32,
    /// The guest's `PCI_COMMAND`.
    command: u16,
    /// The guest put the device in D3.
    d3: bool,
    /// Unplug requested: every BAR unmapped for good.
    gone: Option<RevokeReason>,
    /// The hub's change number after this map's last transition.
    hub_seq: u64,
    layout: Layout,
    /// BARs offered (bit per BAR): the only ones ever mapped.
    offered: u8,
    /// BARs whose registers are half programmed (bit per BAR).
    half: u8,
    bars: [Slot; BAR_COUNT as usize],
}

/// The BAR indexes whose bits are set in `mask`, ascending (one step per
/// set bit: the trap path walks the one or two BARs concerned, not six).
#[inline]
fn bars_in(mask: u8) -> impl Iterator<Item = usize> {
    let mut left = mask & ((1 << BAR_COUNT) - 1);
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let i = left.trailing_zeros() as usize;
        left &= left - 1;
        Some(i)
    })
}

/// One BAR index of a device.
#[derive(Default)]
struct Slot {
    /// A memory BAR's registers; `None` for absent, I/O and upper halves.
    reg: Option<BarRegister>,
    /// Why it is not offered, if it is not.
    not_offered: Option<String>,
    /// It holds the MSI-X table or PBA: why the pages of those are never
    /// mapped (and why the BAR is not offered if nothing else is left).
    msix: Option<Unreachable>,
    /// The parts of the BAR peers may reach, each exported and mapped at
    /// its offset from the BAR's GPA: the whole BAR, or for one holding the
    /// MSI-X table or PBA the pages around them (up to three). They move,
    /// revoke and come back together.
    parts: Vec<Part>,
    /// The BAR's ranges between its parts (the MSI-X table's and PBA's
    /// pages): never mapped, still the BAR's for the other BARs' checks.
    holes: Vec<ByteRange>,
    /// Where the parts are mapped.
    placed: Option<Placed>,
    /// The last refusal, while no mapping stands.
    refused: Option<Unreachable>,
}

/// One part of an offered BAR.
struct Part {
    /// Bytes of the BAR.
    range: ByteRange,
    export: Option<BarExport>,
    /// The export's handle in the IOAS, built at its first map and kept:
    /// mapped while the BAR is placed (live or dead), unmapped otherwise
    /// and mapped again in place at the next GPA (a move, a restore). Holds
    /// the export's dma-buf: closed with it.
    area: Option<IoasMapping>,
}

impl Part {
    fn new(range: ByteRange) -> Self {
        Self {
            range,
            export: None,
            area: None,
        }
    }
}

/// The ranges of `[0, size)` between and around `parts` (ascending,
/// disjoint).
fn gaps(parts: &[ByteRange], size: u64) -> Vec<ByteRange> {
    let mut out = Vec::new();
    let mut from = 0;
    for p in parts {
        if p.offset > from {
            out.push(ByteRange::new(from, p.offset - from));
        }
        from = p.offset + p.length;
    }
    if from < size {
        out.push(ByteRange::new(from, size - from));
    }
    out
}

impl Slot {
    /// Closes the BAR's exports (the device is going): their handles in
    /// the IOAS hold the dma-bufs too.
    fn close_exports(&mut self) {
        for part in &mut self.parts {
            part.area = None;
            part.export = None;
        }
    }
}

/// Where a BAR's area is mapped in the IOAS (its handle is the slot's
/// `area`): small, so that a move touches no handle but to map it.
#[derive(Clone, Copy)]
struct Placed {
    gpa: u64,
    /// Why the kernel revoked it, if it did (the area is dead).
    dead: Option<RevokeReason>,
}

/// What reconciling a BAR needs to know of its device.
struct Ctx<'a> {
    dev: &'a VfioPciDevice,
    address: PciAddress,
    slot: u32,
    /// Why the BAR must not be mapped now, device-wide.
    blocked: Option<Blocked>,
}

/// A device-wide reason not to map, small and `Copy` (built on every trapped
/// write; the [`Unreachable`] is made only when asked).
#[derive(Clone, Copy)]
enum Blocked {
    Gone(RevokeReason),
    DecodeOff,
    PoweredDown,
}

impl From<Blocked> for Unreachable {
    fn from(b: Blocked) -> Self {
        match b {
            Blocked::Gone(r) => Self::DeviceGone(r),
            Blocked::DecodeOff => Self::DecodeOff,
            Blocked::PoweredDown => Self::PoweredDown,
        }
    }
}

/// The [`Ctx`] of device `$d` in slot `$slot`, borrowing only its fields
/// (so that its BARs can be borrowed mutably beside it).
macro_rules! ctx {
    ($d:expr, $slot:expr) => {
        ctx_of(&$d.dev, $d.address, $d.gone, $d.command, $d.d3, $slot)
    };
}

// After `ctx!`, which it uses.
mod reconcile;

#[inline]
fn ctx_of(
    dev: &VfioPciDevice,
    address: PciAddress,
    gone: Option<RevokeReason>,
    command: u16,
    d3: bool,
    slot: u32,
) -> Ctx<'_> {
    let blocked = if let Some(r) = gone {
        Some(Blocked::Gone(r))
    } else if command & COMMAND_MEMORY == 0 {
        Some(Blocked::DecodeOff)
    } else if d3 {
        Some(Blocked::PoweredDown)
    } else {
        None
    };
    Ctx {
        dev,
        address,
        slot,
        blocked,
    }
}

/// Sets a BAR's refusal, keeping count of those that wait on others.
#[inline]
fn set_refused(limits: &mut Limits, s: &mut Slot, why: Option<Unreachable>) {
    let was = s.refused.as_ref().is_some_and(Unreachable::waits_on_others);
    let is = why.as_ref().is_some_and(Unreachable::waits_on_others);
    limits.waiting = (limits.waiting + usize::from(is)).saturating_sub(usize::from(was));
    s.refused = why;
}

/// Locks, recovering from poisoning (a panicking logger).
#[inline]
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl GuestBarMap {
    /// A map for the devices of `ioas` (a VMM's IOAS, adopted with
    /// [`Ioas::adopt`]): asks its usable IOVA ranges once. BARs are mapped
    /// read-write.
    pub fn new(ioas: &Ioas) -> Result<Self> {
        let mut state = State::default();
        state.limits.set_usable(&ioas.iova_ranges()?);
        Ok(Self {
            ioas: ioas.clone(),
            perms: MapPerms::ReadWrite,
            state: Mutex::new(state),
        })
    }

    /// The IOAS.
    pub fn ioas(&self) -> &Ioas {
        &self.ioas
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Declares a mapping the VMM made in the IOAS itself (guest RAM at
    /// `[gpa, gpa + size)`, named `label` in messages): no BAR is mapped
    /// over it, and automatic placement in the IOAS avoids it
    /// ([`Ioas::declare_foreign_area`]). Empty or overflowing ranges are
    /// [`Error::InvalidRange`].
    pub fn declare_vmm_mapping(&self, gpa: u64, size: u64, label: &str) -> Result<()> {
        let last = size
            .checked_sub(1)
            .and_then(|s| gpa.checked_add(s))
            .ok_or_else(|| Error::InvalidRange {
                target: format!("VMM mapping {label} in IOAS {}", self.ioas.id()),
                range: ByteRange::new(gpa, size),
                problem: if size == 0 {
                    crate::error::RangeProblem::Empty
                } else {
                    crate::error::RangeProblem::Overflow
                },
            })?;
        self.lock()
            .limits
            .declare(IovaRange::new(gpa, last), label.to_owned());
        self.ioas.declare_foreign_area(gpa, size);
        debug!(
            "IOAS {}: the VMM maps {label} at GPA {gpa:#x}..={last:#x}",
            self.ioas.id()
        );
        Ok(())
    }

    /// Forgets the VMM mappings that start at `gpa` (the VMM unmapped
    /// them); BARs refused for colliding with them are tried again.
    pub fn forget_vmm_mapping(&self, gpa: u64, size: u64) {
        let mut st = self.lock();
        if st.limits.forget(gpa) {
            self.ioas.forget_foreign_area(gpa, size);
            self.retry_waiting(&mut st);
        }
    }

    /// Asks the IOAS's usable ranges again (a device was attached to or
    /// detached from it by other means); BARs refused for being outside
    /// them are tried again.
    pub fn refresh_limits(&self) -> Result<()> {
        let ranges = self.ioas.iova_ranges()?;
        let mut st = self.lock();
        st.limits.set_usable(&ranges);
        self.retry_waiting(&mut st);
        Ok(())
    }

    /// Registers a device (adopted or opened, bound to the IOAS's iommufd
    /// and usually attached to the IOAS) with the BARs it offers. Its
    /// guest view starts as after a reset: BARs unassigned, decode off;
    /// nothing is mapped until the guest (or the VMM,
    /// [`place_bar`](Self::place_bar)) places a BAR and turns decode on.
    /// Reads the BARs (VFIO region info, sysfs) and the first 256 bytes of
    /// config space once, and the IOAS's usable ranges again.
    ///
    /// Errors: [`Error::Device`] for a device registered already (by PCI
    /// address), or one not bound; [`Error::InvalidRegion`] for an offered
    /// BAR that cannot be offered (naming why).
    pub fn register(&self, dev: impl Into<Arc<VfioPciDevice>>, offer: Offer) -> Result<DeviceId> {
        let dev: Arc<VfioPciDevice> = dev.into();
        let address = dev.address();
        let mut config = [0u8; 256];
        dev.config_read(0, &mut config)?;
        let layout = Layout::of(&config);
        let mut bars: [Slot; BAR_COUNT as usize] = Default::default();
        let mut upper = false;
        for i in 0..BAR_COUNT {
            let slot = &mut bars[i as usize];
            if upper {
                upper = false;
                slot.not_offered = Some("the upper half of a 64-bit BAR".to_owned());
                continue;
            }
            let bar = dev.bar(i)?;
            let at = BAR0 as usize + 4 * i as usize;
            let flags =
                u32::from_le_bytes([config[at], config[at + 1], config[at + 2], config[at + 3]]);
            let why = if !bar.is_present() {
                Some("absent".to_owned())
            } else if flags & 1 != 0 || !bar.resource.is_mem() {
                Some("an I/O BAR".to_owned())
            } else {
                slot.reg = Some(BarRegister::new(bar.size(), flags & 0xf));
                upper = flags & 0x6 == 0x4;
                if bar.size() < page_size() || !bar.size().is_multiple_of(page_size()) {
                    Some(format!("smaller than a page ({})", human_size(bar.size())))
                } else if layout.msix_bars & (1 << i) != 0 {
                    let in_bar = |p: Option<(u8, ByteRange)>| {
                        p.filter(|(b, _)| u32::from(*b) == i).map(|(_, r)| r)
                    };
                    let why = Unreachable::HoldsMsix {
                        table: in_bar(layout.msix_table),
                        pba: in_bar(layout.msix_pba),
                    };
                    let text = why.to_string();
                    slot.msix = Some(why);
                    #[allow(clippy::cast_possible_truncation)]
                    let parts = layout.reachable_parts(i as u8, bar.size(), page_size());
                    if parts.is_empty() {
                        Some(text.trim_start_matches("not offered for P2P: ").to_owned())
                    } else {
                        slot.holes = gaps(&parts, bar.size());
                        slot.parts = parts.into_iter().map(Part::new).collect();
                        None
                    }
                } else {
                    slot.parts = vec![Part::new(ByteRange::new(0, bar.size()))];
                    None
                }
            };
            let wanted = match &offer {
                Offer::AllMappable => true,
                Offer::Bars(list) => list.contains(&i),
            };
            if let (Offer::Bars(_), true, Some(why)) = (&offer, wanted, &why) {
                return Err(Error::InvalidRegion {
                    device: address.to_string(),
                    index: i,
                    problem: format!("cannot be offered for P2P: {why}"),
                    source: None,
                });
            }
            slot.not_offered = match (wanted, why) {
                (_, Some(why)) => Some(why),
                (false, None) => Some("the VMM did not offer it".to_owned()),
                (true, None) => None,
            };
        }
        if let Offer::Bars(list) = &offer
            && let Some(&bad) = list
                .iter()
                .find(|&&b| b >= BAR_COUNT || bars[b as usize].reg.is_none())
        {
            let why = bars
                .get(bad as usize)
                .and_then(|s| s.not_offered.clone())
                .unwrap_or_else(|| "not a BAR (BARs are 0..=5)".to_owned());
            return Err(Error::InvalidRegion {
                device: address.to_string(),
                index: bad,
                problem: format!("cannot be offered for P2P: {why}"),
                source: None,
            });
        }
        let ranges = self.ioas.iova_ranges()?;
        let mut st = self.lock();
        if st.slots.iter().flatten().any(|d| d.address == address) {
            return Err(Error::Device {
                device: address.to_string(),
                problem: "is registered in this GuestBarMap already".to_owned(),
                source: None,
            });
        }
        st.limits.set_usable(&ranges);
        let slot = match st.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                st.slots.push(None);
                st.generations.push(0);
                st.slots.len() - 1
            }
        };
        st.generations[slot] += 1;
        let generation = st.generations[slot];
        let offered: Vec<u32> = (0..BAR_COUNT)
            .filter(|&i| bars[i as usize].not_offered.is_none())
            .collect();
        #[allow(clippy::cast_possible_truncation)]
        let offered_mask = offered.iter().fold(0u8, |m, &i| m | (1 << i) as u8);
        st.slots[slot] = Some(Device {
            hub_seq: dev.hub().change_count(),
            dev,
            address,
            generation,
            command: 0,
            d3: false,
            gone: None,
            layout,
            offered: offered_mask,
            half: 0,
            bars,
        });
        info!(
            "IOAS {}: registered {address}, offering BARs {offered:?} for P2P",
            self.ioas.id()
        );
        Ok(DeviceId {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            generation,
        })
    }

    /// The device registered at `address`, if any.
    pub fn find(&self, address: PciAddress) -> Option<DeviceId> {
        let st = self.lock();
        st.slots.iter().enumerate().find_map(|(i, d)| {
            let d = d.as_ref()?;
            (d.address == address).then_some(DeviceId {
                slot: u32::try_from(i).ok()?,
                generation: d.generation,
            })
        })
    }

    /// The registered device (shared with the map).
    pub fn vfio_device(&self, id: DeviceId) -> Result<Arc<VfioPciDevice>> {
        let mut st = self.lock();
        Ok(Arc::clone(&registered(&mut st.slots, id)?.dev))
    }

    /// Handles a guest's config-space write of `data` at `offset` that the
    /// VMM trapped, as the type documents: `PCI_COMMAND`, the power state
    /// and Initiate FLR are written to the device and followed; BAR writes
    /// are recorded; anything else is left to the VMM
    /// ([`ConfigWrite::NotMine`]). BARs that cannot be mapped are not an
    /// error: each keeps its reason ([`bar_status`](Self::bar_status)).
    /// Errors: an unknown id; the device's refusal of a write it performs
    /// (with the kernel's errno; the map follows what the device then has).
    pub fn config_write(&self, id: DeviceId, offset: u64, data: &[u8]) -> Result<ConfigWrite> {
        let mut st = self.lock();
        let State { slots, limits, .. } = &mut *st;
        let d = registered(slots, id)?;
        let waiting =
            d.dev.hub().change_count() != d.hub_seq && self.repair_drift(d, limits, id.slot);
        if d.gone.is_some() {
            return Ok(ConfigWrite::Ignored);
        }
        let len = data.len();
        let mut changed = waiting;
        // The trap path's most common write, apart: no result to carry
        // through the other branches.
        if overlaps(offset, len, COMMAND, 2) {
            let result = self.command(d, limits, id.slot, offset, data, true);
            changed |= matches!(result, Ok(true));
            d.hub_seq = d.dev.hub().change_count();
            if changed && limits.waiting > 0 {
                self.retry_waiting(&mut st);
            }
            return match result {
                Ok(_) => Ok(ConfigWrite::Command),
                Err(e) => Err(e),
            };
        }
        // The other common one (a BAR dword), apart too.
        if overlaps(offset, len, BAR0, 4 * u64::from(BAR_COUNT)) {
            changed |= self.bar_write(d, limits, id.slot, offset, data);
            d.hub_seq = d.dev.hub().change_count();
            if changed && limits.waiting > 0 {
                self.retry_waiting(&mut st);
            }
            return Ok(ConfigWrite::Bars);
        }
        let outcome = if let Some(reg) = d.layout.pcie_devctl
            && overlaps(offset, len, reg, 2)
            && merge(0, reg, 2, offset, data) & u32::from(DEVCTL_FLR) != 0
        {
            let r = d.dev.config_write(offset, data);
            // VFIO revoked, reset and restored; the guest's view is reset.
            let told = d.dev.note_reset();
            self.reset(d, limits, id.slot, "function-level reset (guest)");
            changed = true;
            r.and(told).map(|()| ConfigWrite::Reset)
        } else if let Some(reg) = d.layout.pm_control
            && overlaps(offset, len, reg, 2)
        {
            let r = d.dev.config_write(offset, data);
            let state = merge(0, reg, 2, offset, data) as u16 & PM_STATE_MASK;
            changed |= self.power(d, limits, id.slot, state == PM_STATE_D3HOT);
            r.map(|()| ConfigWrite::PowerState)
        } else {
            Ok(ConfigWrite::NotMine)
        };
        d.hub_seq = d.dev.hub().change_count();
        if changed && st.limits.waiting > 0 {
            self.retry_waiting(&mut st);
        }
        outcome
    }

    /// The VMM wrote `PCI_COMMAND` itself (from `old` to `new`, on its own
    /// fd): the device's hub is told
    /// ([`VfioPciDevice::note_command_change`]) and the map follows as for
    /// a guest write, without writing.
    pub fn note_command_change(&self, id: DeviceId, old: u16, new: u16) -> Result<()> {
        let mut st = self.lock();
        self.check_hub(&mut st, id)?;
        let State { slots, limits, .. } = &mut *st;
        let d = registered(slots, id)?;
        d.dev.note_command_change(old, new);
        if old & COMMAND_MEMORY == 0 && new & COMMAND_MEMORY != 0 {
            // Whatever the map knew, the kernel revoked at the off.
            self.mark_dead(d, RevokeReason::MemoryDecodeOff);
            d.command &= !COMMAND_MEMORY;
        }
        self.command(d, limits, id.slot, COMMAND, &new.to_le_bytes(), false)?;
        d.hub_seq = d.dev.hub().change_count();
        self.retry_waiting(&mut st);
        Ok(())
    }

    /// The VMM places (or with `None` unassigns) BAR `bar` itself, both
    /// halves at once: a VMM that allocates guest BAR addresses, as
    /// cloud-hypervisor does, and moves them when the guest reprograms.
    /// Mapped at once if the guest's decode is on.
    pub fn place_bar(&self, id: DeviceId, bar: u32, gpa: Option<u64>) -> Result<()> {
        let mut st = self.lock();
        self.check_hub(&mut st, id)?;
        let State { slots, limits, .. } = &mut *st;
        let d = registered(slots, id)?;
        let i = usize::try_from(bar).unwrap_or(usize::MAX);
        let Some(reg) = d.bars.get_mut(i).and_then(|s| s.reg.as_mut()) else {
            return Err(Error::InvalidRegion {
                device: d.address.to_string(),
                index: bar,
                problem: "not a memory BAR of the device".to_owned(),
                source: None,
            });
        };
        reg.set_address(gpa);
        d.half &= !(1 << i);
        if d.command & COMMAND_MEMORY != 0 && !d.d3 {
            let ctx = ctx!(d, id.slot);
            if self.reconcile(&ctx, limits, i, &mut d.bars[i]) {
                self.retry_waiting(&mut st);
            }
        }
        Ok(())
    }

    /// The VMM reset the device itself (`VFIO_DEVICE_RESET` on its own fd,
    /// for a guest's reset): the device's hub is told
    /// ([`VfioPciDevice::note_reset`]), its areas are unmapped, and its BARs
    /// are unassigned and decode off for the guest, as after any reset.
    pub fn note_reset(&self, id: DeviceId) -> Result<()> {
        let mut st = self.lock();
        self.check_hub(&mut st, id)?;
        let State { slots, limits, .. } = &mut *st;
        let d = registered(slots, id)?;
        let told = d.dev.note_reset();
        self.reset(d, limits, id.slot, "device reset (VMM)");
        d.hub_seq = d.dev.hub().change_count();
        self.retry_waiting(&mut st);
        told
    }

    /// The kernel asked for the device back (the VMM's device-request
    /// eventfd fired): its exports are revoked for good
    /// ([`VfioPciDevice::note_unplug_request`]), its areas unmapped and its
    /// exports closed; later writes are ignored. Then
    /// [`remove`](Self::remove) it and close the VMM's fd.
    pub fn note_unplug_request(&self, id: DeviceId) -> Result<()> {
        let mut st = self.lock();
        let State { slots, limits, .. } = &mut *st;
        let d = registered(slots, id)?;
        d.dev.note_unplug_request();
        d.gone = Some(RevokeReason::Unplug);
        self.unmap_all(d, limits, id.slot, "unplug requested");
        for s in &mut d.bars {
            s.close_exports();
        }
        d.hub_seq = d.dev.hub().change_count();
        self.retry_waiting(&mut st);
        Ok(())
    }

    /// Removes a device: its areas unmapped, its exports closed; returns it
    /// (the last `Arc` closes the library's fd of it). BARs refused for
    /// overlapping its BARs are tried again.
    pub fn remove(&self, id: DeviceId) -> Result<Arc<VfioPciDevice>> {
        let mut st = self.lock();
        let State { slots, limits, .. } = &mut *st;
        registered(slots, id)?;
        let mut d = slots
            .get_mut(id.slot as usize)
            .and_then(Option::take)
            .ok_or_else(|| not_registered(id))?;
        self.unmap_all(&mut d, limits, id.slot, "device removed");
        info!("IOAS {}: removed {}", self.ioas.id(), d.address);
        let dev = Arc::clone(&d.dev);
        drop(d);
        self.retry_waiting(&mut st);
        Ok(dev)
    }

    /// Reads each device's `PCI_COMMAND` and its hub, records every
    /// difference from what the map expected, and repairs it: a device
    /// whose decode is off while its guest has it on gets it back on, and
    /// the areas are mapped again (the kernel revoked them). Returns
    /// what was found (logged too). An off-and-on cycle made on the VMM's
    /// own fd without telling leaves no trace in the register; tell it with
    /// [`note_command_change`](Self::note_command_change).
    pub fn sync_with_kernel(&self) -> Result<Vec<Drift>> {
        let mut st = self.lock();
        let mut found = Vec::new();
        let ids: Vec<DeviceId> = st
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                Some(DeviceId {
                    slot: u32::try_from(i).ok()?,
                    generation: d.as_ref()?.generation,
                })
            })
            .collect();
        for id in ids {
            let before = {
                let d = registered(&mut st.slots, id)?;
                (d.dev.hub().last_change(), d.hub_seq, d.address)
            };
            if self.check_hub(&mut st, id)? {
                found.push(Drift::HubChanged {
                    device: before.2,
                    state: before.0.state,
                });
            }
            let State { slots, limits, .. } = &mut *st;
            let Some(d) = slots.get_mut(id.slot as usize).and_then(Option::as_mut) else {
                continue;
            };
            if d.gone.is_some() {
                continue;
            }
            let device_bit = d.dev.memory_decode()?;
            let guest = d.command & COMMAND_MEMORY != 0;
            // Decode on at the device while the guest has it off costs P2P
            // nothing (no area is mapped for it); the other way round the
            // kernel has revoked the guest's BARs.
            if guest && !device_bit {
                let drift = Drift::DecodeDiffers {
                    device: d.address,
                    guest,
                    device_bit,
                };
                warn!("{drift}");
                found.push(drift);
                d.dev.set_memory_decode(true)?;
                self.mark_dead(d, RevokeReason::External);
                if !d.d3 {
                    self.reconcile_all(d, limits, id.slot);
                }
                d.hub_seq = d.dev.hub().change_count();
            }
        }
        self.retry_waiting(&mut st);
        Ok(found)
    }

    /// Where BAR `bar` of `id` stands.
    pub fn bar_status(&self, id: DeviceId, bar: u32) -> Result<BarStatus> {
        let mut st = self.lock();
        let d = registered(&mut st.slots, id)?;
        let i = usize::try_from(bar).unwrap_or(usize::MAX);
        let Some(s) = d.bars.get(i) else {
            return Err(Error::InvalidRegion {
                device: d.address.to_string(),
                index: bar,
                problem: "not a BAR (BARs are 0..=5)".to_owned(),
                source: None,
            });
        };
        Ok(Self::status_of(&ctx!(d, id.slot), s))
    }

    fn status_of(ctx: &Ctx<'_>, s: &Slot) -> BarStatus {
        let size = s.reg.map_or(0, |r| r.size());
        match Self::want(ctx, s) {
            Err(why) => BarStatus::Unreachable(why),
            Ok(gpa) => match &s.placed {
                Some(p) if p.gpa == gpa && p.dead.is_none() && s.holes.is_empty() => {
                    BarStatus::Mapped { gpa, size }
                }
                Some(p) if p.gpa == gpa && p.dead.is_none() => BarStatus::MappedAroundMsix {
                    gpa,
                    size,
                    not_mapped: s.holes.clone(),
                    why: s.msix.clone().unwrap_or(Unreachable::HoldsMsix {
                        table: None,
                        pba: None,
                    }),
                },
                Some(p) if p.gpa == gpa => BarStatus::Unreachable(Unreachable::Revoked(
                    p.dead.unwrap_or(RevokeReason::External),
                )),
                _ => BarStatus::Unreachable(
                    s.refused
                        .clone()
                        .unwrap_or(Unreachable::Revoked(RevokeReason::External)),
                ),
            },
        }
    }

    /// Why BAR `bar` of the device at `address` is not reachable (for a BAR
    /// mapped around its MSI-X table and PBA, why those pages are not);
    /// `None` if it is mapped whole, or no such device is registered.
    pub fn why_unreachable(&self, address: PciAddress, bar: u32) -> Option<Unreachable> {
        let id = self.find(address)?;
        match self.bar_status(id, bar).ok()? {
            BarStatus::Mapped { .. } => None,
            BarStatus::MappedAroundMsix { why, .. } | BarStatus::Unreachable(why) => Some(why),
        }
    }

    /// What a guest reads from the BAR dword at config offset `offset`
    /// (0x10..=0x24) of `id`: the address it programmed (or the size mask
    /// while it sizes) and the flags. `None` for an offset that is no
    /// memory BAR dword (absent and I/O BARs are the VMM's).
    pub fn bar_register_read(&self, id: DeviceId, offset: u64) -> Result<Option<u32>> {
        let mut st = self.lock();
        let d = registered(&mut st.slots, id)?;
        if !(BAR0..BAR0 + 4 * u64::from(BAR_COUNT)).contains(&offset) || !offset.is_multiple_of(4) {
            return Ok(None);
        }
        let i = usize::try_from((offset - BAR0) / 4).unwrap_or(0);
        if let Some(reg) = &d.bars[i].reg {
            return Ok(Some(reg.read_low()));
        }
        Ok((i > 0)
            .then(|| d.bars[i - 1].reg)
            .flatten()
            .filter(BarRegister::is_64bit)
            .map(|r| r.read_high()))
    }

    /// Every BAR of every registered device and where it stands.
    pub fn report(&self) -> Vec<BarReport> {
        let st = self.lock();
        let mut out = Vec::new();
        for (slot, d) in st.slots.iter().enumerate() {
            let Some(d) = d else { continue };
            let slot = u32::try_from(slot).unwrap_or(u32::MAX);
            for (i, s) in d.bars.iter().enumerate() {
                let Some(reg) = s.reg else { continue };
                out.push(BarReport {
                    id: DeviceId {
                        slot,
                        generation: d.generation,
                    },
                    device: d.address,
                    bar: u32::try_from(i).unwrap_or(0),
                    size: reg.size(),
                    status: Self::status_of(&ctx!(d, slot), s),
                });
            }
        }
        out
    }
}

/// The registered device with this id, or [`Error::Device`].
fn registered(slots: &mut [Option<Device>], id: DeviceId) -> Result<&mut Device> {
    slots
        .get_mut(id.slot as usize)
        .and_then(Option::as_mut)
        .filter(|d| d.generation == id.generation)
        .ok_or_else(|| not_registered(id))
}

fn not_registered(id: DeviceId) -> Error {
    Error::Device {
        device: id.to_string(),
        problem: "is not registered (removed, or never was)".to_owned(),
        source: None,
    }
}
