//! A [`DmaEngine`] driver for QEMU's `edu` device (PCI 1234:11e8).
//!
//! edu copies between a bus address and its own 4 KiB buffer at device address
//! `0x40000`, one transfer at a time, and raises an MSI when a transfer is done.
//! A copy from IOVA to IOVA is two transfers: source into the buffer, buffer
//! out to the destination.
//!
//! Registers (BAR0): `0x00` identification, `0x24` interrupt status, `0x64`
//! interrupt acknowledge, `0x80` DMA source, `0x88` destination, `0x90` count,
//! `0x98` command (bit 0 start/busy, bit 1 direction buffer-to-bus, bit 2 raise
//! an interrupt when done). Bus mastering must be on.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use dmabuf_p2p::pci::PciAddress;
use dmabuf_p2p::vfio::{BarMapping, MSI_IRQ_INDEX, VfioPciDevice};
use dmabuf_p2p::{Error as LibError, Ioas};

use crate::deadline::Deadline;
use crate::{Completion, DmaEngine, Error, Result, wait_readable};

/// edu's PCI vendor and device IDs.
pub const EDU_ID: (u16, u16) = (0x1234, 0x11e8);

const REG_IDENT: u64 = 0x00;
const REG_IRQ_STATUS: u64 = 0x24;
const REG_IRQ_ACK: u64 = 0x64;
const REG_DMA_SRC: u64 = 0x80;
const REG_DMA_DST: u64 = 0x88;
const REG_DMA_COUNT: u64 = 0x90;
const REG_DMA_CMD: u64 = 0x98;

const CMD_START: u64 = 1;
const CMD_TO_BUS: u64 = 2;
const CMD_IRQ: u64 = 4;

/// Where the device's buffer sits in its own address space.
const BUFFER_ADDR: u64 = 0x40000;
/// The buffer is 4 KiB, but QEMU 7.2's edu aborts the whole VM on a transfer
/// that ends exactly at the buffer's end (an off-by-one fixed later). Half the
/// buffer keeps every transfer clear of it.
pub const EDU_MAX_COPY: u64 = 2048;
/// The bytes of the device buffer that [`Edu::load`] and [`Edu::store`] may
/// use: `0..EDU_BUFFER_USABLE`. Every byte but the last, which QEMU 7.2's edu
/// must never be asked to touch (see [`EDU_MAX_COPY`]).
pub const EDU_BUFFER_USABLE: u64 = 4095;

/// The edu DMA engine, owning its VFIO device.
#[derive(Debug)]
pub struct Edu {
    dev: VfioPciDevice,
    bar0: BarMapping,
    irq: Option<OwnedFd>,
    fallback_reason: Option<String>,
    pending: Option<Pending>,
}

#[derive(Debug, Clone, Copy)]
enum Pending {
    /// Source is being read into the buffer; then write it out to `dst`.
    Inbound { dst: u64, len: u64 },
    /// The buffer is being written out.
    Outbound,
}

