//! The guest kernel: taken from `DMABUF_P2P_KERNEL`, from the cache, or built.
//!
//! The kernel is Debian's `linux-source-7.2` (version [`SOURCE_VERSION`])
//! configured by `make allnoconfig` with the fragment
//! `testbed/kernel/fragment.config` (embedded here as [`FRAGMENT`]) as
//! `KCONFIG_ALLCONFIG`: only what the fragment names, and what that selects,
//! is built. There are two [`Flavor`]s: the base kernel (the fragment
//! without its DRM block), which every VM without a GPU boots, the demo's
//! included, and the DRM kernel (the whole fragment) for VMs with a
//! virtio-gpu, built on the base kernel's objects. Each lives in
//! `<cache>/kernel/<key>/bzImage`, where the key ([`cache_key`]) changes
//! whenever the source version or the flavor's fragment changes, so a changed
//! fragment means a new build. The base kernel takes about 5 minutes on 2
//! idle cores (docs/KERNEL.md); the DRM kernel on top of it about a minute.
//! Point [`KERNEL_ENV`] at a prebuilt bzImage to skip both ([`prebuilt_fit`]
//! says whether one has every option the fragment names).

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions, TryLockError};
use std::hash::Hasher;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fnv::FnvHasher;

use crate::debian::{PrivateApt, newest_in_series};
use crate::kernel_patch::Patch;
use crate::{Error, Result, cache_dir};

/// Environment variable naming a prebuilt bzImage; when set, nothing is built.
pub const KERNEL_ENV: &str = "DMABUF_P2P_KERNEL";

/// The Debian package holding the kernel source.
pub const SOURCE_PACKAGE: &str = "linux-source-7.2";

/// The exact version of [`SOURCE_PACKAGE`] that is built.
pub const SOURCE_VERSION: &str = "7.2.13-1";

/// The Kconfig fragment: everything the test kernel has beyond `allnoconfig`
/// (the contents of `testbed/kernel/fragment.config`).
pub const FRAGMENT: &str = include_str!("../kernel/fragment.config");

/// The line of [`FRAGMENT`] that opens its DRM block: options only a VM with
/// a GPU needs, left out of the [`Flavor::Base`] kernel. The block ends at
/// the [`BUILD_CHOICES`] line.
const DRM_BLOCK: &str = "# ----- DRM: only the kernel of a VM with a GPU -----";

/// Which kernel a VM boots: the one its devices need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// [`FRAGMENT`] without its DRM block: every VM without a GPU boots it,
    /// the demo's included, so a first demo builds only this one.
    Base,
    /// All of [`FRAGMENT`]: the base kernel plus DRM and virtio-gpu, built
    /// on the base kernel's objects (only what the DRM block changes is
    /// compiled again).
    Drm,
}

impl Flavor {
    /// The flavor a VM needs: [`Flavor::Drm`] if it has a GPU.
    pub fn for_vm(has_gpu: bool) -> Self {
        if has_gpu { Self::Drm } else { Self::Base }
    }

    /// The fragment `make allnoconfig` is given for this flavor.
    pub fn fragment(self) -> &'static str {
        static BASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        match self {
            Self::Drm => FRAGMENT,
            Self::Base => BASE.get_or_init(|| without_drm_block(FRAGMENT)),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Drm => "DRM",
        }
    }
}

/// `fragment` without the lines from the [`DRM_BLOCK`] line up to (not
/// including) the [`BUILD_CHOICES`] line.
fn without_drm_block(fragment: &str) -> String {
    let mut out = String::with_capacity(fragment.len());
    let mut in_block = false;
    for line in fragment.split_inclusive('\n') {
        match line.trim() {
            DRM_BLOCK => in_block = true,
            BUILD_CHOICES => in_block = false,
            _ => {}
        }
        if !in_block {
            out.push_str(line);
        }
    }
    out
}

/// Debian packages the build needs (bookworm names).
pub const BUILD_DEPS: &[&str] = &[
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "cpio",
    "make",
    "gcc",
    "xz-utils",
];

/// Bumped whenever the build recipe changes in a way that changes the result, so
/// that old cache entries are not reused.
const RECIPE_VERSION: &str = "2";

/// Offset of the x86 boot protocol magic `HdrS` in a bzImage.
const BOOT_MAGIC_OFFSET: usize = 0x202;
const BOOT_MAGIC: &[u8; 4] = b"HdrS";

/// How often `make bzImage` progress is printed: every this many objects...
const PROGRESS_EVERY_OBJECTS: u64 = 500;
/// ...or after this much time without a progress line.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// How many lines of a failed command's output are shown in the error.
const TAIL_LINES: usize = 40;

/// Returns the base kernel's bzImage ([`resolve_for`] with [`Flavor::Base`]).
pub fn resolve() -> Result<PathBuf> {
    resolve_for(Flavor::Base)
}

/// Returns the bzImage to boot for `flavor`.
///
/// If [`KERNEL_ENV`] is set, its path is checked (an existing, non-empty regular
/// file with the x86 boot header) and returned for every flavor; nothing is
/// built, and a bad path is an [`Error::KernelPath`]. Otherwise the cached
/// kernel is returned, building it first if it is not in the cache.
pub fn resolve_for(flavor: Flavor) -> Result<PathBuf> {
    resolve_alongside(flavor, || Ok(()))
}

/// [`resolve_for`], running `alongside` (e.g. fetching QEMU) in a thread
/// while a kernel build fetches and configures its source; a build waits
/// for it before the long `make`, so that its error comes before that. When
/// nothing is built, `alongside` runs before this returns.
pub fn resolve_alongside(
    flavor: Flavor,
    alongside: impl FnOnce() -> Result<()> + Send + 'static,
) -> Result<PathBuf> {
    if let Some(value) = std::env::var_os(KERNEL_ENV) {
        let image = from_env(PathBuf::from(value))?;
        alongside()?;
        return Ok(image);
    }
    match cached_for(flavor) {
        Some(image) => {
            alongside()?;
            Ok(image)
        }
        None => build_flavor(false, flavor, alongside),
    }
}

/// Checks the path given in [`KERNEL_ENV`] and returns it made absolute.
fn from_env(path: PathBuf) -> Result<PathBuf> {
    if path.as_os_str().is_empty() {
        return Err(Error::KernelPath {
            path,
            reason: format!(
                "is set but empty; unset {KERNEL_ENV} to use the cached or built kernel"
            ),
        });
    }
    if let Err(reason) = check_bzimage(&path) {
        return Err(Error::KernelPath { path, reason });
    }
    // Said once per process: the kernel is resolved more than once per run.
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Ok(fit @ Fit::Lacks { .. }) = prebuilt_fit(&path) {
        WARNED.call_once(|| {
            eprintln!(
                "kernel: WARNING: {KERNEL_ENV}: {}; the tests that need them will fail",
                fit.describe(&path)
            );
        });
    }
    std::path::absolute(&path).map_err(|e| Error::KernelPath {
        path: path.clone(),
        reason: format!("cannot be made absolute: {e}"),
    })
}

