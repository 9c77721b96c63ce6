//! Why a kernel importer refused a VFIO BAR dma-buf.

use std::fmt;

/// Why a kernel importer (a DRM driver's PRIME import) refused a VFIO BAR
/// dma-buf. The VFIO exporter (`vfio_pci_dmabuf.c`, Linux 7.2) accepts
/// only attachments that allow peer-to-peer and can be revoked, and hands
/// out addresses only where `pci_p2pdma_map_type()` finds a path; these
/// are its refusals, each with the words the topology verdict uses.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "snake_case", tag = "kind")
)]
pub enum ImportRefusal {
    /// The importer attaches without `allow_peer2peer` (a static attach:
    /// `drm_gem_prime_import`, or virtio-gpu without blob resources or with
    /// virgl): `vfio_pci_dma_buf_attach` refuses it (`EOPNOTSUPP`).
    NotPeerToPeer {
        /// The importer, e.g. `"virtio_gpu (no blob resources)"`.
        importer: String,
    },
    /// The importer allows peer-to-peer but has no `invalidate_mappings`
    /// (`dma_buf_attach_revocable()` is false): refused (`EOPNOTSUPP`).
    NotRevocable {
        /// The importer.
        importer: String,
    },
    /// `EOPNOTSUPP` from an importer whose attach the library does not
    /// know: one of the two above.
    NotPeerToPeerOrNotRevocable {
        /// The importer.
        importer: String,
    },
    /// `pci_p2pdma_map_type()` found no peer-to-peer path between the
    /// importer's device and the BAR (`PCI_P2PDMA_MAP_NOT_SUPPORTED`), so
    /// the exporter's map fails (`EINVAL`).
    NoP2pPath {
        /// The topology verdict's reasons, where it could be made.
        reasons: Vec<String>,
    },
    /// Refused by the library, not the kernel: virtio-gpu would hand the
    /// host one backing entry per scatterlist entry of the buffer
    /// (`virtgpu_dma_buf_import_sgt`), and a host uses device memory as a
    /// blob's backing only when it is one entry. QEMU 7.2 joins several
    /// only through udmabuf, which needs them in memfd RAM: BAR memory
    /// never is, so the import would succeed and show nothing (the host
    /// answers the scanout with an error the guest's ioctls never return).
    MultiRangeBlob {
        /// The importer, e.g. `"virtio_gpu (blob resources, 2D)"`.
        importer: String,
        /// The scatterlist entries the buffer would have: one per exported
        /// range, and one more per 4 GiB - 4 KiB of a longer range.
        entries: usize,
    },
}

impl fmt::Display for ImportRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotPeerToPeer { importer } => write!(
                f,
                "{importer} is not a peer-to-peer importer: it attaches without \
                 allow_peer2peer, which the VFIO exporter refuses (vfio_pci_dma_buf_attach)"
            ),
            Self::NotRevocable { importer } => write!(
                f,
                "{importer} cannot be revoked: it has no invalidate_mappings \
                 (dma_buf_attach_revocable), which the VFIO exporter requires"
            ),
            Self::NotPeerToPeerOrNotRevocable { importer } => write!(
                f,
                "{importer} does not attach the way the VFIO exporter requires: \
                 peer-to-peer allowed and revocable (vfio_pci_dma_buf_attach)"
            ),
            Self::NoP2pPath { reasons } if reasons.is_empty() => f.write_str(
                "no peer-to-peer path between the importer's device and the BAR \
                 (pci_p2pdma_map_type: PCI_P2PDMA_MAP_NOT_SUPPORTED)",
            ),
            Self::NoP2pPath { reasons } => write!(
                f,
                "no peer-to-peer path between the importer's device and the BAR \
                 (pci_p2pdma_map_type: PCI_P2PDMA_MAP_NOT_SUPPORTED): {}",
                reasons.join("; ")
            ),
            Self::MultiRangeBlob { importer, entries } => write!(
                f,
                "{importer} would give the host a blob of {entries} backing ranges \
                 (one per scatterlist entry, virtgpu_dma_buf_import_sgt), and a host backs \
                 a blob of device memory only when it is one range (QEMU 7.2 joins ranges \
                 only through udmabuf over memfd RAM): the import would succeed and the \
                 screen show nothing. Export one range, or use \
                 GemImport::import_multi_range where the host joins them"
            ),
        }
    }
}
