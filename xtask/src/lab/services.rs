//! Services the way kube-proxy (nftables mode) implements them: endpoints from the selector and
//! `targetPort` (a number, or a name looked up on each pod's container ports with the same
//! protocol), then per node a DNAT ruleset choosing a random endpoint, masquerade for hairpin
//! traffic (kube-proxy's 0x4000 mark) and for pod traffic leaving the cluster (as kindnet does), and
//! a reject for ClusterIP traffic nothing answers. A dual-stack Service has a ClusterIP of each
//! family; each is translated to the endpoints' addresses of its own family, as kube-proxy's
//! proxier of that family does.

use std::{collections::BTreeMap, fmt::Write, net::IpAddr};

use k8s_openapi::{
    api::core::v1::{Pod, Service, ServiceSpec},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::topology::{self as topo, Family, MASQ_MARK};

/// One port of one Service with its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `ns/name`.
    pub service: String,
    pub port_name: String,
    /// One of the Service's ClusterIPs; the endpoints are of its family.
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub protocol: String,
    /// Pod key (`ns/name`), pod IP, target port.
    pub endpoints: Vec<(String, IpAddr, u16)>,
}

/// A pod as the endpoints controller sees it.
pub struct PodView<'a> {
    pub key: &'a str,
    pub pod: &'a Pod,
    /// `status.podIPs`.
    pub ips: &'a [IpAddr],
}

pub fn protocol_of(p: Option<&str>) -> &str {
    p.unwrap_or("TCP")
}

/// A Service's ClusterIPs as written: `clusterIPs`, or else `clusterIP` (`None` for a headless
/// Service).
pub fn cluster_ips(spec: &ServiceSpec) -> Vec<String> {
    match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.clone(),
        _ => spec.cluster_ip.iter().cloned().collect(),
    }
}

