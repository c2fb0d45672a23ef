//! Task runner: `cargo xtask <command>`.
//!
//! xtask deliberately does not depend on the eBPF crates: `setup` must be able to run on a fresh
//! machine before bpf-linker exists.

mod bench;
mod conformance;
mod e2e;
mod fuzz;
mod kube;
mod lab;
mod setup;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "policy-agent task runner")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (apt packages, rust-src, bpf-linker, bpffs).
    /// Idempotent; quick when everything is present.
    Setup,
    /// The main job: set up, then the three-tier example of deploy/examples on a fresh lab with
    /// the real agent (expected vs observed connectivity), then teardown.
    Demo {
        /// The lab's address families; `dual` shows, and judges, every table in IPv4 and in IPv6.
        #[arg(long, value_enum, env = "LAB_IP_FAMILY", default_value_t = lab::IpFamily::Ipv4)]
        ip_family: lab::IpFamily,
    },
    /// Set up and run every test (unit, property, kernel, network-namespace).
    Test,
    /// rustfmt and clippy -D warnings on the userspace crates.
    Lint,
    /// A Kubernetes-shaped cluster of network namespaces running the real agent.
    Lab(lab::LabArgs),
    /// The 48 upstream Kubernetes Netpol e2e cases on the lab, via Services and via pod IPs.
    Conformance(conformance::Args),
    /// The upstream NetworkPolicy e2e suite (ginkgo, e2e.test) against the DaemonSet installed
    /// from deploy/overlays on real nodes (kubelet, containerd), then teardown.
    E2e(e2e::Args),
    /// The property tests over and over with fresh seeds and more cases (default 10 minutes).
    Fuzz(fuzz::Args),
    /// Benchmarks: datapath, throughput against an nftables baseline, control plane.
    Bench {
        /// `datapath` (per-packet) or `kube` (enforcement latency through the real API server).
        #[arg(value_parser = ["datapath", "kube"])]
        only: Option<String>,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::run(),
        Cmd::E2e(args) => {
            setup::run()?;
            e2e::run(&args)
        }
        Cmd::Demo { ip_family } => {
            setup::run()?;
            lab::demo::run(&lab::demo::DemoArgs {
                ip_family,
                ..lab::demo::DemoArgs::default()
            })
        }
        Cmd::Test => {
            setup::run()?;
            // The lab tests and the conformance suite run the agent `cargo test` already built.
            // SAFETY: single-threaded at this point; children inherit the variable.
            unsafe { std::env::set_var("LAB_AGENT_PROFILE", "dev") };
            // The manifest tests run the kubectl of the pinned Kubernetes version.
            let kubectl = kube::Binaries::find()?.path("kubectl");
            // SAFETY: as above.
            unsafe { std::env::set_var("POLICY_KUBECTL", kubectl) };
            cargo(&["test", "--no-fail-fast"])?;
            // Through cargo, not this executable: `cargo test` may have rebuilt (replaced) it.
            // The suite on the manifest directory (IPv4, IPv6, dual-stack), then on the real
            // control plane.
            let suite = ["run", "--quiet", "--package", "xtask", "--", "conformance"];
            // On the manifest directory every cell is also explained from the kernel maps.
            let mut live = suite.to_vec();
            live.push("--live-explain");
            cargo(&live)?;
            // IPv6-only and dual-stack labs (each matrix probed in both families).
            for family in ["ipv6", "dual"] {
                let mut args = live.clone();
                args.extend(["--ip-family", family]);
                cargo(&args)?;
            }
            // The real control plane with kube-proxy in nftables mode on a dual-stack lab (each
            // matrix in both families, through both of its proxiers). Its iptables mode, kind's
            // default, is what `cargo xtask e2e` runs below, and what the real-API lab tests of
            // `cargo test` run.
            let mut args = suite.to_vec();
            args.extend([
                "--api",
                "kube",
                "--kube-proxy",
                "nftables",
                "--ip-family",
                "dual",
            ]);
            cargo(&args)?;
            // The upstream NetworkPolicy suite against the DaemonSet on real kubelets.
            cargo(&["run", "--quiet", "--package", "xtask", "--", "e2e"])
        }
        Cmd::Lint => lint(),
        Cmd::Lab(args) => lab::main(args),
        Cmd::Conformance(args) => conformance::main(args),
        Cmd::Fuzz(args) => fuzz::main(args),
        Cmd::Bench { only, json } => {
            setup::run()?;
            match only.as_deref() {
                Some("datapath") => {
                    let json_flag: &[&str] = if json { &["--json"] } else { &[] };
                    let mut args = vec![
                        "run",
                        "--release",
                        "-q",
                        "-p",
                        "policy-tests",
                        "--bin",
                        "bench_datapath",
                        "--",
                    ];
                    args.extend_from_slice(json_flag);
                    cargo(&args)
                }
                Some("kube") => bench::kube_only(),
                _ => bench::run(json),
            }
        }
    }
}

fn lint() -> Result<()> {
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])
}

/// Runs cargo from the workspace root with the same toolchain that runs xtask.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    exec(Command::new(cargo).args(args).current_dir(workspace_root()))
}

/// Runs a command, failing with its command line when it does not succeed.
pub fn exec(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace root")
        .to_path_buf()
}
