//! The in-VM test suite. Built on the host, run inside the test VM by
//! `cargo xtask vm-test`, one test at a time (`--test-threads=1`), because the
//! tests share real devices.
//!
//! A module named `profile_<name>` runs only in a VM of that profile (a
//! narrower IOMMU, another topology: `testbed/src/profile.rs`); the rest run
//! in the standard VM.

mod alloc_count;
mod bad_input;
mod concurrency;
mod dmabuf;
mod examples;
mod fault_injection;
mod faults;
mod guest_bar_map;
mod guest_vmm;
mod guide;
mod heap;
mod iommufd;
mod iommufd_extra;
mod load;
mod nvme;
mod nvme_prepared;
mod nvme_queue;
mod nvme_shadow;
mod p2p;
mod placement;
mod profile_aw39;
mod profile_aw39_high_bar;
mod profile_nvme_throttled;
mod profile_root_bus;
mod profile_switch;
mod profile_virtio_gpu;
mod revoke;
mod share;
mod share_attacks;
mod share_bounds;
mod smoke;
mod testbed;
mod topology;
mod uapi;
mod udmabuf;
mod vfio;
mod vmm;