/// The cached base kernel ([`cached_for`] with [`Flavor::Base`]).
pub fn cached() -> Option<PathBuf> {
    cached_for(Flavor::Base)
}

/// The cached bzImage of `flavor` for the current source version and
/// fragment, if it has been built (and still looks like a bzImage).
pub fn cached_for(flavor: Flavor) -> Option<PathBuf> {
    let kdir = kernel_cache().ok()?;
    let mut versions = vec![SOURCE_VERSION.to_owned()];
    versions.extend(recorded_fallback(&kdir));
    versions.into_iter().find_map(|v| {
        let image = kdir
            .join(key_for(SOURCE_PACKAGE, &v, flavor.fragment()))
            .join("bzImage");
        check_bzimage(&image).is_ok().then_some(image)
    })
}

/// The file naming the source version used instead of [`SOURCE_VERSION`]
/// once that version had left the archive.
fn fallback_file(kdir: &Path) -> PathBuf {
    kdir.join("fallback-source-version")
}

fn recorded_fallback(kdir: &Path) -> Option<String> {
    let v = fs::read_to_string(fallback_file(kdir)).ok()?;
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

/// The source version to build: [`SOURCE_VERSION`] if its tree or `.deb` is
/// already here or the archive still has it; else a fallback recorded earlier;
/// else the newest 7.2.x the archive offers, said loudly and recorded (the
/// fragment verification then checks that version has every option).
fn source_version(kdir: &Path) -> Result<String> {
    let srcroot = kdir.join("src");
    let have = |v: &str| {
        srcroot
            .join(format!("{SOURCE_PACKAGE}_{v}/Makefile"))
            .is_file()
    };
    let pinned_deb = srcroot
        .join("debs")
        .join(format!("{SOURCE_PACKAGE}_{SOURCE_VERSION}_all.deb"));
    if have(SOURCE_VERSION) || pinned_deb.is_file() {
        return Ok(SOURCE_VERSION.to_owned());
    }
    if let Some(v) = recorded_fallback(kdir)
        && have(&v)
    {
        eprintln!(
            "kernel: note: building {SOURCE_PACKAGE} {v}, not the pinned {SOURCE_VERSION} (no longer in the archive; recorded in {})",
            fallback_file(kdir).display()
        );
        return Ok(v);
    }
    let versions = PrivateApt::new()?.versions(SOURCE_PACKAGE)?;
    if versions.iter().any(|v| v == SOURCE_VERSION) {
        return Ok(SOURCE_VERSION.to_owned());
    }
    let Some(newest) = newest_in_series(&versions, "7.2") else {
        return Err(Error::Setup(format!(
            "{SOURCE_PACKAGE} {SOURCE_VERSION} is not in the archive ({}), and no other 7.2.x is offered (found: {})",
            crate::debian::NEWER_SUITE,
            if versions.is_empty() {
                "none".to_owned()
            } else {
                versions.join(", ")
            }
        )));
    };
    eprintln!(
        "kernel: WARNING: {SOURCE_PACKAGE} {SOURCE_VERSION} is no longer in the archive; \
         falling back to the newest available, {newest} (the fragment check verifies it has every option)"
    );
    write_file(&fallback_file(kdir), format!("{newest}\n").as_bytes())?;
    Ok(newest.clone())
}

/// The unpacked source tree of the kernel, fetched and unpacked first if it
/// is not in the cache yet (for the kernel's selftests, which build from it).
pub fn source_dir() -> Result<PathBuf> {
    let kdir = kernel_cache()?;
    check_path_usable(&kdir)?;
    let version = source_version(&kdir)?;
    let tree = unpacked_tree(&kdir, &version);
    if tree.join("Makefile").is_file() && tree.join("scripts/kconfig/merge_config.sh").is_file() {
        // Read-only use: no need to wait for a kernel build that holds the lock.
        return Ok(tree);
    }
    let _lock = BuildLock::acquire(&kdir.join(".lock"))?;
    source_tree(&kdir, &version)
}

/// The base kernel's cache key: the source version plus a hash of the
/// package name, version, build recipe and [`Flavor::Base`]'s fragment, e.g.
/// `7.2.13-1-0123456789abcdef`.
pub fn cache_key() -> String {
    key_for(SOURCE_PACKAGE, SOURCE_VERSION, Flavor::Base.fragment())
}

/// The directory holding the base kernel for the current [`cache_key`]:
/// `<cache>/kernel/<key>` (with `bzImage`, `config`, `fragment.config`,
/// `build.log` and the object tree `build/`).
pub fn key_dir() -> Result<PathBuf> {
    Ok(kernel_cache()?.join(cache_key()))
}

/// `cargo xtask kernel [--force] [--drm]`: makes sure the kernel of `flavor`
/// exists (building it if needed, or always with `force`) and prints the
/// bzImage path on stdout. Progress goes to stderr.
pub fn xtask(force: bool, flavor: Flavor, patch: Option<&Path>) -> Result<PathBuf> {
    if let Some(patch) = patch {
        let image = build_patched(force, &Patch::load(patch)?)?;
        eprintln!(
            "kernel: patched kernel (not the CI kernel); boot it with {KERNEL_ENV}={}",
            image.display()
        );
        println!("{}", image.display());
        return Ok(image);
    }
    let image = if force {
        if std::env::var_os(KERNEL_ENV).is_some() {
            eprintln!(
                "kernel: note: {KERNEL_ENV} is set, so test runs boot that kernel, not the one built now"
            );
        }
        build_flavor(true, flavor, || Ok(()))?
    } else {
        resolve_for(flavor)?
    };
    println!("{}", image.display());
    Ok(image)
}

/// Builds the base kernel into the cache and returns the installed bzImage.
///
/// Without `force`, an already cached kernel is returned as is. With `force`, the
/// object tree is discarded and everything is rebuilt from a fresh configuration.
/// Missing build dependencies are installed with apt-get (as root; never
/// removing a package, see [`crate::deps::install_packages`]). The source
/// package is fetched through a private apt sources list ([`PrivateApt`]), so the
/// machine's apt configuration is never touched.
pub fn build(force: bool) -> Result<PathBuf> {
    build_flavor(force, Flavor::Base, || Ok(()))
}

/// [`build`] for `flavor`. The DRM kernel needs the base kernel first: it is
/// built in the base kernel's object tree, configured with the whole
/// fragment, so only what the DRM block changes is compiled.
fn build_flavor(
    force: bool,
    flavor: Flavor,
    alongside: impl FnOnce() -> Result<()> + Send + 'static,
) -> Result<PathBuf> {
    let kdir = kernel_cache()?;
    check_path_usable(&kdir)?;
    let _lock = BuildLock::acquire(&kdir.join(".lock"))?;
    let base = match cached_for(Flavor::Base) {
        Some(image) if !force => {
            alongside()?;
            image
        }
        _ => build_locked(&kdir, force, None, Flavor::Base, alongside)?,
    };
    match flavor {
        Flavor::Base => Ok(base),
        // With `force` the base tree was just rebuilt: the DRM kernel is
        // built on it, not from scratch again.
        Flavor::Drm => match cached_for(Flavor::Drm) {
            Some(image) if !force => Ok(image),
            _ => build_locked(&kdir, false, None, Flavor::Drm, || Ok(())),
        },
    }
}

/// A patched base kernel under its own cache key ([`crate::kernel_patch`]).
fn build_patched(force: bool, patch: &Patch) -> Result<PathBuf> {
    let kdir = kernel_cache()?;
    check_path_usable(&kdir)?;
    let _lock = BuildLock::acquire(&kdir.join(".lock"))?;
    build_locked(&kdir, force, Some(patch), Flavor::Base, || Ok(()))
}

/// Builds `flavor` (patched with `patch`) under `kdir`, whose build lock the
/// caller holds.
fn build_locked(
    kdir: &Path,
    force: bool,
    patch: Option<&Patch>,
    flavor: Flavor,
    alongside: impl FnOnce() -> Result<()> + Send + 'static,
) -> Result<PathBuf> {
    let fragment = flavor.fragment();
    let started = Instant::now();
    let phase = |n: u32, what: &str| {
        eprintln!(
            "kernel: [{n}/7] {what} ({} elapsed)",
            fmt_duration(started.elapsed())
        );
    };
    eprintln!("kernel: building the {} kernel", flavor.name());

    phase(1, "checking build dependencies");
    ensure_build_deps()?;
    // After the build dependencies (which may run apt-get on the machine's
    // own lists), before the download and unpacking that leave cores idle.
    let alongside = std::thread::spawn(alongside);

    let version = source_version(kdir)?;
    phase(2, &format!("fetching {SOURCE_PACKAGE} {version}"));
    let src = source_tree(kdir, &version)?;
    let keydir = match patch {
        None => kdir.join(key_for(SOURCE_PACKAGE, &version, fragment)),
        Some(p) => kdir.join(format!(
            "{}-patched",
            key_for(
                SOURCE_PACKAGE,
                &version,
                &format!("{fragment}\0{}", p.text())
            )
        )),
    };
    let image = keydir.join("bzImage");
    if !force && patch.is_some() && check_bzimage(&image).is_ok() {
        eprintln!("kernel: cached: {}", image.display());
        join_alongside(alongside)?;
        return Ok(image);
    }
    let src = match patch {
        None => src,
        Some(p) => p.source_tree(&src, &keydir)?,
    };

    // The DRM kernel is built in the base kernel's object tree, configured
    // with the whole fragment: make then compiles again only the objects the
    // changed options reach (kbuild records the options each object depends
    // on). A copy of the tree would not do: tools/objtool records absolute
    // paths, so a copy rebuilds objtool, and with it every object.
    let out = match (flavor, patch) {
        (Flavor::Drm, None) => kdir
            .join(key_for(SOURCE_PACKAGE, &version, Flavor::Base.fragment()))
            .join("build"),
        _ => keydir.join("build"),
    };
    let on_base = flavor == Flavor::Drm && out.join(".config").is_file();
    if force && out.exists() {
        eprintln!("kernel: --force: removing {}", out.display());
        fs::remove_dir_all(&out)
            .map_err(|e| Error::io(format!("removing {}", out.display()), e))?;
    }
    if on_base {
        eprintln!(
            "kernel: building on the base kernel's objects ({})",
            out.display()
        );
    }
    mkdir(&keydir)?;
    mkdir(&out)?;
    let fragment_path = keydir.join("fragment.config");
    write_file(&fragment_path, fragment.as_bytes())?;
    let log_path = keydir.join("build.log");
    let mut log = Log::create(&log_path)?;
    eprintln!("kernel: full build log: {}", log_path.display());

    phase(3, "configuring (allnoconfig + fragment)");
    let out_arg = format!("O={}", out.display());
    // One step: allnoconfig answers every question the fragment does not
    // with "no" (KCONFIG_ALLCONFIG is the list of answers it must give).
    log.run(
        make(&src)
            .arg(&out_arg)
            .arg("allnoconfig")
            .env("KCONFIG_ALLCONFIG", &fragment_path),
        "make allnoconfig (KCONFIG_ALLCONFIG=fragment.config)",
        false,
    )?;

    phase(4, "verifying the fragment's options in .config");
    let config_path = out.join(".config");
    let config = fs::read_to_string(&config_path)
        .map_err(|e| Error::io(format!("reading {}", config_path.display()), e))?;
    verify_config(&src, &version, fragment, &config_path, &config)?;
    join_alongside(alongside)?;

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get() + 1);
    let long = if on_base && !force {
        "what the DRM block adds: about a minute"
    } else {
        "the long part: about 5 minutes on 2 idle cores"
    };
    phase(5, &format!("make -j{jobs} bzImage ({long})"));
    let mut make_bzimage = make(&src);
    make_bzimage
        .arg(&out_arg)
        .arg(format!("-j{jobs}"))
        .arg("bzImage");
    if let Some(p) = patch {
        make_bzimage.arg(format!("LOCALVERSION={}", p.localversion()));
    }
    log.run(&mut make_bzimage, "make bzImage", true)?;

    phase(6, "installing");
    let built = out.join("arch/x86/boot/bzImage");
    check_bzimage(&built).map_err(|reason| {
        Error::Setup(format!(
            "make bzImage succeeded but {} {reason}",
            built.display()
        ))
    })?;
    install(&config_path, &keydir.join("config"))?;
    install(&built, &image)?;

    phase(
        7,
        &format!(
            "done in {}: {}",
            fmt_duration(started.elapsed()),
            image.display()
        ),
    );
    Ok(image)
}

