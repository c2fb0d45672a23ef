//! `cargo xtask conformance`: the 48 connectivity tests of the upstream Kubernetes Netpol e2e suite
//! (`test/e2e/network/netpol`, catalogued in `xtask/conformance/netpol_cases.{md,json}`) run on the
//! lab with the real agent.
//!
//! Each case starts from fresh namespaces x, y, z with the case's pods (`pod=<name>` labels, one
//! container per served port × protocol, named ports `serve-<port>-<proto>`) and one Service per pod
//! (`s-<ns>-<pod>`), checks that every server answers (upstream's `waitForHTTPServers`), then for
//! each step applies its actions (policy create/update, pod and namespace relabels, policy
//! deletion) through `lab apply`/`lab delete` — which return once every agent enforces them — and
//! probes the full matrix of the step's port and protocol twice: through the destination's Service
//! ClusterIP, as upstream does, and through its pod IP. Loopback is never judged (upstream ignores
//! it). A wrong matrix is probed once more before it counts, as upstream's `ValidateOrFail` does.
//! A case that cannot run is a failure with its reason, never a skip.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::lab::{
    self, AgentChoice, Family, Kind, Lab, ObjRef, Outcome, ProbeSpec, Protocol, Table, UpOptions,
    Via,
};

/// The catalogue shipped with the repository.
const CASES: &str = include_str!("../conformance/netpol_cases.json");

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only these case ids (repeatable); default: all 48.
    #[arg(long = "case")]
    pub cases: Vec<u32>,
    /// Pod set per case: the newest upstream's reduced sets, or the older full 9-pod model.
    #[arg(long, value_parser = ["reduced", "all9"], default_value = "reduced")]
    pub pods: String,
    /// Lab nodes (pods are spread over them, so both same-node and cross-node paths are judged).
    #[arg(long, default_value_t = 2)]
    pub nodes: u32,
    /// Name prefix of the lab this suite brings up (and down).
    #[arg(long, default_value = "palconf")]
    pub prefix: String,
    /// Run this policy-agent binary instead of building it.
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// Probe timeout (upstream: agnhost connect --timeout=1s).
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Read the catalogue from this file instead of the built-in copy.
    #[arg(long)]
    pub catalogue: Option<PathBuf>,
    /// Leave the lab up afterwards (inspect it with `cargo xtask lab --prefix PREFIX ...`).
    #[arg(long)]
    pub keep: bool,
    /// Where the lab's cluster state lives (`kube`: a real API server, controller manager and
    /// kube-proxy).
    #[arg(long, value_enum, env = "LAB_API", default_value_t = crate::lab::kube::ApiMode::Manifests)]
    pub api: crate::lab::kube::ApiMode,
    /// kube-proxy's mode with `--api kube`.
    #[arg(long, value_enum, env = "LAB_KUBE_PROXY", default_value_t = crate::lab::kube::ProxyMode::Iptables)]
    pub kube_proxy: crate::lab::kube::ProxyMode,
    /// The CNI chain with `--api kube`: kindnet's ptp, or flannel's bridge on cni0.
    #[arg(long, value_enum, env = "LAB_CNI", default_value_t = crate::lab::kube::CniShape::Ptp)]
    pub cni: crate::lab::kube::CniShape,
    /// After each step's probes, ask every agent to explain every cell from its kernel maps
    /// (`policy-agent control explain`): each direction must agree with the evaluator, and the
    /// verdict with the expected cell.
    #[arg(long)]
    pub live_explain: bool,
    /// What enforces (with `--api kube`): policy-agent, or the reference implementation.
    #[arg(long, value_enum, default_value_t = crate::lab::kube::Enforcer::PolicyAgent)]
    pub enforcer: crate::lab::kube::Enforcer,
    /// The lab's address families. Every matrix is probed in each family of the lab (pod IPs
    /// and ClusterIPs of that family); ipBlock CIDRs come from the pods' addresses of the
    /// family probed, and in a dual-stack lab an ipBlock peer is written once per family.
    #[arg(long, value_enum, env = "LAB_IP_FAMILY", default_value_t = Default::default())]
    pub ip_family: crate::lab::IpFamily,
}

#[derive(Debug, Deserialize)]
struct Catalogue {
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    id: u32,
    describe: String,
    name: String,
    pods_reduced: Vec<String>,
    ports: Vec<u16>,
    protocols: Vec<String>,
    steps: Vec<Step>,
    computed_denied_non_loopback: BTreeMap<String, Vec<Computed>>,
}

#[derive(Debug, Deserialize)]
struct Step {
    actions: Vec<Value>,
    probes: Vec<ProbeCheck>,
}

