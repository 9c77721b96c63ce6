//! Property tests for the range arithmetic and the text round trips. Each
//! property is checked against an oracle computed in 128-bit arithmetic, where
//! nothing can overflow.

use dmabuf_p2p::fdinfo::FdInfo;
use dmabuf_p2p::importer::iommufd::IovaRange;
use dmabuf_p2p::pci::{PciAddress, parse_resources};
use dmabuf_p2p::range::{PhysRange, map_to_phys, parse_size, validate_export_ranges};
use dmabuf_p2p::{ByteRange, Error, RangeProblem};
use proptest::prelude::*;

/// u64 values biased towards the edges where the arithmetic can go wrong.
fn edgy_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0u64..0x2_0000,
        (0u64..1 << 20).prop_map(|p| p * 0x1000),
        (0u32..64).prop_map(|s| 1u64 << s),
        (0u64..0x2_0000).prop_map(|d| u64::MAX - d),
        (0u64..0x2_0000).prop_map(|d| (1u64 << 63).wrapping_sub(0x1_0000).wrapping_add(d)),
    ]
}

fn range() -> impl Strategy<Value = ByteRange> {
    (edgy_u64(), edgy_u64()).prop_map(|(o, l)| ByteRange::new(o, l))
}

fn align() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(0x1000),
        Just(0x1_0000),
        Just(0x20_0000)
    ]
}

fn pci_address() -> impl Strategy<Value = PciAddress> {
    (any::<u32>(), any::<u8>(), 0u8..32, 0u8..8).prop_filter_map("valid address", |(d, b, s, f)| {
        PciAddress::new(d, b, s, f).ok()
    })
}

