//! How the map follows the device: each BAR's mapping brought in line with
//! its register and the device's decode, resets, power states and drift
//! found in the revocation hub. Every kernel call of the map is here.

use super::*;

impl GuestBarMap {
    /// The guest's `PCI_COMMAND` write (performed on the device when
    /// `perform`, else already made by the VMM). Returns whether a claim
    /// may have been released. Inlined into the trap path (a call's
    /// register saves and argument moves are a tenth of what the map adds).
    #[inline(always)]
    pub(super) fn command(
        &self,
        d: &mut Device,
        limits: &mut Limits,
        slot: u32,
        offset: u64,
        data: &[u8],
        perform: bool,
    ) -> Result<bool> {
        let old = d.command;
        #[allow(clippy::cast_possible_truncation)]
        let new = merge(u32::from(old), COMMAND, 2, offset, data) as u16;
        let (was_on, on) = (old & COMMAND_MEMORY != 0, new & COMMAND_MEMORY != 0);
        let physical = if perform {
            d.dev.command_write_lean(offset, data)
        } else {
            Ok((true, true))
        };
        d.command = new;
        let settled = d.half != 0;
        for i in bars_in(d.half) {
            if let Some(reg) = &mut d.bars[i].reg {
                reg.settle();
            }
        }
        d.half = 0;
        let (phys_was, phys_on) = match &physical {
            Ok(p) => *p,
            Err(_) => {
                let on = d.dev.known_memory_decode() == Some(true);
                (on, on)
            }
        };
        if !phys_was && phys_on && was_on {
            // Off behind the guest's back (its bit was on): the areas are dead.
            self.mark_dead(d, RevokeReason::External);
        }
        let mut released = false;
        if was_on && !on {
            self.mark_dead(d, RevokeReason::MemoryDecodeOff);
        } else if on && (!was_on || settled || !phys_was) {
            released = self.reconcile_all(d, limits, slot);
        }
        physical.map(|_| released)
    }

    /// BAR register writes; reconciles the BARs touched when the guest's
    /// decode is on. Returns whether a claim may have been released.
    pub(super) fn bar_write(
        &self,
        d: &mut Device,
        limits: &mut Limits,
        slot: u32,
        offset: u64,
        data: &[u8],
    ) -> bool {
        let mut touched = 0u8;
        // The BAR dwords the write covers (usually one): no walk of all six.
        let end = offset
            .saturating_add(data.len() as u64)
            .min(BAR0 + 4 * u64::from(BAR_COUNT));
        let first = offset.max(BAR0);
        let dwords = if end > first {
            usize::try_from((first - BAR0) / 4).unwrap_or(0)
                ..usize::try_from((end - BAR0).div_ceil(4)).unwrap_or(0)
        } else {
            0..0
        };
        for i in dwords {
            let reg_at = BAR0 + 4 * i as u64;
            // The dword belongs to BAR i, or is the upper half of BAR i - 1.
            let (owner, high) = if d.bars[i].reg.is_some() {
                (i, false)
            } else if i > 0 && d.bars[i - 1].reg.is_some_and(|r| r.is_64bit()) {
                (i - 1, true)
            } else {
                continue;
            };
            let Some(reg) = &mut d.bars[owner].reg else {
                continue;
            };
            let current = if high {
                reg.read_high()
            } else {
                reg.read_low()
            };
            let value = merge(current, reg_at, 4, offset, data);
            if high {
                reg.write_high(value);
            } else {
                reg.write_low(value);
            }
            if reg.is_half_programmed() {
                d.half |= 1 << owner;
            } else {
                d.half &= !(1 << owner);
            }
            debug!(
                "{} BAR{owner}: guest wrote {value:#010x} to its {} dword: {}",
                d.address,
                if high { "high" } else { "low" },
                reg.address()
            );
            touched |= 1 << owner;
        }
        if d.command & COMMAND_MEMORY == 0 || d.d3 {
            return false;
        }
        let mut released = false;
        for i in bars_in(touched) {
            let ctx = ctx!(d, slot);
            released |= self.reconcile(&ctx, limits, i, &mut d.bars[i]);
        }
        released
    }

