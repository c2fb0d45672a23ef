//! The real agent's map metrics against the kernel: `policy_agent_map_entries` and
//! `policy_agent_map_pressure_ratio` of every map that fills up must equal what a walk of the
//! pinned map with raw bpf(2) calls finds (and its `max_entries`), CONNTRACK included, and follow
//! conntrack growth without any sync; and the POLICY capacity edge: a group of exactly
//! `POLICY_MAX_RANGES` ranges is enforced, one more fails only its endpoint closed, named with the
//! map in `/status` and counted as `not_programmed`. Needs root.

mod agent_support;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use agent_support::{Agent, apply_manifests, connect_echo, echo_server, pod_yaml, ptp_pod};
use anyhow::{Context, Result, bail};
use policy_common::map_names;
use policy_tests::{bpffs::PinDir, bpfmap::PinnedMap, netns::NetNs, require_root};

const NODE: &str = "node-1";
const GW: &str = "10.253.5.1";
const PORT: u16 = 8080;

/// Ingress to `role: protected` from client pods and from an ipBlock (an IPCACHE_V4 prefix), and
/// a Service frontend (a SERVICES entry).
const OBJECTS: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
metadata: {namespace: t, name: protect}\nspec:\n  podSelector: {matchLabels: {role: protected}}\n  \
policyTypes: [Ingress]\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}, {ipBlock: {cidr: 10.99.0.0/16}}]\n    \
ports: [{port: 8080}]\n\
---\napiVersion: v1\nkind: Service\nmetadata: {namespace: t, name: web}\n\
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n";

/// Entries and pressure per map, as `/metrics` reports them.
fn reported(agent: &Agent, node: &NetNs) -> Result<BTreeMap<String, (u64, f64)>> {
    let (code, text) = agent.get(node, "/metrics")?;
    if code != 200 {
        bail!("/metrics: HTTP {code}");
    }
    let value = |line: &str, family: &str| -> Option<(String, String)> {
        let rest = line.strip_prefix(family)?.strip_prefix("{map=\"")?;
        let (map, rest) = rest.split_once("\"} ")?;
        Some((map.to_owned(), rest.trim().to_owned()))
    };
    let mut out: BTreeMap<String, (u64, f64)> = BTreeMap::new();
    for line in text.lines() {
        if let Some((map, v)) = value(line, "policy_agent_map_entries") {
            out.entry(map).or_insert((0, f64::NAN)).0 = v.parse()?;
        } else if let Some((map, v)) = value(line, "policy_agent_map_pressure_ratio") {
            out.entry(map).or_insert((0, f64::NAN)).1 = v.parse()?;
        }
    }
    Ok(out)
}

fn syncs_total(agent: &Agent, node: &NetNs) -> Result<u64> {
    let (_, text) = agent.get(node, "/metrics")?;
    text.lines()
        .find_map(|l| l.strip_prefix("policy_agent_syncs_total "))
        .context("policy_agent_syncs_total in /metrics")?
        .trim()
        .parse()
        .context("policy_agent_syncs_total value")
}

/// Entries and `max_entries` per map, walked in the pinned maps.
fn in_kernel(pins: &PinDir) -> Result<BTreeMap<String, (u64, u32)>> {
    map_names::COUNTED
        .iter()
        .map(|&name| {
            let map = PinnedMap::open(&pins.path().join("maps").join(name))?;
            Ok((name.to_owned(), (map.keys()?.len() as u64, map.max_entries)))
        })
        .collect()
}

/// Waits until `/metrics` reports exactly the kernel's counts for every map; returns them.
fn wait_metrics_match(
    agent: &Agent,
    node: &NetNs,
    pins: &PinDir,
    timeout: Duration,
) -> Result<BTreeMap<String, (u64, u32)>> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < timeout {
        let kernel = in_kernel(pins)?;
        let metrics = reported(agent, node)?;
        let mismatches: Vec<String> = kernel
            .iter()
            .filter_map(|(map, &(entries, capacity))| {
                let want_ratio = entries as f64 / f64::from(capacity);
                match metrics.get(map) {
                    Some(&(n, ratio)) if n == entries && (ratio - want_ratio).abs() < 1e-12 => None,
                    got => Some(format!(
                        "{map}: kernel {entries}/{capacity}, reported {got:?}"
                    )),
                }
            })
            .collect();
        if mismatches.is_empty() {
            return Ok(kernel);
        }
        last = mismatches.join("; ");
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("map metrics never matched the kernel within {timeout:?}: {last}")
}

