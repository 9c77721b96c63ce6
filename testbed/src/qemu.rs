//! The QEMU launcher: q35 with an emulated intel-iommu, `edu` DMA engines and
//! `ivshmem-plain` devices backed by host files, each on its own PCIe root port
//! (so they can be hot-unplugged), with a QMP socket.
//!
//! Serial port 0 carries the kernel console (saved, then scanned for kernel
//! warnings); serial port 1 carries the guest's report, which the host streams.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::qemu_binary::QemuBinary;
use crate::runtime_dir::RuntimeDir;
use crate::{Error, Result};

/// One ivshmem device: the guest sees its BAR2 as `size` bytes of memory, and
/// the host sees the same bytes in `backing`.
#[derive(Debug, Clone)]
pub struct Ivshmem {
    /// QEMU id, also the name the guest report uses (`shm0`, `shm1`, ...).
    pub id: String,
    /// Size of the shared memory (a power of two, at least 4 KiB).
    pub size: u64,
}

/// One emulated NVMe controller (`-device nvme`) with one namespace backed
/// by a raw image file in the run directory, which the test bed fills with
/// [`nvme_image_byte`] at every boot.
#[derive(Debug, Clone)]
pub struct NvmeDrive {
    /// QEMU id and serial number (`nvme0`, ...), also the name host checks use.
    pub id: String,
    /// Size of the image (and so of namespace 1), a multiple of 4 KiB.
    pub size: u64,
    /// Controller memory buffer size in MiB (`cmb_size_mb`, BAR2); 0 for none.
    pub cmb_mib: u32,
    /// Persistent memory region size in MiB (`pmrdev`, BAR4), backed by the
    /// file [`VmConfig::backing_file`] gives for `<id>-pmr`; 0 for none.
    pub pmr_mib: u32,
    /// Maximum data transfer size as a power of two of 4 KiB pages (`mdts`).
    pub mdts: u8,
    /// Reads from the image throttled to this many bytes per second
    /// (`throttling.bps-read` of the drive); 0 for none.
    pub read_bps: u64,
}

impl NvmeDrive {
    /// The QEMU id of its persistent memory region's backend, also the name
    /// host checks use for it (`nvme1-pmr`).
    pub fn pmr_id(&self) -> String {
        format!("{}-pmr", self.id)
    }
}

/// The byte at `offset` of every NVMe image the test bed creates: a hash of
/// the offset's 8-byte word (splitmix64), so every block's contents are
/// distinct and a read of the wrong block is seen. The guest tests compute
/// the same function.
pub fn nvme_image_byte(offset: u64) -> u8 {
    let mut z = (offset / 8).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    z.to_le_bytes()[(offset % 8) as usize]
}

/// The BAR2 size of the small ivshmem devices `shm2`..`shm7` of
/// [`VmConfig::standard`]: 64 KiB.
pub const SMALL_SHM_SIZE: u64 = 64 << 10;

/// Where the edu and ivshmem devices sit in the PCIe hierarchy (the NVMe
/// controllers always have root ports of their own on slot 0x1e).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Each device on its own `pcie-root-port` on `pcie.0`, at slots 0x10,
    /// 0x11, ... (so each can be hot-unplugged): the standard VM. QEMU's
    /// root ports have an ACS capability, which the guest kernel enables.
    RootPorts,
    /// Each device straight on the root bus `pcie.0` at slots 0x10, 0x11,
    /// ...: root-complex integrated endpoints, no bridge between them.
    RootBus,
    /// Every device below one switch: a `pcie-root-port` at slot 0x10, an
    /// `x3130-upstream` port below it and one `xio3130-downstream` port per
    /// device (QEMU 7.2's downstream ports have no ACS capability).
    Switch,
}

/// Where a virtio-gpu sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuPlace {
    /// With the edu and ivshmem devices, as the VM's [`Topology`] places
    /// them (below the switch, for [`Topology::Switch`]).
    WithDevices,
    /// On the root bus `pcie.0` (slot 0x18 and up), whatever the topology.
    RootBus,
}

