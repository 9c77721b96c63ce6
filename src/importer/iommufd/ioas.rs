//! The IO address space itself ([`Ioas`]): allocated or adopted, its usable
//! and allowed IOVAs, its options, and the IOMMU page sizes automatic
//! placement aligns for. Destroyed with its last handle when this crate
//! allocated it. Mapping into it is [`super::ioas_mapping`]'s job.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::context::{Iommufd, IommufdOption, OptionId};
use super::iova::{IovaRange, IovaRanges};
use crate::error::{AllowedIovaProblem, Error, Result};
use crate::importer::placement::{IommuPageSizes, PlacementState};
use crate::ioctl;
use crate::sys;

/// An IO address space of an [`Iommufd`] (`IOMMU_IOAS_ALLOC`).
///
/// A shared handle: clones name the same IOAS, and it is destroyed
/// (`IOMMU_DESTROY`) when the last clone is dropped. Mappings and attached
/// devices hold a clone, so it is never destroyed under them. (If a device
/// was attached to it by raw ID and is still attached, the kernel refuses the
/// destroy with `EBUSY`; the IOAS then lives until the iommufd is closed.)
///
/// ```no_run
/// use dmabuf_p2p::importer::iommufd::Iommufd;
///
/// let ioas = Iommufd::open()?.alloc_ioas()?; // the IOAS keeps the iommufd open
/// let ranges = ioas.iova_ranges()?;
/// println!("IOAS {}: {:?}, alignment {:#x}", ioas.id(), ranges.ranges, ranges.alignment);
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Ioas {
    inner: Arc<IoasInner>,
}

#[derive(Debug)]
struct IoasInner {
    iommufd: Iommufd,
    id: u32,
    /// Whether this crate allocated the IOAS and destroys it with the last
    /// handle; `false` for one adopted from its owner ([`Ioas::adopt`]).
    owned: bool,
    /// What automatic placement knows of the IOAS, and its lock (held
    /// across the unmap and map of a remap too).
    placement: PlacementState,
}

impl Drop for IoasInner {
    fn drop(&mut self) {
        // An adopted IOAS is its owner's to destroy.
        if !self.owned {
            return;
        }
        // Nothing can be done about a failure here (EBUSY: a device attached
        // by raw ID); the kernel frees the IOAS when the iommufd is closed.
        let _ = ioctl::iommu_destroy(self.iommufd.as_fd(), self.id);
    }
}

impl Iommufd {
    /// Allocates a new, empty IO address space (`IOMMU_IOAS_ALLOC`).
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// println!("IOAS {}", ioas.id());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn alloc_ioas(&self) -> Result<Ioas> {
        let id = ioctl::iommu_ioas_alloc(self.as_fd())
            .map_err(|e| Error::sys("IOMMU_IOAS_ALLOC", self.name(), e))?;
        Ok(Ioas {
            inner: Arc::new(IoasInner {
                iommufd: self.clone(),
                id,
                owned: true,
                placement: PlacementState::default(),
            }),
        })
    }
}

