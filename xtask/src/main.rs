//! Task runner: `cargo xtask <command>`.

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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Lab(args) => lab::main(args),
    }
}