#[derive(Debug, Deserialize)]
struct ProbeCheck {
    port: u16,
    protocol: String,
    expect_ops: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct Computed {
    step: usize,
    port: u16,
    protocol: String,
    denied: Vec<String>,
}

const ALL9: [&str; 9] = [
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];
const NAMESPACES: [&str; 3] = ["x", "y", "z"];

/// The result of one case.
#[derive(Debug, Default)]
struct CaseResult {
    /// Wrong cells and other reasons, per way of dialling; empty = passed.
    service_failures: Vec<String>,
    pod_failures: Vec<String>,
    /// Problems that are neither (setup, actions).
    errors: Vec<String>,
    /// Matrices that needed the second pass.
    retried: Vec<String>,
    converge_ms: Vec<u128>,
    /// Flows explained from the kernel maps (`--live-explain`), and how many of them disagreed.
    live_compared: usize,
    live_wrong: usize,
}

impl CaseResult {
    fn passed_via(&self, via: Via) -> bool {
        self.errors.is_empty()
            && match via {
                Via::Service => self.service_failures.is_empty(),
                Via::Pod => self.pod_failures.is_empty(),
            }
    }
    fn passed(&self) -> bool {
        self.passed_via(Via::Service) && self.passed_via(Via::Pod)
    }
}

pub fn main(args: Args) -> Result<()> {
    let text = match &args.catalogue {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => CASES.to_string(),
    };
    let catalogue: Catalogue = serde_json::from_str(&text).context("parsing the case catalogue")?;
    let total = catalogue.cases.len();
    let selected: Vec<&Case> = catalogue
        .cases
        .iter()
        .filter(|c| args.cases.is_empty() || args.cases.contains(&c.id))
        .collect();
    if selected.is_empty() {
        bail!("no case matches --case {:?}", args.cases);
    }
    let agent = match (&args.agent_bin, args.enforcer) {
        (_, crate::lab::kube::Enforcer::KubeNetworkPolicies) => AgentChoice::KubeNetworkPolicies,
        (Some(p), _) => AgentChoice::Binary(p.clone()),
        (None, _) => AgentChoice::Build,
    };
    let started = Instant::now();
    // The suite's lab is its own: whatever an interrupted earlier run left goes first.
    lab::down(&args.prefix)?;
    let mut lab = Lab::up(
        &args.prefix,
        &UpOptions {
            nodes: args.nodes,
            agent,
            api: args.api,
            kube_proxy: args.kube_proxy,
            cni: args.cni,
            kubelet: false,
            ip_family: args.ip_family,
        },
    )?;
    let mut cases_took = Duration::ZERO;
    let outcome = (|| -> Result<Vec<(u32, CaseResult)>> {
        lab.publish().context("the lab's agents did not come up")?;
        println!(
            "lab {:?} up with {} nodes and their agents in {:.1} s (including building the agent)",
            args.prefix,
            args.nodes,
            started.elapsed().as_secs_f64()
        );
        match &lab.state.kube {
            Some(k) => println!(
                "cluster state in a real kube-apiserver {}; Services through the real kube-proxy in {} mode",
                k.server_version,
                k.proxy_mode.as_str()
            ),
            None => println!(
                "cluster state in the agents' manifest directory; Services through the lab's nftables DNAT"
            ),
        }
        println!(
            "address families: {} (probed: {})",
            args.ip_family.as_str(),
            families(&lab)
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let cases_started = Instant::now();
        let timeout = Duration::from_millis(args.timeout_ms);
        let mut results = Vec::new();
        for case in &selected {
            let t = Instant::now();
            println!("[{:>2}] {} / {}", case.id, case.describe, case.name);
            let r = run_case(&mut lab, case, &args.pods, timeout, args.live_explain);
            report_case(&r, t.elapsed());
            results.push((case.id, r));
        }
        cases_took = cases_started.elapsed();
        Ok(results)
    })();
    let control_plane = match &lab.state.kube {
        Some(k) => format!(
            "real kube-apiserver {}, kube-proxy in {} mode, enforced by {}",
            k.server_version,
            k.proxy_mode.as_str(),
            if k.peer_enforcer {
                "kube-network-policies"
            } else {
                "policy-agent"
            }
        ),
        None => "manifest directory, lab DNAT".to_string(),
    };
    let control_plane = format!("{control_plane}, {}", args.ip_family.as_str());
    drop(lab);
    if !args.keep {
        lab::down(&args.prefix)?;
    } else {
        println!(
            "the lab is still up: cargo xtask lab --prefix {} get",
            args.prefix
        );
    }
    let results = outcome?;
    let passed = results.iter().filter(|(_, r)| r.passed()).count();
    let via_service = results
        .iter()
        .filter(|(_, r)| r.passed_via(Via::Service))
        .count();
    let via_pod = results
        .iter()
        .filter(|(_, r)| r.passed_via(Via::Pod))
        .count();
    let mut converge: Vec<u128> = results
        .iter()
        .flat_map(|(_, r)| r.converge_ms.iter().copied())
        .collect();
    converge.sort_unstable();
    let pct = |p: f64| {
        converge
            .get(((converge.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    println!();
    if results.len() < total {
        println!("(ran {} of {total} cases)", results.len());
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, r)| !r.passed())
        .map(|(id, _)| id.to_string())
        .collect();
    if !failed.is_empty() {
        println!("failed cases: {}", failed.join(", "));
    }
    println!(
        "via Service ClusterIP: {via_service}/{n}, via pod IP: {via_pod}/{n} ({control_plane})",
        n = results.len()
    );
    println!(
        "policy/label changes enforced by every agent in p50 {} ms, p99 {} ms, max {} ms ({} changes); cases took {:.1} s, {:.1} s in all",
        pct(0.5),
        pct(0.99),
        converge.last().copied().unwrap_or(0),
        converge.len(),
        cases_took.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    if args.live_explain {
        let compared: usize = results.iter().map(|(_, r)| r.live_compared).sum();
        let wrong: usize = results.iter().map(|(_, r)| r.live_wrong).sum();
        println!(
            "explain --live: {} of {compared} flows explained from the kernel maps agree with the evaluator and the expected verdict",
            compared - wrong
        );
    }
    println!(
        "{passed}/{} cases passed",
        if results.len() == total {
            total
        } else {
            results.len()
        }
    );
    if passed != results.len() {
        bail!(
            "{} of {} conformance cases failed",
            results.len() - passed,
            results.len()
        );
    }
    Ok(())
}

fn report_case(r: &CaseResult, took: Duration) {
    let verdict = if r.passed() { "ok" } else { "FAILED" };
    println!("     {verdict} in {:.1} s", took.as_secs_f64());
    for e in &r.errors {
        println!("     error: {e}");
    }
    for (via, fs) in [
        ("Service", &r.service_failures),
        ("pod IP", &r.pod_failures),
    ] {
        for f in fs {
            println!("     wrong via {via}: {f}");
        }
    }
    for m in &r.retried {
        println!("     note: {m} was wrong on the first pass and right on the second");
    }
}

fn pods_of(case: &Case, model: &str) -> Vec<String> {
    if model == "all9" {
        ALL9.iter().map(|s| s.to_string()).collect()
    } else {
        case.pods_reduced.clone()
    }
}

fn run_case(lab: &mut Lab, case: &Case, model: &str, timeout: Duration, live: bool) -> CaseResult {
    let mut r = CaseResult::default();
    let pods = pods_of(case, model);
    if let Err(e) = setup(lab, case, &pods, timeout, &mut r) {
        r.errors.push(format!("setup: {e:#}"));
        return r;
    }
    let computed = case
        .computed_denied_non_loopback
        .get(model)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, step) in case.steps.iter().enumerate() {
        let n = i + 1;
        for action in &step.actions {
            if let Err(e) = act(lab, action, &mut r) {
                r.errors.push(format!("step {n}: {action}: {e:#}"));
                return r;
            }
        }
        match check_step(lab, n, step, &pods, computed, timeout, &mut r) {
            Err(e) => {
                r.errors.push(format!("step {n}: {e:#}"));
                return r;
            }
            Ok(expected) if live => {
                if let Err(e) = check_live(lab, n, &expected, &mut r) {
                    r.errors.push(format!("step {n}: explain --live: {e:#}"));
                    return r;
                }
            }
            Ok(_) => {}
        }
    }
    r
}

fn proto_lower(p: &str) -> String {
    p.to_lowercase()
}

/// Fresh namespaces, pods and Services for a case; then every server must answer.
fn setup(
    lab: &mut Lab,
    case: &Case,
    pods: &[String],
    timeout: Duration,
    r: &mut CaseResult,
) -> Result<()> {
    let old: Vec<ObjRef> = NAMESPACES
        .iter()
        .map(|ns| ObjRef {
            kind: Kind::Namespace,
            namespace: String::new(),
            name: ns.to_string(),
        })
        .collect();
    if let Some(c) = lab.delete(old, true)?.converged {
        r.converge_ms.extend(c.took.map(|t| t.as_millis()));
    }
    let mut docs = Vec::new();
    for ns in NAMESPACES {
        docs.push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
    }
    for key in pods {
        let (ns, name) = key
            .split_once('/')
            .ok_or_else(|| anyhow!("bad pod {key:?}"))?;
        let mut containers = Vec::new();
        let mut svc_ports = Vec::new();
        for port in &case.ports {
            for proto in &case.protocols {
                let p = proto_lower(proto);
                containers.push(json!({
                    "name": format!("cont-{port}-{p}"),
                    "image": "registry.k8s.io/e2e-test-images/agnhost:2.53",
                    "ports": [{"containerPort": port, "name": format!("serve-{port}-{p}"), "protocol": proto}]
                }));
                svc_ports.push(json!({"name": format!("service-port-{p}-{port}"), "port": port, "protocol": proto}));
            }
        }
        docs.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
            "spec": {"terminationGracePeriodSeconds": 0, "containers": containers}}));
        docs.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("s-{ns}-{name}"), "namespace": ns},
            "spec": {"selector": {"pod": name}, "ports": svc_ports}}));
    }
    apply_values(lab, &docs, r)?;
    // waitForHTTPServers: up to 10 rounds, 1 s apart, until every cell answers.
    let mut specs = Vec::new();
    for port in &case.ports {
        for proto in &case.protocols {
            let protocol =
                Protocol::parse(proto).ok_or_else(|| anyhow!("unknown protocol {proto}"))?;
            for via in [Via::Service, Via::Pod] {
                for &family in families(lab) {
                    specs.push(ProbeSpec {
                        port: Some(port.to_string()),
                        protocol: Some(protocol),
                        via,
                        family: Some(family),
                        ..Default::default()
                    });
                }
            }
        }
    }
    let mut silent = Vec::new();
    for round in 0..10 {
        if round > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let outcomes = lab.run_probes(&specs, timeout)?;
        silent = outcomes
            .iter()
            .filter(|o| !o.connected)
            .map(|o| {
                format!(
                    "{} -> {} ({}) {}/{} via {}",
                    o.from,
                    o.to,
                    o.to_ip,
                    o.protocol,
                    o.port,
                    o.via.as_str()
                )
            })
            .collect();
        if silent.is_empty() {
            return Ok(());
        }
    }
    bail!(
        "servers unreachable before any policy exists: {}",
        silent.join(", ")
    )
}

