//! Builds `policy-ebpf` for `bpfel-unknown-none` and embeds the object (`include_bytes_aligned!`
//! of `$OUT_DIR/policy-ebpf` in `dataplane::loader`).
//!
//! Works on the stable toolchain: `RUSTC_BOOTSTRAP=1` lets aya-build pass `-Z build-std=core`
//! (this needs the `rust-src` component and `bpf-linker`, both installed by `cargo xtask setup`).

fn main() -> anyhow::Result<()> {
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "policy-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
}
