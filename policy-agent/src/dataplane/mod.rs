//! The eBPF dataplane: loading, attaching and writing the maps defined in `policy-common`.
pub mod loader;

pub use loader::{Dataplane, DataplaneError};
