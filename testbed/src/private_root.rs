//! Programs from the machine's own Debian suite, unpacked into a private
//! directory of the test bed's cache instead of installed.
//!
//! Installing `qemu-system-x86` from the machine's suite can remove packages the
//! machine already has (on a bookworm machine with qemu-utils 10 from
//! backports, it removes qemu-utils). So the test bed asks apt which packages an
//! install *would* add (`apt-get install -s`, a simulation that changes
//! nothing), downloads exactly those `.deb` files into the cache
//! (`apt-get download`) and unpacks them with `dpkg-deb -x`. Nothing is
//! installed or removed, and no root is needed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::debian::extract_deb;
use crate::{Error, Result, cache_dir, run_captured};

/// One package apt would install: name and exact version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPackage {
    /// Package name (with `:arch` if apt printed one).
    pub name: String,
    /// The version apt chose.
    pub version: String,
}

/// What `apt-get install -s` says an install would do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallPlan {
    /// `Inst` lines: packages that would be installed or upgraded.
    pub install: Vec<PlannedPackage>,
    /// `Remv` lines: packages that would be removed.
    pub remove: Vec<String>,
}

impl InstallPlan {
    /// Parses the output of `apt-get install -s` (one action per line:
    /// `Inst NAME [OLD] (VERSION ...)`, `Remv NAME [VERSION]`, `Conf ...`).
    pub fn parse(simulation: &str) -> Self {
        let mut plan = Self::default();
        for line in simulation.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("Inst"), Some(name)) => {
                    // The new version is the first word of the parenthesis; an
                    // upgrade shows the old one in brackets before it.
                    let version = line
                        .split_once('(')
                        .and_then(|(_, rest)| rest.split_whitespace().next())
                        .unwrap_or_default();
                    plan.install.push(PlannedPackage {
                        name: name.to_owned(),
                        version: version.to_owned(),
                    });
                }
                (Some("Remv"), Some(name)) => plan.remove.push(name.to_owned()),
                _ => {}
            }
        }
        plan
    }
}

/// Runs `apt-get install -s --no-install-recommends PACKAGES` (a simulation:
/// nothing changes) and returns its plan. Refreshes the machine's package
/// lists once if apt does not know a package.
pub fn simulate_install(packages: &[&str]) -> Result<InstallPlan> {
    let simulate = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-s", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_captured(
            &mut cmd,
            &format!("apt-get install -s {}", packages.join(" ")),
        )
    };
    let out = match simulate() {
        Ok(out) => out,
        Err(first) => {
            eprintln!("testbed: {first}; refreshing the package lists (apt-get update) once");
            let mut update = Command::new("apt-get");
            update.args(["-q", "update"]).stdout(std::io::stderr());
            crate::run_checked(&mut update, "apt-get update")?;
            simulate()?
        }
    };
    Ok(InstallPlan::parse(&out))
}

/// A directory under the cache holding packages unpacked with `dpkg-deb -x`.
#[derive(Debug, Clone)]
pub struct PrivateRoot {
    /// `<cache>/<name>`.
    dir: PathBuf,
}

