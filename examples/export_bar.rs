//! Export a range of a PCI BAR as a dma-buf and map it for peer devices as an
//! attachment that follows revocation.
//!
//! Needs Linux 7.2 with iommufd and a device bound to `vfio-pci` (in the
//! bundled VM: `0000:02:00.0`, an ivshmem device with memory in BAR2):
//!
//! ```sh
//! cargo run --example export_bar -- 0000:02:00.0 2
//! ```

use std::error::Error;

use dmabuf_p2p::revoke::{Attachment, RestorePolicy, RevocationEvent};
use dmabuf_p2p::{ByteRange, Iommufd, IovaPlacement, MapPerms, PciAddress, VfioPciDevice};

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let device: PciAddress = args.next().as_deref().unwrap_or("0000:02:00.0").parse()?;
    let bar: u32 = args.next().as_deref().unwrap_or("2").parse()?;

    // One iommufd, one IO address space that peer devices attach to.
    let iommufd = Iommufd::open()?;
    let ioas = iommufd.alloc_ioas()?;

    // The exporter: bound to the iommufd, memory decode on (an export made
    // while it is off is born revoked).
    let mut exporter = VfioPciDevice::open(device)?;
    exporter.bind(&iommufd)?;
    exporter.set_memory_decode(true)?;
    let export = exporter.export_bar(bar, &[ByteRange::new(0, 0x1_0000)])?;
    println!("exported: {export}");

    // The importer's hold: mapped at an IOVA, torn down on revocation and
    // mapped again at the same IOVA when the BAR is back.
    let att = Attachment::map(
        &export,
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )?;
    att.on_event(|info, event| match event {
        RevocationEvent::Revoked(why) => println!("IOVA {:#x} revoked: {why}", info.iova),
        RevocationEvent::Restored => println!("IOVA {:#x} live again", info.iova),
        other => println!("{other:?}"),
    });
    println!(
        "peer devices reach it at IOVA {:#x} (physical {:?})",
        att.iova(),
        att.phys_ranges()
    );

    // Revoke and restore, as a guest turning memory decode off and on would.
    let iova = att.iova();
    exporter.set_memory_decode(false)?;
    assert!(att.is_revoked());
    exporter.set_memory_decode(true)?;
    att.ensure_live()?;
    assert_eq!(att.iova(), iova);
    Ok(())
}