/// One virtio-gpu (`virtio-gpu-pci`, 2D, no virgl): a DRM PRIME importer
/// for the guest, its screen read back by QMP `screendump`.
#[derive(Debug, Clone)]
pub struct VirtioGpu {
    /// QEMU id (`gpu0`, ...), the `device` a screendump names.
    pub id: String,
    /// `blob=true`: blob resources, which make its PRIME import dynamic
    /// and peer-to-peer (QEMU then needs `/dev/udmabuf` and a memfd RAM
    /// backend: [`crate::udmabuf_dev`]).
    pub blob: bool,
    /// Where it sits.
    pub place: GpuPlace,
    /// The screen's size in pixels (`xres`, `yres`): its preferred mode.
    pub resolution: (u32, u32),
}

/// The QEMU trace events a run with a virtio-gpu logs (on its stderr):
/// blob creation, backing attach and detach, scanouts, resource flushes
/// and frees, so that a test can see what the host did with an import.
pub const GPU_TRACE_EVENTS: &[&str] = &[
    "virtio_gpu_cmd_res_create_blob",
    "virtio_gpu_cmd_res_back_attach",
    "virtio_gpu_cmd_res_back_detach",
    "virtio_gpu_cmd_set_scanout_blob",
    "virtio_gpu_cmd_res_unref",
];

/// How to accelerate the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// Software emulation unless `DMABUF_P2P_ACCEL=kvm` asks for KVM. TCG is
    /// the default because it behaves the same everywhere and boots the test
    /// kernel in seconds; a `/dev/kvm` may exist and still be far slower (the
    /// development machines' nested KVM is). With KVM asked for, a run whose
    /// guest does not reach userspace in time falls back to TCG.
    pub fn detect() -> Self {
        if std::env::var("DMABUF_P2P_ACCEL").as_deref() != Ok("kvm") {
            return Self::Tcg;
        }
        if kvm_works() {
            Self::Kvm
        } else {
            eprintln!(
                "testbed: DMABUF_P2P_ACCEL=kvm, but /dev/kvm cannot run a vCPU here: using TCG"
            );
            Self::Tcg
        }
    }
}

/// Whether KVM can really run a guest here: in a forked child, creates a VM
/// whose only instruction (at the x86 reset vector) is `hlt`, runs its vCPU and
/// expects a HLT exit within two seconds. Some sandboxes offer a `/dev/kvm`
/// that answers ioctls but never runs a vCPU; this tells them apart.
pub fn kvm_works() -> bool {
    if !std::path::Path::new("/dev/kvm").exists() {
        return false;
    }
    // SAFETY: fork() in the child only performs raw syscalls and _exit()s;
    // it allocates nothing and takes no locks.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return false;
    }
    if pid == 0 {
        let ok = kvm_hlt_probe();
        // SAFETY: terminate the forked child without running atexit handlers.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut status = 0;
        // SAFETY: waiting on our own child with a valid status pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        }
        if r < 0 || Instant::now() > deadline {
            // SAFETY: killing our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: reaping it, with a valid status pointer.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs in the forked child: raw syscalls only. One SAFETY argument covers
/// the whole sequence of raw KVM calls, so it is one block.
#[allow(clippy::multiple_unsafe_ops_per_block)]
fn kvm_hlt_probe() -> bool {
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
    const KVM_GET_VCPU_MMAP_SIZE: libc::c_ulong = 0xAE04;
    const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;
    const KVM_SET_USER_MEMORY_REGION: libc::c_ulong = 0x4020_AE46;
    const KVM_RUN: libc::c_ulong = 0xAE80;
    const KVM_EXIT_HLT: u32 = 5;
    #[repr(C)]
    struct Region {
        slot: u32,
        flags: u32,
        guest_phys_addr: u64,
        memory_size: u64,
        userspace_addr: u64,
    }
    // SAFETY: a sequence of KVM ioctls on fds this child opens, with argument
    // types matching each request; the memory and run areas are fresh mmaps.
    unsafe {
        let kvm = libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if kvm < 0 || libc::ioctl(kvm, KVM_GET_API_VERSION, 0) != 12 {
            return false;
        }
        let vm = libc::ioctl(kvm, KVM_CREATE_VM, 0);
        if vm < 0 {
            return false;
        }
        let size = 0x10000usize;
        let mem = libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if mem == libc::MAP_FAILED {
            return false;
        }
        // The reset vector is 0xfffffff0: offset 0xfff0 of a 64 KiB slot at 0xffff0000.
        *(mem as *mut u8).add(0xfff0) = 0xf4;
        let region = Region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0xffff_0000,
            memory_size: size as u64,
            userspace_addr: mem as u64,
        };
        if libc::ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) != 0 {
            return false;
        }
        let vcpu = libc::ioctl(vm, KVM_CREATE_VCPU, 0);
        let run_size = libc::ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
        if vcpu < 0 || run_size <= 0 {
            return false;
        }
        let run = libc::mmap(
            std::ptr::null_mut(),
            run_size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            vcpu,
            0,
        );
        if run == libc::MAP_FAILED || libc::ioctl(vcpu, KVM_RUN, 0) != 0 {
            return false;
        }
        // exit_reason is the u32 at offset 8 of struct kvm_run.
        *((run as *const u8).add(8) as *const u32) == KVM_EXIT_HLT
    }
}

