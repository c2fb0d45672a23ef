//! `apply` and `delete`: the API server's and kubelet's share of the work. Everything is checked
//! before anything changes (so a bad file leaves the lab as it was); then pods get their network
//! (ptp veth, /32, host route) and responders, Services their ClusterIP and DNAT rules, the objects
//! are published to the agents, and the call returns once every agent enforces them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    thread,
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::{
    api::{
        core::v1::{Pod, PodIP, PodStatus, Service},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{
    cluster::{self, Converged, Lab, PodState},
    net,
    objects::{Kind, Loaded, ObjRef, Object},
    serve::ServeArgs,
    services,
    topology::{self as topo, Family},
};

/// What happened to one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Created,
    Configured,
    Unchanged,
    Deleted,
}

#[derive(Debug)]
pub struct Report {
    pub changes: Vec<(ObjRef, Change, String)>,
    /// None when nothing changed.
    pub converged: Option<Converged>,
}

impl Report {
    pub fn print(&self) {
        for (r, c, note) in &self.changes {
            let verb = match c {
                Change::Created => "created",
                Change::Configured => "configured",
                Change::Unchanged => "unchanged",
                Change::Deleted => "deleted",
            };
            println!(
                "{r} {verb}{}",
                if note.is_empty() {
                    String::new()
                } else {
                    format!(" ({note})")
                }
            );
        }
        match &self.converged {
            Some(c) => {
                for w in &c.warnings {
                    eprintln!("warning: {w}");
                }
                println!("{c}");
            }
            None => println!("nothing changed"),
        }
    }
}

fn default_protocols_pod(pod: &mut Pod) {
    for c in pod.spec.iter_mut().flat_map(|s| s.containers.iter_mut()) {
        for p in c.ports.iter_mut().flatten() {
            p.protocol.get_or_insert_with(|| "TCP".into());
        }
    }
}

/// The container ports of a pod: (port, protocol, name).
pub fn pod_ports(pod: &Pod) -> Vec<(u16, String, Option<String>)> {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .map(|p| {
            (
                p.container_port as u16,
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                p.name.clone(),
            )
        })
        .collect()
}

pub(crate) fn serve_args(key: &str, pod: &Pod) -> ServeArgs {
    let mut a = ServeArgs {
        name: key.to_string(),
        tcp: vec![],
        udp: vec![],
        sctp: vec![],
    };
    for (port, proto, _) in pod_ports(pod) {
        match proto.as_str() {
            "UDP" => a.udp.push(port),
            "SCTP" => a.sctp.push(port),
            _ => a.tcp.push(port),
        }
    }
    a
}

/// NetworkPolicy as the API server stores it (`SetDefaults_NetworkPolicy`): port protocol TCP,
/// policyTypes `[Ingress]` plus `Egress` iff there are egress rules, when absent.
pub fn default_policy(mut np: NetworkPolicy) -> NetworkPolicy {
    if let Some(spec) = np.spec.as_mut() {
        for rule in spec.ingress.iter_mut().flatten() {
            for p in rule.ports.iter_mut().flatten() {
                p.protocol.get_or_insert_with(|| "TCP".into());
            }
        }
        for rule in spec.egress.iter_mut().flatten() {
            for p in rule.ports.iter_mut().flatten() {
                p.protocol.get_or_insert_with(|| "TCP".into());
            }
        }
        if spec.policy_types.as_ref().is_none_or(|t| t.is_empty()) {
            let mut t = vec!["Ingress".to_string()];
            if spec.egress.as_ref().is_some_and(|e| !e.is_empty()) {
                t.push("Egress".into());
            }
            spec.policy_types = Some(t);
        }
        spec.pod_selector.get_or_insert_with(Default::default);
    }
    np
}

/// Service as the API server stores it: type ClusterIP, protocol TCP, targetPort = port, its
/// ClusterIPs (the first is `clusterIP`) and their families.
fn default_service(
    mut svc: Service,
    cluster_ips: Option<&[IpAddr]>,
    dual_capable: bool,
) -> Service {
    if let Some(spec) = svc.spec.as_mut() {
        spec.type_ = Some("ClusterIP".into());
        match cluster_ips {
            Some(ips) => {
                spec.cluster_ip = ips.first().map(|ip| ip.to_string());
                spec.cluster_ips = Some(ips.iter().map(|ip| ip.to_string()).collect());
                spec.ip_families = Some(
                    ips.iter()
                        .map(|ip| Family::of(*ip).kube_name().to_string())
                        .collect(),
                );
                if spec.ip_family_policy.is_none() {
                    spec.ip_family_policy = Some(
                        if dual_capable {
                            "PreferDualStack"
                        } else {
                            "SingleStack"
                        }
                        .into(),
                    );
                }
            }
            None => {
                spec.cluster_ip = Some("None".into());
                spec.cluster_ips = Some(vec!["None".into()]);
            }
        }
        for p in spec.ports.iter_mut().flatten() {
            p.protocol.get_or_insert_with(|| "TCP".into());
            p.target_port.get_or_insert(IntOrString::Int(p.port));
        }
    }
    svc
}

/// What applying `new` over the stored `old` does: create, change, or nothing (see
/// [`comparable`]).
fn change_of<T: serde::Serialize>(old: Option<&T>, new: &T) -> Change {
    match old {
        None => Change::Created,
        Some(o) if comparable(o) == comparable(new) => Change::Unchanged,
        Some(_) => Change::Configured,
    }
}

/// [`change_of`], after giving `new` the stored object's uid (a fresh one when there is none).
fn replace_change<T>(old: Option<&T>, new: &mut T) -> Change
where
    T: serde::Serialize + k8s_openapi::Metadata<Ty = ObjectMeta>,
{
    new.metadata_mut().uid = old
        .and_then(|o| o.metadata().uid.clone())
        .or_else(|| Some(cluster::new_uid()));
    change_of(old, new)
}

/// Strips what callers may not set, so that re-applying the same file reads as unchanged.
fn comparable<T: serde::Serialize>(obj: &T) -> serde_json::Value {
    let mut v = serde_json::to_value(obj).unwrap_or_default();
    if let Some(m) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        for k in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "generation",
            "managedFields",
        ] {
            m.remove(k);
        }
    }
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    v
}

