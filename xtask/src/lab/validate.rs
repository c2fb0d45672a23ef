//! API-server validation of the objects the lab accepts, following the apiserver's rules
//! (`pkg/apis/core/validation`, `pkg/apis/networking/validation`, apimachinery name and label
//! rules). Every error names the field, in the API's path notation.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    },
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use super::{objects::Object, topology};

type Errors = Vec<String>;

pub fn object(o: &Object) -> Errors {
    let mut e = Vec::new();
    match o {
        Object::Namespace(ns) => {
            name(
                &mut e,
                "metadata.name",
                ns.metadata.name.as_deref(),
                dns1123_label,
            );
            labels(&mut e, "metadata.labels", ns.metadata.labels.as_ref());
        }
        Object::Pod(p) => pod(&mut e, p),
        Object::Service(s) => service(&mut e, s),
        Object::NetworkPolicy(np) => policy(&mut e, np),
    }
    if let Object::Pod(_) | Object::Service(_) | Object::NetworkPolicy(_) = o {
        let ns = match o {
            Object::Pod(p) => p.metadata.namespace.as_deref(),
            Object::Service(s) => s.metadata.namespace.as_deref(),
            Object::NetworkPolicy(n) => n.metadata.namespace.as_deref(),
            Object::Namespace(_) => None,
        };
        name(&mut e, "metadata.namespace", ns, dns1123_label);
    }
    e
}

fn name(e: &mut Errors, path: &str, v: Option<&str>, rule: fn(&str) -> Option<String>) {
    match v {
        None | Some("") => e.push(format!("{path}: Required value")),
        Some(v) => {
            if let Some(msg) = rule(v) {
                e.push(format!("{path}: Invalid value {v:?}: {msg}"));
            }
        }
    }
}

fn pod(e: &mut Errors, p: &Pod) {
    name(
        e,
        "metadata.name",
        p.metadata.name.as_deref(),
        dns1123_subdomain,
    );
    labels(e, "metadata.labels", p.metadata.labels.as_ref());
    let Some(spec) = &p.spec else {
        e.push("spec: Required value".into());
        return;
    };
    if spec.host_network == Some(true) {
        e.push("spec.hostNetwork: Unsupported value true: lab pods get their own network namespace (hostNetwork pods are node traffic, not peers)".into());
    }
    if let Some(node) = &spec.node_name
        && topology::node_number(node).is_none()
    {
        e.push(format!(
            "spec.nodeName: Invalid value {node:?}: lab nodes are named node-1, node-2, …"
        ));
    }
    if spec.containers.is_empty() {
        e.push("spec.containers: Required value".into());
    }
    let mut names = BTreeSet::new();
    let mut port_names = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let path = format!("spec.containers[{i}]");
        name(e, &format!("{path}.name"), Some(&c.name), dns1123_label);
        if !names.insert(c.name.clone()) {
            e.push(format!("{path}.name: Duplicate value {:?}", c.name));
        }
        for (j, cp) in c.ports.iter().flatten().enumerate() {
            let path = format!("{path}.ports[{j}]");
            port_number(e, &format!("{path}.containerPort"), cp.container_port);
            let proto = protocol(e, &format!("{path}.protocol"), cp.protocol.as_deref());
            if let Some(n) = &cp.name {
                if let Some(msg) = iana_svc_name(n) {
                    e.push(format!("{path}.name: Invalid value {n:?}: {msg}"));
                }
                if !port_names.insert(n.clone()) {
                    e.push(format!("{path}.name: Duplicate value {n:?}"));
                }
            }
            if !ports.insert((cp.container_port, proto)) {
                e.push(format!(
                    "{path}: Duplicate value {}/{proto}: each container port and protocol can be served once",
                    cp.container_port
                ));
            }
        }
    }
}