    /// Reconciles every BAR of `d`. Returns whether a claim was released.
    pub(super) fn reconcile_all(&self, d: &mut Device, limits: &mut Limits, slot: u32) -> bool {
        let mut released = false;
        let ctx = ctx!(d, slot);
        for i in bars_in(d.offered) {
            released |= self.reconcile(&ctx, limits, i, &mut d.bars[i]);
        }
        released
    }

    /// Where BAR `i` should be mapped now, or why not.
    #[inline]
    pub(super) fn want(ctx: &Ctx<'_>, s: &Slot) -> std::result::Result<u64, Unreachable> {
        if let Some(why) = ctx.blocked {
            return Err(why.into());
        }
        let Some(reg) = &s.reg else {
            return Err(Unreachable::NotOffered {
                why: s.not_offered.clone().unwrap_or_default(),
            });
        };
        if let Some(why) = &s.not_offered {
            return Err(s
                .msix
                .clone()
                .unwrap_or_else(|| Unreachable::NotOffered { why: why.clone() }));
        }
        match reg.address() {
            BarAddress::At(gpa) => Ok(gpa),
            BarAddress::Unassigned => Err(Unreachable::Unassigned),
            BarAddress::Probing => Err(Unreachable::Probing),
            BarAddress::HalfProgrammed => Err(Unreachable::HalfProgrammed),
        }
    }

    /// Makes BAR `i`'s mapping what its device and registers say, with the
    /// device's buffers live. Returns whether it released a claim.
    pub(super) fn reconcile(
        &self,
        ctx: &Ctx<'_>,
        limits: &mut Limits,
        i: usize,
        s: &mut Slot,
    ) -> bool {
        #[allow(clippy::cast_possible_truncation)]
        let key = BarKey {
            slot: ctx.slot,
            bar: i as u8,
        };
        // A BAR that is not offered is never mapped: nothing to do (and no
        // reason to build).
        if s.placed.is_none() && (s.reg.is_none() || s.not_offered.is_some()) {
            return false;
        }
        let size = s.reg.map_or(0, |r| r.size());
        let want = Self::want(ctx, s);
        let mut released = false;
        let mut moved_from = None;
        if let Some(p) = &mut s.placed {
            match &want {
                Ok(gpa) if *gpa == p.gpa && p.dead.is_none() => return false,
                Ok(gpa) if *gpa == p.gpa => {
                    // Dead at the right GPA: unmap and map again.
                    match remap_parts(&mut s.parts) {
                        Ok(()) => {
                            let why = p.dead.take();
                            info!(
                                "{} BAR{i}: restored at GPA {gpa:#x} (was revoked: {})",
                                ctx.address,
                                why.map_or_else(String::new, |r| r.to_string())
                            );
                            set_refused(limits, s, None);
                            return false;
                        }
                        Err(e) => {
                            let why = refusal(&e);
                            warn!(
                                "{} BAR{i} at GPA {gpa:#x}: restore failed: {why}",
                                ctx.address
                            );
                            unmap_parts(&mut s.parts, ctx.address, i, p.gpa);
                            limits.release(key, p.gpa);
                            self.forget_holes(&s.holes, p.gpa);
                            s.placed = None;
                            set_refused(limits, s, Some(why));
                            return true;
                        }
                    }
                }
                _ => {
                    let old = p.gpa;
                    // The handles stay for the next map (a move's second
                    // dword): the same buffers at another GPA, in place.
                    unmap_parts(&mut s.parts, ctx.address, i, old);
                    s.placed = None;
                    limits.release(key, old);
                    self.forget_holes(&s.holes, old);
                    released = true;
                    moved_from = Some(old);
                    if let Err(why) = &want {
                        info!("{} BAR{i}: unmapped from GPA {old:#x}: {why}", ctx.address);
                    }
                }
            }
        }
        let gpa = match want {
            Ok(gpa) => gpa,
            Err(why) => {
                set_refused(limits, s, Some(why));
                return released;
            }
        };
        let mapped = |g, n| self.ioas.has_mapped_area_in(g, n);
        let checked = limits.check(key, gpa, size, mapped).or_else(|why| {
            // The cached ranges may be stale: ask before refusing.
            if matches!(why, Unreachable::OutsideIovaRanges { .. })
                && let Ok(r) = self.ioas.iova_ranges()
            {
                limits.set_usable(&r);
                return limits.check(key, gpa, size, mapped);
            }
            Err(why)
        });
        let mapped = checked.and_then(|()| self.map_at(ctx, limits, i, s, gpa, size));
        match (mapped, moved_from) {
            (Ok(()), from) => {
                limits.claim(key, ctx.address, gpa, size, &s.holes);
                // The table's pages stay unmapped: no automatic placement
                // in the IOAS may put anything there either.
                for h in &s.holes {
                    self.ioas
                        .declare_foreign_area(gpa.saturating_add(h.offset), h.length);
                }
                match from {
                    Some(old) => info!(
                        "{} BAR{i} ({}) moved: GPA {old:#x} -> {gpa:#x}",
                        ctx.address,
                        human_size(size)
                    ),
                    None => info!(
                        "{} BAR{i} ({}) mapped at GPA {gpa:#x}",
                        ctx.address,
                        human_size(size)
                    ),
                }
                s.placed = Some(Placed { gpa, dead: None });
                set_refused(limits, s, None);
            }
            (Err(why), from) => {
                let was =
                    from.map_or_else(String::new, |old| format!(" (unmapped from GPA {old:#x})"));
                // A retry that meets the same refusal says nothing new.
                if from.is_some() || s.refused.as_ref() != Some(&why) {
                    warn!(
                        "{} BAR{i} ({}) refused at GPA {gpa:#x}{was}: {why}",
                        ctx.address,
                        human_size(size)
                    );
                }
                set_refused(limits, s, Some(why));
            }
        }
        released
    }