impl Edu {
    /// Opens the edu device at `address`, binds it to `ioas`'s iommufd and
    /// attaches it to `ioas`, so that the IOVAs it is given are `ioas`'s.
    ///
    /// ```no_run
    /// use dmabuf_p2p_engine::{edu::Edu, DmaEngine};
    /// let ioas = dmabuf_p2p::Iommufd::open()?.alloc_ioas()?;
    /// let edu = Edu::open("0000:01:00.0".parse()?, &ioas)?;
    /// println!("{} completes by {:?}", edu.name(), edu.completion());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(address: PciAddress, ioas: &Ioas) -> Result<Self> {
        let mut dev = VfioPciDevice::open(address)?;
        dev.bind(ioas.iommufd())?;
        dev.attach(ioas)?;
        Self::from_device(dev)
    }

    /// Takes a bound and attached edu device: checks its identity, turns on
    /// memory decode and bus mastering, maps BAR0 and sets up its MSI.
    pub fn from_device(dev: VfioPciDevice) -> Result<Self> {
        let address = dev.address();
        let (vendor, device) = (dev.config_read_u16(0)?, dev.config_read_u16(2)?);
        if (vendor, device) != EDU_ID {
            return Err(Error::Engine {
                engine: format!("edu {address}"),
                problem: format!("is {vendor:04x}:{device:04x}, not an edu device (1234:11e8)"),
            });
        }
        dev.set_memory_decode(true)?;
        dev.set_bus_master(true)?;
        let bar0 = dev.map_bar(0)?;
        let ident = bar0.read_u32(REG_IDENT)?;
        if ident & 0xff != 0xed {
            return Err(Error::Engine {
                engine: format!("edu {address}"),
                problem: format!(
                    "edu identification register reads {ident:#x}, expected 0x??????ed"
                ),
            });
        }
        let mut me = Self {
            dev,
            bar0,
            irq: None,
            fallback_reason: None,
            pending: None,
        };
        match me.setup_msi() {
            Ok(fd) => me.irq = Some(fd),
            Err(e) => me.fallback_reason = Some(e.to_string()),
        }
        Ok(me)
    }

    /// An eventfd triggered by edu's MSI (`VFIO_DEVICE_SET_IRQS`).
    fn setup_msi(&self) -> Result<OwnedFd, LibError> {
        self.dev.irq_eventfd(MSI_IRQ_INDEX, "MSI")
    }

    /// The VFIO device behind the engine.
    pub fn device(&self) -> &VfioPciDevice {
        &self.dev
    }

    /// Why completion falls back to polling, if it does.
    pub fn polling_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Reads `len` bytes from IOVA `src` into the device buffer at byte
    /// `offset`, and waits for it: one transfer. With [`store`](Self::store),
    /// data loaded once can be written out to many IOVAs, one transfer each,
    /// where [`DmaEngine::memcpy`] takes two transfers per copy.
    ///
    /// `offset + len` must be at most [`EDU_BUFFER_USABLE`]. A copy started
    /// with [`DmaEngine::memcpy_start`] must have been waited for.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use dmabuf_p2p_engine::edu::Edu;
    /// # let ioas = dmabuf_p2p::Iommufd::open()?.alloc_ioas()?;
    /// let mut edu = Edu::open("0000:01:00.0".parse()?, &ioas)?;
    /// edu.load(0x10_0000, 0, 64, Duration::from_secs(1))?; // 64 bytes from IOVA 0x100000
    /// for dst in [0x20_0000, 0x30_0000] {
    ///     edu.store(0, dst, 64, Duration::from_secs(1))?; // ... to two places
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load(&mut self, src: u64, offset: u64, len: u64, timeout: Duration) -> Result<()> {
        self.buffer_transfer(src, offset, len, false, timeout)
    }

    /// Writes `len` bytes of the device buffer, from byte `offset`, to IOVA
    /// `dst`, and waits for it: one transfer. The buffer holds what
    /// [`load`](Self::load) (or the first half of a copy) put there.
    ///
    /// `offset + len` must be at most [`EDU_BUFFER_USABLE`]. A copy started
    /// with [`DmaEngine::memcpy_start`] must have been waited for.
    pub fn store(&mut self, offset: u64, dst: u64, len: u64, timeout: Duration) -> Result<()> {
        self.buffer_transfer(dst, offset, len, true, timeout)
    }

    /// One transfer between IOVA `iova` and the device buffer at `offset`.
    fn buffer_transfer(
        &mut self,
        iova: u64,
        offset: u64,
        len: u64,
        to_bus: bool,
        timeout: Duration,
    ) -> Result<()> {
        let fits = matches!(offset.checked_add(len), Some(end) if end <= EDU_BUFFER_USABLE);
        if len == 0 || !fits {
            return Err(Error::Engine {
                engine: format!("edu {}", self.dev.address()),
                problem: format!(
                    "transfer of {len:#x} bytes at buffer offset {offset:#x}: it must be non-empty and end \
                     within the first {EDU_BUFFER_USABLE:#x} bytes of the device buffer"
                ),
            });
        }
        if self.pending.is_some() || self.busy()? {
            return Err(Error::Engine {
                engine: format!("edu {}", self.dev.address()),
                problem: "a copy is still running; wait for it first".into(),
            });
        }
        let deadline = Deadline::after(timeout);
        let dev_addr = BUFFER_ADDR + offset;
        if to_bus {
            self.start_transfer(dev_addr, iova, len, true)?;
        } else {
            self.start_transfer(iova, dev_addr, len, false)?;
        }
        self.wait_transfer(deadline, timeout)
    }

    fn start_transfer(&mut self, src: u64, dst: u64, len: u64, to_bus: bool) -> Result<()> {
        let mut cmd = CMD_START;
        if to_bus {
            cmd |= CMD_TO_BUS;
        }
        if self.irq.is_some() {
            cmd |= CMD_IRQ;
        }
        self.bar0.write_u64(REG_DMA_SRC, src)?;
        self.bar0.write_u64(REG_DMA_DST, dst)?;
        self.bar0.write_u64(REG_DMA_COUNT, len)?;
        Ok(self.bar0.write_u64(REG_DMA_CMD, cmd)?)
    }

    fn busy(&self) -> Result<bool> {
        Ok(self.bar0.read_u64(REG_DMA_CMD)? & CMD_START != 0)
    }

    /// Waits for the running transfer: on the MSI eventfd when there is one,
    /// else by polling the command register.
    fn wait_transfer(&mut self, deadline: Deadline, timeout: Duration) -> Result<()> {
        loop {
            if !self.busy()? {
                self.ack_irq()?;
                return Ok(());
            }
            let left = deadline.left();
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: format!("edu {} DMA transfer", self.dev.address()),
                    after: timeout,
                });
            }
            match &self.irq {
                Some(efd) => wait_readable(
                    efd.as_fd(),
                    left.min(Duration::from_millis(500)),
                    "edu MSI eventfd",
                )?,
                None => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }

    /// Reads and clears the interrupt status (and drains the eventfd).
    fn ack_irq(&mut self) -> Result<()> {
        if let Some(efd) = &self.irq {
            // Drain the non-blocking eventfd; EAGAIN (nothing pending) is fine.
            let mut count = [0u8; 8];
            let _ = nix::unistd::read(efd, &mut count);
            let status = self.bar0.read_u32(REG_IRQ_STATUS)?;
            if status != 0 {
                self.bar0.write_u32(REG_IRQ_ACK, status)?;
            }
        }
        Ok(())
    }
}