/// Waits for the work [`resolve_alongside`] ran beside the build.
fn join_alongside(handle: std::thread::JoinHandle<Result<()>>) -> Result<()> {
    handle.join().unwrap_or_else(|_| {
        Err(Error::Setup(
            "the set-up run beside the kernel build panicked".into(),
        ))
    })
}

/// `<cache>/kernel`, absolute (make's `O=` needs an absolute path).
fn kernel_cache() -> Result<PathBuf> {
    let dir = cache_dir()?.join("kernel");
    mkdir(&dir)?;
    std::path::absolute(&dir).map_err(|e| Error::io(format!("resolving {}", dir.display()), e))
}

/// Kbuild cannot handle whitespace or colons in the source or object path.
fn check_path_usable(dir: &Path) -> Result<()> {
    let text = dir.to_string_lossy();
    if text.chars().any(|c| c.is_whitespace() || c == ':') {
        return Err(Error::Setup(format!(
            "the kernel cannot be built under {}: kbuild does not support spaces or colons in paths; \
             set DMABUF_P2P_CACHE to a plain path",
            dir.display()
        )));
    }
    Ok(())
}

/// A `make -C <src>` command with a clean kbuild environment.
fn make(src: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C").arg(src).arg("ARCH=x86");
    for var in [
        "MAKEFLAGS",
        "MFLAGS",
        "MAKELEVEL",
        "KBUILD_OUTPUT",
        "KCONFIG_CONFIG",
        "KCONFIG_ALLCONFIG",
        "CROSS_COMPILE",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

// ---------------------------------------------------------------------------
// bzImage check

/// Checks that `path` is a non-empty regular file with the x86 boot header
/// (`HdrS` at offset 0x202). The error says what is wrong, as a phrase that
/// follows the path ("does not exist", "is a directory", ...).
pub fn check_bzimage(path: &Path) -> Result<(), String> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err("does not exist".into()),
        Err(e) => return Err(format!("cannot be inspected: {e}")),
    };
    if meta.is_dir() {
        return Err("is a directory, not a bzImage file".into());
    }
    if !meta.is_file() {
        return Err("is not a regular file".into());
    }
    if meta.len() == 0 {
        return Err("is an empty file".into());
    }
    let mut head = Vec::with_capacity(BOOT_MAGIC_OFFSET + BOOT_MAGIC.len());
    let read = File::open(path).and_then(|f| {
        f.take((BOOT_MAGIC_OFFSET + BOOT_MAGIC.len()) as u64)
            .read_to_end(&mut head)
    });
    if let Err(e) = read {
        return Err(format!("cannot be read: {e}"));
    }
    bzimage_header_problem(&head)
}

