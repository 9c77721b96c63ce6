//! VM profiles: the shapes of VM the suite runs in.
//!
//! Most VM tests run in the standard VM ([`VmConfig::standard`]). A test that
//! needs another machine (a narrower IOMMU, another PCIe topology, another
//! device) lives in a module of the `vm-tests` suite named after its profile,
//! `profile_<name>::`, and runs only in a VM of that profile: the standard
//! run skips every `profile_` test, and each other profile's run selects its
//! own module. A profile whose run reports no test fails the run, as any test
//! run that reports none does. The guest learns its profile from the
//! `DMABUF_P2P_VM_PROFILE` environment variable of the job.

use crate::qemu::{GpuPlace, Ivshmem, Topology, VirtioGpu, VmConfig};

/// The name of the standard profile.
pub const STANDARD: &str = "standard";

/// What every non-standard profile's test module name starts with; test
/// names of the standard run must not contain it.
pub const MODULE_PREFIX: &str = "profile_";

/// One shape of VM.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// A short name (`aw39`): the run directory is `vm-test-<name>` and the
    /// tests live in `profile_<name>::` (none for the standard profile).
    pub name: &'static str,
    /// What differs from the standard VM, and why a test needs it.
    pub about: &'static str,
    /// Turns the standard VM into this profile's.
    pub shape: fn(&mut VmConfig),
}

impl Profile {
    /// Whether this is the standard profile.
    pub fn is_standard(&self) -> bool {
        self.name == STANDARD
    }

    /// The libtest filter that selects this profile's tests
    /// (`profile_aw39::`); `None` for the standard profile.
    pub fn module(&self) -> Option<String> {
        (!self.is_standard()).then(|| format!("{MODULE_PREFIX}{}::", self.name))
    }

    /// The libtest arguments for a run of this profile, given the user's
    /// filters (empty for all tests), or `None` when no filter concerns this
    /// profile. The standard run takes the filters that name no profile
    /// module and skips every profile module; another profile's run takes
    /// the filters that name its module, or its module when there are none.
    pub fn test_args(&self, filters: &[String]) -> Option<Vec<String>> {
        match self.module() {
            None => {
                let mine: Vec<String> = filters
                    .iter()
                    .filter(|f| !f.starts_with(MODULE_PREFIX))
                    .cloned()
                    .collect();
                if !filters.is_empty() && mine.is_empty() {
                    return None;
                }
                let mut args = mine;
                args.push("--skip".into());
                args.push(MODULE_PREFIX.into());
                Some(args)
            }
            Some(module) => {
                if filters.is_empty() {
                    return Some(vec![module]);
                }
                let mine: Vec<String> = filters
                    .iter()
                    .filter(|f| f.starts_with(&module) || module.starts_with(f.as_str()))
                    .cloned()
                    .collect();
                (!mine.is_empty()).then_some(mine)
            }
        }
    }
}

/// Every profile, the standard one first.
pub fn all() -> &'static [Profile] {
    &PROFILES
}

