//! The range arithmetic and validation: `ByteRange::check_in`,
//! `range::validate_export_ranges`, `range::map_to_phys`, the export plan of a
//! VFIO BAR (`exporter::bar::plan_export`) and the range predicates, on any
//! numbers. No panic, and every answer agrees with a model computed in 128-bit
//! arithmetic: an accepted range is non-empty, aligned, inside the object and
//! does not overflow; an accepted export's total is the sum of its lengths and
//! below 2^63; physical ranges are the BAR start plus the offsets, exactly.

#![no_main]

use dmabuf_p2p::exporter::bar::plan_export;
use dmabuf_p2p::vfio::{Bar, RegionInfo};
use dmabuf_p2p::importer::iommufd::IovaRange;
use dmabuf_p2p::pci::{IORESOURCE_MEM, PciAddress, Resource};
use dmabuf_p2p::range::{PhysRange, map_to_phys, validate_export_ranges};
use dmabuf_p2p::{ByteRange, Error, RangeProblem};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    ranges: Vec<(u64, u64)>,
    size: u64,
    /// The alignment: a power of two picked by `align_log2 % 64`, or this
    /// arbitrary value when `odd_align` is set.
    align_log2: u8,
    odd_align: Option<u64>,
    bar_start: u64,
    /// A position and a second range for the predicates.
    pos: u64,
    other: (u64, u64),
}

/// What `check_in` must answer, computed without any u64 sum.
fn model_check(r: ByteRange, size: u64, align: u64) -> Result<(), RangeProblem> {
    if r.length == 0 {
        return Err(RangeProblem::Empty);
    }
    if align > 1 && (r.offset % align != 0 || r.length % align != 0) {
        return Err(RangeProblem::Unaligned { align });
    }
    let end = u128::from(r.offset) + u128::from(r.length);
    let Ok(end) = u64::try_from(end) else {
        return Err(RangeProblem::Overflow);
    };
    if end > size {
        return Err(RangeProblem::OutOfBounds { end, size });
    }
    Ok(())
}

