//! `GET /explain` (control socket): a flow judged from what the kernel maps of this node hold
//! now, read back entry by entry ([`KernelView`]), beside the evaluator's verdict on the agent's
//! cluster state. The two must agree; a difference is a bug (of the compiler, the map writer or a
//! map written by something else) and is reported as one (`agrees: false`).
//!
//! The kernel's decision for a new flow is mirrored step by step from `policy-ebpf` (`decide.rs`
//! `judge_new`, `policy.rs`): the endpoint's flags (NOT_PROGRAMMED drops, a direction that is
//! not isolated allows), the peer's identities from IPCACHE (the longest prefix; a miss is the
//! world), the node's own addresses (identity HOST) allowed, then the POLICY groups of the
//! peer's identity, its CIDR identity and `ANY`, in that order, the first range containing the
//! port deciding. An IPv6 flow with an IPv4-mapped address is judged by isolation alone
//! ([`judge_v4_mapped`]), as the programs judge it at parse time. Conntrack is not consulted:
//! this is the verdict of a *new* flow. A flow to a Service ClusterIP is not explained here (the
//! kernel decides it after DNAT, at the backend).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::{Ipv4Network, Ipv6Network};
use policy_common::{
    Direction, EndpointInfo, IdentityPair, PolicyValue, Reason, endpoint_flags, identity,
};
use serde::{Deserialize, Serialize};

use crate::compiler::output::{PolicyEntryKey, RuleRef};
use crate::evaluator::{DirectionVerdict, Outcome};

/// The kernel maps of one node, as read back.
#[derive(Clone, Debug, Default)]
pub struct KernelView {
    /// ENDPOINTS: host veth ifindex → endpoint.
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// IPCACHE_EXACT (as /32) and IPCACHE_V4.
    pub ipcache_v4: BTreeMap<Ipv4Network, IdentityPair>,
    /// IPCACHE_EXACT (as /128) and IPCACHE_V6.
    pub ipcache_v6: BTreeMap<Ipv6Network, IdentityPair>,
    /// POLICY, one entry per port range.
    pub policy: BTreeMap<PolicyEntryKey, PolicyValue>,
}

/// The query of `GET /explain`: a flow between two ends (`NS/POD`, `node/NAME` or an address);
/// also the flags of `policy-agent control explain`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct ExplainQuery {
    /// NS/POD, node/NAME or an address.
    #[arg(long)]
    pub from: String,
    /// NS/POD, node/NAME or an address.
    #[arg(long)]
    pub to: String,
    /// The destination port (a number).
    #[arg(long)]
    pub port: u16,
    /// TCP (default), UDP or SCTP.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

impl ExplainQuery {
    /// The request target: `/explain?from=…&to=…&port=…[&protocol=…]`.
    pub fn target(&self) -> String {
        use crate::flowstore::encode;
        let mut target = format!(
            "/explain?from={}&to={}&port={}",
            encode(&self.from),
            encode(&self.to),
            self.port
        );
        if let Some(p) = &self.protocol {
            target.push_str(&format!("&protocol={}", encode(p)));
        }
        target
    }
}

/// The answer of one node: one entry per direction this node decides (the egress of a local
/// source, the ingress of a local destination; none when neither end is local).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveExplain {
    pub node: String,
    pub directions: Vec<LiveDirection>,
}

/// One direction, from the kernel maps and from the evaluator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveDirection {
    /// `ingress` or `egress`.
    pub direction: String,
    /// The local pod.
    pub endpoint: String,
    pub ifindex: u32,
    /// What the kernel holds for the endpoint (`None`: no ENDPOINTS entry, which drops).
    pub kernel_endpoint: Option<KernelEndpoint>,
    /// The peer's address and its IPCACHE identities.
    pub peer: IpAddr,
    pub peer_identity: u32,
    pub peer_cidr_identity: u32,
    pub kernel: Decision,
    pub evaluator: Decision,
    pub agrees: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEndpoint {
    pub id: u32,
    pub identity: u32,
    /// `ingress-isolated`, `egress-isolated`, `not-programmed`.
    pub flags: Vec<String>,
}

/// A verdict and, when a rule decided, its policy and rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

impl KernelView {
    /// The peer's identities: the longest IPCACHE prefix containing it, else the world.
    pub fn identities(&self, ip: IpAddr) -> IdentityPair {
        let found = match ip {
            IpAddr::V4(v4) => self
                .ipcache_v4
                .iter()
                .filter(|(net, _)| net.contains(v4))
                .max_by_key(|(net, _)| net.prefix())
                .map(|(_, v)| *v),
            IpAddr::V6(v6) => self
                .ipcache_v6
                .iter()
                .filter(|(net, _)| net.contains(v6))
                .max_by_key(|(net, _)| net.prefix())
                .map(|(_, v)| *v),
        };
        found.unwrap_or(IdentityPair {
            identity: identity::WORLD,
            cidr_identity: identity::ANY,
        })
    }

