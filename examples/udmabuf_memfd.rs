//! Turn memfd pages into a dma-buf with udmabuf, then read what was written to
//! the memfd through a CPU mapping of the dma-buf: the same pages.
//!
//! Needs `/dev/udmabuf` (the `udmabuf` module) and access to it:
//!
//! ```sh
//! cargo run --example udmabuf_memfd
//! ```

use std::error::Error;
use std::os::fd::AsFd;

use dmabuf_p2p::exporter::udmabuf::Udmabuf;
use dmabuf_p2p::memfd::Memfd;

fn main() -> Result<(), Box<dyn Error>> {
    const SIZE: u64 = 0x4000;
    // udmabuf wants a sealed-against-shrinking memfd; `Memfd::new` makes one.
    let memfd = Memfd::new("example", SIZE)?;
    memfd.write_at(0x1000, b"written through the memfd")?;

    let udmabuf = Udmabuf::open()?;
    println!("udmabuf limits: {:?}", udmabuf.limits());
    let buf = udmabuf.create(memfd.as_fd(), 0, SIZE)?;
    println!("dma-buf: {}", buf.fdinfo()?.exp_name);

    let map = buf.mmap()?;
    let mut seen = [0u8; 25];
    map.read(0x1000, &mut seen)?;
    assert_eq!(&seen, b"written through the memfd");
    println!("the dma-buf shows the memfd's bytes");
    Ok(())
}
