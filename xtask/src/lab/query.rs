//! `get` (objects as the agents see them) and probe planning (who dials what, where).

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use super::{
    apply::{join, pod_ports},
    cluster::Lab,
    probe::{Job, Protocol, Via},
    services,
    topology::{self as topo, Family},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Namespaces,
    Pods,
    Services,
    NetworkPolicies,
    Nodes,
}

impl Resource {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "namespaces" | "namespace" | "ns" => Resource::Namespaces,
            "pods" | "pod" | "po" => Resource::Pods,
            "services" | "service" | "svc" => Resource::Services,
            "networkpolicies" | "networkpolicy" | "netpol" => Resource::NetworkPolicies,
            "nodes" | "node" | "no" => Resource::Nodes,
            other => bail!(
                "unknown resource {other:?}: use pods, services, namespaces, networkpolicies or nodes"
            ),
        })
    }
}

fn labels_text(l: Option<&BTreeMap<String, String>>) -> String {
    let s: Vec<String> = l
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if s.is_empty() {
        "<none>".into()
    } else {
        s.join(",")
    }
}

fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.first().map(Vec::len).unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

impl Lab {
    /// The objects of one kind (or all) as a kubectl-style `List`.
    pub fn get_json(&self, what: Option<Resource>) -> Value {
        let mut items: Vec<Value> = Vec::new();
        let want = |r: Resource| what.is_none_or(|w| w == r);
        if want(Resource::Nodes) && what.is_some() {
            for n in &self.state.nodes {
                items.push(
                    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name},
                    "status": {"addresses": n.ips.iter().map(|ip| json!({"type": "InternalIP", "address": ip.to_string()})).collect::<Vec<_>>()},
                    "spec": {"podCIDR": topo::node_pods(n.number, self.state.ip_family.primary()).to_string(),
                             "podCIDRs": n.ips.iter().map(|ip| topo::node_pods(n.number, Family::of(*ip)).to_string()).collect::<Vec<_>>()}}),
                );
            }
        }
        if want(Resource::Namespaces) {
            items.extend(
                self.state
                    .namespaces
                    .values()
                    .map(|o| serde_json::to_value(o).unwrap_or_default()),
            );
        }
        if want(Resource::Pods) {
            items.extend(
                self.state
                    .pods
                    .values()
                    .map(|p| serde_json::to_value(&p.pod).unwrap_or_default()),
            );
        }
        if want(Resource::Services) {
            items.extend(
                self.state
                    .services
                    .values()
                    .map(|o| serde_json::to_value(o).unwrap_or_default()),
            );
        }
        if want(Resource::NetworkPolicies) {
            items.extend(
                self.state
                    .policies
                    .values()
                    .map(|o| serde_json::to_value(o).unwrap_or_default()),
            );
        }
        json!({"apiVersion": "v1", "kind": "List", "items": items})
    }

    /// Human-readable tables.
    pub fn get_text(&self, what: Option<Resource>) -> String {
        let kinds = match what {
            Some(r) => vec![r],
            None => vec![
                Resource::Nodes,
                Resource::Namespaces,
                Resource::Pods,
                Resource::Services,
                Resource::NetworkPolicies,
            ],
        };
        let mut out = String::new();
        for k in kinds {
            if what.is_none() {
                out.push_str(&format!("== {k:?}\n").to_lowercase());
            }
            out.push_str(&columns(&self.rows(k)));
            if what.is_none() {
                out.push('\n');
            }
        }
        out
    }

    fn rows(&self, r: Resource) -> Vec<Vec<String>> {
        let s = |x: &str| x.to_string();
        match r {
            Resource::Nodes => {
                let mut rows = vec![vec![s("NAME"), s("INTERNAL-IP"), s("POD-CIDR"), s("AGENT")]];
                for n in &self.state.nodes {
                    rows.push(vec![
                        n.name.clone(),
                        join(&n.ips),
                        n.ips
                            .iter()
                            .map(|ip| topo::node_pods(n.number, Family::of(*ip)).to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                        match n.agent_pid {
                            Some(pid) => format!("pid {pid}, http://{}", n.http_addr()),
                            None => s("none"),
                        },
                    ]);
                }
                rows.push(vec![
                    s("ext"),
                    self.ext_ips()
                        .iter()
                        .map(IpAddr::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    s("(off-cluster host)"),
                    s(""),
                ]);
                rows
            }
            Resource::Namespaces => {
                let mut rows = vec![vec![s("NAME"), s("LABELS")]];
                for (name, ns) in &self.state.namespaces {
                    rows.push(vec![name.clone(), labels_text(ns.metadata.labels.as_ref())]);
                }
                rows
            }
            Resource::Pods => {
                let mut rows = vec![vec![
                    s("NAMESPACE"),
                    s("NAME"),
                    s("NODE"),
                    s("IP"),
                    s("PORTS"),
                    s("LABELS"),
                ]];
                for (key, p) in &self.state.pods {
                    let (ns, name) = key.split_once('/').unwrap_or_default();
                    let ports: Vec<String> = pod_ports(&p.pod)
                        .into_iter()
                        .map(|(port, proto, n)| match n {
                            Some(n) => format!("{n}:{port}/{proto}"),
                            None => format!("{port}/{proto}"),
                        })
                        .collect();
                    rows.push(vec![
                        s(ns),
                        s(name),
                        topo::node_name(p.node),
                        join(&p.ips),
                        if ports.is_empty() {
                            s("<none>")
                        } else {
                            ports.join(",")
                        },
                        labels_text(p.pod.metadata.labels.as_ref()),
                    ]);
                }
                rows
            }
            Resource::Services => {
                let mut rows = vec![vec![
                    s("NAMESPACE"),
                    s("NAME"),
                    s("CLUSTER-IP"),
                    s("PORTS"),
                    s("SELECTOR"),
                    s("ENDPOINTS"),
                ]];
                let sp = self.service_ports();
                for (key, svc) in &self.state.services {
                    let (ns, name) = key.split_once('/').unwrap_or_default();
                    let spec = svc.spec.clone().unwrap_or_default();
                    let ports: Vec<String> = spec
                        .ports
                        .iter()
                        .flatten()
                        .map(|p| format!("{}/{}", p.port, p.protocol.as_deref().unwrap_or("TCP")))
                        .collect();
                    let eps: Vec<String> = sp
                        .iter()
                        .filter(|p| &p.service == key)
                        .flat_map(|p| {
                            p.endpoints.iter().map(|(_, ip, port)| {
                                std::net::SocketAddr::new(*ip, *port).to_string()
                            })
                        })
                        .collect();
                    rows.push(vec![
                        s(ns),
                        s(name),
                        services::cluster_ips(&spec).join(","),
                        ports.join(","),
                        labels_text(spec.selector.as_ref()),
                        if eps.is_empty() {
                            s("<none>")
                        } else {
                            eps.join(",")
                        },
                    ]);
                }
                rows
            }
            Resource::NetworkPolicies => {
                let mut rows = vec![vec![
                    s("NAMESPACE"),
                    s("NAME"),
                    s("POD-SELECTOR"),
                    s("POLICY-TYPES"),
                ]];
                for (key, np) in &self.state.policies {
                    let (ns, name) = key.split_once('/').unwrap_or_default();
                    let spec = np.spec.clone().unwrap_or_default();
                    let sel = spec.pod_selector.unwrap_or_default();
                    let mut parts: Vec<String> = sel
                        .match_labels
                        .iter()
                        .flatten()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    parts.extend(sel.match_expressions.iter().flatten().map(|e| {
                        format!(
                            "{} {} ({})",
                            e.key,
                            e.operator,
                            e.values.clone().unwrap_or_default().join(",")
                        )
                    }));
                    rows.push(vec![
                        s(ns),
                        s(name),
                        if parts.is_empty() {
                            s("<all pods>")
                        } else {
                            parts.join(",")
                        },
                        spec.policy_types.unwrap_or_default().join(","),
                    ]);
                }
                rows
            }
        }
    }

    pub fn service_ports(&self) -> Vec<services::ServicePort> {
        services::service_ports(&self.state.services, &self.pod_views())
    }

    /// The lab's pods as the endpoints controller sees them.
    pub fn pod_views(&self) -> Vec<services::PodView<'_>> {
        self.state
            .pods
            .iter()
            .map(|(k, p)| services::PodView {
                key: k,
                pod: &p.pod,
                ips: &p.ips,
            })
            .collect()
    }

    /// `ext`'s addresses, IPv4 first.
    pub fn ext_ips(&self) -> Vec<IpAddr> {
        self.state
            .ip_family
            .families()
            .iter()
            .map(|f| topo::ext_addr(*f).0)
            .collect()
    }

    /// The family a probe dials: the one asked for, which the lab must have, or the lab's
    /// primary family.
    pub fn probe_family(&self, asked: Option<Family>) -> Result<Family> {
        match asked {
            None => Ok(self.state.ip_family.primary()),
            Some(f) if self.state.ip_family.has(f) => Ok(f),
            Some(f) => bail!(
                "--family {}: this lab has no {f} addresses (it is up with --ip-family {})",
                f.number(),
                self.state.ip_family.as_str()
            ),
        }
    }

    /// Plans probes: SRC and DST as the probe command takes them, ports resolved on the destination.
    pub fn plan_probes(&self, spec: &ProbeSpec) -> Result<Vec<Job>> {
        let family = self.probe_family(spec.family)?;
        let all_pods: Vec<String> = self.state.pods.keys().cloned().collect();
        let sources: Vec<(String, String)> = match spec.from.as_deref() {
            None => all_pods
                .iter()
                .map(|k| (k.clone(), self.state.pods[k].netns.clone()))
                .collect(),
            Some("ext") => vec![("ext".into(), self.names.ext_ns())],
            Some(s) if s.starts_with("node/") => {
                let name = &s["node/".len()..];
                let Some(n) = self.state.nodes.iter().find(|n| n.name == name) else {
                    bail!(
                        "--from {s}: no such node (the lab has node-1..node-{})",
                        self.state.nodes.len()
                    );
                };
                vec![(s.to_string(), n.netns.clone())]
            }
            Some(s) => match self.state.pods.get(s) {
                Some(p) => vec![(s.to_string(), p.netns.clone())],
                None => bail!("--from {s}: no such pod (use NS/POD, node/NODE or ext)"),
            },
        };
        let dests: Vec<String> = match spec.to.as_deref() {
            None => all_pods.clone(),
            Some("ext") => vec!["ext".into()],
            Some(d) if self.state.pods.contains_key(d) => vec![d.to_string()],
            Some(d) => bail!("--to {d}: no such pod (use NS/POD or ext)"),
        };
        if sources.is_empty() || dests.is_empty() {
            bail!("nothing to probe: the lab has no pods yet (`cargo xtask lab apply -f ...`)");
        }
        let skip_self = spec.from.is_none() || spec.to.is_none();
        let service_ports = if spec.via == Via::Service {
            self.service_ports()
        } else {
            Vec::new()
        };
        let targets: Vec<(&String, Vec<(u16, Protocol)>)> = dests
            .iter()
            .map(|d| Ok((d, self.probe_ports(d, spec)?)))
            .collect::<Result<_>>()?;
        let mut jobs = Vec::new();
        for (src, netns) in &sources {
            for (dst, ports) in &targets {
                if skip_self && src == *dst {
                    continue;
                }
                for &(port, protocol) in ports {
                    jobs.push(self.job(
                        src,
                        netns,
                        dst,
                        (port, protocol),
                        spec.via,
                        family,
                        &service_ports,
                    )?);
                }
            }
        }
        Ok(jobs)
    }

    /// (port, protocol) pairs to probe on one destination.
    fn probe_ports(&self, dst: &str, spec: &ProbeSpec) -> Result<Vec<(u16, Protocol)>> {
        let declared: Vec<(u16, Protocol, Option<String>)> = if dst == "ext" {
            topo::EXT_PORTS
                .iter()
                .flat_map(|&p| [(p, Protocol::Tcp, None), (p, Protocol::Udp, None)])
                .collect()
        } else {
            pod_ports(&self.state.pods[dst].pod)
                .into_iter()
                .filter_map(|(p, proto, name)| Some((p, Protocol::parse(&proto)?, name)))
                .collect()
        };
        let proto_ok = |p: Protocol| spec.protocol.is_none_or(|want| want == p);
        let out: Vec<(u16, Protocol)> = match spec.port.as_deref() {
            None => declared
                .iter()
                .filter(|d| proto_ok(d.1))
                .map(|d| (d.0, d.1))
                .collect(),
            Some(p) if p.chars().all(|c| c.is_ascii_digit()) => {
                let n: u16 = p
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--port {p}: not a port number"))?;
                if n == 0 {
                    bail!("--port 0 is not a port");
                }
                match spec.protocol {
                    Some(proto) => vec![(n, proto)],
                    None => {
                        let protos: Vec<Protocol> =
                            declared.iter().filter(|d| d.0 == n).map(|d| d.1).collect();
                        if protos.is_empty() {
                            vec![(n, Protocol::Tcp)]
                        } else {
                            protos.into_iter().map(|proto| (n, proto)).collect()
                        }
                    }
                }
            }
            Some(name) => {
                if dst == "ext" {
                    bail!("--port {name}: ext has no named ports");
                }
                let found: Vec<(u16, Protocol)> = declared
                    .iter()
                    .filter(|d| d.2.as_deref() == Some(name) && proto_ok(d.1))
                    .map(|d| (d.0, d.1))
                    .collect();
                if found.is_empty() {
                    bail!(
                        "--port {name}: {dst} declares no container port of that name{}",
                        spec.protocol
                            .map(|p| format!(" and protocol {p}"))
                            .unwrap_or_default()
                    );
                }
                found
            }
        };
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn job(
        &self,
        src: &str,
        netns: &str,
        dst: &str,
        (port, protocol): (u16, Protocol),
        via: Via,
        family: Family,
        service_ports: &[services::ServicePort],
    ) -> Result<Job> {
        let (to_ip, dial_port, service) = if dst == "ext" {
            if via == Via::Service {
                bail!("--via service: ext is not behind a Service");
            }
            (topo::ext_addr(family).0, port, None)
        } else if via == Via::Pod {
            let ip = self.state.pods[dst].addr(family).ok_or_else(|| {
                anyhow::anyhow!(
                    "{dst} has no {family} address (podIPs {})",
                    join(&self.state.pods[dst].ips)
                )
            })?;
            (ip, port, None)
        } else {
            if src == "ext" {
                bail!(
                    "--via service: ClusterIPs are not reachable from ext (off-cluster), as on kind"
                );
            }
            let candidates: Vec<&services::ServicePort> = service_ports
                .iter()
                .filter(|sp| sp.protocol == protocol.as_str())
                .filter(|sp| Family::of(sp.cluster_ip) == family)
                .filter(|sp| {
                    sp.endpoints
                        .iter()
                        .any(|(k, _, tp)| k == dst && *tp == port)
                })
                .collect();
            // Prefer a Service whose only endpoint is the destination, so the verdict is about it.
            let chosen = candidates
                .iter()
                .find(|sp| sp.endpoints.len() == 1)
                .or_else(|| candidates.first())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--via service: no Service selects {dst} and maps {protocol}/{port} on a {family} ClusterIP"
                    )
                })?;
            if chosen.endpoints.len() > 1 {
                eprintln!(
                    "note: service {} balances over {} pods; a probe of {dst} may reach another one",
                    chosen.service,
                    chosen.endpoints.len()
                );
            }
            (chosen.cluster_ip, chosen.port, Some(chosen.service.clone()))
        };
        Ok(Job {
            from: src.to_string(),
            src_netns: netns.to_string(),
            to: dst.to_string(),
            to_ip,
            dial_port,
            port,
            protocol,
            via,
            service,
        })
    }

    /// A pod's IP of family `f` by `ns/name`.
    pub fn pod_ip(&self, key: &str, f: Family) -> Option<IpAddr> {
        self.state.pods.get(key).and_then(|p| p.addr(f))
    }
}

/// What `lab probe` was asked.
#[derive(Clone, Debug, Default)]
pub struct ProbeSpec {
    pub from: Option<String>,
    pub to: Option<String>,
    pub port: Option<String>,
    pub protocol: Option<Protocol>,
    pub via: Via,
    /// The family of the addresses dialled (default: the lab's primary one).
    pub family: Option<Family>,
}
