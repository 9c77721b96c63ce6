//! `GuestBarMap` against real adopted devices (issue 24): a VMM of rust-vmm
//! crates (`guest_vmm.rs`) registers ivshmem devices as targets; edu0 (and
//! nvme0) DMA into their BARs at the guest-physical addresses the guest's
//! config writes gave them, checked through a BAR mmap and, for shm0 and
//! shm1, in the host's backing files.
//!
//! The guest's writes are real ones: Linux's own, captured from this test
//! VM with `cargo xtask capture-config-writes` (fixtures in
//! `vm-tests/fixtures/config-writes/`, each with a note on how it was made).
//! The held-out capture (`held-out-realloc.txt`) was made once, after the
//! map was written, and only `held_out_sequence_lands_exactly_where_its_bars_are`
//! reads it.
//!
//! BAR areas written here (apart from every other test's, since the host
//! checks run after the whole suite): shm0 0x80000..0x87000 (the replays),
//! 0x8c000..0x8d100 (the property test, the hot-unplug), 0x90000..0x91000
//! (moves), 0x98000..0x98100 (sync); shm1 0x3200000..0x3207000 (the
//! replays), 0x320c000..0x320d000 (the property test), 0x3210000..0x3211000
//! (the hot-unplug); the small ivshmem devices 0x8000..0xf000 (load.rs
//! rewrites them later).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use dmabuf_p2p::vmm::{BarStatus, ConfigWrite, DeviceId, Drift, Unreachable};
use dmabuf_p2p_vm_tests::{
    assert_bytes, bar_read, edu_address, ivshmem_devices, nvme_address, pattern,
    request_host_check, shm_address,
};

use super::guest_vmm::{COMMAND, GuestVmm, MASTER, MEMORY, RAM_GPA};

const PRIMARY: &str = include_str!("../../fixtures/config-writes/linux-7.2-q35.txt");

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

/// One captured write.
#[derive(Debug, Clone, Copy)]
struct W {
    offset: u64,
    size: usize,
    value: u32,
}

/// A parsed fixture: devices (fixture address, QEMU type, where it replays)
/// and phases of writes per device.
struct Fixture {
    devices: Vec<(String, String, String)>,
    phases: Vec<(String, Vec<(String, W)>)>,
}

fn parse(text: &str) -> Fixture {
    let mut f = Fixture {
        devices: Vec::new(),
        phases: Vec::new(),
    };
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let w: Vec<&str> = line.split_whitespace().collect();
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
        match w.as_slice() {
            ["device", bdf, kind, on] => {
                f.devices
                    .push(((*bdf).to_owned(), (*kind).to_owned(), (*on).to_owned()))
            }
            ["phase", name] => f.phases.push(((*name).to_owned(), Vec::new())),
            ["w", bdf, off, size, value] => f.phases.last_mut().unwrap().1.push((
                (*bdf).to_owned(),
                W {
                    offset: hex(off),
                    size: size.parse().unwrap(),
                    value: u32::try_from(hex(value)).unwrap(),
                },
            )),
            _ => panic!("fixture line {line:?}"),
        }
    }
    f
}

/// The test VM's address of a fixture's `on` field: an address, or `@name`
/// of a standard device.
fn resolve(on: &str) -> String {
    match on.strip_prefix('@') {
        None => on.to_owned(),
        Some("edu0") => edu_address(),
        Some(n @ ("shm0" | "shm1")) => shm_address(n),
        Some(n) => {
            let i: usize = n.trim_start_matches("shm").parse().unwrap();
            ivshmem_devices()
                .into_iter()
                .filter(|(_, s)| *s == 64 << 10)
                .nth(i - 2)
                .unwrap()
                .0
        }
    }
}

/// BAR2's address and the decode bit as the guest's writes so far left
/// them, worked out from the writes alone (not from the map): the last
/// values written to each half that were not sizing probes, and the last
/// `PCI_COMMAND`.
#[derive(Debug, Clone, Copy, Default)]
struct Expect {
    low: u32,
    high: u32,
    command: u16,
}

impl Expect {
    fn apply(&mut self, w: W) {
        let dword = |v: u32| v;
        match (w.offset, w.size) {
            (0x18, 4) if w.value | 0xf != u32::MAX => self.low = dword(w.value) & !0xf,
            (0x1c, 4) if w.value != u32::MAX => self.high = w.value,
            #[allow(clippy::cast_possible_truncation)]
            (0x04, 2 | 4) => self.command = w.value as u16,
            _ => {}
        }
    }

    fn gpa(&self) -> Option<u64> {
        let gpa = (u64::from(self.high) << 32) | u64::from(self.low);
        (gpa != 0 && self.command & MEMORY != 0).then_some(gpa)
    }
}

/// One target being replayed on: its id in the map and what the writes
/// say.
struct Target {
    id: DeviceId,
    expect: Expect,
    /// Offset of this test's area in BAR2, and its size.
    area: u64,
    name: String,
}

/// The area a test may write in BAR2 of the device at `bdf`.
fn area_of(bdf: &str) -> (u64, String) {
    if bdf == shm_address("shm0") {
        (0x8_0000, "shm0".into())
    } else if bdf == shm_address("shm1") {
        (0x320_0000, "shm1".into())
    } else {
        (0x8000, bdf.to_owned())
    }
}

