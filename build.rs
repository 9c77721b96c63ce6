//! Build script: regenerates the Linux uAPI bindings, but only with the
//! `bindgen` feature. The default build uses the committed
//! `src/sys/bindings.rs` and needs neither bindgen nor libclang.
//!
//! With `--features bindgen` it runs bindgen (libclang) over the dma-buf,
//! udmabuf, dma-heap, VFIO, iommufd and DRM (PRIME, virtio-gpu) uAPI headers found in
//! `$DMABUF_P2P_UAPI_INCLUDE` and writes `$OUT_DIR/bindings.rs`. The
//! `tests/bindings_fresh.rs` test compares that file with the committed one;
//! `cargo xtask bindings` copies it over the committed one.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "bindgen")]
    generate::run();
}

#[cfg(feature = "bindgen")]
mod generate {
    use std::env;
    use std::fs;
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};

    /// Directory holding the uAPI headers (`linux/vfio.h`, `asm/ioctl.h`, ...).
    const INCLUDE_ENV: &str = "DMABUF_P2P_UAPI_INCLUDE";
    /// Optional: the package the headers came from, for the header comment.
    const SOURCE_ENV: &str = "DMABUF_P2P_UAPI_SOURCE";
    /// The package the committed bindings are made from; used when
    /// `SOURCE_ENV` is unset and the headers say they are this kernel.
    const DEFAULT_SOURCE: &str = "Debian linux-libc-dev 7.2.13-1";
    const DEFAULT_KERNEL: (u32, u32, u32) = (7, 2, 13);
    /// Debian keeps `asm/` in the multiarch directory.
    const MULTIARCH: &str = "x86_64-linux-gnu";

    /// The headers wrapped, in this order.
    const HEADERS: [&str; 9] = [
        "linux/dma-buf.h",
        "linux/udmabuf.h",
        "linux/dma-heap.h",
        "linux/vfio.h",
        "linux/iommufd.h",
        "linux/magic.h",
        "linux/pci_regs.h",
        "drm/drm.h",
        "drm/virtgpu_drm.h",
    ];

    /// Items (types, constants) kept; everything they use comes along.
    const ALLOW: [&str; 22] = [
        "dma_buf.*",
        "DMA_BUF.*",
        "udmabuf.*",
        "UDMABUF.*",
        "dma_heap.*",
        "DMA_HEAP.*",
        "vfio.*",
        "VFIO.*",
        "iommu.*",
        "IOMMU.*",
        "PCI_COMMAND.*",
        "PCI_STATUS",
        "PCI_VENDOR_ID",
        "PCI_DEVICE_ID",
        "PCI_BASE_ADDRESS_[0-5]",
        // DRM PRIME import (feature `drm`): the driver's name, a dma-buf fd
        // to a GEM handle and back, closing it; virtio-gpu's parameters.
        "drm_version",
        "drm_prime_handle",
        "drm_gem_close",
        "DRM_(IOCTL_BASE|COMMAND_BASE)",
        "DRM_IOCTL_(VERSION|GEM_CLOSE|PRIME_FD_TO_HANDLE|VIRTGPU_GETPARAM)",
        "drm_virtgpu_getparam",
        "VIRTGPU_PARAM_.*",
    ];

    pub fn run() {
        println!("cargo:rerun-if-env-changed={INCLUDE_ENV}");
        println!("cargo:rerun-if-env-changed={SOURCE_ENV}");
        let include = match env::var_os(INCLUDE_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => fail(&format!(
                "the `bindgen` feature needs {INCLUDE_ENV}=<dir> naming an include directory with \
                 the Linux uAPI headers (linux/vfio.h, asm/ioctl.h, ...). `cargo xtask bindings` \
                 fetches Debian's linux-libc-dev 7.2.13-1 and sets it; see docs/BINDINGS.md"
            )),
        };
        for h in HEADERS {
            if !include.join(h).is_file() {
                fail(&format!(
                    "{INCLUDE_ENV}={}: no {h} there",
                    include.display()
                ));
            }
        }
        let kernel = kernel_version(&include);
        let source = match env::var(SOURCE_ENV) {
            Ok(s) if !s.is_empty() => s,
            _ if kernel == Some(DEFAULT_KERNEL) => DEFAULT_SOURCE.to_owned(),
            _ => "unknown package".to_owned(),
        };
        let kernel_text = match kernel {
            Some((a, b, c)) => format!("Linux {a}.{b}.{c}"),
            None => "unknown Linux version".to_owned(),
        };
        if kernel != Some(DEFAULT_KERNEL) {
            println!(
                "cargo:warning=uAPI headers in {} are {kernel_text}, not the 7.2.13 the committed \
                 bindings come from",
                include.display()
            );
        }

        let out_dir =
            PathBuf::from(env::var_os("OUT_DIR").unwrap_or_else(|| fail("OUT_DIR is unset")));
        let raw = bindgen_text(&include, &source, &kernel_text, &out_dir);
        let formatted = rustfmt(&raw, &out_dir);
        let out = out_dir.join("bindings.rs");
        if let Err(e) = fs::write(&out, formatted) {
            fail(&format!("writing {}: {e}", out.display()));
        }
    }

    fn bindgen_text(include: &Path, source: &str, kernel: &str, out_dir: &Path) -> String {
        let wrapper: String = HEADERS
            .iter()
            .map(|h| format!("#include <{h}>\n"))
            .collect();
        let wrapper_path = out_dir.join("dmabuf_p2p_uapi.h");
        // Rewritten only when it changes: bindgen registers it with
        // rerun-if-changed, and a fresh mtime would rerun this script every build.
        if fs::read_to_string(&wrapper_path).ok().as_deref() != Some(wrapper.as_str())
            && let Err(e) = fs::write(&wrapper_path, &wrapper)
        {
            fail(&format!("writing {}: {e}", wrapper_path.display()));
        }
        let mut builder = bindgen::Builder::default()
            .header(wrapper_path.to_string_lossy())
            // Only the given headers: nothing from the build machine's own
            // /usr/include may leak in.
            .clang_arg("-nostdinc")
            .clang_arg(format!("-I{}", include.display()));
        let multiarch = include.join(MULTIARCH);
        if !include.join("asm").is_dir() && multiarch.join("asm").is_dir() {
            builder = builder.clang_arg(format!("-I{}", multiarch.display()));
        }
        for item in ALLOW {
            builder = builder.allowlist_item(item);
        }
        let target = match bindgen::RustTarget::stable(80, 0) {
            Ok(t) => t,
            Err(e) => fail(&format!("bindgen rejects Rust 1.80 as target: {e}")),
        };
        let header = [
            "// Linux uAPI bindings for dmabuf-p2p. GENERATED: do not edit by hand.".to_owned(),
            "//".to_owned(),
            format!("// Source:     the {kernel} uAPI headers of {source}"),
            format!("// Headers:    {}", HEADERS.join(", ")),
            "// Generator:  build.rs with `--features bindgen` (bindgen, libclang, rustfmt)"
                .to_owned(),
            "// Regenerate: cargo xtask bindings    Check: cargo xtask bindings --check".to_owned(),
            "//             (see docs/BINDINGS.md)".to_owned(),
        ];
        for line in header {
            builder = builder.raw_line(line);
        }
        let bindings = builder
            .rust_target(target)
            .rust_edition(bindgen::RustEdition::Edition2021)
            .derive_default(true)
            .derive_debug(true)
            .derive_copy(true)
            .derive_partialeq(true)
            .derive_eq(true)
            .derive_hash(false)
            .impl_debug(false)
            .layout_tests(true)
            .generate_comments(false)
            .prepend_enum_name(false)
            .default_enum_style(bindgen::EnumVariation::Consts)
            .formatter(bindgen::Formatter::None)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
            .clang_macro_fallback()
            .clang_macro_fallback_build_dir(out_dir)
            .generate()
            .unwrap_or_else(|e| fail(&format!("bindgen failed: {e}")));
        let mut buf = Vec::new();
        if let Err(e) = bindings.write(Box::new(&mut buf)) {
            fail(&format!("writing bindings: {e}"));
        }
        String::from_utf8(buf)
            .unwrap_or_else(|e| fail(&format!("bindgen output is not UTF-8: {e}")))
    }

    /// Formats with rustfmt's default style (an empty config file, so no
    /// `rustfmt.toml` of the project or the machine changes the result).
    fn rustfmt(text: &str, out_dir: &Path) -> String {
        let config = out_dir.join("rustfmt-defaults.toml");
        if let Err(e) = fs::write(&config, "") {
            fail(&format!("writing {}: {e}", config.display()));
        }
        let rustfmt = env::var_os("RUSTFMT").unwrap_or_else(|| "rustfmt".into());
        let mut child = Command::new(&rustfmt)
            .args(["--edition", "2021", "--emit", "stdout", "--config-path"])
            .arg(&config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                fail(&format!(
                    "starting {}: {e} (install it: rustup component add rustfmt)",
                    rustfmt.to_string_lossy()
                ))
            });
        let Some(mut stdin) = child.stdin.take() else {
            fail("rustfmt has no stdin")
        };
        let input = text.to_owned();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| fail(&format!("running rustfmt: {e}")));
        match writer.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => fail(&format!("feeding rustfmt: {e}")),
            Err(_) => fail("feeding rustfmt: writer thread panicked"),
        }
        if !out.status.success() {
            fail(&format!(
                "rustfmt failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8(out.stdout)
            .unwrap_or_else(|e| fail(&format!("rustfmt output is not UTF-8: {e}")))
    }

    /// `LINUX_VERSION_{MAJOR,PATCHLEVEL,SUBLEVEL}` from `linux/version.h`.
    fn kernel_version(include: &Path) -> Option<(u32, u32, u32)> {
        let path = include.join("linux/version.h");
        println!("cargo:rerun-if-changed={}", path.display());
        let text = fs::read_to_string(path).ok()?;
        let field = |name: &str| {
            text.lines().find_map(|l| {
                let rest = l.strip_prefix("#define ")?.strip_prefix(name)?;
                rest.trim().parse::<u32>().ok()
            })
        };
        Some((
            field("LINUX_VERSION_MAJOR")?,
            field("LINUX_VERSION_PATCHLEVEL")?,
            field("LINUX_VERSION_SUBLEVEL")?,
        ))
    }

    fn fail(msg: &str) -> ! {
        eprintln!("error: dmabuf-p2p build.rs (feature `bindgen`): {msg}");
        std::process::exit(1);
    }
}
