//! A newc-format cpio archive built in memory: the guest's whole root file system.
//!
//! Host binaries go in as they are, dynamically linked, together with the shared
//! libraries `ldd` names. That lets the VM run the very test binaries that the
//! host's `cargo test --no-run` built, without a second static build.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result, run_captured};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

#[derive(Debug, Clone)]
enum Node {
    Dir,
    File { mode: u32, data: Vec<u8> },
    Symlink(String),
}

/// An initramfs under construction. Paths are absolute guest paths; parent
/// directories are created implicitly.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    nodes: BTreeMap<String, Node>,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn add_parents(&mut self, path: &str) {
        let mut cur = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            cur.push('/');
            cur.push_str(part);
            self.nodes.entry(cur.clone()).or_insert(Node::Dir);
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.add_parents(path);
        self.nodes.insert(path.to_owned(), Node::Dir);
        self
    }

    /// Adds a regular file with the given permission bits.
    pub fn file(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) -> &mut Self {
        self.add_parents(path);
        self.nodes.insert(
            path.to_owned(),
            Node::File {
                mode: mode & 0o7777,
                data: data.into(),
            },
        );
        self
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add_parents(path);
        self.nodes
            .insert(path.to_owned(), Node::Symlink(target.to_owned()));
        self
    }

    /// Copies a host file into the archive at `guest_path`.
    pub fn host_file(&mut self, guest_path: &str, host: &Path, mode: u32) -> Result<&mut Self> {
        let data =
            fs::read(host).map_err(|e| Error::io(format!("reading {}", host.display()), e))?;
        Ok(self.file(guest_path, mode, data))
    }

    /// Copies a host executable and every shared library it needs (per `ldd`),
    /// the libraries at their host paths.
    pub fn host_binary(&mut self, guest_path: &str, host: &Path) -> Result<&mut Self> {
        self.host_file(guest_path, host, 0o755)?;
        for lib in shared_libraries(host)? {
            let guest = lib.to_string_lossy().into_owned();
            if !self.nodes.contains_key(&guest) {
                let real = fs::canonicalize(&lib)
                    .map_err(|e| Error::io(format!("resolving {}", lib.display()), e))?;
                self.host_file(&guest, &real, 0o755)?;
            }
        }
        Ok(self)
    }

    /// Serialises the archive in the newc cpio format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // The root directory itself, first: the kernel unpacks into a tmpfs
        // whose root is mode 1777 (world-writable, sticky) unless the archive
        // says otherwise; a real system's `/` is 0755, and the sharing tests
        // check paths from `/` down as an exporter does.
        write_entry(&mut out, ".", 0, S_IFDIR | 0o755, 2, &[]);
        for (ino, (path, node)) in self.nodes.iter().enumerate() {
            let name = path.trim_start_matches('/');
            let (mode, data): (u32, &[u8]) = match node {
                Node::Dir => (S_IFDIR | 0o755, &[]),
                Node::File { mode, data } => (S_IFREG | mode, data),
                Node::Symlink(t) => (S_IFLNK | 0o777, t.as_bytes()),
            };
            let nlink = if matches!(node, Node::Dir) { 2 } else { 1 };
            write_entry(&mut out, name, ino as u32 + 1, mode, nlink, data);
        }
        write_entry(&mut out, "TRAILER!!!", 0, 0, 1, &[]);
        out
    }

    /// Writes the archive to `path`.
    pub fn write_to(&self, path: &Path) -> Result<()> {
        let mut f = fs::File::create(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        f.write_all(&self.to_bytes())
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn write_entry(out: &mut Vec<u8>, name: &str, ino: u32, mode: u32, nlink: u32, data: &[u8]) {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        namesize as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// The absolute paths of the shared libraries (and the dynamic loader) that
/// `binary` needs. A static binary needs none.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = Command::new("ldd");
    cmd.arg(binary);
    let out = match run_captured(&mut cmd, &format!("ldd {}", binary.display())) {
        Ok(o) => o,
        // ldd exits 1 for static binaries ("not a dynamic executable").
        Err(Error::Command { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(parse_ldd(&out))
}

/// Extracts library paths from `ldd` output.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    libs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        let libs = parse_ldd(text);
        assert_eq!(
            libs,
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn archive_has_parents_headers_and_trailer() {
        let mut a = Initramfs::new();
        a.file("/etc/x/y", 0o644, b"abc".to_vec())
            .symlink("/bin/sh", "busybox");
        let bytes = a.to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        assert!(bytes.starts_with(b"070701"));
        // The root first, mode 040755 (the 2nd field, after the inode).
        assert_eq!(&text[6 + 8..6 + 2 * 8], "000041ed");
        assert_eq!(&text[110..112], ".\0");
        assert!(text.contains("etc\0"));
        assert!(text.contains("etc/x\0"));
        assert!(text.contains("etc/x/y\0"));
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(bytes.len() % 4, 0);
        // The file's size field (7th field) is 3.
        let pos = text.find("etc/x/y").unwrap_or(0);
        let header = &text[pos - 110..pos];
        assert_eq!(&header[6 + 6 * 8..6 + 7 * 8], "00000003");
    }
}