/// Replays `phase`'s writes to the fixture devices in `targets` (by
/// fixture address), then copies a pattern into every BAR2 the writes left
/// decoded, at the GPA they gave it, and checks it landed (BAR mmap);
/// nvme0 reads blocks into the first. Returns the bytes written, per area,
/// for the host checks.
fn replay_phase(
    vmm: &mut GuestVmm,
    targets: &mut BTreeMap<String, Target>,
    phase: &str,
    writes: &[(String, W)],
    (index, seed): (u64, u64),
    landed: &mut BTreeMap<String, Vec<(u64, Vec<u8>)>>,
) {
    let mut n = 0;
    for (bdf, w) in writes {
        let Some(t) = targets.get_mut(bdf) else {
            continue;
        };
        let data = &w.value.to_le_bytes()[..w.size];
        let how = vmm
            .map
            .config_write(t.id, w.offset, data)
            .unwrap_or_else(|e| {
                panic!(
                    "{phase}: {bdf} write {:#x} <- {:#x}: {e}",
                    w.offset, w.value
                )
            });
        if matches!(how, ConfigWrite::Command | ConfigWrite::Bars) {
            n += 1;
        }
        t.expect.apply(*w);
    }
    println!("guest_bar_map: phase {phase}: {n} writes replayed");
    let mut k = 0;
    for (bdf, t) in targets.iter() {
        let Some(gpa) = t.expect.gpa() else {
            assert!(
                !matches!(
                    vmm.map.bar_status(t.id, 2).unwrap(),
                    BarStatus::Mapped { .. }
                ),
                "{phase}: {bdf} BAR2 mapped while the writes leave it undecoded"
            );
            continue;
        };
        assert_eq!(
            vmm.mapped_at(t.id, 2),
            Some(gpa),
            "{phase}: {bdf} BAR2 where the writes put it: {:?}",
            vmm.map.bar_status(t.id, 2)
        );
        let off = t.area + 0x800 * index + 0x100 * k;
        let bytes = pattern(seed * 100 + index * 10 + k, 0x100);
        // Independent of the map: the GPA comes from the writes.
        vmm.edu_copy(&bytes, gpa + off, &format!("{phase}: {bdf}"));
        let m = vmm.bar(t.id, 2);
        assert_bytes(
            &bar_read(&m, off, bytes.len()),
            &bytes,
            off,
            &format!("{phase}: {bdf}"),
        );
        landed.entry(t.name.clone()).or_default().push((off, bytes));
        k += 1;
    }
    assert!(k > 0, "{phase}: no BAR left decoded to check");
}

/// Replays a whole fixture: the boot devices in one VMM session (boot,
/// enable, the hot-plug phase's writes to them, reset), then the
/// hot-plugged devices in another (their own VMM hot-adds them onto a
/// standard device of the same kind), each phase checked by DMA. `base` is
/// added to every device's test area (0x3000 bytes are used).
fn replay(text: &str, seed: u64, base: u64) {
    let f = parse(text);
    let targets_of = |hotplugged: bool| -> Vec<(String, String)> {
        f.devices
            .iter()
            .filter(|(_, kind, on)| kind == "ivshmem-plain" && on.starts_with('@') == hotplugged)
            .map(|(bdf, _, on)| (bdf.clone(), resolve(on)))
            .collect()
    };
    let mut landed: BTreeMap<String, Vec<(u64, Vec<u8>)>> = BTreeMap::new();
    for (session, hotplugged) in [("boot devices", false), ("hot-plugged devices", true)] {
        let list = targets_of(hotplugged);
        assert!(!list.is_empty(), "{session}: none in the fixture");
        let real: Vec<String> = list.iter().map(|(_, r)| r.clone()).collect();
        let (mut vmm, ids) = GuestVmm::new(&real, true);
        let mut targets: BTreeMap<String, Target> = list
            .iter()
            .zip(&ids)
            .map(|((fx, real), id)| {
                let (area, name) = area_of(real);
                let area = area + base;
                (
                    fx.clone(),
                    Target {
                        id: *id,
                        expect: Expect::default(),
                        area,
                        name,
                    },
                )
            })
            .collect();
        for (i, (phase, writes)) in f.phases.iter().enumerate() {
            let mine = writes.iter().any(|(b, _)| targets.contains_key(b));
            if !mine {
                continue;
            }
            replay_phase(
                &mut vmm,
                &mut targets,
                phase,
                writes,
                (i as u64, seed),
                &mut landed,
            );
            // nvme0 reads into the first decoded target too.
            if let Some(t) = targets.values().find(|t| t.expect.gpa().is_some()) {
                let off = t.area + 0x2000 + 0x200 * i as u64;
                let got =
                    vmm.nvme_read_lands(t.id, 2, off, 8 + i as u64, 1, &format!("{phase}: nvme0"));
                landed.entry(t.name.clone()).or_default().push((off, got));
            }
        }
        for report in vmm.map.report() {
            println!("guest_bar_map: {session}: {report}");
        }
    }
    for (name, writes) in &landed {
        if name == "shm0" || name == "shm1" {
            for (off, bytes) in writes {
                request_host_check(name, *off, bytes);
            }
        }
    }
}

/// Linux's own writes (boot with firmware, enable, hot-plug where Linux
/// assigns the BARs, a reset): after each phase every BAR2 the writes leave
/// decoded is mapped exactly at the GPA they gave it, and edu's and nvme0's
/// DMA to that GPA lands in the BAR (mmap and host file).
#[test]
fn replayed_linux_writes_keep_every_bar_at_its_guest_address() {
    replay(PRIMARY, 10, 0);
}

/// The held-out capture (another kernel option, another hot-plug order),
/// which the map's development never saw: DMA lands exactly where its BARs
/// are.
#[test]
fn held_out_sequence_lands_exactly_where_its_bars_are() {
    replay(
        include_str!("../../fixtures/config-writes/held-out-realloc.txt"),
        50,
        0x4000,
    );
}

// ---------------------------------------------------------------------------
// Moves, overlaps, limits
// ---------------------------------------------------------------------------

/// After a move, DMA to the old GPA changes not one byte (in the BAR and in
/// the host's backing file) and DMA to the new GPA lands.
#[test]
fn a_moved_bar_is_gone_from_its_old_address() {
    const OLD: u64 = 0x2_0000_0000;
    const NEW: u64 = 0x3_0000_0000;
    const OFF: u64 = 0x9_0000;
    let shm0 = shm_address("shm0");
    let (mut vmm, ids) = GuestVmm::new(std::slice::from_ref(&shm0), false);
    let id = ids[0];
    vmm.place(id, 2, OLD);
    assert_eq!(vmm.mapped_at(id, 2), Some(OLD));
    let first = pattern(2401, 0x800);
    vmm.copy_lands(id, 2, OFF, &first, "at the old GPA");
    vmm.place(id, 2, NEW);
    assert_eq!(vmm.mapped_at(id, 2), Some(NEW));
    // To the old GPA: blocked, nothing changes.
    let stray = pattern(2402, 0x800);
    vmm.copy_blocked(
        id,
        2,
        OFF,
        OLD + OFF,
        &stray,
        "to the old GPA after the move",
    );
    // To the new one: lands.
    let second = pattern(2403, 0x800);
    vmm.copy_lands(id, 2, OFF + 0x800, &second, "at the new GPA");
    let mut want = first;
    want.extend_from_slice(&second);
    request_host_check("shm0", OFF, &want);
}

