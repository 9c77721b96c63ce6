//! Reading PCI devices from sysfs.
//!
//! Every helper works under a root directory ([`Sysfs::new`]) that defaults to
//! `/sys`, so the code can be tested against a fake tree in a temporary
//! directory. Paths read, relative to the root:
//!
//! | what | path |
//! |---|---|
//! | devices | `bus/pci/devices/<addr>` (usually symlinks) |
//! | IDs | `…/<addr>/vendor`, `device`, `class` (`0x`-prefixed hex) |
//! | BARs | `…/<addr>/resource` (see [`parse_resources`]) |
//! | driver | `…/<addr>/driver` (symlink; its last component is the name) |
//! | IOMMU group | `…/<addr>/iommu_group` (symlink; its last component is the number) |
//! | VFIO cdev | `…/<addr>/vfio-dev/vfioN` |
//! | configuration space | `…/<addr>/config` (64 bytes without `CAP_SYS_ADMIN`) |
//! | place in the device tree | the `bus/pci/devices/<addr>` link's target |
//!
//! Directories are listed with `getdents64(2)` into a buffer written
//! beforehand, never with `std::fs::read_dir` (why: `crate::dir`).
//!
//! Errors name the device and the file: a missing device is [`Error::Device`],
//! a failed read is [`Error::Sys`] (target `"<addr> <path>"`), and unparsable
//! content is [`Error::Parse`] (the problem names the path).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::dir;
use crate::error::{Error, Result};
use crate::pci::{BAR_COUNT, PciAddress, Resource, parse_resources};
use crate::range::{parse_digits, parse_error};

/// A sysfs tree to read PCI devices from, `/sys` by default.
///
/// ```no_run
/// use dmabuf_p2p::sysfs::Sysfs;
///
/// let sys = Sysfs::default();
/// for addr in sys.devices()? {
///     println!("{addr} {:04x}:{:04x}", sys.vendor(addr)?, sys.device_id(addr)?);
/// }
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    /// The real sysfs, at `/sys`.
    fn default() -> Self {
        Self::new("/sys")
    }
}

/// Everything sysfs tells about one PCI device, as read by [`Sysfs::info`].
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PciDeviceInfo {
    /// The device's address.
    pub address: PciAddress,
    /// PCI vendor ID.
    pub vendor: u16,
    /// PCI device ID.
    pub device: u16,
    /// The 24-bit class code (class, subclass, programming interface).
    pub class: u32,
    /// The bound driver's name, if any.
    pub driver: Option<String>,
    /// The IOMMU group number, if the device is in one.
    pub iommu_group: Option<u32>,
    /// The VFIO cdev name (`vfioN`, for `/dev/vfio/devices/vfioN`), if bound to
    /// a VFIO driver on a kernel with `CONFIG_VFIO_DEVICE_CDEV`.
    pub vfio_dev: Option<String>,
    /// The lines of the `resource` file; the first six are BARs 0..=5.
    pub resources: Vec<Resource>,
}

impl Sysfs {
    /// A sysfs tree rooted at `root` (the directory that holds `bus/pci`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory that lists PCI devices, `<root>/bus/pci/devices`.
    pub fn devices_dir(&self) -> PathBuf {
        self.root.join("bus/pci/devices")
    }

    /// The sysfs directory of one device, `<root>/bus/pci/devices/<addr>`.
    /// It is not checked to exist.
    pub fn device_dir(&self, addr: PciAddress) -> PathBuf {
        self.devices_dir().join(addr.to_string())
    }

