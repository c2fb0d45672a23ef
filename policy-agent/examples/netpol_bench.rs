//! Times `kubectl netpol` at scale on the synthetic cluster of the control-plane benchmarks and
//! prints one JSON object: `lint_ms` (every check over the whole state), `explain_ms` (one flow,
//! median of 20), `what_if_ms` (applying one policy to one namespace: every flow that can change
//! judged before and after), `test_ms` (100 expected cells), `graph_ms` (one namespace and its
//! peers) and how many findings, changes and graph edges they produced.
//!
//! ```text
//! cargo run --release -p policy-agent --example netpol_bench -- --pods 50000 --policies 5000
//! ```

mod synthetic;

use std::time::Instant;

use anyhow::{Context, bail};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use policy_agent::model::ObjectKey;
use policy_agent::netpol::{expect, explain, flows, graph, lint, whatif};
use serde_json::json;

fn ms<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, (t.elapsed().as_secs_f64() * 1e4).round() / 10.0)
}

fn main() -> anyhow::Result<()> {
    let (mut pods, mut policies) = (10_000, 1_000);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v: usize = args
            .next()
            .with_context(|| format!("{a} needs a value"))?
            .parse()?;
        match a.as_str() {
            "--pods" => pods = v,
            "--policies" => policies = v,
            other => bail!("unknown argument {other} (--pods N --policies N)"),
        }
    }
    let (cluster, build_ms) = ms(|| synthetic::build(pods, policies));
    let (findings, lint_ms) = ms(|| lint::lint(&cluster));

    let keys: Vec<&ObjectKey> = cluster.pods.keys().collect();
    let (from, to) = (
        flows::Target::Pod(keys[0].clone()),
        flows::Target::Pod(keys[keys.len() / 2].clone()),
    );
    let mut explain_runs = Vec::new();
    for _ in 0..20 {
        let (e, t) = ms(|| {
            explain::explain(
                &cluster,
                &from,
                &to,
                8080,
                policy_agent::evaluator::Protocol::Tcp,
            )
        });
        e.map_err(anyhow::Error::msg)?;
        explain_runs.push(t);
    }
    explain_runs.sort_by(f64::total_cmp);

    // What-if: a default deny for egress in the first namespace.
    let mut after = cluster.clone();
    let ns = keys[0].namespace.clone();
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "deny-egress", "namespace": ns},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"]}
    }))?;
    after
        .policies
        .insert(ObjectKey::new(ns.clone(), "deny-egress"), np);
    let (report, what_if_ms) = ms(|| whatif::what_if(&cluster, &after));

    let cells: Vec<expect::Expectation> = (0..100)
        .map(|i| expect::Expectation {
            from: keys[i * 7 % keys.len()].to_string(),
            to: keys[i * 131 % keys.len()].to_string(),
            port: 8080,
            protocol: "TCP".into(),
            allowed: false,
        })
        .collect();
    let (outcome, test_ms) = ms(|| expect::check(&cluster, &cells));
    outcome.map_err(anyhow::Error::msg)?;
    let (g, graph_ms) = ms(|| graph::build(&cluster, Some(&ns)));

    println!(
        "{}",
        json!({
            "pods": cluster.pods.len(),
            "policies": cluster.policies.len(),
            "namespaces": cluster.namespaces.len(),
            "build_ms": build_ms,
            "lint_ms": lint_ms,
            "findings": findings.len(),
            "explain_ms": explain_runs[explain_runs.len() / 2],
            "what_if_ms": what_if_ms,
            "what_if_changes": report.changes.len(),
            "what_if_flows_judged": report.flows_judged,
            "test_ms": test_ms,
            "graph_ms": graph_ms,
            "graph_nodes": g.nodes.len(),
            "graph_edges": g.edges.len(),
        })
    );
    Ok(())
}
