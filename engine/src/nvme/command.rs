//! NVMe commands as bytes: the 64-byte submission queue entry, the 16-byte
//! completion queue entry, and the completion status with its names.

use std::fmt;

/// Admin opcodes the driver sends.
pub mod admin {
    /// Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Delete I/O Submission Queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Delete I/O Completion Queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Doorbell Buffer Config (NVMe 1.3, OACS bit 8).
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
}

/// NVM command set opcodes the driver sends.
pub mod nvm {
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace.
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u32 = 0x01;
}

/// Feature identifier: Number of Queues.
pub const FEATURE_NUM_QUEUES: u32 = 0x07;

/// A submission queue entry (PRP data pointer, PSDT 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode.
    pub opcode: u8,
    /// Command identifier, echoed in the completion.
    pub cid: u16,
    /// Namespace ID.
    pub nsid: u32,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (second page or PRP list).
    pub prp2: u64,
    /// Command dwords 10..=15.
    pub cdw: [u32; 6],
}

impl Command {
    /// A Read (`write == false`) or Write of `blocks` logical blocks (1..=65536)
    /// from `lba`.
    pub fn read_write(write: bool, nsid: u32, lba: u64, blocks: u32) -> Self {
        Self {
            opcode: if write { nvm::WRITE } else { nvm::READ },
            nsid,
            cdw: [
                lba as u32,
                (lba >> 32) as u32,
                blocks.saturating_sub(1) & 0xffff,
                0,
                0,
                0,
            ],
            ..Self::default()
        }
    }

    /// Identify with `cns` for `nsid` into the page at `prp1`.
    pub fn identify(cns: u32, nsid: u32, prp1: u64) -> Self {
        Self {
            opcode: admin::IDENTIFY,
            nsid,
            prp1,
            cdw: [cns, 0, 0, 0, 0, 0],
            ..Self::default()
        }
    }

    /// Create I/O Completion Queue `qid` of `entries` at `base`, physically
    /// contiguous, raising interrupt vector `vector` when `interrupts`.
    pub fn create_io_cq(qid: u16, entries: u32, base: u64, vector: u16, interrupts: bool) -> Self {
        Self {
            opcode: admin::CREATE_IO_CQ,
            prp1: base,
            cdw: [
                ((entries - 1) << 16) | u32::from(qid),
                (u32::from(vector) << 16) | (u32::from(interrupts) << 1) | 1,
                0,
                0,
                0,
                0,
            ],
            ..Self::default()
        }
    }

    /// Create I/O Submission Queue `qid` of `entries` at `base`, completing
    /// into completion queue `cqid`, physically contiguous.
    pub fn create_io_sq(qid: u16, entries: u32, base: u64, cqid: u16) -> Self {
        Self {
            opcode: admin::CREATE_IO_SQ,
            prp1: base,
            cdw: [
                ((entries - 1) << 16) | u32::from(qid),
                (u32::from(cqid) << 16) | 1,
                0,
                0,
                0,
                0,
            ],
            ..Self::default()
        }
    }

    /// Delete I/O queue `qid` (`submission` or completion).
    pub fn delete_io_queue(submission: bool, qid: u16) -> Self {
        Self {
            opcode: if submission {
                admin::DELETE_IO_SQ
            } else {
                admin::DELETE_IO_CQ
            },
            cdw: [u32::from(qid), 0, 0, 0, 0, 0],
            ..Self::default()
        }
    }

    /// Abort command `cid` of submission queue `sqid` (dword 0 bit 0 of its
    /// completion set: not aborted).
    ///
    /// ```
    /// use dmabuf_p2p_engine::nvme::command::Command;
    /// let c = Command::abort(3, 17);
    /// assert_eq!((c.opcode, c.cdw[0]), (0x08, (17 << 16) | 3));
    /// ```
    pub fn abort(sqid: u16, cid: u16) -> Self {
        Self {
            opcode: admin::ABORT,
            cdw: [u32::from(sqid) | (u32::from(cid) << 16), 0, 0, 0, 0, 0],
            ..Self::default()
        }
    }

    /// Doorbell Buffer Config: the shadow doorbell buffer at IOVA `shadow`
    /// (PRP1) and the event index buffer at `eventidx` (PRP2), each a
    /// page-aligned memory page.
    ///
    /// ```
    /// use dmabuf_p2p_engine::nvme::command::Command;
    /// let c = Command::doorbell_buffer_config(0x1000, 0x2000);
    /// assert_eq!((c.opcode, c.prp1, c.prp2), (0x7c, 0x1000, 0x2000));
    /// ```
    pub fn doorbell_buffer_config(shadow: u64, eventidx: u64) -> Self {
        Self {
            opcode: admin::DOORBELL_BUFFER_CONFIG,
            prp1: shadow,
            prp2: eventidx,
            ..Self::default()
        }
    }

    /// Set Features: Number of Queues, asking for `sq` and `cq` I/O queues.
    pub fn set_num_queues(sq: u16, cq: u16) -> Self {
        Self {
            opcode: admin::SET_FEATURES,
            cdw: [
                FEATURE_NUM_QUEUES,
                (u32::from(cq - 1) << 16) | u32::from(sq - 1),
                0,
                0,
                0,
                0,
            ],
            ..Self::default()
        }
    }

