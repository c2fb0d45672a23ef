//! The flow log: verdict events from the EVENTS ring buffer, one structured log line each
//! (target `policy_agent::flow`), naming the local pod, the peer (pod or address), the Service a
//! flow went through when known, and the policy and rule that allowed it (a drop names none: no
//! rule matched).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, RwLock},
};

use policy_common::{Direction, Reason, VerdictEvent, proto};
use tracing::info;

use crate::{
    compiler::output::RuleRef, dataplane::EventReader, metrics::Metrics, model::ObjectKey,
};

/// What is needed to name the parties of a flow; refreshed after every sync.
#[derive(Clone, Debug, Default)]
pub struct FlowContext {
    /// Rule reference → its policy and rule.
    pub rules: BTreeMap<u32, RuleRef>,
    /// Kernel endpoint id → local pod.
    pub endpoints: HashMap<u32, ObjectKey>,
    /// Pod address → pod (every pod of the cluster).
    pub pods_by_ip: HashMap<IpAddr, ObjectKey>,
    /// Backend (address, port, protocol) → Service (from EndpointSlices).
    pub services: HashMap<(IpAddr, u16, u8), ObjectKey>,
}

/// One flow, described.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub verdict: &'static str,
    pub reason: &'static str,
    /// Seen from the local pod: `ingress` (to it) or `egress` (from it).
    pub direction: &'static str,
    pub protocol: String,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    /// The local pod, `ns/name` (or the endpoint id when unknown).
    pub endpoint: String,
    /// The other side: `ns/name` for a pod, else its address.
    pub peer: String,
    /// The Service whose backend the destination is, when known.
    pub service: Option<String>,
    /// `ns/name` of the allowing policy, when a rule decided.
    pub policy: Option<String>,
    /// `ingress[i]` / `egress[i]`.
    pub rule: Option<String>,
}

fn address(bytes: [u8; 16], family: u8) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match (family, v6.to_ipv4_mapped()) {
        (4, Some(v4)) => IpAddr::V4(v4),
        (4, None) => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        _ => IpAddr::V6(v6),
    }
}

fn protocol_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        proto::ICMP => "ICMP".into(),
        proto::ICMPV6 => "ICMPv6".into(),
        other => other.to_string(),
    }
}

/// Names the parties and the deciding rule of one event.
pub fn describe(ev: &VerdictEvent, ctx: &FlowContext) -> Flow {
    let reason = Reason::from_u32(ev.reason);
    let src = address(ev.src, ev.family);
    let dst = address(ev.dst, ev.family);
    let ingress = ev.direction == Direction::Ingress as u8;
    let peer_addr = if ingress { src } else { dst };
    let rule = ctx.rules.get(&ev.rule).filter(|_| ev.rule != 0);
    Flow {
        verdict: match reason {
            Some(r) if r.is_drop() => "dropped",
            Some(_) => "allowed",
            None => "unknown",
        },
        reason: reason.map_or("unknown", Reason::as_str),
        direction: if ingress { "ingress" } else { "egress" },
        protocol: protocol_name(ev.protocol),
        src,
        sport: ev.sport,
        dst,
        dport: ev.dport,
        endpoint: ctx
            .endpoints
            .get(&ev.endpoint)
            .map_or_else(|| format!("endpoint-{}", ev.endpoint), ToString::to_string),
        peer: ctx
            .pods_by_ip
            .get(&peer_addr)
            .map_or_else(|| peer_addr.to_string(), ToString::to_string),
        service: ctx
            .services
            .get(&(dst, ev.dport, ev.protocol))
            .map(ToString::to_string),
        policy: rule.map(|r| r.policy.to_string()),
        rule: rule.map(|r| {
            let dir = match r.direction {
                Direction::Ingress => "ingress",
                Direction::Egress => "egress",
            };
            format!("{dir}[{}]", r.rule_index)
        }),
    }
}

/// Logs every event until the ring buffer fails.
pub async fn run(mut reader: EventReader, ctx: Arc<RwLock<FlowContext>>, metrics: Arc<Metrics>) {
    let mut batch = Vec::new();
    loop {
        batch.clear();
        if let Err(e) = reader.read(&mut batch).await {
            tracing::error!(error = %e, "reading verdict events failed; flow log stopped");
            return;
        }
        metrics.flow_events.inc_by(batch.len() as u64);
        let ctx = ctx.read().unwrap_or_else(|e| e.into_inner());
        for ev in &batch {
            let f = describe(ev, &ctx);
            info!(
                target: "policy_agent::flow",
                verdict = f.verdict,
                reason = f.reason,
                direction = f.direction,
                protocol = %f.protocol,
                src = %f.src,
                sport = f.sport,
                dst = %f.dst,
                dport = f.dport,
                endpoint = %f.endpoint,
                peer = %f.peer,
                service = f.service.as_deref().unwrap_or(""),
                policy = f.policy.as_deref().unwrap_or(""),
                rule = f.rule.as_deref().unwrap_or(""),
                "flow"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_pods_policy_and_rule() {
        let a = ObjectKey::new("x", "a");
        let b = ObjectKey::new("y", "b");
        let ctx = FlowContext {
            rules: BTreeMap::from([(
                5,
                RuleRef {
                    policy: ObjectKey::new("x", "allow-b"),
                    direction: Direction::Ingress,
                    rule_index: 1,
                },
            )]),
            endpoints: HashMap::from([(3, a.clone())]),
            pods_by_ip: HashMap::from([("10.244.2.7".parse().unwrap(), b)]),
            services: HashMap::new(),
        };
        let mut ev = VerdictEvent {
            src: Ipv4Addr::new(10, 244, 2, 7).to_ipv6_mapped().octets(),
            dst: Ipv4Addr::new(10, 244, 1, 3).to_ipv6_mapped().octets(),
            sport: 40000,
            dport: 80,
            endpoint: 3,
            reason: Reason::AllowedByPolicy as u32,
            rule: 5,
            protocol: proto::TCP,
            direction: Direction::Ingress as u8,
            family: 4,
            ..Default::default()
        };
        let f = describe(&ev, &ctx);
        assert_eq!(f.endpoint, "x/a");
        assert_eq!(f.peer, "y/b");
        assert_eq!(f.policy.as_deref(), Some("x/allow-b"));
        assert_eq!(f.rule.as_deref(), Some("ingress[1]"));
        assert_eq!(f.verdict, "allowed");
        assert_eq!(f.dst.to_string(), "10.244.1.3");
        ev.reason = Reason::DroppedPolicy as u32;
        ev.rule = 0;
        let f = describe(&ev, &ctx);
        assert_eq!((f.verdict, f.policy), ("dropped", None));
    }
}
