//! Host tests of the CLI's target syntax, `<bdf>[:<bar>[:<offset>+<len>]]`:
//! accepted forms and how they print, rejected forms and what the error names,
//! and properties over generated specs and text.

// Failing a test by panicking is what tests do.
#![allow(clippy::panic)]

use dmabuf_p2p::{ByteRange, PciAddress};
use dmabuf_p2p_cli::target::TargetSpec;
use proptest::prelude::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn target_spec_good() -> TestResult {
    let dev: PciAddress = "0000:00:04.0".parse()?;
    let cases = [
        ("00:04.0", None, None, "0000:00:04.0"),
        ("0000:00:04.0", None, None, "0000:00:04.0"),
        ("0000:00:04.0:2", Some(2), None, "0000:00:04.0:2"),
        ("00:04.0:bar5", Some(5), None, "0000:00:04.0:5"),
        ("00:04.0:BAR0", Some(0), None, "0000:00:04.0:0"),
        (
            "0000:00:04.0:2:0x1000+0x2000",
            Some(2),
            Some(ByteRange::new(0x1000, 0x2000)),
            "0000:00:04.0:2:0x1000+0x2000",
        ),
        (
            "00:04.0:2:0+1M",
            Some(2),
            Some(ByteRange::new(0, 1 << 20)),
            "0000:00:04.0:2:0x0+0x100000",
        ),
    ];
    for (text, bar, range, shown) in cases {
        let t: TargetSpec = text.parse()?;
        assert_eq!(
            t,
            TargetSpec {
                device: dev,
                bar,
                range
            },
            "{text}"
        );
        assert_eq!(t.to_string(), shown);
        assert_eq!(shown.parse::<TargetSpec>()?, t);
    }
    Ok(())
}

#[test]
fn target_spec_bad() {
    let cases = [
        ("", "address"),
        ("00:04.0:", "BAR"),
        ("00:04.0:6", "BAR \"6\""),
        ("00:04.0:bar", "BAR \"bar\""),
        ("00:04.0:-1", "BAR \"-1\""),
        ("00:04.0:+1", "BAR \"+1\""),
        ("00:04.0:x", "BAR \"x\""),
        ("00:04.0:2:", "range"),
        ("00:04.0:2:0x1000", "range"),
        ("00:04.0:2:0x1000+", "range"),
        ("00:04.0:2:0x1000+0x1000:3", "range"),
        ("00:40.0:2", "address"),
        ("0000:00:04.0:2:ä+1", "range"),
        ("00:04:2", "address"),
        ("garbage", "address"),
        ("00:04.0:２", "BAR"),
    ];
    for (text, part) in cases {
        match text.parse::<TargetSpec>() {
            Ok(t) => panic!("{text:?} parsed as {t}"),
            Err(e) => {
                assert_eq!(e.input, text);
                let msg = e.to_string();
                let quoted = format!("{text:?}");
                assert!(msg.contains(&quoted), "{msg:?} does not name {quoted}");
                assert!(msg.contains(part), "{msg:?} does not name the {part}");
            }
        }
    }
}

#[test]
fn long_input_is_shortened_in_the_error() {
    let text = format!("00:04.0:2:{}", "9".repeat(200));
    let Err(e) = text.parse::<TargetSpec>() else {
        panic!("a 200-digit range parsed");
    };
    assert!(e.input.chars().count() <= 81, "{:?}", e.input);
    assert!(e.input.ends_with('…'));
}

fn pci_address() -> impl Strategy<Value = PciAddress> {
    (any::<u32>(), any::<u8>(), 0u8..32, 0u8..8).prop_filter_map("valid address", |(d, b, s, f)| {
        PciAddress::new(d, b, s, f).ok()
    })
}

proptest! {
    #[test]
    fn target_spec_round_trip(
        device in pci_address(),
        bar in proptest::option::of(0u32..6),
        offset in any::<u64>(),
        length in any::<u64>(),
        with_range in any::<bool>(),
    ) {
        let range = (with_range && bar.is_some()).then(|| ByteRange::new(offset, length));
        let t = TargetSpec { device, bar, range };
        prop_assert_eq!(t.to_string().parse::<TargetSpec>().ok(), Some(t));
    }

    /// Any text: an error or a spec whose BAR is 0..=5 and whose range comes
    /// only with a BAR; never a panic.
    #[test]
    fn parse_never_panics(s in "\\PC{0,40}") {
        if let Ok(t) = s.parse::<TargetSpec>() {
            prop_assert!(t.bar.is_some_and(|b| b < 6) || (t.bar.is_none() && t.range.is_none()));
        }
    }

    /// The same with the characters the grammar uses.
    #[test]
    fn parse_never_panics_on_near_misses(s in "[0-9a-fA-FxXkKmMgGtTiBbar:.+\\- \t\n]{0,40}") {
        if let Ok(t) = s.parse::<TargetSpec>() {
            prop_assert!(t.bar.is_some_and(|b| b < 6) || (t.bar.is_none() && t.range.is_none()));
        }
    }
}