#[test]
fn map_metrics_are_counted_in_the_kernel_maps() -> Result<()> {
    require_root();
    let node = NetNs::new("mnode")?;
    let client = NetNs::new("mclient")?;
    let web = NetNs::new("mweb")?;
    // No IPv6 on the node's links: no address events, so no sync but the ones the test makes.
    node.sh(
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.disable_ipv6=1 \
         net.ipv6.conf.default.disable_ipv6=1",
    )?;
    ptp_pod(&node, &client, "vclient", "10.253.5.2", GW)?;
    ptp_pod(&node, &web, "vweb", "10.253.5.4", GW)?;
    let pins = PinDir::new("maps")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir)?;
    let web_yaml = pod_yaml("t", "web", "web", NODE, "10.253.5.4", PORT)
        .replace("labels: {app: web}", "labels: {app: web, role: protected}");
    apply_manifests(
        &dir,
        &[
            (
                "client.yaml",
                &pod_yaml("t", "client", "client", NODE, "10.253.5.2", PORT),
            ),
            ("web.yaml", &web_yaml),
            ("objects.yaml", OBJECTS),
        ],
        1,
    )?;
    let mut agent = Agent::start(
        &node,
        NODE,
        &dir,
        pins.path(),
        "127.0.0.1:9993".parse()?,
        &tmp.path().join("log"),
        &[],
    )?;
    agent.wait_enforced(&node, 1, Duration::from_secs(30))?;
    let stop = Arc::new(AtomicBool::new(false));
    let _server = echo_server(&web, "10.253.5.4:8080".parse()?, stop.clone());
    let web_addr: SocketAddr = "10.253.5.4:8080".parse()?;
    for _ in 0..3 {
        assert!(client.run(move || connect_echo(web_addr, Duration::from_secs(1))));
    }

    let kernel = wait_metrics_match(&agent, &node, &pins, Duration::from_secs(15))
        .with_context(|| agent.log_text())?;
    // The scenario fills the maps the old compiler-side accounting got wrong: /32s live in
    // IPCACHE_EXACT, not IPCACHE_V4; conntrack is made by the programs.
    let entries = |map: &str| kernel[map].0;
    assert_eq!(entries(map_names::ENDPOINTS), 2);
    assert_eq!(entries(map_names::ENDPOINTS_BY_ID), 2);
    assert!(entries(map_names::IPCACHE_EXACT) >= 2, "{kernel:?}");
    assert!(entries(map_names::IPCACHE_V4) >= 1, "{kernel:?}");
    assert!(entries(map_names::POLICY) >= 1, "{kernel:?}");
    assert_eq!(entries(map_names::SERVICES), 1);
    let flows = entries(map_names::CONNTRACK);
    assert!(flows >= 3, "three connections tracked: {kernel:?}");

    // More flows, no change to the cluster (so no sync): the periodic count follows them.
    let syncs = syncs_total(&agent, &node)?;
    for _ in 0..3 {
        assert!(client.run(move || connect_echo(web_addr, Duration::from_secs(1))));
    }
    let later = wait_metrics_match(&agent, &node, &pins, Duration::from_secs(15))
        .with_context(|| agent.log_text())?;
    assert!(
        later[map_names::CONNTRACK].0 > flows,
        "conntrack grew from {flows}: {later:?}"
    );
    assert_eq!(syncs_total(&agent, &node)?, syncs, "counted without a sync");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// `role: protected` pods admit `app: client` on 8080 and `extra` more ports that no merge can
/// join (every other port from 10000): one POLICY group of `extra + 1` ranges.
fn wide_policy(name: &str, app: &str, extra: u16) -> String {
    let mut ports = vec!["{port: 8080}".to_owned()];
    ports.extend((0..extra).map(|i| format!("{{port: {}}}", 10000 + 2 * i)));
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{namespace: t, name: {name}}}\nspec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  \
         policyTypes: [Ingress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]\n    \
         ports: [{}]\n",
        ports.join(", ")
    )
}