/// The problem `check_in` must report, computed independently.
fn oracle(r: ByteRange, size: u64, align: u64) -> Result<(), RangeProblem> {
    let end = u128::from(r.offset) + u128::from(r.length);
    if r.length == 0 {
        Err(RangeProblem::Empty)
    } else if align > 1 && (!r.offset.is_multiple_of(align) || !r.length.is_multiple_of(align)) {
        Err(RangeProblem::Unaligned { align })
    } else if end > u128::from(u64::MAX) {
        Err(RangeProblem::Overflow)
    } else if end > u128::from(size) {
        Err(RangeProblem::OutOfBounds {
            end: end as u64,
            size,
        })
    } else {
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn end_is_checked(r in range()) {
        let want = u64::try_from(u128::from(r.offset) + u128::from(r.length)).ok();
        prop_assert_eq!(r.end(), want);
    }

    #[test]
    fn check_in_matches_oracle(r in range(), size in edgy_u64(), align in align()) {
        prop_assert_eq!(r.check_in(size, align), oracle(r, size, align));
    }

    /// Aligned, in-bounds ranges built to be valid are always accepted.
    #[test]
    fn check_in_accepts_valid(pages in 1u64..1 << 20, first in 0u64..1 << 20, count in 1u64..1 << 20) {
        let page = 0x1000;
        let size = pages * page;
        let offset = (first % pages) * page;
        let length = (1 + count % (pages - offset / page)) * page;
        prop_assert_eq!(ByteRange::new(offset, length).check_in(size, page), Ok(()));
    }

    #[test]
    fn contains_matches_oracle(r in range(), pos in edgy_u64()) {
        let (o, l, p) = (u128::from(r.offset), u128::from(r.length), u128::from(pos));
        prop_assert_eq!(r.contains(pos), p >= o && p < o + l);
    }

    #[test]
    fn contains_range_matches_oracle(a in range(), b in range()) {
        let (ao, ae) = (u128::from(a.offset), u128::from(a.offset) + u128::from(a.length));
        let (bo, be) = (u128::from(b.offset), u128::from(b.offset) + u128::from(b.length));
        prop_assert_eq!(a.contains_range(&b), bo >= ao && be <= ae);
    }

    #[test]
    fn overlaps_matches_oracle(a in range(), b in range()) {
        let (ao, ae) = (u128::from(a.offset), u128::from(a.offset) + u128::from(a.length));
        let (bo, be) = (u128::from(b.offset), u128::from(b.offset) + u128::from(b.length));
        let want = a.length > 0 && b.length > 0 && ao < be && bo < ae;
        prop_assert_eq!(a.overlaps(&b), want);
        prop_assert_eq!(b.overlaps(&a), want);
    }

    /// Mapping to physical addresses succeeds exactly when the physical end
    /// fits in 64 bits, and then preserves the length and the offset.
    #[test]
    fn to_phys_never_overflows_silently(r in range(), bar in edgy_u64()) {
        let start = u128::from(bar) + u128::from(r.offset);
        let end = start + u128::from(r.length);
        match r.to_phys(bar) {
            Ok(p) => {
                prop_assert!(end <= u128::from(u64::MAX));
                prop_assert_eq!(u128::from(p.start), start);
                prop_assert_eq!(p.length, r.length);
                prop_assert_eq!(p.end().map(u128::from), Some(end));
            }
            Err(problem) => {
                prop_assert!(end > u128::from(u64::MAX));
                prop_assert_eq!(problem, RangeProblem::Overflow);
            }
        }
    }

    #[test]
    fn map_to_phys_names_first_overflow(ranges in prop::collection::vec(range(), 0..6), bar in edgy_u64()) {
        let first_bad = ranges
            .iter()
            .find(|r| u128::from(bar) + u128::from(r.offset) + u128::from(r.length) > u128::from(u64::MAX));
        match (map_to_phys("t", bar, &ranges), first_bad) {
            (Ok(phys), None) => {
                prop_assert_eq!(phys.len(), ranges.len());
                for (p, r) in phys.iter().zip(&ranges) {
                    prop_assert_eq!(p.start - bar, r.offset);
                }
            }
            (Err(Error::InvalidRange { range, problem, target }), Some(bad)) => {
                prop_assert_eq!(range, *bad);
                prop_assert_eq!(problem, RangeProblem::Overflow);
                prop_assert_eq!(target, "t");
            }
            (other, bad) => prop_assert!(false, "{:?} vs first bad {:?}", other, bad),
        }
    }

    #[test]
    fn validate_export_matches_oracle(
        ranges in prop::collection::vec(range(), 0..5),
        size in edgy_u64(),
        align in align(),
    ) {
        let mut want: Result<u64, (ByteRange, RangeProblem)> =
            Err((ByteRange::new(0, 0), RangeProblem::Count("no ranges given".into())));
        if !ranges.is_empty() {
            let mut total: u128 = 0;
            want = Ok(0);
            for r in &ranges {
                if let Err(p) = oracle(*r, size, align) {
                    want = Err((*r, p));
                    break;
                }
                total += u128::from(r.length);
                if total > u128::from(u64::MAX) {
                    want = Err((*r, RangeProblem::TotalOverflow));
                    break;
                }
                if total >= 1 << 63 {
                    want = Err((*r, RangeProblem::TotalTooLarge { total: total as u64 }));
                    break;
                }
                want = Ok(total as u64);
            }
        }
        match validate_export_ranges("bar", &ranges, size, align) {
            Ok(total) => prop_assert_eq!(Ok(total), want),
            Err(Error::InvalidRange { range, problem, .. }) => prop_assert_eq!(Err((range, problem)), want),
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    /// Page-aligned ranges inside a big BAR are accepted until the total reaches 2^63.
    #[test]
    fn validate_export_total_limit(n in 1usize..6, shift in 58u32..63) {
        let len = 1u64 << shift;
        let bar = !0xfff_u64;
        let ranges = vec![ByteRange::new(0, len); n];
        let total = u128::from(len) * n as u128;
        let r = validate_export_ranges("bar", &ranges, bar, 0x1000);
        if total < 1 << 63 {
            prop_assert_eq!(r.ok(), Some(total as u64));
        } else {
            let is_too_large = matches!(r, Err(Error::InvalidRange { problem: RangeProblem::TotalTooLarge { .. }, .. }));
            prop_assert!(is_too_large);
        }
    }

    #[test]
    fn byte_range_display_round_trip(r in range()) {
        prop_assert_eq!(r.to_string().parse::<ByteRange>().ok(), Some(r));
        prop_assert_eq!(format!("{}+{}", r.offset, r.length).parse::<ByteRange>().ok(), Some(r));
    }

    #[test]
    fn size_suffixes(n in 0u64..1 << 24, (suffix, shift) in prop_oneof![
        Just(("", 0u32)), Just(("K", 10)), Just(("k", 10)), Just(("KiB", 10)),
        Just(("M", 20)), Just(("MiB", 20)), Just(("G", 30)), Just(("g", 30)), Just(("T", 40)),
    ]) {
        prop_assert_eq!(parse_size(&format!("{n}{suffix}")).ok(), Some(n << shift));
        prop_assert_eq!(parse_size(&format!("{n:#x}{suffix}")).ok(), Some(n << shift));
    }

    #[test]
    fn pci_address_round_trip(a in pci_address()) {
        let full = a.to_string();
        prop_assert_eq!(full.parse::<PciAddress>().ok(), Some(a));
        prop_assert_eq!(full.to_uppercase().parse::<PciAddress>().ok(), Some(a));
        if a.domain() == 0 {
            let short = format!("{:02x}:{:02x}.{}", a.bus(), a.device(), a.function());
            prop_assert_eq!(short.parse::<PciAddress>().ok(), Some(a));
        }
    }

    #[test]
    fn phys_display_is_hex_with_exclusive_end(start in edgy_u64(), length in edgy_u64()) {
        let shown = PhysRange::new(start, length).to_string();
        let end = u128::from(start) + u128::from(length);
        prop_assert_eq!(shown, format!("{start:#x}..{end:#x}"));
    }

    /// The page frames a physical range touches, against the oracle.
    #[test]
    fn pfns_match_oracle(start in edgy_u64(), length in edgy_u64(), page in prop_oneof![Just(0u64), Just(1), Just(0x1000), Just(0x20_0000), any::<u64>()]) {
        let last = u128::from(start) + u128::from(length);
        let want = if page == 0 || length == 0 || last - 1 > u128::from(u64::MAX) {
            None
        } else {
            Some((start / page, ((last - 1) as u64) / page))
        };
        prop_assert_eq!(PhysRange::new(start, length).pfns(page), want);
    }

    /// `IovaRange::contains` (an inclusive `last`), against the oracle.
    #[test]
    fn iova_range_contains_matches_oracle(r in range(), iova in edgy_u64(), length in edgy_u64()) {
        let usable = IovaRange::new(r.offset, r.length);
        let end = u128::from(iova) + u128::from(length);
        let want = length > 0 && iova >= usable.start && end - 1 <= u128::from(usable.last);
        prop_assert_eq!(usable.contains(iova, length), want);
    }

    /// `OFFSET+LEN` parses exactly when both sides parse as sizes, to the
    /// same numbers (the CLI's two number syntaxes cannot drift apart).
    #[test]
    fn byte_range_parses_as_two_sizes(s in "[0-9a-fA-FxXkKmMgGtTiB ]{0,12}\\+[0-9a-fA-FxXkKmMgGtTiB ]{0,12}") {
        let (off, len) = s.trim().split_once('+').expect("the pattern has a '+'");
        let want = match (parse_size(off), parse_size(len)) {
            (Ok(o), Ok(l)) => Some(ByteRange::new(o, l)),
            _ => None,
        };
        prop_assert_eq!(s.parse::<ByteRange>().ok(), want);
    }

    /// No parser panics on any input, and every failure is `Error::Parse`.
    #[test]
    fn parsers_never_panic(s in "\\PC{0,40}") {
        let parse_only = |r: Result<(), Error>| matches!(r, Ok(()) | Err(Error::Parse { .. }));
        prop_assert!(parse_only(s.parse::<PciAddress>().map(|_| ())));
        prop_assert!(parse_only(s.parse::<ByteRange>().map(|_| ())));
        prop_assert!(parse_only(parse_size(&s).map(|_| ())));
        prop_assert!(parse_only(parse_resources(&s).map(|_| ())));
        prop_assert!(parse_only(FdInfo::parse(&s).map(|_| ())));
    }

    /// The same with inputs made of the characters the grammars use.
    #[test]
    fn parsers_never_panic_on_near_misses(s in "[0-9a-fA-FxXkKmMgGtTiB:.+\\- \t\n]{0,40}") {
        let parse_only = |r: Result<(), Error>| matches!(r, Ok(()) | Err(Error::Parse { .. }));
        prop_assert!(parse_only(s.parse::<PciAddress>().map(|_| ())));
        prop_assert!(parse_only(s.parse::<ByteRange>().map(|_| ())));
        prop_assert!(parse_only(parse_resources(&s).map(|_| ())));
        let fd = format!("pos:\t0\nflags:\t{s}\nmnt_id:\t1\nino:\t1\nexp_name:\tx\nsize:\t{s}\ncount:\t1\n");
        prop_assert!(parse_only(FdInfo::parse(&fd).map(|_| ())));
    }
}
