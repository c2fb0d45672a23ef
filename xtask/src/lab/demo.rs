//! `cargo xtask demo`: the three-tier segmentation of `deploy/examples/` (frontend → backend →
//! database, default deny, DNS allowed) on a fresh lab with the real agent. It prints, for every
//! flow, what the policies intend next to what the kernel did, and tears the lab down.

use std::{path::PathBuf, time::Duration};

use anyhow::{Result, bail};

use super::{
    AgentChoice, Lab, ProbeSpec, Protocol, Table, UpOptions, Via, down, load_all, read_docs,
    side_by_side,
};

/// Options of the demo (`cargo xtask lab demo`; the defaults are what the main job runs).
#[derive(Clone, Debug)]
pub struct DemoArgs {
    pub nodes: u32,
    /// Name prefix of the demo's lab (its own, so a lab the user has up is left alone).
    pub prefix: String,
    /// Run this policy-agent binary instead of building it.
    pub agent_bin: Option<PathBuf>,
    /// Leave the lab up afterwards.
    pub keep: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        Self {
            nodes: 2,
            prefix: "paldemo".into(),
            agent_bin: None,
            keep: false,
        }
    }
}

/// A destination column: pod (or ext), port, protocol.
struct Dest {
    label: &'static str,
    to: &'static str,
    port: u16,
    protocol: Protocol,
}

const DESTS: [Dest; 6] = [
    Dest {
        label: "frontend",
        to: "shop/frontend",
        port: 8080,
        protocol: Protocol::Tcp,
    },
    Dest {
        label: "backend",
        to: "shop/backend",
        port: 8080,
        protocol: Protocol::Tcp,
    },
    Dest {
        label: "database",
        to: "shop/database",
        port: 5432,
        protocol: Protocol::Tcp,
    },
    Dest {
        label: "dns/udp",
        to: "kube-system/coredns",
        port: 53,
        protocol: Protocol::Udp,
    },
    Dest {
        label: "dns/tcp",
        to: "kube-system/coredns",
        port: 53,
        protocol: Protocol::Tcp,
    },
    Dest {
        label: "ext",
        to: "ext",
        port: 443,
        protocol: Protocol::Tcp,
    },
];

/// Rows: (label, source).
const SOURCES: [(&str, &str); 5] = [
    ("frontend", "shop/frontend"),
    ("backend", "shop/backend"),
    ("database", "shop/database"),
    ("debug", "default/debug"),
    ("ext", "ext"),
];

/// What the manifests intend: the (from, destination) flows that connect; every other cell of the
/// table must be blocked. The frontend is public, but the backend and the database may not call it
/// (their egress allows only the next tier and DNS). Rows and columns use the labels above.
const ALLOWED: &[(&str, &str)] = &[
    // the chain
    ("frontend", "backend"),
    ("backend", "database"),
    // the frontend is public: any source whose own egress is open
    ("debug", "frontend"),
    ("ext", "frontend"),
    // DNS for everyone (kube-system has no policy, so even ext gets there)
    ("frontend", "dns/udp"),
    ("frontend", "dns/tcp"),
    ("backend", "dns/udp"),
    ("backend", "dns/tcp"),
    ("database", "dns/udp"),
    ("database", "dns/tcp"),
    ("debug", "dns/udp"),
    ("debug", "dns/tcp"),
    ("ext", "dns/udp"),
    ("ext", "dns/tcp"),
    // an unpoliced namespace reaches the internet
    ("debug", "ext"),
];

fn expected(from: &str, dest: &str) -> bool {
    ALLOWED.contains(&(from, dest))
}

fn examples_dir() -> PathBuf {
    super::agent::workspace_root().join("deploy/examples")
}

