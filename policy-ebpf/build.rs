//! Linker flags for the eBPF object (bpf-linker):
//! - `policy_probe` stays a global function, so the verifier checks it once instead of at every
//!   call site (see `src/policy.rs`);
//! - misaligned loads are allowed, so header fields are read with one load instead of byte by
//!   byte (the verifier accepts them on architectures with efficient unaligned access, which is
//!   every architecture this runs on: x86-64 and arm64).
fn main() {
    println!("cargo:rustc-link-arg-bins=--export=policy_probe");
    println!("cargo:rustc-link-arg-bins=--cpu-features=+allows-misaligned-mem-access");
}
