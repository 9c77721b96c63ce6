//! The fragment against a `.config`: parsing both, checking a build, and
//! whether a prebuilt kernel fits.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::{FRAGMENT, SOURCE_PACKAGE, check_bzimage};
use crate::{Error, Result};

// ---------------------------------------------------------------------------
// Fragment vs .config

/// One fragment option whose value did not make it into `.config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mismatch {
    option: String,
    wanted: String,
    /// The value in `.config` (`n` for "is not set"), or `None` if absent.
    got: Option<String>,
}

/// Parses a Kconfig fragment: `CONFIG_X=value` and `# CONFIG_X is not set`
/// lines (the latter as `n`); other comments and blank lines are skipped.
pub(super) fn parse_fragment(text: &str) -> Result<Vec<(String, String)>, String> {
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
pub(super) fn parse_config(text: &str) -> HashMap<String, String> {
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
pub(super) fn check_config(
    fragment: &[(String, String)],
    config: &HashMap<String, String>,
) -> Vec<Mismatch> {
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
pub(super) fn verify_config(
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
pub(super) const BUILD_CHOICES: &str = "# ----- build choices -----";

/// The part of [`FRAGMENT`] that every kernel the tests boot must have: all
/// of it up to the `# ----- build choices -----` line.
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

/// Checks the config next to a prebuilt bzImage (`kernel.config` or `config`)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::tests::image_with;

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
}
