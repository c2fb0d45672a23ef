//! policy-agent: compiles Kubernetes NetworkPolicy into eBPF maps and keeps them enforced.
pub mod agent;
pub mod bpffs;
pub mod cli;
pub mod compiler;
pub mod dataplane;
pub mod endpoints;
pub mod evaluator;
pub mod flowlog;
pub mod http;
pub mod metrics;
pub mod model;
pub mod netpol;
pub mod node;
pub mod numbering;
pub mod sources;
pub mod sync;
pub mod telemetry;