fuzz_target!(|input: Input| {
    let ranges: Vec<ByteRange> = input
        .ranges
        .iter()
        .map(|&(o, l)| ByteRange::new(o, l))
        .collect();
    let align = input.odd_align.unwrap_or(1u64 << (input.align_log2 % 64));
    let size = input.size;

    // check_in: exactly the model, and an accepted range really is usable.
    for &r in &ranges {
        let got = r.check_in(size, align);
        assert_eq!(
            got,
            model_check(r, size, align),
            "{r} in {size:#x} aligned {align:#x}"
        );
        if got.is_ok() {
            let end = r.end().expect("an accepted range does not overflow");
            assert!(r.length > 0 && end <= size && r.is_aligned(align));
            assert!(ByteRange::new(0, size).contains_range(&r));
        }
    }

    // validate_export_ranges: accepted exactly when the list is non-empty,
    // each range passes check_in and the total stays below 2^63; the error
    // names the first offending range.
    let got = validate_export_ranges("fuzz", &ranges, size, align);
    let mut model: Result<u64, (ByteRange, RangeProblem)> = Ok(0);
    if ranges.is_empty() {
        model = Err((ByteRange::new(0, 0), RangeProblem::Count(String::new())));
    }
    let mut total: u128 = 0;
    for &r in &ranges {
        if model.is_err() {
            break;
        }
        if let Err(p) = model_check(r, size, align) {
            model = Err((r, p));
            break;
        }
        total += u128::from(r.length);
        if total > u128::from(u64::MAX) {
            model = Err((r, RangeProblem::TotalOverflow));
        } else if total >= 1 << 63 {
            model = Err((
                r,
                RangeProblem::TotalTooLarge {
                    total: total as u64,
                },
            ));
        } else {
            model = Ok(total as u64);
        }
    }
    match (&got, &model) {
        (Ok(t), Ok(m)) => assert_eq!(t, m),
        (
            Err(Error::InvalidRange {
                range,
                problem,
                target,
            }),
            Err((mr, mp)),
        ) => {
            assert_eq!(target, "fuzz");
            assert_eq!(range, mr);
            match (problem, mp) {
                (RangeProblem::Count(_), RangeProblem::Count(_)) => {}
                (p, q) => assert_eq!(p, q),
            }
        }
        _ => panic!("validate_export_ranges gave {got:?}, the model {model:?}"),
    }

    // map_to_phys: exact physical ranges, or an overflow error naming the
    // first range whose physical end passes 2^64.
    let phys = map_to_phys("fuzz", input.bar_start, &ranges);
    let first_bad = ranges.iter().find(|r| {
        u128::from(input.bar_start) + u128::from(r.offset) + u128::from(r.length)
            > u128::from(u64::MAX)
    });
    match (&phys, first_bad) {
        (Ok(p), None) => {
            assert_eq!(p.len(), ranges.len());
            for (pr, r) in p.iter().zip(&ranges) {
                assert_eq!(
                    u128::from(pr.start),
                    u128::from(input.bar_start) + u128::from(r.offset)
                );
                assert_eq!(pr.length, r.length);
                assert!(pr.end().is_some());
            }
        }
        (
            Err(Error::InvalidRange {
                range,
                problem: RangeProblem::Overflow,
                ..
            }),
            Some(r),
        ) => assert_eq!(range, r),
        _ => panic!("map_to_phys gave {phys:?}, expected an overflow at {first_bad:?}"),
    }

    // The export plan of a memory BAR: both checks at once, with the page as
    // the alignment.
    let dev = PciAddress::new(0, 0, 4, 0).expect("a valid address");
    let bar = Bar::new(2, RegionInfo::new(2, 7, size, 2 << 40), Resource::new(2, input.bar_start, size, IORESOURCE_MEM));
    let page = align.max(1);
    match plan_export(dev, &bar, &ranges, page) {
        Ok(plan) => {
            assert_eq!(
                Some(plan.size()),
                validate_export_ranges("fuzz", &ranges, size, page).ok()
            );
            assert_eq!(
                Some(plan.phys().to_vec()),
                map_to_phys("fuzz", input.bar_start, &ranges).ok()
            );
            assert_eq!(plan.ranges(), ranges.as_slice());
            assert!(size > 0);
        }
        Err(_) => assert!(
            size == 0
                || validate_export_ranges("fuzz", &ranges, size, page).is_err()
                || map_to_phys("fuzz", input.bar_start, &ranges).is_err()
        ),
    }

    // The predicates, against 128-bit arithmetic.
    let (a, b) = (
        ByteRange::new(input.other.0, input.other.1),
        ranges.first().copied().unwrap_or(ByteRange::new(0, 0)),
    );
    let (a0, a1) = (
        u128::from(a.offset),
        u128::from(a.offset) + u128::from(a.length),
    );
    let (b0, b1) = (
        u128::from(b.offset),
        u128::from(b.offset) + u128::from(b.length),
    );
    let pos = u128::from(input.pos);
    assert_eq!(a.contains(input.pos), a0 <= pos && pos < a1);
    assert_eq!(a.contains_range(&b), a0 <= b0 && b1 <= a1);
    assert_eq!(
        a.overlaps(&b),
        a.length > 0 && b.length > 0 && a0 < b1 && b0 < a1
    );
    assert_eq!(a.overlaps(&b), b.overlaps(&a));
    assert_eq!(
        a.end().map(u128::from),
        u64::try_from(a1).ok().map(u128::from)
    );
    let p = PhysRange::new(a.offset, a.length);
    let page = align;
    match p.pfns(page) {
        Some((first, last)) => {
            assert!(page > 0 && a.length > 0 && a1 - 1 <= u128::from(u64::MAX));
            assert_eq!((first, last), (a.offset / page, ((a1 - 1) as u64) / page));
        }
        None => assert!(page == 0 || a.length == 0 || a1 - 1 > u128::from(u64::MAX)),
    }
    assert_eq!(p.to_string(), format!("{:#x}..{:#x}", a0, a1));
    let iova = IovaRange::new(b.offset, b.length);
    let want = a.length > 0 && a0 >= u128::from(iova.start) && a1 - 1 <= u128::from(iova.last);
    assert_eq!(iova.contains(a.offset, a.length), want);
});
