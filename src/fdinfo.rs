//! Parsing `/proc/<pid>/fdinfo/<fd>` (uAPI reference A.3).
//!
//! The text is `key:\tvalue` lines: the generic `pos`, `flags` (octal),
//! `mnt_id`, `ino` first, then per-file-type lines. A dma-buf adds `size`,
//! `count`, `exp_name` and, once a name is set, `name`. The `exp_name` line is
//! what marks a dma-buf here; `fstatfs` is the definitive check.

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::range::{parse_digits, parse_error};

const WHAT: &str = "fdinfo";

/// The parsed fdinfo of one file descriptor.
///
/// ```
/// use dmabuf_p2p::fdinfo::FdInfo;
///
/// let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1057\n\
///             size:\t65536\ncount:\t1\nexp_name:\tudmabuf\n";
/// let info: FdInfo = text.parse()?;
/// assert_eq!(info.flags, 0o2000002);
/// let buf = info.dmabuf.expect("a dma-buf");
/// assert_eq!((buf.size, buf.exp_name.as_str(), buf.name), (65536, "udmabuf", None));
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct FdInfo {
    /// The file position (`pos:`, signed as the kernel prints it).
    pub pos: i64,
    /// The file status flags (`flags:`, printed in octal; includes `O_CLOEXEC`
    /// when the fd is close-on-exec).
    pub flags: u32,
    /// The mount ID (`mnt_id:`).
    pub mnt_id: u64,
    /// The inode number (`ino:`); for a dma-buf, its per-boot unique number.
    pub ino: u64,
    /// The dma-buf lines, if the file is a dma-buf (has an `exp_name:` line).
    pub dmabuf: Option<DmaBufInfo>,
}

/// The dma-buf part of fdinfo.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct DmaBufInfo {
    /// The buffer size in bytes (`size:`).
    pub size: u64,
    /// References to the file besides procfs's own (`count:`): fds, mmaps and
    /// importers.
    pub count: u64,
    /// The exporter's name (`exp_name:`), e.g. `udmabuf`, `system` (a heap) or
    /// `vfio_pci_core`.
    pub exp_name: String,
    /// The name set with `DMA_BUF_SET_NAME` (`name:`), if any.
    pub name: Option<String>,
}

impl FdInfo {
    /// Parses fdinfo text. Unknown lines (and lines without a `:`) are ignored.
    /// The four generic keys are required; a dma-buf (one with `exp_name:`)
    /// also needs `size:` and `count:`. A missing required key, a key given
    /// twice, or a malformed number is [`Error::Parse`].
    pub fn parse(text: &str) -> Result<Self> {
        let mut fields: HashMap<&str, &str> = HashMap::new();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            if !KNOWN.contains(&key) {
                continue;
            }
            // The kernel separates with one tab; keep the rest verbatim (names
            // may contain spaces).
            let value = value
                .strip_prefix('\t')
                .unwrap_or_else(|| value.trim_start());
            if fields.insert(key, value).is_some() {
                return Err(parse_error(
                    WHAT,
                    text,
                    format!("key {key:?} appears twice"),
                ));
            }
        }
        let get = |key: &str| {
            fields
                .get(key)
                .copied()
                .ok_or_else(|| parse_error(WHAT, text, format!("no {key:?} line")))
        };
        let number = |key: &str, radix: u32| -> Result<u64> {
            let v = get(key)?;
            parse_digits(v.trim_end(), radix).ok_or_else(|| {
                let base = if radix == 8 { "an octal" } else { "a decimal" };
                parse_error(WHAT, text, format!("{key}: {v:?} is not {base} number"))
            })
        };
        let pos = {
            let v = get("pos")?.trim_end();
            let digits = v.strip_prefix('-').unwrap_or(v);
            // Validate first: `i64::from_str` would also take a leading '+'.
            parse_digits(digits, 10)
                .and_then(|_| v.parse::<i64>().ok())
                .ok_or_else(|| {
                    parse_error(WHAT, text, format!("pos: {v:?} is not a decimal number"))
                })?
        };
        let flags = u32::try_from(number("flags", 8)?)
            .map_err(|_| parse_error(WHAT, text, "flags: does not fit in 32 bits"))?;
        let mnt_id = number("mnt_id", 10)?;
        let ino = number("ino", 10)?;
        let dmabuf = match fields.get("exp_name") {
            None => None,
            Some(exp) => Some(DmaBufInfo {
                size: number("size", 10)?,
                count: number("count", 10)?,
                exp_name: (*exp).to_owned(),
                name: fields.get("name").map(|n| (*n).to_owned()),
            }),
        };
        Ok(Self {
            pos,
            flags,
            mnt_id,
            ino,
            dmabuf,
        })
    }

    /// Reads and parses an fdinfo file, e.g. `/proc/1234/fdinfo/5`. A failed
    /// read is [`Error::Sys`] naming the path.
    pub fn read_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = fs::read_to_string(path)
            .map_err(|e| Error::sys("read", path.display().to_string(), e))?;
        Self::parse(&text)
    }

    /// The fdinfo of a file descriptor of this process (`/proc/self/fdinfo/<fd>`).
    ///
    /// ```
    /// let f = std::fs::File::open("/proc/self/status")?;
    /// let info = dmabuf_p2p::fdinfo::FdInfo::of_fd(&f)?;
    /// assert!(info.dmabuf.is_none());
    /// assert!(info.is_cloexec()); // std opens with O_CLOEXEC
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn of_fd(fd: impl AsFd) -> Result<Self> {
        let raw = fd.as_fd().as_raw_fd();
        Self::read_path(format!("/proc/self/fdinfo/{raw}"))
    }

    /// Whether the file is a dma-buf (it has an `exp_name:` line).
    pub const fn is_dmabuf(&self) -> bool {
        self.dmabuf.is_some()
    }

    /// Whether the fd is close-on-exec (`O_CLOEXEC` in `flags`).
    pub const fn is_cloexec(&self) -> bool {
        self.flags & (libc::O_CLOEXEC as u32) != 0
    }

    /// The access mode bits (`flags & O_ACCMODE`): `O_RDONLY`, `O_WRONLY` or `O_RDWR`.
    pub const fn access_mode(&self) -> u32 {
        self.flags & (libc::O_ACCMODE as u32)
    }
}

/// The keys this parser reads; every other line is ignored.
const KNOWN: [&str; 8] = [
    "pos", "flags", "mnt_id", "ino", "size", "count", "exp_name", "name",
];

impl FromStr for FdInfo {
    type Err = Error;

    /// Same as [`FdInfo::parse`].
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}
