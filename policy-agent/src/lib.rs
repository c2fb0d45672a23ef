//! policy-agent: compiles Kubernetes NetworkPolicy into eBPF maps and keeps them enforced.
pub mod cli;
pub mod compiler;
pub mod dataplane;
pub mod endpoints;
pub mod evaluator;
pub mod metrics;
pub mod model;
pub mod numbering;
pub mod sources;
pub mod telemetry;
