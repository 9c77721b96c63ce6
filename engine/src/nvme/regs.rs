//! NVMe controller registers (BAR0) and what their fields mean: offsets, the
//! decoded Capabilities register, CC values, and the registers of the
//! controller memory buffer and the persistent memory region. Pure: the
//! driver reads the values, this module interprets them.

use std::time::Duration;

/// Controller Capabilities (64 bit).
pub const CAP: u64 = 0x00;
/// Version (32 bit).
pub const VS: u64 = 0x08;
/// Controller Configuration.
pub const CC: u64 = 0x14;
/// Controller Status.
pub const CSTS: u64 = 0x1c;
/// Admin Queue Attributes.
pub const AQA: u64 = 0x24;
/// Admin Submission Queue base address (64 bit).
pub const ASQ: u64 = 0x28;
/// Admin Completion Queue base address (64 bit).
pub const ACQ: u64 = 0x30;
/// Controller Memory Buffer Location.
pub const CMBLOC: u64 = 0x38;
/// Controller Memory Buffer Size.
pub const CMBSZ: u64 = 0x3c;
/// Controller Memory Buffer Memory Space Control (64 bit, NVMe 1.4).
pub const CMBMSC: u64 = 0x50;
/// Where the doorbells start.
pub const DOORBELLS: u64 = 0x1000;
/// Persistent Memory Region Capabilities (NVMe 1.4).
pub const PMRCAP: u64 = 0xe00;
/// Persistent Memory Region Control.
pub const PMRCTL: u64 = 0xe04;
/// Persistent Memory Region Status.
pub const PMRSTS: u64 = 0xe08;

/// CC.EN.
pub const CC_EN: u32 = 1;
/// CC.SHN = normal shutdown.
pub const CC_SHN_NORMAL: u32 = 1 << 14;
/// CSTS.RDY.
pub const CSTS_RDY: u32 = 1;
/// CSTS.CFS: controller fatal status.
pub const CSTS_CFS: u32 = 1 << 1;
/// CSTS.SHST mask and "shutdown complete".
pub const CSTS_SHST_MASK: u32 = 3 << 2;
/// CSTS.SHST = shutdown processing complete.
pub const CSTS_SHST_DONE: u32 = 2 << 2;
/// CMBMSC.CRE: the host will use the CMB registers (CMBLOC/CMBSZ read as 0
/// until it is set, on controllers with CAP.CMBS).
pub const CMBMSC_CRE: u64 = 1;

/// PMRCTL.EN: the region answers accesses to its BAR.
pub const PMRCTL_EN: u32 = 1;
/// PMRSTS.NRDY: the region is not ready.
pub const PMRSTS_NRDY: u32 = 1 << 8;

/// The memory page size the driver uses (CC.MPS = 0): 4 KiB, the smallest
/// every controller supports and the host's page size.
pub const PAGE: u64 = 4096;

/// The Controller Capabilities register, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Maximum Queue Entries Supported, as a count (the field plus one).
    pub max_queue_entries: u32,
    /// Contiguous Queues Required.
    pub contiguous_queues: bool,
    /// Worst-case time to become ready or not ready (CAP.TO × 500 ms).
    pub timeout: Duration,
    /// Doorbell stride in bytes (4 << CAP.DSTRD).
    pub doorbell_stride: u64,
    /// Whether the NVM command set is supported (CAP.CSS bit 0).
    pub nvm_command_set: bool,
    /// Smallest memory page size, in bytes (4 KiB << CAP.MPSMIN).
    pub page_size_min: u64,
    /// Largest memory page size, in bytes (4 KiB << CAP.MPSMAX).
    pub page_size_max: u64,
    /// Persistent Memory Region Supported.
    pub pmr_supported: bool,
    /// Controller Memory Buffer Supported (CAP.CMBS): CMBMSC exists and
    /// CMBLOC/CMBSZ read as zero until CMBMSC.CRE is set.
    pub cmb_msc: bool,
}