    /// The 64 bytes of the submission queue entry, little-endian.
    ///
    /// ```
    /// use dmabuf_p2p_engine::nvme::command::Command;
    /// let mut c = Command::read_write(false, 1, 0x1_0000_0002, 8);
    /// c.cid = 7;
    /// c.prp1 = 0x1000;
    /// let b = c.to_bytes();
    /// assert_eq!(&b[0..4], &[0x02, 0, 7, 0]); // opcode, flags, CID
    /// assert_eq!(&b[4..8], &[1, 0, 0, 0]); // NSID
    /// assert_eq!(&b[24..32], &0x1000u64.to_le_bytes()); // PRP1
    /// assert_eq!(&b[40..48], &[2, 0, 0, 0, 1, 0, 0, 0]); // SLBA
    /// assert_eq!(&b[48..52], &[7, 0, 0, 0]); // NLB, zero-based
    /// ```
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        let dw0 = u32::from(self.opcode) | (u32::from(self.cid) << 16);
        b[0..4].copy_from_slice(&dw0.to_le_bytes());
        b[4..8].copy_from_slice(&self.nsid.to_le_bytes());
        b[24..32].copy_from_slice(&self.prp1.to_le_bytes());
        b[32..40].copy_from_slice(&self.prp2.to_le_bytes());
        for (i, dw) in self.cdw.iter().enumerate() {
            let at = 40 + 4 * i;
            b[at..at + 4].copy_from_slice(&dw.to_le_bytes());
        }
        b
    }

    /// A short name of the command for messages.
    pub fn name(&self, admin_queue: bool) -> &'static str {
        opcode_name(self.opcode, admin_queue)
    }
}

/// The name of `opcode` on an admin or I/O queue.
pub fn opcode_name(opcode: u8, admin_queue: bool) -> &'static str {
    match (admin_queue, opcode) {
        (true, admin::CREATE_IO_SQ) => "Create I/O Submission Queue",
        (true, admin::CREATE_IO_CQ) => "Create I/O Completion Queue",
        (true, admin::DELETE_IO_SQ) => "Delete I/O Submission Queue",
        (true, admin::DELETE_IO_CQ) => "Delete I/O Completion Queue",
        (true, admin::IDENTIFY) => "Identify",
        (true, admin::SET_FEATURES) => "Set Features",
        (true, admin::ABORT) => "Abort",
        (true, admin::DOORBELL_BUFFER_CONFIG) => "Doorbell Buffer Config",
        (false, nvm::READ) => "Read",
        (false, nvm::WRITE) => "Write",
        _ => "command",
    }
}

/// A completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Command specific dword 0.
    pub result: u32,
    /// Submission queue head pointer.
    pub sq_head: u16,
    /// Submission queue the command came from.
    pub sq_id: u16,
    /// The command's identifier.
    pub cid: u16,
    /// The phase tag.
    pub phase: bool,
    /// The status.
    pub status: Status,
}

impl Completion {
    /// Decodes the 16 bytes of a completion queue entry.
    ///
    /// ```
    /// use dmabuf_p2p_engine::nvme::command::Completion;
    /// let mut e = [0u8; 16];
    /// e[8] = 3; // SQ head
    /// e[12] = 9; // CID
    /// e[14] = 0x09; // phase 1, status code 0x04
    /// let c = Completion::decode(&e);
    /// assert_eq!((c.sq_head, c.cid, c.phase), (3, 9, true));
    /// assert!(c.status.is_data_transfer_error());
    /// ```
    pub fn decode(b: &[u8; 16]) -> Self {
        let dw =
            |i: usize| u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
        let (dw2, dw3) = (dw(2), dw(3));
        Self {
            result: dw(0),
            sq_head: dw2 as u16,
            sq_id: (dw2 >> 16) as u16,
            cid: dw3 as u16,
            phase: dw3 & (1 << 16) != 0,
            status: Status::from_field((dw3 >> 17) as u16),
        }
    }
}

/// A completion status: Status Code Type and Status Code, with the
/// Do Not Retry bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Status {
    /// Status Code Type (0 generic, 1 command specific, 2 media and data
    /// integrity, 3 path related, 7 vendor specific).
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
    /// Do Not Retry.
    pub dnr: bool,
}

impl Status {
    /// Success.
    pub const SUCCESS: Self = Self {
        sct: 0,
        sc: 0,
        dnr: false,
    };

    /// From the 15-bit status field (CQE dword 3 bits 31:17).
    pub fn from_field(sf: u16) -> Self {
        Self {
            sc: sf as u8,
            sct: ((sf >> 8) & 0x7) as u8,
            dnr: sf & (1 << 14) != 0,
        }
    }

    /// Whether the command succeeded.
    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// Generic 0x04: the controller could not move the data, e.g. because the
    /// IOMMU refused the address.
    pub fn is_data_transfer_error(&self) -> bool {
        self.sct == 0 && self.sc == 0x04
    }