impl PrivateRoot {
    /// The unpacked tree (`usr/bin`, `usr/lib`, ...).
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Makes sure `packages` and the dependencies the machine lacks are
    /// unpacked in `<cache>/<name>/root`, downloading their `.deb` files into
    /// `<cache>/<name>/debs`. Done once: a `complete` marker lists what was
    /// unpacked, and later calls return at once.
    pub fn ensure(name: &str, packages: &[&str]) -> Result<Self> {
        let dir = cache_dir()?.join(name);
        let me = Self { dir };
        let marker = me.dir.join("complete");
        if marker.is_file() {
            return Ok(me);
        }
        // Several test runs may start at once on a fresh machine: one unpacks,
        // the others wait for it (the lock is released when the file closes).
        fs::create_dir_all(&me.dir)
            .map_err(|e| Error::io(format!("creating {}", me.dir.display()), e))?;
        let lock_path = me.dir.join("lock");
        let lock = fs::File::create(&lock_path)
            .map_err(|e| Error::io(format!("creating {}", lock_path.display()), e))?;
        lock.lock()
            .map_err(|e| Error::io(format!("locking {}", lock_path.display()), e))?;
        if marker.is_file() {
            return Ok(me);
        }
        let plan = simulate_install(packages)?;
        if plan.install.is_empty() {
            return Err(Error::Setup(format!(
                "apt-get install -s {} plans to install nothing: cannot unpack them privately",
                packages.join(" ")
            )));
        }
        let debs = me.dir.join("debs");
        fs::create_dir_all(&debs)
            .map_err(|e| Error::io(format!("creating {}", debs.display()), e))?;
        eprintln!(
            "testbed: unpacking {} privately into {} (nothing is installed or removed): {}",
            packages.join(" "),
            me.root().display(),
            plan.install
                .iter()
                .map(|p| format!("{}={}", p.name, p.version))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let root = me.root();
        if root.exists() {
            // A tree from an interrupted run: start again.
            fs::remove_dir_all(&root)
                .map_err(|e| Error::io(format!("removing {}", root.display()), e))?;
        }
        // The private tree's libraries load with the machine's dynamic
        // loader, which must match the machine's own libc.
        let (libc, wanted): (Vec<&PlannedPackage>, Vec<&PlannedPackage>) = plan
            .install
            .iter()
            .partition(|p| p.name.starts_with("libc6") || p.name.starts_with("libc-bin"));
        for p in libc {
            eprintln!(
                "testbed: not unpacking {} {} (the machine's libc stays in use)",
                p.name, p.version
            );
        }
        for deb in download_all(&wanted, &debs)? {
            extract_deb(&deb, &root)?;
        }
        let listing: String = plan
            .install
            .iter()
            .map(|p| format!("{} {}\n", p.name, p.version))
            .collect();
        fs::write(&marker, listing)
            .map_err(|e| Error::io(format!("writing {}", marker.display()), e))?;
        Ok(me)
    }
}

/// Downloads the planned packages into `dir` with one `apt-get download`
/// (one read of the package lists, not one per package), reusing the `.deb`
/// files already there, and returns their paths in plan order.
fn download_all(packages: &[&PlannedPackage], dir: &Path) -> Result<Vec<PathBuf>> {
    let missing: Vec<String> = packages
        .iter()
        .filter(|p| find_deb(p, dir).is_none())
        .map(|p| format!("{}={}", p.name, p.version))
        .collect();
    if !missing.is_empty() {
        let mut cmd = Command::new("apt-get");
        cmd.args(["download", "-q"]).args(&missing).current_dir(dir);
        run_captured(&mut cmd, &format!("apt-get download {}", missing.join(" ")))?;
    }
    packages
        .iter()
        .map(|p| {
            find_deb(p, dir).ok_or_else(|| {
                Error::Setup(format!(
                    "apt-get download {}={} left no {}*.deb in {}",
                    p.name,
                    p.version,
                    deb_prefix(p),
                    dir.display()
                ))
            })
        })
        .collect()
}

/// The start of the file name `apt-get download` gives a package's `.deb`.
fn deb_prefix(p: &PlannedPackage) -> String {
    let bare = p.name.split(':').next().unwrap_or(&p.name);
    format!("{bare}_{}_", p.version.replace(':', "%3a"))
}

/// The package's `.deb` in `dir`, if it has been downloaded.
fn find_deb(p: &PlannedPackage, dir: &Path) -> Option<PathBuf> {
    let prefix = deb_prefix(p);
    fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let f = e.file_name();
        let f = f.to_string_lossy();
        (f.starts_with(&prefix) && f.ends_with(".deb")).then(|| e.path())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_lists_installs_with_versions_and_removals() {
        let text = "Reading package lists...\n\
            The following packages will be REMOVED:\n  qemu-utils\n\
            Remv qemu-utils [1:10.0.2+ds-2+deb13u1~bpo12+1]\n\
            Inst libfdt1 (1.6.1-4+b1 Debian:12.14/oldstable [amd64])\n\
            Inst libc6 [2.36-9] (2.36-9+deb12u13 Debian:12.14/oldstable [amd64])\n\
            Inst qemu-system-x86 (1:7.2+dfsg-7+deb12u18+b2 Debian:12.14/oldstable [amd64])\n\
            Conf libfdt1 (1.6.1-4+b1 Debian:12.14/oldstable [amd64])\n";
        let plan = InstallPlan::parse(text);
        assert_eq!(plan.remove, vec!["qemu-utils".to_owned()]);
        assert_eq!(
            plan.install,
            vec![
                PlannedPackage {
                    name: "libfdt1".into(),
                    version: "1.6.1-4+b1".into()
                },
                PlannedPackage {
                    name: "libc6".into(),
                    version: "2.36-9+deb12u13".into()
                },
                PlannedPackage {
                    name: "qemu-system-x86".into(),
                    version: "1:7.2+dfsg-7+deb12u18+b2".into()
                },
            ]
        );
    }

    #[test]
    fn nothing_to_do_is_an_empty_plan() {
        let plan = InstallPlan::parse("0 upgraded, 0 newly installed, 0 to remove\n");
        assert_eq!(plan, InstallPlan::default());
    }
}
