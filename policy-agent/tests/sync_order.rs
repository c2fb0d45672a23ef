//! The sync's write order and failure handling, with the real compiler and a recording fake
//! enforcer (no kernel): allow entries before isolation, entry before attachment, detach before
//! removal, removals last, fail-closed flags on failed writes, endpoints waiting for their
//! interface, and a restarted agent reproducing the kernel's numbering exactly.

use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::{Ipv4Network, Ipv6Network};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use policy_agent::{
    compiler::{
        NodeContext,
        output::{MapDiff, NodeMaps, PolicyEntryKey},
    },
    dataplane::{DataplaneError, Role},
    endpoints::{HostInterface, Shape},
    model::{Cluster, ObjectKey},
    numbering::Adopted,
    sync::{Enforcer, Syncer},
};
use policy_common::{EndpointInfo, IdentityPair, PolicyValue, endpoint_flags, map_names};
use serde_json::json;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    /// (policy upserts, policy removals, ipcache upserts, ipcache removals)
    Apply(usize, usize, usize, usize),
    SyncMaps,
    Upsert(u32, EndpointInfo),
    Remove(u32),
    Attach(String),
    AttachUplink(String),
    Detach(String),
}

#[derive(Default)]
struct Fake {
    ops: Vec<Op>,
    endpoints: BTreeMap<u32, EndpointInfo>,
    ipcache_v4: BTreeMap<Ipv4Network, IdentityPair>,
    ipcache_v6: BTreeMap<Ipv6Network, IdentityPair>,
    policy: BTreeMap<PolicyEntryKey, PolicyValue>,
    attached: BTreeMap<String, Role>,
    fail_policy_writes: bool,
}

impl Fake {
    fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }
}

fn policy_full() -> DataplaneError {
    DataplaneError::MapFull {
        map: map_names::POLICY,
        key: "test".into(),
        capacity: 0,
    }
}

impl Enforcer for Fake {
    fn apply(&mut self, d: &MapDiff) -> Result<(), DataplaneError> {
        self.ops.push(Op::Apply(
            d.policy_upsert.len(),
            d.policy_remove.len(),
            d.ipcache_v4_upsert.len(),
            d.ipcache_v4_remove.len(),
        ));
        for (k, v) in &d.ipcache_v4_upsert {
            self.ipcache_v4.insert(*k, *v);
        }
        if self.fail_policy_writes && !d.policy_upsert.is_empty() {
            return Err(policy_full());
        }
        for (k, v) in &d.policy_upsert {
            self.policy.insert(*k, *v);
        }
        for k in &d.policy_remove {
            self.policy.remove(k);
        }
        for k in &d.ipcache_v4_remove {
            self.ipcache_v4.remove(k);
        }
        Ok(())
    }
    fn sync_maps(&mut self, desired: &NodeMaps) -> Result<(), DataplaneError> {
        self.ops.push(Op::SyncMaps);
        if self.fail_policy_writes {
            return Err(policy_full());
        }
        self.ipcache_v4 = desired.ipcache_v4.clone();
        self.ipcache_v6 = desired.ipcache_v6.clone();
        self.policy = desired.policy.clone();
        Ok(())
    }
    fn upsert_endpoint(&mut self, ifindex: u32, info: EndpointInfo) -> Result<(), DataplaneError> {
        self.ops.push(Op::Upsert(ifindex, info));
        self.endpoints.insert(ifindex, info);
        Ok(())
    }
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.ops.push(Op::Remove(ifindex));
        self.endpoints.remove(&ifindex);
        Ok(())
    }
    fn attach_endpoint(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        self.ops.push(Op::Attach(ifname.into()));
        self.attached.insert(ifname.into(), Role::Endpoint);
        Ok(())
    }
    fn attach_uplink(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        self.ops.push(Op::AttachUplink(ifname.into()));
        self.attached.insert(ifname.into(), Role::Uplink);
        Ok(())
    }
    fn detach(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        self.ops.push(Op::Detach(ifname.into()));
        self.attached.remove(ifname);
        Ok(())
    }
    fn attached(&self) -> Vec<(String, Role)> {
        self.attached.iter().map(|(n, r)| (n.clone(), *r)).collect()
    }
    fn adopted(&self) -> Adopted {
        Adopted {
            endpoints: self.endpoints.clone(),
            ipcache_v4: self.ipcache_v4.clone(),
            ipcache_v6: self.ipcache_v6.clone(),
            policy_identities: self.policy.keys().map(|k| k.identity).collect(),
        }
    }
}

