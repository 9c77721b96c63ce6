//! `PciAddress::from_str` on any text, and `PciAddress::new` on any parts:
//! no panic; an accepted address is in range, prints in the canonical form,
//! and that form (and the short form, for domain 0) parses back to it.

#![no_main]

use dmabuf_p2p::pci::PciAddress;
use libfuzzer_sys::fuzz_target;

fn check(a: PciAddress) {
    assert!(a.device() <= 31 && a.function() <= 7, "{a:?} out of range");
    let text = a.to_string();
    // DDDD:BB:DD.F, with 4 to 8 domain digits.
    assert!((12..=16).contains(&text.len()), "canonical form {text:?}");
    assert_eq!(
        text.parse::<PciAddress>().expect("canonical form parses"),
        a
    );
    assert_eq!(
        text.to_uppercase()
            .parse::<PciAddress>()
            .expect("upper case parses"),
        a
    );
    if a.domain() == 0 {
        assert_eq!(
            text[5..].parse::<PciAddress>().expect("short form parses"),
            a
        );
    }
    assert_eq!(
        PciAddress::new(a.domain(), a.bus(), a.device(), a.function()).expect("parts are valid"),
        a
    );
}

fuzz_target!(|data: &[u8]| {
    // Structured: the first 7 bytes as parts.
    if let [d0, d1, d2, d3, bus, dev, func, ..] = *data {
        let domain = u32::from_le_bytes([d0, d1, d2, d3]);
        match PciAddress::new(domain, bus, dev, func) {
            Ok(a) => check(a),
            Err(_) => assert!(
                dev > 31 || func > 7,
                "valid parts refused: {domain:#x} {bus} {dev} {func}"
            ),
        }
    }
    // Text.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(a) = text.parse::<PciAddress>() {
        check(a);
        // Only hex digits and the separators make an address.
        assert!(
            text.chars()
                .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.'),
            "accepted {text:?}"
        );
    }
});
