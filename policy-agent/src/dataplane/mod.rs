//! The eBPF dataplane: loading and pinning the programs of `policy-ebpf` (`loader`), attaching
//! them to pod veths and uplinks (`attach`), writing the maps defined in `policy-common` from the
//! compiler's output (`writer`), and reading back counters, map pressure and verdict events
//! (`stats`).
//!
//! The agent's sequence:
//! 1. [`Dataplane::open`] (adopts whatever a previous agent pinned; enforcement never stops);
//! 2. [`Dataplane::sync`] with the full desired maps, then [`Dataplane::apply`] per change;
//! 3. per local pod: [`Dataplane::upsert_endpoint`] then [`Dataplane::attach_endpoint`]; per
//!    uplink: [`Dataplane::attach_uplink`]; gone pods: [`Dataplane::detach`] then
//!    [`Dataplane::remove_endpoint`];
//! 4. metrics from [`Dataplane::counters`] / [`Dataplane::map_usage`], flow log from
//!    [`Dataplane::events`];
//! 5. on uninstall only: [`Dataplane::remove_pins`].
mod attach;
mod error;
mod loader;
mod policy_groups;
mod slots;
mod stats;
mod sys;
mod writer;

pub use attach::{AttachMode, Role};
pub use error::DataplaneError;
pub use loader::{Dataplane, EBPF_OBJECT};
pub use stats::EventReader;
pub use writer::{ApplyReport, MapUsage, addr_of, ip_of, service_key};
