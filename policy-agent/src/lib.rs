//! policy-agent: compiles Kubernetes NetworkPolicy into eBPF maps and keeps them enforced.
pub mod dataplane;