impl Lab {
    fn pick_node(&self, pods: &BTreeMap<String, PodState>) -> u32 {
        let mut load: BTreeMap<u32, usize> =
            self.state.nodes.iter().map(|n| (n.number, 0)).collect();
        for p in pods.values() {
            *load.entry(p.node).or_default() += 1;
        }
        load.iter()
            .min_by_key(|(n, l)| (**l, **n))
            .map(|(n, _)| *n)
            .expect("at least one node")
    }

    /// The next free host number on `node` (round robin, as host-local IPAM) and the pod's
    /// address of each family of the lab with that host number.
    fn allocate_pod_ips(&mut self, node: u32, taken: &BTreeSet<IpAddr>) -> Result<Vec<IpAddr>> {
        let idx = self
            .state
            .nodes
            .iter()
            .position(|n| n.number == node)
            .expect("node exists");
        let families = self.state.ip_family.families();
        let mut host = self.state.nodes[idx].last_pod_host;
        for _ in 0..253 {
            host = if host >= 254 { 2 } else { host + 1 };
            let ips: Vec<IpAddr> = families
                .iter()
                .map(|f| topo::node_pods(node, *f).nth(u128::from(host)))
                .collect();
            if !ips.iter().any(|ip| taken.contains(ip)) {
                self.state.nodes[idx].last_pod_host = host;
                return Ok(ips);
            }
        }
        bail!(
            "node-{node} has no free pod address left in {}",
            topo::node_pods(node, families[0])
        )
    }

