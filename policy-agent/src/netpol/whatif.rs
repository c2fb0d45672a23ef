//! `what-if`: the connectivity between the known pods (and the off-cluster addresses the ipBlocks
//! name) before and after applying objects, as the flows that change.
//!
//! Only flows whose verdict can change are evaluated: a flow's egress half depends on the policies
//! of the source's namespace and its ingress half on those of the destination's, so when only
//! policies change, only flows from or to their namespaces are judged again. A changed Namespace
//! (its labels feed namespaceSelectors everywhere) widens that to every flow; a changed Pod adds
//! its own flows.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use super::flows::{self, Classes, Target};
use crate::evaluator::{Evaluator, Protocol};
use crate::model::{Cluster, ObjectKey};
use policy_common::truth_table::Table;

/// One flow whose verdict changes. JSON of `what-if -o json`: `{"changes": [Change…]}`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Change {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: Protocol,
    pub before: bool,
    pub after: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub changes: Vec<Change>,
    /// Flows judged in each state: one per pair of classes of equivalent pods (see
    /// [`flows::Classes`]) and port.
    pub flows_judged: usize,
    /// Truth tables per (protocol, port) before and after, when the state is small enough to
    /// print them (at most [`TABLE_PODS`] pods).
    #[serde(skip)]
    pub tables: Vec<(String, Table, Table)>,
}

/// Above this many pods no truth tables are printed.
pub const TABLE_PODS: usize = 40;

/// Off-cluster addresses named by ipBlocks: one address inside each `cidr` and each `except`
/// (the first host of the range), unless a pod has it.
pub fn block_addresses(clusters: &[&Cluster]) -> Vec<IpAddr> {
    let mut out = BTreeSet::new();
    for c in clusters {
        let pod_ips: BTreeSet<IpAddr> = c
            .pods
            .values()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        for b in flows::ip_blocks(c) {
            for cidr in std::iter::once(&b.cidr).chain(b.except.iter().flatten()) {
                if let Ok(p) = crate::compiler::cidr::Prefix::parse(cidr)
                    && let Some(ip) = first_host(&p)
                    && !pod_ips.contains(&ip)
                {
                    out.insert(ip);
                }
            }
        }
    }
    out.into_iter().collect()
}

fn first_host(p: &crate::compiler::cidr::Prefix) -> Option<IpAddr> {
    let len = p.prefix_len();
    if let Some(n) = p.to_v4_network() {
        let base = u32::from(n.network());
        return Some(IpAddr::V4(if len >= 31 { base } else { base + 1 }.into()));
    }
    let n = p.to_v6_network()?;
    let base = u128::from(n.network());
    Some(IpAddr::V6(if len >= 127 { base } else { base + 1 }.into()))
}

/// Numeric ports egress rules name (what off-cluster destinations are probed on).
pub fn egress_ports(clusters: &[&Cluster]) -> Vec<(u16, Protocol)> {
    let mut out = BTreeSet::new();
    for c in clusters {
        for np in c.policies.values() {
            let Some(spec) = &np.spec else { continue };
            for r in spec.egress.iter().flatten() {
                for p in r.ports.iter().flatten() {
                    let Some(pr) = Protocol::parse_defaulted(p.protocol.as_deref()) else {
                        continue;
                    };
                    if let Some(IntOrString::Int(n)) = p.port
                        && let Ok(n) = u16::try_from(n)
                    {
                        out.insert((n, pr));
                    }
                }
            }
        }
    }
    out.into_iter().collect()
}

/// One end of a judged flow: a class of equivalent pods (by index) or an ipBlock address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Class(usize),
    Address(usize),
}

type Verdicts = BTreeMap<(End, End, u16, Protocol), bool>;

/// Verdicts between class representatives (and the ipBlock addresses), for flows touching
/// `scope` (`None`: every flow).
fn class_cells(
    ev: &Evaluator<'_>,
    joint: &[Vec<&ObjectKey>],
    addresses: &[IpAddr],
    address_ports: &[(u16, Protocol)],
    scope: Option<&dyn Fn(&ObjectKey) -> bool>,
) -> Verdicts {
    let cluster = ev.cluster();
    let touches = |k: &ObjectKey| scope.is_none_or(|f| f(k));
    let mut out = Verdicts::new();
    let mut judge = |from: (End, Target), to: (End, Target), ports: &[(u16, Protocol)]| {
        for &(port, protocol) in ports {
            let allowed =
                flows::verdict(ev, &from.1, &to.1, port, protocol).is_ok_and(|v| v.allowed);
            out.insert((from.0, to.0, port, protocol), allowed);
        }
    };
    for (s, src) in joint.iter().enumerate() {
        for (d, dst) in joint.iter().enumerate() {
            if !(touches(src[0]) || touches(dst[0])) {
                continue;
            }
            // Within one class, a pod reaches another of the class (never itself).
            let Some(to) = (if s == d { dst.get(1) } else { dst.first() }) else {
                continue;
            };
            let ports = flows::declared_ports(&cluster.pods[*to]);
            judge(
                (End::Class(s), Target::Pod(src[0].clone())),
                (End::Class(d), Target::Pod((*to).clone())),
                &ports,
            );
        }
        if !touches(src[0]) {
            continue;
        }
        let ports = flows::declared_ports(&cluster.pods[src[0]]);
        for (a, ip) in addresses.iter().enumerate() {
            let pod = (End::Class(s), Target::Pod(src[0].clone()));
            let addr = (End::Address(a), Target::Address(*ip));
            judge(pod.clone(), addr.clone(), address_ports);
            judge(addr, pod, &ports);
        }
    }
    out
}

