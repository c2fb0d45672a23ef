//! Services the way kube-proxy (nftables mode) implements them: endpoints from the selector and
//! `targetPort` (a number, or a name looked up on each pod's container ports with the same
//! protocol), then per node a DNAT ruleset choosing a random endpoint, masquerade for hairpin
//! traffic (kube-proxy's 0x4000 mark) and for pod traffic leaving the cluster (as kindnet does), and
//! a reject for ClusterIP traffic nothing answers.

use std::{collections::BTreeMap, fmt::Write, net::Ipv4Addr};

use k8s_openapi::{
    api::core::v1::{Pod, Service},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::topology::{MASQ_MARK, NODE_CIDR, POD_CIDR, SERVICE_CIDR, cidr};

/// One port of one Service with its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `ns/name`.
    pub service: String,
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    /// Pod key (`ns/name`), pod IP, target port.
    pub endpoints: Vec<(String, Ipv4Addr, u16)>,
}

/// A pod as the endpoints controller sees it.
pub struct PodView<'a> {
    pub key: &'a str,
    pub pod: &'a Pod,
    pub ip: Ipv4Addr,
}

pub fn protocol_of(p: Option<&str>) -> &str {
    p.unwrap_or("TCP")
}

/// Whether a Service selector (a plain label map) selects a pod. An empty or absent selector
/// selects nothing (Services without selectors get no managed endpoints).
pub fn selects(selector: Option<&BTreeMap<String, String>>, pod: &Pod) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return false;
    };
    let labels = pod.metadata.labels.as_ref();
    sel.iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The port a pod serves for a Service port's targetPort: a number as given; a name resolved on
/// the pod's container ports with the same protocol (no match: the pod is no endpoint for it).
pub fn resolve_target(
    target: Option<&IntOrString>,
    port: i32,
    protocol: &str,
    pod: &Pod,
) -> Option<u16> {
    match target {
        None => u16::try_from(port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|cp| {
                cp.name.as_deref() == Some(name) && protocol_of(cp.protocol.as_deref()) == protocol
            })
            .and_then(|cp| u16::try_from(cp.container_port).ok()),
    }
}

/// Every port of every Service with a ClusterIP, with endpoints among `pods`.
pub fn service_ports<'a>(
    services: impl IntoIterator<Item = (&'a String, &'a Service)>,
    pods: &[PodView<'_>],
) -> Vec<ServicePort> {
    let mut out = Vec::new();
    for (key, svc) in services {
        let Some(spec) = &svc.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        for p in spec.ports.iter().flatten() {
            let protocol = protocol_of(p.protocol.as_deref()).to_string();
            let endpoints = pods
                .iter()
                .filter(|v| v.pod.metadata.namespace.as_deref() == Some(ns))
                .filter(|v| selects(spec.selector.as_ref(), v.pod))
                .filter_map(|v| {
                    resolve_target(p.target_port.as_ref(), p.port, &protocol, v.pod)
                        .map(|tp| (v.key.to_string(), v.ip, tp))
                })
                .collect();
            out.push(ServicePort {
                service: key.clone(),
                port_name: p.name.clone().unwrap_or_default(),
                cluster_ip: ip,
                port: p.port as u16,
                protocol,
                endpoints,
            });
        }
    }
    out
}

/// A pod's ports for one Service: (port name, target port, protocol).
type PodPorts = Vec<(String, u16, String)>;

