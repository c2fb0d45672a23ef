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
//! The cluster is [`synthetic::build`]'s; the node compiled is node 0.

mod synthetic;

use std::net::IpAddr;
use std::time::Instant;

use anyhow::{Context, bail};
use policy_agent::compiler::{Compiler, NodeContext};
use serde_json::json;

/// Repetitions of the no-op and relabel compiles (the median is printed).
const RUNS: usize = 5;

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
    let mut cluster = synthetic::build(o.pods, o.policies);
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let cluster_rss = vm_hwm_mib()?;
    let node = NodeContext {
        node_name: "node-0".into(),
        node_ips: vec![IpAddr::V4(synthetic::node_ip(0))],
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
