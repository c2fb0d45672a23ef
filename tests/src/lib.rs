//! Helpers for the kernel and network-namespace tests of the dataplane (tests/tests/*.rs) and
//! for the per-packet benchmark (`bench_datapath`).
//!
//! Everything here needs root and fails (never skips) without it.
pub mod bpffs;
pub mod netns;
pub mod packet;
pub mod testrun;

/// Panics unless running as root: kernel tests must fail, not skip, without privileges.
pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load eBPF programs and create network namespaces: run them as root"
    );
}
