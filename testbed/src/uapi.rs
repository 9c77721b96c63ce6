//! The Linux uAPI headers that `src/sys/bindings.rs` is generated from, and the
//! regeneration and freshness check behind `cargo xtask bindings [--check]`.
//!
//! The headers come from Debian's `linux-libc-dev` [`LIBC_DEV_VERSION`], fetched
//! with the private apt root of [`crate::debian`] (the machine's apt
//! configuration is never touched) and unpacked into the test bed's cache, so
//! only the first call needs the network.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::debian::{self, PrivateApt};
use crate::{Error, Result, cache_dir, workspace_root};

/// The Debian package holding the uAPI headers.
pub const LIBC_DEV_PACKAGE: &str = "linux-libc-dev";

/// The exact package version the committed bindings are generated from
/// (Linux 7.2.13).
pub const LIBC_DEV_VERSION: &str = "7.2.13-1";

/// Debian's multiarch directory holding the x86-64 `asm/` headers.
pub const MULTIARCH: &str = "x86_64-linux-gnu";

/// Environment variable `build.rs` reads the include directory from.
pub const INCLUDE_ENV: &str = "DMABUF_P2P_UAPI_INCLUDE";

/// Environment variable naming the headers' package in the generated file's
/// header comment.
pub const SOURCE_ENV: &str = "DMABUF_P2P_UAPI_SOURCE";

/// The committed bindings, relative to the workspace root.
pub const BINDINGS_PATH: &str = "src/sys/bindings.rs";

/// Headers whose presence marks a complete, usable include directory.
const REQUIRED: [&str; 9] = [
    "linux/dma-buf.h",
    "linux/udmabuf.h",
    "linux/dma-heap.h",
    "linux/vfio.h",
    "linux/iommufd.h",
    "linux/version.h",
    "asm/ioctl.h",
    "drm/drm.h",
    "drm/virtgpu_drm.h",
];

/// Returns an include directory holding the Linux 7.2.13 uAPI headers of
/// Debian's `linux-libc-dev` 7.2.13-1, ready for `clang -I`.
///
/// It is the package's `usr/include` with an extra symlink `asm ->
/// x86_64-linux-gnu/asm`, since Debian keeps the architecture's `asm/`
/// headers in the multiarch directory. The package is downloaded and unpacked
/// once, under [`cache_dir`]; later calls only check the cache.
pub fn headers_dir() -> Result<PathBuf> {
    let base = cache_dir()?.join("uapi");
    let root = base.join(format!("{LIBC_DEV_PACKAGE}_{LIBC_DEV_VERSION}"));
    let include = root.join("usr/include");
    if is_complete(&include) {
        return Ok(include);
    }

    let debs = base.join(format!("debs-{LIBC_DEV_VERSION}"));
    let deb =
        PrivateApt::new()?.download(&format!("{LIBC_DEV_PACKAGE}={LIBC_DEV_VERSION}"), &debs)?;
    let file_name = deb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !file_name.starts_with(&format!("{LIBC_DEV_PACKAGE}_{LIBC_DEV_VERSION}_")) {
        return Err(Error::Setup(format!(
            "expected {LIBC_DEV_PACKAGE} {LIBC_DEV_VERSION}, got {}",
            deb.display()
        )));
    }

    // Unpack next to the final place and rename, so an interrupted run never
    // leaves a half-filled directory that looks complete.
    let staging = base.join(format!(".staging-{}", std::process::id()));
    remove_dir_if_present(&staging)?;
    debian::extract_deb(&deb, &staging)?;
    link_multiarch_asm(&staging.join("usr/include"))?;
    remove_dir_if_present(&root)?;
    fs::rename(&staging, &root).map_err(|e| {
        Error::io(
            format!("renaming {} to {}", staging.display(), root.display()),
            e,
        )
    })?;

    if is_complete(&include) {
        Ok(include)
    } else {
        Err(Error::Setup(format!(
            "{LIBC_DEV_PACKAGE} {LIBC_DEV_VERSION} unpacked into {} lacks one of {REQUIRED:?}",
            root.display()
        )))
    }
}