fn apply_values(lab: &mut Lab, docs: &[Value], r: &mut CaseResult) -> Result<()> {
    let mut text = String::new();
    for d in docs {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(d)?);
    }
    let loaded = lab::load_all(&lab::parse_text("<conformance>", &text)?)?;
    if let Some(c) = lab.apply(loaded)?.converged {
        r.converge_ms.extend(c.took.map(|t| t.as_millis()));
        for w in c.warnings {
            eprintln!("     warning: {w}");
        }
    }
    Ok(())
}

/// Runs one catalogue action.
fn act(lab: &mut Lab, action: &Value, r: &mut CaseResult) -> Result<()> {
    let op = action["op"].as_str().unwrap_or_default();
    match op {
        "create" | "update" => {
            let ns = action["namespace"]
                .as_str()
                .ok_or_else(|| anyhow!("no namespace"))?;
            let name = action["name"].as_str().ok_or_else(|| anyhow!("no name"))?;
            let spec =
                ip_blocks_per_family(&action["spec"], families(lab), &|key, f| lab.pod_ip(key, f))?;
            let exists = lab.state.policies.contains_key(&format!("{ns}/{name}"));
            if op == "create" && exists {
                bail!("policy {ns}/{name} already exists");
            }
            if op == "update" && !exists {
                bail!("policy {ns}/{name} does not exist");
            }
            apply_values(
                lab,
                &[
                    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": name, "namespace": ns}, "spec": spec}),
                ],
                r,
            )
        }
        "add_pod_labels" => {
            let key = action["pod"].as_str().ok_or_else(|| anyhow!("no pod"))?;
            let mut pod = lab
                .state
                .pods
                .get(key)
                .ok_or_else(|| anyhow!("no pod {key}"))?
                .pod
                .clone();
            let labels = pod.metadata.labels.get_or_insert_with(Default::default);
            for (k, v) in action["labels"].as_object().into_iter().flatten() {
                labels.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
            }
            pod.status = None;
            let mut v = serde_json::to_value(&pod)?;
            v["apiVersion"] = json!("v1");
            v["kind"] = json!("Pod");
            apply_values(lab, &[v], r)
        }
        "add_namespace_labels" => {
            let name = action["namespace"]
                .as_str()
                .ok_or_else(|| anyhow!("no namespace"))?;
            let ns = lab
                .state
                .namespaces
                .get(name)
                .ok_or_else(|| anyhow!("no namespace {name}"))?;
            let mut labels = ns.metadata.labels.clone().unwrap_or_default();
            for (k, v) in action["labels"].as_object().into_iter().flatten() {
                labels.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
            }
            apply_values(
                lab,
                &[
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}),
                ],
                r,
            )
        }
        "delete_all_policies" => {
            let refs: Vec<ObjRef> = lab
                .state
                .policies
                .keys()
                .filter_map(|k| k.split_once('/'))
                .filter(|(ns, _)| NAMESPACES.contains(ns))
                .map(|(ns, name)| ObjRef {
                    kind: Kind::NetworkPolicy,
                    namespace: ns.into(),
                    name: name.into(),
                })
                .collect();
            if let Some(c) = lab.delete(refs, false)?.converged {
                r.converge_ms.extend(c.took.map(|t| t.as_millis()));
            }
            if let Some(s) = action["then_sleep_s"].as_u64() {
                std::thread::sleep(Duration::from_secs(s));
            }
            Ok(())
        }
        other => bail!("unknown action {other:?}"),
    }
}

