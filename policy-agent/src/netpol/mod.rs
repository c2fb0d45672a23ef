//! `kubectl netpol`: explain, lint, what-if, graph and policy tests for the people who write
//! NetworkPolicies, computed by the agent's own reference evaluator and compiler; the flows the
//! agents recorded, and policies advised from them.
//!
//! Exit codes: 0 fine; 1 findings (lint errors or warnings), a denied flow (explain), changed
//! flows (what-if), wrong cells (test) or observed flows the advice would deny (advise); 2 usage
//! or input errors.

pub mod advise;
pub mod agents;
pub mod expect;
pub mod explain;
pub mod flows;
pub mod graph;
pub mod lint;
pub mod state;
pub mod whatif;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use self::state::{Source, State};
use crate::evaluator::Protocol;

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-netpol",
    about = "Explain, lint, what-if, graph and test Kubernetes NetworkPolicies; read the flows the agents saw and advise policies from them",
    after_help = "Exit codes: 0 fine; 1 findings, a denied flow, changed flows, wrong cells or an advice that denies an observed flow; 2 usage or input errors."
)]
pub struct Cli {
    /// Files or directories of YAML (Namespaces, Pods, Services, NetworkPolicies, workloads'
    /// pod templates); repeatable.
    #[arg(short = 'f', long = "filename", global = true)]
    files: Vec<PathBuf>,
    /// Read the cluster of the current kubeconfig context.
    #[arg(long, global = true)]
    cluster: bool,
    /// With --cluster: this kubeconfig instead of $KUBECONFIG / ~/.kube/config.
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// Read a lab made by `cargo xtask lab up` (default prefix `pal`).
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "pal")]
    lab: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AdviseOutput {
    Yaml,
    Json,
}

