//! Config space and the `PCI_COMMAND` register. A change of memory decode
//! revokes or restores the device's dma-bufs in the kernel, so it goes
//! through the revocation hub here.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::MutexGuard;

use super::VfioPciDevice;
use super::info::{CONFIG_REGION_INDEX, RegionInfo};
use super::known_command::touches_command;
use crate::error::{Error, RangeProblem, Result};
use crate::range::ByteRange;
use crate::range::human_size;
use crate::revoke::{BufferState, RevokeReason};
use crate::sys;

/// Offset of the 16-bit `PCI_COMMAND` register in config space.
#[allow(clippy::cast_possible_truncation)]
const PCI_COMMAND: u64 = sys::PCI_COMMAND as u64;
/// `PCI_COMMAND` bit 1: memory space decode.
#[allow(clippy::cast_possible_truncation)]
pub(super) const COMMAND_MEMORY: u16 = sys::PCI_COMMAND_MEMORY as u16;
/// `PCI_COMMAND` bit 2: bus master.
#[allow(clippy::cast_possible_truncation)]
const COMMAND_MASTER: u16 = sys::PCI_COMMAND_MASTER as u16;

impl VfioPciDevice {
    /// Reads `buf.len()` bytes of config space at `offset` (a `pread` of the
    /// config region). VFIO virtualises parts of it (e.g. `PCI_COMMAND`).
    /// Reads past the end of config space are [`Error::InvalidRange`].
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let mut ids = [0u8; 4];
    /// dev.config_read(0, &mut ids)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    ///
    /// A read that covers `PCI_COMMAND` updates
    /// [`known_command`](Self::known_command); if it finds memory decode off
    /// while the [`hub`](Self::hub) says live (decode was turned off behind
    /// the library's back, so the kernel has revoked), that revocation is
    /// recorded ([`RevokeReason::External`]) so the next decode-on restores.
    pub fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let before = self.known.snapshot();
        self.config_read_raw(offset, buf)?;
        if self.known.record_read(before, offset, buf) == Some(false)
            && self.hub.state() == BufferState::Live
        {
            self.found_decode_off();
        }
        Ok(())
    }

    /// A `pread` of config space, nothing else.
    fn config_read_raw(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.config_at(offset, buf.len())?;
        self.file
            .read_exact_at(buf, at)
            .map_err(|e| self.config_error("pread", offset, buf.len(), e))
    }

    /// A read without the command lock found decode off while the hub said
    /// live: look again under the lock (a transition of this device may have
    /// been half-way) and record the revocation if it still holds. Inside an
    /// attachment callback the transition running on this thread holds the
    /// lock and sets the hub itself.
    fn found_decode_off(&self) {
        if let Some(held) = self.hub.lock_transitions_outside_callbacks() {
            // A failed read changes nothing: the next one tries again.
            let _ = self.read_command_held(&held);
        }
    }

    /// Reads `PCI_COMMAND` with the command lock held, records it, and if
    /// memory decode is off while the hub says live, records the revocation
    /// the kernel made behind the library's back, so that the following
    /// decode-on restores the attachments instead of leaving them dead.
    pub(super) fn read_command_held(&self, held: &MutexGuard<'_, ()>) -> Result<u16> {
        let command = self.read_command_quiet(held)?;
        if command & COMMAND_MEMORY == 0 && self.hub.state() == BufferState::Live {
            self.hub.revoked_by_kernel(RevokeReason::External);
        }
        Ok(command)
    }

    /// Reads and records `PCI_COMMAND` with the command lock held, leaving
    /// the hub to the caller (which knows why decode changed).
    fn read_command_quiet(&self, _held: &MutexGuard<'_, ()>) -> Result<u16> {
        let mut b = [0u8; 2];
        self.config_read_raw(PCI_COMMAND, &mut b)?;
        let command = u16::from_le_bytes(b);
        self.known.set(command);
        Ok(command)
    }

    /// With the command lock held and decode on: restores a revoked hub
    /// (not a gone one).
    #[inline]
    pub(super) fn restore_if_revoked(&self) {
        if matches!(self.hub.state(), BufferState::Revoked(_)) {
            self.hub.restore();
        }
    }

    /// Writes `data` to config space at `offset` (a `pwrite` of the config
    /// region). Clearing `PCI_COMMAND` memory decode this way revokes the
    /// device's dma-bufs; prefer [`VfioPciDevice::set_memory_decode`].
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// dev.config_write(0x3c, &[0x0b])?; // interrupt line
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    ///
    /// A write that changes `PCI_COMMAND`'s memory-decode bit goes through the
    /// revocation path: turning it off revokes this device's dma-bufs in the
    /// kernel, and every attachment is then torn down; turning it on restores
    /// them (per each attachment's policy). A VMM forwarding a guest's config
    /// writes gets the same behaviour by writing through here.
    ///
    /// Such writes are serialised per device (with
    /// [`set_memory_decode`](Self::set_memory_decode),
    /// [`set_bus_master`](Self::set_bus_master) and [`reset`](Self::reset)), and
    /// the attachments' callbacks run inside: a callback must not change this
    /// device's `PCI_COMMAND` or reset it (it would wait for itself).
    pub fn config_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if touches_command(offset, data.len()) {
            let held = self.lock_command();
            self.config_write_held(offset, data, &held)
        } else {
            let at = self.config_at(offset, data.len())?;
            self.file
                .write_all_at(data, at)
                .map_err(|e| self.config_error("pwrite", offset, data.len(), e))
        }
    }

    /// Held across a change of `PCI_COMMAND` (read, write, read back) and the
    /// hub call it makes, and across a reset: the hub's transition lock
    /// ([`RevocationHub::lock_transitions`]). Threads that toggle memory decode
    /// or reset at once otherwise interleave their reads and writes, lose
    /// updates and leave the hub out of step with the device (live while the
    /// kernel had revoked, and so attachments whose areas are dead); and an
    /// attachment's own restore or map could run between the kernel's
    /// revocation and the hub's.
    #[inline]
    pub(super) fn lock_command(&self) -> MutexGuard<'_, ()> {
        self.hub.lock_transitions()
    }

    /// [`config_write`](Self::config_write), with the command lock held.
    fn config_write_held(&self, offset: u64, data: &[u8], held: &MutexGuard<'_, ()>) -> Result<()> {
        let at = self.config_at(offset, data.len())?;
        if !touches_command(offset, data.len()) {
            return self
                .file
                .write_all_at(data, at)
                .map_err(|e| self.config_error("pwrite", offset, data.len(), e));
        }
        // Decode found off while the hub says live is recorded as a
        // revocation here, so a write turning it on restores.
        let _ = self.read_command_held(held);
        let written = self
            .file
            .write_all_at(data, at)
            .map_err(|e| self.config_error("pwrite", offset, data.len(), e));
        // Even a failed write may have revoked (the kernel revokes first);
        // ask the device what it has now.
        match self.read_command_quiet(held) {
            // Decode is off: the kernel has revoked every dma-buf of the
            // device, so the attachments' areas are dead already.
            Ok(after) if after & COMMAND_MEMORY == 0 => {
                self.hub.revoked_by_kernel(RevokeReason::MemoryDecodeOff);
            }
            // On: the kernel's buffers are live; dead areas are mapped again.
            Ok(_) => self.restore_if_revoked(),
            Err(_) => {
                // Unknown now. If the write may have turned decode off, the
                // kernel may have revoked: say so rather than claim live.
                self.known.forget();
                let clears_decode = usize::try_from(PCI_COMMAND.wrapping_sub(offset))
                    .ok()
                    .and_then(|i| data.get(i))
                    .is_some_and(|low| u16::from(*low) & COMMAND_MEMORY == 0);
                if clears_decode {
                    self.hub.revoked_by_kernel(RevokeReason::MemoryDecodeOff);
                }
            }
        }
        written
    }

    /// A write that overlaps `PCI_COMMAND`, made for a guest by the
    /// [`GuestBarMap`](crate::vmm::GuestBarMap): one `pwrite`, no read
    /// before or after (the register is known from the device's own writes
    /// and the VMM's notes; a device that knows nothing yet reads it once).
    /// The known register takes the written bytes, and a change of memory
    /// decode from the known value revokes or restores the hub, as
    /// [`config_write`](Self::config_write) does. Returns memory decode
    /// before and after. A failed write reads the register back to learn
    /// what the device has (the kernel revokes before it writes).
    #[inline]
    pub(crate) fn command_write_lean(&self, offset: u64, data: &[u8]) -> Result<(bool, bool)> {
        let held = self.lock_command();
        let was_on = match self.known.memory_decode() {
            Some(on) => on,
            None => self.read_command_quiet(&held)? & COMMAND_MEMORY != 0,
        };
        // The header is always there: no range check for PCI_COMMAND.
        let at = match self.config.get() {
            Some(r) if offset + data.len() as u64 <= 0x40 => r.offset + offset,
            _ => self.config_at(offset, data.len())?,
        };
        // One `pwrite` (nix's, inlined: std's `write_at` is an outlined
        // wrapper of twice the instructions). A config write of a register
        // is never short; a short one is an error, as in `write_all_at`.
        let at_off = libc::off_t::try_from(at).unwrap_or(libc::off_t::MAX);
        match nix::sys::uio::pwrite(&self.file, data, at_off) {
            Ok(n) if n == data.len() => {}
            Ok(_) => {
                let e = io::Error::from(io::ErrorKind::WriteZero);
                return Err(self.command_write_failed(&held, was_on, offset, data.len(), e));
            }
            Err(e) => {
                let e = io::Error::from(e);
                return Err(self.command_write_failed(&held, was_on, offset, data.len(), e));
            }
        }
        let now_on = self.known.record_write(offset, data).unwrap_or(was_on);
        self.follow_decode(was_on, now_on);
        Ok((was_on, now_on))
    }

    /// [`command_write_lean`](Self::command_write_lean)'s `pwrite` failed:
    /// reads the register back (the kernel revokes before it writes), tells
    /// the hub, and returns the error naming the write.
    #[cold]
    #[inline(never)]
    fn command_write_failed(
        &self,
        held: &MutexGuard<'_, ()>,
        was_on: bool,
        offset: u64,
        len: usize,
        e: io::Error,
    ) -> Error {
        let err = self.config_error("pwrite", offset, len, e);
        let now_on = match self.read_command_quiet(held) {
            Ok(c) => c & COMMAND_MEMORY != 0,
            Err(_) => {
                self.known.forget();
                false
            }
        };
        self.follow_decode(was_on, now_on);
        err
    }

    /// Tells the hub of a change of memory decode from `was_on` to `now_on`
    /// (the command lock held).
    #[inline]
    fn follow_decode(&self, was_on: bool, now_on: bool) {
        if !now_on {
            if was_on || self.hub.state() == BufferState::Live {
                self.hub.revoked_by_kernel(RevokeReason::MemoryDecodeOff);
            }
        } else if !was_on {
            self.restore_if_revoked();
        }
    }

    /// Reads a byte of config space.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// let revision = dev.config_read_u8(8)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn config_read_u8(&self, offset: u64) -> Result<u8> {
        let mut b = [0u8; 1];
        self.config_read(offset, &mut b)?;
        Ok(b[0])
    }

    /// Reads a little-endian 16-bit config register, e.g. the vendor ID at 0.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// let (vendor, device) = (dev.config_read_u16(0)?, dev.config_read_u16(2)?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn config_read_u16(&self, offset: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Reads a little-endian 32-bit config register.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// let ids = dev.config_read_u32(0)?; // device << 16 | vendor
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn config_read_u32(&self, offset: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Writes a little-endian 16-bit config register.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// let cmd = dev.command()?;
    /// dev.config_write_u16(4, cmd | 0x4)?; // bus master on
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn config_write_u16(&self, offset: u64, value: u16) -> Result<()> {
        self.config_write(offset, &value.to_le_bytes())
    }

    /// Writes a little-endian 32-bit config register.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// dev.config_write_u32(0x10, 0xffff_ffff)?; // BAR0 sizing (virtualised by VFIO)
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn config_write_u32(&self, offset: u64, value: u32) -> Result<()> {
        self.config_write(offset, &value.to_le_bytes())
    }

    /// The `PCI_COMMAND` register (as VFIO presents it).
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// println!("PCI_COMMAND = {:#06x}", dev.command()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn command(&self) -> Result<u16> {
        self.config_read_u16(PCI_COMMAND)
    }

    /// Whether memory decode (`PCI_COMMAND` bit 1) is on.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// if !dev.memory_decode()? {
    ///     dev.set_memory_decode(true)?;
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn memory_decode(&self) -> Result<bool> {
        Ok(self.command()? & COMMAND_MEMORY != 0)
    }

    /// Reads `PCI_COMMAND` again and brings the hub in line with it: decode
    /// off while the hub says live records a revocation
    /// ([`RevokeReason::External`]); decode on while it says revoked
    /// restores. Returns the hub's state afterwards. An off-and-on cycle
    /// made entirely behind the library's back leaves no trace in the
    /// register; route every change through
    /// [`guest_config_write`](Self::guest_config_write) or the `note_*`
    /// calls, or use [`Attachment::sync_with_kernel`](crate::revoke::Attachment::sync_with_kernel),
    /// which asks the kernel about one buffer.
    ///
    /// ```no_run
    /// # let dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// let state = dev.sync_with_kernel()?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn sync_with_kernel(&self) -> Result<BufferState> {
        let held = self.lock_command();
        if self.read_command_held(&held)? & COMMAND_MEMORY != 0 {
            self.restore_if_revoked();
        }
        Ok(self.hub.state())
    }

    /// The last `PCI_COMMAND` value this device read, wrote or was told of,
    /// without reading config space; `None` until it knows both bytes. Kept
    /// current by its own reads and writes of the register,
    /// [`guest_config_write`](Self::guest_config_write), the `note_*` calls,
    /// resets and [`sync_with_kernel`](Self::sync_with_kernel); a change
    /// made behind the library's back is not in it until one of those.
    ///
    /// ```no_run
    /// # let dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// dev.set_memory_decode(true)?;
    /// assert_eq!(dev.known_command().map(|c| c & 0x2), Some(0x2));
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn known_command(&self) -> Option<u16> {
        self.known.command()
    }

    /// Memory decode as of [`known_command`](Self::known_command) (`None`
    /// if the library has not seen the register's low byte yet): one atomic
    /// load, no config read.
    ///
    /// ```no_run
    /// # let dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// if dev.known_memory_decode() != Some(true) {
    ///     dev.set_memory_decode(true)?;
    /// }
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    #[inline]
    pub fn known_memory_decode(&self) -> Option<bool> {
        self.known.memory_decode()
    }

    /// Turns memory decode (`PCI_COMMAND` bit 1) on or off with a
    /// read-modify-write of `PCI_COMMAND`. Turning it off revokes every
    /// dma-buf of the device (importers are told and unmap); turning it on
    /// restores them for the exporter, but an iommufd area that was revoked
    /// stays dead until remapped. Exports made while it is off are born
    /// revoked. BAR `mmap`s fault (`SIGBUS`) while it is off.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// dev.set_memory_decode(true)?;
    /// assert!(dev.memory_decode()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn set_memory_decode(&self, on: bool) -> Result<()> {
        self.set_command_bits(COMMAND_MEMORY, on)
    }

    /// Whether bus mastering (`PCI_COMMAND` bit 2) is on.
    ///
    /// ```no_run
    /// # let iommufd = dmabuf_p2p::importer::iommufd::Iommufd::open()?;
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&iommufd)?;
    /// dev.set_bus_master(true)?;
    /// assert!(dev.bus_master()?);
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn bus_master(&self) -> Result<bool> {
        Ok(self.command()? & COMMAND_MASTER != 0)
    }

    /// Turns bus mastering (`PCI_COMMAND` bit 2) on or off: the device may
    /// only start DMA while it is on.
    ///
    /// ```no_run
    /// # let mut dev = dmabuf_p2p::vfio::VfioPciDevice::open("0000:00:03.0".parse()?)?;
    /// # dev.bind(&dmabuf_p2p::importer::iommufd::Iommufd::open()?)?;
    /// dev.set_bus_master(true)?;
    /// # Ok::<(), dmabuf_p2p::Error>(())
    /// ```
    pub fn set_bus_master(&self, on: bool) -> Result<()> {
        self.set_command_bits(COMMAND_MASTER, on)
    }

    fn set_command_bits(&self, bits: u16, on: bool) -> Result<()> {
        // Read-modify-write under the lock, or two threads setting different
        // bits at once lose one of the changes.
        let held = self.lock_command();
        let cmd = self.read_command_held(&held)?;
        let new = if on { cmd | bits } else { cmd & !bits };
        if new == cmd {
            // Nothing to write; but a hub revoked while decode is on (it was
            // turned on behind the library's back) comes back now.
            if cmd & COMMAND_MEMORY != 0 {
                self.restore_if_revoked();
            }
            return Ok(());
        }
        self.config_write_held(PCI_COMMAND, &new.to_le_bytes(), &held)
    }

    /// The config region (cached after the first query).
    fn config_region(&self) -> Result<RegionInfo> {
        if let Some(r) = self.config.get() {
            return Ok(*r);
        }
        let r = self.region_info(CONFIG_REGION_INDEX)?;
        Ok(*self.config.get_or_init(|| r))
    }

    /// The fd offset of config-space byte `offset`, after checking that
    /// `len` bytes from there are inside config space.
    fn config_at(&self, offset: u64, len: usize) -> Result<u64> {
        let region = self.config_region()?;
        let range = ByteRange::new(offset, len as u64);
        range
            .check_in(region.size, 1)
            .map_err(|problem| Error::InvalidRange {
                target: format!(
                    "{} config space ({})",
                    self.address,
                    human_size(region.size)
                ),
                range,
                problem,
            })?;
        region
            .offset
            .checked_add(offset)
            .ok_or_else(|| Error::InvalidRange {
                target: format!("{} config space", self.address),
                range,
                problem: RangeProblem::Overflow,
            })
    }

    fn config_error(&self, op: &'static str, offset: u64, len: usize, e: io::Error) -> Error {
        Error::sys(
            op,
            format!(
                "{} config space {}",
                self.address,
                ByteRange::new(offset, len as u64)
            ),
            e,
        )
    }
}
