//! The Intel IOMMU's host address width: how high a physical address its
//! page tables can point to. The ACPI DMAR table declares it (`struct
//! acpi_table_dmar` in `include/acpi/actbl1.h`: the byte after the 36-byte
//! table header holds the width minus one; the kernel's
//! `parse_dmar_table` logs it as "DMAR: Host address width N").
//!
//! On real hardware the width covers every BAR. On a virtual IOMMU it need
//! not: QEMU's `intel-iommu,aw-bits=39` declares 39 bits while the 64-bit
//! PCI window may lie above 512 GiB, and a page-table entry pointing there
//! has "non-zero reserved fields" (fault reason 0x0c): DMA translated to
//! such a BAR never arrives.
//!
//! The table is readable by root only (`/sys/firmware/acpi/tables/DMAR`,
//! mode 0400). AMD's IVRS table has no such field the kernel reads.

use std::io;

use crate::error::{Error, Result};
use crate::sysfs::Sysfs;

use super::capability::Probe;

/// The size of an ACPI table header (`struct acpi_table_header`).
const ACPI_HEADER_SIZE: usize = 36;

/// The host address width in bits declared by a DMAR table's bytes.
///
/// ```
/// use dmabuf_p2p::topology::parse_dmar_width;
/// let mut table = b"DMAR".to_vec();
/// table.resize(48, 0);
/// table[36] = 38; // width minus one
/// assert_eq!(parse_dmar_width(&table)?, 39);
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
pub fn parse_dmar_width(table: &[u8]) -> Result<u8> {
    let bad = |problem: &str| Error::Parse {
        what: "ACPI DMAR table",
        input: format!("{} bytes", table.len()),
        problem: problem.to_owned(),
    };
    if !table.starts_with(b"DMAR") {
        return Err(bad("does not start with the signature DMAR"));
    }
    let width = *table
        .get(ACPI_HEADER_SIZE)
        .ok_or_else(|| bad("ends before the host address width"))?;
    // parse_dmar_table refuses a width below PAGE_SHIFT - 1.
    if width < 11 {
        return Err(bad(
            "host address width below 12 bits (the kernel calls it invalid)",
        ));
    }
    width
        .checked_add(1)
        .filter(|w| *w <= 64)
        .ok_or_else(|| bad("host address width above 64 bits"))
}

/// The host address width from `<root>/firmware/acpi/tables/DMAR`:
/// `Absent` without an Intel IOMMU table, `Unreadable` without the right to
/// read it (root only).
pub fn host_address_width(sysfs: &Sysfs) -> Result<Probe<u8>> {
    let path = sysfs.root().join("firmware/acpi/tables/DMAR");
    match std::fs::read(&path) {
        Ok(bytes) => parse_dmar_width(&bytes).map(Probe::Present),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Probe::Absent),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Ok(Probe::Unreadable),
        Err(e) => Err(Error::sys("read", path.display().to_string(), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_tables_are_parse_errors() {
        assert!(parse_dmar_width(b"IVRS").is_err());
        assert!(parse_dmar_width(b"DMAR").is_err());
        let mut t = b"DMAR".to_vec();
        t.resize(38, 0);
        t[36] = 3;
        assert!(parse_dmar_width(&t).is_err());
        t[36] = 64;
        assert!(parse_dmar_width(&t).is_err());
        t[36] = 45;
        assert_eq!(parse_dmar_width(&t).unwrap(), 46);
    }
}
