//! Compiles a synthetic cluster and prints, as one JSON object: full compile time (`compile_ms`,
//! a fresh compiler), peak RSS of the process (`rss_mib`, `VmHWM`; `cluster_rss_mib` is the peak
//! before compiling: building and holding the synthetic cluster, i.e. k8s-openapi objects except
//! pods, which are held as their `model::PodInfo` projection), and the time of the compile after
//! one pod relabel (`incremental_ms`; `noop_ms` with no change; medians of 5 runs).
//!
//! ```text
//! cargo run --release -p policy-agent --example compile_bench -- --pods 50000 --policies 5000
//! ```
//!
//! The cluster: `policies / 10` namespaces (team and env labels), pods spread evenly over them in
//! workloads of 10 replicas (app, tier, version labels; named container ports), 110 pods per node,
//! one Service per workload. Per namespace ten policies: a default deny, seven app-to-app ingress
//! rules (same namespace by label, monitoring namespaces by label, named and numeric ports), an
//! egress rule to databases and DNS, and an egress ipBlock rule (world minus private ranges, a
//! per-namespace /24, an endPort range). The node compiled is node 0.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy_agent::compiler::{Compiler, NodeContext};
use policy_agent::model::{Cluster, ObjectKey};
use serde_json::json;

const PODS_PER_NODE: usize = 110;
const REPLICAS: usize = 10;
const POLICIES_PER_NAMESPACE: usize = 10;
/// Repetitions of the no-op and relabel compiles (the median is printed).
const RUNS: usize = 5;
const TIERS: [(&str, &str, u16); 3] = [
    ("web", "http", 8080),
    ("api", "grpc", 9090),
    ("db", "db", 5432),
];

struct Options {
    pods: usize,
    policies: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        pods: 10_000,
        policies: 1_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || -> anyhow::Result<usize> {
            args.next()
                .with_context(|| format!("{a} needs a value"))?
                .parse()
                .with_context(|| format!("{a} needs a number"))
        };
        match a.as_str() {
            "--pods" => o.pods = value()?,
            "--policies" => o.policies = value()?,
            other => bail!("unknown argument {other} (--pods N --policies N)"),
        }
    }
    Ok(o)
}

fn node_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, (n / 256) as u8, (n % 256) as u8)
}

fn pod_ip(node: usize, slot: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        128 + (node / 256) as u8,
        (node % 256) as u8,
        1 + slot as u8,
    )
}

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
    serde_json::from_value(v).expect("valid object")
}

