//! Helpers for the kernel and network-namespace tests of the dataplane (tests/tests/*.rs) and
//! for the per-packet benchmark (`bench_datapath`).
//!
//! Everything here needs root and fails (never skips) without it.
pub mod agent;
pub mod bpffs;
pub mod bpfmap;
pub mod cluster;
pub mod fixture;
pub mod netns;
pub mod packet;
pub mod pod;
pub mod scenario;
pub mod sockets;
pub mod tc_counter;
pub mod testrun;
pub mod topology;
pub mod workload;

/// Panics unless running as root: kernel tests must fail, not skip, without privileges.
pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load eBPF programs and create network namespaces: run them as root"
    );
}

/// Pins the calling thread to one CPU (per-CPU state such as the event rate limiter, and
/// steadier benchmark figures).
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays inside it for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
