//! The options of `p2p-test`, shared by the copy-engine and the NVMe runs.

use dmabuf_p2p::PciAddress;
use dmabuf_p2p::range::parse_size;

use crate::target::TargetSpec;

/// Options of `p2p-test`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The engine device: a QEMU `edu` (1234:11e8) copies; an NVMe controller
    /// (class 0x010802) reads blocks. The kind is detected from the device.
    #[arg(long)]
    pub engine: PciAddress,
    /// The device whose BAR is the target: `<bdf>[:bar[:offset+len]]` (BAR 2 and
    /// its first 64 KiB by default; for an NVMe controller, its CMB, else its
    /// PMR).
    #[arg(long)]
    pub target: TargetSpec,
    /// Bytes per transfer (`4K`, `0x2000`, ...).
    #[arg(long, default_value = "4K", value_parser = parse_size_arg)]
    pub size: u64,
    /// Longest wait for one copy or command, in seconds.
    #[arg(long, default_value_t = 10, value_parser = super::timeout_secs)]
    pub timeout: u64,
    /// NVMe engine: the namespace to read.
    #[arg(long, default_value_t = 1)]
    pub nsid: u32,
    /// NVMe engine: the first block to read.
    #[arg(long, default_value_t = 0)]
    pub lba: u64,
    /// NVMe engine: blocks per read (default: --size in blocks).
    #[arg(long)]
    pub blocks: Option<u64>,
    /// NVMe engine: allow writing these blocks, `<lba>+<count>` (a write test
    /// that puts the original data back). Without it nothing is written.
    #[arg(long)]
    pub allow_write: Option<WriteAllowance>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// Blocks the caller allows to be written: `<lba>+<count>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAllowance {
    /// First block.
    pub lba: u64,
    /// Number of blocks.
    pub count: u64,
}

impl std::str::FromStr for WriteAllowance {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected <lba>+<count>, e.g. 2048+8");
        let (lba, count) = s.split_once('+').ok_or_else(bad)?;
        let num = |t: &str| match t.trim().strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).map_err(|_| bad()),
            None => t.trim().parse::<u64>().map_err(|_| bad()),
        };
        let (lba, count) = (num(lba)?, num(count)?);
        if count == 0 {
            return Err(format!("{s:?}: the count must not be zero"));
        }
        Ok(Self { lba, count })
    }
}
