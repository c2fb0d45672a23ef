//! The flow log: verdict events from the EVENTS ring buffer, one structured log line each
//! (target `policy_agent::flow`), naming the local pod, the peer (pod or address), the Service a
//! flow went through when known, and the policy and rule that allowed it (a drop names none: no
//! rule matched).
//!
//! While a policy is in audit ([`crate::audit`]) the same events are judged against the whole
//! cluster, audited policies included ([`judge_event`]): a new flow whose verdict enforcing them
//! would change gives one `audit` line (same target, `verdict=would-drop|would-allow`) and
//! counts in `policy_agent_audit_verdicts_total`. Those lines are written with or without
//! `--flow-log`; the ordinary lines only as the flags say.
//!
//! Audit sees what the kernel reports, and the kernel's events are rate limited per CPU
//! (CONFIG.events_per_sec): flows over that budget, or lost to a full ring buffer, are neither
//! logged nor judged. Only new flows are judged (a flow established before the annotation was
//! set reports nothing until it is opened again).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, RwLock},
};

use policy_common::{Direction, Reason, VerdictEvent, proto};
use tracing::info;

use crate::{
    audit::{self, Finding},
    compiler::output::RuleRef,
    dataplane::EventReader,
    evaluator::{self, Evaluator, Peer, Protocol},
    flowstore::{self, AuditNote, FlowStore},
    metrics::{Metrics, VerdictLabel},
    model::{Cluster, ObjectKey},
};

/// What is needed to name the parties of a flow; refreshed after every sync.
#[derive(Clone, Debug, Default)]
pub struct FlowContext {
    /// Rule reference → its policy and rule.
    pub rules: BTreeMap<u32, RuleRef>,
    /// Kernel endpoint id → local pod.
    pub endpoints: HashMap<u32, ObjectKey>,
    /// Pod address → pod: every address of every pod that owns its addresses
    /// ([`crate::model::pods_by_address`]), IPv4 and IPv6.
    pub pods_by_ip: HashMap<IpAddr, ObjectKey>,
    /// Backend (address, port, protocol) → Service (from EndpointSlices).
    pub services: HashMap<(IpAddr, u16, u8), ObjectKey>,
    /// Set while some policy is in audit.
    pub audit: Option<Arc<AuditState>>,
}

/// What judging events for audit needs, taken at one sync.
#[derive(Clone, Debug, Default)]
pub struct AuditState {
    /// The whole cluster, audited policies included (a copy: the store moves on).
    pub cluster: Cluster,
    pub audited: BTreeSet<ObjectKey>,
    /// Every Service ClusterIP. The egress verdict of a flow to one that the kernel reports at
    /// the source names the ClusterIP, not the backend it will reach, so it is not judged.
    pub service_ips: HashSet<IpAddr>,
}

impl AuditState {
    pub fn new(cluster: &Cluster, audited: BTreeSet<ObjectKey>) -> Self {
        let service_ips = crate::model::service_cluster_ips(cluster).collect();
        AuditState {
            cluster: cluster.clone(),
            audited,
            service_ips,
        }
    }
}

/// Which ordinary flow lines are written (audit lines always are), and whether flows are
/// recorded for `/flows`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// `--flow-log`: drops.
    pub flows: bool,
    /// `--flow-log-allowed`: allowed new flows too.
    pub allowed: bool,
    /// `--flow-records` is not 0: every event (allowed and dropped) goes to the flow store.
    pub records: bool,
}

impl LogOptions {
    /// Whether the ordinary line of `flow` is written. Allowed flows are reported by the kernel
    /// also when audit asked for them; they are logged only with `--flow-log-allowed`.
    pub fn logs(&self, flow: &Flow) -> bool {
        self.flows && (flow.verdict != "allowed" || self.allowed)
    }
}

