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

use std::fs::{self, File, OpenOptions, TryLockError};
use std::hash::Hasher;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fnv::FnvHasher;

mod config;
mod make_log;
mod source;

use config::{BUILD_CHOICES, verify_config};
pub use config::{Fit, prebuilt_fit, required_fragment, xtask_fits};
use make_log::{Log, fmt_duration};
use source::{ensure_build_deps, source_tree, unpacked_tree};

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
pub const FRAGMENT: &str = include_str!("../../kernel/fragment.config");

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

/// [`resolve_for`], running `alongside` (e.g. fetching QEMU) in a thread at
/// the lowest CPU priority while a kernel is built, so that it takes only
/// what the build leaves idle (network waits, the serial steps). An error
/// it has already met when `make` starts stops the build there; otherwise
/// it is waited for once the kernel is built. When nothing is built,
/// `alongside` runs before this returns.
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
    // own lists).
    let alongside = std::thread::spawn(move || {
        lowest_cpu_priority();
        alongside()
    });

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
    let alongside = if alongside.is_finished() {
        join_alongside(alongside)?;
        None
    } else {
        Some(alongside)
    };

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
    if let Some(alongside) = alongside {
        join_alongside(alongside)?;
    }

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

/// Makes the calling thread, and the programs it starts, yield the CPU to
/// everything else (nice 19; on Linux a thread's nice value is its own).
fn lowest_cpu_priority() {
    // SAFETY: nice(2) takes an integer and touches no memory of ours; a
    // failure (-1 with errno) only leaves the priority as it was.
    unsafe {
        libc::nice(19);
    }
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
    use super::config::parse_fragment;
    use super::*;

    pub(super) fn image_with(magic: &[u8]) -> Vec<u8> {
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
}
