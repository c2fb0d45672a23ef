//! Policy-change-to-enforcement latency: two node namespaces, one agent each (manifest-directory
//! source), a base of policies, then a series of changes (a policy created, then deleted); for each
//! change, the time from writing it until every agent reports the new revision enforced.
//!
//! Like `cargo xtask lab apply` / `lab delete`, a change writes or removes the one manifest file
//! of the object it changes; the base stays in its own file (the agent re-parses only changed
//! files, as it receives only changed objects from the Kubernetes API).
//!
//! Usage: bench_enforce [--policies N] [--changes K] [--json]

use std::{time::Duration, time::Instant};

use anyhow::{Context, Result, bail};
use policy_tests::{
    agent::{self, write_revision},
    cluster::node_ip,
    require_root,
    workload::{self, PODS},
};
use serde_json::json;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() -> Result<()> {
    require_root();
    let (mut policies, mut changes, mut as_json) = (100usize, 40usize, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--policies" => policies = args.next().context("--policies N")?.parse()?,
            "--changes" => changes = args.next().context("--changes K")?.parse()?,
            "--json" => as_json = true,
            other => bail!("unknown argument {other}"),
        }
    }
    let cluster = workload::cluster("be")?;
    let dir = std::env::temp_dir().join(format!("{}-manifests", cluster.prefix));
    std::fs::create_dir_all(&dir)?;
    let base = workload::policies(policies, (5201, 5202));
    let file = dir.join("cluster.yaml");
    std::fs::write(&file, workload::manifests(PODS, &base, node_ip))?;
    write_revision(&dir, 1)?;
    // Policy `p-<policies>`, the one the changes create and delete.
    let extra_file = dir.join("networkpolicy.extra.yaml");
    let extra = {
        let docs = workload::manifest_documents(
            PODS,
            &workload::policies(policies + 1, (5201, 5202)),
            node_ip,
        );
        workload::yaml_stream(&docs[docs.len() - 1..])
    };

    let (mut agents, _) = agent::start_all(&cluster, &dir, 1)?;

    let mut latencies_ms = Vec::with_capacity(changes);
    for i in 0..changes {
        // Even changes add one more policy, odd changes remove it again.
        let revision = i as u64 + 2;
        if i % 2 == 0 {
            std::fs::write(&extra_file, &extra)?;
        } else {
            std::fs::remove_file(&extra_file)?;
        }
        let start = Instant::now();
        write_revision(&dir, revision)?;
        for (agent, node) in agents.iter_mut().zip(&cluster.nodes) {
            agent.wait_enforced(&node.netns, revision, Duration::from_secs(30))?;
        }
        latencies_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    drop(agents);
    let _ = std::fs::remove_dir_all(&dir);

    latencies_ms.sort_by(f64::total_cmp);
    let (p50, p99) = (
        percentile(&latencies_ms, 0.5),
        percentile(&latencies_ms, 0.99),
    );
    let out = json!({"policies": policies, "changes": changes, "enforce_ms_p50": p50, "enforce_ms_p99": p99,
                     "enforce_ms_max": latencies_ms.last()});
    if as_json {
        println!("{out}");
    } else {
        println!(
            "{changes} changes over {policies} policies, 2 agents: p50 {p50:.1} ms, p99 {p99:.1} ms"
        );
    }
    Ok(())
}