fn service(e: &mut Errors, s: &Service) {
    name(
        e,
        "metadata.name",
        s.metadata.name.as_deref(),
        dns1035_label,
    );
    labels(e, "metadata.labels", s.metadata.labels.as_ref());
    let Some(spec) = &s.spec else {
        e.push("spec: Required value".into());
        return;
    };
    if let Some(t) = &spec.type_
        && t != "ClusterIP"
    {
        e.push(format!(
            "spec.type: Unsupported value {t:?}: the lab supports ClusterIP Services"
        ));
    }
    let given = spec
        .cluster_ip
        .iter()
        .map(|ip| ("spec.clusterIP".to_string(), ip))
        .chain(
            spec.cluster_ips
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip)),
        );
    for (path, ip) in given.filter(|(_, ip)| !ip.is_empty() && *ip != "None") {
        let in_range = ip.parse::<IpAddr>().is_ok_and(|a| {
            [topology::Family::V4, topology::Family::V6]
                .iter()
                .any(|f| topology::service_cidr(*f).contains(a))
        });
        if !in_range {
            e.push(format!(
                "{path}: Invalid value {ip:?}: must be in the service range {} or {}",
                topology::service_cidr(topology::Family::V4),
                topology::service_cidr(topology::Family::V6)
            ));
        }
    }
    if let Some(p) = spec.ip_family_policy.as_deref()
        && !["SingleStack", "PreferDualStack", "RequireDualStack"].contains(&p)
    {
        e.push(format!(
            "spec.ipFamilyPolicy: Unsupported value {p:?}: supported values: \"PreferDualStack\", \"RequireDualStack\", \"SingleStack\""
        ));
    }
    for (i, f) in spec.ip_families.iter().flatten().enumerate() {
        if f != "IPv4" && f != "IPv6" {
            e.push(format!(
                "spec.ipFamilies[{i}]: Unsupported value {f:?}: supported values: \"IPv4\", \"IPv6\""
            ));
        }
    }
    labels(e, "spec.selector", spec.selector.as_ref());
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        e.push("spec.ports: Required value".into());
    }
    let mut names = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        match &p.name {
            Some(n) if !n.is_empty() => {
                if let Some(msg) = dns1123_label(n) {
                    e.push(format!("{path}.name: Invalid value {n:?}: {msg}"));
                }
                if !names.insert(n.clone()) {
                    e.push(format!("{path}.name: Duplicate value {n:?}"));
                }
            }
            _ if ports.len() > 1 => e.push(format!("{path}.name: Required value")),
            _ => {}
        }
        port_number(e, &format!("{path}.port"), p.port);
        let proto = protocol(e, &format!("{path}.protocol"), p.protocol.as_deref());
        if !seen.insert((p.port, proto)) {
            e.push(format!("{path}: Duplicate value {}/{proto}", p.port));
        }
        match &p.target_port {
            Some(IntOrString::Int(n)) => port_number(e, &format!("{path}.targetPort"), *n),
            Some(IntOrString::String(n)) => {
                if let Some(msg) = iana_svc_name(n) {
                    e.push(format!("{path}.targetPort: Invalid value {n:?}: {msg}"));
                }
            }
            None => {}
        }
    }
}

fn policy(e: &mut Errors, np: &NetworkPolicy) {
    name(
        e,
        "metadata.name",
        np.metadata.name.as_deref(),
        dns1123_subdomain,
    );
    labels(e, "metadata.labels", np.metadata.labels.as_ref());
    let Some(spec) = &np.spec else {
        e.push("spec: Required value".into());
        return;
    };
    if let Some(sel) = &spec.pod_selector {
        selector(e, "spec.podSelector", sel);
    }
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let path = format!("spec.ingress[{i}]");
        policy_ports(e, &path, rule.ports.as_deref());
        peers(e, &format!("{path}.from"), rule.from.as_deref());
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let path = format!("spec.egress[{i}]");
        policy_ports(e, &path, rule.ports.as_deref());
        peers(e, &format!("{path}.to"), rule.to.as_deref());
    }
    let types = spec.policy_types.as_deref().unwrap_or_default();
    if types.len() > 2 {
        e.push("spec.policyTypes: Too many: at most 2 (Ingress, Egress)".into());
    }
    let mut seen = BTreeSet::new();
    for (i, t) in types.iter().enumerate() {
        if t != "Ingress" && t != "Egress" {
            e.push(format!(
                "spec.policyTypes[{i}]: Unsupported value {t:?}: supported values: \"Ingress\", \"Egress\""
            ));
        } else if !seen.insert(t) {
            e.push(format!("spec.policyTypes[{i}]: Duplicate value {t:?}"));
        }
    }
}

