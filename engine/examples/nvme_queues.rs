//! Several NVMe I/O queues at depth, one per thread: reads the first
//! `queues × 1 MiB` of namespace 1 of the controller at the given PCI
//! address (bound to `vfio-pci`) into host memory, 4 KiB per command,
//! `depth` commands in flight on each queue, and prints a hash of what it
//! read (FNV-1a, 64 bits) to compare with the device's contents.
//!
//! ```sh
//! nvme_queues 0000:0f:00.0 [queues] [depth] [prepared]
//! ```
//!
//! With `prepared`, the queues then read it all again, into cleared
//! memory, with prepared commands (`IoQueue::prepare`), and the hash is of
//! that second read.
//!
//! The part between the `guide` markers is the one in the README and in
//! `docs/GUIDE.md` (a host test keeps them the same).

use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmabuf_p2p::memfd::Memfd;
use dmabuf_p2p::{ByteRange, IoasMapping, Iommufd, IovaPlacement, MapPerms};
use dmabuf_p2p_engine::nvme::{Dma, IoQueue, Nvme, NvmeOptions, Op, QueueOptions};

/// Bytes each queue reads.
const PER_QUEUE: u64 = 1 << 20;

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let bdf = args
        .next()
        .ok_or("usage: nvme_queues <nvme-bdf> [queues] [depth] [prepared]")?;
    let queues: u16 = args.next().map_or(Ok(2), |a| a.parse())?;
    let depth: u16 = args.next().map_or(Ok(32), |a| a.parse())?;
    let prepared = match args.next().as_deref() {
        None => false,
        Some("prepared") => true,
        Some(other) => return Err(format!("unknown mode {other:?} (prepared)").into()),
    };
    let ioas = Iommufd::open()?.alloc_ioas()?;
    let start = Instant::now();

    // guide:start
    // The controller grants `queues` I/O queue pairs besides its own.
    let nvme = Nvme::open_with_options(
        bdf.parse()?,
        &ioas,
        NvmeOptions::new().io_queues(queues + 1),
    )?;
    let block = nvme
        .namespace()
        .ok_or("namespace 1 is not active")?
        .block_size;
    let mut work = Vec::new();
    for t in 0..u64::from(queues) {
        let q = nvme.create_queue(QueueOptions::new().depth(depth))?;
        let mem = Memfd::new("nvme-queues", PER_QUEUE)?;
        let buf = ioas.map_file(
            &mem,
            ByteRange::new(0, PER_QUEUE),
            IovaPlacement::Auto,
            MapPerms::ReadWrite,
        )?;
        work.push((q, Arc::new(buf), mem, t * PER_QUEUE / block));
    }
    // One thread per queue: no lock between them.
    std::thread::scope(|s| {
        let threads: Vec<_> = work
            .iter_mut()
            .map(|(q, buf, _, lba)| s.spawn(|| read_at_depth(q, buf, *lba, block)))
            .collect();
        threads
            .into_iter()
            .try_for_each(|t| t.join().map_err(|_| "a reader panicked")?)
    })?;
    // guide:end
    if prepared {
        let clear = vec![0u8; PER_QUEUE as usize];
        for (_, _, mem, _) in &work {
            mem.write_at(0, &clear)?;
        }
        std::thread::scope(|s| {
            let threads: Vec<_> = work
                .iter_mut()
                .map(|(q, buf, mem, lba)| {
                    s.spawn(|| read_prepared(q, buf, mem, *lba, block).map_err(|e| e.to_string()))
                })
                .collect();
            threads
                .into_iter()
                .try_for_each(|t| t.join().map_err(|_| "a reader panicked")?)
        })?;
    }

    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut data = vec![0u8; PER_QUEUE as usize];
    for (_, _, mem, _) in &work {
        mem.read_at(0, &mut data)?;
        for &b in &data {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!(
        "read {} MiB with {queues} queue(s) at depth {depth} in {:.1} ms",
        (u64::from(queues) * PER_QUEUE) >> 20,
        start.elapsed().as_secs_f64() * 1e3
    );
    println!("fnv1a64 {hash:016x}");
    Ok(())
}

// guide:start
/// Reads `PER_QUEUE` bytes from `lba` into `buf`, 4 KiB per command,
/// keeping the queue full: a new read goes in as each one completes.
fn read_at_depth(
    q: &mut IoQueue,
    buf: &Arc<dmabuf_p2p::IoasMapping>,
    lba: u64,
    block: u64,
) -> Result<(), String> {
    let (chunk, chunks) = (4096, PER_QUEUE / 4096);
    let blocks = (chunk / block) as u32;
    let mut next = 0;
    loop {
        while next < chunks && q.in_flight() < usize::from(q.depth()) {
            // The queue holds `buf` until the controller is done with it.
            q.submit_read(
                lba + next * chunk / block,
                blocks,
                Dma::held(buf, next * chunk),
            )
            .map_err(|e| e.to_string())?;
            next += 1;
        }
        if q.in_flight() == 0 {
            return Ok(());
        }
        let done = q
            .wait_any(Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        q.check(done).map_err(|e| e.to_string())?; // a failed status is an error
    }
}
// guide:end

// guide:start
/// The same with prepared commands: `depth` slots of 4 KiB at the start of
/// `buf`, registered once (checks, PRPs, the command's entry), each
/// resubmitted as it completes; what a read brought is copied from its
/// slot to its place, and all of it back into `buf` at the end.
fn read_prepared(
    q: &mut IoQueue,
    buf: &Arc<IoasMapping>,
    mem: &Memfd,
    lba: u64,
    block: u64,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    let (chunk, chunks) = (4096, PER_QUEUE / 4096);
    let blocks = (chunk / block) as u32;
    let slots = u64::from(q.depth()).min(chunks);
    let bufs = (0..slots).map(|s| (Dma::held(buf, s * chunk), blocks));
    // The set and its slots live in the closure; a slot is its set's only.
    let out = q.prepare(
        bufs,
        |p, free| -> Result<Vec<u8>, Box<dyn Error + Send + Sync>> {
            let mut chunk_of = vec![0; slots as usize];
            let mut next = 0;
            for slot in free {
                chunk_of[usize::from(slot.index())] = next;
                p.submit(slot, Op::Read, lba + next * chunk / block)
                    .map_err(|r| r.problem)?;
                next += 1;
            }
            let mut out = vec![0u8; PER_QUEUE as usize];
            while p.in_flight() > 0 {
                // The slot comes back with its completion, once.
                let done = p.wait(Duration::from_secs(5))?;
                if !done.is_success() {
                    return Err(format!("a read failed: {}", done.status()).into());
                }
                let s = usize::from(done.index());
                let at = (chunk_of[s] * chunk) as usize;
                mem.read_at(s as u64 * chunk, &mut out[at..at + chunk as usize])?;
                if next < chunks {
                    chunk_of[s] = next;
                    p.submit(done.into_slot(), Op::Read, lba + next * chunk / block)
                        .map_err(|r| r.problem)?;
                    next += 1;
                }
            }
            Ok(out)
        },
    )??;
    mem.write_at(0, &out)?;
    Ok(())
}
// guide:end
