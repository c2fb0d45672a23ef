//! NetworkPolicy normalisation: every defaulting and validation rule applied once, so the rest of
//! the compiler sees one uniform shape.
//!
//! - `policyTypes` absent or empty ⇒ `[Ingress]`, plus `Egress` iff `spec.egress` is non-empty.
//!   Rules of a direction not in `policyTypes` are dropped.
//! - Empty and absent lists are the same; `ports` empty ⇒ every port of TCP, UDP and SCTP; `from` /
//!   `to` empty ⇒ any peer; `protocol` absent ⇒ TCP.
//! - A peer `podSelector` without `namespaceSelector` means the policy's own namespace.
//! - Anything the API server would reject makes the policy *rejected*: it keeps isolating what it
//!   selects in the directions it declares (every direction if `policyTypes` itself is invalid;
//!   every pod of the namespace if `podSelector` is invalid) and allows nothing.

use std::sync::Arc;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use policy_common::Direction;

use super::cidr::{IpBlock, Prefix};
use super::error::CompileError;
use super::selector::Selector;
use crate::model::{ObjectKey, Protocol};

/// Which namespaces a pod peer's pods may live in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NsScope {
    /// The policy's own namespace (no `namespaceSelector`).
    Own(String),
    /// Namespaces whose labels match.
    Matching(Selector),
}