fn policy_ports(e: &mut Errors, rule_path: &str, ports: Option<&[NetworkPolicyPort]>) {
    for (j, p) in ports.unwrap_or_default().iter().enumerate() {
        let path = format!("{rule_path}.ports[{j}]");
        protocol(e, &format!("{path}.protocol"), p.protocol.as_deref());
        match (&p.port, p.end_port) {
            (Some(IntOrString::Int(n)), end) => {
                port_number(e, &format!("{path}.port"), *n);
                if let Some(end) = end {
                    if end < *n {
                        e.push(format!(
                            "{path}.endPort: Invalid value {end}: must be greater than or equal to `port`"
                        ));
                    }
                    port_number(e, &format!("{path}.endPort"), end);
                }
            }
            (Some(IntOrString::String(n)), end) => {
                if let Some(msg) = iana_svc_name(n) {
                    e.push(format!("{path}.port: Invalid value {n:?}: {msg}"));
                }
                if end.is_some() {
                    e.push(format!(
                        "{path}.endPort: Invalid value: may not be specified when `port` is non-numeric"
                    ));
                }
            }
            (None, Some(_)) => e.push(format!(
                "{path}.endPort: Invalid value: may not be specified when `port` is not specified"
            )),
            (None, None) => {}
        }
    }
}

fn peers(e: &mut Errors, path: &str, peers: Option<&[NetworkPolicyPeer]>) {
    for (k, peer) in peers.unwrap_or_default().iter().enumerate() {
        let path = format!("{path}[{k}]");
        let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
        match &peer.ip_block {
            Some(_) if selectors => e.push(format!(
                "{path}: Forbidden: may not specify both ipBlock and another peer"
            )),
            Some(b) => ip_block(e, &format!("{path}.ipBlock"), &b.cidr, b.except.as_deref()),
            None if !selectors => e.push(format!(
                "{path}: Required value: must specify a peer (podSelector, namespaceSelector or ipBlock)"
            )),
            None => {}
        }
        if let Some(s) = &peer.pod_selector {
            selector(e, &format!("{path}.podSelector"), s);
        }
        if let Some(s) = &peer.namespace_selector {
            selector(e, &format!("{path}.namespaceSelector"), s);
        }
    }
}

fn ip_block(e: &mut Errors, path: &str, cidr: &str, except: Option<&[String]>) {
    let Some(net) = parse_cidr(cidr) else {
        e.push(format!(
            "{path}.cidr: Invalid value {cidr:?}: must be a valid CIDR"
        ));
        return;
    };
    for (i, x) in except.unwrap_or_default().iter().enumerate() {
        let p = format!("{path}.except[{i}]");
        match parse_cidr(x) {
            None => e.push(format!("{p}: Invalid value {x:?}: must be a valid CIDR")),
            Some(sub) if !(sub.1 > net.1 && contains(net, sub.0)) => e.push(format!(
                "{p}: Invalid value {x:?}: must be a strict subset of `cidr` {cidr:?}"
            )),
            Some(_) => {}
        }
    }
}

/// `addr/len` (host bits allowed, as the API accepts).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, l) = s.split_once('/')?;
    let addr: IpAddr = a.parse().ok()?;
    let len: u8 = l.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max && l == len.to_string()).then_some((addr, len))
}

fn contains(net: (IpAddr, u8), ip: IpAddr) -> bool {
    let bits = |a: IpAddr| -> (u128, u32) {
        match a {
            IpAddr::V4(v) => (u32::from(v) as u128, 32),
            IpAddr::V6(v) => (u128::from(v), 128),
        }
    };
    let ((n, width), (i, w2)) = (bits(net.0), bits(ip));
    if width != w2 {
        return false;
    }
    let shift = width - u32::from(net.1);
    if shift >= 128 {
        return true;
    }
    (n >> shift) == (i >> shift)
}