/// Two BARs programmed over each other: the second is refused naming the
/// first; when the first moves away, the second is mapped without the
/// guest writing again. A GPA over guest RAM is refused naming the RAM,
/// whose mapping stays (a copy from it still works).
#[test]
fn overlaps_are_refused_and_cleared_when_the_other_moves() {
    let small: Vec<String> = ivshmem_devices()
        .into_iter()
        .filter(|(_, s)| *s == 64 << 10)
        .map(|(b, _)| b)
        .take(2)
        .collect();
    let (mut vmm, ids) = GuestVmm::new(&small, false);
    let (a, b) = (ids[0], ids[1]);
    vmm.place(a, 2, 0x2_0000_0000);
    vmm.place(b, 2, 0x2_0000_0000);
    assert_eq!(vmm.mapped_at(a, 2), Some(0x2_0000_0000));
    match vmm.map.bar_status(b, 2).unwrap() {
        BarStatus::Unreachable(Unreachable::OverlapsBar {
            other, other_bar, ..
        }) => assert_eq!((other.to_string(), other_bar), (small[0].clone(), 2)),
        other => panic!("b over a: {other:?}"),
    }
    vmm.place(a, 2, 0x2_0001_0000);
    assert_eq!(
        vmm.mapped_at(b, 2),
        Some(0x2_0000_0000),
        "b mapped once a moved"
    );
    vmm.copy_lands(b, 2, 0x8000, &pattern(2501, 0x100), "b after a moved");
    vmm.copy_lands(a, 2, 0x8100, &pattern(2502, 0x100), "a at its new GPA");
    // Over guest RAM.
    vmm.place(a, 2, RAM_GPA);
    match vmm.map.why_unreachable(small[0].parse().unwrap(), 2) {
        Some(Unreachable::CollidesWithVmm { label, .. }) => assert_eq!(label, "guest RAM"),
        other => panic!("a over RAM: {other:?}"),
    }
    // Guest RAM still mapped: edu copies from it into b.
    vmm.copy_lands(
        b,
        2,
        0x8200,
        &pattern(2503, 0x100),
        "from RAM after the refusal",
    );
}

// ---------------------------------------------------------------------------
// Interleavings: a property test with a model
// ---------------------------------------------------------------------------

/// What the model knows of one device.
#[derive(Debug, Clone, Copy)]
struct Model {
    registered: bool,
    decode: bool,
    /// BAR2: `Some(gpa)` when complete and assigned.
    at: Option<u64>,
    probing: bool,
    half: bool,
    /// Where it was mapped last (for the blocked samples).
    last_mapped: Option<u64>,
}

impl Model {
    fn expect(&self, valid: impl Fn(u64) -> bool) -> Option<u64> {
        (self.registered && self.decode && !self.probing && !self.half)
            .then_some(self.at)
            .flatten()
            .filter(|g| valid(*g))
    }
}