    /// The rule reference of the first POLICY range of (endpoint, identity, direction,
    /// protocol) containing `port`.
    fn probe(&self, endpoint: u32, id: u32, direction: Direction, protocol: u8, port: u16) -> u32 {
        let from = PolicyEntryKey {
            endpoint,
            identity: id,
            direction,
            protocol,
            first: 0,
            last: 0,
        };
        self.policy
            .range(from..)
            .take_while(|(k, _)| {
                k.endpoint == endpoint
                    && k.identity == id
                    && k.direction == direction
                    && k.protocol == protocol
            })
            .find(|(k, _)| k.first <= port && port <= k.last)
            .map_or(0, |(_, v)| v.rule)
    }

    /// The kernel's decision for a new flow of endpoint `ep` in `direction` with `peer`
    /// (`decide.rs` `judge_new`): the reason and the deciding rule reference (0 when none).
    pub fn judge(
        &self,
        ep: &EndpointInfo,
        direction: Direction,
        peer: IdentityPair,
        protocol: u8,
        port: u16,
    ) -> (Reason, u32) {
        let bit = match direction {
            Direction::Ingress => endpoint_flags::INGRESS_ISOLATED,
            Direction::Egress => endpoint_flags::EGRESS_ISOLATED,
        };
        if ep.flags & endpoint_flags::NOT_PROGRAMMED != 0 {
            return (Reason::DroppedEndpointNotProgrammed, 0);
        }
        if ep.flags & bit == 0 {
            return (Reason::AllowedNotIsolated, 0);
        }
        if peer.identity == identity::HOST {
            return (Reason::AllowedHost, 0);
        }
        let mut candidates = vec![peer.identity];
        if peer.cidr_identity != identity::ANY {
            candidates.push(peer.cidr_identity);
        }
        candidates.push(identity::ANY);
        for id in candidates {
            let rule = self.probe(ep.id, id, direction, protocol, port);
            if rule != 0 {
                return (Reason::AllowedByPolicy, rule);
            }
        }
        (Reason::DroppedPolicy, 0)
    }
}

/// The kernel's decision at endpoint `ep` for an IPv6 packet with an IPv4-mapped address at
/// either end (`policy-ebpf` `parse.rs`, `decide.rs` `parse_at_endpoint`): judged by isolation
/// alone, before any lookup, and not recorded where it passes.
pub fn judge_v4_mapped(ep: &EndpointInfo, direction: Direction) -> Reason {
    let bit = match direction {
        Direction::Ingress => endpoint_flags::INGRESS_ISOLATED,
        Direction::Egress => endpoint_flags::EGRESS_ISOLATED,
    };
    if ep.flags & bit != 0 {
        Reason::DroppedV4Mapped
    } else {
        Reason::AllowedNotPoliced
    }
}

