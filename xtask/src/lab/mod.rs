//! `cargo xtask lab …`: a Kubernetes-shaped cluster of network namespaces running the real agent
//! (the interface is stable: scripts and the conformance suite drive it, so it only ever grows).

mod agent;
mod apply;
mod cluster;
pub mod demo;
mod images;
mod knp;
pub mod kube;

mod net;
mod nodes;
mod objects;
mod probe;
mod query;
mod sctp;
mod serve;
mod services;
mod table;
mod topology;
mod validate;

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

pub use cluster::{AgentChoice, Lab, UpOptions, down, node_cgroups_left};
pub use objects::{Kind, ObjRef, parse_doc, parse_text, read_docs};
pub use probe::{Outcome, Protocol, Via};
pub use query::ProbeSpec;
pub use table::{Table, side_by_side, title};
pub use topology::{Family, IpFamily, network_of};

/// Default name prefix of everything a lab creates.
pub const DEFAULT_PREFIX: &str = "pal";

#[derive(Debug, Args)]
pub struct LabArgs {
    /// Name prefix of everything this lab creates (network namespaces, links, bpffs pins, state);
    /// labs with different prefixes coexist.
    #[arg(long, global = true, env = "LAB_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,

    /// How long `apply`/`delete`/`up` wait for every agent to enforce a change.
    #[arg(
        long,
        global = true,
        env = "LAB_CONVERGE_TIMEOUT_S",
        default_value_t = 30
    )]
    pub converge_timeout_s: u64,

    #[command(subcommand)]
    pub command: LabCommand,
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// N node namespaces + an off-cluster host `ext`; one agent per node.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        /// Run this policy-agent binary instead of building it.
        #[arg(long, conflicts_with = "no_agent")]
        agent_bin: Option<PathBuf>,
        /// No agents: nothing is enforced (a baseline).
        #[arg(long)]
        no_agent: bool,
        /// Where the cluster state lives: the agents' manifest directory, or a real etcd,
        /// kube-apiserver, kube-controller-manager and kube-proxy.
        #[arg(long, value_enum, env = "LAB_API", default_value_t = kube::ApiMode::Manifests)]
        api: kube::ApiMode,
        /// kube-proxy's mode (with `--api kube`).
        #[arg(long, value_enum, env = "LAB_KUBE_PROXY", default_value_t = kube::ProxyMode::Iptables)]
        kube_proxy: kube::ProxyMode,
        /// The CNI chain for pods (with `--api kube`): kindnet's ptp, or flannel's bridge on cni0.
        #[arg(long, value_enum, env = "LAB_CNI", default_value_t = kube::CniShape::Ptp)]
        cni: kube::CniShape,
        /// What enforces NetworkPolicy (with `--api kube`, kube-network-policies may instead).
        #[arg(long, value_enum, default_value_t = kube::Enforcer::PolicyAgent, conflicts_with_all = ["agent_bin", "no_agent"])]
        enforcer: kube::Enforcer,
        /// The address families of every pod, node, Service and `ext`: IPv4, IPv6, or both
        /// (pods with an address of each, IPv4 first; PreferDualStack Services).
        #[arg(long, value_enum, env = "LAB_IP_FAMILY", default_value_t = topology::IpFamily::Ipv4)]
        ip_family: topology::IpFamily,
        /// Real kubelets and containerd on the nodes, and kube-scheduler (with `--api kube`):
        /// pods come from the API server, the agent from the DaemonSet (`kubectl apply -k
        /// deploy/overlays/…`, image `policy-agent:dev` already on every node). `lab probe`
        /// needs the lab's own pods; use `lab kubectl exec` here.
        #[arg(long, conflicts_with_all = ["no_agent", "enforcer"])]
        kubelet: bool,
    },
    /// Create or replace the objects in YAML/JSON files or directories, like `kubectl apply`.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Delete the objects named in those files.
    Delete {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        ignore_not_found: bool,
    },
    /// Show objects: pods, services, namespaces, networkpolicies (or nodes); all when omitted.
    Get {
        resource: Option<String>,
        #[arg(short = 'o', long = "output", value_parser = ["json", "yaml", "wide"])]
        output: Option<String>,
    },
    /// Try connections; prints truth tables (rows = from, columns = to, `.` connected, `X` not).
    Probe {
        #[arg(long)]
        json: bool,
        /// NS/POD, node/NODE or ext (default: every pod).
        #[arg(long)]
        from: Option<String>,
        /// NS/POD or ext (default: every pod).
        #[arg(long)]
        to: Option<String>,
        /// A number or a port name of the destination (default: every declared port).
        #[arg(long)]
        port: Option<String>,
        #[arg(long, value_enum, ignore_case = true)]
        protocol: Option<Protocol>,
        #[arg(long, value_enum, ignore_case = true, default_value_t = Via::Pod)]
        via: Via,
        /// The family of the addresses dialled: 4 or 6 (default: the lab's only family, IPv4
        /// in a dual-stack lab).
        #[arg(long, value_parser = ["4", "6"])]
        family: Option<String>,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// The three-tier example of deploy/examples on a fresh lab of its own (prefix `<prefix>demo`
    /// for the default prefix): expected vs observed connectivity, then teardown.
    Demo {
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        /// Run this policy-agent binary instead of building it.
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// Leave the demo's lab up afterwards.
        #[arg(long)]
        keep: bool,
        /// The demo lab's address families; in a dual-stack lab every table is shown, and must
        /// match, in each family.
        #[arg(long, value_enum, env = "LAB_IP_FAMILY", default_value_t = topology::IpFamily::Ipv4)]
        ip_family: topology::IpFamily,
    },
    /// Show every agent's status (revision enforced, endpoints, errors, source and audit counters).
    Status,
    /// (real-API mode) Stop or start one control-plane component: etcd, kube-apiserver,
    /// kube-controller-manager, kube-proxy-NODE.
    #[command(name = "control-plane")]
    ControlPlane {
        #[arg(value_parser = ["stop", "start"])]
        action: String,
        component: String,
    },
    /// Wait until every agent enforces the lab's current state.
    Wait,
    /// (real-API mode) The real kubectl, as the lab's cluster admin.
    Kubectl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// (real-API mode) Compact etcd's history to its current revision.
    #[command(name = "compact-etcd")]
    CompactEtcd,
    /// Remove every namespace, link, pin and process the lab made (also after a crash).
    Down,
    /// (internal) The responder run inside a pod's network namespace.
    #[command(hide = true)]
    Serve(serve::ServeArgs),
}

