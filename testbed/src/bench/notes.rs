//! The benchmark page's fixed prose: what the numbers of each part say,
//! and what the overhead investigation found. `page` places each after its
//! part's tables.

pub(super) const PLACEMENT_NOTES: &str = r#"
What the numbers say:

- An IOMMU maps a range with a page of size *p* only where the IOVA and the
  physical address agree modulo *p*. The kernel's automatic placement does not
  look at the physical address and aligns to at most 2 MiB (with transparent
  huge pages; without them, 4 KiB), so a BAR of 1 GiB or more placed by it is
  mapped with 2 MiB pages (or 4 KiB ones): more page-table pages, slower maps
  and unmaps (in the table, clear from 16 GiB on, where its 16 MiB alignment
  needs one page-table page per GiB), and on hardware one IOTLB entry per
  2 MiB instead of per 1 GiB for every peer-to-peer transfer.
- The library's placement gives the BAR the alignment of its physical start up
  to the largest IOMMU page that fits, so it is mapped as at the aligned
  fixed IOVA: the same page-table growth, and map and unmap times that differ
  from the library's own fixed-IOVA map by no more than this VM's noise (the
  `Auto` / fixed ratios above, measured interleaved). On the instruction
  clock the comparison is exact: `Auto`'s map executes 650 to 750 more
  instructions than the fixed map (the library's search for the IOVA, under
  1% of a map) and its unmap the same instructions (1.0000 from 1 GiB on),
  while the kernel's own placement executes 16% more instructions to map a
  1 GiB BAR than `Auto` and 17 times more to map 64 GiB.
  It never depends on the kernel having THP. It avoids the areas mapped
  through any handle of the IOAS and the areas its owner declared
  (`Ioas::declare_foreign_area`); an area it does not know of makes the
  kernel refuse the fixed IOVA (`EEXIST`): the range is remembered and the
  kernel places that mapping itself. The IOMMU page sizes are assumed (4 KiB, 2 MiB,
  1 GiB, what x86 IOMMUs and the emulated VT-d offer: type1's `iova_pgsizes`
  above) unless set with `Ioas::set_iommu_page_sizes`: iommufd does not report
  them for an IOAS.
"#;

/// Observations on the sweep that the numbers alone do not say.
pub(super) const SWEEP_NOTES: &str = r#"
What the curves say:

- **The BAR dma-buf path is flat.** Mapping 1 GiB costs what mapping 64 KiB
  costs. iommufd maps the exporter's physical range as it is: no page of it is
  looked up or pinned, and a contiguous, aligned MMIO range goes into the IOMMU
  in large pages (the emulated VT-d offers 4 KiB, 2 MiB and 1 GiB pages: the
  `iova_pgsizes` above). Unmapping is flat for the same reason.
