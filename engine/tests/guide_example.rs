//! The README and the guide (`docs/GUIDE.md`) show how to drive several
//! NVMe queues at depth with code that is not compiled where it is shown
//! (the guide's doctests belong to the library, which does not depend on
//! the engine): it is the part of `examples/nvme_queues.rs` between the
//! `guide` markers, which is compiled (and run in the VM suite). These
//! tests keep the copies the same.

/// The example's parts between `// guide:start` and `// guide:end`,
/// dedented, trailing space trimmed, separated by a blank line.
fn guide_parts() -> Vec<String> {
    let src = include_str!("../examples/nvme_queues.rs");
    let mut parts = Vec::new();
    let mut rest = src;
    while let Some(a) = rest.find("// guide:start\n") {
        let body = &rest[a + "// guide:start\n".len()..];
        let Some(b) = body.find("// guide:end") else {
            break;
        };
        let lines: Vec<&str> = body[..b].trim_end().lines().collect();
        let indent = lines
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.len() - l.trim_start().len())
            .min()
            .unwrap_or(0);
        let text: Vec<&str> = lines
            .iter()
            .map(|l| l.get(indent..).unwrap_or_else(|| l.trim_start()))
            .collect();
        parts.push(text.join("\n"));
        rest = &body[b..];
    }
    parts
}

#[test]
fn the_guide_shows_the_compiled_example() {
    let parts = guide_parts();
    assert_eq!(
        parts.len(),
        3,
        "three guide parts in examples/nvme_queues.rs"
    );
    let guide = include_str!("../../docs/GUIDE.md");
    let both = parts.join("\n\n");
    assert!(
        guide.contains(&format!("```rust,ignore\n{both}\n```")),
        "docs/GUIDE.md must show, in a ```rust,ignore block, exactly:\n{both}"
    );
}

#[test]
fn the_readme_shows_the_compiled_example() {
    let parts = guide_parts();
    let readme = include_str!("../../README.md");
    assert!(
        readme.contains(&format!("```rust,ignore\n{}\n```", parts[0])),
        "README.md must show, in a ```rust,ignore block, exactly:\n{}",
        parts[0]
    );
}