/// Resolves a policy spec's placeholders for the lab's families. Single-stack: from the pods'
/// addresses of that family. Dual-stack: every ipBlock peer that holds a placeholder becomes one
/// peer per family, each resolved from that family's addresses — an IPv4 block never matches an
/// IPv6 address, so each family's probes see exactly the verdicts of the single-stack policy.
fn ip_blocks_per_family(
    v: &Value,
    families: &[Family],
    ip_of: &dyn Fn(&str, Family) -> Option<IpAddr>,
) -> Result<Value> {
    let resolve = |x: &Value, f: Family| resolve_placeholders(x, &|k| ip_of(k, f));
    Ok(match v {
        Value::Array(a) => {
            let mut out = Vec::new();
            for x in a {
                let templated = x.get("ipBlock").is_some() && x.to_string().contains('<');
                if templated {
                    for &f in families {
                        out.push(resolve(x, f)?);
                    }
                } else {
                    out.push(ip_blocks_per_family(x, families, ip_of)?);
                }
            }
            Value::Array(out)
        }
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), ip_blocks_per_family(x, families, ip_of)?)))
                .collect::<Result<_>>()?,
        ),
        other => resolve(other, families[0])?,
    })
}

/// Replaces the catalogue's run-time placeholders: `<podIP of NS/POD>/32 (/128 if IPv6)` and
/// `<the /N network containing NS/POD's podIP, …>` (upstream's `makeLargeCIDRForIP`: the masked
/// network). Any other placeholder is an error.
fn resolve_placeholders(v: &Value, ip_of: &dyn Fn(&str) -> Option<IpAddr>) -> Result<Value> {
    Ok(match v {
        Value::String(s) if s.contains('<') => Value::String(resolve_str(s, ip_of)?),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| resolve_placeholders(x, ip_of))
                .collect::<Result<_>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| Ok((k.clone(), resolve_placeholders(x, ip_of)?)))
                .collect::<Result<_>>()?,
        ),
        other => other.clone(),
    })
}

