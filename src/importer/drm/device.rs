//! A DRM device opened for PRIME import: its fd, its driver and the PCI
//! function behind it.

use std::fmt;
use std::fs;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{OFlag, open};
use nix::sys::stat::{Mode, fstat, major, minor};

use crate::error::{Error, Result};
use crate::ioctl;
use crate::pci::PciAddress;
use crate::sys;

use super::prime::PrimeImporter;

/// A DRM device node (`/dev/dri/cardN` or `renderDN`), opened read-write.
///
/// Cheap to clone: clones share the fd, which is closed with the last one
/// (a [`GemImport`](super::GemImport) keeps its device open). GEM handles
/// belong to the open file, so imports made through one `DrmDevice` are
/// seen by its clones and by nobody else.
#[derive(Clone)]
pub struct DrmDevice {
    inner: Arc<Inner>,
}

struct Inner {
    fd: OwnedFd,
    path: String,
    driver: String,
    pci: Option<PciAddress>,
}

impl fmt::Debug for DrmDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DrmDevice")
            .field("path", &self.inner.path)
            .field("driver", &self.inner.driver)
            .field("pci", &self.inner.pci)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for DrmDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}", self.inner.path, self.inner.driver)?;
        if let Some(pci) = self.inner.pci {
            write!(f, ", {pci}")?;
        }
        f.write_str(")")
    }
}

impl AsFd for DrmDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

/// The DRM character devices' major number (`DRM_MAJOR`).
const DRM_MAJOR: u64 = 226;

impl DrmDevice {
    /// Opens a DRM device node and asks its driver's name
    /// (`DRM_IOCTL_VERSION`).
    ///
    /// ```no_run
    /// let card = dmabuf_p2p::importer::drm::DrmDevice::open("/dev/dri/card0")?;
    /// println!("{card}"); // /dev/dri/card0 (virtio_gpu, 0000:03:00.0)
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let fd = open(path, OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| Error::sys("open", path.display().to_string(), e.into()))?;
        Self::from_fd(fd, path.display().to_string())
    }

    /// Takes an open DRM fd (from a compositor, a VMM); `name` names it in
    /// errors. Fails with [`Error::Device`] if it is not a DRM device.
    pub fn from_fd(fd: OwnedFd, name: impl Into<String>) -> Result<Self> {
        let path = name.into();
        let st = fstat(&fd).map_err(|e| Error::sys("fstat", path.clone(), e.into()))?;
        let rdev = st.st_rdev;
        if st.st_mode & libc::S_IFMT != libc::S_IFCHR || major(rdev) != DRM_MAJOR {
            return Err(Error::Device {
                device: path,
                problem: "not a DRM device node (character device, major 226)".into(),
                source: None,
            });
        }
        let driver = ioctl::drm_driver_name(fd.as_fd())
            .map_err(|e| Error::sys("DRM_IOCTL_VERSION", path.clone(), e))?;
        let pci = pci_function_of(major(rdev), minor(rdev));
        Ok(Self {
            inner: Arc::new(Inner {
                fd,
                path,
                driver,
                pci,
            }),
        })
    }

    /// Opens the primary node (`/dev/dri/cardN`) of the DRM device that PCI
    /// function `addr` drives. Fails with [`Error::Device`] when none does.
    pub fn for_pci(addr: PciAddress) -> Result<Self> {
        for path in card_nodes()? {
            if let Ok(st) = fs::metadata(&path)
                && let Some(rdev) = char_rdev(&st)
                && pci_function_of(major(rdev), minor(rdev)) == Some(addr)
            {
                return Self::open(&path);
            }
        }
        Err(Error::Device {
            device: addr.to_string(),
            problem: "no DRM device (/dev/dri/card*) is driven by this function".into(),
            source: None,
        })
    }

    /// The node's path (or the name given to [`from_fd`](Self::from_fd)).
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    /// The driver's name (`virtio_gpu`, `amdgpu`, `i915`, ...).
    pub fn driver(&self) -> &str {
        &self.inner.driver
    }

    /// The PCI function behind the device, when it is a PCI device
    /// (`/sys/dev/char/226:N/device`).
    pub fn pci_address(&self) -> Option<PciAddress> {
        self.inner.pci
    }

    /// How this device's driver imports a dma-buf, and so whether the VFIO
    /// exporter accepts it: virtio-gpu is asked whether it has blob
    /// resources and 3D (`DRM_IOCTL_VIRTGPU_GETPARAM`).
    pub fn prime_importer(&self) -> Result<PrimeImporter> {
        let driver = self.driver();
        if driver != "virtio_gpu" {
            return Ok(PrimeImporter::of_driver(driver));
        }
        let param = |p: u32, what: &'static str| {
            ioctl::virtgpu_getparam(self.as_fd(), p)
                .map(|v| v != 0)
                .map_err(|e| Error::sys(what, self.to_string(), e))
        };
        let blob = param(
            sys::VIRTGPU_PARAM_RESOURCE_BLOB,
            "DRM_IOCTL_VIRTGPU_GETPARAM(RESOURCE_BLOB)",
        )?;
        let virgl = param(
            sys::VIRTGPU_PARAM_3D_FEATURES,
            "DRM_IOCTL_VIRTGPU_GETPARAM(3D_FEATURES)",
        )?;
        Ok(PrimeImporter::virtio_gpu(blob, virgl))
    }
}

/// `/dev/dri/card*`, sorted (a devtmpfs listing, not sysfs).
fn card_nodes() -> Result<Vec<PathBuf>> {
    let dir = Path::new("/dev/dri");
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::sys("read_dir", "/dev/dri", e)),
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("card"))
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

fn char_rdev(st: &fs::Metadata) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    st.file_type().is_char_device().then(|| st.rdev())
}

/// The PCI function of character device `major:minor`: the last component
/// of the `/sys/dev/char/<major>:<minor>/device` link, when it is a PCI
/// address.
fn pci_function_of(major: u64, minor: u64) -> Option<PciAddress> {
    let link = fs::read_link(format!("/sys/dev/char/{major}:{minor}/device")).ok()?;
    link.file_name()?.to_str()?.parse().ok()
}
