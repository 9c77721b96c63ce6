//! `FdInfo::parse` on any text: no panic; what it accepts has the required
//! keys, and printing it the way the kernel does and parsing again gives the
//! same value (when no value holds a character `lines()` treats specially).

#![no_main]

use dmabuf_p2p::fdinfo::FdInfo;
use libfuzzer_sys::fuzz_target;

/// Prints `info` as the kernel does: `key:\tvalue` lines, flags in octal.
fn render(info: &FdInfo) -> String {
    let mut s = format!(
        "pos:\t{}\nflags:\t{:08o}\nmnt_id:\t{}\nino:\t{}\n",
        info.pos, info.flags, info.mnt_id, info.ino
    );
    if let Some(b) = &info.dmabuf {
        s.push_str(&format!(
            "size:\t{}\ncount:\t{}\nexp_name:\t{}\n",
            b.size, b.count, b.exp_name
        ));
        if let Some(name) = &b.name {
            s.push_str(&format!("name:\t{name}\n"));
        }
    }
    s
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(info) = FdInfo::parse(text) else {
        return;
    };
    // The four generic keys are required: each appears as a line.
    for key in ["pos:", "flags:", "mnt_id:", "ino:"] {
        assert!(
            text.lines().any(|l| l.starts_with(key)),
            "accepted without a {key:?} line"
        );
    }
    if info.dmabuf.is_some() {
        for key in ["size:", "count:", "exp_name:"] {
            assert!(
                text.lines().any(|l| l.starts_with(key)),
                "a dma-buf accepted without a {key:?} line"
            );
        }
    }
    assert_eq!(info.is_dmabuf(), info.dmabuf.is_some());
    // Round trip, for values the kernel can print (no '\r', which `lines()`
    // strips at a line's end).
    let plain = |s: &str| !s.contains('\r');
    if info.dmabuf.as_ref().map_or(true, |b| {
        plain(&b.exp_name) && b.name.as_deref().map_or(true, plain)
    }) {
        let again = FdInfo::parse(&render(&info)).expect("the rendering of a parsed fdinfo parses");
        assert_eq!(again, info);
    }
    // FromStr is the same parser.
    assert_eq!(text.parse::<FdInfo>().ok(), Some(info));
});
