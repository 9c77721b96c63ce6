//! Why an offered BAR is not mapped: the answer a VMM logs and shows
//! (`why is BAR 2 of 0000:03:00.0 not reachable`).

use std::fmt;

use crate::importer::iommufd::IovaRange;
use crate::pci::PciAddress;
use crate::range::{ByteRange, human_size};
use crate::revoke::RevokeReason;

/// Why a BAR is not mapped at its guest-physical address. Each refusal
/// concerns that BAR alone: the others keep working.
///
/// ```
/// use dmabuf_p2p::vmm::Unreachable;
/// use dmabuf_p2p::IovaRange;
///
/// let why = Unreachable::OutsideIovaRanges {
///     gpa: 0x80_0000_0000,
///     size: 1 << 20,
///     usable: vec![IovaRange::new(0, 0xfedf_ffff), IovaRange::new(0xfef0_0000, (1 << 39) - 1)],
///     address_width: 39,
/// };
/// assert_eq!(
///     why.to_string(),
///     "GPA 0x8000000000..0x8000100000 (1 MiB) is outside the IOAS's usable IOVA ranges \
///      [0x0..=0xfedfffff, 0xfef00000..=0x7fffffffff] (IOMMU address width 39 bits)"
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unreachable {
    /// The VMM did not offer this BAR, or it cannot be offered: an I/O BAR,
    /// one smaller than a page, the upper half of a 64-bit BAR, one holding
    /// the MSI-X table, an absent one.
    NotOffered {
        /// Why.
        why: String,
    },
    /// It holds the device's MSI-X table or PBA (`table`, `pba`: byte
    /// ranges in this BAR, when there). Linux 7.2's VFIO exports any
    /// page-aligned range of a BAR, the table's pages included, so a peer
    /// could write the VMM's interrupt vectors: the map never maps those
    /// pages. It maps the pages around them (as QEMU and cloud-hypervisor
    /// mmap around the table), and gives this reason for the pages it
    /// leaves out ([`BarStatus::MappedAroundMsix`](super::BarStatus)), or
    /// for the whole BAR when nothing else is left.
    HoldsMsix {
        /// The MSI-X table's bytes in this BAR.
        table: Option<ByteRange>,
        /// The pending-bit array's bytes in this BAR.
        pba: Option<ByteRange>,
    },
    /// The guest has not placed it (address 0), or a reset cleared it.
    Unassigned,
    /// The guest is sizing it (all ones written).
    Probing,
    /// One half of its 64-bit address is written, the other not yet.
    HalfProgrammed,
    /// The guest has memory decode off (`PCI_COMMAND` bit 1).
    DecodeOff,
    /// The device is in D3 (the guest wrote `PMCSR`): VFIO revoked its BARs.
    PoweredDown,
    /// The GPA range is not inside one usable IOVA range of the IOAS
    /// (`IOMMU_IOAS_IOVA_RANGES`: the IOMMU's address width, reserved
    /// windows such as the MSI window).
    OutsideIovaRanges {
        /// The BAR's guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
        /// The IOAS's usable ranges.
        usable: Vec<IovaRange>,
        /// The address width they imply (bits).
        address_width: u32,
    },
    /// The GPA range overlaps a mapping the VMM declared (guest RAM).
    CollidesWithVmm {
        /// The BAR's guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
        /// The VMM's mapping.
        vmm: IovaRange,
        /// The VMM's name for it.
        label: String,
    },
    /// The GPA range overlaps another mapped BAR.
    OverlapsBar {
        /// The BAR's guest-physical address.
        gpa: u64,
        /// Its size.
        size: u64,
        /// The other BAR's device.
        other: PciAddress,
        /// The other BAR's index.
        other_bar: u32,
    },
    /// The device is gone or going (hot-unplug request, removal).
    DeviceGone(RevokeReason),
    /// The kernel revoked the BAR and it has not come back.
    Revoked(RevokeReason),
    /// The kernel refused to export or map it, for a reason not above.
    KernelRefused {
        /// The ioctl.
        op: &'static str,
        /// The kernel's errno.
        errno: i32,
        /// The library's error message.
        message: String,
    },
}

impl Unreachable {
    /// Whether a change elsewhere (another BAR moving away, the VMM
    /// forgetting a mapping, the usable ranges growing) may make the BAR
    /// reachable without the guest doing anything.
    pub(crate) fn waits_on_others(&self) -> bool {
        matches!(
            self,
            Self::OverlapsBar { .. }
                | Self::CollidesWithVmm { .. }
                | Self::OutsideIovaRanges { .. }
                | Self::KernelRefused { .. }
        )
    }
}

fn span(f: &mut fmt::Formatter<'_>, gpa: u64, size: u64) -> fmt::Result {
    let end = u128::from(gpa) + u128::from(size);
    write!(f, "GPA {gpa:#x}..{end:#x} ({})", human_size(size))
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotOffered { why } => write!(f, "not offered for P2P: {why}"),
            Self::HoldsMsix { table, pba } => {
                f.write_str("not offered for P2P: it holds the MSI-X")?;
                if let Some(t) = table {
                    write!(f, " table at {t}")?;
                }
                if let Some(p) = pba {
                    write!(
                        f,
                        "{} PBA at {p}",
                        if table.is_some() { " and" } else { "" }
                    )?;
                }
                f.write_str(" (VFIO would export those pages too: a peer could write the interrupt vectors)")
            }
            Self::Unassigned => f.write_str("the guest has not placed it (address 0)"),
            Self::Probing => f.write_str("the guest is sizing it (all ones written)"),
            Self::HalfProgrammed => {
                f.write_str("only one half of its 64-bit address is written so far")
            }
            Self::DecodeOff => f.write_str("the guest has memory decode off"),
            Self::PoweredDown => f.write_str("the guest put the device in D3"),
            Self::OutsideIovaRanges {
                gpa,
                size,
                usable,
                address_width,
            } => {
                span(f, *gpa, *size)?;
                let list: Vec<String> = usable.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    " is outside the IOAS's usable IOVA ranges [{}] (IOMMU address width {address_width} bits)",
                    list.join(", ")
                )
            }
            Self::CollidesWithVmm {
                gpa,
                size,
                vmm,
                label,
            } => {
                span(f, *gpa, *size)?;
                write!(f, " overlaps the VMM's mapping {label} at {vmm}")
            }
            Self::OverlapsBar {
                gpa,
                size,
                other,
                other_bar,
            } => {
                span(f, *gpa, *size)?;
                write!(f, " overlaps BAR {other_bar} of {other}")
            }
            Self::DeviceGone(reason) => write!(f, "the device is gone ({reason})"),
            Self::Revoked(reason) => write!(f, "revoked ({reason})"),
            Self::KernelRefused { message, .. } => write!(f, "the kernel refused: {message}"),
        }
    }
}

/// The IOMMU address width the usable ranges imply: bits needed for the
/// highest usable IOVA (64 if the ranges reach the top, 0 if there are none).
///
/// ```
/// use dmabuf_p2p::IovaRange;
/// use dmabuf_p2p::vmm::address_width;
/// assert_eq!(address_width(&[IovaRange::new(0, (1 << 39) - 1)]), 39);
/// assert_eq!(address_width(&[IovaRange::new(0, u64::MAX)]), 64);
/// ```
pub fn address_width(usable: &[IovaRange]) -> u32 {
    usable
        .iter()
        .map(|r| r.last)
        .max()
        .map_or(0, |top| 64 - top.leading_zeros())
}