fn resolve_str(s: &str, ip_of: &dyn Fn(&str) -> Option<IpAddr>) -> Result<String> {
    let start = s.find('<').expect("has a placeholder");
    let end = s[start..]
        .find('>')
        .map(|e| start + e)
        .ok_or_else(|| anyhow!("unterminated placeholder in {s:?}"))?;
    let inner = &s[start + 1..end];
    let pod_ip = |key: &str| ip_of(key).ok_or_else(|| anyhow!("placeholder {s:?}: no pod {key}"));
    let mut v6 = false;
    let value = if let Some(rest) = inner.strip_prefix("podIP of ") {
        let ip = pod_ip(rest.trim())?;
        v6 = ip.is_ipv6();
        ip.to_string()
    } else if let Some(rest) = inner.strip_prefix("the /") {
        let (len, rest) = rest
            .split_once(' ')
            .ok_or_else(|| anyhow!("placeholder {s:?}"))?;
        let len: u8 = len
            .parse()
            .map_err(|_| anyhow!("placeholder {s:?}: bad prefix length"))?;
        let key = rest
            .strip_prefix("network containing ")
            .and_then(|r| r.split_once("'s podIP"))
            .map(|(k, _)| k)
            .ok_or_else(|| anyhow!("placeholder {s:?} not understood"))?;
        lab::network_of(pod_ip(key)?, len).to_string()
    } else {
        bail!("placeholder {s:?} not understood");
    };
    // The catalogue's remark on IPv6 ("<podIP of …>/32 (/128 if IPv6)") picks the host mask.
    let rest = &s[end + 1..];
    let mut tail = rest.split(" (").next().unwrap_or_default().to_string();
    if v6 && rest.contains("(/128 if IPv6)") {
        tail = tail.replacen("/32", "/128", 1);
    }
    let out = format!("{}{value}{tail}", &s[..start]);
    if out.contains('<') {
        resolve_str(&out, ip_of)
    } else {
        Ok(out)
    }
}

/// Upstream's reachability helpers on a fresh all-allowed `pods × pods` table (loopback left out).
fn expected_table(pods: &[String], ops: &[Value]) -> Result<Table> {
    let mut t = Table::new(pods.to_vec(), pods.to_vec());
    for f in pods {
        for to in pods {
            if f != to {
                t.set(f, to, true);
            }
        }
    }
    let peer = |v: &Value| -> (Option<String>, Option<String>) {
        (
            v[0].as_str().map(String::from),
            v[1].as_str().map(String::from),
        )
    };
    let matches = |p: &(Option<String>, Option<String>), key: &str| {
        let (ns, name) = key.split_once('/').unwrap_or_default();
        p.0.as_deref().is_none_or(|x| x == ns) && p.1.as_deref().is_none_or(|x| x == name)
    };
    for op in ops {
        let kind = op[0].as_str().unwrap_or_default();
        let cells: Vec<(String, String)> = match kind {
            "P" => {
                let (from, to) = (peer(&op[1]), peer(&op[2]));
                t.cells
                    .keys()
                    .filter(|(f, d)| matches(&from, f) && matches(&to, d))
                    .cloned()
                    .collect()
            }
            "AI" => t
                .cells
                .keys()
                .filter(|(_, d)| op[1].as_str() == Some(d))
                .cloned()
                .collect(),
            "AE" => t
                .cells
                .keys()
                .filter(|(f, _)| op[1].as_str() == Some(f))
                .cloned()
                .collect(),
            "E" => t
                .cells
                .keys()
                .filter(|(f, d)| op[1].as_str() == Some(f) && op[2].as_str() == Some(d))
                .cloned()
                .collect(),
            other => bail!("unknown expectation {other:?}"),
        };
        let allowed = op
            .as_array()
            .and_then(|a| a.last())
            .and_then(Value::as_bool)
            .ok_or_else(|| anyhow!("bad op {op}"))?;
        for (f, d) in cells {
            t.set(&f, &d, allowed);
        }
    }
    Ok(t)
}