impl Ioas {
    /// A handle of the existing IOAS `id` of `iommufd`, one that someone
    /// else (a VMM) allocated and destroys: dropping the last handle does
    /// **not** destroy it. Mappings made through it go into that IOAS (at
    /// guest-physical IOVAs, with [`IovaPlacement::Fixed`](crate::IovaPlacement::Fixed)) and are unmapped
    /// when dropped; the owner must keep the IOAS until they are gone.
    /// Checked with `IOMMU_IOAS_IOVA_RANGES`: an `id` that is not an IOAS
    /// of `iommufd` is [`Error::UnknownObject`]. Adopt an IOAS once and clone
    /// that handle: clones share the lock that keeps a remap's IOVA from
    /// being taken by an automatic placement meanwhile.
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::iommufd::{Ioas, Iommufd};
    ///
    /// let iommufd = Iommufd::open()?;
    /// let owned = iommufd.alloc_ioas()?; // stands in for the VMM's IOAS
    /// let adopted = Ioas::adopt(&iommufd, owned.id())?;
    /// assert!(!adopted.is_owned() && owned.is_owned());
    /// drop(adopted); // the IOAS is still there
    /// assert!(iommufd.iova_ranges(owned.id()).is_ok());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn adopt(iommufd: &Iommufd, id: u32) -> Result<Self> {
        iommufd.iova_ranges(id)?;
        Ok(Self {
            inner: Arc::new(IoasInner {
                iommufd: iommufd.clone(),
                id,
                owned: false,
                placement: PlacementState::default(),
            }),
        })
    }

    /// Whether the last handle destroys the IOAS (`false` for one made by
    /// [`Ioas::adopt`]).
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// assert!(ioas.is_owned());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn is_owned(&self) -> bool {
        self.inner.owned
    }

    /// The IOAS ID (what `VFIO_DEVICE_ATTACH_IOMMUFD_PT` takes).
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// println!("IOAS {}", ioas.id());
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    #[inline]
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// The iommufd the IOAS belongs to.
    ///
    /// ```no_run
    /// let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// let ioas = iommufd.alloc_ioas()?;
    /// assert!(ioas.iommufd().same_context(&iommufd));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    #[inline]
    pub fn iommufd(&self) -> &Iommufd {
        &self.inner.iommufd
    }

    /// Whether `self` and `other` are handles of the same IOAS.
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// assert!(ioas.clone().same_ioas(&ioas));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn same_ioas(&self, other: &Ioas) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// What automatic placement knows of this IOAS (shared by its handles).
    #[inline]
    pub(super) fn placement(&self) -> &PlacementState {
        &self.inner.placement
    }

    /// Whether any of `[iova, iova + length)` is mapped through a handle of
    /// this IOAS (its set of mapped areas, one search).
    #[inline]
    pub(crate) fn has_mapped_area_in(&self, iova: u64, length: u64) -> bool {
        self.inner.placement.overlaps_mapped(iova, length)
    }

    /// The usable IOVA ranges and the required alignment
    /// (`IOMMU_IOAS_IOVA_RANGES`; an array too small for the answer,
    /// `EMSGSIZE`, is grown and the question asked again).
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// for r in ioas.iova_ranges()?.ranges {
    ///     println!("{r}");
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn iova_ranges(&self) -> Result<IovaRanges> {
        self.iommufd().iova_ranges(self.id())
    }

    /// Sets the IOAS's allowed IOVA list (`IOMMU_IOAS_ALLOW_IOVAS`),
    /// replacing the previous one; an empty slice removes it.
    ///
    /// What the kernel does with the list (Linux 7.2):
    /// * automatic placement ([`IovaPlacement::Auto`](crate::IovaPlacement::Auto)) picks IOVAs inside
    ///   the allowed ranges only; when they are full it is
    ///   [`Error::InvalidIova`] (`ENOSPC`);
    /// * the ranges are guaranteed to stay usable: attaching a device whose
    ///   reserved regions (MSI window, aperture) intersect them is refused;
    /// * fixed IOVAs ([`IovaPlacement::Fixed`](crate::IovaPlacement::Fixed)) are **not** restricted to the
    ///   list: only reserved regions and existing areas stop them.
    ///
    /// Ranges are inclusive (`start..=last`). Checked before the ioctl, each
    /// an [`Error::InvalidAllowedIova`] naming the range and its position:
    /// `start` not below `last` ([`AllowedIovaProblem::Empty`], the kernel
    /// refuses one-byte ranges too) and ranges that overlap
    /// ([`AllowedIovaProblem::Overlaps`]). A range that covers IOVAs already
    /// reserved in the IOAS (an attached device's MSI window, say) is refused
    /// by the kernel with `EADDRINUSE`, reported as
    /// [`AllowedIovaProblem::Reserved`] for the first such range, with the
    /// usable ranges. After any error the previous list stays in force.
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::iommufd::{Iommufd, IovaPlacement, IovaRange, MapPerms};
    /// use dmabuf_p2p::ByteRange;
    ///
    /// let ioas = Iommufd::open()?.alloc_ioas()?;
    /// let window = IovaRange::new(0x1_0000_0000, 0x1_3fff_ffff);
    /// ioas.allow_iovas(&[window])?;
    /// let memfd = dmabuf_p2p::memfd::Memfd::new("buf", 0x10000)?;
    /// let map = ioas.map_file(&memfd, ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::ReadWrite)?;
    /// assert!(window.contains(map.iova(), map.length()));
    /// ioas.allow_iovas(&[])?; // no restriction any more
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// [`AllowedIovaProblem::Empty`]: crate::error::AllowedIovaProblem::Empty
    /// [`AllowedIovaProblem::Overlaps`]: crate::error::AllowedIovaProblem::Overlaps
    /// [`AllowedIovaProblem::Reserved`]: crate::error::AllowedIovaProblem::Reserved
    pub fn allow_iovas(&self, ranges: &[IovaRange]) -> Result<()> {
        check_allowed_iovas(self.id(), ranges)?;
        let raw: Vec<sys::iommu_iova_range> = ranges
            .iter()
            .map(|r| sys::iommu_iova_range {
                start: r.start,
                last: r.last,
            })
            .collect();
        let result = ioctl::iommu_ioas_allow_iovas(self.iommufd().as_fd(), self.id(), &raw);
        if result.is_ok() {
            self.inner.placement.set_allowed(ranges);
        }
        result.map_err(|e| {
            if e.raw_os_error() == Some(libc::EADDRINUSE) {
                // IOVA_RANGES reports exactly what is not reserved, whatever
                // the allowed list: the first range not inside one of those
                // is (one of) the culprit(s).
                if let Ok(usable) = self.iova_ranges() {
                    let inside = |r: &IovaRange| {
                        usable
                            .ranges
                            .iter()
                            .any(|u| u.start <= r.start && r.last <= u.last)
                    };
                    if let Some((index, range)) =
                        ranges.iter().enumerate().find(|(_, r)| !inside(r))
                    {
                        return Error::InvalidAllowedIova {
                            ioas: self.id(),
                            index,
                            range: *range,
                            problem: AllowedIovaProblem::Reserved {
                                usable: usable.ranges,
                            },
                        };
                    }
                }
            }
            let list: Vec<String> = ranges.iter().map(ToString::to_string).collect();
            Error::sys(
                "IOMMU_IOAS_ALLOW_IOVAS",
                format!("IOAS {} ranges [{}]", self.id(), list.join(", ")),
                e,
            )
        })
    }

    /// Tells automatic placement of an area mapped in this IOAS by someone
    /// else (a VMM's guest RAM, mapped with its own ioctls): an
    /// [`IovaPlacement::Auto`](crate::IovaPlacement::Auto) mapping through
    /// any handle of the IOAS avoids `[iova, iova + length)`. Without it, the
    /// first automatic placement that lands on such an area is refused by
    /// the kernel (`EEXIST`), learns the refused range and lets the kernel
    /// place that one mapping (aligned only as the kernel aligns). Nothing is
    /// asked of the kernel here.
    ///
    /// ```no_run
    /// use dmabuf_p2p::{ByteRange, Ioas, Iommufd, IovaPlacement, MapPerms};
    ///
    /// let iommufd = Iommufd::open()?;
    /// let vmm_ioas = iommufd.alloc_ioas()?; // stands in for the VMM's
    /// let ioas = Ioas::adopt(&iommufd, vmm_ioas.id())?;
    /// ioas.declare_foreign_area(0, 4 << 30); // the VMM's guest RAM, at GPA 0
    /// let memfd = dmabuf_p2p::memfd::Memfd::new("buf", 0x10000)?;
    /// let map = ioas.map_file(&memfd, ByteRange::new(0, 0x10000), IovaPlacement::Auto, MapPerms::ReadWrite)?;
    /// assert!(map.iova() >= 4 << 30);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn declare_foreign_area(&self, iova: u64, length: u64) {
        self.inner.placement.declare_foreign(iova, length);
    }

    /// Forgets (part of) an area declared with
    /// [`declare_foreign_area`](Self::declare_foreign_area) (or learned from
    /// a refusal): its owner unmapped it.
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::Iommufd::open()?.alloc_ioas()?;
    /// ioas.declare_foreign_area(0, 1 << 30);
    /// ioas.forget_foreign_area(0, 1 << 30);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn forget_foreign_area(&self, iova: u64, length: u64) {
        self.inner.placement.forget_foreign(iova, length);
    }

    /// Whether this IOAS may use huge IOMMU pages
    /// (`IOMMU_OPTION_HUGE_PAGES`, on by default). See [`Iommufd::option`].
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// assert!(ioas.huge_pages()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn huge_pages(&self) -> Result<bool> {
        match self
            .iommufd()
            .option(OptionId::HugePages { ioas: self.id() })?
        {
            IommufdOption::HugePages { enabled, .. } => Ok(enabled),
            other => Err(Error::sys(
                "IOMMU_OPTION",
                format!("{} IOAS {}", self.iommufd().name(), self.id()),
                io::Error::other(format!("asked for HUGE_PAGES, got {other}")),
            )),
        }
    }

    /// Allows or forbids huge IOMMU pages in this IOAS
    /// (`IOMMU_OPTION_HUGE_PAGES`). Turning them off is refused once a
    /// device is attached and areas are mapped ([`Error::OptionRefused`]);
    /// see [`Iommufd::set_option`].
    ///
    /// ```no_run
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// ioas.set_huge_pages(false)?; // before anything is mapped
    /// assert!(!ioas.huge_pages()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn set_huge_pages(&self, enabled: bool) -> Result<()> {
        self.iommufd().set_option(IommufdOption::HugePages {
            ioas: self.id(),
            enabled,
        })
    }

    /// The IOMMU page sizes automatic placement aligns for
    /// ([`IovaPlacement::Auto`](crate::IovaPlacement::Auto)). iommufd does not report the page sizes of
    /// an IOAS's domains, so this is an assumption: 4 KiB, 2 MiB and 1 GiB
    /// ([`IommuPageSizes::X86`]: x86 IOMMUs, the emulated VT-d, SMMUs with a
    /// 4 KiB granule) unless set with [`Ioas::set_iommu_page_sizes`]. Too
    /// large a guess costs nothing but IOVA space; it never breaks a map.
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::placement::IommuPageSizes;
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// assert_eq!(ioas.iommu_page_sizes(), IommuPageSizes::X86);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn iommu_page_sizes(&self) -> IommuPageSizes {
        self.inner.placement.page_sizes()
    }

    /// Sets the IOMMU page sizes automatic placement aligns for (for
    /// example from type1's `iova_pgsizes` or the IOMMU's capability
    /// registers). Applies to every handle of this IOAS.
    ///
    /// ```no_run
    /// use dmabuf_p2p::importer::placement::IommuPageSizes;
    /// let ioas = dmabuf_p2p::importer::iommufd::Iommufd::open()?.alloc_ioas()?;
    /// ioas.set_iommu_page_sizes(IommuPageSizes::from_bits(0x20_1000)); // 4 KiB and 2 MiB
    /// assert_eq!(ioas.iommu_page_sizes().largest(), 2 << 20);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn set_iommu_page_sizes(&self, sizes: IommuPageSizes) {
        self.inner.placement.set_page_sizes(sizes);
    }
}

