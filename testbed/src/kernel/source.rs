//! The kernel source: its build dependencies, and the Debian source package
//! fetched and unpacked into the cache.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{BUILD_DEPS, SOURCE_PACKAGE, mkdir};
use crate::debian::PrivateApt;
use crate::{Error, Result};

// ---------------------------------------------------------------------------
// Build dependencies

pub(super) fn ensure_build_deps() -> Result<()> {
    let mut missing = Vec::new();
    for &pkg in BUILD_DEPS {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output();
        match out {
            Err(e) => {
                eprintln!(
                    "kernel: cannot check build dependencies ({e}); assuming {} are installed",
                    BUILD_DEPS.join(" ")
                );
                return Ok(());
            }
            Ok(o) => {
                let status = String::from_utf8_lossy(&o.stdout);
                if !(o.status.success() && status.split_whitespace().last() == Some("installed")) {
                    missing.push(pkg);
                }
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("kernel: the build needs {}", missing.join(" "));
    crate::deps::install_packages(&missing)
}

// ---------------------------------------------------------------------------
// Source tree

/// `<cache>/kernel/src/linux-source-7.2_<version>`.
pub(super) fn unpacked_tree(kdir: &Path, version: &str) -> PathBuf {
    kdir.join("src").join(format!("{SOURCE_PACKAGE}_{version}"))
}

/// Downloads and unpacks the source package once; returns the source tree
/// (`<cache>/kernel/src/linux-source-7.2_<version>`).
pub(super) fn source_tree(kdir: &Path, version: &str) -> Result<PathBuf> {
    let srcroot = kdir.join("src");
    let tree = unpacked_tree(kdir, version);
    if tree.join("Makefile").is_file() && tree.join("scripts/kconfig/merge_config.sh").is_file() {
        eprintln!("kernel: reusing the source tree {}", tree.display());
        return Ok(tree);
    }
    let debs = srcroot.join("debs");
    let deb = PrivateApt::new()?.download(&format!("{SOURCE_PACKAGE}={version}"), &debs)?;
    eprintln!("kernel: unpacking {}", deb.display());

    let tmp = srcroot.join(format!(".unpack-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)
            .map_err(|e| Error::io(format!("removing {}", tmp.display()), e))?;
    }
    let untar = tmp.join("tree");
    mkdir(&untar)?;
    unpack_source(&deb, &untar)?;
    let top = untar.join(SOURCE_PACKAGE);
    if !top.join("Makefile").is_file() {
        return Err(Error::Setup(format!(
            "{} did not unpack to {SOURCE_PACKAGE}/ with a Makefile (see {})",
            deb.display(),
            untar.display()
        )));
    }
    if tree.exists() {
        // A partial tree from an interrupted older layout: replace it.
        fs::remove_dir_all(&tree)
            .map_err(|e| Error::io(format!("removing {}", tree.display()), e))?;
    }
    fs::rename(&top, &tree)
        .map_err(|e| Error::io(format!("moving {} to {}", top.display(), tree.display()), e))?;
    fs::remove_dir_all(&tmp).map_err(|e| Error::io(format!("removing {}", tmp.display()), e))?;
    Ok(tree)
}

/// Unpacks the source tree from the `.deb` into `dest` in one stream:
/// `dpkg-deb --fsys-tarfile` | `tar -xO` (the inner `linux-source-7.2.tar.xz`)
/// | `xz -d -T0` | `tar -x`. Nothing is written but the tree; Debian's
/// tarball is multi-block, so xz decompresses on every core.
fn unpack_source(deb: &Path, dest: &Path) -> Result<()> {
    let mut fsys = Command::new("dpkg-deb");
    fsys.arg("--fsys-tarfile").arg(deb);
    let mut inner = Command::new("tar");
    inner
        .args(["-xO", "--wildcards"])
        .arg(format!("*usr/src/{SOURCE_PACKAGE}.tar.xz"));
    let mut xz = Command::new("xz");
    xz.args(["-d", "-c", "-T0"]);
    let mut untar = Command::new("tar");
    untar.arg("-x").arg("-C").arg(dest);
    run_pipeline(
        &mut [
            ("dpkg-deb --fsys-tarfile", &mut fsys),
            ("tar -xO (the source tarball)", &mut inner),
            ("xz -d", &mut xz),
            ("tar -x (the source tree)", &mut untar),
        ],
        &format!("unpacking {}", deb.display()),
    )
}

/// Runs commands as a shell pipeline (each one's stdout into the next one's
/// stdin; stderr inherited) and fails naming the first stage that failed.
fn run_pipeline(stages: &mut [(&str, &mut Command)], what: &str) -> Result<()> {
    let mut children: Vec<(&str, std::process::Child)> = Vec::new();
    let mut previous: Option<std::process::ChildStdout> = None;
    let last = stages.len().saturating_sub(1);
    for (i, (name, cmd)) in stages.iter_mut().enumerate() {
        if let Some(out) = previous.take() {
            cmd.stdin(Stdio::from(out));
        }
        if i < last {
            cmd.stdout(Stdio::piped());
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                for (_, mut c) in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(Error::io(format!("{what}: starting {name}"), e));
            }
        };
        previous = child.stdout.take();
        children.push((*name, child));
    }
    let mut failed = None;
    for (name, mut child) in children {
        let status = child
            .wait()
            .map_err(|e| Error::io(format!("{what}: waiting for {name}"), e))?;
        if !status.success() && failed.is_none() {
            failed = Some(Error::Command {
                what: format!("{what}: {name}"),
                status: status.to_string(),
                tail: String::new(),
            });
        }
    }
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::SOURCE_VERSION;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn a_pipeline_streams_and_names_the_stage_that_failed() {
        let dir = std::env::temp_dir().join(format!("kernel-pipe-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("out");
        run_pipeline(
            &mut [
                ("printf", &mut sh("printf 'abc\\n'")),
                ("tr", &mut sh("tr a b")),
                ("cat", &mut sh(&format!("cat > {}", out.display()))),
            ],
            "test",
        )
        .unwrap();
        assert_eq!(fs::read_to_string(&out).unwrap(), "bbc\n");
        match run_pipeline(
            &mut [
                ("first", &mut sh("printf x")),
                ("second", &mut sh("cat >/dev/null; exit 3")),
                ("third", &mut sh("cat >/dev/null")),
            ],
            "test",
        ) {
            Err(Error::Command { what, status, .. }) => {
                assert_eq!(what, "test: second");
                assert!(status.contains('3'), "{status}");
            }
            other => panic!("unexpected {other:?}"),
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A `.deb` laid out as Debian's linux-source package is (the source
    /// tarball at usr/src/), made with dpkg-deb, unpacks to the tree.
    #[test]
    fn the_source_tree_unpacks_from_a_deb_in_one_stream() {
        let dir = std::env::temp_dir().join(format!("kernel-unpack-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let top = dir.join(format!("staging/{SOURCE_PACKAGE}"));
        fs::create_dir_all(top.join("scripts/kconfig")).unwrap();
        fs::write(top.join("Makefile"), "VERSION = 7\n").unwrap();
        fs::write(top.join("scripts/kconfig/merge_config.sh"), "#!/bin/sh\n").unwrap();
        let pkg = dir.join("pkg");
        fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
        fs::create_dir_all(pkg.join("usr/src")).unwrap();
        fs::write(
            pkg.join("DEBIAN/control"),
            format!(
                "Package: {SOURCE_PACKAGE}\nVersion: {SOURCE_VERSION}\nArchitecture: all\n\
                 Maintainer: test <t@example.org>\nDescription: test\n"
            ),
        )
        .unwrap();
        let tarball = pkg.join(format!("usr/src/{SOURCE_PACKAGE}.tar.xz"));
        let ok = Command::new("tar")
            .arg("-cJf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir.join("staging"))
            .arg(SOURCE_PACKAGE)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let deb = dir.join("test.deb");
        let build_deb = || {
            let ok = Command::new("dpkg-deb")
                .args(["--root-owner-group", "--build"])
                .arg(&pkg)
                .arg(&deb)
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success();
            assert!(ok);
        };
        build_deb();
        let dest = dir.join("tree");
        fs::create_dir_all(&dest).unwrap();
        unpack_source(&deb, &dest).unwrap();
        assert_eq!(
            fs::read_to_string(dest.join(format!("{SOURCE_PACKAGE}/Makefile"))).unwrap(),
            "VERSION = 7\n"
        );
        // A .deb without the tarball fails in the stage that looks for it.
        fs::remove_file(&tarball).unwrap();
        build_deb();
        let e = unpack_source(&deb, &dir.join("tree")).unwrap_err();
        assert!(e.to_string().contains("tar -xO"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