/// The VM's shape.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// bzImage to boot.
    pub kernel: PathBuf,
    /// initramfs (newc cpio) to boot.
    pub initrd: PathBuf,
    /// Directory for the run's files (backing files, logs, QMP socket).
    pub run_dir: PathBuf,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest CPUs.
    pub cpus: u32,
    /// 2 MiB huge pages reserved on the kernel command line.
    pub hugepages: u32,
    /// ivshmem devices, in order.
    pub ivshmem: Vec<Ivshmem>,
    /// Whether to add the edu DMA engine (`edu0`, on the first root port).
    pub edu: bool,
    /// More edu engines (`edu1`, `edu2`, ...), each on its own root port
    /// after the ivshmem devices, so that `edu0` keeps the lowest PCI address.
    /// Each runs its transfers on its own QEMU timer: several engines move
    /// data in parallel (the revocation load test runs one stream per engine).
    pub extra_edu: u32,
    /// NVMe controllers, after every other device, on root ports that are
    /// functions of slot 0x1e (slot 0x1f is the chipset's): the devices
    /// before them keep their PCI addresses.
    pub nvme: Vec<NvmeDrive>,
    /// Where edu and ivshmem devices sit: own root ports (standard), the
    /// root bus, or below one switch.
    pub topology: Topology,
    /// The largest memory the guest may grow to (`-m ...,slots=1,maxmem=`),
    /// in GiB; `None` for no hot-pluggable memory. QEMU reserves that much
    /// guest-physical space after the RAM above 4 GiB and starts the 64-bit
    /// PCI window after it, so a large value moves 64-bit BARs high (520
    /// GiB puts them above 512 GiB) without giving the guest more RAM.
    pub max_memory_gib: Option<u32>,
    /// Properties added to the `intel-iommu` device (`aw-bits=39`).
    pub iommu_options: Vec<String>,
    /// virtio-gpu devices, after the edu and ivshmem devices.
    pub gpus: Vec<VirtioGpu>,
    /// Guest RAM from a sealed memfd (`memory-backend-memfd`) rather than
    /// anonymous memory: what QEMU 7.2 wants before it enables virtio-gpu
    /// blob resources (on by itself when a GPU has `blob`).
    pub memfd_ram: bool,
    /// Extra kernel command line.
    pub extra_cmdline: String,
    /// Extra QEMU arguments, after the devices (e.g. `-global
    /// q35-pcihost.pci-hole64-size=...` for BARs of many GiB).
    pub extra_qemu_args: Vec<String>,
    /// Acceleration.
    pub accel: Accel,
    /// Where the Unix sockets live: a short private directory that
    /// [`Vm::start`] makes, since a socket path under a deep `run_dir` can
    /// exceed the 108 bytes of `sun_path`. `None` means `run_dir`.
    pub socket_dir: Option<PathBuf>,
}

