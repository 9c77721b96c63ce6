//! The CLI's number and range syntax: `range::parse_size` and
//! `ByteRange::from_str` on any text. No panic; a parsed size prints (in
//! decimal and hex) as text that parses back to it, and a suffix multiplies
//! exactly when the product fits; `OFFSET+LEN` parses exactly when both sides
//! parse as sizes, to the same numbers; an accepted range round-trips through
//! its printed form.

#![no_main]

use dmabuf_p2p::ByteRange;
use dmabuf_p2p::range::parse_size;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(v) = parse_size(text) {
        assert_eq!(parse_size(&v.to_string()).ok(), Some(v));
        assert_eq!(parse_size(&format!("{v:#x}")).ok(), Some(v));
        assert_eq!(parse_size(&format!(" {v:#X} ")).ok(), Some(v));
        for (suffix, shift) in [("K", 10u32), ("m", 20), ("GiB", 30), ("t", 40)] {
            let with = parse_size(&format!("{v}{suffix}")).ok();
            let fits = v.leading_zeros() >= shift;
            assert_eq!(with, fits.then(|| v << shift), "{v}{suffix}");
        }
    }

    let range = text.parse::<ByteRange>();
    match text.trim().split_once('+') {
        Some((off, len)) => match (parse_size(off), parse_size(len)) {
            (Ok(o), Ok(l)) => {
                assert_eq!(range.as_ref().ok(), Some(&ByteRange::new(o, l)), "{text:?}")
            }
            _ => assert!(
                range.is_err(),
                "{text:?} parsed though a side does not: {range:?}"
            ),
        },
        None => assert!(range.is_err(), "{text:?} has no '+' yet parsed"),
    }
    if let Ok(r) = range {
        assert_eq!(r.to_string().parse::<ByteRange>().ok(), Some(r));
    }
});
