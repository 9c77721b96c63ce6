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

use crate::qemu::VmConfig;

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

const PROFILES: [Profile; 2] = [
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

    #[test]
    fn aw39_narrows_the_iommu() {
        let mut c = VmConfig::standard("k".into(), "i".into(), "/r".into());
        c.accel = crate::qemu::Accel::Tcg;
        (named("aw39").unwrap().shape)(&mut c);
        assert!(c.args().iter().any(|a| a == "intel-iommu,aw-bits=39"));
    }
}
