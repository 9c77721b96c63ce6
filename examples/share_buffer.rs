//! Pass a BAR buffer to another process: this program serves an export on a
//! Unix socket and starts itself again as the importer, which maps the buffer
//! into its own IO address space and follows the exporter's revocation.
//!
//! Needs the `share` feature, Linux 7.2 with iommufd and a device bound to
//! `vfio-pci` (in the bundled VM: `0000:02:00.0`, BAR2):
//!
//! ```sh
//! cargo run --example share_buffer --features share -- 0000:02:00.0
//! ```

use std::error::Error;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use dmabuf_p2p::revoke::{BufferState, RestorePolicy};
use dmabuf_p2p::share::{ShareServer, SharedBuffer, bind_listener, default_socket_path};
use dmabuf_p2p::{ByteRange, Iommufd, IovaPlacement, MapPerms, PciAddress, VfioPciDevice};

const TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [role, socket] if role == "import" => import(Path::new(socket)),
        [device] => export(device.parse()?),
        [] => export("0000:02:00.0".parse()?),
        _ => Err("usage: share_buffer [<bdf>] | share_buffer import <socket>".into()),
    }
}

/// The exporting process: owns the device, serves the export, revokes.
fn export(device: PciAddress) -> Result<(), Box<dyn Error>> {
    let iommufd = Iommufd::open()?;
    let mut exporter = VfioPciDevice::open(device)?;
    exporter.bind(&iommufd)?;
    exporter.set_memory_decode(true)?;
    let export = exporter.export_bar(2, &[ByteRange::new(0, 0x1_0000)])?;

    // Only processes of this user may connect (the default policy).
    let socket = default_socket_path(&format!("{device} BAR2 example"));
    let server = ShareServer::new(&export)?;
    server.listen(bind_listener(&socket)?)?;

    let mut importer = Command::new(std::env::current_exe()?)
        .arg("import")
        .arg(&socket)
        .stdout(Stdio::piped())
        .spawn()?;
    // Revoke once the importer has mapped the buffer, and restore once it
    // has seen the revocation: its lines (passed on here) say when.
    let mut lines = BufReader::new(importer.stdout.take().ok_or("no importer stdout")?).lines();
    let mut pass_on_until = |prefix: &str| -> Result<(), Box<dyn Error>> {
        for line in lines.by_ref() {
            let line = line?;
            println!("{line}");
            if line.starts_with(prefix) {
                return Ok(());
            }
        }
        Err(format!("the importer ended before saying {prefix:?}").into())
    };
    pass_on_until("importer: mapped")?;
    exporter.set_memory_decode(false)?;
    pass_on_until("importer: revoked")?;
    exporter.set_memory_decode(true)?;
    for line in lines {
        println!("{}", line?);
    }
    let status = importer.wait()?;
    // Removes the socket (the listener's file) with it.
    drop(server);
    if !status.success() {
        return Err(format!("the importer failed: {status}").into());
    }
    println!("exporter: done");
    Ok(())
}

/// The importing process: receives the buffer and maps it for its devices.
fn import(socket: &Path) -> Result<(), Box<dyn Error>> {
    let shared = SharedBuffer::connect(socket, TIMEOUT)?;
    println!(
        "importer: {} bytes of {}",
        shared.info().size,
        shared.info().exporter
    );
    let ioas = Iommufd::open()?.alloc_ioas()?;
    let att = shared.attach(
        &ioas,
        IovaPlacement::Auto,
        MapPerms::ReadWrite,
        RestorePolicy::Automatic,
    )?;
    let iova = att.iova();
    println!("importer: mapped at IOVA {iova:#x}");
    shared.wait_remote(TIMEOUT, |s| s != BufferState::Live)?;
    println!("importer: revoked by the exporter");
    shared.wait_remote(TIMEOUT, |s| s == BufferState::Live)?;
    att.ensure_live()?;
    assert_eq!(att.iova(), iova);
    println!("importer: live again at the same IOVA");
    Ok(())
}