/// Probes run at once (each denied probe holds a thread for the whole timeout).
pub const PROBE_PARALLELISM: usize = 256;

pub fn main(args: LabArgs) -> Result<()> {
    // Behave like a Unix tool when the reader goes away (`lab probe | head`).
    // SAFETY: resetting a signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let prefix = args.prefix.as_str();
    let timeout = Duration::from_secs(args.converge_timeout_s);
    match args.command {
        LabCommand::Serve(a) => serve::serve(a),
        LabCommand::Up {
            nodes,
            agent_bin,
            no_agent,
            api,
            kube_proxy,
            cni,
            enforcer,
            kubelet,
            ip_family,
        } => {
            let agent = match (agent_bin, no_agent) {
                _ if enforcer == kube::Enforcer::KubeNetworkPolicies => {
                    AgentChoice::KubeNetworkPolicies
                }
                (_, true) => AgentChoice::None,
                (Some(p), false) => AgentChoice::Binary(p),
                (None, false) => AgentChoice::Build,
            };
            let opts = UpOptions {
                nodes,
                agent,
                api,
                kube_proxy,
                cni,
                kubelet,
                ip_family,
            };
            let mut lab = Lab::up(prefix, &opts)?;
            lab.converge_timeout = timeout;
            let c = match lab.publish() {
                Ok(c) => c,
                Err(e) => {
                    drop(lab);
                    let _ = down(prefix);
                    return Err(e.context("the lab did not come up; everything was removed"));
                }
            };
            println!(
                "lab {prefix:?} is up: {nodes} nodes ({}), off-cluster host ext at {}",
                lab.state.ip_family.as_str(),
                apply::join(&lab.ext_ips())
            );
            if let Some(k) = &lab.state.kube {
                println!(
                    "control plane: kube-apiserver {} at {} (etcd, kube-controller-manager, kube-proxy in {} mode)",
                    k.server_version,
                    kube::api_url(lab.state.ip_family),
                    k.proxy_mode.as_str()
                );
                if k.kubelet {
                    println!(
                        "real nodes: kube-scheduler, and containerd + kubelet on every node; install the agent with \
                         `cargo xtask lab --prefix {prefix} kubectl apply -k deploy/overlays/kind` (image policy-agent:dev is on every node)"
                    );
                }
            }
            print!("{}", lab.get_text(Some(query::Resource::Nodes)));
            println!("{c}");
            Ok(())
        }
        LabCommand::Apply { files } => {
            let docs = read_docs(&files)?;
            let mut lab = Lab::open(prefix)?;
            lab.converge_timeout = timeout;
            if lab.is_kube() {
                // The API server validates and defaults what the user wrote, as given.
                let raw: Vec<(String, serde_json::Value)> =
                    docs.into_iter().map(|d| (d.source, d.value)).collect();
                lab.kube_apply(&raw)?.print();
            } else {
                lab.apply(load_all(&docs)?)?.print();
            }
            Ok(())
        }
        LabCommand::Delete {
            files,
            ignore_not_found,
        } => {
            let docs = read_docs(&files)?;
            let mut refs = Vec::new();
            let mut errors = Vec::new();
            for d in &docs {
                match objects::doc_ref(d) {
                    Ok(r) => refs.push(r),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            if !errors.is_empty() {
                bail!("nothing was deleted:\n  {}", errors.join("\n  "));
            }
            let mut lab = Lab::open(prefix)?;
            lab.converge_timeout = timeout;
            lab.delete(refs, ignore_not_found)?.print();
            Ok(())
        }
        LabCommand::Get { resource, output } => {
            let what = resource
                .as_deref()
                .map(query::Resource::parse)
                .transpose()?;
            let lab = Lab::open(prefix)?;
            match output.as_deref() {
                Some("json") => println!("{}", serde_json::to_string_pretty(&lab.get_json(what))?),
                Some("yaml") => print!("{}", serde_yaml::to_string(&lab.get_json(what))?),
                _ => print!("{}", lab.get_text(what)),
            }
            Ok(())
        }
        LabCommand::Probe {
            json,
            from,
            to,
            port,
            protocol,
            via,
            family,
            timeout_ms,
        } => {
            let lab = Lab::open(prefix)?;
            let spec = ProbeSpec {
                from,
                to,
                port,
                protocol,
                via,
                family: family.as_deref().map(topology::Family::parse).transpose()?,
            };
            let outcomes = lab.probe(&spec, Duration::from_millis(timeout_ms))?;
            if json {
                #[derive(serde::Serialize)]
                struct Probes<'a> {
                    probes: &'a [Outcome],
                }
                println!("{}", serde_json::to_string(&Probes { probes: &outcomes })?);
            } else {
                for ((proto, port, via), t) in table::from_outcomes(&outcomes) {
                    println!("{}:", title(proto, port, via));
                    for line in t.lines() {
                        println!("{line}");
                    }
                    println!();
                }
            }
            Ok(())
        }
        LabCommand::Demo {
            nodes,
            agent_bin,
            keep,
            ip_family,
        } => {
            let prefix = if prefix == DEFAULT_PREFIX {
                demo::DemoArgs::default().prefix
            } else {
                prefix.to_string()
            };
            demo::run(&demo::DemoArgs {
                nodes,
                prefix,
                agent_bin,
                keep,
                ip_family,
            })
        }
        LabCommand::Status => {
            let lab = Lab::open(prefix)?;
            println!("lab {prefix:?}: revision {}", lab.state.revision);
            for a in lab.agents() {
                let st = net::in_netns(&a.netns, || agent::status(a.addr))?;
                match st {
                    Ok(s) => {
                        println!(
                            "{} ({}): enforced revision {} (read {}), {} endpoints, errors: {}",
                            a.node,
                            s.node,
                            s.enforced_revision,
                            s.revision,
                            s.endpoints,
                            if s.errors.is_empty() {
                                "none".into()
                            } else {
                                serde_json::to_string(&s.errors)?
                            }
                        );
                        let (code, ready) = net::in_netns(&a.netns, || {
                            agent::http_get(a.addr, "/readyz", Duration::from_millis(500))
                        })??;
                        println!("  readyz: {code} {}", ready.trim());
                        let (_, metrics) = net::in_netns(&a.netns, || {
                            agent::http_get(a.addr, "/metrics", Duration::from_millis(500))
                        })??;
                        for line in metrics.lines().filter(|l| {
                            l.starts_with("policy_agent_source_")
                                || l.starts_with("policy_agent_enforced_revision")
                                || l.starts_with("policy_agent_audit_verdicts_total")
                        }) {
                            println!("  {line}");
                        }
                    }
                    Err(e) => println!("{}: {e:#}", a.node),
                }
            }
            Ok(())
        }
        LabCommand::Wait => {
            let mut lab = Lab::open(prefix)?;
            lab.converge_timeout = timeout;
            println!("{}", lab.publish()?);
            Ok(())
        }
        LabCommand::Kubectl { args } => {
            let lab = Lab::open(prefix)?;
            if !lab.is_kube() {
                bail!("this lab has no API server (it was brought up with --api manifests)");
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            print!("{}", lab.kubectl(&args, None)?);
            Ok(())
        }
        LabCommand::ControlPlane { action, component } => {
            let mut lab = Lab::open(prefix)?;
            lab.converge_timeout = timeout;
            println!("{}", lab.control_plane(action == "start", &component)?);
            Ok(())
        }
        LabCommand::CompactEtcd => {
            let lab = Lab::open(prefix)?;
            println!("etcd compacted at revision {}", lab.compact_etcd()?);
            Ok(())
        }
        LabCommand::Down => {
            let removed = down(prefix)?;
            if removed.is_empty() {
                println!("lab {prefix:?} was not up; nothing to remove");
            } else {
                println!("lab {prefix:?} is down: removed {}", removed.summary());
            }
            Ok(())
        }
    }
}

/// Parses and validates every document; all errors at once, nothing applied on any error.
pub fn load_all(docs: &[objects::Doc]) -> Result<Vec<objects::Loaded>> {
    let mut loaded = Vec::new();
    let mut errors = Vec::new();
    for d in docs {
        match parse_doc(d) {
            Ok(l) => loaded.push(l),
            Err(e) => errors.push(format!("{e:#}")),
        }
    }
    if !errors.is_empty() {
        bail!("nothing was applied:\n{}", errors.join("\n"));
    }
    if loaded.is_empty() {
        bail!("no objects found");
    }
    Ok(loaded)
}

impl Lab {
    /// Plans and runs probes.
    pub fn probe(&self, spec: &ProbeSpec, timeout: Duration) -> Result<Vec<Outcome>> {
        let jobs = self.plan_probes(spec)?;
        probe::run(&jobs, timeout, PROBE_PARALLELISM)
    }

    /// Runs already planned probes (the conformance suite batches several matrices).
    pub fn run_probes(&self, specs: &[ProbeSpec], timeout: Duration) -> Result<Vec<Outcome>> {
        let mut jobs = Vec::new();
        for s in specs {
            jobs.extend(self.plan_probes(s)?);
        }
        probe::run(&jobs, timeout, PROBE_PARALLELISM)
    }
}
