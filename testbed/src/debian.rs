//! Fetching Debian packages newer than the machine's own suite without touching
//! the machine's apt configuration.
//!
//! Mixing a newer suite into `/etc/apt` upgrades libc and breaks the machine, so
//! every call here points apt at a private sources list, private package lists
//! and a private archive cache under the test bed's cache directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result, cache_dir, run_checked};

/// The suite the 7.2 packages come from.
pub const NEWER_SUITE: &str = "sid";

/// A private apt root: sources list, lists and archives, all under `root`.
#[derive(Debug, Clone)]
pub struct PrivateApt {
    root: PathBuf,
}

impl PrivateApt {
    /// The private apt root in the test bed's cache directory.
    pub fn new() -> Result<Self> {
        let root = cache_dir()?.join("apt");
        for sub in ["lists/partial", "archives/partial"] {
            fs::create_dir_all(root.join(sub))
                .map_err(|e| Error::io(format!("creating {}", root.join(sub).display()), e))?;
        }
        let me = Self { root };
        me.write_sources()?;
        Ok(me)
    }

    /// Writes `sources.list` from the machine's Debian entry, with the suite
    /// replaced by [`NEWER_SUITE`].
    fn write_sources(&self) -> Result<()> {
        let system = Path::new("/etc/apt/sources.list.d/debian.sources");
        let (uri, keyring) = match fs::read_to_string(system) {
            Ok(text) => parse_deb822_debian_entry(&text),
            Err(_) => (None, None),
        };
        let uri = uri.unwrap_or_else(|| "http://deb.debian.org/debian".to_owned());
        let keyring =
            keyring.unwrap_or_else(|| "/usr/share/keyrings/debian-archive-keyring.gpg".to_owned());
        let text = format!(
            "Types: deb\nURIs: {uri}\nSuites: {NEWER_SUITE}\nComponents: main\nSigned-By: {keyring}\n"
        );
        let path = self.root.join("private.sources");
        fs::write(&path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    fn apt_get(&self) -> Command {
        self.apt("apt-get")
    }

    /// `program` (`apt-get` or `apt-cache`) pointed at the private root.
    fn apt(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let r = self.root.display();
        cmd.args([
            "-q",
            "-o",
            &format!("Dir::Etc::SourceList={r}/private.sources"),
            "-o",
            "Dir::Etc::SourceParts=/dev/null",
            "-o",
            &format!("Dir::State::Lists={r}/lists"),
            "-o",
            &format!("Dir::Cache::Archives={r}/archives"),
            "-o",
            &format!("Dir::Cache::pkgcache={r}/pkgcache.bin"),
            "-o",
            &format!("Dir::Cache::srcpkgcache={r}/srcpkgcache.bin"),
            "-o",
            "APT::Sandbox::User=root",
        ]);
        // apt's chatter goes to stderr, so that a tool printing a result on
        // stdout (`cargo xtask kernel`) stays usable in `$(...)`.
        cmd.stdout(std::io::stderr());
        cmd
    }

    /// Refreshes the private package lists.
    pub fn update(&self) -> Result<()> {
        let mut cmd = self.apt_get();
        cmd.arg("update");
        run_checked(&mut cmd, "apt-get update (private sources list)")
    }

    /// The versions of `package` the private sources offer (after an update).
    pub fn versions(&self, package: &str) -> Result<Vec<String>> {
        self.update()?;
        let mut cmd = self.apt("apt-cache");
        cmd.args(["madison", package]);
        cmd.stdout(std::process::Stdio::piped());
        let out = crate::run_captured(&mut cmd, &format!("apt-cache madison {package}"))?;
        // Lines: "package | version | archive ..."
        Ok(out
            .lines()
            .filter_map(|l| l.split('|').nth(1))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect())
    }

    /// Downloads `package` (optionally `=version`) into `dest` and returns the
    /// `.deb` path. A `.deb` already in `dest` is reused without asking apt
    /// (only one of the requested version, when a version is given).
    pub fn download(&self, package: &str, dest: &Path) -> Result<PathBuf> {
        let name = deb_file_prefix(package);
        let name = name.as_str();
        if let Some(found) = find_deb(dest, name)? {
            return Ok(found);
        }
        fs::create_dir_all(dest)
            .map_err(|e| Error::io(format!("creating {}", dest.display()), e))?;
        self.update()?;
        let mut cmd = self.apt_get();
        cmd.arg("download").arg(package).current_dir(dest);
        run_checked(&mut cmd, &format!("apt-get download {package}"))?;
        find_deb(dest, name)?.ok_or_else(|| {
            Error::Setup(format!(
                "apt-get download {package} left no .deb in {}",
                dest.display()
            ))
        })
    }
}

/// The newest of `versions` whose upstream part is `series.N` (for series
/// "7.2": 7.2.0, 7.2.13-1, ...), comparing the numbers in order
/// (`7.2.9-1` < `7.2.13-1` < `7.2.13-2`). Versions with `~` (pre-releases,
/// backports) rank below the same version without.
pub fn newest_in_series<'a>(versions: &'a [String], series: &str) -> Option<&'a String> {
    let prefix = format!("{series}.");
    versions
        .iter()
        .filter(|v| {
            v.strip_prefix(&prefix)
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .max_by_key(|v| version_key(v))
}

/// Numbers of a Debian version in order, then whether it has no `~`.
fn version_key(v: &str) -> (Vec<u64>, bool) {
    let (main, tilde) = match v.split_once('~') {
        Some((m, _)) => (m, false),
        None => (v, true),
    };
    let numbers = main
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    (numbers, tilde)
}

/// Unpacks a `.deb` into `dest` without installing it.
pub fn extract_deb(deb: &Path, dest: &Path) -> Result<()> {
    fs::create_dir_all(dest).map_err(|e| Error::io(format!("creating {}", dest.display()), e))?;
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("-x").arg(deb).arg(dest);
    run_checked(&mut cmd, &format!("dpkg-deb -x {}", deb.display()))
}

/// The start of the `.deb` file name apt gives `package` (`name` or
/// `name=version`), before the next `_`: `name` or `name_version`, with an
/// epoch's `:` spelled `%3a` as apt does.
fn deb_file_prefix(package: &str) -> String {
    match package.split_once('=') {
        Some((name, version)) => format!("{name}_{}", version.replace(':', "%3a")),
        None => package.to_owned(),
    }
}

fn find_deb(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(None);
    };
    let prefix = format!("{name}_");
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("reading {}", dir.display()), e))?;
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if file.starts_with(&prefix) && file.ends_with(".deb") {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

/// Finds the Debian archive entry (`URIs`, `Signed-By`) in a deb822 sources file.
fn parse_deb822_debian_entry(text: &str) -> (Option<String>, Option<String>) {
    for stanza in text.split("\n\n") {
        let mut uri = None;
        let mut key = None;
        for line in stanza.lines() {
            if let Some(v) = line.strip_prefix("URIs:") {
                uri = v.split_whitespace().next().map(str::to_owned);
            } else if let Some(v) = line.strip_prefix("Signed-By:") {
                key = Some(v.trim().to_owned());
            }
        }
        if let Some(u) = &uri
            && u.ends_with("/debian")
        {
            return (uri, key);
        }
    }
    (None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reused_debs_match_the_requested_version() {
        assert_eq!(deb_file_prefix("linux-source-7.2"), "linux-source-7.2");
        assert_eq!(
            deb_file_prefix("linux-source-7.2=7.2.13-1"),
            "linux-source-7.2_7.2.13-1"
        );
        assert_eq!(deb_file_prefix("p=1:2.0-1"), "p_1%3a2.0-1");
        let dir = std::env::temp_dir().join(format!("debian-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("linux-source-7.2_7.2.12-1_all.deb"), b"").unwrap();
        assert_eq!(
            find_deb(&dir, &deb_file_prefix("linux-source-7.2=7.2.13-1")).unwrap(),
            None
        );
        fs::write(dir.join("linux-source-7.2_7.2.13-1_all.deb"), b"").unwrap();
        let found = find_deb(&dir, &deb_file_prefix("linux-source-7.2=7.2.13-1")).unwrap();
        assert_eq!(found, Some(dir.join("linux-source-7.2_7.2.13-1_all.deb")));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_newest_version_of_the_series_wins() {
        let v: Vec<String> = [
            "7.2.9-1",
            "7.2.13-2",
            "7.2.13-1",
            "7.3.1-1",
            "7.2.14-1~bpo12+1",
            "7.20.1-1",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(
            newest_in_series(&v, "7.2").map(String::as_str),
            Some("7.2.14-1~bpo12+1")
        );
        let v: Vec<String> = ["7.2.13-1", "7.2.13-1~rc1", "7.2.9-3"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        assert_eq!(
            newest_in_series(&v, "7.2").map(String::as_str),
            Some("7.2.13-1")
        );
        assert_eq!(newest_in_series(&v, "7.3"), None);
    }

    #[test]
    fn picks_the_main_archive_not_security() {
        let text = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nSigned-By: /k.gpg\n\n\
                    Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        let (uri, key) = parse_deb822_debian_entry(text);
        assert_eq!(uri.as_deref(), Some("http://deb.debian.org/debian"));
        assert_eq!(key.as_deref(), Some("/k.gpg"));
    }
}