/// Checks the start of a file for the x86 boot header.
fn bzimage_header_problem(head: &[u8]) -> Result<(), String> {
    let end = BOOT_MAGIC_OFFSET + BOOT_MAGIC.len();
    match head.get(BOOT_MAGIC_OFFSET..end) {
        None => Err(format!(
            "is too short ({} bytes) to be a bzImage: it has no x86 boot header",
            head.len()
        )),
        Some(magic) if magic == BOOT_MAGIC => Ok(()),
        Some(_) => Err(format!(
            "is not a bzImage: no x86 boot header (\"HdrS\" at offset {BOOT_MAGIC_OFFSET:#x})"
        )),
    }
}

// ---------------------------------------------------------------------------
// Cache key

fn key_for(package: &str, version: &str, fragment: &str) -> String {
    // FNV-1a 64: stable across Rust versions (unlike `DefaultHasher`).
    let mut hash = FnvHasher::default();
    for part in [package, version, RECIPE_VERSION, fragment] {
        hash.write(part.as_bytes());
        hash.write(&[0]);
    }
    let version: String = version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{version}-{:016x}", hash.finish())
}

// ---------------------------------------------------------------------------
// Fragment vs .config

/// One fragment option whose value did not make it into `.config`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mismatch {
    option: String,
    wanted: String,
    /// The value in `.config` (`n` for "is not set"), or `None` if absent.
    got: Option<String>,
}

/// Parses a Kconfig fragment: `CONFIG_X=value` and `# CONFIG_X is not set`
/// lines (the latter as `n`); other comments and blank lines are skipped.
fn parse_fragment(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut options = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(name) = not_set(line) {
            options.push((name.to_owned(), "n".to_owned()));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((name, value)) if is_option_name(name) => {
                options.push((name.to_owned(), value.trim().to_owned()));
            }
            _ => {
                return Err(format!(
                    "line {}: `{line}` is not a CONFIG_X=value or `# CONFIG_X is not set` line",
                    n + 1
                ));
            }
        }
    }
    Ok(options)
}

/// Parses a `.config` into option → value, with "is not set" as `n`.
fn parse_config(text: &str) -> HashMap<String, String> {
    let mut map = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = not_set(line) {
            map.insert(name.to_owned(), "n".to_owned());
        } else if let Some((name, value)) = line.split_once('=')
            && is_option_name(name)
        {
            map.insert(name.to_owned(), value.to_owned());
        }
    }
    map
}

/// `# CONFIG_X is not set` → `CONFIG_X`.
fn not_set(line: &str) -> Option<&str> {
    let name = line
        .strip_prefix('#')?
        .trim_start()
        .strip_suffix(" is not set")?
        .trim_end();
    is_option_name(name).then_some(name)
}

fn is_option_name(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// Every fragment option whose value is not in the config. `=n` also holds
/// when the option is absent (its dependencies are off, so it is off too).
fn check_config(fragment: &[(String, String)], config: &HashMap<String, String>) -> Vec<Mismatch> {
    fragment
        .iter()
        .filter_map(|(option, wanted)| {
            let got = config.get(option);
            let holds = match got {
                Some(v) => v == wanted,
                None => wanted == "n",
            };
            (!holds).then(|| Mismatch {
                option: option.clone(),
                wanted: wanted.clone(),
                got: got.cloned(),
            })
        })
        .collect()
}

/// Fails, naming every option, if the fragment does not hold in `config`.
fn verify_config(
    src: &Path,
    version: &str,
    fragment: &str,
    config_path: &Path,
    config: &str,
) -> Result<()> {
    let fragment = parse_fragment(fragment)
        .map_err(|e| Error::Setup(format!("testbed/kernel/fragment.config {e}")))?;
    let mismatches = check_config(&fragment, &parse_config(config));
    if mismatches.is_empty() {
        eprintln!("kernel: all {} fragment options hold", fragment.len());
        return Ok(());
    }
    let lines: Vec<String> = mismatches
        .iter()
        .map(|m| match &m.got {
            Some(got) => format!("  {}: fragment wants {}, .config has {got}", m.option, m.wanted),
            None if kconfig_defines(src, &m.option) => format!(
                "  {}: fragment wants {}, but it is absent from .config (its dependencies are not met)",
                m.option, m.wanted
            ),
            None => format!(
                "  {}: fragment wants {}, but no Kconfig in {SOURCE_PACKAGE} {version} defines it",
                m.option, m.wanted
            ),
        })
        .collect();
    Err(Error::Setup(format!(
        "{} does not satisfy testbed/kernel/fragment.config:\n{}",
        config_path.display(),
        lines.join("\n")
    )))
}

/// Whether any `Kconfig*` file under `src` has `config NAME` / `menuconfig NAME`.
fn kconfig_defines(src: &Path, option: &str) -> bool {
    let Some(name) = option.strip_prefix("CONFIG_") else {
        return false;
    };
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if entry.file_name().to_string_lossy().starts_with("Kconfig") {
                let Ok(text) = fs::read_to_string(&path) else {
                    continue;
                };
                let defines = text.lines().any(|l| {
                    let mut words = l.split_whitespace();
                    matches!(words.next(), Some("config" | "menuconfig"))
                        && words.next() == Some(name)
                });
                if defines {
                    return true;
                }
            }
        }
    }
    false
}

