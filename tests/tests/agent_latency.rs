//! Policy-change-to-enforcement latency, measured in network namespaces with the real agent
//! binary and the manifest-directory source (as the lab drives it): write a changed policy and a
//! new `.revision`, then poll `/status` until the agent reports that revision enforced. Every
//! change is also checked with a real connection. Prints p50 / p99 / max; asserts only that every
//! change took effect (no timing assertions). Needs root.

mod agent_support;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use agent_support::{Agent, apply_manifests, connect_echo, echo_server, pod_yaml, ptp_pod};
use anyhow::Result;
use policy_tests::{bpffs::PinDir, netns::NetNs, require_root};

const NODE: &str = "node-1";
const CHANGES: u64 = 60;

fn policy(allow_client: bool) -> String {
    let app = if allow_client { "client" } else { "nobody" };
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{namespace: t, name: web}}\nspec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  \
         policyTypes: [Ingress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: {app}}}}}}}]\n"
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[test]
fn policy_change_to_enforcement_latency() -> Result<()> {
    require_root();
    let node = NetNs::new("lnode")?;
    let client = NetNs::new("lclient")?;
    let web = NetNs::new("lweb")?;
    node.sh("sysctl -qw net.ipv4.ip_forward=1")?;
    ptp_pod(&node, &client, "vclient", "10.254.1.2", "10.254.1.1")?;
    ptp_pod(&node, &web, "vweb", "10.254.1.3", "10.254.1.1")?;
    // Some bulk, so the compiler and the diff have something to chew on: 200 remote pods.
    let mut bulk = String::new();
    for i in 0..200 {
        bulk.push_str(&pod_yaml(
            "bulk",
            &format!("p{i}"),
            &format!("app{}", i % 20),
            "node-2",
            &format!("10.254.{}.{}", 2 + i / 200, 1 + i % 200),
            80,
        ));
        bulk.push_str("---\n");
    }
    let pins = PinDir::new("latency")?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir)?;
    apply_manifests(
        &dir,
        &[
            (
                "client.yaml",
                &pod_yaml("t", "client", "client", NODE, "10.254.1.2", 80),
            ),
            (
                "web.yaml",
                &pod_yaml("t", "web", "web", NODE, "10.254.1.3", 80),
            ),
            ("bulk.yaml", &bulk),
            ("policy.yaml", &policy(false)),
        ],
        1,
    )?;
    let http: SocketAddr = "127.0.0.1:9993".parse()?;
    let mut agent = Agent::start(
        &node,
        NODE,
        &dir,
        pins.path(),
        http,
        &tmp.path().join("log"),
        &[],
    )?;
    agent.wait_enforced(&node, 1, Duration::from_secs(30))?;
    let stop = Arc::new(AtomicBool::new(false));
    let _server = echo_server(&web, "10.254.1.3:80".parse()?, stop.clone());
    let target: SocketAddr = "10.254.1.3:80".parse()?;

    let mut latencies = Vec::new();
    for revision in 2..2 + CHANGES {
        let allow = revision % 2 == 0;
        let started = Instant::now();
        apply_manifests(&dir, &[("policy.yaml", &policy(allow))], revision)?;
        agent.wait_enforced(&node, revision, Duration::from_secs(10))?;
        latencies.push(started.elapsed());
        let connected = client.run(move || {
            connect_echo(
                target,
                Duration::from_millis(if allow { 1000 } else { 200 }),
            )
        });
        assert_eq!(
            connected, allow,
            "revision {revision}: the change took effect"
        );
    }
    latencies.sort();
    let (_, metrics) = agent.get(&node, "/metrics")?;
    let agent_view: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("policy_agent_enforcement_latency_seconds_")
                || l.starts_with("policy_agent_sync_duration_seconds_")
        })
        .filter(|l| l.contains("_sum") || l.contains("_count"))
        .collect();
    println!(
        "policy change -> enforced ({CHANGES} changes, manifest source, 20 ms poll, 20 ms \
         debounce, 202 pods): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; agent histogram {:?}",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
        agent_view
    );
    if let Ok(keep) = std::env::var("AGENT_LOG_COPY") {
        std::fs::copy(&agent.log, keep)?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}