/// xorshift64*, seeded.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random interleavings over three devices (shm0, shm1, a small one), 500
/// steps: guest moves (decode off around them, or both halves with decode
/// on), sizing probes, decode toggles, half writes, VMM resets
/// (`VFIO_DEVICE_RESET` on its own fd, then told), VMM-side placement and
/// COMMAND writes, unplug and re-register, and GPAs over guest RAM or the
/// MSI window. A model is the oracle for every BAR's status at every step;
/// every 20th step (and the last) an edu copy checks the truth: it lands
/// where the model says the BAR is, and a copy to the GPA it had before
/// changes nothing. The seed is printed; `DMABUF_P2P_SEED` replays one.
#[test]
fn random_guest_and_vmm_interleavings_match_the_model() {
    const STEPS: u64 = 500;
    let seed = dmabuf_p2p_vm_tests::property_seed();
    // In the kernel log (console.log) and, on failure, in libtest's output:
    // a write to stdout here would split libtest's result line.
    let seed_line =
        format!("guest_bar_map property test: seed {seed} (DMABUF_P2P_SEED replays it)");
    dmabuf_p2p_vm_tests::Kmsg::mark(&seed_line);
    println!("{seed_line}");
    let mut rng = Rng(seed | 1);
    let small = ivshmem_devices()
        .into_iter()
        .find(|(_, s)| *s == 64 << 10)
        .unwrap()
        .0;
    let devs = vec![shm_address("shm0"), shm_address("shm1"), small];
    let sizes = [1u64 << 20, 64 << 20, 64 << 10];
    let (mut vmm, mut ids) = GuestVmm::new(&devs, false);
    let mut model = [Model {
        registered: true,
        decode: false,
        at: None,
        probing: false,
        half: false,
        last_mapped: None,
    }; 3];
    // Each device has GPA slots of its own (no two devices' slots overlap),
    // plus one over guest RAM and one over the MSI window.
    let slot = |d: usize, j: u64| -> u64 {
        match j {
            0 => RAM_GPA & !(sizes[d] - 1),
            1 => 0xfee0_0000 & !(sizes[d] - 1),
            j => 0x10_0000_0000 + 0x1_0000_0000 * d as u64 + sizes[d] * (j - 2),
        }
    };
    // What the map may map: not address 0, not over guest RAM, not over the
    // MSI window (no two devices' addresses overlap).
    let valid = |d: usize, g: u64| {
        let end = g + sizes[d];
        g != 0
            && !(g < RAM_GPA + 0x1_0000 && end > RAM_GPA)
            && !(g < 0xfef0_0000 && end > 0xfee0_0000)
    };
    let (mut landed, mut blocked) = (0, 0);
    let mut history: Vec<String> = Vec::new();
    let area = |d: usize| match d {
        0 => 0x8_c000,
        1 => 0x320_c000,
        _ => 0xc000,
    };
    for step in 0..STEPS {
        let d = rng.below(3) as usize;
        let id = ids[d];
        let op = rng.below(11);
        let m = &mut model[d];
        let what;
        if !m.registered {
            // Unplugged: the VMM plugs it back in (a fresh registration).
            let dev = vmm.vmm_device(&devs[d]);
            let lib =
                dmabuf_p2p::VfioPciDevice::adopt_rust_vmm(dev, &vmm.iommufd, Default::default())
                    .unwrap();
            ids[d] = vmm
                .map
                .register(lib, dmabuf_p2p::vmm::Offer::AllMappable)
                .unwrap();
            *m = Model {
                registered: true,
                decode: false,
                at: None,
                probing: false,
                half: false,
                last_mapped: m.last_mapped,
            };
            what = "re-register".to_owned();
        } else {
            match op {
                0 | 1 => {
                    let g = slot(d, rng.below(6));
                    vmm.place(id, 2, g);
                    m.at = Some(g);
                    m.decode = true;
                    m.probing = false;
                    m.half = false;
                    what = format!("guest places BAR2 at {g:#x}");
                }
                2 => {
                    // Both halves with decode on, as a guest may.
                    let g = slot(d, rng.below(6));
                    #[allow(clippy::cast_possible_truncation)]
                    vmm.write(id, 0x18, 4, g as u32);
                    vmm.write(id, 0x1c, 4, (g >> 32) as u32);
                    m.half = false;
                    m.probing = false;
                    m.at = Some(g);
                    what = format!("guest writes both halves ({g:#x}) with decode {}", m.decode);
                }
                3 => {
                    let cur = m.at.unwrap_or(0);
                    vmm.write(id, 0x18, 4, u32::MAX);
                    assert!(
                        !matches!(vmm.map.bar_status(id, 2).unwrap(), BarStatus::Mapped { .. }),
                        "step {step}: a probe is mapped"
                    );
                    #[allow(clippy::cast_possible_truncation)]
                    vmm.write(id, 0x18, 4, cur as u32);
                    vmm.write(id, 0x1c, 4, u32::MAX);
                    vmm.write(id, 0x1c, 4, (cur >> 32) as u32);
                    // Restoring both halves completes a half-written address.
                    m.probing = false;
                    m.half = false;
                    what = "guest sizes BAR2".to_owned();
                }
                4 => {
                    let on = rng.below(2) == 0;
                    let cmd = if on { MEMORY | MASTER } else { MASTER };
                    vmm.write(id, COMMAND, 2, u32::from(cmd));
                    m.decode = on;
                    m.half = false;
                    what = format!("guest decode {on}");
                }
                5 => {
                    // A lone low half (of another slot of this device): not
                    // mapped until the high one or a COMMAND write.
                    let g = slot(d, 2 + rng.below(4));
                    #[allow(clippy::cast_possible_truncation)]
                    vmm.write(id, 0x18, 4, g as u32);
                    m.at = Some((m.at.unwrap_or(0) & !0xffff_ffff) | (g & 0xffff_ffff));
                    m.half = true;
                    what = format!("guest writes the low half of {g:#x} only");
                }
                6 => {
                    vmm.vmm_device(&devs[d]).reset();
                    vmm.map.note_reset(id).unwrap();
                    m.decode = false;
                    m.at = None;
                    m.half = false;
                    m.probing = false;
                    what = "VMM resets the device".to_owned();
                }
                7 => {
                    let g = slot(d, 2 + rng.below(4));
                    vmm.map.place_bar(id, 2, Some(g)).unwrap();
                    m.at = Some(g);
                    m.half = false;
                    m.probing = false;
                    what = format!("VMM places BAR2 at {g:#x}");
                }
                8 => {
                    let on = rng.below(2) == 0;
                    let old = if m.decode { MEMORY | MASTER } else { MASTER };
                    let new = if on { MEMORY | MASTER } else { MASTER };
                    vmm.vmm_device(&devs[d]).region_write(
                        dmabuf_p2p::vfio::CONFIG_REGION_INDEX,
                        &new.to_le_bytes(),
                        COMMAND,
                    );
                    vmm.map.note_command_change(id, old, new).unwrap();
                    m.decode = on;
                    m.half = false;
                    what = format!("VMM writes decode {on} and tells");
                }
                9 => {
                    // Unplug as the VMM sees it: the request, then removal.
                    if rng.below(4) == 0 {
                        vmm.map.note_unplug_request(id).unwrap();
                        assert!(matches!(
                            vmm.map.bar_status(id, 2).unwrap(),
                            BarStatus::Unreachable(Unreachable::DeviceGone(_))
                        ));
                    }
                    drop(vmm.map.remove(id).unwrap());
                    m.registered = false;
                    what = "VMM removes the device".to_owned();
                }
                _ => {
                    let drifts = vmm.map.sync_with_kernel().unwrap();
                    assert!(drifts.is_empty(), "step {step}: drift found: {drifts:?}");
                    what = "sync with the kernel".to_owned();
                }
            }
        }
        history.push(format!("step {step}: device {d}: {what}"));
        // The oracle, for every device.
        for (e, mm) in model.iter_mut().enumerate() {
            if !mm.registered {
                continue;
            }
            let want = mm.expect(|g| valid(e, g));
            let got = vmm.mapped_at(ids[e], 2);
            assert_eq!(
                got,
                want,
                "seed {seed} step {step} ({what} on device {d}): device {e}: {:?}, model {mm:?}; the steps on it:\n{}",
                vmm.map.bar_status(ids[e], 2),
                {
                    let mine: Vec<&String> = history
                        .iter()
                        .filter(|h| h.contains(&format!("device {e}:")))
                        .collect();
                    let from = mine.len().saturating_sub(25);
                    mine[from..]
                        .iter()
                        .map(|h| h.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                }
            );
            if got.is_some() {
                mm.last_mapped = got;
            }
        }
        if step % 20 == 19 || step + 1 == STEPS {
            // Mostly a device the model says is mapped (it must land),
            // else any (a copy to its old GPA must change nothing).
            let mapped: Vec<usize> = (0..3)
                .filter(|&e| model[e].expect(|g| valid(e, g)).is_some())
                .collect();
            let e = if !mapped.is_empty() && rng.below(3) != 0 {
                mapped[rng.below(mapped.len() as u64) as usize]
            } else {
                rng.below(3) as usize
            };
            let mm = model[e];
            if !mm.registered {
                continue;
            }
            let off = area(e) + 0x100 * (step / 20 % 16);
            let off = if e == 2 { off % 0x1000 + 0xc000 } else { off };
            let bytes = pattern(seed ^ step, 0x100);
            match mm.expect(|g| valid(e, g)) {
                Some(_) => {
                    vmm.copy_lands(ids[e], 2, off, &bytes, &format!("seed {seed} step {step}"));
                    landed += 1;
                }
                None => {
                    if let Some(old) = mm.last_mapped {
                        // Decode may be off: read the BAR with decode on.
                        let was = mm.decode;
                        if !was {
                            vmm.write(ids[e], COMMAND, 2, u32::from(MEMORY | MASTER));
                        }
                        if vmm.mapped_at(ids[e], 2) != Some(old) {
                            vmm.copy_blocked(
                                ids[e],
                                2,
                                off,
                                old + off,
                                &bytes,
                                &format!("seed {seed} step {step}: old GPA"),
                            );
                            blocked += 1;
                        }
                        if !was {
                            vmm.write(ids[e], COMMAND, 2, u32::from(MASTER));
                            // The COMMAND writes completed a half-written address.
                            model[e].half = false;
                        }
                    }
                }
            }
        }
    }
    let summary = format!(
        "guest_bar_map property test: seed {seed}, {STEPS} steps: {landed} copies landed, {blocked} blocked"
    );
    dmabuf_p2p_vm_tests::Kmsg::mark(&summary);
    println!("{summary}");
    assert!(landed > 0, "seed {seed}: no copy was checked to land");
}

// ---------------------------------------------------------------------------
// Logging and repairs
// ---------------------------------------------------------------------------

/// A logger that keeps the library's lines.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.target().starts_with("dmabuf_p2p")
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {}", r.level(), r.args()));
        }
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

