//! PCI addresses and BAR resources (pure parsing, host-tested). Reading these
//! from sysfs is in [`crate::sysfs`].

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::range::{ByteRange, parse_digits, parse_error};

/// A PCI address (domain, bus, device, function), as sysfs names devices.
///
/// Parsed from the full form `DDDD:BB:DD.F` (domain of 4 to 8 hex digits) or
/// the short form `BB:DD.F` (domain 0); hex digits of either case. Displayed
/// always in the full lower-case form, which is the device's name under
/// `/sys/bus/pci/devices/`.
///
/// ```
/// use dmabuf_p2p::pci::PciAddress;
///
/// let a: PciAddress = "00:04.0".parse()?;
/// assert_eq!(a, PciAddress::new(0, 0, 4, 0)?);
/// assert_eq!(a.to_string(), "0000:00:04.0");
/// assert!("0000:00:20.0".parse::<PciAddress>().is_err()); // device > 31
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

impl PciAddress {
    /// An address from its parts; fails with [`Error::Parse`] if `device > 31`
    /// or `function > 7`.
    pub fn new(domain: u32, bus: u8, device: u8, function: u8) -> Result<Self> {
        if device > 31 || function > 7 {
            let text = format!("{domain:04x}:{bus:02x}:{device:02x}.{function:x}");
            let problem = if device > 31 {
                format!("device number {device} is above 31")
            } else {
                format!("function number {function} is above 7")
            };
            return Err(parse_error(WHAT_ADDR, &text, problem));
        }
        Ok(Self {
            domain,
            bus,
            device,
            function,
        })
    }

    /// The PCI domain (segment).
    pub const fn domain(&self) -> u32 {
        self.domain
    }

    /// The bus number.
    pub const fn bus(&self) -> u8 {
        self.bus
    }

    /// The device (slot) number, 0..=31.
    pub const fn device(&self) -> u8 {
        self.device
    }

    /// The function number, 0..=7.
    pub const fn function(&self) -> u8 {
        self.function
    }
}

const WHAT_ADDR: &str = "PCI address";

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = Error;

    /// Parses `DDDD:BB:DD.F` or `BB:DD.F`; see the type's documentation.
    fn from_str(s: &str) -> Result<Self> {
        let err = |problem: String| parse_error(WHAT_ADDR, s, problem);
        let parts: Vec<&str> = s.split(':').collect();
        let (domain_txt, bus_txt, slot_txt) = match parts.as_slice() {
            [d, b, sf] => (Some(*d), *b, *sf),
            [b, sf] => (None, *b, *sf),
            _ => return Err(err("expected DDDD:BB:DD.F or BB:DD.F".to_owned())),
        };
        let domain = match domain_txt {
            None => 0,
            Some(d) => {
                if !(4..=8).contains(&d.len()) {
                    return Err(err(format!("domain {d:?} must have 4 to 8 hex digits")));
                }
                let v =
                    parse_digits(d, 16).ok_or_else(|| err(format!("domain {d:?} is not hex")))?;
                u32::try_from(v)
                    .map_err(|_| err(format!("domain {d:?} does not fit in 32 bits")))?
            }
        };
        let bus = hex_field(bus_txt, 2, "bus").map_err(err)?;
        let Some((dev_txt, fn_txt)) = slot_txt.split_once('.') else {
            return Err(err(format!("{slot_txt:?} must be DD.F (device.function)")));
        };
        let device = hex_field(dev_txt, 2, "device").map_err(err)?;
        let function = hex_field(fn_txt, 1, "function").map_err(err)?;
        if device > 31 {
            return Err(err(format!("device {dev_txt} is above 0x1f")));
        }
        if function > 7 {
            return Err(err(format!("function {fn_txt} is above 7")));
        }
        Ok(Self {
            domain,
            bus,
            device,
            function,
        })
    }
}

/// Parses exactly `digits` hex digits into a byte.
fn hex_field(t: &str, digits: usize, name: &str) -> Result<u8, String> {
    if t.len() != digits {
        return Err(format!(
            "{name} {t:?} must be exactly {digits} hex digit(s)"
        ));
    }
    parse_digits(t, 16)
        .and_then(|v| u8::try_from(v).ok())
        .ok_or_else(|| format!("{name} {t:?} is not hex"))
}