    /// ClusterIPs of the families asked for, at one offset free in every one of their ranges:
    /// `preferred` when it is, else the next free one round robin.
    fn allocate_service_ips(
        &mut self,
        families: &[Family],
        preferred: Option<u128>,
    ) -> Result<Vec<IpAddr>> {
        let taken: BTreeSet<IpAddr> = self
            .state
            .services
            .values()
            .filter_map(|s| s.spec.as_ref())
            .flat_map(services::cluster_addrs)
            .collect();
        let at = |off: u128| -> Vec<IpAddr> {
            families
                .iter()
                .map(|f| topo::service_cidr(*f).nth(off))
                .collect()
        };
        let free = |ips: &[IpAddr]| !ips.iter().any(|ip| taken.contains(ip));
        if let Some(ips) = preferred.map(at).filter(|ips| free(ips)) {
            return Ok(ips);
        }
        let size = topo::service_cidr(Family::V4).size() as u32;
        let mut off = self.state.last_service_offset;
        for _ in 0..size {
            // .0.1-.0.99 are left for well-known addresses (kubernetes, kube-dns), as on kind.
            off = if off + 1 >= size - 1 {
                100
            } else {
                (off + 1).max(100)
            };
            let ips = at(u128::from(off));
            if free(&ips) {
                self.state.last_service_offset = off;
                return Ok(ips);
            }
        }
        bail!(
            "the service range {} is exhausted",
            topo::service_cidr(families[0])
        )
    }

    /// The ClusterIPs of a new Service: those given (`clusterIPs`, or `clusterIP`), completed
    /// with one of the other family when the lab is dual-stack and the policy allows it;
    /// otherwise allocated in the families `ipFamilyPolicy` and `ipFamilies` ask for (the lab's
    /// default is PreferDualStack: every family of the lab, IPv4 first).
    fn new_service_ips(&mut self, svc: &Service) -> Result<Vec<IpAddr>> {
        let spec = svc.spec.as_ref();
        let single = spec.and_then(|s| s.ip_family_policy.as_deref()) == Some("SingleStack");
        let lab: Vec<Family> = self.state.ip_family.families().to_vec();
        let mut given: Vec<IpAddr> = spec.map(services::cluster_addrs).unwrap_or_default();
        let asked: Vec<Family> = spec
            .and_then(|s| s.ip_families.clone())
            .unwrap_or_default()
            .iter()
            .filter_map(|f| lab.iter().copied().find(|l| l.kube_name() == f))
            .collect();
        let mut order: Vec<Family> = given.iter().map(|ip| Family::of(*ip)).collect();
        order.extend(asked);
        order.extend(lab.iter().copied());
        let mut wanted: Vec<Family> = Vec::new();
        for f in order {
            if !wanted.contains(&f) {
                wanted.push(f);
            }
        }
        wanted.truncate(if single { 1 } else { lab.len() });
        let missing: Vec<Family> = wanted
            .iter()
            .copied()
            .filter(|f| !given.iter().any(|ip| Family::of(*ip) == *f))
            .collect();
        if !missing.is_empty() {
            // A given ClusterIP's offset in its range, in the other family too when free
            // (10.96.0.10 and fd00:10:96::a), as the topology promises.
            let offset = given
                .first()
                .and_then(|g| topo::service_cidr(Family::of(*g)).offset_of(*g));
            given.extend(self.allocate_service_ips(&missing, offset)?);
        }
        given.sort_by_key(|ip| wanted.iter().position(|f| *f == Family::of(*ip)));
        Ok(given)
    }