const NODE: &str = "node-1";

fn pod(name: &str, app: &str, ip: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"namespace": "t", "name": name, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"containerPort": 80}]}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.0.2.1"}
    }))
    .unwrap()
}

fn deny_ingress(app: &str) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"namespace": "t", "name": format!("deny-{app}")},
        "spec": {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}]}]}
    }))
    .unwrap()
}

struct World {
    cluster: Cluster,
    /// pod → (ifindex, ifname)
    veths: BTreeMap<String, (u32, String)>,
}

impl World {
    fn new() -> Self {
        let mut cluster = Cluster::default();
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "t",
            "labels": {"kubernetes.io/metadata.name": "t"}}}))
        .unwrap();
        cluster.namespaces.insert("t".into(), ns);
        Self {
            cluster,
            veths: BTreeMap::new(),
        }
    }

    fn add_pod(&mut self, name: &str, app: &str, ip: &str, veth: Option<u32>) {
        self.cluster
            .pods
            .insert(ObjectKey::new("t", name), pod(name, app, ip, NODE).into());
        if let Some(i) = veth {
            self.veths.insert(name.into(), (i, format!("veth{i}")));
        }
    }

    fn found(&self) -> BTreeMap<ObjectKey, HostInterface> {
        self.veths
            .iter()
            .map(|(pod, (i, n))| {
                (
                    ObjectKey::new("t", pod.clone()),
                    HostInterface {
                        ifindex: *i,
                        name: n.clone(),
                        shape: Shape::PointToPoint,
                    },
                )
            })
            .collect()
    }

    fn present(&self) -> BTreeMap<u32, String> {
        self.veths.values().map(|(i, n)| (*i, n.clone())).collect()
    }

    fn sync(&self, s: &mut Syncer<Fake>) -> policy_agent::sync::Report {
        let node = NodeContext {
            node_name: NODE.into(),
            node_ips: vec!["192.0.2.1".parse().unwrap()],
        };
        let c = s.compile(&self.cluster, &node);
        s.write(&c, &self.found(), &self.present(), &["uplink0".to_string()])
    }
}

fn position(ops: &[Op], f: impl Fn(&Op) -> bool) -> usize {
    ops.iter()
        .position(f)
        .unwrap_or_else(|| panic!("missing op in {ops:#?}"))
}

#[test]
fn new_isolated_pod_gets_allow_entries_before_isolation_and_entry_before_attachment() {
    let mut w = World::new();
    w.add_pod("client", "client", "10.244.1.2", Some(12));
    w.cluster
        .policies
        .insert(ObjectKey::new("t", "deny-web"), deny_ingress("web"));
    let mut s = Syncer::new(Fake::default());
    assert!(w.sync(&mut s).complete);
    s.enforcer_mut().take_ops();

    w.add_pod("web", "web", "10.244.1.3", Some(13));
    let report = w.sync(&mut s);
    assert!(report.complete, "{:?}", report.problems);
    let ops = s.enforcer_mut().take_ops();
    let allow = position(&ops, |o| matches!(o, Op::Apply(p, _, _, _) if *p > 0));
    let entry = position(
        &ops,
        |o| matches!(o, Op::Upsert(13, info) if info.flags & endpoint_flags::INGRESS_ISOLATED != 0),
    );
    let attach = position(&ops, |o| *o == Op::Attach("veth13".into()));
    assert!(allow < entry && entry < attach, "{ops:#?}");
    assert!(
        !ops.iter()
            .any(|o| matches!(o, Op::Detach(_) | Op::Remove(_))),
        "{ops:#?}"
    );
}