#[cfg(feature = "serde")]
impl serde::Serialize for PciAddress {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for PciAddress {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The number of PCI BARs a VFIO dma-buf can be exported from (indices 0..=5;
/// index 6 is the ROM).
pub const BAR_COUNT: u32 = 6;

/// `IORESOURCE_IO`: the resource is an I/O-port window.
pub const IORESOURCE_IO: u64 = 0x100;
/// `IORESOURCE_MEM`: the resource is a memory window.
pub const IORESOURCE_MEM: u64 = 0x200;
/// `IORESOURCE_PREFETCH`: the memory is prefetchable.
pub const IORESOURCE_PREFETCH: u64 = 0x2000;
/// `IORESOURCE_MEM_64`: the BAR is a 64-bit memory BAR.
pub const IORESOURCE_MEM_64: u64 = 0x10_0000;

/// One line of a device's sysfs `resource` file: a BAR (lines 0..=5), the ROM
/// (line 6), or a bridge window / SR-IOV BAR (later lines).
///
/// ```
/// use dmabuf_p2p::pci::parse_resources;
///
/// let text = "0x00000000fe000000 0x00000000fe0fffff 0x0000000000140204\n\
///             0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
/// let res = parse_resources(text)?;
/// assert_eq!(res[0].size, 0x10_0000);
/// assert!(res[0].is_mem() && res[0].is_mem64() && !res[0].is_prefetch());
/// assert!(res[1].is_unused());
/// # Ok::<(), dmabuf_p2p::Error>(())
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Resource {
    /// The line number, which is the BAR index for 0..=5.
    pub index: u32,
    /// The first address (physical for memory, port number for I/O).
    pub start: u64,
    /// The size in bytes; 0 for an unused resource.
    pub size: u64,
    /// The kernel's `IORESOURCE_*` flags.
    pub flags: u64,
}

impl Resource {
    /// A resource line from its parts (for tests and tools).
    pub const fn new(index: u32, start: u64, size: u64, flags: u64) -> Self {
        Self {
            index,
            start,
            size,
            flags,
        }
    }

    /// Whether this resource is unused (size 0).
    pub const fn is_unused(&self) -> bool {
        self.size == 0
    }

    /// Whether it is a memory window (`IORESOURCE_MEM`).
    #[inline]
    pub const fn is_mem(&self) -> bool {
        self.flags & IORESOURCE_MEM != 0
    }

    /// Whether it is an I/O-port window (`IORESOURCE_IO`).
    #[inline]
    pub const fn is_io(&self) -> bool {
        self.flags & IORESOURCE_IO != 0
    }

    /// Whether the memory is prefetchable (`IORESOURCE_PREFETCH`).
    pub const fn is_prefetch(&self) -> bool {
        self.flags & IORESOURCE_PREFETCH != 0
    }

    /// Whether it is a 64-bit memory BAR (`IORESOURCE_MEM_64`).
    pub const fn is_mem64(&self) -> bool {
        self.flags & IORESOURCE_MEM_64 != 0
    }

    /// The byte range of the whole resource relative to its start, `0+size`.
    pub const fn as_range(&self) -> ByteRange {
        ByteRange::new(0, self.size)
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_unused() {
            return write!(f, "[{}] unused", self.index);
        }
        let kind = if self.is_mem() {
            if self.is_mem64() { "mem64" } else { "mem32" }
        } else if self.is_io() {
            "io"
        } else {
            "other"
        };
        let pref = if self.is_prefetch() {
            " prefetchable"
        } else {
            ""
        };
        write!(
            f,
            "[{}] {kind}{pref} at {:#x} size {:#x}",
            self.index, self.start, self.size
        )
    }
}

/// Parses the text of a sysfs `resource` file: one line per resource, each of
/// three `0x`-prefixed hex numbers `start end flags` (`end` inclusive). An
/// all-zero line is an unused resource (size 0). Empty lines are skipped;
/// anything else malformed, or `end < start` on a used line, is
/// [`Error::Parse`] naming the line.
pub fn parse_resources(text: &str) -> Result<Vec<Resource>> {
    const WHAT: &str = "sysfs resource line";
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |problem: String| parse_error(WHAT, line, problem);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [start, end, flags] = fields.as_slice() else {
            return Err(err(format!("expected 3 numbers, found {}", fields.len())));
        };
        let num = |t: &str| {
            t.strip_prefix("0x")
                .and_then(|h| parse_digits(h, 16))
                .ok_or_else(|| err(format!("{t:?} is not a 0x-prefixed hex number")))
        };
        let (start, end, flags) = (num(start)?, num(end)?, num(flags)?);
        let size = if start == 0 && end == 0 {
            0
        } else {
            end.checked_sub(start)
                .and_then(|d| d.checked_add(1))
                .ok_or_else(|| err(format!("end {end:#x} is not after start {start:#x}")))?
        };
        let index = u32::try_from(out.len()).map_err(|_| err("too many lines".to_owned()))?;
        out.push(Resource::new(index, start, size, flags));
    }
    Ok(out)
}
