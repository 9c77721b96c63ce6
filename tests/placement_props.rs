//! Property tests of automatic IOVA placement against brute-force models, on
//! a small IOVA space (in 4 KiB pages) so that every candidate can be tried.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use dmabuf_p2p::importer::placement::{IommuPageSizes, IovaSet, PlacementRequest, pick_iova};
use proptest::prelude::*;

const PAGE: u64 = 4096;
/// The model's IOVA space: 4096 pages (16 MiB).
const SPACE_PAGES: u64 = 4096;
/// Page sizes scaled into the small space: 4 KiB, 64 KiB, 1 MiB.
const SIZES: IommuPageSizes = IommuPageSizes::from_bits(PAGE | (16 * PAGE) | (256 * PAGE));

/// Set of taken pages, the model of `IovaSet`.
fn model_pages(areas: &[(u64, u64)]) -> BTreeSet<u64> {
    areas
        .iter()
        .flat_map(|&(s, n)| s..s + n)
        .collect::<BTreeSet<u64>>()
}

fn areas() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0..SPACE_PAGES, 1u64..64), 0..24)
}

fn windows() -> impl Strategy<Value = Vec<(u64, u64)>> {
    prop::collection::vec((0..SPACE_PAGES, 1u64..2048), 1..4)
}

/// Whether `[iova, iova + len)` (bytes) is free, inside one window and a
/// multiple of the page.
fn fits(iova: u64, len: u64, wins: &[RangeInclusive<u64>], taken: &BTreeSet<u64>) -> bool {
    iova != 0
        && iova.is_multiple_of(PAGE)
        && wins
            .iter()
            .any(|w| iova >= *w.start() && iova + len - 1 <= *w.end())
        && (iova / PAGE..(iova + len) / PAGE).all(|p| !taken.contains(&p))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn iova_set_matches_a_page_set(ops in prop::collection::vec((any::<bool>(), 0..SPACE_PAGES, 1u64..40), 0..40)) {
        // Insertions of disjoint areas and removals of whole inserted areas,
        // as an IOAS does.
        let mut set = IovaSet::new();
        let mut live: Vec<(u64, u64)> = Vec::new();
        for (remove, start, n) in ops {
            if remove && !live.is_empty() {
                let (s, n) = live.remove(start as usize % live.len());
                set.remove(s * PAGE, n * PAGE);
            } else if !set.overlaps(start * PAGE, n * PAGE) {
                set.insert(start * PAGE, n * PAGE);
                live.push((start, n));
            }
            let model = model_pages(&live);
            let mut from_set = BTreeSet::new();
            let spans: Vec<_> = set.spans().collect();
            for w in spans.windows(2) {
                // Disjoint, ascending and not adjacent (adjacent spans merge).
                prop_assert!(w[0].end() + 1 < *w[1].start());
            }
            for span in spans {
                from_set.extend(span.start() / PAGE..=span.end() / PAGE);
            }
            prop_assert_eq!(&from_set, &model);
            for p in 0..SPACE_PAGES.min(200) {
                prop_assert_eq!(set.overlaps(p * PAGE, PAGE), model.contains(&p));
            }
        }
    }

    #[test]
    fn picks_the_lowest_free_iova_at_the_best_alignment(
        taken_areas in areas(),
        wins in windows(),
        len_pages in 1u64..600,
        residue_pages in 0u64..1024,
    ) {
        let mut taken = IovaSet::new();
        for &(s, n) in &taken_areas {
            taken.insert(s * PAGE, n * PAGE);
        }
        let taken_pages = model_pages(&taken_areas);
        let wins: Vec<RangeInclusive<u64>> = wins
            .iter()
            .map(|&(s, n)| s * PAGE..=((s + n).min(SPACE_PAGES) * PAGE - 1))
            .collect();
        let len = len_pages * PAGE;
        let req = PlacementRequest {
            length: len,
            residue: residue_pages * PAGE,
            max_alignment: SIZES.alignment_for(len),
            page_sizes: SIZES,
        };
        let got = pick_iova(&wins, &taken, PAGE, &req);
        // The model: for each alignment from the largest down, the lowest
        // congruent IOVA that fits.
        let mut expected = None;
        for align in [256 * PAGE, 16 * PAGE, PAGE].into_iter().filter(|&a| a <= req.max_alignment) {
            let r = req.residue % align;
            expected = (0..SPACE_PAGES * PAGE)
                .step_by(PAGE as usize)
                .find(|&iova| iova % align == r && fits(iova, len, &wins, &taken_pages));
            if expected.is_some() {
                break;
            }
        }
        prop_assert_eq!(got, expected);
        if let Some(iova) = got {
            prop_assert!(fits(iova, len, &wins, &taken_pages));
        }
    }
}
