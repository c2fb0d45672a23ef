use clap::Parser;

/// Enforces Kubernetes NetworkPolicy with eBPF on this node.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    let _dataplane = policy_agent::dataplane::Dataplane::load()?;
    Ok(())
}