impl VmConfig {
    /// The standard test VM: 1 GiB, 2 CPUs, edu, a 1 MiB (`shm0`) and a 64 MiB
    /// (`shm1`) ivshmem, then six 64 KiB ivshmem (`shm2`..`shm7`) and five more
    /// edu engines (`edu1`..`edu5`) for the tests that run parallel DMA
    /// streams (revocation under load, concurrency). Every device is on its
    /// own root port, in this order, so the buses (and PCI addresses) follow
    /// it: edu0 on bus 1, shm0 on bus 2, shm1 on bus 3, shm2..shm7 on buses
    /// 4..9, edu1..edu5 on buses 10..14. Then the NVMe controllers of
    /// [`VmConfig::standard_nvme`] on buses 15 and 16.
    pub fn standard(kernel: PathBuf, initrd: PathBuf, run_dir: PathBuf) -> Self {
        let mut ivshmem = vec![
            Ivshmem {
                id: "shm0".into(),
                size: 1 << 20,
            },
            Ivshmem {
                id: "shm1".into(),
                size: 64 << 20,
            },
        ];
        ivshmem.extend((2..8).map(|i| Ivshmem {
            id: format!("shm{i}"),
            size: SMALL_SHM_SIZE,
        }));
        Self {
            kernel,
            initrd,
            run_dir,
            memory_mib: 1024,
            cpus: 2,
            hugepages: 64,
            ivshmem,
            edu: true,
            extra_edu: 5,
            nvme: Self::standard_nvme(),
            topology: Topology::RootPorts,
            max_memory_gib: None,
            iommu_options: Vec::new(),
            gpus: Vec::new(),
            memfd_ram: false,
            extra_cmdline: String::new(),
            extra_qemu_args: Vec::new(),
            accel: Accel::detect(),
            socket_dir: None,
        }
    }

    /// The standard VM's NVMe controllers: `nvme0`, a 4 MiB namespace with
    /// MDTS 5 (128 KiB per command), and `nvme1`, a 1 MiB namespace, a
    /// 16 MiB controller memory buffer and a 16 MiB persistent memory region.
    pub fn standard_nvme() -> Vec<NvmeDrive> {
        vec![
            NvmeDrive {
                id: "nvme0".into(),
                size: 4 << 20,
                cmb_mib: 0,
                pmr_mib: 0,
                mdts: 5,
                read_bps: 0,
            },
            NvmeDrive {
                id: "nvme1".into(),
                size: 1 << 20,
                cmb_mib: 16,
                pmr_mib: 16,
                mdts: 7,
                read_bps: 0,
            },
        ]
    }

    /// Host path of an ivshmem device's backing file, of an NVMe
    /// controller's image file, or of its persistent memory region (`id` is
    /// `shm0`, `nvme0`, `nvme1-pmr`, ...).
    pub fn backing_file(&self, id: &str) -> PathBuf {
        if self.nvme.iter().any(|n| n.id == id) {
            return self.run_dir.join(format!("{id}.img"));
        }
        self.run_dir.join(format!("{id}.mem"))
    }

    /// Where the kernel console is written.
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    /// Where QEMU's trace and guest-error log goes (runs with a
    /// virtio-gpu): its stderr, which, unlike a `-D` log file, is not
    /// buffered, so a test sees each line as QEMU writes it.
    pub fn qemu_log(&self) -> PathBuf {
        self.run_dir.join("qemu.stderr")
    }

