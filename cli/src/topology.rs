//! `dmabuf-p2p topology <engine> <target>`: the PCI path between a DMA
//! engine and a target BAR as a small tree, with the verdict and its
//! reasons.

use std::process::ExitCode;

use dmabuf_p2p::importer::iommufd::{Iommufd, IovaRanges};
use dmabuf_p2p::range::human_size;
use dmabuf_p2p::sysfs::Sysfs;
use dmabuf_p2p::topology::{
    Function, HostBridge, HostBridgeDevice, Outcome, PciPath, Platform, Upstream, Verdict,
};
use dmabuf_p2p::{ByteRange, PciAddress, VfioPciDevice};

use crate::target::TargetSpec;
use crate::{CliError, print_json};

/// Options of `topology`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The function that issues the DMA (the engine).
    pub engine: PciAddress,
    /// The function whose BAR is the target: `<bdf>[:bar]` (its largest
    /// memory BAR by default).
    pub target: TargetSpec,
    /// Do not open the engine through VFIO to learn the usable IOVA ranges
    /// of an IOAS it is attached to (by default tried when it is bound to
    /// vfio-pci).
    #[arg(long)]
    pub no_ioas: bool,
    /// Root of the sysfs tree to read.
    #[arg(long, default_value = "/sys", hide = true)]
    pub sysfs: String,
}

/// What `--json` prints.
#[derive(Debug, serde::Serialize)]
struct Json<'a> {
    path: &'a PciPath,
    platform: &'a Platform,
    /// Usable IOVA ranges `[start, last]` of an IOAS with the engine
    /// attached, if learned.
    iova_ranges: Option<Vec<(u64, u64)>>,
    /// Why they are not known.
    iova_ranges_unknown: Option<String>,
    verdict: &'a Verdict,
    placement: String,
}

