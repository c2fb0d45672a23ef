//! `policy-agent`: enforces Kubernetes NetworkPolicy with eBPF on this node. See `agent` for
//! what runs, `cli` for the flags; `policy-agent control …` is the client of a running agent's
//! control socket (`control`); run as `policy-agent-cni` it is the chained CNI plugin (`cni`).
use clap::Parser;
use policy_agent::{agent, bpffs, cli::Args, cni, control, telemetry};

fn main() -> std::process::ExitCode {
    // Installed as the chained CNI plugin under this name (see `cni`); `policy-agent-cni cni …`
    // still reaches the maintenance commands.
    if std::env::args_os()
        .next()
        .and_then(|a| std::path::Path::new(&a).file_name().map(|n| n.to_owned()))
        .is_some_and(|n| n == cni::PLUGIN_TYPE)
        && std::env::args_os().nth(1).is_none_or(|a| a != "cni")
    {
        return cni::plugin::main();
    }
    let result = if std::env::args_os().nth(1).is_some_and(|a| a == "cni") {
        cni::run(&cni::CniArgs::parse_from(std::env::args_os().skip(1)))
            .map(|text| println!("{text}"))
            .map_err(anyhow::Error::from)
    } else if std::env::args_os().nth(1).is_some_and(|a| a == "control") {
        control::run(&control::ControlArgs::parse_from(
            std::env::args_os().skip(1),
        ))
        .map(|body| println!("{}", body.trim_end()))
        .map_err(anyhow::Error::from)
    } else {
        run()
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {}", telemetry::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    // Before any thread exists: may join another mount namespace to reach the shared bpffs.
    let outcome = bpffs::ensure(&args.bpffs_dir);
    let log = telemetry::init(args.log_format, &args.log_level)?;
    let outcome = outcome?;
    if let Some(note) = outcome.note() {
        tracing::info!("{note}");
    }
    // In a pod, a bpffs of its own is not the node's: enforce, but never report ready.
    let startup = agent::Startup {
        unready: bpffs::pod_problem(&outcome, bpffs::in_pod_now())
            .into_iter()
            .collect(),
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(agent::run(args, Some(log), startup))?;
    Ok(())
}