/// Where `flows` and `advise` read the agents (besides --lab and --cluster).
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// Read this agent: a control socket (a path, or unix:PATH) or HOST:PORT of an agent run
    /// with --http-flows; repeatable. Default: the agents of --lab, or of --cluster through the
    /// API server's pod proxy.
    #[arg(long)]
    agent: Vec<String>,
    /// With --cluster: the namespace of the agent's pods.
    #[arg(long, default_value = "policy-agent")]
    agent_namespace: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphOutput {
    Dot,
    Svg,
    Png,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Is a flow allowed, and why, in both directions.
    Explain {
        /// NS/POD, node/NAME or an address.
        #[arg(long)]
        from: String,
        /// NS/POD, node/NAME or an address.
        #[arg(long)]
        to: String,
        /// A number or a port name of the destination pod (default: every port it declares).
        #[arg(long)]
        port: Option<String>,
        #[arg(long, value_parser = ["TCP", "UDP", "SCTP"])]
        protocol: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
        /// Answer from the kernel maps of the nodes that host the ends (each agent's /explain),
        /// beside the evaluator; a difference is reported as a bug (MISMATCH, exit 1).
        #[arg(long)]
        live: bool,
        #[command(flatten)]
        agents: AgentArgs,
    },
    /// Findings about the policies, each with a code, a severity, the object, the field and a fix.
    Lint {
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The flows that change when objects are applied (or deleted).
    WhatIf {
        /// Objects to create or replace; repeatable.
        #[arg(long)]
        apply: Vec<PathBuf>,
        /// Objects to delete; repeatable.
        #[arg(long)]
        delete: Vec<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Who can talk to whom, as Graphviz DOT (svg and png through Graphviz's `dot`).
    Graph {
        #[arg(short = 'o', long, value_enum, default_value = "dot")]
        output: GraphOutput,
        /// Only pods of this namespace and their peers.
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Recent flows the agents recorded (allowed and dropped, with policy and rule), oldest
    /// first: a table, or (-o json) one JSON object per line.
    Flows {
        #[command(flatten)]
        query: crate::flowstore::FlowQuery,
        #[command(flatten)]
        agents: AgentArgs,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Least-privilege NetworkPolicies (one per workload, ingress and egress) from observed flows.
    Advise {
        /// Only advise workloads of this namespace.
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Only flows of the last DURATION (90s, 5m, 1h).
        #[arg(long)]
        since: Option<String>,
        /// Learn from these flows (JSON lines, as `flows -o json` writes them; `-` for stdin)
        /// instead of asking the agents; repeatable. (`-f` names the state, as everywhere.)
        #[arg(long)]
        flows: Vec<PathBuf>,
        #[command(flatten)]
        agents: AgentArgs,
        /// Emit the policies in audit mode (annotated policy-agent/audit: "true"), to watch
        /// them before they are enforced.
        #[arg(long)]
        audit: bool,
        #[arg(short = 'o', long, value_enum, default_value = "yaml")]
        output: AdviseOutput,
    },
    /// Check expected connectivity (truth tables or JSON) against the policies.
    Test {
        #[arg(long)]
        expect: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

/// A failure that exits 2.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("{0}")]
    Input(#[from] state::LoadError),
    #[error("{0}")]
    Usage(String),
}

fn usage(e: impl Into<String>) -> UsageError {
    UsageError::Usage(e.into())
}

/// Runs the command line; the binary's `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut stdout = std::io::stdout().lock();
    match run(&cli, &mut stdout) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("kubectl-netpol: {e}");
            ExitCode::from(2)
        }
    }
}

fn source(cli: &Cli) -> Result<Source, UsageError> {
    let chosen = usize::from(!cli.files.is_empty())
        + usize::from(cli.cluster)
        + usize::from(cli.lab.is_some());
    match (chosen, &cli.lab) {
        (0, _) => Err(usage(
            "say where the state is: -f PATH, --cluster or --lab [PREFIX]",
        )),
        (1, Some(p)) => Ok(Source::Lab(p.clone())),
        (1, None) if cli.cluster => Ok(Source::Cluster(cli.kubeconfig.clone())),
        (1, None) => Ok(Source::Files(cli.files.clone())),
        _ => Err(usage("-f, --cluster and --lab are exclusive")),
    }
}

fn json(out: &mut dyn Write, v: &impl serde::Serialize) -> Result<(), UsageError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| usage(e.to_string()))?;
    writeln!(out, "{text}").map_err(|e| usage(e.to_string()))
}

fn write(out: &mut dyn Write, text: &str) -> Result<(), UsageError> {
    out.write_all(text.as_bytes())
        .map_err(|e| usage(e.to_string()))
}

/// Where `flows` and `advise` read the agents' flows.
fn flow_source(cli: &Cli, agents: &AgentArgs) -> Result<agents::FlowSource, UsageError> {
    if !agents.agent.is_empty() {
        return Ok(agents::FlowSource::Agents(agents.agent.clone()));
    }
    match (&cli.lab, cli.cluster) {
        (Some(prefix), _) => Ok(agents::FlowSource::Lab(prefix.clone())),
        (None, true) => Ok(agents::FlowSource::Cluster {
            kubeconfig: cli.kubeconfig.clone(),
            namespace: agents.agent_namespace.clone(),
        }),
        (None, false) => Err(usage(
            "say where the agents are: --lab [PREFIX], --cluster or --agent SOCKET|HOST:PORT",
        )),
    }
}

fn fetch(
    source: &agents::FlowSource,
    query: &crate::flowstore::FlowQuery,
) -> Result<Vec<crate::flowstore::FlowRecord>, UsageError> {
    agents::fetch(source, query).map_err(|e| usage(e.to_string()))
}

/// Runs one command against the state, writing to `out`; returns the exit code (0 or 1).
pub fn run(cli: &Cli, out: &mut dyn Write) -> Result<u8, UsageError> {
    match &cli.command {
        Command::Flows {
            query,
            agents,
            output,
        } => {
            let records = fetch(&flow_source(cli, agents)?, query)?;
            match output {
                Output::Json => write(out, &crate::flowstore::to_lines(&records))?,
                Output::Text => write(out, &agents::table(&records))?,
            }
            Ok(0)
        }
        Command::Advise {
            namespace,
            since,
            flows,
            agents,
            audit,
            output,
        } => {
            let state = state::load(&source(cli)?)?;
            let query = crate::flowstore::FlowQuery {
                since: since.clone(),
                ..Default::default()
            };
            let records = if flows.is_empty() {
                fetch(&flow_source(cli, agents)?, &query)?
            } else {
                read_flows(flows, &query)?
            };
            let options = advise::AdviseOptions {
                namespace: namespace.clone(),
                audit: *audit,
            };
            let advice = advise::advise(state.cluster(), &records, &options);
            match output {
                AdviseOutput::Json => json(
                    out,
                    &serde_json::json!({ "policies": advice.policies, "advice": advice }),
                )?,
                AdviseOutput::Yaml => {
                    write(out, &advise::yaml(&advice.policies))?;
                    eprintln!(
                        "kubectl-netpol: {} policies from {} observed flow(s)",
                        advice.policies.len(),
                        advice.flows_used
                    );
                    for (why, n) in &advice.skipped {
                        eprintln!("  skipped {n} record(s): {why}");
                    }
                    for u in &advice.unadvised {
                        eprintln!("  not advised: {u}");
                    }
                    for d in &advice.denied {
                        eprintln!("  OBSERVED BUT DENIED by the advice: {d}");
                    }
                }
            }
            Ok(u8::from(!advice.denied.is_empty()))
        }
        Command::Explain {
            from,
            to,
            port,
            protocol,
            output,
            live: true,
            agents,
        } => {
            let state = state::load(&source(cli)?)?;
            let cluster = state.cluster();
            let target = flows::parse_target(cluster, to).map_err(usage)?;
            let ports = ports_of(cluster, &target, port.as_deref(), protocol.as_deref())?;
            let agents = flow_source(cli, agents)?;
            let mut all = Vec::new();
            for (port, protocol) in ports {
                let query = crate::live::ExplainQuery {
                    from: from.clone(),
                    to: to.clone(),
                    port,
                    protocol: Some(protocol.as_str().into()),
                };
                let nodes = agents::explain(&agents, &query).map_err(|e| usage(e.to_string()))?;
                all.push((query, nodes));
            }
            let answered = |(_, nodes): &(_, Vec<crate::live::LiveExplain>)| {
                nodes.iter().any(|n| !n.directions.is_empty())
            };
            if !all.iter().all(answered) {
                return Err(usage(format!(
                    "no agent hosts {from} or {to} (explain --live answers for pods with an endpoint)"
                )));
            }
            let directions = || all.iter().flat_map(|(_, n)| n).flat_map(|n| &n.directions);
            let fine = directions().all(|d| d.agrees && d.kernel.allowed);
            match output {
                Output::Json => json(
                    out,
                    &all.iter()
                        .map(|(q, nodes)| serde_json::json!({"query": q, "nodes": nodes}))
                        .collect::<Vec<_>>(),
                )?,
                Output::Text => {
                    for (q, nodes) in &all {
                        write(out, &crate::live::render(q, nodes))?;
                    }
                }
            }
            Ok(u8::from(!fine))
        }
        command => {
            let state = state::load(&source(cli)?)?;
            run_on(&state, command, out)
        }
    }
}

/// Flow records from files of JSON lines (`-`: stdin), filtered by `query`'s `since`.
fn read_flows(
    paths: &[PathBuf],
    query: &crate::flowstore::FlowQuery,
) -> Result<Vec<crate::flowstore::FlowRecord>, UsageError> {
    let since = query.validate().map_err(|e| usage(e.to_string()))?;
    let after = since.map_or(0, |d| {
        crate::flowstore::now_ms().saturating_sub(d.as_millis() as u64)
    });
    let mut all = Vec::new();
    for path in paths {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(path)
        }
        .map_err(|e| usage(format!("reading {}: {e}", path.display())))?;
        let records = crate::flowstore::parse_lines(&text)
            .map_err(|e| usage(format!("{}: {e}", path.display())))?;
        all.extend(records.into_iter().filter(|r| r.time_ms >= after));
    }
    Ok(all)
}

pub fn run_on(state: &State, command: &Command, out: &mut dyn Write) -> Result<u8, UsageError> {
    let cluster = state.cluster();
    match command {
        Command::Flows { .. } | Command::Advise { .. } => Err(usage(
            "flows and advise read the agents, not only the state",
        )),
        Command::Explain { live: true, .. } => {
            Err(usage("explain --live reads the agents: use run"))
        }
        Command::Explain {
            from,
            to,
            port,
            protocol,
            output,
            ..
        } => {
            let from = flows::parse_target(cluster, from).map_err(usage)?;
            let to = flows::parse_target(cluster, to).map_err(usage)?;
            let ports = ports_of(cluster, &to, port.as_deref(), protocol.as_deref())?;
            let mut all = Vec::new();
            for (port, protocol) in ports {
                all.push(explain::explain(cluster, &from, &to, port, protocol).map_err(usage)?);
            }
            let allowed = all.iter().all(|e| e.allowed);
            match output {
                Output::Json if all.len() == 1 => json(out, &all[0])?,
                Output::Json => json(out, &all)?,
                Output::Text => {
                    for e in &all {
                        write(out, &explain::render(e))?;
                    }
                }
            }
            Ok(u8::from(!allowed))
        }
        Command::Lint { output } => {
            let findings = lint::lint(cluster);
            match output {
                Output::Json => json(out, &serde_json::json!({ "findings": findings }))?,
                Output::Text => {
                    for f in &findings {
                        write(
                            out,
                            &format!(
                                "{:7} {:22} {} {}: {}\n        fix: {}\n",
                                format!("{:?}", f.severity).to_lowercase(),
                                f.code,
                                f.object,
                                f.field,
                                f.message,
                                f.fix
                            ),
                        )?;
                    }
                    if findings.is_empty() {
                        write(out, "no findings\n")?;
                    }
                }
            }
            Ok(u8::from(
                findings.iter().any(|f| f.severity != lint::Severity::Info),
            ))
        }
        Command::WhatIf {
            apply,
            delete,
            output,
        } => {
            if apply.is_empty() && delete.is_empty() {
                return Err(usage("what-if needs --apply PATH or --delete PATH"));
            }
            let mut after = state.clone();
            let (objects, templates) = state::read_files(apply)?;
            after.templates.extend(templates);
            after.apply(objects);
            if !delete.is_empty() {
                let (gone, _) = state::read_files(delete)?;
                after.delete(&gone);
            }
            let report = whatif::what_if(cluster, after.cluster());
            match output {
                Output::Json => json(out, &report)?,
                Output::Text => {
                    for c in &report.changes {
                        write(
                            out,
                            &format!(
                                "{} -> {} {}/{}: {} -> {}\n",
                                c.from,
                                c.to,
                                c.protocol,
                                c.port,
                                word(c.before),
                                word(c.after)
                            ),
                        )?;
                    }
                    write(
                        out,
                        &format!(
                            "{} flow(s) change ({} judged)\n",
                            report.changes.len(),
                            report.flows_judged
                        ),
                    )?;
                    for (title, b, a) in &report.tables {
                        let left = b.lines();
                        let right = a.lines();
                        let w = left
                            .iter()
                            .map(String::len)
                            .max()
                            .unwrap_or(0)
                            .max(title.len() + 7);
                        write(
                            out,
                            &format!("\n{:w$}    {title} after\n", format!("{title} before")),
                        )?;
                        for (l, r) in left.iter().zip(&right) {
                            write(out, &format!("{l:w$}    {r}\n"))?;
                        }
                    }
                }
            }
            Ok(u8::from(!report.changes.is_empty()))
        }
        Command::Graph { output, namespace } => {
            let g = graph::build(cluster, namespace.as_deref());
            let dot = graph::dot(&g);
            match output {
                GraphOutput::Dot => write(out, &dot)?,
                GraphOutput::Json => json(out, &g)?,
                GraphOutput::Svg | GraphOutput::Png => {
                    let format = if *output == GraphOutput::Svg {
                        "-Tsvg"
                    } else {
                        "-Tpng"
                    };
                    let bytes = render(&dot, format)?;
                    out.write_all(&bytes).map_err(|e| usage(e.to_string()))?;
                }
            }
            Ok(0)
        }
        Command::Test { expect, output } => {
            let text = std::fs::read_to_string(expect)
                .map_err(|e| usage(format!("reading {}: {e}", expect.display())))?;
            let cells =
                expect::parse(&text).map_err(|e| usage(format!("{}: {e}", expect.display())))?;
            let outcome = expect::check(cluster, &cells)
                .map_err(|e| usage(format!("{}: {e}", expect.display())))?;
            match output {
                Output::Json => json(out, &outcome)?,
                Output::Text => {
                    for w in &outcome.wrong {
                        write(
                            out,
                            &format!(
                                "WRONG {} -> {} {}/{}: expected {}, the policies say {}\n",
                                w.from,
                                w.to,
                                w.protocol,
                                w.port,
                                word(w.expected),
                                word(w.actual)
                            ),
                        )?;
                    }
                    write(
                        out,
                        &format!(
                            "{}/{} cells as expected\n",
                            outcome.cells - outcome.wrong.len(),
                            outcome.cells
                        ),
                    )?;
                }
            }
            Ok(u8::from(!outcome.passed))
        }
    }
}

fn word(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "denied" }
}