/// One flow, described (also the body of a [`crate::flowstore::FlowRecord`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Flow {
    /// `allowed`, `dropped` (or `unknown`).
    pub verdict: String,
    /// The kernel's reason ([`Reason::as_str`]).
    pub reason: String,
    /// Seen from the local pod: `ingress` (to it) or `egress` (from it).
    pub direction: String,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `ns/name` of the allowing policy, when a rule decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `ingress[i]` / `egress[i]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
        }
        .into(),
        reason: reason.map_or("unknown", Reason::as_str).into(),
        direction: if ingress { "ingress" } else { "egress" }.into(),
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
        rule: rule.map(RuleRef::rule_name),
    }
}

/// An event as the evaluator sees it: the flow, the direction the kernel decided, and whether
/// it allowed the flow. `None` for what audit does not judge: verdicts that are not a policy
/// decision on a new flow (established flows, replies, the node's own traffic, malformed
/// packets, unprogrammed endpoints), protocols NetworkPolicy does not know, and egress to a
/// Service ClusterIP (decided again after DNAT).
pub fn event_flow(
    ev: &VerdictEvent,
    ctx: &FlowContext,
    state: &AuditState,
) -> Option<(evaluator::Flow, Direction, bool)> {
    let allowed = match Reason::from_u32(ev.reason)? {
        Reason::AllowedByPolicy | Reason::AllowedNotIsolated => true,
        Reason::DroppedPolicy => false,
        _ => return None,
    };
    let protocol = match ev.protocol {
        proto::TCP => Protocol::Tcp,
        proto::UDP => Protocol::Udp,
        proto::SCTP => Protocol::Sctp,
        _ => return None,
    };
    let direction = if ev.direction == Direction::Ingress as u8 {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    let src = address(ev.src, ev.family);
    let dst = address(ev.dst, ev.family);
    if direction == Direction::Egress && state.service_ips.contains(&dst) {
        return None;
    }
    let peer = |ip: IpAddr| match ctx.pods_by_ip.get(&ip) {
        Some(pod) => Peer::Pod {
            pod: pod.clone(),
            ip,
        },
        None => Peer::Address(ip),
    };
    let flow = evaluator::Flow {
        src: peer(src),
        dst: peer(dst),
        protocol,
        port: ev.dport,
    };
    Some((flow, direction, allowed))
}

/// What enforcing the audited policies would change for this event ([`audit::judge`] of
/// [`event_flow`]).
pub fn judge_event(
    ev: &VerdictEvent,
    ctx: &FlowContext,
    state: &AuditState,
    full: &Evaluator<'_>,
) -> Option<Finding> {
    let (flow, direction, allowed) = event_flow(ev, ctx, state)?;
    audit::judge(full, &state.audited, &flow, direction, allowed)
}

fn same_state(a: &Option<Arc<AuditState>>, b: &Option<Arc<AuditState>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Logs every event until the ring buffer fails: the ordinary line as `options` say, and the
/// audit line of every event whose verdict the audited policies would change; records each in
/// `store` (with the audit finding, if any).
///
/// Cost of audit: one [`Evaluator`] per audit state (that is, per sync while a policy is in
/// audit), whose derived tables (node addresses, namespace labels, parsed CIDRs) are built on
/// the first event judged and reused for every later one; per judged event, one direction
/// evaluated: a walk of the subject's namespace's policies and their rules (no allocation
/// beyond the verdict's lists). That runs on this task, not in the kernel: the datapath only
/// pays for the extra allowed-flow events (one per new flow, within the rate limit).
pub async fn run(
    mut reader: EventReader,
    ctx: Arc<RwLock<FlowContext>>,
    metrics: Arc<Metrics>,
    options: LogOptions,
    store: Option<Arc<FlowStore>>,
) {
    let mut batch = Vec::new();
    let mut pending = false;
    loop {
        let state = ctx.read().unwrap_or_else(|e| e.into_inner()).audit.clone();
        let full = state.as_deref().map(|s| Evaluator::new(&s.cluster));
        loop {
            if !pending {
                batch.clear();
                if let Err(e) = reader.read(&mut batch).await {
                    tracing::error!(error = %e, "reading verdict events failed; flow log stopped");
                    return;
                }
                metrics.flow_events.inc_by(batch.len() as u64);
            }
            pending = false;
            let ctx = ctx.read().unwrap_or_else(|e| e.into_inner());
            if !same_state(&ctx.audit, &state) {
                // A sync replaced the audit state: judge this batch with a new evaluator.
                pending = true;
                break;
            }
            let now = flowstore::now_ms();
            for ev in &batch {
                let f = describe(ev, &ctx);
                if options.logs(&f) {
                    log_flow(&f);
                }
                let mut note = None;
                if let (Some(state), Some(full)) = (&state, &full)
                    && let Some(finding) = judge_event(ev, &ctx, state, full)
                {
                    metrics
                        .audit_verdicts
                        .get_or_create(&VerdictLabel {
                            verdict: finding.verdict(),
                        })
                        .inc();
                    log_audit(&f, &finding);
                    let (policy, rule) = finding_names(&finding);
                    note = Some(AuditNote {
                        verdict: finding.verdict().into(),
                        policy,
                        rule,
                    });
                }
                if let Some(store) = &store {
                    store.push(now, f, note);
                }
            }
        }
    }
}

fn log_flow(f: &Flow) {
    info!(
        target: "policy_agent::flow",
        verdict = %f.verdict,
        reason = %f.reason,
        direction = %f.direction,
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

/// The audited policies a finding names, comma-separated, and its rule (`ingress[i]` /
/// `egress[i]`, would-allow only).
pub fn finding_names(finding: &Finding) -> (String, String) {
    let policies: Vec<String> = finding.policies().iter().map(ToString::to_string).collect();
    let rule = match finding {
        Finding::WouldAllow { rule } => rule.rule_name(),
        Finding::WouldDrop { .. } => String::new(),
    };
    (policies.join(","), rule)
}

fn log_audit(f: &Flow, finding: &Finding) {
    let (policy, rule) = finding_names(finding);
    info!(
        target: "policy_agent::flow",
        verdict = finding.verdict(),
        direction = %f.direction,
        protocol = %f.protocol,
        src = %f.src,
        sport = f.sport,
        dst = %f.dst,
        dport = f.dport,
        endpoint = %f.endpoint,
        peer = %f.peer,
        service = f.service.as_deref().unwrap_or(""),
        policy = %policy,
        rule = %rule,
        kernel_verdict = %f.verdict,
        "audit"
    );
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
            audit: None,
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
        assert_eq!((f.verdict.as_str(), f.policy), ("dropped", None));
    }

    #[test]
    fn ipv6_events_show_ipv6_addresses() {
        let web = ObjectKey::new("x", "web");
        let client = ObjectKey::new("x", "client");
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let ctx = FlowContext {
            pods_by_ip: HashMap::from([
                (ip("fd00:10:244:2::7"), client.clone()),
                (ip("10.244.2.7"), client),
            ]),
            endpoints: HashMap::from([(3, web)]),
            services: HashMap::from([(
                (ip("fd00:10:244:1::5"), 8080, proto::TCP),
                ObjectKey::new("x", "web-svc"),
            )]),
            ..Default::default()
        };
        let octets = |s: &str| s.parse::<Ipv6Addr>().unwrap().octets();
        let mut ev = VerdictEvent {
            src: octets("fd00:10:244:2::7"),
            dst: octets("fd00:10:244:1::5"),
            sport: 40000,
            dport: 8080,
            endpoint: 3,
            reason: Reason::DroppedPolicy as u32,
            protocol: proto::TCP,
            direction: Direction::Ingress as u8,
            family: 6,
            ..Default::default()
        };
        let f = describe(&ev, &ctx);
        assert_eq!(
            (f.src.to_string(), f.dst.to_string()),
            ("fd00:10:244:2::7".into(), "fd00:10:244:1::5".into())
        );
        assert_eq!(
            (f.peer.as_str(), f.endpoint.as_str()),
            ("x/client", "x/web")
        );
        assert_eq!(f.service.as_deref(), Some("x/web-svc"));
        // An IPv6 packet whose source spells an IPv4 address stays IPv6, and is not the pod
        // holding that IPv4 address.
        ev.src = octets("::ffff:10.244.2.7");
        let f = describe(&ev, &ctx);
        assert_eq!(f.src, ip("::ffff:10.244.2.7"));
        assert_eq!(f.peer, "::ffff:10.244.2.7");
        // The kernel's drop of such a packet at an isolated endpoint: nothing after the fixed
        // header was parsed, and it is no policy decision for audit to judge.
        let mapped = VerdictEvent {
            reason: Reason::DroppedV4Mapped as u32,
            protocol: 0,
            sport: 0,
            dport: 0,
            ..ev
        };
        let f = describe(&mapped, &ctx);
        assert_eq!(
            (f.verdict.as_str(), f.reason.as_str()),
            ("dropped", "dropped_v4_mapped")
        );
        assert_eq!(
            (f.peer.as_str(), f.endpoint.as_str()),
            ("::ffff:10.244.2.7", "x/web")
        );
        let state = AuditState::new(&Cluster::default(), Default::default());
        assert!(event_flow(&mapped, &ctx, &state).is_none());
        // The same bytes in an IPv4 event are the IPv4 address.
        ev.family = 4;
        ev.dst = octets("::ffff:10.244.1.5");
        let f = describe(&ev, &ctx);
        assert_eq!((f.src, f.dst), (ip("10.244.2.7"), ip("10.244.1.5")));
        assert_eq!(f.peer, "x/client");
    }

    #[test]
    fn ipv6_events_are_judged_at_ipv6_addresses() {
        let c = audit_cluster();
        let state = AuditState::new(&c, audit::audited(&c));
        let ctx = FlowContext {
            pods_by_ip: crate::model::pods_by_address(&c)
                .into_iter()
                .map(|(ip, k)| (ip, k.clone()))
                .collect(),
            ..Default::default()
        };
        let mut ev = event(
            [0; 4],
            [0; 4],
            80,
            Reason::AllowedNotIsolated,
            Direction::Egress,
        );
        ev.family = 6;
        ev.src = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        ev.dst = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        let (flow, _, _) = event_flow(&ev, &ctx, &state).unwrap();
        assert_eq!(
            flow.src,
            Peer::Pod {
                pod: ObjectKey::new("x", "a"),
                ip: "fd00::1".parse().unwrap()
            }
        );
        assert_eq!(flow.dst, Peer::Address("2001:db8::1".parse().unwrap()));
    }

    fn event(
        src: [u8; 4],
        dst: [u8; 4],
        dport: u16,
        reason: Reason,
        direction: Direction,
    ) -> VerdictEvent {
        VerdictEvent {
            src: Ipv4Addr::from(src).to_ipv6_mapped().octets(),
            dst: Ipv4Addr::from(dst).to_ipv6_mapped().octets(),
            sport: 40000,
            dport,
            endpoint: 1,
            reason: reason as u32,
            protocol: proto::TCP,
            direction: direction as u8,
            family: 4,
            ..Default::default()
        }
    }

    fn audit_cluster() -> Cluster {
        let ns = |name: &str, audit: bool| -> k8s_openapi::api::core::v1::Namespace {
            let mut v = serde_json::json!({"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}});
            if audit {
                v["metadata"]["annotations"] = serde_json::json!({audit::ANNOTATION: "true"});
            }
            serde_json::from_value(v).unwrap()
        };
        let pod = |name: &str, ips: &[&str]| {
            crate::model::fixtures::pod("n1", serde_json::json!({"app": name}), ips)
        };
        let mut c = Cluster::default();
        c.namespaces.insert("x".into(), ns("x", false));
        c.namespaces.insert("y".into(), ns("y", true));
        c.pods
            .insert(ObjectKey::new("x", "a"), pod("a", &["10.0.0.1", "fd00::1"]));
        c.pods
            .insert(ObjectKey::new("y", "b"), pod("b", &["10.0.0.2"]));
        c.policies.insert(
            ObjectKey::new("y", "deny"),
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "deny", "namespace": "y"},
                "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
            }))
            .unwrap(),
        );
        c.policies.insert(
            ObjectKey::new("x", "deny-egress"),
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "deny-egress", "namespace": "x", "annotations": {audit::ANNOTATION: "true"}},
                "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 53, "protocol": "UDP"}]}]},
            }))
            .unwrap(),
        );
        c.policies.insert(
            ObjectKey::new("x", "allow-b"),
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "allow-b", "namespace": "x", "annotations": {audit::ANNOTATION: "true"}},
                "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}]},
            }))
            .unwrap(),
        );
        c
    }

    #[test]
    fn events_are_judged_against_the_audited_policies() {
        let c = audit_cluster();
        let state = AuditState::new(&c, audit::audited(&c));
        assert_eq!(state.audited.len(), 3);
        let ctx = FlowContext {
            pods_by_ip: HashMap::from([
                ("10.0.0.1".parse().unwrap(), ObjectKey::new("x", "a")),
                ("10.0.0.2".parse().unwrap(), ObjectKey::new("y", "b")),
            ]),
            ..Default::default()
        };
        let full = Evaluator::new(&state.cluster);
        let judge = |ev: &VerdictEvent| judge_event(ev, &ctx, &state, &full);
        let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        // x/a -> y/b:80, allowed at y/b's ingress today (not isolated): y/deny would drop it.
        let ingress = event(a, b, 80, Reason::AllowedNotIsolated, Direction::Ingress);
        let f = judge(&ingress).unwrap();
        assert_eq!(f.verdict(), "would-drop");
        assert_eq!(finding_names(&f), ("y/deny".into(), String::new()));
        // Its egress at x/a: x/deny-egress would drop it (TCP/80 is not UDP/53).
        let egress = event(a, b, 80, Reason::AllowedNotIsolated, Direction::Egress);
        assert_eq!(
            judge(&egress),
            Some(Finding::WouldDrop {
                policies: vec![ObjectKey::new("x", "deny-egress")]
            })
        );
        // y/b -> x/a:80 dropped today would be allowed by x/allow-b.
        let mut dropped = event(b, a, 80, Reason::DroppedPolicy, Direction::Ingress);
        let f = judge(&dropped).unwrap();
        assert_eq!(finding_names(&f), ("x/allow-b".into(), "ingress[0]".into()));
        dropped.dport = 81;
        assert_eq!(judge(&dropped), None, "still denied");
        // Not judged: established flows, replies, the node, other protocols, unknown reasons.
        for reason in [
            Reason::AllowedEstablished,
            Reason::AllowedReply,
            Reason::AllowedHost,
            Reason::DroppedMalformed,
        ] {
            assert_eq!(
                judge(&event(a, b, 80, reason, Direction::Ingress)),
                None,
                "{reason:?}"
            );
        }
        let mut icmp = ingress;
        icmp.protocol = proto::ICMP;
        assert_eq!(judge(&icmp), None);
        // Egress to a Service ClusterIP is decided after DNAT: not judged at the source.
        let mut state = state.clone();
        state.service_ips.insert("10.96.0.10".parse().unwrap());
        let to_service = event(
            a,
            [10, 96, 0, 10],
            80,
            Reason::AllowedNotIsolated,
            Direction::Egress,
        );
        assert_eq!(judge_event(&to_service, &ctx, &state, &full), None);
    }

    #[test]
    fn allowed_lines_are_logged_only_with_flow_log_allowed() {
        let ctx = FlowContext::default();
        let allowed = describe(
            &event(
                [10, 0, 0, 1],
                [10, 0, 0, 2],
                80,
                Reason::AllowedNotIsolated,
                Direction::Ingress,
            ),
            &ctx,
        );
        let dropped = describe(
            &event(
                [10, 0, 0, 1],
                [10, 0, 0, 2],
                80,
                Reason::DroppedPolicy,
                Direction::Ingress,
            ),
            &ctx,
        );
        let opts = |flows, allowed| LogOptions {
            flows,
            allowed,
            records: true,
        };
        assert!(!opts(false, false).logs(&dropped));
        assert!(!opts(false, true).logs(&allowed));
        assert!(opts(true, false).logs(&dropped));
        assert!(
            !opts(true, false).logs(&allowed),
            "audit's allowed events stay out of the flow log"
        );
        assert!(opts(true, true).logs(&allowed));
    }
}