/// The addresses among a Service's [`cluster_ips`] (none for a headless Service).
pub fn cluster_addrs(spec: &ServiceSpec) -> Vec<IpAddr> {
    cluster_ips(spec)
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect()
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

/// Every port of every ClusterIP of every Service, with endpoints among `pods`.
pub fn service_ports<'a>(
    services: impl IntoIterator<Item = (&'a String, &'a Service)>,
    pods: &[PodView<'_>],
) -> Vec<ServicePort> {
    let mut out = Vec::new();
    for (key, svc) in services {
        let Some(spec) = &svc.spec else { continue };
        let ips = cluster_addrs(spec);
        let ns = svc.metadata.namespace.as_deref().unwrap_or_default();
        for (ip, p) in ips
            .iter()
            .flat_map(|ip| spec.ports.iter().flatten().map(move |p| (*ip, p)))
        {
            let family = Family::of(ip);
            let protocol = protocol_of(p.protocol.as_deref()).to_string();
            let endpoints = pods
                .iter()
                .filter(|v| v.pod.metadata.namespace.as_deref() == Some(ns))
                .filter(|v| selects(spec.selector.as_ref(), v.pod))
                .filter_map(|v| {
                    let addr = v.ips.iter().copied().find(|a| Family::of(*a) == family)?;
                    resolve_target(p.target_port.as_ref(), p.port, &protocol, v.pod)
                        .map(|tp| (v.key.to_string(), addr, tp))
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
/// endpoint-slice controller publishes them, and one set per address family of the Service's
/// ClusterIPs (`addressType`). `nodes` maps pod keys to node names.
pub fn endpoint_slices(
    ports: &[ServicePort],
    nodes: &BTreeMap<&str, String>,
) -> BTreeMap<String, serde_json::Value> {
    // service -> pod -> its ports (name, target port, protocol)
    let mut by_service: BTreeMap<(&str, Family), BTreeMap<&str, PodPorts>> = BTreeMap::new();
    for sp in ports {
        let pods = by_service
            .entry((&sp.service, Family::of(sp.cluster_ip)))
            .or_default();
        for (pod, _, tp) in &sp.endpoints {
            pods.entry(pod)
                .or_default()
                .push((sp.port_name.clone(), *tp, sp.protocol.clone()));
        }
    }
    let ip_of: BTreeMap<(&str, Family), IpAddr> = ports
        .iter()
        .flat_map(|sp| {
            sp.endpoints
                .iter()
                .map(|(k, ip, _)| ((k.as_str(), Family::of(*ip)), *ip))
        })
        .collect();
    let mut out = BTreeMap::new();
    for ((service, family), pods) in by_service {
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
            let slice_name = match family {
                Family::V4 => format!("{name}-{i}"),
                Family::V6 => format!("{name}-ipv6-{i}"),
            };
            let endpoints: Vec<serde_json::Value> = pods
                .iter()
                .map(|pod| {
                    let pod_name = pod.split_once('/').map(|(_, n)| n).unwrap_or_default();
                    serde_json::json!({
                        "addresses": [ip_of[&(*pod, family)].to_string()],
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
                    "addressType": family.kube_name(),
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

/// The complete ruleset of a lab of `families`, replacing any previous one atomically: one
/// table per family, each translating the ClusterIPs of its family.
pub fn render(ports: &[ServicePort], families: &[Family]) -> String {
    families.iter().map(|f| render_family(ports, *f)).collect()
}

fn render_family(ports: &[ServicePort], family: Family) -> String {
    let mut s = String::new();
    let ip = family.nft();
    let pods = topo::pod_cidr(family);
    let nodes = topo::node_cidr(family);
    let svcs = topo::service_cidr(family);
    // `table` first so that `delete` never fails on a fresh node.
    let _ = writeln!(
        s,
        "table {ip} {TABLE}\ndelete table {ip} {TABLE}\ntable {ip} {TABLE} {{"
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
         \t\t{ip} saddr {pods} {ip} daddr != {{ {pods}, {nodes} }} oifname \"eth0\" masquerade\n\t}}"
    );
    // ClusterIP traffic no rule translated (no endpoints, unknown port) is rejected, as kube-proxy does.
    for (chain, hook) in [("filter_forward", "forward"), ("filter_output", "output")] {
        let _ = writeln!(
            s,
            "\tchain {chain} {{\n\t\ttype filter hook {hook} priority 0; policy accept;\n\t\t{ip} daddr {svcs} reject\n\t}}"
        );
    }
    let mut dispatch = String::new();
    for (i, sp) in ports.iter().enumerate() {
        let proto = sp.protocol.to_lowercase();
        if sp.endpoints.is_empty() || Family::of(sp.cluster_ip) != family {
            continue;
        }
        let _ = writeln!(
            dispatch,
            "\t\t{ip} daddr {} {proto} dport {} jump svc_{i} comment \"{} {}\"",
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
        for (j, (pod, addr, tp)) in sp.endpoints.iter().enumerate() {
            let to = std::net::SocketAddr::new(*addr, *tp);
            let _ = writeln!(
                s,
                "\tchain sep_{i}_{j} {{\n\t\t{ip} saddr {addr} meta mark set meta mark | {MASQ_MARK:#x}\n\t\tmeta l4proto {proto} dnat to {to} comment \"{pod}\"\n\t}}"
            );
        }
    }
    let _ = writeln!(s, "\tchain services {{\n{dispatch}\t}}\n}}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

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
                ips: &[IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2))],
            },
            PodView {
                key: "x/b",
                pod: &b,
                ips: &[IpAddr::V4(Ipv4Addr::new(10, 244, 2, 2))],
            },
            PodView {
                key: "y/c",
                pod: &c,
                ips: &[IpAddr::V4(Ipv4Addr::new(10, 244, 1, 3))],
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
                ("x/a".into(), IpAddr::V4(Ipv4Addr::new(10, 244, 1, 2)), 8080),
                ("x/b".into(), IpAddr::V4(Ipv4Addr::new(10, 244, 2, 2)), 9090)
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

        let rules = render(&sp, &[Family::V4]);
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

    #[test]
    fn dual_stack_services_translate_each_family_to_its_own_addresses() {
        let a = pod("x", "a", &[("app", "web")], &[("http", 8080, "TCP")]);
        let ips: [IpAddr; 2] = [
            "10.244.1.2".parse().unwrap(),
            "fd00:10:244:1::2".parse().unwrap(),
        ];
        let pods = [PodView {
            key: "x/a",
            pod: &a,
            ips: &ips,
        }];
        let mut s = svc(
            "x",
            "web",
            "10.96.0.5",
            &[("app", "web")],
            serde_json::json!([{"name": "http", "port": 80, "targetPort": "http"}]),
        );
        s.spec.as_mut().unwrap().cluster_ips =
            Some(vec!["10.96.0.5".into(), "fd00:10:96::5".into()]);
        let key = "x/web".to_string();
        let sp = service_ports([(&key, &s)], &pods);
        assert_eq!(sp.len(), 2);
        assert_eq!(sp[1].cluster_ip, "fd00:10:96::5".parse::<IpAddr>().unwrap());
        assert_eq!(sp[1].endpoints[0].1, ips[1]);
        let slices = endpoint_slices(&sp, &[("x/a", "node-1".to_string())].into());
        assert_eq!(slices["endpointslice.x.web-0.yaml"]["addressType"], "IPv4");
        let v6 = &slices["endpointslice.x.web-ipv6-0.yaml"];
        assert_eq!(v6["addressType"], "IPv6");
        assert_eq!(v6["endpoints"][0]["addresses"][0], "fd00:10:244:1::2");
        let rules = render(&sp, &[Family::V4, Family::V6]);
        assert!(rules.contains("table ip lab {"), "{rules}");
        assert!(rules.contains("table ip6 lab {"), "{rules}");
        assert!(
            rules.contains("ip6 daddr fd00:10:96::5 tcp dport 80 jump svc_1"),
            "{rules}"
        );
        assert!(
            rules.contains("meta l4proto tcp dnat to [fd00:10:244:1::2]:8080"),
            "{rules}"
        );
        assert!(
            rules.contains("ip6 daddr fd00:10:96::/112 reject"),
            "{rules}"
        );
        // Each family's table translates only its own ClusterIPs.
        let v4_only = render(&sp, &[Family::V4]);
        assert!(!v4_only.contains("fd00"), "{v4_only}");
    }
}