    /// Whether QEMU needs `/dev/udmabuf` (a virtio-gpu with blob).
    pub fn needs_udmabuf(&self) -> bool {
        self.gpus.iter().any(|g| g.blob)
    }

    /// Whether guest RAM comes from a memfd backend.
    fn ram_from_memfd(&self) -> bool {
        self.memfd_ram || self.needs_udmabuf()
    }

    /// Where the guest report is written.
    pub fn report_log(&self) -> PathBuf {
        self.run_dir.join("report.log")
    }

    /// The socket carrying the guest report (and the host's answers).
    pub fn report_socket(&self) -> PathBuf {
        self.socket_dir().join("report.sock")
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.socket_dir().join("qmp.sock")
    }

    fn socket_dir(&self) -> &Path {
        self.socket_dir.as_deref().unwrap_or(&self.run_dir)
    }

    /// The `intel-iommu` device with its properties: interrupt remapping
    /// under KVM, then [`iommu_options`](Self::iommu_options).
    fn iommu_device(&self) -> String {
        let mut dev = String::from("intel-iommu");
        if self.accel == Accel::Kvm {
            dev.push_str(",intremap=on");
        }
        for opt in &self.iommu_options {
            dev.push(',');
            dev.push_str(opt);
        }
        dev
    }

    /// The full QEMU argument list.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let ram_backend = if self.ram_from_memfd() {
            ",memory-backend=ram0"
        } else {
            ""
        };
        if self.ram_from_memfd() {
            a.push("-object".into());
            a.push(format!(
                "memory-backend-memfd,id=ram0,size={}M",
                self.memory_mib
            ));
        }
        let mut push = |s: &str| a.push(s.to_owned());
        match self.accel {
            // Interrupt remapping under KVM needs the split irqchip.
            Accel::Kvm => {
                push("-machine");
                push(&format!("q35,accel=kvm,kernel-irqchip=split{ram_backend}"));
                push("-cpu");
                push("host");
            }
            // Multi-threaded TCG races with the guest kernel's live text
            // patching (int3-based static keys): seen here as an early-boot
            // "Oops: int3" in sched_clock_cpu. One TCG thread for both vCPUs
            // keeps SMP semantics without the race.
            Accel::Tcg => {
                push("-machine");
                push(&format!("q35{ram_backend}"));
                push("-accel");
                push("tcg,thread=single");
                push("-cpu");
                push("max");
            }
        }
        let mut a2 = vec![
            "-smp".to_owned(),
            self.cpus.to_string(),
            "-m".to_owned(),
            match self.max_memory_gib {
                Some(max) => format!("{}M,slots=1,maxmem={max}G", self.memory_mib),
                None => format!("{}M", self.memory_mib),
            },
            "-display".to_owned(),
            "none".to_owned(),
            "-vga".to_owned(),
            "none".to_owned(),
            "-monitor".to_owned(),
            "none".to_owned(),
            "-no-reboot".to_owned(),
            "-nodefaults".to_owned(),
            "-serial".to_owned(),
            format!("file:{}", self.console_log().display()),
            // The report port is a socket so the host can also answer the guest;
            // wait=on holds the VM until the host has connected.
            "-chardev".to_owned(),
            format!(
                "socket,id=report,path={},server=on,wait=on",
                self.report_socket().display()
            ),
            "-serial".to_owned(),
            "chardev:report".to_owned(),
            "-qmp".to_owned(),
            format!("unix:{},server=on,wait=off", self.qmp_socket().display()),
            // The IOMMU must come before the devices it translates for.
            "-device".to_owned(),
            self.iommu_device(),
        ];
        a.append(&mut a2);
        let mut slots = DeviceSlots::new(self.topology);
        if self.edu {
            let rp = slots.next(&mut a);
            a.push("-device".into());
            a.push(format!("edu,id=edu0,bus={rp},dma_mask=0xffffffffffffffff"));
        }
        for shm in &self.ivshmem {
            let rp = slots.next(&mut a);
            a.push("-object".into());
            a.push(format!(
                "memory-backend-file,id=mem-{},mem-path={},size={},share=on",
                shm.id,
                self.backing_file(&shm.id).display(),
                shm.size
            ));
            a.push("-device".into());
            a.push(format!(
                "ivshmem-plain,id={},memdev=mem-{},bus={rp}",
                shm.id, shm.id
            ));
        }
        for (i, gpu) in self.gpus.iter().enumerate() {
            let bus = match gpu.place {
                GpuPlace::WithDevices => slots.next(&mut a),
                GpuPlace::RootBus => format!("pcie.0,addr={:#x}", 0x18 + i),
            };
            a.push("-device".into());
            a.push(format!(
                "virtio-gpu-pci,id={},bus={bus},xres={},yres={}{}",
                gpu.id,
                gpu.resolution.0,
                gpu.resolution.1,
                if gpu.blob { ",blob=true" } else { "" }
            ));
        }
        if !self.gpus.is_empty() {
            a.push("-d".into());
            a.push("guest_errors".into());
            for ev in GPU_TRACE_EVENTS {
                a.push("-trace".into());
                a.push(format!("enable={ev}"));
            }
        }
        for i in 1..=self.extra_edu {
            let rp = slots.next(&mut a);
            a.push("-device".into());
            a.push(format!(
                "edu,id=edu{i},bus={rp},dma_mask=0xffffffffffffffff"
            ));
        }
        // Functions of slot 0x1e, so that no root port goes before (and
        // renumbers the buses of) the devices above.
        for (i, drive) in self.nvme.iter().enumerate() {
            let rp = format!("rpn{i}");
            let chassis = 0x40 + i;
            a.push("-device".into());
            a.push(format!(
                "pcie-root-port,id={rp},bus=pcie.0,chassis={chassis},slot={chassis},addr=0x1e.{i}{}",
                if i == 0 { ",multifunction=on" } else { "" }
            ));
            a.push("-drive".into());
            a.push(format!(
                "file={},if=none,format=raw,id=drv-{}{}",
                self.backing_file(&drive.id).display(),
                drive.id,
                if drive.read_bps > 0 {
                    format!(",throttling.bps-read={}", drive.read_bps)
                } else {
                    String::new()
                }
            ));
            let mut dev = format!(
                "nvme,id={id},serial={id},drive=drv-{id},bus={rp},mdts={}",
                drive.mdts,
                id = drive.id
            );
            if drive.cmb_mib > 0 {
                dev.push_str(&format!(",cmb_size_mb={}", drive.cmb_mib));
            }
            if drive.pmr_mib > 0 {
                let pmr = drive.pmr_id();
                a.push("-object".into());
                a.push(format!(
                    "memory-backend-file,id={pmr},share=on,mem-path={},size={}M",
                    self.backing_file(&pmr).display(),
                    drive.pmr_mib
                ));
                dev.push_str(&format!(",pmrdev={pmr}"));
            }
            a.push("-device".into());
            a.push(dev);
        }
        a.extend(self.extra_qemu_args.iter().cloned());
        a.push("-kernel".into());
        a.push(self.kernel.display().to_string());
        a.push("-initrd".into());
        a.push(self.initrd.display().to_string());
        a.push("-append".into());
        a.push(format!(
            // no_timer_check: under a loaded TCG host the kernel's IO-APIC timer
            // check can miss its ticks and panic ("timer doesn't work through
            // Interrupt-remapped IO-APIC"); the emulated timer is fine.
            "console=ttyS0 intel_iommu=on panic=-1 oops=panic no_timer_check hugepages={} {}",
            self.hugepages, self.extra_cmdline
        ));
        a
    }
}