/// The names of an endpoint's flags.
pub fn flag_names(flags: u32) -> Vec<String> {
    [
        (endpoint_flags::INGRESS_ISOLATED, "ingress-isolated"),
        (endpoint_flags::EGRESS_ISOLATED, "egress-isolated"),
        (endpoint_flags::NOT_PROGRAMMED, "not-programmed"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| (*name).to_string())
    .collect()
}

/// A kernel decision, named with the rule references the agent wrote.
pub fn decision(reason: Reason, rule: u32, rules: &BTreeMap<u32, RuleRef>) -> Decision {
    let named = rules.get(&rule).filter(|_| rule != 0);
    Decision {
        allowed: !reason.is_drop(),
        reason: reason.as_str().into(),
        policy: named.map(|r| r.policy.to_string()),
        rule: named.map(RuleRef::rule_name),
    }
}

/// The answers of the nodes for one query, as text: per direction, the kernel's verdict and
/// what it was read from, the evaluator's, and `MISMATCH` when they differ.
pub fn render(q: &ExplainQuery, nodes: &[LiveExplain]) -> String {
    let protocol = q.protocol.as_deref().unwrap_or("TCP");
    let mut out = format!(
        "{} -> {} {protocol}/{} (kernel maps):\n",
        q.from, q.to, q.port
    );
    let word = |allowed: bool| if allowed { "allowed" } else { "denied" };
    let named = |d: &Decision| match (&d.policy, &d.rule) {
        (Some(p), Some(r)) => format!("{} by {p} {r}", d.reason),
        _ => d.reason.clone(),
    };
    for n in nodes {
        for d in &n.directions {
            let ep = match &d.kernel_endpoint {
                Some(e) => format!(
                    "endpoint {} identity {} [{}]",
                    e.id,
                    e.identity,
                    e.flags.join(",")
                ),
                None => "no ENDPOINTS entry".into(),
            };
            out.push_str(&format!(
                "  {} {} of {} (ifindex {}, {ep}); peer {} identity {} cidr {}\n    kernel:    {} ({})\n    evaluator: {} ({}){}\n",
                n.node,
                d.direction,
                d.endpoint,
                d.ifindex,
                d.peer,
                d.peer_identity,
                d.peer_cidr_identity,
                word(d.kernel.allowed),
                named(&d.kernel),
                word(d.evaluator.allowed),
                named(&d.evaluator),
                if d.agrees { "" } else { "\n    MISMATCH: the kernel maps and the evaluator disagree (a bug)" },
            ));
        }
    }
    out
}

/// A pod reaching itself: passed by the kernel before any lookup.
pub fn self_traffic() -> Decision {
    Decision {
        allowed: true,
        reason: "allowed_self".into(),
        policy: None,
        rule: None,
    }
}

/// The evaluator's verdict of one direction, in the same shape.
pub fn evaluator_decision(v: &DirectionVerdict) -> Decision {
    let reason = match v.outcome {
        Outcome::NotPolicied => "not_policied",
        Outcome::SelfTraffic => "allowed_self",
        Outcome::Host => "allowed_host",
        Outcome::NotIsolated => "allowed_not_isolated",
        Outcome::AllowedByPolicy => "allowed_by_policy",
        Outcome::Denied => "dropped_policy",
        Outcome::DeniedV4Mapped => Reason::DroppedV4Mapped.as_str(),
    };
    let first = v.allowing.first();
    Decision {
        allowed: v.outcome.allowed(),
        reason: reason.into(),
        policy: first.map(|r| r.policy.to_string()),
        rule: first.map(RuleRef::rule_name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_common::proto;

    fn view() -> KernelView {
        let mut v = KernelView::default();
        v.ipcache_v4.insert(
            "10.244.1.5/32".parse().unwrap(),
            IdentityPair {
                identity: 300,
                cidr_identity: identity::ANY,
            },
        );
        v.ipcache_v4.insert(
            "192.0.2.0/24".parse().unwrap(),
            IdentityPair {
                identity: identity::WORLD,
                cidr_identity: (1 << 24) + 1,
            },
        );
        v.ipcache_v4.insert(
            "172.18.0.2/32".parse().unwrap(),
            IdentityPair {
                identity: identity::HOST,
                cidr_identity: identity::ANY,
            },
        );
        let entry = |identity, first, last, rule| {
            (
                PolicyEntryKey {
                    endpoint: 7,
                    identity,
                    direction: Direction::Ingress,
                    protocol: proto::TCP,
                    first,
                    last,
                },
                PolicyValue {
                    rule,
                    ..Default::default()
                },
            )
        };
        v.policy.extend([
            entry(300, 80, 80, 1),
            entry((1 << 24) + 1, 443, 443, 2),
            entry(identity::ANY, 8000, 8080, 3),
        ]);
        v
    }

    #[test]
    fn mirrors_the_kernel_lookup_order() {
        let v = view();
        let ep = EndpointInfo {
            id: 7,
            flags: endpoint_flags::INGRESS_ISOLATED,
            ..Default::default()
        };
        let judge = |ip: &str, port| {
            let peer = v.identities(ip.parse().unwrap());
            v.judge(&ep, Direction::Ingress, peer, proto::TCP, port)
        };
        assert_eq!(judge("10.244.1.5", 80), (Reason::AllowedByPolicy, 1));
        assert_eq!(judge("10.244.1.5", 81), (Reason::DroppedPolicy, 0));
        assert_eq!(
            judge("192.0.2.9", 443),
            (Reason::AllowedByPolicy, 2),
            "CIDR identity"
        );
        assert_eq!(
            judge("198.51.100.1", 8042),
            (Reason::AllowedByPolicy, 3),
            "ANY"
        );
        assert_eq!(
            judge("198.51.100.1", 443),
            (Reason::DroppedPolicy, 0),
            "the world"
        );
        assert_eq!(judge("172.18.0.2", 1), (Reason::AllowedHost, 0));
        assert_eq!(
            v.judge(
                &ep,
                Direction::Egress,
                v.identities("10.244.1.5".parse().unwrap()),
                proto::TCP,
                1
            ),
            (Reason::AllowedNotIsolated, 0)
        );
        let broken = EndpointInfo {
            flags: endpoint_flags::NOT_PROGRAMMED,
            ..ep
        };
        assert_eq!(
            v.judge(
                &broken,
                Direction::Egress,
                IdentityPair::default(),
                proto::TCP,
                80
            )
            .0,
            Reason::DroppedEndpointNotProgrammed
        );
        assert_eq!(flag_names(broken.flags), ["not-programmed"]);
    }

    #[test]
    fn v4_mapped_flows_are_judged_by_isolation_alone_on_both_sides() {
        let ep = EndpointInfo {
            id: 7,
            flags: endpoint_flags::INGRESS_ISOLATED,
            ..Default::default()
        };
        assert_eq!(
            judge_v4_mapped(&ep, Direction::Ingress),
            Reason::DroppedV4Mapped
        );
        assert_eq!(
            judge_v4_mapped(&ep, Direction::Egress),
            Reason::AllowedNotPoliced
        );
        let kernel = decision(
            judge_v4_mapped(&ep, Direction::Ingress),
            0,
            &BTreeMap::new(),
        );
        let evaluator = evaluator_decision(&DirectionVerdict {
            outcome: Outcome::DeniedV4Mapped,
            isolating: Vec::new(),
            allowing: Vec::new(),
        });
        assert_eq!(kernel, evaluator);
        assert_eq!(kernel.reason, "dropped_v4_mapped");
        assert!(!kernel.allowed);
    }
}
