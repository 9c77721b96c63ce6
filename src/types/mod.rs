//! Plain values that errors name: ranges, IOVA ranges and what is wrong
//! with them. They import nothing else of the crate, so `error.rs` sits
//! right above them and every other module above `error.rs`: no import
//! cycles. Each is re-exported where it is used (`range`, `importer::iommufd`,
//! `share`, `importer::drm`, `error`).

mod byte_range;
#[cfg(feature = "drm")]
mod import_refusal;
mod iova_range;
#[cfg(feature = "share")]
mod share_problem;

pub use byte_range::{ByteRange, PhysRange, RangeProblem};
#[cfg(feature = "drm")]
pub use import_refusal::ImportRefusal;
pub use iova_range::{AllowedIovaProblem, IovaRange};
#[cfg(feature = "share")]
pub use share_problem::{RefusalReason, ShareProblem};
