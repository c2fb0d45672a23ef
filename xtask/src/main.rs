//! Task runner: `cargo xtask <command>`.

mod conformance;
mod lab;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "Project tasks: the lab, the conformance suite, the demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A Kubernetes-shaped cluster of network namespaces running the real agent.
    Lab(lab::LabArgs),
    /// The upstream Kubernetes Netpol e2e cases (48) on the lab, via Services and via pod IPs.
    Conformance(conformance::Args),
    /// Three-tier segmentation on a fresh lab: expected vs observed connectivity, then teardown.
    Demo(lab::demo::DemoArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Lab(args) => lab::main(args),
        Command::Conformance(args) => conformance::main(args),
        Command::Demo(args) => lab::demo::run(&args),
    }
}
