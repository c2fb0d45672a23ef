//! The reference NetworkPolicy implementation, `sigs.k8s.io/kube-network-policies` (v0.8.0, the
//! one kindnet embeds), as a per-node process of the lab in place of `policy-agent`.
//!
//! The upstream command is built unmodified from the pinned module in `tests/kube/knp`. It knows
//! only the in-cluster configuration, so the lab starts it the way a kubelet starts a pod: the
//! `policy-agent` ServiceAccount's token and the cluster CA at
//! `/var/run/secrets/kubernetes.io/serviceaccount` (in a private mount namespace of the process)
//! and `KUBERNETES_SERVICE_HOST`/`PORT` in its environment. It runs in the node's network
//! namespace, watches Pods, Namespaces and NetworkPolicies, and sends the first packet of every
//! new connection of a selected local pod through nftables (table `inet kube-network-policies`)
//! to an nfqueue that it judges in userspace. It reports no enforced state, so the lab waits a
//! fixed time after every change ([`super::kube::PEER_SETTLE`]).

/// The binary's file name in the cache of built components.
pub const BINARY: &str = "kube-network-policies";

/// Where its metrics server listens: the node namespace's loopback.
pub const METRICS_ADDR: &str = "127.0.0.1:9080";

/// Its arguments on the lab node `node_name`: AdminNetworkPolicy and BaselineAdminNetworkPolicy
/// off (they need the network-policy-api CRDs), packets dropped rather than passed while it is
/// not reading its queue (fail closed, as policy-agent is).
pub fn args(node_name: &str) -> Vec<String> {
    vec![
        format!("--hostname-override={node_name}"),
        format!("--metrics-bind-address={METRICS_ADDR}"),
        "--admin-network-policy=false".into(),
        "--baseline-admin-network-policy=false".into(),
        "--fail-open=false".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_name_the_node_and_listen_on_loopback() {
        let a = args("node-1");
        assert!(a.contains(&"--hostname-override=node-1".to_string()));
        assert!(a.iter().any(|x| x.ends_with("=127.0.0.1:9080")));
        assert!(a.contains(&"--fail-open=false".to_string()));
    }
}