/// Renders DOT with Graphviz.
fn render(dot: &str, format: &str) -> Result<Vec<u8>, UsageError> {
    let mut child = std::process::Command::new("dot")
        .arg(format)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            usage(format!(
                "running Graphviz `dot` for {format}: {e} (install graphviz, or use -o dot)"
            ))
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(dot.as_bytes())
        .map_err(|e| usage(e.to_string()))?;
    let output = child.wait_with_output().map_err(|e| usage(e.to_string()))?;
    if !output.status.success() {
        return Err(usage(format!(
            "Graphviz `dot {format}` failed: {}",
            output.status
        )));
    }
    Ok(output.stdout)
}

/// The ports to explain on: the given one (a name resolves on the destination pod), or every
/// port the destination declares.
fn ports_of(
    cluster: &crate::model::Cluster,
    to: &flows::Target,
    port: Option<&str>,
    protocol: Option<&str>,
) -> Result<Vec<(u16, Protocol)>, UsageError> {
    let protocol = protocol.map(|p| Protocol::parse(p).expect("clap checked it"));
    let pod = match to {
        flows::Target::Pod(k) => Some(&cluster.pods[k]),
        _ => None,
    };
    match port {
        Some(p) => {
            if let Ok(n) = p.parse::<u16>() {
                return Ok(vec![(n, protocol.unwrap_or(Protocol::Tcp))]);
            }
            let named: Vec<(u16, Protocol)> = pod
                .iter()
                .flat_map(|pod| pod.named_port_fields())
                .filter(|(n, pr, _)| *n == p && protocol.is_none_or(|x| x == *pr))
                .map(|(_, pr, n)| (n, pr))
                .collect();
            if named.is_empty() {
                return Err(usage(format!(
                    "the destination {to} declares no port named {p:?}"
                )));
            }
            Ok(named)
        }
        None => {
            let all: Vec<(u16, Protocol)> = pod
                .map(flows::declared_ports)
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, pr)| protocol.is_none_or(|x| x == *pr))
                .collect();
            if all.is_empty() {
                return Err(usage(format!(
                    "the destination {to} declares no port: give --port"
                )));
            }
            Ok(all)
        }
    }
}
