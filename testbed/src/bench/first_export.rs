//! Part 10 of the page: the first BAR export of a freshly opened device
//! against later ones (`bench/src/first_export.rs`).

use std::fmt::Write as _;

use dmabuf_p2p::range::human_size;

use super::notes::FIRST_EXPORT_NOTES;
use super::{Results, cell};

/// The records' group.
pub const GROUP: &str = "firstexport";

/// The steps, and what each is.
const STEPS: [(&str, &str); 9] = [
    (
        "open",
        "`VfioPciDevice::open`: the sysfs reads that find the cdev (now with the device's `resource` lines), the cdev's open (VFIO resets the device)",
    ),
    ("bind", "`bind` to the iommufd"),
    (
        "decode_on",
        "`set_memory_decode(true)`, as the library asks before an export",
    ),
    (
        "library_first",
        "the handle's first export, by the library (`export_bar`, and dropping it)",
    ),
    (
        "raw_after_library",
        "then a raw `VFIO_DEVICE_FEATURE(DMA_BUF)` export and `close` on the same fd",
    ),
    (
        "raw_first",
        "the handle's first export, raw (the other half of the repetitions)",
    ),
    (
        "library_after_raw",
        "then the library's first export (after the raw one)",
    ),
    ("library_later", "the library's next export"),
    ("close", "dropping the handle (VFIO resets the device)"),
];

/// Part 10, when it ran.
pub fn section(s: &mut String, r: &Results) {
    let Some(&x) = r.xs(GROUP).first() else {
        return;
    };
    let _ = writeln!(s, "\n## 10. The first BAR export of a device\n");
    let when = r.meta("merged:firstexport").map_or(String::new(), |m| {
        format!(" This part was measured in a run of its own: {m}.")
    });
    let _ = writeln!(
        s,
        "The device under test is opened, bound, its memory decode turned on, and the first {} \
         of BAR2 exported three times, then the handle is closed (before the other parts open \
         the device); the repetitions alternate whether the library or a raw ioctl exports \
         first, which tells the kernel's own first-export cost from the library's. Medians \
         (min–max). `export_bar` needs the BAR's size and physical start: the size from \
         `VFIO_DEVICE_GET_REGION_INFO` on the first look at the BAR, the physical start from \
         the sysfs `resource` lines, which `open` now reads with its other sysfs reads (before, \
         the first export made a `stat` of the sysfs device and read `resource` itself: the \
         `stat_sysfs_dir` and `read_sysfs_resource` steps of part 2).{when}\n",
        human_size(x)
    );
    let _ = writeln!(s, "| step | what | time |\n|---|---|---|");
    for (op, what) in STEPS {
        let _ = writeln!(
            s,
            "| `{op}` | {what} | {} |",
            cell(r.get(GROUP, "library", op, x))
        );
    }
    s.push_str(FIRST_EXPORT_NOTES);
}