/// Every map, move, revocation, restore, unmap and refusal reaches the
/// VMM's logger with the device, the BAR, the GPA and the reason.
#[test]
fn the_vmms_logger_sees_every_map_move_revoke_restore_and_refusal() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&CAPTURE).unwrap();
        log::set_max_level(log::LevelFilter::Info);
    });
    let shm0 = shm_address("shm0");
    let (vmm, ids) = GuestVmm::new(std::slice::from_ref(&shm0), false);
    let id = ids[0];
    CAPTURE.0.lock().unwrap().clear();
    vmm.place(id, 2, 0x2_0000_0000); // revoke nothing, map
    vmm.write(id, COMMAND, 2, u32::from(MASTER)); // revoke
    vmm.write(id, COMMAND, 2, u32::from(MEMORY | MASTER)); // restore
    vmm.place(id, 2, 0x2_0010_0000); // revoke, move
    vmm.place(id, 2, RAM_GPA); // revoke, refusal
    vmm.place(id, 2, 0x2_0000_0000); // map
    drop(vmm.map.remove(id).unwrap()); // unmap
    let lines = CAPTURE.0.lock().unwrap().clone();
    let text = lines.join("\n");
    let want = [
        format!("INFO {shm0} BAR2 (1 MiB) mapped at GPA 0x200000000"),
        format!("INFO {shm0} BAR2 at GPA 0x200000000: revoked: memory decode off"),
        format!("INFO {shm0} BAR2: restored at GPA 0x200000000"),
        format!("INFO {shm0} BAR2 (1 MiB) moved: GPA 0x200000000 -> 0x200100000"),
        format!(
            "WARN {shm0} BAR2 (1 MiB) refused at GPA 0x10000000 (unmapped from GPA 0x200100000): \
             GPA 0x10000000..0x10100000 (1 MiB) overlaps the VMM's mapping guest RAM"
        ),
        format!("INFO {shm0} BAR2 (1 MiB) mapped at GPA 0x200000000"),
        format!("INFO {shm0} BAR2: unmapped from GPA 0x200000000: device removed"),
    ];
    let mut at = 0;
    for w in &want {
        let found = lines[at..]
            .iter()
            .position(|l| l.starts_with(w.as_str()))
            .unwrap_or_else(|| panic!("no log line {w:?} after line {at}:\n{text}"));
        at += found + 1;
    }
}

/// `sync_with_kernel` finds decode turned off on the VMM's own fd without
/// telling, records it, turns it back on and maps again: the copy lands.
#[test]
fn sync_with_kernel_finds_and_repairs_decode_changed_behind_the_map() {
    let shm0 = shm_address("shm0");
    let (mut vmm, ids) = GuestVmm::new(std::slice::from_ref(&shm0), false);
    let id = ids[0];
    vmm.place(id, 2, 0x2_0000_0000);
    vmm.vmm_device(&shm0).region_write(
        dmabuf_p2p::vfio::CONFIG_REGION_INDEX,
        &MASTER.to_le_bytes(),
        COMMAND,
    );
    let drifts = vmm.map.sync_with_kernel().unwrap();
    assert!(
        drifts.iter().any(|d| matches!(
            d,
            Drift::DecodeDiffers {
                guest: true,
                device_bit: false,
                ..
            }
        )),
        "{drifts:?}"
    );
    assert_eq!(vmm.mapped_at(id, 2), Some(0x2_0000_0000));
    vmm.copy_lands(id, 2, 0x9_8000, &pattern(2601, 0x100), "after the repair");
    assert!(
        vmm.map.sync_with_kernel().unwrap().is_empty(),
        "nothing left to repair"
    );
}

// ---------------------------------------------------------------------------
// Hot-unplug
// ---------------------------------------------------------------------------