fn is_complete(include: &Path) -> bool {
    REQUIRED.iter().all(|h| include.join(h).is_file())
}

/// Makes `<include>/asm` point at the multiarch `asm/` directory, unless the
/// package already ships a plain `asm/`.
fn link_multiarch_asm(include: &Path) -> Result<()> {
    let asm = include.join("asm");
    if asm.exists() {
        return Ok(());
    }
    let target = Path::new(MULTIARCH).join("asm");
    if !include.join(&target).is_dir() {
        return Err(Error::Setup(format!(
            "{} has neither asm/ nor {}/asm",
            include.display(),
            MULTIARCH
        )));
    }
    std::os::unix::fs::symlink(&target, &asm).map_err(|e| {
        Error::io(
            format!("linking {} -> {}", asm.display(), target.display()),
            e,
        )
    })
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", dir.display()), e)),
    }
}

/// Regenerates the bindings from [`headers_dir`] and either writes them over
/// `src/sys/bindings.rs` (`check == false`) or fails if the committed file
/// differs from what the headers give (`check == true`).
///
/// Underneath it runs `cargo check -p dmabuf-p2p --lib --features bindgen`
/// with `DMABUF_P2P_UAPI_INCLUDE` set, which makes `build.rs` run bindgen
/// (libclang needed: `apt-get install libclang-dev`), and takes the result
/// from that build script's `OUT_DIR`.
pub fn run_bindings(check: bool) -> Result<()> {
    let include = headers_dir()?;
    let root = workspace_root();
    let generated = generate(&root, &include)?;
    let committed_path = root.join(BINDINGS_PATH);
    let committed = match fs::read_to_string(&committed_path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(Error::io(
                format!("reading {}", committed_path.display()),
                e,
            ));
        }
    };
    let fresh = fs::read_to_string(&generated)
        .map_err(|e| Error::io(format!("reading {}", generated.display()), e))?;

    if committed.as_deref() == Some(fresh.as_str()) {
        eprintln!("{BINDINGS_PATH} is up to date ({LIBC_DEV_PACKAGE} {LIBC_DEV_VERSION})");
        return Ok(());
    }
    if check {
        return Err(Error::Setup(format!(
            "{BINDINGS_PATH} differs from what bindgen makes of {LIBC_DEV_PACKAGE} {LIBC_DEV_VERSION}; \
             regenerate it with `cargo xtask bindings`{}",
            short_diff(&committed_path, &generated)
        )));
    }
    fs::write(&committed_path, fresh)
        .map_err(|e| Error::io(format!("writing {}", committed_path.display()), e))?;
    eprintln!("wrote {BINDINGS_PATH} from {LIBC_DEV_PACKAGE} {LIBC_DEV_VERSION}");
    Ok(())
}