#[test]
fn endpoint_without_interface_is_reported_and_attached_when_it_appears() {
    let mut w = World::new();
    w.cluster
        .policies
        .insert(ObjectKey::new("t", "deny-web"), deny_ingress("web"));
    w.add_pod("web", "web", "10.244.1.3", None);
    let mut s = Syncer::new(Fake::default());
    let report = w.sync(&mut s);
    assert!(
        !report.complete,
        "an endpoint without interface is not enforced"
    );
    assert_eq!(report.endpoints_no_interface, 1);
    assert!(
        report.problems.iter().any(|p| p.contains("t/web")),
        "{:?}",
        report.problems
    );
    assert!(
        !s.enforcer_mut()
            .take_ops()
            .iter()
            .any(|o| matches!(o, Op::Attach(_))),
        "nothing to attach yet"
    );

    w.veths.insert("web".into(), (21, "veth21".into()));
    let report = w.sync(&mut s);
    assert!(report.complete);
    let ops = s.enforcer_mut().take_ops();
    let entry = position(
        &ops,
        |o| matches!(o, Op::Upsert(21, i) if i.flags & endpoint_flags::INGRESS_ISOLATED != 0),
    );
    let attach = position(&ops, |o| *o == Op::Attach("veth21".into()));
    assert!(entry < attach);
}

#[test]
fn vanished_pod_is_detached_before_its_entry_goes_and_map_removals_come_last() {
    let mut w = World::new();
    w.add_pod("client", "client", "10.244.1.2", Some(12));
    w.add_pod("web", "web", "10.244.1.3", Some(13));
    w.cluster
        .policies
        .insert(ObjectKey::new("t", "deny-web"), deny_ingress("web"));
    let mut s = Syncer::new(Fake::default());
    assert!(w.sync(&mut s).complete);
    s.enforcer_mut().take_ops();

    w.cluster.pods.remove(&ObjectKey::new("t", "web"));
    w.veths.remove("web");
    assert!(w.sync(&mut s).complete);
    let ops = s.enforcer_mut().take_ops();
    let detach = position(&ops, |o| *o == Op::Detach("veth13".into()));
    let remove = position(&ops, |o| *o == Op::Remove(13));
    let removals = position(&ops, |o| matches!(o, Op::Apply(0, r, _, _) if *r > 0));
    assert!(detach < remove && remove < removals, "{ops:#?}");
    assert!(s.enforcer().policy.is_empty(), "no stale allow entries");
    assert!(!s.enforcer().endpoints.contains_key(&13));
}

#[test]
fn lifting_isolation_updates_the_endpoint_before_removing_its_entries() {
    let mut w = World::new();
    w.add_pod("client", "client", "10.244.1.2", Some(12));
    w.add_pod("web", "web", "10.244.1.3", Some(13));
    w.cluster
        .policies
        .insert(ObjectKey::new("t", "deny-web"), deny_ingress("web"));
    let mut s = Syncer::new(Fake::default());
    assert!(w.sync(&mut s).complete);
    s.enforcer_mut().take_ops();

    w.cluster.policies.clear();
    assert!(w.sync(&mut s).complete);
    let ops = s.enforcer_mut().take_ops();
    let open = position(
        &ops,
        |o| matches!(o, Op::Upsert(13, i) if i.flags & endpoint_flags::INGRESS_ISOLATED == 0),
    );
    let removals = position(&ops, |o| matches!(o, Op::Apply(0, r, _, _) if *r > 0));
    assert!(open < removals, "{ops:#?}");
}