/// Probes every matrix of a step via Services and via pod IPs and compares with the expectation.
fn check_step(
    lab: &Lab,
    n: usize,
    step: &Step,
    pods: &[String],
    computed: &[Computed],
    timeout: Duration,
    r: &mut CaseResult,
) -> Result<Vec<(u16, Protocol, Table)>> {
    let mut expected = Vec::new();
    let mut specs = Vec::new();
    for pc in &step.probes {
        let protocol = Protocol::parse(&pc.protocol)
            .ok_or_else(|| anyhow!("unknown protocol {}", pc.protocol))?;
        let want = expected_table(pods, &pc.expect_ops)?;
        // The catalogue's machine-checked denied pairs must agree with the edits (for the newest
        // pod sets the edits are exact; the older 9-pod model has a few extra edits upstream).
        if let Some(c) = computed
            .iter()
            .find(|c| c.step == n && c.port == pc.port && c.protocol == pc.protocol)
        {
            let denied: Vec<String> = want
                .cells
                .iter()
                .filter(|(_, v)| !**v)
                .map(|((f, t), _)| format!("{f}->{t}"))
                .collect();
            let mut listed = c.denied.clone();
            listed.sort();
            let mut mine = denied.clone();
            mine.sort();
            if listed != mine {
                // Trust the catalogue's computed list (it encodes the older model's extra edits).
                let mut t = want.clone();
                for v in t.cells.values_mut() {
                    *v = true;
                }
                for pair in &c.denied {
                    let (f, d) = pair
                        .split_once("->")
                        .ok_or_else(|| anyhow!("bad pair {pair}"))?;
                    t.set(f, d, false);
                }
                expected.push((pc.port, protocol, t));
            } else {
                expected.push((pc.port, protocol, want));
            }
        } else {
            expected.push((pc.port, protocol, want));
        }
        for via in [Via::Service, Via::Pod] {
            for &family in families(lab) {
                specs.push(ProbeSpec {
                    port: Some(pc.port.to_string()),
                    protocol: Some(protocol),
                    via,
                    family: Some(family),
                    ..Default::default()
                });
            }
        }
    }
    let mut outcomes = lab.run_probes(&specs, timeout)?;
    let mut first = compare(&expected, &outcomes, families(lab));
    if first.values().any(|w| !w.is_empty()) {
        outcomes = lab.run_probes(&specs, timeout)?;
        let second = compare(&expected, &outcomes, families(lab));
        for (k, wrong) in &first {
            if !wrong.is_empty() && second.get(k).is_some_and(Vec::is_empty) {
                r.retried.push(format!(
                    "step {n} {}/{} via {} {}",
                    k.1,
                    k.0,
                    k.2.as_str(),
                    k.3
                ));
            }
        }
        first = second;
    }
    for ((port, protocol, via, family), wrong) in first {
        if wrong.is_empty() {
            continue;
        }
        let want = &expected
            .iter()
            .find(|e| e.0 == port && e.1 == protocol)
            .expect("expected")
            .2;
        let got = observed(want, &outcomes, (port, protocol, via, family));
        let tables = lab::side_by_side(("expected", want), ("observed", &got));
        let msg = format!(
            "step {n} {protocol}/{port} {family}: {}\n       {}",
            wrong.join(", "),
            tables.trim_end().replace('\n', "\n       ")
        );
        match via {
            Via::Service => r.service_failures.push(msg),
            Via::Pod => r.pod_failures.push(msg),
        }
    }
    Ok(expected)
}