/// Runs the `bindgen` build of the library and returns the generated file.
fn generate(root: &Path, include: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "check",
            "--quiet",
            "--package",
            "dmabuf-p2p",
            "--lib",
            "--features",
            "bindgen",
        ])
        .args(["--message-format", "json"])
        .env(INCLUDE_ENV, include)
        .env(
            SOURCE_ENV,
            format!("Debian {LIBC_DEV_PACKAGE} {LIBC_DEV_VERSION}"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let out = cmd
        .output()
        .map_err(|e| Error::io("starting cargo check --features bindgen", e))?;
    if !out.status.success() {
        return Err(Error::Command {
            what: format!(
                "cargo check --features bindgen ({INCLUDE_ENV}={})",
                include.display()
            ),
            status: out.status.to_string(),
            tail: String::new(),
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let out_dir = build_script_out_dir(&stdout, "dmabuf-p2p").ok_or_else(|| {
        Error::Setup(
            "cargo reported no build-script run for dmabuf-p2p; cannot find OUT_DIR".into(),
        )
    })?;
    let file = out_dir.join("bindings.rs");
    if file.is_file() {
        Ok(file)
    } else {
        Err(Error::Setup(format!(
            "the bindgen build left no {}",
            file.display()
        )))
    }
}

/// Finds the `OUT_DIR` of `package`'s build script in cargo's JSON messages.
fn build_script_out_dir(json_lines: &str, package: &str) -> Option<PathBuf> {
    json_lines
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg.get("reason").and_then(|r| r.as_str()) == Some("build-script-executed"))
        .filter(|msg| {
            msg.get("package_id")
                .and_then(|p| p.as_str())
                .is_some_and(|id| package_id_names(id, package))
        })
        .filter_map(|msg| {
            msg.get("out_dir")
                .and_then(|d| d.as_str())
                .map(PathBuf::from)
        })
        .next_back()
}

/// Whether a cargo package ID names `package`. Handles both the old form
/// (`name 0.1.0 (path+file:///…)`) and the spec form (`path+file:///…#name@0.1.0`,
/// or `…/name#0.1.0` when the name matches the directory).
fn package_id_names(id: &str, package: &str) -> bool {
    if id.split(' ').next() == Some(package) && id.contains(' ') {
        return true;
    }
    if let Some((url, frag)) = id.rsplit_once('#') {
        if let Some((name, _version)) = frag.split_once('@') {
            return name == package;
        }
        return url.rsplit('/').next() == Some(package);
    }
    false
}

/// The first lines of `diff -u committed generated`, for the error message.
fn short_diff(committed: &Path, generated: &Path) -> String {
    let out = Command::new("diff")
        .arg("-u")
        .arg(committed)
        .arg(generated)
        .output();
    match out {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let lines: Vec<&str> = text.lines().take(40).collect();
            if lines.is_empty() {
                String::new()
            } else {
                format!(":\n{}", lines.join("\n"))
            }
        }
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_ids_of_both_forms() {
        assert!(package_id_names(
            "dmabuf-p2p 0.1.0 (path+file:///work/main)",
            "dmabuf-p2p"
        ));
        assert!(package_id_names(
            "path+file:///work/main#dmabuf-p2p@0.1.0",
            "dmabuf-p2p"
        ));
        assert!(package_id_names(
            "path+file:///work/dmabuf-p2p#0.1.0",
            "dmabuf-p2p"
        ));
        assert!(!package_id_names(
            "path+file:///work/main/testbed#dmabuf-p2p-testbed@0.1.0",
            "dmabuf-p2p"
        ));
        assert!(!package_id_names(
            "registry+https://x#bindgen@0.72.1",
            "dmabuf-p2p"
        ));
    }

    #[test]
    fn out_dir_of_the_named_package() {
        let json = concat!(
            r#"{"reason":"build-script-executed","package_id":"registry+https://x#libc@0.2.1","out_dir":"/t/libc"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","package_id":"path+file:///w#dmabuf-p2p@0.1.0"}"#,
            "\n",
            r#"{"reason":"build-script-executed","package_id":"path+file:///w#dmabuf-p2p@0.1.0","out_dir":"/t/ours"}"#,
            "\n",
        );
        assert_eq!(
            build_script_out_dir(json, "dmabuf-p2p"),
            Some(PathBuf::from("/t/ours"))
        );
        assert_eq!(build_script_out_dir(json, "other"), None);
    }

    #[test]
    fn multiarch_asm_link() {
        let dir = std::env::temp_dir().join(format!("uapi-asm-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join(MULTIARCH).join("asm")).unwrap();
        fs::write(dir.join(MULTIARCH).join("asm/ioctl.h"), "/* x */\n").unwrap();
        link_multiarch_asm(&dir).unwrap();
        assert!(dir.join("asm/ioctl.h").is_file());
        // A second call leaves the existing link alone.
        link_multiarch_asm(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
