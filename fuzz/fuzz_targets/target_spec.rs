//! `TargetSpec::from_str` on any text: no panic; an accepted spec has a BAR
//! of 0..=5, a range only with a BAR, and prints in a form that parses back to
//! the same spec.

#![no_main]

use dmabuf_p2p::pci::BAR_COUNT;
use dmabuf_p2p_cli::target::TargetSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = text.parse::<TargetSpec>() else {
        return;
    };
    if let Some(bar) = spec.bar {
        assert!(bar < BAR_COUNT, "BAR {bar} accepted");
    } else {
        assert!(spec.range.is_none(), "a range without a BAR");
    }
    let printed = spec.to_string();
    assert_eq!(
        printed
            .parse::<TargetSpec>()
            .expect("the printed form parses"),
        spec,
        "{printed:?}"
    );
    // The device part alone is an address.
    assert_eq!(
        spec.device
            .to_string()
            .parse::<TargetSpec>()
            .expect("device alone")
            .device,
        spec.device
    );
});