/// The checks of [`Ioas::allow_iovas`] that need no kernel: every range has
/// `start < last`, and no two overlap.
fn check_allowed_iovas(ioas: u32, ranges: &[IovaRange]) -> Result<()> {
    let invalid = |index: usize, problem| Error::InvalidAllowedIova {
        ioas,
        index,
        range: ranges[index],
        problem,
    };
    if let Some(index) = ranges.iter().position(|r| r.start >= r.last) {
        return Err(invalid(index, AllowedIovaProblem::Empty));
    }
    // Sorted by start, a list with an overlap has one between neighbours.
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| (ranges[i].start, i));
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if ranges[b].start <= ranges[a].last {
            // Name the later one in the caller's list, against the earlier.
            let (index, other) = if a < b { (b, a) } else { (a, b) };
            return Err(invalid(
                index,
                AllowedIovaProblem::Overlaps {
                    other,
                    with: ranges[other],
                },
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_iova_lists_are_checked() {
        let r = |start, last| IovaRange::new(start, last);
        assert!(check_allowed_iovas(1, &[]).is_ok());
        assert!(check_allowed_iovas(1, &[r(0, u64::MAX)]).is_ok());
        // Adjacent is fine, touching is not.
        assert!(check_allowed_iovas(1, &[r(0x2000, 0x2fff), r(0x1000, 0x1fff)]).is_ok());
        match check_allowed_iovas(7, &[r(0x1000, 0x1fff), r(0x5000, 0x5000)]) {
            Err(Error::InvalidAllowedIova {
                ioas: 7,
                index: 1,
                range,
                problem: AllowedIovaProblem::Empty,
            }) => {
                assert_eq!(range, r(0x5000, 0x5000));
            }
            other => panic!("one-byte range: {other:?}"),
        }
        assert!(matches!(
            check_allowed_iovas(7, &[r(0x9000, 0x1000)]),
            Err(Error::InvalidAllowedIova {
                index: 0,
                problem: AllowedIovaProblem::Empty,
                ..
            })
        ));
        // [0] covers [2]; [1] is apart. The later of the pair is named.
        let list = [r(0x1000, 0x8fff), r(0x10000, 0x1ffff), r(0x8000, 0x8fff)];
        match check_allowed_iovas(7, &list) {
            Err(
                e @ Error::InvalidAllowedIova {
                    index: 2,
                    problem: AllowedIovaProblem::Overlaps { other: 0, .. },
                    ..
                },
            ) => {
                assert_eq!(
                    e.to_string(),
                    "allowed IOVA range #2 0x8000..=0x8fff for IOAS 7: overlaps range #0 0x1000..=0x8fff"
                );
            }
            other => panic!("overlap: {other:?}"),
        }
        let touching = [r(0x2000, 0x3000), r(0x1000, 0x2000)];
        assert!(matches!(
            check_allowed_iovas(7, &touching),
            Err(Error::InvalidAllowedIova {
                index: 1,
                problem: AllowedIovaProblem::Overlaps { other: 0, .. },
                ..
            })
        ));
    }
}
