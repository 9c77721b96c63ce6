//! Host tests of the `dmabuf-p2p` command line: argument errors that need no
//! device (malformed target specs, PCI addresses, ranges, sizes, numbers).
//! Each must end the process with a non-zero status and one diagnostic line
//! on stderr that names the bad input, with no panic and no backtrace.

// Failing a test by panicking is what tests do.
#![allow(clippy::panic, clippy::unwrap_used)]

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_dmabuf-p2p");

/// clap's hint after an argument error; not a second diagnostic.
const CLAP_HINT: &str = "For more information, try '--help'.";

/// Runs the CLI with a backtrace requested, so a panic would show one.
fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

/// What is wrong with a failing run, or `None` if it failed the right way:
/// non-zero exit, nothing on stdout, exactly one diagnostic line on stderr
/// (clap's `--help` hint aside) that says error and contains every needle.
fn problem(out: &Output, needles: &[&str]) -> Option<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        None => return Some(format!("killed by a signal: {:?}", out.status)),
        Some(0) => return Some(format!("exit status 0; stderr {stderr:?}")),
        Some(_) => {}
    }
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE"] {
        if stderr.contains(bad) || stdout.contains(bad) {
            return Some(format!("{bad:?} in the output: {stderr:?}"));
        }
    }
    if !stdout.trim().is_empty() {
        return Some(format!("printed to stdout: {stdout:?}"));
    }
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && l.trim() != CLAP_HINT)
        .collect();
    let [line] = lines.as_slice() else {
        return Some(format!(
            "{} diagnostic lines, want one: {stderr:?}",
            lines.len()
        ));
    };
    if !line.starts_with("error:") && !line.starts_with("dmabuf-p2p: error:") {
        return Some(format!(
            "the line does not start with an error label: {line:?}"
        ));
    }
    let missing: Vec<&&str> = needles.iter().filter(|n| !line.contains(**n)).collect();
    if !missing.is_empty() {
        return Some(format!("{line:?} does not name {missing:?}"));
    }
    None
}

/// Runs every case and reports all failures at once.
fn check_all(cases: &[(&[&str], &[&str])]) {
    let mut failures = Vec::new();
    for (args, needles) in cases {
        let out = run(args);
        if let Some(p) = problem(&out, needles) {
            failures.push(format!("dmabuf-p2p {args:?}: {p}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n  {}",
        failures.len(),
        cases.len(),
        failures.join("\n  ")
    );
}

#[test]
fn malformed_export_targets_are_one_line_errors() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["export", ""], &["''", "expected DDDD:BB:DD.F"]),
        (&["export", "zz"], &["'zz'", "expected DDDD:BB:DD.F"]),
        (
            &["export", "0000:zz:00.0"],
            &["0000:zz:00.0", "bus \"zz\" is not hex"],
        ),
        (
            &["export", "0000:100:00.0"],
            &["0000:100:00.0", "bus \"100\""],
        ),
        (&["export", "0000:00:1f"], &["0000:00:1f", "DD.F"]),
        (&["export", "0000:00:00.8"], &["0000:00:00.8", "function 8"]),
        (
            &["export", "0000:00:04.0:6"],
            &["0000:00:04.0:6", "BAR \"6\" must be 0..=5"],
        ),
        (
            &["export", "0000:00:04.0:x"],
            &["0000:00:04.0:x", "BAR \"x\""],
        ),
        (
            &["export", "0000:00:04.0:2:0x1000"],
            &["range \"0x1000\"", "OFFSET+LEN"],
        ),
        (
            &["export", "0000:00:04.0:2:+4K"],
            &["range \"+4K\"", "offset: empty number"],
        ),
        (
            &["export", "0000:00:04.0:2:0x1000+"],
            &["range \"0x1000+\"", "length: empty number"],
        ),
        (
            &["export", "0000:00:04.0:2:0+4Q"],
            &["range \"0+4Q\"", "\"4Q\" is not a number"],
        ),
        (
            &["export", "0000:00:04.0:2:0+0xfffffffffffffffff"],
            &["0xfffffffffffffffff", "not a hex number"],
        ),
        (
            &["export", "0000:00:04.0:2:0+99999999T"],
            &["\"99999999T\" does not fit in 64 bits"],
        ),
        (
            &["export", "0000:00:04.0:2:0x1000+4K:7"],
            &["range \"0x1000+4K:7\""],
        ),
    ];
    check_all(cases);
}

