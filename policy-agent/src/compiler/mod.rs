//! NetworkPolicy → dataplane maps, as a pure function of the cluster state.
pub mod output;