    /// All PCI devices, sorted by address. Entries whose names are not PCI
    /// addresses are skipped.
    pub fn devices(&self) -> Result<Vec<PciAddress>> {
        let dir = self.devices_dir();
        let target = || dir.display().to_string();
        let names = dir::names(&dir).map_err(|e| Error::sys("read_dir", target(), e))?;
        let mut out: Vec<PciAddress> = names
            .iter()
            .filter_map(|n| n.to_str()?.parse().ok())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Whether the device exists in this tree.
    pub fn exists(&self, addr: PciAddress) -> bool {
        self.device_dir(addr).is_dir()
    }

    /// The PCI vendor ID, from `vendor`.
    pub fn vendor(&self, addr: PciAddress) -> Result<u16> {
        let v = self.read_hex(addr, "vendor")?;
        u16::try_from(v)
            .map_err(|_| self.bad_content(addr, "vendor", &format!("{v:#x}"), "above 0xffff"))
    }

    /// The PCI device ID, from `device`.
    pub fn device_id(&self, addr: PciAddress) -> Result<u16> {
        let v = self.read_hex(addr, "device")?;
        u16::try_from(v)
            .map_err(|_| self.bad_content(addr, "device", &format!("{v:#x}"), "above 0xffff"))
    }

    /// The 24-bit class code, from `class`.
    pub fn class(&self, addr: PciAddress) -> Result<u32> {
        let v = self.read_hex(addr, "class")?;
        u32::try_from(v)
            .ok()
            .filter(|&c| c <= 0xff_ffff)
            .ok_or_else(|| self.bad_content(addr, "class", &format!("{v:#x}"), "above 0xffffff"))
    }

    /// The name of the bound driver (the `driver` symlink's last component),
    /// or `None` if no driver is bound.
    pub fn driver(&self, addr: PciAddress) -> Result<Option<String>> {
        self.link_name(addr, "driver")
    }

    /// The IOMMU group number (the `iommu_group` symlink's last component), or
    /// `None` if the device has no IOMMU group.
    pub fn iommu_group(&self, addr: PciAddress) -> Result<Option<u32>> {
        let Some(name) = self.link_name(addr, "iommu_group")? else {
            return Ok(None);
        };
        parse_digits(&name, 10)
            .and_then(|v| u32::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| {
                self.bad_content(
                    addr,
                    "iommu_group",
                    &name,
                    "link target is not a group number",
                )
            })
    }

    /// The VFIO cdev name under `vfio-dev/` (`vfioN`), or `None` if there is
    /// none (device not bound to VFIO, or a kernel without VFIO cdev). If there
    /// are several, the lowest-numbered one.
    pub fn vfio_dev(&self, addr: PciAddress) -> Result<Option<String>> {
        let dir = self.file(addr, "vfio-dev")?;
        let names = match dir::names(&dir) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::sys("read_dir", target(addr, &dir), e)),
        };
        let mut best: Option<(u64, String)> = None;
        for name in names {
            let Ok(name) = name.into_string() else {
                continue;
            };
            let Some(n) = name.strip_prefix("vfio").and_then(|d| parse_digits(d, 10)) else {
                continue;
            };
            if best.as_ref().is_none_or(|(b, _)| n < *b) {
                best = Some((n, name));
            }
        }
        Ok(best.map(|(_, name)| name))
    }

    /// All lines of the device's `resource` file (see [`parse_resources`]).
    pub fn resources(&self, addr: PciAddress) -> Result<Vec<Resource>> {
        let path = self.file(addr, "resource")?;
        let text = read_text(addr, &path)?;
        parse_resources(&text).map_err(|e| in_file(e, &path))
    }

    /// One BAR (0..=5) from the `resource` file. A BAR the file does not list
    /// is [`Error::InvalidRegion`]; an unused BAR is returned with size 0.
    pub fn bar(&self, addr: PciAddress, index: u32) -> Result<Resource> {
        let invalid = |problem: String| Error::InvalidRegion {
            device: addr.to_string(),
            index,
            problem,
            source: None,
        };
        if index >= BAR_COUNT {
            return Err(invalid(format!(
                "not a BAR (BARs are 0..={})",
                BAR_COUNT - 1
            )));
        }
        self.resources(addr)?
            .into_iter()
            .find(|r| r.index == index)
            .ok_or_else(|| invalid("not listed in the sysfs resource file".to_owned()))
    }

    /// The device's configuration space from its `config` file: as much as
    /// the kernel gives this reader. That is all of it (256 bytes for a
    /// conventional PCI function, 4096 for a PCI Express one) with
    /// `CAP_SYS_ADMIN`, and only the 64-byte standard header without
    /// (`pci_read_config` in `drivers/pci/pci-sysfs.c`), so capabilities
    /// need root.
    pub fn config(&self, addr: PciAddress) -> Result<Vec<u8>> {
        let path = self.file(addr, "config")?;
        fs::read(&path).map_err(|e| Error::sys("read", target(addr, &path), e))
    }

    /// Where the device sits in the device tree: the target of its
    /// `bus/pci/devices/<addr>` link, e.g.
    /// `../../../devices/pci0000:00/0000:00:10.0/0000:01:00.0`, whose
    /// components are its host bridge and the bridges above it.
    pub fn device_tree_path(&self, addr: PciAddress) -> Result<PathBuf> {
        self.file(addr, "")?; // the device must exist
        let link = self.device_dir(addr);
        fs::read_link(&link).map_err(|e| Error::sys("readlink", target(addr, &link), e))
    }

    /// Everything above for one device.
    pub fn info(&self, addr: PciAddress) -> Result<PciDeviceInfo> {
        Ok(PciDeviceInfo {
            address: addr,
            vendor: self.vendor(addr)?,
            device: self.device_id(addr)?,
            class: self.class(addr)?,
            driver: self.driver(addr)?,
            iommu_group: self.iommu_group(addr)?,
            vfio_dev: self.vfio_dev(addr)?,
            resources: self.resources(addr)?,
        })
    }

    /// The path of `name` inside the device directory, failing with
    /// [`Error::Device`] if the device does not exist.
    fn file(&self, addr: PciAddress, name: &str) -> Result<PathBuf> {
        let dir = self.device_dir(addr);
        if !dir.is_dir() {
            return Err(Error::Device {
                device: addr.to_string(),
                problem: format!("not found in {}", self.devices_dir().display()),
                source: None,
            });
        }
        Ok(dir.join(name))
    }

    /// Reads a `0x`-prefixed hex number from an attribute file.
    fn read_hex(&self, addr: PciAddress, name: &str) -> Result<u64> {
        let path = self.file(addr, name)?;
        let text = read_text(addr, &path)?;
        let t = text.trim();
        t.strip_prefix("0x")
            .and_then(|h| parse_digits(h, 16))
            .ok_or_else(|| self.bad_content(addr, name, t, "not a 0x-prefixed hex number"))
    }

    /// The last component of a symlink in the device directory, or `None` if
    /// the link does not exist.
    fn link_name(&self, addr: PciAddress, name: &str) -> Result<Option<String>> {
        let path = self.file(addr, name)?;
        let link = match fs::read_link(&path) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::sys("readlink", target(addr, &path), e)),
        };
        link.file_name()
            .and_then(|n| n.to_str())
            .map(|n| Some(n.to_owned()))
            .ok_or_else(|| {
                let shown = link.display().to_string();
                self.bad_content(
                    addr,
                    name,
                    &shown,
                    "link target has no UTF-8 last component",
                )
            })
    }

    /// [`Error::Parse`] for bad content in a device attribute file.
    fn bad_content(&self, addr: PciAddress, name: &str, content: &str, problem: &str) -> Error {
        let path = self.device_dir(addr).join(name);
        parse_error(
            "sysfs attribute",
            content,
            format!("{problem} (in {})", path.display()),
        )
    }
}

/// The error target for a file of a device: `"<addr> <path>"`.
fn target(addr: PciAddress, path: &Path) -> String {
    format!("{addr} {}", path.display())
}

/// Reads a whole attribute file as text.
fn read_text(addr: PciAddress, path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| Error::sys("read", target(addr, path), e))
}

/// Adds the file's path to a parse error's problem.
fn in_file(e: Error, path: &Path) -> Error {
    match e {
        Error::Parse {
            what,
            input,
            problem,
        } => Error::Parse {
            what,
            input,
            problem: format!("{problem} (in {})", path.display()),
        },
        other => other,
    }
}