// ---------------------------------------------------------------------------
// Prebuilt kernels

/// The line of [`FRAGMENT`] after which come build choices (EXPERT, -Os):
/// how this kernel is built, not what a test needs, so a prebuilt kernel need
/// not have them.
const BUILD_CHOICES: &str = "# ----- build choices -----";

/// The part of [`FRAGMENT`] that every kernel the tests boot must have: all
/// of it up to the [`BUILD_CHOICES`] line.
pub fn required_fragment() -> &'static str {
    let mut end = 0;
    for line in FRAGMENT.split_inclusive('\n') {
        if line.trim() == BUILD_CHOICES {
            return &FRAGMENT[..end];
        }
        end += line.len();
    }
    FRAGMENT
}

/// The names a prebuilt kernel's `.config` may have next to its bzImage:
/// `kernel.config` (as in `../shared/vm/`) or `config` (as in this cache).
const CONFIG_NAMES: &[&str] = &["kernel.config", "config"];

/// Whether a prebuilt kernel has every option of [`FRAGMENT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fit {
    /// Its config holds every fragment option.
    Fits {
        /// The config that was checked.
        config: PathBuf,
    },
    /// Its config does not hold these fragment options.
    Lacks {
        /// The config that was checked.
        config: PathBuf,
        /// Each unmet option as `CONFIG_X=y (has n)` or `CONFIG_X=y (absent)`.
        unmet: Vec<String>,
    },
    /// No config lies next to it, so it cannot be checked.
    NoConfig,
}

impl Fit {
    /// Whether the kernel has every fragment option.
    pub fn fits(&self) -> bool {
        matches!(self, Self::Fits { .. })
    }

    /// One line saying what was found, for the kernel at `image`.
    pub fn describe(&self, image: &Path) -> String {
        let image = image.display();
        match self {
            Self::Fits { config } => format!(
                "{image}: {} holds every option the tests need (testbed/kernel/fragment.config)",
                config.display()
            ),
            Self::Lacks { config, unmet } => format!(
                "{image}: {} lacks {} option(s) the tests need (testbed/kernel/fragment.config): {}",
                config.display(),
                unmet.len(),
                unmet.join(", ")
            ),
            Self::NoConfig => format!(
                "{image}: no {} next to it to check against testbed/kernel/fragment.config",
                CONFIG_NAMES.join(" or ")
            ),
        }
    }
}

/// Checks the config next to a prebuilt bzImage (see [`CONFIG_NAMES`])
/// against the [`required_fragment`]: the test bed may boot it in place of a
/// kernel built from the fragment only if every option holds.
pub fn prebuilt_fit(image: &Path) -> Result<Fit> {
    let fragment = parse_fragment(required_fragment())
        .map_err(|e| Error::Setup(format!("testbed/kernel/fragment.config {e}")))?;
    let dir = image.parent().unwrap_or(Path::new("."));
    let Some(config) = CONFIG_NAMES
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
    else {
        return Ok(Fit::NoConfig);
    };
    let text = fs::read_to_string(&config)
        .map_err(|e| Error::io(format!("reading {}", config.display()), e))?;
    Ok(fit_of(&fragment, config, &text))
}

fn fit_of(fragment: &[(String, String)], config: PathBuf, text: &str) -> Fit {
    let unmet: Vec<String> = check_config(fragment, &parse_config(text))
        .into_iter()
        .map(|m| match m.got {
            Some(got) => format!("{}={} (has {got})", m.option, m.wanted),
            None => format!("{}={} (absent)", m.option, m.wanted),
        })
        .collect();
    if unmet.is_empty() {
        Fit::Fits { config }
    } else {
        Fit::Lacks { config, unmet }
    }
}

/// `cargo xtask kernel-fits BZIMAGE`: says in one line on stdout whether the
/// prebuilt kernel has every fragment option; `Ok(true)` if it has.
pub fn xtask_fits(image: &Path) -> Result<bool> {
    if let Err(reason) = check_bzimage(image) {
        return Err(Error::Setup(format!("{}: {reason}", image.display())));
    }
    let fit = prebuilt_fit(image)?;
    println!("{}", fit.describe(image));
    Ok(fit.fits())
}

// ---------------------------------------------------------------------------
// Build dependencies

