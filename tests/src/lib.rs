//! Helpers for kernel and network-namespace tests.
pub mod netns;
pub mod pod;
pub mod scenario;