/// A real hot-unplug of a registered device (QMP `device_del` of shm1): the
/// VMM's own device-request eventfd fires, it tells the map, whose BAR is
/// then not reachable (`DeviceGone`) and no longer mapped (edu's copy to its
/// GPA changes nothing: checked in the host's backing file), while the other
/// device's BAR stays mapped and DMA lands there; the VMM removes the device
/// from the map and closes it, the kernel lets it go, and it is plugged back.
#[test]
fn hot_unplug_of_a_registered_device_unmaps_it_and_spares_the_others() {
    use dmabuf_p2p::revoke::RevokeReason;
    use dmabuf_p2p::vfio::REQ_IRQ_INDEX;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    use super::faults::{REQUEST_TIMEOUT, Shm1Restorer, qmp_ok, shm_with, wait_until};
    use super::vmm::replug_and_check;

    const AREA: u64 = 0x321_0000;
    const G1: u64 = 0x20_0000_0000;
    const G0: u64 = 0x30_0000_0000;
    let shm1 = shm_with(64 << 20);
    let _restore = Shm1Restorer { addr: shm1 };
    let (mut vmm, ids) = GuestVmm::new(&[shm1.to_string(), shm_address("shm0")], false);
    let (id1, id0) = (ids[0], ids[1]);
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    vmm.vmm_device(&shm1.to_string())
        .enable_irq(REQ_IRQ_INDEX, vec![&efd])
        .unwrap();
    vmm.place(id1, 2, G1);
    vmm.place(id0, 2, G0);
    let first = pattern(2701, 0x800);
    vmm.copy_lands(id1, 2, AREA, &first, "shm1 before the unplug");
    let mut want = first.clone();
    want.extend(bar_read(&vmm.bar(id1, 2), AREA + 0x800, 0x800));

    qmp_ok("device_del", r#"{"id":"shm1"}"#);
    let asked = wait_until(REQUEST_TIMEOUT, || efd.read().is_ok_and(|n| n != 0));
    assert!(
        asked.is_some(),
        "no device request within {REQUEST_TIMEOUT:?}"
    );
    vmm.map.note_unplug_request(id1).unwrap();
    assert_eq!(
        vmm.map.bar_status(id1, 2).unwrap(),
        BarStatus::Unreachable(Unreachable::DeviceGone(RevokeReason::Unplug))
    );
    vmm.edu_copy(
        &pattern(2702, 0x800),
        G1 + AREA + 0x800,
        "to shm1's GPA after the request",
    );
    vmm.copy_lands(
        id0,
        2,
        0x8_d000,
        &pattern(2703, 0x100),
        "shm0 while shm1 leaves",
    );

    drop(vmm.map.remove(id1).unwrap());
    let shm1_name = shm1.to_string();
    vmm.vmm_devices.retain(|(b, _)| *b != shm1_name);
    drop(vmm);
    replug_and_check(shm1, AREA, &want);
}

// ---------------------------------------------------------------------------
// Automatic placement in the VMM's IOAS
// ---------------------------------------------------------------------------

/// `IovaPlacement::Auto` in an adopted IOAS that holds the VMM's guest RAM:
/// undeclared, the first pick lands on the RAM, the kernel refuses it
/// (`EEXIST`), the refused range is learned and the kernel places the
/// mapping (no retry loop, no failure); declared, the pick goes past the RAM
/// at once, to the first free aligned IOVA. The RAM mapping is never
/// touched.
#[test]
fn auto_placement_in_the_vmms_ioas_avoids_its_guest_ram() {
    use std::os::fd::{AsFd, AsRawFd};
    use std::sync::Arc;

    use dmabuf_p2p::memfd::Memfd;
    use dmabuf_p2p::{ByteRange, Ioas, Iommufd, IovaPlacement, MapPerms};
    use iommufd_ioctls::{IommuFd, IommufdIoas};

    const RAM_AT: u64 = 0x1000;
    const RAM_LEN: u64 = 16 << 20;
    let vmm_iommufd = Arc::new(IommuFd::new().unwrap());
    let vmm_ioas = IommufdIoas::new(Arc::clone(&vmm_iommufd)).unwrap();
    let ram = Memfd::new("vmm-ram", RAM_LEN).unwrap();
    vmm_ioas
        .map_file(ram.as_fd().as_raw_fd(), 0, RAM_LEN, RAM_AT, true)
        .unwrap();
    let iommufd = Iommufd::adopt_rust_vmm(&vmm_iommufd).unwrap();
    let ioas = Ioas::adopt_rust_vmm(&iommufd, &vmm_ioas).unwrap();
    let buf = Memfd::new("buf", 0x1_0000).unwrap();
    let whole = ByteRange::new(0, 0x1_0000);
    // Undeclared: two maps, both placed (by the kernel), neither on the RAM.
    let a = ioas
        .map_file(&buf, whole, IovaPlacement::Auto, MapPerms::ReadWrite)
        .unwrap();
    let b = ioas
        .map_file(&buf, whole, IovaPlacement::Auto, MapPerms::ReadWrite)
        .unwrap();
    for m in [&a, &b] {
        assert!(
            m.iova() + m.length() <= RAM_AT || m.iova() >= RAM_AT + RAM_LEN,
            "mapped over the VMM's RAM at {:#x}",
            m.iova()
        );
    }
    drop((a, b));
    // Declared: the lowest free IOVA past the RAM (a 64 KiB memfd range is
    // aligned to 4 KiB pages), found at the first pick.
    ioas.declare_foreign_area(RAM_AT, RAM_LEN);
    let c = ioas
        .map_file(&buf, whole, IovaPlacement::Auto, MapPerms::ReadWrite)
        .unwrap();
    assert_eq!(c.iova(), RAM_AT + RAM_LEN, "the first IOVA past the RAM");
    drop(c);
    // The RAM mapping is the VMM's, untouched: it unmaps it itself.
    vmm_ioas.unmap(RAM_AT, RAM_LEN).unwrap();
}

// ---------------------------------------------------------------------------
// Resets and power states on a real device
// ---------------------------------------------------------------------------

/// nvme1's registers (BAR0) that switch its PMR (BAR4) on, and the
/// capability offsets the guest's resets go through.
const PMRCTL: u64 = 0xe04;
const PMRSTS: u64 = 0xe08;
const PMRSTS_NRDY: u32 = 1 << 8;

/// The offset of capability `id` in `dev`'s config space (walked through
/// the library's config reads).
fn capability(dev: &dmabuf_p2p::VfioPciDevice, id: u8) -> u64 {
    let mut at = u64::from(dev.config_read_u8(0x34).unwrap() & !3);
    for _ in 0..48 {
        assert!(at >= 0x40, "capability {id:#x} not found");
        if dev.config_read_u8(at).unwrap() == id {
            return at;
        }
        at = u64::from(dev.config_read_u8(at + 1).unwrap() & !3);
    }
    panic!("capability {id:#x}: the list loops");
}

/// Switches nvme1's PMR on through its BAR0 (a controller reset or a D3
/// cycle may switch it off) and waits for it to be ready.
fn enable_pmr(vmm: &GuestVmm, id: DeviceId) {
    let bar0 = vmm.bar(id, 0);
    bar0.write_u32(PMRCTL, 1).unwrap();
    for _ in 0..5000 {
        if bar0.read_u32(PMRSTS).unwrap() & PMRSTS_NRDY == 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    panic!(
        "nvme1's PMR not ready (PMRSTS {:#x})",
        bar0.read_u32(PMRSTS).unwrap()
    );
}

/// The reset paths on a real device with FLR and power management (nvme1;
/// its PMR, BAR4, is the target, backed by the host's `nvme1-pmr` file):
/// the guest's Initiate FLR through `config_write`, a D3hot/D0 cycle of
/// `PMCSR`, and the VMM's own `VFIO_DEVICE_RESET` told with `note_reset`.
/// After each, edu's copy to the BAR's GPA changes nothing (host file
/// checked) until the guest maps it again, and then lands.
#[test]
fn resets_and_d3_unmap_until_the_guest_maps_again() {
    const G1: u64 = 0x40_0000_0000;
    const G2: u64 = 0x50_0000_0000;
    // nvme1's PMR area for this test (nvme.rs uses 0x0..0x10000 and
    // 0x200000..0x208000).
    const AREA: u64 = 0x21_0000;
    let nvme1 = nvme_address("nvme1");
    let (mut vmm, ids) = GuestVmm::new(std::slice::from_ref(&nvme1), false);
    let id = ids[0];
    let dev = vmm.map.vfio_device(id).unwrap();
    let exp = capability(&dev, 0x10);
    let pm = capability(&dev, 0x01);
    assert!(
        dev.config_read_u32(exp + 4).unwrap() & (1 << 28) != 0,
        "nvme1 has no FLR (DEVCAP)"
    );
    let devctl = exp + 8;
    let pmcsr = pm + 4;

    // Mapped, and DMA lands.
    vmm.place(id, 4, G1);
    assert_eq!(vmm.mapped_at(id, 4), Some(G1));
    enable_pmr(&vmm, id);
    let mut host = Vec::new();
    let first = pattern(2801, 0x100);
    vmm.copy_lands(id, 4, AREA, &first, "before the FLR");
    host.push((AREA, first));

    // The guest's FLR: unmapped, the guest's view reset (BAR unassigned,
    // decode off); a copy to the old GPA changes nothing.
    let ctl = dev.config_read_u16(devctl).unwrap();
    let how = vmm
        .map
        .config_write(id, devctl, &(ctl | 0x8000).to_le_bytes())
        .unwrap();
    assert_eq!(how, ConfigWrite::Reset);
    assert_eq!(
        vmm.map.bar_status(id, 4).unwrap(),
        BarStatus::Unreachable(Unreachable::DecodeOff)
    );
    assert_eq!(vmm.map.bar_register_read(id, 0x24).unwrap(), Some(0));
    let kept = bar_read(&vmm.bar(id, 4), AREA + 0x100, 0x100);
    vmm.edu_copy(
        &pattern(2802, 0x100),
        G1 + AREA + 0x100,
        "to G1 after the FLR",
    );
    host.push((AREA + 0x100, kept));

    // The guest maps it again (elsewhere): lands.
    vmm.place(id, 4, G2);
    assert_eq!(vmm.mapped_at(id, 4), Some(G2));
    enable_pmr(&vmm, id);
    let second = pattern(2803, 0x100);
    vmm.copy_lands(id, 4, AREA + 0x200, &second, "after the FLR, at G2");
    host.push((AREA + 0x200, second));

    // D3hot: dead until D0, then mapped again at the same GPA by the map
    // itself (the guest's BARs survive D3 in the map's view).
    let pmc = dev.config_read_u16(pmcsr).unwrap();
    let how = vmm
        .map
        .config_write(id, pmcsr, &((pmc & !3) | 3).to_le_bytes())
        .unwrap();
    assert_eq!(how, ConfigWrite::PowerState);
    assert!(
        matches!(
            vmm.map.bar_status(id, 4).unwrap(),
            BarStatus::Unreachable(Unreachable::PoweredDown)
        ),
        "{:?}",
        vmm.map.bar_status(id, 4)
    );
    vmm.edu_copy(&pattern(2804, 0x100), G2 + AREA + 0x300, "to G2 in D3hot");
    vmm.map
        .config_write(id, pmcsr, &(pmc & !3).to_le_bytes())
        .unwrap();
    assert_eq!(vmm.mapped_at(id, 4), Some(G2), "back in D0");
    enable_pmr(&vmm, id);
    // The D3 copy changed nothing: its bytes are the PMR's as read now,
    // unless the copy landed (then they equal the stray pattern).
    let after_d3 = bar_read(&vmm.bar(id, 4), AREA + 0x300, 0x100);
    assert_ne!(after_d3, pattern(2804, 0x100), "the copy in D3hot landed");
    host.push((AREA + 0x300, after_d3));
    let third = pattern(2805, 0x100);
    vmm.copy_lands(id, 4, AREA + 0x400, &third, "after D0");
    host.push((AREA + 0x400, third));

    // The VMM's own reset on its fd, told: unmapped, the guest's view
    // reset; mapped again when the guest places the BAR.
    vmm.vmm_device(&nvme1).reset();
    vmm.map.note_reset(id).unwrap();
    assert_eq!(
        vmm.map.bar_status(id, 4).unwrap(),
        BarStatus::Unreachable(Unreachable::DecodeOff)
    );
    assert!(
        !matches!(dev.hub().state(), dmabuf_p2p::revoke::BufferState::Gone(_)),
        "the hub is gone after a reset"
    );
    let kept = bar_read(&vmm.bar(id, 4), AREA + 0x500, 0x100);
    vmm.edu_copy(
        &pattern(2806, 0x100),
        G2 + AREA + 0x500,
        "to G2 after note_reset",
    );
    host.push((AREA + 0x500, kept));
    vmm.place(id, 4, G1);
    assert_eq!(vmm.mapped_at(id, 4), Some(G1));
    enable_pmr(&vmm, id);
    let fourth = pattern(2807, 0x100);
    vmm.copy_lands(id, 4, AREA + 0x600, &fourth, "after note_reset, at G1");
    host.push((AREA + 0x600, fourth));

    for (off, bytes) in host {
        request_host_check("nvme1-pmr", off, &bytes);
    }
}

/// A BAR holding the MSI-X table and PBA (nvme1's BAR0: the controller's
/// registers and doorbells below them), registered with every mappable BAR
/// offered, is mapped around the table's and PBA's pages: a status query
/// names those pages as not mapped, with a typed reason that matches what
/// VFIO says of the table's size; edu's write to a register below the table
/// lands (`INTMS`, read back through the BAR), its write to the table's
/// GPA changes nothing there (the IOMMU blocks it); after a move the parts
/// are at the new GPA, and decode off revokes them together.
#[test]
fn a_bar_holding_the_msix_table_is_mapped_around_it() {
    const INTMS: u64 = 0x0c;
    const INTMC: u64 = 0x10;
    let (g1, g2) = (0x60_0000_0000u64, 0x61_0000_0000u64);
    let nvme1 = nvme_address("nvme1");
    let (mut vmm, ids) = GuestVmm::new(std::slice::from_ref(&nvme1), false);
    let id = ids[0];
    vmm.place(id, 0, g1);
    let vectors = vmm
        .map
        .vfio_device(id)
        .unwrap()
        .irq_vectors(dmabuf_p2p::vfio::MSIX_IRQ_INDEX)
        .unwrap();
    let (table, not_mapped) = match vmm.map.bar_status(id, 0).unwrap() {
        BarStatus::MappedAroundMsix {
            gpa,
            not_mapped,
            why:
                Unreachable::HoldsMsix {
                    table: Some(table),
                    pba: Some(pba),
                },
            ..
        } => {
            assert_eq!(gpa, g1);
            assert_eq!(table.length, 16 * u64::from(vectors), "{table} {pba}");
            assert!(pba.length >= u64::from(vectors).div_ceil(8), "{pba}");
            // The table's and the PBA's bytes are all in the pages not mapped.
            for r in [table, pba] {
                assert!(
                    not_mapped
                        .iter()
                        .any(|h| h.offset <= r.offset && r.offset + r.length <= h.offset + h.length),
                    "{r} not in {not_mapped:?}"
                );
            }
            assert!(
                not_mapped.iter().all(|h| h.offset > INTMC),
                "{not_mapped:?}"
            );
            (table, not_mapped)
        }
        other => panic!("nvme1 BAR0: {other:?}"),
    };
    let why = vmm.map.why_unreachable(nvme1.parse().unwrap(), 0).unwrap();
    assert!(why.to_string().contains("MSI-X table at"), "{why}");
    let status = vmm.map.bar_status(id, 0).unwrap().to_string();
    assert!(status.contains("except BAR bytes"), "{status}");

    // A register below the table: edu's write lands (MSI-X is off, so the
    // controller keeps the interrupt mask it is given).
    let bar = vmm.bar(id, 0);
    bar.write_u32(INTMC, u32::MAX).unwrap();
    assert_eq!(bar.read_u32(INTMS).unwrap(), 0, "INTMS before");
    vmm.edu_copy(&1u32.to_le_bytes(), g1 + INTMS, "INTMS at g1");
    assert_eq!(
        bar.read_u32(INTMS).unwrap(),
        1,
        "edu's write to INTMS at g1"
    );

    // The table: edu's write to its GPA changes nothing in it (its first
    // entry read a dword at a time, as the table takes it).
    let entry = pattern(2901, 16);
    let first_entry = |bar: &dmabuf_p2p::vfio::BarMapping| -> Vec<u32> {
        (0..4)
            .map(|k| bar.read_u32(table.offset + 4 * k).unwrap())
            .collect()
    };
    let before = first_entry(&bar);
    vmm.edu_copy(&entry, g1 + table.offset, "the MSI-X table at g1");
    assert_eq!(
        first_entry(&bar),
        before,
        "the MSI-X table after edu's write at g1"
    );

    // Moved: the parts follow; the old GPA is gone.
    vmm.place(id, 0, g2);
    assert_eq!(vmm.mapped_at(id, 0), Some(g2));
    vmm.edu_copy(&2u32.to_le_bytes(), g1 + INTMS, "INTMS at the old g1");
    assert_eq!(
        bar.read_u32(INTMS).unwrap(),
        1,
        "edu's write to the old GPA"
    );
    vmm.edu_copy(&2u32.to_le_bytes(), g2 + INTMS, "INTMS at g2");
    assert_eq!(
        bar.read_u32(INTMS).unwrap(),
        3,
        "edu's write to INTMS at g2"
    );
    vmm.edu_copy(&entry, g2 + table.offset, "the MSI-X table at g2");
    assert_eq!(
        first_entry(&bar),
        before,
        "the MSI-X table after edu's write at g2"
    );
    match vmm.map.bar_status(id, 0).unwrap() {
        BarStatus::MappedAroundMsix {
            gpa,
            not_mapped: now,
            ..
        } => {
            assert_eq!((gpa, &now), (g2, &not_mapped));
        }
        other => panic!("nvme1 BAR0 after the move: {other:?}"),
    }

    // Decode off revokes every part: nothing lands.
    vmm.write(id, COMMAND, 2, u32::from(MASTER));
    assert_eq!(
        vmm.map.bar_status(id, 0).unwrap(),
        BarStatus::Unreachable(Unreachable::DecodeOff)
    );
    vmm.write(id, COMMAND, 2, u32::from(MEMORY | MASTER));
    assert_eq!(vmm.mapped_at(id, 0), Some(g2));
    bar.write_u32(INTMC, u32::MAX).unwrap();
    vmm.edu_copy(
        &4u32.to_le_bytes(),
        g2 + INTMS,
        "INTMS at g2 after decode on",
    );
    assert_eq!(
        bar.read_u32(INTMS).unwrap(),
        4,
        "edu's write after decode on"
    );
    bar.write_u32(INTMC, u32::MAX).unwrap();
}