    /// Creates or replaces objects; returns once every agent enforces the result.
    pub fn apply(&mut self, loaded: Vec<Loaded>) -> Result<Report> {
        if self.is_kube() {
            let docs = loaded
                .into_iter()
                .map(|l| Ok((l.source, l.object.as_value()?)))
                .collect::<Result<Vec<_>>>()?;
            return self.kube_apply(&docs);
        }
        // Last occurrence of an object wins, in first-seen order.
        let mut order: Vec<ObjRef> = Vec::new();
        let mut by_ref: BTreeMap<ObjRef, Loaded> = BTreeMap::new();
        for l in loaded {
            let r = l.object.obj_ref();
            if !by_ref.contains_key(&r) {
                order.push(r.clone());
            }
            by_ref.insert(r, l);
        }
        // ---- check everything first ----
        let mut errors = Vec::new();
        for r in &order {
            let l = &by_ref[r];
            if let Object::Pod(p) = &l.object {
                let spec = p.spec.as_ref().expect("validated");
                if let Some(node) = &spec.node_name
                    && !self.state.nodes.iter().any(|n| &n.name == node)
                {
                    errors.push(format!(
                        "{}: {r}: spec.nodeName: Invalid value {node:?}: the lab has nodes node-1..node-{}",
                        l.source,
                        self.state.nodes.len()
                    ));
                }
                if let Some(old) = self.state.pods.get(&r.key()) {
                    let mut new = (**p).clone();
                    default_protocols_pod(&mut new);
                    let old_spec = old.pod.spec.as_ref().expect("stored pods have a spec");
                    if new.spec.as_ref().map(|s| &s.containers) != Some(&old_spec.containers)
                        || spec
                            .node_name
                            .as_ref()
                            .is_some_and(|n| Some(n) != old_spec.node_name.as_ref())
                    {
                        errors.push(format!(
                            "{}: {r}: spec: Forbidden: pod updates may not change fields other than labels and annotations (delete the pod first)",
                            l.source
                        ));
                    }
                }
            }
            if let Object::Service(s) = &l.object
                && let Some(old) = self.state.services.get(&r.key())
            {
                let want = s
                    .spec
                    .as_ref()
                    .and_then(|s| s.cluster_ip.clone())
                    .filter(|ip| !ip.is_empty());
                let have = old.spec.as_ref().and_then(|s| s.cluster_ip.clone());
                if want.is_some() && want != have {
                    errors.push(format!(
                        "{}: {r}: spec.clusterIP: Invalid value: field is immutable",
                        l.source
                    ));
                }
            }
            if let Object::Service(s) = &l.object
                && !self.state.services.contains_key(&r.key())
                && let Some(ip) = s
                    .spec
                    .as_ref()
                    .and_then(|s| s.cluster_ip.as_deref())
                    .filter(|ip| !ip.is_empty() && *ip != "None")
                && self
                    .state
                    .services
                    .values()
                    .any(|o| o.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some(ip))
            {
                errors.push(format!("{}: {r}: spec.clusterIP: Invalid value {ip:?}: provided IP is already allocated", l.source));
            }
            if let Object::Service(svc) = &l.object
                && let Some(spec) = &svc.spec
            {
                let lab = self.state.ip_family;
                let given = spec
                    .cluster_ips
                    .iter()
                    .flatten()
                    .chain(spec.cluster_ip.iter())
                    .filter_map(|ip| ip.parse::<IpAddr>().ok());
                for ip in given.filter(|ip| !lab.has(Family::of(*ip))) {
                    errors.push(format!(
                        "{}: {r}: spec.clusterIPs: Invalid value {:?}: {} is not configured on this cluster",
                        l.source,
                        ip.to_string(),
                        Family::of(ip)
                    ));
                }
                for f in spec.ip_families.iter().flatten() {
                    if !lab.families().iter().any(|l| l.kube_name() == f) {
                        errors.push(format!(
                            "{}: {r}: spec.ipFamilies: Invalid value {f:?}: not configured on this cluster",
                            l.source
                        ));
                    }
                }
                if spec.ip_family_policy.as_deref() == Some("RequireDualStack")
                    && lab.families().len() < 2
                {
                    errors.push(format!(
                        "{}: {r}: spec.ipFamilyPolicy: Invalid value \"RequireDualStack\": this cluster is not configured for dual-stack services",
                        l.source
                    ));
                }
            }
        }
        if !errors.is_empty() {
            bail!("nothing was applied:\n  {}", errors.join("\n  "));
        }

        // ---- plan: new state, pods to create ----
        let before = self.state.clone();
        let mut changes = Vec::new();
        let mut new_pods: Vec<String> = Vec::new();
        let mut taken: BTreeSet<IpAddr> = self
            .state
            .pods
            .values()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        let mut dirty: BTreeSet<String> = BTreeSet::new(); // manifest files to write
        let mut implicit: BTreeSet<String> = BTreeSet::new(); // namespaces created by reference
        let result = (|| -> Result<()> {
            for r in &order {
                if r.kind.namespaced() && self.ensure_namespace(&r.namespace) {
                    let auto = ObjRef {
                        kind: Kind::Namespace,
                        namespace: String::new(),
                        name: r.namespace.clone(),
                    };
                    if !order.contains(&auto) {
                        changes.push((auto, Change::Created, "referenced".to_string()));
                    }
                    implicit.insert(r.namespace.clone());
                    dirty.insert(cluster::namespace_file(&r.namespace));
                }
                let key = r.key();
                match by_ref[r].object.clone() {
                    Object::Namespace(ns) => {
                        let old = self.state.namespaces.get(&key).cloned();
                        let uid = old.as_ref().and_then(|o| o.metadata.uid.clone());
                        let new = cluster::normalize_namespace(*ns, uid);
                        let change = if implicit.contains(&key) {
                            Change::Created
                        } else {
                            change_of(old.as_ref(), &new)
                        };
                        if change != Change::Unchanged {
                            self.state.namespaces.insert(key.clone(), new);
                            dirty.insert(cluster::namespace_file(&key));
                        }
                        changes.push((r.clone(), change, String::new()));
                    }
                    Object::Pod(p) => {
                        let mut pod = *p;
                        default_protocols_pod(&mut pod);
                        if let Some(old) = self.state.pods.get_mut(&key) {
                            let same = old.pod.metadata.labels == pod.metadata.labels
                                && old.pod.metadata.annotations == pod.metadata.annotations;
                            if same {
                                changes.push((r.clone(), Change::Unchanged, String::new()));
                            } else {
                                old.pod.metadata.labels = pod.metadata.labels;
                                old.pod.metadata.annotations = pod.metadata.annotations;
                                dirty.insert(cluster::namespaced_file("pod", &key));
                                changes.push((
                                    r.clone(),
                                    Change::Configured,
                                    "relabelled in place".into(),
                                ));
                            }
                            continue;
                        }
                        let node = match pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
                            Some(n) => topo::node_number(&n).expect("validated"),
                            None => self.pick_node(&self.state.pods),
                        };
                        let ips = self.allocate_pod_ips(node, &taken)?;
                        taken.extend(ips.iter().copied());
                        let id = self.state.next_pod_id;
                        self.state.next_pod_id += 1;
                        let host_ips: Vec<String> =
                            self.host_ips(node).iter().map(IpAddr::to_string).collect();
                        pod.spec.as_mut().expect("validated").node_name =
                            Some(topo::node_name(node));
                        pod.metadata.uid = Some(cluster::new_uid());
                        pod.status = Some(PodStatus {
                            phase: Some("Running".into()),
                            pod_ip: Some(ips[0].to_string()),
                            pod_ips: Some(
                                ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect(),
                            ),
                            host_ip: Some(host_ips[0].clone()),
                            host_ips: Some(
                                host_ips
                                    .iter()
                                    .map(|ip| k8s_openapi::api::core::v1::HostIP { ip: ip.clone() })
                                    .collect(),
                            ),
                            ..Default::default()
                        });
                        self.state.pods.insert(
                            key.clone(),
                            PodState {
                                pod,
                                id,
                                node,
                                ips: ips.clone(),
                                netns: self.names.pod_ns(id),
                                veth: self.names.pod_veth(id),
                                responder_pid: None,
                            },
                        );
                        new_pods.push(key.clone());
                        dirty.insert(cluster::namespaced_file("pod", &key));
                        changes.push((
                            r.clone(),
                            Change::Created,
                            format!("{}, {}", topo::node_name(node), join(&ips)),
                        ));
                    }
                    Object::Service(s) => {
                        let old = self.state.services.get(&key).cloned();
                        let headless =
                            s.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None");
                        let ips: Option<Vec<IpAddr>> = match (&old, headless) {
                            (_, true) => None,
                            (Some(o), false) => Some(
                                o.spec
                                    .as_ref()
                                    .map(services::cluster_addrs)
                                    .unwrap_or_default(),
                            ),
                            (None, false) => Some(self.new_service_ips(&s)?),
                        };
                        let dual = self.state.ip_family.families().len() > 1;
                        let mut new = default_service(*s, ips.as_deref(), dual);
                        let change = replace_change(old.as_ref(), &mut new);
                        if change != Change::Unchanged {
                            self.state.services.insert(key.clone(), new);
                            dirty.insert(cluster::namespaced_file("service", &key));
                        }
                        let note = ips
                            .map(|ips| join(&ips))
                            .unwrap_or_else(|| "headless".into());
                        changes.push((r.clone(), change, note));
                    }
                    Object::NetworkPolicy(np) => {
                        let old = self.state.policies.get(&key).cloned();
                        let mut new = default_policy(*np);
                        let change = replace_change(old.as_ref(), &mut new);
                        if change != Change::Unchanged {
                            self.state.policies.insert(key.clone(), new);
                            dirty.insert(cluster::namespaced_file("networkpolicy", &key));
                        }
                        changes.push((r.clone(), change, String::new()));
                    }
                }
            }
            // ---- the kubelet's part: pod networks and responders ----
            self.create_pod_networks(&new_pods)?;
            self.reload_services(false)?;
            Ok(())
        })();
        if let Err(e) = result {
            // Undo: remove what was created for new pods, restore the old state.
            let created: Vec<PodState> = new_pods
                .iter()
                .filter_map(|k| self.state.pods.get(k).cloned())
                .collect();
            self.remove_pod_networks(&created);
            self.state = before;
            let _ = self.reload_services(true);
            return Err(e.context("nothing was applied"));
        }
        if dirty.is_empty() {
            return Ok(Report {
                changes,
                converged: None,
            });
        }
        self.write_dirty(&dirty)?;
        let converged = self.publish()?;
        Ok(Report {
            changes,
            converged: Some(converged),
        })
    }

    /// Deletes objects (a Namespace with everything in it, as the API server does).
    pub fn delete(&mut self, refs: Vec<ObjRef>, ignore_not_found: bool) -> Result<Report> {
        if self.is_kube() {
            return self.kube_delete(refs, ignore_not_found);
        }
        let mut missing = Vec::new();
        let mut targets: Vec<ObjRef> = Vec::new();
        for r in refs {
            if targets.contains(&r) {
                continue;
            }
            let exists = match r.kind {
                Kind::Namespace => self.state.namespaces.contains_key(&r.name),
                Kind::Pod => self.state.pods.contains_key(&r.key()),
                Kind::Service => self.state.services.contains_key(&r.key()),
                Kind::NetworkPolicy => self.state.policies.contains_key(&r.key()),
            };
            if exists {
                targets.push(r);
            } else if !ignore_not_found {
                missing.push(format!("{r}: not found"));
            }
        }
        if !missing.is_empty() {
            bail!("nothing was deleted:\n  {}", missing.join("\n  "));
        }
        let mut changes = Vec::new();
        let mut gone_pods = Vec::new();
        let mut removed_files = Vec::new();
        // Expand namespaces into their contents.
        let mut all: Vec<ObjRef> = Vec::new();
        for r in &targets {
            if r.kind == Kind::Namespace {
                let in_ns = |k: &String| k.split_once('/').is_some_and(|(ns, _)| ns == r.name);
                let name = |k: &String| {
                    k.split_once('/')
                        .map(|(_, n)| n.to_string())
                        .unwrap_or_default()
                };
                for (kind, keys) in [
                    (
                        Kind::NetworkPolicy,
                        self.state
                            .policies
                            .keys()
                            .filter(|k| in_ns(k))
                            .cloned()
                            .collect::<Vec<_>>(),
                    ),
                    (
                        Kind::Service,
                        self.state
                            .services
                            .keys()
                            .filter(|k| in_ns(k))
                            .cloned()
                            .collect(),
                    ),
                    (
                        Kind::Pod,
                        self.state
                            .pods
                            .keys()
                            .filter(|k| in_ns(k))
                            .cloned()
                            .collect(),
                    ),
                ] {
                    for k in keys {
                        all.push(ObjRef {
                            kind,
                            namespace: r.name.clone(),
                            name: name(&k),
                        });
                    }
                }
            }
            all.push(r.clone());
        }
        for r in all {
            let key = r.key();
            let existed = match r.kind {
                Kind::Namespace => {
                    removed_files.push(cluster::namespace_file(&key));
                    self.state.namespaces.remove(&key).is_some()
                }
                Kind::Pod => {
                    removed_files.push(cluster::namespaced_file("pod", &key));
                    self.state
                        .pods
                        .remove(&key)
                        .map(|p| gone_pods.push(p))
                        .is_some()
                }
                Kind::Service => {
                    removed_files.push(cluster::namespaced_file("service", &key));
                    self.state.services.remove(&key).is_some()
                }
                Kind::NetworkPolicy => {
                    removed_files.push(cluster::namespaced_file("networkpolicy", &key));
                    self.state.policies.remove(&key).is_some()
                }
            };
            if existed && !changes.iter().any(|(c, _, _)| *c == r) {
                changes.push((r, Change::Deleted, String::new()));
            }
        }
        if changes.is_empty() {
            return Ok(Report {
                changes,
                converged: None,
            });
        }
        // The kubelet tears the pods down, kube-proxy drops their endpoints, then the objects go.
        self.remove_pod_networks(&gone_pods);
        self.reload_services(false)?;
        for f in &removed_files {
            cluster::remove_object(&self.paths.manifests(), f);
        }
        let converged = self.publish()?;
        Ok(Report {
            changes,
            converged: Some(converged),
        })
    }

    fn write_dirty(&self, files: &BTreeSet<String>) -> Result<()> {
        let dir = self.paths.manifests();
        for f in files {
            let (kind, rest) = f.split_once('.').expect("kind.name.yaml");
            let rest = rest.strip_suffix(".yaml").expect("yaml");
            match kind {
                "namespace" => cluster::write_object(&dir, f, &self.state.namespaces[rest])?,
                _ => {
                    let (ns, name) = rest.split_once('.').expect("ns.name");
                    let key = format!("{ns}/{name}");
                    match kind {
                        "pod" => cluster::write_object(&dir, f, &self.state.pods[&key].pod)?,
                        "service" => cluster::write_object(&dir, f, &self.state.services[&key])?,
                        "networkpolicy" => {
                            cluster::write_object(&dir, f, &self.state.policies[&key])?
                        }
                        other => unreachable!("unknown manifest kind {other}"),
                    }
                }
            }
        }
        Ok(())
    }

    /// Pod networks like kindnet's ptp plugin, in parallel; then the responders.
    fn create_pod_networks(&mut self, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let pods: Vec<PodState> = keys.iter().map(|k| self.state.pods[k].clone()).collect();
        let node_ns: BTreeMap<u32, String> = self
            .state
            .nodes
            .iter()
            .map(|n| (n.number, n.netns.clone()))
            .collect();
        let results: Vec<Result<()>> = thread::scope(|s| {
            let handles: Vec<_> = pods
                .iter()
                .map(|p| {
                    let node = &node_ns[&p.node];
                    let families = self.state.ip_family;
                    s.spawn(move || create_pod_network(node, families, p))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("panicked"))))
                .collect()
        });
        if let Some(e) = results.into_iter().find_map(|r| r.err()) {
            return Err(e);
        }
        let jobs: Vec<(String, ServeArgs)> = keys
            .iter()
            .map(|k| {
                let p = &self.state.pods[k];
                (p.netns.clone(), serve_args(k, &p.pod))
            })
            .collect();
        let pids = cluster::start_responders(&self.names.prefix, &jobs, &self.paths.logs())?;
        for (k, pid) in keys.iter().zip(pids) {
            self.state.pods.get_mut(k).expect("exists").responder_pid = Some(pid);
        }
        Ok(())
    }

    /// Stops responders and removes pod namespaces with their veths (best effort).
    pub(crate) fn remove_pod_networks(&self, pods: &[PodState]) {
        let pids: Vec<u32> = pods
            .iter()
            .flat_map(|p| {
                net::pids_in_netns(&p.netns)
                    .into_iter()
                    .chain(p.responder_pid)
            })
            .filter(|&pid| {
                net::cmdline(pid)
                    .is_some_and(|c| c.contains(" serve ") && c.contains(&self.names.prefix))
            })
            .collect();
        net::terminate(&pids, libc::SIGKILL, std::time::Duration::from_secs(2));
        for p in pods {
            if let Some(node) = self.state.nodes.iter().find(|n| n.number == p.node) {
                let _ = net::ip_batch(&node.netns, &[format!("link del {}", p.veth)]);
            }
            if net::netns_exists(&p.netns)
                && let Err(e) = net::del_netns(&p.netns)
            {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

/// Addresses joined by commas, as `kubectl get -o wide` shows a dual-stack pod's.
pub fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn create_pod_network(node_ns: &str, families: topo::IpFamily, p: &PodState) -> Result<()> {
    let mac = topo::host_veth_mac(p.id);
    net::add_netns(&p.netns)?;
    cluster::set_families(&p.netns, families, false)?;
    net::ip_batch(
        node_ns,
        &[
            format!(
                "link add {} address {mac} type veth peer name eth0 netns {}",
                p.veth, p.netns
            ),
            format!("link set {} up", p.veth),
        ],
    )?;
    let mut pod_cmds = vec!["link set lo up".to_string()];
    for ip in &p.ips {
        let f = Family::of(*ip);
        pod_cmds.push(format!(
            "addr add {ip}/{} dev eth0{}",
            f.bits(),
            cluster::nodad(f)
        ));
    }
    pod_cmds.push("link set eth0 up".into());
    for ip in &p.ips {
        let gw = topo::pod_gateway(Family::of(*ip));
        if gw.is_ipv4() {
            // IPv6 link-local gateways need no route of their own: fe80::/64 is on eth0.
            pod_cmds.push(format!("route add {gw} dev eth0 scope link"));
        }
        pod_cmds.push(format!("route add default via {gw} dev eth0"));
        pod_cmds.push(format!(
            "neigh add {gw} lladdr {mac} dev eth0 nud permanent"
        ));
    }
    net::ip_batch(&p.netns, &pod_cmds)?;
    let host: Vec<String> = p
        .ips
        .iter()
        .map(|ip| format!("route add {ip}/{} dev {}", Family::of(*ip).bits(), p.veth))
        .collect();
    net::ip_batch(node_ns, &host).with_context(|| format!("host routes for pod {}", join(&p.ips)))
}