fn build(o: &Options) -> Cluster {
    let namespaces = (o.policies / POLICIES_PER_NAMESPACE).max(1);
    let mut c = Cluster::default();
    for i in 0..namespaces {
        let name = format!("ns-{i}");
        let ns: Namespace = obj(json!({"metadata": {"name": name, "labels": {
            "team": format!("team-{}", i % 50),
            "env": if i.is_multiple_of(3) { "prod" } else { "dev" },
            "monitoring": if i.is_multiple_of(25) { "true" } else { "false" },
        }}}));
        c.namespaces.insert(name, ns);
    }
    c.namespaces.insert(
        "kube-system".into(),
        obj(json!({"metadata": {"name": "kube-system"}})),
    );
    let nodes = o.pods.div_ceil(PODS_PER_NODE);
    for n in 0..nodes {
        let node: Node = obj(
            json!({"metadata": {"name": format!("node-{n}")}, "status": {"addresses": [
                {"type": "InternalIP", "address": node_ip(n).to_string()},
                {"type": "Hostname", "address": format!("node-{n}")},
            ]}}),
        );
        c.nodes.insert(format!("node-{n}"), node);
    }
    let per_ns = o.pods.div_ceil(namespaces);
    for p in 0..o.pods {
        // Spread each namespace's pods over nodes like a scheduler would (round robin).
        let ns = p % namespaces;
        let index = p / namespaces;
        let app = index / REPLICAS;
        let (tier, port_name, port) = TIERS[app % TIERS.len()];
        let node = p % nodes;
        let slot = p / nodes;
        let name = format!("app-{app}-{index}");
        let pod: Pod = obj(json!({
            "metadata": {"name": name, "namespace": format!("ns-{ns}"), "labels": {
                "app": format!("app-{app}"), "tier": tier, "version": if index.is_multiple_of(2) { "v1" } else { "v2" },
                "pod-template-hash": format!("h{app}"),
            }},
            "spec": {"nodeName": format!("node-{node}"), "containers": [{"name": "main", "ports": [
                {"name": port_name, "containerPort": port, "protocol": "TCP"},
                {"name": "metrics", "containerPort": 9100, "protocol": "TCP"},
            ]}]},
            "status": {"phase": "Running", "podIP": pod_ip(node, slot).to_string(),
                       "podIPs": [{"ip": pod_ip(node, slot).to_string()}], "hostIP": node_ip(node).to_string()},
        }));
        c.pods
            .insert(ObjectKey::new(format!("ns-{ns}"), name), pod.into());
    }
    let apps = per_ns.div_ceil(REPLICAS).max(1);
    let mut svc_ip = 0u32;
    for ns in 0..namespaces {
        for app in 0..apps {
            svc_ip += 1;
            let ip = Ipv4Addr::from_bits(0x0a60_0000 + svc_ip);
            let svc: Service = obj(
                json!({"metadata": {"name": format!("app-{app}"), "namespace": format!("ns-{ns}")},
                "spec": {"clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()]}}),
            );
            c.services.insert(
                ObjectKey::new(format!("ns-{ns}"), format!("app-{app}")),
                svc,
            );
        }
    }
    let mut made = 0;
    'outer: for ns in 0..namespaces {
        let namespace = format!("ns-{ns}");
        for k in 0..POLICIES_PER_NAMESPACE {
            if made == o.policies {
                break 'outer;
            }
            made += 1;
            let app = k % apps;
            let (spec, name) = match k {
                0 => (
                    json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
                    "default-deny".to_owned(),
                ),
                1..=7 => (
                    json!({
                        "podSelector": {"matchLabels": {"app": format!("app-{app}")}},
                        "policyTypes": ["Ingress"],
                        "ingress": [
                            {"from": [{"podSelector": {"matchExpressions": [
                                {"key": "app", "operator": "In", "values": [format!("app-{}", (app + 1) % apps), format!("app-{}", (app + 2) % apps)]}]}}],
                             "ports": [{"port": TIERS[app % 3].1}]},
                            {"from": [{"namespaceSelector": {"matchLabels": {"monitoring": "true"}}}],
                             "ports": [{"port": "metrics"}]},
                            {"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", ns % 50)}},
                                       "podSelector": {"matchLabels": {"tier": "web"}}}],
                             "ports": [{"port": TIERS[app % 3].2, "protocol": "TCP"}]},
                        ]
                    }),
                    format!("allow-app-{app}"),
                ),
                8 => (
                    json!({
                        "podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["api", "web"]}]},
                        "policyTypes": ["Egress"],
                        "egress": [
                            {"to": [{"podSelector": {"matchLabels": {"tier": "db"}}}], "ports": [{"port": "db"}]},
                            {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
                             "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
                            {"to": [{"podSelector": {}}]},
                        ]
                    }),
                    "egress-internal".to_owned(),
                ),
                _ => (
                    json!({
                        "podSelector": {"matchLabels": {"tier": "web"}},
                        "policyTypes": ["Egress"],
                        "egress": [
                            {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}}],
                             "ports": [{"port": 443}, {"port": 30000, "endPort": 32767}]},
                            {"to": [{"ipBlock": {"cidr": format!("10.{}.{}.0/24", 1 + ns / 256, ns % 256)}}]},
                        ]
                    }),
                    "egress-world".to_owned(),
                ),
            };
            let np: NetworkPolicy =
                obj(json!({"metadata": {"name": name, "namespace": namespace}, "spec": spec}));
            c.policies
                .insert(ObjectKey::new(namespace.clone(), name), np);
        }
    }
    c
}