/// The profile named `name`.
pub fn named(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// The BAR2 size of the one ivshmem device of the `aw39_high_bar` profile:
/// 1 GiB, too large for the 32-bit PCI window below 4 GiB, so the firmware
/// puts it in the 64-bit window.
pub const HIGH_BAR_SIZE: u64 = 1 << 30;

/// The guest's hot-pluggable memory limit in the `aw39_high_bar` profile:
/// QEMU starts the 64-bit PCI window after it, at 524 GiB.
pub const HIGH_BAR_MAXMEM_GIB: u32 = 520;

/// The screen of the `virtio_gpu` profile's GPUs: 256x256 pixels, so that
/// an XRGB8888 framebuffer (256 KiB) fits in `shm0`'s 1 MiB BAR.
pub const GPU_SCREEN: (u32, u32) = (256, 256);

/// A VM with only `edu0` and the 1 MiB ivshmem `shm0` (no NVMe, no extra
/// engines), placed as `topology` says: what a topology test needs, and no
/// more boot time.
fn two_devices(c: &mut VmConfig, topology: Topology) {
    c.ivshmem.truncate(1);
    c.extra_edu = 0;
    c.nvme.clear();
    c.topology = topology;
}

/// Reads from the image of the `nvme_throttled` profile's `nvme0`, in bytes
/// per second: eight 128 KiB reads take about two seconds.
pub const THROTTLED_READ_BPS: u64 = 512 << 10;

const PROFILES: [Profile; 7] = [
    Profile {
        name: STANDARD,
        about: "the standard VM: edu, ivshmem and NVMe devices, each on its own PCIe root port",
        shape: |_| {},
    },
    Profile {
        name: "aw39",
        about: "the standard VM with a 39-bit intel-iommu (aw-bits=39): IOVAs at or above \
                512 GiB are outside every IOAS's usable ranges, as on hosts whose vIOMMU \
                is 39 bits wide (QEMU before 9.1 defaults to it)",
        shape: |c| c.iommu_options.push("aw-bits=39".into()),
    },
    Profile {
        name: "root_bus",
        about: "edu0 and shm0 only, both on the root bus pcie.0 (root-complex integrated \
                endpoints): peer-to-peer traffic between them passes the root complex",
        shape: |c| two_devices(c, Topology::RootBus),
    },
    Profile {
        name: "switch",
        about: "edu0 and shm0 only, below one PCIe switch (x3130-upstream, two \
                xio3130-downstream ports without ACS): peer-to-peer traffic between them \
                can turn in the switch, untranslated",
        shape: |c| two_devices(c, Topology::Switch),
    },
    Profile {
        name: "aw39_high_bar",
        about: "edu0 on a root port and one ivshmem with a 1 GiB BAR2, a 39-bit intel-iommu \
                (aw-bits=39) and maxmem=520G, which moves the 64-bit PCI window (and the BAR) \
                above 512 GiB: beyond every usable IOVA",
        shape: |c| {
            two_devices(c, Topology::RootPorts);
            c.ivshmem = vec![Ivshmem {
                id: "shm0".into(),
                size: HIGH_BAR_SIZE,
            }];
            c.max_memory_gib = Some(HIGH_BAR_MAXMEM_GIB);
            c.iommu_options.push("aw-bits=39".into());
        },
    },
    Profile {
        name: "virtio_gpu",
        about: "edu0 and shm0 below one switch with two virtio-gpus (gpu0 with blob resources, \
                gpu1 without) on ports of the same switch, and gpu2 with blob resources on the \
                root bus: a DRM PRIME importer the VFIO exporter accepts on a peer-to-peer \
                path, a static importer it refuses, and an importer without a path; guest RAM \
                in a memfd, /dev/udmabuf a placeholder where the host has none",
        shape: |c| {
            two_devices(c, Topology::Switch);
            c.gpus = vec![
                VirtioGpu {
                    id: "gpu0".into(),
                    blob: true,
                    place: GpuPlace::WithDevices,
                    resolution: GPU_SCREEN,
                },
                VirtioGpu {
                    id: "gpu1".into(),
                    blob: false,
                    place: GpuPlace::WithDevices,
                    resolution: GPU_SCREEN,
                },
                VirtioGpu {
                    id: "gpu2".into(),
                    blob: true,
                    place: GpuPlace::RootBus,
                    resolution: GPU_SCREEN,
                },
            ];
        },
    },
    Profile {
        name: "nvme_throttled",
        about: "edu0, shm0 and nvme0 alone, nvme0's reads from its image throttled \
                (throttling.bps-read): commands that are still running when a queue is \
                closed at once, so that the close's Abort step and the deletion of a \
                queue with reads into host RAM in flight run",
        shape: |c| {
            two_devices(c, Topology::RootPorts);
            let mut nvme0 = VmConfig::standard_nvme().remove(0);
            nvme0.read_bps = THROTTLED_READ_BPS;
            c.nvme = vec![nvme0];
        },
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    fn args(p: &str, filters: &[&str]) -> Option<Vec<String>> {
        let filters: Vec<String> = filters.iter().map(|s| (*s).to_owned()).collect();
        named(p).unwrap().test_args(&filters)
    }

    #[test]
    fn the_standard_run_skips_every_profile_module() {
        assert_eq!(
            args(STANDARD, &[]),
            Some(vec!["--skip".into(), "profile_".into()])
        );
        assert_eq!(
            args(STANDARD, &["smoke::", "profile_aw39::x"]),
            Some(vec!["smoke::".into(), "--skip".into(), "profile_".into()])
        );
        assert_eq!(args(STANDARD, &["profile_aw39::"]), None);
    }

    #[test]
    fn a_profile_runs_its_module_or_the_filters_that_name_it() {
        assert_eq!(args("aw39", &[]), Some(vec!["profile_aw39::".into()]));
        assert_eq!(
            args("aw39", &["profile_aw39::limits"]),
            Some(vec!["profile_aw39::limits".into()])
        );
        assert_eq!(args("aw39", &["profile_"]), Some(vec!["profile_".into()]));
        assert_eq!(args("aw39", &["smoke::"]), None);
    }

    #[test]
    fn names_are_unique_and_the_standard_comes_first() {
        assert!(all()[0].is_standard());
        for (i, p) in all().iter().enumerate() {
            assert!(
                all()[i + 1..].iter().all(|q| q.name != p.name),
                "{}",
                p.name
            );
            assert!(!p.name.contains(MODULE_PREFIX));
        }
    }

    fn shaped(name: &str) -> Vec<String> {
        let mut c = VmConfig::standard("k".into(), "i".into(), "/r".into());
        c.accel = crate::qemu::Accel::Tcg;
        (named(name).unwrap().shape)(&mut c);
        c.args()
    }

    fn devices(args: &[String]) -> Vec<&str> {
        args.iter()
            .zip(args.iter().skip(1))
            .filter(|(flag, _)| *flag == "-device")
            .map(|(_, v)| v.as_str())
            .collect()
    }

    #[test]
    fn root_bus_puts_both_devices_on_pcie_0() {
        let args = shaped("root_bus");
        let d = devices(&args);
        assert_eq!(
            &d[1..],
            [
                "edu,id=edu0,bus=pcie.0,addr=0x10,dma_mask=0xffffffffffffffff",
                "ivshmem-plain,id=shm0,memdev=mem-shm0,bus=pcie.0,addr=0x11",
            ]
        );
    }

    #[test]
    fn switch_puts_both_devices_below_one_upstream_port() {
        let args = shaped("switch");
        let d = devices(&args);
        assert_eq!(
            &d[1..],
            [
                "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1,addr=0x10",
                "x3130-upstream,id=up0,bus=rp0",
                "xio3130-downstream,id=dp0,bus=up0,port=0,chassis=2,slot=0,addr=0x0",
                "edu,id=edu0,bus=dp0,dma_mask=0xffffffffffffffff",
                "xio3130-downstream,id=dp1,bus=up0,port=1,chassis=2,slot=1,addr=0x1",
                "ivshmem-plain,id=shm0,memdev=mem-shm0,bus=dp1",
            ]
        );
    }

    #[test]
    fn aw39_high_bar_reserves_guest_physical_space_below_the_bar() {
        let args = shaped("aw39_high_bar");
        assert!(args.iter().any(|a| a == "1024M,slots=1,maxmem=520G"));
        assert!(args.iter().any(|a| a == "intel-iommu,aw-bits=39"));
        assert!(
            args.iter()
                .any(|a| a.contains("id=mem-shm0,") && a.ends_with("size=1073741824,share=on"))
        );
        assert_eq!(devices(&args).len(), 5, "{args:?}");
    }

    #[test]
    fn virtio_gpu_puts_two_gpus_below_the_switch_and_one_on_the_root_bus() {
        let args = shaped("virtio_gpu");
        let d = devices(&args);
        assert_eq!(
            &d[1..],
            [
                "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1,addr=0x10",
                "x3130-upstream,id=up0,bus=rp0",
                "xio3130-downstream,id=dp0,bus=up0,port=0,chassis=2,slot=0,addr=0x0",
                "edu,id=edu0,bus=dp0,dma_mask=0xffffffffffffffff",
                "xio3130-downstream,id=dp1,bus=up0,port=1,chassis=2,slot=1,addr=0x1",
                "ivshmem-plain,id=shm0,memdev=mem-shm0,bus=dp1",
                "xio3130-downstream,id=dp2,bus=up0,port=2,chassis=2,slot=2,addr=0x2",
                "virtio-gpu-pci,id=gpu0,bus=dp2,xres=256,yres=256,blob=true",
                "xio3130-downstream,id=dp3,bus=up0,port=3,chassis=2,slot=3,addr=0x3",
                "virtio-gpu-pci,id=gpu1,bus=dp3,xres=256,yres=256",
                "virtio-gpu-pci,id=gpu2,bus=pcie.0,addr=0x1a,xres=256,yres=256,blob=true",
            ]
        );
        // Blob resources want a sealed memfd RAM backend.
        assert!(
            args.iter()
                .any(|a| a == "memory-backend-memfd,id=ram0,size=1024M")
        );
        assert!(args.iter().any(|a| a == "q35,memory-backend=ram0"));
        assert!(
            args.iter()
                .any(|a| a == "enable=virtio_gpu_cmd_res_back_detach")
        );
    }

    #[test]
    fn aw39_narrows_the_iommu() {
        let mut c = VmConfig::standard("k".into(), "i".into(), "/r".into());
        c.accel = crate::qemu::Accel::Tcg;
        (named("aw39").unwrap().shape)(&mut c);
        assert!(c.args().iter().any(|a| a == "intel-iommu,aw-bits=39"));
    }
}
