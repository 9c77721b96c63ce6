//! With `--features bindgen`: the committed `src/sys/bindings.rs` must equal
//! what `build.rs` just generated from `$DMABUF_P2P_UAPI_INCLUDE`.
//!
//! Run it with `cargo xtask bindings --check` (which fetches the headers), or
//! by hand:
//! `DMABUF_P2P_UAPI_INCLUDE=<dir> cargo test -p dmabuf-p2p --features bindgen --test bindings_fresh`.
#![cfg(feature = "bindgen")]

const GENERATED: &str = include_str!(concat!(env!("OUT_DIR"), "/bindings.rs"));
const COMMITTED: &str = include_str!("../src/sys/bindings.rs");

#[test]
fn committed_bindings_match_the_headers() {
    if GENERATED == COMMITTED {
        return;
    }
    let first_difference = GENERATED
        .lines()
        .zip(COMMITTED.lines())
        .enumerate()
        .find(|(_, (g, c))| g != c)
        .map(|(i, (g, c))| {
            format!(
                "first difference at line {}:\n  committed: {c}\n  generated: {g}",
                i + 1
            )
        })
        .unwrap_or_else(|| {
            format!(
                "one is a prefix of the other ({} vs {} lines)",
                COMMITTED.lines().count(),
                GENERATED.lines().count()
            )
        });
    panic!(
        "src/sys/bindings.rs is stale: it differs from what bindgen generates from the headers in \
         $DMABUF_P2P_UAPI_INCLUDE ({}).\n{first_difference}\n\
         Regenerate it with `cargo xtask bindings` (or copy {}/bindings.rs over it) and commit.",
        option_env!("DMABUF_P2P_UAPI_INCLUDE").unwrap_or("unset at build time"),
        env!("OUT_DIR")
    );
}