impl Capabilities {
    /// Decodes the 64-bit CAP value.
    ///
    /// ```
    /// use dmabuf_p2p_engine::nvme::regs::Capabilities;
    /// // QEMU 7.2's NVMe: MQES 0x7ff, CQR, TO 15, NVM command set, CMBS.
    /// let cap = Capabilities::decode(0x0200_0020_0f01_07ff);
    /// assert_eq!(cap.max_queue_entries, 0x800);
    /// assert_eq!(cap.timeout.as_millis(), 7500);
    /// assert!(cap.nvm_command_set && cap.cmb_msc);
    /// ```
    pub fn decode(cap: u64) -> Self {
        let field = |shift: u32, bits: u32| (cap >> shift) & ((1u64 << bits) - 1);
        Self {
            max_queue_entries: u32::try_from(field(0, 16)).unwrap_or(0) + 1,
            contiguous_queues: field(16, 1) == 1,
            timeout: Duration::from_millis(500 * field(24, 8)),
            doorbell_stride: 4 << field(32, 4),
            nvm_command_set: field(37, 1) == 1,
            page_size_min: PAGE << field(48, 4),
            page_size_max: PAGE << field(52, 4),
            pmr_supported: field(56, 1) == 1,
            cmb_msc: field(57, 1) == 1,
        }
    }

    /// Byte offset in BAR0 of the submission queue `qid` tail doorbell.
    pub fn sq_doorbell(&self, qid: u16) -> u64 {
        DOORBELLS + 2 * u64::from(qid) * self.doorbell_stride
    }

    /// Byte offset in BAR0 of the completion queue `qid` head doorbell.
    pub fn cq_doorbell(&self, qid: u16) -> u64 {
        DOORBELLS + (2 * u64::from(qid) + 1) * self.doorbell_stride
    }
}

/// The CC value that enables the controller with the NVM command set, 4 KiB
/// pages, round-robin arbitration and 64-byte/16-byte queue entries.
pub const CC_ENABLE: u32 = CC_EN | (6 << 16) | (4 << 20);

/// The NVMe version, from VS.
///
/// ```
/// use dmabuf_p2p_engine::nvme::regs::version;
/// assert_eq!(version(0x0001_0400), (1, 4, 0));
/// ```
pub fn version(vs: u32) -> (u16, u8, u8) {
    ((vs >> 16) as u16, (vs >> 8) as u8, vs as u8)
}

/// AQA for admin queues of `sq` and `cq` entries.
pub fn aqa(sq: u32, cq: u32) -> u32 {
    ((cq - 1) << 16) | (sq - 1)
}

/// The controller memory buffer, from CMBLOC and CMBSZ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct CmbInfo {
    /// The BAR that holds it (CMBLOC.BIR).
    pub bar: u32,
    /// Its offset in that BAR, in bytes.
    pub offset: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Submission queues may live in it (CMBSZ.SQS).
    pub submission_queues: bool,
    /// Completion queues may live in it (CMBSZ.CQS).
    pub completion_queues: bool,
    /// PRP/SGL lists may live in it (CMBSZ.LISTS).
    pub lists: bool,
    /// Read data (controller to host transfers) may target it (CMBSZ.RDS).
    pub read_data: bool,
    /// Write data may come from it (CMBSZ.WDS).
    pub write_data: bool,
}

impl CmbInfo {
    /// Decodes CMBLOC and CMBSZ; `None` when CMBSZ is zero (no CMB, or its
    /// registers not enabled).
    ///
    /// ```
    /// use dmabuf_p2p_engine::nvme::regs::CmbInfo;
    /// // BAR2, 16 MiB in 1 MiB units, SQS, RDS and WDS.
    /// let cmb = CmbInfo::decode(2, (16 << 12) | (2 << 8) | 0b11001).unwrap();
    /// assert_eq!((cmb.bar, cmb.offset, cmb.size), (2, 0, 16 << 20));
    /// assert!(cmb.read_data && cmb.write_data && !cmb.lists);
    /// assert!(CmbInfo::decode(0, 0).is_none());
    /// ```
    pub fn decode(cmbloc: u32, cmbsz: u32) -> Option<Self> {
        if cmbsz == 0 {
            return None;
        }
        // SZU: 4 KiB << (4 × SZU), SZU 0..=6.
        let szu = (cmbsz >> 8) & 0xf;
        let unit = if szu <= 6 { PAGE << (4 * szu) } else { 0 };
        let units = u64::from(cmbsz >> 12);
        Some(Self {
            bar: cmbloc & 0x7,
            offset: u64::from(cmbloc >> 12).saturating_mul(unit),
            size: units.saturating_mul(unit),
            submission_queues: cmbsz & 1 != 0,
            completion_queues: cmbsz & 2 != 0,
            lists: cmbsz & 4 != 0,
            read_data: cmbsz & 8 != 0,
            write_data: cmbsz & 16 != 0,
        })
    }
}