/// EndpointSlices (discovery.k8s.io/v1) for the Services' endpoints, by manifest file name: one
/// slice per Service and distinct port mapping (named target ports may differ per pod), as the
/// endpoint-slice controller publishes them. `nodes` maps pod keys to node names.
pub fn endpoint_slices(
    ports: &[ServicePort],
    nodes: &BTreeMap<&str, String>,
) -> BTreeMap<String, serde_json::Value> {
    // service -> pod -> its ports (name, target port, protocol)
    let mut by_service: BTreeMap<&str, BTreeMap<&str, PodPorts>> = BTreeMap::new();
    for sp in ports {
        let pods = by_service.entry(&sp.service).or_default();
        for (pod, _, tp) in &sp.endpoints {
            pods.entry(pod)
                .or_default()
                .push((sp.port_name.clone(), *tp, sp.protocol.clone()));
        }
    }
    let ip_of: BTreeMap<&str, Ipv4Addr> = ports
        .iter()
        .flat_map(|sp| sp.endpoints.iter().map(|(k, ip, _)| (k.as_str(), *ip)))
        .collect();
    let mut out = BTreeMap::new();
    for (service, pods) in by_service {
        let (ns, name) = service.split_once('/').unwrap_or_default();
        let mut groups: BTreeMap<&PodPorts, Vec<&str>> = BTreeMap::new();
        for (pod, pod_ports) in &pods {
            groups.entry(pod_ports).or_default().push(pod);
        }
        let slices: Vec<(Vec<serde_json::Value>, Vec<&str>)> = if groups.is_empty() {
            vec![(Vec::new(), Vec::new())]
        } else {
            groups
                .into_iter()
                .map(|(pp, pods)| {
                    let ports = pp
                        .iter()
                        .map(|(n, p, proto)| serde_json::json!({"name": n, "port": p, "protocol": proto}))
                        .collect();
                    (ports, pods)
                })
                .collect()
        };
        for (i, (slice_ports, pods)) in slices.into_iter().enumerate() {
            let slice_name = format!("{name}-{i}");
            let endpoints: Vec<serde_json::Value> = pods
                .iter()
                .map(|pod| {
                    let pod_name = pod.split_once('/').map(|(_, n)| n).unwrap_or_default();
                    serde_json::json!({
                        "addresses": [ip_of[pod].to_string()],
                        "conditions": {"ready": true, "serving": true, "terminating": false},
                        "nodeName": nodes.get(pod),
                        "targetRef": {"kind": "Pod", "namespace": ns, "name": pod_name}
                    })
                })
                .collect();
            out.insert(
                format!("endpointslice.{ns}.{slice_name}.yaml"),
                serde_json::json!({
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {"name": slice_name, "namespace": ns, "labels": {
                        "kubernetes.io/service-name": name,
                        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                    "ports": slice_ports,
                }),
            );
        }
    }
    out
}

/// The nftables table of one node (the same for every node: Services are cluster-wide).
pub const TABLE: &str = "lab";

/// The complete ruleset, replacing any previous one atomically.
pub fn render(ports: &[ServicePort]) -> String {
    let mut s = String::new();
    let pods = cidr(POD_CIDR);
    let nodes = cidr(NODE_CIDR);
    let svcs = cidr(SERVICE_CIDR);
    // `table` first so that `delete` never fails on a fresh node.
    let _ = writeln!(
        s,
        "table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{"
    );
    let _ = writeln!(
        s,
        "\tchain prerouting {{\n\t\ttype nat hook prerouting priority -100; policy accept;\n\t\tjump services\n\t}}"
    );
    let _ = writeln!(
        s,
        "\tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}}"
    );
    let _ = writeln!(
        s,
        "\tchain postrouting {{\n\t\ttype nat hook postrouting priority 100; policy accept;\n\
         \t\tmeta mark & {MASQ_MARK:#x} == {MASQ_MARK:#x} meta mark set meta mark ^ {MASQ_MARK:#x} masquerade\n\
         \t\tip saddr {pods} ip daddr != {{ {pods}, {nodes} }} oifname \"eth0\" masquerade\n\t}}"
    );
    // ClusterIP traffic no rule translated (no endpoints, unknown port) is rejected, as kube-proxy does.
    for (chain, hook) in [("filter_forward", "forward"), ("filter_output", "output")] {
        let _ = writeln!(
            s,
            "\tchain {chain} {{\n\t\ttype filter hook {hook} priority 0; policy accept;\n\t\tip daddr {svcs} reject\n\t}}"
        );
    }
    let mut dispatch = String::new();
    for (i, sp) in ports.iter().enumerate() {
        let proto = sp.protocol.to_lowercase();
        if sp.endpoints.is_empty() {
            continue;
        }
        let _ = writeln!(
            dispatch,
            "\t\tip daddr {} {proto} dport {} jump svc_{i} comment \"{} {}\"",
            sp.cluster_ip, sp.port, sp.service, sp.port_name
        );
        let n = sp.endpoints.len();
        let _ = write!(s, "\tchain svc_{i} {{\n\t\t");
        if n == 1 {
            let _ = writeln!(s, "jump sep_{i}_0");
        } else {
            let arms: Vec<String> = (0..n).map(|j| format!("{j} : jump sep_{i}_{j}")).collect();
            let _ = writeln!(s, "numgen random mod {n} vmap {{ {} }}", arms.join(", "));
        }
        let _ = writeln!(s, "\t}}");
        for (j, (pod, ip, tp)) in sp.endpoints.iter().enumerate() {
            let _ = writeln!(
                s,
                "\tchain sep_{i}_{j} {{\n\t\tip saddr {ip} meta mark set meta mark | {MASQ_MARK:#x}\n\t\tmeta l4proto {proto} dnat to {ip}:{tp} comment \"{pod}\"\n\t}}"
            );
        }
    }
    let _ = writeln!(s, "\tchain services {{\n{dispatch}\t}}\n}}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)], ports: &[(&str, i32, &str)]) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns,
                "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_,_>>()},
            "spec": {"containers": [{"name": "c", "ports": ports.iter().map(|(n, p, proto)|
                serde_json::json!({"name": n, "containerPort": p, "protocol": proto})).collect::<Vec<_>>()}]}
        }))
        .unwrap()
    }

    fn svc(
        ns: &str,
        name: &str,
        ip: &str,
        sel: &[(&str, &str)],
        ports: serde_json::Value,
    ) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": ip, "ports": ports,
                "selector": sel.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_,_>>()}
        }))
        .unwrap()
    }

    #[test]
    fn endpoints_follow_selector_namespace_and_named_target_ports() {
        let a = pod(
            "x",
            "a",
            &[("app", "web")],
            &[("http", 8080, "TCP"), ("dns", 53, "UDP")],
        );
        let b = pod("x", "b", &[("app", "web")], &[("http", 9090, "TCP")]);
        let c = pod("y", "c", &[("app", "web")], &[("http", 8080, "TCP")]);
        let pods = [
            PodView {
                key: "x/a",
                pod: &a,
                ip: Ipv4Addr::new(10, 244, 1, 2),
            },
            PodView {
                key: "x/b",
                pod: &b,
                ip: Ipv4Addr::new(10, 244, 2, 2),
            },
            PodView {
                key: "y/c",
                pod: &c,
                ip: Ipv4Addr::new(10, 244, 1, 3),
            },
        ];
        let s = svc(
            "x",
            "web",
            "10.96.0.5",
            &[("app", "web")],
            serde_json::json!([
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
                {"name": "raw", "port": 81, "targetPort": 81}
            ]),
        );
        let key = "x/web".to_string();
        let sp = service_ports([(&key, &s)], &pods);
        assert_eq!(sp.len(), 3);
        assert_eq!(
            sp[0].endpoints,
            vec![
                ("x/a".into(), Ipv4Addr::new(10, 244, 1, 2), 8080),
                ("x/b".into(), Ipv4Addr::new(10, 244, 2, 2), 9090)
            ]
        );
        // named port resolved per pod and per protocol: only x/a serves "dns" over UDP
        assert_eq!(sp[1].endpoints.len(), 1);
        assert_eq!(sp[1].endpoints[0].2, 53);
        // numeric targetPort: every selected pod of the namespace
        assert_eq!(
            sp[2].endpoints.iter().map(|e| e.2).collect::<Vec<_>>(),
            vec![81, 81]
        );

        let nodes: BTreeMap<&str, String> =
            [("x/a", "node-1".to_string()), ("x/b", "node-2".to_string())].into();
        let slices = endpoint_slices(&sp, &nodes);
        // x/a and x/b map the named ports differently: two slices
        assert_eq!(slices.len(), 2, "{slices:#?}");
        let a = &slices["endpointslice.x.web-0.yaml"];
        assert_eq!(a["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        assert_eq!(a["endpoints"][0]["addresses"][0], "10.244.1.2");
        assert_eq!(a["endpoints"][0]["nodeName"], "node-1");
        assert_eq!(a["ports"].as_array().unwrap().len(), 3);
        let b = &slices["endpointslice.x.web-1.yaml"];
        assert_eq!(b["ports"][0]["port"], 9090);

        let rules = render(&sp);
        assert!(
            rules.contains("ip daddr 10.96.0.5 tcp dport 80 jump svc_0"),
            "{rules}"
        );
        assert!(
            rules.contains("numgen random mod 2 vmap { 0 : jump sep_0_0, 1 : jump sep_0_1 }"),
            "{rules}"
        );
        assert!(
            rules.contains("meta l4proto tcp dnat to 10.244.2.2:9090"),
            "{rules}"
        );
        assert!(
            rules.contains("ip daddr 10.96.0.5 udp dport 53 jump svc_1"),
            "{rules}"
        );
        assert!(
            rules.contains("ip saddr 10.244.1.2 meta mark set meta mark | 0x4000"),
            "{rules}"
        );
    }

    #[test]
    fn empty_selector_selects_nothing() {
        let a = pod("x", "a", &[("app", "web")], &[]);
        assert!(!selects(None, &a));
        assert!(!selects(Some(&BTreeMap::new()), &a));
        assert!(selects(
            Some(&[("app".to_string(), "web".to_string())].into()),
            &a
        ));
    }
}