/// A pod peer: `namespaceSelector` AND `podSelector`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerSelector {
    pub namespaces: NsScope,
    pub pods: Selector,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NormPeer {
    Pods(Arc<PeerSelector>),
    Block(Arc<IpBlock>),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortSpec {
    /// No `port`: every port of the protocol.
    All,
    /// `port..=endPort` (`port..=port` without endPort).
    Range(u16, u16),
    /// A container port name, resolved against the destination pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NormPort {
    pub protocol: Protocol,
    pub port: PortSpec,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormRule {
    /// Index in `spec.ingress` / `spec.egress`.
    pub index: u32,
    /// `None`: any peer (pods, nodes and the world).
    pub peers: Option<Vec<NormPeer>>,
    /// Never empty.
    pub ports: Vec<NormPort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormPolicy {
    pub key: ObjectKey,
    /// Whether the policy isolates the pods it selects, indexed by `Direction as usize`.
    pub isolates: [bool; 2],
    /// Pods (of the policy's namespace) the policy applies to.
    pub subject: Selector,
    /// Allow rules per direction; empty for directions it does not isolate and when rejected.
    pub rules: [Vec<NormRule>; 2],
    pub rejected: bool,
}

impl NormPolicy {
    pub fn isolates(&self, direction: Direction) -> bool {
        self.isolates[direction as usize]
    }

    pub fn rules(&self, direction: Direction) -> &[NormRule] {
        &self.rules[direction as usize]
    }

    /// Every ipBlock of the policy.
    pub fn blocks(&self) -> impl Iterator<Item = &Arc<IpBlock>> {
        self.rules
            .iter()
            .flatten()
            .flat_map(|r| r.peers.iter().flatten())
            .filter_map(|p| match p {
                NormPeer::Block(b) => Some(b),
                NormPeer::Pods(_) => None,
            })
    }
}

/// A Kubernetes port name (IANA_SVC_NAME): 1–15 of `[a-z0-9-]`, at least one letter, no hyphen at
/// either end or twice in a row.
pub fn is_valid_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

struct Normaliser<'a> {
    key: &'a ObjectKey,
    errors: Vec<CompileError>,
}

impl Normaliser<'_> {
    fn error(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors
            .push(CompileError::policy(self.key, field, reason));
    }

    fn selector(
        &mut self,
        field: &str,
        sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    ) -> Option<Selector> {
        Selector::parse(sel)
            .map_err(|e| self.error(format!("{field}.{}", e.field), e.reason))
            .ok()
    }

    fn port(&mut self, field: &str, p: &NetworkPolicyPort) -> Option<NormPort> {
        let protocol = Protocol::parse_defaulted(p.protocol.as_deref());
        if protocol.is_none() {
            self.error(
                format!("{field}.protocol"),
                format!(
                    "unsupported protocol {:?} (TCP, UDP or SCTP)",
                    p.protocol.as_deref().unwrap_or_default()
                ),
            );
        }
        let valid_number = |n: i32| u16::try_from(n).ok().filter(|n| *n != 0);
        let port = match (&p.port, p.end_port) {
            (None, None) => Some(PortSpec::All),
            (None, Some(_)) => {
                self.error(format!("{field}.endPort"), "may not be set without port");
                None
            }
            (Some(IntOrString::Int(n)), end) => {
                let lo = valid_number(*n);
                if lo.is_none() {
                    self.error(format!("{field}.port"), format!("{n} is not in 1..=65535"));
                }
                let hi = match end {
                    None => lo,
                    Some(e) => match (lo, valid_number(e)) {
                        (_, None) => {
                            self.error(
                                format!("{field}.endPort"),
                                format!("{e} is not in 1..=65535"),
                            );
                            None
                        }
                        (Some(lo), Some(hi)) if hi < lo => {
                            self.error(
                                format!("{field}.endPort"),
                                format!("{hi} is below port {lo}"),
                            );
                            None
                        }
                        (_, hi) => hi,
                    },
                };
                lo.zip(hi).map(|(lo, hi)| PortSpec::Range(lo, hi))
            }
            (Some(IntOrString::String(name)), end) => {
                if end.is_some() {
                    self.error(
                        format!("{field}.endPort"),
                        "may not be set with a named port",
                    );
                    None
                } else if !is_valid_port_name(name) {
                    self.error(
                        format!("{field}.port"),
                        format!("{name:?} is not a valid port name"),
                    );
                    None
                } else {
                    Some(PortSpec::Named(name.clone()))
                }
            }
        };
        Some(NormPort {
            protocol: protocol?,
            port: port?,
        })
    }

    fn ports(&mut self, field: &str, ports: Option<&Vec<NetworkPolicyPort>>) -> Vec<NormPort> {
        let ports = ports.map(Vec::as_slice).unwrap_or_default();
        if ports.is_empty() {
            return Protocol::ALL
                .iter()
                .map(|&protocol| NormPort {
                    protocol,
                    port: PortSpec::All,
                })
                .collect();
        }
        let mut out: Vec<NormPort> = ports
            .iter()
            .enumerate()
            .filter_map(|(j, p)| self.port(&format!("{field}.ports[{j}]"), p))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn block(
        &mut self,
        field: &str,
        b: &k8s_openapi::api::networking::v1::IPBlock,
    ) -> Option<IpBlock> {
        let cidr = Prefix::parse(&b.cidr)
            .map_err(|e| self.error(format!("{field}.cidr"), e))
            .ok();
        let mut except = Vec::new();
        for (e, s) in b.except.iter().flatten().enumerate() {
            let field = format!("{field}.except[{e}]");
            match (Prefix::parse(s), cidr) {
                (Err(reason), _) => self.error(field, reason),
                (Ok(p), Some(c)) if !(c.covers(&p) && p.prefix_len() > c.prefix_len()) => self
                    .error(
                        field,
                        format!("{s:?} is not a strict subset of cidr {}", b.cidr),
                    ),
                (Ok(p), _) => except.push(p),
            }
        }
        except.sort();
        except.dedup();
        Some(IpBlock {
            cidr: cidr?,
            except,
        })
    }

    fn peer(&mut self, field: &str, p: &NetworkPolicyPeer) -> Option<NormPeer> {
        match (&p.ip_block, &p.namespace_selector, &p.pod_selector) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                self.error(
                    field,
                    "ipBlock may not be combined with podSelector or namespaceSelector",
                );
                None
            }
            (None, None, None) => {
                self.error(
                    field,
                    "must specify one of ipBlock, podSelector, namespaceSelector",
                );
                None
            }
            (Some(b), None, None) => self
                .block(&format!("{field}.ipBlock"), b)
                .map(|b| NormPeer::Block(Arc::new(b))),
            (None, ns, pods) => {
                let namespaces = match ns {
                    None => Some(NsScope::Own(self.key.namespace.clone())),
                    Some(s) => self
                        .selector(&format!("{field}.namespaceSelector"), s)
                        .map(NsScope::Matching),
                };
                let pods = match pods {
                    None => Some(Selector::everything()),
                    Some(s) => self.selector(&format!("{field}.podSelector"), s),
                };
                Some(NormPeer::Pods(Arc::new(PeerSelector {
                    namespaces: namespaces?,
                    pods: pods?,
                })))
            }
        }
    }

    fn rule(
        &mut self,
        field: &str,
        index: usize,
        peers_name: &str,
        peers: Option<&Vec<NetworkPolicyPeer>>,
        ports: Option<&Vec<NetworkPolicyPort>>,
    ) -> NormRule {
        let field = format!("{field}[{index}]");
        let ports = self.ports(&field, ports);
        let peers = peers.filter(|p| !p.is_empty()).map(|peers| {
            peers
                .iter()
                .enumerate()
                .filter_map(|(k, p)| self.peer(&format!("{field}.{peers_name}[{k}]"), p))
                .collect()
        });
        NormRule {
            index: index as u32,
            peers,
            ports,
        }
    }
}