fn metric_line(agent: &Agent, node: &NetNs, line: &str) -> Result<bool> {
    Ok(agent.get(node, "/metrics")?.1.lines().any(|l| l == line))
}

#[test]
fn a_policy_group_at_capacity_works_and_one_range_more_fails_only_its_endpoint_closed() -> Result<()>
{
    require_root();
    let limit = policy_common::POLICY_MAX_RANGES as u16;
    let node = NetNs::new("cnode")?;
    let client = NetNs::new("cclient")?;
    let wide = NetNs::new("cwide")?;
    let other = NetNs::new("cother")?;
    node.sh("sysctl -qw net.ipv4.ip_forward=1")?;
    let gw = "10.253.6.1";
    ptp_pod(&node, &client, "vclient", "10.253.6.2", gw)?;
    ptp_pod(&node, &wide, "vwide", "10.253.6.3", gw)?;
    ptp_pod(&node, &other, "vother", "10.253.6.4", gw)?;
    let pins = PinDir::new("capacity")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir)?;
    let pods = [
        (
            "client.yaml",
            pod_yaml("t", "client", "client", NODE, "10.253.6.2", PORT),
        ),
        (
            "wide.yaml",
            pod_yaml("t", "wide", "wide", NODE, "10.253.6.3", PORT),
        ),
        (
            "other.yaml",
            pod_yaml("t", "other", "other", NODE, "10.253.6.4", PORT),
        ),
        ("p-other.yaml", wide_policy("p-other", "other", 0)),
        ("p-wide.yaml", wide_policy("p-wide", "wide", limit - 1)),
    ];
    let files: Vec<(&str, &str)> = pods.iter().map(|(n, t)| (*n, t.as_str())).collect();
    apply_manifests(&dir, &files, 1)?;
    let mut agent = Agent::start(
        &node,
        NODE,
        &dir,
        pins.path(),
        "127.0.0.1:9994".parse()?,
        &tmp.path().join("log"),
        &[],
    )?;
    agent.wait_enforced(&node, 1, Duration::from_secs(30))?;
    let stop = Arc::new(AtomicBool::new(false));
    let wide_addr: SocketAddr = "10.253.6.3:8080".parse()?;
    let other_addr: SocketAddr = "10.253.6.4:8080".parse()?;
    let _servers = [
        echo_server(&wide, wide_addr, stop.clone()),
        echo_server(&other, other_addr, stop.clone()),
    ];
    let reaches = |addr: SocketAddr, timeout| client.run(move || connect_echo(addr, timeout));

    // Exactly at capacity: 120 ranges in one group, enforced like any other.
    let s = agent.status(&node)?;
    assert!(s.errors.is_empty(), "{s:?}");
    assert!(reaches(wide_addr, Duration::from_secs(1)), "at capacity");
    assert!(reaches(other_addr, Duration::from_secs(1)));
    assert!(metric_line(
        &agent,
        &node,
        "policy_agent_endpoints{state=\"not_programmed\"} 0"
    )?);

    // One range more: that endpoint fails closed, named with the map; the others are enforced.
    let over = wide_policy("p-wide", "wide", limit);
    apply_manifests(&dir, &[("p-wide.yaml", &over)], 2)?;
    agent.wait_enforced(&node, 2, Duration::from_secs(10))?;
    let s = agent.status(&node)?;
    assert!(
        s.errors
            .iter()
            .any(|e| e.contains("Pod t/wide") && e.contains("map POLICY") && e.contains("121")),
        "{s:?}"
    );
    assert_eq!(s.errors.len(), 1, "only the over-capacity endpoint: {s:?}");
    assert!(
        !reaches(wide_addr, Duration::from_millis(300)),
        "over capacity: fail closed"
    );
    assert!(
        reaches(other_addr, Duration::from_secs(1)),
        "others enforced"
    );
    assert!(metric_line(
        &agent,
        &node,
        "policy_agent_endpoints{state=\"not_programmed\"} 1"
    )?);
    assert!(metric_line(
        &agent,
        &node,
        "policy_agent_endpoints{state=\"enforced\"} 2"
    )?);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}