impl DmaEngine for Edu {
    fn name(&self) -> &str {
        "edu"
    }

    fn max_copy(&self) -> u64 {
        EDU_MAX_COPY
    }

    fn completion(&self) -> Completion {
        if self.irq.is_some() {
            Completion::Interrupt
        } else {
            Completion::Polling
        }
    }

    fn memcpy_start(&mut self, src: u64, dst: u64, len: u64) -> Result<()> {
        if len == 0 || len > EDU_MAX_COPY {
            return Err(Error::Engine {
                engine: format!("edu {}", self.dev.address()),
                problem: format!(
                    "copy of {len:#x} bytes: one copy takes 1..={EDU_MAX_COPY:#x} bytes"
                ),
            });
        }
        if self.pending.is_some() || self.busy()? {
            return Err(Error::Engine {
                engine: format!("edu {}", self.dev.address()),
                problem: "a copy is still running; wait for it first".into(),
            });
        }
        self.start_transfer(src, BUFFER_ADDR, len, false)?;
        self.pending = Some(Pending::Inbound { dst, len });
        Ok(())
    }

    fn memcpy_wait(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Deadline::after(timeout);
        while let Some(p) = self.pending {
            let waited = self.wait_transfer(deadline, timeout);
            if waited.is_err() {
                self.pending = None;
                return waited;
            }
            self.pending = match p {
                Pending::Inbound { dst, len } => {
                    self.start_transfer(BUFFER_ADDR, dst, len, true)?;
                    Some(Pending::Outbound)
                }
                Pending::Outbound => None,
            };
        }
        Ok(())
    }
}

impl Drop for Edu {
    fn drop(&mut self) {
        if self.irq.is_some() {
            // Disable the MSI trigger before the eventfd closes.
            let _ = self.dev.disable_irq(MSI_IRQ_INDEX);
        }
    }
}