/// Normalises one policy. `key` (the store key) is authoritative for its namespace and name.
pub fn normalise(key: &ObjectKey, policy: &NetworkPolicy) -> (NormPolicy, Vec<CompileError>) {
    let default_spec = Default::default();
    let spec = policy.spec.as_ref().unwrap_or(&default_spec);
    let mut n = Normaliser {
        key,
        errors: Vec::new(),
    };

    let ingress = spec.ingress.as_deref().unwrap_or_default();
    let egress = spec.egress.as_deref().unwrap_or_default();
    let isolates = match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            let mut isolates = [false; 2];
            let mut bad = false;
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => isolates[Direction::Ingress as usize] = true,
                    "Egress" => isolates[Direction::Egress as usize] = true,
                    other => {
                        bad = true;
                        n.error(
                            format!("spec.policyTypes[{i}]"),
                            format!("unknown policy type {other:?} (Ingress or Egress)"),
                        );
                    }
                }
            }
            // An unreadable policyTypes declares nothing we can trust: isolate both ways.
            if bad { [true; 2] } else { isolates }
        }
        _ => [true, !egress.is_empty()],
    };

    let subject = match &spec.pod_selector {
        None => Some(Selector::everything()),
        Some(s) => n.selector("spec.podSelector", s),
    };

    let ingress_rules: Vec<NormRule> = ingress
        .iter()
        .enumerate()
        .map(|(i, r)| n.rule("spec.ingress", i, "from", r.from.as_ref(), r.ports.as_ref()))
        .collect();
    let egress_rules: Vec<NormRule> = egress
        .iter()
        .enumerate()
        .map(|(i, r)| n.rule("spec.egress", i, "to", r.to.as_ref(), r.ports.as_ref()))
        .collect();

    let rejected = !n.errors.is_empty();
    let keep = |dir: Direction, rules: Vec<NormRule>| {
        if rejected || !isolates[dir as usize] {
            Vec::new()
        } else {
            rules
        }
    };
    let policy = NormPolicy {
        key: key.clone(),
        isolates,
        subject: subject.unwrap_or_else(Selector::everything),
        rules: [
            keep(Direction::Ingress, ingress_rules),
            keep(Direction::Egress, egress_rules),
        ],
        rejected,
    };
    (policy, n.errors)
}