/// Hands out the bus (and, on the root bus, the address) of each edu and
/// ivshmem device in the order they are added, making the bridges a
/// [`Topology`] needs on the way.
struct DeviceSlots {
    topology: Topology,
    /// Devices placed so far.
    count: u32,
}

impl DeviceSlots {
    fn new(topology: Topology) -> Self {
        Self { topology, count: 0 }
    }

    /// The `bus=...` (and `addr=...`) properties of the next device, after
    /// pushing the bridges it sits behind.
    fn next(&mut self, a: &mut Vec<String>) -> String {
        let i = self.count;
        self.count += 1;
        let mut device = |spec: String| {
            a.push("-device".into());
            a.push(spec);
        };
        match self.topology {
            Topology::RootPorts => {
                device(format!(
                    "pcie-root-port,id=rp{i},bus=pcie.0,chassis={},slot={},addr={:#x}",
                    i + 1,
                    i + 1,
                    0x10 + i
                ));
                format!("rp{i}")
            }
            Topology::RootBus => format!("pcie.0,addr={:#x}", 0x10 + i),
            Topology::Switch => {
                if i == 0 {
                    device("pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1,addr=0x10".into());
                    device("x3130-upstream,id=up0,bus=rp0".into());
                }
                device(format!(
                    "xio3130-downstream,id=dp{i},bus=up0,port={i},chassis=2,slot={i},addr={i:#x}"
                ));
                format!("dp{i}")
            }
        }
    }
}

