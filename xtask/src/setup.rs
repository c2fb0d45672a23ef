//! Machine setup for building and testing: apt packages, the rust-src component, bpf-linker, a
//! mounted bpffs and the Kubernetes components (control plane, nodes, the e2e suite) built from Go modules ([`crate::kube`]). Every
//! step first checks whether it is already done, so a second run takes seconds.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::exec;

/// Debian packages: LLVM 22 for bpf-linker, and the tools the kernel tests and the lab drive.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "nftables",
    "iperf3",
    "netcat-openbsd",
    // The benchmark chart's font.
    "fonts-dejavu-core",
    // The lab's real-API mode: kube-proxy's iptables mode and conntrack, the CNI plugins the lab
    // invokes as a kubelet would, certificates for the API server.
    "iptables",
    "conntrack",
    "containernetworking-plugins",
    "openssl",
    // `kubectl netpol graph -o svg|png` renders through Graphviz.
    "graphviz",
    // The deploy tests lint the kind scripts.
    "shellcheck",
];

/// Debian packages of the real nodes (`lab up --kubelet`, `cargo xtask e2e`): the container
/// runtime, umoci to assemble the images without a registry or a container engine, and gcc with
/// the static C library for the pause binary.
const NODE_PACKAGES: &[&str] = &["containerd", "runc", "umoci", "gcc", "libc6-dev"];

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPFFS: &str = "/sys/fs/bpf";

pub fn run() -> Result<()> {
    let started = std::time::Instant::now();
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    crate::kube::ensure()?;
    crate::kube::ensure_node()?;
    eprintln!("setup: ready in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn is_root() -> bool {
    output("id", &["-u"])
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .chain(NODE_PACKAGES)
        .copied()
        .filter(|pkg| {
            output("dpkg-query", &["-W", "-f=${Status}", pkg])
                .is_none_or(|status| !status.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("setup: missing Debian packages {missing:?}; run as root (or install them) first");
    }
    eprintln!("setup: installing {missing:?}");
    exec(Command::new("apt-get").arg("update").arg("-q"))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn rust_src() -> Result<()> {
    let installed = output("rustup", &["component", "list", "--installed"]).unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: adding the rust-src component");
    exec(Command::new("rustup").args(["component", "add", "rust-src"]))
}

fn bpf_linker() -> Result<()> {
    let version = output("bpf-linker", &["--version"]).unwrap_or_default();
    if version.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
        return Ok(());
    }
    eprintln!("setup: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    exec(
        Command::new(cargo)
            .args([
                "install",
                "--locked",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            // Without it bpf-linker's build searches /usr/lib64 and cannot find -lLLVM.
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )
    .context("installing bpf-linker")
}

fn bpffs() -> Result<()> {
    let mounted = Command::new("mountpoint")
        .args(["-q", BPFFS])
        .status()
        .is_ok_and(|s| s.success());
    if mounted {
        return Ok(());
    }
    if !is_root() {
        bail!("setup: bpffs is not mounted at {BPFFS}; run as root");
    }
    eprintln!("setup: mounting bpffs at {BPFFS}");
    exec(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}
