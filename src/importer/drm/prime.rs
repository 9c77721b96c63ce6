//! How a DRM driver imports a dma-buf (its PRIME import), read against
//! Linux 7.2.13, and whether the VFIO BAR exporter accepts that.

use std::fmt;

use crate::types::ImportRefusal;

/// How a DRM driver attaches to a dma-buf it imports.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum PrimeImporter {
    /// A dynamic attach with `allow_peer2peer` and `invalidate_mappings`:
    /// what the VFIO exporter accepts. In 7.2.13 three DRM drivers do it:
    /// `amdgpu` (`amdgpu_dma_buf_attach_ops`), `xe` (`xe_dma_buf_attach_ops`)
    /// and `virtio_gpu` with blob resources and without virgl
    /// (`virtgpu_dma_buf_attach_ops`).
    PeerToPeerRevocable {
        /// The driver (and what it was found to have).
        driver: String,
        /// Whether the device behind it can use the buffer only as one
        /// range: virtio-gpu hands its host one backing entry per
        /// scatterlist entry, and hosts back a blob of device memory only
        /// when it is one ([`ImportRefusal::MultiRangeBlob`]).
        single_range: bool,
    },
    /// A static attach (`drm_gem_prime_import` and the drivers' own
    /// `dma_buf_attach`): no peer-to-peer, no revocation; every other DRM
    /// driver, and virtio-gpu without blob resources or with virgl.
    Static {
        /// The driver (and why it attaches statically).
        driver: String,
    },
}

impl PrimeImporter {
    /// What 7.2.13 says of DRM driver `driver` (other than `virtio_gpu`,
    /// which depends on the device: [`virtio_gpu`](Self::virtio_gpu)).
    pub fn of_driver(driver: &str) -> Self {
        match driver {
            "amdgpu" | "xe" => Self::PeerToPeerRevocable {
                driver: driver.to_owned(),
                single_range: false,
            },
            _ => Self::Static {
                driver: driver.to_owned(),
            },
        }
    }

    /// virtio-gpu: `virtgpu_gem_prime_import` attaches dynamically only
    /// when the device has blob resources and no virgl 3D; otherwise it
    /// falls back to `drm_gem_prime_import`.
    pub fn virtio_gpu(blob: bool, virgl: bool) -> Self {
        let driver = match (blob, virgl) {
            (true, false) => {
                return Self::PeerToPeerRevocable {
                    driver: "virtio_gpu (blob resources, 2D)".into(),
                    single_range: true,
                };
            }
            (false, _) => "virtio_gpu (no blob resources)",
            (true, true) => "virtio_gpu (virgl 3D)",
        };
        Self::Static {
            driver: driver.to_owned(),
        }
    }

    /// Whether the VFIO exporter accepts this importer's attach.
    pub fn accepted_by_vfio(&self) -> bool {
        matches!(self, Self::PeerToPeerRevocable { .. })
    }

    /// Why the VFIO exporter refuses this importer (`None`: it does not).
    pub fn refusal(&self) -> Option<ImportRefusal> {
        match self {
            Self::PeerToPeerRevocable { .. } => None,
            Self::Static { driver } => Some(ImportRefusal::NotPeerToPeer {
                importer: driver.clone(),
            }),
        }
    }

    /// Why a buffer of `entries` scatterlist entries would be of no use to
    /// this importer although the kernel imports it (`None`: it would be).
    pub fn refusal_for_entries(&self, entries: usize) -> Option<ImportRefusal> {
        match self {
            Self::PeerToPeerRevocable {
                driver,
                single_range: true,
            } if entries > 1 => Some(ImportRefusal::MultiRangeBlob {
                importer: driver.clone(),
                entries,
            }),
            _ => None,
        }
    }
}

impl fmt::Display for PrimeImporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PeerToPeerRevocable { driver, .. } => {
                write!(f, "{driver}: dynamic attach, peer-to-peer, revocable")
            }
            Self::Static { driver } => write!(f, "{driver}: static attach"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_gpu_is_a_p2p_importer_only_with_blob_and_without_virgl() {
        assert!(PrimeImporter::virtio_gpu(true, false).accepted_by_vfio());
        for (blob, virgl) in [(false, false), (false, true), (true, true)] {
            let i = PrimeImporter::virtio_gpu(blob, virgl);
            assert!(
                matches!(i.refusal(), Some(ImportRefusal::NotPeerToPeer { .. })),
                "{i}"
            );
        }
    }

    #[test]
    fn only_virtio_gpu_wants_one_range() {
        let gpu = PrimeImporter::virtio_gpu(true, false);
        assert_eq!(gpu.refusal_for_entries(1), None);
        assert!(matches!(
            gpu.refusal_for_entries(2),
            Some(ImportRefusal::MultiRangeBlob { entries: 2, .. })
        ));
        assert_eq!(
            PrimeImporter::of_driver("amdgpu").refusal_for_entries(9),
            None
        );
        // A static importer is refused by the kernel first.
        assert_eq!(
            PrimeImporter::virtio_gpu(false, false).refusal_for_entries(2),
            None
        );
    }

    #[test]
    fn the_drivers_of_7_2_13() {
        assert!(PrimeImporter::of_driver("amdgpu").accepted_by_vfio());
        assert!(PrimeImporter::of_driver("xe").accepted_by_vfio());
        for d in ["i915", "nouveau", "vgem", "vkms", "radeon", "msm"] {
            assert!(!PrimeImporter::of_driver(d).accepted_by_vfio(), "{d}");
        }
    }
}
