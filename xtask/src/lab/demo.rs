//! `cargo xtask demo`: the three-tier segmentation of `deploy/examples/` (frontend → backend →
//! database, default deny, DNS allowed) on a fresh lab with the real agent. It prints, for every
//! flow, what the policies intend next to what the kernel did, and tears the lab down. In a
//! dual-stack lab it does so in each family (pod IPs and ClusterIPs of that family, `ext` at its
//! address of that family), and every family must match.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Result, bail};

use super::{
    AgentChoice, Lab, ProbeSpec, Protocol, Table, UpOptions, Via, down, load_all,
    objects::{Loaded, Object},
    read_docs, side_by_side,
    topology::{self as topo, Family, IpFamily},
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
    /// The lab's address families (`lab up --ip-family`).
    pub ip_family: IpFamily,
}

impl Default for DemoArgs {
    fn default() -> Self {
        Self {
            nodes: 2,
            prefix: "paldemo".into(),
            agent_bin: None,
            keep: false,
            ip_family: IpFamily::Ipv4,
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
    let mut cluster = load_all(&read_docs(&[dir.join("lab")])?)?;
    let app = load_all(&read_docs(std::slice::from_ref(&dir))?)?;
    let moved = move_service_ips(&mut cluster, args.ip_family);
    let mut opts = UpOptions::new(args.nodes, agent)?;
    opts.ip_family = args.ip_family;
    // The demo's lab is its own: whatever an interrupted earlier run left goes first.
    down(&args.prefix)?;
    let mut lab = Lab::up(&args.prefix, &opts)?;
    let result = (|| -> Result<Vec<(Family, bool)>> {
        let c = lab.publish()?;
        println!(
            "lab {:?} up with {} nodes ({}); {c}",
            args.prefix,
            args.nodes,
            args.ip_family.as_str()
        );
        println!(
            "\n$ cargo xtask lab apply -f {}/lab/   # cluster DNS stand-in and a debug pod",
            dir.display()
        );
        for (name, from, to) in &moved {
            println!(
                "  (IPv6-only lab: Service {name} at {to}, the IPv6 counterpart of the manifest's {from}, as on kind)"
            );
        }
        lab.apply(cluster)?.print();
        println!("\n$ cargo xtask lab apply -f {}/", dir.display());
        lab.apply(app)?.print();
        let mut verdicts = Vec::new();
        for &family in args.ip_family.families() {
            let mut ok = true;
            for via in [Via::Pod, Via::Service] {
                ok &= show(&lab, via, family)?;
            }
            verdicts.push((family, ok));
        }
        Ok(verdicts)
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
    println!("{}", judge(&result?)?);
    Ok(())
}

/// The demo's verdict from each family's (family, observed == expected): the line to print when
/// every family matched, or the error naming the families that did not.
fn judge(verdicts: &[(Family, bool)]) -> Result<String> {
    let list = |ok: bool| -> Vec<String> {
        verdicts
            .iter()
            .filter(|v| v.1 == ok)
            .map(|v| v.0.to_string())
            .collect()
    };
    let (good, bad) = (list(true), list(false));
    if !bad.is_empty() {
        let also = if good.is_empty() {
            String::new()
        } else {
            format!(" (it matches in {})", good.join(" and "))
        };
        bail!(
            "observed connectivity differs from what the policies intend in {}{also}",
            bad.join(" and ")
        );
    }
    Ok(format!(
        "observed connectivity matches the policies in {}",
        good.join(" and ")
    ))
}

/// In a lab without IPv4, moves every Service's IPv4 ClusterIP from the IPv4 Service range to the
/// same offset in the IPv6 one (kube-dns 10.96.0.10 becomes fd00:10:96::a, its address on an
/// IPv6 kind cluster). Returns (Service, from, to) for each address moved.
fn move_service_ips(objects: &mut [Loaded], ip_family: IpFamily) -> Vec<(String, IpAddr, IpAddr)> {
    let mut moved = Vec::new();
    if ip_family.has(Family::V4) {
        return moved;
    }
    let (v4, v6) = (
        topo::service_cidr(Family::V4),
        topo::service_cidr(Family::V6),
    );
    let to_v6 = |s: &str| -> Option<(IpAddr, IpAddr)> {
        let ip: IpAddr = s.parse().ok()?;
        v4.offset_of(ip).map(|offset| (ip, v6.nth(offset)))
    };
    for l in objects {
        let Object::Service(svc) = &mut l.object else {
            continue;
        };
        let name = format!(
            "{}/{}",
            svc.metadata.namespace.as_deref().unwrap_or("default"),
            svc.metadata.name.as_deref().unwrap_or_default()
        );
        let Some(spec) = svc.spec.as_mut() else {
            continue;
        };
        let mut ips = super::services::cluster_ips(spec);
        let mut changed = false;
        for ip in &mut ips {
            if let Some((from, to)) = to_v6(ip) {
                *ip = to.to_string();
                moved.push((name.clone(), from, to));
                changed = true;
            }
        }
        if changed {
            spec.cluster_ip = ips.first().cloned();
            spec.cluster_ips = spec.cluster_ips.as_ref().map(|_| ips);
        }
    }
    moved
}

/// Probes every (source, destination) flow in one family and prints both tables and whether
/// they agree; true if they do.
fn show(lab: &Lab, via: Via, family: Family) -> Result<bool> {
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
                family: Some(family),
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
    let what = format!(
        "{family} {}",
        if via == Via::Pod {
            "pod IPs"
        } else {
            "Service ClusterIPs"
        }
    );
    println!(
        "\nconnectivity via {what} (rows = from, columns = to; . connected, X blocked, - not probed):"
    );
    print!("{}", side_by_side(("expected", &want), ("observed", &got)));
    println!(
        "  (frontend, backend, database = shop/*:8080, 8080, 5432 TCP; dns = kube-system/coredns:53; debug = default/debug; ext = {})",
        SocketAddr::new(topo::ext_addr(family).0, 443)
    );
    for (f, t, w, g) in &wrong {
        println!(
            "  MISMATCH {f} -> {t}: expected {}, observed {}",
            sym(*w),
            sym(*g)
        );
    }
    let connected = outcomes.iter().filter(|o| o.connected).count();
    println!(
        "  {what}: {} flows probed, {connected} connected; {}",
        outcomes.len(),
        if wrong.is_empty() {
            "every cell as the policies intend".to_string()
        } else {
            format!("{} cells differ from what the policies intend", wrong.len())
        }
    );
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
    fn an_ipv6_lab_moves_kube_dns_to_its_ipv6_address() {
        let dir = examples_dir();
        let load = || load_all(&read_docs(&[dir.join("lab")]).unwrap()).unwrap();
        let kube_dns = |objects: &[Loaded]| {
            objects
                .iter()
                .find_map(|l| match &l.object {
                    Object::Service(s) => s.spec.clone(),
                    _ => None,
                })
                .unwrap()
        };
        for f in [IpFamily::Ipv4, IpFamily::Dual] {
            let mut objects = load();
            assert!(move_service_ips(&mut objects, f).is_empty());
            assert_eq!(kube_dns(&objects).cluster_ip.as_deref(), Some("10.96.0.10"));
        }
        let mut objects = load();
        let moved = move_service_ips(&mut objects, IpFamily::Ipv6);
        let (from, to): (IpAddr, IpAddr) = (
            "10.96.0.10".parse().unwrap(),
            "fd00:10:96::a".parse().unwrap(),
        );
        assert_eq!(moved, vec![("kube-system/kube-dns".to_string(), from, to)]);
        let spec = kube_dns(&objects);
        assert_eq!(spec.cluster_ip.as_deref(), Some("fd00:10:96::a"));
        assert_eq!(spec.cluster_ips, None);
    }

    #[test]
    fn every_family_must_match() {
        let (v4, v6) = (Family::V4, Family::V6);
        assert_eq!(
            judge(&[(v4, true), (v6, true)]).unwrap(),
            "observed connectivity matches the policies in IPv4 and IPv6"
        );
        assert_eq!(
            judge(&[(v4, true), (v6, false)]).unwrap_err().to_string(),
            "observed connectivity differs from what the policies intend in IPv6 (it matches in IPv4)"
        );
        assert_eq!(
            judge(&[(v4, false)]).unwrap_err().to_string(),
            "observed connectivity differs from what the policies intend in IPv4"
        );
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