#[test]
fn malformed_p2p_test_arguments_are_one_line_errors() {
    const T: &str = "0000:00:04.0";
    const E: &str = "0000:00:03.0";
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["p2p-test", "--engine", E, "--target", T, "--size", "12Q"],
            &["'12Q'", "--size", "not a number"],
        ),
        (
            &["p2p-test", "--engine", E, "--target", T, "--size", "0x"],
            &["'0x'", "--size", "not a hex number"],
        ),
        (
            &["p2p-test", "--engine", E, "--target", T, "--size", ""],
            &["--size", "empty number"],
        ),
        (
            &["p2p-test", "--engine", E, "--target", T, "--size", "1E"],
            &["'1E'", "--size"],
        ),
        (
            &[
                "p2p-test",
                "--engine",
                E,
                "--target",
                T,
                "--size",
                "99999999999T",
            ],
            &["99999999999T", "does not fit in 64 bits"],
        ),
        (
            &["p2p-test", "--engine=zz", "--target", T],
            &["'zz'", "--engine", "PCI address"],
        ),
        (
            &["p2p-test", "--engine", "00:03", "--target", T],
            &["'00:03'", "--engine"],
        ),
        (
            &["p2p-test", "--engine", E, "--target", "0000:00:04.0:7"],
            &["--target", "BAR \"7\""],
        ),
        (
            &[
                "p2p-test",
                "--engine",
                E,
                "--target",
                "0000:00:04.0:2:0x800",
            ],
            &["--target", "range \"0x800\""],
        ),
        (
            &["p2p-test", "--engine", E, "--target", T, "--timeout=-1"],
            &["'-1'", "--timeout"],
        ),
        (
            &[
                "p2p-test",
                "--engine",
                E,
                "--target",
                T,
                "--timeout",
                "99999999999999999999999",
            ],
            &["--timeout", "too large"],
        ),
    ];
    check_all(cases);
}

/// A timeout too large to add to the clock is refused at parse time, never
/// a panic (`Instant + Duration` overflow), for every command that takes one.
#[test]
fn huge_timeouts_are_one_line_errors() {
    const T: &str = "0000:00:04.0";
    const E: &str = "0000:00:03.0";
    let huge = u64::MAX.to_string();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["p2p-test", "--engine", E, "--target", T, "--timeout", &huge],
            &["--timeout", "1 to 604800"],
        ),
        (
            &["p2p-test", "--engine", E, "--target", T, "--timeout", "0"],
            &["--timeout", "1 to 604800"],
        ),
        (
            &["map", "--from", "/nonexistent.sock", "--timeout", &huge],
            &["--timeout", "1 to 604800"],
        ),
    ];
    check_all(cases);
}

#[test]
fn missing_arguments_are_named() {
    let cases: &[(&[&str], &[&str])] = &[
        (&["export"], &["not provided", "<TARGET>"]),
        (&["p2p-test"], &["not provided", "--engine", "--target"]),
        (&["p2p-test", "--engine", "00:03.0"], &["--target <TARGET>"]),
        (&["map"], &["not provided", "--from"]),
        (&["completions"], &["not provided", "<SHELL>"]),
    ];
    check_all(cases);
}

/// Runs the CLI with its stdout the write end of a pipe whose read end is
/// already closed, so its first write fails with `EPIPE`.
fn run_into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}

/// A sysfs tree with one PCI device (the layout `devices` reads), removed on
/// drop.
struct FakeSysfs(std::path::PathBuf);

impl FakeSysfs {
    fn new(tag: &str) -> Self {
        let root =
            std::env::temp_dir().join(format!("dmabuf-p2p-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dev = root.join("devices/pci0000:00/0000:00:04.0");
        std::fs::create_dir_all(&dev).unwrap();
        for (file, content) in [
            ("vendor", "0x1af4\n"),
            ("device", "0x1110\n"),
            ("class", "0x050000\n"),
            (
                "resource",
                "0x00000000fe000000 0x00000000fe0fffff 0x0000000000040200\n",
            ),
        ] {
            std::fs::write(dev.join(file), content).unwrap();
        }
        let bus = root.join("bus/pci/devices");
        std::fs::create_dir_all(&bus).unwrap();
        std::os::unix::fs::symlink(
            "../../../devices/pci0000:00/0000:00:04.0",
            bus.join("0000:00:04.0"),
        )
        .unwrap();
        Self(root)
    }
}

impl Drop for FakeSysfs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn closed_stdout_is_a_clean_exit() {
    let sysfs = FakeSysfs::new("epipe");
    let root = sysfs.0.to_str().unwrap();
    // The tree is readable: the same command with a reader prints the device.
    let listed = run(&["devices", "--sysfs", root]);
    assert_eq!(listed.status.code(), Some(0), "{listed:?}");
    assert!(String::from_utf8_lossy(&listed.stdout).contains("0000:00:04.0"));
    for args in [
        &["devices", "--sysfs", root][..],
        &["--json", "devices", "--sysfs", root],
        &["completions", "bash"],
        &["man"],
    ] {
        let out = run_into_closed_pipe(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?} wrote to stderr: {stderr:?}");
    }
}

/// With `--json`, an error is one JSON object on stderr naming its kind.
#[test]
fn json_errors_are_json() {
    let cases: &[(&[&str], &str, &str)] = &[
        (&["--json", "p2p-test"], "arguments", "--engine"),
        (&["export", "--json", "00:04.0:9"], "arguments", "BAR \"9\""),
        (
            &["--json", "devices", "--sysfs", "/nonexistent-sysfs-root"],
            "command",
            "/nonexistent-sysfs-root",
        ),
    ];
    for (args, kind, needle) in cases {
        let out = run(args);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr:?}");
        let v: serde_json::Value = serde_json::from_str(lines[0])
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stderr:?}"));
        assert_eq!(v["error"]["kind"], *kind, "{args:?}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{args:?}: {message:?}");
    }
}