    /// Generic 0x0b: the namespace does not exist or is not active.
    pub fn is_invalid_namespace(&self) -> bool {
        self.sct == 0 && self.sc == 0x0b
    }

    /// Generic 0x80: LBA out of range.
    pub fn is_lba_out_of_range(&self) -> bool {
        self.sct == 0 && self.sc == 0x80
    }

    /// The spec's name of the status, or "unknown".
    pub fn name(&self) -> &'static str {
        match (self.sct, self.sc) {
            (0, 0x00) => "Successful Completion",
            (0, 0x01) => "Invalid Command Opcode",
            (0, 0x02) => "Invalid Field in Command",
            (0, 0x03) => "Command ID Conflict",
            (0, 0x04) => "Data Transfer Error",
            (0, 0x05) => "Commands Aborted due to Power Loss Notification",
            (0, 0x06) => "Internal Error",
            (0, 0x07) => "Command Abort Requested",
            (0, 0x08) => "Command Aborted due to SQ Deletion",
            (0, 0x0b) => "Invalid Namespace or Format",
            (0, 0x0d) => "Invalid SGL Segment Descriptor",
            (0, 0x13) => "PRP Offset Invalid",
            (0, 0x80) => "LBA Out of Range",
            (0, 0x81) => "Capacity Exceeded",
            (0, 0x82) => "Namespace Not Ready",
            (1, 0x00) => "Completion Queue Invalid",
            (1, 0x01) => "Invalid Queue Identifier",
            (1, 0x02) => "Invalid Queue Size",
            (1, 0x08) => "Invalid Interrupt Vector",
            (1, 0x0d) => "Feature Identifier Not Saveable",
            (2, 0x80) => "Write Fault",
            (2, 0x81) => "Unrecovered Read Error",
            (2, 0x86) => "Access Denied",
            _ => "unknown status",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.sct {
            0 => "generic",
            1 => "command specific",
            2 => "media error",
            3 => "path error",
            7 => "vendor specific",
            _ => "reserved type",
        };
        write!(f, "{} ({kind} {:#04x}", self.name(), self.sc)?;
        if self.dnr {
            write!(f, ", do not retry")?;
        }
        write!(f, ")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_creation_dwords() {
        let cq = Command::create_io_cq(1, 64, 0x3000, 0, true);
        assert_eq!(cq.opcode, 0x05);
        assert_eq!(cq.cdw[0], (63 << 16) | 1);
        assert_eq!(cq.cdw[1], 0b11);
        let polled = Command::create_io_cq(1, 64, 0x3000, 0, false);
        assert_eq!(polled.cdw[1], 0b01);
        let sq = Command::create_io_sq(1, 64, 0x2000, 1);
        assert_eq!(sq.cdw[1], (1 << 16) | 1);
        assert_eq!(Command::set_num_queues(1, 1).cdw[..2], [7, 0]);
        assert_eq!(Command::delete_io_queue(false, 1).opcode, 0x04);
    }

    #[test]
    fn write_is_opcode_1_and_nlb_is_zero_based() {
        let w = Command::read_write(true, 2, 5, 1);
        assert_eq!((w.opcode, w.nsid, w.cdw[0], w.cdw[2]), (1, 2, 5, 0));
        let max = Command::read_write(false, 1, 0, 65536);
        assert_eq!(max.cdw[2], 0xffff);
    }

    #[test]
    fn identify_bytes() {
        let b = Command::identify(cns::CONTROLLER, 0, 0x4000).to_bytes();
        assert_eq!(b[0], 0x06);
        assert_eq!(&b[40..44], &[1, 0, 0, 0]);
        assert_eq!(&b[24..32], &0x4000u64.to_le_bytes());
    }

    #[test]
    fn status_field_decodes() {
        // SCT 2, SC 0x81, DNR.
        let s = Status::from_field((1 << 14) | (2 << 8) | 0x81);
        assert_eq!((s.sct, s.sc, s.dnr), (2, 0x81, true));
        assert_eq!(
            s.to_string(),
            "Unrecovered Read Error (media error 0x81, do not retry)"
        );
        assert!(Status::from_field(0).is_success());
        assert!(Status::from_field(0x0b).is_invalid_namespace());
        assert!(Status::from_field(0x80).is_lba_out_of_range());
        assert_eq!(
            Status::from_field(0x04).to_string(),
            "Data Transfer Error (generic 0x04)"
        );
    }

    #[test]
    fn completion_fields() {
        let mut e = [0u8; 16];
        e[0..4].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        e[8..12].copy_from_slice(&((1u32 << 16) | 5).to_le_bytes());
        let dw3: u32 = 0x1234 | (0x0b << 17); // phase 0
        e[12..16].copy_from_slice(&dw3.to_le_bytes());
        let c = Completion::decode(&e);
        assert_eq!(c.result, 0xdead_beef);
        assert_eq!((c.sq_head, c.sq_id, c.cid, c.phase), (5, 1, 0x1234, false));
        assert!(c.status.is_invalid_namespace());
    }
}