/// Brings a lab up, applies the examples, prints expected vs observed, tears the lab down.
pub fn run(args: &DemoArgs) -> Result<()> {
    let agent = match &args.agent_bin {
        Some(p) => AgentChoice::Binary(p.clone()),
        None => AgentChoice::Build,
    };
    let dir = examples_dir();
    // Read and validate before building anything.
    let cluster = load_all(&read_docs(&[dir.join("lab")])?)?;
    let app = load_all(&read_docs(std::slice::from_ref(&dir))?)?;
    // The demo's lab is its own: whatever an interrupted earlier run left goes first.
    down(&args.prefix)?;
    let mut lab = Lab::up(&args.prefix, &UpOptions::new(args.nodes, agent)?)?;
    let result = (|| -> Result<bool> {
        let c = lab.publish()?;
        println!("lab {:?} up with {} nodes; {c}", args.prefix, args.nodes);
        println!(
            "\n$ cargo xtask lab apply -f {}/lab/   # cluster DNS stand-in and a debug pod",
            dir.display()
        );
        lab.apply(cluster)?.print();
        println!("\n$ cargo xtask lab apply -f {}/", dir.display());
        lab.apply(app)?.print();
        let mut ok = true;
        for via in [Via::Pod, Via::Service] {
            ok &= show(&lab, via)?;
        }
        Ok(ok)
    })();
    drop(lab);
    if args.keep {
        println!(
            "\nthe lab is still up: cargo xtask lab --prefix {} get",
            args.prefix
        );
    } else {
        let removed = down(&args.prefix)?;
        println!("\nlab torn down: removed {}", removed.summary());
    }
    if !result? {
        bail!("observed connectivity differs from what the policies intend");
    }
    println!("observed connectivity matches the policies");
    Ok(())
}

/// Probes every (source, destination) flow and prints both tables; true if they agree.
fn show(lab: &Lab, via: Via) -> Result<bool> {
    let mut specs = Vec::new();
    let mut cells = Vec::new();
    for (row, from) in SOURCES {
        for d in &DESTS {
            // A pod never probes itself; ClusterIPs are not reachable from off-cluster; ext has no
            // Service.
            if from == d.to || (via == Via::Service && (from == "ext" || d.to == "ext")) {
                continue;
            }
            specs.push(ProbeSpec {
                from: Some(from.into()),
                to: Some(d.to.into()),
                port: Some(d.port.to_string()),
                protocol: Some(d.protocol),
                via,
                family: None,
            });
            cells.push((row, d.label));
        }
    }
    let outcomes = lab.run_probes(&specs, Duration::from_millis(1000))?;
    let rows: Vec<String> = SOURCES
        .iter()
        .filter(|s| cells.iter().any(|c| c.0 == s.0))
        .map(|s| s.0.to_string())
        .collect();
    let cols: Vec<String> = DESTS
        .iter()
        .filter(|d| cells.iter().any(|c| c.1 == d.label))
        .map(|d| d.label.to_string())
        .collect();
    let mut want = Table::new(rows.clone(), cols.clone());
    let mut got = Table::new(rows, cols);
    for ((from, label), o) in cells.iter().zip(&outcomes) {
        want.set(from, label, expected(from, label));
        got.set(from, label, o.connected);
    }
    let wrong = want.differences(&got);
    println!(
        "\nconnectivity via {} (rows = from, columns = to; . connected, X blocked, - not probed):",
        if via == Via::Pod {
            "pod IPs"
        } else {
            "Service ClusterIPs"
        }
    );
    print!("{}", side_by_side(("expected", &want), ("observed", &got)));
    println!(
        "  (frontend, backend, database = shop/*:8080, 8080, 5432 TCP; dns = kube-system/coredns:53; debug = default/debug; ext = {}:443)",
        super::EXT_IP
    );
    for (f, t, w, g) in &wrong {
        println!(
            "  MISMATCH {f} -> {t}: expected {}, observed {}",
            sym(*w),
            sym(*g)
        );
    }
    Ok(wrong.is_empty())
}

fn sym(b: bool) -> &'static str {
    if b { "connected" } else { "blocked" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_manifests_are_valid() {
        let dir = examples_dir();
        let app = load_all(&read_docs(std::slice::from_ref(&dir)).unwrap()).unwrap();
        assert_eq!(app.len(), 12);
        let cluster = load_all(&read_docs(&[dir.join("lab")]).unwrap()).unwrap();
        assert_eq!(cluster.len(), 3);
    }

    #[test]
    fn expectations_cover_the_chain() {
        assert!(expected("frontend", "backend"));
        assert!(!expected("frontend", "database"));
        assert!(!expected("backend", "frontend"));
        assert!(!expected("ext", "backend"));
        assert!(expected("debug", "ext"));
    }
}