#[test]
fn completions_and_man_page_come_from_the_parser() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for sub in ["devices", "p2p-test", "export", "map", "completions"] {
            assert!(script.contains(sub), "{shell} completions lack {sub}");
        }
    }
    let out = run(&["man"]);
    assert_eq!(out.status.code(), Some(0));
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH dmabuf-p2p 1"), "{page}");
    for needle in [".SH NAME", ".SH SUBCOMMANDS", "p2p\\-test", "\\-\\-json"] {
        assert!(page.contains(needle), "the man page lacks {needle:?}");
    }
    let bad = run(&["completions", "tcsh"]);
    assert!(problem(&bad, &["'tcsh'"]).is_none(), "{bad:?}");
}

/// `topology` on a sysfs tree laid out from the test VM's root-bus dump
/// (`tests/fixtures/topology/vm-root-bus.txt`: q35's host bridge, edu and
/// ivshmem on `pcie.0`): the tree, the verdict and its JSON; a missing
/// device is a one-line error naming it.
#[test]
fn topology_prints_the_tree_and_the_verdict() {
    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/topology/vm-root-bus.txt"
    ))
    .unwrap();
    let root = std::env::temp_dir().join(format!("dmabuf-p2p-cli-topology-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let bus = root.join("bus/pci/devices");
    std::fs::create_dir_all(&bus).unwrap();
    // Each block: the address line, `@` lines, hex lines of the config.
    for block in fixture.split("\n\n").skip(1) {
        let mut lines = block.lines();
        let addr = lines.next().unwrap().split_whitespace().next().unwrap();
        let dir = root.join("devices/pci0000:00").join(addr);
        std::fs::create_dir_all(&dir).unwrap();
        let (mut config, mut resource) = (Vec::new(), String::new());
        for line in lines {
            let t = line.trim();
            if let Some(r) = t.strip_prefix("@resource ") {
                resource.push_str(r);
                resource.push('\n');
            } else if let Some(g) = t.strip_prefix("@iommu_group ") {
                std::os::unix::fs::symlink(
                    format!("../../../kernel/iommu_groups/{g}"),
                    dir.join("iommu_group"),
                )
                .unwrap();
            } else if let Some(d) = t.strip_prefix("@driver ") {
                std::os::unix::fs::symlink(
                    format!("../../../bus/pci/drivers/{d}"),
                    dir.join("driver"),
                )
                .unwrap();
            } else if let Some((off, hex)) = t.split_once(": ") {
                let off = usize::from_str_radix(off, 16).unwrap();
                let bytes: Vec<u8> = hex
                    .split_whitespace()
                    .map(|b| u8::from_str_radix(b, 16).unwrap())
                    .collect();
                config.resize(config.len().max(off + bytes.len()), 0);
                config[off..off + bytes.len()].copy_from_slice(&bytes);
            }
        }
        let word = |o: usize| u16::from_le_bytes([config[o], config[o + 1]]);
        let class = u32::from_le_bytes([config[8], config[9], config[10], config[11]]) >> 8;
        std::fs::write(dir.join("vendor"), format!("{:#06x}\n", word(0))).unwrap();
        std::fs::write(dir.join("device"), format!("{:#06x}\n", word(2))).unwrap();
        std::fs::write(dir.join("class"), format!("{class:#08x}\n")).unwrap();
        std::fs::write(dir.join("config"), &config).unwrap();
        std::fs::write(dir.join("resource"), resource).unwrap();
        std::os::unix::fs::symlink(
            format!("../../../devices/pci0000:00/{addr}"),
            bus.join(addr),
        )
        .unwrap();
    }
    let sysfs = root.to_str().unwrap();
    let out = run(&["topology", "00:10.0", "00:11.0:2", "--sysfs", sysfs]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    for needle in [
        "pci0000:00 host bridge (root complex), 0000:00:00.0 8086:29c0",
        "├─ engine: 0000:00:10.0 1234:11e8 conventional PCI function [no ACS, IOMMU group 1] vfio-pci",
        "└─ target: 0000:00:11.0 1af4:1110 conventional PCI function [no ACS, IOMMU group 2] vfio-pci  BAR2 at bus address 0xfeb00000 (1 MiB)",
        "usable IOVAs: unknown",
        "verdict: ",
        "the two share no bridge",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    let out = run(&[
        "--json",
        "topology",
        "00:10.0",
        "00:11.0",
        "--sysfs",
        sysfs,
        "--no-ioas",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["verdict"]["route"]["kind"], "root_complex", "{v}");
    assert_eq!(v["verdict"]["bar"]["index"], 2, "the largest BAR: {v}");
    assert_eq!(v["path"]["common"], serde_json::Value::Null);
    let out = run(&["topology", "00:10.0", "00:1f.0", "--sysfs", sysfs]);
    assert_eq!(problem(&out, &["0000:00:1f.0", "not found"]), None);
    let _ = std::fs::remove_dir_all(&root);
}