fn ensure_build_deps() -> Result<()> {
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
fn unpacked_tree(kdir: &Path, version: &str) -> PathBuf {
    kdir.join("src").join(format!("{SOURCE_PACKAGE}_{version}"))
}

/// Downloads and unpacks the source package once; returns the source tree
/// (`<cache>/kernel/src/linux-source-7.2_<version>`).
fn source_tree(kdir: &Path, version: &str) -> Result<PathBuf> {
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

// ---------------------------------------------------------------------------
// Running make with a log and progress

/// The build log: every command's output goes here in full.
struct Log {
    path: PathBuf,
    file: File,
}

impl Log {
    fn create(path: &Path) -> Result<Self> {
        let file =
            File::create(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn write_line(&mut self, line: &str) -> Result<()> {
        writeln!(self.file, "{line}")
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
    }

    /// Runs `cmd`, logging its stdout and stderr; with `progress`, prints a
    /// compact progress line now and then. On failure, the error carries the
    /// last lines of output and the log's path.
    fn run(&mut self, cmd: &mut Command, what: &str, progress: bool) -> Result<()> {
        self.write_line(&format!("==> {what}: {cmd:?}"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting {what}"), e))?;
        let (tx, rx) = mpsc::channel::<String>();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(spawn_reader(out, tx.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(spawn_reader(err, tx.clone()));
        }
        drop(tx);

        let mut tail = VecDeque::with_capacity(TAIL_LINES);
        let mut meter = Progress::new(Instant::now());
        let mut log_error = None;
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    if log_error.is_none() {
                        log_error = self.write_line(&line).err();
                    }
                    if progress && let Some(msg) = meter.line(&line, Instant::now()) {
                        eprintln!("kernel:   {what}: {msg}");
                    }
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if progress && let Some(msg) = meter.tick(Instant::now()) {
                        eprintln!("kernel:   {what}: {msg}");
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        for reader in readers {
            // A reader thread cannot panic short of a bug; its loss only loses output.
            let _ = reader.join();
        }
        let status = child
            .wait()
            .map_err(|e| Error::io(format!("waiting for {what}"), e))?;
        if let Some(e) = log_error {
            return Err(e);
        }
        self.write_line(&format!("==> {what}: {status}"))?;
        if progress && status.success() {
            eprintln!("kernel:   {what}: {}", meter.summary(Instant::now()));
        }
        if status.success() {
            return Ok(());
        }
        let tail: Vec<String> = tail.into_iter().collect();
        Err(Error::Command {
            what: what.to_owned(),
            status: status.to_string(),
            tail: format!(
                ":\n{}\n(full log: {})",
                tail.join("\n"),
                self.path.display()
            ),
        })
    }
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    tx: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    if tx
                        .send(line.trim_end_matches(['\n', '\r']).to_owned())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    })
}

/// Counts the objects kbuild reports (`  CC      path`, `  LD ...`) and decides
/// when to print a progress line.
struct Progress {
    start: Instant,
    last_print: Instant,
    objects: u64,
    printed_at: u64,
    last_object: String,
}

impl Progress {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            last_print: now,
            objects: 0,
            printed_at: 0,
            last_object: String::new(),
        }
    }

    /// Feeds one output line; returns a progress message when one is due.
    fn line(&mut self, line: &str, now: Instant) -> Option<String> {
        if let Some(object) = object_line(line) {
            self.objects += 1;
            self.last_object = object.to_owned();
            if self.objects - self.printed_at >= PROGRESS_EVERY_OBJECTS {
                return Some(self.report(now));
            }
        }
        self.tick(now)
    }

    /// Returns a progress message if none was printed for [`PROGRESS_EVERY`].
    fn tick(&mut self, now: Instant) -> Option<String> {
        (now.duration_since(self.last_print) >= PROGRESS_EVERY).then(|| self.report(now))
    }

    fn report(&mut self, now: Instant) -> String {
        self.last_print = now;
        self.printed_at = self.objects;
        format!(
            "{} objects, {} elapsed (last: {})",
            self.objects,
            fmt_duration(now.duration_since(self.start)),
            self.last_object
        )
    }

    fn summary(&self, now: Instant) -> String {
        format!(
            "done: {} objects in {}",
            self.objects,
            fmt_duration(now.duration_since(self.start))
        )
    }
}

/// For a kbuild quiet-mode line that builds an object (`CC`, `AS`, `LD`, `AR`,
/// and their `HOST` variants), the object's path.
fn object_line(line: &str) -> Option<&str> {
    if !line.starts_with(' ') {
        return None;
    }
    let mut words = line.split_whitespace();
    let tag = words.next()?;
    let tag = tag.strip_prefix("HOST").unwrap_or(tag);
    if !matches!(tag, "CC" | "AS" | "LD" | "AR") {
        return None;
    }
    let next = words.next()?;
    // Module builds print `CC [M]  path`.
    if next == "[M]" {
        words.next()
    } else {
        Some(next)
    }
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

// ---------------------------------------------------------------------------
// Files and locking

fn mkdir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))
}

fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    fs::write(path, data).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Copies `from` to `to` atomically: a temporary name next to `to`, then rename.
fn install(from: &Path, to: &Path) -> Result<()> {
    let name = to
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let tmp = to.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let what = format!("installing {} as {}", from.display(), to.display());
    fs::copy(from, &tmp).map_err(|e| Error::io(what.clone(), e))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(what.clone(), e))?;
    fs::rename(&tmp, to).map_err(|e| Error::io(what, e))
}

/// An exclusive lock on `<cache>/kernel/.lock`, so two builds do not share an
/// object tree. Released when dropped (the file is closed).
struct BuildLock {
    _file: File,
}

impl BuildLock {
    fn acquire(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        let locking = |e| Error::io(format!("locking {}", path.display()), e);
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                eprintln!(
                    "kernel: another kernel build holds {}; waiting for it",
                    path.display()
                );
                file.lock().map_err(locking)?;
            }
            Err(TryLockError::Error(e)) => return Err(locking(e)),
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image_with(magic: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 0x300];
        v[0x202..0x206].copy_from_slice(magic);
        v
    }

    #[test]
    fn header_check_accepts_hdrs_at_0x202() {
        assert_eq!(bzimage_header_problem(&image_with(b"HdrS")), Ok(()));
    }

    #[test]
    fn header_check_rejects_wrong_magic_and_short_files() {
        let e = bzimage_header_problem(&image_with(b"\x7fELF")).unwrap_err();
        assert!(e.contains("not a bzImage") && e.contains("0x202"), "{e}");
        let e = bzimage_header_problem(&[0u8; 0x204]).unwrap_err();
        assert!(e.contains("too short (516 bytes)"), "{e}");
        assert!(bzimage_header_problem(&[]).is_err());
    }

    #[test]
    fn check_bzimage_names_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("kernel-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            check_bzimage(&dir.join("missing")).unwrap_err(),
            "does not exist"
        );
        assert!(check_bzimage(&dir).unwrap_err().contains("is a directory"));
        let empty = dir.join("empty");
        fs::write(&empty, b"").unwrap();
        assert_eq!(check_bzimage(&empty).unwrap_err(), "is an empty file");
        let text = dir.join("text");
        fs::write(&text, b"not a kernel").unwrap();
        assert!(check_bzimage(&text).unwrap_err().contains("too short"));
        let good = dir.join("bzImage");
        fs::write(&good, image_with(b"HdrS")).unwrap();
        assert_eq!(check_bzimage(&good), Ok(()));
        assert!(
            check_bzimage(Path::new("/dev/null"))
                .unwrap_err()
                .contains("not a regular file")
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn env_path_errors_are_typed_and_name_the_path() {
        match from_env(PathBuf::from("/nonexistent/bzImage")) {
            Err(Error::KernelPath { path, reason }) => {
                assert_eq!(path, Path::new("/nonexistent/bzImage"));
                assert_eq!(reason, "does not exist");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            from_env(PathBuf::new()),
            Err(Error::KernelPath { .. })
        ));
    }

    #[test]
    fn cache_key_depends_on_version_and_fragment() {
        let k = key_for("linux-source-7.2", "7.2.13-1", "CONFIG_A=y\n");
        assert!(
            k.starts_with("7.2.13-1-") && k.len() == "7.2.13-1-".len() + 16,
            "{k}"
        );
        assert_eq!(k, key_for("linux-source-7.2", "7.2.13-1", "CONFIG_A=y\n"));
        assert_ne!(k, key_for("linux-source-7.2", "7.2.13-1", "CONFIG_A=n\n"));
        assert_ne!(k, key_for("linux-source-7.2", "7.2.14-1", "CONFIG_A=y\n"));
        assert!(key_for("p", "1:2.0~rc/1", "").starts_with("1_2.0_rc_1-"));
        assert!(cache_key().starts_with("7.2.13-1-"));
    }

    #[test]
    fn the_base_kernel_is_the_fragment_without_its_drm_block() {
        let options = |text: &str| -> Vec<String> {
            parse_fragment(text)
                .unwrap()
                .into_iter()
                .map(|(o, _)| o)
                .collect()
        };
        let all = options(Flavor::Drm.fragment());
        let base = options(Flavor::Base.fragment());
        assert_eq!(Flavor::Drm.fragment(), FRAGMENT);
        let dropped: Vec<&String> = all.iter().filter(|o| !base.contains(o)).collect();
        assert_eq!(
            dropped,
            [
                "CONFIG_VIRTIO_MENU",
                "CONFIG_VIRTIO_PCI",
                "CONFIG_DRM",
                "CONFIG_DRM_VIRTIO_GPU",
                "CONFIG_DRM_VIRTIO_GPU_KMS"
            ]
        );
        // Everything else, the build choices too, is in both, in order.
        assert_eq!(base.len() + dropped.len(), all.len());
        assert!(base.contains(&"CONFIG_PROVE_LOCKING".to_owned()));
        assert!(base.contains(&"CONFIG_CC_OPTIMIZE_FOR_SIZE".to_owned()));
        assert!(Flavor::Base.fragment().contains(BUILD_CHOICES));
        assert!(!Flavor::Base.fragment().contains(DRM_BLOCK));
        // Two flavors, two cache entries.
        assert_ne!(
            key_for(SOURCE_PACKAGE, SOURCE_VERSION, Flavor::Base.fragment()),
            key_for(SOURCE_PACKAGE, SOURCE_VERSION, Flavor::Drm.fragment())
        );
        assert_eq!(Flavor::for_vm(true), Flavor::Drm);
        assert_eq!(Flavor::for_vm(false), Flavor::Base);
    }

    #[test]
    fn a_drm_block_ends_at_the_build_choices() {
        let text =
            format!("CONFIG_A=y\n{DRM_BLOCK}\n# why\nCONFIG_B=y\n{BUILD_CHOICES}\nCONFIG_C=y\n");
        assert_eq!(
            without_drm_block(&text),
            format!("CONFIG_A=y\n{BUILD_CHOICES}\nCONFIG_C=y\n")
        );
        assert_eq!(without_drm_block("CONFIG_A=y\n"), "CONFIG_A=y\n");
    }

    #[test]
    fn fragment_parser() {
        let text = "# comment\n\nCONFIG_A=y\nCONFIG_B=n\n# CONFIG_C is not set\nCONFIG_S=\"x y\"\n";
        let parsed = parse_fragment(text).unwrap();
        let want: Vec<(String, String)> = [
            ("CONFIG_A", "y"),
            ("CONFIG_B", "n"),
            ("CONFIG_C", "n"),
            ("CONFIG_S", "\"x y\""),
        ]
        .iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect();
        assert_eq!(parsed, want);
        assert!(
            parse_fragment("CONFIG_A y\n")
                .unwrap_err()
                .contains("line 1")
        );
        assert!(parse_fragment("FOO=y\n").is_err());
        assert!(parse_fragment(FRAGMENT).is_ok());
    }

    #[test]
    fn fragment_asks_for_the_debug_and_fault_injection_options() {
        // The sweeps (vm-tests fault_injection) and the lockdep-on-every-run
        // rule need these; a config missing one fails the fragment check.
        let fragment = parse_fragment(FRAGMENT).unwrap();
        for option in [
            "CONFIG_PROVE_LOCKING",
            "CONFIG_DEBUG_ATOMIC_SLEEP",
            "CONFIG_DEBUG_LIST",
            "CONFIG_FAULT_INJECTION",
            "CONFIG_FAILSLAB",
            "CONFIG_FAIL_PAGE_ALLOC",
            "CONFIG_FAULT_INJECTION_DEBUG_FS",
            "CONFIG_FUNCTION_ERROR_INJECTION",
            "CONFIG_FAIL_FUNCTION",
            "CONFIG_IOMMUFD_TEST",
            "CONFIG_TRANSPARENT_HUGEPAGE",
        ] {
            assert!(
                fragment.iter().any(|(o, v)| o == option && v == "y"),
                "fragment.config lacks {option}=y"
            );
        }
        let config = parse_config("CONFIG_FAILSLAB=y\n# CONFIG_PROVE_LOCKING is not set\n");
        let unmet = check_config(&fragment, &config);
        assert!(unmet.iter().any(|m| m.option == "CONFIG_PROVE_LOCKING"));
        assert!(!unmet.iter().any(|m| m.option == "CONFIG_FAILSLAB"));
    }

    /// A `.config` that has every fragment option, as Kconfig writes one.
    fn config_with_the_fragment() -> String {
        parse_fragment(FRAGMENT)
            .unwrap()
            .iter()
            .map(|(o, v)| {
                if v == "n" {
                    format!("# {o} is not set\n")
                } else {
                    format!("{o}={v}\n")
                }
            })
            .collect()
    }

    #[test]
    fn build_choices_are_not_required_of_a_prebuilt_kernel() {
        let required = parse_fragment(required_fragment()).unwrap();
        let all = parse_fragment(FRAGMENT).unwrap();
        assert_eq!(
            FRAGMENT
                .lines()
                .filter(|l| l.trim() == BUILD_CHOICES)
                .count(),
            1
        );
        let has = |set: &[(String, String)], o: &str| set.iter().any(|(n, _)| n == o);
        for choice in ["CONFIG_EXPERT", "CONFIG_CC_OPTIMIZE_FOR_SIZE"] {
            assert!(has(&all, choice) && !has(&required, choice), "{choice}");
        }
        assert!(has(&required, "CONFIG_PROVE_LOCKING") && has(&required, "CONFIG_IOMMUFD"));
        assert!(
            required.len() + 2 == all.len(),
            "{} {}",
            required.len(),
            all.len()
        );
        // A config with every required option and none of the choices fits.
        let without_choices: String = config_with_the_fragment()
            .lines()
            .filter(|l| !l.starts_with("CONFIG_EXPERT=") && !l.starts_with("CONFIG_CC_OPTIMIZE"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(fit_of(&required, PathBuf::from("config"), &without_choices).fits());
    }

    #[test]
    fn a_prebuilt_kernel_is_used_only_with_every_fragment_option() {
        let dir = std::env::temp_dir().join(format!("kernel-fit-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let image = dir.join("bzImage");
        fs::write(&image, image_with(b"HdrS")).unwrap();
        assert_eq!(prebuilt_fit(&image).unwrap(), Fit::NoConfig);
        assert!(!xtask_fits(&image).unwrap());

        // This cache's layout: `config` next to the image.
        let full = config_with_the_fragment();
        fs::write(dir.join("config"), &full).unwrap();
        let fit = prebuilt_fit(&image).unwrap();
        assert_eq!(
            fit,
            Fit::Fits {
                config: dir.join("config")
            }
        );
        assert!(xtask_fits(&image).unwrap());

        // ../shared/vm's layout, `kernel.config`, is read first: one option
        // absent, one off.
        let lacking = full.replace("CONFIG_PROVE_LOCKING=y\n", "").replace(
            "CONFIG_IOMMUFD_TEST=y\n",
            "# CONFIG_IOMMUFD_TEST is not set\n",
        );
        fs::write(dir.join("kernel.config"), lacking).unwrap();
        let fit = prebuilt_fit(&image).unwrap();
        assert_eq!(
            fit,
            Fit::Lacks {
                config: dir.join("kernel.config"),
                unmet: vec![
                    "CONFIG_PROVE_LOCKING=y (absent)".to_owned(),
                    "CONFIG_IOMMUFD_TEST=y (has n)".to_owned(),
                ],
            }
        );
        let line = fit.describe(&image);
        assert!(
            !line.contains('\n')
                && line.contains("kernel.config lacks 2 option(s)")
                && line.contains("CONFIG_PROVE_LOCKING=y (absent), CONFIG_IOMMUFD_TEST=y (has n)"),
            "{line}"
        );
        assert!(!xtask_fits(&image).unwrap());

        // Not a kernel at all: an error, not a verdict.
        assert!(xtask_fits(&dir.join("config")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn config_check_reports_each_unmet_option() {
        let config = parse_config(
            "#\n# Linux/x86 7.2.13 Kernel Configuration\n#\nCONFIG_A=y\n# CONFIG_B is not set\n\
             CONFIG_M=m\nCONFIG_S=\"x\"\n",
        );
        let fragment = parse_fragment(
            "CONFIG_A=y\nCONFIG_B=n\nCONFIG_GONE=n\nCONFIG_B2=y\nCONFIG_M=y\nCONFIG_S=\"x\"\nCONFIG_ABSENT=y\n",
        )
        .unwrap();
        let m = check_config(&fragment, &config);
        let names: Vec<&str> = m.iter().map(|m| m.option.as_str()).collect();
        assert_eq!(names, ["CONFIG_B2", "CONFIG_M", "CONFIG_ABSENT"]);
        assert_eq!(m[1].got.as_deref(), Some("m"));
        assert_eq!(m[2].got, None);
        assert!(
            check_config(&parse_fragment("CONFIG_B=y\n").unwrap(), &config)[0]
                .got
                .as_deref()
                == Some("n")
        );
    }

    #[test]
    fn logged_run_keeps_the_output_and_reports_the_tail() {
        let dir = std::env::temp_dir().join(format!("kernel-log-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log_path = dir.join("build.log");
        let mut log = Log::create(&log_path).unwrap();
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo '  CC      a.o'"]);
        log.run(&mut ok, "ok step", true).unwrap();
        let mut bad = Command::new("sh");
        bad.args(["-c", "echo out-line; echo err-line >&2; exit 3"]);
        match log.run(&mut bad, "bad step", false) {
            Err(Error::Command { what, tail, .. }) => {
                assert_eq!(what, "bad step");
                assert!(
                    tail.contains("out-line") && tail.contains("err-line"),
                    "{tail}"
                );
                assert!(tail.contains(&log_path.display().to_string()), "{tail}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = fs::read_to_string(&log_path).unwrap();
        assert!(
            text.contains("  CC      a.o")
                && text.contains("out-line")
                && text.contains("err-line")
        );
        fs::remove_dir_all(&dir).unwrap();
    }

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
        let ok = Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&pkg)
            .arg(&deb)
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let dest = dir.join("tree");
        fs::create_dir_all(&dest).unwrap();
        unpack_source(&deb, &dest).unwrap();
        assert_eq!(
            fs::read_to_string(dest.join(format!("{SOURCE_PACKAGE}/Makefile"))).unwrap(),
            "VERSION = 7\n"
        );
        // A .deb without the tarball fails in the stage that looks for it.
        fs::remove_file(&tarball).unwrap();
        let ok = Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&pkg)
            .arg(&deb)
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let e = unpack_source(&deb, &dir.join("tree")).unwrap_err();
        assert!(e.to_string().contains("tar -xO"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn object_lines_are_counted() {
        assert_eq!(object_line("  CC      init/main.o"), Some("init/main.o"));
        assert_eq!(
            object_line("  HOSTCC  scripts/basic/fixdep"),
            Some("scripts/basic/fixdep")
        );
        assert_eq!(object_line("  AR      lib/lib.a"), Some("lib/lib.a"));
        assert_eq!(object_line("  CC [M]  drivers/x.o"), Some("drivers/x.o"));
        assert_eq!(object_line("  GEN     Makefile"), None);
        assert_eq!(object_line("CC init/main.o"), None);
        assert_eq!(object_line("make[1]: Entering directory"), None);
    }

    #[test]
    fn progress_prints_every_500_objects_or_30s() {
        let t0 = Instant::now();
        let mut p = Progress::new(t0);
        for i in 1..PROGRESS_EVERY_OBJECTS {
            assert_eq!(p.line(&format!("  CC      f{i}.o"), t0), None);
        }
        let msg = p.line("  CC      last.o", t0).unwrap();
        assert!(
            msg.starts_with("500 objects") && msg.contains("last.o"),
            "{msg}"
        );
        assert_eq!(p.tick(t0 + Duration::from_secs(29)), None);
        assert!(
            p.tick(t0 + Duration::from_secs(31))
                .unwrap()
                .contains("31s elapsed")
        );
        assert_eq!(fmt_duration(Duration::from_secs(754)), "12m34s");
    }
}
