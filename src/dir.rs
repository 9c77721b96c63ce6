//! Listing a sysfs directory into a buffer that cannot fault.
//!
//! On Linux 7.2, `kernfs_fop_readdir` holds the sysfs root's `kernfs_rwsem`
//! while `filldir64` writes the entries into the caller's buffer. If that
//! write faults and the fault waits for `mmap_lock`, lockdep records
//! `kernfs_rwsem --> mmap_lock`, the edge that closes the cycle with
//! vfio-pci's `memory_lock` described in docs/KERNEL.md (a real, if rare,
//! deadlock). `std::fs::read_dir` reads through libc's `readdir` into a
//! buffer libc allocates, whose pages may not be there yet. Here the buffer
//! is written in full before the first `getdents64(2)`, so the pages the
//! kernel writes are present and writable: the copy does not fault (short of
//! the kernel migrating one of those pages in that instant), so it does not
//! wait for `mmap_lock`.
//!
//! Only sysfs needs this: other file systems' `readdir` holds no lock of its
//! own across the copy.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{OFlag, open};
use nix::sys::stat::Mode;

use crate::ioctl;

/// Bytes per `getdents64` call: room for about 250 sysfs entries.
const BUF_LEN: usize = 8192;

/// Where the name starts in a `struct linux_dirent64`: after `d_ino` (8),
/// `d_off` (8), `d_reclen` (2) and `d_type` (1).
const NAME_AT: usize = 19;

/// The names in the directory at `path`, without `.` and `..`, in the order
/// the kernel gives them.
pub(crate) fn names(path: &Path) -> io::Result<Vec<OsString>> {
    let dir = open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // A non-zero fill: a zeroed allocation may be fresh pages no one has
    // written, which is what must not reach the kernel.
    let mut buf = vec![0xa5_u8; BUF_LEN];
    let mut names = Vec::new();
    loop {
        let n = ioctl::getdents64(dir.as_fd(), &mut buf)?;
        let Some(records) = buf.get(..n).filter(|r| !r.is_empty()) else {
            return Ok(names);
        };
        parse(records, &mut names)?;
    }
}

/// Appends the names in `records` (the `struct linux_dirent64` records one
/// `getdents64` wrote) to `names`, skipping `.` and `..`. A record that
/// does not fit the bytes or has no terminated name is `InvalidData`.
fn parse(mut records: &[u8], names: &mut Vec<OsString>) -> io::Result<()> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("getdents64: {why}"));
    while !records.is_empty() {
        let reclen = match records.get(16..18) {
            Some(&[lo, hi]) => usize::from(u16::from_ne_bytes([lo, hi])),
            _ => return Err(bad("a record shorter than its header")),
        };
        let Some(name) = records.get(NAME_AT..reclen) else {
            return Err(bad("a record length beyond the data or below the header"));
        };
        let Some(len) = name.iter().position(|&b| b == 0) else {
            return Err(bad("a name without its terminating NUL"));
        };
        let name = name.get(..len).unwrap_or_default();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
        records = records.get(reclen..).unwrap_or_default();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::fs;

    fn std_names(path: &Path) -> BTreeSet<OsString> {
        fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    }

    fn ours(path: &Path) -> BTreeSet<OsString> {
        let v = names(path).unwrap();
        let set: BTreeSet<OsString> = v.iter().cloned().collect();
        assert_eq!(set.len(), v.len(), "a name listed twice in {path:?}");
        set
    }

    fn record(name: &[u8]) -> Vec<u8> {
        let reclen = (NAME_AT + name.len() + 1).next_multiple_of(8);
        let mut r = vec![0u8; reclen];
        r[..8].copy_from_slice(&7u64.to_ne_bytes());
        r[16..18].copy_from_slice(&u16::try_from(reclen).unwrap().to_ne_bytes());
        r[18] = libc::DT_DIR;
        r[NAME_AT..NAME_AT + name.len()].copy_from_slice(name);
        r
    }

    #[test]
    fn the_same_names_as_read_dir_in_a_directory_larger_than_the_buffer() {
        let dir = std::env::temp_dir().join(format!("dmabuf-p2p-dir-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        // 400 entries of 40+ bytes: several getdents64 calls.
        for i in 0..400 {
            fs::write(dir.join(format!("entry-{i:04}-{}", "x".repeat(i % 30))), "").unwrap();
        }
        let long = OsStr::from_bytes(&[b'l'; 255]);
        fs::write(dir.join(long), "").unwrap();
        let not_utf8 = OsStr::from_bytes(b"caf\xe9");
        fs::create_dir(dir.join(not_utf8)).unwrap();
        let got = ours(&dir);
        assert_eq!(got.len(), 402);
        assert!(got.contains(long) && got.contains(not_utf8));
        assert_eq!(got, std_names(&dir));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_same_names_as_read_dir_in_sysfs_and_procfs() {
        // The host's sysfs is kernfs too: the same readdir as in the VM.
        for path in [
            "/sys/bus/pci/devices",
            "/sys/class",
            "/sys/kernel",
            "/proc/self",
        ] {
            let path = Path::new(path);
            let got = ours(path);
            assert!(!got.is_empty(), "{path:?} listed empty");
            assert_eq!(got, std_names(path), "{path:?}");
        }
    }

    #[test]
    fn an_empty_directory_and_errors() {
        let dir = std::env::temp_dir().join(format!("dmabuf-p2p-dir-empty-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert!(names(&dir).unwrap().is_empty());
        let file = dir.join("file");
        fs::write(&file, "").unwrap();
        assert_eq!(
            names(&file).unwrap_err().raw_os_error(),
            Some(libc::ENOTDIR)
        );
        let missing = dir.join("missing");
        assert_eq!(names(&missing).unwrap_err().kind(), io::ErrorKind::NotFound);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn records_are_parsed_and_bad_ones_refused() {
        let mut buf = record(b".");
        buf.extend(record(b".."));
        buf.extend(record(b"0000:00:01.0"));
        buf.extend(record(b"vfio0"));
        let mut got = Vec::new();
        parse(&buf, &mut got).unwrap();
        assert_eq!(
            got,
            [OsString::from("0000:00:01.0"), OsString::from("vfio0")]
        );

        let good = record(b"name");
        let mut short_len = good.clone();
        short_len[16..18].copy_from_slice(&10u16.to_ne_bytes());
        let mut long_len = good.clone();
        long_len[16..18].copy_from_slice(&200u16.to_ne_bytes());
        let mut zero_len = good.clone();
        zero_len[16..18].copy_from_slice(&0u16.to_ne_bytes());
        let mut no_nul = good.clone();
        let end = no_nul.len();
        no_nul[NAME_AT..end].fill(b'n');
        for bad in [&good[..10], &short_len, &long_len, &zero_len, &no_nul] {
            let err = parse(bad, &mut Vec::new()).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{bad:?}");
        }
    }
}