#[test]
fn failed_policy_writes_fail_closed_and_are_retried_against_the_maps() {
    let mut w = World::new();
    w.add_pod("client", "client", "10.244.1.2", Some(12));
    w.add_pod("web", "web", "10.244.1.3", Some(13));
    let mut s = Syncer::new(Fake::default());
    assert!(w.sync(&mut s).complete);

    w.cluster
        .policies
        .insert(ObjectKey::new("t", "deny-web"), deny_ingress("web"));
    s.enforcer_mut().fail_policy_writes = true;
    let report = w.sync(&mut s);
    assert!(!report.complete && report.maps_failed);
    let web = s.enforcer().endpoints[&13];
    assert_ne!(
        web.flags & endpoint_flags::NOT_PROGRAMMED,
        0,
        "the pod whose allow entries are missing drops new flows"
    );
    assert_eq!(
        s.enforcer().endpoints[&12].flags & endpoint_flags::NOT_PROGRAMMED,
        0,
        "other pods are unaffected"
    );

    s.enforcer_mut().fail_policy_writes = false;
    s.enforcer_mut().take_ops();
    let report = w.sync(&mut s);
    assert!(report.complete, "{:?}", report.problems);
    let ops = s.enforcer_mut().take_ops();
    assert!(
        ops.contains(&Op::SyncMaps),
        "after a failure the maps are compared: {ops:#?}"
    );
    assert_eq!(
        s.enforcer().endpoints[&13].flags & endpoint_flags::NOT_PROGRAMMED,
        0
    );
    assert!(!s.enforcer().policy.is_empty());
}

#[test]
fn restarted_agent_reproduces_the_kernel_state_without_changing_a_number() {
    // History the first agent saw: pods and policies arriving one by one, one pod deleted. Its
    // numbering differs from what a fresh compiler assigns to the final state.
    let mut w = World::new();
    let mut first = Syncer::new(Fake::default());
    w.add_pod("old", "old", "10.244.1.9", Some(19));
    assert!(w.sync(&mut first).complete);
    w.add_pod("web", "web", "10.244.1.3", Some(13));
    w.cluster
        .policies
        .insert(ObjectKey::new("t", "deny-web"), deny_ingress("web"));
    assert!(w.sync(&mut first).complete);
    w.cluster.pods.remove(&ObjectKey::new("t", "old"));
    w.veths.remove("old");
    w.add_pod("client", "client", "10.244.1.2", Some(12));
    w.add_pod("db", "db", "10.244.1.4", Some(14));
    w.cluster
        .policies
        .insert(ObjectKey::new("t", "deny-db"), deny_ingress("db"));
    assert!(w.sync(&mut first).complete);

    // A fresh compiler numbers the same state differently.
    let node = NodeContext {
        node_name: NODE.into(),
        node_ips: vec!["192.0.2.1".parse().unwrap()],
    };
    let fresh = policy_agent::compiler::Compiler::new().compile(&w.cluster, &node);
    let kernel = first.into_enforcer();
    let kernel_ids: BTreeSet<u32> = kernel.endpoints.values().map(|i| i.id).collect();
    let fresh_ids: BTreeSet<u32> = fresh.maps.endpoints.values().map(|e| e.id).collect();
    assert_ne!(
        kernel_ids, fresh_ids,
        "the scenario must renumber to mean anything"
    );

    // The restarted agent adopts the kernel's state: nothing it writes changes a number.
    let before = (
        kernel.endpoints.clone(),
        kernel.ipcache_v4.clone(),
        kernel.policy.keys().cloned().collect::<BTreeSet<_>>(),
    );
    let mut second = Syncer::new(Fake {
        endpoints: kernel.endpoints,
        ipcache_v4: kernel.ipcache_v4,
        policy: kernel.policy,
        attached: kernel.attached,
        ..Default::default()
    });
    let report = w.sync(&mut second);
    assert!(report.complete, "{:?}", report.problems);
    let after = second.enforcer();
    assert_eq!(
        after.endpoints, before.0,
        "endpoint ids and identities kept"
    );
    assert_eq!(after.ipcache_v4, before.1, "identities kept");
    assert_eq!(
        after.policy.keys().cloned().collect::<BTreeSet<_>>(),
        before.2,
        "the same allow entries"
    );
    let ops = &after.ops;
    assert!(
        !ops.iter()
            .any(|o| matches!(o, Op::Detach(_) | Op::Remove(_))),
        "nothing torn down: {ops:#?}"
    );
}