/// The flows one class-level cell stands for, by name: every pod pair of the two classes (never
/// a pod with itself), or every pod of the class with the address.
fn expand(
    joint: &[Vec<&ObjectKey>],
    addresses: &[IpAddr],
    from: End,
    to: End,
) -> Vec<(String, String)> {
    let names = |e: End| -> Vec<String> {
        match e {
            End::Class(i) => joint[i].iter().map(ToString::to_string).collect(),
            End::Address(a) => vec![addresses[a].to_string()],
        }
    };
    let (f, t) = (names(from), names(to));
    let mut out = Vec::with_capacity(f.len() * t.len());
    for a in &f {
        for b in &t {
            if a != b {
                out.push((a.clone(), b.clone()));
            }
        }
    }
    out
}

/// Every pod-level cell of a class-level table.
fn expand_all(
    joint: &[Vec<&ObjectKey>],
    addresses: &[IpAddr],
    cells: &Verdicts,
) -> BTreeMap<(String, String, u16, Protocol), bool> {
    let mut out = BTreeMap::new();
    for ((from, to, port, protocol), allowed) in cells {
        for (a, b) in expand(joint, addresses, *from, *to) {
            out.insert((a, b, *port, *protocol), *allowed);
        }
    }
    out
}

/// What applying changes does: `before` and `after` are the two states.
pub fn what_if(before: &Cluster, after: &Cluster) -> Report {
    let common: Vec<&ObjectKey> = after
        .pods
        .keys()
        .filter(|k| before.pods.contains_key(*k))
        .collect();
    let mut blocks = flows::ip_blocks(before);
    blocks.extend(flows::ip_blocks(after));
    let cb = Classes::new(before, common.iter().copied(), &blocks);
    let ca = Classes::new(after, common.iter().copied(), &blocks);
    let mut joint: BTreeMap<(usize, usize), Vec<&ObjectKey>> = BTreeMap::new();
    for k in &common {
        if let (Some(b), Some(a)) = (cb.of.get(*k), ca.of.get(*k)) {
            joint.entry((*b, *a)).or_default().push(*k);
        }
    }
    let joint: Vec<Vec<&ObjectKey>> = joint.into_values().collect();
    let addresses = block_addresses(&[before, after]);
    let address_ports = egress_ports(&[before, after]);
    let small = common.len() <= TABLE_PODS;

    let all_namespaces = before.namespaces != after.namespaces || before.nodes != after.nodes;
    let mut namespaces: BTreeSet<&str> = BTreeSet::new();
    for (k, np) in &after.policies {
        if before.policies.get(k) != Some(np) {
            namespaces.insert(&k.namespace);
        }
    }
    for k in before.policies.keys() {
        if !after.policies.contains_key(k) {
            namespaces.insert(&k.namespace);
        }
    }
    let changed_pods: BTreeSet<&ObjectKey> = common
        .iter()
        .copied()
        .filter(|k| before.pods[*k] != after.pods[*k])
        .collect();
    let scope = |k: &ObjectKey| {
        all_namespaces || namespaces.contains(k.namespace.as_str()) || changed_pods.contains(k)
    };
    let scope: Option<&dyn Fn(&ObjectKey) -> bool> = if small { None } else { Some(&scope) };
    let was = class_cells(
        &Evaluator::new(before),
        &joint,
        &addresses,
        &address_ports,
        scope,
    );
    let now = class_cells(
        &Evaluator::new(after),
        &joint,
        &addresses,
        &address_ports,
        scope,
    );
    let mut changes = Vec::new();
    for (key, b) in &was {
        if let Some(a) = now.get(key)
            && a != b
        {
            for (from, to) in expand(&joint, &addresses, key.0, key.1) {
                changes.push(Change {
                    from,
                    to,
                    port: key.2,
                    protocol: key.3,
                    before: *b,
                    after: *a,
                });
            }
        }
    }
    changes.sort();
    let tables = if small {
        tables(
            &common,
            &expand_all(&joint, &addresses, &was),
            &expand_all(&joint, &addresses, &now),
        )
    } else {
        Vec::new()
    };
    Report {
        changes,
        flows_judged: was.len(),
        tables,
    }
}

/// One before/after pair of pod-to-pod truth tables per (protocol, port).
fn tables(
    pods: &[&ObjectKey],
    was: &BTreeMap<(String, String, u16, Protocol), bool>,
    now: &BTreeMap<(String, String, u16, Protocol), bool>,
) -> Vec<(String, Table, Table)> {
    let names: Vec<String> = pods.iter().map(ToString::to_string).collect();
    let mut keys: BTreeSet<(Protocol, u16)> = BTreeSet::new();
    for (f, t, p, pr) in was.keys() {
        if names.contains(f) && names.contains(t) {
            keys.insert((*pr, *p));
        }
    }
    keys.into_iter()
        .map(|(pr, p)| {
            let mut b = Table::new(names.clone(), names.clone());
            let mut a = Table::new(names.clone(), names.clone());
            for f in &names {
                for t in &names {
                    let k = (f.clone(), t.clone(), p, pr);
                    if let (Some(x), Some(y)) = (was.get(&k), now.get(&k)) {
                        b.set(f, t, *x);
                        a.set(f, t, *y);
                    }
                }
            }
            (format!("{pr}/{p}"), b, a)
        })
        .collect()
}