/// `--live-explain`: every cell of the step explained by every agent from its kernel maps. The
/// nodes hosting the ends answer one direction each; each must agree with the agent's evaluator,
/// and both together with the expected cell. A disagreement is a failure of the case.
fn check_live(
    lab: &Lab,
    n: usize,
    expected: &[(u16, Protocol, Table)],
    r: &mut CaseResult,
) -> Result<()> {
    let bin = lab
        .state
        .agent_bin
        .clone()
        .ok_or_else(|| anyhow!("the lab runs no agent binary of its own"))?;
    let sockets: Vec<PathBuf> = lab
        .state
        .nodes
        .iter()
        .map(|node| lab.paths.control_socket(&node.name))
        .collect();
    for (port, protocol, want) in expected {
        for ((from, to), allowed) in &want.cells {
            if from == to {
                continue;
            }
            let mut directions = Vec::new();
            for socket in &sockets {
                let out = std::process::Command::new(&bin)
                    .arg("control")
                    .arg("--control-socket")
                    .arg(socket)
                    .args(["explain", "--from", from, "--to", to])
                    .args(["--port", &port.to_string(), "--protocol", protocol.as_str()])
                    .output()
                    .with_context(|| format!("running {}", bin.display()))?;
                if !out.status.success() {
                    bail!(
                        "{from} -> {to} {protocol}/{port} at {}: {}",
                        socket.display(),
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                let v: Value = serde_json::from_slice(&out.stdout)
                    .with_context(|| format!("the answer of {}", socket.display()))?;
                directions.extend(v["directions"].as_array().cloned().unwrap_or_default());
            }
            r.live_compared += 1;
            let kernel_allows = directions.iter().all(|d| d["kernel"]["allowed"] == true);
            let agree = directions.iter().all(|d| d["agrees"] == true);
            if directions.len() != 2 || !agree || kernel_allows != *allowed {
                r.live_wrong += 1;
                r.errors.push(format!(
                    "step {n} explain --live {from} -> {to} {protocol}/{port}: expected {}, the kernel maps say {}, {} direction(s), evaluator agreement {agree}: {}",
                    if *allowed { "allowed" } else { "denied" },
                    if kernel_allows { "allowed" } else { "denied" },
                    directions.len(),
                    serde_json::to_string(&directions).unwrap_or_default()
                ));
            }
        }
    }
    Ok(())
}

/// One matrix as probed: port, protocol, way of dialling, family of the addresses dialled.
type Matrix = (u16, Protocol, Via, Family);
type Wrong = BTreeMap<Matrix, Vec<String>>;

/// The families a case is probed in: every family of the lab.
fn families(lab: &Lab) -> &'static [Family] {
    lab.state.ip_family.families()
}

/// The family of the address a probe dialled.
fn family_of(o: &Outcome) -> Option<Family> {
    o.to_ip.parse::<IpAddr>().ok().map(Family::of)
}

/// The observed table of one matrix, rows and columns in the expectation's order.
fn observed(want: &Table, outcomes: &[Outcome], (port, protocol, via, family): Matrix) -> Table {
    let mut got = Table::new(want.rows.clone(), want.cols.clone());
    for o in outcomes.iter().filter(|o| {
        o.port == port && o.protocol == protocol && o.via == via && family_of(o) == Some(family)
    }) {
        got.set(&o.from, &o.to, o.connected);
    }
    got
}

/// Wrong cells per matrix, as `from->to expected X got .`.
/// Every family of `families` must have been probed: a cell never dialled is wrong too.
fn compare(
    expected: &[(u16, Protocol, Table)],
    outcomes: &[Outcome],
    families: &[Family],
) -> Wrong {
    let mut out = Wrong::new();
    for (port, protocol, want) in expected {
        for (via, &family) in [Via::Service, Via::Pod]
            .into_iter()
            .flat_map(|v| families.iter().map(move |f| (v, f)))
        {
            let got = observed(want, outcomes, (*port, *protocol, via, family));
            let sym = |b: bool| if b { "." } else { "X" };
            let mut wrong: Vec<String> = want
                .differences(&got)
                .into_iter()
                .map(|(f, t, w, g)| format!("{f}->{t} expected {} got {}", sym(w), sym(g)))
                .collect();
            wrong.extend(
                want.missing(&got)
                    .into_iter()
                    .map(|(f, t)| format!("{f}->{t} not probed")),
            );
            out.insert((*port, *protocol, via, family), wrong);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalogue() -> Catalogue {
        serde_json::from_str(CASES).unwrap()
    }

    #[test]
    fn catalogue_has_48_cases_with_tcp_udp_sctp() {
        let c = catalogue();
        assert_eq!(c.cases.len(), 48);
        let protos: std::collections::BTreeSet<&str> = c
            .cases
            .iter()
            .flat_map(|c| c.protocols.iter().map(String::as_str))
            .collect();
        assert_eq!(protos, ["SCTP", "TCP", "UDP"].into());
    }

    /// The expectation edits, evaluated as upstream's Reachability does, reproduce the catalogue's
    /// independently computed denied pairs for every step of every case (newest pod sets).
    #[test]
    fn expectations_match_the_computed_denied_pairs() {
        for case in catalogue().cases {
            let computed = &case.computed_denied_non_loopback["reduced"];
            for (i, step) in case.steps.iter().enumerate() {
                for pc in &step.probes {
                    let t = expected_table(&case.pods_reduced, &pc.expect_ops).unwrap();
                    let mut mine: Vec<String> = t
                        .cells
                        .iter()
                        .filter(|(_, v)| !**v)
                        .map(|((f, d), _)| format!("{f}->{d}"))
                        .collect();
                    mine.sort();
                    let c = computed
                        .iter()
                        .find(|c| c.step == i + 1 && c.port == pc.port && c.protocol == pc.protocol)
                        .unwrap_or_else(|| {
                            panic!("case {} step {} has no computed list", case.id, i + 1)
                        });
                    let mut listed = c.denied.clone();
                    listed.sort();
                    assert_eq!(mine, listed, "case {} step {}", case.id, i + 1);
                }
            }
        }
    }

    #[test]
    fn placeholders_resolve_like_upstream() {
        let ip = |k: &str| match k {
            "x/b" => Some(IpAddr::from([10, 244, 2, 7])),
            "y/b" => Some(IpAddr::from([10, 244, 1, 9])),
            _ => None,
        };
        let v = json!({"cidr": "<the /4 network containing x/b's podIP, e.g. 0.0.0.0/4 for 10.x>",
                       "except": ["<podIP of x/b>/32 (/128 if IPv6)"], "other": "<podIP of y/b>/32 (/128 if IPv6)"});
        let r = resolve_placeholders(&v, &ip).unwrap();
        assert_eq!(
            r,
            json!({"cidr": "0.0.0.0/4", "except": ["10.244.2.7/32"], "other": "10.244.1.9/32"})
        );
        assert!(resolve_placeholders(&json!("<podIP of q/q>/32"), &ip).is_err());
        assert!(resolve_placeholders(&json!("<something else>"), &ip).is_err());
        let ip6 = |_: &str| "fd00:10:244:2::7".parse::<IpAddr>().ok();
        let r = resolve_placeholders(&v, &ip6).unwrap();
        assert_eq!(
            r,
            json!({"cidr": "f000::/4", "except": ["fd00:10:244:2::7/128"], "other": "fd00:10:244:2::7/128"})
        );
    }

    #[test]
    fn a_family_never_probed_fails_the_matrix() {
        let pods = vec!["x/a".to_string(), "x/b".to_string()];
        let mut want = Table::new(pods.clone(), pods.clone());
        want.set("x/a", "x/b", true);
        want.set("x/b", "x/a", false);
        let expected = vec![(80, Protocol::Tcp, want)];
        let outcome = |from: &str, to: &str, ip: &str, via: Via, connected: bool| Outcome {
            from: from.into(),
            to: to.into(),
            to_ip: ip.into(),
            port: 80,
            protocol: Protocol::Tcp,
            via,
            connected,
            ms: 0,
            service: None,
            service_port: None,
        };
        let mut v4 = Vec::new();
        for via in [Via::Service, Via::Pod] {
            v4.push(outcome("x/a", "x/b", "10.244.2.2", via, true));
            v4.push(outcome("x/b", "x/a", "10.244.1.2", via, false));
        }
        let ok = compare(&expected, &v4, &[Family::V4]);
        assert!(ok.values().all(Vec::is_empty), "{ok:?}");
        let dual = compare(&expected, &v4, &[Family::V4, Family::V6]);
        let missing = &dual[&(80, Protocol::Tcp, Via::Pod, Family::V6)];
        assert_eq!(missing.len(), 2, "{dual:?}");
        assert!(missing[0].ends_with("not probed"), "{missing:?}");
        // A wrong verdict in one family is reported in that family only.
        let mut both = v4.clone();
        for via in [Via::Service, Via::Pod] {
            both.push(outcome("x/a", "x/b", "fd00:10:244:2::2", via, true));
            both.push(outcome("x/b", "x/a", "fd00:10:244:1::2", via, true));
        }
        let wrong = compare(&expected, &both, &[Family::V4, Family::V6]);
        assert!(wrong[&(80, Protocol::Tcp, Via::Pod, Family::V4)].is_empty());
        assert_eq!(
            wrong[&(80, Protocol::Tcp, Via::Pod, Family::V6)],
            vec!["x/b->x/a expected X got ."]
        );
    }

    #[test]
    fn dual_stack_writes_an_ip_block_peer_per_family() {
        let ip = |_: &str, f: Family| match f {
            Family::V4 => Some(IpAddr::from([10, 244, 2, 7])),
            Family::V6 => "fd00:10:244:2::7".parse().ok(),
        };
        let spec = json!({"egress": [{"to": [
            {"podSelector": {}},
            {"ipBlock": {"cidr": "<the /4 network containing x/b's podIP, e.g. 0.0.0.0/4 for 10.x>",
                         "except": ["<podIP of x/b>/32 (/128 if IPv6)"]}}]}]});
        let dual = ip_blocks_per_family(&spec, &[Family::V4, Family::V6], &ip).unwrap();
        assert_eq!(
            dual["egress"][0]["to"],
            json!([{"podSelector": {}},
                   {"ipBlock": {"cidr": "0.0.0.0/4", "except": ["10.244.2.7/32"]}},
                   {"ipBlock": {"cidr": "f000::/4", "except": ["fd00:10:244:2::7/128"]}}])
        );
        let v6 = ip_blocks_per_family(&spec, &[Family::V6], &ip).unwrap();
        assert_eq!(v6["egress"][0]["to"].as_array().unwrap().len(), 2);
        assert_eq!(v6["egress"][0]["to"][1]["ipBlock"]["cidr"], "f000::/4");
    }

    #[test]
    fn every_placeholder_in_the_catalogue_is_understood() {
        let ip = |_: &str| Some(IpAddr::from([10, 244, 1, 2]));
        for case in catalogue().cases {
            for step in &case.steps {
                for a in &step.actions {
                    if let Some(spec) = a.get("spec") {
                        let r = resolve_placeholders(spec, &ip).unwrap();
                        assert!(!r.to_string().contains('<'), "case {}: {r}", case.id);
                    }
                }
            }
        }
    }
}