fn selector(e: &mut Errors, path: &str, s: &LabelSelector) {
    labels(e, &format!("{path}.matchLabels"), s.match_labels.as_ref());
    for (i, r) in s.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        if let Some(msg) = label_key(&r.key) {
            e.push(format!("{p}.key: Invalid value {:?}: {msg}", r.key));
        }
        let values = r.values.as_deref().unwrap_or_default();
        match r.operator.as_str() {
            "In" | "NotIn" => {
                if values.is_empty() {
                    e.push(format!(
                        "{p}.values: Required value: must be specified when `operator` is 'In' or 'NotIn'"
                    ));
                }
                for (j, v) in values.iter().enumerate() {
                    if let Some(msg) = label_value(v) {
                        e.push(format!("{p}.values[{j}]: Invalid value {v:?}: {msg}"));
                    }
                }
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    e.push(format!(
                        "{p}.values: Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
                    ));
                }
            }
            op => e.push(format!(
                "{p}.operator: Unsupported value {op:?}: supported values: \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""
            )),
        }
    }
}

fn labels(e: &mut Errors, path: &str, l: Option<&BTreeMap<String, String>>) {
    for (k, v) in l.into_iter().flatten() {
        if let Some(msg) = label_key(k) {
            e.push(format!("{path}: Invalid value {k:?}: {msg}"));
        }
        if let Some(msg) = label_value(v) {
            e.push(format!("{path}: Invalid value {v:?}: {msg}"));
        }
    }
}

fn protocol(e: &mut Errors, path: &str, p: Option<&str>) -> &'static str {
    match p.unwrap_or("TCP") {
        "TCP" => "TCP",
        "UDP" => "UDP",
        "SCTP" => "SCTP",
        other => {
            e.push(format!(
                "{path}: Unsupported value {other:?}: supported values: \"SCTP\", \"TCP\", \"UDP\""
            ));
            "TCP"
        }
    }
}

fn port_number(e: &mut Errors, path: &str, n: i32) {
    if !(1..=65535).contains(&n) {
        e.push(format!(
            "{path}: Invalid value {n}: must be between 1 and 65535, inclusive"
        ));
    }
}

fn is_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// RFC 1123 label: lowercase alphanumerics and '-', alphanumeric at both ends, ≤ 63.
pub fn dns1123_label(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| is_alnum(c) || c == '-')
        && s.starts_with(is_alnum)
        && s.ends_with(is_alnum);
    (!ok).then(|| {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (at most 63)".into()
    })
}

/// RFC 1035 label: like RFC 1123 but starting with a letter.
fn dns1035_label(s: &str) -> Option<String> {
    dns1123_label(s).or_else(|| {
        (!s.starts_with(|c: char| c.is_ascii_lowercase()))
            .then(|| "a DNS-1035 label must start with a lowercase letter".into())
    })
}

/// RFC 1123 subdomain: dot-separated labels, ≤ 253.
pub fn dns1123_subdomain(s: &str) -> Option<String> {
    let ok = !s.is_empty() && s.len() <= 253 && s.split('.').all(|l| dns1123_label(l).is_none());
    (!ok).then(|| {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character".into()
    })
}

/// IANA_SVC_NAME: ≤ 15 lowercase alphanumerics and '-', at least one letter, no leading,
/// trailing or doubled '-'.
pub fn iana_svc_name(s: &str) -> Option<String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.chars().all(|c| is_alnum(c) || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    (!ok).then(|| "must be an IANA_SVC_NAME: at most 15 lowercase alphanumerics or '-', with at least one letter, no leading, trailing or doubled '-'".into())
}

fn qualified_name_part(s: &str) -> bool {
    let an = |c: char| c.is_ascii_alphanumeric();
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| an(c) || c == '-' || c == '_' || c == '.')
        && s.starts_with(an)
        && s.ends_with(an)
}

/// A label key: optional DNS-subdomain prefix and '/', then a name part.
pub fn label_key(k: &str) -> Option<String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix
        && dns1123_subdomain(p).is_some()
    {
        return Some("prefix part must be a lowercase RFC 1123 subdomain".into());
    }
    (!qualified_name_part(name)).then(|| "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63)".into())
}

pub fn label_value(v: &str) -> Option<String> {
    (!v.is_empty() && !qualified_name_part(v)).then(|| {
        "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (at most 63)".into()
    })
}

#[cfg(test)]
mod tests {
    use super::super::objects::{parse_doc, parse_text};

