use clap::Parser;
use policy_agent::cli::Args;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = policy_common::Config::with_mark_mask(args.mark_mask);
    let _dataplane = policy_agent::dataplane::Dataplane::open(&args.bpffs_dir, config)?;
    Ok(())
}