/// CPU time of this thread, in ms: the timings below are also reported as CPU time, which a busy
/// machine disturbs much less than wall time.
fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_THREAD_CPUTIME_ID is always available on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

/// Runs `f`, returning its result, wall ms and CPU ms.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (t, c) = (Instant::now(), cpu_ms());
    let out = f();
    (out, t.elapsed().as_secs_f64() * 1e3, cpu_ms() - c)
}

fn vm_hwm_mib() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM")?
        .parse()?;
    Ok(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let o = options()?;
    let t = Instant::now();
    let mut cluster = build(&o);
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let cluster_rss = vm_hwm_mib()?;
    let node = NodeContext {
        node_name: "node-0".into(),
        node_ips: vec![IpAddr::V4(node_ip(0))],
    };

    let mut compiler = Compiler::new();
    let (first, compile_ms, compile_cpu_ms) = timed(|| compiler.compile(&cluster, &node));
    let rss = vm_hwm_mib()?;
    if !first.errors.is_empty() {
        bail!(
            "synthetic cluster has errors: {:?}",
            &first.errors[..first.errors.len().min(3)]
        );
    }

    let (mut noop, mut noop_cpu) = (Vec::new(), Vec::new());
    let mut same = None;
    for _ in 0..RUNS {
        let (out, wall, cpu) = timed(|| compiler.compile(&cluster, &node));
        noop.push(wall);
        noop_cpu.push(cpu);
        if !first.maps.diff(&out.maps).is_empty() {
            bail!("recompiling an unchanged cluster changed the maps");
        }
        same = Some(out);
    }
    let same = same.context("no runs")?;

    // Relabel one local endpoint: it becomes a new workload version.
    let target = first
        .maps
        .endpoints
        .keys()
        .next()
        .cloned()
        .context("node-0 has no endpoints")?;
    let (mut incremental, mut incremental_cpu) = (Vec::new(), Vec::new());
    let mut diff_times = Vec::new();
    let mut previous = same.maps;
    let mut diff_ops = 0;
    for run in 0..RUNS {
        cluster
            .pods
            .get_mut(&target)
            .context("target pod")?
            .labels
            .insert("version".into(), format!("v{}", 3 + run % 2));
        let (relabelled, wall, cpu) = timed(|| compiler.compile(&cluster, &node));
        incremental.push(wall);
        incremental_cpu.push(cpu);
        let t = Instant::now();
        let diff = previous.diff(&relabelled.maps);
        diff_times.push(t.elapsed().as_secs_f64() * 1e3);
        diff_ops = diff.len();
        previous = relabelled.maps;
    }

    let m = &first.maps;
    let out = json!({
        "pods": o.pods,
        "policies": cluster.policies.len(),
        "namespaces": cluster.namespaces.len(),
        "nodes": cluster.nodes.len(),
        "services": cluster.services.len(),
        "local_endpoints": m.endpoints.len(),
        "policy_entries": m.policy.len(),
        "ipcache_entries": m.ipcache_v4.len() + m.ipcache_v6.len(),
        "rules": m.rules.len(),
        "cluster_build_ms": round(build_ms),
        "cluster_rss_mib": round(cluster_rss),
        "compile_ms": round(compile_ms),
        "compile_cpu_ms": round(compile_cpu_ms),
        "noop_cpu_ms": median(&mut noop_cpu),
        "incremental_cpu_ms": median(&mut incremental_cpu),
        "rss_mib": round(rss),
        "compiler_rss_mib": round(rss - cluster_rss),
        "noop_ms": median(&mut noop),
        "incremental_ms": median(&mut incremental),
        "diff_ms": median(&mut diff_times),
        "incremental_diff_ops": diff_ops,
        "relabelled": target.to_string(),
    });
    println!("{out}");
    Ok(())
}

/// Median of the runs, rounded.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    round(v[v.len() / 2])
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