/// The persistent memory region, from PMRCAP: it takes a whole BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PmrInfo {
    /// The BAR that holds it (PMRCAP.BIR, 2 to 5).
    pub bar: u32,
    /// Its size in bytes: the BAR's.
    pub size: u64,
    /// Read data (controller to host transfers) may target it (PMRCAP.RDS).
    pub read_data: bool,
    /// Write data may come from it (PMRCAP.WDS).
    pub write_data: bool,
    /// Longest time the region may take to become ready (PMRCAP.PMRTO in
    /// PMRCAP.PMRTU units: 500 ms or minutes).
    pub timeout: Duration,
}

impl PmrInfo {
    /// The BAR PMRCAP.BIR names, if a region may live there (2 to 5: BAR0
    /// and BAR1 hold the registers, 6 and 7 are no BAR).
    pub fn bar_of(pmrcap: u32) -> Option<u32> {
        Some((pmrcap >> 5) & 0x7).filter(|bar| (2..=5).contains(bar))
    }

    /// Decodes PMRCAP for a region in a BAR of `bar_size` bytes; `None`
    /// when PMRCAP names no BAR the region may live in (BIR outside 2..=5).
    ///
    /// ```
    /// use std::time::Duration;
    /// use dmabuf_p2p_engine::nvme::regs::PmrInfo;
    /// // BIR 4, RDS and WDS, PMRTO 2 in 500 ms units.
    /// let pmr = PmrInfo::decode((2 << 16) | (4 << 5) | 0b1_1000, 16 << 20).unwrap();
    /// assert_eq!((pmr.bar, pmr.size), (4, 16 << 20));
    /// assert!(pmr.read_data && pmr.write_data);
    /// assert_eq!(pmr.timeout, Duration::from_secs(1));
    /// assert!(PmrInfo::decode(0, 0).is_none());
    /// ```
    pub fn decode(pmrcap: u32, bar_size: u64) -> Option<Self> {
        let bar = Self::bar_of(pmrcap)?;
        let units = u64::from((pmrcap >> 16) & 0xff);
        let timeout = match (pmrcap >> 8) & 0x3 {
            0 => Duration::from_millis(500 * units),
            _ => Duration::from_secs(60 * units),
        };
        Some(Self {
            bar,
            size: bar_size,
            read_data: pmrcap & (1 << 3) != 0,
            write_data: pmrcap & (1 << 4) != 0,
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbells_follow_the_stride() {
        let cap = Capabilities::decode(0);
        assert_eq!(cap.doorbell_stride, 4);
        assert_eq!(cap.sq_doorbell(0), 0x1000);
        assert_eq!(cap.cq_doorbell(0), 0x1004);
        assert_eq!(cap.sq_doorbell(1), 0x1008);
        assert_eq!(cap.cq_doorbell(1), 0x100c);
        let wide = Capabilities::decode(2 << 32);
        assert_eq!(wide.doorbell_stride, 16);
        assert_eq!(wide.cq_doorbell(1), 0x1000 + 3 * 16);
    }

    #[test]
    fn cap_fields() {
        let cap = Capabilities::decode((1 << 48) | (3 << 52) | (1 << 56) | (0x3f << 24) | 1);
        assert_eq!(cap.max_queue_entries, 2);
        assert_eq!(cap.page_size_min, 8192);
        assert_eq!(cap.page_size_max, 32768);
        assert!(cap.pmr_supported && !cap.cmb_msc && !cap.nvm_command_set);
        assert_eq!(cap.timeout, Duration::from_millis(0x3f * 500));
    }

    #[test]
    fn cc_and_aqa() {
        assert_eq!(CC_ENABLE, 0x0046_0001);
        assert_eq!(aqa(32, 32), 0x001f_001f);
    }

    #[test]
    fn cmb_offset_and_reserved_unit() {
        let cmb = CmbInfo::decode((3 << 12) | 4, (2 << 12) | (1 << 8) | 4).unwrap();
        assert_eq!((cmb.bar, cmb.offset, cmb.size), (4, 3 * 65536, 2 * 65536));
        assert!(cmb.lists);
        let bad = CmbInfo::decode(0, (1 << 12) | (7 << 8)).unwrap();
        assert_eq!(bad.size, 0);
    }
}
