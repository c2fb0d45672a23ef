//! The library target exists so that `policy-agent` can declare a build-dependency on this crate
//! (cargo then rebuilds the agent when it changes). The programs are in the `policy-ebpf` binary.
#![no_std]