    /// Maps BAR `i`'s parts at `gpa`: their handles again, in place, or
    /// for the first time (each exported once). All or none: a part that
    /// fails unmaps the parts mapped before it.
    pub(super) fn map_at(
        &self,
        ctx: &Ctx<'_>,
        limits: &mut Limits,
        i: usize,
        s: &mut Slot,
        gpa: u64,
        size: u64,
    ) -> std::result::Result<(), Unreachable> {
        let mut failed = None;
        let mut done = 0;
        for part in &mut s.parts {
            match self.map_part(ctx, i, part, gpa) {
                Ok(()) => done += 1,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let Some(e) = failed else {
            return Ok(());
        };
        unmap_parts(&mut s.parts[..done], ctx.address, i, gpa);
        match e {
            Failed::Export(why) => Err(why),
            Failed::Map(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // The kernel's ranges are the authority: name them.
                if let Ok(r) = self.ioas.iova_ranges() {
                    limits.set_usable(&r);
                    #[allow(clippy::cast_possible_truncation)]
                    let key = BarKey {
                        slot: ctx.slot,
                        bar: i as u8,
                    };
                    limits.check(key, gpa, size, |g, n| self.ioas.has_mapped_area_in(g, n))?;
                }
                Err(refusal(&e))
            }
            Failed::Map(e) => Err(refusal(&e)),
        }
    }

    /// Maps one part of BAR `i` at its offset from `gpa`.
    #[inline]
    fn map_part(
        &self,
        ctx: &Ctx<'_>,
        i: usize,
        part: &mut Part,
        gpa: u64,
    ) -> std::result::Result<(), Failed> {
        let at = gpa.saturating_add(part.range.offset);
        if let Some(area) = &mut part.area {
            return area.map_again_at(at).map_err(Failed::Map);
        }
        if part.export.is_none() {
            #[allow(clippy::cast_possible_truncation)]
            let export = ctx
                .dev
                .export_bar(i as u32, &[part.range])
                .map_err(|e| Failed::Export(refusal(&e)))?;
            part.export = Some(export);
        }
        let Some(export) = &part.export else {
            return Err(Failed::Export(Unreachable::Unassigned));
        };
        let area = self
            .ioas
            .map_dmabuf(export.dmabuf(), IovaPlacement::Fixed(at), self.perms)
            .map_err(Failed::Map)?;
        part.area = Some(area);
        Ok(())
    }

    /// Undoes what placing a BAR with `holes` at `gpa` declared to the
    /// IOAS's automatic placement.
    fn forget_holes(&self, holes: &[ByteRange], gpa: u64) {
        for h in holes {
            self.ioas
                .forget_foreign_area(gpa.saturating_add(h.offset), h.length);
        }
    }

    /// The kernel revoked the device's buffers: its live areas are dead
    /// (kept, so their GPAs stay reserved).
    pub(super) fn mark_dead(&self, d: &mut Device, reason: RevokeReason) {
        for i in bars_in(d.offered) {
            if let Some(p) = &mut d.bars[i].placed
                && p.dead.is_none()
            {
                p.dead = Some(reason);
                info!(
                    "{} BAR{i} at GPA {:#x}: revoked: {reason}",
                    d.address, p.gpa
                );
            }
        }
    }

    /// Unmaps every area of `d` (for a reset, an unplug, a removal).
    /// Returns whether any claim was released.
    pub(super) fn unmap_all(
        &self,
        d: &mut Device,
        limits: &mut Limits,
        slot: u32,
        why: &str,
    ) -> bool {
        let mut released = false;
        for (i, s) in d.bars.iter_mut().enumerate() {
            if let Some(p) = s.placed.take() {
                unmap_parts(&mut s.parts, d.address, i, p.gpa);
                #[allow(clippy::cast_possible_truncation)]
                limits.release(BarKey { slot, bar: i as u8 }, p.gpa);
                self.forget_holes(&s.holes, p.gpa);
                info!(
                    "{} BAR{i}: unmapped from GPA {:#x}: {why}",
                    d.address, p.gpa
                );
                released = true;
            }
        }
        released
    }

    /// The device was reset: areas unmapped, BARs unassigned, decode off.
    pub(super) fn reset(&self, d: &mut Device, limits: &mut Limits, slot: u32, why: &str) {
        self.unmap_all(d, limits, slot, why);
        d.command = 0;
        d.d3 = false;
        d.half = 0;
        for s in &mut d.bars {
            if let Some(reg) = &mut s.reg {
                reg.reset();
            }
            set_refused(limits, s, None);
        }
    }

    /// The guest wrote the power state. Returns whether a claim was released.
    pub(super) fn power(&self, d: &mut Device, limits: &mut Limits, slot: u32, d3: bool) -> bool {
        let was = d.d3;
        d.d3 = d3;
        if d3 && !was {
            self.mark_dead(d, RevokeReason::External);
            false
        } else if !d3 && was && d.command & COMMAND_MEMORY != 0 {
            // VFIO restored the buffers (decode on): the dead areas come back.
            self.reconcile_all(d, limits, slot)
        } else {
            false
        }
    }

    /// Tries again every BAR refused for a reason others' changes may lift.
    pub(super) fn retry_waiting(&self, st: &mut State) {
        let State { slots, limits, .. } = st;
        for (slot, d) in slots.iter_mut().enumerate() {
            let Some(d) = d else { continue };
            for i in 0..BAR_COUNT as usize {
                if d.bars[i]
                    .refused
                    .as_ref()
                    .is_some_and(Unreachable::waits_on_others)
                {
                    let ctx = ctx!(d, u32::try_from(slot).unwrap_or(u32::MAX));
                    self.reconcile(&ctx, limits, i, &mut d.bars[i]);
                }
            }
        }
        limits.waiting = slots
            .iter()
            .flatten()
            .flat_map(|d| d.bars.iter())
            .filter(|s| s.refused.as_ref().is_some_and(Unreachable::waits_on_others))
            .count();
    }

    /// Finds a change of `id`'s revocation hub made by other means than
    /// this map and repairs it. Returns whether anything was remapped.
    pub(super) fn check_hub(&self, st: &mut State, id: DeviceId) -> Result<bool> {
        let State { slots, limits, .. } = st;
        let d = registered(slots, id)?;
        if d.dev.hub().change_count() == d.hub_seq {
            return Ok(false);
        }
        Ok(self.repair_drift(d, limits, id.slot))
    }

    /// `d`'s hub changed behind the map: records it and repairs. Returns
    /// true.
    #[cold]
    pub(super) fn repair_drift(&self, d: &mut Device, limits: &mut Limits, slot: u32) -> bool {
        let change = d.dev.hub().last_change();
        let drift = Drift::HubChanged {
            device: d.address,
            state: change.state,
        };
        warn!("{drift}");
        self.repair_hub(d, limits, slot, change.state);
        d.hub_seq = d.dev.hub().change_count();
        true
    }

    /// Brings `d` in line with its hub's `state`.
    pub(super) fn repair_hub(
        &self,
        d: &mut Device,
        limits: &mut Limits,
        slot: u32,
        state: BufferState,
    ) {
        match state {
            BufferState::Gone(r) => {
                d.gone = Some(r);
                self.unmap_all(d, limits, slot, "the device is gone");
                for s in &mut d.bars {
                    s.close_exports();
                }
            }
            BufferState::Revoked(r) => self.mark_dead(d, r),
            BufferState::Live => {
                // Revoked and restored meanwhile: every area may be dead.
                self.mark_dead(d, RevokeReason::External);
                if d.command & COMMAND_MEMORY != 0 && !d.d3 {
                    self.reconcile_all(d, limits, slot);
                }
            }
        }
    }
}

/// Why a part was not mapped: its export's refusal, or the map's error.
enum Failed {
    Export(Unreachable),
    Map(Error),
}

/// Unmaps `parts` of BAR `i` of `address` (placed at `gpa`, for messages),
/// keeping their handles for the next map; a handle whose unmap fails is
/// dropped (its drop tries once more).
fn unmap_parts(parts: &mut [Part], address: PciAddress, i: usize, gpa: u64) {
    for part in parts {
        if let Some(area) = &mut part.area
            && let Err(e) = area.unmap()
        {
            warn!(
                "{address} BAR{i}: unmapping GPA {:#x} failed: {e}",
                gpa.saturating_add(part.range.offset)
            );
            part.area = None;
        }
    }
}

/// Maps every part again at its IOVA (a restore); stops at the first
/// failure (the caller unmaps them all).
fn remap_parts(parts: &mut [Part]) -> Result<()> {
    for part in parts {
        match &mut part.area {
            Some(area) => area.remap()?,
            None => {
                return Err(Error::Revoked {
                    buffer: format!("BAR part {}", part.range),
                    source: None,
                });
            }
        }
    }
    Ok(())
}

/// The typed reason for a library error met while exporting or mapping.
fn refusal(e: &Error) -> Unreachable {
    match e {
        Error::Revoked { .. } => Unreachable::Revoked(RevokeReason::External),
        Error::Device { problem, .. } if problem.contains("being removed") => {
            Unreachable::DeviceGone(RevokeReason::Unplug)
        }
        other => Unreachable::KernelRefused {
            op: match other {
                Error::InvalidIova { .. } => "IOMMU_IOAS_MAP_FILE",
                Error::Sys { op, .. } => op,
                _ => "VFIO_DEVICE_FEATURE(DMA_BUF)",
            },
            errno: other.raw_os_error().unwrap_or(0),
            message: other.to_string(),
        },
    }
}