- **The legacy type1 path grows linearly with size** (slope about 1).
  `VFIO_IOMMU_MAP_DMA` of a `VM_PFNMAP` range (the BAR's mmap) resolves the
  virtual range page by page through the process page tables before it maps;
  the unmap walks the mapping back. At the largest size the gap to the
  dma-buf path is the ratio given just above. This is the cost the
  dma-buf design removes, besides tying the mapping's life to the exporter instead of to a
  process's page tables.
- **A memfd grows linearly too**: every map pins each page of the range and
  every unmap unpins it. That is the price of mapping RAM through iommufd, and
  the reason not to remap big memfds often; it has nothing to do with device
  memory.
"#;

/// What the overhead investigation found.
pub(super) const OVERHEAD_NOTES: &str = r#"
### What the library does besides the ioctls

`cargo xtask bench --strace` runs two library cycles and two raw cycles under
strace in the VM, with a labelled marker between the operations. Per
operation:

| operation | raw | library |
|---|---|---|
| export | `ioctl(VFIO_DEVICE_FEATURE)` | the same (the first export of a BAR also asks `VFIO_DEVICE_GET_REGION_INFO` once; it read the device's sysfs `resource` too, which `open` does now: part 10) |
| map | `ioctl(IOMMU_IOAS_MAP_FILE)` | the same |
| unmap | `ioctl(IOMMU_IOAS_UNMAP)` | the same |
| close | `close` | the same |

**Fixed** (found with this benchmark):

1. `VfioPciDevice::export_bar` asked for the BAR on *every* export:
   `VFIO_DEVICE_GET_REGION_INFO` plus a `stat` and a full read of the sysfs
   `resource` file (see `region_info_ioctl`, `stat_sysfs_dir` and
   `read_sysfs_resource` above). `VfioPciDevice::bar` now keeps each BAR
   after the first look: a BAR cannot move or change size while vfio-pci
   holds the device.
2. `plan_export` formatted the BAR's name into a `String` on every export,
   for error messages; it now does so only when there is an error.
3. `Ioas::map_dmabuf` asked `fstatfs` whether a `DmaBuf` was a dma-buf.
4. `export_bar` read `PCI_COMMAND` before every export, to know whether the
   buffer is born revoked (`pread_export_ioctl` against `export_ioctl`). It
   now takes memory decode from the device's known command register, kept
   current by the library's own config writes, resets, the VMM's
   `note_*`/`guest_config_write` calls and `sync_with_kernel`; only a device
   that has not seen the register yet reads it.
5. `map_dmabuf` asked the buffer's size (`lseek`) on every map. A `DmaBuf`
   now records its size when it is made (the size the exporter was asked
   for) or adopted (`TryFrom<OwnedFd>` asks once).
6. Every mapping duplicated the dma-buf fd (`fcntl(F_DUPFD_CLOEXEC)`) so that
   it could map the buffer again after a revocation, and closed the
   duplicate on close. The `DmaBuf`'s fd is now reference-counted: a mapping
   holds the same fd, which is closed when the last holder goes, so a
   mapping can still be restored after the caller dropped its handle.
7. A one-range export (the kind iommufd imports) built its ioctl argument in
   a growing heap buffer, copied its range into a vector for it, and kept
   its range and physical range in two more vectors. It now builds the
   40-byte argument on the stack and keeps both ranges inline.
8. `export_bar` ran its checks one by one on every export, through
   functions in three modules (the cached BAR was copied out, the range went
   through the general validator and the physical-address conversion). A
   one-range export of a BAR already looked at now passes them all in one
   branch-free test (`quick_phys`; a host test holds it to `plan_export` on
   every edge: empty, unaligned, overflowing and out-of-bounds ranges,
   absent and I/O BARs, BARs at the top of the address space). Anything
   else, and every error, still takes the checks one by one, which name what
   is wrong.
9. The buffer's reference count was an `Arc<OwnedFd>`: a `malloc` per export
   and a `free` per close. A `DmaBuf` and its mappings now share the fd
   through `SharedFd`, whose count lives in a static table indexed by the fd
   number (an `Arc` only from fd 65536 up): an export allocates nothing and
   a close frees nothing.
10. The fixed-IOVA map, the IOAS's record of its areas and the drop of an
   unmapped `IoasMapping` went through several out-of-line calls each (the
   crate's codegen units do not inline into each other unless asked); they
   are inlined into the caller now, and the area record appends (map) or
   pops (unmap) in the usual case without a search. `BarExport` releases its
   hub before its fd, so that the close is the last thing its drop does.
11. Every map and unmap reached the iommufd's fd through two pointers (the
   IOAS's record, then the `Iommufd`'s `Arc<OwnedFd>`). The `Iommufd` now
   holds its fd through `SharedFd` as well, inline in the IOAS's record.

Before the first three the ratios were **22.1** (export), **2.84** (map),
**1.99** (unmap), **2.40** (close) and **8.68** for the whole cycle at 64 KiB;
before 4 to 6 (2026-11-26) 2.44, 1.39, 1.15, 1.47 and 1.63; before 7
(2026-11-30, quiet host) 1.62, 1.09, 1.09, 1.22 and 1.23, with export
between 1.30 and 1.67 across the sizes; before 8 to 11 (2026-11-30, 81
batches) export 1.10–1.18, map 1.00–1.15, unmap 1.01–1.22, close 1.06–1.22
and the whole cycle 1.06–1.11 across the sizes; before 11 (2026-11-30, 321
batches) export 1.04–1.09, map 1.00–1.07, unmap 1.01–1.09, close 1.05–1.09
and the whole cycle 1.03–1.07.

**Where the rest goes.** A scratch build (not committed: it puts a time
stamp in the library's ioctl layer) read the TSC right before and right after
each syscall, in the library and in the raw path, over 800 alternating
cycles of each at 64 KiB, 64 MiB and 64 GiB (2026-11-30, after 8 to 10,
before 11). Medians:

| operation | library's code before the syscall | after it | raw, before / after |
|---|---|---|---|
| export | 1.6–2.4 µs | 1.6–2.3 µs | 0.04–0.12 / 0.06–0.10 µs |
| map | 0.8–1.2 µs | 1.9–2.6 µs | 0.04–0.06 / 0.06–0.07 µs |
| unmap | 0.6–0.8 µs | 0.8–1.4 µs | 0.03–0.04 / 0.05–0.06 µs |
| close | 2.0–2.7 µs (1.2–1.7 of it dropping the unmapped mapping) | 0.3–0.4 µs | 0.03 / 0.05 µs |

Before 8 to 10 the same build measured 8–10 µs before an export's ioctl and
4–6 µs after it (3–4 µs of that the `Arc`'s `malloc`), 5–6 µs for the `free`
at close, and 3–6 µs after each map and unmap (the area record, through
out-of-line calls). So the library's own code is now 1–3% of each
operation's time.

**What that code costs under TCG.** An earlier version of this page said
that user code between two syscalls makes the next syscall's emulation
slower. Scratch runs on 2026-11-30 (not committed) do not bear that out.
They used 64 KiB, 16 MiB and 1 GiB, 200 to 321 batches per size, with extra
paths interleaved with the library and raw ones as above. Each figure below
is that path's time over raw, across the three sizes:

| path | export | map | unmap | close |
|---|---|---|---|---|
| raw, plus a function elsewhere in the binary that touches three fresh pages with six atomic operations, before each syscall | 1.00–1.01 | 0.98–1.00 | 0.98–1.01 | 0.99–1.00 |
| raw, plus a loop of about 700 instructions before each syscall | 1.00–1.01 | 1.00–1.01 | 1.00–1.01 | 1.00–1.01 |
| raw, plus the same function right after each syscall | 0.99–1.00 | 0.99–1.01 | 1.00 | 1.00 |
| raw, plus the function and the loop right after each syscall | 1.02 | 1.00–1.02 | 1.01–1.02 | 1.01–1.02 |
| the library's export, map and unmap, then a raw `close` (both handles forgotten) | | | | 1.00–1.01 |
| the same, then only the unmapped mapping dropped before the raw `close` | | | | 1.01–1.03 |
| the same, then only the export dropped (not the fd's last holder) before the raw `close` | | | | 1.01–1.04 |
| the library, built so that everything inlines (LLVM inline threshold 3000: the two drops are no longer calls) | 1.02–1.04 | 1.02–1.05 | 1.03–1.04 | 1.02–1.04 |
| the library, the same runs | 1.00–1.07 | 1.00–1.05 | 0.99–1.04 | 1.03–1.06 |

So:

- Unrelated user code of about the library's size moves no ratio by more than 0.02.
- The library's export, map and unmap do not slow the close that follows.
- What the close pays for is its own two drops, the mapping's and the export's, at 1–4 points each.
- Inlining both (which a release build with the usual threshold does not do: they inline at 800, not at 400) brings back 1–2 points.

In one run, the same export code in two functions differed by up to 0.03. Whole runs of the same code drift by 2–4 points: the full run at 04:48 had close at 1.06–1.10, the one at 06:03 had 1.03–1.06. Since then the table measures the sizes in turns, and a second copy of the library's cycle runs alongside (the columns above).

One part of the close's excess was the benchmark's own: its library cycle ended with `drop(mapping); drop(export)`, and each `drop(x)` first copied its handle to a new place on the stack (34 moves of 16 bytes in all) inside the timed span. The cycle now lets both drop in place at the end of a scope, as a caller's code does; the raw cycle had nothing to copy. A scratch run also tried pooling every cycle of a size before taking medians, with a bootstrap interval over batches, instead of the median of the batches' ratios: its control spread over 0.94–1.05, against 0.96–1.02 for the batch ratios in the same run, so the table keeps the batch ratios.

**Counting instructions instead.** Time under TCG is the wrong measure for a few dozen user-space instructions. The section above ("The same on the instruction clock") times the same cycles with QEMU's `-icount shift=0,sleep=off`, where one guest nanosecond is one instruction executed. There the measurement is exact: the control is 1.0000 at every size, the two copies of the library's cycle agree to the instruction, and the library executes, per operation, 185 instructions more than the raw path for an export (of about 40 650), 162 for a map (of 83 000–90 000), 97 for an unmap (of 47 000–52 000) and 56 for a close (of about 19 830): 500 per cycle, 0.2–0.5% of each operation. Those are the checks that name bad input, the device's known state, the IOAS's area record, the revocation hub and the counted fd.

Set against the wall-clock table of the same run, each of those instructions costs 5 (export) to 14 (close) times what an instruction of the kernel's work costs under TCG (3 to 15 times in the other runs of 2026-11-30): 56 instructions add about 3.8 µs to a close whose 19 830 take 95 µs. User code between syscalls most likely pays for the emulator's code lookups and TLB refills after the kernel's work: a host `perf` profile of QEMU during this part put 9% of its samples in its translation-block hash lookup (`qht_lookup_custom`), and the profile part's `bookkeeping_after_export` shows the same few lines costing three times more right after an export than in a loop. That, not work, is why the time ratios sit at 1.0–1.06.

**Verdict.** On the instruction clock every library / raw ratio is at most **1.0046** (export), against the target of 1.05, with the control at exactly 1.0000 and the library's second copy equal to the instruction. On TCG's wall clock this page's run (321 batches per size) has every ratio at or below 1.05 as well: export 1.01–1.04, map 1.00–1.04, unmap 0.99–1.02, close 1.03–1.0499 (at 4 MiB) and the whole cycle 1.00–1.03, with the raw/raw control at 0.98–1.02. That clock is at its resolution there, and this run is one of its better ones: the library's second copy reaches 1.058 (export at 64 KiB), and of four runs of the same code on 2026-11-30 (after the benchmark's drop fix) two had none of the 55 library ratios above 1.05 (08:03, overhead part only, and this page's), one had 3 (08:39; at most 1.057) and one 10 (08:17; at most 1.094, map at 4 MiB). What the wall clock adds over the instruction count is the emulator's cost of running user code, which hardware does not have; measuring that on hardware needs KVM or a real machine, and this one has neither (its CPU has no vmx or svm).
"#;

/// Observations on revocation.
pub(super) const REVOKE_NOTES: &str = r#"
What the numbers say:

- The kernel's share grows with N: in the revoking config write, VFIO revokes
  every dma-buf of the device and iommufd zaps the IOMMU entries of each
  mapping (*raw revoke* is that write alone); the restoring write notifies
  every importer again (*config write (restore)*). The part that does not grow
  (about a millisecond under TCG at N = 1) is most likely QEMU updating its
  memory map when the BAR's decoding changes.
- The restore is dominated by N × (unmap + map): iommufd keeps a revoked
  mapping dead after the BAR comes back, so every mapping has to be made
  again (uAPI reference F).
- The library makes the same syscalls as the raw sequence (checked with
  `cargo xtask bench --strace`: per attachment one `IOMMU_IOAS_UNMAP` and one
  `IOMMU_IOAS_MAP_FILE` in the restore, nothing in the revoke) plus three
  `pread`s of `PCI_COMMAND` around each config write. What it adds is its
  bookkeeping: on a revoke the hub walks its attachments and each one takes
  its locks, records the revocation and emits its event; on a restore each
  one also goes through `IoasMapping::remap`. The *library − raw* lines below
  the table give that cost per attachment. At small N the config write's own
  variation (see the min–max) decides the ratio.
"#;

/// Observations on scale.
pub(super) const SCALE_NOTES: &str = r#"
What the numbers say:

- The time per buffer does not grow with N, up to 4096 buffers exported and
  mapped at once: nothing in the kernel's export, map and teardown paths or in
  the library is linear in the number of live buffers. (N = 1 is an outlier:
  one cold buffer right after reading `/proc`.) The library's export and map
  cost more than the raw ones for the reasons of part 2.
- Each exported and mapped single-page buffer costs about 2 KB of kernel
  memory, nearly all of it in slab: the dma-buf's file and its inode in the
  dma-buf pseudo file system, the `struct dma_buf`, VFIO's dma-buf with its
  range, the dma-buf attachment, and iommufd's area and pages objects.
  `Slab` and `SUnreclaim` of `/proc/meminfo` are too coarse (they move in
  whole slab pages, per CPU) to show small N. The IOMMU page tables
  (`nr_iommu_pages`) grow too little to show: 4096 consecutive pages fit in a
  handful of table pages.
"#;

/// Observations on the NVMe queue-depth part (part 9).
pub(super) const NVMEQD_NOTES: &str = r#"
How to read it: the control does the least a driver can (no request
checks, the slot index as the command ID, nothing kept alive, no error
values), so engine / control is what the checked API's checks and
bookkeeping cost on each row, and prepared / control what is left of them
when the checks that do not depend on the LBA are made once per buffer.

What the numbers say (the run of 2026-12-07 22:43 UTC, on a 2-core host
with a load average of 6 to 8: other engineers' VMs, before shadow
doorbells; the tables above are a later run, 2026-12-08 02:17 UTC on an
idle host, with shadow doorbells (each doorbell about 33 instructions
more, for both paths), with no PAUSE between the looks of any spinning
wait, and with the head doorbell rung right before the next tail, by the
engine and the control alike: prepared 136 against the control's 134 at
4 KiB, 1.015, within the goal; on the wall clock every checked row is
within 1.10 of the control (the worst 1.091) and one prepared row is
over (2 queues, QD1 each, BAR, 128 KiB: 1.181, its rounds 0.38-1.98; 1.032
and 1.086 in the runs of 01:24 and 02:10). At QD1 the checked loop now
beats the control by 11-19%, likely because its 200 instructions more
between a completion and its doorbells leave QEMU's main loop time to
let go of its lock (see the peer check; not measured). The run of 00:06, with the PAUSE, had one
checked row over, 1.124; see "Shadow doorbells" above and the peer
check):

- **Prepared commands cost what the raw loop does, on the instruction
  clock**: 70 instructions to submit and reap a 4 KiB Read against 65 for
  the control (1.077, +5: the goal of +10% is met), and 70 against 193 at
  128 KiB (0.363: the control writes its 31-entry PRP list for every
  command, the prepared slot wrote it once when it was registered). The
  submit is 42 against 42: the slot's 64-byte template with the opcode and
  the LBA put in, one comparison of the LBA against the namespace's end,
  eight volatile stores, the tail doorbell. The reap is 28 against 23: the
  phase tag, the head doorbell, and what the control leaves out, the
  command's in-flight flag looked up by its CID and cleared (a completion
  for no command in flight is counted, never handed out) and the slot
  token handed back. What the types promise costs nothing at run time: a
  slot is named only by its non-`Clone` token, which the reap of its
  completion hands back once, and the token's lifetime is its set's, so a
  slot of another set does not compile.
- The path there, in this session's quick runs (instructions, 4 KiB,
  prepared / control): 102 / 65 with a table entry per slot and a set
  number checked on each submit; 82 with the head doorbell rung on every
  reap and the stray loop made cold; 74 with the template one cache line
  and the completion returned as one 8-byte value; 70 with the set's
  brand a lifetime (no set check, no set number in the completion), the
  in-flight flags indexed by the whole 16-bit CID (no bounds check) and a
  ring cursor that wraps without a branch.
- **The checked API is where it was**: 267 instructions against 65 (4.1
  times) and 556 against 193 (2.9 times): request checks, a CID from the
  table, its generation, the completion handed out once through the
  table's state machine, typed errors. It stays for raw commands, bare
  IOVAs checked per command, and callers who do not want fixed buffers.
- **The wall clock cannot tell the three apart here.** Every prepared row
  has a median ratio to the control within 1.10 (the highest 1.083, 2
  queues, QD32 into the BAR, 128 KiB); four rows of the checked path are
  just over (1.109 to 1.128), and their rounds spread from below 0.5 to
  above 2.5, as the control's own do. A command takes 16 to 460 µs under
  TCG, of which the 200 instructions between the checked path and the
  control are a fraction of a microsecond. QD1 latency, polled and by
  MSI-X, is within 2% of the control on both paths.
- Two queues on two threads are not faster than one here: TCG runs both
  vCPUs on one host thread, and the controller's model runs in QEMU's
  main loop.
"#;

/// Observations on the first export of a device (part 10).
pub(super) const FIRST_EXPORT_NOTES: &str = r#"
What the numbers say:

- The kernel's first export of a freshly opened device costs more than its
  later ones (`raw_first` against `raw_after_library`, about 2.5 times
  here): that part of the gap is VFIO's and no library can remove it.
- The library adds one `VFIO_DEVICE_GET_REGION_INFO` to the first export
  of a BAR (`library_after_raw` against `library_later`). Before the
  `resource` lines moved into `open` (the same part, 2026-12-07, host load
  8-10), the library's first export took 1.77 ms and its first export
  after a raw one 2.13 ms, against 98 µs for a later one: a `stat` of the
  sysfs device and a read of its `resource` file, each a few hundred
  microseconds to a millisecond and more under TCG. `open` now makes that
  read once, with its other sysfs reads, without the `stat` (the device
  was found a moment before): `open` costs about that much more (2.95 ms
  then, the table's now; noisy), and open plus first export costs a
  `stat` less than before.
- A device adopted from a VMM (`VfioPciDevice::adopt`) has no `open`: its
  first look at a BAR still reads sysfs.
"#;