/// A running VM.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    config: VmConfig,
    started: Instant,
    // Dropped after the child is killed (fields drop after `Drop::drop`).
    _sockets: RuntimeDir,
}

impl Vm {
    /// Creates the backing files and starts QEMU.
    pub fn start(mut config: VmConfig) -> Result<Self> {
        let sockets = RuntimeDir::new()?;
        config.socket_dir = Some(sockets.path().to_owned());
        fs::create_dir_all(&config.run_dir)
            .map_err(|e| Error::io(format!("creating {}", config.run_dir.display()), e))?;
        for shm in &config.ivshmem {
            write_zeroed_file(&config.backing_file(&shm.id), shm.size)?;
        }
        for drive in &config.nvme {
            write_nvme_image(&config.backing_file(&drive.id), drive.size)?;
            if drive.pmr_mib > 0 {
                write_zeroed_file(
                    &config.backing_file(&drive.pmr_id()),
                    u64::from(drive.pmr_mib) << 20,
                )?;
            }
        }
        for p in [
            config.console_log(),
            config.report_log(),
            config.qmp_socket(),
            config.report_socket(),
        ] {
            let _ = fs::remove_file(p);
        }
        let qemu = QemuBinary::resolve()?;
        let mut cmd = qemu.command();
        if config.needs_udmabuf() && !crate::udmabuf_dev::host_has_udmabuf() {
            let staging = sockets.path().join("dev");
            fs::create_dir(&staging)
                .map_err(|e| Error::io(format!("creating {}", staging.display()), e))?;
            crate::udmabuf_dev::run_with_placeholder(&mut cmd, &staging)?;
        }
        cmd.args(config.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::File::create(config.qemu_log())
                    .map_err(|e| Error::io("creating qemu.stderr", e))?,
            );
        let child = cmd.spawn().map_err(|e| {
            Error::io(
                format!("starting {} ({})", qemu.path.display(), qemu.origin),
                e,
            )
        })?;
        Ok(Self {
            child,
            config,
            started: Instant::now(),
            _sockets: sockets,
        })
    }

