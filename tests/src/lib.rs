//! Helpers for kernel and network-namespace tests.
pub mod agent;
pub mod cluster;
pub mod netns;
pub mod pod;
pub mod scenario;
pub mod workload;
