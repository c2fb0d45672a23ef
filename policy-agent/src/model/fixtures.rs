//! Objects for unit tests, built the way the sources store them.

use std::net::IpAddr;

use k8s_openapi::api::{core::v1::Node, networking::v1::NetworkPolicy};
use serde_json::{Value, json};

use super::{Cluster, ObjectKey, PodInfo};

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A running pod on `node` with `labels` and `status.podIPs` = `ips` (`status.podIP` the first).
pub fn pod(node: &str, labels: Value, ips: &[&str]) -> PodInfo {
    let pod_ips: Vec<Value> = ips.iter().map(|i| json!({"ip": i})).collect();
    let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": ips.first(), "podIPs": pod_ips},
    }))
    .unwrap();
    p.into()
}

/// A Node with `status.addresses` = `addresses` (type, address).
pub fn node(name: &str, addresses: &[(&str, &str)]) -> Node {
    let addresses: Vec<Value> = addresses
        .iter()
        .map(|(t, a)| json!({"type": t, "address": a}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "status": {"addresses": addresses},
    }))
    .unwrap()
}

/// A NetworkPolicy `namespace/name` with `spec`.
pub fn policy(namespace: &str, name: &str, spec: Value) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }))
    .unwrap()
}

/// Adds `pod` as `namespace/name`.
pub fn add_pod(c: &mut Cluster, namespace: &str, name: &str, pod: PodInfo) -> ObjectKey {
    let key = ObjectKey::new(namespace, name);
    c.pods.insert(key.clone(), pod);
    key
}