    /// The configuration the VM was started with.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Time since start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Returns the exit status if QEMU has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .map_err(|e| Error::io("waiting for qemu", e))
    }

    /// Kills QEMU (if still running) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What QEMU wrote on stderr.
    pub fn stderr_text(&self) -> String {
        fs::read_to_string(self.config.run_dir.join("qemu.stderr")).unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates a fresh, zeroed (sparse) file of `size` bytes, as each boot's
/// ivshmem and PMR backing memory.
fn write_zeroed_file(path: &Path, size: u64) -> Result<()> {
    let f =
        fs::File::create(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    f.set_len(size)
        .map_err(|e| Error::io(format!("sizing {}", path.display()), e))
}

/// Writes a fresh NVMe image of `size` bytes filled with [`nvme_image_byte`].
fn write_nvme_image(path: &Path, size: u64) -> Result<()> {
    let data: Vec<u8> = (0..size).map(nvme_image_byte).collect();
    fs::write(path, data).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Reads the bytes `[offset, offset + len)` of a file.
pub fn read_range(path: &Path, offset: u64, len: u64) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f =
        fs::File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| Error::io(format!("seeking {}", path.display()), e))?;
    let mut buf = vec![
        0u8;
        usize::try_from(len)
            .map_err(|_| Error::Setup(format!("range too large: {len}")))?
    ];
    f.read_exact(&mut buf).map_err(|e| {
        Error::io(
            format!("reading {} at {offset:#x}+{len:#x}", path.display()),
            e,
        )
    })?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        let mut c = VmConfig::standard("k".into(), "i".into(), "/run/x".into());
        c.accel = Accel::Tcg;
        c
    }

    #[test]
    fn nvme_controllers_come_last_on_slot_0x1e() {
        let args = config().args();
        let devices: Vec<&String> = args
            .iter()
            .zip(args.iter().skip(1))
            .filter(|(flag, _)| *flag == "-device")
            .map(|(_, v)| v)
            .collect();
        let first_nvme = devices
            .iter()
            .position(|d| d.starts_with("pcie-root-port,id=rpn0"))
            .unwrap();
        // Everything before is what was there before the NVMe drives.
        assert!(devices[..first_nvme].iter().all(|d| !d.contains("nvme")));
        assert!(devices[first_nvme].contains("addr=0x1e.0,multifunction=on"));
        assert!(devices[first_nvme + 2].contains("addr=0x1e.1"));
        assert_eq!(
            devices[first_nvme + 1].as_str(),
            "nvme,id=nvme0,serial=nvme0,drive=drv-nvme0,bus=rpn0,mdts=5"
        );
        assert_eq!(
            devices[first_nvme + 3].as_str(),
            "nvme,id=nvme1,serial=nvme1,drive=drv-nvme1,bus=rpn1,mdts=7,cmb_size_mb=16,\
             pmrdev=nvme1-pmr"
        );
        assert!(args.iter().any(|a| a
            == "memory-backend-file,id=nvme1-pmr,share=on,mem-path=/run/x/nvme1-pmr.mem,size=16M"));
        // The other root ports stay on slots 0x10.. below 0x1f.
        let last_rp = devices[..first_nvme]
            .iter()
            .rev()
            .find(|d| d.starts_with("pcie-root-port"))
            .unwrap();
        assert!(last_rp.ends_with("addr=0x1d"), "{last_rp}");
        assert!(
            args.iter()
                .any(|a| a == "file=/run/x/nvme1.img,if=none,format=raw,id=drv-nvme1")
        );
    }

    #[test]
    fn host_checks_find_nvme_images_and_ivshmem_files() {
        let c = config();
        assert_eq!(c.backing_file("nvme0"), PathBuf::from("/run/x/nvme0.img"));
        assert_eq!(c.backing_file("shm1"), PathBuf::from("/run/x/shm1.mem"));
        assert_eq!(
            c.backing_file("nvme1-pmr"),
            PathBuf::from("/run/x/nvme1-pmr.mem")
        );
    }

    #[test]
    fn image_bytes_differ_between_blocks() {
        let block = |lba: u64| {
            (0..512)
                .map(|i| nvme_image_byte(lba * 512 + i))
                .collect::<Vec<u8>>()
        };
        assert_ne!(block(0), block(1));
        assert_ne!(block(0), block(256));
        assert_eq!(block(3), block(3));
    }
}
