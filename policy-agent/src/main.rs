use clap::Parser;
use policy_agent::cli::Args;

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    let _dataplane = policy_agent::dataplane::Dataplane::load()?;
    Ok(())
}