    fn errors(yaml: &str) -> String {
        let docs = parse_text("t.yaml", yaml).unwrap();
        match parse_doc(&docs[0]) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n";

    #[test]
    fn valid_policy_passes() {
        let e = errors(&format!(
            "{NP}spec:\n  podSelector: {{matchExpressions: [{{key: pod, operator: In, values: [a]}}]}}\n  policyTypes: [Ingress, Egress]\n  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.1/4, except: [10.244.1.2/32]}}}}], ports: [{{port: 80, endPort: 90}}, {{protocol: SCTP, port: serve-80-sctp}}]}}]\n  egress: [{{}}]\n"
        ));
        assert_eq!(e, "");
    }

    #[test]
    fn policy_errors_name_fields() {
        let cases = [
            (
                "  podSelector: {}\n  policyTypes: [Ingres]\n",
                "spec.policyTypes[0]: Unsupported value \"Ingres\"",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{protocol: ICMP}]}]\n",
                "spec.ingress[0].ports[0].protocol: Unsupported value \"ICMP\"",
            ),
            (
                "  podSelector: {}\n  egress: [{ports: [{port: 90, endPort: 80}]}]\n",
                "spec.egress[0].ports[0].endPort: Invalid value 80",
            ),
            (
                "  podSelector: {}\n  egress: [{ports: [{port: http, endPort: 80}]}]\n",
                "spec.egress[0].ports[0].endPort",
            ),
            (
                "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]}]\n",
                "spec.egress[0].to[0].ipBlock.except[0]",
            ),
            (
                "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]\n",
                "spec.egress[0].to[0].ipBlock.cidr",
            ),
            (
                "  podSelector: {}\n  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]\n",
                "may not specify both ipBlock and another peer",
            ),
            (
                "  podSelector: {}\n  ingress: [{from: [{}]}]\n",
                "spec.ingress[0].from[0]: Required value",
            ),
            (
                "  podSelector: {matchExpressions: [{key: a, operator: In}]}\n",
                "spec.podSelector.matchExpressions[0].values: Required value",
            ),
            (
                "  podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}\n",
                "values: Forbidden",
            ),
            (
                "  podSelector: {matchLabels: {\"bad key!\": a}}\n",
                "spec.podSelector.matchLabels: Invalid value \"bad key!\"",
            ),
            (
                "  podSelector: {}\n  ingress: [{ports: [{port: 0}]}]\n",
                "spec.ingress[0].ports[0].port: Invalid value 0",
            ),
        ];
        for (spec, want) in cases {
            let e = errors(&format!("{NP}spec:\n{spec}"));
            assert!(e.contains(want), "{spec}: got {e:?}, want {want:?}");
            assert!(e.contains("networkpolicy/x/p"), "{e}");
        }
    }

    #[test]
    fn pod_and_service_errors() {
        let e = errors(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers: [{name: c, ports: [{containerPort: 80, name: http}, {containerPort: 80}]}]\n",
        );
        assert!(
            e.contains("spec.containers[0].ports[1]: Duplicate value 80/TCP"),
            "{e}"
        );
        let e = errors(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  nodeName: worker\n  containers: [{name: c}]\n",
        );
        assert!(e.contains("spec.nodeName"), "{e}");
        let e = errors(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  type: NodePort\n  ports: [{port: 80}, {port: 81}]\n",
        );
        assert!(
            e.contains("spec.type: Unsupported value \"NodePort\""),
            "{e}"
        );
        assert!(e.contains("spec.ports[0].name: Required value"), "{e}");
        let e = errors(
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  clusterIP: 10.0.0.1\n  ports: [{port: 80, targetPort: Not_A_Name}]\n",
        );
        assert!(e.contains("spec.clusterIP"), "{e}");
        assert!(e.contains("spec.ports[0].targetPort"), "{e}");
    }

    #[test]
    fn names() {
        assert!(super::dns1123_label("x").is_none());
        assert!(super::dns1123_label("X").is_some());
        assert!(super::dns1123_label("-x").is_some());
        assert!(super::iana_svc_name("serve-80-tcp").is_none());
        assert!(super::iana_svc_name("80").is_some());
        assert!(super::iana_svc_name("a--b").is_some());
        assert!(super::label_key("kubernetes.io/metadata.name").is_none());
        assert!(super::label_key("Bad/x").is_some());
        assert!(super::label_value("").is_none());
    }
}
