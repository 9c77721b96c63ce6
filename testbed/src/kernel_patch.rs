//! A kernel built with a patch (`cargo xtask kernel --patch FILE`): for trying
//! a proposed kernel fix, never for the kernel CI boots.
//!
//! The patched build gets its own cache key (the key of the stock kernel's
//! recipe with the patch text hashed in, plus `-patched`), its own source tree
//! (a hard-linked copy of the shared one, in which every file the patch
//! touches is first replaced by a private copy, so the shared tree never
//! changes) and a release string that names the patch (`uname -r` says
//! `7.2.13-<patch name>`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result, run_checked};

/// A patch file to build the kernel with.
#[derive(Debug, Clone)]
pub struct Patch {
    path: PathBuf,
    text: String,
}

impl Patch {
    /// Reads a unified diff (`git format-patch` output or `diff -u` with `a/`
    /// and `b/` prefixes, applied with `-p1`).
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading the patch {}", path.display()), e))?;
        let patch = Self {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
            text,
        };
        if patch.files().is_empty() {
            return Err(Error::Setup(format!(
                "{} changes no file (no `+++ b/<path>` line)",
                path.display()
            )));
        }
        Ok(patch)
    }

    /// The patch's text (hashed into the cache key).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The name: the file name without `.patch` or `.diff`.
    pub fn name(&self) -> String {
        let stem = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = stem
            .strip_suffix(".patch")
            .or_else(|| stem.strip_suffix(".diff"))
            .unwrap_or(&stem);
        stem.to_owned()
    }

    /// `LOCALVERSION` for the build: `-<name>`, restricted to the characters a
    /// release string may hold, and short enough for `uname -r` (64 bytes).
    pub fn localversion(&self) -> String {
        let name: String = self
            .name()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                    c
                } else {
                    '_'
                }
            })
            .take(48)
            .collect();
        format!("-{name}")
    }

    /// The files the patch changes, relative to the source tree.
    pub fn files(&self) -> Vec<String> {
        let mut files: Vec<String> = self
            .text
            .lines()
            .filter_map(|l| l.strip_prefix("+++ b/"))
            .map(|p| p.split('\t').next().unwrap_or(p).trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        files.sort();
        files.dedup();
        files
    }

    /// The patched source tree under `keydir`: made once from `base` (hard
    /// links), then the patch is applied to private copies of its files.
    pub fn source_tree(&self, base: &Path, keydir: &Path) -> Result<PathBuf> {
        let tree = keydir.join("source");
        let stamp = keydir.join("source.patched");
        if stamp.is_file() && tree.join("Makefile").is_file() {
            eprintln!("kernel: reusing the patched source tree {}", tree.display());
            return Ok(tree);
        }
        if tree.exists() {
            fs::remove_dir_all(&tree)
                .map_err(|e| Error::io(format!("removing {}", tree.display()), e))?;
        }
        fs::create_dir_all(keydir)
            .map_err(|e| Error::io(format!("creating {}", keydir.display()), e))?;
        let mut cp = Command::new("cp");
        cp.arg("-al").arg(base).arg(&tree);
        run_checked(
            &mut cp,
            &format!("cp -al {} {}", base.display(), tree.display()),
        )?;
        for file in self.files() {
            unshare(&tree.join(&file))?;
        }
        let mut patch = Command::new("patch");
        patch
            .arg("-p1")
            .arg("--forward")
            .arg("--batch")
            .arg("-d")
            .arg(&tree)
            .arg("-i")
            .arg(&self.path);
        run_checked(&mut patch, &format!("patch -p1 < {}", self.path.display()))?;
        fs::write(&stamp, self.name())
            .map_err(|e| Error::io(format!("writing {}", stamp.display()), e))?;
        eprintln!(
            "kernel: applied {} to {}",
            self.path.display(),
            tree.display()
        );
        Ok(tree)
    }
}

/// Replaces a hard link into the shared tree with a private copy (a new
/// inode), so that patching it leaves the shared tree alone. A file the patch
/// creates does not exist yet and needs nothing.
fn unshare(path: &Path) -> Result<()> {
    let Ok(data) = fs::read(path) else {
        return Ok(());
    };
    let perms = fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
        .permissions();
    let tmp = path.with_extension("unshare-tmp");
    fs::write(&tmp, data).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    fs::set_permissions(&tmp, perms)
        .map_err(|e| Error::io(format!("setting the mode of {}", tmp.display()), e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(format!("replacing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_files_and_release_suffix() {
        let dir = std::env::temp_dir().join(format!("kpatch-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kernfs-readdir-without-rwsem.patch");
        fs::write(
            &file,
            "Subject: x\n---\ndiff --git a/fs/kernfs/dir.c b/fs/kernfs/dir.c\n--- a/fs/kernfs/dir.c\n+++ b/fs/kernfs/dir.c\n@@ -1 +1 @@\n-a\n+b\n",
        )
        .unwrap();
        let p = Patch::load(&file).unwrap();
        assert_eq!(p.name(), "kernfs-readdir-without-rwsem");
        assert_eq!(p.localversion(), "-kernfs-readdir-without-rwsem");
        assert_eq!(p.files(), vec!["fs/kernfs/dir.c".to_owned()]);
        let empty = dir.join("empty.patch");
        fs::write(&empty, "nothing\n").unwrap();
        assert!(Patch::load(&empty).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_patched_tree_leaves_the_shared_one_alone() {
        let dir = std::env::temp_dir().join(format!("kpatch-tree-{}", std::process::id()));
        let base = dir.join("base");
        fs::create_dir_all(base.join("fs")).unwrap();
        fs::write(base.join("Makefile"), "all:\n").unwrap();
        fs::write(base.join("fs/dir.c"), "one\ntwo\n").unwrap();
        let file = dir.join("p.patch");
        fs::write(
            &file,
            "--- a/fs/dir.c\n+++ b/fs/dir.c\n@@ -1,2 +1,2 @@\n one\n-two\n+three\n",
        )
        .unwrap();
        let p = Patch::load(&file).unwrap();
        let tree = p.source_tree(&base, &dir.join("key")).unwrap();
        assert_eq!(
            fs::read_to_string(tree.join("fs/dir.c")).unwrap(),
            "one\nthree\n"
        );
        assert_eq!(
            fs::read_to_string(base.join("fs/dir.c")).unwrap(),
            "one\ntwo\n"
        );
        // A second call reuses the tree instead of patching twice.
        let again = p.source_tree(&base, &dir.join("key")).unwrap();
        assert_eq!(again, tree);
        fs::remove_dir_all(&dir).unwrap();
    }
}