/// Runs the command.
pub fn run(args: &Args, json: bool) -> Result<ExitCode, CliError> {
    let sysfs = Sysfs::new(&args.sysfs);
    let path = PciPath::read(&sysfs, args.engine, args.target.device)?;
    let platform = Platform::read(&sysfs)?;
    let ranges = if args.no_ioas {
        Err("not asked (--no-ioas)".to_owned())
    } else if args.sysfs != "/sys" {
        Err(format!(
            "not tried: the tree read is {}, not the machine's",
            args.sysfs
        ))
    } else {
        engine_ranges(&path.client.function)
    };
    let verdict = Verdict::new(&path, &platform, ranges.as_ref().ok(), args.target.bar);
    let range = args.target.range.unwrap_or(ByteRange::new(0, 0x1000));
    let advice = verdict.placement(range);
    if json {
        print_json(&Json {
            path: &path,
            platform: &platform,
            iova_ranges: ranges
                .as_ref()
                .ok()
                .map(|r| r.ranges.iter().map(|r| (r.start, r.last)).collect()),
            iova_ranges_unknown: ranges.as_ref().err().cloned(),
            verdict: &verdict,
            placement: advice.why,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    for line in tree(&path, &verdict) {
        outln!("{line}")?;
    }
    match &ranges {
        Ok(r) => {
            let list: Vec<String> = r.ranges.iter().map(ToString::to_string).collect();
            outln!(
                "usable IOVAs (IOAS with the engine attached): {}",
                list.join(", ")
            )?;
        }
        Err(why) => outln!("usable IOVAs: unknown ({why})")?,
    }
    if let Some(w) = platform.host_address_width {
        outln!("IOMMU host address width: {w} bits (ACPI DMAR)")?;
    }
    outln!("{verdict}")?;
    if verdict.bar.is_some() && verdict.outcome != Outcome::Impossible {
        outln!("placement: {}", advice.why)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The usable IOVA ranges of a new IOAS with the engine attached, or why
/// they could not be learned.
fn engine_ranges(engine: &Function) -> Result<IovaRanges, String> {
    if !engine.driver.as_deref().is_some_and(|d| d.contains("vfio")) {
        return Err(format!(
            "{} is bound to {}, not vfio-pci",
            engine.address,
            engine.driver.as_deref().unwrap_or("no driver")
        ));
    }
    let learn = || -> dmabuf_p2p::Result<IovaRanges> {
        let iommufd = Iommufd::open()?;
        let ioas = iommufd.alloc_ioas()?;
        let mut dev = VfioPciDevice::open(engine.address)?;
        dev.bind(&iommufd)?;
        dev.attach(&ioas)?;
        ioas.iova_ranges()
    };
    learn().map_err(|e| e.to_string())
}

/// One line of the tree and what hangs below it.
struct Node {
    text: String,
    children: Vec<Node>,
}

impl Node {
    /// A chain of nodes, each the only child of the one before, ending in
    /// `last` children; `None` for an empty chain.
    fn chain(mut texts: Vec<String>, last: Vec<Node>) -> Vec<Node> {
        let mut children = last;
        while let Some(text) = texts.pop() {
            children = vec![Node { text, children }];
        }
        children
    }

    fn render(&self, prefix: &str, connector: &str, out: &mut Vec<String>) {
        out.push(format!("{prefix}{connector}{}", self.text));
        let inner = match connector {
            "├─ " => format!("{prefix}│  "),
            "└─ " => format!("{prefix}   "),
            _ => prefix.to_owned(),
        };
        for (i, child) in self.children.iter().enumerate() {
            let c = if i + 1 == self.children.len() {
                "└─ "
            } else {
                "├─ "
            };
            child.render(&inner, c, out);
        }
    }
}

/// The path as a tree from each host bridge down: the functions both
/// chains share once, then the engine's and the target's branches.
fn tree(path: &PciPath, verdict: &Verdict) -> Vec<String> {
    fn down(up: &Upstream) -> Vec<&Function> {
        let mut v: Vec<&Function> = up.chain().collect();
        v.reverse();
        v
    }
    let client = down(&path.client);
    let provider = down(&path.provider);
    let engine = path.client.function.address;
    let target = path.provider.function.address;
    let label = |f: &Function| -> String {
        let role = match (f.address == engine, f.address == target) {
            (true, true) => "engine and target: ",
            (true, false) => "engine: ",
            (false, true) => "target: ",
            (false, false) => "",
        };
        let mut s = format!(
            "{role}{} {:04x}:{:04x} {} [{}",
            f.address,
            f.vendor,
            f.device,
            f.kind(),
            f.acs_summary()
        );
        if let Some(acs) = f.acs.present() {
            s.push_str(&format!(" (capable of {})", acs.capability));
        }
        if let Some(g) = f.iommu_group {
            s.push_str(&format!(", IOMMU group {g}"));
        }
        if f.ats.present().is_some_and(|a| a.enabled) {
            s.push_str(", ATS on");
        }
        s.push(']');
        if !role.is_empty() {
            s.push_str(&format!(" {}", f.driver.as_deref().unwrap_or("no driver")));
        }
        if f.address == target
            && let Some(b) = verdict.bar
        {
            s.push_str(&format!(
                "  BAR{} at bus address {:#x} ({})",
                b.index,
                b.bus_address,
                human_size(b.size)
            ));
        }
        if path.common == Some(f.address) && f.address != engine && f.address != target {
            s.push_str("  <- the paths meet here");
        }
        s
    };
    let texts = |fs: &[&Function]| fs.iter().map(|f| label(f)).collect::<Vec<_>>();
    let roots = if path.client.host_bridge.name == path.provider.host_bridge.name {
        let shared = client
            .iter()
            .zip(&provider)
            .take_while(|(a, b)| a.address == b.address)
            .count();
        let mut branches = Node::chain(texts(&client[shared..]), Vec::new());
        branches.extend(Node::chain(texts(&provider[shared..]), Vec::new()));
        vec![Node {
            text: host_line(&path.client.host_bridge),
            children: Node::chain(texts(&client[..shared]), branches),
        }]
    } else {
        vec![
            Node {
                text: host_line(&path.client.host_bridge),
                children: Node::chain(texts(&client), Vec::new()),
            },
            Node {
                text: host_line(&path.provider.host_bridge),
                children: Node::chain(texts(&provider), Vec::new()),
            },
        ]
    };
    let mut out = Vec::new();
    for root in &roots {
        root.render("", "", &mut out);
    }
    out
}

/// The first line of a tree: the host bridge and what stands for it.
fn host_line(host: &HostBridge) -> String {
    match &host.device {
        HostBridgeDevice::Found {
            address,
            vendor,
            device,
        } => format!(
            "{} host bridge (root complex), {address} {vendor:04x}:{device:04x}",
            host.name
        ),
        HostBridgeDevice::None => format!("{} host bridge (root complex)", host.name),
        HostBridgeDevice::Unreadable { address } => format!(
            "{} host bridge (root complex), first function {address} (its type needs root)",
            host.name
        ),
    }
}
